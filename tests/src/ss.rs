//! `ss -tin` inside a namespace: the kernel's own view of TCP connections (smoothed RTT,
//! retransmissions), to compare with what the sidecar exports.

use std::time::Duration;

use crate::cmd::{run_ok, ADMIN_TIMEOUT};
use crate::error::Result;
use crate::netns::Netns;

/// One socket as `ss -tin` printed it.
#[derive(Clone, Debug, PartialEq)]
pub struct SsSocket {
    /// Local `address:port` as printed (IPv6 in brackets).
    pub local: String,
    /// Peer `address:port` as printed.
    pub peer: String,
    /// Smoothed RTT (`rtt:<srtt>/<rttvar>`), when shown.
    pub rtt: Option<Duration>,
    /// Total retransmissions (`retrans:<current>/<total>`); 0 when not shown.
    pub retrans_total: u64,
    /// The info line, for messages.
    pub info: String,
}

/// Runs `ss -H -tin state established <filter...>` in `netns` and parses it.
pub fn established(netns: &Netns, filter: &[&str]) -> Result<Vec<SsSocket>> {
    let mut cmd = netns.command("ss");
    cmd.args(["-H", "-t", "-i", "-n", "state", "established"])
        .args(filter);
    let out = run_ok(&mut cmd, ADMIN_TIMEOUT)?;
    Ok(parse(&out.stdout_str()))
}

fn ms_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.split_whitespace().find_map(|w| w.strip_prefix(key))
}

/// Parses `ss -H -tin state established` output: a socket line (`Recv-Q Send-Q Local Peer`,
/// maybe a process column) followed by an indented info line.
pub fn parse(text: &str) -> Vec<SsSocket> {
    let mut out: Vec<SsSocket> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = out.last_mut() {
                let info = line.trim();
                last.rtt = ms_field(info, "rtt:")
                    .and_then(|v| v.split('/').next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|ms| ms.is_finite() && *ms >= 0.0)
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0));
                last.retrans_total = ms_field(info, "retrans:")
                    .and_then(|v| v.split('/').nth(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                last.info = info.to_owned();
            }
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 4 {
            out.push(SsSocket {
                local: cols[2].to_owned(),
                peer: cols[3].to_owned(),
                rtt: None,
                retrans_total: 0,
                info: String::new(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rtt_and_retransmissions() {
        let text = "0      0      198.18.0.1:45678 198.18.0.2:9000\n\
                    \t cubic wscale:7,7 rto:224 rtt:20.512/10.25 ato:40 mss:1448 \
                    retrans:0/3 rcv_space:14480\n\
                    0 0 [fd5e:1dec::1]:40000 [fd5e:1dec::2]:8080\n\
                    \t cubic rto:201 rtt:0.05/0.025 mss:1428\n";
        let s = parse(text);
        assert_eq!(s.len(), 2, "{s:#?}");
        assert_eq!(s[0].local, "198.18.0.1:45678");
        assert_eq!(s[0].peer, "198.18.0.2:9000");
        assert_eq!(s[0].rtt, Some(Duration::from_micros(20_512)));
        assert_eq!(s[0].retrans_total, 3);
        assert_eq!(s[1].peer, "[fd5e:1dec::2]:8080");
        assert_eq!(s[1].rtt, Some(Duration::from_micros(50)));
        assert_eq!(s[1].retrans_total, 0);
        assert!(parse("").is_empty());
    }
}
