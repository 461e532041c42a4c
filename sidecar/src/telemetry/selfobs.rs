//! The sidecar's own instruments: its CPU time and resident memory (from `/proc/self`), the
//! proxy's active connections and errors, and the fill of the eBPF maps that grow with
//! traffic.
//!
//! Every instrument is observable: the callbacks run when a reader collects (an OTLP export
//! or a Prometheus scrape), never on the proxy's path.
//!
//! | Instrument | Kind | Unit | Attributes |
//! |---|---|---|---|
//! | `process.cpu.time` | counter | `s` | `cpu.mode` = `user` \| `system` |
//! | `process.memory.usage` | up-down counter | `By` | (resident set size) |
//! | `sidecar.proxy.connections.active` | up-down counter | `{connection}` | `sidecar.direction` |
//! | `sidecar.proxy.errors` | counter | `{error}` | `error.type` = `orig_dst_unknown` \| `loop_refused` \| `connect_failed` |
//! | `sidecar.ebpf.map.fill_ratio` | gauge | `1` | `sidecar.ebpf.map.name` |
//!
//! The two `process.*` instruments follow the semantic conventions for OS process metrics.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

use super::semconv as sc;
use crate::admin::stats::ProcessStats;
use crate::proxy::ProxyCounters;

/// `process.cpu.time`: CPU seconds of the sidecar process, by mode.
pub const METRIC_PROCESS_CPU_TIME: &str = "process.cpu.time";
/// `process.memory.usage`: resident set size of the sidecar process.
pub const METRIC_PROCESS_MEMORY_USAGE: &str = "process.memory.usage";
/// `sidecar.proxy.connections.active`: proxied connections open now.
pub const METRIC_PROXY_CONNECTIONS_ACTIVE: &str = "sidecar.proxy.connections.active";
/// `sidecar.proxy.errors`: connections the proxy could not serve, by cause.
pub const METRIC_PROXY_ERRORS: &str = "sidecar.proxy.errors";
/// `sidecar.ebpf.map.fill_ratio`: entries / capacity of an eBPF map.
pub const METRIC_EBPF_MAP_FILL_RATIO: &str = "sidecar.ebpf.map.fill_ratio";

/// Attribute `cpu.mode` of `process.cpu.time`.
pub const CPU_MODE: &str = "cpu.mode";
/// Attribute naming the eBPF map of `sidecar.ebpf.map.fill_ratio`.
pub const SIDECAR_EBPF_MAP_NAME: &str = "sidecar.ebpf.map.name";

/// `error.type` of a connection whose original destination was unknown.
pub const ERROR_ORIG_DST_UNKNOWN: &str = "orig_dst_unknown";
/// `error.type` of a connection aimed at the proxy itself.
pub const ERROR_LOOP_REFUSED: &str = "loop_refused";
/// `error.type` of a failed or timed-out upstream connect.
pub const ERROR_CONNECT_FAILED: &str = "connect_failed";

/// Reads the fill of the eBPF maps: (map name, entries, capacity), e.g.
/// `Interception::map_fill`.
pub type MapFillFn = Arc<dyn Fn() -> Vec<(String, usize, usize)> + Send + Sync>;

/// What the self-observation instruments read.
#[derive(Clone)]
pub struct SelfSources {
    /// The proxy's counters.
    pub proxy: Arc<ProxyCounters>,
    /// eBPF map fill, when the programs are attached (`None`: no `sidecar.ebpf.map.fill_ratio`).
    pub maps: Option<MapFillFn>,
}

impl std::fmt::Debug for SelfSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSources")
            .field("proxy", &self.proxy)
            .field("maps", &self.maps.is_some())
            .finish()
    }
}

/// Registers the self-observation instruments on `meter`. They live as long as its provider.
pub fn register(meter: &Meter, sources: SelfSources) {
    meter
        .f64_observable_counter(METRIC_PROCESS_CPU_TIME)
        .with_unit("s")
        .with_description("Total CPU seconds of the sidecar process broken down by mode.")
        .with_callback(|observer| match read_cpu() {
            Ok(cpu) => {
                observer.observe(cpu.user, &[KeyValue::new(CPU_MODE, "user")]);
                observer.observe(cpu.system, &[KeyValue::new(CPU_MODE, "system")]);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read /proc/self/stat"),
        })
        .build();

    meter
        .i64_observable_up_down_counter(METRIC_PROCESS_MEMORY_USAGE)
        .with_unit("By")
        .with_description("Resident memory of the sidecar process.")
        .with_callback(|observer| match read_rss() {
            Ok(rss) => observer.observe(i64::try_from(rss).unwrap_or(i64::MAX), &[]),
            Err(e) => tracing::debug!(error = %e, "cannot read /proc/self/statm"),
        })
        .build();

    let counters = Arc::clone(&sources.proxy);
    meter
        .i64_observable_up_down_counter(METRIC_PROXY_CONNECTIONS_ACTIVE)
        .with_unit("{connection}")
        .with_description("Proxied connections open now.")
        .with_callback(move |observer| {
            for (gauge, direction) in [
                (&counters.active_outbound, "outbound"),
                (&counters.active_inbound, "inbound"),
            ] {
                let n = i64::try_from(gauge.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
                observer.observe(n, &[KeyValue::new(sc::SIDECAR_DIRECTION, direction)]);
            }
        })
        .build();

    let counters = Arc::clone(&sources.proxy);
    meter
        .u64_observable_counter(METRIC_PROXY_ERRORS)
        .with_unit("{error}")
        .with_description("Connections the proxy closed without serving them, by cause.")
        .with_callback(move |observer| {
            for (counter, kind) in [
                (&counters.orig_dst_failures, ERROR_ORIG_DST_UNKNOWN),
                (&counters.loops_refused, ERROR_LOOP_REFUSED),
                (&counters.connect_failures, ERROR_CONNECT_FAILED),
            ] {
                observer.observe(
                    counter.load(Ordering::Relaxed),
                    &[KeyValue::new(sc::ERROR_TYPE, kind)],
                );
            }
        })
        .build();

    if let Some(maps) = sources.maps {
        meter
            .f64_observable_gauge(METRIC_EBPF_MAP_FILL_RATIO)
            .with_unit("1")
            .with_description(
                "Entries of an eBPF map divided by its capacity (LRU maps evict when full).",
            )
            .with_callback(move |observer| {
                for (name, entries, capacity) in maps() {
                    observer.observe(
                        fill_ratio(entries, capacity),
                        &[KeyValue::new(SIDECAR_EBPF_MAP_NAME, name)],
                    );
                }
            })
            .build();
    }
}

/// `entries / capacity`, 0 for a map without capacity.
pub fn fill_ratio(entries: usize, capacity: usize) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        entries as f64 / capacity as f64
    }
}

/// CPU time and resident memory of this process for `/stats` (zeros for what `/proc` does not
/// give).
pub fn process_stats() -> ProcessStats {
    ProcessStats {
        cpu_seconds: read_cpu().map(|c| c.user + c.system).unwrap_or(0.0),
        rss_bytes: read_rss().unwrap_or(0),
    }
}

/// CPU seconds of the process, by mode.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CpuTimes {
    user: f64,
    system: f64,
}

fn read_cpu() -> io::Result<CpuTimes> {
    let text = std::fs::read_to_string("/proc/self/stat")?;
    parse_stat(&text, clock_ticks()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected /proc/self/stat format",
        )
    })
}

fn read_rss() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/statm")?;
    parse_statm(&text, page_size()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected /proc/self/statm format",
        )
    })
}

/// `utime` and `stime` (fields 14 and 15 of `proc_pid_stat(5)`, in clock ticks) as seconds.
/// The command name (field 2) is in parentheses and may hold spaces or `)`, so fields are
/// counted from the last `)`.
fn parse_stat(text: &str, ticks_per_second: u64) -> Option<CpuTimes> {
    if ticks_per_second == 0 {
        return None;
    }
    let after_comm = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first one after the command name.
    let mut fields = after_comm.split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let hz = ticks_per_second as f64;
    Some(CpuTimes {
        user: utime as f64 / hz,
        system: stime as f64 / hz,
    })
}

/// Resident set size in bytes: the second field of `/proc/self/statm` (pages).
fn parse_statm(text: &str, page_size: u64) -> Option<u64> {
    let resident: u64 = text.split_ascii_whitespace().nth(1)?.parse().ok()?;
    resident.checked_mul(page_size)
}

/// `sysconf(name)` as a positive value, else `fallback`.
fn sysconf_or(name: libc::c_int, fallback: u64) -> u64 {
    // SAFETY: sysconf only reads a system constant; it takes no pointer and has no
    // preconditions besides a valid name, and an unknown name just returns -1.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(fallback)
}

/// Clock ticks per second (`_SC_CLK_TCK`; 100 on Linux when the call fails).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| sysconf_or(libc::_SC_CLK_TCK, 100))
}

/// Page size in bytes (`_SC_PAGESIZE`; 4096 when the call fails).
fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| sysconf_or(libc::_SC_PAGESIZE, 4096))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::Value;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    use opentelemetry_sdk::metrics::{
        InMemoryMetricExporter, InMemoryMetricExporterBuilder, PeriodicReader, SdkMeterProvider,
        Temporality,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::proxy::{MockOrigDst, Proxy, ProxyConfig};
    use crate::telemetry::Telemetry;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (we) ird (x)) S 1 4242 4242 0 -1 4194560 300 0 0 0 \
                    250 75 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        let cpu = parse_stat(line, 100).unwrap();
        assert_eq!(
            cpu,
            CpuTimes {
                user: 2.5,
                system: 0.75
            }
        );
        assert_eq!(parse_stat("1 (x) S 1 2", 100), None);
        assert_eq!(parse_stat("no parenthesis", 100), None);
        assert_eq!(parse_stat(line, 0), None);
    }

    #[test]
    fn parses_statm() {
        assert_eq!(
            parse_statm("2500 612 300 10 0 400 0\n", 4096),
            Some(612 * 4096)
        );
        assert_eq!(parse_statm("2500", 4096), None);
        assert_eq!(parse_statm("2500 x", 4096), None);
    }

    #[test]
    fn this_process_has_memory_and_its_cpu_time_grows_with_work() {
        let before = process_stats();
        assert!(before.rss_bytes > 0, "{before:?}");
        assert!(before.cpu_seconds >= 0.0);
        // Busy work in bounded slices until at least one clock tick more was charged (a
        // tick is 10 ms at the usual 100 Hz); give up after 10 s of wall time.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut acc = 0u64;
        let mut after = process_stats();
        while after.cpu_seconds <= before.cpu_seconds && Instant::now() < deadline {
            for i in 0..2_000_000u64 {
                acc = std::hint::black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
            after = process_stats();
        }
        std::hint::black_box(acc);
        assert!(
            after.cpu_seconds > before.cpu_seconds,
            "CPU time did not grow: {before:?} -> {after:?}"
        );
    }

    #[test]
    fn fill_ratio_handles_empty_capacity() {
        assert_eq!(fill_ratio(0, 0), 0.0);
        assert_eq!(fill_ratio(16_384, 65_536), 0.25);
    }

    /// One exported data point: metric name, unit, attributes, value, and kind.
    #[derive(Debug)]
    struct Point {
        name: String,
        unit: String,
        attrs: Vec<KeyValue>,
        value: f64,
        kind: &'static str,
    }

    impl Point {
        fn attr(&self, key: &str) -> Option<String> {
            self.attrs
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        }
    }

    fn collect<T: Copy>(
        name: &str,
        unit: &str,
        data: &MetricData<T>,
        f: impl Fn(T) -> f64,
        out: &mut Vec<Point>,
    ) {
        let mut push = |attrs: Vec<KeyValue>, value: f64, kind: &'static str| {
            out.push(Point {
                name: name.to_string(),
                unit: unit.to_string(),
                attrs,
                value,
                kind,
            })
        };
        match data {
            MetricData::Sum(s) => {
                let kind = if s.is_monotonic() {
                    "counter"
                } else {
                    "updown"
                };
                for p in s.data_points() {
                    push(p.attributes().cloned().collect(), f(p.value()), kind);
                }
            }
            MetricData::Gauge(g) => {
                for p in g.data_points() {
                    push(p.attributes().cloned().collect(), f(p.value()), "gauge");
                }
            }
            _ => {}
        }
    }

    struct Harness {
        exporter: InMemoryMetricExporter,
        provider: SdkMeterProvider,
    }

    impl Harness {
        fn new(sources: SelfSources) -> Self {
            let exporter = InMemoryMetricExporterBuilder::new()
                .with_temporality(Temporality::Cumulative)
                .build();
            let reader = PeriodicReader::builder(exporter.clone())
                .with_interval(Duration::from_secs(3600))
                .build();
            let provider = SdkMeterProvider::builder().with_reader(reader).build();
            register(&provider.meter("selfobs-test"), sources);
            Self { exporter, provider }
        }

        fn points(&self) -> Vec<Point> {
            self.exporter.reset();
            self.provider.force_flush().unwrap();
            let all = self.exporter.get_finished_metrics().unwrap();
            let mut out = Vec::new();
            let Some(rm) = all.last() else { return out };
            for scope in rm.scope_metrics() {
                for m in scope.metrics() {
                    match m.data() {
                        AggregatedMetrics::F64(d) => {
                            collect(m.name(), m.unit(), d, |v| v, &mut out)
                        }
                        AggregatedMetrics::U64(d) => {
                            collect(m.name(), m.unit(), d, |v| v as f64, &mut out)
                        }
                        AggregatedMetrics::I64(d) => {
                            collect(m.name(), m.unit(), d, |v| v as f64, &mut out)
                        }
                    }
                }
            }
            out
        }
    }

    fn find<'a>(points: &'a [Point], name: &str, attr: Option<(&str, &str)>) -> &'a Point {
        points
            .iter()
            .find(|p| p.name == name && attr.is_none_or(|(k, v)| p.attr(k).as_deref() == Some(v)))
            .unwrap_or_else(|| panic!("no {name} {attr:?} in {points:#?}"))
    }

    #[test]
    fn instruments_have_their_names_units_kinds_and_attributes() {
        let counters = Arc::new(ProxyCounters::default());
        counters.active_outbound.store(3, Ordering::Relaxed);
        counters.active_inbound.store(1, Ordering::Relaxed);
        counters.orig_dst_failures.store(4, Ordering::Relaxed);
        counters.loops_refused.store(5, Ordering::Relaxed);
        counters.connect_failures.store(6, Ordering::Relaxed);
        let maps: MapFillFn = Arc::new(|| {
            vec![
                ("ORIG_DST_BY_PEER".to_string(), 16_384, 65_536),
                ("CONN_STATE".to_string(), 0, 65_536),
            ]
        });
        let h = Harness::new(SelfSources {
            proxy: Arc::clone(&counters),
            maps: Some(maps),
        });
        let points = h.points();

        let user = find(&points, "process.cpu.time", Some(("cpu.mode", "user")));
        assert_eq!((user.unit.as_str(), user.kind), ("s", "counter"));
        let system = find(&points, "process.cpu.time", Some(("cpu.mode", "system")));
        // Same /proc reading as /stats, taken just before it (a young test process may
        // not have been charged a full clock tick yet, so 0 is possible).
        let later = process_stats().cpu_seconds;
        assert!(user.value >= 0.0 && system.value >= 0.0);
        assert!(
            user.value + system.value <= later,
            "{user:?} {system:?} {later}"
        );
        assert_eq!(
            points
                .iter()
                .filter(|p| p.name == "process.cpu.time")
                .count(),
            2
        );

        let rss = find(&points, "process.memory.usage", None);
        assert_eq!((rss.unit.as_str(), rss.kind), ("By", "updown"));
        assert!(rss.value > 0.0);
        assert!(rss.attrs.is_empty());

        for (direction, want) in [("outbound", 3.0), ("inbound", 1.0)] {
            let p = find(
                &points,
                "sidecar.proxy.connections.active",
                Some(("sidecar.direction", direction)),
            );
            assert_eq!(
                (p.unit.as_str(), p.kind, p.value),
                ("{connection}", "updown", want)
            );
        }
        for (kind, want) in [
            ("orig_dst_unknown", 4.0),
            ("loop_refused", 5.0),
            ("connect_failed", 6.0),
        ] {
            let p = find(&points, "sidecar.proxy.errors", Some(("error.type", kind)));
            assert_eq!(
                (p.unit.as_str(), p.kind, p.value),
                ("{error}", "counter", want)
            );
        }

        let peer = find(
            &points,
            "sidecar.ebpf.map.fill_ratio",
            Some(("sidecar.ebpf.map.name", "ORIG_DST_BY_PEER")),
        );
        assert_eq!(
            (peer.unit.as_str(), peer.kind, peer.value),
            ("1", "gauge", 0.25)
        );
        let conn = find(
            &points,
            "sidecar.ebpf.map.fill_ratio",
            Some(("sidecar.ebpf.map.name", "CONN_STATE")),
        );
        assert_eq!(conn.value, 0.0);

        // Callbacks read live values at each collection.
        counters.connect_failures.store(7, Ordering::Relaxed);
        let points = h.points();
        let p = find(
            &points,
            "sidecar.proxy.errors",
            Some(("error.type", "connect_failed")),
        );
        assert_eq!(p.value, 7.0);
    }

    #[test]
    fn no_map_instrument_without_a_map_source() {
        let h = Harness::new(SelfSources {
            proxy: Arc::new(ProxyCounters::default()),
            maps: None,
        });
        let points = h.points();
        assert!(points
            .iter()
            .all(|p| p.name != "sidecar.ebpf.map.fill_ratio"));
        assert!(points.iter().any(|p| p.name == "sidecar.proxy.errors"));
        // Check the value type of an attribute once: strings, as the conventions say.
        let p = find(&points, "sidecar.proxy.errors", None);
        assert!(matches!(p.attrs[0].value, Value::String(_)));
    }

    /// Waits (bounded) until `cond` holds.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A proxy on 127.0.0.1 whose every connection's original destination is `dst`.
    async fn start_proxy(
        dst: std::net::SocketAddr,
    ) -> (
        std::net::SocketAddr,
        Arc<ProxyCounters>,
        CancellationToken,
        tokio::task::JoinHandle<crate::proxy::DrainReport>,
    ) {
        let (telemetry, _tt) = Telemetry::for_tests();
        let cfg = ProxyConfig {
            outbound_addrs: vec!["127.0.0.1:0".parse().unwrap()],
            inbound_addrs: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            detect_timeout: Duration::from_millis(200),
            max_head_bytes: 16 * 1024,
        };
        let proxy = Proxy::bind(cfg, Arc::new(MockOrigDst::fixed(dst)), telemetry)
            .await
            .unwrap();
        let addr = proxy.local_addrs()[0];
        let counters = proxy.counters();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(proxy.run(shutdown.clone(), Duration::from_secs(2)));
        (addr, counters, shutdown, run)
    }

    #[tokio::test]
    async fn active_connection_gauge_follows_real_proxied_connections() {
        // An echo upstream.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let (addr, counters, shutdown, run) = start_proxy(upstream_addr).await;
        let h = Harness::new(SelfSources {
            proxy: Arc::clone(&counters),
            maps: None,
        });
        let active = |h: &Harness| {
            find(
                &h.points(),
                "sidecar.proxy.connections.active",
                Some(("sidecar.direction", "outbound")),
            )
            .value
        };
        assert_eq!(active(&h), 0.0);

        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"\x00opaque bytes").await.unwrap();
        let mut got = [0u8; 13];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(counters.active_outbound.load(Ordering::Relaxed), 1);
        assert_eq!(active(&h), 1.0);
        assert_eq!(counters.active_inbound.load(Ordering::Relaxed), 0);

        drop(client);
        eventually("the connection task to end", || {
            counters.active_outbound.load(Ordering::Relaxed) == 0
        })
        .await;
        assert_eq!(active(&h), 0.0);
        tokio::time::timeout(Duration::from_secs(10), echo)
            .await
            .expect("echo ends")
            .unwrap();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("proxy stops in time")
            .unwrap();

        // A port held bound but not listening refuses connects: the failed connection's task
        // also leaves the gauge at 0.
        let hold = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        hold.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        let dead = hold.local_addr().unwrap().as_socket().unwrap();
        let (addr, counters, shutdown, run) = start_proxy(dead).await;
        let refused = TcpStream::connect(addr).await.unwrap();
        eventually("the failed connect to be counted", || {
            counters.connect_failures.load(Ordering::Relaxed) == 1
        })
        .await;
        eventually("the failed task to end", || {
            counters.active_outbound.load(Ordering::Relaxed) == 0
        })
        .await;
        drop(refused);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("proxy stops in time")
            .unwrap();
    }
}
