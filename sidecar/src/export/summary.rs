//! Live per-destination summary: request counts, rates, errors and latency quantiles
//! (hdrhistogram, microseconds) plus opaque TCP connection counts and bytes, printed as a small
//! table and available as a serialisable snapshot.
//!
//! Besides the outbound destinations it keeps the inbound requests per served port and route
//! (SERVER spans) and, for both directions, the kernel's TCP observations (connections, failed
//! connects, resets, retransmits, smoothed RTT). The periodic terminal report prints the
//! outbound requests and opaque connections; the snapshot (`/stats`, `sidecar top`) has
//! everything.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use opentelemetry::{KeyValue, Value};
use serde::{Deserialize, Serialize};

use crate::telemetry::route::HTTP_ROUTE;
use crate::telemetry::semconv as sc;
use crate::telemetry::{
    ConnectionProtocol, TcpConnectionRecord, TcpDirection, TcpObservation, TcpOutcome,
};

/// At most this many destinations get their own row; the rest share [`OVERFLOW_DESTINATION`].
pub const MAX_DESTINATIONS: usize = 1024;

/// Row that collects traffic to destinations beyond [`MAX_DESTINATIONS`] (and, in
/// [`SummarySnapshot::inbound`], to routes beyond [`MAX_INBOUND_ROUTES`]).
pub const OVERFLOW_DESTINATION: &str = "(other)";

/// At most this many inbound rows (served port, method and route; or served port alone for its
/// TCP figures); the rest share [`OVERFLOW_DESTINATION`].
pub const MAX_INBOUND_ROUTES: usize = 1024;

/// Latencies above this (one hour) are recorded as this, which bounds histogram memory.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Significant figures of the latency histograms: 1 % precision, about 20 KiB each at most.
const LATENCY_SIGFIG: u8 = 2;
const _: () = assert!(LATENCY_SIGFIG <= 5);

/// Longest destination name printed before it is cut.
const MAX_NAME_WIDTH: usize = 48;

/// Counters of one destination over one period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// What the kernel observed of the TCP connections to this destination (outbound) or to
    /// this served port (inbound).
    #[serde(default)]
    pub tcp: TcpCounts,
}

impl Counts {
    /// True without requests and opaque connections (kernel TCP figures are not counted: the
    /// terminal report leaves such rows out).
    fn is_empty(&self) -> bool {
        self.requests == 0 && self.connections == 0
    }
}

/// Kernel TCP figures (eBPF `sockops` observations, counted when a connection closes or its
/// connect fails) of one destination or served port over one period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TcpCounts {
    /// Connections closed or failed.
    pub connections: u64,
    /// Outbound connects that never established (refused, timed out, other error).
    pub connect_failures: u64,
    /// Established connections that ended with a reset.
    pub resets: u64,
    /// Segments retransmitted (SYN retransmissions included).
    pub retransmits: u64,
    /// Sum of the smoothed RTTs at close, in microseconds; with `rtt_samples`, the mean.
    pub rtt_sum_us: u64,
    /// Connections that had an RTT sample.
    pub rtt_samples: u64,
}

impl TcpCounts {
    /// Mean smoothed RTT in milliseconds, `None` without samples.
    pub fn rtt_mean_ms(&self) -> Option<f64> {
        (self.rtt_samples > 0).then(|| self.rtt_sum_us as f64 / self.rtt_samples as f64 / 1000.0)
    }
}

/// Who opened the traffic of a [`DestinationSnapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The pod's application called out (CLIENT spans, outbound connections).
    #[default]
    Outbound,
    /// A peer called the pod (SERVER spans, accepted connections).
    Inbound,
}

impl Direction {
    /// `out` or `in`.
    pub fn short(self) -> &'static str {
        match self {
            Direction::Outbound => "out",
            Direction::Inbound => "in",
        }
    }
}

/// Figures of one destination (or, inbound, one served port and route) in a
/// [`SummarySnapshot`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationSnapshot {
    /// Outbound: `server.address:port` (IPv6 addresses in brackets); the kernel TCP figures of
    /// a peer are on the row named by its IP address. Inbound: `:port METHOD route` (e.g.
    /// `:8080 GET /users/{id}`), `:port METHOD` for a request without a path, and `:port` for
    /// the TCP figures of the connections accepted on that port.
    pub destination: String,
    /// Outbound (the default, for older writers) or inbound.
    #[serde(default)]
    pub direction: Direction,
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummarySnapshot {
    /// Seconds since the summary was created.
    pub uptime_secs: f64,
    /// Seconds since the current interval started.
    pub interval_secs: f64,
    /// One entry per outbound destination, sorted by name.
    pub destinations: Vec<DestinationSnapshot>,
    /// One entry per inbound served port and route (and per served port for its TCP figures),
    /// sorted by name.
    #[serde(default)]
    pub inbound: Vec<DestinationSnapshot>,
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

/// Inbound rows: served port → method → route → figures. The port's own TCP figures sit under
/// method and route `""`; a request without a path has route `""`.
type InboundMap = HashMap<u16, HashMap<String, HashMap<String, DestStats>>>;

struct State {
    /// host → port → figures; two levels so a lookup needs no allocation.
    dests: HashMap<String, HashMap<u16, DestStats>>,
    count: usize,
    overflow: Option<DestStats>,
    inbound: InboundMap,
    inbound_count: usize,
    inbound_overflow: Option<DestStats>,
    interval_start: Instant,
}

impl State {
    /// The figures of outbound `host:port`, created while under the cap, else the overflow row.
    fn outbound(&mut self, host: &str, port: u16, template: &Histogram<u64>) -> &mut DestStats {
        let known = self
            .dests
            .get(host)
            .is_some_and(|ports| ports.contains_key(&port));
        if !known && self.count < MAX_DESTINATIONS {
            self.count += 1;
            self.dests
                .entry(host.to_owned())
                .or_default()
                .insert(port, DestStats::new(template));
        }
        match self.dests.get_mut(host).and_then(|p| p.get_mut(&port)) {
            Some(s) => s,
            None => self
                .overflow
                .get_or_insert_with(|| DestStats::new(template)),
        }
    }

    /// The figures of inbound `port method route`, created while under the cap, else the
    /// overflow row.
    fn inbound(
        &mut self,
        port: u16,
        method: &str,
        route: &str,
        template: &Histogram<u64>,
    ) -> &mut DestStats {
        let known = self
            .inbound
            .get(&port)
            .and_then(|m| m.get(method))
            .is_some_and(|r| r.contains_key(route));
        if !known && self.inbound_count < MAX_INBOUND_ROUTES {
            self.inbound_count += 1;
            self.inbound
                .entry(port)
                .or_default()
                .entry(method.to_owned())
                .or_default()
                .insert(route.to_owned(), DestStats::new(template));
        }
        match self
            .inbound
            .get_mut(&port)
            .and_then(|m| m.get_mut(method))
            .and_then(|r| r.get_mut(route))
        {
            Some(s) => s,
            None => self
                .inbound_overflow
                .get_or_insert_with(|| DestStats::new(template)),
        }
    }
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
    Tcp(&'a TcpObservation),
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
                inbound: HashMap::new(),
                inbound_count: 0,
                inbound_overflow: None,
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
        let mut ip = IpText::default();
        ip.set(rec.destination.ip());
        self.record(ip.as_str(), rec.destination.port(), Event::Connection(rec));
    }

    /// Counts one finished inbound HTTP request, named by the attributes of its
    /// `http.server.request.duration` point: `server.port`, `http.request.method` and
    /// `http.route` (when present); an inbound gRPC call is named by `server.port` and
    /// `rpc.method` (the attributes of `rpc.server.call.duration`). `failed`: a 5xx, a
    /// server-fault status or a transport failure.
    pub fn record_server_request(
        &self,
        attrs: &[KeyValue],
        latency: Duration,
        status: Option<u16>,
        failed: bool,
    ) {
        let mut port = 0;
        let mut method = "";
        let mut route = "";
        for kv in attrs {
            match (kv.key.as_str(), &kv.value) {
                (sc::SERVER_PORT, Value::I64(p)) => port = u16::try_from(*p).unwrap_or(0),
                (sc::HTTP_REQUEST_METHOD, Value::String(m)) => method = m.as_str(),
                (HTTP_ROUTE | sc::RPC_METHOD, Value::String(r)) => route = r.as_str(),
                _ => {}
            }
        }
        let mut guard = self.lock();
        let stats = guard.inbound(port, method, route, &self.template);
        apply(
            stats,
            Event::Request {
                latency,
                status,
                transport_error: failed,
            },
        );
    }

    /// Counts one kernel TCP observation: outbound on the row of the peer's `ip:port`, inbound
    /// on the row of the served port.
    pub fn record_tcp(&self, obs: &TcpObservation) {
        match obs.direction {
            TcpDirection::Outbound => {
                let mut ip = IpText::default();
                ip.set(obs.remote.ip().to_canonical());
                self.record(ip.as_str(), obs.remote.port(), Event::Tcp(obs));
            }
            TcpDirection::Inbound => {
                let mut guard = self.lock();
                let stats = guard.inbound(obs.local.port(), "", "", &self.template);
                apply(stats, Event::Tcp(obs));
            }
        }
    }

    fn record(&self, host: &str, port: u16, event: Event<'_>) {
        let mut guard = self.lock();
        let stats = guard.outbound(host, port, &self.template);
        apply(stats, event);
    }
}

/// Adds `event` to the total and interval figures of one row.
fn apply(stats: &mut DestStats, event: Event<'_>) {
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
        Event::Tcp(obs) => {
            let connect_failed = !obs.established && obs.direction == TcpDirection::Outbound;
            let reset = obs.established && obs.outcome == TcpOutcome::Reset;
            let rtt_us = obs
                .srtt
                .filter(|_| obs.established)
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            for c in [&mut stats.total.tcp, &mut stats.interval.tcp] {
                c.connections += 1;
                c.connect_failures += u64::from(connect_failed);
                c.resets += u64::from(reset);
                c.retransmits = c.retransmits.saturating_add(u64::from(obs.retransmits));
                if let Some(us) = rtt_us {
                    c.rtt_sum_us = c.rtt_sum_us.saturating_add(us);
                    c.rtt_samples += 1;
                }
            }
        }
    }
}

impl Summary {
    /// Copy of every figure; does not start a new interval.
    pub fn snapshot(&self) -> SummarySnapshot {
        let state = self.lock();
        let now = Instant::now();
        let interval_secs = now.duration_since(state.interval_start).as_secs_f64();
        let row = |direction: Direction, name: String, s: &DestStats| DestinationSnapshot {
            destination: name,
            direction,
            total: s.total,
            interval: s.interval,
            interval_rate_per_sec: rate(s.interval.requests, interval_secs),
            p50_ms: quantile_ms(&s.latency_total, 0.5),
            p99_ms: quantile_ms(&s.latency_total, 0.99),
            interval_p50_ms: quantile_ms(&s.latency_interval, 0.5),
            interval_p99_ms: quantile_ms(&s.latency_interval, 0.99),
        };
        let mut destinations: Vec<DestinationSnapshot> = iter_rows(&state)
            .map(|(name, s)| row(Direction::Outbound, name, s))
            .collect();
        destinations.sort_by(|a, b| a.destination.cmp(&b.destination));
        let mut inbound: Vec<DestinationSnapshot> = iter_inbound_rows(&state)
            .map(|(name, s)| row(Direction::Inbound, name, s))
            .collect();
        inbound.sort_by(|a, b| a.destination.cmp(&b.destination));
        SummarySnapshot {
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            interval_secs,
            destinations,
            inbound,
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

/// Inbound rows with their names (see [`DestinationSnapshot::destination`]).
fn iter_inbound_rows(state: &State) -> impl Iterator<Item = (String, &DestStats)> {
    state
        .inbound
        .iter()
        .flat_map(|(port, methods)| {
            methods.iter().flat_map(move |(method, routes)| {
                routes
                    .iter()
                    .map(move |(route, s)| (inbound_name(*port, method, route), s))
            })
        })
        .chain(
            state
                .inbound_overflow
                .iter()
                .map(|s| (OVERFLOW_DESTINATION.to_owned(), s)),
        )
}

/// `:port`, `:port METHOD` or `:port METHOD route`.
fn inbound_name(port: u16, method: &str, route: &str) -> String {
    let mut name = format!(":{port}");
    for part in [method, route] {
        if !part.is_empty() {
            name.push(' ');
            name.push_str(part);
        }
    }
    name
}

fn for_each_stats(state: &mut State, mut f: impl FnMut(&mut DestStats)) {
    for ports in state.dests.values_mut() {
        ports.values_mut().for_each(&mut f);
    }
    if let Some(s) = state.overflow.as_mut() {
        f(s);
    }
    for methods in state.inbound.values_mut() {
        for routes in methods.values_mut() {
            routes.values_mut().for_each(&mut f);
        }
    }
    if let Some(s) = state.inbound_overflow.as_mut() {
        f(s);
    }
}

/// An IP address as text in a stack buffer: the key of a known destination is looked up
/// without allocating.
struct IpText {
    buf: [u8; 64],
    len: usize,
}

impl Default for IpText {
    fn default() -> Self {
        Self {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl IpText {
    fn set(&mut self, ip: std::net::IpAddr) {
        self.len = 0;
        // The longest address text (45 bytes) fits; on a (impossible) overflow the text is cut
        // at a whole write, which stays valid UTF-8.
        let _ = write!(self, "{ip}");
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.buf.get(..self.len).unwrap_or_default()).unwrap_or_default()
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
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

    fn server_attrs(port: i64, method: &'static str, route: Option<&'static str>) -> Vec<KeyValue> {
        let mut attrs = vec![
            KeyValue::new(sc::HTTP_REQUEST_METHOD, method),
            KeyValue::new(sc::URL_SCHEME, "http"),
            KeyValue::new(sc::SERVER_PORT, port),
            KeyValue::new(sc::NETWORK_PROTOCOL_VERSION, "1.1"),
        ];
        if let Some(r) = route {
            attrs.push(KeyValue::new(HTTP_ROUTE, r));
        }
        attrs.push(KeyValue::new(sc::HTTP_RESPONSE_STATUS_CODE, 200_i64));
        attrs
    }

    fn observation(remote: &str, local: &str, direction: TcpDirection) -> TcpObservation {
        TcpObservation {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            direction,
            outcome: TcpOutcome::Ok,
            established: true,
            srtt: Some(Duration::from_micros(2000)),
            retransmits: 1,
            bytes_sent: 10,
            bytes_received: 20,
            duration: ms(50),
            connect_latency: Some(ms(1)),
        }
    }

    #[test]
    fn inbound_requests_are_kept_per_port_and_route() {
        let s = Summary::new();
        let users = server_attrs(8080, "GET", Some("/users/{id}"));
        for i in 1..=10 {
            s.record_server_request(&users, ms(i), Some(200), false);
        }
        s.record_server_request(&users, ms(5), Some(503), true);
        s.record_server_request(&users, ms(5), Some(404), false);
        s.record_server_request(
            &server_attrs(8080, "POST", Some("/orders")),
            ms(7),
            Some(201),
            false,
        );
        s.record_server_request(&server_attrs(9090, "OPTIONS", None), ms(1), None, true);
        let snap = s.snapshot();
        assert!(
            snap.destinations.is_empty(),
            "inbound stays out of the outbound list"
        );
        let names: Vec<&str> = snap
            .inbound
            .iter()
            .map(|d| d.destination.as_str())
            .collect();
        assert_eq!(
            names,
            [
                ":8080 GET /users/{id}",
                ":8080 POST /orders",
                ":9090 OPTIONS"
            ]
        );
        let users = &snap.inbound[0];
        assert_eq!(users.direction, Direction::Inbound);
        assert_eq!(users.total.requests, 12);
        assert_eq!(users.total.errors, 1);
        assert_eq!(users.total.client_errors, 1);
        let p50 = users.p50_ms.unwrap();
        assert!((5.0..=6.1).contains(&p50), "p50 {p50}");
        assert_eq!(
            snap.inbound[2].total.errors, 1,
            "a transport failure is an error"
        );
        // The printed report stays outbound only.
        assert_eq!(s.take_interval_report(), None);
        let snap = s.snapshot();
        assert_eq!(
            snap.inbound[0].interval.requests, 0,
            "the interval restarts"
        );
        assert_eq!(snap.inbound[0].total.requests, 12);
    }

    #[test]
    fn inbound_grpc_calls_are_named_by_their_method() {
        let s = Summary::new();
        let attrs = [
            KeyValue::new(sc::RPC_SYSTEM_NAME, "grpc"),
            KeyValue::new(sc::RPC_METHOD, "helloworld.Greeter/SayHello"),
            KeyValue::new(sc::SERVER_ADDRESS, "10.0.0.5"),
            KeyValue::new(sc::SERVER_PORT, 50051_i64),
        ];
        s.record_server_request(&attrs, ms(4), Some(200), false);
        s.record_server_request(&attrs, ms(4), Some(200), true);
        let snap = s.snapshot();
        assert_eq!(snap.inbound.len(), 1);
        assert_eq!(
            snap.inbound[0].destination,
            ":50051 helloworld.Greeter/SayHello"
        );
        assert_eq!(snap.inbound[0].total.requests, 2);
        assert_eq!(snap.inbound[0].total.errors, 1);
    }

    #[test]
    fn inbound_routes_beyond_the_cap_share_one_row() {
        let s = Summary::new();
        for port in 0..(MAX_INBOUND_ROUTES as i64 + 5) {
            s.record_server_request(
                &server_attrs(port, "GET", Some("/")),
                ms(1),
                Some(200),
                false,
            );
        }
        let snap = s.snapshot();
        assert_eq!(snap.inbound.len(), MAX_INBOUND_ROUTES + 1);
        let other = snap
            .inbound
            .iter()
            .find(|d| d.destination == OVERFLOW_DESTINATION)
            .unwrap();
        assert_eq!(other.total.requests, 5);
        assert_eq!(other.direction, Direction::Inbound);
    }

    #[test]
    fn kernel_observations_give_tcp_health_per_destination() {
        let s = Summary::new();
        s.record_request("198.18.0.2", 8080, ms(3), Some(200), false);
        s.record_tcp(&observation(
            "198.18.0.2:8080",
            "198.18.0.1:40000",
            TcpDirection::Outbound,
        ));
        s.record_tcp(&TcpObservation {
            srtt: Some(Duration::from_micros(4000)),
            retransmits: 2,
            outcome: TcpOutcome::Reset,
            ..observation(
                "[::ffff:198.18.0.2]:8080",
                "198.18.0.1:40001",
                TcpDirection::Outbound,
            )
        });
        s.record_tcp(&TcpObservation {
            outcome: TcpOutcome::Refused,
            established: false,
            srtt: None,
            retransmits: 0,
            connect_latency: None,
            ..observation(
                "198.18.0.3:9000",
                "198.18.0.1:40002",
                TcpDirection::Outbound,
            )
        });
        s.record_tcp(&observation(
            "198.18.0.9:50123",
            "198.18.0.1:8080",
            TcpDirection::Inbound,
        ));
        let snap = s.snapshot();
        let names: Vec<&str> = snap
            .destinations
            .iter()
            .map(|d| d.destination.as_str())
            .collect();
        assert_eq!(
            names,
            ["198.18.0.2:8080", "198.18.0.3:9000"],
            "mapped addresses are IPv4"
        );
        let d = &snap.destinations[0];
        assert_eq!(
            d.total.requests, 1,
            "requests and kernel figures share the row"
        );
        assert_eq!(d.total.tcp.connections, 2);
        assert_eq!(d.total.tcp.retransmits, 3);
        assert_eq!(d.total.tcp.resets, 1);
        assert_eq!(d.total.tcp.connect_failures, 0);
        assert_eq!(d.total.tcp.rtt_mean_ms(), Some(3.0));
        let refused = &snap.destinations[1].total.tcp;
        assert_eq!(refused.connections, 1);
        assert_eq!(refused.connect_failures, 1);
        assert_eq!(refused.rtt_mean_ms(), None);
        assert_eq!(snap.destinations[1].total.requests, 0);
        assert_eq!(snap.inbound.len(), 1);
        assert_eq!(
            snap.inbound[0].destination, ":8080",
            "inbound TCP is per served port"
        );
        assert_eq!(snap.inbound[0].total.tcp.connections, 1);
        assert_eq!(snap.inbound[0].interval.tcp.retransmits, 1);
        // Kernel-only rows are not printed; the HTTP row is.
        let report = s.take_interval_report().unwrap();
        assert!(report.contains("198.18.0.2:8080"), "{report}");
        assert!(!report.contains("198.18.0.3"), "{report}");
        assert_eq!(
            s.snapshot().destinations[0].interval.tcp,
            TcpCounts::default()
        );
    }

    #[test]
    fn ip_text_holds_the_longest_addresses() {
        let mut t = IpText::default();
        let long: std::net::IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap();
        t.set(long);
        assert_eq!(t.as_str(), long.to_string());
        t.set("10.0.0.1".parse().unwrap());
        assert_eq!(t.as_str(), "10.0.0.1");
    }

    #[test]
    fn older_snapshots_deserialise_with_defaults() {
        let old = r#"{"uptime_secs":1.0,"interval_secs":1.0,"destinations":[{"destination":"a:80",
            "total":{"requests":3,"errors":0,"client_errors":0,"connections":0,"bytes_sent":0,
            "bytes_received":0},"interval":{"requests":1,"errors":0,"client_errors":0,
            "connections":0,"bytes_sent":0,"bytes_received":0},"interval_rate_per_sec":1.0,
            "p50_ms":1.0,"p99_ms":2.0,"interval_p50_ms":null,"interval_p99_ms":null}]}"#;
        let snap: SummarySnapshot = serde_json::from_str(old).unwrap();
        assert!(snap.inbound.is_empty());
        assert_eq!(snap.destinations[0].direction, Direction::Outbound);
        assert_eq!(snap.destinations[0].total.tcp, TcpCounts::default());
        assert_eq!(snap.destinations[0].total.requests, 3);
        // And the new fields round-trip.
        let s = Summary::new();
        s.record_server_request(
            &server_attrs(8080, "GET", Some("/")),
            ms(1),
            Some(200),
            false,
        );
        let snap = s.snapshot();
        let v = serde_json::to_value(&snap).unwrap();
        assert_eq!(v["inbound"][0]["direction"], "inbound");
        let back: SummarySnapshot = serde_json::from_value(v).unwrap();
        assert_eq!(back, snap);
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
