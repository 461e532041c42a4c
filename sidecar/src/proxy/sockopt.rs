//! The two socket options the proxy needs that neither tokio nor socket2 wraps: reading
//! `TCP_INFO` (RTT and retransmits for span enrichment) and setting `IP_BIND_ADDRESS_NO_PORT`
//! (inbound passthrough connects from a fixed source address).

use std::io;
use std::mem;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// What a span gets from the kernel's `TCP_INFO` of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpInfo {
    /// Smoothed round-trip time (`tcpi_rtt`, microsecond resolution).
    pub rtt: Duration,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub total_retrans: u32,
}

/// Reads `TCP_INFO` of a TCP socket: one `getsockopt`, no allocation.
pub(crate) fn tcp_info(socket: &impl AsRawFd) -> io::Result<TcpInfo> {
    // SAFETY: `tcp_info` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is open for the duration of the call (borrowed from a live socket); `info`
    // is a writable buffer of `len` bytes and `len` is a valid in/out length; the kernel writes
    // at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpInfo {
        rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
        total_retrans: info.tcpi_total_retrans,
    })
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` so that binding to an address with port 0 defers the port
/// choice to `connect`, where the kernel can reuse a port for different destinations (many
/// connections from one source address do not exhaust the ephemeral range).
pub(crate) fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the fd is open for the duration of the call; `on` is a valid `c_int` and its size
    // is passed as the option length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(on).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn tcp_info_of_a_live_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (c, a) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut c, (mut a, _)) = (c.unwrap(), a.unwrap());
        // One round trip so the RTT has a sample.
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        a.read_exact(&mut buf).await.unwrap();
        a.write_all(b"pong").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        let info = tcp_info(&c).unwrap();
        assert!(info.rtt > Duration::ZERO, "{info:?}");
        assert!(info.rtt < Duration::from_secs(1), "{info:?}");
        assert_eq!(info.total_retrans, 0, "no loss on loopback");
    }

    #[test]
    fn tcp_info_of_a_non_tcp_socket_is_an_error() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(tcp_info(&udp).is_err());
    }

    #[tokio::test]
    async fn bind_address_no_port_defers_the_port_to_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        set_bind_address_no_port(&socket).unwrap();
        socket.bind("127.0.0.6:0".parse().unwrap()).unwrap();
        assert_eq!(
            socket.local_addr().unwrap().port(),
            0,
            "no port until connect"
        );
        let s = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let local = s.local_addr().unwrap();
        assert_eq!(local.ip().to_string(), "127.0.0.6");
        assert_ne!(local.port(), 0);
    }
}
