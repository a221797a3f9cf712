//! Bearer tokens for agents and operators, from a YAML file of names and
//! SHA-256 hashes (the file never holds a token itself), read again when it
//! changes: a token removed from the file is refused from the next request
//! on, with no restart.
//!
//! ```yaml
//! - name: edge-hosts                 # who the token is: logged, recorded in notes
//!   sha256: 9f86d081884c7d659a2f…    # hex SHA-256 of the token
//!   scope: write                     # operators: read or write (default: read)
//!   groups: [edge-gateways]          # agents: the only groups they may join (default: any)
//! ```

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::{GroupName, Identity};

/// What an operator token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The inventory, groups and effective configs.
    Read,
    /// Also pause, resume, promote and sync.
    Write,
}

/// One token of a tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub name: Arc<str>,
    hash: [u8; 32],
    pub scope: Scope,
    /// Agents: the only groups the token's agents may join (`None`: any).
    pub groups: Option<Arc<[GroupName]>>,
}

impl Token {
    /// Who an agent presenting this token is.
    pub fn identity(&self) -> Identity {
        Identity {
            name: self.name.clone(),
            groups: self.groups.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    sha256: String,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    scope: Option<Scope>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// The tokens of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens(Vec<Token>);

impl Tokens {
    /// Parses a tokens file's text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Tokens, TokensError> {
        let invalid = |message: String| TokensError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let entries: Vec<Entry> = serde_yaml_ng::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut names = BTreeSet::new();
        let mut tokens = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let at = |m: &str| invalid(format!("entry {} ({:?}): {m}", i + 1, e.name));
            if !names.insert(e.name.clone()) {
                return Err(at("a second token of that name"));
            }
            if e.groups.as_ref().is_some_and(Vec::is_empty) {
                return Err(at(
                    "groups: an empty list lets the token's agents join no group; list groups or remove the key",
                ));
            }
            let hash = hex::decode(e.sha256.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| at("sha256 must be 64 hex digits (sha256sum of the token)"))?;
            tokens.push(Token {
                name: Arc::from(e.name.as_str()),
                hash,
                scope: e.scope.unwrap_or(Scope::Read),
                groups: e.groups.map(|g| g.into_iter().map(GroupName::new).collect()),
            });
        }
        Ok(Tokens(tokens))
    }

    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Tokens::parse(&text, path)
    }

    /// The token `presented` is, if any. Every entry is compared, each in
    /// constant time, so the time taken tells nothing about the tokens.
    pub fn find(&self, presented: &str) -> Option<&Token> {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for token in &self.0 {
            if constant_time_eq(&token.hash, &hash) {
                found = Some(token);
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A tokens file, read again when it changes (the last good version stays
/// when an edit does not parse).
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
    current: Arc<RwLock<Arc<Tokens>>>,
}

impl TokenFile {
    pub fn load(path: PathBuf) -> Result<Self, TokensError> {
        let tokens = Tokens::load(&path)?;
        Ok(TokenFile {
            path,
            current: Arc::new(RwLock::new(Arc::new(tokens))),
        })
    }

    pub fn tokens(&self) -> Arc<Tokens> {
        self.current.read().expect("tokens lock").clone()
    }

    /// Reads the file again; on an error the tokens in use stay.
    pub fn reload(&self) -> Result<(), TokensError> {
        let fresh = Tokens::load(&self.path)?;
        *self.current.write().expect("tokens lock") = Arc::new(fresh);
        Ok(())
    }

    /// Reloads on every change, until the watcher is dropped.
    pub fn watch(&self) -> notify::Result<notify::RecommendedWatcher> {
        let file = self.clone();
        crate::tls::watch_files(std::slice::from_ref(&self.path), move || match file.reload() {
            Ok(()) => tracing::info!(file = %file.path.display(), "tokens reloaded"),
            Err(e) => tracing::warn!(error = %e, "tokens not reloaded; the previous ones stay"),
        })
    }
}

/// Failed attempts per source address: after `max` within `window`, a source
/// is refused without a look at its token until the window has passed.
#[derive(Debug)]
pub struct Failures {
    max: u32,
    window: Duration,
    by_source: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Sources remembered at most; the oldest windows go first beyond it.
const MAX_SOURCES: usize = 65_536;

impl Failures {
    pub fn new(max: u32, window: Duration) -> Self {
        Failures {
            max,
            window,
            by_source: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `source` has failed too often lately.
    pub fn limited(&self, source: IpAddr, now: Instant) -> bool {
        let map = self.by_source.lock().expect("failures lock");
        map.get(&source)
            .is_some_and(|(since, n)| *n >= self.max && now.duration_since(*since) < self.window)
    }

    /// Counts a failed attempt from `source`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        let mut map = self.by_source.lock().expect("failures lock");
        if map.len() >= MAX_SOURCES {
            let window = self.window;
            map.retain(|_, (since, _)| now.duration_since(*since) < window);
        }
        let entry = map.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    #[test]
    fn tokens_are_found_by_their_hash() {
        let text = format!(
            "- {{name: edge, sha256: {}}}\n- {{name: ops, sha256: {}, scope: write}}\n",
            sha("s3cret-edge"),
            sha("s3cret-ops")
        );
        let tokens = Tokens::parse(&text, Path::new("t.yaml")).unwrap();
        let edge = tokens.find("s3cret-edge").unwrap();
        assert_eq!(&*edge.name, "edge");
        assert_eq!(edge.scope, Scope::Read);
        assert_eq!(tokens.find("s3cret-ops").unwrap().scope, Scope::Write);
        assert!(tokens.find("s3cret").is_none());
        assert!(tokens.find("").is_none());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = |text: &str| Tokens::parse(text, Path::new("t.yaml")).unwrap_err().to_string();
        assert_eq!(
            err("- {name: a, sha256: abc}"),
            "t.yaml: entry 1 (\"a\"): sha256 must be 64 hex digits (sha256sum of the token)"
        );
        let twice = format!("- {{name: a, sha256: {0}}}\n- {{name: a, sha256: {0}}}", sha("x"));
        assert_eq!(err(&twice), "t.yaml: entry 2 (\"a\"): a second token of that name");
        assert!(err("- {name: a, token: x}").contains("unknown field `token`"));
        let none = format!("- {{name: a, sha256: {}, groups: []}}", sha("x"));
        assert!(err(&none).contains("groups: an empty list lets the token's agents join no group"));
        let limited = format!("- {{name: a, sha256: {}, groups: [edge, apps]}}", sha("x"));
        let tokens = Tokens::parse(&limited, Path::new("agents.yaml")).unwrap();
        let identity = tokens.find("x").unwrap().identity();
        assert!(identity.may_join(&GroupName::new("apps")));
        assert!(!identity.may_join(&GroupName::new("gateways")));
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn sources_that_fail_too_often_wait_out_the_window() {
        let f = Failures::new(3, Duration::from_secs(60));
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!f.limited(a, t0));
            f.failed(a, t0);
        }
        assert!(f.limited(a, t0));
        assert!(!f.limited(b, t0), "another source is not affected");
        assert!(!f.limited(a, t0 + Duration::from_secs(61)), "the window passes");
    }
}
