//! Which group an agent belongs to: the highest-priority group whose selector
//! matches it (and that its credentials let it join); among equal priorities
//! the group whose name sorts first.
//!
//! Matching every agent against every selector would cost agents × groups
//! selector checks per plan, so groups are indexed once per plan by one of
//! their exact conditions (an explicit uid list, else one `match_attributes`
//! pair); only groups without such a condition are checked for every agent.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::desired::{AgentAttributes, DesiredState, Group};
use crate::model::InstanceUid;

/// The groups of a desired state, ranked, with the index described above.
pub struct Matcher<'a> {
    /// Ranked: higher priority first, then name ascending.
    ranked: Vec<&'a Group>,
    /// Position of each ranked group in the desired state's (name-sorted) map.
    position: Vec<usize>,
    /// Groups checked for every agent (rank order).
    general: Vec<usize>,
    /// Groups with an explicit uid list, by uid (rank order).
    by_uid: HashMap<&'a InstanceUid, Vec<usize>>,
    /// Groups indexed by one attribute pair: key, then value (rank order).
    by_attr: Vec<(&'a str, ValueIndex<'a>)>,
    /// Per ranked group: its selector is exactly the indexed pair, so an
    /// index hit is a match.
    exact: Vec<bool>,
}

/// Ranked groups by the value of one attribute.
type ValueIndex<'a> = HashMap<&'a str, Vec<usize>, Fnv>;

/// FNV-1a for the attribute index. Its keys come from the repository (a few
/// per group), so a fixed hash cannot be flooded by agents; it only has to be
/// fast on short strings.
type Fnv = BuildHasherDefault<FnvHasher>;

struct FnvHasher(u64);

impl Default for FnvHasher {
    fn default() -> Self {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for FnvHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl<'a> Matcher<'a> {
    pub fn new(desired: &'a DesiredState) -> Self {
        let mut ranked: Vec<(usize, &Group)> = desired.groups.values().enumerate().collect();
        ranked.sort_by(|(_, a), (_, b)| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
        let position = ranked.iter().map(|(p, _)| *p).collect();
        let ranked: Vec<&Group> = ranked.into_iter().map(|(_, g)| g).collect();
        let mut general = Vec::new();
        let mut by_uid: HashMap<&InstanceUid, Vec<usize>> = HashMap::new();
        let mut by_attr: Vec<(&str, ValueIndex)> = Vec::new();
        let mut exact = vec![false; ranked.len()];
        for (rank, g) in ranked.iter().enumerate() {
            let s = &g.selector;
            if !s.instance_uids.is_empty() {
                for u in &s.instance_uids {
                    let v = by_uid.entry(u).or_default();
                    if v.last() != Some(&rank) {
                        v.push(rank);
                    }
                }
            } else if let Some((k, v)) = s.match_attributes.iter().next() {
                let i = match by_attr.iter().position(|(key, _)| *key == k.as_str()) {
                    Some(i) => i,
                    None => {
                        by_attr.push((k.as_str(), HashMap::default()));
                        by_attr.len() - 1
                    }
                };
                by_attr[i].1.entry(v.as_str()).or_default().push(rank);
                exact[rank] = s.match_attributes.len() == 1 && s.match_expressions.is_empty();
            } else {
                general.push(rank);
            }
        }
        Matcher {
            ranked,
            position,
            general,
            by_uid,
            by_attr,
            exact,
        }
    }

    /// The group an agent belongs to, as its position in `desired.groups`.
    pub fn find(&self, agent: &impl AgentAttributes) -> Option<usize> {
        self.best_rank(agent).map(|r| self.position[r])
    }

    /// The group an agent belongs to.
    pub fn group_of(&self, agent: &impl AgentAttributes) -> Option<&'a Group> {
        self.best_rank(agent).map(|r| self.ranked[r])
    }

    /// Every group whose selector matches the agent, best ranked first (the
    /// first is [`Matcher::group_of`]). Checks every selector: for reports,
    /// not for plans.
    pub fn matching<'m>(&'m self, agent: &'m impl AgentAttributes) -> impl Iterator<Item = &'a Group> + 'm {
        self.ranked
            .iter()
            .copied()
            .filter(|g| g.selector.matches(agent) && agent.may_join(&g.name))
    }

    /// The rank of the best-ranked group whose selector matches the agent.
    fn best_rank(&self, agent: &impl AgentAttributes) -> Option<usize> {
        let mut best = usize::MAX;
        let mut consider = |list: &[usize], indexed_by_attr: bool| {
            // Each list is in rank order, so its first match is its best.
            if let Some(&r) = list.iter().take_while(|&&r| r < best).find(|&&r| {
                ((indexed_by_attr && self.exact[r]) || self.ranked[r].selector.matches(agent))
                    && agent.may_join(&self.ranked[r].name)
            }) {
                best = r;
            }
        };
        consider(&self.general, false);
        if let Some(list) = self.by_uid.get(agent.uid()) {
            consider(list, false);
        }
        for (key, values) in &self.by_attr {
            if let Some(list) = agent.attribute(key).and_then(|v| values.get(v)) {
                consider(list, true);
            }
        }
        (best != usize::MAX).then_some(best)
    }
}
