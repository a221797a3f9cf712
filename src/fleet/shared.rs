//! Effective configs shared between the agents that report the same one.
//!
//! A fleet runs a handful of configs, and every agent reports the one it
//! runs. Each agent's own copy would cost about a kilobyte (the map and the
//! body); shared, an agent's record holds a pointer.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::record::{AgentRecord, EffectiveFiles};
use crate::desired::ConfigFile;

/// The effective configs some record holds, by a hash of their content.
/// Entries go when no record holds their config any more.
#[derive(Debug, Default)]
pub struct SharedConfigs {
    known: HashMap<u64, Weak<EffectiveFiles>>,
    hasher: RandomState,
    /// Entries alive at the last sweep of the dead ones.
    alive: usize,
}

/// Entries are swept once there are this many times as many as were alive
/// at the last sweep: the sweeps cost O(1) per config shared.
const SWEEP_GROWTH: usize = 2;
const SWEEP_AT_LEAST: usize = 64;

impl SharedConfigs {
    /// The config equal to `files` that a record already holds, else `files`
    /// itself, from now on given to the next record that reports it.
    pub fn share(&mut self, files: Arc<EffectiveFiles>) -> Arc<EffectiveFiles> {
        let key = self.hasher.hash_one(&*files);
        if let Some(held) = self.known.get(&key).and_then(Weak::upgrade) {
            // Another config under the same hash keeps its place; this one
            // is simply not shared.
            return if *held == *files { held } else { files };
        }
        // The bodies may be slices of the message they came in: copied, the
        // shared config holds only itself.
        let own: Arc<EffectiveFiles> = Arc::new(
            files
                .iter()
                .map(|(name, f)| {
                    let body = Bytes::copy_from_slice(&f.body);
                    (
                        name.clone(),
                        ConfigFile {
                            content_type: f.content_type.clone(),
                            body,
                        },
                    )
                })
                .collect(),
        );
        self.known.insert(key, Arc::downgrade(&own));
        if self.known.len() >= SWEEP_GROWTH * self.alive.max(SWEEP_AT_LEAST) {
            self.known.retain(|_, held| held.strong_count() > 0);
            self.alive = self.known.len();
        }
        own
    }

    /// Shares `rec`'s effective config when it is not the one `prev` held.
    pub fn share_new(&mut self, rec: &mut AgentRecord, prev: Option<&AgentRecord>) {
        let before = prev.and_then(|p| p.effective_config.as_ref());
        if let Some(files) = rec
            .effective_config
            .take_if(|f| before.is_none_or(|b| !Arc::ptr_eq(f, b)))
        {
            rec.effective_config = Some(self.share(files));
        }
    }

    /// Configs known, alive or not yet swept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(body: &str) -> Arc<EffectiveFiles> {
        Arc::new(EffectiveFiles::from([(
            String::new(),
            ConfigFile {
                content_type: "text/yaml".to_string(),
                body: Bytes::copy_from_slice(body.as_bytes()),
            },
        )]))
    }

    #[test]
    fn records_that_report_the_same_config_hold_one_copy() {
        let mut shared = SharedConfigs::default();
        let a = shared.share(files("a: 1\n"));
        let b = shared.share(files("a: 1\n"));
        let other = shared.share(files("a: 2\n"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(*other, *files("a: 2\n"));
    }

    #[test]
    fn a_config_no_record_holds_is_forgotten() {
        let mut shared = SharedConfigs::default();
        for i in 0..10 * SWEEP_AT_LEAST {
            drop(shared.share(files(&format!("a: {i}\n"))));
        }
        assert!(shared.len() < SWEEP_GROWTH * SWEEP_AT_LEAST, "{} entries", shared.len());
        let held = shared.share(files("kept: 1\n"));
        for i in 0..10 * SWEEP_AT_LEAST {
            drop(shared.share(files(&format!("b: {i}\n"))));
        }
        assert!(Arc::ptr_eq(&held, &shared.share(files("kept: 1\n"))));
    }

    #[test]
    fn only_a_new_effective_config_is_looked_up() {
        let mut shared = SharedConfigs::default();
        let uid = crate::model::InstanceUid::Uuid([1; 16]);
        let mut prev = AgentRecord::new(
            uid,
            crate::model::Transport::WebSocket,
            std::time::SystemTime::UNIX_EPOCH,
        );
        prev.effective_config = Some(shared.share(files("a: 1\n")));

        let mut rec = prev.clone();
        rec.effective_config = Some(files("a: 1\n"));
        shared.share_new(&mut rec, Some(&prev));
        assert!(Arc::ptr_eq(
            rec.effective_config.as_ref().unwrap(),
            prev.effective_config.as_ref().unwrap()
        ));

        let mut unchanged = rec.clone();
        let mut fresh = SharedConfigs::default();
        fresh.share_new(&mut unchanged, Some(&rec));
        assert_eq!(fresh.len(), 0, "a config the record held before is not looked up");
    }
}
