//! Owns the kernel policy maps at run time: writes a [`KernelPolicy`] (excluded outbound ports
//! and networks, the outbound include list, the inbound ports to steer) into them, replacing
//! their contents while the programs run.
//!
//! # Update order
//!
//! Programs read these maps on every connect / inbound lookup while [`Interception::apply_policy`]
//! rewrites them, one element at a time. Each set is updated by inserting the new entries first
//! and deleting the stale ones afterwards, so a concurrent connect sees the old set, the new
//! set, or their union, never an emptied set. For the include list, which turns "redirect
//! everything" into "redirect only these networks", the on/off word moves around the entries:
//! switched on only after the new networks are in, switched off before the old ones go. So a
//! connect never meets an active but empty include list (which would redirect nothing).
//!
//! Established connections are never affected: the programs only decide at connect time
//! (outbound) or at listener lookup (inbound, which does not run for established sockets).
//!
//! Sizes are checked against the map bounds before anything is written, so an oversized policy
//! is refused whole. A kernel error in the middle of an update leaves a mix of old and new
//! entries; applying the policy again converges.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Mutex, PoisonError},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError},
    Ebpf, Pod,
};
use ipnet::IpNet;
use sidecar_common::policy::{
    PolicyKey, CIDR_ENTRIES, EXCLUDED_PORTS_ENTRIES, INBOUND_PORTS_ENTRIES, PRESENT,
};
use tracing::info;

use super::{EbpfError, Interception};
use crate::policy::KernelPolicy;

/// Name of the policy word array map.
pub const MAP_POLICY: &str = "POLICY";
/// Name of the excluded outbound port set.
pub const MAP_EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
/// Name of the excluded IPv4 network trie.
pub const MAP_EXCLUDED_CIDRS_V4: &str = "EXCLUDED_CIDRS_V4";
/// Name of the excluded IPv6 network trie.
pub const MAP_EXCLUDED_CIDRS_V6: &str = "EXCLUDED_CIDRS_V6";
/// Name of the included IPv4 network trie.
pub const MAP_INCLUDED_CIDRS_V4: &str = "INCLUDED_CIDRS_V4";
/// Name of the included IPv6 network trie.
pub const MAP_INCLUDED_CIDRS_V6: &str = "INCLUDED_CIDRS_V6";
/// Name of the inbound port set.
pub const MAP_INBOUND_PORTS: &str = "INBOUND_PORTS";

/// An IPv4 network as the trie stores it: prefix length, network-order address word.
type V4Key = (u32, u32);
/// An IPv6 network as the trie stores it: prefix length, four network-order words.
type V6Key = (u32, [u32; 4]);

/// Handles on the policy maps, taken out of the [`Ebpf`] object so they can be written from
/// `&Interception` behind a mutex (which also serialises concurrent updates, keeping the
/// insert-then-delete order meaningful).
pub(crate) struct PolicyMaps {
    policy: Array<MapData, u32>,
    excluded_ports: HashMap<MapData, u16, u8>,
    excluded_v4: LpmTrie<MapData, u32, u8>,
    excluded_v6: LpmTrie<MapData, [u32; 4], u8>,
    included_v4: LpmTrie<MapData, u32, u8>,
    included_v6: LpmTrie<MapData, [u32; 4], u8>,
    inbound_ports: HashMap<MapData, u16, u8>,
}

impl std::fmt::Debug for PolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyMaps").finish_non_exhaustive()
    }
}

/// The policy in map form: deduplicated, networks truncated to their prefix.
#[derive(Debug, Default, PartialEq, Eq)]
struct MapContents {
    excluded_ports: BTreeSet<u16>,
    excluded_v4: BTreeSet<V4Key>,
    excluded_v6: BTreeSet<V6Key>,
    included_v4: BTreeSet<V4Key>,
    included_v6: BTreeSet<V6Key>,
    inbound_ports: BTreeSet<u16>,
}

impl MapContents {
    fn from_policy(p: &KernelPolicy) -> Self {
        let mut c = Self {
            excluded_ports: p.exclude_outbound_ports.clone(),
            inbound_ports: p.inbound_ports.clone(),
            ..Self::default()
        };
        split_networks(
            &p.exclude_outbound_cidrs,
            &mut c.excluded_v4,
            &mut c.excluded_v6,
        );
        split_networks(
            &p.include_outbound_cidrs,
            &mut c.included_v4,
            &mut c.included_v6,
        );
        c
    }

    /// Refuses a policy larger than a map before anything is written.
    fn check_bounds(&self) -> Result<(), EbpfError> {
        let sizes = [
            (
                MAP_EXCLUDED_PORTS,
                self.excluded_ports.len(),
                EXCLUDED_PORTS_ENTRIES,
            ),
            (MAP_EXCLUDED_CIDRS_V4, self.excluded_v4.len(), CIDR_ENTRIES),
            (MAP_EXCLUDED_CIDRS_V6, self.excluded_v6.len(), CIDR_ENTRIES),
            (MAP_INCLUDED_CIDRS_V4, self.included_v4.len(), CIDR_ENTRIES),
            (MAP_INCLUDED_CIDRS_V6, self.included_v6.len(), CIDR_ENTRIES),
            (
                MAP_INBOUND_PORTS,
                self.inbound_ports.len(),
                INBOUND_PORTS_ENTRIES,
            ),
        ];
        for (map, len, max) in sizes {
            if len > max as usize {
                return Err(EbpfError::PolicyTooLarge { map, len, max });
            }
        }
        Ok(())
    }

    fn include_active(&self) -> bool {
        !self.included_v4.is_empty() || !self.included_v6.is_empty()
    }
}

/// Sorts networks by family into trie keys (host bits cleared, duplicates merged).
fn split_networks(nets: &[IpNet], v4: &mut BTreeSet<V4Key>, v6: &mut BTreeSet<V6Key>) {
    for net in nets {
        let net = net.trunc();
        let prefix = u32::from(net.prefix_len());
        match net.network() {
            IpAddr::V4(a) => {
                v4.insert((prefix, u32::from_ne_bytes(a.octets())));
            }
            IpAddr::V6(a) => {
                let o = a.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                v6.insert((prefix, [word(0), word(4), word(8), word(12)]));
            }
        }
    }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { map, source }
}

fn take(bpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
    bpf.take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })
}

impl PolicyMaps {
    /// Takes the policy maps out of a loaded object (before or after its programs are loaded:
    /// the programs already refer to the maps, which stay alive in the returned handles).
    pub(crate) fn take(bpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Ok(Self {
            policy: Array::try_from(take(bpf, MAP_POLICY)?).map_err(map_err(MAP_POLICY))?,
            excluded_ports: HashMap::try_from(take(bpf, MAP_EXCLUDED_PORTS)?)
                .map_err(map_err(MAP_EXCLUDED_PORTS))?,
            excluded_v4: LpmTrie::try_from(take(bpf, MAP_EXCLUDED_CIDRS_V4)?)
                .map_err(map_err(MAP_EXCLUDED_CIDRS_V4))?,
            excluded_v6: LpmTrie::try_from(take(bpf, MAP_EXCLUDED_CIDRS_V6)?)
                .map_err(map_err(MAP_EXCLUDED_CIDRS_V6))?,
            included_v4: LpmTrie::try_from(take(bpf, MAP_INCLUDED_CIDRS_V4)?)
                .map_err(map_err(MAP_INCLUDED_CIDRS_V4))?,
            included_v6: LpmTrie::try_from(take(bpf, MAP_INCLUDED_CIDRS_V6)?)
                .map_err(map_err(MAP_INCLUDED_CIDRS_V6))?,
            inbound_ports: HashMap::try_from(take(bpf, MAP_INBOUND_PORTS)?)
                .map_err(map_err(MAP_INBOUND_PORTS))?,
        })
    }

    /// Replaces every map's contents with `want`, in the order documented on the module.
    fn apply(&mut self, want: &MapContents) -> Result<(), EbpfError> {
        replace_ports(
            &mut self.excluded_ports,
            MAP_EXCLUDED_PORTS,
            &want.excluded_ports,
        )?;
        replace_networks(
            &mut self.excluded_v4,
            MAP_EXCLUDED_CIDRS_V4,
            &want.excluded_v4,
        )?;
        replace_networks(
            &mut self.excluded_v6,
            MAP_EXCLUDED_CIDRS_V6,
            &want.excluded_v6,
        )?;

        let include = want.include_active();
        insert_networks(
            &mut self.included_v4,
            MAP_INCLUDED_CIDRS_V4,
            &want.included_v4,
        )?;
        insert_networks(
            &mut self.included_v6,
            MAP_INCLUDED_CIDRS_V6,
            &want.included_v6,
        )?;
        if !include {
            self.set_include_active(false)?;
        }
        delete_stale_networks(
            &mut self.included_v4,
            MAP_INCLUDED_CIDRS_V4,
            &want.included_v4,
        )?;
        delete_stale_networks(
            &mut self.included_v6,
            MAP_INCLUDED_CIDRS_V6,
            &want.included_v6,
        )?;
        if include {
            self.set_include_active(true)?;
        }

        replace_ports(
            &mut self.inbound_ports,
            MAP_INBOUND_PORTS,
            &want.inbound_ports,
        )
    }

    fn set_include_active(&mut self, on: bool) -> Result<(), EbpfError> {
        self.policy
            .set(PolicyKey::IncludeActive as u32, u32::from(on), 0)
            .map_err(map_err(MAP_POLICY))
    }

    /// What the maps hold now (read back from the kernel).
    fn read(&self) -> Result<MapContents, EbpfError> {
        let include_active = self
            .policy
            .get(&(PolicyKey::IncludeActive as u32), 0)
            .map_err(map_err(MAP_POLICY))?
            != 0;
        let included_v4 = trie_keys(&self.included_v4, MAP_INCLUDED_CIDRS_V4)?;
        let included_v6 = trie_keys(&self.included_v6, MAP_INCLUDED_CIDRS_V6)?;
        Ok(MapContents {
            excluded_ports: hash_keys(&self.excluded_ports, MAP_EXCLUDED_PORTS)?,
            excluded_v4: trie_keys(&self.excluded_v4, MAP_EXCLUDED_CIDRS_V4)?,
            excluded_v6: trie_keys(&self.excluded_v6, MAP_EXCLUDED_CIDRS_V6)?,
            // An inactive include list is reported empty whatever entries are left.
            included_v4: if include_active {
                included_v4
            } else {
                BTreeSet::new()
            },
            included_v6: if include_active {
                included_v6
            } else {
                BTreeSet::new()
            },
            inbound_ports: hash_keys(&self.inbound_ports, MAP_INBOUND_PORTS)?,
        })
    }
}

fn hash_keys(
    map: &HashMap<MapData, u16, u8>,
    name: &'static str,
) -> Result<BTreeSet<u16>, EbpfError> {
    map.keys().map(|k| k.map_err(map_err(name))).collect()
}

fn trie_keys<K: Pod + Ord>(
    map: &LpmTrie<MapData, K, u8>,
    name: &'static str,
) -> Result<BTreeSet<(u32, K)>, EbpfError> {
    map.keys()
        .map(|k| k.map(|k| (k.prefix_len(), k.data())).map_err(map_err(name)))
        .collect()
}

fn replace_ports(
    map: &mut HashMap<MapData, u16, u8>,
    name: &'static str,
    want: &BTreeSet<u16>,
) -> Result<(), EbpfError> {
    for port in want {
        map.insert(port, PRESENT, 0).map_err(map_err(name))?;
    }
    let stale: Vec<u16> = hash_keys(map, name)?.difference(want).copied().collect();
    for port in stale {
        map.remove(&port).map_err(map_err(name))?;
    }
    Ok(())
}

fn insert_networks<K: Pod + Ord>(
    map: &mut LpmTrie<MapData, K, u8>,
    name: &'static str,
    want: &BTreeSet<(u32, K)>,
) -> Result<(), EbpfError> {
    for &(prefix, data) in want {
        map.insert(&Key::new(prefix, data), PRESENT, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn delete_stale_networks<K: Pod + Ord>(
    map: &mut LpmTrie<MapData, K, u8>,
    name: &'static str,
    want: &BTreeSet<(u32, K)>,
) -> Result<(), EbpfError> {
    let stale: Vec<(u32, K)> = trie_keys(map, name)?.difference(want).copied().collect();
    for (prefix, data) in stale {
        map.remove(&Key::new(prefix, data)).map_err(map_err(name))?;
    }
    Ok(())
}

fn replace_networks<K: Pod + Ord>(
    map: &mut LpmTrie<MapData, K, u8>,
    name: &'static str,
    want: &BTreeSet<(u32, K)>,
) -> Result<(), EbpfError> {
    insert_networks(map, name, want)?;
    delete_stale_networks(map, name, want)
}

impl Interception {
    /// Replaces the interception policy in the kernel maps while the programs run: excluded
    /// outbound ports and networks, the outbound include list, and the inbound ports to steer.
    ///
    /// Open connections are not touched; new ones follow the new policy once this returns.
    /// New entries are inserted before stale ones are deleted (see the module documentation
    /// for why and for the include list's on/off word). A policy with more entries than a map
    /// holds is refused with [`EbpfError::PolicyTooLarge`] before anything changes. Concurrent
    /// calls are serialised.
    pub fn apply_policy(&self, p: &KernelPolicy) -> Result<(), EbpfError> {
        let want = MapContents::from_policy(p);
        want.check_bounds()?;
        // A panic while holding the lock left a partial update, which applying again repairs.
        let mut maps = self.policy.lock().unwrap_or_else(PoisonError::into_inner);
        maps.apply(&want)?;
        info!(
            excluded_ports = want.excluded_ports.len(),
            excluded_cidrs = want.excluded_v4.len() + want.excluded_v6.len(),
            included_cidrs = want.included_v4.len() + want.included_v6.len(),
            inbound_ports = want.inbound_ports.len(),
            "interception policy applied"
        );
        Ok(())
    }

    /// The policy the kernel maps hold now, read back from them (networks truncated to their
    /// prefix, one entry per distinct network).
    pub fn current_policy(&self) -> Result<KernelPolicy, EbpfError> {
        let maps = self.policy.lock().unwrap_or_else(PoisonError::into_inner);
        let c = maps.read()?;
        Ok(KernelPolicy {
            exclude_outbound_ports: c.excluded_ports,
            exclude_outbound_cidrs: networks(&c.excluded_v4, &c.excluded_v6),
            include_outbound_cidrs: networks(&c.included_v4, &c.included_v6),
            inbound_ports: c.inbound_ports,
        })
    }
}

/// Trie keys back to networks, IPv4 first; keys the kernel would not hold are skipped.
fn networks(v4: &BTreeSet<V4Key>, v6: &BTreeSet<V6Key>) -> Vec<IpNet> {
    let v4 = v4.iter().filter_map(|&(prefix, word)| {
        let addr = std::net::Ipv4Addr::from(word.to_ne_bytes());
        ipnet::Ipv4Net::new(addr, u8::try_from(prefix).ok()?)
            .ok()
            .map(IpNet::V4)
    });
    let v6 = v6.iter().filter_map(|&(prefix, words)| {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        let addr = std::net::Ipv6Addr::from(octets);
        ipnet::Ipv6Net::new(addr, u8::try_from(prefix).ok()?)
            .ok()
            .map(IpNet::V6)
    });
    v4.chain(v6).collect()
}

/// The mutex type [`Interception`] keeps the policy maps in.
pub(crate) type SharedPolicyMaps = Mutex<PolicyMaps>;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(exclude: &[&str], include: &[&str]) -> KernelPolicy {
        KernelPolicy {
            exclude_outbound_ports: [22, 22, 3306].into_iter().collect(),
            exclude_outbound_cidrs: exclude.iter().map(|n| n.parse().unwrap()).collect(),
            include_outbound_cidrs: include.iter().map(|n| n.parse().unwrap()).collect(),
            inbound_ports: [8080].into_iter().collect(),
        }
    }

    #[test]
    fn networks_are_truncated_deduplicated_and_split_by_family() {
        let c = MapContents::from_policy(&policy(
            &["10.1.2.3/8", "10.0.0.0/8", "fd00::1/64", "192.168.0.0/16"],
            &[],
        ));
        let v4: Vec<_> = c.excluded_v4.iter().copied().collect();
        assert_eq!(
            v4,
            vec![
                (8, u32::from_ne_bytes([10, 0, 0, 0])),
                (16, u32::from_ne_bytes([192, 168, 0, 0]))
            ]
        );
        let v6: Vec<_> = c.excluded_v6.iter().copied().collect();
        assert_eq!(
            v6,
            vec![(64, [u32::from_ne_bytes([0xfd, 0, 0, 0]), 0, 0, 0])]
        );
        assert!(!c.include_active());
        assert_eq!(c.excluded_ports.len(), 2);
    }

    #[test]
    fn include_list_of_either_family_turns_it_on() {
        assert!(MapContents::from_policy(&policy(&[], &["fd00::/8"])).include_active());
        assert!(MapContents::from_policy(&policy(&[], &["0.0.0.0/0"])).include_active());
    }

    #[test]
    fn networks_round_trip_through_trie_keys() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "198.18.0.128/25", "fd5e:1dec::/64", "::/0"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
        split_networks(&nets, &mut v4, &mut v6);
        let back: BTreeSet<IpNet> = networks(&v4, &v6).into_iter().collect();
        let want: BTreeSet<IpNet> = nets.into_iter().collect();
        assert_eq!(back, want);
    }

    #[test]
    fn oversized_policies_are_refused_naming_the_map() {
        let mut p = KernelPolicy {
            inbound_ports: (1..=INBOUND_PORTS_ENTRIES as u16 + 1).collect(),
            ..KernelPolicy::default()
        };
        match MapContents::from_policy(&p).check_bounds() {
            Err(EbpfError::PolicyTooLarge { map, len, max }) => {
                assert_eq!(map, MAP_INBOUND_PORTS);
                assert_eq!(len, INBOUND_PORTS_ENTRIES as usize + 1);
                assert_eq!(max, INBOUND_PORTS_ENTRIES);
            }
            other => panic!("expected PolicyTooLarge, got {other:?}"),
        }
        p.inbound_ports = (1..=INBOUND_PORTS_ENTRIES as u16).collect();
        assert!(MapContents::from_policy(&p).check_bounds().is_ok());
    }
}
