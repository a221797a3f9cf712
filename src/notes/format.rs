//! The note body: a rollout's outcome for one commit, as YAML that reads well
//! in `git log --notes=opamp-gitops` and parses back for `status` and for
//! restoring rollout state. Pure.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use crate::model::Change;
use crate::model::{CommitId, ConfigHash, GroupName};
pub use crate::reconcile::{AgentCounts, Control, Phase};
use crate::rfc3339;

/// The format marker written as `opamp-gitops: v1`.
pub const FORMAT_VERSION: &str = "v1";
/// At most this many failures are kept in a note, newest first (as many as
/// a group's status shows).
pub const MAX_FAILURES: usize = crate::reconcile::MAX_FAILURES_SHOWN;

/// What the controller did with one commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Note {
    #[serde(rename = "opamp-gitops")]
    pub version: String,
    pub commit: CommitId,
    /// Who made the change and what it says, as git records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    #[serde(with = "crate::rfc3339")]
    pub updated: SystemTime,
    pub valid: bool,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub groups: BTreeMap<GroupName, NoteGroup>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoteGroup {
    #[serde(with = "hash_hex")]
    pub config_hash: ConfigHash,
    pub phase: Phase,
    /// Waves opened so far.
    pub wave: u32,
    pub waves: u32,
    pub agents: AgentCounts,
    /// The newest failures with their errors, at most [`MAX_FAILURES`].
    #[serde(default)]
    pub failures: Vec<Failure>,
    /// Every other agent that failed this rollout (their errors are not
    /// kept), so a controller rebuilding from the notes knows them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_failed: Vec<String>,
    #[serde(with = "crate::rfc3339::option", default)]
    pub started: Option<SystemTime>,
    #[serde(with = "crate::rfc3339::option", default)]
    pub finished: Option<SystemTime>,
    /// Every step of every rollout of this commit in this group, oldest
    /// first: starts, waves, operator actions, restarts, endings. Never
    /// rewritten, only added to. (Older notes called it `actions` and kept
    /// only the operator actions.)
    #[serde(default, alias = "actions", skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<NoteStep>,
}

impl NoteGroup {
    /// Agents that failed this rollout, with or without their error.
    pub fn failed_agents(&self) -> impl Iterator<Item = &str> {
        self.failures
            .iter()
            .map(|f| f.agent.as_str())
            .chain(self.also_failed.iter().map(String::as_str))
    }
}

/// One step of a rollout, as its note tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoteStep {
    #[serde(alias = "action")]
    pub step: Step,
    #[serde(with = "crate::rfc3339")]
    pub at: SystemTime,
    /// For `started` and `wave`: the wave opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    /// For `halted`: agents failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<u32>,
    /// For operator actions: the API token's name (or the actor given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Started,
    Wave,
    Pause,
    Resume,
    Promote,
    /// The controller restarted and carried on with the rollout.
    Restarted,
    Halted,
    Complete,
    Superseded,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Started => "started",
            Step::Wave => "wave",
            Step::Pause => "pause",
            Step::Resume => "resume",
            Step::Promote => "promote",
            Step::Restarted => "restarted",
            Step::Halted => "halted",
            Step::Complete => "complete",
            Step::Superseded => "superseded",
        }
    }
}

impl From<Control> for Step {
    fn from(c: Control) -> Step {
        match c {
            Control::Pause => Step::Pause,
            Control::Resume => Step::Resume,
            Control::Promote => Step::Promote,
        }
    }
}

impl NoteStep {
    /// A step at `at`, in whole seconds as the note keeps it (so a step read
    /// back equals the one written).
    pub fn new(step: Step, at: SystemTime) -> NoteStep {
        let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        NoteStep {
            step,
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            wave: None,
            failed: None,
            by: None,
        }
    }
}

/// Most steps a group's history keeps; the oldest go first.
pub const MAX_HISTORY: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub agent: String,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
#[error("note is not an opamp-gitops note: {0}")]
pub struct ParseError(String);

impl Note {
    /// Renders the note. Block style for structure, flow style for the small
    /// records, strings quoted only where YAML needs it; `parse` reads it back.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = self.write_yaml(&mut out);
        out
    }

    fn write_yaml(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "opamp-gitops: {}", self.version)?;
        writeln!(out, "commit: {}", scalar(self.commit.as_str()))?;
        if let Some(c) = &self.change {
            writeln!(out, "change:")?;
            writeln!(out, "  author: {}", quoted(&c.author))?;
            writeln!(out, "  committer: {}", quoted(&c.committer))?;
            writeln!(out, "  time: {}", rfc3339::format(c.time))?;
            writeln!(out, "  subject: {}", quoted(&c.subject))?;
        }
        writeln!(out, "updated: {}", rfc3339::format(self.updated))?;
        writeln!(out, "valid: {}", self.valid)?;
        if self.errors.is_empty() {
            writeln!(out, "errors: []")?;
        } else {
            writeln!(out, "errors:")?;
            for e in &self.errors {
                writeln!(out, "  - {}", scalar(e))?;
            }
        }
        if self.groups.is_empty() {
            return writeln!(out, "groups: {{}}");
        }
        writeln!(out, "groups:")?;
        for (name, g) in &self.groups {
            writeln!(out, "  {}:", scalar(name.as_str()))?;
            writeln!(out, "    config_hash: {}", scalar(&g.config_hash.to_string()))?;
            writeln!(out, "    phase: {}", g.phase.as_str())?;
            writeln!(out, "    wave: {}", g.wave)?;
            writeln!(out, "    waves: {}", g.waves)?;
            let a = &g.agents;
            writeln!(
                out,
                "    agents: {{targeted: {}, applied: {}, applying: {}, failed: {}, pending: {}, offline: {}}}",
                a.targeted, a.applied, a.applying, a.failed, a.pending, a.offline
            )?;
            if g.failures.is_empty() {
                writeln!(out, "    failures: []")?;
            } else {
                writeln!(out, "    failures:")?;
                for f in g.failures.iter().take(MAX_FAILURES) {
                    writeln!(
                        out,
                        "      - {{agent: {}, error: {}}}",
                        scalar(&f.agent),
                        quoted(&f.error)
                    )?;
                }
            }
            if !g.also_failed.is_empty() {
                writeln!(out, "    also_failed:")?;
                for uid in &g.also_failed {
                    writeln!(out, "      - {}", scalar(uid))?;
                }
            }
            writeln!(out, "    started: {}", time_or_null(g.started))?;
            writeln!(out, "    finished: {}", time_or_null(g.finished))?;
            if !g.history.is_empty() {
                writeln!(out, "    history:")?;
                for step in &g.history {
                    write!(
                        out,
                        "      - {{step: {}, at: {}",
                        step.step.as_str(),
                        rfc3339::format(step.at)
                    )?;
                    if let Some(w) = step.wave {
                        write!(out, ", wave: {w}")?;
                    }
                    if let Some(f) = step.failed {
                        write!(out, ", failed: {f}")?;
                    }
                    if let Some(by) = &step.by {
                        write!(out, ", by: {}", scalar(by))?;
                    }
                    writeln!(out, "}}")?;
                }
            }
        }
        Ok(())
    }

    /// This note, to be written where `older` is, so that a note never loses
    /// what an older one recorded: an invalid verdict never replaces a valid
    /// note (`None`: keep the older one), groups only the older note has stay,
    /// and each group's history keeps the older steps before the new ones.
    pub fn over(mut self, older: &Note) -> Option<Note> {
        if older.commit != self.commit {
            return Some(self);
        }
        if older.valid && !self.valid {
            return None;
        }
        if self.change.is_none() {
            self.change.clone_from(&older.change);
        }
        for (name, old) in &older.groups {
            match self.groups.get_mut(name) {
                None => {
                    self.groups.insert(name.clone(), old.clone());
                }
                Some(g) => {
                    // The new steps are those the older history does not
                    // hold (counting repeats: two promotes in one second).
                    let mut unmatched: Vec<&NoteStep> = old.history.iter().collect();
                    let mut history = old.history.clone();
                    for step in &g.history {
                        match unmatched.iter().position(|s| *s == step) {
                            Some(i) => {
                                unmatched.swap_remove(i);
                            }
                            None => history.push(step.clone()),
                        }
                    }
                    history.sort_by_key(|s| s.at);
                    history.drain(..history.len().saturating_sub(MAX_HISTORY));
                    g.history = history;
                }
            }
        }
        Some(self)
    }

    pub fn parse(text: &str) -> Result<Note, ParseError> {
        let note: Note = serde_yaml_ng::from_str(text).map_err(|e| ParseError(e.to_string()))?;
        if note.version != FORMAT_VERSION {
            return Err(ParseError(format!("unknown format version {:?}", note.version)));
        }
        Ok(note)
    }
}

fn time_or_null(t: Option<SystemTime>) -> String {
    t.map_or_else(|| "null".to_string(), rfc3339::format)
}

/// A plain scalar when YAML reads it back as the same string (so commit ids
/// and uids stay unquoted unless they look like numbers), else quoted.
fn scalar(s: &str) -> String {
    let safe = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric());
    let reads_back =
        || matches!(serde_yaml_ng::from_str::<serde_yaml_ng::Value>(s), Ok(serde_yaml_ng::Value::String(v)) if v == s);
    if safe && reads_back() { s.to_string() } else { quoted(s) }
}

/// A double-quoted YAML string; JSON string syntax is valid YAML.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

mod hash_hex {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::model::ConfigHash;

    pub fn serialize<S: Serializer>(h: &ConfigHash, s: S) -> Result<S::Ok, S::Error> {
        h.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ConfigHash, D::Error> {
        let s = String::deserialize(d)?;
        ConfigHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not 64 hex digits")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn sample() -> Note {
        Note {
            version: FORMAT_VERSION.into(),
            commit: CommitId::new("4f1c0000000000000000000000000000000000aa"),
            change: None,
            updated: at(1_795_255_200),
            valid: true,
            errors: vec![],
            groups: BTreeMap::from([(
                GroupName::new("edge-gateways"),
                NoteGroup {
                    config_hash: ConfigHash([0x9a; 32]),
                    phase: Phase::Halted,
                    wave: 1,
                    waves: 4,
                    agents: AgentCounts {
                        targeted: 120,
                        applied: 0,
                        applying: 0,
                        failed: 1,
                        pending: 119,
                        offline: 0,
                    },
                    failures: vec![Failure {
                        agent: "0192f3c4-0000-7000-8000-000000000001".into(),
                        error: "invalid keys: \"exporters: otlp\"\nline 2".into(),
                    }],
                    also_failed: vec![],
                    started: Some(at(1_795_255_080)),
                    finished: None,
                    history: vec![],
                },
            )]),
        }
    }

    #[test]
    fn renders_the_documented_shape() {
        let text = sample().render();
        let expected = "\
opamp-gitops: v1
commit: 4f1c0000000000000000000000000000000000aa
updated: 2026-11-21T10:00:00Z
valid: true
errors: []
groups:
  edge-gateways:
    config_hash: 9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a
    phase: halted
    wave: 1
    waves: 4
    agents: {targeted: 120, applied: 0, applying: 0, failed: 1, pending: 119, offline: 0}
    failures:
      - {agent: 0192f3c4-0000-7000-8000-000000000001, error: \"invalid keys: \\\"exporters: otlp\\\"\\nline 2\"}
    started: 2026-11-21T09:58:00Z
    finished: null
";
        assert_eq!(text, expected);
    }

    #[test]
    fn round_trips() {
        let mut note = sample();
        assert_eq!(Note::parse(&note.render()).unwrap(), note);
        let g = note.groups.values_mut().next().unwrap();
        g.history = vec![
            NoteStep {
                step: Step::Started,
                at: at(1_795_255_080),
                wave: Some(1),
                failed: None,
                by: None,
            },
            NoteStep {
                step: Step::Pause,
                at: at(1_795_255_100),
                wave: None,
                failed: None,
                by: Some("alice".into()),
            },
            NoteStep {
                step: Step::Halted,
                at: at(1_795_255_160),
                wave: None,
                failed: Some(3),
                by: None,
            },
        ];
        g.also_failed = vec!["0192f3c4-0000-7000-8000-000000000002".into()];
        note.change = Some(Change {
            author: "Ada <ada@example.com>".into(),
            committer: "CI: \"bot\" <ci@example.com>".into(),
            time: at(1_795_255_000),
            subject: "edge: raise the batch size".into(),
        });
        let text = note.render();
        for line in [
            "change:\n  author: \"Ada <ada@example.com>\"\n  committer: \"CI: \\\"bot\\\" <ci@example.com>\"\n  time: 2026-11-21T09:56:40Z\n  subject: \"edge: raise the batch size\"\n",
            "    also_failed:\n      - 0192f3c4-0000-7000-8000-000000000002\n",
            "    history:\n      - {step: started, at: 2026-11-21T09:58:00Z, wave: 1}\n      - {step: pause, at: 2026-11-21T09:58:20Z, by: alice}\n      - {step: halted, at: 2026-11-21T09:59:20Z, failed: 3}\n",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
        assert_eq!(Note::parse(&text).unwrap(), note);
        let invalid = Note {
            valid: false,
            errors: vec!["groups/a.yaml:3:5: unknown key \"foo\"".into(), "yes".into()],
            groups: BTreeMap::new(),
            ..sample()
        };
        let text = invalid.render();
        assert!(text.contains("groups: {}"), "{text}");
        assert_eq!(Note::parse(&text).unwrap(), invalid);
    }

    #[test]
    fn odd_group_names_and_many_failures() {
        let mut note = sample();
        let mut g = note.groups.remove(&GroupName::new("edge-gateways")).unwrap();
        g.failures = (0..30)
            .map(|i| Failure {
                agent: format!("a{i}"),
                error: "x".into(),
            })
            .collect();
        g.config_hash = ConfigHash::from_hex(&"1".repeat(64)).unwrap();
        note.groups.insert(GroupName::new("true"), g);
        note.commit = CommitId::new("1".repeat(40));
        let text = note.render();
        assert!(
            text.contains(&format!("commit: \"{}\"", "1".repeat(40))),
            "digit-only ids are quoted: {text}"
        );
        let parsed = Note::parse(&text).unwrap();
        assert_eq!(parsed.commit, note.commit);
        assert_eq!(parsed.groups[&GroupName::new("true")].failures.len(), MAX_FAILURES);
    }

    #[test]
    fn older_notes_with_actions_still_read() {
        let text = sample().render().replace(
            "    finished: null\n",
            "    finished: null\n    actions: [{action: pause, at: 2026-11-21T09:58:20Z, by: alice}]\n",
        );
        let note = Note::parse(&text).unwrap();
        let history = &note.groups[&GroupName::new("edge-gateways")].history;
        assert_eq!(
            (history[0].step, history[0].by.as_deref()),
            (Step::Pause, Some("alice"))
        );
    }

    #[test]
    fn a_note_written_over_an_older_one_keeps_its_history_and_its_groups() {
        let step = |step, secs| NoteStep {
            step,
            at: at(secs),
            wave: None,
            failed: None,
            by: None,
        };
        let mut older = sample();
        let edge = GroupName::new("edge-gateways");
        older.groups.get_mut(&edge).unwrap().history = vec![step(Step::Started, 10), step(Step::Complete, 20)];
        let mut gone = older.groups[&edge].clone();
        gone.phase = Phase::Unchanged;
        older.groups.insert(GroupName::new("apps"), gone.clone());
        // The same commit rolled out again after a force-push brought it back.
        let mut newer = sample();
        newer.groups.get_mut(&edge).unwrap().history = vec![step(Step::Started, 30)];
        let merged = newer.over(&older).expect("valid over valid");
        let steps: Vec<Step> = merged.groups[&edge].history.iter().map(|s| s.step).collect();
        assert_eq!(steps, [Step::Started, Step::Complete, Step::Started]);
        assert_eq!(merged.groups[&GroupName::new("apps")], gone);
        // An invalid verdict does not replace a valid note; a valid one replaces an invalid.
        let invalid = Note {
            valid: false,
            groups: BTreeMap::new(),
            ..sample()
        };
        assert_eq!(invalid.clone().over(&older), None);
        assert!(sample().over(&invalid).is_some());
    }

    #[test]
    fn rejects_other_yaml() {
        assert!(Note::parse("hello: world\n").is_err());
        assert!(Note::parse(&sample().render().replace(": v1", ": v9")).is_err());
    }
}
