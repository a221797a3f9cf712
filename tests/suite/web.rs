//! The web view in a real browser: headless Chromium on the page the
//! controller serves at `/`, a real git repository and simulated agents.
//! Every step waits for the page to show something; nothing reloads the
//! page except where a test says so.

use crate::common;

use std::path::PathBuf;

use common::TestServer;
use common::browser::Browser;
use common::gitops::{GitRepo, collector_config, edge_hash, fleet_yaml, group_yaml, serve_config, simulate, state_dir};

const AGENTS: usize = 12;

/// Where the screenshots the docs show are written.
fn docs(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs").join(file)
}

fn edge_files<'a>(policy: &'a str, config: &'a str) -> [(&'static str, String); 3] {
    [
        ("fleet.yaml", fleet_yaml("1h")),
        ("groups/edge.yaml", group_yaml(policy)),
        ("configs/edge.yaml", config.to_string()),
    ]
}

fn commit(repo: &GitRepo, author: (&str, &str), policy: &str, config: &str, message: &str) -> String {
    let files = edge_files(policy, config);
    let files: Vec<(&str, &str)> = files.iter().map(|(p, b)| (*p, b.as_str())).collect();
    repo.commit_by(author, &files, message).to_string()
}

const ALICE: (&str, &str) = ("Alice Example", "alice@example.com");
const BOB: (&str, &str) = ("Bob Example", "bob@example.com");
const CAROL: (&str, &str) = ("Carol Example", "carol@example.com");

/// The text of the overview's row of `group`, when it shows `text`.
fn row_with(group: &str, text: &str) -> String {
    format!(
        "[...document.querySelectorAll('#groups tbody tr')].map(r => r.innerText).find(t => t.startsWith({g}) && t.includes({t})) || null",
        g = serde_json::json!(group),
        t = serde_json::json!(text),
    )
}

#[tokio::test]
async fn the_web_view_follows_rollouts_halts_controls_agents_and_history() {
    let repo = GitRepo::new();
    let v1 = collector_config("v1");
    let first = commit(&repo, ALICE, "  waves: [100%]\n  bake: 0s\n", &v1, "first config");
    let (_tmp, state) = state_dir();
    let server = TestServer::start_with(serve_config(repo.path(), &state)).await;
    let (_sim, stop) = simulate(&server, AGENTS, |c| c.fail_if_contains = Some("BREAK-ME".into()));
    let h1 = edge_hash(&v1).to_string();
    server
        .wait_group("edge", "v1 everywhere", |g| {
            g["config_hash"] == h1.as_str() && g["agents"]["applied"] == AGENTS
        })
        .await;

    let mut browser = Browser::launch().await;
    let base = format!("http://{}", server.api_addr());
    browser.goto(&format!("{base}/")).await;

    // The overview lists the group, its selector, phase and agents.
    let row = browser
        .wait_for("the edge group complete", &row_with("edge", "complete"))
        .await;
    let row = row.as_str().unwrap_or_default().to_string();
    assert!(row.contains("service.name=otelcol-sim"), "the selector: {row}");
    assert!(row.contains(&format!("{AGENTS} applied")), "the counts: {row}");
    assert!(row.contains("first config"), "the commit's subject: {row}");
    let counts = browser.wait_text("#state-counts", "in sync: ").await;
    assert!(counts.contains(&format!("in sync: {AGENTS}")), "{counts}");
    assert!(
        counts.contains("unmanaged: 0") && counts.contains("unsupported: 0"),
        "{counts}"
    );
    browser.wait_text("main", &first[..12]).await;

    // A change rolls out in waves; the page follows it without a reload
    // (the marker set on this page's window survives).
    browser.eval("window.__sameLoad = true").await;
    let v2 = collector_config("v2");
    let policy = "  waves: [1, 50%, 100%]\n  bake: 1500ms\n";
    commit(&repo, BOB, policy, &v2, "v2 in three waves");
    server.sync().await;
    let wave1 = browser.wait_for("wave 1 of 3", &row_with("edge", "wave 1 of 3")).await;
    assert!(wave1.as_str().unwrap_or_default().contains("progressing"), "{wave1}");
    assert!(
        wave1.as_str().unwrap_or_default().contains("v2 in three waves"),
        "{wave1}"
    );
    browser.wait_for("wave 2 of 3", &row_with("edge", "wave 2 of 3")).await;
    browser.wait_for("wave 3 of 3", &row_with("edge", "wave 3 of 3")).await;
    let done = browser.wait_for("v2 complete", &row_with("edge", "complete")).await;
    assert!(
        done.as_str().unwrap_or_default().contains("Bob Example"),
        "the author: {done}"
    );
    assert_eq!(
        browser.eval("window.__sameLoad === true").await,
        true,
        "the page was not reloaded"
    );
    browser.screenshot(&docs("web-overview.png")).await;

    // A commit the agents refuse halts at the canary; the group page shows
    // the failing agent's error.
    let bad = collector_config("BREAK-ME");
    commit(
        &repo,
        CAROL,
        "  waves: [1, 100%]\n  bake: 100ms\n  max_failures: 0\n  on_failure: hold\n",
        &bad,
        "a config the agents refuse",
    );
    server.sync().await;
    browser.wait_for("halted", &row_with("edge", "halted")).await;
    browser.click("#groups a[href='#/groups/edge']").await;
    browser.wait_text("#phase", "halted").await;
    let failures = browser.wait_text("#failures", "refusing to start").await;
    assert!(failures.contains("BREAK-ME"), "the agent's error: {failures}");
    let diff = browser.wait_text("#diff pre", "BREAK-ME").await;
    assert!(
        diff.contains("+") && diff.contains("v2"),
        "the diff from stable v2: {diff}"
    );
    browser.screenshot(&docs("web-halted.png")).await;

    // The agents table filters to the failed agents, on the server.
    browser.goto(&format!("{base}/#/agents")).await;
    browser
        .wait_text("#agents-total", &format!("{AGENTS} agents match"))
        .await;
    browser
        .eval("document.querySelector('#f-state').value = 'failed'; document.querySelector('#f-state').dispatchEvent(new Event('change'))")
        .await;
    let total = browser.wait_text("#agents-total", "1 agents match").await;
    assert!(total.contains("page 1 of 1"), "{total}");
    let states = browser
        .eval("[...document.querySelectorAll('#agent-table tbody tr td:nth-child(3)')].map(td => td.innerText)")
        .await;
    assert_eq!(states, serde_json::json!(["failed"]), "only the failed agent");
    assert!(
        browser
            .eval("location.hash")
            .await
            .as_str()
            .unwrap_or_default()
            .contains("state=failed")
    );

    // Pause and resume from the group page change the phase.
    let v3 = collector_config("v3");
    commit(
        &repo,
        ALICE,
        "  waves: [1, 100%]\n  bake: 1h\n",
        &v3,
        "v3 baking for an hour",
    );
    server.sync().await;
    browser.goto(&format!("{base}/#/groups/edge")).await;
    browser.wait_text("#phase", "progressing").await;
    browser.click("#controls button[data-action=pause]").await;
    browser.wait_text("#phase", "paused").await;
    assert_eq!(
        server
            .wait_group("edge", "paused", |g| g["rollout"]["phase"] == "paused")
            .await["rollout"]["phase"],
        "paused"
    );
    browser.click("#controls button[data-action=resume]").await;
    browser.wait_text("#phase", "progressing").await;

    // The history lists the commits with their authors and outcomes.
    browser.goto(&format!("{base}/#/history")).await;
    let history = browser.wait_text("#history-table", "v3 baking for an hour").await;
    for text in [
        "Alice Example",
        "Bob Example",
        "Carol Example",
        "first config",
        "a config the agents refuse",
    ] {
        assert!(history.contains(text), "{text} in the history: {history}");
    }
    assert!(
        history.contains("edge: ✗halted") || history.contains("halted"),
        "{history}"
    );
    browser
        .click(&format!("#history-table a[href='#/history/{first}']"))
        .await;
    let note = browser.wait_text("#note-text", "opamp-gitops").await;
    assert!(note.contains(&first), "the note of the first commit: {note}");

    browser.close().await;
    stop.cancel();
    server.stop().await;
}

/// Types `token` into the page's token form and submits it.
async fn enter_token(browser: &mut Browser, token: &str) {
    browser
        .wait_for(
            "the token form",
            "document.querySelector('#token-form').hidden === false || null",
        )
        .await;
    browser
        .eval(&format!(
            "document.querySelector('#token').value = {}; document.querySelector('#token-form').requestSubmit()",
            serde_json::json!(token)
        ))
        .await;
}

/// With API tokens, at a phone's width: the page asks for a token, a
/// read-only token sees no controls once a control is refused, a write token
/// pauses; the page fits the screen; after the controller restarts the page
/// follows it again.
#[tokio::test]
async fn the_web_view_asks_for_a_token_fits_a_phone_and_follows_a_restarted_controller() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api.yaml");
    let sha = |t: &str| hex::encode(sha2::Sha256::digest(t.as_bytes()));
    std::fs::write(
        &tokens,
        format!(
            "- {{name: viewer, sha256: {}}}\n- {{name: ops, sha256: {}, scope: write}}\n",
            sha("view-secret"),
            sha("ops-secret")
        ),
    )
    .unwrap();
    let repo = GitRepo::new();
    commit(
        &repo,
        ALICE,
        "  waves: [100%]\n  bake: 0s\n",
        &collector_config("v1"),
        "v1",
    );
    let (_tmp, state) = state_dir();
    let api_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = || {
        let mut c = serve_config(repo.path(), &state);
        c.api_tokens = Some(tokens.clone());
        c.api_listen = ([127, 0, 0, 1], api_port).into();
        c
    };
    let server = TestServer::start_with(config()).await;
    let (_sim, stop) = simulate(&server, 4, |_| {});
    commit(
        &repo,
        BOB,
        "  waves: [1, 100%]\n  bake: 1h\n",
        &collector_config("v2"),
        "v2 baking",
    );
    let auth = [("Authorization", "Bearer ops-secret")];
    let synced = common::http_request(server.api_addr(), "POST", "/api/v1/sync", &auth, common::Body::Empty).await;
    assert_eq!(synced.status, 200);

    let mut browser = Browser::launch().await;
    browser.viewport(390, 844).await;
    let base = format!("http://{}", server.api_addr());
    browser.goto(&format!("{base}/#/groups/edge")).await;
    let why = browser.wait_text("#token-why", "token").await;
    assert!(why.contains("API token"), "{why}");
    enter_token(&mut browser, "view-secret").await;
    browser.wait_text("#phase", "progressing").await;

    // A read-only token: the refused control hides the controls.
    browser.click("#controls button[data-action=pause]").await;
    browser.wait_text("main", "Read-only").await;
    assert_eq!(browser.eval("document.querySelector('#controls').hidden").await, true);

    // The page fits a phone's width: nothing scrolls sideways.
    let fits = browser
        .eval("document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(fits, true, "the group page is wider than the phone");

    // A write token pauses the rollout.
    browser.click("#token-open").await;
    enter_token(&mut browser, "ops-secret").await;
    browser.goto(&format!("{base}/#/")).await;
    browser.goto(&format!("{base}/#/groups/edge")).await;
    browser
        .wait_for(
            "the controls",
            "document.querySelector('#controls').hidden === false || null",
        )
        .await;
    browser.click("#controls button[data-action=pause]").await;
    browser.wait_text("#phase", "paused").await;
    let status = server.running.driver.as_ref().expect("a driver").status();
    let actions = &status.groups[&opamp_gitops::model::GroupName::new("edge")].actions;
    assert_eq!(actions.last().and_then(|a| a.by.as_deref()), Some("ops"), "{actions:?}");

    // The controller restarts: the page says so, then follows the new one.
    browser.wait_text("#live", "live").await;
    server.stop().await;
    browser.wait_text("#live", "disconnected").await;
    let server = TestServer::start_with(config()).await;
    browser.wait_text("#live", "live: following").await;
    browser.wait_text("#phase", "paused").await;

    browser.close().await;
    stop.cancel();
    server.stop().await;
}
