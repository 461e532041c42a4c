//! `sidecar run`: wires telemetry, proxy, eBPF interception, policy and kernel observation
//! together and owns the lifecycle (ready → serve → SIGTERM/SIGINT → stop accepting → drain →
//! flush → detach).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use opentelemetry::metrics::MeterProvider as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::prometheus::PrometheusReader;
use crate::admin::stats::{ConnectionStats, KernelStats, Stats};
use crate::admin::{AdminServer, AdminState, Readiness};
use crate::cli::{RunArgs, EXIT_USAGE};
use crate::discover;
use crate::ebpf::{InterceptConfig, Interception, RedirectMode};
use crate::export::config::{ExportSettings, OtlpProtocol, SignalSettings};
use crate::policy::{PolicyWatcher, WatchConfig};
use crate::proxy::orig_dst::{LocalAddrDst, OriginalDst, SoOriginalDst};
use crate::proxy::{Proxy, ProxyConfig};
use crate::telemetry::resource::ResourceAttribute;
use crate::telemetry::selfobs::{self, MapFillFn, SelfSources};
use crate::telemetry::{self, ConnectionDirection, TelemetryConfig};

/// Runs the sidecar until a stop signal; maps failures to exit codes.
pub fn main(config: crate::config::RunConfig) -> ExitCode {
    let crate::config::RunConfig {
        args,
        export,
        resource,
    } = config;
    // Check the cgroup paths before starting anything, so a typo is a usage error.
    if let Err(msg) = validate(&args) {
        eprintln!("sidecar: error: {msg}");
        return ExitCode::from(EXIT_USAGE);
    }
    scrub_exporter_environment();
    let runtime = match build_runtime(args.worker_threads.map(usize::from)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecar: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args, export, resource)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("sidecar: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Name of the async runtime's worker threads (as `/proc/<pid>/task/*/comm` shows it).
pub const WORKER_THREAD_NAME: &str = "sidecar-worker";
/// Name of the runtime's other threads (its blocking pool, and workers until they first go
/// idle), at most 15 bytes like the other.
pub const RUNTIME_THREAD_NAME: &str = "sidecar-rt";

/// The multi-threaded runtime: `workers` worker threads (tokio's default when `None`: one per
/// CPU available to the process, or `TOKIO_WORKER_THREADS`), named [`WORKER_THREAD_NAME`];
/// the runtime's other threads are named [`RUNTIME_THREAD_NAME`].
///
/// Tokio runs its workers on threads of its blocking pool, and which pool thread picks up a
/// worker is not fixed, so a worker names its own thread: the first time it parks (goes idle,
/// which only workers do), which happens as soon as it starts without work.
pub fn build_runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .enable_all()
        .thread_name(RUNTIME_THREAD_NAME)
        .on_thread_park(name_worker_thread);
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder.build()
}

thread_local! {
    /// Whether this thread has been named [`WORKER_THREAD_NAME`].
    static NAMED_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Names the calling thread [`WORKER_THREAD_NAME`] in the kernel (its `comm`), once.
fn name_worker_thread() {
    if NAMED_WORKER.with(|named| named.replace(true)) {
        return;
    }
    const NAME: &[u8] = b"sidecar-worker\0";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the pointer
    // (NAME is 15 with its NUL, static) and renames the calling thread; no other memory is
    // touched. A failure only leaves the previous name.
    let _ = unsafe { libc::prctl(libc::PR_SET_NAME, NAME.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Removes the `OTEL_EXPORTER_OTLP_*` variables from this process's environment. The exporters
/// get every setting explicitly, resolved with the documented precedence (flag > environment >
/// file); the OTLP crate would otherwise also read some of these variables itself (headers,
/// timeout, insecure) and mix them in behind a flag or the config file. Runs before the async
/// runtime exists, while the process has one thread.
fn scrub_exporter_environment() {
    let names: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_str()
                .is_some_and(|n| n.starts_with("OTEL_EXPORTER_OTLP_"))
        })
        .collect();
    for name in names {
        std::env::remove_var(name);
    }
}

fn validate(args: &RunArgs) -> Result<(), String> {
    for (flag, dir) in [
        ("--cgroup", args.cgroup.as_ref()),
        ("--proxy-cgroup", args.proxy_cgroup.as_ref()),
    ] {
        let Some(dir) = dir else { continue };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{flag} {}: not a directory", dir.display())),
            Err(e) => return Err(format!("{flag} {}: {e}", dir.display())),
        }
    }
    Ok(())
}

/// The target (pod) cgroup and the proxy's own cgroup: from the flags, or discovered from
/// this process's cgroup when `--cgroup` is not given (the Kubernetes sidecar layout).
fn cgroups(args: &RunArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(target) = &args.cgroup {
        return Ok((target.clone(), args.proxy_cgroup.clone()));
    }
    let found = discover::pod_cgroup(&args.host_cgroup_root)
        .context("--cgroup was not given and the pod's cgroup could not be discovered")?;
    info!(
        pod = %found.pod.display(),
        sidecar = %found.sidecar.display(),
        via_host_root = found.via_host_root,
        "discovered the pod cgroup from this container's own"
    );
    Ok((
        found.pod,
        Some(args.proxy_cgroup.clone().unwrap_or(found.sidecar)),
    ))
}

async fn serve(
    args: RunArgs,
    export: ExportSettings,
    resource: Vec<ResourceAttribute>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // The admin server first: `/healthz` answers while the rest starts, `/readyz` says why it
    // is not ready yet.
    let readiness = Arc::new(Readiness::default());
    let admin = AdminServer::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot bind the admin server on {}", args.admin_addr))?;
    let prometheus = PrometheusReader::new();
    // `/stats` answers from the start: the version, uptime and readiness until the proxy and
    // the programs are up, everything once they are.
    let full_stats: Arc<OnceLock<StatsFn>> = Arc::new(OnceLock::new());
    let early_stats: StatsFn = {
        let slot = Arc::clone(&full_stats);
        let readiness = Arc::clone(&readiness);
        Arc::new(move || match slot.get() {
            Some(full) => full(),
            None => Stats {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_secs: started.elapsed().as_secs_f64(),
                ready: readiness.is_ready(),
                draining: readiness.is_draining(),
                process: selfobs::process_stats(),
                ..Stats::default()
            },
        })
    };
    let stop_admin = CancellationToken::new();
    let admin_addr = admin.local_addr();
    let admin_task = admin.spawn(
        AdminState {
            readiness: Arc::clone(&readiness),
            prometheus: prometheus.clone(),
            stats: early_stats,
        },
        stop_admin.clone(),
    );
    let (target_cgroup, proxy_cgroup) = cgroups(&args)?;
    let tcfg = TelemetryConfig {
        export: export.clone(),
        resource: telemetry::resource::to_resource(&resource),
        prometheus: Some(prometheus.clone()),
        sink_path: args.sink_file.clone(),
        summary_interval: (args.summary_interval > 0)
            .then(|| Duration::from_secs(args.summary_interval)),
        sampling: telemetry::SamplingConfig {
            kind: args.traces_sampler,
            ratio: args.traces_sampler_arg,
        },
        routes: args.routes.clone(),
        max_routes: args.max_routes,
        redact_query_params: args.redact_query_params.clone(),
    };
    let (telemetry, telemetry_guard) =
        telemetry::init(&tcfg).context("cannot start the telemetry pipeline")?;
    log_export_destinations(&export, &args.sink_file);

    let mode = args.redirect;
    log_redirect_mode(mode, args.outbound_port, args.inbound_port);

    // Listeners first: the kernel programs only redirect to a proxy that is listening.
    let proxy = Proxy::bind(
        proxy_config(&args),
        original_dst(mode, ConnectionDirection::Outbound),
        telemetry.clone(),
    )
    .await
    .context("cannot start the proxy listeners")?
    .with_inbound_dst(original_dst(mode, ConnectionDirection::Inbound));
    readiness.set_listeners_up();

    // The policy is resolved before the programs attach and applied right after, so the
    // exclusions hold from the first connections on. Only the eBPF redirection uses it.
    let watcher = if mode.redirects_in_kernel() {
        Some(
            PolicyWatcher::start(WatchConfig::new(
                args.policy_config(),
                args.annotations_file.clone(),
                args.own_ports(),
            ))
            .context("cannot start the policy watcher")?,
        )
    } else {
        None
    };
    let icfg = InterceptConfig {
        target_cgroup: target_cgroup.clone(),
        sidecar_cgroup: proxy_cgroup,
        outbound_port: args.outbound_port,
    };
    let mut interception = Interception::attach_with_mode(&icfg, mode)
        .context("cannot attach the eBPF interception programs")?;
    if let Some(watcher) = &watcher {
        interception
            .apply_policy(&watcher.current())
            .context("cannot write the interception policy into the kernel maps")?;
    }
    if mode.steers_inbound() {
        interception
            .attach_inbound(&proxy.inbound_listener_fds())
            .context("cannot attach inbound steering to the pod network namespace")?;
    }
    let observer = interception
        .take_observer()
        .context("cannot open the kernel TCP observation ring buffer")?;
    let interception = Arc::new(interception);
    readiness.set_programs_attached();

    // The sidecar's own instruments, and the admin endpoints. Both reach the interception
    // through a weak reference so it can still be detached by value at exit.
    let maps: MapFillFn = {
        let weak = Arc::downgrade(&interception);
        Arc::new(move || weak.upgrade().map(|i| i.map_fill()).unwrap_or_default())
    };
    selfobs::register(
        &telemetry_guard.meter_provider().meter("sidecar"),
        SelfSources {
            proxy: proxy.counters(),
            maps: Some(Arc::clone(&maps)),
        },
    );
    let stats: StatsFn = {
        let summary = Arc::clone(telemetry_guard.summary());
        let counters = proxy.counters();
        let export_stats = telemetry_guard.export_stats();
        let readiness = Arc::clone(&readiness);
        let telemetry = telemetry.clone();
        Arc::new(move || Stats {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: started.elapsed().as_secs_f64(),
            ready: readiness.is_ready(),
            draining: readiness.is_draining(),
            connections: ConnectionStats {
                active_outbound: counters.active_outbound.load(Ordering::Relaxed),
                active_inbound: counters.active_inbound.load(Ordering::Relaxed),
                accepted: counters.accepted.load(Ordering::Relaxed),
                connect_failures: counters.connect_failures.load(Ordering::Relaxed),
                orig_dst_failures: counters.orig_dst_failures.load(Ordering::Relaxed),
            },
            traffic: summary.snapshot(),
            export: export_stats.snapshot(),
            kernel: KernelStats {
                ringbuf_overflows: telemetry.tcp_ringbuf_overflows_total(),
                map_fill: maps()
                    .into_iter()
                    .map(|(name, entries, capacity)| (name, selfobs::fill_ratio(entries, capacity)))
                    .collect(),
            },
            process: selfobs::process_stats(),
        })
    };
    // Only this function sets it, once.
    let _ = full_stats.set(stats);

    let stop_background = CancellationToken::new();
    let policy_task = watcher.as_ref().map(|watcher| {
        tokio::spawn(apply_policy_changes(
            watcher.subscribe(),
            Arc::clone(&interception),
            stop_background.clone(),
        ))
    });
    let observer_task = tokio::spawn(observer.run(telemetry.clone(), stop_background.clone()));

    info!(
        cgroup = %target_cgroup.display(),
        listeners = ?proxy.local_addrs(),
        inbound_port = args.inbound_port,
        admin = %admin_addr,
        redirect = %mode,
        "sidecar ready: interception attached, proxy listening"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_stop_signal(shutdown.clone(), {
        let readiness = Arc::clone(&readiness);
        move || readiness.set_draining()
    }));
    let report = proxy.run(shutdown, args.drain()).await;
    info!(
        drained = report.drained,
        aborted = report.aborted,
        "proxy stopped; flushing telemetry"
    );
    // Stop the policy updates, then let the observer drain what the kernel still holds.
    stop_background.cancel();
    if let Some(watcher) = watcher {
        watcher.stop().await;
    }
    if let Some(task) = policy_task {
        let _ = task.await;
    }
    match observer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("kernel TCP observation ended with an error: {e}"),
        Err(e) => warn!("kernel TCP observation task failed: {e}"),
    }
    if let Err(e) = telemetry_guard.shutdown().await {
        warn!("telemetry flush failed: {e}");
    }
    match Arc::try_unwrap(interception) {
        Ok(interception) => interception.detach(),
        Err(_) => warn!("interception still referenced at exit; the kernel detaches it on exit"),
    }
    // The admin server goes last, so `/readyz` reports the drain until the end.
    stop_admin.cancel();
    if let Err(e) = admin_task.await {
        warn!("admin server task failed: {e}");
    }
    info!("interception detached; bye");
    Ok(())
}

/// Builds the `/stats` document.
type StatsFn = Arc<dyn Fn() -> Stats + Send + Sync>;

/// The proxy's listeners: outbound on loopback; inbound on loopback where `sk_lookup` hands
/// connections over, on every address where iptables `REDIRECT` sends them (to the primary
/// address of the interface they arrived on, e.g. the pod's IP).
fn proxy_config(args: &RunArgs) -> ProxyConfig {
    let (inbound_v4, inbound_v6) = match args.redirect {
        RedirectMode::Iptables => (Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED),
        RedirectMode::Ebpf | RedirectMode::Off => (Ipv4Addr::LOCALHOST, Ipv6Addr::LOCALHOST),
    };
    ProxyConfig {
        outbound_addrs: vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, args.outbound_port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, args.outbound_port)),
        ],
        inbound_addrs: vec![
            SocketAddr::from((inbound_v4, args.inbound_port)),
            SocketAddr::from((inbound_v6, args.inbound_port)),
        ],
        connect_timeout: Duration::from_secs(args.connect_timeout),
        ..ProxyConfig::default()
    }
}

/// How the proxy finds an accepted connection's original destination in `mode`: with eBPF,
/// `SO_ORIGINAL_DST` answered by `cgroup/getsockopt` outbound and the local address inbound
/// (`sk_lookup` keeps it); with iptables, conntrack's `SO_ORIGINAL_DST` both ways.
fn original_dst(mode: RedirectMode, direction: ConnectionDirection) -> Arc<dyn OriginalDst> {
    match (mode, direction) {
        (RedirectMode::Iptables, _) => Arc::new(ConntrackDst),
        (RedirectMode::Ebpf | RedirectMode::Off, ConnectionDirection::Outbound) => {
            Arc::new(SoOriginalDst)
        }
        (RedirectMode::Ebpf | RedirectMode::Off, ConnectionDirection::Inbound) => {
            Arc::new(LocalAddrDst)
        }
    }
}

/// The original destination of a connection an iptables/nftables `REDIRECT` (or `DNAT`) sent
/// to the proxy: conntrack's answer to `SO_ORIGINAL_DST`. A connection that was not
/// translated (a client dialling the proxy's port itself) has its own local address as
/// original destination; it is refused, as forwarding it would connect the proxy to itself.
#[derive(Clone, Copy, Debug, Default)]
struct ConntrackDst;

impl OriginalDst for ConntrackDst {
    fn original_dst(&self, accepted: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
        let dst = SoOriginalDst.original_dst(accepted)?;
        check_translated(dst, accepted.local_addr()?)
    }
}

/// `dst` unless it is the accepted socket's own address `local` (the connection was not
/// redirected).
fn check_translated(dst: SocketAddr, local: SocketAddr) -> std::io::Result<SocketAddr> {
    let same_ip = match (dst.ip(), local.ip()) {
        (a, b) if a == b => true,
        (IpAddr::V6(a), IpAddr::V4(b)) | (IpAddr::V4(b), IpAddr::V6(a)) => {
            a.to_ipv4_mapped() == Some(b)
        }
        _ => false,
    };
    if same_ip && dst.port() == local.port() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "connection to {local} was not redirected (no NAT record): its original \
                 destination is the proxy itself"
            ),
        ));
    }
    Ok(dst)
}

/// One info line saying how connections reach the proxy.
fn log_redirect_mode(mode: RedirectMode, outbound_port: u16, inbound_port: u16) {
    match mode {
        RedirectMode::Ebpf => info!(
            redirect = %mode,
            "redirect mode ebpf: eBPF programs redirect outbound connects to port \
             {outbound_port} and steer inbound connections to port {inbound_port}"
        ),
        RedirectMode::Iptables => info!(
            redirect = %mode,
            "redirect mode iptables: expecting iptables/nftables REDIRECT rules to send \
             outbound connections to port {outbound_port} and inbound ones to port \
             {inbound_port}; original destinations from conntrack; eBPF programs observe only"
        ),
        RedirectMode::Off => info!(
            redirect = %mode,
            "redirect mode off: no redirection, eBPF programs observe only (the proxy \
             listens on ports {outbound_port} and {inbound_port} for explicit use)"
        ),
    }
}

/// Logs where each signal goes.
fn log_export_destinations(export: &ExportSettings, sink: &std::path::Path) {
    if export.disabled {
        info!("OTEL_SDK_DISABLED: no spans and no OTLP export (the admin /metrics still works)");
        return;
    }
    let describe = |signal: &str, s: Option<&SignalSettings>| match s {
        Some(s) => info!(
            signal,
            endpoint = %s.endpoint,
            protocol = match s.protocol {
                OtlpProtocol::Grpc => "grpc",
                OtlpProtocol::HttpProtobuf => "http/protobuf",
            },
            tls = s.tls.is_some(),
            "exporting OTLP"
        ),
        None => info!(
            signal,
            sink = %sink.display(),
            "no OTLP endpoint for this signal: writing OTLP-JSON lines to the local sink"
        ),
    };
    describe("traces", export.traces.as_ref());
    describe("metrics", export.metrics.as_ref());
}

/// Writes every new policy into the kernel maps until stopped.
async fn apply_policy_changes(
    mut rx: tokio::sync::watch::Receiver<crate::policy::KernelPolicy>,
    interception: Arc<Interception>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let policy = rx.borrow_and_update().clone();
                match interception.apply_policy(&policy) {
                    Ok(()) => tracing::debug!("interception policy written to the kernel maps"),
                    Err(e) => error!("cannot apply the new interception policy (the previous one stays): {e}"),
                }
            }
        }
    }
}

/// Exit status after a second stop signal: 128 + the signal number, as a shell reports a
/// process killed by it.
fn forced_exit_code(kind: StopSignal) -> i32 {
    128 + match kind {
        StopSignal::Term => libc::SIGTERM,
        StopSignal::Int => libc::SIGINT,
    }
}

#[derive(Clone, Copy, Debug)]
enum StopSignal {
    Term,
    Int,
}

async fn next_stop_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> StopSignal {
    tokio::select! {
        _ = term.recv() => StopSignal::Term,
        _ = int.recv() => StopSignal::Int,
    }
}

/// Cancels `shutdown` on the first SIGTERM/SIGINT (and marks the sidecar not ready); a second
/// one exits the process at once, without draining or flushing. The kernel detaches the
/// programs when the process's links close.
async fn wait_for_stop_signal(shutdown: CancellationToken, on_first: impl FnOnce()) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!("cannot install signal handlers: {e}; stopping");
            shutdown.cancel();
            return;
        }
    };
    let first = next_stop_signal(&mut term, &mut int).await;
    info!(
        signal = ?first,
        "{}: stopping (new connections now go direct; a second signal exits at once)",
        match first {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    );
    on_first();
    shutdown.cancel();
    let second = next_stop_signal(&mut term, &mut int).await;
    let code = forced_exit_code(second);
    warn!(signal = ?second, code, "second stop signal: exiting now without draining");
    eprintln!("sidecar: second stop signal: exiting now (code {code})");
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untranslated_connections_are_refused() {
        let local = sock("198.18.0.1:15006");
        assert_eq!(
            check_translated(sock("198.18.0.1:8080"), local).unwrap(),
            sock("198.18.0.1:8080")
        );
        assert_eq!(
            check_translated(sock("198.18.0.2:15006"), local).unwrap(),
            sock("198.18.0.2:15006")
        );
        let err = check_translated(local, local).unwrap_err();
        assert!(err.to_string().contains("not redirected"), "{err}");
        // An IPv4 connection on a dual-stack socket shows the IPv4-mapped address.
        assert!(
            check_translated(sock("127.0.0.1:15001"), sock("[::ffff:127.0.0.1]:15001")).is_err()
        );
        assert!(check_translated(sock("[::1]:15001"), sock("[::1]:15001")).is_err());
    }

    #[tokio::test]
    async fn conntrack_lookup_fails_for_a_direct_connection() {
        // No NAT rule sent this connection anywhere: conntrack has no translation for it
        // (or no conntrack at all), so there is no original destination to forward to.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let _client = client.unwrap();
        let (accepted, _) = accepted.unwrap();
        assert!(ConntrackDst.original_dst(&accepted).is_err());
    }

    fn args(extra: &[&str]) -> RunArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = ["sidecar"].iter().chain(extra).copied();
        Wrap::try_parse_from(argv).unwrap().run
    }

    #[test]
    fn inbound_listeners_bind_every_address_only_for_iptables() {
        let ebpf = proxy_config(&args(&["--inbound-port", "16006"]));
        assert_eq!(
            ebpf.inbound_addrs,
            [sock("127.0.0.1:16006"), sock("[::1]:16006")]
        );
        assert_eq!(
            ebpf.outbound_addrs,
            [sock("127.0.0.1:15001"), sock("[::1]:15001")]
        );
        let off = proxy_config(&args(&["--redirect", "off"]));
        assert_eq!(off.inbound_addrs, ebpf_default_inbound());
        let iptables = proxy_config(&args(&["--redirect", "iptables"]));
        assert_eq!(
            iptables.inbound_addrs,
            [sock("0.0.0.0:15006"), sock("[::]:15006")]
        );
        assert_eq!(
            iptables.outbound_addrs,
            [sock("127.0.0.1:15001"), sock("[::1]:15001")],
            "REDIRECT sends locally generated connections to loopback"
        );
    }

    fn ebpf_default_inbound() -> Vec<SocketAddr> {
        vec![sock("127.0.0.1:15006"), sock("[::1]:15006")]
    }

    #[test]
    fn worker_threads_are_counted_and_named() {
        assert_eq!(
            WORKER_THREAD_NAME.len(),
            14,
            "fits the kernel's 15-byte comm"
        );
        assert!(RUNTIME_THREAD_NAME.len() <= 15);
        let runtime = build_runtime(Some(3)).unwrap();
        assert_eq!(runtime.metrics().num_workers(), 3);
        let comm = |tid: i64| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .unwrap()
                .trim_end()
                .to_owned()
        };
        let workers_named = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.trim_end() == WORKER_THREAD_NAME)
                .count()
        };
        // SAFETY: gettid has no preconditions.
        let tid = || i64::from(unsafe { libc::gettid() });
        let (worker, blocking) = runtime.block_on(async {
            let worker = tokio::spawn(async move { tid() }).await.unwrap();
            let blocking = tokio::task::spawn_blocking(move || {
                (tid(), std::thread::current().name().map(str::to_owned))
            })
            .await
            .unwrap();
            (worker, blocking)
        });
        // Workers name themselves when they first go idle: wait (bounded) for all three. The
        // kernel's view is what operators count; no other test of this crate names threads so.
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers_named() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(workers_named(), 3);
        assert_eq!(comm(worker), WORKER_THREAD_NAME);
        assert_eq!(comm(blocking.0), RUNTIME_THREAD_NAME);
        assert_eq!(blocking.1.as_deref(), Some(RUNTIME_THREAD_NAME));
        drop(runtime);
        let default = build_runtime(None).unwrap();
        assert!(default.metrics().num_workers() >= 1);
    }
}
