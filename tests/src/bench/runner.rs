//! Runs the measurements: for each repetition and variant a fresh [`BenchWorld`] (so no
//! connection state, TIME_WAIT socket or netfilter table of one variant touches the next), the
//! proxy started, a warm-up, then every scenario: a flat-out throughput run (CPU time of the
//! proxy read around it), a fixed-rate latency run, the proxy's peak RSS.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::bench::envoy::{self, Envoy, EnvoyConfig};
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
    /// The full benchmark.
    pub fn full() -> Self {
        Self {
            reps: 3,
            throughput: Duration::from_secs(5),
            latency: Duration::from_secs(5),
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
            observation_reps: 5,
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
            envoy::redirect_outbound(&world.pod, &world.app_cgroup, PROXY_PORT, &[])?;
            sidecar("iptables")
        }
        Variant::Envoy => {
            envoy::redirect_outbound(&world.pod, &world.app_cgroup, PROXY_PORT, &[])?;
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

/// Pause after a world is torn down, so the kernel's clean-up of its namespaces (sockets in
/// TIME_WAIT among them) is not billed to the next measurement.
const SETTLE: Duration = Duration::from_millis(1500);

/// Runs one variant in a fresh world: start, warm up, every scenario, stop.
fn run_variant(
    rt: &tokio::runtime::Runtime,
    variant: Variant,
    scenarios: &[Scenario],
    opts: &Options,
) -> Result<Vec<(Scenario, Sample)>> {
    let world = rt.block_on(BenchWorld::new("bench"))?;
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
    let mut out = Vec::new();
    for &scenario in scenarios {
        let sample = measure(&world, &proxy, scenario, opts).map_err(|e| {
            Error::Unexpected(format!(
                "{} over {}: {e}",
                scenario.as_str(),
                variant.as_str()
            ))
        })?;
        eprintln!(
            "bench: {:<10} {:<17} {:>9.0} req/s  p99 {:>8}  cpu/1k {:>8}  rss {:>8}  errors {}",
            scenario.as_str(),
            variant.as_str(),
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
        out.push((scenario, sample));
    }
    if variant == Variant::SidecarEbpf || variant == Variant::Envoy {
        let spans = world.telemetry.counts().spans;
        if spans == 0 && !opts.smoke {
            return Err(Error::Unexpected(format!(
                "{}: no span reached the OTLP receiver: its telemetry was not on",
                variant.as_str()
            )));
        }
    }
    proxy.stop()?;
    drop(world);
    std::thread::sleep(SETTLE);
    Ok(out)
}

/// Runs everything `opts` asks for.
pub fn run(rt: &tokio::runtime::Runtime, opts: &Options, info: RunInfo) -> Result<Results> {
    let started = Instant::now();
    let mut results = Results {
        info,
        ..Results::default()
    };
    // The connection-rate runs last in each world: their TIME_WAIT sockets stay behind.
    let mut scenarios = opts.scenarios.clone();
    scenarios.sort_by_key(|s| *s == Scenario::ConnRate);
    let mut variants = opts.variants.clone();
    for rep in 0..opts.reps {
        for &variant in &variants {
            eprintln!(
                "bench: repetition {}/{} of {} ({:.0}s so far)",
                rep + 1,
                opts.reps,
                variant.as_str(),
                started.elapsed().as_secs_f64()
            );
            for (scenario, sample) in run_variant(rt, variant, &scenarios, opts)? {
                push(&mut results.measurements, scenario, variant, sample);
            }
        }
        // Rotate the order, so no variant always runs first (or last) in a repetition.
        variants.rotate_left(1);
    }
    for rep in 0..opts.observation_reps {
        let pair = if rep % 2 == 0 {
            [Variant::Direct, Variant::DirectObserved]
        } else {
            [Variant::DirectObserved, Variant::Direct]
        };
        for variant in pair {
            eprintln!(
                "bench: observation overhead {}/{}: {}",
                rep + 1,
                opts.observation_reps,
                variant.as_str()
            );
            for (scenario, sample) in run_variant(rt, variant, &[Scenario::Http1Small], opts)? {
                let mut sample = sample;
                sample.latency = None;
                push(&mut results.observation, scenario, variant, sample);
            }
        }
    }
    if let Some((bin, args)) = &opts.spans {
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
