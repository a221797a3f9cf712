//! The repository format compiled into a validated [`DesiredState`].
//!
//! Each file is parsed into a position-aware YAML tree (see [`super::yaml`]),
//! then read field by field against the set of keys it may hold. Every
//! problem is collected with its file, line and column instead of stopping at
//! the first, so one `validate` run shows them all. The format is described
//! in `docs/repository-format.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::collector;
use super::merged::MergedConfig;
use super::yaml::{self, Mark, Node, Value};
use super::{
    Amount, ConfigBundle, ConfigFile, DesiredState, Diagnostic, Expression, FileSource, Group, OnFailure, Operator,
    RolloutPolicy, Selector, SourceError,
};
use crate::model::{CommitId, GroupName, InstanceUid};

/// Why a repository could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrors {
    /// The content is invalid: every problem, sorted by path, line, column.
    #[error("{}", Lines(.0))]
    Invalid(Vec<Diagnostic>),
    /// The source itself could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl LoadErrors {
    /// The problems found, empty when the source could not be read.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            LoadErrors::Invalid(d) => d,
            LoadErrors::Source(_) => &[],
        }
    }
}

/// One `path:line:column: message` per line.
struct Lines<'a>(&'a [Diagnostic]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

pub const FLEET_FILE: &str = "fleet.yaml";
pub const GROUPS_DIR: &str = "groups";

/// Reads `fleet.yaml`, every `groups/*.yaml` and the config files they
/// reference from `source`, and checks all of it. `commit` is recorded in the
/// result as the commit the files were read from.
pub fn load(source: &dyn FileSource, commit: Option<CommitId>) -> Result<DesiredState, LoadErrors> {
    load_inner(source, commit, false).map(|(state, _)| state)
}

/// Each group's config merged as the supervisor merges it, by group name.
pub type MergedConfigs = BTreeMap<GroupName, MergedConfig>;

/// [`load`], and each group's config files merged into the one config its
/// agents' supervisors will build (what `validate --collector` checks).
pub fn load_merged(
    source: &dyn FileSource,
    commit: Option<CommitId>,
) -> Result<(DesiredState, MergedConfigs), LoadErrors> {
    load_inner(source, commit, true)
}

fn load_inner(
    source: &dyn FileSource,
    commit: Option<CommitId>,
    keep_merged: bool,
) -> Result<(DesiredState, MergedConfigs), LoadErrors> {
    let mut cx = Cx::default();

    let (fleet_policy, reconcile_interval) = match cx.read_yaml(source, FLEET_FILE)? {
        Some(node) => compile_fleet(&mut cx, &node),
        None => (RolloutPolicy::default(), DEFAULT_RECONCILE_INTERVAL),
    };

    let mut drafts = Vec::new();
    let mut stems: BTreeMap<String, String> = BTreeMap::new();
    let names = source.list(GROUPS_DIR)?;
    for file_name in &names {
        if file_name.starts_with('.') {
            continue;
        }
        let path = format!("{GROUPS_DIR}/{file_name}");
        let Some(stem) = file_name
            .strip_suffix(".yaml")
            .or_else(|| file_name.strip_suffix(".yml"))
        else {
            cx.error_in(&path, "not a group file: group files end in .yaml or .yml");
            continue;
        };
        let mut name_ok = true;
        if !valid_group_name(stem) {
            cx.error_in(
                &path,
                format!(
                    "invalid group name {stem:?}: use lowercase letters, digits, '.', '_' and '-', \
                     starting with a letter or digit, at most 63 characters"
                ),
            );
            name_ok = false;
        }
        if let Some(first) = stems.get(stem) {
            cx.error_in(&path, format!("group {stem:?} is also defined by {first}"));
            continue;
        }
        stems.insert(stem.to_string(), path.clone());
        let Some(node) = cx.read_yaml(source, &path)? else {
            continue;
        };
        let draft = compile_group(&mut cx, stem, &node, &fleet_policy);
        if name_ok {
            drafts.push(draft);
        }
    }
    if names.iter().all(|n| n.starts_with('.')) {
        cx.diags.push(Diagnostic {
            path: GROUPS_DIR.to_string(),
            line: 0,
            column: 0,
            message: "no group files: add at least one groups/<name>.yaml".to_string(),
        });
    }

    check_duplicate_selectors(&mut cx, &drafts);

    let mut files = ConfigFiles::default();
    let mut findings = Findings::new();
    let mut groups = BTreeMap::new();
    let mut merged = keep_merged.then(Vec::new);
    for draft in drafts {
        if let Some(group) = finish_group(&mut cx, source, &mut files, &mut findings, merged.as_mut(), draft)? {
            groups.insert(group.name.clone(), group);
        }
    }
    report_findings(&mut cx, findings);

    if cx.diags.is_empty() {
        let state = DesiredState {
            commit,
            groups,
            reconcile_interval,
        };
        let paths: Arc<[String]> = cx.paths.into();
        let merged = merged
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let group_file = paths.get(m.group_file as usize).cloned().unwrap_or_default();
                let config = MergedConfig::new(m.group.clone(), group_file, m.files, m.root, paths.clone());
                (m.group, config)
            })
            .collect();
        Ok((state, merged))
    } else {
        let mut diags = cx.diags;
        diags.sort();
        diags.dedup();
        Err(LoadErrors::Invalid(diags))
    }
}

const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(300);

/// The collected problems, and the paths that marks' `src` numbers stand for.
#[derive(Default)]
struct Cx {
    paths: Vec<String>,
    diags: Vec<Diagnostic>,
}

impl Cx {
    fn error(&mut self, mark: Mark, message: impl Into<String>) {
        let path = self.paths.get(mark.src as usize).cloned().unwrap_or_default();
        self.diags.push(Diagnostic {
            path,
            line: mark.line as usize,
            column: mark.column as usize,
            message: message.into(),
        });
    }

    /// A problem with a whole file, reported at its first line.
    fn error_in(&mut self, path: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            path: path.to_string(),
            line: 1,
            column: 1,
            message: message.into(),
        });
    }

    /// Reads and parses a YAML file; `None` when it does not exist or is not
    /// valid YAML (the latter reported).
    fn read_yaml(&mut self, source: &dyn FileSource, path: &str) -> Result<Option<Node>, SourceError> {
        Ok(match source.read(path)? {
            Some(bytes) => self.parse(path, &bytes),
            None => None,
        })
    }

    fn parse(&mut self, path: &str, bytes: &[u8]) -> Option<Node> {
        let Ok(text) = std::str::from_utf8(bytes) else {
            self.error_in(path, "not valid UTF-8");
            return None;
        };
        let src = self.paths.len() as u32;
        self.paths.push(path.to_string());
        match yaml::parse(src, text.strip_prefix('\u{feff}').unwrap_or(text)) {
            Ok(node) => Some(node),
            Err(e) => {
                self.diags.push(Diagnostic {
                    path: path.to_string(),
                    line: e.line as usize,
                    column: e.column as usize,
                    message: e.message,
                });
                None
            }
        }
    }
}

/// `parent.key`, or `key` at the top.
fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The entries of a mapping (any keys). A null node reads as an empty mapping.
fn entries_of<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<&'n [yaml::Entry]> {
    match &node.value {
        Value::Null => Some(&[]),
        Value::Map(entries) => Some(entries),
        _ => {
            let message = if path.is_empty() {
                format!("expected a mapping at the top level, found {}", node.describe())
            } else {
                format!("{path}: expected a mapping, found {}", node.describe())
            };
            cx.error(node.mark, message);
            None
        }
    }
}

/// The entries of a mapping whose keys were checked against `allowed`.
fn mapping<'n>(cx: &mut Cx, node: &'n Node, path: &str, allowed: &[&str]) -> Option<&'n [yaml::Entry]> {
    let entries = entries_of(cx, node, path)?;
    for e in entries {
        if !allowed.contains(&e.key.as_str()) {
            cx.error(
                e.key_mark,
                format!(
                    "{}: unknown key (expected one of: {})",
                    join(path, &e.key),
                    allowed.join(", ")
                ),
            );
        }
    }
    Some(entries)
}

/// Reports a required key that is absent from the mapping at `at`.
fn missing(cx: &mut Cx, at: Mark, parent: &str, key: &str) {
    let message = if parent.is_empty() {
        format!("missing key {key:?}")
    } else {
        format!("{parent}: missing key {key:?}")
    };
    cx.error(at, message);
}

fn field<'n>(entries: &'n [yaml::Entry], key: &str) -> Option<&'n yaml::Entry> {
    entries.iter().find(|e| e.key == key)
}

fn string(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    match node.as_scalar() {
        Some(s) => Some(s.to_string()),
        None => {
            cx.error(
                node.mark,
                format!("{path}: expected a string, found {}", node.describe()),
            );
            None
        }
    }
}

fn integer(cx: &mut Cx, node: &Node, path: &str) -> Option<i64> {
    if let Value::Scalar { text, plain: true } = &node.value
        && let Ok(n) = text.parse::<i64>()
    {
        return Some(n);
    }
    cx.error(
        node.mark,
        format!("{path}: expected an integer, found {}", node.describe()),
    );
    None
}

fn list<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<&'n [Node]> {
    match &node.value {
        Value::Null => Some(&[]),
        Value::Seq(items) => Some(items),
        _ => {
            cx.error(node.mark, format!("{path}: expected a list, found {}", node.describe()));
            None
        }
    }
}

fn duration(cx: &mut Cx, node: &Node, path: &str, allow_zero: bool) -> Option<Duration> {
    let text = string(cx, node, path)?;
    match humantime::parse_duration(&text) {
        Ok(d) if d.is_zero() && !allow_zero => {
            cx.error(node.mark, format!("{path}: must be longer than zero"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            cx.error(
                node.mark,
                format!("{path}: invalid duration {text:?}: {e} (examples: 30s, 5m, 1h 30m)"),
            );
            None
        }
    }
}

/// `5` or `10%`.
fn amount(cx: &mut Cx, node: &Node, path: &str) -> Option<Amount> {
    let bad = |cx: &mut Cx| {
        cx.error(
            node.mark,
            format!(
                "{path}: expected a count like 5 or a percentage like 10%, found {}",
                node.describe()
            ),
        );
        None
    };
    let Some(text) = node.as_scalar() else {
        return bad(cx);
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(p) = text.strip_suffix('%') {
        if !digits(p) {
            return bad(cx);
        }
        match p.parse::<u8>() {
            Ok(p) if p <= 100 => Some(Amount::Percent(p)),
            _ => {
                cx.error(
                    node.mark,
                    format!("{path}: a percentage must be at most 100%, found {text}"),
                );
                None
            }
        }
    } else if digits(text) {
        match text.parse::<u64>() {
            Ok(n) => Some(Amount::Count(n)),
            Err(_) => bad(cx),
        }
    } else {
        bad(cx)
    }
}

/// Waves are cumulative targets: counts first, each larger than the one
/// before, then percentages, each larger than the one before, the last 100%.
fn waves(cx: &mut Cx, node: &Node, path: &str) -> Option<Vec<Amount>> {
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

const ROLLOUT_KEYS: &[&str] = &[
    "waves",
    "bake",
    "apply_timeout",
    "unhealthy_grace",
    "max_failures",
    "on_failure",
];

/// Each key given overrides `base`.
fn rollout(cx: &mut Cx, node: &Node, path: &str, base: &RolloutPolicy) -> RolloutPolicy {
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
            "on_failure" => match v.as_scalar() {
                Some("rollback") => policy.on_failure = OnFailure::Rollback,
                Some("hold") => policy.on_failure = OnFailure::Hold,
                _ => cx.error(
                    v.mark,
                    format!("{p}: expected rollback or hold, found {}", v.describe()),
                ),
            },
            _ => {}
        }
    }
    policy
}

fn compile_fleet(cx: &mut Cx, node: &Node) -> (RolloutPolicy, Duration) {
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
struct Draft {
    name: GroupName,
    /// Where to report a problem with the group as a whole.
    file_mark: Mark,
    description: String,
    priority: i64,
    selector: Selector,
    selector_mark: Mark,
    config: Vec<ConfigRef>,
    config_mark: Mark,
    rollout: RolloutPolicy,
    /// Whether its own file had no problem.
    valid: bool,
}

struct ConfigRef {
    key: String,
    path: String,
    mark: Mark,
}

const GROUP_KEYS: &[&str] = &["description", "priority", "selector", "config", "rollout"];

fn compile_group(cx: &mut Cx, name: &str, node: &Node, fleet: &RolloutPolicy) -> Draft {
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

fn config_refs(cx: &mut Cx, e: &yaml::Entry) -> Vec<ConfigRef> {
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
fn normalize_path(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(parts.join("/"))
}

fn selector(cx: &mut Cx, node: &Node, path: &str) -> Selector {
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

fn expression(cx: &mut Cx, node: &Node, path: &str) -> Option<Expression> {
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
fn valid_group_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

/// A selector in a form where order does not matter, for comparing.
type SelectorKey = (
    BTreeMap<String, String>,
    BTreeSet<(String, u8, BTreeSet<String>)>,
    BTreeSet<InstanceUid>,
);

fn selector_key(s: &Selector) -> SelectorKey {
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
fn check_duplicate_selectors(cx: &mut Cx, drafts: &[Draft]) {
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

/// Config files read so far, by repository path, shared between groups.
#[derive(Default)]
struct ConfigFiles {
    bodies: HashMap<String, Option<Bytes>>,
    parsed: HashMap<String, Option<Arc<Node>>>,
}

/// `.yaml`/`.yml` are YAML, `.json` JSON, anything else plain text.
pub fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("yaml" | "yml") => "text/yaml",
        Some("json") => "application/json",
        _ => "text/plain",
    }
}

/// Collector-config findings, each with the groups it was found in (a
/// problem in a shared file is reported once, naming every group).
type Findings = BTreeMap<(Mark, String), BTreeSet<Option<GroupName>>>;

fn report_findings(cx: &mut Cx, findings: Findings) {
    for ((mark, message), groups) in findings {
        let names: Vec<String> = groups
            .into_iter()
            .flatten()
            .map(|g| format!("{:?}", g.as_str()))
            .collect();
        match names.len() {
            0 => cx.error(mark, message),
            1 => cx.error(mark, format!("{message} (group {})", names[0])),
            _ => cx.error(mark, format!("{message} (groups {})", names.join(", "))),
        }
    }
}

/// A group's merged config, kept for [`load_merged`].
struct MergedDraft {
    group: GroupName,
    group_file: u32,
    files: Vec<Arc<Node>>,
    root: Node,
}

/// Reads the group's config files, checks them as one collector config and
/// builds the group (when everything about it is valid). Keeps the merged
/// config in `merged` when given.
fn finish_group(
    cx: &mut Cx,
    source: &dyn FileSource,
    files: &mut ConfigFiles,
    findings: &mut Findings,
    merged: Option<&mut Vec<MergedDraft>>,
    d: Draft,
) -> Result<Option<Group>, SourceError> {
    let errors = cx.diags.len();
    let mut bundle = BTreeMap::new();
    let mut docs: Vec<(String, Arc<Node>)> = Vec::new();
    let mut complete = true;
    for r in &d.config {
        let body = match files.bodies.get(&r.path) {
            Some(b) => b.clone(),
            None => {
                let b = source.read(&r.path)?.map(Bytes::from);
                files.bodies.insert(r.path.clone(), b.clone());
                b
            }
        };
        let Some(body) = body else {
            cx.error(r.mark, format!("config[{:?}]: no such file: {}", r.key, r.path));
            complete = false;
            continue;
        };
        let parsed = match files.parsed.get(&r.path) {
            Some(p) => p.clone(),
            None => {
                let p = cx.parse(&r.path, &body).map(Arc::new);
                files.parsed.insert(r.path.clone(), p.clone());
                p
            }
        };
        match parsed {
            Some(node) => docs.push((r.key.clone(), node)),
            None => complete = false,
        }
        bundle.insert(
            r.key.clone(),
            ConfigFile {
                content_type: content_type(&r.path).to_string(),
                body,
            },
        );
    }
    if complete && !d.config.is_empty() {
        // The supervisor's order: named files sorted, then "" last.
        docs.sort_by(|a, b| (a.0.is_empty(), &a.0).cmp(&(b.0.is_empty(), &b.0)));
        let ordered: Vec<&Node> = docs.iter().map(|(_, n)| n.as_ref()).collect();
        let (root, found) = collector::check(&ordered, d.config_mark);
        complete = found.is_empty();
        for f in found {
            let group = f.merged.then(|| d.name.clone());
            findings.entry((f.mark, f.message)).or_default().insert(group);
        }
        if let Some(merged) = merged
            && complete
        {
            merged.push(MergedDraft {
                group: d.name.clone(),
                group_file: d.file_mark.src,
                files: docs.iter().map(|(_, n)| n.clone()).collect(),
                root,
            });
        }
    }
    if !d.valid || !complete || cx.diags.len() != errors {
        return Ok(None);
    }
    Ok(Some(Group {
        name: d.name,
        description: d.description,
        priority: d.priority,
        selector: d.selector,
        config: Arc::new(ConfigBundle::new(bundle)),
        rollout: d.rollout,
    }))
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
