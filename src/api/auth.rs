//! Who may call the API. With `serve --api-tokens`, every call but health,
//! readiness and the (signed) webhook needs a bearer token: `read` for the
//! inventory, groups, effective configs and metrics (unless
//! `--api-open-reads`; the web view's files are open, they hold no data),
//! `write` for pause, resume, promote and sync. The token's name is the
//! actor recorded with a control; without tokens, the actor a request claims
//! in `X-Opamp-Gitops-Actor`, or `anonymous`. Whatever the tokens, a
//! state change a browser sends from another origin is refused: a web page
//! must not be able to pause a rollout (a cross-site `text/plain` POST).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error;
use crate::auth::{Scope, TokenFile, bearer};

/// How the API authenticates.
#[derive(Clone, Default)]
pub struct ApiAuth {
    /// `None`: no tokens required.
    pub tokens: Option<TokenFile>,
    /// Reads need no token even when tokens are required.
    pub open_reads: bool,
}

/// The operator a request acts for: the name of its token when tokens are
/// required, else the actor it claims (an extension of every request that
/// passed [`require`]).
#[derive(Clone, Debug, Default)]
pub struct Operator(pub Option<Arc<str>>);

/// Paths that are open whatever the tokens.
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/api/v1/webhook") || super::web::is_web_path(path)
}

/// A browser names the page's origin; a state change from another origin
/// than the API's own is a cross-site request.
fn cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    origin.split_once("://").map(|(_, authority)| authority) != Some(host)
}

/// Without tokens, who a request says it acts for: the `X-Opamp-Gitops-Actor`
/// header (not verified: anyone may claim any name), else `anonymous`.
fn claimed_actor(headers: &HeaderMap) -> Arc<str> {
    headers
        .get(ACTOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|a| !a.is_empty() && a.len() <= 64 && a.chars().all(|c| !c.is_control()))
        .map_or_else(|| Arc::from("anonymous"), Arc::from)
}

/// The header naming the actor when the API requires no tokens.
pub const ACTOR_HEADER: &str = "x-opamp-gitops-actor";

pub async fn require(State(auth): State<ApiAuth>, mut request: Request, next: Next) -> Response {
    let writes = !matches!(*request.method(), Method::GET | Method::HEAD);
    let path = request.uri().path();
    if writes && !open_path(path) && cross_origin(request.headers()) {
        return error(StatusCode::FORBIDDEN, "a state change from another origin is refused");
    }
    let operator = match &auth.tokens {
        None => Operator(Some(claimed_actor(request.headers()))),
        Some(_) if open_path(path) => Operator(None),
        Some(_) if !writes && auth.open_reads => Operator(None),
        Some(tokens) => {
            let presented = bearer(
                request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
            );
            let Some(token) = presented.and_then(|t| tokens.tokens().find(t).cloned()) else {
                let mut answer = error(
                    StatusCode::UNAUTHORIZED,
                    "an API token is required (Authorization: Bearer)",
                );
                answer
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                return answer;
            };
            let needed = if writes { Scope::Write } else { Scope::Read };
            if token.scope < needed {
                return error(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "token {:?} may read but not change anything (scope: write needed)",
                        &*token.name
                    ),
                );
            }
            Operator(Some(token.name))
        }
    };
    request.extensions_mut().insert(operator);
    next.run(request).await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_origin_requests_are_those_a_page_of_another_origin_sends() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        assert!(
            !cross_origin(&headers(&[("host", "127.0.0.1:4321")])),
            "no Origin: not a browser page"
        );
        assert!(!cross_origin(&headers(&[
            ("host", "127.0.0.1:4321"),
            ("origin", "http://127.0.0.1:4321")
        ])));
        assert!(cross_origin(&headers(&[
            ("host", "127.0.0.1:4321"),
            ("origin", "https://evil.example")
        ])));
        assert!(cross_origin(&headers(&[
            ("host", "127.0.0.1:4321"),
            ("origin", "null")
        ])));
    }
}
