//! Joining the fleet to the agent records: both are read in uid order, so a
//! plan looks each agent's record up in one sequential pass, and the records
//! come out sorted again.

use super::input::AgentView;
use super::state::{AgentMemories, AgentMemory};
use crate::model::InstanceUid;

/// The fleet's indices in uid order (without sorting when it already is).
pub(super) fn uid_order(agents: &[AgentView]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..agents.len()).collect();
    if !agents.windows(2).all(|w| w[0].uid <= w[1].uid) {
        order.sort_by(|&a, &b| agents[a].uid.cmp(&agents[b].uid));
    }
    order
}

/// Hands each agent what `records` hold of it (`found`), by a merge of two
/// uid-ordered sequences, and answers what they hold of agents the fleet
/// does not list.
pub(super) fn join_records<'a, T: Copy>(
    agents: &[AgentView],
    by_uid: &[usize],
    records: impl Iterator<Item = (&'a InstanceUid, T)>,
    found: &mut impl FnMut(usize, T),
) -> Vec<(InstanceUid, T)> {
    let mut records = records.peekable();
    let mut unlisted = Vec::new();
    // The record last handed out, for an agent listed twice.
    let mut matched: Option<(&InstanceUid, T)> = None;
    for &i in by_uid {
        let uid = &agents[i].uid;
        while let Some((u, r)) = records.next_if(|(u, _)| *u < uid) {
            unlisted.push((u.clone(), r));
        }
        if let Some((_, r)) = matched.filter(|(u, _)| *u == uid) {
            found(i, r);
        } else if let Some((u, r)) = records.next_if(|(u, _)| *u == uid) {
            found(i, r);
            matched = Some((u, r));
        }
    }
    unlisted.extend(records.map(|(u, r)| (u.clone(), r)));
    unlisted
}

/// Two uid-ordered sequences of records of different agents, as one.
pub(super) fn merge_sorted(
    a: Vec<(InstanceUid, AgentMemory)>,
    b: Vec<(InstanceUid, AgentMemory)>,
) -> Vec<(InstanceUid, AgentMemory)> {
    if a.is_empty() || b.is_empty() {
        return if a.is_empty() { b } else { a };
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut b = b.into_iter().peekable();
    for x in a {
        while let Some(y) = b.next_if(|y| y.0 < x.0) {
            out.push(y);
        }
        out.push(x);
    }
    out.extend(b);
    out
}

/// The records of the fleet's agents (in uid order; a uid listed twice keeps
/// its first record) merged with those of agents it does not list. Agents
/// the fleet does not list keep their record: after a controller restart
/// the fleet fills up again as agents reconnect, and what was pushed to
/// them, what they failed and their place in a rollout must still be known
/// when they do.
pub(super) fn merge_records<'a>(
    listed: impl Iterator<Item = (&'a InstanceUid, Option<AgentMemory>)>,
    absent: &AgentMemories,
) -> AgentMemories {
    let mut out: Vec<(InstanceUid, AgentMemory)> = Vec::with_capacity(absent.len());
    let mut absent = absent.entries().iter().peekable();
    for (uid, r) in listed {
        while let Some((u, r)) = absent.next_if(|(u, _)| u < uid) {
            out.push((u.clone(), *r));
        }
        if let Some(r) = r
            && out.last().is_none_or(|(u, _)| u != uid)
        {
            out.push((uid.clone(), r));
        }
    }
    out.extend(absent.map(|(u, r)| (u.clone(), *r)));
    AgentMemories::from_sorted(out)
}
