//! Reading the repository's files: each YAML file parsed into a
//! position-aware tree (see [`super::yaml`]) and read node by node into
//! values, every problem collected with its file, line and column instead of
//! stopping at the first, so one `validate` run shows them all.

use std::time::Duration;

use super::yaml::{self, Mark, Node, Value};
use super::{Amount, Diagnostic, FileSource, SourceError};

/// The collected problems, and the paths that marks' `src` numbers stand for.
#[derive(Default)]
pub(super) struct Cx {
    pub(super) paths: Vec<String>,
    pub(super) diags: Vec<Diagnostic>,
}

impl Cx {
    pub(super) fn error(&mut self, mark: Mark, message: impl Into<String>) {
        let path = self.paths.get(mark.src as usize).cloned().unwrap_or_default();
        self.diags.push(Diagnostic {
            path,
            line: mark.line as usize,
            column: mark.column as usize,
            message: message.into(),
        });
    }

    /// A problem with a whole file, reported at its first line.
    pub(super) fn error_in(&mut self, path: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            path: path.to_string(),
            line: 1,
            column: 1,
            message: message.into(),
        });
    }

    /// Reads and parses a YAML file; `None` when it does not exist or is not
    /// valid YAML (the latter reported).
    pub(super) fn read_yaml(&mut self, source: &dyn FileSource, path: &str) -> Result<Option<Node>, SourceError> {
        if self.refuse_link(source, path) {
            return Ok(None);
        }
        Ok(match source.read(path)? {
            Some(bytes) => self.parse(path, &bytes),
            None => None,
        })
    }

    /// Reports `path` when it is a symbolic link; true then.
    pub(super) fn refuse_link(&mut self, source: &dyn FileSource, path: &str) -> bool {
        let Some(target) = source.link(path) else {
            return false;
        };
        self.error_in(
            path,
            format!(
                "a symbolic link (to {target}): git commits the link, not the file, and the controller \
                 reads no links; put the file itself here"
            ),
        );
        true
    }

    pub(super) fn parse(&mut self, path: &str, bytes: &[u8]) -> Option<Node> {
        if bytes.len() > super::MAX_FILE_BYTES {
            self.error_in(
                path,
                format!(
                    "the file is {}, over the limit of {} for a file of the repository",
                    mib(bytes.len()),
                    mib(super::MAX_FILE_BYTES)
                ),
            );
            return None;
        }
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

/// A size in MiB, as people read it: `8 MiB`, `12.5 MiB`.
pub(super) fn mib(bytes: usize) -> String {
    let m = bytes as f64 / (1 << 20) as f64;
    if m.fract() == 0.0 {
        format!("{m} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}

/// `parent.key`, or `key` at the top.
pub(super) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The entries of a mapping (any keys). A null node reads as an empty mapping.
pub(super) fn entries_of<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<&'n [yaml::Entry]> {
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
pub(super) fn mapping<'n>(cx: &mut Cx, node: &'n Node, path: &str, allowed: &[&str]) -> Option<&'n [yaml::Entry]> {
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
pub(super) fn missing(cx: &mut Cx, at: Mark, parent: &str, key: &str) {
    let message = if parent.is_empty() {
        format!("missing key {key:?}")
    } else {
        format!("{parent}: missing key {key:?}")
    };
    cx.error(at, message);
}

pub(super) fn field<'n>(entries: &'n [yaml::Entry], key: &str) -> Option<&'n yaml::Entry> {
    entries.iter().find(|e| e.key == key)
}

pub(super) fn string(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
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

pub(super) fn integer(cx: &mut Cx, node: &Node, path: &str) -> Option<i64> {
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

pub(super) fn list<'n>(cx: &mut Cx, node: &'n Node, path: &str) -> Option<&'n [Node]> {
    match &node.value {
        Value::Null => Some(&[]),
        Value::Seq(items) => Some(items),
        _ => {
            cx.error(node.mark, format!("{path}: expected a list, found {}", node.describe()));
            None
        }
    }
}

pub(super) fn duration(cx: &mut Cx, node: &Node, path: &str, allow_zero: bool) -> Option<Duration> {
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
pub(super) fn amount(cx: &mut Cx, node: &Node, path: &str) -> Option<Amount> {
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
