//! What the controller notifies, received for real on 127.0.0.1: a webhook
//! receiver that records every request (and can answer 503 while "down"),
//! and a forge that checks each commit status against the GitHub or GitLab
//! API as documented, refuses anything else, and records what it accepted.
//! Both publish what they record, so tests wait on it rather than poll.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long a test waits for a delivery: a retry may wait out a backoff.
const PATIENCE: Duration = Duration::from_secs(30);

/// One request a receiver took.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub json: serde_json::Value,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct HookState {
    /// What it answers: 200 when `None`.
    failing: Option<StatusCode>,
    delivered: Vec<Delivery>,
    /// Requests answered with the failing status.
    refused: usize,
}

/// A webhook receiver at `http://<addr>/hook`.
pub struct HookReceiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<HookState>>,
    changed: watch::Receiver<u64>,
}

impl HookReceiver {
    pub async fn start() -> Self {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Listens at `addr` (a port chosen before, which refused connections until now).
    pub async fn start_at(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind the receiver");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(HookState::default()));
        let (tx, changed) = watch::channel(0u64);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(take))
            .with_state((state.clone(), Arc::new(tx)));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("the receiver serves") });
        HookReceiver { addr, state, changed }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answers `status` from now on (a receiver that is down); `None`: 200 again.
    pub fn fail_with(&self, status: Option<StatusCode>) {
        self.state.lock().expect("lock").failing = status;
    }

    pub fn refused(&self) -> usize {
        self.state.lock().expect("lock").refused
    }

    pub fn delivered(&self) -> Vec<Delivery> {
        self.state.lock().expect("lock").delivered.clone()
    }

    /// Waits until `pick` finds what it wants among the deliveries so far
    /// (or among the refusals, which it can count with [`HookReceiver::refused`]).
    pub async fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&Self) -> Option<T>) -> T {
        let seen = || {
            format!(
                "received: {:#?}",
                self.delivered().iter().map(|d| &d.json).collect::<Vec<_>>()
            )
        };
        wait_on(&self.changed, what, || pick(self), seen).await
    }
}

/// Checks `pick` again each time `changed` is bumped, until it answers;
/// fails after [`PATIENCE`] saying what was `seen`.
async fn wait_on<T>(
    changed: &watch::Receiver<u64>,
    what: &str,
    mut pick: impl FnMut() -> Option<T>,
    seen: impl Fn() -> String,
) -> T {
    let mut changed = changed.clone();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        changed.mark_unchanged();
        if let Some(found) = pick() {
            return found;
        }
        if !matches!(tokio::time::timeout_at(deadline, changed.changed()).await, Ok(Ok(()))) {
            panic!("timed out waiting for {what}; {}", seen());
        }
    }
}

type HookShared = (Arc<Mutex<HookState>>, Arc<watch::Sender<u64>>);

async fn take(State((state, changed)): State<HookShared>, headers: HeaderMap, body: Bytes) -> Response {
    let answer = {
        let mut s = state.lock().expect("lock");
        match s.failing {
            Some(status) => {
                s.refused += 1;
                status
            }
            None => {
                let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                s.delivered.push(Delivery {
                    headers,
                    body: body.to_vec(),
                    json,
                });
                StatusCode::OK
            }
        }
    };
    changed.send_modify(|n| *n += 1);
    answer.into_response()
}

/// Which forge's API a [`ForgeServer`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeApi {
    GitHub,
    GitLab,
}

/// A commit status the forge accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub sha: String,
    pub state: String,
    /// GitHub's `context`, GitLab's `name`.
    pub context: String,
    pub description: String,
    pub target_url: String,
}

#[derive(Default)]
struct ForgeState {
    accepted: Vec<Status>,
    /// Requests that broke the documented API, and why.
    rejected: Vec<String>,
    /// GitLab: statuses refused because the commit's status already had that state.
    same_state: usize,
}

struct ForgeConfig {
    api: ForgeApi,
    /// GitHub: `owner/repo`; GitLab: the project id as it appears in the path.
    project: String,
    token: String,
}

/// A forge's commit status endpoint, strict about the documented API.
pub struct ForgeServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<ForgeState>>,
    changed: watch::Receiver<u64>,
}

impl ForgeServer {
    pub async fn start(api: ForgeApi, project: &str, token: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the forge");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(ForgeState::default()));
        let (tx, changed) = watch::channel(0u64);
        let config = Arc::new(ForgeConfig {
            api,
            project: project.to_string(),
            token: token.to_string(),
        });
        let app = axum::Router::new()
            .fallback(status)
            .with_state((config, state.clone(), Arc::new(tx)));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("the forge serves") });
        ForgeServer { addr, state, changed }
    }

    /// The API's base URL, as `--forge-api` takes it.
    pub fn url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    pub fn accepted(&self) -> Vec<Status> {
        self.state.lock().expect("lock").accepted.clone()
    }

    pub fn rejected(&self) -> Vec<String> {
        self.state.lock().expect("lock").rejected.clone()
    }

    pub fn same_state(&self) -> usize {
        self.state.lock().expect("lock").same_state
    }

    /// Waits until `pick` finds what it wants among the accepted statuses.
    pub async fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&[Status]) -> Option<T>) -> T {
        let seen = || format!("accepted {:#?}, rejected {:#?}", self.accepted(), self.rejected());
        wait_on(&self.changed, what, || pick(&self.accepted()), seen).await
    }
}

type ForgeShared = (Arc<ForgeConfig>, Arc<Mutex<ForgeState>>, Arc<watch::Sender<u64>>);

/// One status request: checked against the API, recorded, answered as the
/// forge would (201 and the status; 401, 404, 405, 415 or 422 for a bad one;
/// GitLab's 400 for a status set to the state it has).
async fn status(State((config, state, changed)): State<ForgeShared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let answer = match check(&config, &parts.method, parts.uri.path(), &parts.headers, &body) {
        Ok(status) => {
            let mut s = state.lock().expect("lock");
            let last = s
                .accepted
                .iter()
                .rev()
                .find(|x| x.sha == status.sha && x.context == status.context);
            if config.api == ForgeApi::GitLab && last.is_some_and(|l| l.state == status.state) {
                s.same_state += 1;
                let message = format!(
                    "Cannot transition status via :{0} from :{0} (Reason(s): Status cannot transition via \"{0}\")",
                    status.state
                );
                (
                    StatusCode::BAD_REQUEST,
                    axum::Json(serde_json::json!({"message": message})),
                )
                    .into_response()
            } else {
                let echo = serde_json::json!({"id": s.accepted.len() + 1, "state": status.state});
                s.accepted.push(status);
                (StatusCode::CREATED, axum::Json(echo)).into_response()
            }
        }
        Err((code, why)) => {
            state.lock().expect("lock").rejected.push(why.clone());
            (code, axum::Json(serde_json::json!({"message": why}))).into_response()
        }
    };
    changed.send_modify(|n| *n += 1);
    answer
}

fn check(
    config: &ForgeConfig,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Status, (StatusCode, String)> {
    let refuse = |code: StatusCode, why: String| Err((code, why));
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (prefix, states, context_key, auth_ok) = match config.api {
        ForgeApi::GitHub => (
            format!("/api/repos/{}/statuses/", config.project),
            &["pending", "success", "failure", "error"][..],
            "context",
            header("authorization") == Some(&format!("Bearer {}", config.token)),
        ),
        ForgeApi::GitLab => (
            format!("/api/projects/{}/statuses/", config.project),
            &["pending", "running", "success", "failed", "canceled"][..],
            "name",
            header("private-token") == Some(config.token.as_str()),
        ),
    };
    let Some(sha) = path.strip_prefix(&prefix) else {
        return refuse(StatusCode::NOT_FOUND, format!("no such endpoint: {method} {path}"));
    };
    if sha.len() != 40 || !sha.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        return refuse(StatusCode::NOT_FOUND, format!("not a commit: {sha:?}"));
    }
    if method != Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path}"));
    }
    if !auth_ok {
        return refuse(StatusCode::UNAUTHORIZED, format!("bad credentials: {headers:?}"));
    }
    if config.api == ForgeApi::GitHub {
        for (name, want) in [
            ("accept", "application/vnd.github+json"),
            ("x-github-api-version", "2022-11-28"),
        ] {
            if header(name) != Some(want) {
                return refuse(StatusCode::BAD_REQUEST, format!("{name}: {:?}", header(name)));
            }
        }
    }
    if header("user-agent").is_none_or(str::is_empty) {
        return refuse(StatusCode::FORBIDDEN, "no User-Agent".into());
    }
    if header("content-type") != Some("application/json") {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{:?}", header("content-type")),
        );
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return refuse(StatusCode::BAD_REQUEST, "the body is no JSON object".into());
    };
    let fields: BTreeMap<String, serde_json::Value> = fields.into_iter().collect();
    let allowed = ["state", "target_url", "description", context_key];
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("unknown field {unknown}"));
    }
    let text = |key: &str| fields.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let state = text("state").unwrap_or_default();
    if !states.contains(&state.as_str()) {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("state {state:?}"));
    }
    let description = text("description").unwrap_or_default();
    if description.chars().count() > 140 {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("description too long: {description}"),
        );
    }
    let target_url = text("target_url").unwrap_or_default();
    if !(target_url.starts_with("http://") || target_url.starts_with("https://")) {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("target_url {target_url:?}"));
    }
    let context = text(context_key).unwrap_or_default();
    if context.is_empty() {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("no {context_key}"));
    }
    Ok(Status {
        sha: sha.to_string(),
        state,
        context,
        description,
        target_url,
    })
}
