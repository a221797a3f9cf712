//! A group's config files merged the way the OpAMP supervisor merges them,
//! then checked as an OpenTelemetry Collector config: component ids well
//! formed, every component a pipeline or `service.extensions` names defined,
//! at least one pipeline. Every merged value keeps the position of the file
//! that contributed it, so problems point at the line to fix.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;

use super::yaml::{Entry, Mark, Node, Value, decodes_as_string};

/// Component kinds defined at the top level of a collector config.
const SECTIONS: &[&str] = &["receivers", "processors", "exporters", "connectors", "extensions"];
const SIGNALS: &[&str] = &["traces", "metrics", "logs", "profiles"];

type Id = (String, String);

/// One problem found in a group's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finding {
    pub mark: Mark,
    pub message: String,
    /// Whether it depends on how the group's files merged (and so on the
    /// group), rather than on one file alone: the loader names the groups.
    pub merged: bool,
}

/// Merges `files` (already in the supervisor's order: named files sorted,
/// then `""`) and checks the result; returns the merged config and what is
/// wrong with it. `fallback` is where to report a problem no file contributed
/// to (the group's `config:` key).
pub(super) fn check(files: &[&Node], fallback: Mark) -> (Node, Vec<Finding>) {
    let mut out = Vec::new();
    let mut merged: Option<Node> = None;
    for file in files {
        match &file.value {
            Value::Null => {}
            Value::Map(_) => {
                merged = Some(match merged.take() {
                    Some(base) => merge(base, (*file).clone()),
                    None => (*file).clone(),
                });
            }
            _ => out.push(Finding {
                mark: file.mark,
                message: format!("expected a mapping at the top level, found {}", file.describe()),
                merged: false,
            }),
        }
    }
    let root = merged.unwrap_or(Node {
        mark: fallback,
        value: Value::Map(Vec::new()),
    });
    Checker {
        fallback,
        out: &mut out,
    }
    .run(&root);
    (root, out)
}

/// Merges `over` (a later file) into `base` as the supervisor's
/// `configMergeFunc` does: maps merge key by key, recursively; anything else
/// in `over` replaces what `base` had, lists included, except
/// `service.extensions`. When both have a list there, the result is `base`'s
/// items then `over`'s, each kept once in the order first seen (the
/// supervisor's workaround for collector issue 8754).
pub(super) fn merge(base: Node, over: Node) -> Node {
    let earlier = service_extensions(&base).map(<[Node]>::to_vec);
    let later = service_extensions(&over).map(<[Node]>::to_vec);
    let mut merged = merge_deep(base, over);
    if let (Some(mut items), Some(more)) = (earlier, later)
        && let Some(list) = service_extensions_mut(&mut merged)
    {
        items.extend(more);
        let mut kept: Vec<Node> = Vec::with_capacity(items.len());
        for item in items {
            if !kept.iter().any(|k| same_item(k, &item)) {
                kept.push(item);
            }
        }
        *list = kept;
    }
    merged
}

fn merge_deep(base: Node, over: Node) -> Node {
    match (base.value, over.value) {
        (Value::Map(mut entries), Value::Map(more)) => {
            for e in more {
                match entries.iter_mut().find(|x| x.key == e.key) {
                    Some(slot) if slot.value.as_map().is_some() && e.value.as_map().is_some() => {
                        let old = std::mem::replace(&mut slot.value, null(e.value.mark));
                        slot.value = merge_deep(old, e.value);
                    }
                    Some(slot) => *slot = e,
                    None => entries.push(e),
                }
            }
            Node {
                mark: base.mark,
                value: Value::Map(entries),
            }
        }
        (_, value) => Node { mark: over.mark, value },
    }
}

fn service_extensions(root: &Node) -> Option<&[Node]> {
    root.get("service")?.value.get("extensions")?.value.as_seq()
}

fn service_extensions_mut(root: &mut Node) -> Option<&mut Vec<Node>> {
    let Value::Map(top) = &mut root.value else {
        return None;
    };
    let service = top.iter_mut().find(|e| e.key == "service")?;
    let Value::Map(entries) = &mut service.value.value else {
        return None;
    };
    match &mut entries.iter_mut().find(|e| e.key == "extensions")?.value.value {
        Value::Seq(items) => Some(items),
        _ => None,
    }
}

/// Whether two list items are the same value once decoded, as the supervisor
/// compares them: `pprof` and `"pprof"` are one string; `1` (a number) and
/// `"1"` (a string) differ; plain numbers and booleans compare as written.
/// Lists and mappings are never the same (the supervisor cannot compare them
/// at all; the checks below refuse them as extension ids anyway).
fn same_item(a: &Node, b: &Node) -> bool {
    match (&a.value, &b.value) {
        (Value::Null, Value::Null) => true,
        (Value::Scalar { text: x, plain: px }, Value::Scalar { text: y, plain: py }) => {
            x == y && (*px && !decodes_as_string(x)) == (*py && !decodes_as_string(y))
        }
        _ => false,
    }
}

fn null(mark: Mark) -> Node {
    Node {
        mark,
        value: Value::Null,
    }
}

struct Checker<'a> {
    fallback: Mark,
    out: &'a mut Vec<Finding>,
}

impl Checker<'_> {
    /// A problem that depends on how the group's files merged.
    fn merged_error(&mut self, mark: Mark, message: String) {
        self.out.push(Finding {
            mark,
            message,
            merged: true,
        });
    }

    /// A problem with one file's own text.
    fn file_error(&mut self, mark: Mark, message: String) {
        self.out.push(Finding {
            mark,
            message,
            merged: false,
        });
    }

    fn run(&mut self, root: &Node) {
        let mut defined: [BTreeSet<Id>; 5] = Default::default();
        for (kind, ids) in SECTIONS.iter().zip(defined.iter_mut()) {
            for e in self.section(root, kind) {
                match parse_id(&e.key) {
                    Ok(id) => {
                        ids.insert(id);
                    }
                    Err(why) => {
                        self.file_error(e.key_mark, format!("{kind}[{:?}]: invalid component id: {why}", e.key))
                    }
                }
            }
        }
        let [receivers, processors, exporters, connectors, extensions] = &defined;
        let sources: BTreeSet<Id> = receivers.union(connectors).cloned().collect();
        let sinks: BTreeSet<Id> = exporters.union(connectors).cloned().collect();

        let service = root.get("service");
        let service_node = service.map(|e| &e.value);
        if let Some(s) = service_node
            && !s.is_null()
            && s.as_map().is_none()
        {
            self.merged_error(s.mark, format!("service: expected a mapping, found {}", s.describe()));
            return;
        }
        if let Some(e) = service_node.and_then(|s| s.get("extensions")) {
            let refs = Ref {
                what: "extension",
                defined_under: "extensions",
            };
            self.references(&e.value, "service.extensions", &refs, extensions);
        }

        let pipelines = service_node.and_then(|s| s.get("pipelines"));
        let entries = match pipelines.map(|e| &e.value.value) {
            Some(Value::Map(entries)) => entries.as_slice(),
            Some(Value::Null) | None => &[],
            Some(_) => {
                let node = pipelines.map_or(&root.mark, |e| &e.value.mark);
                let message = format!(
                    "service.pipelines: expected a mapping, found {}",
                    pipelines.map_or_else(String::new, |e| e.value.describe())
                );
                self.merged_error(*node, message);
                return;
            }
        };
        if entries.is_empty() {
            let at = pipelines.or(service).map_or(self.fallback, |e| e.key_mark);
            self.merged_error(at, "service.pipelines: no pipeline is defined".to_string());
        }
        for p in entries {
            self.pipeline(p, &sources, processors, &sinks);
        }
    }

    /// The entries of a top-level section; reports one that is not a mapping.
    fn section<'n>(&mut self, root: &'n Node, kind: &str) -> &'n [Entry] {
        match root.get(kind).map(|e| &e.value) {
            Some(Node {
                value: Value::Map(entries),
                ..
            }) => entries,
            Some(n) if !n.is_null() => {
                self.merged_error(n.mark, format!("{kind}: expected a mapping, found {}", n.describe()));
                &[]
            }
            _ => &[],
        }
    }

    fn pipeline(&mut self, p: &Entry, sources: &BTreeSet<Id>, processors: &BTreeSet<Id>, sinks: &BTreeSet<Id>) {
        let path = format!("service.pipelines[{:?}]", p.key);
        if let Err(why) = parse_pipeline_id(&p.key) {
            self.file_error(p.key_mark, format!("{path}: invalid pipeline id: {why}"));
        }
        let entries = match &p.value.value {
            Value::Map(entries) => entries.as_slice(),
            Value::Null => &[],
            _ => {
                let message = format!("{path}: expected a mapping, found {}", p.value.describe());
                self.merged_error(p.value.mark, message);
                return;
            }
        };
        for e in entries {
            if !matches!(e.key.as_str(), "receivers" | "processors" | "exporters") {
                self.merged_error(
                    e.key_mark,
                    format!(
                        "{path}.{}: unknown key (expected one of: receivers, processors, exporters)",
                        e.key
                    ),
                );
            }
        }
        let kinds = [
            ("receivers", "receiver", "receivers or connectors", sources, true),
            ("processors", "processor", "processors", processors, false),
            ("exporters", "exporter", "exporters or connectors", sinks, true),
        ];
        for (key, what, defined_under, defined, required) in kinds {
            let refs = Ref { what, defined_under };
            match p.value.get(key) {
                Some(e) => {
                    let listed = self.references(&e.value, &format!("{path}.{key}"), &refs, defined);
                    if required && listed == Some(0) {
                        self.merged_error(e.value.mark, format!("{path}.{key}: needs at least one {what}"));
                    }
                }
                None if required => {
                    self.merged_error(p.key_mark, format!("{path}: needs at least one {what}"));
                }
                None => {}
            }
        }
    }

    /// Checks a list of component ids against those `defined`; returns its
    /// length, or `None` when it is not a list.
    fn references(&mut self, node: &Node, path: &str, refs: &Ref, defined: &BTreeSet<Id>) -> Option<usize> {
        let items = match &node.value {
            Value::Seq(items) => items.as_slice(),
            Value::Null => &[],
            _ => {
                self.merged_error(node.mark, format!("{path}: expected a list, found {}", node.describe()));
                return None;
            }
        };
        for (i, item) in items.iter().enumerate() {
            let Some(text) = item.as_scalar() else {
                let message = format!("{path}[{i}]: expected a component id, found {}", item.describe());
                self.merged_error(item.mark, message);
                continue;
            };
            match parse_id(text) {
                Ok(id) if defined.contains(&id) => {}
                Ok(_) => {
                    let message = format!(
                        "{path}[{i}]: {} {text:?} is not defined under {}",
                        refs.what, refs.defined_under
                    );
                    self.merged_error(item.mark, message);
                }
                Err(why) => self.file_error(item.mark, format!("{path}[{i}]: invalid component id {text:?}: {why}")),
            }
        }
        Some(items.len())
    }
}

struct Ref {
    what: &'static str,
    defined_under: &'static str,
}

/// Names may hold any character but whitespace, control characters and
/// symbols, as the collector's `component.ID` requires.
static NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[^\pZ\pC\pS]+$").expect("a constant regular expression compiles"));

/// `type` or `type/name`, the collector's component id: the type starts with
/// an ASCII letter and holds ASCII letters, digits and `_` (at most 63); the
/// name, after the first `/`, is 1 to 1024 characters without whitespace,
/// control characters or symbols. Both are trimmed of surrounding spaces.
pub(super) fn parse_id(text: &str) -> Result<Id, &'static str> {
    let (kind, name) = match text.split_once('/') {
        Some((kind, name)) => (kind.trim(), Some(name.trim())),
        None => (text.trim(), None),
    };
    let b = kind.as_bytes();
    let type_ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if !type_ok {
        return Err("the type must start with a letter and hold only letters, digits and '_' (at most 63 characters)");
    }
    let name = match name {
        None => String::new(),
        Some("") => return Err("the name after '/' must not be empty"),
        Some(n) if n.len() > 1024 || !NAME.is_match(n) => {
            return Err("the name must not hold spaces, control characters or symbols (at most 1024 characters)");
        }
        Some(n) => n.to_string(),
    };
    Ok((kind.to_string(), name))
}

/// `signal` or `signal/name`, where the signal is a known one.
fn parse_pipeline_id(text: &str) -> Result<(), &'static str> {
    let (signal, _) = parse_id(text)?;
    if SIGNALS.contains(&signal.as_str()) {
        Ok(())
    } else {
        Err("the signal must be traces, metrics, logs or profiles")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::yaml::parse;

    #[test]
    fn component_ids() {
        assert_eq!(parse_id("otlp"), Ok(("otlp".into(), String::new())));
        assert_eq!(parse_id("otlp/edge"), Ok(("otlp".into(), "edge".into())));
        assert_eq!(parse_id(" otlp / edge "), Ok(("otlp".into(), "edge".into())));
        assert_eq!(
            parse_id("k8s_cluster/a.b-c_1"),
            Ok(("k8s_cluster".into(), "a.b-c_1".into()))
        );
        // The name is everything after the first '/', which may hold more.
        assert_eq!(parse_id("otlp/a/b"), Ok(("otlp".into(), "a/b".into())));
        assert_eq!(parse_id("otlp/ünïcode"), Ok(("otlp".into(), "ünïcode".into())));
        for bad in [
            "", "/x", "1otlp", "ot-lp", "otlp/", "otlp/ ", "otlp/a b", "otlp/a+b", "otlp/$x",
        ] {
            assert!(parse_id(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_id(&"a".repeat(63)).is_ok());
        assert!(parse_id(&"a".repeat(64)).is_err());
        assert!(parse_id(&format!("a/{}", "n".repeat(1025))).is_err());
        assert!(parse_pipeline_id("traces/x").is_ok());
        assert!(parse_pipeline_id("trace").is_err());
    }

    #[test]
    fn merge_is_deep_for_maps_and_replaces_lists() {
        let a = parse(0, "x: {a: 1, l: [1, 2], m: {p: 1}}\ny: 1\n").unwrap();
        let b = parse(1, "x: {b: 2, l: [3], m: {q: 2}}\ny: {z: 1}\n").unwrap();
        let m = merge(a, b);
        let x = &m.get("x").unwrap().value;
        assert_eq!(x.get("a").unwrap().value.as_scalar(), Some("1"));
        assert_eq!(x.get("b").unwrap().value.as_scalar(), Some("2"));
        let l = x.get("l").unwrap().value.as_seq().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].mark.src, 1, "the list came from the second file");
        let mm = &x.get("m").unwrap().value;
        assert!(mm.get("p").is_some() && mm.get("q").is_some());
        assert!(m.get("y").unwrap().value.get("z").is_some(), "a map replaces a scalar");
    }

    /// Merges the files in order; `service.extensions` as its items describe
    /// themselves (`"pprof"`), or the node's description when not a list.
    fn merged_extensions(files: &[&str]) -> String {
        let nodes = files.iter().enumerate().map(|(i, f)| parse(i as u32, f).unwrap());
        let root = nodes.reduce(merge).unwrap();
        let node = &root.get("service").unwrap().value.get("extensions").unwrap().value;
        match node.as_seq() {
            Some(items) => {
                let items: Vec<String> = items.iter().map(Node::describe).collect();
                format!("[{}]", items.join(", "))
            }
            None => node.describe(),
        }
    }

    #[test]
    fn service_extensions_are_concatenated_as_the_supervisor_does() {
        let hc_pprof = r#"["health_check", "pprof"]"#;
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "a named file's list, then the main file's",
                &[
                    "service: {extensions: [health_check]}",
                    "service: {extensions: [pprof]}",
                ],
                hc_pprof,
            ),
            (
                "duplicates are dropped, each kept where first seen",
                &[
                    "service: {extensions: [health_check, pprof]}",
                    "service: {extensions: [pprof, opamp, health_check]}",
                ],
                r#"["health_check", "pprof", "opamp"]"#,
            ),
            (
                "duplicates within one list go too once two lists meet",
                &["service: {extensions: [a, a]}", "service: {extensions: [b]}"],
                r#"["a", "b"]"#,
            ),
            (
                "quoted and plain text are one string",
                &[
                    "service: {extensions: [pprof]}",
                    "service: {extensions: ['pprof', \"x\"]}",
                ],
                r#"["pprof", "x"]"#,
            ),
            (
                "a number is not the string of its digits",
                &[
                    "service: {extensions: [1, true]}",
                    "service: {extensions: ['1', 1, 'true']}",
                ],
                r#"["1", "true", "1", "true"]"#,
            ),
            (
                "an empty list adds nothing and removes nothing",
                &["service: {extensions: [a]}", "service: {extensions: []}"],
                r#"["a"]"#,
            ),
            (
                "three files, in order",
                &[
                    "service: {extensions: [a]}",
                    "service: {extensions: [b]}",
                    "service: {extensions: [a, c]}",
                ],
                r#"["a", "b", "c"]"#,
            ),
            (
                "a later file without the list keeps the earlier list",
                &["service: {extensions: [a]}", "service: {pipelines: {}}"],
                r#"["a"]"#,
            ),
            (
                "an earlier file without the list",
                &["extensions: {}", "service: {extensions: [b]}"],
                r#"["b"]"#,
            ),
            (
                "null replaces the list",
                &["service: {extensions: [a]}", "service: {extensions: ~}"],
                "nothing",
            ),
            (
                "a list replaces null",
                &["service: {extensions: ~}", "service: {extensions: [b]}"],
                r#"["b"]"#,
            ),
            (
                "a list replaces a scalar",
                &["service: {extensions: x}", "service: {extensions: [b]}"],
                r#"["b"]"#,
            ),
        ];
        for (name, files, want) in cases {
            assert_eq!(merged_extensions(files), *want, "{name}");
        }
    }

    #[test]
    fn other_lists_are_still_replaced() {
        let a = parse(
            0,
            "service: {pipelines: {traces: {receivers: [a, b]}}}\nx: {service: {extensions: [a]}}\n",
        )
        .unwrap();
        let b = parse(
            1,
            "service: {pipelines: {traces: {receivers: [c]}}}\nx: {service: {extensions: [b]}}\n",
        )
        .unwrap();
        let m = merge(a, b);
        let texts = |n: &Node| -> Vec<String> { n.as_seq().unwrap().iter().map(Node::describe).collect() };
        let pipelines = &m.get("service").unwrap().value.get("pipelines").unwrap().value;
        let receivers = &pipelines.get("traces").unwrap().value.get("receivers").unwrap().value;
        assert_eq!(texts(receivers), ["\"c\""]);
        // Only the top-level service.extensions: a list so named elsewhere is replaced.
        let nested = &m.get("x").unwrap().value.get("service").unwrap().value;
        assert_eq!(texts(&nested.get("extensions").unwrap().value), ["\"b\""]);
    }

    #[test]
    fn merged_extensions_keep_where_each_item_was_written() {
        let a = parse(0, "service:\n  extensions: [health_check]\n").unwrap();
        let b = parse(1, "service:\n  extensions: [pprof, health_check]\n").unwrap();
        let m = merge(a, b);
        let at: Vec<(u32, u32, u32)> = service_extensions(&m)
            .unwrap()
            .iter()
            .map(|n| (n.mark.src, n.mark.line, n.mark.column))
            .collect();
        assert_eq!(at, [(0, 2, 16), (1, 2, 16)]);
    }

    #[test]
    fn concatenated_extensions_are_checked_as_one_list() {
        let named = parse(
            0,
            "extensions: {health_check: {}}\nservice: {extensions: [health_check]}\n",
        )
        .unwrap();
        let main = parse(
            1,
            "receivers: {otlp: {}}\nexporters: {debug: {}}\nservice:\n  extensions: [pprof]\n  \
             pipelines: {traces: {receivers: [otlp], exporters: [debug]}}\n",
        )
        .unwrap();
        let fallback = Mark {
            src: 9,
            line: 1,
            column: 1,
        };
        let (_, found) = check(&[&named, &main], fallback);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].mark.src, found[0].mark.line, found[0].mark.column),
            (1, 4, 16)
        );
        assert_eq!(
            found[0].message,
            "service.extensions[1]: extension \"pprof\" is not defined under extensions"
        );
    }
}
