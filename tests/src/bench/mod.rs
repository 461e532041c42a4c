//! The benchmark harness behind `cargo xtask bench`: the direct path, the sidecar (eBPF and
//! iptables redirection) and Envoy, measured on one machine in the same run with real load
//! generators (wrk, h2load), reported as ratios to the baseline of the same run.
//!
//! - [`model`]: what a run measured (serialised to JSON next to the report).
//! - [`stats`]: medians, spreads and paired ratios of repetitions.
//! - [`targets`]: the documented targets and their check (`--check`).
//! - [`report`]: `docs/benchmarks.md` tables and SVG plots.
//! - [`envoy`]: Envoy's configuration as a transparent forwarding proxy, and its process.
//! - [`topology`]: the namespaces, cgroups, nginx, gRPC server and OTLP receiver of a run.
//! - [`load`]: wrk and h2load, run as the application, their output parsed.
//! - [`runner`]: the measurements, repetition by repetition, variant by variant.

pub mod envoy;
pub mod load;
pub mod model;
pub mod report;
pub mod runner;
pub mod stats;
pub mod targets;
pub mod topology;
