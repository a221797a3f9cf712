//! Joining the fleet to the agent records: both are read in uid order, so a
//! plan looks each agent's record up in one sequential pass, and the next
//! records come out sorted.

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

/// Each agent's previous record, by a merge of two uid-ordered sequences.
pub(super) fn join_records<'a>(
    agents: &[AgentView],
    by_uid: &[usize],
    records: &'a AgentMemories,
) -> Vec<Option<&'a AgentMemory>> {
    let entries = records.entries();
    let mut prev = vec![None; agents.len()];
    let mut j = 0;
    for &i in by_uid {
        let uid = &agents[i].uid;
        while j < entries.len() && entries[j].0 < *uid {
            j += 1;
        }
        if let Some((u, r)) = entries.get(j)
            && u == uid
        {
            prev[i] = Some(r);
        }
    }
    prev
}

/// The next records in uid order; a uid listed twice keeps its first record.
/// Agents the fleet does not list keep their previous record: after a
/// controller restart the fleet fills up again as agents reconnect, and what
/// was pushed to them, what they failed and their place in a rollout must
/// still be known when they do.
pub(super) fn collect_records(
    agents: &[AgentView],
    by_uid: &[usize],
    mut next: Vec<Option<AgentMemory>>,
    previous: &AgentMemories,
) -> AgentMemories {
    let mut out: Vec<(InstanceUid, AgentMemory)> = Vec::with_capacity(previous.len().max(agents.len()));
    let mut absent = previous.entries().iter().peekable();
    for &i in by_uid {
        let uid = &agents[i].uid;
        while let Some((u, r)) = absent.next_if(|(u, _)| u < uid) {
            out.push((u.clone(), *r));
        }
        absent.next_if(|(u, _)| u == uid);
        if let Some(r) = next[i].take()
            && out.last().is_none_or(|(u, _)| u != uid)
        {
            out.push((uid.clone(), r));
        }
    }
    out.extend(absent.map(|(u, r)| (u.clone(), *r)));
    AgentMemories::from_sorted(out)
}
