//! The delivery tasks: one per receiver, each POSTing its outbox oldest
//! first, one notice at a time (so they arrive in order), retrying with
//! backoff what failed, and removing each notice once the receiver took it
//! or refused it for good. The only part of notifications that talks to
//! sockets.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request as HttpRequest, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::payload::{self, Request, USER_AGENT};
use super::{Receiver, Shared, outbox};
use crate::telemetry::InternalEvent;
use crate::telemetry::notify::{Delivered, DeliveryFailed, DeliveryRefused, OutboxFailed};

/// No answer within this long is a failure (retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// What is read of an answer, for the log and the forge's checks.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// What of an answer a log line shows.
const ANSWER_SHOWN: usize = 300;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Delivers every receiver's outbox until cancelled. What is not delivered
/// by then stays in the outbox for the next start.
pub(super) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let client = client();
    let senders = (0..shared.receivers.len()).map(|i| deliver(&shared, &shared.receivers[i], &client, &cancel));
    futures_util::future::join_all(senders).await;
}

/// HTTPS with rustls, trusting the system's certificates (or, on a system
/// without any, the Mozilla roots built in); plain HTTP too.
fn client() -> HttpClient {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = match HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
        Ok(builder) => builder,
        Err(e) => {
            tracing::debug!(error = %e, "no system certificates; trusting the built-in roots");
            HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(provider)
                .expect("ring supports rustls' default protocol versions")
        }
    };
    Client::builder(TokioExecutor::new()).build(tls.https_or_http().enable_http1().build())
}

/// What became of one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Delivered,
    /// Worth another try: no answer, or a 5xx, 408 or 429.
    Retry(String),
    /// Refused for good (another 4xx, a 3xx): sending it again would not help.
    Refused {
        status: u16,
        answer: String,
    },
}

/// Judges an answer (or its absence). `already_set` says whether a
/// refusal means the forge already holds that status.
fn verdict(answer: Result<(u16, Bytes), String>, already_set: impl Fn(u16, &[u8]) -> bool) -> Verdict {
    let (status, body) = match answer {
        Ok(a) => a,
        Err(e) => return Verdict::Retry(e),
    };
    let shown = || payload::truncate(String::from_utf8_lossy(&body).trim().to_string(), ANSWER_SHOWN);
    match status {
        200..=299 => Verdict::Delivered,
        _ if already_set(status, &body) => Verdict::Delivered,
        408 | 429 | 500..=599 => Verdict::Retry(format!("answered {status}: {}", shown())),
        _ => Verdict::Refused {
            status,
            answer: shown(),
        },
    }
}

/// One receiver's loop.
async fn deliver(shared: &Shared, r: &Receiver, client: &HttpClient, cancel: &CancellationToken) {
    let mut delay = shared.backoff.min;
    let host = r.host();
    loop {
        let next = r.queue().front();
        let Some((seq, notice)) = next else {
            tokio::select! {
                () = r.wake.notified() => continue,
                () = cancel.cancelled() => return,
            }
        };
        let attempt = match r.request(&notice, shared.secret.as_deref(), &shared.link) {
            // Nothing to say of it (see `Receiver::wants`): forget it.
            None => None,
            Some(request) => {
                let answer = tokio::select! {
                    answer = send(client, request) => answer,
                    () = cancel.cancelled() => return,
                };
                Some(verdict(answer, |status, body| r.already_set(status, body)))
            }
        };
        let event = notice.event.as_str();
        match attempt {
            None => {}
            Some(Verdict::Delivered) => Delivered {
                receiver: &r.label,
                event,
                id: &notice.id,
            }
            .emit(&shared.metrics),
            Some(Verdict::Refused { status, answer }) => DeliveryRefused {
                receiver: &r.label,
                host: &host,
                event,
                status,
                answer: &answer,
            }
            .emit(&shared.metrics),
            Some(Verdict::Retry(error)) => {
                DeliveryFailed {
                    receiver: &r.label,
                    host: &host,
                    event,
                    error: &error,
                    retry_in: delay,
                }
                .emit(&shared.metrics);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
                delay = shared.backoff.next(delay);
                continue;
            }
        }
        delay = shared.backoff.min;
        r.queue().remove(seq);
        let dir = r.dir.clone();
        let removed = tokio::task::spawn_blocking(move || outbox::remove(&dir, seq)).await;
        if let Ok(Err(error)) = removed {
            OutboxFailed {
                receiver: &r.label,
                error: &error,
            }
            .emit(&shared.metrics);
        }
    }
}

/// POSTs one request; answers the status and (the start of) the body.
async fn send(client: &HttpClient, request: Request) -> Result<(u16, Bytes), String> {
    let mut builder = HttpRequest::post(&request.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, USER_AGENT);
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let http_request = builder
        .body(Full::new(Bytes::from(request.body)))
        .map_err(|e| format!("building the request: {e}"))?;
    let exchange = async {
        let response = client
            .request(http_request)
            .await
            .map_err(|e| crate::errors::with_causes(&e))?;
        let status = response.status().as_u16();
        // A body cut at the limit is still worth showing.
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(REQUEST_TIMEOUT)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let never = |_: u16, _: &[u8]| false;
        let answer = |status: u16, body: &'static str| Ok((status, Bytes::from_static(body.as_bytes())));
        assert_eq!(verdict(answer(200, ""), never), Verdict::Delivered);
        assert_eq!(verdict(answer(201, "{}"), never), Verdict::Delivered);
        assert_eq!(
            verdict(Err("connection refused".into()), never),
            Verdict::Retry("connection refused".into())
        );
        for retried in [500, 502, 503, 408, 429] {
            assert!(
                matches!(verdict(answer(retried, "busy"), never), Verdict::Retry(e) if e == format!("answered {retried}: busy")),
                "{retried}"
            );
        }
        for refused in [400, 401, 404, 422, 301] {
            assert_eq!(
                verdict(answer(refused, " no \n"), never),
                Verdict::Refused {
                    status: refused,
                    answer: "no".into()
                }
            );
        }
        assert_eq!(verdict(answer(400, "set"), |s, _| s == 400), Verdict::Delivered);
    }
}
