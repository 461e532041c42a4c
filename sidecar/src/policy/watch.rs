//! Runtime policy reload: re-reads the annotations file and re-discovers the served ports
//! periodically and on SIGHUP, and publishes a new [`KernelPolicy`] only when it changed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::annotations::{read_text, AnnotationSettings, Annotations};
use super::{resolve_settings, KernelPolicy, PolicyConfig, PolicyError};
use crate::discover;

/// What the watcher reads and how often.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// The policy from flags and environment.
    pub policy: PolicyConfig,
    /// The Downward API annotations file (missing = no annotations).
    pub annotations_file: PathBuf,
    /// The `/proc/net` directory whose `tcp`/`tcp6` list the pod's listeners
    /// (default [`discover::PROC_NET`]).
    pub proc_net: PathBuf,
    /// The sidecar's own ports, never steered inbound.
    pub own_ports: BTreeSet<u16>,
    /// Poll period for the file and the listeners (default 2 s; at least 10 ms).
    pub interval: Duration,
    /// Also reload on SIGHUP (default true).
    pub reload_on_sighup: bool,
}

impl WatchConfig {
    /// The defaults: `/proc/self/net`, every 2 s, and on SIGHUP.
    pub fn new(policy: PolicyConfig, annotations_file: PathBuf, own_ports: BTreeSet<u16>) -> Self {
        Self {
            policy,
            annotations_file,
            proc_net: PathBuf::from(discover::PROC_NET),
            own_ports,
            interval: Duration::from_secs(2),
            reload_on_sighup: true,
        }
    }
}

/// Publishes the current [`KernelPolicy`] on a `watch` channel and keeps it up to date until
/// stopped or dropped.
///
/// Use: `let mut rx = watcher.subscribe();` apply `rx.borrow_and_update().clone()`, then on
/// every `rx.changed().await` apply the new value (this order misses no change).
#[derive(Debug)]
pub struct PolicyWatcher {
    rx: watch::Receiver<KernelPolicy>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl PolicyWatcher {
    /// Reads the sources once (logging malformed annotations), resolves the first policy and
    /// starts the polling task. Call from inside a tokio runtime. Fails only when the SIGHUP
    /// handler cannot be installed; unreadable sources are logged and treated as empty.
    pub fn start(cfg: WatchConfig) -> Result<Self, PolicyError> {
        let sighup = if cfg.reload_on_sighup {
            Some(signal(SignalKind::hangup()).map_err(PolicyError::Signal)?)
        } else {
            None
        };
        let mut state = State::new(cfg);
        state.refresh();
        let first = state.resolve();
        info!(
            annotations = %state.cfg.annotations_file.display(),
            "interception policy: {}",
            first.summary()
        );
        let (tx, rx) = watch::channel(first);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(state, tx, stop.clone(), sighup));
        Ok(Self {
            rx,
            stop,
            task: Some(task),
        })
    }

    /// The policy in force now.
    pub fn current(&self) -> KernelPolicy {
        self.rx.borrow().clone()
    }

    /// A receiver that is notified of every later change (the current value counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<KernelPolicy> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }

    /// Stops the polling task and waits for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // A panic in the task has already been reported by tokio; nothing more to do.
            let _ = task.await;
        }
    }
}

impl Drop for PolicyWatcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run(
    mut state: State,
    tx: watch::Sender<KernelPolicy>,
    stop: CancellationToken,
    mut sighup: Option<Signal>,
) {
    // `interval` panics on a zero period; anything below 10 ms is no use anyway.
    let mut tick = tokio::time::interval(state.cfg.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the sources were just read.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            Some(()) = recv(&mut sighup) => info!("SIGHUP: reloading the interception policy"),
        }
        state.refresh();
        let next = state.resolve();
        let changed = tx.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next.clone();
                true
            }
        });
        if changed {
            info!("interception policy changed: {}", next.summary());
        }
    }
}

/// Next SIGHUP, or never when not listening for it.
async fn recv(sighup: &mut Option<Signal>) -> Option<()> {
    match sighup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// What the watcher last read.
struct State {
    cfg: WatchConfig,
    /// Last text of the annotations file (`None`: missing).
    text: Option<String>,
    /// Whether the file was read (or found missing) at least once.
    loaded: bool,
    settings: AnnotationSettings,
    served: BTreeSet<u16>,
    /// Last error logged per source, so a persisting failure is logged once.
    annotations_error: Option<String>,
    ports_error: Option<String>,
}

impl State {
    fn new(cfg: WatchConfig) -> Self {
        Self {
            cfg,
            text: None,
            loaded: false,
            settings: AnnotationSettings::default(),
            served: BTreeSet::new(),
            annotations_error: None,
            ports_error: None,
        }
    }

    fn refresh(&mut self) {
        self.refresh_annotations();
        self.refresh_ports();
    }

    fn resolve(&self) -> KernelPolicy {
        resolve_settings(
            &self.cfg.policy,
            &self.settings,
            &self.served,
            &self.cfg.own_ports,
        )
    }

    /// Re-reads the file; re-parses and logs its issues only when its content changed. A read
    /// error keeps the previous annotations.
    fn refresh_annotations(&mut self) {
        let path = &self.cfg.annotations_file;
        let text = match read_text(path) {
            Ok(text) => {
                self.annotations_error = None;
                text
            }
            Err(e) => {
                let msg = e.to_string();
                if self.annotations_error.as_ref() != Some(&msg) {
                    warn!("{msg}; keeping the previous annotations");
                    self.annotations_error = Some(msg);
                }
                return;
            }
        };
        if self.loaded && text == self.text {
            return;
        }
        self.loaded = true;
        let (annotations, line_issues) = match &text {
            Some(t) => Annotations::parse(t),
            None => (Annotations::default(), Vec::new()),
        };
        for issue in &line_issues {
            warn!(file = %path.display(), "annotations file {issue}: line ignored");
        }
        let (settings, value_issues) = AnnotationSettings::from_annotations(&annotations);
        for issue in &value_issues {
            warn!(file = %path.display(), "{issue}");
        }
        if settings.applied.is_empty() {
            info!(file = %path.display(), present = text.is_some(), "no interception annotations");
        } else {
            info!(file = %path.display(), applied = ?settings.applied, "interception annotations read");
        }
        self.text = text;
        self.settings = settings;
    }

    /// Re-discovers the served ports; a failure keeps the previous set.
    fn refresh_ports(&mut self) {
        match discover::served_ports(&self.cfg.proc_net) {
            Ok(ports) => {
                self.ports_error = None;
                self.served = ports;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.ports_error.as_ref() != Some(&msg) {
                    warn!("cannot discover the served ports: {msg}; keeping the previous set");
                    self.ports_error = Some(msg);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{KernelPolicy, PortSelection};
    use std::fs;
    use std::path::Path;
    use tokio::time::{timeout, Instant};

    /// `/proc/net/tcp` fixture with listeners on the given ports (wildcard address).
    fn tcp_fixture(ports: &[u16]) -> String {
        let mut text = String::from(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  \
             timeout inode\n",
        );
        for (i, p) in ports.iter().enumerate() {
            text.push_str(&format!(
                "   {i}: 00000000:{p:04X} 00000000:0000 0A 00000000:00000000 00:00000000 \
                 00000000     0        0 {} 1 0000000000000000 100 0 0 10 0\n",
                1000 + i
            ));
        }
        text
    }

    struct Fixture {
        dir: sidecar_tests::tempdir::TempDir,
    }

    impl Fixture {
        fn new(tag: &str) -> Self {
            let dir =
                sidecar_tests::tempdir::TempDir::create(&sidecar_tests::netns::unique_name(tag))
                    .unwrap();
            fs::create_dir(dir.join("net")).unwrap();
            let f = Self { dir };
            f.set_ports(&[8080]);
            f
        }
        fn set_ports(&self, ports: &[u16]) {
            write_atomic(&self.dir.join("net/tcp"), &tcp_fixture(ports));
        }
        fn set_annotations(&self, text: &str) {
            write_atomic(&self.annotations(), text);
        }
        fn annotations(&self) -> PathBuf {
            self.dir.join("annotations")
        }
        fn config(&self, interval: Duration, sighup: bool) -> WatchConfig {
            WatchConfig {
                proc_net: self.dir.join("net"),
                interval,
                reload_on_sighup: sighup,
                ..WatchConfig::new(
                    PolicyConfig::default(),
                    self.annotations(),
                    [15001, 15006].into_iter().collect(),
                )
            }
        }
    }

    /// Replaces a file the way the kubelet does: write aside, then rename over.
    fn write_atomic(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    fn ports(p: &[u16]) -> BTreeSet<u16> {
        p.iter().copied().collect()
    }

    async fn next_change(rx: &mut watch::Receiver<KernelPolicy>, within: Duration) -> KernelPolicy {
        timeout(within, rx.changed())
            .await
            .expect("no policy change arrived in time")
            .expect("watcher stopped");
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn yields_a_change_when_the_file_or_the_listeners_change_and_not_otherwise() {
        let f = Fixture::new("policy-watch");
        let w = PolicyWatcher::start(f.config(Duration::from_millis(50), false)).unwrap();
        let mut rx = w.subscribe();
        assert_eq!(rx.borrow_and_update().inbound_ports, ports(&[8080]));

        // Nothing changes: no notification over many poll periods.
        assert!(timeout(Duration::from_millis(400), rx.changed())
            .await
            .is_err());
        // Rewriting the same content is not a change either.
        f.set_ports(&[8080]);
        assert!(timeout(Duration::from_millis(300), rx.changed())
            .await
            .is_err());

        // The annotations file appears (it was missing): exclusions apply.
        f.set_annotations(
            "traffic.sidecar.istio.io/excludeOutboundPorts=\"3306\"\n\
             config.linkerd.io/skip-inbound-ports=\"8080\"\n",
        );
        let p = next_change(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(p.exclude_outbound_ports, ports(&[3306]));
        assert!(p.inbound_ports.is_empty());

        // A new listener appears.
        f.set_ports(&[8080, 9090]);
        let p = next_change(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(p.inbound_ports, ports(&[9090]));
        assert_eq!(w.current(), p);

        // A malformed value is ignored (the other annotation still applies), no crash.
        f.set_annotations(
            "traffic.sidecar.istio.io/excludeOutboundPorts=\"33o6\"\n\
             config.linkerd.io/skip-inbound-ports=\"8080\"\n\
             garbage line\n",
        );
        let p = next_change(&mut rx, Duration::from_secs(5)).await;
        assert!(p.exclude_outbound_ports.is_empty());
        assert_eq!(p.inbound_ports, ports(&[9090]));
        assert!(timeout(Duration::from_millis(300), rx.changed())
            .await
            .is_err());

        // The file disappears: back to no annotations.
        fs::remove_file(f.annotations()).unwrap();
        let p = next_change(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(p.inbound_ports, ports(&[8080, 9090]));

        w.stop().await;
        assert!(
            rx.changed().await.is_err(),
            "the channel closes when stopped"
        );
    }

    #[tokio::test]
    async fn sighup_reloads_at_once() {
        let f = Fixture::new("policy-sighup");
        f.set_annotations("traffic.sidecar.istio.io/includeInboundPorts=\"7000\"\n");
        // A poll period far beyond the test: only SIGHUP can trigger the reload.
        let w = PolicyWatcher::start(f.config(Duration::from_secs(3600), true)).unwrap();
        let mut rx = w.subscribe();
        assert_eq!(rx.borrow_and_update().inbound_ports, ports(&[7000]));
        f.set_annotations("traffic.sidecar.istio.io/includeInboundPorts=\"7001\"\n");
        assert!(timeout(Duration::from_millis(300), rx.changed())
            .await
            .is_err());
        let started = Instant::now();
        // SAFETY: kill(2) with our own pid and a signal this process handles (tokio installed
        // the SIGHUP handler in `start`); no memory is involved.
        let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        assert_eq!(rc, 0);
        let p = next_change(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(p.inbound_ports, ports(&[7001]));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(w);
    }

    #[tokio::test]
    async fn flags_apply_and_unreadable_sources_keep_the_last_policy() {
        let f = Fixture::new("policy-flags");
        let mut cfg = f.config(Duration::from_millis(50), false);
        cfg.policy.include_inbound_ports = Some(PortSelection::All);
        cfg.policy.exclude_outbound_ports = ports(&[25]);
        let w = PolicyWatcher::start(cfg).unwrap();
        let mut rx = w.subscribe();
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.exclude_outbound_ports, ports(&[25]));
        assert_eq!(first.inbound_ports, ports(&[8080]));
        // The listener table vanishes: the last known served ports stay.
        fs::remove_file(f.dir.join("net/tcp")).unwrap();
        // The annotations path becomes a directory (unreadable as a file): previous ones stay.
        fs::create_dir(f.annotations()).unwrap();
        assert!(timeout(Duration::from_millis(400), rx.changed())
            .await
            .is_err());
        assert_eq!(w.current(), first);
        w.stop().await;
    }
}
