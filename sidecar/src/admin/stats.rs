//! The JSON document of `/stats`, read by `sidecar top`.
//!
//! CONTRACT: produced by `run` (assembled from the summary, proxy counters, export stats and
//! process figures); consumed by `crate::top`. Add fields with `#[serde(default)]` so an older
//! `top` reads a newer sidecar.

use serde::{Deserialize, Serialize};

use crate::export::summary::SummarySnapshot;

/// Everything `/stats` returns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Sidecar version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// `/readyz` state.
    pub ready: bool,
    /// A stop signal arrived.
    pub draining: bool,
    /// Proxy connections.
    pub connections: ConnectionStats,
    /// Per-destination (and per-route) traffic, from the summary.
    pub traffic: SummarySnapshot,
    /// Telemetry export health.
    pub export: ExportStatsSnapshot,
    /// Kernel side.
    pub kernel: KernelStats,
    /// The sidecar process itself.
    pub process: ProcessStats,
}

/// Proxy connection counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStats {
    /// Outbound connections open now.
    pub active_outbound: u64,
    /// Inbound connections open now.
    pub active_inbound: u64,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Upstream connects that failed or timed out.
    pub connect_failures: u64,
    /// Connections closed because the original destination was unknown.
    pub orig_dst_failures: u64,
}

/// Export counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStatsSnapshot {
    /// Spans the collector (or sink) accepted.
    pub spans_exported: u64,
    /// Spans dropped because the queue was full.
    pub spans_dropped: u64,
    /// Spans in exports that failed after retries.
    pub spans_failed: u64,
    /// Spans waiting in the queue now.
    pub queue_size: u64,
    /// Queue capacity.
    pub queue_capacity: u64,
    /// Metric data points the collector (or sink) accepted.
    pub metric_points_exported: u64,
    /// Metric data points in failed exports.
    pub metric_points_failed: u64,
}

/// Kernel-side figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelStats {
    /// Observation records lost because the ring buffer was full.
    pub ringbuf_overflows: u64,
    /// Fill ratio (0..1) of each eBPF map with a fixed capacity, by map name.
    pub map_fill: Vec<(String, f64)>,
}

/// The sidecar process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessStats {
    /// User + system CPU seconds since start.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}
