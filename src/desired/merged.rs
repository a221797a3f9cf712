//! A group's config as its collectors will read it: the group's files merged
//! the way the supervisor merges them and written back as YAML, with the
//! environment variables it references; and a collector's refusal of it
//! traced back to the file and line that define what the collector names.
//! Pure: running the collector is the caller's business.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::Diagnostic;
use super::yaml::{self, Mark, Node, Value};
use crate::model::GroupName;

/// Top-level sections whose entries are components.
const SECTIONS: &[&str] = &["receivers", "processors", "exporters", "connectors", "extensions"];

/// One group's config files merged into the config the supervisor builds
/// from them (before it adds its own layers: the OpAMP extension and the
/// collector's own telemetry).
#[derive(Debug, Clone)]
pub struct MergedConfig {
    group: GroupName,
    group_file: String,
    /// The group's parsed files in merge order (named files sorted, `""` last).
    files: Vec<Arc<Node>>,
    root: Node,
    /// Repository paths by the `src` of a [`Mark`].
    paths: Arc<[String]>,
}

/// Why a collector refused a group's merged config, and where to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The group's file (`groups/<name>.yaml`).
    pub group_file: String,
    /// The collector's message on one line, without its `Error: ` prefix.
    pub message: String,
    /// Each part of the config the message names (a component, a pipeline),
    /// at the key that defines it in the last file that does, with the part
    /// of the message about it.
    pub located: Vec<Diagnostic>,
}

impl MergedConfig {
    pub(super) fn new(
        group: GroupName,
        group_file: String,
        files: Vec<Arc<Node>>,
        root: Node,
        paths: Arc<[String]>,
    ) -> Self {
        MergedConfig {
            group,
            group_file,
            files,
            root,
            paths,
        }
    }

    pub fn group(&self) -> &GroupName {
        &self.group
    }

    /// The repository path of the group's file.
    pub fn group_file(&self) -> &str {
        &self.group_file
    }

    /// The merged config as YAML, values as the files wrote them
    /// (`${env:NAME}` references included, for the collector to expand).
    pub fn yaml(&self) -> String {
        yaml::emit(&self.root)
    }

    /// The environment variables the config's values reference without a
    /// default, as the collector expands them: `${env:NAME}` and `${NAME}`
    /// (`$${...}` is an escaped `${...}`; `${env:NAME:-default}` has a
    /// default; other schemes such as `${file:...}` are not variables).
    pub fn env_vars(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        scalars(&self.root, &mut |text| env_refs(text, &mut out));
        out
    }

    /// Reads what the collector printed when it refused this config (its
    /// `validate` command's stderr) and finds, for each component or other
    /// part of the config it names, the file and line that define it.
    pub fn refusal(&self, output: &str) -> Refusal {
        let lines: Vec<&str> = output.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        // Anything printed before the error (warnings, logs) is not the reason.
        let start = lines.iter().position(|l| l.starts_with("Error: ")).unwrap_or(0);
        let mut lines = lines[start..].to_vec();
        if let Some(first) = lines.first_mut() {
            *first = first.strip_prefix("Error: ").unwrap_or(first);
        }
        let message = if lines.is_empty() {
            "(the collector gave no reason)".to_string()
        } else {
            lines.join(" ")
        };

        let mut fragments: Vec<(Head, Vec<&str>)> = Vec::new();
        for line in lines {
            match self.head(line) {
                Some(head) => fragments.push((head, vec![line])),
                None => {
                    if let Some((_, text)) = fragments.last_mut() {
                        text.push(line);
                    }
                }
            }
        }
        let mut located = Vec::new();
        for (head, text) in fragments {
            let text = text.join(" ");
            for path in &head.paths {
                let Some(mark) = self.locate(path) else {
                    continue;
                };
                let about = if head.names_itself {
                    text.clone()
                } else {
                    format!("{}: {text}", path.join("::"))
                };
                let d = Diagnostic {
                    path: self.paths.get(mark.src as usize).cloned().unwrap_or_default(),
                    line: mark.line as usize,
                    column: mark.column as usize,
                    message: format!("{about} (group {:?})", self.group.as_str()),
                };
                if !located.contains(&d) {
                    located.push(d);
                }
            }
        }
        Refusal {
            group_file: self.group_file.clone(),
            message,
            located,
        }
    }

    /// Whether `line` starts a new error about a part of the config, and
    /// which: `processors::batch: ...` (the collector's validation, one line
    /// per component), `'exporters' error reading configuration for "debug":
    /// ...` and `'receivers' unknown type: "x" for id: "x" ...` (decoding,
    /// where the lines that follow belong to it), `'service.telemetry.logs'
    /// ...`, `'otelcol.configSettings' has invalid keys: a, b`.
    fn head(&self, line: &str) -> Option<Head> {
        let Some(quoted) = line.strip_prefix('\'') else {
            // `processors::nope: ...` about a component the config lacks
            // names no key worth pointing at: `processors` is not the problem.
            let path = walk(&self.root, line, "::");
            return (path.len() >= 2).then(|| Head {
                paths: vec![path],
                names_itself: true,
            });
        };
        let (name, after) = quoted.split_once('\'')?;
        let invalid_keys = |base: Vec<String>| -> Vec<Vec<String>> {
            match after.strip_prefix(" has invalid keys: ") {
                Some(keys) => keys
                    .split(", ")
                    .map(|k| base.iter().cloned().chain([k.trim().to_string()]).collect())
                    .collect(),
                None => vec![base],
            }
        };
        let paths = if SECTIONS.contains(&name) {
            let id = after
                .split_once(" for id: \"")
                .or_else(|| after.split_once(" error reading configuration for \""))
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(id, _)| id.to_string());
            vec![[name.to_string()].into_iter().chain(id).collect()]
        } else if name == "otelcol.configSettings" {
            invalid_keys(Vec::new())
        } else if name == "service" || name.starts_with("service.") {
            invalid_keys(walk(&self.root, name, "."))
        } else {
            return None;
        };
        Some(Head {
            paths,
            names_itself: false,
        })
    }

    /// Where `path` is defined: its last key in the last file (in merge
    /// order) that has the whole path, since that file's settings win.
    fn locate(&self, path: &[String]) -> Option<Mark> {
        if path.is_empty() {
            return None;
        }
        let mut found = None;
        for file in &self.files {
            let mut node = file.as_ref();
            let mut mark = None;
            for key in path {
                match node.get(key) {
                    Some(e) => {
                        mark = Some(e.key_mark);
                        node = &e.value;
                    }
                    None => {
                        mark = None;
                        break;
                    }
                }
            }
            found = mark.or(found);
        }
        found
    }
}

impl Refusal {
    /// The lines `validate --collector` prints: the group with the whole
    /// message, then each located part. Paths are relative to the
    /// repository root, for a repository under `subdir` (`--path`).
    pub fn lines(&self, subdir: Option<&str>) -> Vec<String> {
        let group_file = match subdir {
            Some(s) => format!("{s}/{}", self.group_file),
            None => self.group_file.clone(),
        };
        let mut out = vec![format!(
            "{group_file}: collector refuses the merged config: {}",
            self.message
        )];
        out.extend(self.located.iter().map(|d| d.under(subdir)));
        out
    }
}

/// The start of an error about parts of the config.
struct Head {
    /// Each part as its keys from the top (`["exporters", "debug"]`).
    paths: Vec<Vec<String>>,
    /// Whether the text starts with the part's path already
    /// (`exporters::debug: ...`), rather than needing it as a prefix.
    names_itself: bool,
}

/// The keys of `tree` that `text` names, from the top, separated by `sep`
/// (`service::pipelines::traces/2: references...` names
/// `["service", "pipelines", "traces/2"]`). Guided by the tree because keys
/// may hold the separator's characters (`otlp/a:b`, `a.b`): at each level the
/// longest key that `text` continues with and that ends at a separator, a
/// `:` or the end of the text.
fn walk(tree: &Node, text: &str, sep: &str) -> Vec<String> {
    let mut node = tree;
    let mut rest = text;
    let mut path = Vec::new();
    while let Some(entries) = node.as_map() {
        let best = entries
            .iter()
            .filter(|e| {
                rest.strip_prefix(e.key.as_str())
                    .is_some_and(|after| after.is_empty() || after.starts_with(sep) || after.starts_with(':'))
            })
            .max_by_key(|e| e.key.len());
        let Some(e) = best else {
            break;
        };
        path.push(e.key.clone());
        match rest[e.key.len()..].strip_prefix(sep) {
            Some(after) => {
                rest = after;
                node = &e.value;
            }
            None => break,
        }
    }
    path
}

/// Calls `f` with the text of every scalar value (not keys) in the tree.
fn scalars(node: &Node, f: &mut impl FnMut(&str)) {
    match &node.value {
        Value::Null => {}
        Value::Scalar { text, .. } => f(text),
        Value::Seq(items) => items.iter().for_each(|n| scalars(n, f)),
        Value::Map(entries) => entries.iter().for_each(|e| scalars(&e.value, f)),
    }
}

/// Adds the environment variables `text` references without a default.
fn env_refs(text: &str, out: &mut BTreeSet<String>) {
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            rest = escaped;
            continue;
        }
        let Some(inner) = after.strip_prefix('{') else {
            rest = after;
            continue;
        };
        let Some(end) = inner.find('}') else {
            break;
        };
        let reference = &inner[..end];
        rest = &inner[end + 1..];
        let name = match reference.split_once(':') {
            Some(("env", name)) => name,
            Some(_) => continue,
            None => reference,
        };
        if name.contains(":-") {
            continue;
        }
        let b = name.as_bytes();
        let valid = b.first().is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if valid {
            out.insert(name.to_string());
        }
    }
}

#[cfg(test)]
#[path = "merged_tests.rs"]
mod tests;
