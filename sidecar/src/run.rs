//! `sidecar run`: wires telemetry, proxy and eBPF interception together and owns the lifecycle
//! (ready → serve → SIGTERM/SIGINT → stop accepting → drain → flush → detach).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::{RunArgs, EXIT_USAGE};
use crate::ebpf::{InterceptConfig, Interception};
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
    for (flag, dir) in std::iter::once(("--cgroup", Some(&args.cgroup))).chain(std::iter::once((
        "--proxy-cgroup",
        args.proxy_cgroup.as_ref(),
    ))) {
        let Some(dir) = dir else { continue };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{flag} {}: not a directory", dir.display())),
            Err(e) => return Err(format!("{flag} {}: {e}", dir.display())),
        }
    }
    Ok(())
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let tcfg = TelemetryConfig {
        service_name: args.service_name.clone(),
        otlp_endpoint: args.otlp_endpoint.clone(),
        metric_export_interval: Duration::from_millis(args.metric_export_interval),
        span_schedule_delay: Duration::from_millis(args.bsp_schedule_delay),
        sink_path: args.sink_file.clone(),
        summary_interval: (args.summary_interval > 0)
            .then(|| Duration::from_secs(args.summary_interval)),
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
        connect_timeout: Duration::from_secs(args.connect_timeout),
        ..ProxyConfig::default()
    };
    let proxy = Proxy::bind(pcfg, Arc::new(SoOriginalDst), telemetry.clone())
        .await
        .context("cannot start the proxy listeners")?;

    let icfg = InterceptConfig {
        target_cgroup: args.cgroup.clone(),
        sidecar_cgroup: args.proxy_cgroup.clone(),
        outbound_port: args.outbound_port,
    };
    let interception =
        Interception::attach(&icfg).context("cannot attach the eBPF interception programs")?;
    info!(
        cgroup = %args.cgroup.display(),
        listeners = ?proxy.local_addrs(),
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
    if let Err(e) = telemetry_guard.shutdown().await {
        warn!("telemetry flush failed: {e}");
    }
    interception.detach();
    info!("interception detached; bye");
    Ok(())
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
