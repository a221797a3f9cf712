//! The outbox: the notices each receiver has not been told yet, one file per
//! notice under `<state-dir>/outbox/<receiver>/`, named by a sequence number
//! that keeps their order. Each is written atomically before the rollout
//! state that follows the event is saved, and removed once delivered, so an
//! event survives a crash until its receiver has it. Blocking.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::notice::Notice;
use crate::durable::{self, FileError};

/// The folder of the state directory that holds the outbox.
pub const DIR: &str = "outbox";

/// A receiver's folder name: its kind and a digest of where it is (the URL
/// may hold a secret, so it is not written out).
pub fn folder(kind: &str, address: &str) -> String {
    let digest = Sha256::digest(address.as_bytes());
    format!("{kind}-{}", hex::encode(&digest[..6]))
}

fn name(seq: u64) -> String {
    // Zero-padded: names sort in sequence order.
    format!("{seq:020}.json")
}

/// Writes one notice for the receiver whose folder is `dir`.
pub fn write(dir: &Path, seq: u64, notice: &Notice) -> Result<(), FileError> {
    let bytes = serde_json::to_vec(notice).expect("a notice always serializes");
    durable::replace(dir, &name(seq), &bytes)
}

/// Removes a delivered (or dropped) notice; one already gone is fine.
pub fn remove(dir: &Path, seq: u64) -> Result<(), FileError> {
    let path = dir.join(name(seq));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FileError {
            action: "removing",
            path,
            source: e,
        }),
        _ => Ok(()),
    }
}

/// What a receiver's folder holds.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Its notices, oldest first.
    pub notices: Vec<(u64, Notice)>,
    /// The highest sequence number in use (unreadable files included).
    pub last_seq: u64,
    /// Files that are no notices, and why; they are left alone.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Reads a receiver's folder; a missing one is empty.
pub fn load(dir: &Path) -> Result<Loaded, FileError> {
    let mut loaded = Loaded::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(loaded),
        Err(source) => {
            return Err(FileError {
                action: "reading",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    for entry in entries {
        let path = entry
            .map_err(|source| FileError {
                action: "reading",
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        // Temporary files of a write a crash interrupted are not notices yet.
        let Some(seq) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        loaded.last_seq = loaded.last_seq.max(seq);
        let notice = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()));
        match notice {
            Ok(notice) => loaded.notices.push((seq, notice)),
            Err(why) => loaded.unreadable.push((path, why)),
        }
    }
    loaded.notices.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(loaded)
}

/// The receivers' folders in the outbox of `state_dir`.
pub fn folders(state_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(state_dir.join(DIR)) else {
        return vec![];
    };
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::payload::tests::halted;

    #[test]
    fn notices_come_back_in_order_until_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR).join(folder("hook", "http://x"));
        assert!(load(&dir).unwrap().notices.is_empty());
        for seq in [3, 1, 12] {
            let n = Notice {
                id: seq.to_string(),
                ..halted()
            };
            write(&dir, seq, &n).unwrap();
        }
        fs::write(dir.join(name(20)), b"{not json").unwrap();
        fs::write(dir.join(format!("{}.tmp", name(21))), b"half").unwrap();
        let loaded = load(&dir).unwrap();
        let ids: Vec<&str> = loaded.notices.iter().map(|(_, n)| n.id.as_str()).collect();
        assert_eq!(ids, ["1", "3", "12"]);
        assert_eq!(
            loaded.notices[0].1,
            Notice {
                id: "1".into(),
                ..halted()
            }
        );
        assert_eq!(loaded.last_seq, 20);
        assert_eq!(loaded.unreadable.len(), 1);
        remove(&dir, 3).unwrap();
        remove(&dir, 3).unwrap();
        let ids: Vec<u64> = load(&dir).unwrap().notices.iter().map(|(s, _)| *s).collect();
        assert_eq!(ids, [1, 12]);
        assert_eq!(folders(tmp.path()), [folder("hook", "http://x")]);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(name(1))).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn folders_do_not_show_the_address() {
        let f = folder("hook", "https://hooks.slack.com/services/T0/B0/secret");
        assert!(f.starts_with("hook-") && !f.contains("secret") && f.len() == 17, "{f}");
        assert_ne!(f, folder("hook", "https://hooks.slack.com/services/T0/B0/other"));
    }
}
