//! The maps shared by the programs and the userspace loader, with their bounds.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap},
};
use sidecar_common::observe::{
    ConnState, CONN_STATE_ENTRIES, OBSERVE_CONFIG_ENTRIES, TCP_EVENTS_BYTES,
};
use sidecar_common::{
    policy::{
        CIDR_ENTRIES, EXCLUDED_PORTS_ENTRIES, INBOUND_LISTENER_ENTRIES, INBOUND_PORTS_ENTRIES,
        POLICY_ENTRIES,
    },
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

/// Policy words written by userspace (see `PolicyKey`); index 0 turns the include list on.
#[map]
pub static POLICY: Array<u32> = Array::with_max_entries(POLICY_ENTRIES, 0);

/// Outbound destination ports never redirected. Key: host-order port; value: `PRESENT`.
/// Bounded by `EXCLUDED_PORTS_ENTRIES`; its contents are replaced by userspace only.
#[map]
pub static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(EXCLUDED_PORTS_ENTRIES, 0);

/// IPv4 networks never redirected. Key: prefix length + network-order address; value:
/// `PRESENT`. Bounded by `CIDR_ENTRIES`.
#[map]
pub static EXCLUDED_CIDRS_V4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(CIDR_ENTRIES, 0);

/// IPv6 networks never redirected. Key: prefix length + four network-order words; value:
/// `PRESENT`. Bounded by `CIDR_ENTRIES`.
#[map]
pub static EXCLUDED_CIDRS_V6: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(CIDR_ENTRIES, 0);

/// IPv4 networks redirected when the include list is active (see `POLICY`). Same layout and
/// bound as `EXCLUDED_CIDRS_V4`.
#[map]
pub static INCLUDED_CIDRS_V4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(CIDR_ENTRIES, 0);

/// IPv6 networks redirected when the include list is active. Same layout and bound as
/// `EXCLUDED_CIDRS_V6`.
#[map]
pub static INCLUDED_CIDRS_V6: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(CIDR_ENTRIES, 0);

/// Local ports whose inbound TCP connections `sk_lookup` steers to the inbound listener.
/// Key: host-order port; value: `PRESENT`. Bounded by `INBOUND_PORTS_ENTRIES`.
#[map]
pub static INBOUND_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(INBOUND_PORTS_ENTRIES, 0);

/// The proxy's inbound listeners: index `INBOUND_LISTENER_V4` and `INBOUND_LISTENER_V6`.
/// The kernel removes a socket from it when the socket closes, which is what makes inbound
/// steering fail open.
#[map]
pub static INBOUND_LISTENERS: SockMap = SockMap::with_max_entries(INBOUND_LISTENER_ENTRIES, 0);

/// TCP observation: per-connection state from connect/accept to close.
///
/// Key: socket cookie; value: `ConnState`. Bounded by `CONN_STATE_ENTRIES` (LRU); entries are
/// deleted when the socket reaches `TCP_CLOSE`.
#[map]
pub static CONN_STATE: LruHashMap<u64, ConnState> =
    LruHashMap::with_max_entries(CONN_STATE_ENTRIES, 0);

/// TCP observation: one `TcpEvent` per closed connection or failed connect, read by the agent.
/// Size: `TCP_EVENTS_BYTES`.
#[map]
pub static TCP_EVENTS: RingBuf = RingBuf::with_byte_size(TCP_EVENTS_BYTES, 0);

/// TCP observation: records lost because `TCP_EVENTS` was full. One `u64` per CPU at index 0.
#[map]
pub static TCP_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// TCP observation settings written by userspace (see `ObserveConfigKey`).
#[map]
pub static OBSERVE_CONFIG: Array<u64> = Array::with_max_entries(OBSERVE_CONFIG_ENTRIES, 0);

/// One configuration word; 0 when absent (the array always holds every index, zeroed).
#[inline(always)]
pub fn config(key: ConfigKey) -> u64 {
    CONFIG.get(key as u32).copied().unwrap_or(0)
}
