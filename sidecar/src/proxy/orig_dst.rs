//! Original destination of a redirected connection: the `SO_ORIGINAL_DST` lookup behind a
//! trait, so the proxy can be tested with a mock instead of the eBPF programs.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use socket2::SockRef;
use tokio::net::TcpStream;

/// Finds where an accepted (redirected) connection was originally going.
pub trait OriginalDst: Send + Sync + 'static {
    /// Original destination of `accepted`, as the application dialled it.
    fn original_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr>;
}

/// The real lookup: `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on IPv4 sockets and
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on IPv6 ones. The cgroup/getsockopt eBPF
/// program answers these from the map filled at connect time.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoOriginalDst;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr> {
        let sock = SockRef::from(accepted);
        let addr = match accepted.local_addr()? {
            SocketAddr::V4(_) => sock.original_dst_v4()?,
            SocketAddr::V6(_) => sock.original_dst_v6()?,
        };
        addr.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "original destination is not an IP socket address",
            )
        })
    }
}

/// Inbound original destination: the accepted socket's local address. The `sk_lookup` program
/// hands a steered connection to the inbound listener without rewriting the packet, so the
/// accepted socket keeps the address the peer dialled (e.g. `podIP:8080`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAddrDst;

impl OriginalDst for LocalAddrDst {
    fn original_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr> {
        accepted.local_addr()
    }
}

/// Original destination for tests and demos: a fixed address, a per-peer map, or both
/// (the map wins). With neither, every lookup fails, which exercises the error path.
#[derive(Debug, Default)]
pub struct MockOrigDst {
    fixed: Option<SocketAddr>,
    by_peer: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl MockOrigDst {
    /// Every connection's original destination is `dst`.
    pub fn fixed(dst: SocketAddr) -> Self {
        Self {
            fixed: Some(dst),
            by_peer: Mutex::default(),
        }
    }

    /// Destinations looked up by the accepted socket's peer address (see [`Self::insert`]).
    pub fn by_peer() -> Self {
        Self::default()
    }

    /// Every lookup fails with `NotFound`.
    pub fn failing() -> Self {
        Self::default()
    }

    /// Maps connections coming from `peer` to `dst`. Bind the client socket first so its
    /// address is known before it connects.
    pub fn insert(&self, peer: SocketAddr, dst: SocketAddr) {
        self.by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer, dst);
    }
}

impl OriginalDst for MockOrigDst {
    fn original_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr> {
        let peer = accepted.peer_addr()?;
        let mapped = self
            .by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer)
            .copied();
        mapped.or(self.fixed).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no original destination for peer {peer}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener, client: tokio::net::TcpSocket) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (c, a) = tokio::join!(client.connect(addr), listener.accept());
        (c.unwrap(), a.unwrap().0)
    }

    #[tokio::test]
    async fn mock_prefers_peer_map_then_fixed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fixed: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let mapped: SocketAddr = "192.0.2.2:8080".parse().unwrap();
        let mock = MockOrigDst::fixed(fixed);

        let s1 = tokio::net::TcpSocket::new_v4().unwrap();
        s1.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        mock.insert(s1.local_addr().unwrap(), mapped);
        let (_c1, a1) = pair(&listener, s1).await;
        assert_eq!(mock.original_dst(&a1).unwrap(), mapped);

        let s2 = tokio::net::TcpSocket::new_v4().unwrap();
        let (_c2, a2) = pair(&listener, s2).await;
        assert_eq!(mock.original_dst(&a2).unwrap(), fixed);
    }

    #[tokio::test]
    async fn local_addr_lookup_is_the_accepted_sockets_address() {
        let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let (_c, a) = pair(&listener, tokio::net::TcpSocket::new_v4().unwrap()).await;
        assert_eq!(
            LocalAddrDst.original_dst(&a).unwrap(),
            listener.local_addr().unwrap()
        );
    }

    #[tokio::test]
    async fn failing_mock_reports_not_found() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_c, a) = pair(&listener, tokio::net::TcpSocket::new_v4().unwrap()).await;
        let err = MockOrigDst::failing().original_dst(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn real_lookup_without_redirection_is_an_error() {
        // Without iptables/eBPF nothing answers SO_ORIGINAL_DST for a plain loopback socket:
        // the kernel reports ENOENT (or ENOPROTOOPT without conntrack); the proxy must get an
        // error, never a made-up address.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_c, a) = pair(&listener, tokio::net::TcpSocket::new_v4().unwrap()).await;
        assert!(SoOriginalDst.original_dst(&a).is_err());
    }
}
