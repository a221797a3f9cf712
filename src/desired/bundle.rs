//! Building each group's config bundle: reading the config files its group
//! file names (each once, however many groups share it), checking them as
//! the one collector config the supervisor will merge, and the finished
//! [`Group`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::collector;
use super::read::Cx;
use super::schema::Draft;
use super::yaml::{Mark, Node};
use super::{ConfigBundle, ConfigFile, FileSource, Group, SourceError};
use crate::model::GroupName;

/// Config files read so far, by repository path, shared between groups.
#[derive(Default)]
pub(super) struct FileCache {
    pub(super) bodies: HashMap<String, Option<Bytes>>,
    pub(super) parsed: HashMap<String, Option<Arc<Node>>>,
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
pub(super) type Findings = BTreeMap<(Mark, String), BTreeSet<Option<GroupName>>>;

pub(super) fn report_findings(cx: &mut Cx, findings: Findings) {
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

/// A group's merged config, kept for [`super::load_merged`].
pub(super) struct MergedDraft {
    pub(super) group: GroupName,
    pub(super) group_file: u32,
    pub(super) files: Vec<Arc<Node>>,
    pub(super) root: Node,
}

/// Reads the group's config files, checks them as one collector config and
/// builds the group (when everything about it is valid). Keeps the merged
/// config in `merged` when given.
pub(super) fn finish_group(
    cx: &mut Cx,
    source: &dyn FileSource,
    files: &mut FileCache,
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
            None if cx.refuse_link(source, &r.path) => {
                complete = false;
                continue;
            }
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
    let size: usize = bundle.values().map(|f: &ConfigFile| f.body.len()).sum();
    if size > super::MAX_CONFIG_BYTES {
        cx.error(
            d.config_mark,
            format!(
                "config: the group's files total {}, over the limit of {} that agents are sent in one message",
                super::read::mib(size),
                super::read::mib(super::MAX_CONFIG_BYTES)
            ),
        );
        complete = false;
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
        config_paths: d.config.into_iter().map(|r| (r.key, r.path)).collect(),
        rollout: d.rollout,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(content_type("a/b.yaml"), "text/yaml");
        assert_eq!(content_type("b.YML"), "text/yaml");
        assert_eq!(content_type("b.json"), "application/json");
        assert_eq!(content_type("b.conf"), "text/plain");
        assert_eq!(content_type("dir.yaml/b"), "text/plain");
    }
}
