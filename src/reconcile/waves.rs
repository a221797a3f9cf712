//! The canary order of a group's agents and the wave boundaries over it.
//!
//! Agents are ordered by SHA-256 of (group name, instance uid), so the same
//! agents are the canaries of every rollout of a group, on every controller
//! and across restarts. The order of a rollout is fixed when it starts and is
//! stored with it (see [`Members`]); it is never recomputed for members.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::input::AgentView;
use crate::desired::Amount;
use crate::model::{GroupName, InstanceUid};

/// An agent's place in its group's canary order: lower goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey([u8; 32]);

impl OrderKey {
    /// The bytes as big-endian words: they order as the bytes do.
    fn words(&self) -> [u64; 4] {
        std::array::from_fn(|i| {
            let mut w = [0; 8];
            w.copy_from_slice(&self.0[8 * i..8 * i + 8]);
            u64::from_be_bytes(w)
        })
    }
}

/// The order of the bytes, compared a word at a time rather than by a call
/// that compares bytes: a rollout that starts sorts its whole group by these.
impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.words().cmp(&other.words())
    }
}

impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

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

/// The members of a rollout of `group` that starts now, in canary order: the
/// group's agents the fleet knows (connected, or away for less than the
/// fleet's retention: they keep their places through an outage) and whose
/// config the controller manages.
/// Answers their indices into `agents`.
pub fn rollout_members<'v>(group: &GroupName, agents: impl IntoIterator<Item = &'v AgentView>) -> Vec<usize> {
    let mut keyed: Vec<(OrderKey, usize)> = agents
        .into_iter()
        .enumerate()
        .filter(|(_, a)| a.supported())
        .map(|(n, a)| (order_key(group, &a.uid), n))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, n)| n).collect()
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

/// The agents a rollout counted when it started, in canary order. Each
/// member's rank is also kept in its agent record (see
/// `state::Membership`), so plans look agents up once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Members {
    order: Vec<InstanceUid>,
}

impl Members {
    /// `ordered` must already be in canary order.
    pub fn from_order(ordered: Vec<InstanceUid>) -> Self {
        Members { order: ordered }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The member at `rank`, if any.
    pub fn at_rank(&self, rank: u32) -> Option<&InstanceUid> {
        self.order.get(rank as usize)
    }

    /// The members in canary order.
    pub fn ordered(&self) -> &[InstanceUid] {
        &self.order
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
    fn order_keys_order_as_their_bytes() {
        let g = GroupName::new("g");
        let keys: Vec<OrderKey> = (0..200).map(|n| order_key(&g, &uid(n))).collect();
        for a in &keys {
            for b in &keys {
                assert_eq!(a.cmp(b), a.0.cmp(&b.0));
            }
        }
        // Keys that differ only in a later word.
        for byte in [8, 15, 16, 23, 24, 31] {
            let mut later = keys[0];
            later.0[byte] ^= 0x80;
            assert_eq!(keys[0].cmp(&later), keys[0].0.cmp(&later.0), "byte {byte}");
            assert_eq!(later.cmp(&keys[0]), later.0.cmp(&keys[0].0), "byte {byte}");
        }
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
    fn members_round_trip_in_canary_order() {
        let g = GroupName::new("gw");
        let order = canary_order(&g, (0..10).map(uid).collect());
        let m = Members::from_order(order.clone());
        assert_eq!(m.at_rank(3), Some(&order[3]));
        assert_eq!(m.at_rank(10), None);
        let json = serde_json::to_string(&m).unwrap();
        let back: Members = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ordered(), &order[..]);
    }
}
