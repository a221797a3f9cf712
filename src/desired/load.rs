//! The repository compiled into a validated [`DesiredState`]: `fleet.yaml`,
//! then every group file, then each group's config files, every problem
//! collected (see [`super::read`]) and reported at once, sorted. What each
//! file may hold is in [`super::schema`]; the bundles are built in
//! [`super::bundle`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::bundle::{FileCache, Findings, finish_group, report_findings};
use super::merged::MergedConfig;
use super::read::Cx;
use super::schema::{
    DEFAULT_RECONCILE_INTERVAL, check_duplicate_selectors, compile_fleet, compile_group, valid_group_name,
};
use super::{DesiredState, Diagnostic, FileSource, RolloutPolicy, SourceError};
use crate::model::{CommitId, GroupName};

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
/// The largest file the controller reads from a repository: a config file
/// this big is a mistake, and parsing it costs about ten times its size.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// The largest config one group may send: every agent of the group receives
/// its files in one OpAMP message, which agents refuse above their own limit
/// (16 MiB for this controller and the usual clients).
pub const MAX_CONFIG_BYTES: usize = 8 << 20;
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

    let mut files = FileCache::default();
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

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
