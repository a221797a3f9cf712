//! Notifications and commit statuses: the driver hands each rollout's events
//! to [`NotifyHandle::enqueue`], which writes them to every receiver's
//! outbox (`--notify` webhooks, and the forge's commit statuses) before the
//! driver saves the state that follows them; one task per receiver delivers
//! its outbox in order, retrying with backoff, and removes each notice once
//! delivered. What a notice says ([`notice`]), its bytes ([`payload`],
//! [`forge`]) and the outbox files ([`outbox`]) are decided apart from the
//! sockets ([`sender`]).

pub mod forge;
pub mod notice;
pub mod outbox;
pub mod payload;
mod sender;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::durable::FileError;
use crate::telemetry::notify::{NoticeDropped, NotifyMetrics, OutboxFailed};
use crate::telemetry::{InternalEvent, Registry};
pub use forge::{Forge, ForgeKind, ForgeProject};
pub use notice::{Kind, Notice};
pub use payload::Format;

/// Notices a receiver's outbox holds at most; the oldest go first.
pub const MAX_QUEUED: usize = 1000;

/// A `--notify` receiver: where to POST, and in which format.
#[derive(Clone, PartialEq, Eq)]
pub struct Hook {
    pub url: String,
    pub format: Format,
}

/// Shows the host alone: a webhook's URL is often its secret (Slack's is).
impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("host", &host_of(&self.url))
            .field("format", &self.format)
            .finish()
    }
}

/// The host of a URL, for logs.
fn host_of(url: &str) -> String {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_string))
        .unwrap_or_default()
}

impl Hook {
    /// `https://…` (or `http://…`) for the JSON event, `slack+https://…` for
    /// a Slack message.
    pub fn parse(s: &str) -> Result<Hook, String> {
        let (format, url) = match s.strip_prefix("slack+") {
            Some(rest) => (Format::Slack, rest),
            None => (Format::Json, s),
        };
        let usage = "expected an http:// or https:// URL, or slack+https://… for Slack's format";
        let uri: http::Uri = url.parse().map_err(|e| format!("{e} ({usage})"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
            return Err(usage.to_string());
        }
        Ok(Hook {
            url: url.to_string(),
            format,
        })
    }
}

/// What to notify, and how.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub hooks: Vec<Hook>,
    /// The file holding the secret the hooks' bodies are signed with.
    pub secret_file: Option<PathBuf>,
    /// Commit statuses in this forge.
    pub forge: Option<Forge>,
    /// The controller's address as people reach it; notices link to its
    /// `/api/v1/groups`. `None`: the API's address.
    pub external_url: Option<String>,
    pub backoff: Backoff,
    /// Notices each receiver's outbox holds at most.
    pub max_queued: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            hooks: vec![],
            secret_file: None,
            forge: None,
            external_url: None,
            backoff: Backoff::default(),
            max_queued: MAX_QUEUED,
        }
    }
}

impl NotifyConfig {
    /// Whether there is anyone to tell.
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty() && self.forge.is_none()
    }

    /// The controller's view that notices link to: `/api/v1/groups` of the
    /// external URL, or else of `api` (the API's own address).
    pub fn link(&self, api: &str) -> String {
        let base = self.external_url.as_deref().unwrap_or(api);
        format!("{}/api/v1/groups", base.trim_end_matches('/'))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("reading the notifications' secret {}: {source}", .path.display())]
    Secret { path: PathBuf, source: std::io::Error },
    #[error("the notifications' outbox: {0}")]
    Outbox(#[from] FileError),
}

/// Where a receiver's notices go.
#[derive(Debug)]
enum Destination {
    Hook(Hook),
    Forge(Forge),
}

/// A receiver's outbox in memory: its notices by sequence number, oldest
/// first, at most `max`. Pure.
#[derive(Debug)]
struct Queue {
    entries: VecDeque<(u64, Arc<Notice>)>,
    max: usize,
}

impl Queue {
    /// Adds notices; answers the oldest ones dropped to stay within `max`.
    fn push(&mut self, added: impl IntoIterator<Item = (u64, Arc<Notice>)>) -> Vec<(u64, Arc<Notice>)> {
        self.entries.extend(added);
        let excess = self.entries.len().saturating_sub(self.max.max(1));
        self.entries.drain(..excess).collect()
    }

    fn front(&self) -> Option<(u64, Arc<Notice>)> {
        self.entries.front().cloned()
    }

    /// Forgets a notice (delivered, or dropped while it was being sent).
    fn remove(&mut self, seq: u64) {
        self.entries.retain(|(s, _)| *s != seq);
    }
}

/// One receiver: its label in metrics and logs, where its notices go, its
/// outbox on disk and in memory.
#[derive(Debug)]
struct Receiver {
    label: String,
    destination: Destination,
    dir: PathBuf,
    queue: Mutex<Queue>,
    wake: Notify,
}

impl Receiver {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("the queue is never poisoned")
    }

    /// The host it is reached at, for logs (its URL may hold a secret).
    fn host(&self) -> String {
        match &self.destination {
            Destination::Hook(h) => host_of(&h.url),
            Destination::Forge(f) => host_of(&f.api),
        }
    }

    /// The request telling it `n`; `None` when it has nothing to say of it.
    fn request(&self, n: &Notice, secret: Option<&[u8]>, link: &str) -> Option<payload::Request> {
        match &self.destination {
            Destination::Hook(h) => Some(payload::request(&h.url, h.format, secret, n, link)),
            Destination::Forge(f) => f.request(n, link),
        }
    }

    /// Whether a refusal means what was asked is already so (see [`Forge::already_set`]).
    fn already_set(&self, status: u16, body: &[u8]) -> bool {
        match &self.destination {
            Destination::Hook(_) => false,
            Destination::Forge(f) => f.already_set(status, body),
        }
    }

    /// Whether it has something to say of `n` (a forge's status needs a commit).
    fn wants(&self, n: &Notice) -> bool {
        match &self.destination {
            Destination::Hook(_) => true,
            Destination::Forge(_) => n.commit.is_some(),
        }
    }
}

struct Shared {
    receivers: Vec<Receiver>,
    next_seq: AtomicU64,
    secret: Option<Vec<u8>>,
    /// The controller's view, linked from every notice.
    link: String,
    backoff: Backoff,
    metrics: NotifyMetrics,
}

/// Hands notices to the receivers. Cheap to clone; `enqueue` writes the
/// outbox and returns, never waiting for a receiver.
#[derive(Clone)]
pub struct NotifyHandle {
    shared: Arc<Shared>,
}

impl NotifyHandle {
    /// Writes `notices` to every receiver's outbox (durably: call it before
    /// saving the state that follows them) and wakes the senders. A notice
    /// that cannot be written is still sent, and the failure logged.
    pub async fn enqueue(&self, notices: Vec<Notice>) {
        if notices.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let notices: Vec<Arc<Notice>> = notices.into_iter().map(Arc::new).collect();
        if let Err(e) = tokio::task::spawn_blocking(move || shared.record(&notices)).await {
            tracing::error!(error = %e, "writing the notifications' outbox panicked");
        }
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        self.shared.metrics.register(registry);
    }
}

impl Shared {
    /// Blocking: writes the outbox files, then queues the notices.
    fn record(&self, notices: &[Arc<Notice>]) {
        for r in &self.receivers {
            let mut added = Vec::with_capacity(notices.len());
            for n in notices.iter().filter(|n| r.wants(n)) {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = outbox::write(&r.dir, seq, n) {
                    OutboxFailed {
                        receiver: &r.label,
                        error: &error,
                    }
                    .emit(&self.metrics);
                }
                added.push((seq, n.clone()));
            }
            if added.is_empty() {
                continue;
            }
            let dropped = r.queue().push(added);
            self.drop_notices(r, dropped);
            r.wake.notify_one();
        }
    }

    fn drop_notices(&self, r: &Receiver, dropped: Vec<(u64, Arc<Notice>)>) {
        let queued = r.queue().entries.len();
        for (seq, n) in dropped {
            NoticeDropped {
                receiver: &r.label,
                event: n.event.as_str(),
                queued,
            }
            .emit(&self.metrics);
            if let Err(error) = outbox::remove(&r.dir, seq) {
                OutboxFailed {
                    receiver: &r.label,
                    error: &error,
                }
                .emit(&self.metrics);
            }
        }
    }
}

/// Reads the secret and each receiver's outbox, and starts delivering what
/// it holds. Notices of receivers no longer configured are left in place
/// (and said so).
pub fn spawn(
    config: NotifyConfig,
    state_dir: &Path,
    link: String,
    cancel: CancellationToken,
) -> Result<(NotifyHandle, JoinHandle<()>), NotifyError> {
    let secret = match &config.secret_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| NotifyError::Secret {
                path: path.clone(),
                source,
            })?;
            Some(text.trim_end_matches(['\r', '\n']).as_bytes().to_vec())
        }
        None => None,
    };
    let outbox_dir = state_dir.join(outbox::DIR);
    let mut destinations: Vec<(String, String, Destination)> = config
        .hooks
        .into_iter()
        .enumerate()
        .map(|(i, h)| (i.to_string(), outbox::folder("hook", &h.url), Destination::Hook(h)))
        .collect();
    if let Some(f) = config.forge {
        let address = format!("{}/{}", f.api, f.project.project);
        destinations.push(("forge".into(), outbox::folder("forge", &address), Destination::Forge(f)));
    }
    let labels: Vec<String> = destinations.iter().map(|(label, _, _)| label.clone()).collect();
    let metrics = NotifyMetrics::new(&labels);
    let mut last_seq = 0;
    let mut receivers = Vec::with_capacity(destinations.len());
    let mut dropped = Vec::new();
    for (label, folder, destination) in destinations {
        let dir = outbox_dir.join(&folder);
        let loaded = outbox::load(&dir)?;
        for (path, why) in &loaded.unreadable {
            tracing::warn!(receiver = %label, path = %path.display(), error = %why, "an outbox file is not a notice; it is left alone");
        }
        if !loaded.notices.is_empty() {
            tracing::info!(receiver = %label, notices = loaded.notices.len(), "notifications left from before the restart are delivered first");
        }
        last_seq = last_seq.max(loaded.last_seq);
        let mut queue = Queue {
            entries: VecDeque::new(),
            max: config.max_queued,
        };
        dropped.push(queue.push(loaded.notices.into_iter().map(|(seq, n)| (seq, Arc::new(n)))));
        receivers.push(Receiver {
            label,
            destination,
            dir,
            queue: Mutex::new(queue),
            wake: Notify::new(),
        });
    }
    let known: Vec<String> = receivers
        .iter()
        .filter_map(|r| r.dir.file_name()?.to_str().map(str::to_string))
        .collect();
    for folder in outbox::folders(state_dir).into_iter().filter(|f| !known.contains(f)) {
        tracing::warn!(folder = %outbox_dir.join(folder).display(), "the outbox of a receiver no longer configured is left in place");
    }
    let shared = Arc::new(Shared {
        receivers,
        next_seq: AtomicU64::new(last_seq + 1),
        secret,
        link,
        backoff: config.backoff,
        metrics,
    });
    for (r, dropped) in shared.receivers.iter().zip(dropped) {
        shared.drop_notices(r, dropped);
    }
    let task = tokio::spawn(sender::run(shared.clone(), cancel));
    Ok((NotifyHandle { shared }, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::payload::tests::halted;

    #[test]
    fn hooks() {
        assert_eq!(
            Hook::parse("https://hooks.example.com/in?x=1"),
            Ok(Hook {
                url: "https://hooks.example.com/in?x=1".into(),
                format: Format::Json
            })
        );
        assert_eq!(
            Hook::parse("slack+https://hooks.slack.com/services/T0/B0/x"),
            Ok(Hook {
                url: "https://hooks.slack.com/services/T0/B0/x".into(),
                format: Format::Slack
            })
        );
        assert_eq!(Hook::parse("http://127.0.0.1:9/h").map(|h| h.format), Ok(Format::Json));
        for bad in [
            "hooks.example.com/in",
            "ftp://x/y",
            "slack+",
            "https://",
            "slack+ftp://x",
        ] {
            assert!(Hook::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn links() {
        let mut c = NotifyConfig::default();
        assert_eq!(c.link("http://127.0.0.1:4321"), "http://127.0.0.1:4321/api/v1/groups");
        c.external_url = Some("https://gitops.example.com/".into());
        assert_eq!(
            c.link("http://127.0.0.1:4321"),
            "https://gitops.example.com/api/v1/groups"
        );
    }

    #[test]
    fn a_full_queue_drops_its_oldest() {
        let n = Arc::new(halted());
        let mut q = Queue {
            entries: VecDeque::new(),
            max: 3,
        };
        assert!(q.push((1..=3).map(|s| (s, n.clone()))).is_empty());
        let dropped: Vec<u64> = q
            .push([(4, n.clone()), (5, n.clone())])
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(dropped, [1, 2]);
        assert_eq!(q.front().map(|(s, _)| s), Some(3));
        q.remove(3);
        q.remove(3);
        assert_eq!(q.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [4, 5]);
    }
}
