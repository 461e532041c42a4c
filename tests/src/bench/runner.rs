//! Runs the measurements. Every variant gets its own [`BenchWorld`] (namespaces, cgroups,
//! nginx, receivers) with its proxy, all started at once and warmed up; then each scenario is
//! measured round robin over the variants (see [`round_robin`]): a flat-out throughput run
//! with the proxy's CPU time read around it, a fixed-rate latency run, the proxy's peak RSS.
//! Separate worlds keep one variant's connections, TIME_WAIT sockets and netfilter tables away
//! from the others; running them side by side keeps their samples close in time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::bench::envoy::{Envoy, EnvoyConfig};
use crate::bench::load::{H2load, LoadResult, Wrk};
use crate::bench::model::{
    Latency, Measurement, Results, RunInfo, Sample, Scenario, SpanRate, Variant,
};
use crate::bench::topology::{BenchWorld, GRPC_PATH, GRPC_PORT, NGINX_H1_PORT, NGINX_H2_PORT};
use crate::error::{Error, IoContext, Result};
use crate::process::command_in;
use crate::sidecar::{sidecar_bin, Sidecar};

/// The proxy's outbound port (the sidecar's default; Envoy listens there too).
pub const PROXY_PORT: u16 = 15001;
/// Envoy's admin port in the pod namespace.
pub const ENVOY_ADMIN_PORT: u16 = 15000;

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Options {
    /// Repetitions of every (scenario, variant).
    pub reps: usize,
    /// Length of each flat-out throughput run.
    pub throughput: Duration,
    /// Length of each fixed-rate latency run.
    pub latency: Duration,
    /// Connections of the HTTP/1.1 runs (h2load uses a quarter, with 4 streams each).
    pub connections: u32,
    /// Fixed request rate of the latency runs (requests per second).
    pub rate: f64,
    /// Worker threads of each proxy.
    pub proxy_workers: u32,
    /// Scenarios to measure.
    pub scenarios: Vec<Scenario>,
    /// Variants to measure (besides the observation-overhead runs).
    pub variants: Vec<Variant>,
    /// Repetitions of the observation-overhead comparison (0: skip it).
    pub observation_reps: usize,
    /// The span-export benchmark's binary (`None`: skip it) and its arguments.
    pub spans: Option<(PathBuf, Vec<String>)>,
    /// Smoke run (CI): tiny, proves the harness only.
    pub smoke: bool,
}

impl Options {
    /// True for a variant measured only for the observation overhead (its latency is not
    /// reported).
    fn observation_only(&self, variant: Variant) -> bool {
        variant == Variant::DirectObserved && !self.variants.contains(&variant)
    }

    /// The full benchmark.
    pub fn full() -> Self {
        Self {
            reps: 5,
            throughput: Duration::from_secs(3),
            latency: Duration::from_secs(3),
            connections: 16,
            rate: 2000.0,
            proxy_workers: 1,
            scenarios: Scenario::ALL.to_vec(),
            variants: vec![
                Variant::Direct,
                Variant::SidecarEbpf,
                Variant::SidecarIptables,
                Variant::Envoy,
            ],
            observation_reps: 8,
            spans: None,
            smoke: false,
        }
    }

    /// The CI smoke run: every scenario and variant once, one second each.
    pub fn smoke() -> Self {
        Self {
            reps: 1,
            throughput: Duration::from_secs(1),
            latency: Duration::from_secs(1),
            connections: 4,
            rate: 200.0,
            observation_reps: 1,
            smoke: true,
            ..Self::full()
        }
    }
}

/// A started proxy (or none), stopped on drop.
enum Proxy {
    None,
    Sidecar(Sidecar),
    Envoy(Envoy),
}

impl Proxy {
    fn pid(&self) -> Option<u32> {
        match self {
            Proxy::None => None,
            Proxy::Sidecar(s) => Some(s.pid()),
            Proxy::Envoy(e) => Some(e.pid()),
        }
    }

    /// Stops the proxy: SIGTERM and a bounded wait for the sidecar (it detaches its programs
    /// and flushes telemetry), SIGKILL for Envoy (nothing to flush that is measured).
    fn stop(self) -> Result<()> {
        if let Proxy::Sidecar(mut s) = self {
            s.terminate()?;
            match s.wait_exit(Duration::from_secs(20))? {
                Some(status) if status.success() => {}
                other => {
                    return Err(Error::Unexpected(format!(
                        "sidecar did not exit cleanly on SIGTERM ({other:?}):\n{}",
                        s.log()
                    )))
                }
            }
        }
        Ok(())
    }
}

/// Starts what `variant` needs in `world`.
fn start_proxy(world: &BenchWorld, variant: Variant, opts: &Options) -> Result<Proxy> {
    let workers = opts.proxy_workers.to_string();
    let sidecar = |mode: &str| -> Result<Proxy> {
        let cgroup = world.pod_cgroup.path().to_string_lossy().into_owned();
        let endpoint = world.telemetry.endpoint();
        let args = [
            "run",
            "--cgroup",
            &cgroup,
            "--redirect",
            mode,
            "--worker-threads",
            &workers,
            "--otlp-endpoint",
            &endpoint,
            "--service-name",
            "bench-app",
            "--summary-interval",
            "0",
            "--log-level",
            "warn,sidecar=info",
        ];
        let mut cmd = command_in(
            Some(&world.pod),
            Some(&world.sidecar_cgroup),
            sidecar_bin(),
            &args,
        );
        cmd.env("NO_COLOR", "1");
        Ok(Proxy::Sidecar(Sidecar::spawn(
            cmd,
            &world.dir.join("sidecar.log"),
            Duration::from_secs(30),
        )?))
    };
    match variant {
        Variant::Direct => Ok(Proxy::None),
        Variant::DirectObserved => sidecar("off"),
        Variant::SidecarEbpf => sidecar("ebpf"),
        Variant::SidecarIptables => {
            crate::iptables::redirect_outbound(&world.pod, &world.app_cgroup, PROXY_PORT, &[])?;
            sidecar("iptables")
        }
        Variant::Envoy => {
            crate::iptables::redirect_outbound(&world.pod, &world.app_cgroup, PROXY_PORT, &[])?;
            let cfg = EnvoyConfig {
                listen: ([127, 0, 0, 1], PROXY_PORT).into(),
                admin: ([127, 0, 0, 1], ENVOY_ADMIN_PORT).into(),
                otlp: Some(world.telemetry.addr()),
                workers: opts.proxy_workers,
                service_name: "bench-app".into(),
            };
            Ok(Proxy::Envoy(Envoy::start(
                &world.pod,
                &world.sidecar_cgroup,
                &cfg,
                world.dir.path(),
                Duration::from_secs(30),
            )?))
        }
    }
}

/// CPU seconds (user + system, all threads) `pid` has used.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| Error::Unexpected(format!("unreadable {path}: {text}")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| Error::Unexpected(format!("unreadable {path}: {text}")))
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// `VmHWM` of `pid` in KiB (peak resident set size since start or the last reset).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| Error::Unexpected(format!("no VmHWM in {path}")))
}

/// Resets `pid`'s `VmHWM` to its current RSS (`clear_refs` 5).
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").ctx(|| format!("writing {path}"))
}

/// The throughput and latency load of `scenario`.
fn loads(world: &BenchWorld, scenario: Scenario, opts: &Options) -> Result<(Load, Option<Load>)> {
    let c = opts.connections;
    let lat_conns = 10.min(c.max(1));
    let wrk = |path: &str, close: bool, rate: Option<f64>, conns: u32, d: Duration| {
        Load::Wrk(Wrk {
            url: BenchWorld::url(NGINX_H1_PORT, path),
            connections: conns,
            duration: d,
            rate,
            close,
        })
    };
    let h2 = |url: String, headers: Vec<String>, body: Option<PathBuf>| {
        let flat = H2load {
            url,
            connections: (c / 4).max(1),
            streams: 4,
            duration: opts.throughput,
            rate: None,
            headers,
            body,
        };
        let fixed = H2load {
            connections: (c / 4).max(1),
            streams: 1,
            duration: opts.latency,
            rate: Some(opts.rate),
            ..flat.clone()
        };
        (Load::H2(flat), Some(Load::H2(fixed)))
    };
    Ok(match scenario {
        Scenario::Http1Small | Scenario::Http1Large => {
            let path = if scenario == Scenario::Http1Small {
                "/1k.bin"
            } else {
                "/64k.bin"
            };
            (
                wrk(path, false, None, c, opts.throughput),
                Some(wrk(path, false, Some(opts.rate), lat_conns, opts.latency)),
            )
        }
        Scenario::ConnRate => (wrk("/1k.bin", true, None, c, opts.throughput), None),
        Scenario::Http2 => h2(BenchWorld::url(NGINX_H2_PORT, "/1k.bin"), Vec::new(), None),
        Scenario::Grpc => h2(
            BenchWorld::url(GRPC_PORT, GRPC_PATH),
            vec![
                "content-type: application/grpc".into(),
                "te: trailers".into(),
            ],
            Some(world.grpc_body()?),
        ),
    })
}

/// One load-generator run of either kind.
#[derive(Clone, Debug)]
enum Load {
    Wrk(Wrk),
    H2(H2load),
}

impl Load {
    fn run(&self, world: &BenchWorld) -> Result<LoadResult> {
        let launch = |p: &str, a: &[&str]| world.app_command(p, a);
        match self {
            Load::Wrk(w) => w.run(&launch, world.dir.path()),
            Load::H2(h) => h.run(&launch, world.dir.path()),
        }
    }
}

/// Measures one scenario over the running proxy.
fn measure(
    world: &BenchWorld,
    proxy: &Proxy,
    scenario: Scenario,
    opts: &Options,
) -> Result<Sample> {
    let (flat, fixed) = loads(world, scenario, opts)?;
    let pid = proxy.pid();
    if let Some(pid) = pid {
        reset_peak_rss(pid)?;
    }
    let cpu0 = pid.map(cpu_seconds).transpose()?;
    let t = flat.run(world)?;
    let cpu1 = pid.map(cpu_seconds).transpose()?;
    let l = fixed.map(|f| f.run(world)).transpose()?;
    let peak_rss_kib = pid.map(peak_rss_kib).transpose()?;
    let cpu_s_per_1k = match (cpu0, cpu1) {
        (Some(a), Some(b)) if t.requests > 0 => Some((b - a) / t.requests as f64 * 1000.0),
        _ => None,
    };
    let latency = match &l {
        Some(r) => {
            let p = r.percentiles.ok_or_else(|| {
                Error::Unexpected(format!("{}: no latency percentiles", scenario.as_str()))
            })?;
            Some(Latency {
                target_rps: opts.rate,
                achieved_rps: r.rps(),
                p50_us: p.p50,
                p99_us: p.p99,
                p999_us: p.p999,
            })
        }
        None => None,
    };
    Ok(Sample {
        throughput_rps: t.rps(),
        requests: t.requests,
        errors: t.errors + l.map_or(0, |r| r.errors),
        latency,
        cpu_s_per_1k,
        peak_rss_kib,
    })
}

/// Set by [`request_stop`] (the driver's SIGINT/SIGTERM handler): the run stops before its next
/// measurement and tears everything down.
static STOP: AtomicBool = AtomicBool::new(false);

/// Asks the run to stop at the next measurement (async-signal-safe: one atomic store).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        Err(Error::Unexpected("interrupted".into()))
    } else {
        Ok(())
    }
}

/// A variant's own world with its proxy running.
struct Running {
    variant: Variant,
    proxy: Proxy,
    world: BenchWorld,
}

/// Starts a world and the proxy of each variant, all at once, and warms each up.
fn start_all(
    rt: &tokio::runtime::Runtime,
    variants: &[Variant],
    opts: &Options,
) -> Result<Vec<Running>> {
    let mut running = Vec::new();
    for &variant in variants {
        check_stop()?;
        let world = rt.block_on(BenchWorld::new(&format!("b{}", running.len())))?;
        let proxy = start_proxy(&world, variant, opts)?;
        // Warm-up: connections, allocator, caches; not measured.
        Load::Wrk(Wrk {
            url: BenchWorld::url(NGINX_H1_PORT, "/1k.bin"),
            connections: opts.connections,
            duration: Duration::from_secs(1),
            rate: None,
            close: false,
        })
        .run(&world)?;
        running.push(Running {
            variant,
            proxy,
            world,
        });
    }
    Ok(running)
}

/// Checks that each proxy's telemetry was on, stops the proxies and removes the worlds.
fn stop_all(running: Vec<Running>, opts: &Options) -> Result<()> {
    let mut first_error = None;
    for r in running {
        if matches!(r.variant, Variant::SidecarEbpf | Variant::Envoy)
            && !opts.smoke
            && r.world.telemetry.counts().spans == 0
        {
            first_error.get_or_insert(Error::Unexpected(format!(
                "{}: no span reached the OTLP receiver: its telemetry was not on",
                r.variant.as_str()
            )));
        }
        if let Err(e) = r.proxy.stop() {
            first_error.get_or_insert(e);
        }
        drop(r.world);
    }
    first_error.map_or(Ok(()), Err)
}

/// One sample of `scenario` over `r`, logged.
fn sample(r: &Running, scenario: Scenario, opts: &Options) -> Result<Sample> {
    check_stop()?;
    let sample = measure(&r.world, &r.proxy, scenario, opts).map_err(|e| {
        Error::Unexpected(format!(
            "{} over {}: {e}",
            scenario.as_str(),
            r.variant.as_str()
        ))
    })?;
    eprintln!(
        "bench: {:<10} {:<17} {:>9.0} req/s  p99 {:>8}  cpu/1k {:>8}  rss {:>8}  errors {}",
        scenario.as_str(),
        r.variant.as_str(),
        sample.throughput_rps,
        sample
            .latency
            .map_or("-".into(), |l| format!("{:.0}us", l.p99_us)),
        sample
            .cpu_s_per_1k
            .map_or("-".into(), |c| format!("{c:.4}s")),
        sample
            .peak_rss_kib
            .map_or("-".into(), |r| format!("{:.1}MiB", r as f64 / 1024.0)),
        sample.errors
    );
    Ok(sample)
}

/// Measures `scenario` `reps` times over every running variant, round robin: repetition `i`
/// of every variant, then repetition `i + 1` with the order rotated, so the samples of two
/// variants with the same index were taken seconds apart and drift on a shared machine (other
/// tenants, CPU steal) hits both alike.
fn round_robin(
    running: &[&Running],
    scenario: Scenario,
    reps: usize,
    opts: &Options,
    out: &mut Vec<Measurement>,
) -> Result<()> {
    let n = running.len();
    for rep in 0..reps {
        for k in 0..n {
            if let Some(r) = running.get((k + rep) % n) {
                let mut s = sample(r, scenario, opts)?;
                if opts.observation_only(r.variant) {
                    s.latency = None;
                }
                push(out, scenario, r.variant, s);
            }
        }
    }
    Ok(())
}

/// Runs everything `opts` asks for.
pub fn run(rt: &tokio::runtime::Runtime, opts: &Options, info: RunInfo) -> Result<Results> {
    let started = Instant::now();
    let mut results = Results {
        info,
        ..Results::default()
    };
    let mut variants = opts.variants.clone();
    if opts.observation_reps > 0 {
        for v in [Variant::Direct, Variant::DirectObserved] {
            if !variants.contains(&v) {
                variants.push(v);
            }
        }
    }
    eprintln!("bench: starting {} worlds", variants.len());
    let running = start_all(rt, &variants, opts)?;
    let outcome = (|| -> Result<()> {
        let main: Vec<&Running> = running
            .iter()
            .filter(|r| opts.variants.contains(&r.variant))
            .collect();
        // The connection-rate runs last: their TIME_WAIT sockets stay behind in each world.
        let mut scenarios = opts.scenarios.clone();
        scenarios.sort_by_key(|s| *s == Scenario::ConnRate);
        let (conn_rate, requests): (Vec<Scenario>, Vec<Scenario>) =
            scenarios.iter().partition(|s| **s == Scenario::ConnRate);
        for scenario in requests {
            eprintln!(
                "bench: {} ({:.0}s so far)",
                scenario.as_str(),
                started.elapsed().as_secs_f64()
            );
            round_robin(&main, scenario, opts.reps, opts, &mut results.measurements)?;
        }
        if opts.observation_reps > 0 {
            eprintln!(
                "bench: observation overhead ({:.0}s so far)",
                started.elapsed().as_secs_f64()
            );
            let pair: Vec<&Running> = running
                .iter()
                .filter(|r| matches!(r.variant, Variant::Direct | Variant::DirectObserved))
                .collect();
            round_robin(
                &pair,
                Scenario::Http1Small,
                opts.observation_reps,
                opts,
                &mut results.observation,
            )?;
        }
        for scenario in conn_rate {
            eprintln!(
                "bench: {} ({:.0}s so far)",
                scenario.as_str(),
                started.elapsed().as_secs_f64()
            );
            round_robin(&main, scenario, opts.reps, opts, &mut results.measurements)?;
        }
        Ok(())
    })();
    let stopped = stop_all(running, opts);
    outcome?;
    stopped?;
    if let Some((bin, args)) = &opts.spans {
        check_stop()?;
        eprintln!(
            "bench: span export ({:.0}s so far)",
            started.elapsed().as_secs_f64()
        );
        results.spans = Some(run_span_bench(bin, args)?);
    }
    Ok(results)
}

fn push(list: &mut Vec<Measurement>, scenario: Scenario, variant: Variant, sample: Sample) {
    match list
        .iter_mut()
        .find(|m| m.scenario == scenario && m.variant == variant)
    {
        Some(m) => m.samples.push(sample),
        None => list.push(Measurement {
            scenario,
            variant,
            samples: vec![sample],
        }),
    }
}

/// Runs the span-export benchmark (a separate binary linking the sidecar's telemetry
/// pipeline) and reads the JSON it prints.
fn run_span_bench(bin: &PathBuf, args: &[String]) -> Result<SpanRate> {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args);
    let out = crate::cmd::run_timeout(&mut cmd, Duration::from_secs(600))?;
    if !out.success() {
        return Err(Error::Unexpected(format!(
            "{} failed ({:?}): {}",
            bin.display(),
            out.code(),
            out.stderr_str()
        )));
    }
    // The pipeline prints its closing summary on stdout too; the JSON is the last line.
    let stdout = out.stdout_str();
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    serde_json::from_str(last).map_err(|e| {
        Error::Unexpected(format!(
            "{} printed no SpanRate JSON ({e}): {}",
            bin.display(),
            out.stdout_str()
        ))
    })
}
