//! The sidecar agent: loads the eBPF interception programs, runs the proxy that measures every
//! request, and exports metrics and traces over OTLP.

pub mod admin;
pub mod cli;
pub mod config;
pub mod discover;
pub mod ebpf;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod inject;
pub mod kernel;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod run;
pub mod telemetry;
pub mod top;
