//! Policy lookups shared by the programs: excluded outbound ports and networks, the outbound
//! include list, and the inbound ports to steer. Userspace owns the contents of these maps
//! (`sidecar::ebpf::policy`); the programs only read them.

use aya_ebpf::maps::lpm_trie::Key;
use sidecar_common::policy::{PolicyKey, V4_BITS, V6_BITS};

use crate::maps::{
    EXCLUDED_CIDRS_V4, EXCLUDED_CIDRS_V6, EXCLUDED_PORTS, INBOUND_PORTS, INCLUDED_CIDRS_V4,
    INCLUDED_CIDRS_V6, POLICY,
};

/// Whether the include list is active (some included network is configured).
#[inline(always)]
fn include_active() -> bool {
    POLICY
        .get(PolicyKey::IncludeActive as u32)
        .is_some_and(|word| *word != 0)
}

/// Whether the outbound destination port is excluded.
#[inline(always)]
fn port_excluded(port: u16) -> bool {
    EXCLUDED_PORTS.get_ptr(port).is_some()
}

/// Whether an outbound connect to this IPv4 destination (network-order address, host-order
/// port) must be left alone by policy: excluded port, excluded network, or outside an active
/// include list.
#[inline(always)]
pub fn skip_outbound_v4(addr_be: u32, port: u16) -> bool {
    if port_excluded(port) {
        return true;
    }
    let key = Key::new(V4_BITS, addr_be);
    if EXCLUDED_CIDRS_V4.get(&key).is_some() {
        return true;
    }
    include_active() && INCLUDED_CIDRS_V4.get(&key).is_none()
}

/// [`skip_outbound_v4`] for an IPv6 destination (four network-order words).
#[inline(always)]
pub fn skip_outbound_v6(addr_be: [u32; 4], port: u16) -> bool {
    if port_excluded(port) {
        return true;
    }
    let key = Key::new(V6_BITS, addr_be);
    if EXCLUDED_CIDRS_V6.get(&key).is_some() {
        return true;
    }
    include_active() && INCLUDED_CIDRS_V6.get(&key).is_none()
}

/// Whether inbound TCP connections to this local port (host order) are steered to the proxy.
#[inline(always)]
pub fn inbound_port(port: u16) -> bool {
    INBOUND_PORTS.get_ptr(port).is_some()
}
