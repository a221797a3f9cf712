//! Push webhooks, GitHub style: the `X-Hub-Signature-256` check and what a
//! push payload means for the tracked branch. Pure: no I/O.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`. The comparison takes the same time however many bytes match.
pub fn signature_matches(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The `X-Hub-Signature-256` value for `body`: what a sender computes.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What to do with a webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Fetch: a push to the tracked branch, or a payload that does not say
    /// (a fetch is cheap and changes nothing when nothing moved).
    Fetch,
    /// A push to another ref.
    Ignore { pushed: String },
    /// GitHub's `ping` event when a hook is created.
    Ping,
}

#[derive(serde::Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    pushed: Option<String>,
}

/// Classifies a delivery. `branch` is the tracked branch when known.
pub fn classify(event: Option<&str>, body: &[u8], branch: Option<&str>) -> Delivery {
    if event == Some("ping") {
        return Delivery::Ping;
    }
    let pushed = serde_json::from_slice::<Push>(body).ok().and_then(|p| p.pushed);
    match (pushed, branch) {
        (Some(pushed), Some(branch)) if pushed != format!("refs/heads/{branch}") => Delivery::Ignore { pushed },
        _ => Delivery::Fetch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        // The example from GitHub's webhook documentation.
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, body), expected);
        assert!(signature_matches(secret, body, Some(expected)));
        assert!(!signature_matches(secret, b"Hello, World?", Some(expected)));
        assert!(!signature_matches(b"other", body, Some(expected)));
        assert!(!signature_matches(secret, body, None));
        assert!(!signature_matches(secret, body, Some("sha1=00")));
        assert!(!signature_matches(secret, body, Some("sha256=zz")));
        assert!(!signature_matches(secret, body, Some("sha256=757107ea")));
    }

    #[test]
    fn deliveries() {
        let push = br#"{"ref":"refs/heads/main","after":"abc"}"#;
        assert_eq!(classify(Some("push"), push, Some("main")), Delivery::Fetch);
        assert_eq!(classify(None, push, None), Delivery::Fetch);
        assert_eq!(
            classify(Some("push"), push, Some("dev")),
            Delivery::Ignore {
                pushed: "refs/heads/main".into()
            }
        );
        assert_eq!(
            classify(Some("push"), br#"{"ref":"refs/tags/v1"}"#, Some("main")),
            Delivery::Ignore {
                pushed: "refs/tags/v1".into()
            }
        );
        assert_eq!(classify(Some("ping"), b"{}", Some("main")), Delivery::Ping);
        assert_eq!(classify(None, b"not json", Some("main")), Delivery::Fetch);
    }
}
