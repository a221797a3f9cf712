//! A small client for the controller's HTTP API, used by the commands that
//! talk to a running controller (`plan --server`, `rollout`).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// No answer within this long is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Answers larger than this are refused (the agent list of a big fleet fits).
const MAX_BODY_BYTES: usize = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--server {server:?}: {why}")]
    BadServer { server: String, why: &'static str },
    #[error("{method} {url}: {message}")]
    Request {
        method: Method,
        url: String,
        message: String,
    },
}

/// `{server}{path}`, for a server given as `http://host:port` (with or
/// without a trailing slash) or as a bare `host:port`.
pub fn url(server: &str, path: &str) -> Result<Uri, ClientError> {
    let bad = |why| ClientError::BadServer {
        server: server.to_string(),
        why,
    };
    let trimmed = server.trim();
    let rest = match trimmed.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "http" => rest,
            "https" => {
                return Err(bad(
                    "https is not supported; reach the API over http (e.g. through a tunnel)",
                ));
            }
            _ => return Err(bad("expected http://host:port")),
        },
        None => trimmed,
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("expected a host and port"));
    }
    format!("http://{}{path}", rest.trim_end_matches('/'))
        .parse::<Uri>()
        .map_err(|_| bad("not a valid URL"))
}

/// The environment variable holding the API token the commands send, when
/// the controller requires one (`serve --api-tokens`).
pub const TOKEN_ENV: &str = "OPAMP_GITOPS_API_TOKEN";

/// The environment variable naming who acts, for a controller that requires
/// no tokens (else `$USER`).
pub const ACTOR_ENV: &str = "OPAMP_GITOPS_ACTOR";

/// Sends one request with an empty body; answers the status and the body.
/// Carries the token of [`TOKEN_ENV`] when it is set, and the actor of
/// [`ACTOR_ENV`] (or `$USER`).
pub async fn call(method: Method, uri: Uri) -> Result<(StatusCode, Bytes), ClientError> {
    let url = uri.to_string();
    let failed = |message: String| ClientError::Request {
        method: method.clone(),
        url: url.clone(),
        message,
    };
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header(http::header::ACCEPT, "application/json");
    if let Ok(token) = std::env::var(TOKEN_ENV)
        && !token.is_empty()
    {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(actor) = [ACTOR_ENV, "USER"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|a| !a.trim().is_empty()))
    {
        request = request.header(crate::api::auth::ACTOR_HEADER, actor);
    }
    let request = request.body(Empty::new()).map_err(|e| failed(e.to_string()))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| failed(crate::errors::with_causes(&e)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| failed(format!("reading the answer: {e}")))?;
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| {
        failed(format!(
            "no answer within {}",
            humantime::format_duration(REQUEST_TIMEOUT)
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        for (given, want) in [
            ("http://127.0.0.1:4321", "http://127.0.0.1:4321/api/v1/agents"),
            ("http://127.0.0.1:4321/", "http://127.0.0.1:4321/api/v1/agents"),
            ("127.0.0.1:4321", "http://127.0.0.1:4321/api/v1/agents"),
            ("HTTP://ctl.example:80", "http://ctl.example:80/api/v1/agents"),
        ] {
            assert_eq!(url(given, "/api/v1/agents").unwrap().to_string(), want, "{given}");
        }
        for bad in ["https://x:1", "ftp://x", "", "http://", "/path"] {
            assert!(matches!(url(bad, "/x"), Err(ClientError::BadServer { .. })), "{bad}");
        }
    }
}
