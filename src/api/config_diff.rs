//! `GET /api/v1/groups/{name}/diff`: a group's config at its stable point
//! and at the commit in force, file by file, with a unified diff. The
//! answer is built by a pure function from the two bundles.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{ApiState, error};
use crate::desired::ConfigBundle;
use crate::desired::diff::unified_diff;
use crate::model::{CommitId, ConfigHash, GroupName};

#[derive(Debug, Serialize)]
pub struct DiffJson {
    pub group: GroupName,
    /// The commit in force, whose config is the target.
    pub commit: Option<CommitId>,
    /// `None` before the group's first rollout completed: every file is new.
    pub stable_hash: Option<ConfigHash>,
    pub config_hash: ConfigHash,
    /// Every file of either side, by name.
    pub files: Vec<FileDiffJson>,
    /// All the files' diffs, one after another; empty when nothing differs.
    pub diff: String,
}

#[derive(Debug, Serialize)]
pub struct FileDiffJson {
    /// The file's key in the config map (empty for a group's only file).
    pub name: String,
    /// The body at the stable point, when the file exists there (UTF-8, lossy).
    pub stable: Option<String>,
    /// The body at the target, when the file exists there.
    pub target: Option<String>,
    /// This file's unified diff; empty when it did not change.
    pub diff: String,
}

/// The diff from `stable` (if any) to `target`.
pub fn config_diff(
    group: &GroupName,
    commit: Option<&CommitId>,
    stable: Option<&ConfigBundle>,
    target: &ConfigBundle,
) -> DiffJson {
    let names: BTreeSet<&String> = stable
        .into_iter()
        .flat_map(|b| b.files().keys())
        .chain(target.files().keys())
        .collect();
    let files: Vec<FileDiffJson> = names
        .into_iter()
        .map(|name| {
            let old = stable.and_then(|b| b.files().get(name)).map(|f| &f.body[..]);
            let new = target.files().get(name).map(|f| &f.body[..]);
            let shown = if name.is_empty() { "config" } else { name.as_str() };
            let label = |side: &str, present: bool| {
                if present {
                    format!("{side}/{shown}")
                } else {
                    "/dev/null".to_string()
                }
            };
            FileDiffJson {
                name: name.clone(),
                diff: unified_diff(
                    old.unwrap_or_default(),
                    new.unwrap_or_default(),
                    &label("stable", old.is_some()),
                    &label("target", new.is_some()),
                ),
                stable: old.map(|b| String::from_utf8_lossy(b).into_owned()),
                target: new.map(|b| String::from_utf8_lossy(b).into_owned()),
            }
        })
        .collect();
    DiffJson {
        group: group.clone(),
        commit: commit.cloned(),
        stable_hash: stable.map(|b| b.hash()),
        config_hash: target.hash(),
        diff: files.iter().map(|f| f.diff.as_str()).collect(),
        files,
    }
}

/// `GET /api/v1/groups/{name}/diff`.
pub async fn diff(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    let Some(git) = &state.git else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no repository is configured (serve --repo)",
        );
    };
    let group = GroupName::new(name);
    let loaded = git.desired().borrow().clone();
    let Some(loaded) = loaded else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no commit is loaded yet");
    };
    let Some(target) = loaded.desired.groups.get(&group) else {
        return error(StatusCode::NOT_FOUND, &format!("no group {group} at the loaded commit"));
    };
    let status = state.driver.as_ref().map(|d| d.status());
    let stable = status.as_ref().and_then(|s| s.stable.get(&group));
    Json(config_diff(
        &group,
        Some(&loaded.commit),
        stable.map(|b| &**b),
        &target.config,
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(files: &[(&str, &str)]) -> ConfigBundle {
        ConfigBundle::yaml(files)
    }

    #[test]
    fn files_of_both_sides_each_with_its_diff() {
        let group = GroupName::new("edge");
        let stable = bundle(&[("", "a: 1\nb: 2\n"), ("old.yaml", "x: 1\n")]);
        let target = bundle(&[("", "a: 1\nb: 3\n"), ("new.yaml", "y: 1\n")]);
        let d = config_diff(&group, None, Some(&stable), &target);
        let names: Vec<&str> = d.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["", "new.yaml", "old.yaml"]);
        assert!(
            d.files[0].diff.contains("--- stable/config\n+++ target/config\n"),
            "{}",
            d.files[0].diff
        );
        assert!(d.files[0].diff.contains("-b: 2\n+b: 3\n"));
        assert_eq!(
            (d.files[1].stable.as_deref(), d.files[1].target.as_deref()),
            (None, Some("y: 1\n"))
        );
        assert!(d.files[1].diff.starts_with("--- /dev/null\n+++ target/new.yaml\n"));
        assert!(d.files[2].diff.contains("+++ /dev/null\n"));
        assert_eq!(
            d.diff,
            format!("{}{}{}", d.files[0].diff, d.files[1].diff, d.files[2].diff)
        );
        assert_eq!((d.stable_hash, d.config_hash), (Some(stable.hash()), target.hash()));
    }

    #[test]
    fn no_stable_point_shows_every_file_as_new_and_equal_sides_show_no_diff() {
        let group = GroupName::new("edge");
        let target = bundle(&[("", "a: 1\n")]);
        let d = config_diff(&group, None, None, &target);
        assert_eq!(d.stable_hash, None);
        assert!(d.diff.contains("+a: 1\n"));
        let same = config_diff(&group, None, Some(&target), &target);
        assert_eq!(same.diff, "");
        assert_eq!(same.files[0].stable, same.files[0].target);
    }
}
