//! The desired state: the repository format compiled into validated groups,
//! selectors and config bundles with their canonical hashes. Pure: no I/O
//! beyond the [`FileSource`] it is handed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::model::{CommitId, ConfigHash, GroupName, InstanceUid};

mod bundle;
mod collector;
pub mod diff;
mod disk;
mod load;
mod mem;
mod merged;
mod read;
mod schema;
pub mod summary;
pub mod yaml;

pub use bundle::content_type;
pub use disk::DiskSource;
pub use load::{LoadErrors, MAX_CONFIG_BYTES, MAX_FILE_BYTES, MergedConfigs, load, load_merged};
pub use mem::MemSource;
pub use merged::{MergedConfig, Refusal};

/// Where the repository's files come from: a commit's tree (see `gitsrc`) or
/// the files on disk (what `validate` checks before a commit). Paths are
/// relative to the repository root (or `--path` subdirectory), `/`-separated.
pub trait FileSource {
    /// The file's bytes, or `None` when there is no such file.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError>;
    /// The names of the regular files and symbolic links directly in `dir`
    /// (not recursive), sorted; empty when the directory does not exist.
    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError>;
    /// Where `path` points when it is a symbolic link. Links are never
    /// followed: git commits the link, not the file, so a link that works on
    /// disk would be a missing file at the commit.
    fn link(&self, _path: &str) -> Option<String> {
        None
    }
}

/// A failure to read the source itself (not a problem with its content).
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {message}")]
pub struct SourceError {
    pub path: String,
    pub message: String,
}

/// One problem found in the repository, printed as `path:line:column: message`
/// (line and column are 1-based; 0 when the problem has no position).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub path: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Diagnostic {
    /// The diagnostic with its path relative to the repository root, for a
    /// repository whose files live under `subdir` (`--path`).
    pub fn rooted(mut self, subdir: Option<&str>) -> Diagnostic {
        if let Some(s) = subdir {
            self.path = format!("{s}/{}", self.path);
        }
        self
    }

    /// [`Diagnostic::rooted`], as `validate` prints it.
    pub fn under(&self, subdir: Option<&str>) -> String {
        self.clone().rooted(subdir).to_string()
    }
}

/// A repository's files read to the end: the desired state, or every problem
/// that keeps them from being one.
#[derive(Debug, Clone, PartialEq)]
pub enum Validated<T = DesiredState> {
    Valid(T),
    /// Sorted by path, line and column.
    Invalid(Vec<Diagnostic>),
}

impl<T> Validated<T> {
    pub fn valid(self) -> Option<T> {
        match self {
            Validated::Valid(t) => Some(t),
            Validated::Invalid(_) => None,
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Validated<U> {
        match self {
            Validated::Valid(t) => Validated::Valid(f(t)),
            Validated::Invalid(d) => Validated::Invalid(d),
        }
    }
}

/// A `--path` value as the loaders and messages use it: `/`-separated with no
/// leading or trailing slash; `None` for the repository root.
pub fn normalize_subdir(path: &str) -> Option<String> {
    let mut p = path.trim_matches('/');
    while let Some(rest) = p.strip_prefix("./") {
        p = rest.trim_start_matches('/');
    }
    Some(p.to_string()).filter(|s| !s.is_empty() && s != ".")
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path, self.line, self.column, self.message)
    }
}

/// Everything the controller should make true, as read from one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredState {
    /// The commit it was read from; `None` for files read from disk by `validate`.
    pub commit: Option<CommitId>,
    /// Groups by name (sorted, so iteration order is stable).
    pub groups: BTreeMap<GroupName, Group>,
    /// How often every agent is re-checked for drift, even without new commits.
    pub reconcile_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: GroupName,
    pub description: String,
    /// Higher wins when several groups match one agent.
    pub priority: i64,
    pub selector: Selector,
    pub config: Arc<ConfigBundle>,
    /// The repository path of each file of `config`, by its key (relative to
    /// the repository root, or to `--path`), as the group file names it.
    pub config_paths: BTreeMap<String, String>,
    pub rollout: RolloutPolicy,
}

/// Which agents a group selects. Every given condition must hold; an empty
/// selector matches every agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub match_attributes: BTreeMap<String, String>,
    pub match_expressions: Vec<Expression>,
    pub instance_uids: Vec<InstanceUid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Expression {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// What a selector looks at: an agent's uid and its attributes, identifying
/// and non-identifying merged (identifying wins on a clash).
pub trait AgentAttributes {
    fn uid(&self) -> &InstanceUid;
    fn attribute(&self, key: &str) -> Option<&str>;
    /// Whether the agent may join `group` whatever its selector says (its
    /// credentials may limit it to some groups).
    fn may_join(&self, _group: &GroupName) -> bool {
        true
    }
}

/// An agent's description: its attributes rendered as strings. Shared
/// (`Arc`) by the inventory and the planner's view of the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Description {
    pub identifying: Attributes,
    pub non_identifying: Attributes,
}

impl Description {
    /// One attribute as selectors see it: an identifying attribute wins
    /// over a non-identifying one of the same key.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.identifying.get(key).or_else(|| self.non_identifying.get(key))
    }
}

/// Attributes by key, sorted, in one allocation of exactly their size: an
/// agent has a handful, and every plan looks them up, where a B-tree would
/// keep room for eleven in each node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes(Box<[(Box<str>, Box<str>)]>);

impl Attributes {
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[i].1)
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.into_iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a str, &'a str);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Box<str>, Box<str>)>, fn(&'a (Box<str>, Box<str>)) -> (&'a str, &'a str)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

/// As a map, in key order.
impl serde::Serialize for Attributes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// A key given twice keeps its last value, as a map's `collect` would.
impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        Attributes(map.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.match_attributes.is_empty() && self.match_expressions.is_empty() && self.instance_uids.is_empty()
    }

    /// Every given condition must hold: membership in `instance_uids` when it
    /// is not empty, each attribute and each expression.
    pub fn matches(&self, agent: &impl AgentAttributes) -> bool {
        (self.instance_uids.is_empty() || self.instance_uids.contains(agent.uid()))
            && self
                .match_attributes
                .iter()
                .all(|(k, v)| agent.attribute(k) == Some(v.as_str()))
            && self
                .match_expressions
                .iter()
                .all(|e| e.matches(agent.attribute(&e.key)))
    }
}

impl Expression {
    fn matches(&self, value: Option<&str>) -> bool {
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// One file of an agent's config map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConfigFile {
    pub content_type: String,
    pub body: Bytes,
}

/// A group's config map with its canonical hash, computed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigBundle {
    files: BTreeMap<String, ConfigFile>,
    hash: ConfigHash,
}

impl ConfigBundle {
    pub fn new(files: BTreeMap<String, ConfigFile>) -> Self {
        let hash = canonical_hash(&files);
        ConfigBundle { files, hash }
    }

    /// A bundle of YAML files from `(name, body)` pairs.
    pub fn yaml(files: &[(&str, &str)]) -> Self {
        ConfigBundle::new(
            files
                .iter()
                .map(|(name, body)| {
                    let file = ConfigFile {
                        content_type: "text/yaml".into(),
                        body: Bytes::copy_from_slice(body.as_bytes()),
                    };
                    (name.to_string(), file)
                })
                .collect(),
        )
    }

    pub fn files(&self) -> &BTreeMap<String, ConfigFile> {
        &self.files
    }

    pub fn hash(&self) -> ConfigHash {
        self.hash
    }
}

/// SHA-256 over the config map: for each file in ascending key order, the key,
/// the content type and the body, each preceded by its length as a u64
/// big-endian. Length prefixes make the encoding unambiguous.
pub fn canonical_hash(files: &BTreeMap<String, ConfigFile>) -> ConfigHash {
    let mut h = Sha256::new();
    for (key, file) in files {
        for part in [key.as_bytes(), file.content_type.as_bytes(), &file.body[..]] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    ConfigHash(h.finalize().into())
}

/// How a group's new config is rolled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutPolicy {
    /// Cumulative targets; the last covers the whole group.
    pub waves: Vec<Amount>,
    /// How long a wave must stay applied and healthy before the next opens.
    pub bake: Duration,
    /// An agent not APPLIED this long after it received its push counts as failed.
    pub apply_timeout: Duration,
    /// An agent unhealthy after applying counts as failed only past this.
    pub unhealthy_grace: Duration,
    /// Failures tolerated in one rollout; one more halts it.
    pub max_failures: Amount,
    pub on_failure: OnFailure,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            waves: vec![
                Amount::Count(1),
                Amount::Percent(10),
                Amount::Percent(50),
                Amount::Percent(100),
            ],
            bake: Duration::from_secs(60),
            apply_timeout: Duration::from_secs(300),
            unhealthy_grace: Duration::from_secs(30),
            max_failures: Amount::Count(0),
            on_failure: OnFailure::Rollback,
        }
    }
}

/// A number of agents, absolute or as a percentage of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Amount {
    Count(u64),
    Percent(u8),
}

impl Amount {
    /// How many of `total` agents this amounts to. Percentages round up, so a
    /// non-zero percentage of a non-empty group is at least one agent.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => (n as usize).min(total),
            Amount::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }

    /// How many failures of `total` agents this tolerates. Percentages round
    /// down: a budget never rounds up into tolerance (1% of 50 is none).
    pub fn budget_of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => total * p as usize / 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnFailure {
    /// Failed agents get the last good (stable) config back.
    Rollback,
    /// Failed agents are left as they are.
    Hold,
}

impl OnFailure {
    pub const ALL: [OnFailure; 2] = [OnFailure::Rollback, OnFailure::Hold];

    /// As the repository format writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Rollback => "rollback",
            OnFailure::Hold => "hold",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ct: &str, body: &str) -> ConfigFile {
        ConfigFile {
            content_type: ct.into(),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn hash_test_vectors() {
        let empty = ConfigBundle::new(BTreeMap::new());
        // SHA-256 of no input at all.
        assert_eq!(
            empty.hash().to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let one = ConfigBundle::new(BTreeMap::from([(String::new(), file("text/yaml", "a: 1\n"))]));
        // u64be(0) "" u64be(9) "text/yaml" u64be(5) "a: 1\n"
        let mut manual = Vec::new();
        manual.extend(0u64.to_be_bytes());
        manual.extend(9u64.to_be_bytes());
        manual.extend(b"text/yaml");
        manual.extend(5u64.to_be_bytes());
        manual.extend(b"a: 1\n");
        assert_eq!(one.hash().0, <[u8; 32]>::from(Sha256::digest(&manual)));
    }

    #[test]
    fn hash_depends_on_content_type_and_body_not_insertion_order() {
        let a = BTreeMap::from([
            ("x".to_string(), file("text/yaml", "1")),
            ("y".to_string(), file("text/yaml", "2")),
        ]);
        let mut b = BTreeMap::new();
        b.insert("y".to_string(), file("text/yaml", "2"));
        b.insert("x".to_string(), file("text/yaml", "1"));
        assert_eq!(canonical_hash(&a), canonical_hash(&b));
        let mut c = a.clone();
        c.insert("x".into(), file("application/json", "1"));
        assert_ne!(canonical_hash(&a), canonical_hash(&c));
        let mut d = a.clone();
        d.insert("x".into(), file("text/yaml", "1 "));
        assert_ne!(canonical_hash(&a), canonical_hash(&d));
        // Moving bytes between key and body must change the hash.
        let e = BTreeMap::from([("ab".to_string(), file("", ""))]);
        let f = BTreeMap::from([("a".to_string(), file("", "b"))]);
        assert_ne!(canonical_hash(&e), canonical_hash(&f));
    }

    #[test]
    fn amounts() {
        assert_eq!(Amount::Percent(10).of(50), 5);
        assert_eq!(Amount::Percent(10).of(5), 1);
        assert_eq!(Amount::Percent(100).of(7), 7);
        assert_eq!(Amount::Count(1).of(0), 0);
        assert_eq!(Amount::Count(10).of(3), 3);
    }

    struct A(InstanceUid, BTreeMap<&'static str, &'static str>);
    impl AgentAttributes for A {
        fn uid(&self) -> &InstanceUid {
            &self.0
        }
        fn attribute(&self, key: &str) -> Option<&str> {
            self.1.get(key).copied()
        }
    }

    #[test]
    fn selectors() {
        let uid = InstanceUid::Uuid([7; 16]);
        let agent = A(
            uid.clone(),
            BTreeMap::from([("service.name", "gw"), ("host.name", "edge-1")]),
        );
        assert!(Selector::default().matches(&agent));
        let mut s = Selector::default();
        s.match_attributes.insert("service.name".into(), "gw".into());
        assert!(s.matches(&agent));
        s.match_expressions.push(Expression {
            key: "host.name".into(),
            operator: Operator::In,
            values: vec!["edge-2".into()],
        });
        assert!(!s.matches(&agent));
        s.match_expressions.clear();
        s.instance_uids.push(InstanceUid::Uuid([8; 16]));
        assert!(!s.matches(&agent), "a uid list the agent is not in excludes it");
        s.instance_uids.push(uid);
        assert!(s.matches(&agent));
        let absent = Selector {
            match_expressions: vec![Expression {
                key: "zone".into(),
                operator: Operator::DoesNotExist,
                values: vec![],
            }],
            ..Default::default()
        };
        assert!(absent.matches(&agent));
        let not_in = Selector {
            match_expressions: vec![Expression {
                key: "zone".into(),
                operator: Operator::NotIn,
                values: vec!["a".into()],
            }],
            ..Default::default()
        };
        assert!(
            not_in.matches(&agent),
            "NotIn holds for a missing key, as in Kubernetes"
        );
    }
}
