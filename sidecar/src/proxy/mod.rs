//! The proxy: outbound listeners for redirected connections and inbound listeners for steered
//! ones, original-destination lookup, upstream connect, protocol dispatch, and graceful drain
//! on shutdown.

pub mod forward;
pub mod inbound;
pub mod orig_dst;
pub(crate) mod sockopt;

#[cfg(test)]
pub(crate) mod observe;
#[cfg(test)]
mod tests;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use orig_dst::{LocalAddrDst, MockOrigDst, OriginalDst, SoOriginalDst};

use crate::protocol::h2::{H2Translator, Limits};
use crate::protocol::http2::Http2;
use crate::protocol::tls::TlsInfo;
use crate::protocol::{self, http1::Http1};
use crate::telemetry::{
    ConnectionDirection, ConnectionProtocol, ErrorType, TcpConnectionRecord, Telemetry,
};
use forward::{error_type, reset_on_close, ConnShared};

/// Default port the eBPF connect hooks redirect outbound connections to.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// Default port of the inbound listeners the `sk_lookup` program steers connections to.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// Listen backlog of each listener.
const BACKLOG: i32 = 1024;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Addresses the outbound listeners bind (one listener each).
    pub outbound_addrs: Vec<SocketAddr>,
    /// Addresses the inbound listeners bind (one listener each; empty: no inbound path).
    /// Steered connections arrive on them with the original destination as local address.
    pub inbound_addrs: Vec<SocketAddr>,
    /// Longest wait for the upstream connect.
    pub connect_timeout: Duration,
    /// Longest wait for the application's first bytes before treating the connection as opaque.
    pub detect_timeout: Duration,
    /// Largest HTTP head followed; larger ones make the connection opaque from there on.
    pub max_head_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            outbound_addrs: vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_OUTBOUND_PORT),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DEFAULT_OUTBOUND_PORT),
            ],
            inbound_addrs: vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_INBOUND_PORT),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DEFAULT_INBOUND_PORT),
            ],
            connect_timeout: Duration::from_secs(5),
            detect_timeout: Duration::from_secs(5),
            max_head_bytes: 64 * 1024,
        }
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration lists no listener address.
    #[error("no outbound listener address configured")]
    NoListenAddrs,
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address that failed.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Every listener failed for lack of the address family (e.g. only `[::1]` configured on a
    /// host without IPv6).
    #[error("no outbound listener could be bound")]
    NoListener,
    /// Inbound addresses were configured but none could be bound for lack of the address
    /// family.
    #[error("no inbound listener could be bound")]
    NoInboundListener,
}

/// What happened to in-flight connections at shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections that finished within the drain period.
    pub drained: usize,
    /// Connections cut when the drain period ended.
    pub aborted: usize,
}

/// Proxy-level counters (connections that never reached telemetry as a TCP connection).
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed because their original destination could not be found.
    pub orig_dst_failures: AtomicU64,
    /// Connections refused because they were aimed at the proxy itself.
    pub loops_refused: AtomicU64,
    /// Inbound connections accepted (included in `accepted`).
    pub inbound_accepted: AtomicU64,
    /// Upstream connects that failed or timed out.
    pub connect_failures: AtomicU64,
    /// Outbound connection tasks running now (up when the task starts, down when it ends,
    /// however it ends).
    pub active_outbound: AtomicU64,
    /// Inbound connection tasks running now.
    pub active_inbound: AtomicU64,
}

impl ProxyCounters {
    /// The gauge of connections going `direction`.
    pub fn active(&self, direction: ConnectionDirection) -> &AtomicU64 {
        match direction {
            ConnectionDirection::Outbound => &self.active_outbound,
            ConnectionDirection::Inbound => &self.active_inbound,
        }
    }
}

/// Counts a connection task as active while it lives: every exit path, a panic and an abort
/// (drain period over) drop it and take the connection off the gauge.
struct ActiveGuard<'a>(&'a AtomicU64);

impl<'a> ActiveGuard<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every connection task needs.
struct Shared {
    cfg: ProxyConfig,
    /// Original destination of outbound (redirected) connections.
    orig: Arc<dyn OriginalDst>,
    /// Original destination of inbound (steered) connections.
    inbound_dst: Arc<dyn OriginalDst>,
    telemetry: Telemetry,
    own_addrs: Vec<SocketAddr>,
    counters: Arc<ProxyCounters>,
}

impl Shared {
    /// True if `dst` is one of the proxy's own listeners (a connection to it would loop).
    fn is_own(&self, dst: SocketAddr) -> bool {
        self.own_addrs.iter().any(|own| {
            own.port() == dst.port()
                && (own.ip() == dst.ip()
                    || (own.ip().is_unspecified()
                        && (dst.ip().is_loopback() || dst.ip().is_unspecified())))
        })
    }
}

/// The bound proxy, ready to [`run`](Proxy::run).
pub struct Proxy {
    outbound: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    outbound_addrs: Vec<SocketAddr>,
    inbound_addrs: Vec<SocketAddr>,
    shared: Shared,
}

/// Binds one listener: `SO_REUSEADDR`, `IPV6_V6ONLY` for IPv6, non-blocking.
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// True if binding failed because the host has no IPv6 (or not this address).
fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
    )
}

/// Binds one listener per address (`kind` names them in logs) and returns them with their
/// bound addresses. An IPv6 address the host cannot bind only warns.
fn bind_set(
    addrs: &[SocketAddr],
    kind: &str,
) -> Result<(Vec<TcpListener>, Vec<SocketAddr>), ProxyError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    let mut bound = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        match bind_listener(addr).and_then(|l| Ok((l.local_addr()?, l))) {
            Ok((local, listener)) => {
                tracing::info!(addr = %local, "{kind} proxy listening");
                listeners.push(listener);
                bound.push(local);
            }
            Err(e) if addr.is_ipv6() && ipv6_unavailable(&e) => {
                tracing::warn!(%addr, error = %e, "IPv6 {kind} listener unavailable; continuing without it");
            }
            Err(source) => return Err(ProxyError::Bind { addr, source }),
        }
    }
    Ok((listeners, bound))
}

impl Proxy {
    /// Binds the outbound and inbound listeners. An IPv6 address the host cannot bind (no
    /// IPv6) only warns; any other bind failure, no outbound listener at all, or no inbound
    /// listener when some were configured, is an error.
    pub async fn bind(
        cfg: ProxyConfig,
        orig: Arc<dyn OriginalDst>,
        telemetry: Telemetry,
    ) -> Result<Self, ProxyError> {
        if cfg.outbound_addrs.is_empty() {
            return Err(ProxyError::NoListenAddrs);
        }
        let (outbound, outbound_addrs) = bind_set(&cfg.outbound_addrs, "outbound")?;
        if outbound.is_empty() {
            return Err(ProxyError::NoListener);
        }
        let (inbound, inbound_addrs) = bind_set(&cfg.inbound_addrs, "inbound")?;
        if inbound.is_empty() && !cfg.inbound_addrs.is_empty() {
            return Err(ProxyError::NoInboundListener);
        }
        let own_addrs = outbound_addrs
            .iter()
            .chain(&inbound_addrs)
            .copied()
            .collect();
        Ok(Self {
            outbound,
            inbound,
            outbound_addrs,
            inbound_addrs,
            shared: Shared {
                cfg,
                orig,
                inbound_dst: Arc::new(LocalAddrDst),
                telemetry,
                own_addrs,
                counters: Arc::default(),
            },
        })
    }

    /// Replaces how inbound connections find their original destination (by default the
    /// accepted socket's local address, [`LocalAddrDst`]); for tests and demos without
    /// `sk_lookup`.
    #[must_use]
    pub fn with_inbound_dst(mut self, inbound_dst: Arc<dyn OriginalDst>) -> Self {
        self.shared.inbound_dst = inbound_dst;
        self
    }

    /// Outbound listener addresses actually bound (ports resolved when 0 was asked).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.outbound_addrs.clone()
    }

    /// Inbound listener addresses actually bound (ports resolved when 0 was asked).
    pub fn inbound_local_addrs(&self) -> Vec<SocketAddr> {
        self.inbound_addrs.clone()
    }

    /// The inbound listening sockets, for the `sk_lookup` program's socket map. They close
    /// when [`run`](Proxy::run) is shut down (the kernel then stops steering: fail-open).
    pub fn inbound_listener_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.inbound.iter().map(AsFd::as_fd).collect()
    }

    /// Proxy-level counters, live while the proxy runs.
    pub fn counters(&self) -> Arc<ProxyCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// Accepts and proxies connections until `shutdown` fires, then closes every listener at
    /// once (so the eBPF redirection and steering fail open), waits up to `drain` for
    /// in-flight connections and aborts the rest.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) -> DrainReport {
        let Proxy {
            outbound,
            inbound,
            shared,
            ..
        } = self;
        let shared = Arc::new(shared);
        let mut conns = JoinSet::new();
        let mut inbound_first = false;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = conns.join_next() => log_join(joined),
                (accepted, direction) = accept_any(&outbound, &inbound, inbound_first) => match accepted {
                    Ok((stream, peer)) => {
                        // Alternate which set is polled first, so neither starves the other.
                        inbound_first = !inbound_first;
                        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        if direction == ConnectionDirection::Inbound {
                            shared.counters.inbound_accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        conns.spawn(handle_connection(Arc::clone(&shared), stream, peer, direction));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                },
            }
        }
        drop(outbound);
        drop(inbound);
        tracing::info!(
            in_flight = conns.len(),
            ?drain,
            "listeners closed; draining connections"
        );
        let mut drained = 0;
        let _ = tokio::time::timeout(drain, async {
            while let Some(joined) = conns.join_next().await {
                log_join(joined);
                drained += 1;
            }
        })
        .await;
        let aborted = conns.len();
        conns.abort_all();
        while conns.join_next().await.is_some() {}
        if aborted > 0 {
            tracing::warn!(aborted, "connections cut at the end of the drain period");
        }
        DrainReport { drained, aborted }
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            tracing::error!(error = %e, "connection task panicked");
        }
    }
}

/// Accepts from whichever listener has a connection ready, and tells which set it came from.
fn accept_any<'a>(
    outbound: &'a [TcpListener],
    inbound: &'a [TcpListener],
    inbound_first: bool,
) -> impl std::future::Future<Output = (io::Result<(TcpStream, SocketAddr)>, ConnectionDirection)> + 'a
{
    let sets = if inbound_first {
        [
            (inbound, ConnectionDirection::Inbound),
            (outbound, ConnectionDirection::Outbound),
        ]
    } else {
        [
            (outbound, ConnectionDirection::Outbound),
            (inbound, ConnectionDirection::Inbound),
        ]
    };
    std::future::poll_fn(move |cx| {
        for (listeners, direction) in &sets {
            for listener in *listeners {
                if let Poll::Ready(res) = listener.poll_accept(cx) {
                    return Poll::Ready((res, *direction));
                }
            }
        }
        Poll::Pending
    })
}

/// Records the connection when dropped, however its task ends (also when aborted).
struct ConnRecord {
    telemetry: Telemetry,
    direction: ConnectionDirection,
    shared: Arc<ConnShared>,
    accepted_at: Instant,
    finished: AtomicBool,
    /// What the TLS ClientHello said, once detection read one.
    tls: OnceLock<TlsInfo>,
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::Relaxed) {
            // Cut before it ended (drain period over).
            self.shared.set_error(ErrorType::Io);
        }
        let rec = TcpConnectionRecord {
            destination: self.shared.destination,
            bytes_sent: self.shared.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.shared.bytes_received.load(Ordering::Relaxed),
            duration: self.accepted_at.elapsed(),
            protocol: self.shared.protocol(),
            error: self.shared.error(),
        };
        self.telemetry
            .tcp_connection_with_tls(&rec, self.direction, self.tls.get());
        #[cfg(test)]
        observe::push_connection(
            rec.destination,
            observe::Connection {
                inbound: self.direction == ConnectionDirection::Inbound,
                bytes_sent: rec.bytes_sent,
                bytes_received: rec.bytes_received,
                protocol: rec.protocol,
                error: rec.error,
            },
        );
    }
}

/// The two sockets of a connection; unless marked clean, both are closed with a reset, so no
/// peer takes a cut stream for a complete one.
struct SocketPair {
    client: TcpStream,
    upstream: Option<TcpStream>,
    clean: bool,
}

impl Drop for SocketPair {
    fn drop(&mut self) {
        if !self.clean {
            reset_on_close(&self.client);
            if let Some(upstream) = &self.upstream {
                reset_on_close(upstream);
            }
        }
    }
}

/// Connects to the original destination: directly for outbound connections (the proxy's own
/// cgroup is never redirected), from the passthrough source for inbound ones.
async fn connect_upstream(
    direction: ConnectionDirection,
    dst: SocketAddr,
) -> io::Result<TcpStream> {
    match direction {
        ConnectionDirection::Outbound => TcpStream::connect(dst).await,
        ConnectionDirection::Inbound => inbound::connect_passthrough(dst).await,
    }
}

/// Proxies one accepted connection: `peer` is the remote end of `client` (the application for
/// outbound connections, the remote caller for inbound ones).
async fn handle_connection(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    direction: ConnectionDirection,
) {
    let accepted_at = Instant::now();
    let _active = ActiveGuard::enter(shared.counters.active(direction));
    if let Err(e) = client.set_nodelay(true) {
        tracing::trace!(error = %e, "TCP_NODELAY on accepted socket");
    }
    let mut sockets = SocketPair {
        client,
        upstream: None,
        clean: false,
    };
    let orig = match direction {
        ConnectionDirection::Outbound => &shared.orig,
        ConnectionDirection::Inbound => &shared.inbound_dst,
    };
    let dst = match orig.original_dst(&sockets.client) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::debug!(%peer, direction = direction.as_str(), error = %e, "no original destination; closing");
            shared
                .counters
                .orig_dst_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if shared.is_own(dst) {
        tracing::warn!(%peer, %dst, direction = direction.as_str(), "connection aimed at the proxy itself; refusing");
        shared
            .counters
            .loops_refused
            .fetch_add(1, Ordering::Relaxed);
        return;
    }

    let conn = Arc::new(ConnShared::new(dst));
    let record = ConnRecord {
        telemetry: shared.telemetry.clone(),
        direction,
        shared: Arc::clone(&conn),
        accepted_at,
        finished: AtomicBool::new(false),
        tls: OnceLock::new(),
    };
    let connect =
        tokio::time::timeout(shared.cfg.connect_timeout, connect_upstream(direction, dst)).await;
    let failure = match connect {
        Ok(Ok(upstream)) => Ok(upstream),
        Ok(Err(e)) => {
            tracing::debug!(%peer, %dst, error = %e, "upstream connect failed");
            Err(error_type(&e))
        }
        Err(_) => {
            tracing::debug!(%peer, %dst, "upstream connect timed out");
            Err(ErrorType::Timeout)
        }
    };
    let upstream = match failure {
        Ok(upstream) => upstream,
        Err(error) => {
            conn.set_error(error);
            shared
                .counters
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
            record.finished.store(true, Ordering::Relaxed);
            return;
        }
    };
    if let Err(e) = upstream.set_nodelay(true) {
        tracing::trace!(error = %e, "TCP_NODELAY on upstream socket");
    }
    let upstream = sockets.upstream.insert(upstream);
    let client = &sockets.client;

    let cfg = &shared.cfg;
    let clean = match protocol::detect(client, upstream, cfg.detect_timeout, cfg.max_head_bytes)
        .await
    {
        Err(e) => {
            tracing::debug!(%peer, %dst, error = %e, "application socket failed before sending");
            conn.set_error(error_type(&e));
            false
        }
        Ok(detection) => {
            conn.set_protocol(detection.protocol);
            if let Some(info) = detection.tls {
                tracing::debug!(%peer, %dst, sni = ?info.sni, alpn = ?info.alpn, "TLS ClientHello");
                let _ = record.tls.set(info);
            }
            match detection.protocol {
                ConnectionProtocol::Opaque | ConnectionProtocol::Tls => {
                    forward::opaque(client, upstream, &detection.initial, &conn).await
                }
                ConnectionProtocol::Http1 => {
                    let http = Http1 {
                        client,
                        upstream,
                        shared: &conn,
                        telemetry: &shared.telemetry,
                        max_head_bytes: cfg.max_head_bytes,
                        direction,
                        peer,
                    };
                    http.run(detection.initial, detection.first_byte_at).await
                }
                ConnectionProtocol::Http2 => {
                    let http = Http2 {
                        client,
                        upstream,
                        shared: &conn,
                        telemetry: &shared.telemetry,
                        direction,
                        peer,
                    };
                    http.run(
                        H2Translator::new(Limits::default()),
                        detection.initial,
                        bytes::BytesMut::new(),
                        std::collections::HashMap::new(),
                    )
                    .await
                }
            }
        }
    };
    sockets.clean = clean;
    record.finished.store(true, Ordering::Relaxed);
}
