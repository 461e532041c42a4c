//! Unit tests of `sidecar inject`: every supported kind, multi-document streams and Lists,
//! idempotence, opt-out, preservation of what was there, conflicts, options and layouts (block,
//! flow/JSON, CRLF, null values). Expected data is built independently of the planner: the
//! input's data plus the template's parts, put where they belong.

use super::yaml::{self, Value};
use super::*;

/// `sidecar inject`'s flags parsed on their own.
#[derive(Debug, clap::Parser)]
#[command(
    name = "sidecar inject",
    bin_name = "sidecar inject",
    version,
    about = "Add the sidecar to the pod templates of Kubernetes YAML (Deployment, StatefulSet, \
             DaemonSet, ReplicaSet, Job, CronJob, Pod, List), like `istioctl kube-inject`",
    long_about = None
)]
struct InjectCli {
    /// The flags.
    #[command(flatten)]
    args: InjectArgs,
}

fn inject_ok(src: &str) -> Injected {
    inject(src, &Options::default()).unwrap_or_else(|e| panic!("inject failed: {e}\n{src}"))
}

fn values(text: &str) -> Vec<Value> {
    yaml::parse(text)
        .expect("output parses")
        .iter()
        .map(yaml::document_value)
        .collect()
}

fn at<'a>(v: &'a mut Value, path: &[&str]) -> &'a mut Value {
    path.iter().fold(v, |v, k| {
        v.get_mut(k)
            .unwrap_or_else(|| panic!("no {k} on the way to {path:?}"))
    })
}

/// `doc` with the sidecar added to the pod template at `tpl` the way inject must do it.
fn with_sidecar(mut doc: Value, tpl: &[&str], opts: &Options) -> Value {
    let t = template(opts).expect("template");
    let pod = at(&mut doc, tpl);
    if !matches!(pod.get("metadata"), Some(Value::Map(_))) {
        pod.set("metadata", Value::Map(Vec::new()));
    }
    let meta = at(pod, &["metadata"]);
    if !matches!(meta.get("annotations"), Some(Value::Map(_))) {
        meta.set("annotations", Value::Map(Vec::new()));
    }
    let annotations = at(meta, &["annotations"]);
    for (k, v) in &t.annotations {
        if annotations.get(k).is_none() {
            annotations.set(k, v.clone());
        }
    }
    let spec = at(pod, &["spec"]);
    match spec.get_mut("initContainers") {
        Some(Value::Seq(list)) => list.insert(0, t.container.clone()),
        _ => spec.set("initContainers", Value::Seq(vec![t.container.clone()])),
    }
    match spec.get_mut("volumes") {
        Some(Value::Seq(list)) => {
            list.splice(0..0, t.volumes.iter().cloned());
        }
        _ => spec.set("volumes", Value::Seq(t.volumes.clone())),
    }
    doc
}

/// Injects `src` (one document) and checks the result against [`with_sidecar`].
fn check_one(src: &str, tpl: &[&str]) -> String {
    let out = inject_ok(src);
    assert_eq!(out.injected, 1, "{}", out.text);
    let before = values(src).remove(0);
    let after = values(&out.text).remove(0);
    assert_eq!(
        after,
        with_sidecar(before, tpl, &Options::default()),
        "{}",
        out.text
    );
    out.text
}

const DEPLOYMENT: &str = "\
# The web front end.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web   # shown in kubectl get
  labels: { app: web }
spec:
  replicas: 2
  selector:
    matchLabels: { app: web }
  template:
    metadata:
      labels:
        app: web
    spec:
      # The application.
      containers:
      - name: app
        image: nginx:1.27
        ports:
        - containerPort: 8080
        command:
          - sh
          - -c
          - |
            echo 'hello'   # not a comment
            exec nginx
        env:
          - name: MODE
            value: '0644'   # a string
          - name: ON
            value: \"yes\"
      volumes:
        - name: data
          emptyDir: {}
";

#[test]
fn deployment_gets_the_sidecar_first_and_keeps_its_text() {
    let out = check_one(DEPLOYMENT, &["spec", "template"]);
    // Every line of the input is still there, in order (comments and quoting included).
    let mut rest = out.as_str();
    for line in DEPLOYMENT.lines() {
        let i = rest
            .find(line)
            .unwrap_or_else(|| panic!("line {line:?} lost or reordered:\n{out}"));
        rest = &rest[i + line.len()..];
    }
    // The container's comment stays right above `containers:`, the sidecar goes before both.
    let sidecar = out.find("- name: sidecar").expect("sidecar container");
    let comment = out.find("# The application.").expect("comment");
    assert!(sidecar < comment, "{out}");
    assert!(
        out.contains("      # The application.\n      containers:\n"),
        "{out}"
    );
    // The template's scalars are written so that YAML 1.1 readers (Kubernetes) agree.
    assert!(out.contains("prometheus.io/scrape: \"true\""), "{out}");
    assert!(out.contains("prometheus.io/port: \"15020\""), "{out}");
    assert!(out.contains("restartPolicy: Always"), "{out}");
}

#[test]
fn every_workload_kind() {
    let pod_spec = "    spec:\n      containers:\n        - name: app\n          image: busybox\n";
    for (api, kind) in [
        ("apps/v1", "StatefulSet"),
        ("apps/v1", "DaemonSet"),
        ("apps/v1", "ReplicaSet"),
        ("apps/v1", "Deployment"),
        ("batch/v1", "Job"),
    ] {
        let src = format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: x\nspec:\n  template:\n{pod_spec}"
        );
        check_one(&src, &["spec", "template"]);
    }
    let cron = format!(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: nightly\nspec:\n  schedule: \
         \"0 3 * * *\"\n  jobTemplate:\n    spec:\n      template:\n{}",
        pod_spec
            .replace("\n    ", "\n        ")
            .replacen("    spec", "        spec", 1)
    );
    check_one(&cron, &["spec", "jobTemplate", "spec", "template"]);
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: \
               app\n    image: busybox\n";
    check_one(pod, &[]);
}

#[test]
fn other_kinds_and_groups_pass_through_byte_for_byte() {
    let src = "\
apiVersion: v1
kind: Service   # comment
metadata: {name: web}
spec:
  ports: [{port: 80}]
---
apiVersion: example.com/v1
kind: Deployment
spec:
  template:
    spec: {containers: [{name: x}]}
---
# only a comment
---
---
just a string
";
    let out = inject_ok(src);
    assert_eq!(out.text, src);
    assert_eq!(out.injected, 0);
    for empty in ["", "\n", "# nothing\n", "---\n...\n"] {
        assert_eq!(inject_ok(empty).text, empty);
    }
}

#[test]
fn multi_document_stream_changes_only_the_workloads() {
    let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web # the service\nspec:\n  \
                   selector: {app: web}\n  ports:\n  - port: 80\n";
    let config = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata:\n  a: |\n    \
                  kind: Pod\n";
    let src = format!("---\n{service}---\n{DEPLOYMENT}---\n{config}");
    let out = inject_ok(&src);
    assert_eq!(out.injected, 1);
    assert!(
        out.text.starts_with(&format!("---\n{service}---\n")),
        "{}",
        out.text
    );
    assert!(
        out.text.ends_with(&format!("---\n{config}")),
        "{}",
        out.text
    );
    let (before, after) = (values(&src), values(&out.text));
    assert_eq!(after.len(), 3);
    assert_eq!(after[0], before[0]);
    assert_eq!(after[2], before[2]);
    assert_eq!(
        after[1],
        with_sidecar(
            before[1].clone(),
            &["spec", "template"],
            &Options::default()
        )
    );
}

#[test]
fn lists_and_typed_lists() {
    let src = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: a
  spec:
    containers:
    - name: app
      image: busybox
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
  spec:
    template:
      spec:
        containers: [{name: app, image: busybox}]
";
    let out = inject_ok(src);
    assert_eq!(out.injected, 2);
    let mut expected = values(src).remove(0);
    if let Some(Value::Seq(items)) = expected.get_mut("items") {
        items[0] = with_sidecar(items[0].clone(), &[], &Options::default());
        items[2] = with_sidecar(items[2].clone(), &["spec", "template"], &Options::default());
    }
    assert_eq!(values(&out.text).remove(0), expected, "{}", out.text);

    // API list responses: the items carry no kind.
    let typed = "kind: PodList\napiVersion: v1\nitems:\n  - metadata:\n      name: a\n    \
                 spec:\n      containers:\n        - name: app\n";
    let out = inject_ok(typed);
    assert_eq!(out.injected, 1);
    let mut expected = values(typed).remove(0);
    if let Some(Value::Seq(items)) = expected.get_mut("items") {
        items[0] = with_sidecar(items[0].clone(), &[], &Options::default());
    }
    assert_eq!(values(&out.text).remove(0), expected, "{}", out.text);
}

#[test]
fn injecting_twice_is_injecting_once() {
    let src = format!("{DEPLOYMENT}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: [{{name: a}}]}}\n");
    let once = inject_ok(&src);
    assert_eq!(once.injected, 2);
    let twice = inject_ok(&once.text);
    assert_eq!(twice.text, once.text);
    assert_eq!(twice.injected, 0);
}

#[test]
fn already_injected_templates_are_left_alone() {
    // A container named like ours, or the status annotation, means injected: byte for byte.
    for src in [
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  initContainers:\n  - name: \
         sidecar\n    image: old:1\n  containers: [{name: a}]\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: \
         sidecar}\n",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    \
         sidecar.dev/status: injected\nspec:\n  containers: [{name: a}]\n",
    ] {
        let out = inject_ok(src);
        assert_eq!(out.text, src);
        assert_eq!(out.injected, 0);
    }
}

#[test]
fn opt_out_by_annotation_or_label_at_either_level() {
    let cases = [
        (
            "metadata:\n  name: w\n  annotations:\n    sidecar.dev/inject: \"false\"\n",
            "",
        ),
        (
            "metadata:\n  name: w\n  labels:\n    sidecar.dev/inject: 'false'\n",
            "",
        ),
        (
            "metadata:\n  name: w\n",
            "    metadata:\n      annotations: {sidecar.dev/inject: \"false\"}\n",
        ),
        (
            "metadata:\n  name: w\n",
            "    metadata:\n      labels:\n        sidecar.dev/inject: \"false\"\n",
        ),
    ];
    for (workload_meta, template_meta) in cases {
        let src = format!(
            "apiVersion: apps/v1\nkind: Deployment\n{workload_meta}spec:\n  template:\n\
             {template_meta}    spec:\n      hostNetwork: true\n      containers:\n        - \
             name: sidecar-x   # would conflict\n"
        );
        let out = inject_ok(&src);
        assert_eq!(
            out.text, src,
            "opted out, so untouched (and no conflict reported)"
        );
        assert_eq!(out.injected, 0);
    }
    // `"true"` injects; anything else is a mistake worth reporting.
    let yes = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    \
               sidecar.dev/inject: \"true\"\nspec:\n  containers: [{name: a}]\n";
    check_one(yes, &[]);
    let typo = yes.replace("\"true\"", "\"flase\"");
    let err = inject(&typo, &Options::default()).expect_err("bad opt-out value");
    assert_eq!(
        err.to_string(),
        "document 1 (Pod \"p\"), field metadata.annotations.sidecar.dev/inject: must be \"true\" \
         or \"false\""
    );
    assert_eq!(err.exit_code(), crate::cli::EXIT_USAGE);
}

#[test]
fn existing_init_containers_volumes_and_annotations_are_kept_in_order() {
    let src = "\
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
spec:
  template:
    metadata:
      annotations:
        team: storage   # owner
        checksum/config: abc
    spec:
      initContainers:
        - name: migrate
          image: migrate:1
        - name: warm
          image: warm:1
      containers:
        - name: db
          image: postgres:16
      volumes:
        - name: data
          persistentVolumeClaim: {claimName: data}
        - name: conf
          configMap: {name: conf, defaultMode: 0644}
";
    let out = check_one(src, &["spec", "template"]);
    let after = values(&out).remove(0);
    let spec = after
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("spec"))
        .expect("pod spec");
    let names = |list: &str| -> Vec<String> {
        match spec.get(list) {
            Some(Value::Seq(items)) => items
                .iter()
                .filter_map(|i| i.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    };
    assert_eq!(names("initContainers"), ["sidecar", "migrate", "warm"]);
    assert_eq!(
        names("volumes"),
        [
            "sidecar-host-cgroup",
            "sidecar-tracefs",
            "sidecar-podinfo",
            "sidecar-tmp",
            "data",
            "conf"
        ]
    );
    // YAML 1.1 octal stays exactly as written (Kubernetes reads it as 0o644).
    assert!(
        out.contains("configMap: {name: conf, defaultMode: 0644}"),
        "{out}"
    );
    assert!(out.contains("team: storage   # owner"), "{out}");
}

#[test]
fn null_and_empty_collections_are_filled() {
    let src = "\
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
spec:
  template:
    metadata:
      annotations:   # none yet
    spec:
      initContainers: []
      volumes: ~
      containers:
        - name: agent
";
    let out = check_one(src, &["spec", "template"]);
    assert!(out.contains("annotations:   # none yet\n"), "{out}");
    let no_metadata = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\nspec:\n  \
                       template:\n    spec:\n      restartPolicy: Never\n      containers:\n        \
                       - name: j\n      volumes:\n";
    check_one(no_metadata, &["spec", "template"]);
    let null_metadata = "apiVersion: v1\nkind: Pod\nmetadata: null\nspec:\n  containers:\n    - \
                         name: a\n";
    check_one(null_metadata, &[]);
}

#[test]
fn json_input_stays_json() {
    let src = r#"{
  "apiVersion": "apps/v1",
  "kind": "Deployment",
  "metadata": {"name": "web", "annotations": {"a": "b"}},
  "spec": {
    "template": {
      "metadata": {"labels": {"app": "web"}},
      "spec": {"containers": [{"name": "app", "image": "nginx"}], "volumes": []}
    }
  }
}
"#;
    let out = check_one(src, &["spec", "template"]);
    let json: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
    assert_eq!(
        json["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "sidecar"
    );
    assert_eq!(
        json["spec"]["template"]["metadata"]["annotations"]["sidecar.dev/status"],
        "injected"
    );
}

#[test]
fn crlf_input_gets_crlf_additions() {
    let src = DEPLOYMENT.replace('\n', "\r\n");
    let out = check_one(&src, &["spec", "template"]);
    assert!(
        !out.replace("\r\n", "").contains('\n'),
        "a bare LF in:\n{out}"
    );
}

#[test]
fn conflicts_name_the_document_object_and_field() {
    let pod = |spec: &str| {
        format!("---\napiVersion: v1\nkind: ConfigMap\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n{spec}")
    };
    let cases = [
        (
            "  hostNetwork: true\n  containers: [{name: a}]\n",
            "document 2 (Pod \"p\"), field spec.hostNetwork: the pod uses the node's network \
             namespace",
        ),
        (
            "  containers:\n  - name: a\n  - name: sidecar-proxy\n",
            "document 2 (Pod \"p\"), field spec.containers[1].name: container name \
             \"sidecar-proxy\" is reserved",
        ),
        (
            "  containers: [{name: a}]\n  volumes:\n  - name: sidecar-tmp\n    emptyDir: {}\n",
            "document 2 (Pod \"p\"), field spec.volumes[0].name: volume name \"sidecar-tmp\" is \
             reserved",
        ),
        (
            "  containers:\n  - name: a\n    ports:\n    - containerPort: 15020\n",
            "document 2 (Pod \"p\"), field spec.containers[0].ports[0].containerPort: port 15020 \
             is used by the sidecar",
        ),
        (
            "  containers: [{name: a}]\n  volumes: {}\n",
            "document 2 (Pod \"p\"), field spec.volumes: expected a sequence, found a mapping",
        ),
        (
            "  containers: [{name: a}]\n  volumes: []\n  volumes: []\n",
            "document 2 (Pod \"p\"), field spec.volumes: the key appears twice (again on line 12)",
        ),
    ];
    for (spec, want) in cases {
        let err = inject(&pod(spec), &Options::default()).expect_err(spec);
        assert!(err.to_string().starts_with(want), "{err}\nwanted: {want}");
        assert_eq!(err.exit_code(), crate::cli::EXIT_USAGE);
    }
    let no_template = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n";
    let err = inject(no_template, &Options::default()).expect_err("no template");
    assert_eq!(
        err.to_string(),
        "document 1 (Deployment \"d\"), field spec.template: no pod template here"
    );
    let aliases = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: &l {a: b}}\nspec:\n  \
                   containers: [{name: a}]\n  nodeSelector: *l\n";
    let err = inject(aliases, &Options::default()).expect_err("aliases");
    assert!(err.to_string().contains("uses YAML aliases"), "{err}");
}

#[test]
fn malformed_yaml_reports_line_and_column() {
    let src = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n";
    match inject(src, &Options::default()) {
        Err(InjectError::Syntax(e)) => {
            assert_eq!(e.line, 5, "{e}");
            assert!(
                e.to_string()
                    .starts_with("malformed YAML at line 5, column"),
                "{e}"
            );
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let tab = "kind: Pod\nspec:\n\tcontainers: []\n";
    let err = inject(tab, &Options::default()).expect_err("tab indentation");
    assert!(err.to_string().contains("line 3"), "{err}");
    assert_eq!(err.exit_code(), crate::cli::EXIT_USAGE);
}

#[test]
fn options_change_the_container() {
    let opts = Options {
        image: Some("registry.example/sidecar:dev".to_owned()),
        collector_endpoint: Some("http://collector.monitoring:4317".to_owned()),
        privileged: true,
        set_env: vec![
            (
                "SIDECAR_EXCLUDE_OUTBOUND_PORTS".to_owned(),
                "5432".to_owned(),
            ),
            ("RUST_LOG".to_owned(), "debug".to_owned()),
        ],
    };
    let src = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a}]\n";
    let out = inject(src, &opts).expect("inject");
    let after = values(&out.text).remove(0);
    assert_eq!(after, with_sidecar(values(src).remove(0), &[], &opts));
    let c = after
        .get("spec")
        .and_then(|s| s.get("initContainers"))
        .and_then(|l| match l {
            Value::Seq(items) => items.first(),
            _ => None,
        })
        .expect("sidecar container")
        .clone();
    assert_eq!(
        c.get("image"),
        Some(&Value::str("registry.example/sidecar:dev"))
    );
    let env = |name: &str| match c.get("env") {
        Some(Value::Seq(items)) => items
            .iter()
            .find(|e| e.get("name") == Some(&Value::str(name)))
            .and_then(|e| e.get("value"))
            .cloned(),
        _ => None,
    };
    assert_eq!(
        env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some(Value::str("http://collector.monitoring:4317"))
    );
    assert_eq!(
        env("SIDECAR_EXCLUDE_OUTBOUND_PORTS"),
        Some(Value::str("5432"))
    );
    assert_eq!(env("RUST_LOG"), Some(Value::str("debug")));
    let sc = c.get("securityContext").expect("securityContext");
    assert_eq!(sc.get("privileged"), Some(&Value::Bool(true)));
    assert_eq!(sc.get("capabilities"), None);

    // Without options: the template's container exactly.
    let plain = template(&Options::default()).expect("template");
    let tpl = yaml::document_value(&yaml::parse(TEMPLATE).expect("template parses")[0]);
    assert_eq!(Some(&plain.container), tpl.get("initContainer"));
    assert_eq!(
        plain.container.get("restartPolicy"),
        Some(&Value::str("Always"))
    );
    assert_eq!(
        plain.container.get("image"),
        Some(&Value::str(format!(
            "ghcr.io/sidecar-dev/sidecar:{}",
            env!("CARGO_PKG_VERSION")
        )))
    );
}

#[test]
fn the_pods_own_prometheus_annotations_win() {
    let src = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    \
               prometheus.io/scrape: \"true\"\n    prometheus.io/port: \"8080\"\nspec:\n  \
               containers: [{name: a}]\n";
    let out = inject_ok(src);
    let after = values(&out.text).remove(0);
    let a = after
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .expect("annotations");
    assert_eq!(a.get("prometheus.io/port"), Some(&Value::str("8080")));
    assert_eq!(a.get("prometheus.io/path"), None);
    assert_eq!(a.get(STATUS_KEY), Some(&Value::str(STATUS_INJECTED)));
    assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
    assert!(out.warnings[0].contains("document 1 (Pod \"p\")"));
}

#[test]
fn cli_flags_parse() {
    use clap::Parser as _;
    let cli = InjectCli::try_parse_from([
        "sidecar inject",
        "-f",
        "in.yaml",
        "-o",
        "out.yaml",
        "--image",
        "i:1",
        "--collector-endpoint",
        "http://c:4317",
        "--privileged",
        "--set-env",
        "A=1",
        "--set-env",
        "B=x=y",
    ])
    .expect("parses");
    let o = Options::from(&cli.args);
    assert_eq!(cli.args.filename, PathBuf::from("in.yaml"));
    assert_eq!(cli.args.output, Some(PathBuf::from("out.yaml")));
    assert_eq!(o.set_env[1], ("B".to_owned(), "x=y".to_owned()));
    assert!(o.privileged);
    for bad in [
        vec!["sidecar inject", "--set-env", "=1"],
        vec!["sidecar inject", "--set-env", "NOVALUE"],
        vec!["sidecar inject", "--image", ""],
        vec!["sidecar inject", "--collector-endpoint", " "],
    ] {
        assert!(InjectCli::try_parse_from(&bad).is_err(), "{bad:?}");
    }
    let defaults = InjectCli::try_parse_from(["sidecar inject"]).expect("parses");
    assert_eq!(defaults.args.filename, PathBuf::from("-"));
    assert_eq!(defaults.args.output, None);
}
