//! Argument checks of `serve` through the real binary: values that would make
//! the server spin, panic or refuse everything are usage errors.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `serve` with `extra` and returns its exit code and stderr; a server
/// that starts instead of refusing is killed and fails the test.
fn serve_with(extra: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"))
        .args(["serve", "--opamp-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve {extra:?} started instead of refusing its arguments");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn zero_intervals_and_a_tiny_message_limit_are_usage_errors() {
    let cases = [
        ("--reconcile-tick", "0s", "must be greater than zero"),
        ("--heartbeat-interval", "0", "must be greater than zero"),
        ("--poll-interval", "0ms", "must be greater than zero"),
        ("--max-message-bytes", "0", "must be at least 1024 bytes"),
        ("--max-message-bytes", "1023", "must be at least 1024 bytes"),
        ("--max-message-bytes", "lots", "expected a number of bytes"),
    ];
    for (flag, value, message) in cases {
        let (code, stderr) = serve_with(&[flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(message),
            "{flag} {value}: {stderr}"
        );
    }
}
