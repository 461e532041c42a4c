//! The telemetry resource: `service.*` and Kubernetes `k8s.*` attributes from
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and the Downward API (environment and the
//! labels/annotations files).
//!
//! CONTRACT: the CLI fills [`ResourceOptions`]; [`ResourceOptions::resolve`] returns every
//! attribute with where it came from (shown by `sidecar config`); [`to_resource`] builds the
//! SDK resource the pipeline uses.
//!
//! # Precedence (lowest first; a later layer replaces an earlier value)
//!
//! 1. Derived: `k8s.pod.name`, `k8s.namespace.name`, `k8s.pod.uid`, `k8s.node.name`,
//!    `k8s.container.name` from the `K8S_*` settings; the owner (see below);
//!    `service.namespace` = the namespace, `service.instance.id` =
//!    `<namespace>.<pod>.<container>` when all three are known (both as the OpenTelemetry
//!    operator does); `service.version` = label `app.kubernetes.io/version`.
//! 2. Annotations `resource.opentelemetry.io/<key>` (the operator's and the semantic
//!    conventions' convention): set `<key>` (empty values are ignored).
//! 3. `OTEL_RESOURCE_ATTRIBUTES`.
//! 4. `OTEL_SERVICE_NAME` (for `service.name` only).
//!
//! When no layer set `service.name`, it is the first of: label `app.kubernetes.io/name`;
//! `k8s.deployment.name`, `k8s.replicaset.name`, `k8s.statefulset.name`,
//! `k8s.daemonset.name`, `k8s.cronjob.name`, `k8s.job.name` (as resolved above);
//! `k8s.pod.name`; `k8s.container.name`; `unknown_service:sidecar`. This is the operator's
//! `chooseServiceName` order (with its opt-in use of labels switched on). Neither the
//! operator nor the semantic conventions use the bare `app` label, so it is not read.
//!
//! # Owner heuristics (without access to the Kubernetes API)
//!
//! Checked in this order; the first that applies wins.
//! - **Job**: label `batch.kubernetes.io/job-name` (else `job-name`) = J gives
//!   `k8s.job.name` = J; when J is `<cronjob>-<8 or more digits>` (the scheduled time in
//!   minutes that the CronJob controller appends), `k8s.cronjob.name` = `<cronjob>`.
//! - **StatefulSet**: label `statefulset.kubernetes.io/pod-name` or
//!   `apps.kubernetes.io/pod-index`, and the pod name (else the `pod-name` label) is
//!   `<sts>-<ordinal digits>` (equal to `pod-index` when that label is present):
//!   `k8s.statefulset.name` = `<sts>`.
//! - **DaemonSet**: labels `controller-revision-hash` and `pod-template-generation`, and the
//!   pod name is `<ds>-<5 characters of bcdfghjklmnpqrstvwxz2456789>`: `k8s.daemonset.name`.
//! - **Deployment** (label): label `pod-template-hash` = H and the pod name is
//!   `<deploy>-H-<suffix>`: `k8s.replicaset.name` = `<deploy>-H`, `k8s.deployment.name` =
//!   `<deploy>`.
//! - **Deployment** (name only, when none of the labels above is present): the pod name is
//!   `<deploy>-<6 to 10 characters>-<5 characters>`, both from the alphabet above (the one
//!   Kubernetes uses for generated names): same two attributes.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::Resource;

use crate::config::ConfigError;
use crate::policy::Annotations;

/// Setting named by errors in the labels file.
pub const SETTING_LABELS_FILE: &str = "SIDECAR_LABELS_FILE";
/// Setting named by errors in the annotations file.
pub const SETTING_ANNOTATIONS_FILE: &str = "SIDECAR_ANNOTATIONS_FILE";
/// Setting named by errors in `OTEL_RESOURCE_ATTRIBUTES`.
pub const SETTING_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";

/// Prefix of the annotations that set resource attributes directly.
pub const ANNOTATION_PREFIX: &str = "resource.opentelemetry.io/";

/// `service.name` when nothing else names the service.
pub const UNKNOWN_SERVICE: &str = "unknown_service:sidecar";

/// Characters Kubernetes uses in generated name suffixes and template hashes
/// (`k8s.io/apimachinery/pkg/util/rand`: no vowels, no `0`, `1`, `3`).
const GENERATED_ALPHABET: &str = "bcdfghjklmnpqrstvwxz2456789";

const SERVICE_NAME: &str = "service.name";
const SERVICE_NAMESPACE: &str = "service.namespace";
const SERVICE_VERSION: &str = "service.version";
const SERVICE_INSTANCE_ID: &str = "service.instance.id";
const K8S_POD_NAME: &str = "k8s.pod.name";
const K8S_NAMESPACE_NAME: &str = "k8s.namespace.name";
const K8S_POD_UID: &str = "k8s.pod.uid";
const K8S_NODE_NAME: &str = "k8s.node.name";
const K8S_CONTAINER_NAME: &str = "k8s.container.name";
const K8S_DEPLOYMENT_NAME: &str = "k8s.deployment.name";
const K8S_REPLICASET_NAME: &str = "k8s.replicaset.name";
const K8S_STATEFULSET_NAME: &str = "k8s.statefulset.name";
const K8S_DAEMONSET_NAME: &str = "k8s.daemonset.name";
const K8S_JOB_NAME: &str = "k8s.job.name";
const K8S_CRONJOB_NAME: &str = "k8s.cronjob.name";

const LABEL_APP_NAME: &str = "app.kubernetes.io/name";
const LABEL_APP_VERSION: &str = "app.kubernetes.io/version";
const LABEL_POD_TEMPLATE_HASH: &str = "pod-template-hash";
const LABEL_STS_POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
const LABEL_POD_INDEX: &str = "apps.kubernetes.io/pod-index";
const LABEL_CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
const LABEL_POD_TEMPLATE_GENERATION: &str = "pod-template-generation";
const LABEL_JOB_NAME: &str = "batch.kubernetes.io/job-name";
const LABEL_JOB_NAME_LEGACY: &str = "job-name";

/// Owner attributes `service.name` falls back to, in order.
const OWNER_KEYS: [&str; 6] = [
    K8S_DEPLOYMENT_NAME,
    K8S_REPLICASET_NAME,
    K8S_STATEFULSET_NAME,
    K8S_DAEMONSET_NAME,
    K8S_CRONJOB_NAME,
    K8S_JOB_NAME,
];

/// Raw inputs of the resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceOptions {
    /// `OTEL_SERVICE_NAME`.
    pub service_name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs, comma-separated, percent-encoded.
    pub resource_attributes: Option<String>,
    /// `K8S_POD_NAME` (Downward API `metadata.name`).
    pub pod_name: Option<String>,
    /// `K8S_NAMESPACE_NAME` (`metadata.namespace`).
    pub namespace_name: Option<String>,
    /// `K8S_POD_UID` (`metadata.uid`).
    pub pod_uid: Option<String>,
    /// `K8S_NODE_NAME` (`spec.nodeName`).
    pub node_name: Option<String>,
    /// `K8S_CONTAINER_NAME`: the application container the sidecar serves.
    pub container_name: Option<String>,
    /// Downward API labels file (`key="value"` lines); missing file = no labels.
    pub labels_file: std::path::PathBuf,
    /// Downward API annotations file; missing file = no annotations.
    pub annotations_file: std::path::PathBuf,
}

/// One resolved resource attribute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceAttribute {
    /// Attribute key, e.g. `k8s.deployment.name`.
    pub key: String,
    /// Value.
    pub value: String,
    /// Where it came from, for `sidecar config`, e.g. `env K8S_POD_NAME`,
    /// `derived from the pod name`, `label app.kubernetes.io/name`, `OTEL_RESOURCE_ATTRIBUTES`.
    pub source: String,
}

/// Attributes being assembled: key → (value, source); inserting replaces.
#[derive(Default)]
struct Layers {
    map: BTreeMap<String, (String, String)>,
}

impl Layers {
    fn set(&mut self, key: &str, value: impl Into<String>, source: impl Into<String>) {
        self.map
            .insert(key.to_string(), (value.into(), source.into()));
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(|(v, _)| v.as_str())
    }
}

/// A non-empty option value.
fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

impl ResourceOptions {
    /// Every attribute, sorted by key. The error names the variable or file at fault.
    pub fn resolve(&self) -> Result<Vec<ResourceAttribute>, ConfigError> {
        let labels = load_downward_file(&self.labels_file, SETTING_LABELS_FILE)?;
        let annotations = load_downward_file(&self.annotations_file, SETTING_ANNOTATIONS_FILE)?;
        let from_env = match non_empty(&self.resource_attributes) {
            Some(text) => parse_resource_attributes(text)?,
            None => Vec::new(),
        };

        let mut out = Layers::default();
        // 1. Derived.
        let k8s = [
            (K8S_POD_NAME, &self.pod_name, "env K8S_POD_NAME"),
            (
                K8S_NAMESPACE_NAME,
                &self.namespace_name,
                "env K8S_NAMESPACE_NAME",
            ),
            (K8S_POD_UID, &self.pod_uid, "env K8S_POD_UID"),
            (K8S_NODE_NAME, &self.node_name, "env K8S_NODE_NAME"),
            (
                K8S_CONTAINER_NAME,
                &self.container_name,
                "env K8S_CONTAINER_NAME",
            ),
        ];
        for (key, value, source) in k8s {
            if let Some(v) = non_empty(value) {
                out.set(key, v, source);
            }
        }
        for (key, value, source) in derive_owner(non_empty(&self.pod_name), &labels) {
            out.set(key, value, source);
        }
        if let Some(ns) = non_empty(&self.namespace_name) {
            out.set(
                SERVICE_NAMESPACE,
                ns,
                "the namespace (env K8S_NAMESPACE_NAME)",
            );
        }
        if let (Some(ns), Some(pod), Some(container)) = (
            non_empty(&self.namespace_name),
            non_empty(&self.pod_name),
            non_empty(&self.container_name),
        ) {
            out.set(
                SERVICE_INSTANCE_ID,
                format!("{ns}.{pod}.{container}"),
                "<namespace>.<pod>.<container>",
            );
        }
        if let Some(v) = labels.get(LABEL_APP_VERSION).filter(|v| !v.is_empty()) {
            out.set(SERVICE_VERSION, v, format!("label {LABEL_APP_VERSION}"));
        }

        // 2. Annotations resource.opentelemetry.io/<key>.
        for (name, value) in &annotations {
            if let Some(key) = name.strip_prefix(ANNOTATION_PREFIX) {
                if !key.is_empty() && !value.is_empty() {
                    out.set(key, value, format!("annotation {name}"));
                }
            }
        }

        // 3. OTEL_RESOURCE_ATTRIBUTES.
        for (key, value) in from_env {
            out.set(&key, value, SETTING_RESOURCE_ATTRIBUTES);
        }

        // 4. OTEL_SERVICE_NAME, else the fallback chain.
        if let Some(name) = non_empty(&self.service_name) {
            out.set(SERVICE_NAME, name, "env OTEL_SERVICE_NAME");
        } else if out.get(SERVICE_NAME).is_none() {
            let (name, source) = fallback_service_name(&out, &labels);
            out.set(SERVICE_NAME, name, source);
        }

        Ok(out
            .map
            .into_iter()
            .map(|(key, (value, source))| ResourceAttribute { key, value, source })
            .collect())
    }
}

/// `service.name` when nothing set it explicitly, with its source.
fn fallback_service_name(attrs: &Layers, labels: &BTreeMap<String, String>) -> (String, String) {
    if let Some(v) = labels.get(LABEL_APP_NAME).filter(|v| !v.is_empty()) {
        return (v.clone(), format!("label {LABEL_APP_NAME}"));
    }
    for key in OWNER_KEYS
        .into_iter()
        .chain([K8S_POD_NAME, K8S_CONTAINER_NAME])
    {
        if let Some(v) = attrs.get(key).filter(|v| !v.is_empty()) {
            return (v.to_string(), format!("the {key} attribute"));
        }
    }
    (UNKNOWN_SERVICE.to_string(), "default".to_string())
}

/// The owner attributes the pod name and labels reveal (see the module documentation).
fn derive_owner(
    pod: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Vec<(&'static str, String, String)> {
    let label = |k: &str| labels.get(k).map(String::as_str).filter(|v| !v.is_empty());

    // Job (and its CronJob).
    let job = label(LABEL_JOB_NAME)
        .map(|j| (j, LABEL_JOB_NAME))
        .or_else(|| label(LABEL_JOB_NAME_LEGACY).map(|j| (j, LABEL_JOB_NAME_LEGACY)));
    if let Some((job, from)) = job {
        let mut out = vec![(K8S_JOB_NAME, job.to_string(), format!("label {from}"))];
        if let Some((cronjob, stamp)) = job.rsplit_once('-') {
            if !cronjob.is_empty() && stamp.len() >= 8 && stamp.bytes().all(|b| b.is_ascii_digit())
            {
                out.push((
                    K8S_CRONJOB_NAME,
                    cronjob.to_string(),
                    "derived from the job name (<cronjob>-<scheduled time>)".to_string(),
                ));
            }
        }
        return out;
    }

    // StatefulSet.
    let sts_pod = label(LABEL_STS_POD_NAME);
    let pod_index = label(LABEL_POD_INDEX);
    if sts_pod.is_some() || pod_index.is_some() {
        if let Some(name) = pod.or(sts_pod) {
            if let Some((sts, ordinal)) = name.rsplit_once('-') {
                let digits = !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit());
                if !sts.is_empty() && digits && pod_index.is_none_or(|i| i == ordinal) {
                    return vec![(
                        K8S_STATEFULSET_NAME,
                        sts.to_string(),
                        "derived from the pod name and StatefulSet labels".to_string(),
                    )];
                }
            }
        }
        return Vec::new();
    }

    // DaemonSet.
    if label(LABEL_CONTROLLER_REVISION_HASH).is_some()
        && label(LABEL_POD_TEMPLATE_GENERATION).is_some()
    {
        if let Some((ds, suffix)) = pod.and_then(|p| p.rsplit_once('-')) {
            if !ds.is_empty() && is_generated(suffix, 5, 5) {
                return vec![(
                    K8S_DAEMONSET_NAME,
                    ds.to_string(),
                    "derived from the pod name and DaemonSet labels".to_string(),
                )];
            }
        }
        return Vec::new();
    }

    // Deployment, from the pod-template-hash label.
    if let Some(hash) = label(LABEL_POD_TEMPLATE_HASH) {
        if let Some(pod) = pod {
            let marker = format!("-{hash}-");
            if let Some(at) = pod.rfind(&marker) {
                let deploy = &pod[..at];
                let suffix = &pod[at + marker.len()..];
                if !deploy.is_empty() && !suffix.is_empty() && !suffix.contains('-') {
                    let source = "derived from the pod name and label pod-template-hash";
                    return vec![
                        (
                            K8S_REPLICASET_NAME,
                            pod[..at + 1 + hash.len()].to_string(),
                            source.to_string(),
                        ),
                        (K8S_DEPLOYMENT_NAME, deploy.to_string(), source.to_string()),
                    ];
                }
            }
        }
        return Vec::new();
    }

    // Deployment, from the generated-name pattern alone.
    if label(LABEL_CONTROLLER_REVISION_HASH).is_some() {
        // A controller we cannot name (e.g. a DaemonSet without its generation label).
        return Vec::new();
    }
    let Some(pod) = pod else {
        return Vec::new();
    };
    let Some((rs, suffix)) = pod.rsplit_once('-') else {
        return Vec::new();
    };
    let Some((deploy, hash)) = rs.rsplit_once('-') else {
        return Vec::new();
    };
    if !deploy.is_empty() && is_generated(hash, 6, 10) && is_generated(suffix, 5, 5) {
        let source = "derived from the pod name (<deployment>-<hash>-<suffix>)";
        return vec![
            (K8S_REPLICASET_NAME, rs.to_string(), source.to_string()),
            (K8S_DEPLOYMENT_NAME, deploy.to_string(), source.to_string()),
        ];
    }
    Vec::new()
}

/// True if `s` has `min..=max` characters, all from the generated-name alphabet.
fn is_generated(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.chars().all(|c| GENERATED_ALPHABET.contains(c))
}

/// Reads a Downward API `key="value"` file (labels or annotations) with the parser of
/// [`Annotations`]. A missing file is empty; an unreadable file or a malformed line is an
/// error naming `setting`, the file and the line.
fn load_downward_file(path: &Path, setting: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(ConfigError::new(
                setting,
                format!("cannot read {}: {e}", path.display()),
            ))
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let (parsed, issues) = Annotations::parse(&text);
    if let Some(issue) = issues.first() {
        return Err(ConfigError::new(
            setting,
            format!("{}: line {}: {}", path.display(), issue.line, issue.reason),
        ));
    }
    // Every non-blank line parsed (no issue): its key is the text before the first `=`,
    // trimmed, exactly as the parser splits it; the parser holds the decoded value.
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some((key, _)) = line.trim().split_once('=') {
            let key = key.trim();
            if let Some(value) = parsed.get(key) {
                out.insert(key.to_string(), value.to_string());
            }
        }
    }
    Ok(out)
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs separated by `,`, keys and values
/// trimmed, values percent-decoded (UTF-8). Blank entries (e.g. a trailing comma) are
/// skipped. An entry without `=`, an empty key, a bad `%` escape or a value that does not
/// decode to UTF-8 rejects the whole value, as the specification says.
pub fn parse_resource_attributes(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (index, entry) in text.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let bad = |what: String| {
            ConfigError::new(
                SETTING_RESOURCE_ATTRIBUTES,
                format!("entry {} ({entry:?}): {what}", index + 1),
            )
        };
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| bad("expected key=value".to_string()))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(bad("empty key".to_string()));
        }
        let value = percent_decode(value.trim()).map_err(bad)?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}

/// Decodes `%XX` escapes; the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding at byte {}", i + 1))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "value is not UTF-8 once percent-decoded".to_string())
}

/// The SDK resource: the attributes plus the SDK's `telemetry.sdk.*` (from the SDK's own
/// [`TelemetryResourceDetector`]). Built from an empty resource, so the SDK does not read
/// `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` a second time.
pub fn to_resource(attributes: &[ResourceAttribute]) -> Resource {
    Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(
            attributes
                .iter()
                .map(|a| opentelemetry::KeyValue::new(a.key.clone(), a.value.clone())),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidecar_tests::tempdir::TempDir;

    /// One table row: inputs, then attributes expected present (with value) or absent.
    struct Case {
        name: &'static str,
        pod: Option<&'static str>,
        namespace: Option<&'static str>,
        container: Option<&'static str>,
        service_name: Option<&'static str>,
        resource_attributes: Option<&'static str>,
        labels: Option<&'static str>,
        annotations: Option<&'static str>,
        expect: &'static [(&'static str, Option<&'static str>)],
    }

    const BASE: Case = Case {
        name: "",
        pod: None,
        namespace: None,
        container: None,
        service_name: None,
        resource_attributes: None,
        labels: None,
        annotations: None,
        expect: &[],
    };

    fn options(dir: &TempDir, case: &Case) -> ResourceOptions {
        let labels_file = dir.join(&format!("{}-labels", case.name));
        let annotations_file = dir.join(&format!("{}-annotations", case.name));
        if let Some(text) = case.labels {
            std::fs::write(&labels_file, text).unwrap();
        }
        if let Some(text) = case.annotations {
            std::fs::write(&annotations_file, text).unwrap();
        }
        ResourceOptions {
            service_name: case.service_name.map(str::to_string),
            resource_attributes: case.resource_attributes.map(str::to_string),
            pod_name: case.pod.map(str::to_string),
            namespace_name: case.namespace.map(str::to_string),
            pod_uid: None,
            node_name: None,
            container_name: case.container.map(str::to_string),
            labels_file,
            annotations_file,
        }
    }

    fn value<'a>(attrs: &'a [ResourceAttribute], key: &str) -> Option<&'a str> {
        attrs
            .iter()
            .find(|a| a.key == key)
            .map(|a| a.value.as_str())
    }

    fn source<'a>(attrs: &'a [ResourceAttribute], key: &str) -> &'a str {
        attrs
            .iter()
            .find(|a| a.key == key)
            .map(|a| a.source.as_str())
            .unwrap_or_else(|| panic!("no {key} in {attrs:?}"))
    }

    #[test]
    fn derivation_and_precedence_table() {
        let dir = TempDir::create("resource-table").unwrap();
        let cases = [
            Case {
                name: "nothing",
                expect: &[
                    ("service.name", Some("unknown_service:sidecar")),
                    ("k8s.pod.name", None),
                    ("service.namespace", None),
                    ("service.instance.id", None),
                ],
                ..BASE
            },
            Case {
                name: "deployment-label",
                pod: Some("web-7d4b9c8f6d-x2kzq"),
                namespace: Some("shop"),
                container: Some("app"),
                labels: Some("pod-template-hash=\"7d4b9c8f6d\"\n"),
                expect: &[
                    ("k8s.replicaset.name", Some("web-7d4b9c8f6d")),
                    ("k8s.deployment.name", Some("web")),
                    ("service.name", Some("web")),
                    ("service.namespace", Some("shop")),
                    ("service.instance.id", Some("shop.web-7d4b9c8f6d-x2kzq.app")),
                    ("k8s.namespace.name", Some("shop")),
                    ("k8s.container.name", Some("app")),
                ],
                ..BASE
            },
            Case {
                // The label is authoritative even where the name-only pattern would fail
                // (hyphenated name, hash with characters outside the alphabet).
                name: "deployment-label-odd-hash",
                pod: Some("my-api-v2-abc1230-zzzzz"),
                labels: Some("pod-template-hash=\"abc1230\"\n"),
                expect: &[
                    ("k8s.replicaset.name", Some("my-api-v2-abc1230")),
                    ("k8s.deployment.name", Some("my-api-v2")),
                ],
                ..BASE
            },
            Case {
                name: "deployment-label-name-mismatch",
                pod: Some("standalone"),
                labels: Some("pod-template-hash=\"7d4b9c8f6d\"\n"),
                expect: &[
                    ("k8s.deployment.name", None),
                    ("k8s.replicaset.name", None),
                    ("service.name", Some("standalone")),
                ],
                ..BASE
            },
            Case {
                name: "deployment-name-only",
                pod: Some("checkout-service-5f8d9b7c4-tq2xl"),
                expect: &[
                    ("k8s.replicaset.name", Some("checkout-service-5f8d9b7c4")),
                    ("k8s.deployment.name", Some("checkout-service")),
                    ("service.name", Some("checkout-service")),
                ],
                ..BASE
            },
            Case {
                // `e`, `a`, `1`, `0`, `3` never appear in generated names.
                name: "name-only-no-match",
                pod: Some("release-2024a1-ab0c3"),
                expect: &[
                    ("k8s.deployment.name", None),
                    ("service.name", Some("release-2024a1-ab0c3")),
                ],
                ..BASE
            },
            Case {
                name: "name-only-hash-too-short",
                pod: Some("web-b2c4d-x2kzq"),
                expect: &[("k8s.deployment.name", None)],
                ..BASE
            },
            Case {
                name: "statefulset",
                pod: Some("db-cluster-12"),
                labels: Some(
                    "statefulset.kubernetes.io/pod-name=\"db-cluster-12\"\n\
                     controller-revision-hash=\"db-cluster-6c9f\"\n",
                ),
                expect: &[
                    ("k8s.statefulset.name", Some("db-cluster")),
                    ("k8s.daemonset.name", None),
                    ("service.name", Some("db-cluster")),
                ],
                ..BASE
            },
            Case {
                name: "statefulset-pod-index-from-label-name",
                labels: Some(
                    "statefulset.kubernetes.io/pod-name=\"kafka-3\"\n\
                     apps.kubernetes.io/pod-index=\"3\"\n",
                ),
                expect: &[("k8s.statefulset.name", Some("kafka"))],
                ..BASE
            },
            Case {
                name: "statefulset-index-mismatch",
                pod: Some("kafka-3"),
                labels: Some("apps.kubernetes.io/pod-index=\"4\"\n"),
                expect: &[("k8s.statefulset.name", None)],
                ..BASE
            },
            Case {
                name: "daemonset",
                pod: Some("node-agent-x7kq2"),
                labels: Some(
                    "controller-revision-hash=\"6f5d7c\"\npod-template-generation=\"3\"\n",
                ),
                expect: &[
                    ("k8s.daemonset.name", Some("node-agent")),
                    ("k8s.deployment.name", None),
                    ("service.name", Some("node-agent")),
                ],
                ..BASE
            },
            Case {
                name: "daemonset-bad-suffix",
                pod: Some("node-agent-x7kq"),
                labels: Some(
                    "controller-revision-hash=\"6f5d7c\"\npod-template-generation=\"3\"\n",
                ),
                expect: &[("k8s.daemonset.name", None)],
                ..BASE
            },
            Case {
                name: "job",
                pod: Some("migrate-x7kq2"),
                labels: Some("batch.kubernetes.io/job-name=\"migrate\"\njob-name=\"other\"\n"),
                expect: &[
                    ("k8s.job.name", Some("migrate")),
                    ("k8s.cronjob.name", None),
                    ("service.name", Some("migrate")),
                ],
                ..BASE
            },
            Case {
                name: "cronjob",
                pod: Some("nightly-report-28504020-x7kq2"),
                labels: Some("job-name=\"nightly-report-28504020\"\n"),
                expect: &[
                    ("k8s.job.name", Some("nightly-report-28504020")),
                    ("k8s.cronjob.name", Some("nightly-report")),
                    ("k8s.deployment.name", None),
                    ("service.name", Some("nightly-report")),
                ],
                ..BASE
            },
            Case {
                name: "job-short-digits-not-cronjob",
                labels: Some("job-name=\"backup-1234567\"\n"),
                expect: &[
                    ("k8s.job.name", Some("backup-1234567")),
                    ("k8s.cronjob.name", None),
                ],
                ..BASE
            },
            Case {
                name: "label-app-name-beats-owner",
                pod: Some("web-7d4b9c8f6d-x2kzq"),
                labels: Some(
                    "app.kubernetes.io/name=\"storefront\"\napp=\"ignored\"\n\
                     app.kubernetes.io/version=\"1.4.2\"\n",
                ),
                expect: &[
                    ("service.name", Some("storefront")),
                    ("service.version", Some("1.4.2")),
                    ("k8s.deployment.name", Some("web")),
                ],
                ..BASE
            },
            Case {
                name: "app-label-alone-is-not-used",
                pod: Some("solo"),
                labels: Some("app=\"ignored\"\n"),
                expect: &[("service.name", Some("solo"))],
                ..BASE
            },
            Case {
                name: "annotations-override-derived",
                pod: Some("web-7d4b9c8f6d-x2kzq"),
                namespace: Some("shop"),
                labels: Some(
                    "pod-template-hash=\"7d4b9c8f6d\"\napp.kubernetes.io/name=\"lbl\"\n\
                     app.kubernetes.io/version=\"1\"\n",
                ),
                annotations: Some(
                    "resource.opentelemetry.io/service.name=\"from-annotation\"\n\
                     resource.opentelemetry.io/k8s.deployment.name=\"frontend\"\n\
                     resource.opentelemetry.io/service.namespace=\"retail\"\n\
                     resource.opentelemetry.io/service.version=\"2\"\n\
                     resource.opentelemetry.io/team=\"a \\\"b\\\"\"\n\
                     resource.opentelemetry.io/empty=\"\"\n\
                     other.io/x=\"y\"\n",
                ),
                expect: &[
                    ("service.name", Some("from-annotation")),
                    ("k8s.deployment.name", Some("frontend")),
                    ("k8s.replicaset.name", Some("web-7d4b9c8f6d")),
                    ("service.namespace", Some("retail")),
                    ("service.version", Some("2")),
                    ("team", Some("a \"b\"")),
                    ("empty", None),
                    ("other.io/x", None),
                ],
                ..BASE
            },
            Case {
                name: "annotated-owner-feeds-service-name",
                pod: Some("solo"),
                annotations: Some("resource.opentelemetry.io/k8s.deployment.name=\"api\"\n"),
                expect: &[("service.name", Some("api"))],
                ..BASE
            },
            Case {
                name: "resource-attributes-override-annotations",
                pod: Some("web-7d4b9c8f6d-x2kzq"),
                namespace: Some("shop"),
                resource_attributes: Some(
                    " service.name = env%20name ,service.namespace=ops,k8s.deployment.name=d2,\
                     deployment.environment.name=prod%2Ceu,",
                ),
                annotations: Some(
                    "resource.opentelemetry.io/service.name=\"from-annotation\"\n\
                     resource.opentelemetry.io/service.namespace=\"retail\"\n",
                ),
                expect: &[
                    ("service.name", Some("env name")),
                    ("service.namespace", Some("ops")),
                    ("k8s.deployment.name", Some("d2")),
                    ("deployment.environment.name", Some("prod,eu")),
                ],
                ..BASE
            },
            Case {
                name: "otel-service-name-wins",
                pod: Some("web-7d4b9c8f6d-x2kzq"),
                service_name: Some("explicit"),
                resource_attributes: Some("service.name=from-attrs"),
                annotations: Some("resource.opentelemetry.io/service.name=\"from-annotation\"\n"),
                expect: &[("service.name", Some("explicit"))],
                ..BASE
            },
            Case {
                name: "empty-env-values-are-unset",
                pod: Some(""),
                service_name: Some(""),
                resource_attributes: Some(""),
                container: Some("app"),
                expect: &[
                    ("k8s.pod.name", None),
                    ("service.name", Some("app")),
                    ("service.instance.id", None),
                ],
                ..BASE
            },
        ];
        for case in &cases {
            let attrs = options(&dir, case)
                .resolve()
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let keys: Vec<&str> = attrs.iter().map(|a| a.key.as_str()).collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            assert_eq!(keys, sorted, "{}: not sorted", case.name);
            for (key, want) in case.expect {
                assert_eq!(
                    value(&attrs, key),
                    *want,
                    "{}: {key} in {attrs:?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn sources_say_where_each_value_came_from() {
        let dir = TempDir::create("resource-sources").unwrap();
        let case = Case {
            name: "sources",
            pod: Some("web-7d4b9c8f6d-x2kzq"),
            namespace: Some("shop"),
            container: Some("app"),
            resource_attributes: Some("service.version=9"),
            labels: Some("pod-template-hash=\"7d4b9c8f6d\"\n"),
            annotations: Some("resource.opentelemetry.io/team=\"t\"\n"),
            ..BASE
        };
        let mut opts = options(&dir, &case);
        opts.pod_uid = Some("0b4c-uid".to_string());
        opts.node_name = Some("node-1".to_string());
        let attrs = opts.resolve().unwrap();
        assert_eq!(source(&attrs, "k8s.pod.name"), "env K8S_POD_NAME");
        assert_eq!(source(&attrs, "k8s.pod.uid"), "env K8S_POD_UID");
        assert_eq!(value(&attrs, "k8s.pod.uid"), Some("0b4c-uid"));
        assert_eq!(source(&attrs, "k8s.node.name"), "env K8S_NODE_NAME");
        assert_eq!(value(&attrs, "k8s.node.name"), Some("node-1"));
        assert!(source(&attrs, "k8s.deployment.name").contains("pod-template-hash"));
        assert_eq!(
            source(&attrs, "team"),
            "annotation resource.opentelemetry.io/team"
        );
        assert_eq!(
            source(&attrs, "service.version"),
            "OTEL_RESOURCE_ATTRIBUTES"
        );
        assert_eq!(
            source(&attrs, "service.name"),
            "the k8s.deployment.name attribute"
        );
        assert_eq!(
            source(&attrs, "service.instance.id"),
            "<namespace>.<pod>.<container>"
        );

        let named = ResourceOptions {
            service_name: Some("x".into()),
            ..opts
        };
        assert_eq!(
            source(&named.resolve().unwrap(), "service.name"),
            "env OTEL_SERVICE_NAME"
        );
        let bare = ResourceOptions::default();
        assert_eq!(source(&bare.resolve().unwrap(), "service.name"), "default");
    }

    #[test]
    fn malformed_resource_attributes_reject_the_whole_value() {
        for bad in ["a=1,novalue", "=x", "a=%zz", "a=%4", "a=%ff%fe", "a=1, =2"] {
            let opts = ResourceOptions {
                resource_attributes: Some(bad.to_string()),
                ..ResourceOptions::default()
            };
            let err = opts.resolve().expect_err(bad);
            assert_eq!(err.setting, "OTEL_RESOURCE_ATTRIBUTES", "{bad}");
        }
        assert_eq!(
            parse_resource_attributes("k=a%3Db%25,,k2=").unwrap(),
            vec![
                ("k".to_string(), "a=b%".to_string()),
                ("k2".to_string(), String::new())
            ]
        );
        assert_eq!(
            parse_resource_attributes("k=caf%C3%A9").unwrap(),
            vec![("k".to_string(), "café".to_string())]
        );
    }

    #[test]
    fn malformed_or_unreadable_downward_files_name_the_file_and_line() {
        let dir = TempDir::create("resource-bad-files").unwrap();
        let labels = dir.join("labels");
        std::fs::write(&labels, "app=\"ok\"\n\nbroken line\n").unwrap();
        let opts = ResourceOptions {
            labels_file: labels.clone(),
            annotations_file: dir.join("missing"),
            ..ResourceOptions::default()
        };
        let err = opts.resolve().unwrap_err();
        assert_eq!(err.setting, "SIDECAR_LABELS_FILE");
        assert!(err.problem.contains("line 3"), "{err}");
        assert!(err.problem.contains(&labels.display().to_string()), "{err}");

        let annotations = dir.join("annotations");
        std::fs::write(&annotations, "a=\"unterminated\n").unwrap();
        let opts = ResourceOptions {
            annotations_file: annotations,
            labels_file: dir.join("missing"),
            ..ResourceOptions::default()
        };
        let err = opts.resolve().unwrap_err();
        assert_eq!(err.setting, "SIDECAR_ANNOTATIONS_FILE");
        assert!(err.problem.contains("line 1"), "{err}");

        // A directory cannot be read as a file.
        let opts = ResourceOptions {
            labels_file: dir.path().to_path_buf(),
            annotations_file: dir.join("missing"),
            ..ResourceOptions::default()
        };
        let err = opts.resolve().unwrap_err();
        assert_eq!(err.setting, "SIDECAR_LABELS_FILE");
        assert!(err.problem.contains("cannot read"), "{err}");
    }

    #[test]
    fn downward_values_are_go_unquoted() {
        let dir = TempDir::create("resource-quoting").unwrap();
        let labels = dir.join("labels");
        std::fs::write(&labels, "app.kubernetes.io/name=\"a\\\\b\\n\\u00e9\"\n").unwrap();
        let opts = ResourceOptions {
            labels_file: labels,
            annotations_file: dir.join("missing"),
            ..ResourceOptions::default()
        };
        let attrs = opts.resolve().unwrap();
        assert_eq!(value(&attrs, "service.name"), Some("a\\b\né"));
    }

    #[test]
    fn sdk_resource_has_telemetry_sdk_and_ignores_the_environment() {
        // Whatever the test process's environment holds, only our attributes and the SDK's
        // telemetry.sdk.* end up in the resource.
        let attrs = vec![
            ResourceAttribute {
                key: "service.name".into(),
                value: "svc".into(),
                source: "test".into(),
            },
            ResourceAttribute {
                key: "k8s.pod.name".into(),
                value: "p".into(),
                source: "test".into(),
            },
        ];
        let resource = to_resource(&attrs);
        let get = |k: &str| {
            resource
                .get(&opentelemetry::Key::from(k.to_string()))
                .map(|v| v.to_string())
        };
        assert_eq!(get("service.name").as_deref(), Some("svc"));
        assert_eq!(get("k8s.pod.name").as_deref(), Some("p"));
        assert_eq!(get("telemetry.sdk.name").as_deref(), Some("opentelemetry"));
        assert_eq!(get("telemetry.sdk.language").as_deref(), Some("rust"));
        assert!(get("telemetry.sdk.version").is_some());
        assert_eq!(resource.len(), 5);
    }
}
