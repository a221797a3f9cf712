//! Long polls: `?after=N&wait=30s` on the list endpoints holds the answer
//! until its version differs from `N` (something the answer is built from
//! was published again), the wait runs out or the controller shuts down.
//! Clients follow the controller without polling: they send back the
//! `version` of the answer they hold.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::driver::DriverStatus;
use crate::fleet::FleetSnapshot;
use crate::gitsrc::Status as GitStatus;

/// A wait longer than this is cut to it, so that no proxy or client times out first.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long `after` alone waits.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The query as sent.
#[derive(Debug, Default, Deserialize)]
pub struct WaitParams {
    after: Option<u64>,
    wait: Option<String>,
}

/// A parsed long poll: answer once the version differs from `after`, or after `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPoll {
    pub after: u64,
    pub wait: Duration,
}

impl WaitParams {
    /// The query's long-poll part, for endpoints that take more parameters.
    pub fn new(after: Option<u64>, wait: Option<String>) -> Self {
        WaitParams { after, wait }
    }

    /// `None` when no `after` is given: answer at once.
    pub fn parse(&self) -> Result<Option<LongPoll>, String> {
        let wait = match &self.wait {
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| format!("wait: {e} (examples: 500ms, 30s, 1m)"))?
                .min(MAX_WAIT),
            None => DEFAULT_WAIT,
        };
        Ok(self.after.map(|after| LongPoll { after, wait }))
    }
}

/// The long poll a request asks for, or why it is malformed.
pub fn requested(query: Result<Query<WaitParams>, QueryRejection>) -> Result<Option<LongPoll>, String> {
    let Query(params) = query.map_err(|e| e.body_text())?;
    params.parse()
}

/// Resolves when `rx` publishes again; never when it is absent or closed
/// (nothing more will come from it), so it can sit in a `select!` with others.
pub async fn published<T>(rx: Option<&mut watch::Receiver<T>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// The published values an answer is built from. Its version is the sum of
/// the fleet's and the driver's, each of which only grows within a process;
/// the git source's status has no version, so a change to it ends a wait
/// with the version as it is (the next plan shows it too).
pub struct Sources {
    fleet: Option<watch::Receiver<Arc<FleetSnapshot>>>,
    driver: Option<watch::Receiver<Arc<DriverStatus>>>,
    git: Option<watch::Receiver<GitStatus>>,
}

impl Sources {
    /// The fleet and the driver (either optional), counted in the version.
    pub fn new(
        fleet: Option<watch::Receiver<Arc<FleetSnapshot>>>,
        driver: Option<watch::Receiver<Arc<DriverStatus>>>,
    ) -> Self {
        Sources {
            fleet,
            driver,
            git: None,
        }
    }

    /// Also answers when the git source's status changes.
    pub fn with_git(mut self, git: Option<watch::Receiver<GitStatus>>) -> Self {
        self.git = git;
        self
    }

    /// The current version; what is read counts as seen.
    fn version(&mut self) -> u64 {
        if let Some(git) = &mut self.git {
            git.mark_unchanged();
        }
        let fleet = self.fleet.as_mut().map_or(0, |rx| rx.borrow_and_update().version);
        let driver = self.driver.as_mut().map_or(0, |rx| rx.borrow_and_update().version);
        fleet + driver
    }

    /// Waits while the version is `poll.after`, at most `poll.wait` and
    /// never past `shutdown` or a change of the git source's status;
    /// answers the version then.
    pub async fn wait(mut self, poll: Option<LongPoll>, shutdown: &CancellationToken) -> u64 {
        let Some(poll) = poll else {
            return self.version();
        };
        let deadline = tokio::time::Instant::now() + poll.wait;
        loop {
            let version = self.version();
            if version != poll.after {
                return version;
            }
            tokio::select! {
                () = published(self.fleet.as_mut()) => {}
                () = published(self.driver.as_mut()) => {}
                () = published(self.git.as_mut()) => return version,
                () = tokio::time::sleep_until(deadline) => return version,
                () = shutdown.cancelled() => return version,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(after: Option<u64>, wait: Option<&str>) -> WaitParams {
        WaitParams {
            after,
            wait: wait.map(String::from),
        }
    }

    #[test]
    fn parsing_defaults_bounds_and_errors() {
        assert_eq!(params(None, Some("5s")).parse(), Ok(None), "no after: at once");
        assert_eq!(
            params(Some(3), None).parse(),
            Ok(Some(LongPoll {
                after: 3,
                wait: DEFAULT_WAIT
            }))
        );
        assert_eq!(
            params(Some(3), Some("250ms")).parse().unwrap().unwrap().wait,
            Duration::from_millis(250)
        );
        assert_eq!(params(Some(3), Some("1h")).parse().unwrap().unwrap().wait, MAX_WAIT);
        let err = params(Some(3), Some("soon")).parse().unwrap_err();
        assert!(err.starts_with("wait: "), "{err}");
    }

    fn status(version: u64) -> Arc<DriverStatus> {
        Arc::new(DriverStatus {
            version,
            ..Default::default()
        })
    }

    fn poll(after: u64, secs: u64) -> Option<LongPoll> {
        Some(LongPoll {
            after,
            wait: Duration::from_secs(secs),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn answers_at_once_unless_the_version_is_the_one_held() {
        let (_tx, rx) = watch::channel(status(4));
        let never = CancellationToken::new();
        let start = tokio::time::Instant::now();
        assert_eq!(Sources::new(None, Some(rx.clone())).wait(None, &never).await, 4);
        assert_eq!(Sources::new(None, Some(rx.clone())).wait(poll(3, 30), &never).await, 4);
        // A version from before a restart: the new process answers at once.
        assert_eq!(Sources::new(None, Some(rx)).wait(poll(9, 30), &never).await, 4);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_next_publication() {
        let (tx, rx) = watch::channel(status(4));
        let never = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let waiting = tokio::spawn(async move { Sources::new(None, Some(rx)).wait(poll(4, 30), &never).await });
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send_replace(status(5));
        assert_eq!(waiting.await.unwrap(), 5);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_runs_out_shutdown_ends_it_and_a_closed_source_does_not_spin() {
        let (tx, rx) = watch::channel(status(4));
        let never = CancellationToken::new();
        let start = tokio::time::Instant::now();
        assert_eq!(Sources::new(None, Some(rx.clone())).wait(poll(4, 2), &never).await, 4);
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        let stop = CancellationToken::new();
        let waiting = {
            let (rx, stop) = (rx.clone(), stop.clone());
            tokio::spawn(async move { Sources::new(None, Some(rx)).wait(poll(4, 30), &stop).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        assert_eq!(waiting.await.unwrap(), 4);
        assert_eq!(start.elapsed(), Duration::from_secs(3));

        drop(tx);
        assert_eq!(Sources::new(None, Some(rx)).wait(poll(4, 10), &never).await, 4);
        assert_eq!(start.elapsed(), Duration::from_secs(13));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_of_the_git_status_ends_a_wait_with_the_version_as_it_is() {
        let (_driver_tx, driver) = watch::channel(status(4));
        let (git_tx, git) = watch::channel(GitStatus::default());
        let never = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let waiting = tokio::spawn(async move {
            Sources::new(None, Some(driver))
                .with_git(Some(git))
                .wait(poll(4, 30), &never)
                .await
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        git_tx.send_modify(|s| s.head_errors.push("groups/a.yaml:1:1: bad".into()));
        assert_eq!(waiting.await.unwrap(), 4);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn either_source_wakes_a_combined_wait() {
        let (fleet_tx, fleet) = watch::channel(Arc::new(FleetSnapshot::default()));
        let (_driver_tx, driver) = watch::channel(status(2));
        let never = CancellationToken::new();
        let waiting =
            tokio::spawn(async move { Sources::new(Some(fleet), Some(driver)).wait(poll(2, 30), &never).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        fleet_tx.send_replace(Arc::new(FleetSnapshot {
            version: 1,
            ..Default::default()
        }));
        assert_eq!(waiting.await.unwrap(), 3);
    }
}
