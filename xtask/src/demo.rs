//! `cargo xtask demo`: the main job on a fresh machine. Sets up, builds, makes a throwaway pod
//! (network namespace + cgroup) whose unmodified curl calls a real HTTP server in another
//! namespace, runs the sidecar on it with the default local sink, shows its live summary and
//! where the OTLP-JSON went, and cleans everything up.
//!
//! With `--collector HOST:PORT` the telemetry goes over OTLP/gRPC to a collector on the host
//! instead (deploy/compose), and the sidecar's admin port is published on the host for
//! Prometheus: the pod's network namespace has no route to the host, so the demo relays both.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sidecar_tests::{PodWorld, SidecarConfig};

use crate::{build, setup, util};

/// Flags of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the demo pod sends traffic, in seconds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(3..=600))]
    seconds: u64,
    /// Send the telemetry over OTLP/gRPC to this collector on the host (deploy/compose:
    /// `127.0.0.1:4317`) instead of the local sink file, and publish the sidecar's admin port
    /// on the host's 0.0.0.0:15020 (Prometheus of deploy/compose scrapes it).
    #[arg(long, value_name = "HOST:PORT")]
    collector: Option<SocketAddr>,
}

/// The sidecar's admin port (its default `--admin-addr`), published on the host with
/// `--collector`.
const ADMIN_PORT: u16 = 15020;

/// The app's request mix: (curl arguments, what it shows).
const REQUESTS: &[&[&str]] = &[
    &["-o", "/dev/null", "{v4}/bytes/1024"],
    &["-o", "/dev/null", "{v4}/bytes/65536"],
    &["-o", "/dev/null", "{v4}/status/404"],
    &["-o", "/dev/null", "{v4}/status/503"],
    &["-o", "/dev/null", "{v4}/slow?ms=40"],
    &["-o", "/dev/null", "-d", "hello sidecar", "{v4}/sha256"],
    &["-o", "/dev/null", "{v6}/bytes/2048"],
];

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    setup::run()?;
    build::all()?;
    sidecar_tests::prereq::check().context("the demo needs these")?;

    let out_dir = util::workspace_root().join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    let sink = out_dir.join("telemetry.otlp.jsonl");
    if sink.exists() {
        std::fs::remove_file(&sink)?;
    }

    println!(
        "\n== demo: building a throwaway pod (network namespaces, veth, cgroups, HTTP server)"
    );
    let world = PodWorld::new("demo")?;
    println!(
        "   pod cgroup {}; app calls {} and {}",
        world.pod_cgroup.path().display(),
        world.url("/"),
        world.url_v6("/")
    );
    let otlp_in_pod = match args.collector {
        Some(collector) => {
            let inside = relay_pod_to_host(&world, collector)?;
            relay_host_to_pod(
                &world,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, ADMIN_PORT)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)),
            )?;
            println!(
                "   telemetry goes to the collector at {collector} (relayed from {inside} in the \
                 pod); the sidecar's admin port is published on 0.0.0.0:{ADMIN_PORT}"
            );
            Some(inside)
        }
        None => None,
    };
    let cfg = SidecarConfig {
        sink_file: otlp_in_pod.is_none().then(|| sink.clone()),
        otlp_endpoint: otlp_in_pod.map(|a| format!("http://{a}")),
        service_name: otlp_in_pod.map(|_| "sidecar-demo".to_owned()),
        summary_interval_secs: Some(5),
        metric_export_interval_ms: Some(5_000),
        bsp_schedule_delay_ms: Some(1_000),
        drain_timeout_secs: Some(5),
        ..SidecarConfig::default()
    };
    let mut sidecar = world.start_sidecar(&cfg)?;
    println!(
        "== sidecar running (pid {}); its log and live summary follow\n",
        sidecar.pid()
    );
    let mut shown = 0usize;
    show_new(&sidecar.log(), &mut shown);

    let v4 = world.url("");
    let v6 = world.url_v6("");
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (mut sent, mut failed) = (0u64, 0u64);
    // Bounded: at most ~10 requests a second for `seconds`, each with its own timeout.
    'outer: while Instant::now() < deadline {
        for template in REQUESTS {
            if Instant::now() >= deadline {
                break 'outer;
            }
            let argv: Vec<String> = template
                .iter()
                .map(|a| a.replace("{v4}", &v4).replace("{v6}", &v6))
                .collect();
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let done = world.curl(&argv, Duration::from_secs(5))?;
            sent += 1;
            if !done.success() {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        show_new(&sidecar.log(), &mut shown);
    }
    println!("\n== the app sent {sent} requests ({failed} failed at the client); stopping the sidecar (SIGTERM)");
    sidecar.terminate()?;
    let status = sidecar.wait_exit(Duration::from_secs(20))?;
    show_new(&sidecar.log(), &mut shown);
    match status {
        Some(s) if s.success() => println!("== sidecar exited cleanly ({s})"),
        Some(s) => anyhow::bail!("the sidecar exited with {s}"),
        None => anyhow::bail!("the sidecar did not exit within 20 s of SIGTERM"),
    }
    match args.collector {
        None => report_sink(&sink)?,
        Some(collector) => println!(
            "\n== telemetry sent to the collector at {collector}: Grafana http://127.0.0.1:3000 \
             (dashboard \"Sidecar\", service sidecar-demo), Jaeger http://127.0.0.1:16686, \
             Prometheus http://127.0.0.1:9090"
        ),
    }
    drop(world);
    println!("== cleaned up: namespaces, cgroups and processes removed");
    Ok(())
}

fn show_new(log: &str, shown: &mut usize) {
    if let Some(new) = log.get(*shown..) {
        print!("{new}");
        *shown = log.len();
    }
}

fn report_sink(sink: &Path) -> Result<()> {
    let text = std::fs::read_to_string(sink)
        .with_context(|| format!("the default sink wrote nothing to {}", sink.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let spans = lines
        .iter()
        .filter(|l| l.contains("\"resourceSpans\""))
        .count();
    let metrics = lines
        .iter()
        .filter(|l| l.contains("\"resourceMetrics\""))
        .count();
    println!(
        "\n== OTLP-JSON written to {} ({} lines: {spans} span batches, {metrics} metric exports)",
        sink.display(),
        lines.len()
    );
    if let Some(first) = lines.iter().find(|l| l.contains("\"resourceSpans\"")) {
        let cut: String = first.chars().take(400).collect();
        println!("   first span batch begins: {cut}...");
    }
    if spans == 0 || metrics == 0 {
        anyhow::bail!("expected both spans and metrics in {}", sink.display());
    }
    Ok(())
}

/// Relays connections made inside the pod's network namespace to a free loopback port there
/// (returned) to `target` in the host's namespace.
fn relay_pod_to_host(world: &PodWorld, target: SocketAddr) -> Result<SocketAddr> {
    let listener = world
        .pod
        .enter(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?
        .context("binding the OTLP relay in the pod namespace")?;
    let inside = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                Ok(out) => splice(conn, out),
                Err(e) => eprintln!("   demo: cannot reach the collector at {target}: {e}"),
            }
        }
    });
    Ok(inside)
}

/// Relays connections to `listen` on the host to `inside` in the pod's network namespace.
fn relay_host_to_pod(world: &PodWorld, listen: SocketAddr, inside: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .with_context(|| format!("binding {listen} on the host for the admin port"))?;
    let netns = std::fs::File::open(world.pod.path())
        .with_context(|| format!("opening {}", world.pod.path().display()))?;
    std::thread::spawn(move || {
        // SAFETY: setns only switches this thread's network namespace to the one `netns` (an
        // open namespace file that outlives the call) refers to; sockets created by this thread
        // from then on live there, the listener created before stays in the host's.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "   demo: cannot enter the pod namespace: {}",
                io::Error::last_os_error()
            );
            return;
        }
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            match TcpStream::connect_timeout(&inside, Duration::from_secs(3)) {
                Ok(to_pod) => splice(conn, to_pod),
                Err(e) => eprintln!("   demo: cannot reach {inside} in the pod: {e}"),
            }
        }
    });
    Ok(())
}

/// Copies both ways between `a` and `b` on two threads until each side closes.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = io::copy(&mut &a, &mut &b);
        let _ = b.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = io::copy(&mut &b2, &mut &a2);
        let _ = a2.shutdown(Shutdown::Write);
    });
}
