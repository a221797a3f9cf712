//! Argument checks of `serve` through the real binary: values that would make
//! the server spin, panic or refuse everything are usage errors.

use std::time::Duration;

use tokio::process::Command;

use crate::common::process::output_within;

/// Refusing takes no time; a server that starts instead is killed after this.
const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `serve` with `extra` and returns its exit code and stderr; a server
/// that starts instead of refusing is killed and fails the test.
async fn serve_with(extra: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_opamp-gitops"));
    command
        .args(["serve", "--opamp-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .args(extra);
    let out = output_within(&mut command, DEADLINE).await;
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn zero_intervals_and_a_tiny_message_limit_are_usage_errors() {
    let cases = [
        ("--reconcile-tick", "0s", "must be greater than zero"),
        ("--heartbeat-interval", "0", "must be greater than zero"),
        ("--poll-interval", "0ms", "must be greater than zero"),
        ("--max-message-bytes", "0", "must be at least 1024 bytes"),
        ("--max-message-bytes", "1023", "must be at least 1024 bytes"),
        ("--max-message-bytes", "lots", "expected a number of bytes"),
    ];
    for (flag, value, message) in cases {
        let (code, stderr) = serve_with(&[flag, value]).await;
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(message),
            "{flag} {value}: {stderr}"
        );
    }
}
