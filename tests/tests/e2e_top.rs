//! End-to-end tests of `sidecar top` (issue 5): the real binary in a real terminal (tmux),
//! watching a real sidecar that intercepts a pod's traffic, and its `--once` plain output.
//!
//! Needs root, cgroup v2, `ip`, `nsenter`, `curl`, `python3`, `bpftool`, `tmux` and the sidecar
//! binary (`SIDECAR_BIN` or `target/release/sidecar`); a test fails, saying what is missing,
//! otherwise. Run with `--test-threads=1`.

use std::path::Path;
use std::time::Duration;

use sidecar_tests::admin::ADMIN_PORT;
use sidecar_tests::process::Child;
use sidecar_tests::sidecar::sidecar_bin;
use sidecar_tests::tmux::Tmux;
use sidecar_tests::world::{APP_PORT, HTTP_PORT, SVC_V4};
use sidecar_tests::{prereq, PodWorld, Sidecar, SidecarConfig};

/// Bound for one client command.
const CLIENT: Duration = Duration::from_secs(30);
/// Bound for the live view to show what is awaited.
const SCREEN: Duration = Duration::from_secs(30);
/// Bound for `top` to exit after a key.
const EXIT: Duration = Duration::from_secs(10);
/// The outbound destination as the summary names it.
const DESTINATION: &str = "198.18.0.2:8080";

/// A world with the application's HTTP server on [`APP_PORT`] (so inbound requests are
/// steered) and a sidecar whose telemetry goes to a sink file.
struct TopWorld {
    sidecar: Sidecar,
    _app: sidecar_tests::peers::HttpPeer,
    world: PodWorld,
}

fn setup(tag: &str) -> TopWorld {
    prereq::require();
    Tmux::require().expect("tmux is needed");
    let world = PodWorld::new(tag).expect("building the pod world");
    let app = world
        .start_app_server("app", APP_PORT)
        .expect("starting the application server");
    let cfg = SidecarConfig {
        sink_file: Some(world.dir.join("sink.jsonl")),
        ..SidecarConfig::default()
    };
    let sidecar = world.start_sidecar(&cfg).expect("starting the sidecar");
    TopWorld {
        sidecar,
        _app: app,
        world,
    }
}

/// The shell command line that runs `program args` and then records the terminal modes
/// (`stty -a`) and the exit code in `dir`, and lingers a moment so the test can look at the
/// terminal `top` left behind (tmux's cursor state is not kept once a pane is dead).
fn wrapped(program: &str, dir: &Path) -> String {
    format!(
        "{program}; rc=$?; stty -a > {dir}/stty.txt 2>&1; echo $rc > {dir}/rc.txt; sleep 3; \
         exit $rc",
        dir = dir.display(),
    )
}

/// `sidecar top <args>` in the pod's network namespace, wrapped.
fn top_command(world: &PodWorld, dir: &Path, top_args: &str) -> String {
    let program = format!(
        "nsenter --net={netns} -- {bin} top {top_args}",
        netns = world.pod.path().display(),
        bin = sidecar_bin().display(),
    );
    wrapped(&program, dir)
}

/// After a quit key: `top` exited 0, and left the terminal as it found it: main screen,
/// cursor shown, canonical mode and echo back on. Then the pane dies with that status.
fn assert_quit_cleanly(tmux: &Tmux, dir: &Path) {
    let rc_file = dir.join("rc.txt");
    let deadline = std::time::Instant::now() + EXIT;
    while !rc_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "top did not exit; screen:\n{}",
            tmux.capture().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let rc = std::fs::read_to_string(&rc_file).expect("exit code file");
    assert_eq!(rc.trim(), "0", "top's exit code");
    let state = tmux.pane().expect("pane state");
    assert!(!state.dead, "the wrapper lingers: {state:?}");
    assert!(!state.alternate_on, "alternate screen left: {state:?}");
    assert!(state.cursor_visible, "cursor shown again: {state:?}");
    let stty = std::fs::read_to_string(dir.join("stty.txt")).expect("stty output");
    let modes: Vec<&str> = stty.split_whitespace().collect();
    for mode in ["icanon", "echo", "isig"] {
        assert!(
            modes.contains(&mode),
            "terminal still in raw mode ({mode} off):\n{stty}"
        );
    }
    let after = tmux.capture().unwrap();
    assert!(
        !after.contains("DESTINATION / ROUTE"),
        "the table stays on the alternate screen only:\n{after}"
    );
    let state = tmux.wait_dead(EXIT).expect("the pane did not end");
    // The wrapper exits with top's code (tmux does not always learn it; rc.txt has it).
    assert!(
        state.exit_status.unwrap_or(0) == 0 && state.signal.is_none(),
        "{state:?}"
    );
}

/// Starts bounded background traffic as the application: outbound GETs (one in ten a 503) to
/// the peer in svc, about 12 s.
fn outbound_load(world: &PodWorld) -> Child {
    let script = format!(
        "for i in $(seq 1 60); do \
           if [ $((i % 10)) -eq 0 ]; then p=/status/503; else p=/bytes/64?i=$i; fi; \
           curl -sS -o /dev/null --max-time 5 http://{SVC_V4}:{HTTP_PORT}$p; sleep 0.2; \
         done"
    );
    world
        .spawn_app("load", "sh", &["-c", &script])
        .expect("starting the load")
}

/// A few inbound GETs from svc to the application (route `/bytes/{id}`).
fn inbound_requests(world: &PodWorld, n: usize) {
    for _ in 0..n {
        let out = world
            .curl_from_svc(
                &["-o", "/dev/null", &world.pod_url(APP_PORT, "/bytes/16")],
                CLIENT,
            )
            .expect("running curl");
        assert!(out.success(), "inbound curl failed: {out:?}");
    }
}

/// The cells of the first screen line that mentions `name`.
fn row<'a>(screen: &'a str, name: &str) -> Option<Vec<&'a str>> {
    screen
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .map(|l| l.split_whitespace().collect())
}

/// Column index (in whitespace-split cells) of a title; "DESTINATION / ROUTE" is one cell of
/// a row but three words of the title line, hence the offset.
fn col(title: &str) -> usize {
    let titles = [
        "DIR", "NAME", "REQ/S", "REQS", "ERR%", "P50", "P99", "CONNS", "RTT", "RETRANS", "CONN",
    ];
    titles
        .iter()
        .position(|t| *t == title)
        .expect("known column")
}

#[test]
fn top_in_tmux_shows_live_traffic_and_quits_cleanly() {
    let t = setup("top");
    let dir = t.world.dir.path().to_path_buf();
    let tmux = Tmux::start(
        "top",
        &dir,
        160,
        40,
        &top_command(
            &t.world,
            &dir,
            &format!("--admin 127.0.0.1:{ADMIN_PORT} --interval 0.5"),
        ),
    )
    .expect("starting tmux");

    // The header appears before any traffic.
    let screen = tmux
        .wait_for_screen("the header", SCREEN, |s| s.contains("READY"))
        .unwrap_or_else(|e| panic!("{e}\nsidecar log:\n{}", t.sidecar.log()));
    assert!(screen.contains("DESTINATION / ROUTE"), "{screen}");
    assert!(screen.contains("sidecar "), "{screen}");

    let _load = outbound_load(&t.world);
    inbound_requests(&t.world, 5);

    // The destination with requests counted and a live rate while the load runs.
    let screen = tmux
        .wait_for_screen("the destination with a rate", SCREEN, |s| {
            row(s, DESTINATION).is_some_and(|r| {
                r.get(col("REQS")).and_then(|v| v.parse::<u64>().ok()) > Some(0)
                    && r.get(col("REQ/S")).and_then(|v| v.parse::<f64>().ok()) > Some(0.0)
            })
        })
        .unwrap_or_else(|e| panic!("{e}\nsidecar log:\n{}", t.sidecar.log()));
    eprintln!("top screen with traffic:\n{screen}");
    let title = screen
        .lines()
        .find(|l| l.contains("DESTINATION / ROUTE"))
        .expect("table title");
    for c in [
        "DIR",
        "REQ/S",
        "REQS",
        "ERR%",
        "P50 MS",
        "P99 MS",
        "CONNS",
        "RTT MS",
        "RETRANS",
        "CONN FAIL",
    ] {
        assert!(title.contains(c), "column {c} missing: {title}");
    }
    let out = row(&screen, DESTINATION).expect("destination row");
    assert_eq!(out[0], "out", "{screen}");
    let p50: f64 = out[col("P50")].parse().expect("p50 is a number");
    assert!(p50 > 0.0, "{screen}");
    assert!(
        screen.contains("connections: in"),
        "connection counts in the header: {screen}"
    );
    assert!(screen.contains("export: spans"), "{screen}");
    let inbound = screen
        .lines()
        .find(|l| l.contains(&format!(":{APP_PORT} GET /bytes/{{id}}")))
        .unwrap_or_else(|| panic!("no inbound route row:\n{screen}"));
    assert!(inbound.trim_start().starts_with("in "), "{inbound}");
    // The route name is three words (`:8080 GET /bytes/{id}`): REQS is two cells further.
    let inbound_reqs = inbound.split_whitespace().nth(col("REQS") + 2);
    assert_eq!(inbound_reqs, Some("5"), "{inbound}");

    // TCP health from the kernel: the proxy's upstream connections to the destination, and
    // the connections accepted on the application's port (one per inbound curl).
    let port_row = format!(":{APP_PORT}");
    let tcp_screen = tmux
        .wait_for_screen("kernel TCP figures", SCREEN, |s| {
            let dest_ok = row(s, DESTINATION).is_some_and(|r| {
                r.get(col("CONNS")).and_then(|v| v.parse::<u64>().ok()) > Some(0)
                    && r.get(col("RTT")).is_some_and(|v| v.parse::<f64>().is_ok())
            });
            let inbound_ok = s.lines().any(|l| {
                let r: Vec<&str> = l.split_whitespace().collect();
                r.get(1) == Some(&port_row.as_str())
                    && r.get(2).is_some_and(|v| v.parse::<f64>().is_ok())
                    && r.get(col("CONNS")).and_then(|v| v.parse::<u64>().ok()) >= Some(5)
            });
            dest_ok && inbound_ok
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let out = row(&tcp_screen, DESTINATION).expect("destination row");
    assert_eq!(out[col("CONN")], "0", "no failed connects: {tcp_screen}");

    // Errors show up as an error ratio once a 503 went by (every tenth request).
    tmux.wait_for_screen("a non-zero error ratio", SCREEN, |s| {
        row(s, DESTINATION).is_some_and(|r| {
            r.get(col("ERR%"))
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
    })
    .unwrap_or_else(|e| panic!("{e}"));

    // `s` cycles the sort column; a resize redraws at the new size.
    tmux.send_keys(&["s"]).unwrap();
    tmux.wait_for_screen("sort by error %", SCREEN, |s| s.contains("sort: error %"))
        .unwrap_or_else(|e| panic!("{e}"));
    let footer_row = |s: &str| s.lines().position(|l| l.contains("sort: error %"));
    assert_eq!(
        footer_row(&tmux.capture().unwrap()),
        Some(39),
        "footer on the last row"
    );
    tmux.resize(100, 30).unwrap();
    let small = tmux
        .wait_for_screen("the redraw at 100x30", SCREEN, |s| {
            footer_row(s) == Some(29) && s.contains(DESTINATION)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(small.lines().all(|l| l.chars().count() <= 100), "{small}");

    // `q` quits with status 0 and gives the terminal back.
    assert!(
        tmux.pane().unwrap().alternate_on,
        "the view runs on the alternate screen"
    );
    tmux.send_keys(&["q"]).unwrap();
    assert_quit_cleanly(&tmux, &dir);
}

#[test]
fn top_once_prints_a_snapshot() {
    let t = setup("top-once");
    let out = t
        .world
        .curl(&["-o", "/dev/null", &t.world.url("/bytes/32")], CLIENT)
        .expect("running curl");
    assert!(out.success(), "{out:?}");
    let mut cmd = t.world.pod.command(&sidecar_bin().to_string_lossy());
    cmd.args([
        "top",
        "--once",
        "--admin",
        &format!("http://127.0.0.1:{ADMIN_PORT}"),
    ]);
    let deadline = std::time::Instant::now() + SCREEN;
    // The request is counted once its response has gone back: retry briefly.
    let text = loop {
        let done = sidecar_tests::cmd::run_timeout(&mut cmd, CLIENT).expect("running top --once");
        assert_eq!(
            done.code(),
            Some(0),
            "top --once failed: {}",
            done.stderr_str()
        );
        let text = done.stdout_str();
        if row(&text, DESTINATION).is_some() || std::time::Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("sidecar "), "{text}");
    assert!(lines[0].contains("READY"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("DIR  DESTINATION / ROUTE")),
        "{text}"
    );
    let r = row(&text, DESTINATION).unwrap_or_else(|| panic!("no {DESTINATION} row:\n{text}"));
    assert_eq!(r[0], "out");
    assert_eq!(r[col("REQS")], "1", "{text}");
    assert_eq!(r[col("ERR%")], "0.0", "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "plain text, no escape sequences: {text:?}"
    );

    // Not a terminal and no --once: a usage error.
    let mut cmd = t.world.pod.command(&sidecar_bin().to_string_lossy());
    cmd.args(["top", "--admin", &format!("127.0.0.1:{ADMIN_PORT}")]);
    let done = sidecar_tests::cmd::run_timeout(&mut cmd, CLIENT).expect("running top");
    assert_eq!(done.code(), Some(64), "{}", done.stderr_str());
    assert!(
        done.stderr_str().contains("--once"),
        "{}",
        done.stderr_str()
    );
}

/// No sidecar at the address: the view keeps running, says so in its header, and Ctrl-C quits
/// with status 0. Needs only tmux and the binary.
#[test]
fn top_survives_an_unreachable_admin_server_and_quits_on_ctrl_c() {
    Tmux::require().expect("tmux is needed");
    let bin = sidecar_bin();
    assert!(bin.exists(), "sidecar binary missing: {}", bin.display());
    let dir = sidecar_tests::tempdir::TempDir::create("top-unreachable").expect("temp dir");
    // A port nobody listens on: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let command = wrapped(
        &format!(
            "{} top --admin 127.0.0.1:{port} --interval 0.2",
            bin.display()
        ),
        dir.path(),
    );
    let tmux = Tmux::start("top-unreach", dir.path(), 120, 20, &command).expect("starting tmux");
    let screen = tmux
        .wait_for_screen("the error header", SCREEN, |s| {
            s.contains("ERROR: cannot connect")
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(screen.contains(&format!("127.0.0.1:{port}")), "{screen}");
    assert!(screen.contains("retrying every 200ms"), "{screen}");
    assert!(screen.contains("waiting for /stats"), "{screen}");
    // Still running a few polls later.
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !tmux.pane().unwrap().dead,
        "top exited on an unreachable server"
    );
    tmux.send_keys(&["C-c"]).unwrap();
    assert_quit_cleanly(&tmux, dir.path());
}
