//! The YAML layer of `sidecar inject`: a node tree that remembers where every node is in the
//! source (so edits can be spliced into the original text), the data model the tree means
//! (to check that an edited document reads back as intended), and an emitter for the parts that
//! are added.
//!
//! Scalars are resolved with the YAML 1.2 core schema. Text that is not edited is never
//! re-emitted, so how a YAML 1.1 reader (Kubernetes) reads it does not change; the emitter quotes
//! every string that either version could read as something else.

use std::collections::HashMap;
use std::fmt::{self, Write as _};

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A syntax error in the input: where (1-based line and column) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// Line, 1-based.
    pub line: usize,
    /// Column, 1-based (in characters).
    pub column: usize,
    /// What the parser found wrong.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed YAML at line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// One node of a parsed document with its place in the source.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Byte offset of the node's first character (for a flow collection, its `[` or `{`; for a
    /// block collection, its first entry).
    pub start: usize,
    /// Byte offset just past the node (exact for scalars; not used for block collections).
    pub end: usize,
    /// 1-based line of `start`.
    pub line: usize,
    /// Flow style (`[...]`, `{...}`) for collections.
    pub flow: bool,
    /// Anchor id (0: none).
    pub anchor: usize,
    /// The tag, as written (`!!str` is `tag:yaml.org,2002:str`).
    pub tag: Option<String>,
    /// What the node is.
    pub kind: Kind,
}

/// The kinds of nodes.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// A scalar with its (decoded) text and style.
    Scalar(String, ScalarStyle),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in source order.
    Map(Vec<(Node, Node)>),
    /// An alias (`*name`) to the node with this anchor id.
    Alias(usize),
}

impl Node {
    /// The scalar's text, whatever its style.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar(s, _) => Some(s),
            _ => None,
        }
    }

    /// Whether this is a null scalar (`~`, `null`, or nothing at all).
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar(s, ScalarStyle::Plain)
            if self.tag.is_none() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The mapping's entries, if it is one.
    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            Kind::Map(e) => Some(e),
            _ => None,
        }
    }

    /// The sequence's items, if it is one.
    pub fn items(&self) -> Option<&[Node]> {
        match &self.kind {
            Kind::Seq(i) => Some(i),
            _ => None,
        }
    }

    /// Every entry of a mapping whose key is the string `key`.
    pub fn get_all<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a (Node, Node)> + 'a {
        let key = key.to_owned();
        self.entries()
            .unwrap_or(&[])
            .iter()
            .filter(move |(k, _)| k.as_str() == Some(key.as_str()))
    }

    /// A short description of what the node is, for messages.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar(..) if self.is_null() => "null",
            Kind::Scalar(..) => "a scalar",
            Kind::Seq(_) => "a sequence",
            Kind::Map(_) => "a mapping",
            Kind::Alias(_) => "an alias",
        }
    }

    /// Whether the node or anything below it is an alias.
    pub fn has_alias(&self) -> bool {
        match &self.kind {
            Kind::Alias(_) => true,
            Kind::Scalar(..) => false,
            Kind::Seq(items) => items.iter().any(Node::has_alias),
            Kind::Map(entries) => entries.iter().any(|(k, v)| k.has_alias() || v.has_alias()),
        }
    }
}

/// One document of a stream: its root node (`None` for an empty document).
#[derive(Debug, Clone)]
pub(crate) struct Document {
    pub root: Option<Node>,
}

/// Parses a stream of YAML documents.
pub(crate) fn parse(src: &str) -> Result<Vec<Document>, SyntaxError> {
    // Markers count characters; edits need byte offsets.
    let offsets: Vec<usize> = src
        .char_indices()
        .map(|(b, _)| b)
        .chain(std::iter::once(src.len()))
        .collect();
    let byte = |index: usize| offsets.get(index).copied().unwrap_or(src.len());

    let mut docs = Vec::new();
    // Open collections: the node and, for a mapping, a key waiting for its value.
    let mut stack: Vec<(Node, Option<Node>)> = Vec::new();
    let mut root: Option<Node> = None;
    for event in Parser::new_from_str(src) {
        let (event, span): (Event<'_>, Span) = event.map_err(|e| SyntaxError {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info().to_owned(),
        })?;
        let node = |kind: Kind, anchor: usize, tag: Option<String>, flow: bool| Node {
            start: byte(span.start.index()),
            end: byte(span.end.index()),
            line: span.start.line(),
            flow,
            anchor,
            tag,
            kind,
        };
        let complete = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing => None,
            Event::DocumentStart(_) => {
                root = None;
                None
            }
            Event::DocumentEnd => {
                docs.push(Document { root: root.take() });
                None
            }
            Event::Alias(id) => Some(node(Kind::Alias(id), 0, None, false)),
            Event::Scalar(value, style, anchor, tag) => Some(node(
                Kind::Scalar(value.into_owned(), style),
                anchor,
                tag.map(|t| t.to_string()),
                false,
            )),
            Event::SequenceStart(anchor, tag) => {
                let flow = src.as_bytes().get(byte(span.start.index())) == Some(&b'[');
                let n = node(
                    Kind::Seq(Vec::new()),
                    anchor,
                    tag.map(|t| t.to_string()),
                    flow,
                );
                stack.push((n, None));
                None
            }
            Event::MappingStart(anchor, tag) => {
                let flow = src.as_bytes().get(byte(span.start.index())) == Some(&b'{');
                let n = node(
                    Kind::Map(Vec::new()),
                    anchor,
                    tag.map(|t| t.to_string()),
                    flow,
                );
                stack.push((n, None));
                None
            }
            Event::SequenceEnd | Event::MappingEnd => stack.pop().map(|(mut n, _)| {
                if n.flow {
                    n.end = byte(span.end.index());
                }
                n
            }),
        };
        if let Some(done) = complete {
            match stack.last_mut() {
                None => root = Some(done),
                Some((parent, pending)) => match &mut parent.kind {
                    Kind::Seq(items) => items.push(done),
                    Kind::Map(entries) => match pending.take() {
                        None => *pending = Some(done),
                        Some(key) => entries.push((key, done)),
                    },
                    Kind::Scalar(..) | Kind::Alias(_) => {}
                },
            }
        }
    }
    Ok(docs)
}

/// What a node means: the data model, with mappings compared without regard to order.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// `null`, `~` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer (decimal, `0o` octal or `0x` hexadecimal).
    Int(i128),
    /// A floating-point number, as written.
    Float(String),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Value>),
    /// A mapping.
    Map(Vec<(Value, Value)>),
    /// A value with a tag other than the core schema's.
    Tagged(String, Box<Value>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) | (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Seq(a), Value::Seq(b)) => a == b,
            (Value::Map(a), Value::Map(b)) => {
                a.len() == b.len()
                    && a.iter().all(|(k, v)| {
                        let here = a.iter().filter(|(k2, v2)| k2 == k && v2 == v).count();
                        let there = b.iter().filter(|(k2, v2)| k2 == k && v2 == v).count();
                        here == there
                    })
            }
            (Value::Tagged(t1, v1), Value::Tagged(t2, v2)) => t1 == t2 && v1 == v2,
            _ => false,
        }
    }
}

impl Value {
    /// A string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value under the string key `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value under the string key `key` of a mapping, for changing it.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self {
            Value::Map(entries) => entries
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Sets `key` of a mapping to `value` (replacing the first entry with that key, or adding
    /// one at the end). Does nothing on other kinds of values.
    pub fn set(&mut self, key: &str, value: Value) {
        if let Value::Map(entries) = self {
            match entries.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
                Some((_, v)) => *v = value,
                None => entries.push((Value::str(key), value)),
            }
        }
    }

    /// Removes every entry with the string key `key` from a mapping.
    pub fn remove(&mut self, key: &str) {
        if let Value::Map(entries) = self {
            entries.retain(|(k, _)| k.as_str() != Some(key));
        }
    }
}

/// Resolves a plain scalar with the YAML 1.2 core schema.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => return Value::Float(s.to_owned()),
        _ => {}
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if let Ok(n) = i128::from_str_radix(oct, 8) {
            return Value::Int(n);
        }
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if let Ok(n) = i128::from_str_radix(hex, 16) {
            return Value::Int(n);
        }
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = s.parse::<i128>() {
            return Value::Int(n);
        }
    }
    if is_core_float(s) {
        return Value::Float(s.to_owned());
    }
    Value::Str(s.to_owned())
}

/// `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn is_core_float(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => all_digits(frac),
        Some((int, frac)) => all_digits(int) && (frac.is_empty() || all_digits(frac)),
        None => all_digits(mantissa),
    };
    let exponent_ok = match exponent {
        None => true,
        Some(e) => all_digits(e.strip_prefix(['-', '+']).unwrap_or(e)),
    };
    mantissa_ok && exponent_ok
}

const CORE: &str = "tag:yaml.org,2002:";

/// The data model of a node; aliases are replaced by what their anchor names (anchors seen
/// earlier in `anchors`, which this fills as it goes).
pub(crate) fn to_value(node: &Node, anchors: &mut HashMap<usize, Value>) -> Value {
    let value = match &node.kind {
        Kind::Alias(id) => anchors.get(id).cloned().unwrap_or(Value::Null),
        Kind::Scalar(s, style) => {
            let plain = matches!(style, ScalarStyle::Plain);
            match node.tag.as_deref() {
                None if plain => resolve_plain(s),
                None => Value::Str(s.clone()),
                Some(t) if t == format!("{CORE}str") => Value::Str(s.clone()),
                Some(t) if t.starts_with(CORE) => resolve_plain(s),
                // `!` alone: a non-specific tag, the scalar is a string.
                Some("!") => Value::Str(s.clone()),
                Some(t) => Value::Tagged(t.to_owned(), Box::new(Value::Str(s.clone()))),
            }
        }
        Kind::Seq(items) => Value::Seq(items.iter().map(|i| to_value(i, anchors)).collect()),
        Kind::Map(entries) => Value::Map(
            entries
                .iter()
                .map(|(k, v)| (to_value(k, anchors), to_value(v, anchors)))
                .collect(),
        ),
    };
    let value = match (&node.kind, node.tag.as_deref()) {
        (Kind::Seq(_) | Kind::Map(_), Some(t)) if !t.starts_with(CORE) && t != "!" => {
            Value::Tagged(t.to_owned(), Box::new(value))
        }
        _ => value,
    };
    if node.anchor != 0 {
        anchors.insert(node.anchor, value.clone());
    }
    value
}

/// The data model of a whole document (`Null` when it is empty).
pub(crate) fn document_value(doc: &Document) -> Value {
    doc.root
        .as_ref()
        .map(|r| to_value(r, &mut HashMap::new()))
        .unwrap_or(Value::Null)
}

/// Whether `s` can be written as a plain scalar and read back as the same string by a YAML 1.1
/// or 1.2 reader. Conservative: anything that starts with a digit or sign, or looks like a
/// keyword of either version, is quoted.
fn plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if !(first.is_ascii_alphabetic() || first == '/') {
        return false;
    }
    if s.ends_with(':') || s.contains(": ") {
        return false;
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | ':' | '@' | '-'))
    {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    !matches!(
        lower.as_str(),
        "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
    )
}

/// A scalar (or an empty collection) as one token of YAML text; `None` for non-empty
/// collections.
fn scalar_text(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Float(f) => f.clone(),
        Value::Str(s) if plain_safe(s) => s.clone(),
        Value::Str(s) => json_string(s),
        Value::Seq(items) if items.is_empty() => "[]".to_owned(),
        Value::Map(entries) if entries.is_empty() => "{}".to_owned(),
        Value::Tagged(tag, inner) => format!("!<{tag}> {}", flow(inner)),
        Value::Seq(_) | Value::Map(_) => return None,
    })
}

/// A JSON string literal, which is also a YAML double-quoted scalar.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The value in flow style (JSON where the value is JSON-representable): for insertion into
/// flow collections, where block style is not allowed.
pub(crate) fn flow(v: &Value) -> String {
    match v {
        Value::Str(s) => json_string(s),
        Value::Seq(items) => {
            let parts: Vec<String> = items.iter().map(flow).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Map(entries) => {
            let parts: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}: {}", flow(k), flow(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        other => scalar_text(other).unwrap_or_default(),
    }
}

/// Block-style emitter for the parts `inject` adds.
pub(crate) struct Emitter<'a> {
    /// Line ending of the document (`\n` or `\r\n`).
    pub nl: &'a str,
    /// The text.
    pub out: String,
}

impl Emitter<'_> {
    /// Writes mapping entries at column `indent`; the first line starts with `first` instead of
    /// the indentation when given (`"  - "` for a mapping that is a sequence item).
    pub fn entries(&mut self, entries: &[(Value, Value)], indent: usize, first: Option<&str>) {
        for (i, (k, v)) in entries.iter().enumerate() {
            match (i, first) {
                (0, Some(prefix)) => self.out.push_str(prefix),
                _ => self.pad(indent),
            }
            self.out
                .push_str(&scalar_text(k).unwrap_or_else(|| flow(k)));
            self.out.push(':');
            self.after_key(v, indent);
        }
    }

    /// Writes sequence items at column `indent`.
    pub fn items(&mut self, items: &[Value], indent: usize) {
        for item in items {
            let prefix = format!("{}- ", " ".repeat(indent));
            match item {
                Value::Map(entries) if !entries.is_empty() => {
                    self.entries(entries, indent + 2, Some(&prefix))
                }
                other => {
                    self.out.push_str(&prefix);
                    self.out
                        .push_str(&scalar_text(other).unwrap_or_else(|| flow(other)));
                    self.out.push_str(self.nl);
                }
            }
        }
    }

    /// Writes what follows `key:` for a key at column `indent`.
    pub fn after_key(&mut self, v: &Value, indent: usize) {
        match v {
            Value::Map(entries) if !entries.is_empty() => {
                self.out.push_str(self.nl);
                self.entries(entries, indent + 2, None);
            }
            Value::Seq(items) if !items.is_empty() => {
                self.out.push_str(self.nl);
                self.items(items, indent + 2);
            }
            other => {
                self.out.push(' ');
                self.out
                    .push_str(&scalar_text(other).unwrap_or_else(|| flow(other)));
                self.out.push_str(self.nl);
            }
        }
    }

    fn pad(&mut self, indent: usize) {
        let _ = write!(self.out, "{:indent$}", "");
    }
}
