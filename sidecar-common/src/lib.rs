//! Types shared by the eBPF programs (`sidecar-ebpf`) and the userspace agent (`sidecar`).
//!
//! Everything here is `#[repr(C)]` with padding written out as explicit fields, so the kernel
//! and userspace views of a map entry are byte-identical and `aya::Pod` is sound.
#![no_std]

pub mod observe;
pub mod policy;

/// `AF_INET`, as the kernel spells address families.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// Maximum entries of the cookie → original destination map (LRU; entries also move out on
/// ESTABLISHED).
pub const ORIG_DST_BY_COOKIE_ENTRIES: u32 = 65_536;
/// Maximum entries of the client address → original destination map (LRU; entries deleted when
/// the client socket closes).
pub const ORIG_DST_BY_PEER_ENTRIES: u32 = 65_536;

/// An IPv4 or IPv6 socket address as the kernel programs see it.
///
/// `addr` holds the address in network byte order exactly as the kernel stores it: IPv4 in
/// `addr[0]`, the rest zero; IPv6 in all four words. `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Address words in network byte order.
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}

impl SockAddr {
    /// An IPv4 address; `addr_be` is the address as a network-order `u32` read from the kernel.
    pub const fn v4(addr_be: u32, port: u16) -> Self {
        Self {
            family: AF_INET,
            addr: [addr_be, 0, 0, 0],
            port,
            _pad: 0,
        }
    }

    /// An IPv6 address from four network-order words.
    pub const fn v6(addr_be: [u32; 4], port: u16) -> Self {
        Self {
            family: AF_INET6,
            addr: addr_be,
            port,
            _pad: 0,
        }
    }

    /// The address as a `core::net::SocketAddr`, or `None` for an unknown family.
    pub fn to_socket_addr(&self) -> Option<core::net::SocketAddr> {
        use core::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
        match self.family {
            AF_INET => {
                let ip = Ipv4Addr::from(self.addr[0].to_ne_bytes());
                Some(SocketAddr::V4(SocketAddrV4::new(ip, self.port)))
            }
            AF_INET6 => {
                let mut octets = [0u8; 16];
                for (chunk, word) in octets.chunks_exact_mut(4).zip(self.addr) {
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                let ip = Ipv6Addr::from(octets);
                Some(SocketAddr::V6(SocketAddrV6::new(ip, self.port, 0, 0)))
            }
            _ => None,
        }
    }

    /// The kernel view of a `core::net::SocketAddr` (flow info and scope id are dropped).
    pub fn from_socket_addr(addr: core::net::SocketAddr) -> Self {
        match addr {
            core::net::SocketAddr::V4(v4) => {
                Self::v4(u32::from_ne_bytes(v4.ip().octets()), v4.port())
            }
            core::net::SocketAddr::V6(v6) => {
                let octets = v6.ip().octets();
                let mut words = [0u32; 4];
                for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
                    let mut bytes = [0u8; 4];
                    bytes.copy_from_slice(chunk);
                    *word = u32::from_ne_bytes(bytes);
                }
                Self::v6(words, v6.port())
            }
        }
    }
}

/// Index of each word of the `CONFIG` array map (one `u64` per key).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigKey {
    /// Proxy outbound listener port (host byte order). 0 disables redirection.
    OutboundPort = 0,
    /// cgroup v2 id of the sidecar's own cgroup; connections made from it are never redirected.
    SidecarCgroupId = 1,
    /// The kernel's page size in bytes. The getsockopt program sees at most one page of a large
    /// `optval`; above it, it hands the kernel's answer back untouched. 0 means 4096.
    PageSize = 2,
}

/// Number of words in the config array map.
pub const CONFIG_ENTRIES: u32 = 3;

/// Page size assumed by the eBPF programs when [`ConfigKey::PageSize`] was not written.
pub const DEFAULT_PAGE_SIZE: u64 = 4096;

#[cfg(feature = "user")]
mod user {
    // SAFETY: SockAddr is repr(C), Copy, has no implicit padding (explicit `_pad`), and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::SockAddr {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::net::SocketAddr;

    #[test]
    fn socket_addr_round_trips_in_network_order() {
        let v4: SocketAddr = "198.18.0.1:8080".parse().unwrap();
        let k = SockAddr::from_socket_addr(v4);
        assert_eq!(k.family, AF_INET);
        // The first octet sits in the lowest-addressed byte, as the kernel stores it.
        assert_eq!(k.addr[0].to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(k.port, 8080);
        assert_eq!(k.to_socket_addr(), Some(v4));

        let v6: SocketAddr = "[fd5e:1dec::1]:8080".parse().unwrap();
        let k = SockAddr::from_socket_addr(v6);
        assert_eq!(k.family, AF_INET6);
        assert_eq!(k.addr[0].to_ne_bytes(), [0xfd, 0x5e, 0x1d, 0xec]);
        assert_eq!(k.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(k.to_socket_addr(), Some(v6));
    }

    #[test]
    fn unknown_family_has_no_socket_addr() {
        let k = SockAddr {
            family: 1,
            ..SockAddr::default()
        };
        assert_eq!(k.to_socket_addr(), None);
    }

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<SockAddr>(), 4 + 16 + 2 + 2);
    }
}
