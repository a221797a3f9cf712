//! The note body: a rollout's outcome for one commit, as YAML that reads well
//! in `git log --notes=opamp-gitops` and parses back for `status` and for
//! restoring rollout state. Pure.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

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
    #[serde(default)]
    pub failures: Vec<Failure>,
    #[serde(with = "crate::rfc3339::option", default)]
    pub started: Option<SystemTime>,
    #[serde(with = "crate::rfc3339::option", default)]
    pub finished: Option<SystemTime>,
    /// Operator pause/resume/promote actions on this rollout, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<NoteAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoteAction {
    pub action: Control,
    #[serde(with = "crate::rfc3339")]
    pub at: SystemTime,
    /// The operator's token name, when the API required tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

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
            writeln!(out, "    started: {}", time_or_null(g.started))?;
            writeln!(out, "    finished: {}", time_or_null(g.finished))?;
            if !g.actions.is_empty() {
                let actions: Vec<String> = g
                    .actions
                    .iter()
                    .map(|a| {
                        let by =
                            a.by.as_deref()
                                .map(|b| format!(", by: {}", scalar(b)))
                                .unwrap_or_default();
                        format!("{{action: {}, at: {}{by}}}", a.action.as_str(), rfc3339::format(a.at))
                    })
                    .collect();
                writeln!(out, "    actions: [{}]", actions.join(", "))?;
            }
        }
        Ok(())
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
                    started: Some(at(1_795_255_080)),
                    finished: None,
                    actions: vec![],
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
        g.actions = vec![
            NoteAction {
                action: Control::Pause,
                at: at(1_795_255_100),
                by: Some("alice".into()),
            },
            NoteAction {
                action: Control::Promote,
                at: at(1_795_255_160),
                by: None,
            },
        ];
        let text = note.render();
        assert!(
            text.contains("    actions: [{action: pause, at: 2026-11-21T09:58:20Z, by: alice}, {action: promote, at: 2026-11-21T09:59:20Z}]\n"),
            "{text}"
        );
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
    fn rejects_other_yaml() {
        assert!(Note::parse("hello: world\n").is_err());
        assert!(Note::parse(&sample().render().replace(": v1", ": v9")).is_err());
    }
}
