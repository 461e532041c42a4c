//! Test-only record of what the proxy reported to telemetry, kept per original destination
//! so concurrently running tests (each with its own upstream port) do not see each other's.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use crate::telemetry::{ConnectionProtocol, ErrorType};

/// One HTTP exchange as reported (start and end combined).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Exchange {
    /// Measured as a server (inbound) rather than a client (outbound) exchange.
    pub inbound: bool,
    pub method: String,
    pub target: String,
    pub reused: bool,
    pub incoming_traceparent: Option<String>,
    pub outgoing_traceparent: Option<String>,
    pub status: Option<u16>,
    pub request_body: u64,
    pub response_body: u64,
    pub error: Option<ErrorType>,
}

/// One TCP connection as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Connection {
    /// An inbound (steered) connection rather than an outbound (redirected) one.
    pub inbound: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub protocol: ConnectionProtocol,
    pub error: Option<ErrorType>,
}

static EXCHANGES: Mutex<Vec<(SocketAddr, Exchange)>> = Mutex::new(Vec::new());
static CONNECTIONS: Mutex<Vec<(SocketAddr, Connection)>> = Mutex::new(Vec::new());

fn take_for<T>(log: &Mutex<Vec<(SocketAddr, T)>>, dst: SocketAddr) -> Vec<T> {
    let mut all = log.lock().unwrap_or_else(PoisonError::into_inner);
    let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|(d, _)| *d == dst);
    *all = rest;
    mine.into_iter().map(|(_, x)| x).collect()
}

pub(crate) fn push_exchange(dst: SocketAddr, e: Exchange) {
    EXCHANGES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((dst, e));
}

pub(crate) fn push_connection(dst: SocketAddr, c: Connection) {
    CONNECTIONS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((dst, c));
}

/// Removes and returns the exchanges recorded for `dst`, in the order they ended.
pub(crate) fn take_exchanges(dst: SocketAddr) -> Vec<Exchange> {
    take_for(&EXCHANGES, dst)
}

/// Removes and returns the connections recorded for `dst`, in the order they closed.
pub(crate) fn take_connections(dst: SocketAddr) -> Vec<Connection> {
    take_for(&CONNECTIONS, dst)
}
