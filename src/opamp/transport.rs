//! The `/v1/opamp` endpoint: WebSocket upgrades (routed on the `Upgrade`
//! header, whatever the Content-Type) and plain-HTTP POSTs, each handed to
//! [`super::session`].

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::context::OpampContext;
use super::session;

/// The OpAMP path agents connect to.
pub const OPAMP_PATH: &str = "/v1/opamp";
/// The WebSocket layer's read buffer per connection. Small on purpose: an
/// idle agent should cost little; larger messages grow it while they last.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Room for the varint header and framing around the largest message.
const WS_FRAMING: usize = 64;

/// The router serving `/v1/opamp`.
pub fn router(ctx: OpampContext) -> Router {
    Router::new().route(OPAMP_PATH, any(endpoint)).with_state(ctx)
}

fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
}

async fn endpoint(State(ctx): State<OpampContext>, req: Request) -> Response {
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
            .on_upgrade(move |socket| async move {
                session::run_websocket(socket, ctx).await;
                drop(token);
            });
    }
    if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        return session::handle_http(&ctx, &parts.headers, body).await;
    }
    (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response()
}
