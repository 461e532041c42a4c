//! Offline checks of the observability deployment: the collector configuration
//! (`deploy/collector/config.yaml`) structurally, its Kubernetes manifests against the API
//! schemas, the compose set-up (`deploy/compose/`) and its Prometheus and Grafana files, and the
//! dashboard's PromQL with `promtool`. (That the dashboard names only series the sidecar emits
//! is a unit test of the sidecar crate: `telemetry::instruments`.)
//!
//! YAML is read with PyYAML from the peers' virtualenv (`tests/peers/requirements.txt`);
//! `promtool` comes from the Debian `prometheus` package (`cargo xtask setup`). A missing tool
//! fails the test with what to install.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sidecar_tests::deploy::{kubernetes_validate, workspace_root};
use sidecar_tests::venv::python_venv;

const LOAD_YAML: &str = "import json, sys, yaml\n\
with open(sys.argv[1], encoding='utf-8') as f:\n    \
docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
json.dump(docs, sys.stdout)\n";

/// Every document of a YAML file, as JSON values (PyYAML's safe loader).
fn load_yaml(path: &Path) -> Vec<Value> {
    let python = python_venv();
    assert!(
        python.is_file(),
        "missing {}: run `cargo xtask setup` (the peers' virtualenv with PyYAML from \
         tests/peers/requirements.txt)",
        python.display()
    );
    let out = Command::new(&python)
        .args(["-c", LOAD_YAML])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "PyYAML could not load {} (is PyYAML installed? `cargo xtask setup`): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("{}: unexpected loader output {other:?}", path.display()),
    }
}

fn load_one(path: &Path) -> Value {
    let mut docs = load_yaml(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

fn deploy(rel: &str) -> PathBuf {
    workspace_root().join("deploy").join(rel)
}

fn map<'a>(v: &'a Value, what: &str) -> &'a serde_json::Map<String, Value> {
    v.as_object()
        .unwrap_or_else(|| panic!("{what} is not a mapping: {v}"))
}

fn strings<'a>(v: &'a Value, what: &str) -> Vec<&'a str> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("{what}: {s} is not a string"))
        })
        .collect()
}

/// The type of a component id (`otlp_grpc/tempo` -> `otlp_grpc`).
fn component_type(id: &str) -> &str {
    id.split_once('/').map_or(id, |(t, _)| t)
}

/// `host:port` with a non-empty host and a port in 1..=65535; returns the port.
fn host_port(endpoint: &str) -> Option<u16> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && !host.contains("://") && port > 0).then_some(port)
}

/// `${env:NAME}` -> `NAME`.
fn env_reference(value: &str) -> Option<&str> {
    let name = value.strip_prefix("${env:")?.strip_suffix('}')?;
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then_some(name)
}

/// The collector configuration, and the environment variables its endpoints need.
fn collector_config() -> (Value, BTreeSet<String>) {
    let cfg = load_one(&deploy("collector/config.yaml"));
    let mut env = BTreeSet::new();
    if let Some(exporters) = cfg.get("exporters").and_then(Value::as_object) {
        for e in exporters.values() {
            if let Some(name) = e
                .get("endpoint")
                .and_then(Value::as_str)
                .and_then(env_reference)
            {
                env.insert(name.to_owned());
            }
        }
    }
    (cfg, env)
}

#[test]
fn collector_config_is_structurally_sound() {
    let (cfg, _) = collector_config();
    let top = map(&cfg, "the configuration");
    for key in top.keys() {
        assert!(
            [
                "receivers",
                "processors",
                "exporters",
                "extensions",
                "connectors",
                "service"
            ]
            .contains(&key.as_str()),
            "unknown top-level key {key}"
        );
    }
    let section = |name: &str| -> BTreeMap<String, Value> {
        cfg.get(name)
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let receivers = section("receivers");
    let processors = section("processors");
    let exporters = section("exporters");
    let extensions = section("extensions");

    // Component types this configuration may use (all in the contrib distribution).
    let known = |kind: &str, ty: &str| match kind {
        "receivers" => ["otlp"].contains(&ty),
        "processors" => [
            "memory_limiter",
            "batch",
            "resourcedetection",
            "k8sattributes",
        ]
        .contains(&ty),
        "exporters" => [
            "otlp",
            "otlp_grpc",
            "otlphttp",
            "otlp_http",
            "prometheus",
            "debug",
        ]
        .contains(&ty),
        "extensions" => ["health_check"].contains(&ty),
        _ => false,
    };
    for (kind, defined) in [
        ("receivers", &receivers),
        ("processors", &processors),
        ("exporters", &exporters),
        ("extensions", &extensions),
    ] {
        for id in defined.keys() {
            assert!(
                known(kind, component_type(id)),
                "{kind}: unknown component type in {id}"
            );
        }
    }

    let service = cfg.get("service").expect("service section");
    let pipelines = map(
        service.get("pipelines").expect("service.pipelines"),
        "service.pipelines",
    );
    assert!(pipelines.contains_key("traces"), "no traces pipeline");
    assert!(pipelines.contains_key("metrics"), "no metrics pipeline");
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (name, p) in pipelines {
        let signal = component_type(name);
        assert!(
            ["traces", "metrics", "logs"].contains(&signal),
            "pipeline {name}: unknown signal"
        );
        for (kind, defined) in [
            ("receivers", &receivers),
            ("processors", &processors),
            ("exporters", &exporters),
        ] {
            let ids = strings(
                p.get(kind)
                    .unwrap_or_else(|| panic!("pipeline {name}: no {kind}")),
                &format!("{name}.{kind}"),
            );
            if kind != "processors" {
                assert!(!ids.is_empty(), "pipeline {name}: empty {kind}");
            }
            for id in &ids {
                assert!(
                    defined.contains_key(*id),
                    "pipeline {name} uses {kind} {id}, which is not defined"
                );
                used.insert(format!("{kind}:{id}"));
            }
            if kind == "processors" {
                assert_eq!(
                    ids.first().map(|id| component_type(id)),
                    Some("memory_limiter"),
                    "pipeline {name}: memory_limiter must come first"
                );
                assert!(
                    ids.iter().any(|id| component_type(id) == "batch"),
                    "pipeline {name}: no batch processor"
                );
            }
        }
    }
    // Nothing defined and left unused (a typo in a pipeline would leave one).
    for (kind, defined) in [
        ("receivers", &receivers),
        ("processors", &processors),
        ("exporters", &exporters),
    ] {
        for id in defined.keys() {
            assert!(
                used.contains(&format!("{kind}:{id}")),
                "{kind} {id} is defined but in no pipeline"
            );
        }
    }
    let service_extensions = strings(
        service.get("extensions").expect("service.extensions"),
        "service.extensions",
    );
    for id in &service_extensions {
        assert!(extensions.contains_key(*id), "extension {id} not defined");
    }
    assert!(
        service_extensions
            .iter()
            .any(|id| component_type(id) == "health_check"),
        "no health_check extension in service"
    );
    for id in extensions.keys() {
        assert!(
            service_extensions.contains(&id.as_str()),
            "extension {id} defined but not enabled"
        );
    }

    // The exporters: OTLP to Tempo and to Jaeger on the traces pipeline, Prometheus on
    // the metrics pipeline.
    let traces = strings(&pipelines["traces"]["exporters"], "traces.exporters");
    for backend in ["tempo", "jaeger"] {
        let id = traces
            .iter()
            .find(|id| id.ends_with(&format!("/{backend}")))
            .unwrap_or_else(|| panic!("no exporter to {backend} on the traces pipeline"));
        assert!(
            ["otlp", "otlp_grpc"].contains(&component_type(id)),
            "{id} is not an OTLP/gRPC exporter"
        );
    }
    let metrics = strings(&pipelines["metrics"]["exporters"], "metrics.exporters");
    assert!(
        metrics.contains(&"prometheus"),
        "no prometheus exporter on metrics"
    );
    let prom = &exporters["prometheus"];
    assert_eq!(
        prom["resource_to_telemetry_conversion"]["enabled"],
        Value::Bool(true),
        "the dashboard selects on resource labels (service_name): keep \
         resource_to_telemetry_conversion enabled"
    );

    // Endpoints: listeners are `host:port` on the standard ports; exporter endpoints are
    // `host:port` or an `${env:NAME}` reference (checked against compose and Kubernetes below).
    let otlp = &receivers["otlp"]["protocols"];
    assert_eq!(
        host_port(otlp["grpc"]["endpoint"].as_str().expect("grpc endpoint")),
        Some(4317)
    );
    assert_eq!(
        host_port(otlp["http"]["endpoint"].as_str().expect("http endpoint")),
        Some(4318)
    );
    assert_eq!(
        host_port(prom["endpoint"].as_str().expect("prometheus endpoint")),
        Some(8889)
    );
    assert_eq!(
        host_port(
            extensions["health_check"]["endpoint"]
                .as_str()
                .expect("health_check endpoint")
        ),
        Some(13133)
    );
    for (id, e) in &exporters {
        if let Some(endpoint) = e.get("endpoint") {
            let endpoint = endpoint.as_str().expect("endpoint is a string");
            assert!(
                host_port(endpoint).is_some() || env_reference(endpoint).is_some(),
                "exporter {id}: malformed endpoint {endpoint:?}"
            );
        }
        if ["otlp", "otlp_grpc"].contains(&component_type(id)) {
            assert_eq!(
                e["tls"]["insecure"],
                Value::Bool(true),
                "{id}: plain gRPC inside the cluster / compose network"
            );
        }
    }
}

/// The sidecar container's collector endpoint in the injection template.
fn template_endpoint() -> String {
    let template = load_one(&workspace_root().join("sidecar/src/inject/template.yaml"));
    let env = template["initContainer"]["env"]
        .as_array()
        .expect("template env");
    env.iter()
        .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
        .and_then(|e| e["value"].as_str())
        .expect("OTEL_EXPORTER_OTLP_ENDPOINT in the template")
        .to_owned()
}

#[test]
fn collector_kubernetes_manifests_validate_and_serve_the_sidecar_endpoint() {
    let file = deploy("collector/kubernetes.yaml");
    if let Err(e) = kubernetes_validate(&[&file]) {
        panic!("{e}");
    }
    let docs = load_yaml(&file);
    let find = |kind: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {}", file.display()))
    };
    assert_eq!(find("Namespace")["metadata"]["name"], "observability");

    // The ConfigMap carries config.yaml verbatim.
    let cm = find("ConfigMap");
    let embedded = cm["data"]["config.yaml"].as_str().expect("config.yaml key");
    let original =
        std::fs::read_to_string(deploy("collector/config.yaml")).expect("read config.yaml");
    assert_eq!(
        embedded, original,
        "the ConfigMap must hold deploy/collector/config.yaml verbatim"
    );

    // The sidecar's default endpoint resolves to this Service's OTLP/gRPC port.
    let endpoint = template_endpoint();
    let rest = endpoint
        .strip_prefix("http://")
        .expect("plain-text gRPC endpoint");
    let (host, port) = rest.rsplit_once(':').expect("endpoint with port");
    let port: u64 = port.parse().expect("numeric port");
    let svc = find("Service");
    let (name, ns) = (
        svc["metadata"]["name"].as_str().expect("service name"),
        svc["metadata"]["namespace"]
            .as_str()
            .expect("service namespace"),
    );
    assert_eq!(host, format!("{name}.{ns}.svc"), "service DNS name");
    let ports = svc["spec"]["ports"].as_array().expect("service ports");
    let grpc = ports
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("the Service does not expose {port}"));

    // ... and that port reaches the collector's OTLP/gRPC receiver.
    let deployment = find("Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    let selector = map(&svc["spec"]["selector"], "service selector");
    for (k, v) in selector {
        assert_eq!(
            &deployment["spec"]["template"]["metadata"]["labels"][k], v,
            "pod label {k}"
        );
    }
    let container = &spec["containers"][0];
    let target = &grpc["targetPort"];
    let container_port = container["ports"]
        .as_array()
        .expect("container ports")
        .iter()
        .find(|p| &p["name"] == target || &p["containerPort"] == target)
        .expect("the Service's targetPort names a container port");
    assert_eq!(container_port["containerPort"], 4317);

    // The configuration is mounted where --config points, and its env references are set.
    let config_arg = strings(&container["args"], "args")
        .into_iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config=... argument");
    let (dir, file_name) = config_arg.rsplit_once('/').expect("absolute config path");
    assert_eq!(file_name, "config.yaml");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volume mounts")
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);
    let (_, needed) = collector_config();
    let env: BTreeMap<&str, &str> = container["env"]
        .as_array()
        .expect("container env")
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    for name in &needed {
        let value = env
            .get(name.as_str())
            .unwrap_or_else(|| panic!("the Deployment does not set {name}"));
        assert!(
            host_port(value).is_some(),
            "{name}={value} is not host:port"
        );
    }
    // Probes on the health_check extension.
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], 13133, "{probe}");
    }
}

/// `[host_ip:]host_port:container_port` -> (host ip, host port, container port).
fn published(p: &str) -> (Option<&str>, u16, u16) {
    let parts: Vec<&str> = p.split(':').collect();
    let parse = |s: &str| s.parse::<u16>().unwrap_or_else(|_| panic!("port {p}"));
    match parts.as_slice() {
        [h, c] => (None, parse(h), parse(c)),
        [ip, h, c] => (Some(*ip), parse(h), parse(c)),
        _ => panic!("unexpected port mapping {p}"),
    }
}

#[test]
fn compose_set_up_is_consistent() {
    let compose_dir = deploy("compose");
    let compose = load_one(&compose_dir.join("compose.yaml"));
    let services = map(&compose["services"], "services");
    for name in ["otel-collector", "jaeger", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "no {name} service");
    }

    // Every bind mount's source exists in the repository (relative to deploy/compose).
    let mut mounts: BTreeMap<(&str, &str), PathBuf> = BTreeMap::new();
    for (name, svc) in services {
        assert!(
            svc["image"]
                .as_str()
                .is_some_and(|i| i.contains(':') && !i.ends_with(":latest")),
            "{name}: pin an image tag"
        );
        for v in svc
            .get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let v = v.as_str().expect("short volume syntax");
            let mut parts = v.split(':');
            let (source, target) = (parts.next().expect("source"), parts.next().expect("target"));
            assert!(
                source.starts_with('.'),
                "{name}: {v} is not a repository path"
            );
            let path = compose_dir.join(source);
            assert!(path.exists(), "{name}: {} does not exist", path.display());
            mounts.insert((name.as_str(), target), path);
        }
        // Published ports stay on the loopback interface.
        for p in svc
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let p = p.as_str().expect("short port syntax");
            assert_eq!(
                published(p).0,
                Some("127.0.0.1"),
                "{name}: {p} not on localhost"
            );
        }
    }

    // The collector runs deploy/collector/config.yaml, with the env its exporters need, each a
    // host:port of a compose service.
    let collector = &services["otel-collector"];
    let config_arg = strings(&collector["command"], "collector command")
        .into_iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config=...");
    let mounted = mounts
        .get(&("otel-collector", config_arg))
        .unwrap_or_else(|| panic!("nothing mounted at {config_arg}"));
    assert_eq!(
        mounted.canonicalize().expect("canonical"),
        deploy("collector/config.yaml")
            .canonicalize()
            .expect("canonical")
    );
    let (cfg, needed) = collector_config();
    let env = map(&collector["environment"], "collector environment");
    for name in &needed {
        let value = env
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("compose does not set {name} for the collector"));
        let (host, _) = value.rsplit_once(':').expect("host:port");
        assert!(host_port(value).is_some(), "{name}={value}");
        assert!(
            services.contains_key(host),
            "{name}={value}: no service {host}"
        );
    }
    let host_ports: BTreeSet<u16> = strings(&collector["ports"], "collector ports")
        .into_iter()
        .map(|p| published(p).1)
        .collect();
    for port in [4317, 4318] {
        assert!(host_ports.contains(&port), "OTLP port {port} not published");
    }

    // Prometheus scrapes the collector's prometheus exporter (the port of its endpoint).
    let exporter_port = host_port(
        cfg["exporters"]["prometheus"]["endpoint"]
            .as_str()
            .expect("prometheus exporter endpoint"),
    )
    .expect("exporter port");
    let prom_config = mounts
        .iter()
        .find(|((svc, target), _)| *svc == "prometheus" && target.ends_with("prometheus.yml"))
        .map(|(_, p)| p.clone())
        .expect("prometheus.yml mounted");
    let prom = load_one(&prom_config);
    let targets: Vec<(String, String)> = prom["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            let name = job["job_name"].as_str().unwrap_or_default().to_owned();
            job["static_configs"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|sc| sc["targets"].as_array().into_iter().flatten())
                .filter_map(|t| t.as_str().map(str::to_owned))
                .map(move |t| (name.clone(), t))
                .collect::<Vec<_>>()
        })
        .collect();
    let collector_target = format!("otel-collector:{exporter_port}");
    let job = prom["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .find(|j| {
            targets
                .iter()
                .any(|(n, t)| j["job_name"] == n.as_str() && *t == collector_target)
        })
        .unwrap_or_else(|| panic!("no scrape job for {collector_target}: {targets:?}"));
    assert_eq!(
        job["honor_labels"],
        Value::Bool(true),
        "keep the job/instance the collector derives from the resource"
    );
    assert!(
        targets.iter().any(|(_, t)| t.ends_with(":15020")),
        "no scrape job for a sidecar admin port: {targets:?}"
    );
    let check = Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(&prom_config)
        .output()
        .expect("running promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    assert!(
        check.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Grafana: provisioned data sources point at the compose services; the dashboard provider
    // reads the directory deploy/grafana is mounted at.
    let grafana_mount = |suffix: &str| -> PathBuf {
        mounts
            .iter()
            .find(|((svc, target), _)| *svc == "grafana" && target.ends_with(suffix))
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("grafana: nothing mounted at *{suffix}"))
    };
    let datasources_dir = grafana_mount("/provisioning/datasources");
    let mut types = BTreeMap::new();
    for entry in std::fs::read_dir(&datasources_dir).expect("datasources dir") {
        let doc = load_one(&entry.expect("entry").path());
        for ds in doc["datasources"].as_array().expect("datasources") {
            let url = ds["url"].as_str().expect("url");
            let host = url
                .strip_prefix("http://")
                .and_then(|r| r.split(':').next())
                .expect("http://host:port url");
            assert!(
                services.contains_key(host),
                "data source {url}: no service {host}"
            );
            types.insert(
                ds["type"].as_str().expect("type").to_owned(),
                ds["uid"].as_str().expect("uid").to_owned(),
            );
        }
    }
    assert!(
        types.contains_key("prometheus"),
        "no Prometheus data source"
    );
    assert!(types.contains_key("jaeger"), "no Jaeger data source");

    let providers_dir = grafana_mount("/provisioning/dashboards");
    let dashboards_target = mounts
        .iter()
        .find(|((svc, _), p)| {
            *svc == "grafana" && p.canonicalize().ok() == deploy("grafana").canonicalize().ok()
        })
        .map(|((_, target), _)| *target)
        .expect("deploy/grafana mounted into grafana");
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(&providers_dir).expect("dashboards provisioning dir") {
        let doc = load_one(&entry.expect("entry").path());
        for p in doc["providers"].as_array().expect("providers") {
            paths.push(p["options"]["path"].as_str().expect("path").to_owned());
        }
    }
    assert!(
        paths.iter().any(|p| p == dashboards_target),
        "no dashboard provider reads {dashboards_target}: {paths:?}"
    );
    assert!(deploy("grafana/sidecar.json").is_file());

    // The dashboard's default data source is the provisioned Prometheus.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/sidecar.json")).expect("read dashboard"),
    )
    .expect("dashboard JSON");
    let ds_var = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds_var["query"], "prometheus");
    assert_eq!(ds_var["current"]["value"], types["prometheus"].as_str());
}

/// Every `expr` of a dashboard with its JSON path.
fn exprs(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                match (k.as_str(), child) {
                    ("expr", Value::String(s)) => out.push((format!("{path}.{k}"), s.clone())),
                    _ => exprs(child, &format!("{path}.{k}"), out),
                }
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                exprs(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn dashboard_promql_parses() {
    let file = deploy("grafana/sidecar.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read dashboard"))
            .expect("dashboard JSON");
    assert!(
        dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "uid"
    );
    let mut found = Vec::new();
    exprs(&dashboard, "$", &mut found);
    assert!(found.len() >= 20, "only {} expressions", found.len());

    // Grafana's variables replaced by what Grafana would put there, then one recording rule
    // per expression for `promtool check rules` (a full PromQL parse).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (path, expr)) in found.iter().enumerate() {
        let concrete = expr
            .replace("$__rate_interval", "1m")
            .replace("$service", ".+")
            .replace("$namespace", ".*");
        assert!(
            !concrete.contains('$'),
            "{path}: unknown variable in {expr}"
        );
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete).expect("quote")
        ));
    }
    let dir = std::env::temp_dir().join(format!("dashboard-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rules_file = dir.join("rules.yml");
    std::fs::write(&rules_file, &rules).expect("write rules");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .expect("running promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
