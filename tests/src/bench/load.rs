//! The load generators: wrk (HTTP/1.1) and h2load (HTTP/2, gRPC), run as the application (in
//! the pod's network namespace and app cgroup), their output parsed into [`LoadResult`].

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::cmd::{run_timeout, Finished};
use crate::error::{Error, IoContext, Result};

/// What one load-generator run gave.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadResult {
    /// Requests completed.
    pub requests: u64,
    /// Seconds the measurement lasted.
    pub secs: f64,
    /// Failed requests: socket errors, timeouts and non-2xx answers.
    pub errors: u64,
    /// Latency percentiles in microseconds, when asked for.
    pub percentiles: Option<Percentiles>,
}

impl LoadResult {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
}

/// wrk's Lua script: an optional fixed pause before each request on a connection (the fixed
/// request rate: `connections × 1000 / BENCH_DELAY_MS` requests per second, less the time the
/// requests themselves take) and one parseable summary line at the end.
const WRK_SCRIPT: &str = r#"-- written by sidecar-bench
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if pause > 0 then
  function delay()
    return pause
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50=%d p99=%d p999=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// One wrk run.
#[derive(Clone, Debug)]
pub struct Wrk {
    /// Target URL.
    pub url: String,
    /// Open connections.
    pub connections: u32,
    /// Length of the run.
    pub duration: Duration,
    /// Fixed total request rate (requests per second), or flat out.
    pub rate: Option<f64>,
    /// Send `Connection: close`: one request per connection.
    pub close: bool,
}

impl Wrk {
    /// The pause per request on each connection that gives the fixed rate, in whole
    /// milliseconds (wrk's unit), at least 1.
    pub fn delay_ms(&self) -> Option<u64> {
        self.rate
            .filter(|r| *r > 0.0)
            .map(|r| ((f64::from(self.connections) * 1000.0 / r).round() as u64).max(1))
    }

    /// Runs wrk through `launch` (which wraps a program and its arguments into a command
    /// running as the application), with its script in `dir`.
    pub fn run(&self, launch: &dyn Fn(&str, &[&str]) -> Command, dir: &Path) -> Result<LoadResult> {
        let script = dir.join("bench.lua");
        if !script.exists() {
            std::fs::write(&script, WRK_SCRIPT).ctx(|| format!("writing {}", script.display()))?;
        }
        let conns = self.connections.to_string();
        let secs = format!("{}s", self.duration.as_secs_f64().ceil().max(1.0) as u64);
        let script_s = script.to_string_lossy().into_owned();
        let mut args = vec![
            "-t1",
            "-c",
            &conns,
            "-d",
            &secs,
            "--timeout",
            "5s",
            "-s",
            &script_s,
        ];
        if self.close {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&self.url);
        let mut cmd = launch("wrk", &args);
        cmd.env("BENCH_DELAY_MS", self.delay_ms().unwrap_or(0).to_string());
        let out = run_timeout(&mut cmd, self.duration + Duration::from_secs(20))?;
        let mut res = check(&out, "wrk").and_then(|()| parse_wrk(&out.stdout_str()))?;
        if self.rate.is_none() {
            res.percentiles = None;
        }
        Ok(res)
    }
}

/// Parses the `BENCH ...` line of [`WRK_SCRIPT`].
pub fn parse_wrk(stdout: &str) -> Result<LoadResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or_else(|| parse_error("wrk", "no BENCH summary line", stdout))?;
    let field = |name: &str| -> Result<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| parse_error("wrk", &format!("no {name}= in the summary"), stdout))
    };
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|n| field(n))
        .sum::<Result<u64>>()?;
    Ok(LoadResult {
        requests: field("requests")?,
        secs: field("duration_us")? as f64 / 1e6,
        errors,
        percentiles: Some(Percentiles {
            p50: field("p50")? as f64,
            p99: field("p99")? as f64,
            p999: field("p999")? as f64,
        }),
    })
}

/// One h2load run (HTTP/2 over cleartext, prior knowledge).
#[derive(Clone, Debug)]
pub struct H2load {
    /// Target URL.
    pub url: String,
    /// Open connections (h2load clients).
    pub connections: u32,
    /// Concurrent streams per connection.
    pub streams: u32,
    /// Length of the run.
    pub duration: Duration,
    /// Fixed total request rate (requests per second), or flat out.
    pub rate: Option<f64>,
    /// Extra request headers (`name: value`).
    pub headers: Vec<String>,
    /// File posted as every request's body (makes the requests POSTs).
    pub body: Option<std::path::PathBuf>,
}

impl H2load {
    /// Runs h2load through `launch` (see [`Wrk::run`]); per-request latencies go to a log in
    /// `dir` when a fixed rate is asked for.
    pub fn run(&self, launch: &dyn Fn(&str, &[&str]) -> Command, dir: &Path) -> Result<LoadResult> {
        let conns = self.connections.to_string();
        let streams = self.streams.to_string();
        let secs = format!("{}", self.duration.as_secs_f64().ceil().max(1.0) as u64);
        let log = dir.join("h2load-requests.tsv");
        let log_arg = format!("--log-file={}", log.display());
        let mut args: Vec<String> = vec![
            "-c".into(),
            conns,
            "-m".into(),
            streams,
            "-D".into(),
            secs,
            "--warm-up-time=1".into(),
        ];
        if let Some(rate) = self.rate {
            let per_client = (rate / f64::from(self.connections.max(1))).round().max(1.0);
            args.push(format!("--rps={per_client}"));
            args.push(log_arg);
            let _ = std::fs::remove_file(&log);
        }
        for h in &self.headers {
            args.push("-H".into());
            args.push(h.clone());
        }
        if let Some(body) = &self.body {
            args.push("-d".into());
            args.push(body.to_string_lossy().into_owned());
        }
        args.push(self.url.clone());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_timeout(
            &mut launch("h2load", &argv),
            self.duration + Duration::from_secs(25),
        )?;
        check(&out, "h2load")?;
        let mut res = parse_h2load(&out.stdout_str())?;
        if self.rate.is_some() {
            let text =
                std::fs::read_to_string(&log).ctx(|| format!("reading {}", log.display()))?;
            res.percentiles = Some(percentiles_of_h2load_log(&text)?);
        }
        Ok(res)
    }
}

/// Parses h2load's summary: the `finished in` line (seconds) here, the counts with
/// [`crate::h2peers::parse_h2load`] (failed, errored, timed-out and non-2xx requests count as
/// errors).
pub fn parse_h2load(stdout: &str) -> Result<LoadResult> {
    let bad = |what: &str| parse_error("h2load", what, stdout);
    let finished = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in "))
        .ok_or_else(|| bad("no `finished in` line"))?;
    let secs = finished
        .split(',')
        .next()
        .and_then(|t| parse_duration(t.trim()))
        .ok_or_else(|| bad("unreadable duration in `finished in`"))?;
    let c = crate::h2peers::parse_h2load(stdout)?;
    let errors = c.failed + c.errored + c.timeout + c.status_3xx + c.status_4xx + c.status_5xx;
    Ok(LoadResult {
        requests: c.succeeded,
        secs,
        errors,
        percentiles: None,
    })
}

/// `12.34s`, `567.8ms` or `90us` as seconds.
fn parse_duration(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Percentiles of h2load's `--log-file`: tab-separated start time, status and microseconds to
/// the end of the response, one request per line.
pub fn percentiles_of_h2load_log(text: &str) -> Result<Percentiles> {
    let mut us: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .collect();
    if us.is_empty() {
        return Err(parse_error("h2load", "empty per-request log", text));
    }
    us.sort_by(f64::total_cmp);
    Ok(Percentiles {
        p50: percentile(&us, 50.0),
        p99: percentile(&us, 99.0),
        p999: percentile(&us, 99.9),
    })
}

/// The `p`th percentile of sorted values (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    // The epsilon keeps 99.9 % of 1000 at rank 999 despite binary rounding.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

fn check(out: &Finished, tool: &str) -> Result<()> {
    if out.success() {
        Ok(())
    } else {
        Err(Error::Unexpected(format!(
            "{tool} failed ({:?}): {}\n{}",
            out.code(),
            out.stderr_str().trim(),
            out.stdout_str().trim()
        )))
    }
}

fn parse_error(tool: &str, what: &str, text: &str) -> Error {
    Error::Unexpected(format!("cannot read {tool}'s output: {what}:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_wrk_summary_line() {
        let out = "Running 1s test @ http://x\n  1 threads and 2 connections\n\
                   BENCH requests=1200 duration_us=1000500 connect=0 read=1 write=0 status=2 timeout=3 p50=150 p99=900 p999=2100\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 1200);
        assert_eq!(r.errors, 6);
        assert!((r.secs - 1.0005).abs() < 1e-9);
        assert_eq!(
            r.percentiles,
            Some(Percentiles {
                p50: 150.0,
                p99: 900.0,
                p999: 2100.0
            })
        );
        assert!(parse_wrk("no summary").is_err());
    }

    #[test]
    fn fixed_rate_pause_per_connection() {
        let w = Wrk {
            url: String::new(),
            connections: 10,
            duration: Duration::from_secs(1),
            rate: Some(2000.0),
            close: false,
        };
        assert_eq!(w.delay_ms(), Some(5));
        let flat = Wrk { rate: None, ..w };
        assert_eq!(flat.delay_ms(), None);
    }

    #[test]
    fn reads_the_h2load_summary() {
        let out = "\
starting benchmark...
finished in 5.00s, 23456.20 req/s, 26.33MB/s
requests: 117281 total, 117345 started, 117281 done, 117280 succeeded, 1 failed, 0 errored, 2 timeout
status codes: 117280 2xx, 0 3xx, 4 4xx, 0 5xx
";
        let r = parse_h2load(out).unwrap();
        assert_eq!(r.requests, 117_280);
        assert_eq!(r.errors, 1 + 2 + 4);
        assert!((r.secs - 5.0).abs() < 1e-9);
        assert!(parse_h2load("garbage").is_err());
        let ms = parse_h2load(&out.replace("5.00s", "850.5ms")).unwrap();
        assert!((ms.secs - 0.8505).abs() < 1e-9);
    }

    #[test]
    fn percentiles_of_the_per_request_log() {
        let text: String = (1..=1000)
            .map(|i| format!("1700000000{i:06}\t200\t{i}\n"))
            .collect();
        let p = percentiles_of_h2load_log(&text).unwrap();
        assert_eq!(p.p50, 500.0);
        assert_eq!(p.p99, 990.0);
        assert_eq!(p.p999, 999.0);
        assert!(percentiles_of_h2load_log("").is_err());
    }
}
