//! `sidecar inject`: adds the sidecar to the pod templates of Kubernetes YAML, like
//! `istioctl kube-inject`.
//!
//! What is added comes from [`TEMPLATE`] (`template.yaml`, the one description of the sidecar
//! container that `deploy/kubernetes` and `deploy/helm` also deploy): the container goes first
//! in `initContainers` (a native sidecar, `restartPolicy: Always`, starts before the
//! application), its volumes go before the pod's own, its annotations into the pod template's
//! metadata.
//!
//! The output is the input text with the additions spliced in: documents that are not changed
//! (other kinds, opted out, already injected) are byte for byte as they came, and in changed
//! documents every existing line, comment and scalar stays as written. Each changed document is
//! parsed again and compared with the input's data plus exactly the added parts; a mismatch is
//! an error, never a silently wrong output.

mod yaml;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::EXIT_USAGE;
use yaml::{Emitter, Kind, Node, Value};

pub use yaml::SyntaxError;

/// The sidecar container, its volumes and the pod annotations, as `inject` adds them.
pub const TEMPLATE: &str = include_str!("template.yaml");

/// Annotation or label that opts a workload or pod template out (`"false"`) of injection.
pub const INJECT_KEY: &str = "sidecar.dev/inject";
/// Annotation that marks an injected pod template.
pub const STATUS_KEY: &str = "sidecar.dev/status";
/// The value of [`STATUS_KEY`] on an injected pod template.
pub const STATUS_INJECTED: &str = "injected";
/// Ports the sidecar listens on in the pod's network namespace besides the template's
/// `containerPort`s: the outbound (15001) and inbound (15006) proxy listeners.
pub const PROXY_PORTS: &[i128] = &[15001, 15006];

/// Flags of `sidecar inject`.
#[derive(Clone, Debug, clap::Args)]
pub struct InjectArgs {
    /// Kubernetes YAML to read (one or more `---`-separated documents); `-` is standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        default_value = "-"
    )]
    pub filename: PathBuf,

    /// Where to write the result [default: standard output]. Written only when the whole
    /// input was processed without error.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Image of the sidecar container [default: the one in the template,
    /// ghcr.io/sidecar-dev/sidecar:<version>].
    #[arg(long, value_name = "IMAGE", value_parser = parse_image)]
    pub image: Option<String>,

    /// OTLP endpoint of the OpenTelemetry Collector (the container's
    /// OTEL_EXPORTER_OTLP_ENDPOINT) [default: http://otel-collector.observability.svc:4317].
    #[arg(long, value_name = "URL", value_parser = parse_non_empty)]
    pub collector_endpoint: Option<String>,

    /// Run the sidecar with `privileged: true` instead of the capability list: a fallback for
    /// nodes whose kernel or security policy refuses the capabilities alone.
    #[arg(long)]
    pub privileged: bool,

    /// Set an environment variable of the sidecar container (replaces one of the same name);
    /// repeatable, e.g. `--set-env SIDECAR_EXCLUDE_OUTBOUND_PORTS=5432`.
    #[arg(long = "set-env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub set_env: Vec<(String, String)>,
}

fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err("an image reference is non-empty and has no whitespace".to_owned());
    }
    Ok(s.to_owned())
}

fn parse_non_empty(s: &str) -> Result<String, String> {
    match s.trim() {
        "" => Err("must not be empty".to_owned()),
        t => Ok(t.to_owned()),
    }
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty() && !k.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err("expected KEY=VALUE with a non-empty KEY without whitespace".to_owned()),
    }
}

/// What users commonly change in the injected container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Replaces the template's image.
    pub image: Option<String>,
    /// Sets `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub collector_endpoint: Option<String>,
    /// `privileged: true` instead of the capability list.
    pub privileged: bool,
    /// Environment variables to set (in order; a later one of the same name wins).
    pub set_env: Vec<(String, String)>,
}

impl From<&InjectArgs> for Options {
    fn from(a: &InjectArgs) -> Self {
        Options {
            image: a.image.clone(),
            collector_endpoint: a.collector_endpoint.clone(),
            privileged: a.privileged,
            set_env: a.set_env.clone(),
        }
    }
}

/// The result of [`inject`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    /// The output text.
    pub text: String,
    /// How many pod templates got the sidecar.
    pub injected: usize,
    /// Things the user should know that did not stop the injection.
    pub warnings: Vec<String>,
}

/// Why the input could not be injected. Nothing is written then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectError {
    /// The input is not well-formed YAML.
    Syntax(SyntaxError),
    /// A document cannot get the sidecar (conflict, refused setting, unexpected structure).
    Document {
        /// 1-based index of the document in the stream.
        index: usize,
        /// Kind and name of the object, e.g. `Deployment "web"`.
        object: String,
        /// Path of the field at fault from the document's root, e.g.
        /// `spec.template.spec.hostNetwork` (empty for the whole document).
        field: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A bug: the edited text does not read back as intended.
    Internal(String),
}

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InjectError::Syntax(e) => write!(f, "{e}"),
            InjectError::Document {
                index,
                object,
                field,
                message,
            } => {
                write!(f, "document {index} ({object})")?;
                if !field.is_empty() {
                    write!(f, ", field {field}")?;
                }
                write!(f, ": {message}")
            }
            InjectError::Internal(msg) => write!(f, "internal error: {msg}"),
        }
    }
}

impl std::error::Error for InjectError {}

impl InjectError {
    /// Exit code for this error: [`EXIT_USAGE`] for problems of the input, 1 for bugs.
    pub fn exit_code(&self) -> u8 {
        match self {
            InjectError::Internal(_) => 1,
            _ => EXIT_USAGE,
        }
    }
}

/// One step of a path from a document's root.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Path(Vec<Seg>);

impl Path {
    fn key(&self, k: &str) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    fn index(&self, i: usize) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    fn keys(&self, ks: &[&str]) -> Path {
        ks.iter().fold(self.clone(), |p, k| p.key(k))
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A change to one document, applied both to its text and to its data (to check the text).
#[derive(Clone, Debug)]
enum Op {
    /// Put `items` first in the sequence at `path`.
    Prepend { path: Path, items: Vec<Value> },
    /// Add entries (whose keys are absent) to the mapping at `path`.
    AddKeys {
        path: Path,
        entries: Vec<(String, Value)>,
    },
    /// Replace the null value of `key` in the mapping at `path`.
    ReplaceNull {
        path: Path,
        key: String,
        value: Value,
    },
}

/// The template with the options applied.
#[derive(Clone, Debug)]
struct Template {
    container: Value,
    volumes: Vec<Value>,
    annotations: Vec<(String, Value)>,
    container_name: String,
    ports: Vec<i128>,
}

fn template(opts: &Options) -> Result<Template, InjectError> {
    let bad = |what: &str| InjectError::Internal(format!("template.yaml: {what}"));
    let docs =
        yaml::parse(TEMPLATE).map_err(|e| InjectError::Internal(format!("template.yaml: {e}")))?;
    let doc = docs.first().ok_or_else(|| bad("empty"))?;
    let root = yaml::document_value(doc);
    let mut container = root
        .get("initContainer")
        .cloned()
        .ok_or_else(|| bad("no initContainer"))?;
    let volumes = match root.get("volumes") {
        Some(Value::Seq(v)) => v.clone(),
        _ => return Err(bad("volumes is not a sequence")),
    };
    let annotations = match root.get("annotations") {
        Some(Value::Map(entries)) => entries
            .iter()
            .map(|(k, v)| {
                k.as_str()
                    .map(|k| (k.to_owned(), v.clone()))
                    .ok_or_else(|| bad("annotation key is not a string"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad("annotations is not a mapping")),
    };
    let container_name = container
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the container has no name"))?
        .to_owned();
    let mut ports: Vec<i128> = PROXY_PORTS.to_vec();
    if let Some(Value::Seq(list)) = container.get("ports") {
        ports.extend(list.iter().filter_map(|p| match p.get("containerPort") {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        }));
    }

    if let Some(image) = &opts.image {
        container.set("image", Value::str(image.clone()));
    }
    if let Some(endpoint) = &opts.collector_endpoint {
        set_env(&mut container, "OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    }
    for (k, v) in &opts.set_env {
        set_env(&mut container, k, v);
    }
    if opts.privileged {
        if container.get("securityContext").is_none() {
            container.set("securityContext", Value::Map(Vec::new()));
        }
        if let Some(sc) = container.get_mut("securityContext") {
            sc.remove("capabilities");
            // The API server refuses `privileged: true` with `allowPrivilegeEscalation: false`.
            sc.remove("allowPrivilegeEscalation");
            sc.set("privileged", Value::Bool(true));
        }
    }
    Ok(Template {
        container,
        volumes,
        annotations,
        container_name,
        ports,
    })
}

/// Sets (or adds) the environment variable `name` of a container to the literal `value`.
fn set_env(container: &mut Value, name: &str, value: &str) {
    let entry = Value::Map(vec![
        (Value::str("name"), Value::str(name)),
        (Value::str("value"), Value::str(value)),
    ]);
    if !matches!(container.get("env"), Some(Value::Seq(_))) {
        container.set("env", Value::Seq(Vec::new()));
    }
    if let Some(Value::Seq(env)) = container.get_mut("env") {
        match env
            .iter_mut()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
        {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    }
}

/// The sidecar container that [`inject`] adds with `opts`, in flow (JSON-compatible) YAML:
/// for tests and for tools that compare manifests with what `inject` produces.
pub fn container_yaml(opts: &Options) -> Result<String, InjectError> {
    template(opts).map(|t| yaml::flow(&t.container))
}

/// Adds the sidecar to every pod template of the Kubernetes YAML `src`.
pub fn inject(src: &str, opts: &Options) -> Result<Injected, InjectError> {
    let template = template(opts)?;
    let docs = yaml::parse(src).map_err(InjectError::Syntax)?;
    let nl = if src.contains("\r\n") { "\r\n" } else { "\n" };

    let mut warnings = Vec::new();
    let mut injected = 0;
    let mut plans: Vec<Vec<Op>> = Vec::with_capacity(docs.len());
    let mut edits: Vec<Edit> = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let index = i + 1;
        let ops = match &doc.root {
            Some(root) => {
                let mut planner = Planner {
                    index,
                    template: &template,
                    warnings: &mut warnings,
                    injected: 0,
                };
                let ops = planner.object(root, &Path::default(), None)?;
                injected += planner.injected;
                for op in &ops {
                    edits.extend(text_edits(src, root, op, nl).map_err(|message| {
                        InjectError::Document {
                            index,
                            object: describe_object(root, None),
                            field: op_path(op).to_string(),
                            message,
                        }
                    })?);
                }
                ops
            }
            None => Vec::new(),
        };
        plans.push(ops);
    }

    let text = apply_edits(src, edits)?;
    if plans.iter().any(|ops| !ops.is_empty()) {
        verify(&docs, &plans, &text)?;
    }
    Ok(Injected {
        text,
        injected,
        warnings,
    })
}

/// Checks that every document of `text` reads as the input's document with its plan applied.
fn verify(docs: &[yaml::Document], plans: &[Vec<Op>], text: &str) -> Result<(), InjectError> {
    let out = yaml::parse(text)
        .map_err(|e| InjectError::Internal(format!("the injected output does not parse ({e})")))?;
    if out.len() != docs.len() {
        return Err(InjectError::Internal(format!(
            "the output has {} documents, the input {}",
            out.len(),
            docs.len()
        )));
    }
    for (i, ((before, after), ops)) in docs.iter().zip(&out).zip(plans).enumerate() {
        let mut expected = yaml::document_value(before);
        for op in ops {
            apply_model(&mut expected, op).ok_or_else(|| {
                InjectError::Internal(format!("document {}: {} not found", i + 1, op_path(op)))
            })?;
        }
        if yaml::document_value(after) != expected {
            return Err(InjectError::Internal(format!(
                "document {} does not read back as the input plus the sidecar; please report \
                 this with the document",
                i + 1
            )));
        }
    }
    Ok(())
}

fn op_path(op: &Op) -> &Path {
    match op {
        Op::Prepend { path, .. } | Op::AddKeys { path, .. } | Op::ReplaceNull { path, .. } => path,
    }
}

fn value_at<'a>(root: &'a mut Value, path: &Path) -> Option<&'a mut Value> {
    path.0.iter().try_fold(root, |v, seg| match seg {
        Seg::Key(k) => v.get_mut(k),
        Seg::Index(i) => match v {
            Value::Seq(items) => items.get_mut(*i),
            _ => None,
        },
    })
}

fn apply_model(root: &mut Value, op: &Op) -> Option<()> {
    match op {
        Op::Prepend { path, items } => match value_at(root, path)? {
            Value::Seq(seq) => {
                seq.splice(0..0, items.iter().cloned());
                Some(())
            }
            _ => None,
        },
        Op::AddKeys { path, entries } => match value_at(root, path)? {
            Value::Map(map) => {
                map.extend(
                    entries
                        .iter()
                        .map(|(k, v)| (Value::str(k.clone()), v.clone())),
                );
                Some(())
            }
            _ => None,
        },
        Op::ReplaceNull { path, key, value } => {
            value_at(root, path)?.set(key, value.clone());
            Some(())
        }
    }
}

/// `Kind "name"` of an object, for messages.
fn describe_object(node: &Node, kind_hint: Option<&str>) -> String {
    let kind = field(node, "kind")
        .and_then(Node::as_str)
        .or(kind_hint)
        .unwrap_or("no kind");
    match field(node, "metadata")
        .and_then(|m| field(m, "name"))
        .and_then(Node::as_str)
    {
        Some(name) => format!("{kind} \"{name}\""),
        None => kind.to_owned(),
    }
}

/// The first value under `key` of a mapping.
fn field<'a>(node: &'a Node, key: &str) -> Option<&'a Node> {
    node.get_all(key).next().map(|(_, v)| v)
}

/// Where the pod template of a workload kind is, and which metadata can opt it out.
struct WorkloadShape {
    /// Path from the object to the pod template (empty for a Pod).
    template: &'static [&'static str],
    /// Paths from the object to other metadata that can opt out (the object's own always can).
    extra_meta: &'static [&'static [&'static str]],
}

fn shape(kind: &str, api_version: Option<&str>) -> Option<WorkloadShape> {
    let group = api_version.map(|v| v.rsplit_once('/').map_or("", |(g, _)| g));
    let in_group = |groups: &[&str]| group.is_none_or(|g| groups.contains(&g));
    let spec_template = WorkloadShape {
        template: &["spec", "template"],
        extra_meta: &[],
    };
    match kind {
        "Deployment" | "DaemonSet" | "ReplicaSet" if in_group(&["apps", "extensions"]) => {
            Some(spec_template)
        }
        "StatefulSet" if in_group(&["apps"]) => Some(spec_template),
        "Job" if in_group(&["batch"]) => Some(spec_template),
        "CronJob" if in_group(&["batch"]) => Some(WorkloadShape {
            template: &["spec", "jobTemplate", "spec", "template"],
            extra_meta: &[&["spec", "jobTemplate", "metadata"]],
        }),
        "Pod" if in_group(&[""]) => Some(WorkloadShape {
            template: &[],
            extra_meta: &[],
        }),
        _ => None,
    }
}

/// What a mapping holds under a key.
enum Slot<'a> {
    Absent,
    Null,
    Here(&'a Node),
}

struct Planner<'t, 'w> {
    index: usize,
    template: &'t Template,
    warnings: &'w mut Vec<String>,
    injected: usize,
}

impl Planner<'_, '_> {
    /// Plans the changes for one object (a document's root or a List item) at `path`.
    fn object(
        &mut self,
        node: &Node,
        path: &Path,
        kind_hint: Option<&str>,
    ) -> Result<Vec<Op>, InjectError> {
        if node.entries().is_none() {
            return Ok(Vec::new());
        }
        let Some(kind) = field(node, "kind").and_then(Node::as_str).or(kind_hint) else {
            return Ok(Vec::new());
        };
        let api_version = field(node, "apiVersion").and_then(Node::as_str);
        if let Some(item_kind) = kind.strip_suffix("List") {
            let Some(items) = field(node, "items").and_then(Node::items) else {
                return Ok(Vec::new());
            };
            let hint = (!item_kind.is_empty()).then_some(item_kind);
            let mut ops = Vec::new();
            for (i, item) in items.iter().enumerate() {
                ops.extend(self.object(item, &path.key("items").index(i), hint)?);
            }
            return Ok(ops);
        }
        match shape(kind, api_version) {
            Some(shape) => self.workload(node, path, kind_hint, &shape),
            None => Ok(Vec::new()),
        }
    }

    fn err(&self, obj: &Node, hint: Option<&str>, field: &Path, message: String) -> InjectError {
        InjectError::Document {
            index: self.index,
            object: describe_object(obj, hint),
            field: field.to_string(),
            message,
        }
    }

    /// The value under `key` of `map` (at `path`), refusing duplicate keys.
    fn slot<'n>(
        &self,
        obj: &Node,
        hint: Option<&str>,
        map: &'n Node,
        path: &Path,
        key: &str,
    ) -> Result<Slot<'n>, InjectError> {
        let mut found = map.get_all(key);
        let first = found.next();
        if let Some((dup, _)) = found.next() {
            return Err(self.err(
                obj,
                hint,
                &path.key(key),
                format!("the key appears twice (again on line {})", dup.line),
            ));
        }
        Ok(match first {
            None => Slot::Absent,
            Some((_, v)) if v.is_null() => Slot::Null,
            Some((_, v)) => Slot::Here(v),
        })
    }

    /// Like [`Self::slot`], but the value must be a mapping (or null / absent).
    fn map_slot<'n>(
        &self,
        obj: &Node,
        hint: Option<&str>,
        map: &'n Node,
        path: &Path,
        key: &str,
    ) -> Result<Slot<'n>, InjectError> {
        self.shaped_slot(obj, hint, map, path, key, "a mapping", |v| {
            v.entries().is_some()
        })
    }

    /// Like [`Self::slot`], but the value must be a sequence (or null / absent).
    fn seq_slot<'n>(
        &self,
        obj: &Node,
        hint: Option<&str>,
        map: &'n Node,
        path: &Path,
        key: &str,
    ) -> Result<Slot<'n>, InjectError> {
        self.shaped_slot(obj, hint, map, path, key, "a sequence", |v| {
            v.items().is_some()
        })
    }

    /// [`Self::slot`], refusing a present value that is not `expected` (`is_shape` says).
    #[allow(clippy::too_many_arguments)]
    fn shaped_slot<'n>(
        &self,
        obj: &Node,
        hint: Option<&str>,
        map: &'n Node,
        path: &Path,
        key: &str,
        expected: &str,
        is_shape: fn(&Node) -> bool,
    ) -> Result<Slot<'n>, InjectError> {
        match self.slot(obj, hint, map, path, key)? {
            Slot::Here(v) if !is_shape(v) => Err(self.err(
                obj,
                hint,
                &path.key(key),
                format!("expected {expected}, found {}", v.describe()),
            )),
            other => Ok(other),
        }
    }

    fn workload(
        &mut self,
        obj: &Node,
        path: &Path,
        hint: Option<&str>,
        shape: &WorkloadShape,
    ) -> Result<Vec<Op>, InjectError> {
        // Opt-out first: an opted-out object is left alone whatever else it holds.
        let mut metas: Vec<(&Node, Path)> = Vec::new();
        for meta_path in std::iter::once(&[][..])
            .chain(shape.extra_meta.iter().copied())
            .chain(std::iter::once(shape.template))
        {
            if let Some(meta) = walk(obj, meta_path).and_then(|n| field(n, "metadata")) {
                metas.push((meta, path.keys(meta_path).key("metadata")));
            }
        }
        for (meta, meta_path) in &metas {
            for section in ["annotations", "labels"] {
                let Some(value) = field(meta, section).and_then(|s| field(s, INJECT_KEY)) else {
                    continue;
                };
                match value.as_str() {
                    Some("false") => return Ok(Vec::new()),
                    Some("true") => {}
                    _ => {
                        return Err(self.err(
                            obj,
                            hint,
                            &meta_path.key(section).key(INJECT_KEY),
                            "must be \"true\" or \"false\"".to_owned(),
                        ))
                    }
                }
            }
        }

        // The pod template: a mapping with a `spec` mapping.
        let tpl_path = path.keys(shape.template);
        let tpl = walk(obj, shape.template)
            .ok_or_else(|| self.err(obj, hint, &tpl_path, "no pod template here".to_owned()))?;
        if tpl.entries().is_none() {
            return Err(self.err(
                obj,
                hint,
                &tpl_path,
                format!("expected a mapping, found {}", tpl.describe()),
            ));
        }
        let spec_path = tpl_path.key("spec");
        let spec = match self.map_slot(obj, hint, tpl, &tpl_path, "spec")? {
            Slot::Here(s) => s,
            Slot::Absent | Slot::Null => {
                return Err(self.err(obj, hint, &spec_path, "no pod spec".to_owned()))
            }
        };
        let meta_path = tpl_path.key("metadata");
        let meta = self.map_slot(obj, hint, tpl, &tpl_path, "metadata")?;
        let annotations = match &meta {
            Slot::Here(m) => self.map_slot(obj, hint, m, &meta_path, "annotations")?,
            _ => Slot::Absent,
        };

        // Already injected: leave it exactly as it is.
        if let Slot::Here(a) = &annotations {
            if field(a, STATUS_KEY).and_then(Node::as_str) == Some(STATUS_INJECTED) {
                return Ok(Vec::new());
            }
        }
        let lists = ["initContainers", "containers", "ephemeralContainers"];
        let mut containers: Vec<(&Node, Path)> = Vec::new();
        for list in lists {
            if let Slot::Here(seq) = self.seq_slot(obj, hint, spec, &spec_path, list)? {
                for (i, c) in seq.items().unwrap_or(&[]).iter().enumerate() {
                    containers.push((c, spec_path.key(list).index(i)));
                }
            }
        }
        let ours = &self.template.container_name;
        for (c, c_path) in &containers {
            let is_app_container = !matches!(
                c_path.0.get(c_path.0.len().saturating_sub(2)),
                Some(Seg::Key(k)) if k == "ephemeralContainers"
            );
            if is_app_container && field(c, "name").and_then(Node::as_str) == Some(ours.as_str()) {
                return Ok(Vec::new());
            }
        }

        if obj.has_alias() {
            return Err(self.err(
                obj,
                hint,
                &Path::default(),
                "uses YAML aliases (*name), which inject does not edit: expand them first \
                 (e.g. `yq 'explode(.)'`)"
                    .to_owned(),
            ));
        }

        // Conflicts.
        if let Some(host_network) = field(spec, "hostNetwork") {
            if matches!(&host_network.kind, Kind::Scalar(s, saphyr_parser::ScalarStyle::Plain)
                if matches!(s.as_str(), "true" | "True" | "TRUE"))
            {
                return Err(self.err(
                    obj,
                    hint,
                    &spec_path.key("hostNetwork"),
                    "the pod uses the node's network namespace (hostNetwork: true); the \
                     sidecar would intercept the whole node's traffic, so inject refuses: \
                     opt the workload out with the annotation sidecar.dev/inject: \"false\""
                        .to_owned(),
                ));
            }
        }
        for (c, c_path) in &containers {
            if let Some(name) = field(c, "name").and_then(Node::as_str) {
                if is_reserved(name, ours) {
                    return Err(self.err(
                        obj,
                        hint,
                        &c_path.key("name"),
                        format!(
                            "container name \"{name}\" is reserved for the sidecar (\"{ours}\" \
                             and \"{ours}-*\"): rename the container"
                        ),
                    ));
                }
            }
            let ports = field(c, "ports").and_then(Node::items).unwrap_or(&[]);
            for (j, p) in ports.iter().enumerate() {
                let port = field(p, "containerPort").and_then(Node::as_str);
                if let Some(n) = port.and_then(|s| s.parse::<i128>().ok()) {
                    if self.template.ports.contains(&n) {
                        return Err(self.err(
                            obj,
                            hint,
                            &c_path.key("ports").index(j).key("containerPort"),
                            format!(
                                "port {n} is used by the sidecar (admin 15020, outbound proxy \
                                 15001, inbound proxy 15006) in the pod's network namespace"
                            ),
                        ));
                    }
                }
            }
        }
        let volumes = self.seq_slot(obj, hint, spec, &spec_path, "volumes")?;
        if let Slot::Here(seq) = &volumes {
            for (i, v) in seq.items().unwrap_or(&[]).iter().enumerate() {
                if let Some(name) = field(v, "name").and_then(Node::as_str) {
                    if is_reserved(name, ours) {
                        return Err(self.err(
                            obj,
                            hint,
                            &spec_path.key("volumes").index(i).key("name"),
                            format!(
                                "volume name \"{name}\" is reserved for the sidecar (\"{ours}-*\") \
                                 but the pod template is not injected: rename the volume"
                            ),
                        ));
                    }
                }
            }
        }

        // The changes.
        let mut ops = Vec::new();
        let init = self.seq_slot(obj, hint, spec, &spec_path, "initContainers")?;
        let container = self.template.container.clone();
        ops.push(list_op(
            &spec_path,
            "initContainers",
            &init,
            vec![container],
        ));
        ops.push(list_op(
            &spec_path,
            "volumes",
            &volumes,
            self.template.volumes.clone(),
        ));

        let wanted = self.annotations_to_add(&annotations, &describe_object(obj, hint));
        if !wanted.is_empty() {
            let as_map = || {
                Value::Map(
                    wanted
                        .iter()
                        .map(|(k, v)| (Value::str(k.clone()), v.clone()))
                        .collect(),
                )
            };
            let op = match (&meta, &annotations) {
                (Slot::Absent, _) => Op::AddKeys {
                    path: tpl_path.clone(),
                    entries: vec![(
                        "metadata".to_owned(),
                        Value::Map(vec![(Value::str("annotations"), as_map())]),
                    )],
                },
                (Slot::Null, _) => Op::ReplaceNull {
                    path: tpl_path.clone(),
                    key: "metadata".to_owned(),
                    value: Value::Map(vec![(Value::str("annotations"), as_map())]),
                },
                (Slot::Here(_), Slot::Absent) => Op::AddKeys {
                    path: meta_path.clone(),
                    entries: vec![("annotations".to_owned(), as_map())],
                },
                (Slot::Here(_), Slot::Null) => Op::ReplaceNull {
                    path: meta_path.clone(),
                    key: "annotations".to_owned(),
                    value: as_map(),
                },
                (Slot::Here(_), Slot::Here(_)) => Op::AddKeys {
                    path: meta_path.key("annotations"),
                    entries: wanted.clone(),
                },
            };
            ops.push(op);
        }
        self.injected += 1;
        Ok(ops)
    }

    /// The template's annotations the pod template does not have yet. The pod's own
    /// `prometheus.io/*` annotations win as a group (they point the scraper at the
    /// application): then none of the sidecar's are added, with a warning.
    fn annotations_to_add(&mut self, existing: &Slot<'_>, object: &str) -> Vec<(String, Value)> {
        let has = |key: &str| match existing {
            Slot::Here(a) => a.get_all(key).next().is_some(),
            _ => false,
        };
        const PROMETHEUS: &str = "prometheus.io/";
        let pod_has_prometheus = match existing {
            Slot::Here(a) => a
                .entries()
                .unwrap_or(&[])
                .iter()
                .any(|(k, _)| k.as_str().is_some_and(|k| k.starts_with(PROMETHEUS))),
            _ => false,
        };
        let mut out = Vec::new();
        for (k, v) in &self.template.annotations {
            if k.starts_with(PROMETHEUS) && pod_has_prometheus {
                continue;
            }
            if has(k) {
                self.warnings.push(format!(
                    "document {} ({object}): kept the pod template's own annotation {k}",
                    self.index
                ));
                continue;
            }
            out.push((k.clone(), v.clone()));
        }
        if pod_has_prometheus {
            self.warnings.push(format!(
                "document {} ({object}): the pod template has its own prometheus.io/* \
                 annotations, which are kept; the sidecar's metrics (port 15020, /metrics) are \
                 not announced by annotation: scrape them with a PodMonitor or a scrape job",
                self.index
            ));
        }
        out
    }
}

fn is_reserved(name: &str, ours: &str) -> bool {
    name == ours
        || name
            .strip_prefix(ours)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// The change that puts `items` first in the list `key` of the mapping at `map_path`.
fn list_op(map_path: &Path, key: &str, slot: &Slot<'_>, items: Vec<Value>) -> Op {
    match slot {
        Slot::Here(_) => Op::Prepend {
            path: map_path.key(key),
            items,
        },
        Slot::Null => Op::ReplaceNull {
            path: map_path.clone(),
            key: key.to_owned(),
            value: Value::Seq(items),
        },
        Slot::Absent => Op::AddKeys {
            path: map_path.clone(),
            entries: vec![(key.to_owned(), Value::Seq(items))],
        },
    }
}

/// The node at `keys` below `node` (mappings only).
fn walk<'a>(node: &'a Node, keys: &[&str]) -> Option<&'a Node> {
    keys.iter().try_fold(node, |n, k| field(n, k))
}

fn node_at<'a>(root: &'a Node, path: &Path) -> Option<&'a Node> {
    path.0.iter().try_fold(root, |n, seg| match seg {
        Seg::Key(k) => field(n, k),
        Seg::Index(i) => n.items().and_then(|items| items.get(*i)),
    })
}

/// A change to the text: replace `start..end` with `text`.
#[derive(Clone, Debug)]
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

fn line_start(src: &str, pos: usize) -> usize {
    src[..pos].rfind('\n').map_or(0, |i| i + 1)
}

/// Byte offset of the end of the line holding `pos` (before its `\n` or `\r\n`).
fn line_end(src: &str, pos: usize) -> usize {
    match src[pos..].find('\n') {
        Some(i) if src[..pos + i].ends_with('\r') => pos + i - 1,
        Some(i) => pos + i,
        None => src.len(),
    }
}

/// Moves an insertion point at the start of a line up over the comment lines right above it
/// that are indented exactly `col` (they describe the entry below them).
fn above_comments(src: &str, mut at: usize, col: usize) -> usize {
    while at > 0 {
        let prev = line_start(src, at - 1);
        let line = src[prev..at - 1].trim_end_matches('\r');
        let indent = line.len() - line.trim_start_matches(' ').len();
        if indent == col && line[indent..].starts_with('#') {
            at = prev;
        } else {
            break;
        }
    }
    at
}

/// The column of the node at `pos` when only spaces precede it on its line.
fn line_leading(src: &str, pos: usize) -> Option<(usize, usize)> {
    let ls = line_start(src, pos);
    src[ls..pos]
        .bytes()
        .all(|b| b == b' ')
        .then_some((ls, pos - ls))
}

/// The text edits that carry out `op` on the document whose root is `root`.
fn text_edits(src: &str, root: &Node, op: &Op, nl: &str) -> Result<Vec<Edit>, String> {
    let target = node_at(root, op_path(op)).ok_or("not found")?;
    let emitter = || Emitter {
        nl,
        out: String::new(),
    };
    let unsupported = |what: &str| {
        format!(
            "cannot add to this {what} as laid out on line {}: reformat the document (e.g. \
             with `yq`) and retry",
            target.line
        )
    };
    let flow_open = |node: &Node, open: u8| -> Result<usize, String> {
        (src.as_bytes().get(node.start) == Some(&open))
            .then_some(node.start + 1)
            .ok_or_else(|| unsupported("flow collection"))
    };
    match op {
        Op::Prepend { items, .. } => {
            let existing = target.items().ok_or("expected a sequence")?;
            if target.flow {
                let at = flow_open(target, b'[')?;
                let mut text: Vec<String> = items.iter().map(yaml::flow).collect();
                if !existing.is_empty() {
                    text.push(String::new());
                }
                return Ok(vec![Edit {
                    start: at,
                    end: at,
                    text: text.join(", "),
                }]);
            }
            // `<spaces>- <first item>`: insert whole lines before the first item's line.
            let first = existing.first().ok_or_else(|| unsupported("sequence"))?;
            let ls = line_start(src, first.start);
            let prefix = &src[ls..first.start];
            let col = prefix.len() - prefix.trim_start_matches(' ').len();
            let rest = &prefix[col..];
            if !(rest.starts_with("- ") && rest[1..].bytes().all(|b| b == b' ')) {
                return Err(unsupported("sequence"));
            }
            let at = above_comments(src, ls, col);
            let mut e = emitter();
            e.items(items, col);
            Ok(vec![Edit {
                start: at,
                end: at,
                text: e.out,
            }])
        }
        Op::AddKeys { entries, .. } => {
            let existing = target.entries().ok_or("expected a mapping")?;
            let values: Vec<(Value, Value)> = entries
                .iter()
                .map(|(k, v)| (Value::str(k.clone()), v.clone()))
                .collect();
            if target.flow {
                let at = flow_open(target, b'{')?;
                let mut text: Vec<String> = values
                    .iter()
                    .map(|(k, v)| format!("{}: {}", yaml::flow(k), yaml::flow(v)))
                    .collect();
                if !existing.is_empty() {
                    text.push(String::new());
                }
                return Ok(vec![Edit {
                    start: at,
                    end: at,
                    text: text.join(", "),
                }]);
            }
            // Insert whole lines before the first key that begins its line.
            let (ls, col) = existing
                .iter()
                .find_map(|(k, _)| line_leading(src, k.start))
                .ok_or_else(|| unsupported("mapping"))?;
            let at = above_comments(src, ls, col);
            let mut e = emitter();
            e.entries(&values, col, None);
            Ok(vec![Edit {
                start: at,
                end: at,
                text: e.out,
            }])
        }
        Op::ReplaceNull { key, value, .. } => {
            let (k, v) = target
                .get_all(key)
                .next()
                .ok_or("expected the key in the mapping")?;
            if target.flow {
                if v.end <= v.start {
                    return Err(unsupported("flow mapping"));
                }
                return Ok(vec![Edit {
                    start: v.start,
                    end: v.end,
                    text: yaml::flow(value),
                }]);
            }
            let ls = line_start(src, k.start);
            let col = src[ls..k.start].chars().count();
            let mut edits = Vec::new();
            if v.end > v.start {
                edits.push(Edit {
                    start: v.start,
                    end: v.end,
                    text: String::new(),
                });
            }
            let at = line_end(src, k.end.max(v.end));
            // At the end of the key's line (after any comment): a line break and the nested
            // block, without its last line break (the line's own follows).
            let mut e = emitter();
            e.after_key(value, col);
            let body = e.out.strip_suffix(nl).unwrap_or(&e.out).to_owned();
            edits.push(Edit {
                start: at,
                end: at,
                text: body,
            });
            Ok(edits)
        }
    }
}

fn apply_edits(src: &str, mut edits: Vec<Edit>) -> Result<String, InjectError> {
    edits.sort_by_key(|e| e.start);
    let mut out =
        String::with_capacity(src.len() + edits.iter().map(|e| e.text.len()).sum::<usize>());
    let mut pos = 0;
    for e in edits {
        if e.start < pos || e.end < e.start || e.end > src.len() {
            return Err(InjectError::Internal(format!(
                "overlapping edits at byte {}",
                e.start
            )));
        }
        out.push_str(&src[pos..e.start]);
        out.push_str(&e.text);
        pos = e.end;
    }
    out.push_str(&src[pos..]);
    Ok(out)
}

/// `sidecar inject` with its arguments (after `inject`); returns the process exit code.
pub fn main(args: &InjectArgs) -> ExitCode {
    let fail = |code: u8, msg: &str| {
        eprintln!("sidecar inject: error: {msg}");
        ExitCode::from(code)
    };
    let stdin = args.filename.as_os_str() == "-";
    let bytes = if stdin {
        let mut buf = Vec::new();
        std::io::stdin().lock().read_to_end(&mut buf).map(|_| buf)
    } else {
        std::fs::read(&args.filename)
    };
    let name = if stdin {
        "standard input".to_owned()
    } else {
        args.filename.display().to_string()
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) => return fail(EXIT_USAGE, &format!("cannot read {name}: {e}")),
    };
    let src = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            return fail(
                EXIT_USAGE,
                &format!("{name}: not UTF-8 text (line {line}, byte {at})"),
            );
        }
    };
    let done = match inject(&src, &Options::from(args)) {
        Ok(done) => done,
        Err(e) => return fail(e.exit_code(), &format!("{name}: {e}")),
    };
    for w in &done.warnings {
        eprintln!("sidecar inject: warning: {w}");
    }
    match args.output.as_deref().filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            if let Err(e) = std::fs::write(path, done.text.as_bytes()) {
                return fail(1, &format!("cannot write {}: {e}", path.display()));
            }
        }
        None => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out
                .write_all(done.text.as_bytes())
                .and_then(|()| out.flush())
            {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return fail(1, &format!("cannot write standard output: {e}"));
                }
            }
        }
    }
    ExitCode::SUCCESS
}
