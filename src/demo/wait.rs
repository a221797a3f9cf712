//! How the tour waits for the controller: a condition is looked at again each
//! time the driver publishes its status (after every plan) or the fleet a
//! snapshot, never on a timer of its own; every wait has a deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::DemoError;
use crate::api::wait::published;
use crate::driver::DriverStatus;
use crate::fleet::FleetSnapshot;

/// What the controller publishes, to wake on.
pub struct Published {
    status: watch::Receiver<Arc<DriverStatus>>,
    fleet: watch::Receiver<Arc<FleetSnapshot>>,
}

impl Published {
    pub fn new(status: watch::Receiver<Arc<DriverStatus>>, fleet: watch::Receiver<Arc<FleetSnapshot>>) -> Self {
        Published { status, fleet }
    }

    /// Calls `check` now and after each publication until it answers; after
    /// `within`, a timeout naming what was expected and what `seen` says
    /// was there instead.
    pub async fn until<T>(
        &mut self,
        within: Duration,
        expected: &str,
        mut check: impl FnMut() -> Option<T>,
        seen: impl FnOnce() -> String,
    ) -> Result<T, DemoError> {
        let deadline = Instant::now() + within;
        loop {
            // Seen before looking: what is published meanwhile wakes the wait below.
            self.status.mark_unchanged();
            self.fleet.mark_unchanged();
            if let Some(t) = check() {
                return Ok(t);
            }
            if tokio::time::timeout_at(deadline, self.next()).await.is_err() {
                return Err(DemoError::Timeout {
                    expected: expected.to_string(),
                    after: within,
                    seen: seen(),
                });
            }
        }
    }

    /// Waits until the driver has planned twice once `d` has passed: plans
    /// run one at a time, so the second started after `d`, and what it
    /// shows is what the controller made of all that time.
    pub async fn let_pass(&mut self, d: Duration, within: Duration) -> Result<(), DemoError> {
        let until = Instant::now() + d;
        let status = self.status.clone();
        let mut past: Option<u64> = None;
        self.until(
            d + within,
            &format!("the controller to plan after {}", humantime::format_duration(d)),
            || {
                let version = status.borrow().version;
                match past {
                    None if Instant::now() >= until => past = Some(version),
                    Some(v) if version >= v + 2 => return Some(()),
                    _ => {}
                }
                None
            },
            || "no plan".to_string(),
        )
        .await
    }

    /// The next publication of either (never, once both have closed).
    async fn next(&mut self) {
        tokio::select! {
            () = published(Some(&mut self.status)) => {}
            () = published(Some(&mut self.fleet)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels() -> (
        watch::Sender<Arc<DriverStatus>>,
        watch::Sender<Arc<FleetSnapshot>>,
        Published,
    ) {
        let (status_tx, status) = watch::channel(Arc::new(DriverStatus::default()));
        let (fleet_tx, fleet) = watch::channel(Arc::new(FleetSnapshot::default()));
        (status_tx, fleet_tx, Published::new(status, fleet))
    }

    fn plan(tx: &watch::Sender<Arc<DriverStatus>>) {
        let version = tx.borrow().version + 1;
        tx.send_replace(Arc::new(DriverStatus {
            version,
            ..Default::default()
        }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_deadline_saying_what_was_expected() {
        let (_status, _fleet, mut published) = channels();
        let mut checks = 0;
        let err = published
            .until(
                Duration::from_secs(10),
                "the rollout to halt",
                || {
                    checks += 1;
                    None::<()>
                },
                || "phase progressing".to_string(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected the rollout to halt within 10s; it did not happen.\nLast seen:\nphase progressing"
        );
        assert_eq!(checks, 1, "nothing was published: nothing to look at again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_looks_again_at_each_publication_and_answers_once_the_condition_holds() {
        let (status, fleet, mut published) = channels();
        let publisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            plan(&status);
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.send_replace(Arc::new(FleetSnapshot::default()));
            tokio::time::sleep(Duration::from_secs(1)).await;
            plan(&status);
            (status, fleet)
        });
        let start = Instant::now();
        let mut checks = 0;
        let got = published
            .until(
                Duration::from_secs(10),
                "three looks",
                || {
                    checks += 1;
                    (checks == 3).then_some(checks)
                },
                String::new,
            )
            .await
            .unwrap();
        assert_eq!(got, 3);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "woken by the plan, then the fleet"
        );
        publisher.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn letting_time_pass_ends_with_the_second_plan_after_it() {
        let (status, _fleet, mut published) = channels();
        let start = Instant::now();
        let planner = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                plan(&status);
            }
        });
        published
            .let_pass(Duration::from_millis(450), Duration::from_secs(5))
            .await
            .unwrap();
        // The first plan seen past 450 ms is at 500; two more at 600 and 700.
        assert_eq!(start.elapsed(), Duration::from_millis(700));
        planner.abort();
    }
}
