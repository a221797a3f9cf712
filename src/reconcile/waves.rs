//! The canary order of a group's agents and the wave boundaries over it.
//!
//! Agents are ordered by SHA-256 of (group name, instance uid), so the same
//! agents are the canaries of every rollout of a group, on every controller
//! and across restarts. The order of a rollout is fixed when it starts and is
//! stored with it (see [`Members`]); it is never recomputed for members.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::desired::Amount;
use crate::model::{GroupName, InstanceUid};

/// An agent's place in its group's canary order: lower goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OrderKey([u8; 32]);

/// SHA-256 over the group name and the uid bytes, each preceded by its length
/// as a u64 big-endian (unambiguous, like the config hash).
pub fn order_key(group: &GroupName, uid: &InstanceUid) -> OrderKey {
    let mut h = Sha256::new();
    for part in [group.as_str().as_bytes(), uid.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    OrderKey(h.finalize().into())
}

/// Sorts `uids` into the group's canary order (ties, which SHA-256 makes
/// practically impossible, fall back to the uid).
pub fn canary_order(group: &GroupName, uids: Vec<InstanceUid>) -> Vec<InstanceUid> {
    let mut keyed: Vec<(OrderKey, InstanceUid)> = uids.into_iter().map(|u| (order_key(group, &u), u)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, u)| u).collect()
}

/// The cumulative number of agents each wave covers out of `n`: `waves[i].of(n)`,
/// never fewer than the wave before, and the last wave always covers all `n`
/// (validation already demands that; this keeps a bad policy from stranding agents).
pub fn wave_cuts(waves: &[Amount], n: usize) -> Vec<u32> {
    let n32 = u32::try_from(n).unwrap_or(u32::MAX);
    let mut cuts = Vec::with_capacity(waves.len().max(1));
    let mut prev = 0u32;
    for w in waves {
        let c = u32::try_from(w.of(n)).unwrap_or(u32::MAX).clamp(prev, n32);
        cuts.push(c);
        prev = c;
    }
    match cuts.last_mut() {
        Some(last) => *last = n32,
        None => cuts.push(n32),
    }
    cuts
}

/// The agents a rollout counted when it started, with their rank in the canary
/// order. Kept sorted by uid for lookups; stored as the uid list in canary order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<InstanceUid>", into = "Vec<InstanceUid>")]
pub struct Members {
    by_uid: Vec<(InstanceUid, u32)>,
}

impl Members {
    /// `ordered` must already be in canary order.
    pub fn from_order(ordered: Vec<InstanceUid>) -> Self {
        let mut by_uid: Vec<(InstanceUid, u32)> = ordered.into_iter().zip(0u32..).collect();
        by_uid.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        by_uid.dedup_by(|a, b| a.0 == b.0);
        Members { by_uid }
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    /// The member's rank in the canary order (0 first), or `None` for an agent
    /// that was not counted when the rollout started.
    pub fn rank(&self, uid: &InstanceUid) -> Option<u32> {
        self.by_uid
            .binary_search_by(|(u, _)| u.cmp(uid))
            .ok()
            .map(|i| self.by_uid[i].1)
    }

    /// Every member with its rank, in uid order.
    pub fn iter(&self) -> impl Iterator<Item = (&InstanceUid, u32)> {
        self.by_uid.iter().map(|(u, r)| (u, *r))
    }

    /// The member at `rank`, if any (a scan: used once per plan and group).
    pub fn at_rank(&self, rank: u32) -> Option<&InstanceUid> {
        self.by_uid.iter().find(|(_, r)| *r == rank).map(|(u, _)| u)
    }

    /// The uids in canary order.
    pub fn ordered(&self) -> Vec<InstanceUid> {
        let mut v: Vec<&(InstanceUid, u32)> = self.by_uid.iter().collect();
        v.sort_unstable_by_key(|(_, r)| *r);
        v.into_iter().map(|(u, _)| u.clone()).collect()
    }
}

impl From<Vec<InstanceUid>> for Members {
    fn from(ordered: Vec<InstanceUid>) -> Self {
        Members::from_order(ordered)
    }
}

impl From<Members> for Vec<InstanceUid> {
    fn from(m: Members) -> Self {
        m.ordered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> InstanceUid {
        InstanceUid::Uuid([n; 16])
    }

    #[test]
    fn order_is_stable_and_depends_on_group() {
        let g = GroupName::new("gw");
        let uids: Vec<_> = (0..20).map(uid).collect();
        let a = canary_order(&g, uids.clone());
        let mut rev = uids.clone();
        rev.reverse();
        assert_eq!(a, canary_order(&g, rev), "input order does not matter");
        assert_ne!(a, uids, "the order is a hash order, not the uid order");
        let other = canary_order(&GroupName::new("edge"), uids);
        assert_ne!(a, other, "each group has its own canaries");
    }

    #[test]
    fn order_key_is_length_prefixed_sha256() {
        let g = GroupName::new("g");
        let u = uid(1);
        let mut manual = Vec::new();
        manual.extend(1u64.to_be_bytes());
        manual.extend(b"g");
        manual.extend(16u64.to_be_bytes());
        manual.extend([1u8; 16]);
        assert_eq!(order_key(&g, &u).0, <[u8; 32]>::from(Sha256::digest(&manual)));
    }

    #[test]
    fn cuts_are_cumulative_and_end_at_the_whole_group() {
        let w = [
            Amount::Count(1),
            Amount::Percent(10),
            Amount::Percent(50),
            Amount::Percent(100),
        ];
        assert_eq!(wave_cuts(&w, 40), vec![1, 4, 20, 40]);
        assert_eq!(wave_cuts(&w, 3), vec![1, 1, 2, 3]);
        assert_eq!(wave_cuts(&w, 0), vec![0, 0, 0, 0]);
        assert_eq!(wave_cuts(&[Amount::Count(5), Amount::Percent(50)], 4), vec![4, 4]);
        assert_eq!(wave_cuts(&[], 7), vec![7]);
    }

    #[test]
    fn members_rank_and_round_trip() {
        let g = GroupName::new("gw");
        let order = canary_order(&g, (0..10).map(uid).collect());
        let m = Members::from_order(order.clone());
        for (i, u) in order.iter().enumerate() {
            assert_eq!(m.rank(u), Some(i as u32));
            assert_eq!(m.at_rank(i as u32), Some(u));
        }
        assert_eq!(m.rank(&uid(99)), None);
        let json = serde_json::to_string(&m).unwrap();
        let back: Members = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.ordered(), order);
    }
}
