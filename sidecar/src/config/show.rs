//! `sidecar config`: the effective configuration with the source of every value, as text or
//! JSON. Header values (`*headers*` settings, resolved export headers) are never printed.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use super::load::Settings;
use super::RunConfig;
use crate::cli::ShowFormat;
use crate::export::config::{
    Compression, ExportSettings, OtlpProtocol, SignalSettings, TemporalityPreference,
};

/// What replaces a secret in every output.
pub const REDACTED: &str = "<redacted>";

/// The whole report in `format`, ending with a newline.
pub fn render(settings: &Settings, config: &RunConfig, format: ShowFormat) -> String {
    match format {
        ShowFormat::Text => text(settings, config),
        ShowFormat::Json => {
            let mut s = json_report(settings, config).to_string();
            s.push('\n');
            s
        }
    }
}

fn text(settings: &Settings, config: &RunConfig) -> String {
    let mut out = String::new();
    out.push_str("# settings (precedence: flag > environment variable > config file > default)\n");
    for s in &settings.settings {
        let _ = writeln!(out, "{} = {}  ({})", s.key, s.display_value(), s.source);
    }
    out.push_str("\n# export (resolved)\n");
    for (key, value) in export_lines(&config.export) {
        let _ = writeln!(out, "{key} = {value}");
    }
    out.push_str("\n# resource attributes\n");
    for a in &config.resource {
        let _ = writeln!(out, "{} = {}  ({})", a.key, a.value, a.source);
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn protocol(p: OtlpProtocol) -> &'static str {
    match p {
        OtlpProtocol::Grpc => "grpc",
        OtlpProtocol::HttpProtobuf => "http/protobuf",
    }
}

fn compression(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
    }
}

fn temporality(t: TemporalityPreference) -> &'static str {
    match t {
        TemporalityPreference::Cumulative => "cumulative",
        TemporalityPreference::Delta => "delta",
        TemporalityPreference::LowMemory => "lowmemory",
    }
}

/// Header names with redacted values: `name=<redacted>, ...`.
fn headers(h: &[(String, String)]) -> String {
    if h.is_empty() {
        return "<none>".to_owned();
    }
    h.iter()
        .map(|(name, _)| format!("{name}={REDACTED}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn path_or(p: Option<&std::path::Path>, none: &str) -> String {
    p.map_or_else(|| none.to_owned(), |p| p.display().to_string())
}

fn signal_lines(name: &str, s: Option<&SignalSettings>, out: &mut Vec<(String, String)>) {
    let Some(s) = s else {
        out.push((
            format!("{name}.endpoint"),
            "<none: local sink file>".to_owned(),
        ));
        return;
    };
    out.push((format!("{name}.endpoint"), s.endpoint.clone()));
    out.push((format!("{name}.protocol"), protocol(s.protocol).to_owned()));
    out.push((
        format!("{name}.compression"),
        compression(s.compression).to_owned(),
    ));
    out.push((format!("{name}.timeout"), ms(s.timeout)));
    out.push((format!("{name}.headers"), headers(&s.headers)));
    match &s.tls {
        None => out.push((format!("{name}.tls"), "off".to_owned())),
        Some(tls) => {
            out.push((format!("{name}.tls"), "on".to_owned()));
            out.push((
                format!("{name}.certificate"),
                path_or(tls.certificate.as_deref(), "<system roots>"),
            ));
            out.push((
                format!("{name}.client-certificate"),
                path_or(tls.client_certificate.as_deref(), "<none>"),
            ));
            out.push((
                format!("{name}.client-key"),
                path_or(tls.client_key.as_deref(), "<none>"),
            ));
        }
    }
}

fn export_lines(e: &ExportSettings) -> Vec<(String, String)> {
    let mut out = vec![("sdk-disabled".to_owned(), e.disabled.to_string())];
    signal_lines("traces", e.traces.as_ref(), &mut out);
    signal_lines("metrics", e.metrics.as_ref(), &mut out);
    out.push((
        "metrics.temporality".to_owned(),
        temporality(e.temporality).to_owned(),
    ));
    out.push((
        "metric-export-interval".to_owned(),
        ms(e.metric_export_interval),
    ));
    out.push((
        "metric-export-timeout".to_owned(),
        ms(e.metric_export_timeout),
    ));
    out.push(("bsp-schedule-delay".to_owned(), ms(e.batch.schedule_delay)));
    out.push(("bsp-export-timeout".to_owned(), ms(e.batch.export_timeout)));
    out.push((
        "bsp-max-queue-size".to_owned(),
        e.batch.max_queue_size.to_string(),
    ));
    out.push((
        "bsp-max-export-batch-size".to_owned(),
        e.batch.max_export_batch_size.to_string(),
    ));
    out
}

fn signal_json(s: Option<&SignalSettings>) -> Value {
    let Some(s) = s else { return Value::Null };
    let tls = s.tls.as_ref().map(|t| {
        json!({
            "certificate": t.certificate.as_ref().map(|p| p.display().to_string()),
            "client_certificate": t.client_certificate.as_ref().map(|p| p.display().to_string()),
            "client_key": t.client_key.as_ref().map(|p| p.display().to_string()),
        })
    });
    json!({
        "endpoint": s.endpoint,
        "protocol": protocol(s.protocol),
        "compression": compression(s.compression),
        "timeout_ms": u64::try_from(s.timeout.as_millis()).unwrap_or(u64::MAX),
        "headers": s.headers.iter().map(|(name, _)| json!({"name": name, "value": REDACTED}))
            .collect::<Vec<_>>(),
        "tls": tls,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The report as one JSON document: `settings` (key, value, source), `export`, `resource`.
pub fn json_report(settings: &Settings, config: &RunConfig) -> Value {
    let e = &config.export;
    json!({
        "settings": settings.settings.iter().map(|s| json!({
            "key": s.key,
            "value": s.value.as_ref().map(|v| if s.secret { REDACTED } else { v.as_str() }),
            "source": s.source.to_string(),
            "env": s.env,
        })).collect::<Vec<_>>(),
        "export": {
            "disabled": e.disabled,
            "traces": signal_json(e.traces.as_ref()),
            "metrics": signal_json(e.metrics.as_ref()),
            "temporality": temporality(e.temporality),
            "metric_export_interval_ms": millis(e.metric_export_interval),
            "metric_export_timeout_ms": millis(e.metric_export_timeout),
            "batch": {
                "schedule_delay_ms": millis(e.batch.schedule_delay),
                "export_timeout_ms": millis(e.batch.export_timeout),
                "max_queue_size": e.batch.max_queue_size,
                "max_export_batch_size": e.batch.max_export_batch_size,
            },
        },
        "resource": config.resource.iter().map(|a| json!({
            "key": a.key,
            "value": a.value,
            "source": a.source,
        })).collect::<Vec<_>>(),
    })
}
