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

use super::agent::{Agent, Input, Output, Timer};
use super::stats::Counters;
use crate::proto::{AgentConfigMap, AgentToServer, ServerToAgent};

/// State every agent task of one simulation reads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The OpAMP endpoint, with its scheme matching the transport.
    pub(crate) url: String,
    /// `host:port` of `url`.
    pub(crate) authority: String,
    pub(crate) counters: Counters,
    /// Bounds WebSocket handshakes (or HTTP requests) in flight, so a burst of
    /// agents does not overflow the server's accept queue.
    pub(crate) connecting: Semaphore,
    pub(crate) configs: ConfigCache,
    pub(crate) max_message_bytes: usize,
}

/// One agent, its timers, and the counters it moves.
pub(crate) struct Runner {
    pub(crate) agent: Agent,
    pub(crate) timers: Timers,
    pub(crate) shared: Arc<Shared>,
}

/// What the transport must do after an input.
#[derive(Debug, Default)]
pub(crate) struct Step {
    pub(crate) send: Option<AgentToServer>,
    /// The process restarts: after sending, drop the connection and connect
    /// again this long from now.
    pub(crate) reconnect: Option<Duration>,
}

impl Runner {
    pub(crate) fn new(agent: Agent, shared: Arc<Shared>) -> Self {
        Runner {
            agent,
            timers: Timers::default(),
            shared,
        }
    }

    /// Starts the agent's process (its collector, its restart timer).
    pub(crate) fn start(&mut self) {
        let _ = self.step(Input::Start);
    }

    /// Feeds one input and returns the message to send, if any.
    pub(crate) fn feed(&mut self, input: Input) -> Option<AgentToServer> {
        self.step(input).send
    }

    /// Feeds one input and returns what the transport must do.
    pub(crate) fn step(&mut self, input: Input) -> Step {
        if let Input::Timer(t) = &input {
            self.timers.clear(*t);
        }
        let before = (self.agent.status(), self.agent.healthy());
        let out = self.agent.handle(input, now_unix_nano());
        let after = (self.agent.status(), self.agent.healthy());
        if before.0 != after.0 {
            self.shared.counters.status_changed(before.0, after.0);
        }
        if before.1 != after.1 {
            self.shared.counters.health_changed(after.1);
        }
        if out.reconnect.is_some() {
            self.shared.counters.restarted();
        }
        self.timers.apply(&out, Instant::now());
        Step {
            send: out.send,
            reconnect: out.reconnect,
        }
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
        tokio::select! {
            _ = cancel.cancelled() => false,
            () = self.offline_until(tokio::time::sleep(delay)) => true,
        }
    }

    /// Awaits `until` (a wait, a connection being opened) while offline,
    /// still running the agent's timers: its collector starts meanwhile.
    pub(crate) async fn offline_until<T>(&mut self, until: impl Future<Output = T>) -> T {
        let mut until = std::pin::pin!(until);
        loop {
            tokio::select! {
                out = &mut until => return out,
                input = self.timers.next() => {
                    // Offline, the agent sends nothing; its state still moves on.
                    let _ = self.step(input);
                }
            }
        }
    }
}

/// The agent's timers as deadlines.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Timers {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl Timers {
    fn apply(&mut self, out: &Output, now: Instant) {
        for (timer, after) in &out.timers {
            self.deadlines[*timer as usize] = after.map(|d| now + d);
        }
    }

    fn clear(&mut self, timer: Timer) {
        self.deadlines[timer as usize] = None;
    }

    /// Resolves to the input of the first timer due (the first in
    /// [`Timer::ALL`] order on a tie); never, when none is armed.
    pub(crate) fn next(&self) -> impl Future<Output = Input> + use<> {
        let first = Timer::ALL
            .iter()
            .filter_map(|t| self.deadlines[*t as usize].map(|at| (at, *t)))
            .min();
        async move {
            match first {
                Some((at, timer)) => {
                    tokio::time::sleep_until(at).await;
                    Input::Timer(timer)
                }
                None => std::future::pending().await,
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

/// A seed for an agent's jitter, from its uid and index (clones share a uid
/// but must not retry in step).
pub(crate) fn seed(uid: &[u8; 16], index: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&uid[8..]);
    let from_uid =
        u64::from_le_bytes(b) ^ u64::from_le_bytes([uid[0], uid[1], uid[2], uid[3], uid[4], uid[5], uid[6], uid[7]]);
    from_uid ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AgentConfigFile;

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
    async fn an_agent_waiting_to_connect_starts_its_collector_meanwhile() {
        let config = super::super::Config::new("ws://127.0.0.1:1/v1/opamp", 1);
        let shared = Arc::new(Shared {
            url: "ws://127.0.0.1:1/v1/opamp".into(),
            authority: "127.0.0.1:1".into(),
            counters: Counters::default(),
            connecting: Semaphore::new(1),
            configs: ConfigCache::default(),
            max_message_bytes: 1 << 20,
        });
        let mut runner = Runner::new(Agent::new(Arc::new(config.profile()), 0, [7; 16], 0), shared);
        runner.start();
        // The connection takes longer to open than the collector to start.
        runner.offline_until(tokio::time::sleep(config.startup_time * 2)).await;
        let first = runner.feed(Input::Connected).expect("a first message");
        assert_eq!(
            first.health.map(|h| h.healthy),
            Some(true),
            "healthy in its first message"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_deadline_order() {
        let now = Instant::now();
        let mut t = Timers::default();
        t.apply(
            &Output {
                timers: vec![
                    (Timer::Heartbeat, Some(Duration::from_secs(30))),
                    (Timer::Apply, Some(Duration::from_millis(200))),
                    (Timer::Collector, Some(Duration::from_millis(200))),
                    (Timer::Restart, Some(Duration::from_secs(60))),
                ],
                ..Output::default()
            },
            now,
        );
        assert_eq!(
            t.next().await,
            Input::Timer(Timer::Apply),
            "a tie goes to the first in order"
        );
        assert_eq!(Instant::now() - now, Duration::from_millis(200));
        t.clear(Timer::Apply);
        assert_eq!(t.next().await, Input::Timer(Timer::Collector));
        t.clear(Timer::Collector);
        t.apply(
            &Output {
                timers: vec![(Timer::Restart, None)],
                ..Output::default()
            },
            now,
        );
        assert_eq!(t.next().await, Input::Timer(Timer::Heartbeat));
        assert_eq!(Instant::now() - now, Duration::from_secs(30));
        t.clear(Timer::Heartbeat);
        let none = tokio::time::timeout(Duration::from_secs(3600), t.next()).await;
        assert!(none.is_err(), "no timer armed, nothing fires");
    }
}
