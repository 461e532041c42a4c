//! `sk_lookup` on the pod's network namespace: steer inbound TCP connections to the pod's
//! served ports onto the proxy's inbound listener, keeping the original destination as the
//! accepted socket's local address.
//!
//! Steered: TCP lookups whose local port is in `INBOUND_PORTS` and whose remote address is not
//! loopback (127.0.0.0/8, ::1; the proxy reaches the application from 127.0.0.6 / ::1, which
//! must never come back to it) nor unspecified. The listener is taken from
//! `INBOUND_LISTENERS` by address family; when the slot is empty (the proxy is not listening,
//! or closed its listener to shut down) the lookup goes on as usual: fail-open. The program
//! never drops a lookup.

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use sidecar_common::{
    policy::{INBOUND_LISTENER_V4, INBOUND_LISTENER_V6},
    AF_INET, AF_INET6,
};

use crate::{
    kernel::{is_local_or_mapped_v6, is_local_v4, read_words, IPPROTO_TCP},
    maps::INBOUND_LISTENERS,
    policy::inbound_port,
};

/// Why a lookup was left alone; only for readability, the program passes it either way.
enum Skip {
    /// Not TCP, not a steered port, or a loopback source.
    NotOurs,
    /// No listener for this family in the map (proxy down), or the kernel refused it.
    NoListener,
}

#[sk_lookup]
pub fn sc_sk_lookup(ctx: SkLookupContext) -> u32 {
    let _outcome: Result<(), Skip> = try_sk_lookup(&ctx);
    SK_PASS
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<(), Skip> {
    let lookup: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: `lookup` is the program's context pointer; `protocol`, `family` and `local_port`
    // are readable u32 fields (`local_port` in host byte order).
    let (protocol, family, local_port) = unsafe {
        (
            core::ptr::read_volatile(&(*lookup).protocol),
            core::ptr::read_volatile(&(*lookup).family),
            core::ptr::read_volatile(&(*lookup).local_port),
        )
    };
    if protocol != IPPROTO_TCP || local_port > u32::from(u16::MAX) {
        return Err(Skip::NotOurs);
    }
    if !inbound_port(local_port as u16) {
        return Err(Skip::NotOurs);
    }
    let slot = match family {
        AF_INET => {
            // SAFETY: `remote_ip4` is a readable u32 field of the context.
            let remote = unsafe { core::ptr::read_volatile(&(*lookup).remote_ip4) };
            if is_local_v4(remote) {
                return Err(Skip::NotOurs);
            }
            INBOUND_LISTENER_V4
        }
        AF_INET6 => {
            // SAFETY: `remote_ip6` is four readable u32 words of the context.
            let remote = unsafe { read_words(&(*lookup).remote_ip6) };
            if is_local_or_mapped_v6(remote) {
                return Err(Skip::NotOurs);
            }
            INBOUND_LISTENER_V6
        }
        _ => return Err(Skip::NotOurs),
    };
    // Looks the socket up (a reference the helper releases), assigns it with no flags: an
    // assignment made by another sk_lookup program that ran first is kept.
    INBOUND_LISTENERS
        .redirect_sk_lookup(ctx, slot, 0)
        .map_err(|_| Skip::NoListener)
}
