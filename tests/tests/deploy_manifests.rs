//! Offline checks of the Kubernetes deployment (issue 6, item 1): the example of
//! `deploy/kubernetes/`, its privileged fallback `deploy/kubernetes/variants/privileged/`, the
//! Helm chart `deploy/helm/sidecar` and the runtime image definition `deploy/Dockerfile`.
//!
//! - Every manifest, and every chart render (default values and several value sets), validates
//!   strictly against the Kubernetes API schemas of each version in `KUBERNETES_VERSIONS`
//!   (`kubernetes-validate`).
//! - The sidecar container, its volumes and the pod annotations equal, as data,
//!   `sidecar/src/inject/template.yaml` (what `sidecar inject` adds).
//! - Chart values land where they should (parsed renders), the environment the chart renders is
//!   accepted by the real `sidecar config`, and bad values are rejected with a message naming
//!   them.
//!
//! Needs the peers' virtualenv (`cargo xtask setup`): `kubernetes-validate`, `helm` and PyYAML
//! (YAML is parsed by PyYAML, which reads YAML 1.1 as Kubernetes does, and handed over as
//! JSON); `sidecar_runs_the_environment_the_chart_renders` also needs the sidecar binary
//! (`SIDECAR_BIN` or `target/release/sidecar`). A missing tool fails the test, naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use sidecar_tests::cmd::run_timeout;
use sidecar_tests::deploy::{helm, kubernetes_validate, kubernetes_validate_text, workspace_root};
use sidecar_tests::sidecar::sidecar_bin;
use sidecar_tests::tempdir::TempDir;
use sidecar_tests::venv::python_venv;

/// Bound for one PyYAML or `sidecar config` run.
const BOUND: Duration = Duration::from_secs(60);
/// The example's namespace in `deploy/kubernetes/`.
const NAMESPACE: &str = "sidecar-demo";
/// The release name and namespace of every chart render here.
const RELEASE: &str = "demo";
const RELEASE_NAMESPACE: &str = "shop";
/// Reads every document of a YAML file, drops empty ones, prints them as one JSON array.
const YAML_TO_JSON: &str = "import json, sys, yaml\n\
with open(sys.argv[1]) as f:\n    docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
json.dump(docs, sys.stdout)\n";

/// Unique scratch directory names for tests running in parallel.
static SCRATCH: AtomicUsize = AtomicUsize::new(0);

fn scratch(what: &str) -> TempDir {
    let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
    TempDir::create(&format!("deploy-{what}-{}-{n}", std::process::id()))
        .unwrap_or_else(|e| panic!("creating a scratch directory: {e}"))
}

fn repo(path: &str) -> PathBuf {
    workspace_root().join(path)
}

/// Every document of a YAML file, as JSON values (parsed by PyYAML).
fn yaml_file(path: &Path) -> Vec<Value> {
    let python = python_venv();
    assert!(
        python.is_file(),
        "missing prerequisite: the peers' Python virtualenv at {} with PyYAML (run `cargo xtask \
         setup`, which installs tests/peers/requirements.txt)",
        python.display()
    );
    let out = run_timeout(
        Command::new(&python).args(["-c", YAML_TO_JSON]).arg(path),
        BOUND,
    )
    .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.success(),
        "parsing {} with PyYAML failed (a YAML error, or PyYAML missing from {}: run `cargo \
         xtask setup`): {}",
        path.display(),
        python.display(),
        out.stderr_str()
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("PyYAML's JSON for {}: {other:?}", path.display()),
    }
}

/// Every document of YAML text.
fn yaml_text(what: &str, text: &str) -> Vec<Value> {
    let dir = scratch(what);
    let file = dir.join("doc.yaml");
    std::fs::write(&file, text).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    yaml_file(&file)
}

/// The `*.yaml` files directly in `dir`, in name order (the order `kubectl apply -f` uses).
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    files
}

/// Every document of every `*.yaml` file of `dir`, in apply order.
fn manifests(dir: &Path) -> Vec<Value> {
    yaml_files(dir).iter().flat_map(|f| yaml_file(f)).collect()
}

fn validate_files(files: &[PathBuf]) {
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    if let Err(e) = kubernetes_validate(&paths) {
        panic!("Kubernetes schema validation failed: {e}");
    }
}

fn validate_text(name: &str, yaml: &str) {
    if let Err(e) = kubernetes_validate_text(name, yaml) {
        panic!("Kubernetes schema validation of {name} failed: {e}\n--- rendered:\n{yaml}");
    }
}

/// `sidecar/src/inject/template.yaml`: `initContainer`, `volumes`, `annotations`.
fn template() -> Value {
    let docs = yaml_file(&repo("sidecar/src/inject/template.yaml"));
    assert_eq!(docs.len(), 1, "template.yaml holds one document");
    let t = docs.into_iter().next().expect("one document");
    for key in ["initContainer", "volumes", "annotations"] {
        assert!(!t[key].is_null(), "template.yaml has no `{key}`");
    }
    t
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("<unnamed>")
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// The one init container named `sidecar` of a workload.
fn sidecar_of(workload: &Value) -> &Value {
    let inits = pod_spec(workload)["initContainers"]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no initContainers", name(workload)));
    let found: Vec<&Value> = inits.iter().filter(|c| c["name"] == "sidecar").collect();
    assert_eq!(
        found.len(),
        1,
        "{} must have exactly one `sidecar` init container: {inits:?}",
        name(workload)
    );
    found[0]
}

/// The workload's volumes whose names start with `sidecar-` (reserved for the sidecar).
fn sidecar_volumes(workload: &Value) -> Vec<Value> {
    pod_spec(workload)["volumes"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|v| {
                    v["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("sidecar-"))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// A container's environment: name -> `value` (a string) or the `valueFrom` object.
fn env_of(container: &Value) -> BTreeMap<String, Value> {
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let key = var["name"].as_str().expect("env name").to_owned();
        let value = if var["valueFrom"].is_null() {
            var["value"].clone()
        } else {
            var["valueFrom"].clone()
        };
        assert!(
            env.insert(key.clone(), value).is_none(),
            "env {key} twice in {}",
            container["name"]
        );
    }
    env
}

/// Asserts `sub`'s entries are all in `map` (label selectors against labels).
fn assert_subset(sub: &Value, map: &Value, what: &str) {
    let sub = sub
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not a map: {sub}"));
    assert!(!sub.is_empty(), "{what}: empty selector");
    for (k, v) in sub {
        assert_eq!(&map[k], v, "{what}: label {k} not matched by {map}");
    }
}

/// What every workload carrying the sidecar must satisfy, with `sidecar` the expected container.
fn assert_pod_carries(workload: &Value, sidecar: &Value, template: &Value) {
    let n = name(workload);
    assert_eq!(sidecar_of(workload), sidecar, "{n}: the sidecar container");
    assert_eq!(
        Value::Array(sidecar_volumes(workload)),
        template["volumes"],
        "{n}: the sidecar's volumes differ from template.yaml's"
    );
    let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
    for (k, v) in template["annotations"]
        .as_object()
        .expect("annotations map")
    {
        assert_eq!(&annotations[k], v, "{n}: pod annotation {k}");
    }
    assert_subset(
        &workload["spec"]["selector"]["matchLabels"],
        &workload["spec"]["template"]["metadata"]["labels"],
        &format!("{n}: selector against its pod template"),
    );
    let spec = pod_spec(workload);
    assert_eq!(
        spec["automountServiceAccountToken"],
        json!(false),
        "{n}: no API token"
    );
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(
        grace > 35,
        "{n}: grace period {grace} s must exceed drain (5 s) + span flush (30 s)"
    );
    // The application containers get nothing from the sidecar's privileges.
    for c in spec["containers"].as_array().expect("containers") {
        let sc = &c["securityContext"];
        assert_eq!(
            sc["runAsNonRoot"],
            json!(true),
            "{n}/{}: non-root",
            c["name"]
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"],
            json!(false),
            "{n}/{}",
            c["name"]
        );
        assert_eq!(
            sc["capabilities"],
            json!({ "drop": ["ALL"] }),
            "{n}/{}",
            c["name"]
        );
        assert!(sc["privileged"].is_null(), "{n}/{}", c["name"]);
    }
}

/// The Service a workload's pods back must select them and target a named container port.
fn assert_service_targets(service: &Value, workload: &Value) {
    let what = format!("Service {} -> {}", name(service), name(workload));
    assert_subset(
        &service["spec"]["selector"],
        &workload["spec"]["template"]["metadata"]["labels"],
        &what,
    );
    let port_names: Vec<&Value> = pod_spec(workload)["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .map(|p| &p["name"])
        .collect();
    for port in service["spec"]["ports"].as_array().expect("ports") {
        assert!(
            port_names.contains(&&port["targetPort"]),
            "{what}: targetPort {} is no container port of {port_names:?}",
            port["targetPort"]
        );
    }
}

/// The privileged fallback's securityContext (deploy/kubernetes/variants/privileged and
/// `sidecar.privileged=true`).
fn privileged_security_context() -> Value {
    json!({
        "privileged": true,
        "runAsUser": 0,
        "runAsNonRoot": false,
        "readOnlyRootFilesystem": true,
    })
}

// ---- deploy/kubernetes -----------------------------------------------------------------------

#[test]
fn kubernetes_manifests_validate_strictly() {
    let mut files = yaml_files(&repo("deploy/kubernetes"));
    files.extend(yaml_files(&repo("deploy/kubernetes/variants/privileged")));
    validate_files(&files);
}

#[test]
fn validation_is_strict_about_unknown_fields() {
    // The checks above are only worth something if the validator rejects what the API server
    // would: an unknown field in the sidecar container.
    let text = std::fs::read_to_string(repo("deploy/kubernetes/10-web.yaml")).expect("10-web");
    let broken = text.replacen(
        "\n          restartPolicy: Always\n",
        "\n          restartPolicy: Always\n          restartPolicyy: Always\n",
        1,
    );
    assert_ne!(broken, text, "10-web.yaml has the sidecar's restartPolicy");
    let err = kubernetes_validate_text("deploy-broken-web", &broken)
        .expect_err("an unknown field must fail strict validation");
    assert!(err.to_string().contains("restartPolicyy"), "{err}");
}

#[test]
fn kubernetes_example_applies_in_one_go_and_carries_the_template_sidecar() {
    let t = template();
    let docs = manifests(&repo("deploy/kubernetes"));
    // The namespace comes first (kubectl applies a directory's files in name order) and admits
    // the sidecar's capabilities and hostPath.
    assert_eq!(docs[0]["kind"], "Namespace", "the first document");
    assert_eq!(name(&docs[0]), NAMESPACE);
    assert_eq!(
        docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    for d in &docs[1..] {
        assert_eq!(
            d["metadata"]["namespace"],
            NAMESPACE,
            "{} {} must be in the example's namespace",
            d["kind"],
            name(d)
        );
    }
    let deployments = kind(&docs, "Deployment");
    let names: Vec<&str> = deployments.iter().map(|d| name(d)).collect();
    assert_eq!(names, ["web", "loadgen"]);
    for d in &deployments {
        assert_pod_carries(d, &t["initContainer"], &t);
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"],
            t["annotations"],
            "{}: exactly the template's pod annotations",
            name(d)
        );
    }
    let services = kind(&docs, "Service");
    assert_eq!(services.len(), 1);
    assert_service_targets(services[0], deployments[0]);
    // The client calls that Service by name and port.
    let port = services[0]["spec"]["ports"][0]["port"]
        .as_u64()
        .expect("port");
    let script = pod_spec(deployments[1])["containers"][0]["args"][0]
        .as_str()
        .expect("loadgen script");
    assert!(
        script.contains(&format!("http://{}:{port}", name(services[0]))),
        "{script}"
    );
}

#[test]
fn privileged_variant_differs_only_in_the_sidecars_security_context() {
    let base = manifests(&repo("deploy/kubernetes"));
    let variant = manifests(&repo("deploy/kubernetes/variants/privileged"));
    assert_eq!(
        base.len(),
        variant.len(),
        "the variant is the whole example"
    );
    let mut deployments = 0;
    for (b, v) in base.iter().zip(&variant) {
        let mut expected = b.clone();
        if b["kind"] == "Deployment" {
            deployments += 1;
            let inits = expected["spec"]["template"]["spec"]["initContainers"]
                .as_array_mut()
                .expect("initContainers");
            for c in inits.iter_mut().filter(|c| c["name"] == "sidecar") {
                c["securityContext"] = privileged_security_context();
            }
        }
        assert_eq!(
            v,
            &expected,
            "variants/privileged: {} {} differs from deploy/kubernetes beyond the sidecar's \
             securityContext",
            b["kind"],
            name(b)
        );
    }
    assert_eq!(deployments, 2);
}

// ---- deploy/helm/sidecar ---------------------------------------------------------------------

fn chart() -> String {
    repo("deploy/helm/sidecar").to_string_lossy().into_owned()
}

fn template_args<'a>(chart: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["template", RELEASE, chart, "--namespace", RELEASE_NAMESPACE];
    args.extend_from_slice(extra);
    args
}

/// `helm template` with `extra` arguments; validates the output strictly and parses it.
fn render(label: &str, extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let text = helm(&template_args(&chart, extra))
        .unwrap_or_else(|e| panic!("helm template {extra:?} failed: {e}"));
    validate_text(&format!("deploy-helm-{label}"), &text);
    yaml_text(&format!("helm-{label}"), &text)
}

/// `helm template` that must fail; its error text.
fn render_error(extra: &[&str]) -> String {
    let chart = chart();
    match helm(&template_args(&chart, extra)) {
        Ok(out) => panic!("helm template {extra:?} accepted bad values and rendered:\n{out}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.contains("missing prerequisite"),
                "helm is not available: {msg}"
            );
            msg
        }
    }
}

/// A values file in `dir`.
fn values_file(dir: &TempDir, file: &str, text: &str) -> String {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.to_string_lossy().into_owned()
}

/// The sidecar environment of every Deployment of a render (they must agree).
fn rendered_env(docs: &[Value]) -> BTreeMap<String, Value> {
    let deployments = kind(docs, "Deployment");
    assert!(!deployments.is_empty(), "no Deployment rendered");
    let env = env_of(sidecar_of(deployments[0]));
    for d in &deployments[1..] {
        assert_eq!(env_of(sidecar_of(d)), env, "{}: sidecar env", name(d));
    }
    env
}

fn env_value<'a>(env: &'a BTreeMap<String, Value>, key: &str) -> Option<&'a str> {
    env.get(key).and_then(Value::as_str)
}

#[test]
fn helm_lint_strict_passes() {
    let chart = chart();
    for extra in [
        &[][..],
        &["--set", "sidecar.privileged=true"][..],
        &[
            "--set",
            "sidecar.sampling.ratio=0.1",
            "--set",
            "loadgen.enabled=false",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        args.extend_from_slice(extra);
        let out = helm(&args).unwrap_or_else(|e| panic!("helm lint --strict {extra:?}: {e}"));
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn helm_default_render_is_the_template_sidecar() {
    let t = template();
    let docs = render("default", &[]);
    let deployments = kind(&docs, "Deployment");
    let mut names: Vec<&str> = deployments.iter().map(|d| name(d)).collect();
    names.sort_unstable();
    assert_eq!(names, ["demo-sidecar-loadgen", "demo-sidecar-web"]);
    for d in &deployments {
        assert_pod_carries(d, &t["initContainer"], &t);
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"],
            t["annotations"],
            "{}: exactly the template's pod annotations by default",
            name(d)
        );
    }
    let web = deployments
        .iter()
        .find(|d| name(d) == "demo-sidecar-web")
        .expect("web");
    let services = kind(&docs, "Service");
    assert_eq!(services.len(), 1);
    assert_service_targets(services[0], web);
    let loadgen = deployments
        .iter()
        .find(|d| name(d) == "demo-sidecar-loadgen")
        .expect("loadgen");
    let script = pod_spec(loadgen)["containers"][0]["args"][0]
        .as_str()
        .expect("loadgen script");
    assert!(
        script.contains("http://demo-sidecar-web:8080$path"),
        "{script}"
    );
    // The same container as the plain manifests (which the test above ties to the template).
    let plain = manifests(&repo("deploy/kubernetes"));
    assert_eq!(sidecar_of(kind(&plain, "Deployment")[0]), sidecar_of(web));
}

#[test]
fn helm_collector_values_set_the_otlp_environment() {
    let docs = render(
        "collector",
        &[
            "--set",
            "sidecar.collector.endpoint=http://collector.shop.svc:4318",
            "--set",
            "sidecar.collector.protocol=http/protobuf",
        ],
    );
    let env = rendered_env(&docs);
    assert_eq!(
        env_value(&env, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://collector.shop.svc:4318")
    );
    assert_eq!(
        env_value(&env, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        Some("http/protobuf")
    );

    // No endpoint: no variable at all (the sidecar then writes its local file).
    let docs = render("no-collector", &["--set", "sidecar.collector.endpoint="]);
    let env = rendered_env(&docs);
    assert!(!env.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"), "{env:?}");
    assert!(!env.contains_key("OTEL_EXPORTER_OTLP_PROTOCOL"), "{env:?}");
    // The Downward API variables stay.
    for key in [
        "K8S_POD_NAME",
        "K8S_NAMESPACE_NAME",
        "K8S_POD_UID",
        "K8S_NODE_NAME",
    ] {
        assert!(env[key]["fieldRef"].is_object(), "{key}: {env:?}");
    }
}

#[test]
fn helm_exclusions_set_the_sidecar_variables() {
    let dir = scratch("values-exclusions");
    let values = values_file(
        &dir,
        "exclusions.yaml",
        "sidecar:\n  exclusions:\n    outboundPorts: [5432, \"8000-8100\"]\n    \
         outboundCidrs: [\"169.254.169.254/32\", \"fd00::/8\"]\n    \
         inboundPorts: [9090, \"9100-9101\"]\n",
    );
    let env = rendered_env(&render("exclusions", &["-f", &values]));
    assert_eq!(
        env_value(&env, "SIDECAR_EXCLUDE_OUTBOUND_PORTS"),
        Some("5432,8000-8100")
    );
    assert_eq!(
        env_value(&env, "SIDECAR_EXCLUDE_OUTBOUND_CIDRS"),
        Some("169.254.169.254/32,fd00::/8")
    );
    assert_eq!(
        env_value(&env, "SIDECAR_EXCLUDE_INBOUND_PORTS"),
        Some("9090,9100-9101")
    );

    // The same from the command line.
    let env = rendered_env(&render(
        "exclusions-set",
        &["--set", "sidecar.exclusions.outboundPorts={3306,6379}"],
    ));
    assert_eq!(
        env_value(&env, "SIDECAR_EXCLUDE_OUTBOUND_PORTS"),
        Some("3306,6379")
    );
    assert!(
        !env.contains_key("SIDECAR_EXCLUDE_INBOUND_PORTS"),
        "{env:?}"
    );
}

#[test]
fn helm_sampling_sets_sampler_and_ratio() {
    // A ratio alone means the parent-based ratio sampler.
    let env = rendered_env(&render(
        "sampling-ratio",
        &["--set", "sidecar.sampling.ratio=0.25"],
    ));
    assert_eq!(
        env_value(&env, "OTEL_TRACES_SAMPLER"),
        Some("parentbased_traceidratio")
    );
    assert_eq!(env_value(&env, "OTEL_TRACES_SAMPLER_ARG"), Some("0.25"));

    let dir = scratch("values-sampling");
    let values = values_file(
        &dir,
        "sampling.yaml",
        "sidecar:\n  sampling:\n    sampler: traceidratio\n    ratio: 0.1\n",
    );
    let env = rendered_env(&render("sampling-file", &["-f", &values]));
    assert_eq!(env_value(&env, "OTEL_TRACES_SAMPLER"), Some("traceidratio"));
    assert_eq!(env_value(&env, "OTEL_TRACES_SAMPLER_ARG"), Some("0.1"));

    let env = rendered_env(&render(
        "sampling-off",
        &["--set", "sidecar.sampling.sampler=always_off"],
    ));
    assert_eq!(env_value(&env, "OTEL_TRACES_SAMPLER"), Some("always_off"));
    assert!(!env.contains_key("OTEL_TRACES_SAMPLER_ARG"), "{env:?}");
}

#[test]
fn helm_resources_and_privileged_fallback() {
    let dir = scratch("values-resources");
    let values = values_file(
        &dir,
        "resources.yaml",
        "sidecar:\n  resources:\n    requests: { cpu: 100m, memory: 128Mi }\n    \
         limits: { cpu: \"2\", memory: 1Gi }\n",
    );
    let docs = render("resources", &["-f", &values]);
    for d in kind(&docs, "Deployment") {
        assert_eq!(
            sidecar_of(d)["resources"],
            json!({
                "requests": { "cpu": "100m", "memory": "128Mi" },
                "limits": { "cpu": "2", "memory": "1Gi" },
            }),
            "{}",
            name(d)
        );
    }

    let t = template();
    let docs = render("privileged", &["--set", "sidecar.privileged=true"]);
    let variant = manifests(&repo("deploy/kubernetes/variants/privileged"));
    let variant_sidecar = sidecar_of(kind(&variant, "Deployment")[0]);
    for d in kind(&docs, "Deployment") {
        let sidecar = sidecar_of(d);
        assert_eq!(
            sidecar["securityContext"],
            privileged_security_context(),
            "{}",
            name(d)
        );
        // Everything else is the template's, and the plain privileged variant's.
        let mut expected = t["initContainer"].clone();
        expected["securityContext"] = privileged_security_context();
        assert_eq!(sidecar, &expected, "{}", name(d));
        assert_eq!(sidecar, variant_sidecar, "{}", name(d));
    }
}

#[test]
fn helm_extra_env_annotations_and_own_application() {
    let docs = render(
        "own-app",
        &[
            "--set",
            "app.image.repository=registry.example.com/shop/api",
            "--set",
            "app.image.tag=1.2.3",
            "--set",
            "app.port=9000",
            "--set",
            "loadgen.enabled=false",
            "--set-json",
            r#"sidecar.extraEnv=[{"name":"SIDECAR_ROUTES","value":"/users/{id}"},{"name":"RUST_LOG","value":"debug"}]"#,
            "--set-string",
            r"podAnnotations.sidecar\.dev/exclude-outbound-ports=3306",
        ],
    );
    let deployments = kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1, "loadgen disabled");
    let web = deployments[0];
    let app = &pod_spec(web)["containers"][0];
    assert_eq!(app["image"], "registry.example.com/shop/api:1.2.3");
    assert_eq!(app["ports"][0]["containerPort"], 9000);
    assert_eq!(kind(&docs, "Service")[0]["spec"]["ports"][0]["port"], 9000);
    let annotations = &web["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["sidecar.dev/exclude-outbound-ports"], "3306");
    assert_eq!(annotations["sidecar.dev/status"], "injected");
    // Extra variables come last, after the chart's own.
    let names: Vec<&str> = sidecar_of(web)["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names[names.len() - 2..], ["SIDECAR_ROUTES", "RUST_LOG"]);
    let env = env_of(sidecar_of(web));
    assert_eq!(env_value(&env, "SIDECAR_ROUTES"), Some("/users/{id}"));
}

#[test]
fn sidecar_runs_the_environment_the_chart_renders() {
    // Everything the chart can set, handed to the real binary's `sidecar config` with the
    // container's own arguments: the sidecar accepts every value and reads it from the variable
    // the chart wrote.
    let docs = render(
        "everything",
        &[
            "--set",
            "sidecar.collector.endpoint=http://collector.shop.svc:4318",
            "--set",
            "sidecar.collector.protocol=http/protobuf",
            "--set",
            "sidecar.exclusions.outboundPorts={5432,8000-8100}",
            "--set",
            "sidecar.exclusions.outboundCidrs={169.254.169.254/32,fd00::/8}",
            "--set",
            "sidecar.exclusions.inboundPorts={9090}",
            "--set",
            "sidecar.sampling.ratio=0.5",
        ],
    );
    let web = kind(&docs, "Deployment")[0];
    let sidecar = sidecar_of(web);
    let mut args: Vec<String> = sidecar["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect();
    assert_eq!(args[0], "run");
    args[0] = "config".into();
    args.extend(["--format".into(), "json".into()]);
    let dir = scratch("config");
    args.extend([
        "--labels-file".into(),
        dir.join("labels").to_string_lossy().into_owned(),
        "--annotations-file".into(),
        dir.join("annotations").to_string_lossy().into_owned(),
    ]);
    let literal: Vec<(String, String)> = env_of(sidecar)
        .into_iter()
        .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned())))
        .collect();
    assert!(literal.len() >= 7, "{literal:?}");

    let bin = sidecar_bin();
    assert!(
        bin.is_file(),
        "missing prerequisite: the sidecar binary at {} (build it with `cargo build --release \
         -p sidecar` or set SIDECAR_BIN)",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.env_clear().args(&args).envs(literal.iter().cloned());
    let out = run_timeout(&mut cmd, BOUND).expect("running sidecar config");
    assert!(
        out.success(),
        "sidecar config rejected the chart's environment {literal:?}:\n{}",
        out.stderr_str()
    );
    let config: Value = serde_json::from_slice(&out.stdout).expect("sidecar config JSON");
    let settings = config["settings"].as_array().expect("settings");
    for (var, value) in &literal {
        let setting = settings.iter().find(|s| s["env"] == var.as_str());
        if let Some(s) = setting {
            assert_eq!(s["source"], format!("env {var}"), "{s}");
            assert_eq!(s["value"], value.as_str(), "{s}");
        } else {
            // The OTLP variables are not settings rows; the export section shows their effect.
            assert!(
                var.starts_with("OTEL_EXPORTER_OTLP_"),
                "{var} is no setting"
            );
        }
    }
    assert_eq!(
        config["export"]["traces"]["endpoint"],
        "http://collector.shop.svc:4318/v1/traces"
    );
    assert_eq!(config["export"]["metrics"]["protocol"], "http/protobuf");
}

#[test]
fn helm_rejects_bad_values_naming_them() {
    let dir = scratch("values-bad");
    let float_ratio = values_file(
        &dir,
        "ratio.yaml",
        "sidecar:\n  sampling:\n    ratio: 1.5\n",
    );
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--set", "sidecar.exclusions.outboundPorts={5432,abc}"],
            &[
                "sidecar.exclusions.outboundPorts.1",
                "Does not match pattern",
            ],
        ),
        (
            &["--set", "sidecar.exclusions.inboundPorts={70000}"],
            &[
                "sidecar.exclusions.inboundPorts.0",
                "less than or equal to 65535",
            ],
        ),
        (
            &["--set", "sidecar.exclusions.outboundPorts={1-70000}"],
            &[
                "sidecar.exclusions.outboundPorts",
                "\"1-70000\" is not a port",
            ],
        ),
        (
            &["--set", "sidecar.exclusions.outboundPorts={9000-8000}"],
            &["sidecar.exclusions.outboundPorts", "ends before it starts"],
        ),
        (
            &["--set", "sidecar.exclusions.outboundCidrs={not-a-network}"],
            &[
                "sidecar.exclusions.outboundCidrs.0",
                "Does not match pattern",
            ],
        ),
        (
            &["--set", "sidecar.collector.protocol=grpcx"],
            &[
                "sidecar.collector.protocol",
                "must be one of the following",
                "http/protobuf",
            ],
        ),
        (
            &["--set", "sidecar.collector.endpoint=http://a b"],
            &["sidecar.collector.endpoint", "Does not match pattern"],
        ),
        (
            &["--set", "sidecar.sampling.sampler=sometimes"],
            &["sidecar.sampling.sampler", "must be one of the following"],
        ),
        (
            &["--set", "sidecar.sampling.ratio=1.5"],
            &["sidecar.sampling.ratio", "Does not match pattern"],
        ),
        (
            &["-f", &float_ratio],
            &["sidecar.sampling.ratio", "less than or equal to 1"],
        ),
        (
            &[
                "--set",
                "sidecar.sampling.sampler=always_on",
                "--set",
                "sidecar.sampling.ratio=0.5",
            ],
            &["sidecar.sampling.ratio is only used by the traceidratio samplers"],
        ),
        (
            &["--set", "sidecar.resources.limits.cpu=lots"],
            &["sidecar.resources.limits.cpu", "Does not match pattern"],
        ),
        (
            &["--set", "sidecar.privileged=yes"],
            &["sidecar.privileged", "Expected: boolean"],
        ),
        (
            &["--set-json", r#"sidecar.extraEnv=[{"value":"x"}]"#],
            &["sidecar.extraEnv.0", "name is required"],
        ),
        (
            &["--set", "sidecar.colector.endpoint=http://c:4317"],
            &["Additional property colector is not allowed"],
        ),
        (
            &["--set", "app.port=http"],
            &["app.port", "Expected: integer"],
        ),
        (
            &["--set", "app.port=15020"],
            &["app.port: 15020 is one of the sidecar's own ports"],
        ),
        (
            &["--set", "loadgen.paths={no-slash}"],
            &["loadgen.paths.0", "Does not match pattern"],
        ),
    ];
    for (args, expected) in cases {
        let err = render_error(args);
        for needle in *expected {
            assert!(
                err.contains(needle),
                "helm template {args:?}: the error does not say `{needle}`:\n{err}"
            );
        }
    }
}

// ---- deploy/Dockerfile -----------------------------------------------------------------------

#[test]
fn dockerfile_packages_the_prebuilt_binary_on_bookworm_slim() {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert_eq!(
        froms,
        [&"FROM debian:bookworm-slim"],
        "one stage, on Debian 12 slim"
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("COPY ") && l.contains("target/release/sidecar")),
        "copies the prebuilt binary:\n{text}"
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT ") && l.contains("sidecar")),
        "the binary is the entrypoint (the manifests pass only `args`):\n{text}"
    );
    // The build context keeps the binary (and little else).
    let ignore = std::fs::read_to_string(repo(".dockerignore")).expect(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    assert!(lines.contains(&"*"), "{ignore}");
    assert!(lines.contains(&"!target/release/sidecar"), "{ignore}");
}
