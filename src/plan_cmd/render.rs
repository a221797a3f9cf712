//! A plan as text for a terminal, Markdown for a pull-request comment, or
//! JSON for scripts. Pure.

use std::fmt::Write;

use super::report::{AgentRef, BaseInfo, BaselineSource, Change, FileChange, FileStatus, GroupPlan, Report, Wave};
use crate::model::ConfigHash;

/// At most this many agents are listed per wave (and per call-out) in text
/// and Markdown; JSON lists every one.
pub const LIST_CAP: usize = 20;

pub fn json(report: &Report) -> String {
    let mut s = serde_json::to_string_pretty(report).expect("a report always serializes");
    s.push('\n');
    s
}

fn agent(a: &AgentRef) -> String {
    match &a.host {
        Some(h) => format!("{} ({h})", a.uid),
        None => a.uid.to_string(),
    }
}

/// Up to [`LIST_CAP`] agents, then "and N more".
fn agent_list(agents: &[AgentRef], show: impl Fn(&AgentRef) -> String) -> String {
    let mut parts: Vec<String> = agents.iter().take(LIST_CAP).map(show).collect();
    if agents.len() > LIST_CAP {
        parts.push(format!("and {} more", agents.len() - LIST_CAP));
    }
    parts.join(", ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn key_label(key: &str) -> String {
    if key.is_empty() {
        "\"\" (main file)".to_string()
    } else {
        format!("{key:?}")
    }
}

fn base_line(base: &BaseInfo) -> String {
    let commit = base.commit.as_ref().map_or("none", |c| c.short());
    match (base.kind, &base.rev) {
        (BaselineSource::Base, Some(rev)) => format!("--base {rev} ({commit})"),
        _ => format!("first parent ({commit})"),
    }
}

fn stable_line(g: &GroupPlan) -> String {
    match &g.stable {
        None => "none (a new group)".to_string(),
        Some(s) => {
            let why = match s.source {
                BaselineSource::Note => "its note says the rollout completed",
                BaselineSource::FirstParent => "first parent",
                BaselineSource::Base => "--base",
            };
            format!("{} ({why})", s.commit.short())
        }
    }
}

fn hash_change(g: &GroupPlan) -> String {
    let short = |h: Option<ConfigHash>| h.map_or_else(|| "none".to_string(), |h| h.short());
    match g.change {
        Change::Unchanged => short(Some(g.config_hash)),
        _ => format!("{} -> {}", short(g.stable_config_hash), short(Some(g.config_hash))),
    }
}

fn wave_summary(g: &GroupPlan) -> String {
    match g.change {
        Change::Unchanged => "-".to_string(),
        _ if g.agents.members == 0 => "no connected agents".to_string(),
        Change::Revert => format!("{} at once", plural(g.agents.members, "agent", "agents")),
        _ => match g.waves.first() {
            Some(w) => format!(
                "{} in {}; first wave {}",
                plural(g.agents.members, "agent", "agents"),
                plural(g.waves.len(), "wave", "waves"),
                w.cumulative
            ),
            None => "-".to_string(),
        },
    }
}

fn policy_line(g: &GroupPlan) -> String {
    let p = &g.rollout;
    format!(
        "waves [{}], bake {}, apply_timeout {}, max_failures {}, on_failure {}",
        p.waves.join(", "),
        p.bake,
        p.apply_timeout,
        p.max_failures,
        p.on_failure
    )
}

fn file_line(f: &FileChange) -> String {
    let path = match (&f.old_path, &f.new_path) {
        (Some(a), Some(b)) if a != b => format!("{a} -> {b}"),
        (_, Some(p)) | (Some(p), None) => p.clone(),
        (None, None) => "?".to_string(),
    };
    let status = match f.status {
        FileStatus::Added => "added",
        FileStatus::Removed => "removed",
        FileStatus::Modified => "modified",
        FileStatus::Unchanged => "unchanged",
    };
    let mut line = format!("{}: {path} ({status})", key_label(&f.key));
    if let (Some(a), Some(b)) = (&f.old_content_type, &f.new_content_type)
        && a != b
    {
        let _ = write!(line, ", content type {a} -> {b}");
    }
    line
}

/// Call-out lines shared by text and Markdown (without bullets).
fn callouts(report: &Report, code: fn(&str) -> String) -> Vec<String> {
    let mut out = Vec::new();
    let c = &report.callouts;
    for m in c.multiple_matches.iter().take(LIST_CAP) {
        let losers: Vec<String> = m.losers.iter().map(|g| code(g.as_str())).collect();
        out.push(format!(
            "agent {} is matched by several groups: {} wins over {}",
            code(&agent(&m.agent)),
            code(m.winner.as_str()),
            losers.join(", ")
        ));
    }
    if c.multiple_matches.len() > LIST_CAP {
        out.push(format!(
            "and {} more agents matched by several groups",
            c.multiple_matches.len() - LIST_CAP
        ));
    }
    for e in &c.groups_without_agents {
        out.push(if e.matched == 0 {
            format!("group {} matches no agent", code(e.group.as_str()))
        } else {
            format!(
                "group {} holds no agent: the {} it matches belong to higher-ranked groups",
                code(e.group.as_str()),
                plural(e.matched, "agent", "agents")
            )
        });
    }
    for g in report
        .groups
        .iter()
        .filter(|g| g.change.pushes() && !g.unsupported.is_empty())
    {
        out.push(format!(
            "group {} ({}) has {} without AcceptsRemoteConfig or ReportsRemoteConfig, never pushed to: {}",
            code(g.name.as_str()),
            g.change.as_str(),
            plural(g.unsupported.len(), "agent", "agents"),
            agent_list(&g.unsupported, |a| code(&agent(a)))
        ));
    }
    if !c.moved.is_empty() {
        let moved: Vec<AgentRef> = c.moved.iter().map(|m| m.agent.clone()).collect();
        let mut line = format!("{} change group: ", plural(c.moved.len(), "agent", "agents"));
        let parts: Vec<String> = c
            .moved
            .iter()
            .take(LIST_CAP)
            .map(|m| {
                let side = |g: &Option<crate::model::GroupName>| {
                    g.as_ref().map_or_else(|| "unmanaged".to_string(), |g| code(g.as_str()))
                };
                format!("{} {} -> {}", code(&agent(&m.agent)), side(&m.from), side(&m.to))
            })
            .collect();
        line.push_str(&parts.join(", "));
        if moved.len() > LIST_CAP {
            let _ = write!(line, ", and {} more", moved.len() - LIST_CAP);
        }
        out.push(line);
    }
    if !c.unmanaged.is_empty() {
        out.push(format!(
            "{} matched by no group (unmanaged, never pushed to): {}",
            plural(c.unmanaged.len(), "agent is", "agents are"),
            agent_list(&c.unmanaged, |a| code(&agent(a)))
        ));
    }
    out
}

/// Groups the commit leaves alone while an earlier commit's rollout to them
/// has not completed.
fn pending(report: &Report, code: fn(&str) -> String) -> Vec<String> {
    report
        .groups
        .iter()
        .filter(|g| g.previous_config_hash.is_some() && !g.change.pushes())
        .map(|g| {
            format!(
                "{} is unchanged by this commit, but its rollout to {} (from an earlier commit) has not completed",
                code(g.name.as_str()),
                code(&g.config_hash.short())
            )
        })
        .collect()
}

/// The group's agents to call out: offline ones (in their places, they get
/// the config when they return) and unsupported ones (left out).
fn left_out(g: &GroupPlan, show: impl Fn(&AgentRef) -> String) -> Vec<String> {
    let mut out = Vec::new();
    if !g.offline.is_empty() {
        out.push(format!(
            "offline, in their places until they return ({}): {}",
            g.offline.len(),
            agent_list(&g.offline, &show)
        ));
    }
    if !g.unsupported.is_empty() {
        out.push(format!(
            "unsupported, never pushed to ({}): {}",
            g.unsupported.len(),
            agent_list(&g.unsupported, &show)
        ));
    }
    out
}

fn plain(s: &str) -> String {
    s.to_string()
}

fn fleet_line(report: &Report) -> String {
    let f = &report.fleet;
    format!(
        "{} ({} connected, {} offline), {} unmanaged, {} unsupported",
        plural(f.agents, "agent", "agents"),
        f.connected,
        f.offline,
        f.unmanaged,
        f.unsupported
    )
}

pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "plan for commit {}", report.commit);
    let _ = writeln!(out, "compared with {}", base_line(&report.base));
    let _ = writeln!(out, "fleet: {}", fleet_line(report));
    out.push('\n');
    let width = report
        .groups
        .iter()
        .map(|g| g.name.as_str().len())
        .chain(report.removed.iter().map(|r| r.name.as_str().len()))
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "groups:");
    for g in &report.groups {
        let _ = writeln!(
            out,
            "  {:width$}  {:9}  {}  {}",
            g.name.as_str(),
            g.change.as_str(),
            hash_change(g),
            wave_summary(g)
        );
    }
    for r in &report.removed {
        let _ = writeln!(
            out,
            "  {:width$}  {:9}  {}  held {}",
            r.name.as_str(),
            "removed",
            r.config_hash.short(),
            plural(r.agents, "agent", "agents")
        );
    }
    for g in report.groups.iter().filter(|g| g.change.pushes()) {
        out.push('\n');
        text_group(&mut out, g);
    }
    for l in pending(report, plain) {
        let _ = writeln!(out, "\nnote: {l}");
    }
    let lines = callouts(report, plain);
    if !lines.is_empty() {
        let _ = writeln!(out, "\ncall-outs:");
        for l in lines {
            let _ = writeln!(out, "  - {l}");
        }
    }
    if !report.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings:");
        for w in &report.warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }
    out
}

fn text_group(out: &mut String, g: &GroupPlan) {
    let _ = writeln!(out, "== {} ({}) {}", g.name, g.change.as_str(), hash_change(g));
    let _ = writeln!(out, "stable: {}", stable_line(g));
    let _ = writeln!(out, "rollout: {}", policy_line(g));
    for f in &g.files {
        let _ = writeln!(out, "file {}", file_line(f));
        for line in f.diff.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    if g.change == Change::Revert {
        let _ = writeln!(
            out,
            "revert to the stable config: pushed to all {} at once, no waves",
            plural(g.agents.members, "agent", "agents")
        );
    }
    if g.agents.members == 0 {
        let _ = writeln!(
            out,
            "no connected agents: nothing is pushed now; agents get it when they connect"
        );
    } else {
        for w in &g.waves {
            let _ = writeln!(out, "{}", text_wave(g, w));
        }
    }
    for l in left_out(g, agent) {
        let _ = writeln!(out, "{l}");
    }
}

fn text_wave(g: &GroupPlan, w: &Wave) -> String {
    let head = format!(
        "wave {} ({}, {} of {}): +{}",
        w.number,
        w.target,
        w.cumulative,
        g.agents.members,
        w.agents.len()
    );
    if w.agents.is_empty() {
        head
    } else {
        format!("{head}: {}", agent_list(&w.agents, agent))
    }
}

/// Inline code, with a fence longer than any backtick run inside.
fn code(s: &str) -> String {
    let longest = longest_backtick_run(s);
    let fence = "`".repeat(longest + 1);
    if longest > 0 {
        format!("{fence} {s} {fence}")
    } else {
        format!("{fence}{s}{fence}")
    }
}

/// A code span inside a table cell: pipes must be escaped even there.
fn code_cell(s: &str) -> String {
    code(s).replace('|', "\\|")
}

fn longest_backtick_run(s: &str) -> usize {
    s.split(|c| c != '`').map(str::len).max().unwrap_or(0)
}

/// Text safe in a Markdown table cell or HTML summary.
fn cell(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('|', "\\|")
}

pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let changed = report.groups.iter().filter(|g| g.change.pushes()).count();
    let _ = writeln!(out, "### opamp-gitops plan for {}", code(report.commit.short()));
    out.push('\n');
    let total = report.groups.len();
    let _ = writeln!(
        out,
        "{changed} of {} {}, {} removed. Compared with {}. Fleet: {}.",
        plural(total, "group", "groups"),
        if changed == 1 { "changes" } else { "change" },
        report.removed.len(),
        cell(&base_line(&report.base)),
        fleet_line(report)
    );
    out.push('\n');
    let _ = writeln!(out, "| group | change | config hash | agents | waves |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for g in &report.groups {
        let change = if g.change.pushes() {
            format!("**{}**", g.change.as_str())
        } else {
            g.change.as_str().to_string()
        };
        let mut agents = g.agents.members.to_string();
        if g.agents.offline > 0 {
            let _ = write!(agents, " ({} offline)", g.agents.offline);
        }
        if g.agents.unsupported > 0 {
            let _ = write!(agents, " (+{} unsupported)", g.agents.unsupported);
        }
        let _ = writeln!(
            out,
            "| {} | {change} | {} | {agents} | {} |",
            code(g.name.as_str()),
            code(&hash_change(g)),
            cell(&wave_summary(g))
        );
    }
    for r in &report.removed {
        let _ = writeln!(
            out,
            "| {} | **removed** | {} | {} | - |",
            code(r.name.as_str()),
            code(&r.config_hash.short()),
            r.agents
        );
    }
    for g in report.groups.iter().filter(|g| g.change.pushes()) {
        out.push('\n');
        markdown_group(&mut out, g);
    }
    for l in pending(report, code) {
        let _ = writeln!(out, "\n> {l}.");
    }
    let lines = callouts(report, code);
    if !lines.is_empty() {
        let _ = writeln!(out, "\n#### Call-outs\n");
        for l in lines {
            let _ = writeln!(out, "- {l}");
        }
    }
    if !report.warnings.is_empty() {
        let _ = writeln!(out, "\n#### Warnings\n");
        for w in &report.warnings {
            let _ = writeln!(out, "- {}", cell(w));
        }
    }
    out
}

fn markdown_group(out: &mut String, g: &GroupPlan) {
    let _ = writeln!(
        out,
        "<details><summary><b>{}</b>: {}, {}</summary>\n",
        cell(g.name.as_str()),
        g.change.as_str(),
        cell(&wave_summary(g))
    );
    let _ = writeln!(
        out,
        "Config {}; stable: {}.\n",
        code(&hash_change(g)),
        cell(&stable_line(g))
    );
    let _ = writeln!(out, "Rollout: {}.\n", cell(&policy_line(g)));
    for f in &g.files {
        let _ = writeln!(out, "- file {}", cell(&file_line(f)));
    }
    let diff: String = g.files.iter().map(|f| f.diff.as_str()).collect();
    if !diff.is_empty() {
        let fence = "`".repeat(3.max(longest_backtick_run(&diff) + 1));
        let _ = writeln!(out, "\n{fence}diff\n{}{fence}", diff);
    }
    out.push('\n');
    if g.change == Change::Revert {
        let _ = writeln!(
            out,
            "Revert to the stable config: pushed to all {} at once, no waves.\n",
            plural(g.agents.members, "agent", "agents")
        );
    }
    if g.agents.members == 0 {
        let _ = writeln!(
            out,
            "No connected agents: nothing is pushed now; agents get it when they connect.\n"
        );
    } else if !g.waves.is_empty() {
        let _ = writeln!(out, "| wave | target | cumulative | agents added |");
        let _ = writeln!(out, "|---|---|---|---|");
        for w in &g.waves {
            let _ = writeln!(
                out,
                "| {} | {} | {} of {} | {} |",
                w.number,
                cell(&w.target),
                w.cumulative,
                g.agents.members,
                if w.agents.is_empty() {
                    "-".to_string()
                } else {
                    agent_list(&w.agents, |a| code_cell(&agent(a)))
                }
            );
        }
        out.push('\n');
    }
    for l in left_out(g, |a| code(&agent(a))) {
        let _ = writeln!(out, "{l}\n");
    }
    let _ = writeln!(out, "</details>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_survive_backticks() {
        assert_eq!(code("gw"), "`gw`");
        assert_eq!(code("a`b"), "`` a`b ``");
        assert_eq!(longest_backtick_run("x ``` y ` z"), 3);
    }

    #[test]
    fn lists_are_capped() {
        let agents: Vec<AgentRef> = (0..25u8)
            .map(|i| AgentRef {
                uid: crate::model::InstanceUid::Uuid([i; 16]),
                host: (i == 0).then(|| "h0".to_string()),
            })
            .collect();
        let s = agent_list(&agents, agent);
        assert!(
            s.starts_with("00000000-0000-0000-0000-000000000000 (h0), 01010101"),
            "{s}"
        );
        assert!(s.ends_with(", and 5 more"), "{s}");
        assert_eq!(s.matches(", ").count(), 20);
        assert_eq!(agent_list(&agents[..2], agent).matches("more").count(), 0);
    }

    #[test]
    fn cells_escape_pipes_and_html() {
        assert_eq!(cell("a|b<c>&"), "a\\|b&lt;c>&amp;");
    }
}
