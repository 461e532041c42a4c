//! `sidecar run`: wires telemetry, proxy, eBPF interception, policy and kernel observation
//! together and owns the lifecycle (ready → serve → SIGTERM/SIGINT → stop accepting → drain →
//! flush → detach).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::{RunArgs, EXIT_USAGE};
use crate::discover;
use crate::ebpf::{InterceptConfig, Interception};
use crate::policy::{PolicyWatcher, WatchConfig};
use crate::proxy::orig_dst::SoOriginalDst;
use crate::proxy::{Proxy, ProxyConfig};
use crate::telemetry::{self, TelemetryConfig};

/// Runs the sidecar until a stop signal; maps failures to exit codes.
pub fn main(args: RunArgs) -> ExitCode {
    // Check the cgroup paths before starting anything, so a typo is a usage error.
    if let Err(msg) = validate(&args) {
        eprintln!("sidecar: error: {msg}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecar: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("sidecar: error: {e:#}");
            ExitCode::FAILURE
        }
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

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let (target_cgroup, proxy_cgroup) = cgroups(&args)?;
    let tcfg = TelemetryConfig {
        service_name: args.service_name.clone(),
        otlp_endpoint: args.otlp_endpoint.clone(),
        metric_export_interval: Duration::from_millis(args.metric_export_interval),
        span_schedule_delay: Duration::from_millis(args.bsp_schedule_delay),
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
    match &args.otlp_endpoint {
        Some(endpoint) => info!(%endpoint, "exporting OTLP over gRPC"),
        None => info!(
            sink = %args.sink_file.display(),
            "no OTLP endpoint configured: writing OTLP-JSON lines to the local sink"
        ),
    }

    // Listeners first: the kernel programs only redirect to a proxy that is listening.
    let pcfg = ProxyConfig {
        outbound_addrs: vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, args.outbound_port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, args.outbound_port)),
        ],
        inbound_addrs: vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, args.inbound_port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, args.inbound_port)),
        ],
        connect_timeout: Duration::from_secs(args.connect_timeout),
        ..ProxyConfig::default()
    };
    let proxy = Proxy::bind(pcfg, Arc::new(SoOriginalDst), telemetry.clone())
        .await
        .context("cannot start the proxy listeners")?;

    // The policy is resolved before the programs attach and applied right after, so the
    // exclusions hold from the first connections on.
    let watcher = PolicyWatcher::start(WatchConfig::new(
        args.policy_config(),
        args.annotations_file.clone(),
        args.own_ports(),
    ))
    .context("cannot start the policy watcher")?;
    let icfg = InterceptConfig {
        target_cgroup: target_cgroup.clone(),
        sidecar_cgroup: proxy_cgroup,
        outbound_port: args.outbound_port,
    };
    let mut interception =
        Interception::attach(&icfg).context("cannot attach the eBPF interception programs")?;
    interception
        .apply_policy(&watcher.current())
        .context("cannot write the interception policy into the kernel maps")?;
    interception
        .attach_inbound(&proxy.inbound_listener_fds())
        .context("cannot attach inbound steering to the pod network namespace")?;
    let observer = interception
        .take_observer()
        .context("cannot open the kernel TCP observation ring buffer")?;
    let interception = Arc::new(interception);

    let stop_background = CancellationToken::new();
    let policy_task = tokio::spawn(apply_policy_changes(
        watcher.subscribe(),
        Arc::clone(&interception),
        stop_background.clone(),
    ));
    let observer_task = tokio::spawn(observer.run(telemetry.clone(), stop_background.clone()));

    info!(
        cgroup = %target_cgroup.display(),
        listeners = ?proxy.local_addrs(),
        inbound_port = args.inbound_port,
        "sidecar ready: interception attached, proxy listening"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_stop_signal(shutdown.clone()));
    let report = proxy.run(shutdown, args.drain()).await;
    info!(
        drained = report.drained,
        aborted = report.aborted,
        "proxy stopped; flushing telemetry"
    );
    // Stop the policy updates, then let the observer drain what the kernel still holds.
    stop_background.cancel();
    watcher.stop().await;
    let _ = policy_task.await;
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
    info!("interception detached; bye");
    Ok(())
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

async fn wait_for_stop_signal(shutdown: CancellationToken) {
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
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping (new connections now go direct)"),
        _ = int.recv() => info!("SIGINT: stopping (new connections now go direct)"),
    }
    shutdown.cancel();
}
