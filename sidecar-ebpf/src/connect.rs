//! `cgroup/connect4` and `cgroup/connect6`: redirect the pod's outbound TCP connects to the
//! proxy's outbound listener and remember each original destination by socket cookie.
//!
//! Never redirected: non-TCP sockets, redirection disabled (port 0), connects made from the
//! sidecar's own cgroup, local destinations (127.0.0.0/8, 0.0.0.0, ::1, ::, and their IPv4-mapped
//! forms), the proxy port itself, destinations excluded by policy (excluded ports and
//! networks, or outside the include list when one is set; see [`crate::policy`]), and any
//! connect while nothing listens on the proxy address in the socket's network namespace
//! (fail-open). The programs always allow the connect: they can rewrite it, never block it.
//!
//! A dual-stack IPv6 socket connecting to an IPv4-mapped address (`::ffff:a.b.c.d`, how gRPC
//! C-core, Java and others dial IPv4) is an IPv4 connection: it is judged by the IPv4 rules and
//! sent to `::ffff:127.0.0.1`, i.e. the proxy's IPv4 listener, with the IPv4 destination
//! recorded.

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as TupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as TupleV6, BPF_ANY, BPF_F_CURRENT_NETNS,
        BPF_TCP_LISTEN,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use sidecar_common::{ConfigKey, SockAddr};

use crate::{
    kernel::{
        is_local_or_mapped_v6, is_local_v4, is_v4_mapped, read_words, write_words, IPPROTO_TCP,
        LOOPBACK_V4, LOOPBACK_V6, SOCK_STREAM,
    },
    maps::{config, ORIG_DST_BY_COOKIE},
    policy::{skip_outbound_v4, skip_outbound_v6},
};

/// Return value of a `cgroup/connect*` program that lets the connect proceed.
const ALLOW: i32 = 1;

/// Why a connect was left alone; only for readability, the programs allow it either way.
enum Skip {
    /// The connect is out of scope (see the module documentation).
    NotOurs,
    /// Excluded by policy: excluded port or network, or outside an active include list.
    Policy,
    /// The proxy is not listening: fail open.
    ProxyDown,
    /// The original destination could not be recorded; redirecting would lose it.
    MapFull,
}

#[cgroup_sock_addr(connect4)]
pub fn sc_connect4(ctx: SockAddrContext) -> i32 {
    let _outcome: Result<(), Skip> = try_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sc_connect6(ctx: SockAddrContext) -> i32 {
    let _outcome: Result<(), Skip> = try_connect6(&ctx);
    ALLOW
}

/// The proxy port when this connect is in scope for redirection, checked on everything the
/// two families share: socket type, protocol, configuration and the calling cgroup.
#[inline(always)]
fn proxy_port_for(sa: *const bpf_sock_addr) -> Result<u16, Skip> {
    // SAFETY: `sa` is the program's context pointer; `type` and `protocol` are readable u32
    // fields of `bpf_sock_addr` for connect hooks.
    let (sock_type, protocol) = unsafe {
        (
            core::ptr::read_volatile(&(*sa).type_),
            core::ptr::read_volatile(&(*sa).protocol),
        )
    };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Err(Skip::NotOurs);
    }
    let port = config(ConfigKey::OutboundPort);
    if port == 0 || port > u64::from(u16::MAX) {
        return Err(Skip::NotOurs);
    }
    let sidecar_cgroup = config(ConfigKey::SidecarCgroupId);
    // SAFETY: helper without arguments, available to cgroup sock_addr programs since 5.7.
    if sidecar_cgroup != 0 && unsafe { bpf_get_current_cgroup_id() } == sidecar_cgroup {
        return Err(Skip::NotOurs);
    }
    Ok(port as u16)
}

/// The destination port of the connect in host order (`user_port` holds it in network order
/// in its low 16 bits).
#[inline(always)]
fn dst_port(sa: *const bpf_sock_addr) -> u16 {
    // SAFETY: `user_port` is a readable u32 field of the context.
    let raw = unsafe { core::ptr::read_volatile(&(*sa).user_port) };
    u16::from_be(raw as u16)
}

/// Whether a TCP socket is listening on `tuple` in the socket's own network namespace.
#[inline(always)]
fn listening(ctx: &SockAddrContext, tuple: *mut bpf_sock_tuple, tuple_size: usize) -> bool {
    // SAFETY: `tuple` points to a stack value whose first `tuple_size` bytes are initialised;
    // the helper is available to cgroup sock_addr programs (5.2+).
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            tuple_size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a non-null referenced socket returned by the lookup; `state` is readable
    // and the reference is released exactly once, as the verifier requires.
    unsafe {
        let state = core::ptr::read_volatile(&(*sk).state);
        bpf_sk_release(sk.cast());
        state == BPF_TCP_LISTEN
    }
}

/// Records `orig` under this socket's cookie; redirection happens only if this succeeds.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &SockAddr) -> Result<(), Skip> {
    // SAFETY: the context pointer is the program's own; the helper accepts sock_addr contexts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_DST_BY_COOKIE
        .insert(cookie, orig, u64::from(BPF_ANY))
        .map_err(|_| Skip::MapFull)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), Skip> {
    let sa = ctx.sock_addr;
    let proxy_port = proxy_port_for(sa)?;
    // SAFETY: `user_ip4` is a readable u32 field of the connect4 context.
    let ip = unsafe { core::ptr::read_volatile(&(*sa).user_ip4) };
    let port = dst_port(sa);
    if is_local_v4(ip) || port == proxy_port {
        return Err(Skip::NotOurs);
    }
    if skip_outbound_v4(ip, port) {
        return Err(Skip::Policy);
    }

    // Only the ipv4 member is read by the lookup (`tuple_size` bytes); saddr/sport stay zero.
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: TupleV4 {
                saddr: 0,
                daddr: LOOPBACK_V4,
                sport: 0,
                dport: proxy_port.to_be(),
            },
        },
    };
    if !listening(ctx, &mut tuple, core::mem::size_of::<TupleV4>()) {
        return Err(Skip::ProxyDown);
    }

    remember(ctx, &SockAddr::v4(ip, port))?;
    // SAFETY: `user_ip4` and `user_port` are writable u32 fields of the connect4 context.
    unsafe {
        core::ptr::write_volatile(&mut (*sa).user_ip4, LOOPBACK_V4);
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(proxy_port.to_be()));
    }
    Ok(())
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), Skip> {
    let sa = ctx.sock_addr;
    let proxy_port = proxy_port_for(sa)?;
    // SAFETY: `user_ip6` is four readable u32 words of the connect6 context.
    let ip = unsafe { read_words(&(*sa).user_ip6) };
    let port = dst_port(sa);
    if is_v4_mapped(ip) {
        return connect6_mapped(ctx, proxy_port, ip[3], port);
    }
    if is_local_or_mapped_v6(ip) || port == proxy_port {
        return Err(Skip::NotOurs);
    }
    if skip_outbound_v6(ip, port) {
        return Err(Skip::Policy);
    }

    // Only the ipv6 member is read by the lookup (`tuple_size` bytes); saddr/sport stay zero.
    // Filled word by word: a struct literal here compiles to a `memset` subprogram call.
    let mut tuple = core::mem::MaybeUninit::<bpf_sock_tuple>::uninit();
    let v6 = tuple.as_mut_ptr().cast::<TupleV6>();
    // SAFETY: `v6` points to the ipv6 member of a local union; every field the lookup reads
    // is written here before the tuple is used.
    unsafe {
        write_words(core::ptr::addr_of_mut!((*v6).saddr), [0; 4]);
        write_words(core::ptr::addr_of_mut!((*v6).daddr), LOOPBACK_V6);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*v6).sport), 0);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*v6).dport), proxy_port.to_be());
    }
    if !listening(ctx, tuple.as_mut_ptr(), core::mem::size_of::<TupleV6>()) {
        return Err(Skip::ProxyDown);
    }

    remember(ctx, &SockAddr::v6(ip, port))?;
    // SAFETY: `user_ip6` (four u32 words) and `user_port` are writable fields of the connect6
    // context.
    unsafe {
        write_words(&mut (*sa).user_ip6, LOOPBACK_V6);
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(proxy_port.to_be()));
    }
    Ok(())
}

/// A connect6 to the IPv4-mapped address of `ip` (network order): the IPv4 rules decide, the
/// proxy's IPv4 listener is the target (as `::ffff:127.0.0.1`).
#[inline(always)]
fn connect6_mapped(ctx: &SockAddrContext, proxy_port: u16, ip: u32, port: u16) -> Result<(), Skip> {
    let sa = ctx.sock_addr;
    if is_local_v4(ip) || port == proxy_port {
        return Err(Skip::NotOurs);
    }
    if skip_outbound_v4(ip, port) {
        return Err(Skip::Policy);
    }
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: TupleV4 {
                saddr: 0,
                daddr: LOOPBACK_V4,
                sport: 0,
                dport: proxy_port.to_be(),
            },
        },
    };
    if !listening(ctx, &mut tuple, core::mem::size_of::<TupleV4>()) {
        return Err(Skip::ProxyDown);
    }
    remember(ctx, &SockAddr::v4(ip, port))?;
    // SAFETY: `user_ip6` (four u32 words) and `user_port` are writable fields of the connect6
    // context.
    unsafe {
        write_words(
            &mut (*sa).user_ip6,
            [0, 0, 0x0000_ffff_u32.to_be(), LOOPBACK_V4],
        );
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(proxy_port.to_be()));
    }
    Ok(())
}
