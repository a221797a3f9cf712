//! The `/v1/opamp` endpoint: WebSocket upgrades (routed on the `Upgrade`
//! header, whatever the Content-Type) and plain-HTTP POSTs, each handed to
//! [`super::session`].

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::context::{AUTH_FAILURE_WINDOW, OpampContext};
use super::session;
use crate::auth;
use crate::listen::Peer;
use crate::model::Identity;
use crate::telemetry::InternalEvent;
use crate::telemetry::opamp::{AgentRefused, Refusal};

/// The OpAMP path agents connect to.
pub const OPAMP_PATH: &str = "/v1/opamp";
/// The WebSocket layer's read buffer per connection. Small on purpose: an
/// idle agent should cost little; a larger message grows it (to that size).
const WS_READ_BUFFER: usize = 512;
/// Room for the varint header and framing around the largest message.
const WS_FRAMING: usize = 64;

/// The router serving `/v1/opamp`.
pub fn router(ctx: OpampContext) -> Router {
    Router::new().route(OPAMP_PATH, any(endpoint)).with_state(Arc::new(ctx))
}

fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
}

/// Who the connection is: the name of the token it presented, else the
/// subject of its client certificate; or why it is refused.
fn authenticate(ctx: &OpampContext, peer: Option<&Peer>, headers: &HeaderMap) -> Result<Option<Identity>, Refusal> {
    let certificate = peer.and_then(|p| p.certificate.clone()).map(Identity::named);
    let Some(tokens) = &ctx.agent_tokens else {
        return Ok(certificate);
    };
    let source = peer.map(|p| p.addr.ip());
    let now = Instant::now();
    let refuse = |reason: Refusal| {
        AgentRefused { reason, source }.emit(&ctx.metrics);
        reason
    };
    if source.is_some_and(|s| ctx.auth_failures.limited(s, now)) {
        return Err(refuse(Refusal::RateLimited));
    }
    let presented = auth::bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    let Some(presented) = presented else {
        return Err(refuse(Refusal::MissingToken));
    };
    match tokens.tokens().find(presented) {
        Some(token) => Ok(Some(token.identity())),
        None => {
            if let Some(source) = source {
                ctx.auth_failures.failed(source, now);
            }
            Err(refuse(Refusal::InvalidToken))
        }
    }
}

/// The answer to a refused agent: 401 for a missing or unknown token, as
/// OpAMP says; 429 for a source that presented bad tokens too often.
fn refused(reason: Refusal) -> Response {
    let status = match reason {
        Refusal::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::UNAUTHORIZED,
    };
    let retry = AUTH_FAILURE_WINDOW.as_secs().to_string();
    (
        status,
        [
            (header::WWW_AUTHENTICATE, "Bearer".to_string()),
            (header::RETRY_AFTER, retry),
        ],
    )
        .into_response()
}

async fn endpoint(State(ctx): State<Arc<OpampContext>>, req: Request) -> Response {
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0.clone());
    let identity = match authenticate(&ctx, peer.as_ref(), req.headers()) {
        Ok(identity) => identity,
        Err(reason) => return refused(reason),
    };
    if wants_websocket(req.headers()) {
        let (mut parts, _) = req.into_parts();
        let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &ctx).await {
            Ok(u) => u,
            Err(rejection) => return rejection.into_response(),
        };
        let limit = ctx.max_message_bytes.saturating_add(WS_FRAMING);
        let token = ctx.tracker.token();
        return upgrade
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(0)
            .max_write_buffer_size(limit.saturating_mul(2))
            .max_message_size(limit)
            .max_frame_size(limit)
            .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"))
            .on_upgrade(move |socket| session::run_websocket(socket, ctx, identity, token));
    }
    if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        return session::handle_http(&ctx, identity, &parts.headers, body).await;
    }
    (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response()
}
