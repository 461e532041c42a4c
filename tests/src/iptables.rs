//! iptables rules in a test's own network namespace (they go away with it): the Istio-style
//! `REDIRECT` of an app cgroup's outbound TCP to a proxy, for Envoy and the sidecar's
//! `--redirect iptables` mode.

use crate::cgroup::Cgroup;
use crate::cmd::{run_ok, ADMIN_TIMEOUT};
use crate::error::{Error, Result};
use crate::netns::Netns;

/// The `iptables` arguments (after the command name) of the rule sending `app_cgroup`'s
/// outbound TCP to `port`, limited to `dst_ports` when not empty. `op` is `-A` or `-D`.
fn redirect_args(op: &str, cgroup_rel: &str, port: u16, dst_ports: &[u16]) -> Result<Vec<String>> {
    let mut a: Vec<String> = [
        "-w", "-t", "nat", op, "OUTPUT", "-p", "tcp", "-m", "cgroup", "--path", cgroup_rel,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    match dst_ports {
        [] => {}
        [one] => a.extend(["--dport".to_owned(), one.to_string()]),
        many if many.len() <= 15 => {
            let list: Vec<String> = many.iter().map(u16::to_string).collect();
            a.extend([
                "-m".to_owned(),
                "multiport".to_owned(),
                "--dports".to_owned(),
                list.join(","),
            ]);
        }
        many => {
            return Err(Error::Unexpected(format!(
                "iptables' multiport match takes at most 15 ports, not {}",
                many.len()
            )))
        }
    }
    a.extend([
        "-j".to_owned(),
        "REDIRECT".to_owned(),
        "--to-ports".to_owned(),
        port.to_string(),
    ]);
    Ok(a)
}

fn iptables(netns: &Netns, args: &[String]) -> Result<()> {
    run_ok(netns.command("iptables").args(args), ADMIN_TIMEOUT).map(drop)
}

/// Adds to `netns` the iptables rule (IPv4) that sends `app_cgroup`'s outbound TCP connections
/// to `port` on the loopback address:
/// `iptables -t nat -A OUTPUT -p tcp -m cgroup --path <app cgroup> [--dport P | -m multiport
/// --dports P,...] -j REDIRECT --to-ports <port>`, limited to the destination ports
/// `dst_ports` when not empty (at most 15). The proxy reads the original destination with
/// `SO_ORIGINAL_DST`. Serves Envoy and the sidecar's iptables mode alike; the rule goes away
/// with the namespace.
pub fn redirect_outbound(
    netns: &Netns,
    app_cgroup: &Cgroup,
    port: u16,
    dst_ports: &[u16],
) -> Result<()> {
    let rel = app_cgroup.relative_path()?;
    iptables(netns, &redirect_args("-A", &rel, port, dst_ports)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_rule_arguments() {
        let a = redirect_args("-A", "sidecar-tests/w/app", 15001, &[]).unwrap();
        assert_eq!(
            a.join(" "),
            "-w -t nat -A OUTPUT -p tcp -m cgroup --path sidecar-tests/w/app \
             -j REDIRECT --to-ports 15001"
        );
        let one = redirect_args("-D", "a", 15001, &[8080]).unwrap().join(" ");
        assert!(
            one.contains(" -D OUTPUT ") && one.contains(" --dport 8080 -j "),
            "{one}"
        );
        let many = redirect_args("-A", "a", 15001, &[80, 443])
            .unwrap()
            .join(" ");
        assert!(many.contains(" -m multiport --dports 80,443 -j "), "{many}");
        let too_many: Vec<u16> = (1..=16).collect();
        assert!(redirect_args("-A", "a", 1, &too_many).is_err());
    }
}
