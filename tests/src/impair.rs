//! Network impairment of a namespace's link: delay and random loss of the TCP packets it
//! receives, the effect of `tc qdisc ... netem delay D loss P%` on that direction.
//!
//! The kernels the tests run on may lack `sch_netem` (this project's CI kernel does), so the
//! impairment is built from pieces every kernel with `tun`, `sch_ingress`, `cls_u32` and
//! `act_mirred` has: an ingress filter redirects the link's incoming TCP packets into a TUN
//! device owned by `peers/netem_tun.py`, which writes them back after the delay (or drops them).
//! The namespace's stack then receives them on the TUN device, so the stack must accept packets
//! whose reverse path is another interface (`rp_filter` is turned off in that namespace).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::cmd::{run_ok, ADMIN_TIMEOUT};
use crate::error::{Error, IoContext, Result};
use crate::netns::Netns;
use crate::peers::{peers_dir, PEER_READY_TIMEOUT};
use crate::process::{command_in, Child};

/// Name of the TUN device the impairment uses inside the namespace.
pub const TUN_DEV: &str = "impair0";

/// What to do to the packets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Added one-way delay.
    pub delay: Duration,
    /// Percentage of packets dropped at random, in `[0, 100)`.
    pub loss_pct: f64,
}

/// An active impairment on `ifname` in a namespace; removed on drop (the ingress qdisc first,
/// so traffic flows directly again, then the TUN owner is stopped).
#[derive(Debug)]
pub struct LinkImpairment {
    ns_name: String,
    ifname: String,
    child: Option<Child>,
}

fn tc(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run_ok(std::process::Command::new("tc").args(&full), ADMIN_TIMEOUT).map(drop)
}

impl LinkImpairment {
    /// Impairs the TCP packets `netns` receives on `ifname` (IPv4 and IPv6). The script's log
    /// goes to `<dir>/impair-<n>.log`.
    pub fn apply(
        netns: &Netns,
        ifname: &str,
        what: Impairment,
        dir: &std::path::Path,
    ) -> Result<Self> {
        if !(0.0..100.0).contains(&what.loss_pct) {
            return Err(Error::Unexpected(format!(
                "loss must be in [0, 100): {}",
                what.loss_pct
            )));
        }
        let script = peers_dir().join("netem_tun.py");
        let script = script.to_string_lossy().into_owned();
        let delay_ms = format!("{}", what.delay.as_secs_f64() * 1000.0);
        let loss = format!("{}", what.loss_pct);
        let cmd = command_in(
            Some(netns),
            None,
            "python3",
            &[
                "-u",
                &script,
                "--dev",
                TUN_DEV,
                "--delay-ms",
                &delay_ms,
                "--loss-pct",
                &loss,
            ],
        );
        // One log per impairment: a reused log would show an earlier READY.
        static N: AtomicU32 = AtomicU32::new(0);
        let log = dir.join(format!("impair-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut child = Child::spawn("impair", cmd, &log)?;
        child.wait_for_log("READY", PEER_READY_TIMEOUT)?;
        let guard = Self {
            ns_name: netns.name().to_owned(),
            ifname: ifname.to_owned(),
            child: Some(child),
        };
        netns.ip(&["link", "set", TUN_DEV, "up"])?;
        let ifname_owned = ifname.to_owned();
        netns.enter(move || -> Result<()> {
            for iface in ["all", "default", ifname_owned.as_str(), TUN_DEV] {
                let p = format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter");
                std::fs::write(&p, "0").ctx(|| format!("writing {p}"))?;
            }
            Ok(())
        })??;
        tc(&guard.ns_name, &["qdisc", "add", "dev", ifname, "ingress"])?;
        let redirect = ["action", "mirred", "egress", "redirect", "dev", TUN_DEV];
        let v4 = [
            "filter", "add", "dev", ifname, "parent", "ffff:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "protocol", "6", "0xff",
        ];
        let v6 = [
            "filter", "add", "dev", ifname, "parent", "ffff:", "protocol", "ipv6", "prio", "2",
            "u32", "match", "ip6", "protocol", "6", "0xff",
        ];
        for f in [&v4[..], &v6[..]] {
            let args: Vec<&str> = f.iter().chain(redirect.iter()).copied().collect();
            // On failure the guard's drop removes the qdisc and stops the script.
            tc(&guard.ns_name, &args)?;
        }
        tracing::info!(netns = %guard.ns_name, ifname, ?what, "link impaired");
        Ok(guard)
    }

    /// The TUN owner's log so far (its counters are printed when it stops).
    pub fn log(&self) -> String {
        self.child.as_ref().map(Child::log).unwrap_or_default()
    }

    /// Removes the impairment and returns the TUN owner's log, ending with its counters
    /// (`{"dropped": .., "forwarded": .., "ignored": .., "received": ..}`).
    pub fn finish(mut self) -> String {
        let log = self.child.as_ref().map(|c| c.log_path().to_owned());
        self.remove();
        log.and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    fn remove(&mut self) {
        if let Err(e) = tc(
            &self.ns_name,
            &["qdisc", "del", "dev", &self.ifname, "ingress"],
        ) {
            tracing::warn!(netns = %self.ns_name, error = %e, "could not remove the ingress qdisc");
        }
        if let Some(mut child) = self.child.take() {
            // SIGTERM lets it print its counters; drop SIGKILLs whatever is left.
            let _ = child.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for LinkImpairment {
    fn drop(&mut self) {
        self.remove();
    }
}
