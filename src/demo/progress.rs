//! What the tour prints about the controller's state: a wave-by-wave account
//! of one rollout, the group table and agent counts. Pure: status in, text out.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use crate::desired::Amount;
use crate::driver::DriverStatus;
use crate::model::{AgentState, ConfigHash, GroupName};
use crate::reconcile::{GroupStatus, Phase, wave_cuts};

/// Turns successive statuses of one group's wave rollout into the lines
/// saying what happened since the previous status: waves opening, a wave's
/// agents all applied (its bake starts), waves done, the rollout complete.
#[derive(Debug)]
pub struct WaveTracker {
    waves: Vec<Amount>,
    bake: Duration,
    /// Agents covered by each wave, fixed from the first status seen.
    cuts: Vec<u32>,
    opened: u32,
    /// The current wave's agents have all applied (its bake has started).
    settled: bool,
    finished: bool,
}

impl WaveTracker {
    pub fn new(waves: &[Amount], bake: Duration) -> Self {
        WaveTracker {
            waves: waves.to_vec(),
            bake,
            cuts: Vec::new(),
            opened: 0,
            settled: false,
            finished: false,
        }
    }

    /// Lines for what changed since the last call.
    pub fn update(&mut self, s: &GroupStatus) -> Vec<String> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        let n = s.waves;
        if self.cuts.is_empty() {
            self.cuts = wave_cuts(&self.waves, s.agents.targeted as usize);
        }
        if self.cuts.len() != n as usize {
            // Not the policy's waves (a revert is one wave): every wave is the whole group.
            self.cuts = vec![s.agents.targeted; n as usize];
        }
        let total = self.cuts.last().copied().unwrap_or(0);
        while self.opened < s.wave.min(n) {
            if self.opened > 0 {
                if !self.settled {
                    out.push(self.settled_line(n));
                }
                out.push(format!("wave {}/{n} done", self.opened));
            }
            self.opened += 1;
            self.settled = false;
            let cut = self.cut(self.opened);
            let added = cut - self.cut(self.opened - 1);
            let who = match (self.opened, added) {
                (1, 1) => "the canary gets the change".to_string(),
                (1, k) => format!("{k} canaries get the change"),
                (_, k) => format!("{k} more agent{} get the change", plural(k)),
            };
            out.push(format!("wave {}/{n} opens: {who} ({cut} of {total})", self.opened));
        }
        if self.opened == 0 {
            return out;
        }
        let cut = self.cut(self.opened);
        if !self.settled && s.agents.applied >= cut && matches!(s.phase, Phase::Progressing | Phase::Complete) {
            out.push(self.settled_line(n));
            self.settled = true;
        }
        if s.phase == Phase::Complete {
            out.push(format!("wave {}/{n} done", self.opened));
            out.push(format!(
                "rollout complete: {}/{} agents run {}",
                s.agents.applied,
                s.agents.targeted,
                short(&s.config_hash)
            ));
            self.finished = true;
        }
        out
    }

    fn cut(&self, wave: u32) -> u32 {
        match wave {
            0 => 0,
            w => self.cuts.get(w as usize - 1).copied().unwrap_or(0),
        }
    }

    fn settled_line(&self, n: u32) -> String {
        let cut = self.cut(self.opened);
        let next = if self.opened < n {
            "before the next wave"
        } else {
            "before completing"
        };
        format!(
            "wave {}/{n}: {cut} of {cut} applied and healthy; baking {} {next}",
            self.opened,
            humantime::format_duration(self.bake)
        )
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The first 12 hex digits of a config hash.
pub fn short(hash: &ConfigHash) -> String {
    hash.to_string()[..12].to_string()
}

/// One line per group: name, config hash, agents applied of targeted,
/// agents that failed the rollout, rollout phase and wave, and the commit it
/// came from.
pub fn group_table(status: &DriverStatus) -> String {
    let mut rows: Vec<[String; 6]> =
        vec![["GROUP", "CONFIG", "APPLIED", "FAILED", "PHASE", "COMMIT"].map(String::from)];
    for (name, g) in &status.groups {
        rows.push([
            name.to_string(),
            short(&g.config_hash),
            format!("{}/{}", g.agents.applied, g.agents.targeted),
            // Every agent that failed the rollout, rolled back or not.
            g.failed.max(g.agents.failed).to_string(),
            format!("{} {}/{}", g.phase.as_str(), g.wave, g.waves),
            g.commit
                .as_ref()
                .map_or_else(|| "-".to_string(), |c| c.short().to_string()),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// `36 agents: 35 in_sync, 1 failed`.
pub fn agent_line(by_state: &BTreeMap<AgentState, u64>) -> String {
    let total: u64 = by_state.values().sum();
    let parts: Vec<String> = by_state
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect();
    format!("{total} agents: {}", parts.join(", "))
}

/// The group's status, if the driver has one.
pub fn group<'a>(status: &'a DriverStatus, name: &str) -> Option<&'a GroupStatus> {
    status.groups.get(&GroupName::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::AgentCounts;

    fn status(phase: Phase, wave: u32, applied: u32) -> GroupStatus {
        GroupStatus {
            config_hash: ConfigHash::from_hex(&"ab".repeat(32)).unwrap(),
            stable_hash: None,
            phase,
            wave,
            waves: 3,
            commit: None,
            agents: AgentCounts {
                targeted: 26,
                applied,
                ..AgentCounts::default()
            },
            failed: 0,
            failures: vec![],
            started: None,
            finished: None,
            wave_opened: None,
            waiting_since: None,
            bake_ends: None,
            actions: vec![],
        }
    }

    fn tracker() -> WaveTracker {
        let waves = [Amount::Count(1), Amount::Percent(25), Amount::Percent(100)];
        WaveTracker::new(&waves, Duration::from_secs(2))
    }

    #[test]
    fn every_wave_opens_settles_and_completes_in_order() {
        let mut t = tracker();
        let mut lines = Vec::new();
        for (phase, wave, applied) in [
            (Phase::Progressing, 1, 0),
            (Phase::Progressing, 1, 0),
            (Phase::Progressing, 1, 1),
            (Phase::Progressing, 2, 1),
            (Phase::Progressing, 2, 7),
            (Phase::Progressing, 3, 10),
            (Phase::Progressing, 3, 26),
            (Phase::Complete, 3, 26),
            (Phase::Complete, 3, 26),
        ] {
            lines.extend(t.update(&status(phase, wave, applied)));
        }
        assert_eq!(
            lines,
            [
                "wave 1/3 opens: the canary gets the change (1 of 26)",
                "wave 1/3: 1 of 1 applied and healthy; baking 2s before the next wave",
                "wave 1/3 done",
                "wave 2/3 opens: 6 more agents get the change (7 of 26)",
                "wave 2/3: 7 of 7 applied and healthy; baking 2s before the next wave",
                "wave 2/3 done",
                "wave 3/3 opens: 19 more agents get the change (26 of 26)",
                "wave 3/3: 26 of 26 applied and healthy; baking 2s before completing",
                "wave 3/3 done",
                "rollout complete: 26/26 agents run abababababab",
            ]
        );
    }

    #[test]
    fn skipped_statuses_still_tell_every_step() {
        let mut t = tracker();
        let lines = t.update(&status(Phase::Complete, 3, 26));
        assert_eq!(lines.len(), 10, "{lines:#?}");
        assert_eq!(lines[0], "wave 1/3 opens: the canary gets the change (1 of 26)");
        assert_eq!(lines[9], "rollout complete: 26/26 agents run abababababab");
    }

    #[test]
    fn a_halt_opens_no_further_wave() {
        let mut t = tracker();
        let first = t.update(&status(Phase::Progressing, 1, 0));
        assert_eq!(first.len(), 1);
        assert!(t.update(&status(Phase::Halted, 1, 0)).is_empty());
    }

    #[test]
    fn the_table_lines_up() {
        let mut s = DriverStatus::default();
        s.groups
            .insert(GroupName::new("app-agents"), status(Phase::Complete, 3, 26));
        s.groups.insert(GroupName::new("default"), status(Phase::Halted, 1, 2));
        let t = group_table(&s);
        assert_eq!(
            t,
            "GROUP       CONFIG        APPLIED  FAILED  PHASE         COMMIT\n\
             app-agents  abababababab  26/26    0       complete 3/3  -\n\
             default     abababababab  2/26     0       halted 1/3    -\n"
        );
        let by_state = BTreeMap::from([
            (AgentState::InSync, 35),
            (AgentState::Failed, 1),
            (AgentState::Offline, 0),
        ]);
        assert_eq!(agent_line(&by_state), "36 agents: 35 in_sync, 1 failed");
    }
}
