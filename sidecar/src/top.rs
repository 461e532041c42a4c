//! `sidecar top`: a live terminal view of the pod's traffic, read from the admin server's
//! `/stats`.
//!
//! CONTRACT: the CLI embeds [`TopArgs`] as the `top` subcommand and calls [`main`].
//!
//! The view polls `/stats` with a small blocking HTTP/1.1 client on a background thread, keeps
//! the last two answers and derives rates and error ratios from the difference of their
//! cumulative counters (the summary's own interval counters are reset by the periodic terminal
//! report, so they only serve the very first screen). Rendering ([`draw`], [`render_plain`])
//! is separate from the terminal and network I/O so it can be tested on ratatui's
//! `TestBackend`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, IsTerminal as _, Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::admin::stats::Stats;
use crate::export::summary::{DestinationSnapshot, Direction};

/// Default admin port when the address names none.
const DEFAULT_ADMIN_PORT: u16 = 15020;

/// Connect timeout of one `/stats` request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Read/write timeout of one `/stats` request.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest `/stats` response accepted (the summary is bounded to about 2 000 rows).
const MAX_RESPONSE_BYTES: u64 = 32 * 1024 * 1024;

/// Longest the UI waits for a key before it looks at new data or a stop signal.
const UI_TICK: Duration = Duration::from_millis(100);

/// Flags of `sidecar top`.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// Admin server of the sidecar to watch (host:port, or a full http:// URL).
    #[arg(
        long,
        env = "SIDECAR_TOP_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:15020"
    )]
    pub admin: String,

    /// Time between two polls of /stats: seconds (`1`, `0.5`) or with a unit (`500ms`, `2s`),
    /// from 100ms to 1h.
    #[arg(long, env = "SIDECAR_TOP_INTERVAL", value_name = "DURATION", default_value = "1s",
          value_parser = parse_interval)]
    pub interval: Duration,

    /// Print one plain-text snapshot to stdout and exit (for scripts, and when stdout is not a
    /// terminal).
    #[arg(long)]
    pub once: bool,
}

/// Runs the live view until `q`, Esc or Ctrl-C (exit 0). `--once` prints one snapshot (exit 0,
/// or 1 when `/stats` cannot be read). Without `--once`, stdout must be a terminal (else exit
/// 64).
pub fn main(args: TopArgs) -> ExitCode {
    let target = match AdminTarget::parse(&args.admin) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sidecar top: --admin: {e}");
            return ExitCode::from(crate::cli::EXIT_USAGE);
        }
    };
    if args.once {
        return match target.fetch() {
            Ok(stats) => {
                let mut view = View::new(target.display.clone(), args.interval);
                view.update(Ok(stats), Instant::now());
                print!("{}", render_plain(&view));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sidecar top: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !io::stdout().is_terminal() {
        eprintln!("sidecar top: not a terminal; use --once for a plain-text snapshot");
        return ExitCode::from(crate::cli::EXIT_USAGE);
    }
    match run_terminal(target, args.interval) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecar top: terminal error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `--interval`: plain seconds (`1`, `0.25`), or a number with `ms`, `s` or `m`.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 1, 0.5, 500ms, 2s)"))?;
    let secs = value * scale;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("`{s}` is outside 100ms..1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

// ---------------------------------------------------------------------------------------------
// Fetching /stats.

/// Where `/stats` is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminTarget {
    /// `host:port` to connect to (IPv6 in brackets).
    pub authority: String,
    /// What the header shows.
    pub display: String,
}

impl AdminTarget {
    /// Accepts `host:port`, `host` (port 15020), `[v6]:port`, a bare IPv6 address, or the same
    /// after `http://` with an optional path (ignored: the view always asks for `/stats`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "`{s}`: the admin server speaks plain HTTP; use http:// or host:port"
            ));
        }
        let rest = if lower.starts_with("http://") {
            s.get("http://".len()..).unwrap_or_default()
        } else if s.contains("://") {
            return Err(format!("`{s}` is not an http:// URL"));
        } else {
            s
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("`{s}` names no host"));
        }
        let authority = if let Some(after) = authority.strip_prefix('[') {
            // [v6] or [v6]:port
            let (_, tail) = after
                .split_once(']')
                .ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
            match tail {
                "" => format!("{authority}:{DEFAULT_ADMIN_PORT}"),
                t if t.strip_prefix(':').is_some_and(valid_port) => authority.to_owned(),
                _ => return Err(format!("`{s}`: bad port")),
            }
        } else if authority.matches(':').count() > 1 {
            // A bare IPv6 address.
            format!("[{authority}]:{DEFAULT_ADMIN_PORT}")
        } else if let Some((host, port)) = authority.split_once(':') {
            if host.is_empty() || !valid_port(port) {
                return Err(format!("`{s}`: expected host:port"));
            }
            authority.to_owned()
        } else {
            format!("{authority}:{DEFAULT_ADMIN_PORT}")
        };
        Ok(Self {
            display: authority.clone(),
            authority,
        })
    }

    /// One `GET /stats`: connect, send, read to the end, parse.
    pub fn fetch(&self) -> Result<Stats, String> {
        let body = self.get("/stats")?;
        serde_json::from_slice(&body).map_err(|e| format!("/stats is not a stats document: {e}"))
    }

    /// One blocking HTTP/1.1 GET with `Connection: close`; the body of a 200 answer.
    fn get(&self, path: &str) -> Result<Vec<u8>, String> {
        let addrs = self
            .authority
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.authority))?;
        let mut last_err = None;
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let mut stream = stream.ok_or_else(|| match last_err {
            Some(e) => format!("cannot connect to {}: {e}", self.authority),
            None => format!("{} resolves to no address", self.authority),
        })?;
        let io_err = |e: io::Error| format!("{}: {e}", self.authority);
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\
             User-Agent: sidecar-top/{}\r\nConnection: close\r\n\r\n",
            self.authority,
            env!("CARGO_PKG_VERSION")
        );
        stream.write_all(request.as_bytes()).map_err(io_err)?;
        let mut raw = Vec::with_capacity(16 * 1024);
        (&mut stream)
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut raw)
            .map_err(|e| format!("reading from {}: {e}", self.authority))?;
        parse_response(&raw)
    }
}

fn valid_port(p: &str) -> bool {
    p.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Parses a whole HTTP/1.x response read until close: the body of a 200, else an error that
/// names the status. Honors `Content-Length` and `Transfer-Encoding: chunked`.
fn parse_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the admin server closed the connection before a full response head")?;
    let head = std::str::from_utf8(raw.get(..head_end).unwrap_or_default())
        .map_err(|_| "the response head is not UTF-8")?;
    let body = raw.get(head_end + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP/1.x response: `{status_line}`"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length `{value}`"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        decode_chunked(body)?
    } else if let Some(len) = content_length {
        body.get(..len)
            .ok_or_else(|| format!("truncated body: {} of {len} bytes", body.len()))?
            .to_vec()
    } else {
        body.to_vec()
    };
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.trim().chars().take(200).collect();
        return Err(format!("/stats answered HTTP {status}: {text}"));
    }
    Ok(body)
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(data.len());
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = std::str::from_utf8(data.get(..line_end).unwrap_or_default())
            .map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size `{size_text}`"))?;
        data = data.get(line_end + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data
            .get(size..)
            .and_then(|d| d.strip_prefix(b"\r\n"))
            .ok_or("chunk without its CRLF")?;
    }
}

// ---------------------------------------------------------------------------------------------
// The model: two samples, the rows derived from them.

/// One answer of `/stats` and when it arrived.
#[derive(Clone, Debug)]
struct Sample {
    stats: Stats,
    at: Instant,
}

/// Column the table is sorted by; `s` cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Requests per second, highest first.
    Rate,
    /// Error ratio, highest first.
    Errors,
    /// p99 latency, highest first.
    P99,
    /// Smoothed RTT, highest first.
    Rtt,
    /// Retransmitted segments, most first.
    Retransmits,
    /// Direction and name, alphabetical.
    Name,
}

impl SortKey {
    fn next(self) -> Self {
        match self {
            SortKey::Rate => SortKey::Errors,
            SortKey::Errors => SortKey::P99,
            SortKey::P99 => SortKey::Rtt,
            SortKey::Rtt => SortKey::Retransmits,
            SortKey::Retransmits => SortKey::Name,
            SortKey::Name => SortKey::Rate,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SortKey::Rate => "req/s",
            SortKey::Errors => "error %",
            SortKey::P99 => "p99",
            SortKey::Rtt => "rtt",
            SortKey::Retransmits => "retrans",
            SortKey::Name => "name",
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficRow {
    /// Outbound destination or inbound route.
    pub direction: Direction,
    /// Destination or `:port METHOD route`.
    pub name: String,
    /// Requests per second since the previous poll (first poll: over the summary's interval).
    pub rate: f64,
    /// Requests since start.
    pub requests: u64,
    /// Share of requests that failed (5xx, transport errors) in the same window, percent;
    /// `None` without requests in it.
    pub error_pct: Option<f64>,
    /// Median latency (ms): the summary's current interval when it has requests, else since
    /// start.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency (ms), like `p50_ms`.
    pub p99_ms: Option<f64>,
    /// Connections closed since start (kernel observations, or the proxy's opaque connections
    /// when larger).
    pub connections: u64,
    /// Mean smoothed RTT (ms) of the connections closed since the previous poll, else since
    /// start.
    pub rtt_ms: Option<f64>,
    /// Segments retransmitted since start.
    pub retransmits: u64,
    /// Outbound connects that failed since start.
    pub connect_failures: u64,
}

/// Everything the screen shows: the last two samples, the last error, the sort column.
#[derive(Debug)]
pub struct View {
    admin: String,
    interval: Duration,
    current: Option<Sample>,
    previous: Option<Sample>,
    error: Option<(String, Instant)>,
    sort: SortKey,
}

impl View {
    /// An empty view of `admin`, polled every `interval`.
    pub fn new(admin: String, interval: Duration) -> Self {
        Self {
            admin,
            interval,
            current: None,
            previous: None,
            error: None,
            sort: SortKey::Rate,
        }
    }

    /// Takes the outcome of one poll made at `at`. An error keeps the last data on screen.
    pub fn update(&mut self, result: Result<Stats, String>, at: Instant) {
        match result {
            Ok(stats) => {
                self.error = None;
                let sample = Sample { stats, at };
                // A restarted sidecar starts its counters again: forget the old sample.
                let restarted = self
                    .current
                    .as_ref()
                    .is_some_and(|c| sample.stats.uptime_secs < c.stats.uptime_secs);
                self.previous = if restarted { None } else { self.current.take() };
                self.current = Some(sample);
            }
            Err(e) => self.error = Some((e, at)),
        }
    }

    /// The next sort column.
    pub fn cycle_sort(&mut self) {
        self.sort = self.sort.next();
    }

    /// The sort column.
    pub fn sort(&self) -> SortKey {
        self.sort
    }

    /// Seconds between the two samples, when there are two.
    fn window(&self) -> Option<(&Sample, f64)> {
        let cur = self.current.as_ref()?;
        let prev = self.previous.as_ref()?;
        let dt = cur.at.saturating_duration_since(prev.at).as_secs_f64();
        (dt > 0.0).then_some((prev, dt))
    }

    /// The table rows, sorted.
    pub fn rows(&self) -> Vec<TrafficRow> {
        let Some(cur) = &self.current else {
            return Vec::new();
        };
        let window = self.window();
        let before: HashMap<(Direction, &str), &DestinationSnapshot> = window
            .map(|(prev, _)| {
                all_entries(&prev.stats)
                    .map(|d| ((d.direction, d.destination.as_str()), d))
                    .collect()
            })
            .unwrap_or_default();
        let interval_secs = cur.stats.traffic.interval_secs;
        let mut rows: Vec<TrafficRow> = all_entries(&cur.stats)
            .map(|d| {
                let t = &d.total;
                let (rate, error_pct, rtt_ms) = match window {
                    Some((_, dt)) => {
                        let old = before
                            .get(&(d.direction, d.destination.as_str()))
                            .map(|o| o.total)
                            .unwrap_or_default();
                        let requests = t.requests.saturating_sub(old.requests);
                        let errors = t.errors.saturating_sub(old.errors);
                        let rtt_sum = t.tcp.rtt_sum_us.saturating_sub(old.tcp.rtt_sum_us);
                        let rtt_n = t.tcp.rtt_samples.saturating_sub(old.tcp.rtt_samples);
                        let rtt = if rtt_n > 0 {
                            Some(rtt_sum as f64 / rtt_n as f64 / 1000.0)
                        } else {
                            t.tcp.rtt_mean_ms()
                        };
                        (requests as f64 / dt, ratio_pct(errors, requests), rtt)
                    }
                    None => {
                        let i = &d.interval;
                        let rate = if interval_secs > 0.0 {
                            i.requests as f64 / interval_secs
                        } else {
                            0.0
                        };
                        let pct = ratio_pct(i.errors, i.requests)
                            .or_else(|| ratio_pct(t.errors, t.requests));
                        (rate, pct, t.tcp.rtt_mean_ms())
                    }
                };
                TrafficRow {
                    direction: d.direction,
                    name: d.destination.clone(),
                    rate,
                    requests: t.requests,
                    error_pct,
                    p50_ms: d.interval_p50_ms.or(d.p50_ms),
                    p99_ms: d.interval_p99_ms.or(d.p99_ms),
                    connections: t.tcp.connections.max(t.connections),
                    rtt_ms,
                    retransmits: t.tcp.retransmits,
                    connect_failures: t.tcp.connect_failures,
                }
            })
            .collect();
        sort_rows(&mut rows, self.sort);
        rows
    }

    /// The header lines (status, connections, export and process, error).
    fn header_lines(&self) -> Vec<Line<'static>> {
        let mut lines = Vec::with_capacity(4);
        let bold = Style::default().add_modifier(Modifier::BOLD);
        match &self.current {
            Some(cur) => {
                let s = &cur.stats;
                let (state, color) = if s.draining {
                    ("DRAINING", Color::Yellow)
                } else if s.ready {
                    ("READY", Color::Green)
                } else {
                    ("NOT READY", Color::Red)
                };
                lines.push(Line::from(vec![
                    Span::styled(format!("sidecar {}", s.version), bold),
                    Span::raw(format!("  up {}  ", fmt_uptime(s.uptime_secs))),
                    Span::styled(
                        state,
                        Style::default().fg(color).add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(format!(
                        "  admin {}  every {}",
                        self.admin,
                        fmt_interval(self.interval)
                    )),
                ]));
                let c = &s.connections;
                lines.push(Line::from(format!(
                    "connections: in {}  out {}  accepted {}  upstream connect failures {}  \
                     orig-dst failures {}",
                    c.active_inbound,
                    c.active_outbound,
                    c.accepted,
                    c.connect_failures,
                    c.orig_dst_failures
                )));
                let e = &s.export;
                let cpu = match self.window() {
                    Some((prev, dt)) => format!(
                        "{:.1}%",
                        (s.process.cpu_seconds - prev.stats.process.cpu_seconds).max(0.0) / dt
                            * 100.0
                    ),
                    None => format!("{:.1}s", s.process.cpu_seconds),
                };
                let mut export = format!(
                    "export: spans {} sent  {} dropped  {} failed  queue {}/{}  points {} sent  \
                     {} failed  |  cpu {cpu}  rss {}",
                    e.spans_exported,
                    e.spans_dropped,
                    e.spans_failed,
                    e.queue_size,
                    e.queue_capacity,
                    e.metric_points_exported,
                    e.metric_points_failed,
                    fmt_bytes(s.process.rss_bytes),
                );
                if s.kernel.ringbuf_overflows > 0 {
                    let _ = write!(export, "  ringbuf lost {}", s.kernel.ringbuf_overflows);
                }
                let problems = e.spans_dropped + e.spans_failed + e.metric_points_failed;
                let style = if problems > 0 {
                    Style::default().fg(Color::Yellow)
                } else {
                    Style::default()
                };
                lines.push(Line::styled(export, style));
            }
            None => lines.push(Line::from(vec![
                Span::styled("sidecar top", bold),
                Span::raw(format!(
                    "  admin {}  every {}  waiting for /stats",
                    self.admin,
                    fmt_interval(self.interval)
                )),
            ])),
        }
        if let Some((error, at)) = &self.error {
            let mut text = format!(
                "ERROR: {error} (retrying every {}",
                fmt_interval(self.interval)
            );
            if let Some(cur) = &self.current {
                let age = at.saturating_duration_since(cur.at).as_secs();
                let _ = write!(text, "; data shown is {age}s old");
            }
            text.push(')');
            lines.push(Line::styled(
                text,
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            ));
        }
        lines
    }
}

/// Outbound destinations, then inbound rows.
fn all_entries(stats: &Stats) -> impl Iterator<Item = &DestinationSnapshot> {
    stats
        .traffic
        .destinations
        .iter()
        .chain(stats.traffic.inbound.iter())
}

fn ratio_pct(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64 * 100.0)
}

fn sort_rows(rows: &mut [TrafficRow], key: SortKey) {
    // Descending by the key, `None` last; ties by direction and name.
    let desc = |a: Option<f64>, b: Option<f64>| {
        b.unwrap_or(f64::NEG_INFINITY)
            .total_cmp(&a.unwrap_or(f64::NEG_INFINITY))
    };
    rows.sort_by(|a, b| {
        let primary = match key {
            SortKey::Rate => desc(Some(a.rate), Some(b.rate)),
            SortKey::Errors => desc(a.error_pct, b.error_pct),
            SortKey::P99 => desc(a.p99_ms, b.p99_ms),
            SortKey::Rtt => desc(a.rtt_ms, b.rtt_ms),
            SortKey::Retransmits => b.retransmits.cmp(&a.retransmits),
            SortKey::Name => std::cmp::Ordering::Equal,
        };
        primary
            .then_with(|| (a.direction as u8).cmp(&(b.direction as u8)))
            .then_with(|| a.name.cmp(&b.name))
    });
}

// ---------------------------------------------------------------------------------------------
// Rendering.

/// Column titles of the table (also of `--once`).
pub const COLUMNS: [&str; 11] = [
    "DIR",
    "DESTINATION / ROUTE",
    "REQ/S",
    "REQS",
    "ERR%",
    "P50 MS",
    "P99 MS",
    "CONNS",
    "RTT MS",
    "RETRANS",
    "CONN FAIL",
];

fn row_cells(r: &TrafficRow) -> [String; 11] {
    [
        r.direction.short().to_owned(),
        r.name.clone(),
        format!("{:.1}", r.rate),
        r.requests.to_string(),
        fmt_opt(r.error_pct, 1),
        fmt_opt(r.p50_ms, 1),
        fmt_opt(r.p99_ms, 1),
        r.connections.to_string(),
        fmt_opt(r.rtt_ms, 2),
        r.retransmits.to_string(),
        r.connect_failures.to_string(),
    ]
}

/// Draws the whole screen: header, table, footer.
pub fn draw(frame: &mut Frame<'_>, view: &View) {
    let header = view.header_lines();
    let [head_area, table_area, foot_area] = Layout::vertical([
        Constraint::Length(u16::try_from(header.len()).unwrap_or(4)),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header), head_area);

    let rows = view.rows();
    // Every column as wide as its title or widest cell; the name takes what is left (at least
    // 12 columns), so an 80-column terminal keeps every figure.
    let cells: Vec<[String; 11]> = rows.iter().map(row_cells).collect();
    let mut content = COLUMNS.map(|c| c.chars().count());
    for row in &cells {
        for (w, cell) in content.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let widths = content.iter().enumerate().map(|(i, w)| {
        let w = u16::try_from(*w).unwrap_or(u16::MAX);
        if i == 1 {
            Constraint::Min(w.min(12))
        } else {
            Constraint::Length(w)
        }
    });
    let header_row = Row::new(COLUMNS.iter().enumerate().map(|(i, c)| {
        let mut cell = Cell::from(*c);
        if i > 1 {
            cell = Cell::from(Line::from(*c).right_aligned());
        }
        cell
    }))
    .style(
        Style::default()
            .add_modifier(Modifier::BOLD)
            .add_modifier(Modifier::REVERSED),
    );
    let body = rows.iter().zip(cells).map(|(r, cells)| {
        let failing = r.error_pct.is_some_and(|p| p > 0.0) || r.connect_failures > 0;
        let cells = cells.into_iter().enumerate().map(|(i, text)| {
            if i > 1 {
                Cell::from(Line::from(text).right_aligned())
            } else {
                Cell::from(text)
            }
        });
        let row = Row::new(cells);
        if failing {
            row.style(Style::default().fg(Color::Red))
        } else {
            row
        }
    });
    let table = Table::new(body, widths)
        .header(header_row)
        .column_spacing(1);
    frame.render_widget(table, table_area);

    let footer = Line::from(vec![
        Span::styled(" q ", Style::default().add_modifier(Modifier::REVERSED)),
        Span::raw(" quit  "),
        Span::styled(" s ", Style::default().add_modifier(Modifier::REVERSED)),
        Span::raw(format!(
            " sort: {}  |  {} rows  |  rates over the last poll; REQS, CONNS, RETRANS, CONN FAIL since start",
            view.sort.label(),
            rows.len()
        )),
    ]);
    frame.render_widget(Paragraph::new(footer), foot_area);
}

/// The `--once` text: header lines and an aligned table.
pub fn render_plain(view: &View) -> String {
    let mut out = String::new();
    for line in view.header_lines() {
        for span in &line.spans {
            out.push_str(&span.content);
        }
        out.push('\n');
    }
    let rows: Vec<[String; 11]> = view.rows().iter().map(row_cells).collect();
    let mut widths = COLUMNS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: [&str; 11]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Writing to a String cannot fail.
            let _ = match i {
                0 => write!(text, "{cell:<w$}"),
                1 => write!(text, "  {cell:<w$}"),
                _ => write!(text, "  {cell:>w$}"),
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(COLUMNS);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no traffic yet)\n");
    }
    out
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_owned(),
    }
}

fn fmt_uptime(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m")
    } else if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

fn fmt_interval(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

// ---------------------------------------------------------------------------------------------
// The terminal.

/// Set by SIGTERM, SIGHUP or SIGINT: leave the loop and restore the terminal.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_signals() {
    let handler: extern "C" fn(libc::c_int) = on_stop_signal;
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // function pointer has the `extern "C" fn(c_int)` signature `signal` expects.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Restores the terminal when dropped (every return path and unwinding); ratatui's panic hook
/// restores it before a panic message is printed.
struct RestoreGuard;

impl Drop for RestoreGuard {
    fn drop(&mut self) {
        ratatui::restore();
        let _ = ratatui::crossterm::execute!(io::stdout(), ratatui::crossterm::cursor::Show);
    }
}

/// What a key asks for.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Quit,
    Sort,
    Redraw,
    None,
}

fn key_action(key: KeyEvent) -> Action {
    if key.kind == KeyEventKind::Release {
        return Action::None;
    }
    match key.code {
        KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => Action::Quit,
        KeyCode::Char('c') | KeyCode::Char('d')
            if key.modifiers.contains(KeyModifiers::CONTROL) =>
        {
            Action::Quit
        }
        KeyCode::Char('s') | KeyCode::Char('S') => Action::Sort,
        KeyCode::Char('l') if key.modifiers.contains(KeyModifiers::CONTROL) => Action::Redraw,
        _ => Action::None,
    }
}

/// Polls `/stats` every `interval` on its own thread (a slow admin server never blocks the
/// keys); stops when the receiver is gone.
fn spawn_poller(
    target: AdminTarget,
    interval: Duration,
) -> mpsc::Receiver<(Result<Stats, String>, Instant)> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("top-poll".into())
        .spawn(move || loop {
            let started = Instant::now();
            let result = target.fetch();
            if tx.send((result, Instant::now())).is_err() {
                return;
            }
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
        });
    if let Err(e) = spawned {
        // The receiver then reports a disconnected poller as an error on screen.
        eprintln!("sidecar top: cannot start the poller: {e}");
    }
    rx
}

fn run_terminal(target: AdminTarget, interval: Duration) -> io::Result<()> {
    install_stop_signals();
    let mut view = View::new(target.display.clone(), interval);
    let updates = spawn_poller(target, interval);
    // The guard exists before raw mode is entered, so a failing init restores too.
    let _guard = RestoreGuard;
    let mut terminal = ratatui::try_init()?;
    let mut dirty = true;
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Ok(());
        }
        loop {
            match updates.try_recv() {
                Ok((result, at)) => {
                    view.update(result, at);
                    dirty = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if view.error.is_none() {
                        view.update(Err("the poller stopped".into()), Instant::now());
                        dirty = true;
                    }
                    break;
                }
            }
        }
        if dirty {
            terminal.draw(|f| draw(f, &view))?;
            dirty = false;
        }
        if event::poll(UI_TICK)? {
            match event::read()? {
                Event::Key(key) => match key_action(key) {
                    Action::Quit => return Ok(()),
                    Action::Sort => {
                        view.cycle_sort();
                        dirty = true;
                    }
                    Action::Redraw => {
                        terminal.clear()?;
                        dirty = true;
                    }
                    Action::None => {}
                },
                Event::Resize(..) => {
                    terminal.autoresize()?;
                    dirty = true;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::stats::{ConnectionStats, ExportStatsSnapshot, ProcessStats};
    use crate::export::summary::{Counts, SummarySnapshot, TcpCounts};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use std::net::TcpListener;

    fn dest(
        direction: Direction,
        name: &str,
        requests: u64,
        errors: u64,
        tcp: TcpCounts,
    ) -> DestinationSnapshot {
        DestinationSnapshot {
            destination: name.to_owned(),
            direction,
            total: Counts {
                requests,
                errors,
                tcp,
                ..Counts::default()
            },
            interval: Counts {
                requests,
                errors,
                ..Counts::default()
            },
            interval_rate_per_sec: 0.0,
            p50_ms: (requests > 0).then_some(2.0),
            p99_ms: (requests > 0).then_some(9.5),
            interval_p50_ms: None,
            interval_p99_ms: None,
        }
    }

    fn stats(
        uptime: f64,
        dests: Vec<DestinationSnapshot>,
        inbound: Vec<DestinationSnapshot>,
    ) -> Stats {
        Stats {
            version: "9.9.9".into(),
            uptime_secs: uptime,
            ready: true,
            draining: false,
            connections: ConnectionStats {
                active_outbound: 4,
                active_inbound: 2,
                accepted: 100,
                connect_failures: 1,
                orig_dst_failures: 0,
            },
            traffic: SummarySnapshot {
                uptime_secs: uptime,
                interval_secs: 10.0,
                destinations: dests,
                inbound,
            },
            export: ExportStatsSnapshot {
                spans_exported: 1234,
                spans_dropped: 0,
                spans_failed: 0,
                queue_size: 3,
                queue_capacity: 2048,
                metric_points_exported: 77,
                metric_points_failed: 0,
            },
            process: ProcessStats {
                cpu_seconds: 1.5,
                rss_bytes: 24 * 1024 * 1024,
            },
            ..Stats::default()
        }
    }

    fn tcp(connections: u64, retransmits: u64, failures: u64, rtt_us: u64) -> TcpCounts {
        TcpCounts {
            connections,
            connect_failures: failures,
            resets: 0,
            retransmits,
            rtt_sum_us: rtt_us * connections,
            rtt_samples: connections,
        }
    }

    /// Two polls two seconds apart: users +100 requests (10 errors), orders +20, redis only
    /// kernel figures, an inbound route +40.
    fn two_polls() -> View {
        let t0 = Instant::now();
        let mut view = View::new("127.0.0.1:15020".into(), Duration::from_secs(1));
        let first = stats(
            10.0,
            vec![
                dest(
                    Direction::Outbound,
                    "orders.svc:8080",
                    100,
                    0,
                    TcpCounts::default(),
                ),
                dest(
                    Direction::Outbound,
                    "users.svc:80",
                    50,
                    5,
                    TcpCounts::default(),
                ),
                dest(
                    Direction::Outbound,
                    "10.0.0.7:6379",
                    0,
                    0,
                    tcp(3, 1, 0, 1000),
                ),
            ],
            vec![dest(
                Direction::Inbound,
                ":8080 GET /users/{id}",
                10,
                0,
                TcpCounts::default(),
            )],
        );
        let second = stats(
            12.0,
            vec![
                dest(
                    Direction::Outbound,
                    "orders.svc:8080",
                    120,
                    0,
                    TcpCounts::default(),
                ),
                dest(
                    Direction::Outbound,
                    "users.svc:80",
                    150,
                    15,
                    TcpCounts::default(),
                ),
                // One more connection with a 4 ms RTT: the window's mean is 4 ms.
                dest(
                    Direction::Outbound,
                    "10.0.0.7:6379",
                    0,
                    0,
                    TcpCounts {
                        rtt_sum_us: 3000 + 4000,
                        rtt_samples: 4,
                        ..tcp(4, 6, 2, 0)
                    },
                ),
            ],
            vec![dest(
                Direction::Inbound,
                ":8080 GET /users/{id}",
                50,
                0,
                TcpCounts::default(),
            )],
        );
        view.update(Ok(first), t0);
        view.update(Ok(second), t0 + Duration::from_secs(2));
        view
    }

    fn screen(view: &View, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, view)).unwrap();
        let buffer = terminal.backend().buffer();
        buffer
            .content()
            .chunks(usize::from(width))
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>())
            .collect()
    }

    fn find<'a>(lines: &'a [String], needle: &str) -> (usize, &'a String) {
        lines
            .iter()
            .enumerate()
            .find(|(_, l)| l.contains(needle))
            .unwrap_or_else(|| panic!("`{needle}` not on screen:\n{}", lines.join("\n")))
    }

    #[test]
    fn rates_and_error_ratios_come_from_the_difference_of_two_polls() {
        let view = two_polls();
        let rows = view.rows();
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "users.svc:80",
                ":8080 GET /users/{id}",
                "orders.svc:8080",
                "10.0.0.7:6379"
            ],
            "sorted by rate"
        );
        assert_eq!(rows[0].rate, 50.0);
        assert_eq!(rows[0].error_pct, Some(10.0));
        assert_eq!(rows[1].rate, 20.0);
        assert_eq!(rows[1].direction, Direction::Inbound);
        assert_eq!(rows[2].rate, 10.0);
        assert_eq!(rows[2].error_pct, Some(0.0));
        let redis = &rows[3];
        assert_eq!(redis.rate, 0.0);
        assert_eq!(redis.error_pct, None);
        assert_eq!(redis.connections, 4);
        assert_eq!(redis.retransmits, 6);
        assert_eq!(redis.connect_failures, 2);
        assert_eq!(
            redis.rtt_ms,
            Some(4.0),
            "mean RTT of the connections in the window"
        );
        assert_eq!(
            rows[0].p99_ms,
            Some(9.5),
            "total percentiles without interval ones"
        );
    }

    #[test]
    fn the_first_poll_uses_the_summary_interval() {
        let mut view = View::new("x:1".into(), Duration::from_secs(1));
        view.update(
            Ok(stats(
                5.0,
                vec![dest(
                    Direction::Outbound,
                    "a:80",
                    40,
                    4,
                    TcpCounts::default(),
                )],
                vec![],
            )),
            Instant::now(),
        );
        let rows = view.rows();
        assert_eq!(rows[0].rate, 4.0, "40 requests over the 10 s interval");
        assert_eq!(rows[0].error_pct, Some(10.0));
    }

    #[test]
    fn a_restarted_sidecar_does_not_give_negative_rates() {
        let mut view = two_polls();
        let t = Instant::now() + Duration::from_secs(10);
        view.update(
            Ok(stats(
                1.0,
                vec![dest(
                    Direction::Outbound,
                    "users.svc:80",
                    3,
                    0,
                    TcpCounts::default(),
                )],
                vec![],
            )),
            t,
        );
        let rows = view.rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].rate, 0.3, "first-poll figures again");
    }

    #[test]
    fn sort_cycles_through_the_columns() {
        let mut view = two_polls();
        assert_eq!(view.sort(), SortKey::Rate);
        view.cycle_sort();
        assert_eq!(view.sort(), SortKey::Errors);
        assert_eq!(view.rows()[0].name, "users.svc:80");
        view.cycle_sort(); // p99
        view.cycle_sort(); // rtt
        assert_eq!(view.sort(), SortKey::Rtt);
        assert_eq!(view.rows()[0].name, "10.0.0.7:6379");
        view.cycle_sort(); // retrans
        assert_eq!(view.rows()[0].name, "10.0.0.7:6379");
        view.cycle_sort();
        assert_eq!(view.sort(), SortKey::Name);
        let names: Vec<String> = view.rows().into_iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "10.0.0.7:6379",
                "orders.svc:8080",
                "users.svc:80",
                ":8080 GET /users/{id}"
            ],
            "outbound first, then inbound, alphabetical"
        );
        let lines = screen(&view, 160, 20);
        find(&lines, "sort: name");
        view.cycle_sort();
        assert_eq!(view.sort(), SortKey::Rate);
    }

    #[test]
    fn the_screen_shows_header_table_and_footer() {
        let view = two_polls();
        let lines = screen(&view, 160, 20);
        let (_, head) = find(&lines, "sidecar 9.9.9");
        assert!(head.contains("up 12s"), "{head}");
        assert!(head.contains("READY"), "{head}");
        let (_, conns) = find(&lines, "connections:");
        assert!(conns.contains("in 2") && conns.contains("out 4"), "{conns}");
        let (_, export) = find(&lines, "export:");
        assert!(export.contains("spans 1234 sent"), "{export}");
        assert!(export.contains("queue 3/2048"), "{export}");
        assert!(export.contains("rss 24.0MiB"), "{export}");
        assert!(export.contains("cpu 0.0%"), "{export}");
        let (title_row, title) = find(&lines, "DESTINATION / ROUTE");
        for c in COLUMNS {
            assert!(title.contains(c), "{c} missing in {title}");
        }
        let (users_row, users) = find(&lines, "users.svc:80");
        assert!(users_row == title_row + 1, "highest rate first");
        let cells: Vec<&str> = users.split_whitespace().collect();
        assert_eq!(
            cells[..7],
            ["out", "users.svc:80", "50.0", "150", "10.0", "2.0", "9.5"]
        );
        let (_, inbound) = find(&lines, ":8080 GET /users/{id}");
        assert!(inbound.trim_start().starts_with("in "), "{inbound}");
        let (_, redis) = find(&lines, "10.0.0.7:6379");
        let cells: Vec<&str> = redis.split_whitespace().collect();
        assert_eq!(
            cells[2..],
            ["0.0", "0", "-", "-", "-", "4", "4.00", "6", "2"]
        );
        let (_, footer) = find(&lines, "quit");
        assert!(footer.contains("sort: req/s"), "{footer}");
        assert!(lines[19].contains("quit"), "footer on the last line");
    }

    #[test]
    fn an_unreachable_admin_server_is_shown_in_the_header_and_data_kept() {
        let mut view = View::new("127.0.0.1:1".into(), Duration::from_secs(1));
        view.update(
            Err("cannot connect to 127.0.0.1:1: Connection refused".into()),
            Instant::now(),
        );
        let lines = screen(&view, 120, 10);
        find(&lines, "waiting for /stats");
        let (_, err) = find(&lines, "ERROR: cannot connect to 127.0.0.1:1");
        assert!(err.contains("retrying every 1s"), "{err}");
        find(&lines, "DESTINATION / ROUTE");

        let mut view = two_polls();
        let later = Instant::now() + Duration::from_secs(60);
        view.update(Err("refused".into()), later);
        let lines = screen(&view, 160, 20);
        find(&lines, "ERROR: refused");
        find(&lines, "users.svc:80");
        // Recovery clears the error.
        view.update(Ok(stats(80.0, vec![], vec![])), later);
        let lines = screen(&view, 160, 20);
        assert!(!lines.iter().any(|l| l.contains("ERROR")));
    }

    #[test]
    fn not_ready_and_draining_are_shown() {
        let mut view = View::new("a:1".into(), Duration::from_millis(500));
        let mut s = stats(1.0, vec![], vec![]);
        s.ready = false;
        view.update(Ok(s.clone()), Instant::now());
        find(&screen(&view, 120, 8), "NOT READY");
        s.draining = true;
        view.update(Ok(s), Instant::now());
        let lines = screen(&view, 120, 8);
        let (_, head) = find(&lines, "DRAINING");
        assert!(head.contains("every 500ms"), "{head}");
    }

    #[test]
    fn small_and_resized_terminals_render() {
        let view = two_polls();
        for (w, h) in [(80, 24), (40, 6), (200, 60), (10, 3)] {
            let lines = screen(&view, w, h);
            assert_eq!(lines.len(), usize::from(h));
        }
        // At 80 columns every figure keeps its full title; the name column gives way.
        let lines = screen(&view, 80, 24);
        let (_, title) = find(&lines, "REQ/S");
        for c in COLUMNS.iter().filter(|c| !c.starts_with("DEST")) {
            assert!(title.contains(c), "{c} cut at 80 columns: {title}");
        }
        let (_, users) = find(&lines, "users.svc:80");
        assert!(users.trim_end().ends_with(" 0"), "{users}");
    }

    #[test]
    fn once_prints_an_aligned_table() {
        let view = two_polls();
        let text = render_plain(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("sidecar 9.9.9"), "{text}");
        let title = lines.iter().position(|l| l.starts_with("DIR")).unwrap();
        let users: Vec<&str> = lines[title + 1].split_whitespace().collect();
        assert_eq!(users[..5], ["out", "users.svc:80", "50.0", "150", "10.0"]);
        // Right-aligned numeric columns end where their titles end.
        let end = lines[title].find("REQ/S").unwrap() + "REQ/S".len();
        assert_eq!(&lines[title + 1][end - 4..end], "50.0", "{text}");
        let empty = render_plain(&View::new("a:1".into(), Duration::from_secs(1)));
        assert!(empty.contains("(no traffic yet)"), "{empty}");
    }

    #[test]
    fn keys() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert_eq!(
            key_action(key(KeyCode::Char('q'), KeyModifiers::NONE)),
            Action::Quit
        );
        assert_eq!(
            key_action(key(KeyCode::Esc, KeyModifiers::NONE)),
            Action::Quit
        );
        assert_eq!(
            key_action(key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        assert_eq!(
            key_action(key(KeyCode::Char('c'), KeyModifiers::NONE)),
            Action::None
        );
        assert_eq!(
            key_action(key(KeyCode::Char('s'), KeyModifiers::NONE)),
            Action::Sort
        );
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(key_action(release), Action::None);
    }

    #[test]
    fn intervals_and_addresses_parse() {
        assert_eq!(parse_interval("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "x", "0", "10ms", "2h", "-1"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        let a = |s: &str| AdminTarget::parse(s).map(|t| t.authority);
        assert_eq!(a("127.0.0.1:15020"), Ok("127.0.0.1:15020".into()));
        assert_eq!(
            a("http://localhost:9000/stats"),
            Ok("localhost:9000".into())
        );
        assert_eq!(a("HTTP://pod"), Ok("pod:15020".into()));
        assert_eq!(a("[::1]:8"), Ok("[::1]:8".into()));
        assert_eq!(a("[::1]"), Ok("[::1]:15020".into()));
        assert_eq!(a("::1"), Ok("[::1]:15020".into()));
        for bad in [
            "",
            "https://a:1",
            "ftp://a",
            "a:0",
            "a:x",
            ":80",
            "[::1",
            "[::1]x",
            "http://",
        ] {
            assert!(a(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_parse() {
        let ok =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(ok).unwrap(), b"{}");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"abcde");
        let close = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert_eq!(parse_response(close).unwrap(), b"until close");
        let err = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n\r\ndraining",
        )
        .unwrap_err();
        assert!(
            err.contains("HTTP 503") && err.contains("draining"),
            "{err}"
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5",
            b"SSH-2.0-x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: z\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Serves `response` once to each of `n` connections on a loopback port.
    fn serve(response: Vec<u8>, n: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for _ in 0..n {
                let (mut sock, _) = listener.accept().unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    assert_eq!(sock.read(&mut byte).unwrap(), 1);
                    head.push(byte[0]);
                }
                requests.push(String::from_utf8(head).unwrap());
                sock.write_all(&response).unwrap();
            }
            requests
        });
        (addr, handle)
    }

    #[test]
    fn fetch_reads_stats_from_a_real_socket() {
        let body = serde_json::to_vec(&two_polls().current.unwrap().stats).unwrap();
        let mut response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(&body);
        let (addr, server) = serve(response, 1);
        let target = AdminTarget::parse(&format!("http://{addr}/")).unwrap();
        let stats = target.fetch().unwrap();
        assert_eq!(stats.version, "9.9.9");
        assert_eq!(stats.traffic.destinations.len(), 3);
        let requests = server.join().unwrap();
        assert!(
            requests[0].starts_with("GET /stats HTTP/1.1\r\n"),
            "{}",
            requests[0]
        );
        assert!(requests[0].contains(&format!("Host: {addr}\r\n")));
        assert!(requests[0].contains("Connection: close\r\n"));
    }

    #[test]
    fn fetch_reports_refused_connections_and_bad_documents() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let target = AdminTarget::parse(&format!("127.0.0.1:{port}")).unwrap();
        let err = target.fetch().unwrap_err();
        assert!(
            err.starts_with(&format!("cannot connect to 127.0.0.1:{port}")),
            "{err}"
        );

        let (addr, server) = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n[1,2,3]".to_vec(),
            1,
        );
        let err = AdminTarget::parse(&addr).unwrap().fetch().unwrap_err();
        assert!(err.contains("not a stats document"), "{err}");
        server.join().unwrap();
    }
}
