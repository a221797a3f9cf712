//! The web view: a page, a script and a style sheet compiled into the
//! binary and served at `/` on the API listener. The page reads the JSON
//! API like any other client; nothing here reads the controller's state.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/app.js");
const STYLE: &str = include_str!("web/style.css");

/// Only the controller's own script and style, and calls to its own API.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the web view's files (served without a token:
/// they hold no data, and the page asks for a token itself).
pub fn is_web_path(path: &str) -> bool {
    matches!(path, "/" | "/web/app.js" | "/web/style.css")
}

/// `/`, `/web/app.js` and `/web/style.css`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route(
            "/web/app.js",
            get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/web/style.css",
            get(|| async { file("text/css; charset=utf-8", STYLE) }),
        )
}

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_exactly_the_files_served_and_only_those_are_open() {
        for path in ["/web/app.js", "/web/style.css"] {
            assert!(INDEX.contains(&format!("\"{path}\"")), "the page loads {path}");
            assert!(is_web_path(path));
        }
        assert!(is_web_path("/"));
        assert!(!is_web_path("/web/other.js"));
        assert!(!is_web_path("/api/v1/agents"));
        assert!(
            !INDEX.contains("<script>") && !INDEX.contains("style="),
            "nothing inline: the policy forbids it"
        );
    }
}
