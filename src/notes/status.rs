//! The `status` command's output: recent commits with each group's rollout
//! outcome, from the notes alone. Pure: takes history, returns text.

use serde::Serialize;

use super::format::Note;
use crate::gitsrc::notes::CommitInfo;

/// One commit and what its note says (if it has a readable one).
#[derive(Debug, Serialize)]
pub struct CommitStatus {
    pub commit: String,
    pub summary: String,
    /// The author's time.
    pub time: String,
    /// `Name <email>`.
    pub author: String,
    pub committer: String,
    /// `None`: the controller has not processed this commit (or its note is unreadable).
    pub note: Option<Note>,
    /// Why an existing note could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note_error: Option<String>,
}

pub fn collect(history: Vec<(CommitInfo, Option<String>)>) -> Vec<CommitStatus> {
    history
        .into_iter()
        .map(|(info, text)| {
            let parsed = text.map(|t| Note::parse(&t));
            let (note, note_error) = match parsed {
                None => (None, None),
                Some(Ok(n)) => (Some(n), None),
                Some(Err(e)) => (None, Some(e.to_string())),
            };
            CommitStatus {
                commit: info.id.to_string(),
                summary: info.change.subject,
                time: crate::rfc3339::format(info.change.time),
                author: info.change.author,
                committer: info.change.committer,
                note,
                note_error,
            }
        })
        .collect()
}

pub fn render_json(rows: &[CommitStatus]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        commits: &'a [CommitStatus],
    }
    serde_json::to_string_pretty(&Out { commits: rows }).expect("plain data always serializes")
}

/// A table: one line per (commit, group), newest commit first.
pub fn render_text(rows: &[CommitStatus]) -> String {
    let mut table: Vec<[String; 9]> = vec![
        [
            "COMMIT", "WHEN", "AUTHOR", "GROUP", "PHASE", "WAVE", "APPLIED", "FAILED", "SUBJECT",
        ]
        .map(String::from),
    ];
    for r in rows {
        let short = r.commit[..r.commit.len().min(12)].to_string();
        let subject = truncate(&r.summary, 50);
        // The name alone: the email is in the JSON.
        let author = truncate(r.author.split(" <").next().unwrap_or_default(), 24);
        let mut line = |group: &str, phase: &str, wave: String, applied: String, failed: String| {
            table.push([
                short.clone(),
                r.time.clone(),
                author.clone(),
                group.to_string(),
                phase.to_string(),
                wave,
                applied,
                failed,
                subject.clone(),
            ]);
        };
        match (&r.note, &r.note_error) {
            (None, Some(_)) => line("-", "unreadable note", "-".into(), "-".into(), "-".into()),
            (None, None) => line("-", "not processed", "-".into(), "-".into(), "-".into()),
            (Some(n), _) if !n.valid => line(
                "-",
                &match n.errors.len() {
                    1 => "invalid (1 error)".to_string(),
                    many => format!("invalid ({many} errors)"),
                },
                "-".into(),
                "-".into(),
                "-".into(),
            ),
            (Some(n), _) if n.groups.is_empty() => line("-", "no groups", "-".into(), "-".into(), "-".into()),
            (Some(n), _) => {
                for (name, g) in &n.groups {
                    line(
                        name.as_str(),
                        g.phase.as_str(),
                        if g.waves == 0 {
                            "-".into()
                        } else {
                            format!("{}/{}", g.wave, g.waves)
                        },
                        format!("{}/{}", g.agents.applied, g.agents.targeted),
                        // Every agent that failed the rollout, rolled back or not.
                        g.failed_agents().count().max(g.agents.failed as usize).to_string(),
                    );
                }
            }
        }
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| table.iter().map(|row| row[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for r in rows {
        let short = &r.commit[..r.commit.len().min(12)];
        if let Some(n) = r.note.as_ref().filter(|n| !n.valid) {
            out.push_str(&format!("\n{short} is invalid:\n"));
            for e in &n.errors {
                out.push_str(&format!("  {e}\n"));
            }
        }
        if let Some(e) = &r.note_error {
            out.push_str(&format!("\n{short} has a note that cannot be read: {e}\n"));
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::model::{CommitId, ConfigHash, GroupName};
    use crate::notes::format::{AgentCounts, FORMAT_VERSION, NoteGroup, Phase};

    fn info(id: char, summary: &str) -> CommitInfo {
        CommitInfo {
            id: CommitId::new(id.to_string().repeat(40)),
            change: crate::model::Change {
                author: "Ada Lovelace <ada@example.com>".into(),
                committer: "CI <ci@example.com>".into(),
                time: UNIX_EPOCH + Duration::from_secs(1_795_255_200),
                subject: summary.into(),
            },
        }
    }

    fn note(id: char, valid: bool) -> String {
        let mut groups = BTreeMap::new();
        if valid {
            groups.insert(
                GroupName::new("edge"),
                NoteGroup {
                    config_hash: ConfigHash([1; 32]),
                    phase: Phase::Complete,
                    wave: 4,
                    waves: 4,
                    agents: AgentCounts {
                        targeted: 50,
                        applied: 50,
                        ..Default::default()
                    },
                    failures: vec![],
                    started: None,
                    finished: None,
                    also_failed: vec![],
                    history: vec![],
                },
            );
        }
        Note {
            version: FORMAT_VERSION.into(),
            commit: CommitId::new(id.to_string().repeat(40)),
            change: None,
            updated: UNIX_EPOCH,
            valid,
            errors: if valid {
                vec![]
            } else {
                vec!["groups/a.yaml:1:1: bad".into()]
            },
            groups,
        }
        .render()
    }

    #[test]
    fn text_table() {
        let rows = collect(vec![
            (info('c', "Third"), None),
            (info('b', "Second"), Some(note('b', false))),
            (info('a', "First"), Some(note('a', true))),
            (info('d', "Broken"), Some("not yaml: [".into())),
        ]);
        let text = render_text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("COMMIT"), "{text}");
        assert!(
            lines[1].starts_with("cccccccccccc") && lines[1].contains("not processed"),
            "{text}"
        );
        assert!(lines[2].contains("invalid (1 error) "), "{text}");
        assert!(
            lines[3].contains("edge") && lines[3].contains("complete") && lines[3].contains("4/4"),
            "{text}"
        );
        assert!(lines[3].contains("50/50"), "{text}");
        assert!(
            lines[3].contains("Ada Lovelace") && !lines[3].contains("ada@"),
            "{text}"
        );
        assert!(lines[4].contains("unreadable note"), "{text}");
        let mut unchanged: Note = Note::parse(&note('e', true)).unwrap();
        if let Some(g) = unchanged.groups.get_mut(&GroupName::new("edge")) {
            (g.phase, g.wave, g.waves) = (Phase::Unchanged, 0, 0);
        }
        let rows = collect(vec![(info('e', "Docs"), Some(unchanged.render()))]);
        let line = render_text(&rows).lines().nth(1).unwrap().to_string();
        assert!(line.contains("unchanged") && !line.contains("0/0"), "{line}");
        assert!(
            text.contains("bbbbbbbbbbbb is invalid:\n  groups/a.yaml:1:1: bad"),
            "{text}"
        );
        assert!(text.contains("dddddddddddd has a note that cannot be read"), "{text}");
    }

    #[test]
    fn json_output() {
        let rows = collect(vec![
            (info('a', "First"), Some(note('a', true))),
            (info('c', "x"), None),
        ]);
        let v: serde_json::Value = serde_json::from_str(&render_json(&rows)).unwrap();
        assert_eq!(v["commits"][0]["note"]["groups"]["edge"]["phase"], "complete");
        assert_eq!(v["commits"][0]["note"]["groups"]["edge"]["agents"]["applied"], 50);
        assert_eq!(v["commits"][1]["note"], serde_json::Value::Null);
        assert_eq!(v["commits"][0]["time"], "2026-11-21T10:00:00Z");
        assert_eq!(v["commits"][0]["author"], "Ada Lovelace <ada@example.com>");
    }
}
