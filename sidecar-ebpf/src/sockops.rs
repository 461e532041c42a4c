//! `sockops` on the pod cgroup: when a redirected connection is established, re-key its
//! original destination by the application socket's local address (the proxy sees that address
//! as its peer), and delete the record when the socket closes.
//!
//! It also drives the TCP observation of every non-loopback connection of the pod
//! ([`crate::observe`]).
//!
//! Only sockets found in `ORIG_DST_BY_COOKIE` are followed: for those the state callback is
//! switched on at connect time, so a connect that never establishes drops its cookie entry
//! as well, and an established one drops its peer entry on `TCP_CLOSE`.

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use sidecar_common::{SockAddr, AF_INET, AF_INET6};

use crate::{
    kernel::{is_v4_mapped, read_words},
    maps::{ORIG_DST_BY_COOKIE, ORIG_DST_BY_PEER},
    observe,
};

/// Why a callback did nothing; only for readability.
enum Skip {
    /// Not a redirected socket, or a callback this program does not handle.
    NotOurs,
    /// A map update or the callback-flag helper failed.
    Kernel,
}

#[sock_ops]
pub fn sc_sockops(ctx: SockOpsContext) -> u32 {
    let _outcome: Result<(), Skip> = try_sockops(&ctx);
    // The return value of a sockops program only matters for callbacks that ask for a reply;
    // none of the handled ones do.
    1
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), Skip> {
    // TCP observation (RTT, bytes, outcome) of every non-loopback connection comes first; the
    // redirect bookkeeping below is independent of it.
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => observe::on_connect(ctx, cookie(ctx)),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => observe::on_active_established(ctx, cookie(ctx)),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => observe::on_passive_established(ctx, cookie(ctx)),
        BPF_SOCK_OPS_STATE_CB => observe::on_state_change(ctx, cookie(ctx)),
        BPF_SOCK_OPS_RTO_CB => observe::on_rto(ctx, cookie(ctx)),
        _ => {}
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(ctx),
        _ => Err(Skip::NotOurs),
    }
}

/// The socket cookie, the same value the connect hook recorded.
#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper accepts a sock_ops context pointer.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Asks the kernel to call this program on every TCP state change of the socket.
#[inline(always)]
fn follow_state(ctx: &SockOpsContext) -> Result<(), Skip> {
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    ctx.set_cb_flags(flags as i32).map_err(|_| Skip::Kernel)
}

/// The application socket's local address: family, address as stored, host-order port (an
/// IPv4-mapped IPv6 address as the IPv4 address it stands for).
#[inline(always)]
fn local_addr(ctx: &SockOpsContext) -> Result<SockAddr, Skip> {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: `family`, `local_ip4`, `local_ip6` and `local_port` are readable u32 fields of the
    // sock_ops context; `local_port` is in host byte order.
    unsafe {
        let port = core::ptr::read_volatile(&(*ops).local_port) as u16;
        match core::ptr::read_volatile(&(*ops).family) {
            AF_INET => Ok(SockAddr::v4(
                core::ptr::read_volatile(&(*ops).local_ip4),
                port,
            )),
            AF_INET6 => {
                let ip = read_words(&(*ops).local_ip6);
                // A dual-stack socket on an IPv4 connection (a redirected IPv4-mapped
                // connect): the proxy sees an IPv4 peer, so the key is IPv4 too.
                if is_v4_mapped(ip) {
                    Ok(SockAddr::v4(ip[3], port))
                } else {
                    Ok(SockAddr::v6(ip, port))
                }
            }
            _ => Err(Skip::NotOurs),
        }
    }
}

fn on_connect(ctx: &SockOpsContext) -> Result<(), Skip> {
    let cookie = cookie(ctx);
    if ORIG_DST_BY_COOKIE.get_ptr(cookie).is_none() {
        return Err(Skip::NotOurs);
    }
    follow_state(ctx)
}

fn on_established(ctx: &SockOpsContext) -> Result<(), Skip> {
    let cookie = cookie(ctx);
    let orig = match ORIG_DST_BY_COOKIE.get_ptr(cookie) {
        // SAFETY: a non-null pointer from a map lookup points to a whole value; it is copied
        // before the entry is deleted.
        Some(ptr) => unsafe { *ptr },
        None => return Err(Skip::NotOurs),
    };
    let local = local_addr(ctx)?;
    let saved = ORIG_DST_BY_PEER.insert(local, orig, u64::from(BPF_ANY));
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    saved.map_err(|_| Skip::Kernel)?;
    follow_state(ctx)
}

fn on_state_change(ctx: &SockOpsContext) -> Result<(), Skip> {
    // args[0] is the old state, args[1] the new one.
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return Err(Skip::NotOurs);
    }
    // A connect that never established still has its cookie entry; an established one has
    // its peer entry. Deleting an absent key is harmless.
    let _ = ORIG_DST_BY_COOKIE.remove(cookie(ctx));
    let local = local_addr(ctx)?;
    let _ = ORIG_DST_BY_PEER.remove(local);
    Ok(())
}
