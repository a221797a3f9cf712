//! What happens to notifications and forge statuses: delivered, retried,
//! refused by the receiver, or dropped from a full outbox. Counted by
//! receiver: the index of its `--notify`, or `forge`.

use std::fmt::Display;

use prometheus_client::metrics::counter::Counter;
use tracing::{debug, error, warn};

use super::{InternalEvent, Labeled, Registry};

const TARGET: &str = "opamp_gitops::notify";

/// The delivery counters, one per receiver.
#[derive(Debug, Clone)]
pub struct NotifyMetrics {
    sent: Labeled<Counter>,
    retries: Labeled<Counter>,
    refused: Labeled<Counter>,
    dropped: Labeled<Counter>,
}

impl NotifyMetrics {
    /// Counters for these receivers (their labels, in order).
    pub fn new(receivers: &[String]) -> Self {
        let labeled = || Labeled::new("receiver", receivers.iter().cloned());
        NotifyMetrics {
            sent: labeled(),
            retries: labeled(),
            refused: labeled(),
            dropped: labeled(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.add(
            "notify_sent",
            "Notifications and commit statuses delivered, by receiver.",
            self.sent.clone(),
        );
        registry.add(
            "notify_retries",
            "Deliveries that failed and will be tried again, by receiver.",
            self.retries.clone(),
        );
        registry.add(
            "notify_refused",
            "Notifications and commit statuses the receiver refused (a 4xx answer); not retried.",
            self.refused.clone(),
        );
        registry.add(
            "notify_dropped",
            "Notifications and commit statuses dropped, oldest first, from an outbox over its bound.",
            self.dropped.clone(),
        );
    }
}

/// A receiver took a notice.
pub struct Delivered<'a> {
    pub receiver: &'a str,
    pub event: &'a str,
    pub id: &'a str,
}

impl InternalEvent for Delivered<'_> {
    type Metrics = NotifyMetrics;

    fn emit(self, m: &NotifyMetrics) {
        m.sent.inc(self.receiver);
        debug!(target: TARGET, receiver = self.receiver, event = self.event, id = self.id, "notification delivered");
    }
}

/// A delivery failed (no answer, or a 5xx, 408 or 429); it is tried again.
pub struct DeliveryFailed<'a> {
    pub receiver: &'a str,
    pub host: &'a str,
    pub event: &'a str,
    pub error: &'a dyn Display,
    pub retry_in: std::time::Duration,
}

impl InternalEvent for DeliveryFailed<'_> {
    type Metrics = NotifyMetrics;

    fn emit(self, m: &NotifyMetrics) {
        m.retries.inc(self.receiver);
        warn!(
            target: TARGET,
            receiver = self.receiver,
            host = self.host,
            event = self.event,
            error = %self.error,
            retry_in = %humantime::format_duration(self.retry_in),
            "delivering a notification failed; will retry"
        );
    }
}

/// The receiver refused a notice for good (a 4xx answer); it is not sent again.
pub struct DeliveryRefused<'a> {
    pub receiver: &'a str,
    pub host: &'a str,
    pub event: &'a str,
    pub status: u16,
    pub answer: &'a str,
}

impl InternalEvent for DeliveryRefused<'_> {
    type Metrics = NotifyMetrics;

    fn emit(self, m: &NotifyMetrics) {
        m.refused.inc(self.receiver);
        error!(
            target: TARGET,
            receiver = self.receiver,
            host = self.host,
            event = self.event,
            status = self.status,
            answer = self.answer,
            "the receiver refused a notification; it is not sent again"
        );
    }
}

/// The outbox of a receiver was over its bound: its oldest notice is dropped.
pub struct NoticeDropped<'a> {
    pub receiver: &'a str,
    pub event: &'a str,
    pub queued: usize,
}

impl InternalEvent for NoticeDropped<'_> {
    type Metrics = NotifyMetrics;

    fn emit(self, m: &NotifyMetrics) {
        m.dropped.inc(self.receiver);
        warn!(
            target: TARGET,
            receiver = self.receiver,
            event = self.event,
            queued = self.queued,
            "outbox full: dropped the receiver's oldest notification"
        );
    }
}

/// An outbox file could not be written or removed: the notice is still
/// sent, but would not survive a restart (or would be sent again after one).
pub struct OutboxFailed<'a> {
    pub receiver: &'a str,
    pub error: &'a dyn Display,
}

impl InternalEvent for OutboxFailed<'_> {
    type Metrics = NotifyMetrics;

    fn emit(self, _: &NotifyMetrics) {
        error!(target: TARGET, receiver = self.receiver, error = %self.error, "the notifications' outbox failed");
    }
}
