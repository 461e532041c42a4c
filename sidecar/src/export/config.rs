//! OTLP exporter settings, resolved from the `OTEL_EXPORTER_OTLP_*`, `OTEL_METRIC_*`, `OTEL_BSP_*`
//! and `OTEL_SDK_DISABLED` values as the OpenTelemetry specification defines them.
//!
//! CONTRACT (shared by the CLI, the exporters and the pipeline): the CLI fills [`ExportOptions`]
//! with the raw strings from flags, environment or the config file; [`ExportOptions::resolve`]
//! validates them and applies the specification's rules (per-signal values override generic
//! ones; http/protobuf appends `/v1/traces` / `/v1/metrics` to the generic endpoint only).

use std::path::PathBuf;
use std::time::Duration;

use crate::config::ConfigError;

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`grpc`, the default).
    Grpc,
    /// OTLP/HTTP with binary protobuf bodies (`http/protobuf`).
    HttpProtobuf,
}

/// Request body compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `none` (the default).
    None,
    /// `gzip`.
    Gzip,
}

/// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemporalityPreference {
    /// Every instrument cumulative (the default).
    Cumulative,
    /// Counters, histograms delta; up-down counters cumulative.
    Delta,
    /// Synchronous counters and histograms delta; the rest cumulative.
    LowMemory,
}

/// Raw values of one variable family: the generic `OTEL_EXPORTER_OTLP_*` ones, or the
/// per-signal `OTEL_EXPORTER_OTLP_TRACES_*` / `..._METRICS_*` ones. `None` = not set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OtlpRawOptions {
    /// `..._ENDPOINT`.
    pub endpoint: Option<String>,
    /// `..._PROTOCOL`: `grpc` or `http/protobuf`.
    pub protocol: Option<String>,
    /// `..._HEADERS`: `key=value` pairs, comma-separated, values percent-encoded.
    pub headers: Option<String>,
    /// `..._TIMEOUT`: milliseconds.
    pub timeout: Option<String>,
    /// `..._COMPRESSION`: `gzip` or `none`.
    pub compression: Option<String>,
    /// `..._CERTIFICATE`: PEM file of the CA(s) that verify the collector.
    pub certificate: Option<PathBuf>,
    /// `..._CLIENT_KEY`: PEM private key for mTLS.
    pub client_key: Option<PathBuf>,
    /// `..._CLIENT_CERTIFICATE`: PEM certificate chain for mTLS.
    pub client_certificate: Option<PathBuf>,
    /// `..._INSECURE`: `true`/`false`; only for gRPC endpoints without a scheme.
    pub insecure: Option<String>,
}

/// Every export-related raw value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// `OTEL_EXPORTER_OTLP_*`.
    pub generic: OtlpRawOptions,
    /// `OTEL_EXPORTER_OTLP_TRACES_*`.
    pub traces: OtlpRawOptions,
    /// `OTEL_EXPORTER_OTLP_METRICS_*`.
    pub metrics: OtlpRawOptions,
    /// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`.
    pub metrics_temporality: Option<String>,
    /// `OTEL_SDK_DISABLED`.
    pub sdk_disabled: Option<String>,
    /// `OTEL_METRIC_EXPORT_INTERVAL` (ms).
    pub metric_export_interval: Option<String>,
    /// `OTEL_METRIC_EXPORT_TIMEOUT` (ms).
    pub metric_export_timeout: Option<String>,
    /// `OTEL_BSP_SCHEDULE_DELAY` (ms).
    pub bsp_schedule_delay: Option<String>,
    /// `OTEL_BSP_EXPORT_TIMEOUT` (ms).
    pub bsp_export_timeout: Option<String>,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`.
    pub bsp_max_queue_size: Option<String>,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
    pub bsp_max_export_batch_size: Option<String>,
}

/// TLS to the collector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA bundle; `None` = the system roots.
    pub certificate: Option<PathBuf>,
    /// Client certificate chain (mTLS); set together with `client_key`.
    pub client_certificate: Option<PathBuf>,
    /// Client private key (mTLS).
    pub client_key: Option<PathBuf>,
}

/// Resolved settings of one signal's exporter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalSettings {
    /// Full URL: for gRPC scheme://host:port; for http/protobuf the URL POSTed to
    /// (`.../v1/traces` when derived from the generic endpoint).
    pub endpoint: String,
    /// Transport.
    pub protocol: OtlpProtocol,
    /// Extra request headers / gRPC metadata, decoded.
    pub headers: Vec<(String, String)>,
    /// Per-export timeout (default 10 s).
    pub timeout: Duration,
    /// Body compression.
    pub compression: Compression,
    /// `Some` when the endpoint uses TLS (`https://`, or a scheme-less gRPC endpoint with
    /// insecure=false).
    pub tls: Option<TlsSettings>,
}

/// Batch span processor settings (`OTEL_BSP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSettings {
    /// Spans held at most; further spans are dropped and counted (default 2048).
    pub max_queue_size: usize,
    /// Delay between two exports (default 5 s).
    pub schedule_delay: Duration,
    /// Bound of one export including its retries (default 30 s).
    pub export_timeout: Duration,
    /// Spans per export request at most (default 512).
    pub max_export_batch_size: usize,
}

/// Everything the telemetry pipeline needs to know about export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSettings {
    /// `OTEL_SDK_DISABLED=true`: no spans and no OTLP/sink export at all (the proxy still
    /// forwards; the admin server's `/metrics` still works).
    pub disabled: bool,
    /// `None`: no endpoint for traces; spans go to the local sink file.
    pub traces: Option<SignalSettings>,
    /// `None`: no endpoint for metrics; metrics go to the local sink file.
    pub metrics: Option<SignalSettings>,
    /// Metric temporality of the OTLP/sink exporter (Prometheus is always cumulative).
    pub temporality: TemporalityPreference,
    /// Period of the metric reader (default 60 s).
    pub metric_export_interval: Duration,
    /// Bound of one metric export (default 30 s).
    pub metric_export_timeout: Duration,
    /// Span batching.
    pub batch: BatchSettings,
}

/// Default `OTEL_EXPORTER_OTLP_TIMEOUT`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// Default `OTEL_METRIC_EXPORT_INTERVAL`.
pub const DEFAULT_METRIC_EXPORT_INTERVAL: Duration = Duration::from_millis(60_000);
/// Default `OTEL_METRIC_EXPORT_TIMEOUT`.
pub const DEFAULT_METRIC_EXPORT_TIMEOUT: Duration = Duration::from_millis(30_000);
/// Default `OTEL_BSP_SCHEDULE_DELAY`.
pub const DEFAULT_BSP_SCHEDULE_DELAY: Duration = Duration::from_millis(5_000);
/// Default `OTEL_BSP_EXPORT_TIMEOUT`.
pub const DEFAULT_BSP_EXPORT_TIMEOUT: Duration = Duration::from_millis(30_000);
/// Default `OTEL_BSP_MAX_QUEUE_SIZE`.
pub const DEFAULT_BSP_MAX_QUEUE_SIZE: usize = 2048;
/// Default `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
pub const DEFAULT_BSP_MAX_EXPORT_BATCH_SIZE: usize = 512;

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_queue_size: DEFAULT_BSP_MAX_QUEUE_SIZE,
            schedule_delay: DEFAULT_BSP_SCHEDULE_DELAY,
            export_timeout: DEFAULT_BSP_EXPORT_TIMEOUT,
            max_export_batch_size: DEFAULT_BSP_MAX_EXPORT_BATCH_SIZE,
        }
    }
}

/// The two exported signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    /// Path appended to a generic http/protobuf endpoint.
    fn http_path(self) -> &'static str {
        match self {
            Self::Traces => "v1/traces",
            Self::Metrics => "v1/metrics",
        }
    }
}

/// One raw value with the name of the variable that supplied it.
#[derive(Debug)]
struct Raw<'a, T: ?Sized> {
    value: &'a T,
    var: &'static str,
}

impl<T: ?Sized> Clone for Raw<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ?Sized> Copy for Raw<'_, T> {}

/// Variable names of one family (`OTEL_EXPORTER_OTLP_` or `OTEL_EXPORTER_OTLP_TRACES_`, ...).
struct VarNames {
    endpoint: &'static str,
    protocol: &'static str,
    headers: &'static str,
    timeout: &'static str,
    compression: &'static str,
    certificate: &'static str,
    client_key: &'static str,
    client_certificate: &'static str,
    insecure: &'static str,
}

const GENERIC_VARS: VarNames = VarNames {
    endpoint: "OTEL_EXPORTER_OTLP_ENDPOINT",
    protocol: "OTEL_EXPORTER_OTLP_PROTOCOL",
    headers: "OTEL_EXPORTER_OTLP_HEADERS",
    timeout: "OTEL_EXPORTER_OTLP_TIMEOUT",
    compression: "OTEL_EXPORTER_OTLP_COMPRESSION",
    certificate: "OTEL_EXPORTER_OTLP_CERTIFICATE",
    client_key: "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    client_certificate: "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    insecure: "OTEL_EXPORTER_OTLP_INSECURE",
};

const TRACES_VARS: VarNames = VarNames {
    endpoint: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    protocol: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    headers: "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    timeout: "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    compression: "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    certificate: "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    client_key: "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    client_certificate: "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    insecure: "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
};

const METRICS_VARS: VarNames = VarNames {
    endpoint: "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    protocol: "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    headers: "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    timeout: "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
    compression: "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION",
    certificate: "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
    client_key: "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY",
    client_certificate: "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE",
    insecure: "OTEL_EXPORTER_OTLP_METRICS_INSECURE",
};

/// A set, non-empty string (the specification treats an empty variable as unset).
fn text(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A set, non-empty path.
fn path(v: &Option<PathBuf>) -> Option<&PathBuf> {
    v.as_ref().filter(|p| !p.as_os_str().is_empty())
}

/// The per-signal value if set, else the generic one.
fn pick<'a>(
    signal: Option<&'a str>,
    signal_var: &'static str,
    generic: Option<&'a str>,
    generic_var: &'static str,
) -> Option<Raw<'a, str>> {
    match (signal, generic) {
        (Some(value), _) => Some(Raw {
            value,
            var: signal_var,
        }),
        (None, Some(value)) => Some(Raw {
            value,
            var: generic_var,
        }),
        (None, None) => None,
    }
}

fn pick_path<'a>(
    signal: Option<&'a PathBuf>,
    signal_var: &'static str,
    generic: Option<&'a PathBuf>,
    generic_var: &'static str,
) -> Option<Raw<'a, PathBuf>> {
    match (signal, generic) {
        (Some(value), _) => Some(Raw {
            value,
            var: signal_var,
        }),
        (None, Some(value)) => Some(Raw {
            value,
            var: generic_var,
        }),
        (None, None) => None,
    }
}

fn parse_bool(raw: Raw<'_, str>) -> Result<bool, ConfigError> {
    if raw.value.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if raw.value.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(ConfigError::new(
            raw.var,
            format!("`{}` is not a boolean; use true or false", raw.value),
        ))
    }
}

/// Milliseconds; `allow_zero` decides whether 0 is accepted.
fn parse_millis(raw: Raw<'_, str>, allow_zero: bool) -> Result<Duration, ConfigError> {
    let accepted = if allow_zero {
        "a whole number of milliseconds (0 or more)"
    } else {
        "a whole number of milliseconds greater than 0"
    };
    match raw.value.parse::<u64>() {
        Ok(0) if !allow_zero => Err(ConfigError::new(
            raw.var,
            format!("`0` is not allowed; use {accepted}"),
        )),
        Ok(ms) => Ok(Duration::from_millis(ms)),
        Err(_) => Err(ConfigError::new(
            raw.var,
            format!("`{}` is not {accepted}", raw.value),
        )),
    }
}

fn parse_count(raw: Raw<'_, str>) -> Result<usize, ConfigError> {
    match raw.value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ConfigError::new(
            raw.var,
            format!("`{}` is not a whole number greater than 0", raw.value),
        )),
    }
}

fn parse_protocol(raw: Raw<'_, str>) -> Result<OtlpProtocol, ConfigError> {
    if raw.value.eq_ignore_ascii_case("grpc") {
        Ok(OtlpProtocol::Grpc)
    } else if raw.value.eq_ignore_ascii_case("http/protobuf") {
        Ok(OtlpProtocol::HttpProtobuf)
    } else if raw.value.eq_ignore_ascii_case("http/json") {
        Err(ConfigError::new(
            raw.var,
            "`http/json` is not supported; use grpc or http/protobuf",
        ))
    } else {
        Err(ConfigError::new(
            raw.var,
            format!("`{}` is not one of grpc, http/protobuf", raw.value),
        ))
    }
}

fn parse_compression(raw: Raw<'_, str>) -> Result<Compression, ConfigError> {
    if raw.value.eq_ignore_ascii_case("gzip") {
        Ok(Compression::Gzip)
    } else if raw.value.eq_ignore_ascii_case("none") {
        Ok(Compression::None)
    } else {
        Err(ConfigError::new(
            raw.var,
            format!("`{}` is not one of gzip, none", raw.value),
        ))
    }
}

fn parse_temporality(raw: Raw<'_, str>) -> Result<TemporalityPreference, ConfigError> {
    if raw.value.eq_ignore_ascii_case("cumulative") {
        Ok(TemporalityPreference::Cumulative)
    } else if raw.value.eq_ignore_ascii_case("delta") {
        Ok(TemporalityPreference::Delta)
    } else if raw.value.eq_ignore_ascii_case("lowmemory") {
        Ok(TemporalityPreference::LowMemory)
    } else {
        Err(ConfigError::new(
            raw.var,
            format!("`{}` is not one of cumulative, delta, lowmemory", raw.value),
        ))
    }
}

/// Decodes `%XX` escapes (W3C baggage style); the result must be UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `k=v,k2=v2` → decoded pairs; names lowercased and checked as HTTP header names and gRPC
/// ASCII metadata keys, values checked as header values.
fn parse_headers(raw: Raw<'_, str>) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for entry in raw.value.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let Some((key, value)) = entry.split_once('=') else {
            return Err(ConfigError::new(
                raw.var,
                format!("`{entry}` is not a key=value pair; use key1=value1,key2=value2"),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        let bad_escape = |what: &str| {
            ConfigError::new(
                raw.var,
                format!(
                    "{what} `{entry}` has an invalid percent-encoding (use %XX of UTF-8 bytes)"
                ),
            )
        };
        let key = percent_decode(key)
            .ok_or_else(|| bad_escape("the key of"))?
            .to_ascii_lowercase();
        let value = percent_decode(value).ok_or_else(|| bad_escape("the value of"))?;
        if key.is_empty() {
            return Err(ConfigError::new(
                raw.var,
                format!("`{entry}` has an empty key; use key1=value1,key2=value2"),
            ));
        }
        if http::HeaderName::from_bytes(key.as_bytes()).is_err() {
            return Err(ConfigError::new(
                raw.var,
                format!(
                    "`{key}` is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
                ),
            ));
        }
        if key.ends_with("-bin") || key.starts_with("grpc-") {
            return Err(ConfigError::new(
                raw.var,
                format!(
                    "`{key}` cannot be sent: names ending in -bin or starting with grpc- are \
                     reserved by gRPC"
                ),
            ));
        }
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(ConfigError::new(
                raw.var,
                format!("the value of `{key}` is not a valid header value (no control characters)"),
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Whether `uri` is http(s) with a host.
fn check_url(raw: Raw<'_, str>, uri: &http::Uri, grpc: bool) -> Result<(), ConfigError> {
    let accepted = if grpc {
        "an http:// or https:// URL with a host, or host:port"
    } else {
        "an http:// or https:// URL with a host"
    };
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(ConfigError::new(
                raw.var,
                format!("`{}` is not {accepted}", raw.value),
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::new(
            raw.var,
            format!("`{}` has no host; use {accepted}", raw.value),
        ));
    }
    Ok(())
}

/// The endpoint URL and whether it uses TLS.
fn resolve_endpoint(
    signal: Signal,
    raw: Raw<'_, str>,
    per_signal: bool,
    protocol: OtlpProtocol,
    insecure: Option<bool>,
) -> Result<(String, bool), ConfigError> {
    let grpc = protocol == OtlpProtocol::Grpc;
    if !raw.value.contains("://") {
        if !grpc {
            return Err(ConfigError::new(
                raw.var,
                format!(
                    "`{}` has no scheme; http/protobuf needs an http:// or https:// URL",
                    raw.value
                ),
            ));
        }
        // gRPC allows `host:port`: TLS unless INSECURE=true.
        let tls = !insecure.unwrap_or(false);
        let url = format!("{}://{}", if tls { "https" } else { "http" }, raw.value);
        let uri: http::Uri = url.parse().map_err(|_| {
            ConfigError::new(
                raw.var,
                format!(
                    "`{}` is not an http:// or https:// URL with a host, or host:port",
                    raw.value
                ),
            )
        })?;
        check_url(raw, &uri, true)?;
        if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
            return Err(ConfigError::new(
                raw.var,
                format!(
                    "`{}` is not host:port; a path needs a scheme (http:// or https://)",
                    raw.value
                ),
            ));
        }
        return Ok((url, tls));
    }
    let uri: http::Uri = raw.value.parse().map_err(|e| {
        ConfigError::new(
            raw.var,
            format!(
                "`{}` is not a valid URL ({e}); use an http:// or https:// URL with a host",
                raw.value
            ),
        )
    })?;
    check_url(raw, &uri, grpc)?;
    let tls = uri.scheme_str() == Some("https");
    if grpc || per_signal {
        return Ok((raw.value.to_owned(), tls));
    }
    // http/protobuf, generic endpoint: append the signal path, keeping the base path.
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri.authority().map_or("", |a| a.as_str());
    let base = uri.path().trim_end_matches('/');
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok((
        format!("{scheme}://{authority}{base}/{}{query}", signal.http_path()),
        tls,
    ))
}

/// The file must exist and be readable now (the exporter reads it when it is built).
fn check_file(raw: Raw<'_, PathBuf>) -> Result<PathBuf, ConfigError> {
    std::fs::File::open(raw.value).map_err(|e| {
        ConfigError::new(
            raw.var,
            format!("cannot read `{}`: {e}", raw.value.display()),
        )
    })?;
    Ok(raw.value.clone())
}

fn resolve_signal(
    signal: Signal,
    generic: &OtlpRawOptions,
    specific: &OtlpRawOptions,
) -> Result<Option<SignalSettings>, ConfigError> {
    let (g, s) = (
        &GENERIC_VARS,
        match signal {
            Signal::Traces => &TRACES_VARS,
            Signal::Metrics => &METRICS_VARS,
        },
    );
    let protocol = pick(
        text(&specific.protocol),
        s.protocol,
        text(&generic.protocol),
        g.protocol,
    )
    .map(parse_protocol)
    .transpose()?
    .unwrap_or(OtlpProtocol::Grpc);
    let headers = pick(
        text(&specific.headers),
        s.headers,
        text(&generic.headers),
        g.headers,
    )
    .map(parse_headers)
    .transpose()?
    .unwrap_or_default();
    let timeout = pick(
        text(&specific.timeout),
        s.timeout,
        text(&generic.timeout),
        g.timeout,
    )
    .map(|r| parse_millis(r, false))
    .transpose()?
    .unwrap_or(DEFAULT_TIMEOUT);
    let compression = pick(
        text(&specific.compression),
        s.compression,
        text(&generic.compression),
        g.compression,
    )
    .map(parse_compression)
    .transpose()?
    .unwrap_or(Compression::None);
    let insecure = pick(
        text(&specific.insecure),
        s.insecure,
        text(&generic.insecure),
        g.insecure,
    )
    .map(parse_bool)
    .transpose()?;
    let endpoint = match (text(&specific.endpoint), text(&generic.endpoint)) {
        (Some(value), _) => Some((
            Raw {
                value,
                var: s.endpoint,
            },
            true,
        )),
        (None, Some(value)) => Some((
            Raw {
                value,
                var: g.endpoint,
            },
            false,
        )),
        (None, None) => None,
    };
    let Some((endpoint_raw, per_signal)) = endpoint else {
        return Ok(None);
    };
    let (endpoint, tls) = resolve_endpoint(signal, endpoint_raw, per_signal, protocol, insecure)?;

    let certificate = pick_path(
        path(&specific.certificate),
        s.certificate,
        path(&generic.certificate),
        g.certificate,
    );
    let client_certificate = pick_path(
        path(&specific.client_certificate),
        s.client_certificate,
        path(&generic.client_certificate),
        g.client_certificate,
    );
    let client_key = pick_path(
        path(&specific.client_key),
        s.client_key,
        path(&generic.client_key),
        g.client_key,
    );
    let certificate = certificate.map(check_file).transpose()?;
    let (client_certificate, client_key) = match (client_certificate, client_key) {
        (Some(c), Some(k)) => (Some(check_file(c)?), Some(check_file(k)?)),
        (Some(c), None) => {
            return Err(ConfigError::new(
                c.var,
                format!(
                    "a client certificate needs its private key, but neither {} nor {} is set",
                    s.client_key, g.client_key
                ),
            ))
        }
        (None, Some(k)) => {
            return Err(ConfigError::new(
                k.var,
                format!(
                    "a client key needs its certificate, but neither {} nor {} is set",
                    s.client_certificate, g.client_certificate
                ),
            ))
        }
        (None, None) => (None, None),
    };
    Ok(Some(SignalSettings {
        endpoint,
        protocol,
        headers,
        timeout,
        compression,
        tls: tls.then_some(TlsSettings {
            certificate,
            client_certificate,
            client_key,
        }),
    }))
}

impl ExportOptions {
    /// Validates and resolves the raw values. The error names the variable at fault.
    ///
    /// Rules (OpenTelemetry "OTLP Exporter Configuration"): an empty value counts as unset;
    /// a per-signal value wins over the generic one, field by field; defaults are grpc, 10 s,
    /// no compression. A signal with no endpoint at all resolves to `None` (the local sink).
    /// For http/protobuf the generic endpoint gets `/v1/traces` or `/v1/metrics` appended to its
    /// path; a per-signal endpoint is used as given. A gRPC endpoint may be `host:port`, which
    /// means TLS unless `..._INSECURE=true`. Certificate and key files must be readable now,
    /// and a client certificate and key come as a pair.
    pub fn resolve(&self) -> Result<ExportSettings, ConfigError> {
        let disabled = text(&self.sdk_disabled)
            .map(|value| {
                parse_bool(Raw {
                    value,
                    var: "OTEL_SDK_DISABLED",
                })
            })
            .transpose()?
            .unwrap_or(false);
        let traces = resolve_signal(Signal::Traces, &self.generic, &self.traces)?;
        let metrics = resolve_signal(Signal::Metrics, &self.generic, &self.metrics)?;
        let temporality = text(&self.metrics_temporality)
            .map(|value| {
                parse_temporality(Raw {
                    value,
                    var: "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                })
            })
            .transpose()?
            .unwrap_or(TemporalityPreference::Cumulative);
        let millis = |v: &Option<String>, var: &'static str, zero: bool, default: Duration| {
            text(v)
                .map(|value| parse_millis(Raw { value, var }, zero))
                .transpose()
                .map(|d| d.unwrap_or(default))
        };
        let count = |v: &Option<String>, var: &'static str, default: usize| {
            text(v)
                .map(|value| parse_count(Raw { value, var }))
                .transpose()
                .map(|n| n.unwrap_or(default))
        };
        let metric_export_interval = millis(
            &self.metric_export_interval,
            "OTEL_METRIC_EXPORT_INTERVAL",
            false,
            DEFAULT_METRIC_EXPORT_INTERVAL,
        )?;
        let metric_export_timeout = millis(
            &self.metric_export_timeout,
            "OTEL_METRIC_EXPORT_TIMEOUT",
            false,
            DEFAULT_METRIC_EXPORT_TIMEOUT,
        )?;
        let mut batch = BatchSettings {
            schedule_delay: millis(
                &self.bsp_schedule_delay,
                "OTEL_BSP_SCHEDULE_DELAY",
                true,
                DEFAULT_BSP_SCHEDULE_DELAY,
            )?,
            export_timeout: millis(
                &self.bsp_export_timeout,
                "OTEL_BSP_EXPORT_TIMEOUT",
                false,
                DEFAULT_BSP_EXPORT_TIMEOUT,
            )?,
            max_queue_size: count(
                &self.bsp_max_queue_size,
                "OTEL_BSP_MAX_QUEUE_SIZE",
                DEFAULT_BSP_MAX_QUEUE_SIZE,
            )?,
            max_export_batch_size: count(
                &self.bsp_max_export_batch_size,
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                DEFAULT_BSP_MAX_EXPORT_BATCH_SIZE,
            )?,
        };
        let batch_size_given = self
            .bsp_max_export_batch_size
            .as_deref()
            .is_some_and(|v| !v.trim().is_empty());
        if !batch_size_given {
            // The default batch size follows a smaller queue; only an explicit one is an error.
            batch.max_export_batch_size = batch.max_export_batch_size.min(batch.max_queue_size);
        }
        if batch.max_export_batch_size > batch.max_queue_size {
            return Err(ConfigError::new(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                format!(
                    "`{}` is larger than the queue ({}, OTEL_BSP_MAX_QUEUE_SIZE); use at most the \
                     queue size",
                    batch.max_export_batch_size, batch.max_queue_size
                ),
            ));
        }
        Ok(ExportSettings {
            disabled,
            traces,
            metrics,
            temporality,
            metric_export_interval,
            metric_export_timeout,
            batch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    fn generic(endpoint: &str) -> ExportOptions {
        ExportOptions {
            generic: OtlpRawOptions {
                endpoint: s(endpoint),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn traces(o: &ExportOptions) -> SignalSettings {
        o.resolve().unwrap().traces.unwrap()
    }

    fn err(o: &ExportOptions) -> ConfigError {
        o.resolve().unwrap_err()
    }

    /// A temp file that exists, removed on drop.
    struct TempFile(PathBuf);
    impl TempFile {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "sidecar-export-config-{}-{name}",
                std::process::id()
            ));
            std::fs::write(&p, "-----BEGIN CERTIFICATE-----\n").unwrap();
            Self(p)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn defaults_without_any_value() {
        let r = ExportOptions::default().resolve().unwrap();
        assert_eq!(
            r,
            ExportSettings {
                disabled: false,
                traces: None,
                metrics: None,
                temporality: TemporalityPreference::Cumulative,
                metric_export_interval: Duration::from_secs(60),
                metric_export_timeout: Duration::from_secs(30),
                batch: BatchSettings {
                    max_queue_size: 2048,
                    schedule_delay: Duration::from_secs(5),
                    export_timeout: Duration::from_secs(30),
                    max_export_batch_size: 512,
                },
            }
        );
    }

    #[test]
    fn generic_endpoint_grpc_defaults() {
        let r = generic("http://collector:4317").resolve().unwrap();
        let want = SignalSettings {
            endpoint: "http://collector:4317".into(),
            protocol: OtlpProtocol::Grpc,
            headers: vec![],
            timeout: Duration::from_secs(10),
            compression: Compression::None,
            tls: None,
        };
        assert_eq!(r.traces.as_ref(), Some(&want));
        assert_eq!(r.metrics.as_ref(), Some(&want));
    }

    #[test]
    fn endpoints_table() {
        /// (protocol, generic endpoint, traces endpoint, insecure, resolved endpoint, tls)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            bool,
        );
        let cases: &[Case] = &[
            (
                "grpc",
                Some("http://c:4317"),
                None,
                None,
                "http://c:4317",
                false,
            ),
            (
                "grpc",
                Some("https://c:4317"),
                None,
                None,
                "https://c:4317",
                true,
            ),
            (
                "grpc",
                Some("http://c:4317/x"),
                None,
                None,
                "http://c:4317/x",
                false,
            ),
            ("grpc", Some("c:4317"), None, None, "https://c:4317", true),
            (
                "grpc",
                Some("c:4317"),
                None,
                Some("true"),
                "http://c:4317",
                false,
            ),
            (
                "grpc",
                Some("c:4317"),
                None,
                Some("FALSE"),
                "https://c:4317",
                true,
            ),
            (
                "grpc",
                Some("[::1]:4317"),
                None,
                Some("true"),
                "http://[::1]:4317",
                false,
            ),
            // INSECURE does not change an explicit scheme.
            (
                "grpc",
                Some("https://c:4317"),
                None,
                Some("true"),
                "https://c:4317",
                true,
            ),
            (
                "grpc",
                Some("http://g:1"),
                Some("http://t:2"),
                None,
                "http://t:2",
                false,
            ),
            (
                "http/protobuf",
                Some("http://c:4318"),
                None,
                None,
                "http://c:4318/v1/traces",
                false,
            ),
            (
                "http/protobuf",
                Some("http://c:4318/"),
                None,
                None,
                "http://c:4318/v1/traces",
                false,
            ),
            (
                "http/protobuf",
                Some("http://c:4318/otlp"),
                None,
                None,
                "http://c:4318/otlp/v1/traces",
                false,
            ),
            (
                "http/protobuf",
                Some("http://c:4318/otlp/"),
                None,
                None,
                "http://c:4318/otlp/v1/traces",
                false,
            ),
            (
                "http/protobuf",
                Some("https://c"),
                None,
                None,
                "https://c/v1/traces",
                true,
            ),
            // A per-signal endpoint is used as is.
            (
                "http/protobuf",
                Some("http://g:4318"),
                Some("http://t:4318/custom"),
                None,
                "http://t:4318/custom",
                false,
            ),
            (
                "http/protobuf",
                None,
                Some("https://t:4318"),
                None,
                "https://t:4318",
                true,
            ),
        ];
        for &(protocol, g, t, insecure, want, tls) in cases {
            let o = ExportOptions {
                generic: OtlpRawOptions {
                    endpoint: g.map(str::to_owned),
                    protocol: s(protocol),
                    insecure: insecure.map(str::to_owned),
                    ..Default::default()
                },
                traces: OtlpRawOptions {
                    endpoint: t.map(str::to_owned),
                    ..Default::default()
                },
                ..Default::default()
            };
            let r = traces(&o);
            assert_eq!(r.endpoint, want, "{protocol} {g:?} {t:?}");
            assert_eq!(r.tls.is_some(), tls, "{protocol} {g:?} {t:?}");
        }
    }

    #[test]
    fn metrics_path_and_signal_without_endpoint() {
        let o = ExportOptions {
            generic: OtlpRawOptions {
                protocol: s("http/protobuf"),
                ..Default::default()
            },
            metrics: OtlpRawOptions {
                endpoint: s("http://m:4318"),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = o.resolve().unwrap();
        assert_eq!(r.traces, None, "no endpoint for traces: the sink");
        assert_eq!(r.metrics.unwrap().endpoint, "http://m:4318");
        let r = ExportOptions {
            generic: OtlpRawOptions {
                endpoint: s("http://c:4318/base"),
                protocol: s("http/protobuf"),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(r.metrics.unwrap().endpoint, "http://c:4318/base/v1/metrics");
    }

    #[test]
    fn per_signal_wins_field_by_field() {
        let o = ExportOptions {
            generic: OtlpRawOptions {
                endpoint: s("http://g:4317"),
                protocol: s("grpc"),
                headers: s("a=1"),
                timeout: s("100"),
                compression: s("none"),
                ..Default::default()
            },
            traces: OtlpRawOptions {
                protocol: s("http/protobuf"),
                headers: s("b=2"),
                timeout: s("200"),
                compression: s("gzip"),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = o.resolve().unwrap();
        let t = r.traces.unwrap();
        assert_eq!(t.endpoint, "http://g:4317/v1/traces");
        assert_eq!(t.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(t.headers, [("b".to_owned(), "2".to_owned())]);
        assert_eq!(t.timeout, Duration::from_millis(200));
        assert_eq!(t.compression, Compression::Gzip);
        let m = r.metrics.unwrap();
        assert_eq!(m.endpoint, "http://g:4317");
        assert_eq!(m.protocol, OtlpProtocol::Grpc);
        assert_eq!(m.headers, [("a".to_owned(), "1".to_owned())]);
        assert_eq!(m.timeout, Duration::from_millis(100));
        assert_eq!(m.compression, Compression::None);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let o = ExportOptions {
            generic: OtlpRawOptions {
                endpoint: s("http://g:4317"),
                ..Default::default()
            },
            traces: OtlpRawOptions {
                endpoint: s(""),
                protocol: s(" "),
                timeout: s(""),
                certificate: Some(PathBuf::new()),
                ..Default::default()
            },
            sdk_disabled: s(""),
            ..Default::default()
        };
        let r = o.resolve().unwrap();
        assert!(!r.disabled);
        assert_eq!(r.traces.unwrap().endpoint, "http://g:4317");
    }

    #[test]
    fn headers_are_trimmed_decoded_and_lowercased() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("", &[]),
            ("a=b", &[("a", "b")]),
            (" A = b , c=d ", &[("a", "b"), ("c", "d")]),
            ("api-key=s%20e%3Dc%2Cret", &[("api-key", "s e=c,ret")]),
            ("x=", &[("x", "")]),
            ("a=b,,c=d,", &[("a", "b"), ("c", "d")]),
            (
                "auth=Basic dXNlcjpwYXNz==",
                &[("auth", "Basic dXNlcjpwYXNz==")],
            ),
            ("k=%C3%A9", &[("k", "é")]),
        ];
        for &(raw, want) in cases {
            let mut o = generic("http://c:4317");
            o.generic.headers = s(raw);
            let got = traces(&o).headers;
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            assert_eq!(got, want, "{raw}");
        }
    }

    #[test]
    fn errors_name_the_variable() {
        // (mutation, expected setting, text the problem must contain)
        type Mutate = fn(&mut ExportOptions);
        let cases: &[(Mutate, &str, &str)] = &[
            (
                |o| o.generic.protocol = s("grpcx"),
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "`grpcx` is not one of grpc, http/protobuf",
            ),
            (
                |o| o.traces.protocol = s("http/json"),
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "not supported",
            ),
            (
                |o| o.metrics.compression = s("zstd"),
                "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION",
                "`zstd` is not one of gzip, none",
            ),
            (
                |o| o.generic.timeout = s("abc"),
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                "`abc` is not a whole number",
            ),
            (
                |o| o.traces.timeout = s("0"),
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "`0` is not allowed",
            ),
            (
                |o| o.generic.timeout = s("-5"),
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                "`-5`",
            ),
            (
                |o| o.generic.timeout = s("1.5"),
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                "`1.5`",
            ),
            (
                |o| o.generic.headers = s("novalue"),
                "OTEL_EXPORTER_OTLP_HEADERS",
                "`novalue` is not a key=value pair",
            ),
            (
                |o| o.traces.headers = s("=v"),
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "empty key",
            ),
            (
                |o| o.generic.headers = s("a b=c"),
                "OTEL_EXPORTER_OTLP_HEADERS",
                "not a valid header name",
            ),
            (
                |o| o.generic.headers = s("k=%zz"),
                "OTEL_EXPORTER_OTLP_HEADERS",
                "percent-encoding",
            ),
            (
                |o| o.generic.headers = s("k=%0A"),
                "OTEL_EXPORTER_OTLP_HEADERS",
                "not a valid header value",
            ),
            (
                |o| o.generic.headers = s("x-bin=v"),
                "OTEL_EXPORTER_OTLP_HEADERS",
                "reserved by gRPC",
            ),
            (
                |o| o.generic.insecure = s("yes"),
                "OTEL_EXPORTER_OTLP_INSECURE",
                "`yes` is not a boolean",
            ),
            (
                |o| o.generic.endpoint = s("ftp://c:21"),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "`ftp://c:21` is not an http:// or https:// URL",
            ),
            (
                |o| o.traces.endpoint = s("not a uri"),
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "`not a uri`",
            ),
            (
                |o| o.traces.endpoint = s("http://"),
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "`http://`",
            ),
            (
                |o| o.traces.endpoint = s("c:4317/path"),
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "needs a scheme",
            ),
            (
                |o| {
                    o.generic.protocol = s("http/protobuf");
                    o.generic.endpoint = s("c:4318");
                },
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "has no scheme",
            ),
            (
                |o| o.sdk_disabled = s("yes"),
                "OTEL_SDK_DISABLED",
                "`yes` is not a boolean",
            ),
            (
                |o| o.metrics_temporality = s("gauge"),
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                "`gauge` is not one of cumulative, delta, lowmemory",
            ),
            (
                |o| o.metric_export_interval = s("0"),
                "OTEL_METRIC_EXPORT_INTERVAL",
                "`0`",
            ),
            (
                |o| o.metric_export_timeout = s("x"),
                "OTEL_METRIC_EXPORT_TIMEOUT",
                "`x`",
            ),
            (
                |o| o.bsp_schedule_delay = s("-1"),
                "OTEL_BSP_SCHEDULE_DELAY",
                "`-1`",
            ),
            (
                |o| o.bsp_export_timeout = s("0"),
                "OTEL_BSP_EXPORT_TIMEOUT",
                "`0`",
            ),
            (
                |o| o.bsp_max_queue_size = s("0"),
                "OTEL_BSP_MAX_QUEUE_SIZE",
                "`0` is not a whole number greater than 0",
            ),
            (
                |o| o.bsp_max_export_batch_size = s("many"),
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                "`many`",
            ),
            (
                |o| {
                    o.bsp_max_queue_size = s("10");
                    o.bsp_max_export_batch_size = s("11");
                },
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                "larger than the queue",
            ),
            (
                |o| {
                    o.generic.endpoint = s("https://c");
                    o.traces.certificate = Some("/nonexistent/ca.pem".into());
                },
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "cannot read `/nonexistent/ca.pem`",
            ),
            (
                |o| {
                    o.generic.endpoint = s("https://c");
                    o.generic.client_key = Some("/nonexistent/k.pem".into());
                    o.generic.client_certificate = Some("/nonexistent/c.pem".into());
                },
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                "No such file",
            ),
        ];
        for (i, (mutate, setting, problem)) in cases.iter().enumerate() {
            let mut o = generic("http://c:4317");
            mutate(&mut o);
            let e = err(&o);
            assert_eq!(e.setting, *setting, "case {i}: {e}");
            assert!(e.problem.contains(problem), "case {i}: {e}");
        }
    }

    #[test]
    fn tls_files_are_checked_and_paired() {
        let ca = TempFile::new("ca.pem");
        let cert = TempFile::new("cert.pem");
        let key = TempFile::new("key.pem");
        let mut o = generic("https://c:4317");
        o.generic.certificate = Some(ca.0.clone());
        o.traces.client_certificate = Some(cert.0.clone());
        o.traces.client_key = Some(key.0.clone());
        let r = o.resolve().unwrap();
        assert_eq!(
            r.traces.unwrap().tls,
            Some(TlsSettings {
                certificate: Some(ca.0.clone()),
                client_certificate: Some(cert.0.clone()),
                client_key: Some(key.0.clone()),
            })
        );
        // Metrics: the CA from the generic value, no client identity.
        assert_eq!(
            r.metrics.unwrap().tls,
            Some(TlsSettings {
                certificate: Some(ca.0.clone()),
                client_certificate: None,
                client_key: None,
            })
        );

        let mut o = generic("https://c:4317");
        o.metrics.client_certificate = Some(cert.0.clone());
        let e = err(&o);
        assert_eq!(e.setting, "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE");
        assert!(
            e.problem.contains("OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY"),
            "{e}"
        );

        let mut o = generic("https://c:4317");
        o.generic.client_key = Some(key.0.clone());
        let e = err(&o);
        assert_eq!(e.setting, "OTEL_EXPORTER_OTLP_CLIENT_KEY");
        assert!(e.problem.contains("certificate"), "{e}");

        // A plain-text endpoint needs no TLS settings.
        let mut o = generic("http://c:4317");
        o.generic.certificate = Some(ca.0.clone());
        assert_eq!(traces(&o).tls, None);
    }

    #[test]
    fn sdk_disabled_and_temporality_values() {
        for (v, want) in [
            ("true", true),
            ("TRUE", true),
            ("False", false),
            ("false", false),
        ] {
            let o = ExportOptions {
                sdk_disabled: s(v),
                ..Default::default()
            };
            assert_eq!(o.resolve().unwrap().disabled, want, "{v}");
        }
        for (v, want) in [
            ("cumulative", TemporalityPreference::Cumulative),
            ("Delta", TemporalityPreference::Delta),
            ("LOWMEMORY", TemporalityPreference::LowMemory),
        ] {
            let o = ExportOptions {
                metrics_temporality: s(v),
                ..Default::default()
            };
            assert_eq!(o.resolve().unwrap().temporality, want, "{v}");
        }
    }

    #[test]
    fn intervals_and_batch_sizes() {
        let o = ExportOptions {
            metric_export_interval: s("1500"),
            metric_export_timeout: s("700"),
            bsp_schedule_delay: s("0"),
            bsp_export_timeout: s("2000"),
            bsp_max_queue_size: s("100"),
            bsp_max_export_batch_size: s("100"),
            ..Default::default()
        };
        let r = o.resolve().unwrap();
        assert_eq!(r.metric_export_interval, Duration::from_millis(1500));
        assert_eq!(r.metric_export_timeout, Duration::from_millis(700));
        assert_eq!(
            r.batch,
            BatchSettings {
                max_queue_size: 100,
                schedule_delay: Duration::ZERO,
                export_timeout: Duration::from_secs(2),
                max_export_batch_size: 100,
            }
        );
        // A queue smaller than the default batch size takes the batch size down with it.
        let small_queue = ExportOptions {
            bsp_max_queue_size: s("300"),
            ..Default::default()
        };
        assert_eq!(
            small_queue.resolve().unwrap().batch.max_export_batch_size,
            300
        );
    }
}
