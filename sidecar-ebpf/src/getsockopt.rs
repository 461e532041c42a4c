//! `cgroup/getsockopt` on the sidecar's own cgroup: answer `SO_ORIGINAL_DST` (`SOL_IP`) and
//! `IP6T_SO_ORIGINAL_DST` (`SOL_IPV6`) for sockets the proxy accepted from a redirected
//! connection, from `ORIG_DST_BY_PEER`.
//!
//! Every other call keeps the kernel's answer exactly: the program touches neither `optval`,
//! `optlen` nor `retval`, except for the rule of `Documentation/bpf/prog_cgroup_sockopt.rst`
//! that an `optval` larger than a page must be handed back with `optlen = 0`. The answer
//! itself fits in the first page, so it is given whatever the caller's buffer size.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sockopt},
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use sidecar_common::{ConfigKey, SockAddr, AF_INET, AF_INET6, DEFAULT_PAGE_SIZE};

use crate::{
    kernel::{is_v4_mapped, read_words, IP6T_SO_ORIGINAL_DST, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST},
    maps::{config, ORIG_DST_BY_PEER},
};

/// Return value that lets the syscall complete with whatever `retval` holds.
const PROCEED: i32 = 1;

/// `struct sockaddr_in` as userspace reads it.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6` as userspace reads it.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr_be: [u32; 4],
    scope_id: u32,
}

/// Why the kernel's answer was left alone; only for readability.
enum Skip {
    /// Another option, or a socket that was not redirected.
    NotOurs,
    /// The caller's buffer cannot hold the address.
    BufferTooSmall,
}

#[cgroup_sockopt(getsockopt)]
pub fn sc_getsockopt(ctx: SockoptContext) -> i32 {
    let _outcome: Result<(), Skip> = try_getsockopt(&ctx);
    PROCEED
}

fn try_getsockopt(ctx: &SockoptContext) -> Result<(), Skip> {
    let so = ctx.sockopt;
    let outcome = answer_original_dst(so);
    if outcome.is_err() {
        keep_large_answer(so);
    }
    outcome
}

/// The documented rule for an `optval` larger than a page: the program sees only its first
/// page, so it must set `optlen` to 0 for the kernel to hand back its own answer (older
/// kernels return `EFAULT` to the caller otherwise).
#[inline(always)]
fn keep_large_answer(so: *mut bpf_sockopt) {
    let page_size = match config(ConfigKey::PageSize) {
        0 => DEFAULT_PAGE_SIZE,
        n => n,
    };
    // SAFETY: `optlen` is a readable and writable i32 field of the getsockopt context.
    unsafe {
        if i64::from(core::ptr::read_volatile(&(*so).optlen)) > page_size as i64 {
            core::ptr::write_volatile(&mut (*so).optlen, 0);
        }
    }
}

/// Writes the original destination for `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` calls on
/// a socket accepted from a redirected connection. Any buffer of at least the address size
/// works, a buffer larger than a page included (the first page is writable).
#[inline(always)]
fn answer_original_dst(so: *mut bpf_sockopt) -> Result<(), Skip> {
    // SAFETY: `level` and `optname` are readable i32 fields of the sockopt context.
    let (level, optname) = unsafe {
        (
            core::ptr::read_volatile(&(*so).level),
            core::ptr::read_volatile(&(*so).optname),
        )
    };
    let wanted = match (level, optname) {
        (SOL_IP, SO_ORIGINAL_DST) => AF_INET,
        (SOL_IPV6, IP6T_SO_ORIGINAL_DST) => AF_INET6,
        _ => return Err(Skip::NotOurs),
    };

    // SAFETY: `sk` is the socket the call was made on (never null for getsockopt).
    let sk = unsafe { core::ptr::read_volatile(&(*so).__bindgen_anon_1.sk) };
    if sk.is_null() {
        return Err(Skip::NotOurs);
    }
    let key = peer_of(sk)?;
    let orig = match ORIG_DST_BY_PEER.get_ptr(key) {
        // SAFETY: a non-null pointer from a map lookup points to a whole value.
        Some(ptr) => unsafe { *ptr },
        None => return Err(Skip::NotOurs),
    };
    if orig.family != wanted {
        return Err(Skip::NotOurs);
    }
    if wanted == AF_INET {
        answer(
            so,
            SockaddrIn {
                family: AF_INET as u16,
                port_be: orig.port.to_be(),
                addr_be: orig.addr[0],
                zero: [0; 8],
            },
        )
    } else {
        answer(
            so,
            SockaddrIn6 {
                family: AF_INET6 as u16,
                port_be: orig.port.to_be(),
                flowinfo: 0,
                addr_be: orig.addr,
                scope_id: 0,
            },
        )
    }
}

/// The accepted socket's peer (its destination), which is the application socket's local
/// address and so the key `sockops` stored. An IPv4 peer on a dual-stack IPv6 socket is keyed
/// as IPv4, like the application's IPv4 socket was.
#[inline(always)]
fn peer_of(sk: *const bpf_sock) -> Result<SockAddr, Skip> {
    // SAFETY: `sk` is a non-null full socket pointer from the context; `family`, `dst_ip4`,
    // `dst_ip6` and `dst_port` are readable with 4-byte loads. `dst_port` holds the port in
    // network order in its low 16 bits (it was a u32 before Linux 5.19 and still accepts a
    // 4-byte load), so it is read as a u32 for older kernels.
    unsafe {
        let raw_port = core::ptr::read_volatile(core::ptr::addr_of!((*sk).dst_port).cast::<u32>());
        let port = u16::from_be(raw_port as u16);
        match core::ptr::read_volatile(&(*sk).family) {
            AF_INET => Ok(SockAddr::v4(core::ptr::read_volatile(&(*sk).dst_ip4), port)),
            AF_INET6 => {
                let ip = read_words(&(*sk).dst_ip6);
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

/// Writes `value` at the start of `optval` if the buffer holds it, sets `optlen` to its size
/// and clears the error the kernel returned.
#[inline(always)]
fn answer<T>(so: *mut bpf_sockopt, value: T) -> Result<(), Skip> {
    let len = core::mem::size_of::<T>();
    // SAFETY: `optval` and `optval_end` are the bounds of the buffer the kernel exposes; the
    // write happens only after checking `optval + len <= optval_end`, the check the verifier
    // requires for this packet-like memory.
    unsafe {
        let start = core::ptr::read_volatile(&(*so).__bindgen_anon_2.optval).cast::<u8>();
        let end = core::ptr::read_volatile(&(*so).__bindgen_anon_3.optval_end).cast::<u8>();
        if start.add(len) > end {
            return Err(Skip::BufferTooSmall);
        }
        core::ptr::write_unaligned(start.cast::<T>(), value);
        // Volatile: two plain stores to these adjacent i32 fields can be merged into one
        // 8-byte store, which the verifier rejects as a context access.
        core::ptr::write_volatile(&mut (*so).optlen, len as i32);
        core::ptr::write_volatile(&mut (*so).retval, 0);
    }
    Ok(())
}
