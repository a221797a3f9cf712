//! YAML text to a tree whose every node and key knows where it was written.
//!
//! The repository format needs a position for every semantic error (a bad
//! duration, a pipeline naming an undefined receiver), which serde-based
//! parsers do not expose. This builds a small tree from the event stream of
//! `yaml-rust2` (a maintained YAML 1.2 parser), keeping scalars as written so
//! that `010` stays `010` and `true` stays `true` when used as text.
//!
//! Anchors, aliases and `<<` merge keys are expanded as the collector's YAML
//! library does; duplicate keys are errors, as they are for the collector.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Where something was written: which source (an index the caller assigns
/// per file) and the 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mark {
    pub src: u32,
    pub line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub mark: Mark,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An empty value, `~` or `null`.
    Null,
    /// Any other scalar, as written. `plain` is false for quoted and block
    /// scalars (and `!!str`), which are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// One key of a mapping. Keys are scalars, kept as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_mark: Mark,
    pub value: Node,
}

/// Why a text is not the YAML this project accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// Nesting deeper than this is refused: nothing legitimate needs it, and it
/// bounds the recursion of every walk over the tree.
const MAX_DEPTH: usize = 128;
/// Node count bound after alias expansion ("billion laughs").
const MAX_NODES: usize = 1_000_000;

impl Node {
    pub fn as_map(&self) -> Option<&[Entry]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The text of a scalar (not of null).
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// The entry for `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.as_map()?.iter().find(|e| e.key == key)
    }

    /// How the node reads in an error message: `a mapping`, `"text"`...
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "nothing".to_string(),
            Value::Scalar { text, .. } => format!("{text:?}"),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }

    fn count(&self) -> usize {
        1 + match &self.value {
            Value::Null | Value::Scalar { .. } => 0,
            Value::Seq(s) => s.iter().map(Node::count).sum(),
            Value::Map(m) => m.iter().map(|e| 1 + e.value.count()).sum(),
        }
    }
}

/// Parses one YAML document. An empty text is a null node at 1:1. Marks in
/// the tree carry `src`.
pub fn parse(src: u32, text: &str) -> Result<Node, YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut b = Builder {
        src,
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        documents: 0,
        nodes: 0,
    };
    loop {
        let (event, marker) = parser.next_token().map_err(|e| YamlError {
            line: e.marker().line() as u32,
            column: e.marker().col() as u32 + 1,
            message: format!("invalid YAML: {}", e.info()),
        })?;
        let mark = b.mark(marker);
        match event {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                b.documents += 1;
                if b.documents > 1 {
                    return Err(b.error(mark, "expected one YAML document, found several"));
                }
            }
            _ => b.event(event, mark)?,
        }
    }
    Ok(b.root.unwrap_or(Node {
        mark: Mark {
            src,
            line: 1,
            column: 1,
        },
        value: Value::Null,
    }))
}

enum Frame {
    Seq {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        mark: Mark,
        anchor: usize,
        entries: Vec<Entry>,
        /// Where each key was first written, so a duplicate is found in
        /// constant time however large the mapping is.
        lines: HashMap<String, u32>,
        /// `<<` values, merged in when the mapping ends.
        merges: Vec<Node>,
        /// The key read, waiting for its value; `bool` is "a plain `<<`".
        key: Option<(String, Mark, bool)>,
    },
}

struct Builder {
    src: u32,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    nodes: usize,
}

impl Builder {
    fn mark(&self, m: Marker) -> Mark {
        Mark {
            src: self.src,
            line: m.line() as u32,
            column: m.col() as u32 + 1,
        }
    }

    fn error(&self, mark: Mark, message: &str) -> YamlError {
        YamlError {
            line: mark.line,
            column: mark.column,
            message: message.to_string(),
        }
    }

    fn event(&mut self, event: Event, mark: Mark) -> Result<(), YamlError> {
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                if let Some(message) = tag.as_ref().and_then(|t| tag_misfit(t, &text)) {
                    return Err(self.error(mark, &message));
                }
                let value = scalar_value(text, style, tag.as_ref());
                self.finish(Node { mark, value }, anchor)
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(node) => {
                    let mut node = node.clone();
                    node.mark = mark;
                    self.nodes += node.count();
                    if self.nodes > MAX_NODES {
                        return Err(self.error(mark, "too many nodes after expanding aliases"));
                    }
                    self.finish(node, 0)
                }
                None => Err(self.error(mark, "alias to an unknown anchor")),
            },
            Event::SequenceStart(anchor, _) => self.open(
                Frame::Seq {
                    mark,
                    anchor,
                    items: Vec::new(),
                },
                mark,
            ),
            Event::MappingStart(anchor, _) => self.open(
                Frame::Map {
                    mark,
                    anchor,
                    entries: Vec::new(),
                    lines: HashMap::new(),
                    merges: Vec::new(),
                    key: None,
                },
                mark,
            ),
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Seq { mark, anchor, items }) => self.finish(
                    Node {
                        mark,
                        value: Value::Seq(items),
                    },
                    anchor,
                ),
                Some(Frame::Map {
                    mark,
                    anchor,
                    entries,
                    merges,
                    ..
                }) => {
                    let entries = apply_merges(entries, merges).map_err(|(m, msg)| self.error(m, &msg))?;
                    self.finish(
                        Node {
                            mark,
                            value: Value::Map(entries),
                        },
                        anchor,
                    )
                }
                None => Err(self.error(mark, "unbalanced YAML structure")),
            },
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => Ok(()),
            Event::StreamEnd | Event::DocumentStart => Ok(()),
        }
    }

    fn open(&mut self, frame: Frame, mark: Mark) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.error(mark, "YAML nested too deeply"));
        }
        if let Some(Frame::Map { key: None, .. }) = self.stack.last() {
            return Err(self.error(mark, "mapping keys must be strings, not lists or mappings"));
        }
        self.stack.push(frame);
        Ok(())
    }

    /// Places a complete node in its parent (or as the root).
    fn finish(&mut self, node: Node, anchor: usize) -> Result<(), YamlError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.error(node.mark, "too many nodes after expanding aliases"));
        }
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                Ok(())
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node);
                Ok(())
            }
            Some(Frame::Map {
                entries,
                lines,
                merges,
                key,
                ..
            }) => match key.take() {
                None => {
                    let (text, merge) = match node.value {
                        Value::Null => (String::new(), false),
                        Value::Scalar { text, plain } => {
                            let merge = plain && text == "<<";
                            (text, merge)
                        }
                        Value::Seq(_) | Value::Map(_) => {
                            return Err(self.error(node.mark, "mapping keys must be strings, not lists or mappings"));
                        }
                    };
                    *key = Some((text, node.mark, merge));
                    Ok(())
                }
                Some((_, _, true)) => {
                    merges.push(node);
                    Ok(())
                }
                Some((text, key_mark, false)) => {
                    if let Some(first) = lines.get(&text) {
                        let message = format!("duplicate key {text:?} (first at line {first})");
                        return Err(self.error(key_mark, &message));
                    }
                    lines.insert(text.clone(), key_mark.line);
                    entries.push(Entry {
                        key: text,
                        key_mark,
                        value: node,
                    });
                    Ok(())
                }
            },
        }
    }
}

/// Classifies a scalar as the YAML core schema does for nulls; other plain
/// scalars stay text and are typed by whoever reads them.
fn scalar_value(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Value {
    let is_str_tag = tag.is_some_and(|t| t.suffix == "str" || t.suffix.ends_with(":str"));
    let plain = style == TScalarStyle::Plain && !is_str_tag;
    if plain && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
        Value::Null
    } else {
        Value::Scalar { text, plain }
    }
}

/// The YAML core schema's name of a tag (`int` for `!!int` and
/// `!<tag:yaml.org,2002:int>`); `None` for application tags.
fn core_tag(tag: &Tag) -> Option<&str> {
    const CORE: &str = "tag:yaml.org,2002:";
    match tag.handle.as_str() {
        "!!" | CORE => Some(&tag.suffix),
        "" | "!" => tag.suffix.strip_prefix(CORE),
        _ => None,
    }
}

/// Why the collector's YAML library refuses a scalar with this core tag, if
/// it does: `!!bool`, `!!int`, `!!float`, `!!null` and `!!timestamp` must fit
/// what the text reads as (an int fits `!!float`), and `!!binary` must be
/// base64. Quoting does not matter once a tag is given. Other tags take any
/// text.
fn tag_misfit(tag: &Tag, text: &str) -> Option<String> {
    let wanted = core_tag(tag)?;
    let fits = match wanted {
        "bool" | "int" | "null" => resolve_plain(text) == wanted,
        "float" => matches!(resolve_plain(text), "float" | "int"),
        "timestamp" => is_timestamp(text) || resolve_plain(text) == "timestamp",
        "binary" => is_base64(text),
        _ => return None,
    };
    if fits {
        return None;
    }
    if wanted == "binary" {
        return Some("!!binary value contains invalid base64 data (the collector refuses it)".to_string());
    }
    Some(format!(
        "!!{wanted} does not fit {text:?}, which reads as {} (the collector refuses it; remove the tag or fix the value)",
        match resolve_plain(text) {
            "str" => "text",
            "int" => "an integer",
            "float" => "a number",
            "bool" => "a boolean",
            "null" => "null",
            _ => "something else",
        }
    ))
}

/// The core-schema type a plain scalar resolves to, as the collector's YAML
/// library (go-yaml v3) resolves it: `null`, `bool`, `int`, `float` or `str`.
fn resolve_plain(text: &str) -> &'static str {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return "null",
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => return "bool",
        ".nan" | ".NaN" | ".NAN" | ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf"
        | "-.INF" => return "float",
        _ => {}
    }
    match text.as_bytes()[0] {
        b'.' if text.parse::<f64>().is_ok() => "float",
        b'0'..=b'9' | b'+' | b'-' => {
            let plain = text.replace('_', "");
            if is_go_integer(&plain) {
                "int"
            } else if is_yaml_float(&plain) {
                "float"
            } else {
                "str"
            }
        }
        _ => "str",
    }
}

/// Whether Go's `strconv.ParseInt(s, 0, 64)` or `ParseUint` accepts `s`:
/// an optional sign, then decimal, `0x` hex, `0o` or leading-`0` octal, or
/// `0b` binary digits, within 64 bits.
fn is_go_integer(s: &str) -> bool {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if digits.starts_with(['+', '-']) {
        return false;
    }
    match u64::from_str_radix(digits, radix) {
        Ok(n) => !negative || n <= 1 << 63,
        Err(_) => false,
    }
}

/// go-yaml's float syntax: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`.
fn is_yaml_float(s: &str) -> bool {
    static FLOAT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$").expect("a valid regex")
    });
    FLOAT.is_match(s) && s.parse::<f64>().is_ok_and(f64::is_finite)
}

/// The timestamps go-yaml accepts: a date `2001-12-14`, or a date and time
/// with `T`/`t` and a zone, or with a space and no zone.
fn is_timestamp(s: &str) -> bool {
    static TIMESTAMP: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\.[0-9]+)?(Z|[-+][0-9]{2}:[0-9]{2})| [0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\.[0-9]+)?)?$",
        )
        .expect("a valid regex")
    });
    TIMESTAMP.is_match(s)
}

/// Standard base64 with padding; line breaks are ignored.
fn is_base64(text: &str) -> bool {
    let b: Vec<u8> = text.bytes().filter(|c| !matches!(c, b'\r' | b'\n')).collect();
    let body = b.strip_suffix(b"==").or_else(|| b.strip_suffix(b"=")).unwrap_or(&b);
    b.len().is_multiple_of(4)
        && body
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
}

/// Applies `<<` merge keys: keys written in the mapping win, then earlier
/// merged mappings win over later ones.
fn apply_merges(mut entries: Vec<Entry>, merges: Vec<Node>) -> Result<Vec<Entry>, (Mark, String)> {
    if merges.is_empty() {
        return Ok(entries);
    }
    let mut present: std::collections::HashSet<String> = entries.iter().map(|e| e.key.clone()).collect();
    for merge in merges {
        let sources: Vec<Node> = match merge.value {
            Value::Map(_) => vec![merge],
            Value::Seq(items) => items,
            _ => {
                return Err((
                    merge.mark,
                    "a merge key (<<) needs a mapping or a list of mappings".to_string(),
                ));
            }
        };
        for source in sources {
            let Value::Map(more) = source.value else {
                return Err((
                    source.mark,
                    "a merge key (<<) needs a mapping or a list of mappings".to_string(),
                ));
            };
            for entry in more {
                if present.insert(entry.key.clone()) {
                    entries.push(entry);
                }
            }
        }
    }
    Ok(entries)
}

/// Writes a tree back as YAML that parses to the same values: block style,
/// two-space indents, plain scalars as written where that reads back the
/// same, everything else double-quoted. Keys are quoted when they would not
/// read back as the same string (`"1"`, `"true"`, `"<<"`). Comments, anchors
/// and the original layout are not kept; `${env:NAME}` references are kept as
/// text for whoever reads the YAML to expand.
pub fn emit(node: &Node) -> String {
    let mut out = String::new();
    match &node.value {
        Value::Map(entries) if !entries.is_empty() => emit_map(&mut out, entries, 0),
        Value::Seq(items) if !items.is_empty() => emit_seq(&mut out, items, 0),
        _ => {
            out.push_str(&inline(node));
            out.push('\n');
        }
    }
    out
}

fn emit_map(out: &mut String, entries: &[Entry], indent: usize) {
    for e in entries {
        out.extend(std::iter::repeat_n(' ', indent));
        if key_needs_quotes(&e.key) {
            out.push_str(&quoted(&e.key));
        } else {
            out.push_str(&e.key);
        }
        out.push(':');
        emit_value(out, &e.value, indent + 2);
    }
}

fn emit_seq(out: &mut String, items: &[Node], indent: usize) {
    for item in items {
        out.extend(std::iter::repeat_n(' ', indent));
        out.push('-');
        emit_value(out, item, indent + 2);
    }
}

/// What follows `key:` or `-`: a scalar or an empty collection on the same
/// line, anything else on the lines below, indented.
fn emit_value(out: &mut String, node: &Node, indent: usize) {
    match &node.value {
        Value::Map(entries) if !entries.is_empty() => {
            out.push('\n');
            emit_map(out, entries, indent);
        }
        Value::Seq(items) if !items.is_empty() => {
            out.push('\n');
            emit_seq(out, items, indent);
        }
        _ => {
            out.push(' ');
            out.push_str(&inline(node));
            out.push('\n');
        }
    }
}

/// A scalar, null or empty collection on one line.
fn inline(node: &Node) -> String {
    match &node.value {
        Value::Null => "null".to_string(),
        Value::Scalar { text, plain: true } if plain_reads_back(text) => text.clone(),
        // Only strings can hold what a plain scalar cannot, so quoting keeps the type.
        Value::Scalar { text, .. } => quoted(text),
        Value::Seq(_) => "[]".to_string(),
        Value::Map(_) => "{}".to_string(),
    }
}

/// Whether `text` written as a plain scalar after `key: ` or `- ` in block
/// context reads back as the same text. Conservative: when in doubt, no.
fn plain_reads_back(text: &str) -> bool {
    let Some(first) = text.chars().next() else {
        return false;
    };
    let second = text.chars().nth(1);
    let indicator = "-?:,[]{}#&*!|>'\"%@`".contains(first);
    // `-1` and `-.5` are numbers; `-` alone or before a space is a list item.
    let dash_ok = first == '-' && second.is_some_and(|c| c != ' ');
    (!indicator || dash_ok)
        && !text.starts_with(' ')
        && !text.ends_with([' ', ':'])
        && !text.contains(": ")
        && !text.contains(" #")
        && !text.chars().any(needs_escape)
}

fn key_needs_quotes(key: &str) -> bool {
    !plain_reads_back(key) || key == "<<" || matches!(key, "~" | "null" | "Null" | "NULL") || !decodes_as_string(key)
}

/// Whether a plain scalar decodes as a string rather than a boolean or a
/// number (YAML 1.2 core schema, as the supervisor's YAML library reads it).
pub(super) fn decodes_as_string(text: &str) -> bool {
    let t = text.strip_prefix(['+', '-']).unwrap_or(text);
    let number = t
        .parse::<f64>()
        .is_ok_and(|_| t.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.'))
        || [".inf", ".Inf", ".INF"].contains(&t)
        || [".nan", ".NaN", ".NAN"].contains(&text)
        || ["0x", "0o", "0b"].iter().any(|p| t.len() > 2 && t.starts_with(p));
    let boolean = ["true", "True", "TRUE", "false", "False", "FALSE"].contains(&text);
    !(number || boolean)
}

/// Characters a double-quoted scalar writes as escapes.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

/// A YAML double-quoted scalar (JSON-compatible escapes).
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) && (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if needs_escape(c) => out.push_str(&format!("\\U{:08x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Node {
        parse(0, text).unwrap()
    }

    fn err(text: &str) -> String {
        let e = parse(0, text).unwrap_err();
        format!("{}:{}: {}", e.line, e.column, e.message)
    }

    #[test]
    fn positions_are_one_based_for_keys_and_values() {
        let n = p("a: 1\nbb:\n  c: \"x\"\n  d: [1, two]\n");
        let a = n.get("a").unwrap();
        assert_eq!((a.key_mark.line, a.key_mark.column), (1, 1));
        assert_eq!((a.value.mark.line, a.value.mark.column), (1, 4));
        let bb = n.get("bb").unwrap();
        let c = bb.value.get("c").unwrap();
        assert_eq!((c.key_mark.line, c.key_mark.column), (3, 3));
        assert_eq!(
            c.value.value,
            Value::Scalar {
                text: "x".into(),
                plain: false
            }
        );
        let d = bb.value.get("d").unwrap().value.as_seq().unwrap();
        assert_eq!((d[1].mark.line, d[1].mark.column), (4, 10));
        assert_eq!(d[1].as_scalar(), Some("two"));
    }

    #[test]
    fn nulls_and_empty_documents() {
        assert!(p("").is_null());
        assert!(p("# only a comment\n").is_null());
        let n = p("a:\nb: ~\nc: null\nd: 'null'\n");
        assert!(n.get("a").unwrap().value.is_null());
        assert!(n.get("b").unwrap().value.is_null());
        assert!(n.get("c").unwrap().value.is_null());
        assert_eq!(n.get("d").unwrap().value.as_scalar(), Some("null"));
    }

    #[test]
    fn json_is_yaml() {
        let n = p("{\"receivers\": {\"otlp\": {}}, \"list\": [1, 2]}");
        assert!(n.get("receivers").unwrap().value.get("otlp").is_some());
        assert_eq!(n.get("list").unwrap().value.as_seq().unwrap().len(), 2);
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        let n = p("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\ncopy: *b\n");
        let u = &n.get("use").unwrap().value;
        assert_eq!(u.get("x").unwrap().value.as_scalar(), Some("1"));
        assert_eq!(u.get("y").unwrap().value.as_scalar(), Some("3"), "explicit keys win");
        assert!(u.get("<<").is_none());
        assert_eq!(
            n.get("copy").unwrap().value.get("y").unwrap().value.as_scalar(),
            Some("2")
        );
    }

    #[test]
    fn errors_have_positions() {
        assert_eq!(err("a: 1\na: 2\n"), "2:1: duplicate key \"a\" (first at line 1)");
        assert_eq!(
            err("a: 1\n---\nb: 2\n"),
            "2:1: expected one YAML document, found several"
        );
        assert_eq!(
            err("a: [1, 2\n"),
            "2:1: invalid YAML: while parsing a flow sequence, expected ',' or ']'"
        );
        assert_eq!(
            err("? [a]\n: 1\n"),
            "1:3: mapping keys must be strings, not lists or mappings"
        );
        let deep = format!("{}x", "- ".repeat(200));
        assert_eq!(err(&deep), "1:257: YAML nested too deeply");
        assert!(err(&"[".repeat(500)).contains("invalid YAML"));
    }

    #[test]
    fn core_tags_must_fit_their_values_as_the_collector_requires() {
        for ok in [
            "a: !!int 4317",
            "a: !!int -0x1F",
            "a: !!int 0o17",
            "a: !!int 1_000",
            "a: !!int \"42\"",
            "a: !!float 1",
            "a: !!float 1.5e3",
            "a: !!float .inf",
            "a: !!bool true",
            "a: !!bool FALSE",
            "a: !!null",
            "a: !!null ~",
            "a: !!str 42",
            "a: !!timestamp 2001-12-14",
            "a: !!timestamp 2001-12-14t21:59:43.10-05:00",
            "a: !!binary aGVsbG8=",
            "a: !<tag:yaml.org,2002:int> 7",
            "a: !custom anything",
        ] {
            assert!(parse(0, ok).is_ok(), "{ok}: {:?}", parse(0, ok));
        }
        assert_eq!(
            err("endpoint: !!int gateway:4317"),
            "1:17: !!int does not fit \"gateway:4317\", which reads as text (the collector refuses it; remove the tag or fix the value)"
        );
        assert_eq!(
            err("a:\n  b: !!bool yes"),
            "2:13: !!bool does not fit \"yes\", which reads as text (the collector refuses it; remove the tag or fix the value)"
        );
        assert_eq!(
            err("a: !!int 1.5"),
            "1:10: !!int does not fit \"1.5\", which reads as a number (the collector refuses it; remove the tag or fix the value)"
        );
        assert_eq!(
            err("a: !!null 0"),
            "1:11: !!null does not fit \"0\", which reads as an integer (the collector refuses it; remove the tag or fix the value)"
        );
        assert_eq!(
            err("a: !!binary not*base64"),
            "1:13: !!binary value contains invalid base64 data (the collector refuses it)"
        );
        assert!(err("a: !<tag:yaml.org,2002:float> x").contains(": !!float does not fit"));
        assert!(err("a: !!int 99999999999999999999").starts_with("1:10: !!int does not fit"));
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let prev = format!("*a{}", i - 1);
            let items = [prev.as_str(); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{items}]\n"));
        }
        assert!(err(&text).ends_with("too many nodes after expanding aliases"));
    }

    #[test]
    fn never_panics_on_garbage() {
        for text in [
            "{",
            "]",
            ": :",
            "- - -\n  - a: b\n c",
            "&a",
            "*x",
            "!!binary a",
            "a: |\n b\nc",
            "\t- a",
        ] {
            let _ = parse(0, text);
        }
    }

    /// The values of a tree without its positions, for comparing.
    fn values(node: &Node) -> String {
        match &node.value {
            Value::Null => "~".to_string(),
            Value::Scalar { text, plain } => format!("{}{text:?}", if *plain { "p" } else { "q" }),
            Value::Seq(items) => format!("[{}]", items.iter().map(values).collect::<Vec<_>>().join(", ")),
            Value::Map(entries) => format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|e| format!("{:?}: {}", e.key, values(&e.value)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    #[test]
    fn emitted_yaml_reads_back_as_the_same_values() {
        let cases = [
            "receivers: {otlp: {protocols: {grpc: {endpoint: 'localhost:4317'}}}}",
            "a: [1, -1, -.5, 0x1f, 1e3, true, 'true', \"1\", ~, '', ' x ']",
            "headers:\n  authorization: Bearer ${env:TOKEN}\n  x: ${env:X:-a,b}\n  y: $${env:Y}\n",
            "a: {'1': x, 'true': y, 'null': z, '~': w, '<<': v, 'a b': u, 'k: v': t, '': s, '-': r}",
            "s: {a: 'x: y', b: 'x #y', c: '#x', d: '- x', e: '-', f: 'x:', g: '[x]', h: '{x}', i: '*x', j: '&x', k: '!x', l: '%x', m: '@x', n: '`x', o: '|', p: '>', q: '?', r: ':x'}",
            "plain:\n  - a[1]\n  - b{2}\n  - c,d\n  - e:f\n  - g#h\n  - it's\n  - C:\\dir\n  - http://x:1/p?q=1#f\n",
            "text: |\n  line one\n  line \"two\"\\n\n",
            "ctl: \"tab\\tnl\\ncr\\rbell\\u0007del\\u007fnel\\u0085ls\\u2028bom\\ufeff\"",
            "unicode: {ключ: значение, emoji: \"🦀\", cjk: 日本}",
            "nested: [[a, [b]], [], {}, [{x: 1, y: [2, {z: ~}]}], {k: []}]",
            "folded: a\n  multi\n  line\n",
            "merge: {base: &b {x: 1}, use: {<<: *b, y: 2}}",
            "[a, b]",
            "x",
            "",
            "'--- x'",
        ];
        for text in cases {
            let node = p(text);
            let yaml = emit(&node);
            let back = parse(0, &yaml).unwrap_or_else(|e| panic!("{text:?} emitted\n{yaml}\nwhich fails: {e:?}"));
            assert_eq!(values(&back), values(&node), "{text:?} emitted\n{yaml}");
        }
    }

    #[test]
    fn emitted_yaml_is_block_style() {
        let node = p(
            "service: {extensions: [a, b], pipelines: {traces: {receivers: [otlp]}}}\nempty: {l: [], m: {}}\nitems: [{k: 1, j: 2}, [x]]\n",
        );
        assert_eq!(
            emit(&node),
            "service:\n  extensions:\n    - a\n    - b\n  pipelines:\n    traces:\n      receivers:\n        - otlp\n\
             empty:\n  l: []\n  m: {}\nitems:\n  -\n    k: 1\n    j: 2\n  -\n    - x\n"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_string_reads_back_as_key_and_value(key in "\\PC*|[ -~\\t\\n]*", value in proptest::string::string_regex("(?s).*").unwrap()) {
            let node = Node {
                mark: Mark { src: 0, line: 1, column: 1 },
                value: Value::Map(vec![Entry {
                    key: key.clone(),
                    key_mark: Mark { src: 0, line: 1, column: 1 },
                    value: Node { mark: Mark { src: 0, line: 1, column: 1 }, value: Value::Scalar { text: value.clone(), plain: false } },
                }]),
            };
            let yaml = emit(&node);
            let back = parse(0, &yaml).unwrap();
            proptest::prop_assert_eq!(values(&back), values(&node), "emitted {}", yaml);
        }
    }
}
