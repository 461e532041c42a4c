//! Test bed for the sidecar: network namespaces, cgroups, child processes, real peers, the
//! sidecar binary as a process and an in-test OTLP receiver. Everything created is owned by a
//! guard that cleans up on drop, also when a test panics.

pub mod admin;
pub mod bench;
pub mod bpf;
pub mod cgroup;
pub mod cmd;
pub mod deploy;
pub mod error;
pub mod h2peers;
pub mod impair;
pub mod iptables;
pub mod netns;
pub mod otlp;
pub mod peers;
pub mod prereq;
pub mod process;
pub mod sidecar;
pub mod ss;
pub mod tempdir;
pub mod tmux;
pub mod traceparent;
pub mod venv;
pub mod world;

pub use cgroup::Cgroup;
pub use error::{Error, Result};
pub use netns::Netns;
pub use otlp::OtlpReceiver;
pub use process::Child;
pub use sidecar::{Sidecar, SidecarConfig};
pub use traceparent::TraceParent;
pub use world::PodWorld;
