//! The maps shared by the programs and the userspace loader, with their bounds.

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use sidecar_common::{
    ConfigKey, SockAddr, CONFIG_ENTRIES, ORIG_DST_BY_COOKIE_ENTRIES, ORIG_DST_BY_PEER_ENTRIES,
};

/// Configuration words written by userspace before the programs are attached.
///
/// Key: `ConfigKey as u32`; value: `u64`; size: `CONFIG_ENTRIES` words.
#[map]
pub static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_ENTRIES, 0);

/// Original destination of a redirected connect, until the connection is established.
///
/// Key: socket cookie (`u64`) of the application socket; value: original destination.
/// Bounded by `ORIG_DST_BY_COOKIE_ENTRIES` (LRU); entries leave on ESTABLISHED or on close.
#[map]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> =
    LruHashMap::with_max_entries(ORIG_DST_BY_COOKIE_ENTRIES, 0);

/// Original destination of an established redirected connection, keyed so the proxy's side can
/// find it: the application socket's local address (family, address, host-order port), which
/// is the peer address of the socket the proxy accepted.
///
/// Bounded by `ORIG_DST_BY_PEER_ENTRIES` (LRU); entries are deleted when the application
/// socket reaches `TCP_CLOSE`.
#[map]
pub static ORIG_DST_BY_PEER: LruHashMap<SockAddr, SockAddr> =
    LruHashMap::with_max_entries(ORIG_DST_BY_PEER_ENTRIES, 0);

/// One configuration word; 0 when absent (the array always holds every index, zeroed).
#[inline(always)]
pub fn config(key: ConfigKey) -> u64 {
    CONFIG.get(key as u32).copied().unwrap_or(0)
}
