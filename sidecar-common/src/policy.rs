//! Interception policy as the kernel maps hold it: map bounds, the policy word indices, and
//! the keys of the CIDR tries and the inbound listener map.
//!
//! Addresses in trie keys are in network byte order exactly as the eBPF contexts store them
//! (IPv4 as one `u32`, IPv6 as four `u32` words), so the trie compares their bytes in address
//! order. Ports are in host byte order.

/// Maximum entries of the excluded outbound port set (hash; key `u16`, value `u8`).
pub const EXCLUDED_PORTS_ENTRIES: u32 = 1024;
/// Maximum entries of each outbound CIDR trie (excluded/included, IPv4/IPv6).
pub const CIDR_ENTRIES: u32 = 1024;
/// Maximum entries of the inbound port set (hash; key `u16`, value `u8`).
pub const INBOUND_PORTS_ENTRIES: u32 = 1024;

/// Index of the IPv4 inbound listener in the inbound listener socket map.
pub const INBOUND_LISTENER_V4: u32 = 0;
/// Index of the IPv6 inbound listener in the inbound listener socket map.
pub const INBOUND_LISTENER_V6: u32 = 1;
/// Number of slots of the inbound listener socket map.
pub const INBOUND_LISTENER_ENTRIES: u32 = 2;

/// Value stored in the set-like maps (ports, CIDRs); only presence matters.
pub const PRESENT: u8 = 1;

/// Prefix length of a full IPv4 address in a trie lookup key.
pub const V4_BITS: u32 = 32;
/// Prefix length of a full IPv6 address in a trie lookup key.
pub const V6_BITS: u32 = 128;

/// Index of each word of the `POLICY` array map (one `u32` per key).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKey {
    /// Non-zero when the include list is active: only destinations inside
    /// `INCLUDED_CIDRS_V4` / `INCLUDED_CIDRS_V6` are redirected (exclusions still win).
    IncludeActive = 0,
}

/// Number of words in the policy array map.
pub const POLICY_ENTRIES: u32 = 1;

// The listener slots and policy words fit their maps: checked when the crate compiles.
const _: () = {
    assert!(INBOUND_LISTENER_V4 < INBOUND_LISTENER_ENTRIES);
    assert!(INBOUND_LISTENER_V6 < INBOUND_LISTENER_ENTRIES);
    assert!(INBOUND_LISTENER_V4 != INBOUND_LISTENER_V6);
    assert!((PolicyKey::IncludeActive as u32) < POLICY_ENTRIES);
};
