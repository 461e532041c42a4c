//! Live per-destination summary: request counts, rates, errors and latency quantiles
//! (hdrhistogram, microseconds) plus opaque TCP connection counts and bytes, printed as a small
//! table and available as a serialisable snapshot.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::telemetry::{ConnectionProtocol, TcpConnectionRecord};

/// At most this many destinations get their own row; the rest share [`OVERFLOW_DESTINATION`].
pub const MAX_DESTINATIONS: usize = 1024;

/// Row that collects traffic to destinations beyond [`MAX_DESTINATIONS`].
pub const OVERFLOW_DESTINATION: &str = "(other)";

/// Latencies above this (one hour) are recorded as this, which bounds histogram memory.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Significant figures of the latency histograms: 1 % precision, about 20 KiB each at most.
const LATENCY_SIGFIG: u8 = 2;
const _: () = assert!(LATENCY_SIGFIG <= 5);

/// Longest destination name printed before it is cut.
const MAX_NAME_WIDTH: usize = 48;

/// Counters of one destination over one period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// HTTP requests completed.
    pub requests: u64,
    /// Requests with status >= 500 or a transport error, and failed opaque connections.
    pub errors: u64,
    /// Requests with a 4xx status.
    pub client_errors: u64,
    /// Opaque TCP connections closed.
    pub connections: u64,
    /// Opaque bytes application → destination.
    pub bytes_sent: u64,
    /// Opaque bytes destination → application.
    pub bytes_received: u64,
}

impl Counts {
    fn is_empty(&self) -> bool {
        self.requests == 0 && self.connections == 0
    }
}

/// Figures of one destination in a [`SummarySnapshot`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationSnapshot {
    /// `server.address:port` (IPv6 addresses in brackets).
    pub destination: String,
    /// Since start.
    pub total: Counts,
    /// Since the last printed interval.
    pub interval: Counts,
    /// Requests per second over the current interval.
    pub interval_rate_per_sec: f64,
    /// Median latency since start, in milliseconds (None without requests).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency since start, in milliseconds.
    pub p99_ms: Option<f64>,
    /// Median latency over the current interval, in milliseconds.
    pub interval_p50_ms: Option<f64>,
    /// 99th percentile latency over the current interval, in milliseconds.
    pub interval_p99_ms: Option<f64>,
}

/// Point-in-time copy of the summary, for a `/stats` endpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SummarySnapshot {
    /// Seconds since the summary was created.
    pub uptime_secs: f64,
    /// Seconds since the current interval started.
    pub interval_secs: f64,
    /// One entry per destination, sorted by name.
    pub destinations: Vec<DestinationSnapshot>,
}

struct DestStats {
    total: Counts,
    interval: Counts,
    latency_total: Histogram<u64>,
    latency_interval: Histogram<u64>,
}

impl DestStats {
    fn new(template: &Histogram<u64>) -> Self {
        Self {
            total: Counts::default(),
            interval: Counts::default(),
            latency_total: Histogram::new_from(template),
            latency_interval: Histogram::new_from(template),
        }
    }
}

struct State {
    /// host → port → figures; two levels so a lookup needs no allocation.
    dests: HashMap<String, HashMap<u16, DestStats>>,
    count: usize,
    overflow: Option<DestStats>,
    interval_start: Instant,
}

/// Per-destination figures shared by every connection task.
pub struct Summary {
    state: Mutex<State>,
    started: Instant,
    template: Histogram<u64>,
}

impl std::fmt::Debug for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summary").finish_non_exhaustive()
    }
}

impl Default for Summary {
    fn default() -> Self {
        Self::new()
    }
}

/// What a request or connection adds to a destination.
enum Event<'a> {
    Request {
        latency: Duration,
        status: Option<u16>,
        transport_error: bool,
    },
    Connection(&'a TcpConnectionRecord),
}

impl Summary {
    /// An empty summary; the first interval starts now.
    pub fn new() -> Self {
        let now = Instant::now();
        // Auto-resizing histogram: memory follows the largest latency seen (capped at one hour).
        // Creation fails only for a precision above 5, which the constant rules out.
        let template =
            Histogram::new(LATENCY_SIGFIG).expect("hdrhistogram accepts 0..=5 significant figures");
        Self {
            state: Mutex::new(State {
                dests: HashMap::new(),
                count: 0,
                overflow: None,
                interval_start: now,
            }),
            started: now,
            template,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a few adds.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one finished HTTP request to `server_address:port`.
    pub fn record_request(
        &self,
        server_address: &str,
        port: u16,
        latency: Duration,
        status: Option<u16>,
        transport_error: bool,
    ) {
        self.record(
            server_address,
            port,
            Event::Request {
                latency,
                status,
                transport_error,
            },
        );
    }

    /// Counts one closed connection; only opaque connections are shown (HTTP ones appear as
    /// requests).
    pub fn record_connection(&self, rec: &TcpConnectionRecord) {
        if rec.protocol != ConnectionProtocol::Opaque {
            return;
        }
        let ip = rec.destination.ip().to_string();
        self.record(&ip, rec.destination.port(), Event::Connection(rec));
    }

    fn record(&self, host: &str, port: u16, event: Event<'_>) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let known = state
            .dests
            .get(host)
            .is_some_and(|ports| ports.contains_key(&port));
        if !known && state.count < MAX_DESTINATIONS {
            state.count += 1;
            state
                .dests
                .entry(host.to_owned())
                .or_default()
                .insert(port, DestStats::new(&self.template));
        }
        let stats = match state.dests.get_mut(host).and_then(|p| p.get_mut(&port)) {
            Some(s) => s,
            None => state
                .overflow
                .get_or_insert_with(|| DestStats::new(&self.template)),
        };
        match event {
            Event::Request {
                latency,
                status,
                transport_error,
            } => {
                let failed = transport_error || status.is_some_and(|s| s >= 500);
                let client_error = !failed && status.is_some_and(|s| (400..500).contains(&s));
                for c in [&mut stats.total, &mut stats.interval] {
                    c.requests += 1;
                    c.errors += u64::from(failed);
                    c.client_errors += u64::from(client_error);
                }
                let us = u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .min(MAX_LATENCY_US);
                record_latency(&mut stats.latency_total, us);
                record_latency(&mut stats.latency_interval, us);
            }
            Event::Connection(rec) => {
                for c in [&mut stats.total, &mut stats.interval] {
                    c.connections += 1;
                    c.errors += u64::from(rec.error.is_some());
                    c.bytes_sent = c.bytes_sent.saturating_add(rec.bytes_sent);
                    c.bytes_received = c.bytes_received.saturating_add(rec.bytes_received);
                }
            }
        }
    }

    /// Copy of every figure; does not start a new interval.
    pub fn snapshot(&self) -> SummarySnapshot {
        let state = self.lock();
        let now = Instant::now();
        let interval_secs = now.duration_since(state.interval_start).as_secs_f64();
        let mut destinations: Vec<DestinationSnapshot> = iter_rows(&state)
            .map(|(name, s)| DestinationSnapshot {
                destination: name,
                total: s.total,
                interval: s.interval,
                interval_rate_per_sec: rate(s.interval.requests, interval_secs),
                p50_ms: quantile_ms(&s.latency_total, 0.5),
                p99_ms: quantile_ms(&s.latency_total, 0.99),
                interval_p50_ms: quantile_ms(&s.latency_interval, 0.5),
                interval_p99_ms: quantile_ms(&s.latency_interval, 0.99),
            })
            .collect();
        destinations.sort_by(|a, b| a.destination.cmp(&b.destination));
        SummarySnapshot {
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            interval_secs,
            destinations,
        }
    }

    /// Renders the figures of the interval that ends now and starts the next one. `None` when
    /// the interval had no traffic (nothing to print).
    pub fn take_interval_report(&self) -> Option<String> {
        let mut state = self.lock();
        let now = Instant::now();
        let secs = now.duration_since(state.interval_start).as_secs_f64();
        let mut rows: Vec<Row> = iter_rows(&state)
            .filter(|(_, s)| !s.interval.is_empty())
            .map(|(name, s)| Row::new(name, &s.interval, &s.latency_interval, secs))
            .collect();
        state.interval_start = now;
        for_each_stats(&mut state, |s| {
            s.interval = Counts::default();
            s.latency_interval.reset();
        });
        drop(state);
        if rows.is_empty() {
            return None;
        }
        rows.sort_by(|a, b| a.cells[0].cmp(&b.cells[0]));
        Some(render(
            &format!("sidecar summary: last {}", fmt_duration(secs)),
            &rows,
        ))
    }

    /// Renders the figures since start (the final flush): always returns a report.
    pub fn final_report(&self) -> String {
        let state = self.lock();
        let secs = self.started.elapsed().as_secs_f64();
        let mut rows: Vec<Row> = iter_rows(&state)
            .filter(|(_, s)| !s.total.is_empty())
            .map(|(name, s)| Row::new(name, &s.total, &s.latency_total, secs))
            .collect();
        drop(state);
        rows.sort_by(|a, b| a.cells[0].cmp(&b.cells[0]));
        let header = format!("sidecar summary: whole run, {}", fmt_duration(secs));
        if rows.is_empty() {
            return format!("{header}\n(no traffic)\n");
        }
        render(&header, &rows)
    }
}

/// Records `us`, growing the (auto-resizing) histogram as needed; `saturating_record` alone
/// would clamp to the current range instead of growing it.
fn record_latency(h: &mut Histogram<u64>, us: u64) {
    if h.record(us).is_err() {
        h.saturating_record(us);
    }
}

fn iter_rows(state: &State) -> impl Iterator<Item = (String, &DestStats)> {
    state
        .dests
        .iter()
        .flat_map(|(host, ports)| {
            ports
                .iter()
                .map(move |(port, s)| (destination_name(host, *port), s))
        })
        .chain(
            state
                .overflow
                .iter()
                .map(|s| (OVERFLOW_DESTINATION.to_owned(), s)),
        )
}

fn for_each_stats(state: &mut State, mut f: impl FnMut(&mut DestStats)) {
    for ports in state.dests.values_mut() {
        ports.values_mut().for_each(&mut f);
    }
    if let Some(s) = state.overflow.as_mut() {
        f(s);
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn destination_name(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

/// One printed line: destination, REQ, RPS, ERR, 4XX, P50, P99, CONN, TX, RX.
struct Row {
    cells: [String; 10],
}

const HEADERS: [&str; 10] = [
    "DESTINATION",
    "REQ",
    "RPS",
    "ERR",
    "4XX",
    "P50",
    "P99",
    "CONN",
    "TX",
    "RX",
];

impl Row {
    fn new(name: String, c: &Counts, latency: &Histogram<u64>, secs: f64) -> Self {
        let lat = |q: f64| {
            if !latency.is_empty() {
                fmt_latency_us(latency.value_at_quantile(q))
            } else {
                "-".to_owned()
            }
        };
        let name = if name.chars().count() > MAX_NAME_WIDTH {
            let mut cut: String = name.chars().take(MAX_NAME_WIDTH - 1).collect();
            cut.push('~');
            cut
        } else {
            name
        };
        Self {
            cells: [
                name,
                c.requests.to_string(),
                format!("{:.1}", rate(c.requests, secs)),
                c.errors.to_string(),
                c.client_errors.to_string(),
                lat(0.5),
                lat(0.99),
                c.connections.to_string(),
                fmt_bytes(c.bytes_sent),
                fmt_bytes(c.bytes_received),
            ],
        }
    }
}

fn render(header: &str, rows: &[Row]) -> String {
    let mut widths = HEADERS.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(&row.cells) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::with_capacity(64 * (rows.len() + 2));
    out.push_str(header);
    out.push('\n');
    let mut line = |cells: [&str; 10]| {
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Writing to a String cannot fail.
            let _ = if i == 0 {
                write!(out, "{cell:<w$}")
            } else {
                write!(out, "  {cell:>w$}")
            };
        }
        out.push('\n');
    };
    line(HEADERS);
    for row in rows {
        line(row.cells.each_ref().map(String::as_str));
    }
    out
}

fn fmt_latency_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.2}s", us as f64 / 1_000_000.0)
    }
}

fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

fn fmt_duration(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = secs as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// Writes a report to stdout in one call so lines from other writers do not interleave.
pub fn print_report(report: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(report.as_bytes()).and_then(|()| out.flush()) {
        tracing::debug!("cannot print the summary: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ErrorType;
    use std::net::SocketAddr;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quantiles_on_known_data() {
        let s = Summary::new();
        // 1..=1000 ms once each: p50 = 500 ms, p99 = 990 ms (within hdrhistogram's 1 %).
        for i in 1..=1000 {
            s.record_request("svc", 80, ms(i), Some(200), false);
        }
        let snap = s.snapshot();
        assert_eq!(snap.destinations.len(), 1);
        let d = &snap.destinations[0];
        assert_eq!(d.destination, "svc:80");
        assert_eq!(d.total.requests, 1000);
        let p50 = d.p50_ms.unwrap();
        let p99 = d.p99_ms.unwrap();
        assert!((p50 - 500.0).abs() <= 5.0, "p50 {p50}");
        assert!((p99 - 990.0).abs() <= 9.9, "p99 {p99}");
        assert_eq!(d.interval_p50_ms, d.p50_ms);
    }

    #[test]
    fn errors_and_client_errors_are_split() {
        let s = Summary::new();
        s.record_request("a", 80, ms(1), Some(200), false);
        s.record_request("a", 80, ms(1), Some(404), false);
        s.record_request("a", 80, ms(1), Some(503), false);
        s.record_request("a", 80, ms(1), None, true);
        s.record_request("a", 80, ms(1), Some(200), true);
        let d = &s.snapshot().destinations[0];
        assert_eq!(d.total.requests, 5);
        assert_eq!(d.total.errors, 3);
        assert_eq!(d.total.client_errors, 1);
    }

    #[test]
    fn opaque_connections_count_bytes_http_ones_do_not() {
        let s = Summary::new();
        let dst: SocketAddr = "[fd00::5]:6379".parse().unwrap();
        let mut rec = TcpConnectionRecord {
            destination: dst,
            bytes_sent: 100,
            bytes_received: 2048,
            duration: ms(5),
            protocol: ConnectionProtocol::Opaque,
            error: None,
        };
        s.record_connection(&rec);
        rec.error = Some(ErrorType::ConnectionReset);
        s.record_connection(&rec);
        rec.protocol = ConnectionProtocol::Http1;
        s.record_connection(&rec);
        let snap = s.snapshot();
        assert_eq!(snap.destinations.len(), 1);
        let d = &snap.destinations[0];
        assert_eq!(d.destination, "[fd00::5]:6379");
        assert_eq!(d.total.connections, 2);
        assert_eq!(d.total.errors, 1);
        assert_eq!(d.total.bytes_sent, 200);
        assert_eq!(d.total.bytes_received, 4096);
        assert_eq!(d.total.requests, 0);
        assert_eq!(d.p50_ms, None);
    }

    #[test]
    fn interval_report_only_with_traffic_and_resets() {
        let s = Summary::new();
        assert_eq!(s.take_interval_report(), None);
        s.record_request("b.svc", 8080, ms(3), Some(200), false);
        s.record_request("a.svc", 80, ms(20), Some(500), false);
        let report = s.take_interval_report().unwrap();
        let lines: Vec<&str> = report.lines().collect();
        assert!(lines[0].starts_with("sidecar summary: last "), "{report}");
        assert!(lines[1].starts_with("DESTINATION"), "{report}");
        assert!(lines[2].starts_with("a.svc:80 "), "sorted: {report}");
        assert!(lines[3].starts_with("b.svc:8080"), "{report}");
        assert_eq!(lines.len(), 4);
        // Aligned: every column ends at the same offset on every row.
        let len = lines[1].len();
        assert!(lines[2..].iter().all(|l| l.len() == len), "{report}");
        let cols: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cols[1], "1", "REQ");
        assert_eq!(cols[3], "1", "ERR");
        // 20 ms within hdrhistogram's 1 % (it reports the bucket's highest equivalent value).
        let p50: f64 = cols[5].strip_suffix("ms").unwrap().parse().unwrap();
        assert!((20.0..=20.2).contains(&p50), "P50 {}", cols[5]);
        // Next interval: nothing new, nothing printed, totals kept.
        assert_eq!(s.take_interval_report(), None);
        let snap = s.snapshot();
        assert!(snap.destinations.iter().all(|d| d.interval.requests == 0));
        assert_eq!(
            snap.destinations
                .iter()
                .map(|d| d.total.requests)
                .sum::<u64>(),
            2
        );
        let fin = s.final_report();
        assert!(fin.starts_with("sidecar summary: whole run"), "{fin}");
        assert!(fin.contains("a.svc:80"), "{fin}");
    }

    #[test]
    fn final_report_without_traffic_says_so() {
        let s = Summary::new();
        assert!(s.final_report().contains("(no traffic)"));
    }

    #[test]
    fn destinations_beyond_the_cap_share_one_row() {
        let s = Summary::new();
        for port in 0..(MAX_DESTINATIONS as u16 + 10) {
            s.record_request("h", port, ms(1), Some(200), false);
        }
        let snap = s.snapshot();
        assert_eq!(snap.destinations.len(), MAX_DESTINATIONS + 1);
        let other = snap
            .destinations
            .iter()
            .find(|d| d.destination == OVERFLOW_DESTINATION)
            .unwrap();
        assert_eq!(other.total.requests, 10);
        // A destination already known keeps its row after the cap is reached.
        s.record_request("h", 0, ms(1), Some(200), false);
        let snap = s.snapshot();
        let h0 = snap.destinations.iter().find(|d| d.destination == "h:0");
        assert_eq!(h0.unwrap().total.requests, 2);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_latency_us(850), "850us");
        assert_eq!(fmt_latency_us(12_340), "12.3ms");
        assert_eq!(fmt_latency_us(1_250_000), "1.25s");
        assert_eq!(fmt_bytes(512), "512B");
        assert_eq!(fmt_bytes(1536), "1.5KiB");
        assert_eq!(fmt_duration(9.96), "10.0s");
        assert_eq!(fmt_duration(125.0), "2m05s");
    }

    #[test]
    fn snapshot_serialises() {
        let s = Summary::new();
        s.record_request("svc", 80, ms(2), Some(200), false);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["destinations"][0]["destination"], "svc:80");
        assert_eq!(v["destinations"][0]["total"]["requests"], 1);
    }
}
