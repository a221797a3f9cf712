//! The git source against real repositories made with git2 in temp dirs:
//! local repositories read in place, file:// remotes fetched into a mirror,
//! the sync and webhook endpoints served on 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use git2::{Oid, Repository, Signature};
use opamp_gitops::desired::{ConfigFile, canonical_hash};
use opamp_gitops::gitsrc::notes::{Author, NOTES_REF};
use opamp_gitops::gitsrc::{self, Auth, GitConfig, GitHandle, GitSource, Loaded, RepoLocation, Status};
use opamp_gitops::model::{CommitId, ConfigHash, GroupName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);
const NEVER: Duration = Duration::from_secs(3600);

// ---- repository fixtures ----

fn collector_config(exporter: &str) -> String {
    format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {{}}\nexporters:\n  {exporter}: {{}}\n\
         service:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [{exporter}]\n"
    )
}

const FLEET: &str = "rollout:\n  waves: [1, 50%, 100%]\n  bake: 1s\n";
const GROUP: &str = "description: Edge collectors\nselector:\n  match_attributes:\n    service.name: otelcol\n\
                     config:\n  \"\": configs/edge.yaml\n";
const BAD_GROUP: &str = "selector: {}\nconfig:\n  \"\": configs/missing.yaml\n";

/// A valid repository whose one group `edge` runs `exporter`.
fn valid_files(exporter: &str) -> Vec<(String, String)> {
    vec![
        ("fleet.yaml".into(), FLEET.into()),
        ("groups/edge.yaml".into(), GROUP.into()),
        ("configs/edge.yaml".into(), collector_config(exporter)),
    ]
}

/// The hash the `edge` group must have when it runs `exporter`.
fn edge_hash(exporter: &str) -> ConfigHash {
    let file = ConfigFile {
        content_type: "text/yaml".into(),
        body: Bytes::from(collector_config(exporter)),
    };
    canonical_hash(&BTreeMap::from([(String::new(), file)]))
}

fn under(prefix: &str, files: Vec<(String, String)>) -> Vec<(String, String)> {
    files.into_iter().map(|(p, b)| (format!("{prefix}/{p}"), b)).collect()
}

fn write_tree(repo: &Repository, files: &[(String, String)]) -> Oid {
    let mut dirs: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
    let mut builder = repo.treebuilder(None).unwrap();
    for (path, body) in files {
        match path.split_once('/') {
            Some((dir, rest)) => dirs.entry(dir).or_default().push((rest.to_string(), body.clone())),
            None => {
                let blob = repo.blob(body.as_bytes()).unwrap();
                builder.insert(path, blob, 0o100644).unwrap();
            }
        }
    }
    for (dir, files) in dirs {
        let sub = write_tree(repo, &files);
        builder.insert(dir, sub, 0o040000).unwrap();
    }
    builder.write().unwrap()
}

/// Commits exactly `files` on `branch` (on top of its tip, if any), as a push would.
fn commit(repo: &Repository, branch: &str, files: &[(String, String)], message: &str) -> CommitId {
    let refname = format!("refs/heads/{branch}");
    let parent = repo.find_reference(&refname).ok().map(|r| r.peel_to_commit().unwrap());
    commit_on(repo, branch, files, message, parent.iter().collect())
}

/// Commits `files` with the given parents and moves `branch` there, forced.
fn commit_on(
    repo: &Repository,
    branch: &str,
    files: &[(String, String)],
    message: &str,
    parents: Vec<&git2::Commit<'_>>,
) -> CommitId {
    let tree = repo.find_tree(write_tree(repo, files)).unwrap();
    let sig = Signature::now("Test", "test@example.com").unwrap();
    let oid = repo.commit(None, &sig, &sig, message, &tree, &parents).unwrap();
    repo.reference(&format!("refs/heads/{branch}"), oid, true, message)
        .unwrap();
    CommitId::new(oid.to_string())
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn config(repo: RepoLocation, state_dir: &Path, poll: Duration) -> GitConfig {
    GitConfig {
        repo,
        branch: None,
        subdir: None,
        state_dir: state_dir.to_path_buf(),
        poll_interval: poll,
        auth: Auth::default(),
        webhook_secret_file: None,
    }
}

/// A bare repository standing in for the remote, with one valid commit on `main`.
struct Remote {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    repo: Repository,
    state: PathBuf,
}

impl Remote {
    fn new() -> Remote {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("remote.git");
        let repo = Repository::init_bare(&dir).unwrap();
        repo.set_head("refs/heads/main").unwrap();
        let state = tmp.path().join("state");
        Remote {
            _tmp: tmp,
            dir,
            repo,
            state,
        }
    }

    fn location(&self) -> RepoLocation {
        RepoLocation::Remote(file_url(&self.dir))
    }

    /// Starts a git source on this remote; `tweak` adjusts its config.
    fn spawn(&self, poll: Duration, tweak: impl FnOnce(&mut GitConfig)) -> (GitHandle, CancellationToken) {
        let mut cfg = config(self.location(), &self.state, poll);
        tweak(&mut cfg);
        let cancel = CancellationToken::new();
        (GitSource::spawn(cfg, cancel.clone()).unwrap().0, cancel)
    }
}

/// A remote with one valid commit (`edge` runs `debug`), and a git source
/// that has loaded it.
async fn started(
    poll: Duration,
    tweak: impl FnOnce(&mut GitConfig),
) -> (Remote, CommitId, GitHandle, CancellationToken) {
    let remote = Remote::new();
    let first = commit(&remote.repo, "main", &valid_files("debug"), "first");
    let (handle, cancel) = remote.spawn(poll, tweak);
    assert_eq!(groups(&wait_loaded(&handle, &first).await), edge("debug"));
    (remote, first, handle, cancel)
}

// ---- waiting and HTTP ----

async fn wait_loaded(handle: &GitHandle, commit: &CommitId) -> Arc<Loaded> {
    let mut rx = handle.desired();
    let found = tokio::time::timeout(WAIT, rx.wait_for(|l| l.as_ref().is_some_and(|l| &l.commit == commit)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "commit {commit:?} not loaded in time; status: {:?}",
                handle.status().borrow()
            )
        })
        .unwrap();
    found.clone().unwrap()
}

async fn wait_status(handle: &GitHandle, what: &str, pred: impl FnMut(&Status) -> bool) -> Status {
    let mut rx = handle.status();
    tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("status never showed {what}: {:?}", handle.status().borrow()))
        .unwrap()
        .clone()
}

fn groups(loaded: &Arc<Loaded>) -> Vec<(GroupName, ConfigHash)> {
    loaded
        .desired
        .groups
        .values()
        .map(|g| (g.name.clone(), g.config.hash()))
        .collect()
}

fn edge(exporter: &str) -> Vec<(GroupName, ConfigHash)> {
    vec![(GroupName::new("edge"), edge_hash(exporter))]
}

async fn serve(handle: &GitHandle) -> SocketAddr {
    let app = opamp_gitops::api::git::routes(handle.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// One HTTP/1.1 request; answers the status code and the JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, serde_json::Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(resp).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

// ---- tests ----

#[tokio::test]
async fn local_repository_is_read_in_place_and_watched() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(tmp.path()).unwrap();
    repo.set_head("refs/heads/main").unwrap();
    let first = commit(&repo, "main", &valid_files("debug"), "first");
    // Uncommitted files in the working directory are never read.
    std::fs::create_dir_all(tmp.path().join("configs")).unwrap();
    std::fs::write(tmp.path().join("configs/edge.yaml"), "not: committed\n").unwrap();

    let cancel = CancellationToken::new();
    let cfg = config(RepoLocation::Local(tmp.path().to_path_buf()), tmp.path(), NEVER);
    let handle = GitSource::spawn(cfg, cancel.clone()).unwrap().0;
    let loaded = wait_loaded(&handle, &first).await;
    assert_eq!(groups(&loaded), edge("debug"));
    assert_eq!(loaded.desired.commit.as_ref(), Some(&first));
    assert_eq!(handle.status().borrow().branch.as_deref(), Some("main"));

    // With polling off, the new commit arrives through the ref watch.
    let second = commit(&repo, "main", &valid_files("otlp"), "second");
    let started = std::time::Instant::now();
    let loaded = wait_loaded(&handle, &second).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(groups(&loaded), edge("otlp"));
    assert_eq!(
        handle.desired().borrow().as_ref().map(|l| l.commit.clone()),
        Some(second)
    );
    cancel.cancel();
}

#[tokio::test]
async fn file_remote_is_polled() {
    let (remote, _, handle, cancel) = started(Duration::from_millis(200), |_| {}).await;
    let second = commit(&remote.repo, "main", &valid_files("otlp"), "second");
    assert_eq!(groups(&wait_loaded(&handle, &second).await), edge("otlp"));
    assert!(
        handle.repo_dir().starts_with(&remote.state),
        "the mirror lives in the state dir"
    );
    assert!(Repository::open_bare(handle.repo_dir()).is_ok());
    cancel.cancel();
}

#[tokio::test]
async fn sync_endpoint_answers_the_commit_it_reached() {
    let (remote, _, handle, cancel) = started(NEVER, |_| {}).await;
    let addr = serve(&handle).await;

    let second = commit(&remote.repo, "main", &valid_files("otlp"), "second");
    let (code, body) = http(addr, "POST", "/api/v1/sync", &[], b"").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["commit"], second.as_str());
    assert_eq!(body["valid"], true);
    // The answer comes after the new state is published.
    let now = handle.desired().borrow().clone().unwrap();
    assert_eq!(now.commit, second);
    assert_eq!(groups(&now), edge("otlp"));

    // A sync with nothing new answers the same commit without loading it again.
    let before = handle.metrics();
    let outcome = handle.sync().await.unwrap();
    assert_eq!(outcome.commit, second);
    assert_eq!(handle.metrics().commits_loaded, before.commits_loaded);
    assert_eq!(handle.metrics().fetches, before.fetches + 1);

    assert_eq!(
        handle
            .status()
            .borrow()
            .readiness(std::time::SystemTime::now(), std::time::Duration::from_secs(300)),
        Ok(&second)
    );
    cancel.cancel();
}

#[tokio::test]
async fn webhooks_must_be_signed_and_for_the_tracked_branch() {
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("webhook-secret");
    std::fs::write(&secret_file, "s3cret\n").unwrap();
    let (remote, first, handle, cancel) = started(NEVER, |c| c.webhook_secret_file = Some(secret_file)).await;
    let addr = serve(&handle).await;
    let second = commit(&remote.repo, "main", &valid_files("otlp"), "second");
    let fetches = handle.metrics().fetches;

    let push = br#"{"ref":"refs/heads/main","after":"x"}"#;
    let wrong = gitsrc::webhook::sign(b"other", push);
    let (code, _) = http(
        addr,
        "POST",
        "/api/v1/webhook",
        &[("X-Hub-Signature-256", &wrong)],
        push,
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = http(addr, "POST", "/api/v1/webhook", &[], push).await;
    assert_eq!(code, 401, "a missing signature is refused too");

    let other = br#"{"ref":"refs/heads/feature"}"#;
    let sig = gitsrc::webhook::sign(b"s3cret", other);
    let (code, body) = http(addr, "POST", "/api/v1/webhook", &[("X-Hub-Signature-256", &sig)], other).await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ignored")));
    // Refused and ignored webhooks fetch nothing: the new commit stays unseen.
    let mut status = handle.status();
    let seen = tokio::time::timeout(
        Duration::from_millis(300),
        status.wait_for(|s| s.head.as_ref() == Some(&second)),
    )
    .await;
    assert!(seen.is_err(), "a refused or ignored webhook caused a fetch");
    assert_eq!(handle.metrics().fetches, fetches);
    assert_eq!(handle.desired().borrow().as_ref().unwrap().commit, first);

    let sig = gitsrc::webhook::sign(b"s3cret", push);
    let headers = [("X-Hub-Signature-256", sig.as_str()), ("X-GitHub-Event", "push")];
    let (code, _) = http(addr, "POST", "/api/v1/webhook", &headers, push).await;
    assert_eq!(code, 202);
    assert_eq!(groups(&wait_loaded(&handle, &second).await), edge("otlp"));
    // The same signed delivery sent again is a replay.
    let (code, body) = http(addr, "POST", "/api/v1/webhook", &headers, push).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("this delivery was received before"))
    );
    cancel.cancel();
}

#[tokio::test]
async fn invalid_commit_leaves_the_previous_state_in_force() {
    let (remote, good, handle, cancel) = started(NEVER, |_| {}).await;

    let mut files = valid_files("otlp");
    files.push(("groups/broken.yaml".into(), BAD_GROUP.into()));
    let bad = commit(&remote.repo, "main", &files, "bad");
    let outcome = handle.sync().await.unwrap();
    assert_eq!(outcome.commit, bad);
    assert!(!outcome.valid);
    assert_eq!(outcome.loaded.as_ref(), Some(&good));
    assert!(
        outcome.errors.iter().any(|e| e.contains("configs/missing.yaml")),
        "{:?}",
        outcome.errors
    );
    let loaded = handle.desired().borrow().clone().unwrap();
    assert_eq!((loaded.commit.clone(), groups(&loaded)), (good.clone(), edge("debug")));
    let status = handle.status().borrow().clone();
    assert_eq!(
        (status.head.as_ref(), status.loaded.as_ref()),
        (Some(&bad), Some(&good))
    );
    assert!(status.head_errors.iter().any(|e| e.starts_with("groups/broken.yaml:")));
    // Still ready: a good commit is in force.
    assert_eq!(
        handle
            .status()
            .borrow()
            .readiness(std::time::SystemTime::now(), std::time::Duration::from_secs(300)),
        Ok(&good)
    );

    // A rejected commit is not validated again.
    assert_eq!(handle.metrics().commits_invalid, 1);
    handle.sync().await.unwrap();
    assert_eq!(handle.metrics().commits_invalid, 1);

    let fixed = commit(&remote.repo, "main", &valid_files("otlp"), "fix");
    let outcome = handle.sync().await.unwrap();
    assert!(outcome.valid && outcome.errors.is_empty());
    assert_eq!(groups(&wait_loaded(&handle, &fixed).await), edge("otlp"));
    assert!(handle.status().borrow().head_errors.is_empty());
    cancel.cancel();
}

#[tokio::test]
async fn not_ready_until_a_commit_is_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init_bare(tmp.path().join("r.git")).unwrap();
    repo.set_head("refs/heads/main").unwrap();
    let mut files = valid_files("debug");
    files.push(("groups/broken.yaml".into(), BAD_GROUP.into()));
    let bad = commit(&repo, "main", &files, "bad");
    let cancel = CancellationToken::new();
    let cfg = config(RepoLocation::Local(tmp.path().join("r.git")), tmp.path(), NEVER);
    let handle = GitSource::spawn(cfg, cancel.clone()).unwrap().0;
    wait_status(&handle, "the invalid head", |s| s.head.as_ref() == Some(&bad)).await;
    let reason = handle
        .status()
        .borrow()
        .readiness(std::time::SystemTime::now(), std::time::Duration::from_secs(300))
        .unwrap_err();
    assert!(
        reason.contains("is invalid") && reason.contains("configs/missing.yaml"),
        "{reason}"
    );
    assert!(handle.desired().borrow().is_none());

    // A repository that is not there: the reason names it.
    let cfg = config(RepoLocation::Local(tmp.path().join("nope")), tmp.path(), NEVER);
    let missing = GitSource::spawn(cfg, cancel.clone()).unwrap().0;
    let addr = serve(&missing).await;
    wait_status(&missing, "a fetch error", |s| s.last_fetch_error.is_some()).await;
    let reason = missing
        .status()
        .borrow()
        .readiness(std::time::SystemTime::now(), std::time::Duration::from_secs(300))
        .unwrap_err();
    assert!(reason.contains("opening repository"), "{reason}");
    let (code, body) = http(addr, "POST", "/api/v1/sync", &[], b"").await;
    assert_eq!(code, 502);
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");

    // After cancel the source stops (its status closes) and says so.
    cancel.cancel();
    let mut status = handle.status();
    let stopped = tokio::time::timeout(WAIT, async { while status.changed().await.is_ok() {} }).await;
    assert!(stopped.is_ok(), "the git source did not stop on cancel");
    assert!(matches!(handle.sync().await, Err(gitsrc::SyncError::Stopped)));
}

#[tokio::test]
async fn unreachable_remote_keeps_the_last_state_and_recovers() {
    let (remote, first, handle, cancel) = started(Duration::from_millis(200), |_| {}).await;

    let away = remote.dir.with_file_name("moved-away.git");
    std::fs::rename(&remote.dir, &away).unwrap();
    let status = wait_status(&handle, "a fetch error", |s| s.last_fetch_error.is_some()).await;
    assert!(
        status
            .last_fetch_error
            .as_deref()
            .unwrap()
            .starts_with("fetching file://"),
        "{status:?}"
    );
    assert_eq!(status.loaded.as_ref(), Some(&first));
    assert_eq!(handle.desired().borrow().as_ref().unwrap().commit, first);
    assert!(matches!(handle.sync().await, Err(gitsrc::SyncError::Fetch(_))));
    assert!(handle.metrics().fetch_failures >= 2);

    let moved = Repository::open_bare(&away).unwrap();
    let second = commit(&moved, "main", &valid_files("otlp"), "second");
    std::fs::rename(&away, &remote.dir).unwrap();
    // Recovers on its own, by the backoff retries.
    assert_eq!(groups(&wait_loaded(&handle, &second).await), edge("otlp"));
    wait_status(&handle, "the error cleared", |s| s.last_fetch_error.is_none()).await;
    cancel.cancel();
}

#[tokio::test]
async fn force_push_is_followed() {
    let remote = Remote::new();
    let base = commit(&remote.repo, "main", &valid_files("debug"), "base");
    let old = commit(&remote.repo, "main", &valid_files("otlp"), "old");
    let (handle, cancel) = remote.spawn(NEVER, |_| {});
    wait_loaded(&handle, &old).await;

    // Rewrite history: a new commit on top of `base` replaces `old`.
    let base_commit = remote.repo.find_commit(Oid::from_str(base.as_str()).unwrap()).unwrap();
    let rewritten = commit_on(
        &remote.repo,
        "main",
        &valid_files("zipkin"),
        "rewritten",
        vec![&base_commit],
    );
    assert_eq!(handle.sync().await.unwrap().commit, rewritten);
    assert_eq!(groups(&wait_loaded(&handle, &rewritten).await), edge("zipkin"));

    // Back to the old tip: published again without validating it again.
    let loads = handle.metrics().commits_loaded;
    remote
        .repo
        .reference("refs/heads/main", Oid::from_str(old.as_str()).unwrap(), true, "back")
        .unwrap();
    assert_eq!(handle.sync().await.unwrap().commit, old);
    assert_eq!(groups(&wait_loaded(&handle, &old).await), edge("otlp"));
    assert_eq!(handle.metrics().commits_loaded, loads);
    cancel.cancel();
}

#[tokio::test]
async fn path_selects_a_subdirectory() {
    let remote = Remote::new();
    // The root holds something else entirely (an invalid group, if it were read).
    let mut files = under("fleet", valid_files("debug"));
    files.push(("groups/broken.yaml".into(), BAD_GROUP.into()));
    let c = commit(&remote.repo, "main", &files, "subdir");
    for spelling in ["fleet", "./fleet/"] {
        let (handle, _cancel) = remote.spawn(NEVER, |cfg| cfg.subdir = Some(spelling.into()));
        assert_eq!(groups(&wait_loaded(&handle, &c).await), edge("debug"));
    }
    let (other, _cancel) = remote.spawn(NEVER, |cfg| cfg.subdir = Some("elsewhere".into()));
    // A folder the commit lacks is the controller's mistake, not the
    // commit's: an error of the source, no verdict on the commit.
    let status = wait_status(&other, "the missing directory", |s| s.last_fetch_error.is_some()).await;
    let error = status.last_fetch_error.as_deref().unwrap_or_default();
    assert!(error.contains("no directory elsewhere in commit"), "{status:?}");
    assert!(status.head_errors.is_empty(), "{status:?}");
    assert!(other.desired().borrow().is_none());

    // Problems under the subdirectory are named from the repository root.
    let mut broken = under("fleet", valid_files("debug"));
    broken.push(("fleet/groups/broken.yaml".into(), BAD_GROUP.into()));
    let bad = commit(&remote.repo, "main", &broken, "broken under fleet/");
    let (handle, _cancel) = remote.spawn(NEVER, |cfg| cfg.subdir = Some("./fleet/".into()));
    let status = wait_status(&handle, "the invalid commit", |s| s.head.as_ref() == Some(&bad)).await;
    assert!(
        status
            .head_errors
            .iter()
            .all(|e| e.starts_with("fleet/groups/broken.yaml:")),
        "{status:?}"
    );
}

#[tokio::test]
async fn default_branch_is_the_remote_head_or_the_local_head() {
    let remote = Remote::new();
    remote.repo.set_head("refs/heads/trunk").unwrap();
    let on_main = commit(&remote.repo, "main", &valid_files("debug"), "main");
    let on_trunk = commit(&remote.repo, "trunk", &valid_files("otlp"), "trunk");
    let cancel = CancellationToken::new();

    let (handle, _cancel) = remote.spawn(NEVER, |_| {});
    assert_eq!(groups(&wait_loaded(&handle, &on_trunk).await), edge("otlp"));
    assert_eq!(handle.status().borrow().branch.as_deref(), Some("trunk"));

    let (handle, _cancel) = remote.spawn(NEVER, |cfg| cfg.branch = Some("main".into()));
    assert_eq!(groups(&wait_loaded(&handle, &on_main).await), edge("debug"));

    // A local repository follows the branch its HEAD points at.
    let local = RepoLocation::Local(remote.dir.clone());
    let handle = GitSource::spawn(config(local.clone(), &remote.state, NEVER), cancel.clone())
        .unwrap()
        .0;
    wait_loaded(&handle, &on_trunk).await;

    let mut cfg = config(local, &remote.state, NEVER);
    cfg.branch = Some("nope".into());
    let handle = GitSource::spawn(cfg, cancel.clone()).unwrap().0;
    let status = wait_status(&handle, "the missing branch", |s| s.last_fetch_error.is_some()).await;
    assert!(
        status.last_fetch_error.unwrap().contains("branch nope not found"),
        "a missing branch is named"
    );
    cancel.cancel();
}

/// `git http-backend` behind Basic auth: an http remote that wants a token.
async fn serve_smart_http(root: PathBuf) -> SocketAddr {
    use axum::extract::{Request, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};

    // base64("x-access-token:t0ken")
    const EXPECTED: &str = "Basic eC1hY2Nlc3MtdG9rZW46dDBrZW4=";
    async fn cgi(State(root): State<PathBuf>, req: Request) -> Response {
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(EXPECTED) {
            return (StatusCode::UNAUTHORIZED, [("WWW-Authenticate", "Basic realm=\"git\"")]).into_response();
        }
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
        let query = req.uri().query().unwrap_or_default().to_string();
        let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap();
        let mut child = tokio::process::Command::new("git")
            .arg("http-backend")
            .env("GIT_PROJECT_ROOT", &root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("REQUEST_METHOD", method)
            .env("PATH_INFO", path)
            .env("QUERY_STRING", query)
            .env("CONTENT_TYPE", content_type)
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("REMOTE_USER", "x-access-token")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&body).await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        let end = out.stdout.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let mut response = Response::new(axum::body::Body::from(out.stdout[end + 4..].to_vec()));
        for line in String::from_utf8_lossy(&out.stdout[..end]).lines() {
            let (name, value) = line.split_once(": ").unwrap();
            if name.eq_ignore_ascii_case("status") {
                *response.status_mut() = value[..3].parse::<u16>().unwrap().try_into().unwrap();
            } else {
                let name = axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
                response.headers_mut().insert(name, value.parse().unwrap());
            }
        }
        response
    }

    let app = axum::Router::new().fallback(cgi).with_state(root);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn http_remote_takes_a_token_from_a_file() {
    let remote = Remote::new();
    let first = commit(&remote.repo, "main", &valid_files("debug"), "first");
    let addr = serve_smart_http(remote.dir.parent().unwrap().to_path_buf()).await;
    let url = format!("http://{addr}/remote.git");
    let token_file = remote.state.with_file_name("token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let cancel = CancellationToken::new();

    let mut cfg = config(RepoLocation::Remote(url.clone()), &remote.state, NEVER);
    cfg.auth.token_file = Some(token_file.clone());
    let handle = GitSource::spawn(cfg, cancel.clone()).unwrap().0;
    assert_eq!(groups(&wait_loaded(&handle, &first).await), edge("debug"));
    assert_eq!(handle.status().borrow().branch.as_deref(), Some("main"));

    // Notes are written in the mirror and pushed with the same credentials.
    let store = handle.notes_store(Author::default());
    let notes = BTreeMap::from([(first.clone(), "valid: true\n".to_string())]);
    tokio::task::spawn_blocking(move || store.write(&notes))
        .await
        .unwrap()
        .unwrap();
    let pushed = remote
        .repo
        .find_note(Some(NOTES_REF), Oid::from_str(first.as_str()).unwrap())
        .unwrap();
    assert_eq!(pushed.message().unwrap(), "valid: true\n");

    // The file is read on every fetch: a wrong token now fails (without
    // retrying forever), and the right one again recovers.
    std::fs::write(&token_file, "wrong").unwrap();
    let second = commit(&remote.repo, "main", &valid_files("otlp"), "second");
    let err = tokio::time::timeout(WAIT, handle.sync()).await.unwrap().unwrap_err();
    assert!(err.to_string().contains(&format!("fetching {url}")), "{err}");
    std::fs::write(&token_file, "t0ken").unwrap();
    assert_eq!(handle.sync().await.unwrap().commit, second);

    // Without any credentials the reason says what to configure.
    let handle = GitSource::spawn(config(RepoLocation::Remote(url), &remote.state, NEVER), cancel.clone())
        .unwrap()
        .0;
    let status = wait_status(&handle, "a fetch error", |s| s.last_fetch_error.is_some()).await;
    assert!(status.last_fetch_error.unwrap().contains("--git-token-file"));
    cancel.cancel();
}

/// The whole controller on a remote that goes away: `/readyz` and the groups
/// API say the source is stale, with since when, once fetches have failed
/// for longer than allowed, and recover with the remote.
#[tokio::test]
async fn a_stale_repository_shows_in_readiness_and_the_groups_api() {
    let remote = Remote::new();
    commit(&remote.repo, "main", &valid_files("debug"), "first");
    let mut serve = opamp_gitops::app::ServeConfig::local();
    serve.git = Some(config(remote.location(), &remote.state, Duration::from_millis(100)));
    serve.source_stale_after = Duration::from_millis(500);
    let running = opamp_gitops::app::start(serve, CancellationToken::new()).await.unwrap();
    let api = running.api_addr;
    let get = |path: &'static str| http(api, "GET", path, &[], b"");
    let until = |what: &'static str, pred: fn(u16, &serde_json::Value) -> bool| async move {
        tokio::time::timeout(WAIT, async {
            loop {
                let (status, body) = get("/readyz").await;
                if pred(status, &body) {
                    return body;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    };
    until("ready", |s, _| s == 200).await;

    let away = remote.dir.with_file_name("moved-away.git");
    std::fs::rename(&remote.dir, &away).unwrap();
    let body = until("stale", |s, _| s == 503).await;
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the repository has not been read since "),
        "{reason}"
    );
    assert!(
        reason.contains("fetching file://") && reason.ends_with("stays in force"),
        "{reason}"
    );
    let (_, groups) = get("/api/v1/groups").await;
    assert!(groups["source"]["stale_since"].is_string(), "{groups}");
    assert_eq!(
        groups["source"]["stale_since"], groups["source"]["last_success"],
        "{groups}"
    );
    assert_eq!(
        groups["groups"][0]["name"], "edge",
        "the commit in force stays: {groups}"
    );

    std::fs::rename(&away, &remote.dir).unwrap();
    until("ready again", |s, _| s == 200).await;
    let (_, groups) = get("/api/v1/groups").await;
    assert!(groups["source"]["stale_since"].is_null(), "{groups}");
}

/// A revert pushed while a large commit is being validated is loaded at
/// once: the large commit, no longer the tip, is dropped unpublished.
#[tokio::test]
async fn a_revert_does_not_wait_behind_a_large_commit_being_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(tmp.path()).unwrap();
    repo.set_head("refs/heads/main").unwrap();
    let first = commit(&repo, "main", &valid_files("debug"), "first");
    let cancel = CancellationToken::new();
    let cfg = config(RepoLocation::Local(tmp.path().to_path_buf()), tmp.path(), NEVER);
    let handle = GitSource::spawn(cfg, cancel.clone()).unwrap().0;
    wait_loaded(&handle, &first).await;

    // About 6 MB of one mapping: seconds to validate in a test build.
    let mut big = collector_config("debug");
    big.push_str("x-big:\n");
    for i in 0..200_000 {
        big.push_str(&format!("  key_{i:08}: value_{i:08}\n"));
    }
    let mut files = valid_files("debug");
    files[2].1 = big;
    let large = commit(&repo, "main", &files, "large");
    let status = wait_status(&handle, "the large commit to be validated", |s| {
        s.validating.as_ref() == Some(&large)
    })
    .await;
    assert_eq!(status.loaded.as_ref(), Some(&first));

    let mut seen = handle.desired();
    seen.mark_unchanged();
    let revert = commit(&repo, "main", &valid_files("otlp"), "revert");
    let next = tokio::time::timeout(WAIT, seen.changed()).await;
    assert!(next.is_ok(), "nothing was loaded");
    let loaded = seen.borrow_and_update().clone().unwrap();
    assert_eq!(
        loaded.commit, revert,
        "the revert is the next commit in force; the large one never was"
    );
    assert_eq!(groups(&loaded), edge("otlp"));
    assert_ne!(handle.status().borrow().validating.as_ref(), Some(&large));
    cancel.cancel();
}
