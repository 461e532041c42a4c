//! Interception policy: which outbound destinations and inbound ports the kernel programs
//! redirect, from flags, environment and pod annotations, resolved against the ports the pod
//! serves.
//!
//! CONTRACT (shared by the policy/config work and the eBPF loader): `KernelPolicy` is what the
//! loader writes into the kernel maps (`Interception::apply_policy`). Keep its fields.

use std::collections::BTreeSet;

use ipnet::IpNet;

/// The resolved policy in the form the kernel maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Outbound destination ports never redirected.
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Outbound destination networks never redirected (IPv4 and IPv6 mixed).
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// When non-empty, only destinations inside these networks are redirected (exclusions
    /// still win).
    pub include_outbound_cidrs: Vec<IpNet>,
    /// Local ports whose inbound TCP connections are steered to the inbound proxy listener
    /// (already resolved: served/included ports minus excluded ports minus the sidecar's own).
    pub inbound_ports: BTreeSet<u16>,
}
