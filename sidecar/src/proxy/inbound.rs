//! Inbound passthrough connect: the proxy reaches the pod's application at the original
//! destination from a dedicated loopback source (127.0.0.6 for IPv4, ::1 for IPv6), which the
//! `sk_lookup` program never steers, so the connection is not sent back to the proxy.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

use super::sockopt;

/// Source address of IPv4 connections the proxy opens to the application.
pub const PASSTHROUGH_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// Source address of IPv6 connections the proxy opens to the application.
pub const PASSTHROUGH_SOURCE_V6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// The source (port 0) an inbound connection to `dst` is opened from.
pub fn passthrough_source(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(PASSTHROUGH_SOURCE_V4), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(PASSTHROUGH_SOURCE_V6), 0),
    }
}

/// Connects to `dst` from [`passthrough_source`]. The port is chosen at connect time
/// (`IP_BIND_ADDRESS_NO_PORT`), so one source address serves many destinations.
pub(crate) async fn connect_passthrough(dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Err(e) = sockopt::set_bind_address_no_port(&socket) {
        tracing::trace!(error = %e, "IP_BIND_ADDRESS_NO_PORT failed");
    }
    socket.bind(passthrough_source(dst))?;
    socket.connect(dst).await
}
