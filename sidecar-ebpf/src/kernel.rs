//! Kernel constants the bindings do not carry, byte-order helpers and address predicates.
//!
//! Addresses are handled exactly as the kernel stores them in the eBPF contexts: IPv4 as one
//! network-order `u32`, IPv6 as four network-order `u32` words, ports converted to host order
//! at the point they are read.

/// `SOCK_STREAM`.
pub const SOCK_STREAM: u32 = 1;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;
/// `SOL_IP`.
pub const SOL_IP: i32 = 0;
/// `SOL_IPV6`.
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (netfilter, level `SOL_IP`).
pub const SO_ORIGINAL_DST: i32 = 80;
/// `IP6T_SO_ORIGINAL_DST` (netfilter, level `SOL_IPV6`).
pub const IP6T_SO_ORIGINAL_DST: i32 = 80;

/// 127.0.0.1 as the kernel stores it (network order).
pub const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as the kernel stores it (four network-order words).
pub const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Whether a network-order IPv4 address is in 127.0.0.0/8 or is 0.0.0.0 (which connects to
/// the local host as well).
#[inline(always)]
pub fn is_local_v4(addr_be: u32) -> bool {
    let host = u32::from_be(addr_be);
    host >> 24 == 127 || host == 0
}

/// Whether a network-order IPv6 address is `::1`, `::` or IPv4-mapped (`::ffff:a.b.c.d`).
///
/// IPv4-mapped destinations are not redirected at all for now: the kernel runs only the
/// connect6 hook for them, and the proxy listens on separate IPv4 and IPv6 sockets.
#[inline(always)]
pub fn is_local_or_mapped_v6(addr_be: [u32; 4]) -> bool {
    let prefix_zero = addr_be[0] == 0 && addr_be[1] == 0;
    let mapped = prefix_zero && u32::from_be(addr_be[2]) == 0x0000_ffff;
    let loopback_or_any = prefix_zero && addr_be[2] == 0 && u32::from_be(addr_be[3]) <= 1;
    mapped || loopback_or_any
}

/// Whether a network-order IPv6 address is IPv4-mapped; used on the proxy side, where a
/// dual-stack socket reports an IPv4 peer that way.
#[inline(always)]
pub fn is_v4_mapped(addr_be: [u32; 4]) -> bool {
    addr_be[0] == 0 && addr_be[1] == 0 && u32::from_be(addr_be[2]) == 0x0000_ffff
}

/// Reads four consecutive context words one 32-bit load at a time: the verifier only accepts
/// 4-byte loads of the address fields of `bpf_sock_addr`, `bpf_sock_ops` and `bpf_sock`.
///
/// # Safety
/// `words` must point to a readable `[u32; 4]` field of an eBPF context.
#[inline(always)]
pub unsafe fn read_words(words: *const [u32; 4]) -> [u32; 4] {
    let base = words.cast::<u32>();
    // SAFETY: the caller guarantees `words` points to four readable u32 words.
    unsafe {
        [
            core::ptr::read_volatile(base),
            core::ptr::read_volatile(base.add(1)),
            core::ptr::read_volatile(base.add(2)),
            core::ptr::read_volatile(base.add(3)),
        ]
    }
}

/// Writes four context words one 32-bit store at a time (see [`read_words`]).
///
/// # Safety
/// `words` must point to a writable `[u32; 4]` field of an eBPF context.
#[inline(always)]
pub unsafe fn write_words(words: *mut [u32; 4], value: [u32; 4]) {
    let base = words.cast::<u32>();
    // SAFETY: the caller guarantees `words` points to four writable u32 words.
    unsafe {
        core::ptr::write_volatile(base, value[0]);
        core::ptr::write_volatile(base.add(1), value[1]);
        core::ptr::write_volatile(base.add(2), value[2]);
        core::ptr::write_volatile(base.add(3), value[3]);
    }
}
