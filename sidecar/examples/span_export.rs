//! The telemetry pipeline benchmark of `cargo xtask bench`: the highest span rate the sidecar's
//! real pipeline (OTel SDK, batch span processor with the default queue, OTLP gRPC exporter over
//! tonic) exports with no drop to an OTLP receiver in this process.
//!
//! Each step produces client requests through the same API the proxy calls
//! (`client_request_start` / `client_request_end`: a CLIENT span plus the request metrics) at a
//! fixed rate for a few seconds, waits for the exporter to catch up, and compares what was
//! produced, what the receiver got and what the exporter counted as dropped. The rate grows by a
//! factor per step until a step loses spans or the generator cannot keep up, then bisects
//! between the last lossless and the first lossy rate. Prints one JSON object
//! (`sidecar_tests::bench::model::SpanRate`) on stdout; progress on stderr.
//!
//! `span_export [--step-secs S] [--start RATE] [--max RATE] [--factor F] [--bisect N]`

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use sidecar::export::config::{ExportOptions, OtlpRawOptions};
use sidecar::telemetry::{
    self, HttpRequestEnd, HttpRequestStart, HttpVersion, SamplerKind, SamplingConfig,
    TelemetryConfig,
};
use sidecar_tests::bench::model::{SpanRate, SpanStep};
use sidecar_tests::OtlpReceiver;

/// Search parameters.
#[derive(Clone, Debug)]
struct Args {
    step: Duration,
    start: f64,
    max: f64,
    factor: f64,
    bisect: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        step: Duration::from_secs(3),
        start: 5_000.0,
        max: 400_000.0,
        factor: 1.5,
        bisect: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = value
            .parse::<f64>()
            .map_err(|_| format!("{flag}: not a number: {value}"))?;
        if !(num.is_finite() && num > 0.0) {
            return Err(format!("{flag}: must be positive: {value}"));
        }
        match flag.as_str() {
            "--step-secs" => a.step = Duration::from_secs_f64(num),
            "--start" => a.start = num,
            "--max" => a.max = num,
            "--factor" if num > 1.0 => a.factor = num,
            "--bisect" => a.bisect = num as u32,
            _ => return Err(format!("unknown or invalid argument {flag} {value}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("span_export: {e}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("span_export: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(result) => match serde_json::to_string(&result) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("span_export: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("span_export: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<SpanRate> {
    let receiver = OtlpReceiver::builder().count_only(true).start().await?;
    let export = ExportOptions {
        generic: OtlpRawOptions {
            endpoint: Some(receiver.endpoint()),
            ..OtlpRawOptions::default()
        },
        ..ExportOptions::default()
    }
    .resolve()?;
    let cfg = TelemetryConfig {
        export,
        resource: telemetry::resource::to_resource(&[]),
        prometheus: None,
        sink_path: std::env::temp_dir().join("span_export-unused.jsonl"),
        summary_interval: None,
        sampling: SamplingConfig {
            kind: SamplerKind::ParentBasedAlwaysOn,
            ratio: 1.0,
        },
        routes: Vec::new(),
        max_routes: 100,
        redact_query_params: None,
    };
    let (telemetry, guard) = telemetry::init(&cfg)?;
    let stats = guard.export_stats();
    let mut result = SpanRate::default();
    let step = |rate: f64| {
        let telemetry = telemetry.clone();
        let stats = stats.clone();
        let receiver = &receiver;
        let step_len = args.step;
        async move {
            let dropped0 = stats.spans_dropped();
            let received0 = receiver.counts().spans;
            let produced =
                tokio::task::spawn_blocking(move || produce(&telemetry, rate, step_len)).await?;
            // Let the exporter catch up (bounded): everything produced is either received or
            // counted as dropped.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let dropped = stats.spans_dropped() - dropped0;
                let received = receiver.counts().spans - received0;
                if received + dropped >= produced || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let s = SpanStep {
                offered_per_s: rate,
                produced_per_s: produced as f64 / step_len.as_secs_f64(),
                produced,
                received: receiver.counts().spans - received0,
                dropped: stats.spans_dropped() - dropped0,
            };
            eprintln!(
                "span_export: offered {:>8.0}/s produced {:>8.0}/s received {:>8} dropped {:>6}",
                s.offered_per_s, s.produced_per_s, s.received, s.dropped
            );
            anyhow::Ok(s)
        }
    };
    let lossless = |s: &SpanStep| s.dropped == 0 && s.received == s.produced;
    // Grow until a step loses spans or the generator falls behind what was offered.
    let mut good: Option<f64> = None;
    let mut bad: Option<f64> = None;
    let mut rate = args.start;
    while rate <= args.max {
        let s = step(rate).await?;
        result.steps.push(s);
        let kept_up = s.produced_per_s >= 0.95 * rate;
        if lossless(&s) && kept_up {
            good = Some(rate);
            rate *= args.factor;
        } else {
            bad = Some(rate);
            break;
        }
    }
    // Bisect between the last lossless and the first lossy rate.
    if let (Some(mut lo), Some(mut hi)) = (good, bad) {
        for _ in 0..args.bisect {
            let mid = (lo + hi) / 2.0;
            let s = step(mid).await?;
            result.steps.push(s);
            if lossless(&s) && s.produced_per_s >= 0.95 * mid {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    result.max_lossless_per_s = result
        .steps
        .iter()
        .filter(|s| lossless(s))
        .map(|s| s.produced_per_s)
        .fold(0.0, f64::max);
    drop(telemetry);
    guard.shutdown().await?;
    Ok(result)
}

/// Produces requests at `rate` per second for `len` on this thread; returns how many.
fn produce(telemetry: &telemetry::Telemetry, rate: f64, len: Duration) -> u64 {
    let destination = SocketAddr::from(([198, 18, 0, 2], 8080));
    let started = Instant::now();
    let mut produced = 0u64;
    while started.elapsed() < len {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while produced < due {
            let start = SystemTime::now();
            let req = telemetry.client_request_start(&HttpRequestStart {
                method: "GET",
                target: "/bench/items?page=1",
                host: Some("bench.svc.cluster.local"),
                version: HttpVersion::Http11,
                destination,
                traceparent: None,
                tracestate: None,
                start,
                reused_connection: true,
            });
            telemetry.client_request_end(
                req,
                HttpRequestEnd {
                    status: Some(200),
                    request_body_bytes: 0,
                    response_body_bytes: 1024,
                    error: None,
                    end: SystemTime::now(),
                },
            );
            produced += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    produced
}
