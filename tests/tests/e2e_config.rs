//! End-to-end tests of the configuration (issue 5, item 3) and the log format (item 7), run on
//! the real binary: `sidecar config` reports every value with its source (flag > environment >
//! config file > default), invalid configurations exit 64 naming the key as the user supplied
//! it, header values never appear, and `--log-format json` (also from the config file) writes
//! one JSON object per log line.
//!
//! Needs the sidecar binary (`SIDECAR_BIN` or `target/release/sidecar`); no root.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sidecar_tests::cmd::{run_timeout, Finished};
use sidecar_tests::sidecar::sidecar_bin;
use sidecar_tests::tempdir::TempDir;

/// Bound for one `sidecar` invocation that is expected to exit by itself.
const BOUND: Duration = Duration::from_secs(30);
/// A header value that must never be printed.
const SECRET: &str = "t0p-s3cret";

/// Runs the sidecar with exactly `env` as its environment.
fn sidecar(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let bin = sidecar_bin();
    assert!(
        bin.is_file(),
        "the sidecar binary at {} (build it with `cargo build --release -p sidecar` or set \
         SIDECAR_BIN)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_timeout(&mut cmd, BOUND).expect("running the sidecar");
    assert!(!out.timed_out, "{} did not exit: {out:?}", out.command);
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path_str(&path).to_owned()
}

/// `--labels-file` / `--annotations-file` pointing at absent files, so the host's
/// /etc/podinfo never matters.
fn podinfo_args(dir: &TempDir) -> Vec<String> {
    vec![
        "--labels-file".into(),
        path_str(&dir.join("no-labels")).into(),
        "--annotations-file".into(),
        path_str(&dir.join("no-annotations")).into(),
    ]
}

#[test]
fn config_prints_values_with_their_sources() {
    let dir = TempDir::create("e2e-config-show").unwrap();
    let file = write(
        &dir,
        "sidecar.toml",
        r#"
outbound-port = 15101
inbound-port = 15106
exclude-outbound-ports = [5432, "8000-8100"]
otlp-endpoint = "http://collector.file:4318"
otlp-protocol = "http/protobuf"
otlp-compression = "gzip"
service-name = "checkout"
"#,
    );
    let headers = format!("authorization=Bearer%20{SECRET},x-tenant=acme");
    let env = [
        ("SIDECAR_INBOUND_PORT", "15206"),
        ("OTEL_EXPORTER_OTLP_HEADERS", headers.as_str()),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
        ("K8S_POD_NAME", "checkout-7d4b9c-x2x9z"),
        ("K8S_NAMESPACE_NAME", "shop"),
    ];
    let mut args: Vec<String> = ["config", "--config", &file, "--outbound-port", "15301"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(podinfo_args(&dir));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();

    let text = sidecar(&argv, &env);
    let (stdout, stderr) = (text.stdout_str(), text.stderr_str());
    assert_eq!(text.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    for line in [
        "outbound-port = 15301  (flag --outbound-port)".to_owned(),
        "inbound-port = 15206  (env SIDECAR_INBOUND_PORT)".to_owned(),
        format!("exclude-outbound-ports = 5432,8000-8100  (file {file})"),
        format!("otlp-protocol = http/protobuf  (file {file})"),
        "otlp-headers = <redacted>  (env OTEL_EXPORTER_OTLP_HEADERS)".to_owned(),
        format!("config = {file}  (flag --config)"),
        "drain-timeout = 5  (default)".to_owned(),
        "traces.endpoint = http://collector.file:4318/v1/traces".to_owned(),
        "metrics.endpoint = http://collector.file:4318/v1/metrics".to_owned(),
        "traces.timeout = 2500ms".to_owned(),
        "traces.compression = gzip".to_owned(),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing line `{line}` in:\n{stdout}"
        );
    }
    let headers_line = stdout
        .lines()
        .find(|l| l.starts_with("traces.headers = "))
        .unwrap_or_else(|| panic!("no traces.headers line in:\n{stdout}"));
    assert!(
        headers_line.contains("authorization=<redacted>")
            && headers_line.contains("x-tenant=<redacted>"),
        "{headers_line}"
    );
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));

    let mut json_argv = argv.clone();
    json_argv.extend(["--format", "json"]);
    let json = sidecar(&json_argv, &env);
    assert_eq!(json.code(), Some(0), "{}", json.stderr_str());
    assert!(!json.stdout_str().contains(SECRET));
    let doc: Value = serde_json::from_str(&json.stdout_str()).expect("config --format json");
    let setting = |key: &str| -> Value {
        doc["settings"]
            .as_array()
            .expect("settings array")
            .iter()
            .find(|s| s["key"] == key)
            .unwrap_or_else(|| panic!("no setting {key}"))
            .clone()
    };
    assert_eq!(setting("outbound-port")["value"], "15301");
    assert_eq!(setting("outbound-port")["source"], "flag --outbound-port");
    assert_eq!(
        setting("inbound-port")["source"],
        "env SIDECAR_INBOUND_PORT"
    );
    assert_eq!(setting("service-name")["value"], "checkout");
    assert_eq!(setting("service-name")["source"], format!("file {file}"));
    assert_eq!(setting("otlp-headers")["value"], "<redacted>");
    assert_eq!(setting("admin-addr")["value"], "0.0.0.0:15020");
    assert_eq!(setting("admin-addr")["source"], "default");
    let traces = &doc["export"]["traces"];
    assert_eq!(traces["endpoint"], "http://collector.file:4318/v1/traces");
    assert_eq!(traces["protocol"], "http/protobuf");
    assert_eq!(traces["timeout_ms"], 2500);
    let names: Vec<&str> = traces["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|h| {
            assert_eq!(h["value"], "<redacted>");
            h["name"].as_str().expect("header name")
        })
        .collect();
    assert_eq!(names, ["authorization", "x-tenant"]);
    let resource = doc["resource"].as_array().expect("resource");
    let attr = |key: &str| {
        resource
            .iter()
            .find(|a| a["key"] == key)
            .unwrap_or_else(|| panic!("no resource attribute {key} in {resource:?}"))
            .clone()
    };
    assert_eq!(attr("service.name")["value"], "checkout");
    assert_eq!(attr("k8s.pod.name")["value"], "checkout-7d4b9c-x2x9z");
    assert_eq!(attr("k8s.namespace.name")["value"], "shop");
}

#[test]
fn invalid_configurations_exit_64_naming_the_key() {
    let dir = TempDir::create("e2e-config-invalid").unwrap();
    let unknown = write(&dir, "unknown.toml", "outbound-prot = 15001\n");
    let bad_type = write(&dir, "type.toml", "inbound-port = [1, 2]\n");
    let bad_value = write(
        &dir,
        "value.toml",
        "exclude-outbound-ports = [80, \"http\"]\n",
    );
    let bad_otlp = write(&dir, "otlp.toml", "otlp-compression = \"zstd\"\n");
    let nested = write(&dir, "nested.toml", "config = \"other.toml\"\n");
    let broken = write(&dir, "broken.toml", "outbound-port = = 1\n");
    let missing = path_str(&dir.join("missing.toml")).to_owned();
    let file_key = |path: &str, key: &str| format!("config file {path}: key `{key}`");

    /// Flags, environment, the start of the expected error after `sidecar: error: `.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, String);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--config", &unknown],
            vec![],
            format!("config file {unknown}: unknown key `outbound-prot`"),
        ),
        (
            vec!["--config", &bad_type],
            vec![],
            file_key(&bad_type, "inbound-port"),
        ),
        (
            vec![],
            vec![("SIDECAR_CONFIG", &bad_value)],
            file_key(&bad_value, "exclude-outbound-ports"),
        ),
        (
            vec!["--config", &bad_otlp],
            vec![],
            file_key(&bad_otlp, "otlp-compression"),
        ),
        (
            vec!["--config", &nested],
            vec![],
            file_key(&nested, "config"),
        ),
        (
            vec!["--config", &broken],
            vec![],
            format!("config file {broken}: not valid TOML"),
        ),
        (
            vec!["--config", &missing],
            vec![],
            format!("--config: cannot read the config file {missing}"),
        ),
        (
            vec![],
            vec![("SIDECAR_OUTBOUND_PORT", "70000")],
            "SIDECAR_OUTBOUND_PORT: invalid value `70000`".to_owned(),
        ),
        (
            vec!["--outbound-port", "0"],
            vec![],
            "--outbound-port: invalid value `0`".to_owned(),
        ),
        (
            vec![],
            vec![("RUST_LOG", "sidecar=loud")],
            "RUST_LOG: invalid value `sidecar=loud`".to_owned(),
        ),
        (
            vec!["--log-level", "sidecar=loud"],
            vec![],
            "--log-level: invalid value `sidecar=loud`".to_owned(),
        ),
        (
            vec![],
            vec![("SIDECAR_LOG_FORMAT", "xml")],
            "SIDECAR_LOG_FORMAT: invalid value `xml`".to_owned(),
        ),
        (
            vec![],
            vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "grpcx")],
            "OTEL_EXPORTER_OTLP_PROTOCOL: ".to_owned(),
        ),
        (
            vec!["--otlp-traces-endpoint", "ftp://collector"],
            vec![],
            "--otlp-traces-endpoint: ".to_owned(),
        ),
        (
            vec![],
            vec![("OTEL_METRIC_EXPORT_INTERVAL", "often")],
            "OTEL_METRIC_EXPORT_INTERVAL: ".to_owned(),
        ),
        (
            vec![],
            vec![("OTEL_RESOURCE_ATTRIBUTES", "no-equals-sign")],
            "OTEL_RESOURCE_ATTRIBUTES: ".to_owned(),
        ),
        (
            vec![],
            vec![("OTEL_EXPORTER_OTLP_HEADERS", SECRET)],
            "OTEL_EXPORTER_OTLP_HEADERS: ".to_owned(),
        ),
    ];
    // Should a case be accepted, `run` must not find and attach to a real cgroup: plain
    // directories make it fail at attach time instead (and the exit code is then not 64).
    let (pod, own) = (dir.join("pod"), dir.join("own"));
    std::fs::create_dir_all(&pod).unwrap();
    std::fs::create_dir_all(&own).unwrap();
    let sink = dir.join("sink.jsonl");
    let mut podinfo = podinfo_args(&dir);
    podinfo.extend(
        [
            "--cgroup",
            path_str(&pod),
            "--proxy-cgroup",
            path_str(&own),
            "--admin-addr",
            "127.0.0.1:0",
            "--sink-file",
            path_str(&sink),
        ]
        .map(String::from),
    );
    for subcommand in ["config", "run"] {
        for (args, env, expect) in &cases {
            let mut argv = vec![subcommand];
            argv.extend(podinfo.iter().map(String::as_str));
            argv.extend(args.iter().copied());
            let out = sidecar(&argv, env);
            let stderr = out.stderr_str();
            assert_eq!(
                out.code(),
                Some(64),
                "{argv:?} {env:?}: stdout {} stderr {stderr}",
                out.stdout_str()
            );
            assert!(
                stderr.contains(expect.as_str()),
                "{argv:?} {env:?}: {stderr}"
            );
            assert!(
                stderr.starts_with(&format!("sidecar: error: {expect}")),
                "{argv:?} {env:?}: {stderr}"
            );
            assert!(!stderr.contains(SECRET), "{stderr}");
            assert!(out.stdout.is_empty(), "{argv:?}: {}", out.stdout_str());
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Starts `sidecar run` against plain directories (not cgroups): it configures logging, starts
/// telemetry and the proxy, logs, and fails when it tries to attach the programs.
fn run_until_attach_fails(dir: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> Finished {
    let pod = dir.join("pod");
    let own = dir.join("own");
    std::fs::create_dir_all(&pod).unwrap();
    std::fs::create_dir_all(&own).unwrap();
    let (outbound, inbound) = (free_port().to_string(), free_port().to_string());
    let sink = dir.join("sink.jsonl");
    let mut argv: Vec<&str> = vec![
        "run",
        "--cgroup",
        path_str(&pod),
        "--proxy-cgroup",
        path_str(&own),
        "--outbound-port",
        &outbound,
        "--inbound-port",
        &inbound,
        "--admin-addr",
        "127.0.0.1:0",
        "--sink-file",
        path_str(&sink),
        "--summary-interval",
        "0",
    ];
    let podinfo = podinfo_args(dir);
    argv.extend(podinfo.iter().map(String::as_str));
    argv.extend(extra);
    let out = sidecar(&argv, env);
    assert_ne!(out.code(), Some(0), "{}", out.stderr_str());
    assert_ne!(
        out.code(),
        Some(64),
        "the configuration is valid: {}",
        out.stderr_str()
    );
    out
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = TempDir::create("e2e-config-logs").unwrap();
    let file = write(
        &dir,
        "logs.toml",
        "log-format = \"json\"\nlog-level = \"info\"\n",
    );
    // From the config file, and from the flag.
    for (extra, env) in [
        (vec!["--config", file.as_str()], vec![]),
        (vec!["--log-format", "json"], vec![("RUST_LOG", "info")]),
    ] {
        let out = run_until_attach_fails(&dir, &extra, &env);
        let stderr = out.stderr_str();
        let mut objects = 0;
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            // The final human error line is printed outside the log subscriber.
            if line.starts_with("sidecar: error: ") {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{extra:?}: not a JSON log line ({e}): {line}"));
            assert!(v["level"].is_string(), "{line}");
            assert!(v["timestamp"].is_string(), "{line}");
            assert!(v["fields"]["message"].is_string(), "{line}");
            objects += 1;
        }
        assert!(objects >= 2, "{extra:?}: too few log lines: {stderr}");
        assert!(
            stderr.contains("\"level\":\"ERROR\""),
            "{extra:?}: the failure is logged too: {stderr}"
        );
    }

    // The default stays human-readable text.
    let out = run_until_attach_fails(&dir, &[], &[]);
    let stderr = out.stderr_str();
    assert!(stderr.contains(" INFO "), "{stderr}");
    assert!(
        !stderr.lines().any(|l| l.starts_with('{')),
        "text format by default: {stderr}"
    );

    // RUST_LOG=error hides the INFO lines; the flag overrides the variable.
    let quiet = run_until_attach_fails(&dir, &[], &[("RUST_LOG", "error")]);
    assert!(
        !quiet.stderr_str().contains(" INFO "),
        "{}",
        quiet.stderr_str()
    );
    let loud = run_until_attach_fails(&dir, &["--log-level", "info"], &[("RUST_LOG", "error")]);
    assert!(
        loud.stderr_str().contains(" INFO "),
        "{}",
        loud.stderr_str()
    );
}
