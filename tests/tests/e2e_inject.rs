//! End-to-end tests of `sidecar inject` (issue 6, item 2), run on the real binary: the fixture
//! (every workload kind next to kinds that must be left alone) is injected through `-f/-o` and
//! through stdin/stdout, the output validates strictly against the Kubernetes schemas of the
//! oldest and newest supported versions, reads (with PyYAML, a YAML 1.1 reader like Kubernetes')
//! as the input plus exactly the template's parts, and injecting it again changes nothing. Bad
//! input exits 64 with a message naming the place, and never creates or truncates `-o`.
//!
//! Needs the sidecar binary (`SIDECAR_BIN` or `target/release/sidecar`) and the peers'
//! virtualenv (`cargo xtask setup`: kubernetes-validate, PyYAML); no root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sidecar_tests::cmd::{run_timeout, Finished};
use sidecar_tests::deploy::{kubernetes_validate, workspace_root};
use sidecar_tests::sidecar::sidecar_bin;
use sidecar_tests::tempdir::TempDir;
use sidecar_tests::venv::python_venv;

/// Bound for one `sidecar inject` run.
const BOUND: Duration = Duration::from_secs(30);

fn fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/inject/app.yaml")
}

fn template_path() -> PathBuf {
    workspace_root().join("sidecar/src/inject/template.yaml")
}

fn bin() -> PathBuf {
    let bin = sidecar_bin();
    assert!(
        bin.is_file(),
        "the sidecar binary at {} (build it with `cargo build --release -p sidecar` or set \
         SIDECAR_BIN)",
        bin.display()
    );
    bin
}

fn inject(args: &[&str]) -> Finished {
    let mut cmd = Command::new(bin());
    cmd.arg("inject").args(args);
    let out = run_timeout(&mut cmd, BOUND).expect("running sidecar inject");
    assert!(!out.timed_out, "{} did not exit", out.command);
    out
}

/// Runs `sidecar inject ARGS` with `input` on its standard input.
fn inject_stdin(args: &[&str], input: &[u8]) -> (Option<i32>, Vec<u8>, String) {
    let mut child = Command::new(bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sidecar inject");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let started = Instant::now();
    while child.try_wait().expect("waiting").is_none() {
        if started.elapsed() > BOUND {
            let _ = child.kill();
            panic!("sidecar inject did not exit within {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let _ = writer.join();
    (
        out.status.code(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Every document of each file, read by PyYAML (`safe_load_all`) and handed over as JSON.
fn pyyaml_load(files: &[&Path]) -> Vec<Vec<Value>> {
    let python = python_venv();
    assert!(
        python.is_file(),
        "the peers' virtualenv at {} (run `cargo xtask setup`: PyYAML from \
         tests/peers/requirements.txt)",
        python.display()
    );
    let script = "import json, sys, yaml\n\
                  print(json.dumps([list(yaml.safe_load_all(open(f))) for f in sys.argv[1:]]))";
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(script).args(files);
    let out = run_timeout(&mut cmd, BOUND).expect("running PyYAML");
    assert!(
        out.success(),
        "PyYAML failed (is PyYAML installed in the virtualenv?): {}",
        out.stderr_str()
    );
    serde_json::from_slice(&out.stdout).expect("PyYAML's JSON")
}

/// JSON pointer of the pod template of a workload kind (`None`: not a workload).
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        "Pod" => Some(""),
        _ => None,
    }
}

/// Removes from `after` what inject adds (checking it is exactly the template's) so that it
/// can be compared with the input document `before`.
fn strip_sidecar(before: &Value, after: &mut Value, pointer: &str, template: &Value) {
    let before_tpl = before.pointer(pointer).expect("input pod template").clone();
    let tpl = after.pointer_mut(pointer).expect("output pod template");

    // Annotations: the template's, added to the pod's own.
    let annotations = tpl
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
        .expect("annotations");
    for (k, v) in template["annotations"]
        .as_object()
        .expect("template annotations")
    {
        assert_eq!(annotations.remove(k).as_ref(), Some(v), "annotation {k}");
    }
    if annotations.is_empty() && before_tpl.pointer("/metadata/annotations").is_none() {
        tpl["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("annotations");
    }
    if tpl["metadata"].as_object().is_some_and(|m| m.is_empty())
        && before_tpl.get("metadata").is_none()
    {
        tpl.as_object_mut().expect("template").remove("metadata");
    }

    // The container, first of the init containers, exactly the template's.
    let spec = tpl["spec"].as_object_mut().expect("pod spec");
    let init = spec["initContainers"]
        .as_array_mut()
        .expect("initContainers");
    assert_eq!(
        init.remove(0),
        template["initContainer"],
        "the injected container"
    );
    if init.is_empty() && before_tpl.pointer("/spec/initContainers").is_none() {
        spec.remove("initContainers");
    }
    // The volumes, before the pod's own, exactly the template's.
    let volumes = spec["volumes"].as_array_mut().expect("volumes");
    let ours = template["volumes"].as_array().expect("template volumes");
    let head: Vec<Value> = volumes.drain(..ours.len()).collect();
    assert_eq!(&head, ours, "the injected volumes");
    if volumes.is_empty() && before_tpl.pointer("/spec/volumes").is_none() {
        spec.remove("volumes");
    }
}

#[test]
fn fixture_injects_validates_and_reads_as_input_plus_sidecar() {
    let dir = TempDir::create("inject-fixture").expect("temp dir");
    let out_path = dir.join("injected.yaml");
    let run = inject(&["-f", path_str(&fixture()), "-o", path_str(&out_path)]);
    assert!(run.success(), "{run:?}\n{}", run.stderr_str());
    assert!(run.stdout.is_empty(), "-o given: nothing on stdout");

    // Strict schema validation (Kubernetes 1.29 and the newest), input and output.
    kubernetes_validate(&[&fixture()]).expect("the fixture itself is valid");
    kubernetes_validate(&[&out_path]).expect("the injected output is valid");

    // Data: every document is the input's, plus exactly the template's parts where they go.
    let loaded = pyyaml_load(&[&fixture(), &out_path, &template_path()]);
    let (before, after, template) = (&loaded[0], &loaded[1], &loaded[2][0]);
    assert_eq!(before.len(), after.len(), "same number of documents");
    let mut injected = 0;
    for (b, a) in before.iter().zip(after) {
        let kind = b["kind"].as_str().unwrap_or_default();
        let opted_out =
            b.pointer("/metadata/annotations/sidecar.dev~1inject") == Some(&Value::from("false"));
        let mut a = a.clone();
        if let (Some(pointer), false) = (template_pointer(kind), opted_out) {
            strip_sidecar(b, &mut a, pointer, template);
            injected += 1;
        }
        assert_eq!(&a, b, "{kind} {}", b["metadata"]["name"]);
    }
    assert_eq!(
        injected, 6,
        "Deployment, StatefulSet, DaemonSet, Job, CronJob and Pod"
    );

    // Documents that are not changed come out byte for byte (comments included).
    let input = std::fs::read_to_string(fixture()).expect("fixture");
    let output = std::fs::read_to_string(&out_path).expect("output");
    for doc in input.split("\n---\n") {
        let unchanged = doc.contains("kind: ConfigMap")
            || doc.contains("kind: Service")
            || doc.contains("sidecar.dev/inject: \"false\"");
        if unchanged {
            assert!(output.contains(doc), "not byte for byte:\n{doc}");
        }
    }
    // Comments of changed documents are kept too.
    assert!(output.contains("defaultMode: 0644   # YAML 1.1 octal, as Kubernetes reads it"));
    assert!(output.contains("# Runs before the app: the sidecar must come first all the same."));
}

#[test]
fn stdin_to_stdout_is_the_same_and_injecting_again_changes_nothing() {
    let input = std::fs::read(fixture()).expect("fixture");
    let (code, once, stderr) = inject_stdin(&[], &input);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, dash, stderr) = inject_stdin(&["-f", "-", "-o", "-"], &input);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(dash, once, "`-f - -o -` is the default");

    let dir = TempDir::create("inject-stdin").expect("temp dir");
    let file_out = dir.join("out.yaml");
    let run = inject(&["-f", path_str(&fixture()), "-o", path_str(&file_out)]);
    assert!(run.success(), "{}", run.stderr_str());
    assert_eq!(std::fs::read(&file_out).expect("out"), once);

    // Idempotent through the binary: the output injected again is the same bytes.
    let (code, twice, stderr) = inject_stdin(&[], &once);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(twice, once, "injecting twice must equal injecting once");
}

#[test]
fn options_reach_the_container_and_stay_valid() {
    let dir = TempDir::create("inject-options").expect("temp dir");
    let out_path = dir.join("privileged.yaml");
    let run = inject(&[
        "-f",
        path_str(&fixture()),
        "-o",
        path_str(&out_path),
        "--image",
        "registry.example.com/sidecar:dev",
        "--collector-endpoint",
        "http://collector.monitoring.svc:4317",
        "--privileged",
        "--set-env",
        "SIDECAR_EXCLUDE_OUTBOUND_PORTS=5432",
    ]);
    assert!(run.success(), "{}", run.stderr_str());
    kubernetes_validate(&[&out_path]).expect("valid with options");
    let docs = pyyaml_load(&[&out_path]).remove(0);
    let web = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "web")
        .expect("web");
    let c = &web["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(c["name"], "sidecar");
    assert_eq!(c["image"], "registry.example.com/sidecar:dev");
    assert_eq!(c["securityContext"]["privileged"], true);
    assert!(c["securityContext"].get("capabilities").is_none());
    let env = c["env"].as_array().expect("env");
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        value("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some(Value::from("http://collector.monitoring.svc:4317"))
    );
    assert_eq!(
        value("SIDECAR_EXCLUDE_OUTBOUND_PORTS"),
        Some(Value::from("5432"))
    );
}

#[test]
fn bad_input_exits_64_names_the_place_and_leaves_output_alone() {
    let dir = TempDir::create("inject-bad").expect("temp dir");
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "malformed.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [oops\n",
            &["malformed YAML at line 5, column"],
        ),
        (
            "hostnetwork.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: apps/v1\n\
             kind: DaemonSet\nmetadata: {name: node-agent}\nspec:\n  selector: {matchLabels: \
             {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      \
             hostNetwork: true\n      containers: [{name: agent, image: agent:1}]\n",
            &[
                "document 2 (DaemonSet \"node-agent\")",
                "field spec.template.spec.hostNetwork",
                "hostNetwork: true",
            ],
        ),
        (
            "reserved.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: \
             app\n    image: a:1\n  volumes:\n  - name: sidecar-data\n    emptyDir: {}\n",
            &[
                "document 1 (Pod \"p\")",
                "field spec.volumes[0].name",
                "reserved",
            ],
        ),
        (
            "optout-typo.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {sidecar.dev/inject: \
             \"no\"}\nspec:\n  containers: [{name: a, image: a:1}]\n",
            &[
                "field metadata.labels.sidecar.dev/inject",
                "\"true\" or \"false\"",
            ],
        ),
    ];
    for (name, text, wanted) in cases {
        let input = dir.join(name);
        std::fs::write(&input, text).expect("writing input");

        // `-o` absent before: still absent after.
        let fresh = dir.join(&format!("{name}.out"));
        let run = inject(&["-f", path_str(&input), "-o", path_str(&fresh)]);
        assert_eq!(run.code(), Some(64), "{name}: {run:?}");
        let stderr = run.stderr_str();
        for w in wanted {
            assert!(stderr.contains(w), "{name}: {w:?} not in {stderr}");
        }
        assert!(!fresh.exists(), "{name}: -o created on error");

        // `-o` present before: not truncated, not changed.
        let existing = dir.join(&format!("{name}.existing"));
        std::fs::write(&existing, "precious\n").expect("writing");
        let run = inject(&["-f", path_str(&input), "-o", path_str(&existing)]);
        assert_eq!(run.code(), Some(64), "{name}");
        assert_eq!(
            std::fs::read_to_string(&existing).expect("reading"),
            "precious\n"
        );

        // Through stdin: nothing on stdout.
        let (code, stdout, _) = inject_stdin(&[], text.as_bytes());
        assert_eq!(code, Some(64), "{name}");
        assert!(stdout.is_empty(), "{name}: partial output on stdout");
    }

    // Not UTF-8, a missing file, an unknown flag: usage errors too.
    let (code, _, stderr) = inject_stdin(&[], b"kind: Pod\nname: \xff\n");
    assert_eq!(code, Some(64));
    assert!(stderr.contains("not UTF-8 text (line 2"), "{stderr}");
    let run = inject(&["-f", path_str(&dir.join("absent.yaml"))]);
    assert_eq!(run.code(), Some(64));
    assert!(
        run.stderr_str().contains("cannot read"),
        "{}",
        run.stderr_str()
    );
    let run = inject(&["--no-such-flag"]);
    assert_eq!(run.code(), Some(64));
    let run = inject(&["--help"]);
    assert_eq!(run.code(), Some(0));
    assert!(run.stdout_str().contains("--collector-endpoint"));
}
