//! Headless Chromium driven over the Chrome DevTools Protocol: a real
//! browser process, one page, JavaScript evaluated in it, screenshots.
//! Debian's `chromium` (scripts/install-packages); `CHROMIUM` names another.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64_decode::decode;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a condition on the page may take.
pub const PATIENCE: Duration = Duration::from_secs(45);

pub struct Browser {
    child: Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with a page of 1280×800.
    pub async fn launch() -> Self {
        let program = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(&program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program} (scripts/install-packages installs chromium): {e}"));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let url = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("chromium's stderr") {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_string();
                }
            }
            panic!("chromium exited before it listened for DevTools");
        })
        .await
        .expect("chromium listens for DevTools");
        // Keep reading stderr so that chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("DevTools WebSocket");
        let mut browser = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"})).await;
        let target = target["targetId"].as_str().expect("a target id").to_string();
        let attached = browser
            .call("Target.attachToTarget", json!({"targetId": target, "flatten": true}))
            .await;
        browser.session = attached["sessionId"].as_str().expect("a session").to_string();
        browser.viewport(1280, 800).await;
        browser
    }

    /// Sends a command (to the page once attached) and answers its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("send to chromium");
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium answers {method}"))
                .expect("chromium is connected")
                .expect("a DevTools frame");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] != id {
                continue; // an event, or the answer to an abandoned call
            }
            if let Some(e) = v.get("error") {
                panic!("{method}: {e}");
            }
            return v["result"].clone();
        }
    }

    /// The page's size, as a window that size shows it.
    pub async fn viewport(&mut self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700}),
        )
        .await;
    }

    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Evaluates `expression` in the page (awaiting a promise) and answers its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page (re-evaluated as the
    /// page changes); answers its value. Panics with the page's text when it
    /// does not come.
    pub async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let guarded = format!("(() => {{ try {{ return ({expression}); }} catch (_) {{ return null; }} }})()");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.eval(&guarded).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v.as_str() != Some("") && v.as_u64() != Some(0);
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body ? document.body.innerText : ''").await;
                panic!(
                    "the page never showed {what}; it shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            // The next look at the page; the condition is what is waited on.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element `selector` exists and its text contains `text`.
    pub async fn wait_text(&mut self, selector: &str, text: &str) -> String {
        let expression = format!(
            "(() => {{ const e = document.querySelector({s}); return e && e.innerText.includes({t}) ? e.innerText : null; }})()",
            s = json!(selector),
            t = json!(text),
        );
        let v = self.wait_for(&format!("{text:?} in {selector}"), &expression).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Clicks the element `selector` (it must exist and be shown).
    pub async fn click(&mut self, selector: &str) {
        let expression = format!(
            "(() => {{ const e = document.querySelector({s}); if (!e || e.offsetParent === null) return false; e.click(); return true; }})()",
            s = json!(selector)
        );
        self.wait_for(&format!("a clickable {selector}"), &expression).await;
    }

    /// A PNG of the page as shown, written to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = decode(shot["data"].as_str().expect("PNG data"));
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    pub async fn close(mut self) {
        let _ = self.call("Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Base64 as DevTools sends screenshots (standard alphabet, padded).
mod base64_decode {
    pub fn decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let bytes: Vec<u8> = text
            .bytes()
            .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
            .collect();
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for chunk in bytes.chunks(4) {
            let v: Vec<u32> = chunk.iter().map(|&c| u32::from(value(c))).collect();
            let n = v.iter().enumerate().fold(0u32, |n, (i, x)| n | (x << (18 - 6 * i)));
            let take = chunk.len() - 1;
            out.extend_from_slice(&n.to_be_bytes()[1..=take]);
        }
        out
    }

    #[test]
    fn decodes_padded_and_unpadded() {
        assert_eq!(decode("aGVsbG8="), b"hello");
        assert_eq!(decode("aGk="), b"hi");
        assert_eq!(decode("YWJj"), b"abc");
    }
}
