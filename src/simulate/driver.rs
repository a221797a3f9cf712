//! What both transports share: feeding an agent its inputs while keeping the
//! counters and timers in step, reconnect backoff, and the cache that lets
//! agents share the bodies of the configs they receive.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::agent::{Agent, Input, Output};
use super::stats::Counters;
use crate::opamp::proto::{AgentConfigMap, AgentToServer, ServerToAgent};

/// State every agent task of one simulation reads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The OpAMP endpoint, with its scheme matching the transport.
    pub(crate) url: String,
    pub(crate) counters: Counters,
    /// Bounds WebSocket handshakes (or HTTP requests) in flight, so a burst of
    /// agents does not overflow the server's accept queue.
    pub(crate) connecting: Semaphore,
    pub(crate) configs: ConfigCache,
    pub(crate) max_message_bytes: usize,
}

/// One agent, its timers, and the counters it moves.
pub(crate) struct Driver {
    pub(crate) agent: Agent,
    pub(crate) timers: Timers,
    pub(crate) shared: Arc<Shared>,
}

impl Driver {
    pub(crate) fn new(agent: Agent, shared: Arc<Shared>) -> Self {
        Driver {
            agent,
            timers: Timers::default(),
            shared,
        }
    }

    /// Feeds one input and returns the message to send, if any.
    pub(crate) fn feed(&mut self, input: Input) -> Option<AgentToServer> {
        self.timers.clear(&input);
        let before = self.agent.status();
        let out = self.agent.handle(input, now_unix_nano());
        let after = self.agent.status();
        if before != after {
            self.shared.counters.status_changed(before, after);
        }
        self.timers.arm(&out, Instant::now());
        out.send
    }

    /// Feeds a message from the server, after sharing its config bodies.
    pub(crate) fn received(&mut self, mut msg: ServerToAgent) -> Option<AgentToServer> {
        self.shared.counters.received();
        if msg.error_response.is_some() {
            self.shared.counters.error();
        }
        if let Some(remote) = msg.remote_config.as_mut()
            && let Some(config) = remote.config.as_mut()
        {
            self.shared.configs.share(&remote.config_hash, config);
        }
        self.feed(Input::Received(Box::new(msg)))
    }

    /// Waits `delay` while offline, still running the agent's timers (an apply
    /// finishes even while the server is away). False when cancelled.
    pub(crate) async fn wait_offline(&mut self, delay: Duration, cancel: &tokio_util::sync::CancellationToken) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                input = self.timers.next() => {
                    // Offline, the agent sends nothing; its state still moves on.
                    let _ = self.feed(input);
                }
            }
        }
    }
}

/// The agent's two timers as deadlines.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Timers {
    apply: Option<Instant>,
    heartbeat: Option<Instant>,
}

impl Timers {
    fn arm(&mut self, out: &Output, now: Instant) {
        if let Some(d) = out.apply_timer {
            self.apply = Some(now + d);
        }
        if let Some(d) = out.heartbeat_timer {
            self.heartbeat = Some(now + d);
        }
    }

    fn clear(&mut self, input: &Input) {
        match input {
            Input::ApplyTimer => self.apply = None,
            Input::HeartbeatTimer => self.heartbeat = None,
            _ => {}
        }
    }

    /// Resolves to the input of the first timer due; never, when none is armed.
    pub(crate) fn next(&self) -> impl Future<Output = Input> + use<> {
        let Timers { apply, heartbeat } = *self;
        async move {
            match (apply, heartbeat) {
                (Some(a), Some(h)) if a <= h => {
                    tokio::time::sleep_until(a).await;
                    Input::ApplyTimer
                }
                (Some(a), None) => {
                    tokio::time::sleep_until(a).await;
                    Input::ApplyTimer
                }
                (_, Some(h)) => {
                    tokio::time::sleep_until(h).await;
                    Input::HeartbeatTimer
                }
                (None, None) => std::future::pending().await,
            }
        }
    }
}

/// Exponential reconnect backoff with jitter: 250 ms doubling to 30 s, each
/// delay drawn from its upper half so a fleet that lost its server together
/// does not return together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    attempt: u32,
    rng: u64,
}

const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Backoff {
    pub(crate) fn new(seed: u64) -> Self {
        Backoff {
            attempt: 0,
            rng: seed | 1,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_BASE
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: plenty for jitter, and no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = ceiling / 2;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        half + half.mul_f64(frac)
    }
}

/// The config maps agents received, by hash, so ten thousand agents applying
/// one config hold one copy of its bodies rather than ten thousand.
#[derive(Debug, Default)]
pub(crate) struct ConfigCache {
    maps: Mutex<HashMap<Bytes, AgentConfigMap>>,
}

/// Distinct configs kept; past this the cache starts over (a rollout rarely
/// has more than two configs in flight).
const CONFIG_CACHE_ENTRIES: usize = 64;

impl ConfigCache {
    /// Replaces `config` with the cached map of equal content, or caches it.
    pub(crate) fn share(&self, hash: &Bytes, config: &mut AgentConfigMap) {
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        match maps.get(hash) {
            // Compared, not trusted: a server could reuse a hash for other content.
            Some(cached) if cached == config => *config = cached.clone(),
            _ => {
                if maps.len() >= CONFIG_CACHE_ENTRIES {
                    maps.clear();
                }
                maps.insert(hash.clone(), config.clone());
            }
        }
    }
}

/// The wall clock in nanoseconds since the Unix epoch, for health reports.
pub(crate) fn now_unix_nano() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A seed for an agent's jitter, from its uid.
pub(crate) fn seed(uid: &[u8; 16]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&uid[8..]);
    u64::from_le_bytes(b) ^ u64::from_le_bytes([uid[0], uid[1], uid[2], uid[3], uid[4], uid[5], uid[6], uid[7]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opamp::proto::AgentConfigFile;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(42);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = BACKOFF_BASE.saturating_mul(1 << i).min(BACKOFF_MAX);
            assert!(*d >= ceiling / 2 && *d <= ceiling, "attempt {i}: {d:?}");
        }
        assert!(delays[11] >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_BASE);
        // Two agents draw different delays.
        let (mut x, mut y) = (Backoff::new(1), Backoff::new(2));
        assert_ne!(
            (0..4).map(|_| x.next_delay()).collect::<Vec<_>>(),
            (0..4).map(|_| y.next_delay()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn config_cache_shares_equal_bodies_only() {
        let map = |body: &str| AgentConfigMap {
            config_map: [(
                String::new(),
                AgentConfigFile {
                    body: Bytes::copy_from_slice(body.as_bytes()),
                    content_type: "text/yaml".into(),
                },
            )]
            .into(),
        };
        let cache = ConfigCache::default();
        let hash = Bytes::from_static(&[1; 32]);
        let mut first = map("a: 1");
        cache.share(&hash, &mut first);
        let mut second = map("a: 1");
        cache.share(&hash, &mut second);
        assert_eq!(second, first);
        assert_eq!(
            second.config_map[""].body.as_ptr(),
            first.config_map[""].body.as_ptr(),
            "the second agent holds the first one's bytes"
        );
        let mut other = map("a: 2");
        cache.share(&hash, &mut other);
        assert_eq!(
            &other.config_map[""].body[..],
            b"a: 2",
            "different content under one hash is kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_deadline_order() {
        let now = Instant::now();
        let mut t = Timers::default();
        t.arm(
            &Output {
                send: None,
                apply_timer: Some(Duration::from_millis(200)),
                heartbeat_timer: Some(Duration::from_secs(30)),
            },
            now,
        );
        assert_eq!(t.next().await, Input::ApplyTimer);
        assert_eq!(Instant::now() - now, Duration::from_millis(200));
        t.clear(&Input::ApplyTimer);
        assert_eq!(t.next().await, Input::HeartbeatTimer);
        assert_eq!(Instant::now() - now, Duration::from_secs(30));
        t.clear(&Input::HeartbeatTimer);
        let none = tokio::time::timeout(Duration::from_secs(3600), t.next()).await;
        assert!(none.is_err(), "no timer armed, nothing fires");
    }
}
