//! Which identity each agent's instance uid is bound to: the first identity
//! (token name, client certificate subject) it reported under. Kept in the
//! state directory (`bindings.json`, readable by its owner only) so a
//! restart does not open a window in which any token may claim any uid.
//! A binding is dropped when its agent is forgotten, and by an operator
//! (`DELETE /api/v1/agents/{uid}/identity`) so the agent can bind afresh.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::InstanceUid;

/// Written at most this often while bindings change (a fleet connecting for
/// the first time binds thousands of uids within seconds).
const WRITE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BindingsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is unreadable ({source}); move it away to let agents bind afresh")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

pub struct Bindings {
    /// Where they are kept; `None`: not kept (no state directory).
    file: Option<PathBuf>,
    bound: HashMap<InstanceUid, Bound>,
    /// Changed since last written.
    dirty: bool,
    written: Option<Instant>,
}

struct Bound {
    name: Arc<str>,
    /// When bound, or read back at start: a binding whose agent is not
    /// known expires the retention after this.
    since: Instant,
}

impl Bindings {
    /// The bindings kept in `file`, if it exists.
    pub fn load(file: Option<PathBuf>, now: Instant) -> Result<Bindings, BindingsError> {
        let mut bound = HashMap::new();
        if let Some(path) = &file {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let kept: BTreeMap<InstanceUid, String> =
                        serde_json::from_slice(&bytes).map_err(|source| BindingsError::Corrupt {
                            path: path.clone(),
                            source,
                        })?;
                    bound = kept
                        .into_iter()
                        .map(|(uid, name)| {
                            let name = Arc::from(name);
                            (uid, Bound { name, since: now })
                        })
                        .collect();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BindingsError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(Bindings {
            file,
            bound,
            dirty: false,
            written: None,
        })
    }

    /// The identity `uid` is bound to.
    pub fn get(&self, uid: &InstanceUid) -> Option<&Arc<str>> {
        self.bound.get(uid).map(|b| &b.name)
    }

    pub fn bind(&mut self, uid: InstanceUid, name: Arc<str>, now: Instant) {
        self.bound.insert(uid, Bound { name, since: now });
        self.dirty = true;
    }

    /// Drops `uid`'s binding; whether it had one.
    pub fn unbind(&mut self, uid: &InstanceUid) -> bool {
        let had = self.bound.remove(uid).is_some();
        self.dirty |= had;
        had
    }

    /// Drops the bindings of agents `known` does not list, once `retention`
    /// has passed since they were made or read back.
    pub fn expire(&mut self, known: impl Fn(&InstanceUid) -> bool, now: Instant, retention: Duration) {
        let before = self.bound.len();
        self.bound
            .retain(|uid, b| known(uid) || now.saturating_duration_since(b.since) <= retention);
        self.dirty |= self.bound.len() < before;
    }

    /// When the bindings should next be written, if they changed.
    pub fn write_due(&self) -> Option<Instant> {
        (self.dirty && self.file.is_some()).then(|| self.written.map_or_else(Instant::now, |w| w + WRITE_EVERY))
    }

    /// The file and its new contents, when due (they count as written).
    pub fn take_write(&mut self, now: Instant) -> Option<(PathBuf, Vec<u8>)> {
        let waiting = self.written.is_some_and(|w| w + WRITE_EVERY > now);
        if !self.dirty || waiting {
            return None;
        }
        self.dirty = false;
        self.written = Some(now);
        let sorted: BTreeMap<&InstanceUid, &str> = self.bound.iter().map(|(u, b)| (u, &*b.name)).collect();
        let bytes = serde_json::to_vec_pretty(&sorted).expect("bindings always serialize");
        Some((self.file.clone()?, bytes))
    }
}

/// Writes bindings taken with [`Bindings::take_write`]; logs a failure (the
/// next change writes them again).
pub fn write(path: &Path, bytes: &[u8]) {
    let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) => (dir, name),
        _ => return tracing::warn!(path = %path.display(), "not a file path for the identity bindings"),
    };
    if let Err(e) = crate::durable::replace(dir, name, bytes) {
        tracing::warn!(error = %e, "writing the agents' identity bindings failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> InstanceUid {
        InstanceUid::from_wire(&[n; 16]).unwrap()
    }

    #[test]
    fn kept_across_a_restart_and_expired_when_their_agent_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bindings.json");
        let t0 = Instant::now();
        let mut b = Bindings::load(Some(file.clone()), t0).unwrap();
        b.bind(uid(1), Arc::from("edge-hosts"), t0);
        b.bind(uid(2), Arc::from("gw-hosts"), t0);
        let (path, bytes) = b.take_write(t0).expect("due at once");
        write(&path, &bytes);
        assert!(b.take_write(t0).is_none(), "written");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

        assert!(b.unbind(&uid(2)));
        assert!(b.take_write(t0).is_none(), "at most once a second");
        let (path, bytes) = b.take_write(t0 + WRITE_EVERY).expect("due a second later");
        write(&path, &bytes);

        let mut b = Bindings::load(Some(file.clone()), t0).unwrap();
        assert_eq!(b.get(&uid(1)).map(|n| &**n), Some("edge-hosts"));
        assert_eq!(b.get(&uid(2)), None, "unbound");
        let hour = Duration::from_secs(3600);
        b.expire(|u| *u == uid(1), t0 + hour * 2, hour);
        assert!(b.get(&uid(1)).is_some(), "its agent is known");
        b.expire(|_| false, t0 + hour * 2, hour);
        assert!(b.get(&uid(1)).is_none(), "expired");

        std::fs::write(&file, "not json").unwrap();
        let err = Bindings::load(Some(file), t0).err().unwrap().to_string();
        assert!(err.contains("move it away"), "{err}");
    }
}
