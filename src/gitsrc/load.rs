//! The bridge from a commit's files to a `DesiredState`.
//!
//! Interim: reads groups and their config maps with minimal checks until the
//! desired-state loader (`desired::load`) is available; then this becomes a
//! call to it that turns its errors into `path:line:column: message` lines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::desired::{ConfigBundle, ConfigFile, DesiredState, FileSource, Group, RolloutPolicy, Selector, SourceError};
use crate::model::{CommitId, GroupName};

/// The outer error is a failure to read the source (retried later); the inner
/// one lists what is wrong with the content (the commit is rejected).
pub(crate) fn load(
    source: &dyn FileSource,
    commit: CommitId,
) -> Result<Result<DesiredState, Vec<String>>, SourceError> {
    let mut errors = Vec::new();
    let mut groups = BTreeMap::new();
    let names = source.list("groups")?;
    for file in names {
        let Some(stem) = file.strip_suffix(".yaml").or_else(|| file.strip_suffix(".yml")) else {
            continue;
        };
        let path = format!("groups/{file}");
        let Some(body) = source.read(&path)? else {
            continue;
        };
        let value: serde_yaml_ng::Value = match serde_yaml_ng::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                let (line, col) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
                errors.push(format!("{path}:{line}:{col}: {e}"));
                continue;
            }
        };
        let mut files = BTreeMap::new();
        let config = value.get("config").and_then(|c| c.as_mapping());
        for (key, file_path) in config.into_iter().flatten() {
            let (Some(key), Some(file_path)) = (key.as_str(), file_path.as_str()) else {
                errors.push(format!("{path}:0:0: config keys and paths must be strings"));
                continue;
            };
            match source.read(file_path)? {
                Some(body) => {
                    let content_type = if file_path.ends_with(".json") {
                        "application/json"
                    } else {
                        "text/yaml"
                    };
                    files.insert(
                        key.to_string(),
                        ConfigFile {
                            content_type: content_type.to_string(),
                            body: Bytes::from(body),
                        },
                    );
                }
                None => errors.push(format!("{path}:0:0: config file {file_path} does not exist")),
            }
        }
        if files.is_empty() {
            errors.push(format!("{path}:0:0: the group has no config files"));
        }
        let name = GroupName::new(stem);
        groups.insert(
            name.clone(),
            Group {
                name,
                description: String::new(),
                priority: value.get("priority").and_then(|p| p.as_i64()).unwrap_or(0),
                selector: Selector::default(),
                config: Arc::new(ConfigBundle::new(files)),
                rollout: RolloutPolicy::default(),
            },
        );
    }
    if !errors.is_empty() {
        return Ok(Err(errors));
    }
    Ok(Ok(DesiredState {
        commit: Some(commit),
        groups,
        reconcile_interval: Duration::from_secs(300),
    }))
}
