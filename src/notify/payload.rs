//! A notice as the bytes a receiver is sent: the JSON event, or a Slack
//! message (`text` and `blocks`); the one-line summary both (and the forge's
//! status description) use; the signature header. Pure.

use serde::Serialize;

use super::notice::{Kind, Notice};
use crate::model::CommitId;

/// The header carrying `sha256=<hex>`: the HMAC-SHA256 of the body under
/// the shared secret (`serve --notify-secret-file`).
pub const SIGNATURE_HEADER: &str = "x-opamp-gitops-signature";
/// The header naming the event (`rollout_halted`...).
pub const EVENT_HEADER: &str = "x-opamp-gitops-event";
/// The header carrying the notice's id.
pub const DELIVERY_HEADER: &str = "x-opamp-gitops-delivery";
/// What the controller calls itself in requests.
pub const USER_AGENT: &str = concat!("opamp-gitops/", env!("CARGO_PKG_VERSION"));

/// One POST to send: the URL, the headers besides `Content-Type:
/// application/json` and `User-Agent`, and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// How a receiver wants its notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The notice as JSON, with `url`.
    Json,
    /// A Slack message: `text` and `blocks` (incoming webhooks, and the
    /// chat tools that take Slack's format).
    Slack,
}

/// The request telling `notice` to a receiver at `url`; signed when a
/// secret is given. `link` is the controller's view.
pub fn request(url: &str, format: Format, secret: Option<&[u8]>, notice: &Notice, link: &str) -> Request {
    let body = match format {
        Format::Json => json(notice, link),
        Format::Slack => slack(notice, link),
    };
    let body = serde_json::to_vec(&body).expect("a JSON value always serializes");
    let mut headers = vec![
        (EVENT_HEADER, notice.event.as_str().to_string()),
        (DELIVERY_HEADER, notice.id.clone()),
    ];
    if let Some(secret) = secret {
        headers.push((SIGNATURE_HEADER, crate::gitsrc::webhook::sign(secret, &body)));
    }
    Request {
        url: url.to_string(),
        headers,
        body,
    }
}

/// The JSON event: every field of the notice, and `url`.
pub fn json(notice: &Notice, link: &str) -> serde_json::Value {
    #[derive(Serialize)]
    struct Event<'a> {
        #[serde(flatten)]
        notice: &'a Notice,
        url: &'a str,
    }
    serde_json::to_value(Event { notice, url: link }).expect("a notice always serializes")
}

/// What happened, in a line: `halted at wave 1 of 4: 1 agent failed, 0 of
/// 5 applied`. Without the group or commit (the context says them).
pub fn summary(n: &Notice) -> String {
    let wave = match (n.wave, n.waves) {
        (Some(w), Some(of)) => format!("wave {w} of {of}"),
        _ => "a wave".to_string(),
    };
    let applied = n.agents.map_or_else(String::new, |a| {
        format!("{} of {} agents applied", a.applied, a.targeted)
    });
    let failed = agents(n.failed.unwrap_or(n.failures.len() as u32));
    match n.event {
        Kind::RolloutStarted => match (n.waves, n.agents) {
            (Some(waves), Some(a)) => format!(
                "rollout started: {} to {} in {waves} wave{}",
                if waves > 1 { "canary first" } else { "everyone at once" },
                agents(a.targeted),
                plural(waves)
            ),
            _ => "rollout started".to_string(),
        },
        Kind::WaveOpened => format!("{wave} opened: {applied}"),
        Kind::AgentsFailed => format!("{} failed at {wave}; {applied}", agents(n.failures.len() as u32)),
        Kind::RolloutHalted => format!("halted at {wave}: {failed} failed; {applied}"),
        Kind::RolledBack => format!(
            "{} that failed given the stable config back ({failed} failed at {wave})",
            agents(n.rolled_back.unwrap_or(0))
        ),
        Kind::RolloutComplete => format!("rollout complete: {applied}"),
        Kind::RolloutSuperseded => match &n.superseded_by {
            Some(by) => format!("superseded by {} before it completed", by.short()),
            None => "superseded by a newer commit before it completed".to_string(),
        },
        Kind::CommitInvalid => {
            let count = n.errors.len();
            match n.errors.first() {
                Some(first) => format!(
                    "invalid, nothing rolled out: {count} problem{}; {first}",
                    plural(count as u32)
                ),
                None => "invalid, nothing rolled out".to_string(),
            }
        }
    }
}

fn agents(n: u32) -> String {
    format!("{n} agent{}", plural(n))
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Slack's mrkdwn treats these three as markup.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Slack refuses a section text longer than this.
const SLACK_SECTION_MAX: usize = 3000;

/// `text` shortened to `max` characters, with an ellipsis when cut.
pub fn truncate(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

fn short(commit: Option<&CommitId>) -> &str {
    commit.map_or("-", CommitId::short)
}

/// The Slack message: `text` (the notification's line) and `blocks`: what
/// happened, the commit's subject and author, the failures or errors, and
/// a link to the controller.
pub fn slack(n: &Notice, link: &str) -> serde_json::Value {
    let icon = match n.event {
        Kind::RolloutStarted | Kind::WaveOpened => ":arrow_forward:",
        Kind::AgentsFailed | Kind::RolledBack => ":warning:",
        Kind::RolloutHalted | Kind::CommitInvalid => ":red_circle:",
        Kind::RolloutComplete => ":white_check_mark:",
        Kind::RolloutSuperseded => ":fast_forward:",
    };
    let subject = match &n.group {
        Some(group) => format!("{group} at {}", short(n.commit.as_ref())),
        None => format!("commit {}", short(n.commit.as_ref())),
    };
    let text = format!("{subject}: {}", summary(n));
    let mut head = format!(
        "{icon} *{}* at `{}`: {}",
        escape(n.group.as_ref().map_or("commit", |g| g.as_str())),
        short(n.commit.as_ref()),
        escape(&summary(n))
    );
    if let Some(c) = &n.change {
        head.push_str(&format!("\n>{}: {}", escape(&c.author), escape(&c.subject)));
    }
    let mut blocks = vec![section(head)];
    let details: Vec<String> = match n.event {
        Kind::CommitInvalid => n.errors.iter().map(|e| format!("• {}", escape(e))).collect(),
        _ => n
            .failures
            .iter()
            .map(|f| format!("• `{}`: {}", escape(&f.agent), escape(&f.error)))
            .collect(),
    };
    if !details.is_empty() {
        let title = if n.event == Kind::CommitInvalid {
            "*Problems*"
        } else {
            "*Failures*"
        };
        blocks.push(section(format!("{title}\n{}", details.join("\n"))));
    }
    blocks.push(serde_json::json!({
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": format!(
            "<{}|opamp-gitops> · {} · {}",
            link,
            n.event.as_str(),
            crate::rfc3339::format(n.time)
        )}],
    }));
    serde_json::json!({"text": text, "blocks": blocks})
}

fn section(text: String) -> serde_json::Value {
    serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(text, SLACK_SECTION_MAX)}})
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::gitsrc::webhook::signature_matches;
    use crate::model::{Change, GroupName};
    use crate::notify::notice::Failure;
    use crate::reconcile::AgentCounts;

    pub(crate) fn halted() -> Notice {
        Notice {
            id: "0123456789abcdef0123456789abcdef".into(),
            event: Kind::RolloutHalted,
            group: Some(GroupName::new("edge")),
            commit: Some(CommitId::new("4f1c0d".repeat(6) + "0000")),
            change: Some(Change {
                author: "Ada <ada@example.com>".into(),
                committer: "Ada <ada@example.com>".into(),
                time: SystemTime::UNIX_EPOCH,
                subject: "edge: raise the batch size & more".into(),
            }),
            wave: Some(1),
            waves: Some(4),
            agents: Some(AgentCounts {
                targeted: 5,
                failed: 1,
                pending: 4,
                ..Default::default()
            }),
            failed: Some(1),
            failures: vec![Failure {
                agent: "0192f3c4-7a51-7b11-9b0e-5d2c3f4e5a6b".into(),
                error: "exporter <otlp> refused".into(),
            }],
            rolled_back: None,
            superseded_by: None,
            errors: vec![],
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        }
    }

    const LINK: &str = "http://ctl.example:4321/api/v1/groups";

    #[test]
    fn the_json_event_has_every_field() {
        let v = json(&halted(), LINK);
        let fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            [
                "agents",
                "change",
                "commit",
                "errors",
                "event",
                "failed",
                "failures",
                "group",
                "id",
                "rolled_back",
                "superseded_by",
                "time",
                "url",
                "wave",
                "waves"
            ]
        );
        assert_eq!(v["event"], "rollout_halted");
        assert_eq!(v["group"], "edge");
        assert_eq!(v["change"]["author"], "Ada <ada@example.com>");
        assert_eq!(v["agents"]["targeted"], 5);
        assert_eq!(v["failures"][0]["error"], "exporter <otlp> refused");
        assert_eq!(v["time"], "2027-01-15T08:00:00Z");
        assert_eq!(v["url"], LINK);
        assert_eq!(v["superseded_by"], serde_json::Value::Null);
    }

    #[test]
    fn a_signed_request_verifies_with_the_secret() {
        let r = request("http://hook.example/in", Format::Json, Some(b"s3cret"), &halted(), LINK);
        let header = |name: &str| r.headers.iter().find(|(h, _)| *h == name).map(|(_, v)| v.as_str());
        assert_eq!(header(EVENT_HEADER), Some("rollout_halted"));
        assert_eq!(header(DELIVERY_HEADER), Some("0123456789abcdef0123456789abcdef"));
        assert!(signature_matches(b"s3cret", &r.body, header(SIGNATURE_HEADER)));
        assert!(!signature_matches(b"other", &r.body, header(SIGNATURE_HEADER)));
        let unsigned = request("http://hook.example/in", Format::Json, None, &halted(), LINK);
        assert!(!unsigned.headers.iter().any(|(h, _)| *h == SIGNATURE_HEADER));
        assert_eq!(unsigned.body, r.body);
    }

    #[test]
    fn slack_messages_have_text_blocks_and_escape_markup() {
        let v = slack(&halted(), LINK);
        assert_eq!(
            v["text"],
            "edge at 4f1c0d4f1c0d: halted at wave 1 of 4: 1 agent failed; 0 of 5 agents applied"
        );
        let blocks = v["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 3);
        let head = blocks[0]["text"]["text"].as_str().unwrap();
        assert_eq!(
            head,
            ":red_circle: *edge* at `4f1c0d4f1c0d`: halted at wave 1 of 4: 1 agent failed; 0 of 5 agents applied\n\
             >Ada &lt;ada@example.com&gt;: edge: raise the batch size &amp; more"
        );
        let failures = blocks[1]["text"]["text"].as_str().unwrap();
        assert!(failures.ends_with("exporter &lt;otlp&gt; refused"), "{failures}");
        let context = blocks[2]["elements"][0]["text"].as_str().unwrap();
        assert_eq!(
            context,
            format!("<{LINK}|opamp-gitops> · rollout_halted · 2027-01-15T08:00:00Z")
        );
    }

    #[test]
    fn summaries() {
        let base = halted();
        let with = |event, f: &dyn Fn(&mut Notice)| {
            let mut n = Notice { event, ..base.clone() };
            f(&mut n);
            summary(&n)
        };
        let cases = [
            (
                with(Kind::RolloutStarted, &|_| {}),
                "rollout started: canary first to 5 agents in 4 waves",
            ),
            (
                with(Kind::WaveOpened, &|n| n.wave = Some(2)),
                "wave 2 of 4 opened: 0 of 5 agents applied",
            ),
            (
                with(Kind::AgentsFailed, &|_| {}),
                "1 agent failed at wave 1 of 4; 0 of 5 agents applied",
            ),
            (
                with(Kind::RolledBack, &|n| n.rolled_back = Some(1)),
                "1 agent that failed given the stable config back (1 agent failed at wave 1 of 4)",
            ),
            (
                with(Kind::RolloutComplete, &|_| {}),
                "rollout complete: 0 of 5 agents applied",
            ),
            (
                with(Kind::RolloutSuperseded, &|n| {
                    n.superseded_by = Some(CommitId::new("ab".repeat(20)))
                }),
                "superseded by abababababab before it completed",
            ),
            (
                with(Kind::CommitInvalid, &|n| {
                    n.errors = vec!["groups/a.yaml:1:1: bad".into()]
                }),
                "invalid, nothing rolled out: 1 problem; groups/a.yaml:1:1: bad",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
        assert_eq!(truncate("abcdef".into(), 4), "abc…");
        assert_eq!(truncate("abc".into(), 4), "abc");
    }
}
