//! The text `validate` prints for a valid repository: each group with its
//! files, config hash, selector and rollout policy.

use std::fmt::Write;

use super::{Amount, DesiredState, Group, Operator, RolloutPolicy, Selector};

/// A few lines per group, then a closing count.
pub fn summary(state: &DesiredState) -> String {
    let mut out = String::new();
    for group in state.groups.values() {
        group_lines(&mut out, group);
        out.push('\n');
    }
    let n = state.groups.len();
    let _ = writeln!(
        out,
        "valid: {n} group{}, agents re-checked every {}",
        if n == 1 { "" } else { "s" },
        humantime::format_duration(state.reconcile_interval)
    );
    out
}

fn group_lines(out: &mut String, g: &Group) {
    let _ = writeln!(out, "{} (priority {})", g.name, g.priority);
    if !g.description.is_empty() {
        let _ = writeln!(out, "  description  {}", g.description);
    }
    let _ = writeln!(out, "  config hash  {}", g.config.hash());
    let files: Vec<String> = g
        .config
        .files()
        .iter()
        .map(|(key, f)| {
            let main = if key.is_empty() { "the main file, " } else { "" };
            format!("{key:?} ({main}{}, {} bytes)", f.content_type, f.body.len())
        })
        .collect();
    let _ = writeln!(out, "  files        {}", files.join(", "));
    let _ = writeln!(out, "  selector     {}", selector(&g.selector));
    let _ = writeln!(out, "  rollout      {}", rollout(&g.rollout));
}

/// `service.name=gw, host.name in (a, b), 2 instance uids`, or the catch-all.
pub fn selector(s: &Selector) -> String {
    if s.is_empty() {
        return "every agent (catch-all)".to_string();
    }
    let mut parts: Vec<String> = s.match_attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for e in &s.match_expressions {
        parts.push(match e.operator {
            Operator::In => format!("{} in ({})", e.key, e.values.join(", ")),
            Operator::NotIn => format!("{} not in ({})", e.key, e.values.join(", ")),
            Operator::Exists => format!("{} exists", e.key),
            Operator::DoesNotExist => format!("{} does not exist", e.key),
        });
    }
    match s.instance_uids.len() {
        0 => {}
        1 => parts.push("1 instance uid".to_string()),
        n => parts.push(format!("{n} instance uids")),
    }
    parts.join(", ")
}

/// `5` or `10%`.
pub fn amount(a: Amount) -> String {
    match a {
        Amount::Count(n) => n.to_string(),
        Amount::Percent(p) => format!("{p}%"),
    }
}

fn rollout(p: &RolloutPolicy) -> String {
    let waves: Vec<String> = p.waves.iter().map(|a| amount(*a)).collect();
    format!(
        "waves [{}], bake {}, apply timeout {}, max failures {}, on failure {}",
        waves.join(", "),
        humantime::format_duration(p.bake),
        humantime::format_duration(p.apply_timeout),
        amount(p.max_failures),
        p.on_failure.as_str()
    )
}
