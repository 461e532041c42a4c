//! Byte-exact forwarding between the application's socket and the upstream socket: bounded
//! copy loops, half-close, reset propagation, byte counting, and the per-connection state the
//! protocol handlers share.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use socket2::SockRef;
use tokio::net::TcpStream;

use crate::telemetry::{ConnectionProtocol, ErrorType};

/// Size of one read: the most a direction holds in flight between a read and its write.
pub(crate) const CHUNK: usize = 16 * 1024;

/// What one proxied connection has seen so far; shared by both directions and by the record
/// written when the connection ends (also when its task is aborted).
#[derive(Debug)]
pub(crate) struct ConnShared {
    /// Original destination.
    pub destination: SocketAddr,
    /// Bytes written to the upstream.
    pub bytes_sent: AtomicU64,
    /// Bytes written to the application.
    pub bytes_received: AtomicU64,
    error: AtomicU8,
    protocol: AtomicU8,
}

impl ConnShared {
    pub(crate) fn new(destination: SocketAddr) -> Self {
        Self {
            destination,
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            error: AtomicU8::new(0),
            protocol: AtomicU8::new(0),
        }
    }

    /// Records the connection's failure; the first one wins.
    pub(crate) fn set_error(&self, error: ErrorType) {
        let code = match error {
            ErrorType::ConnectionRefused => 1,
            ErrorType::ConnectionReset => 2,
            ErrorType::Timeout => 3,
            ErrorType::IncompleteResponse => 4,
            ErrorType::Io => 5,
            ErrorType::StreamReset => 6,
        };
        let _ = self
            .error
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The recorded failure, if any.
    pub(crate) fn error(&self) -> Option<ErrorType> {
        match self.error.load(Ordering::Relaxed) {
            1 => Some(ErrorType::ConnectionRefused),
            2 => Some(ErrorType::ConnectionReset),
            3 => Some(ErrorType::Timeout),
            4 => Some(ErrorType::IncompleteResponse),
            5 => Some(ErrorType::Io),
            6 => Some(ErrorType::StreamReset),
            _ => None,
        }
    }

    pub(crate) fn set_protocol(&self, protocol: ConnectionProtocol) {
        let code = match protocol {
            ConnectionProtocol::Opaque => 0,
            ConnectionProtocol::Http1 => 1,
            ConnectionProtocol::Tls => 2,
            ConnectionProtocol::Http2 => 3,
        };
        self.protocol.store(code, Ordering::Relaxed);
    }

    pub(crate) fn protocol(&self) -> ConnectionProtocol {
        match self.protocol.load(Ordering::Relaxed) {
            1 => ConnectionProtocol::Http1,
            2 => ConnectionProtocol::Tls,
            3 => ConnectionProtocol::Http2,
            _ => ConnectionProtocol::Opaque,
        }
    }
}

/// Maps an I/O error to the `error.type` it stands for.
pub(crate) fn error_type(e: &io::Error) -> ErrorType {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorType::ConnectionRefused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ErrorType::ConnectionReset,
        io::ErrorKind::TimedOut => ErrorType::Timeout,
        _ => ErrorType::Io,
    }
}

/// How one direction of a connection ended.
#[derive(Debug)]
pub(crate) enum DirEnd {
    /// The source closed cleanly and the close was passed on as a half-close.
    Eof,
    /// Reading the source failed (usually a reset): the destination must see a reset.
    ReadFailed(io::Error),
    /// Writing to the destination failed: the source must see a reset.
    WriteFailed(io::Error),
}

impl DirEnd {
    /// A read failure, recorded on the connection first so every request still in flight
    /// reports it when its guard is dropped.
    pub(crate) fn read_failed(shared: &ConnShared, e: io::Error) -> Self {
        shared.set_error(error_type(&e));
        DirEnd::ReadFailed(e)
    }

    /// A write failure, recorded like [`Self::read_failed`].
    pub(crate) fn write_failed(shared: &ConnShared, e: io::Error) -> Self {
        shared.set_error(error_type(&e));
        DirEnd::WriteFailed(e)
    }
}

/// Reads whatever is available (at least one byte, or 0 at end of stream).
pub(crate) async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Appends whatever is available to `buf`, reading at most [`CHUNK`] bytes. Cancel-safe.
pub(crate) async fn read_into(s: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(CHUNK);
    loop {
        s.readable().await?;
        let mut limited = BufMut::limit(&mut *buf, CHUNK);
        match s.try_read_buf(&mut limited) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Writes all of `data`.
pub(crate) async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `data` to `dst` and counts it in `counter`.
pub(crate) async fn write_counted(
    dst: &TcpStream,
    data: &[u8],
    counter: &AtomicU64,
) -> io::Result<()> {
    write_all(dst, data).await?;
    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Passes an end of stream on: no more data will be written to `s`.
pub(crate) fn shutdown_write(s: &TcpStream) {
    if let Err(e) = SockRef::from(s).shutdown(Shutdown::Write) {
        tracing::trace!(error = %e, "shutdown(write) failed");
    }
}

/// Makes the socket's close send a reset (`SO_LINGER` 0) instead of a FIN.
pub(crate) fn reset_on_close(s: &TcpStream) {
    if let Err(e) = SockRef::from(s).set_linger(Some(Duration::ZERO)) {
        tracing::trace!(error = %e, "setting SO_LINGER 0 failed");
    }
}

/// Copies `src` to `dst` until `src` ends, starting with `initial` (bytes already read from
/// `src`). End of stream is passed on as a half-close; the buffer is bounded by [`CHUNK`].
pub(crate) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    initial: &[u8],
    counter: &AtomicU64,
    shared: &ConnShared,
) -> DirEnd {
    if !initial.is_empty() {
        if let Err(e) = write_counted(dst, initial, counter).await {
            return DirEnd::write_failed(shared, e);
        }
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        match read_some(src, &mut buf).await {
            Ok(0) => {
                shutdown_write(dst);
                return DirEnd::Eof;
            }
            Ok(n) => {
                let data = buf.get(..n).unwrap_or_default();
                if let Err(e) = write_counted(dst, data, counter).await {
                    return DirEnd::write_failed(shared, e);
                }
            }
            Err(e) => return DirEnd::read_failed(shared, e),
        }
    }
}

/// Runs the application→upstream (`up`) and upstream→application (`down`) directions together.
/// A clean end of one direction lets the other continue (half-close); a failure of either ends
/// both at once. Returns true when both ended cleanly; otherwise the caller closes both sockets
/// with a reset.
pub(crate) async fn drive<A, B>(up: A, down: B) -> bool
where
    A: Future<Output = DirEnd>,
    B: Future<Output = DirEnd>,
{
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;
    while !(up_done && down_done) {
        let (direction, end) = tokio::select! {
            end = &mut up, if !up_done => {
                up_done = true;
                ("application→upstream", end)
            }
            end = &mut down, if !down_done => {
                down_done = true;
                ("upstream→application", end)
            }
        };
        match end {
            DirEnd::Eof => {}
            DirEnd::ReadFailed(e) => {
                tracing::debug!(direction, error = %e, "read failed; resetting the connection");
                return false;
            }
            DirEnd::WriteFailed(e) => {
                tracing::debug!(direction, error = %e, "write failed; resetting the connection");
                return false;
            }
        }
    }
    true
}

/// Forwards a connection opaquely both ways, `initial` being what detection already read from
/// the application. Returns true when both directions ended cleanly.
pub(crate) async fn opaque(
    client: &TcpStream,
    upstream: &TcpStream,
    initial: &[u8],
    shared: &ConnShared,
) -> bool {
    drive(
        pump(client, upstream, initial, &shared.bytes_sent, shared),
        pump(upstream, client, &[], &shared.bytes_received, shared),
    )
    .await
}
