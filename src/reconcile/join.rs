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

/// Each agent's record, by a merge of two uid-ordered sequences, and the
/// records of agents the fleet does not list.
pub(super) fn join_records(
    agents: &[AgentView],
    by_uid: &[usize],
    records: AgentMemories,
) -> (Vec<Option<AgentMemory>>, AgentMemories) {
    let entries = records.entries();
    let mut prev = vec![None; agents.len()];
    let mut absent = Vec::new();
    let mut j = 0;
    // Whether `entries[j]` is the record of a listed agent.
    let mut matched = false;
    for &i in by_uid {
        let uid = &agents[i].uid;
        while j < entries.len() && entries[j].0 < *uid {
            if !matched {
                absent.push(entries[j].clone());
            }
            matched = false;
            j += 1;
        }
        if let Some((u, r)) = entries.get(j)
            && u == uid
        {
            prev[i] = Some(*r);
            matched = true;
        }
    }
    absent.extend(entries.iter().skip(j + usize::from(matched)).cloned());
    (prev, AgentMemories::from_sorted(absent))
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
