//! Privileged end-to-end test of TLS passthrough: `openssl s_client` in the pod's app cgroup
//! talks to `openssl s_server` in svc through the sidecar, which forwards the TLS bytes
//! untouched and records the connection as TLS with the ClientHello's SNI and ALPN.
//!
//! Needs what `e2e.rs` needs plus the `openssl` CLI (`cargo xtask setup` installs it).

use std::time::Duration;

use sidecar_tests::otlp::DataPoint;
use sidecar_tests::world::SVC_V4;
use sidecar_tests::{prereq, PodWorld, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for telemetry to reach the receiver.
const TELEMETRY: Duration = Duration::from_secs(20);
/// Port of the TLS server in svc.
const TLS_PORT: u16 = 8443;
/// Name the client asks for (SNI) and the certificate is made out to.
const SNI: &str = "api.example.test";

fn run_ok(cmd: &mut std::process::Command) {
    let out = sidecar_tests::cmd::run_timeout(cmd, CLIENT).expect("running a command");
    assert!(out.success(), "{out:?}");
}

fn is_tls_point(p: &DataPoint) -> bool {
    p.attributes.str("sidecar.protocol") == Some("tls")
        && p.attributes.int("server.port") == Some(i64::from(TLS_PORT))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passes_through_unchanged_with_sni_and_alpn_recorded() {
    prereq::require();
    assert!(
        sidecar_tests::cmd::find_in_path("openssl").is_some(),
        "the openssl CLI is missing (cargo xtask setup installs it)"
    );
    let world = PodWorld::new("tls").expect("building the pod world");
    let rx = world.start_receiver().expect("starting the OTLP receiver");
    let cfg = SidecarConfig {
        otlp_endpoint: Some(rx.endpoint()),
        service_name: Some("e2e-tls".to_string()),
        drain_timeout_secs: Some(5),
        ..SidecarConfig::default()
    };
    let _sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");

    // A self-signed certificate for the SNI name, in the world's directory.
    let key = world.dir.join("key.pem");
    let cert = world.dir.join("cert.pem");
    let (key, cert) = (key.to_string_lossy(), cert.to_string_lossy());
    run_ok(std::process::Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={SNI}"),
        "-keyout",
        &key,
        "-out",
        &cert,
    ]));

    // `-rev` answers each line reversed; one connection, then it exits.
    let accept = format!("{SVC_V4}:{TLS_PORT}");
    let mut server = world
        .spawn_in_svc(
            "s_server",
            "openssl",
            &[
                "s_server",
                "-accept",
                &accept,
                "-cert",
                &cert,
                "-key",
                &key,
                "-alpn",
                "h2,http/1.1",
                "-naccept",
                "1",
                "-rev",
            ],
        )
        .expect("starting openssl s_server");
    server
        .wait_for_log("ACCEPT", Duration::from_secs(10))
        .expect("s_server listening");
    let payload = "payload-from-the-app-0123456789";
    let input = world.dir.join("input.txt");
    std::fs::write(&input, format!("{payload}\nCLOSE\n")).expect("writing the client input");
    let client = format!(
        "openssl s_client -connect {accept} -servername {SNI} -alpn h2,http/1.1 -ign_eof < {}",
        input.display()
    );
    let mut out = None;
    for _ in 0..50 {
        let o = world
            .run_app("sh", &["-c", &client], CLIENT)
            .expect("running openssl s_client");
        if o.success() {
            out = Some(o);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = out.expect("s_client never completed a session");
    let stdout = out.stdout_str();
    assert!(stdout.contains("ALPN protocol: h2"), "{stdout}");
    assert!(stdout.contains("TLSv1.3"), "{stdout}");
    // The server reversed exactly what the app sent: bytes intact both ways through TLS.
    let reversed: String = payload.chars().rev().collect();
    assert!(stdout.contains(&reversed), "reply missing: {stdout}");
    let server_log = server.log();
    assert!(
        server_log.contains("ALPN protocols advertised by the client: h2, http/1.1"),
        "{server_log}"
    );

    let m = rx
        .wait_for_metric(TELEMETRY, "sidecar.proxy.connection.duration", is_tls_point)
        .await
        .unwrap_or_else(|| {
            panic!(
                "no TLS connection point; got {:#?}",
                rx.metrics_named("sidecar.proxy.connection.duration")
            )
        });
    let p = m
        .points
        .iter()
        .find(|p| is_tls_point(p))
        .expect("TLS point");
    assert_eq!(p.attributes.str("tls.protocol.name"), Some("tls"));
    assert_eq!(p.attributes.str("server.address"), Some(SNI));
    assert_eq!(
        p.attributes.str("network.peer.address"),
        Some(SVC_V4.to_string().as_str())
    );
    assert_eq!(
        p.attributes.str("sidecar.tls.client.alpn"),
        Some("h2,http/1.1")
    );
    let io = rx
        .wait_for_metric(TELEMETRY, "sidecar.proxy.connection.io", |p| {
            is_tls_point(p) && p.attributes.str("server.address") == Some(SNI)
        })
        .await;
    assert!(io.is_some(), "no TLS sidecar.proxy.connection.io point");
}
