//! The repository format: the keys `fleet.yaml` and `groups/*.yaml` may
//! hold and what each must be, read into a rollout policy and group drafts.
//! The format is described in `docs/repository-format.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::read::{Cx, amount, duration, entries_of, field, integer, join, list, mapping, missing, string};
use super::yaml::{self, Mark, Node};
use super::{Amount, Expression, OnFailure, Operator, RolloutPolicy, Selector};
use crate::model::{GroupName, InstanceUid};

pub(super) const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(300);

/// Waves are cumulative targets: counts first, each larger than the one
/// before, then percentages, each larger than the one before, the last 100%.
pub(super) fn waves(cx: &mut Cx, node: &Node, path: &str) -> Option<Vec<Amount>> {
    let items = list(cx, node, path)?;
    let Some(last) = items.last() else {
        cx.error(node.mark, format!("{path}: list at least one wave, the last 100%"));
        return None;
    };
    let errors = cx.diags.len();
    let mut out = Vec::with_capacity(items.len());
    let mut prev: Option<Amount> = None;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(a) = amount(cx, item, &item_path) else {
            prev = None;
            continue;
        };
        match (prev, a) {
            (_, Amount::Count(0)) => cx.error(item.mark, format!("{item_path}: a wave must be at least 1 agent")),
            (_, Amount::Percent(0)) => cx.error(item.mark, format!("{item_path}: a wave must be more than 0%")),
            (Some(Amount::Count(p)), Amount::Count(n)) if n <= p => cx.error(
                item.mark,
                format!("{item_path}: waves must increase: {n} is not more than the wave before it ({p})"),
            ),
            (Some(Amount::Percent(p)), Amount::Percent(n)) if n <= p => cx.error(
                item.mark,
                format!("{item_path}: waves must increase: {n}% is not more than the wave before it ({p}%)"),
            ),
            (Some(Amount::Percent(p)), Amount::Count(n)) => cx.error(
                item.mark,
                format!(
                    "{item_path}: a count ({n}) cannot follow a percentage ({p}%): list counts first, then percentages"
                ),
            ),
            _ => {}
        }
        prev = Some(a);
        out.push(a);
    }
    if let Some(a) = prev
        && a != Amount::Percent(100)
    {
        cx.error(
            last.mark,
            format!(
                "{path}: the last wave must be 100% (the whole group), found {}",
                super::summary::amount(a)
            ),
        );
    }
    (cx.diags.len() == errors).then_some(out)
}

pub(super) const ROLLOUT_KEYS: &[&str] = &[
    "waves",
    "bake",
    "apply_timeout",
    "unhealthy_grace",
    "max_failures",
    "on_failure",
];

/// Each key given overrides `base`.
pub(super) fn rollout(cx: &mut Cx, node: &Node, path: &str, base: &RolloutPolicy) -> RolloutPolicy {
    let mut policy = base.clone();
    let Some(entries) = mapping(cx, node, path, ROLLOUT_KEYS) else {
        return policy;
    };
    for e in entries {
        let p = join(path, &e.key);
        let v = &e.value;
        match e.key.as_str() {
            "waves" => {
                if let Some(w) = waves(cx, v, &p) {
                    policy.waves = w;
                }
            }
            "bake" => {
                if let Some(d) = duration(cx, v, &p, true) {
                    policy.bake = d;
                }
            }
            "apply_timeout" => {
                if let Some(d) = duration(cx, v, &p, false) {
                    policy.apply_timeout = d;
                }
            }
            "unhealthy_grace" => {
                if let Some(d) = duration(cx, v, &p, true) {
                    policy.unhealthy_grace = d;
                }
            }
            "max_failures" => {
                if let Some(a) = amount(cx, v, &p) {
                    policy.max_failures = a;
                }
            }
            "on_failure" => match OnFailure::ALL.into_iter().find(|o| v.as_scalar() == Some(o.as_str())) {
                Some(o) => policy.on_failure = o,
                None => cx.error(
                    v.mark,
                    format!("{p}: expected rollback or hold, found {}", v.describe()),
                ),
            },
            _ => {}
        }
    }
    policy
}

pub(super) fn compile_fleet(cx: &mut Cx, node: &Node) -> (RolloutPolicy, Duration) {
    let mut policy = RolloutPolicy::default();
    let mut interval = DEFAULT_RECONCILE_INTERVAL;
    let Some(entries) = mapping(cx, node, "", &["rollout", "reconcile"]) else {
        return (policy, interval);
    };
    if let Some(e) = field(entries, "rollout") {
        policy = rollout(cx, &e.value, "rollout", &policy);
    }
    if let Some(e) = field(entries, "reconcile")
        && let Some(r) = mapping(cx, &e.value, "reconcile", &["interval"])
        && let Some(i) = field(r, "interval")
        && let Some(d) = duration(cx, &i.value, "reconcile.interval", false)
    {
        interval = d;
    }
    (policy, interval)
}

/// A group as read from its file, before its config files are read.
pub(super) struct Draft {
    pub(super) name: GroupName,
    /// Where to report a problem with the group as a whole.
    pub(super) file_mark: Mark,
    pub(super) description: String,
    pub(super) priority: i64,
    pub(super) selector: Selector,
    pub(super) selector_mark: Mark,
    pub(super) config: Vec<ConfigRef>,
    pub(super) config_mark: Mark,
    pub(super) rollout: RolloutPolicy,
    /// Whether its own file had no problem.
    pub(super) valid: bool,
}

pub(super) struct ConfigRef {
    pub(super) key: String,
    pub(super) path: String,
    pub(super) mark: Mark,
}

pub(super) const GROUP_KEYS: &[&str] = &["description", "priority", "selector", "config", "rollout"];

pub(super) fn compile_group(cx: &mut Cx, name: &str, node: &Node, fleet: &RolloutPolicy) -> Draft {
    let errors = cx.diags.len();
    let file_mark = Mark {
        line: 1,
        column: 1,
        ..node.mark
    };
    let mut d = Draft {
        name: GroupName::new(name),
        file_mark,
        description: String::new(),
        priority: 0,
        selector: Selector::default(),
        selector_mark: file_mark,
        config: Vec::new(),
        config_mark: file_mark,
        rollout: fleet.clone(),
        valid: false,
    };
    let Some(entries) = mapping(cx, node, "", GROUP_KEYS) else {
        return d;
    };
    if let Some(e) = field(entries, "description")
        && !e.value.is_null()
    {
        d.description = string(cx, &e.value, "description").unwrap_or_default();
    }
    if let Some(e) = field(entries, "priority") {
        d.priority = integer(cx, &e.value, "priority").unwrap_or(0);
    }
    if let Some(e) = field(entries, "selector") {
        d.selector_mark = e.key_mark;
        d.selector = selector(cx, &e.value, "selector");
    }
    match field(entries, "config") {
        Some(e) => {
            d.config_mark = e.key_mark;
            d.config = config_refs(cx, e);
        }
        None => missing(cx, d.file_mark, "", "config"),
    }
    if let Some(e) = field(entries, "rollout") {
        d.rollout = rollout(cx, &e.value, "rollout", fleet);
    }
    d.valid = cx.diags.len() == errors;
    d
}

pub(super) fn config_refs(cx: &mut Cx, e: &yaml::Entry) -> Vec<ConfigRef> {
    let mut refs = Vec::new();
    let Some(entries) = entries_of(cx, &e.value, "config") else {
        return refs;
    };
    if entries.is_empty() {
        cx.error(e.key_mark, "config: list at least one file (\"\" is the main file)");
        return refs;
    }
    for entry in entries {
        let p = format!("config[{:?}]", entry.key);
        let Some(path) = string(cx, &entry.value, &p) else {
            continue;
        };
        match normalize_path(&path) {
            Some(normal) => refs.push(ConfigRef {
                key: entry.key.clone(),
                path: normal,
                mark: entry.value.mark,
            }),
            None => cx.error(
                entry.value.mark,
                format!("{p}: {path:?} is not a path inside the repository (write it relative to the repository root, without \"..\")"),
            ),
        }
    }
    refs
}

/// A repository path without `.` or empty parts; `None` when it is absolute
/// or climbs out with `..`.
pub(super) fn normalize_path(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(parts.join("/"))
}

pub(super) fn selector(cx: &mut Cx, node: &Node, path: &str) -> Selector {
    let mut s = Selector::default();
    let Some(entries) = mapping(
        cx,
        node,
        path,
        &["match_attributes", "match_expressions", "instance_uids"],
    ) else {
        return s;
    };
    if let Some(e) = field(entries, "match_attributes")
        && let Some(attrs) = entries_of(cx, &e.value, "selector.match_attributes")
    {
        for a in attrs {
            let p = format!("selector.match_attributes[{:?}]", a.key);
            if let Some(v) = string(cx, &a.value, &p) {
                s.match_attributes.insert(a.key.clone(), v);
            }
        }
    }
    if let Some(e) = field(entries, "match_expressions")
        && let Some(items) = list(cx, &e.value, "selector.match_expressions")
    {
        for (i, item) in items.iter().enumerate() {
            if let Some(x) = expression(cx, item, &format!("selector.match_expressions[{i}]")) {
                s.match_expressions.push(x);
            }
        }
    }
    if let Some(e) = field(entries, "instance_uids")
        && let Some(items) = list(cx, &e.value, "selector.instance_uids")
    {
        for (i, item) in items.iter().enumerate() {
            let p = format!("selector.instance_uids[{i}]");
            let Some(text) = string(cx, item, &p) else {
                continue;
            };
            match InstanceUid::parse_text(&text) {
                Some(uid) => s.instance_uids.push(uid),
                None => cx.error(
                    item.mark,
                    format!("{p}: {text:?} is not an instance uid (expected a UUID or a 26-character ULID)"),
                ),
            }
        }
    }
    s
}

pub(super) fn expression(cx: &mut Cx, node: &Node, path: &str) -> Option<Expression> {
    let entries = mapping(cx, node, path, &["key", "operator", "values"])?;
    let errors = cx.diags.len();
    let key = match field(entries, "key") {
        Some(e) => string(cx, &e.value, &join(path, "key")),
        None => {
            missing(cx, node.mark, path, "key");
            None
        }
    };
    let operator = match field(entries, "operator") {
        Some(e) => match e.value.as_scalar() {
            Some("In") => Some(Operator::In),
            Some("NotIn") => Some(Operator::NotIn),
            Some("Exists") => Some(Operator::Exists),
            Some("DoesNotExist") => Some(Operator::DoesNotExist),
            _ => {
                cx.error(
                    e.value.mark,
                    format!(
                        "{path}.operator: unknown operator {} (expected In, NotIn, Exists or DoesNotExist)",
                        e.value.describe()
                    ),
                );
                None
            }
        },
        None => {
            missing(cx, node.mark, path, "operator");
            None
        }
    };
    let mut values = Vec::new();
    let values_entry = field(entries, "values");
    if let Some(e) = values_entry
        && let Some(items) = list(cx, &e.value, &join(path, "values"))
    {
        for (i, item) in items.iter().enumerate() {
            if let Some(v) = string(cx, item, &format!("{path}.values[{i}]")) {
                values.push(v);
            }
        }
    }
    if let Some(op) = operator {
        let at = values_entry.map_or(node.mark, |e| e.value.mark);
        match op {
            Operator::In | Operator::NotIn if values.is_empty() && cx.diags.len() == errors => {
                cx.error(at, format!("{path}.values: {op:?} needs at least one value"));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                cx.error(at, format!("{path}.values: {op:?} takes no values"));
            }
            _ => {}
        }
    }
    if cx.diags.len() != errors {
        return None;
    }
    Some(Expression {
        key: key?,
        operator: operator?,
        values,
    })
}

/// `[a-z0-9][a-z0-9._-]*`, at most 63 characters: safe in paths, URLs,
/// metric labels and note keys.
pub(super) fn valid_group_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

/// A selector in a form where order does not matter, for comparing.
pub(super) type SelectorKey = (
    BTreeMap<String, String>,
    BTreeSet<(String, u8, BTreeSet<String>)>,
    BTreeSet<InstanceUid>,
);

pub(super) fn selector_key(s: &Selector) -> SelectorKey {
    let expressions = s
        .match_expressions
        .iter()
        .map(|e| (e.key.clone(), e.operator as u8, e.values.iter().cloned().collect()))
        .collect();
    (
        s.match_attributes.clone(),
        expressions,
        s.instance_uids.iter().cloned().collect(),
    )
}

/// Two groups with the same selector and priority would tie for every agent
/// they match; the second (in name order) is reported, naming the first.
pub(super) fn check_duplicate_selectors(cx: &mut Cx, drafts: &[Draft]) {
    let mut seen: HashMap<(SelectorKey, i64), &GroupName> = HashMap::new();
    for d in drafts.iter().filter(|d| d.valid) {
        match seen.entry((selector_key(&d.selector), d.priority)) {
            std::collections::hash_map::Entry::Occupied(first) => cx.error(
                d.selector_mark,
                format!(
                    "group {:?} has the same selector and priority ({}) as group {:?}: agents would match both with no winner",
                    d.name.as_str(),
                    d.priority,
                    first.get().as_str()
                ),
            ),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(&d.name);
            }
        }
    }
}
