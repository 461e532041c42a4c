//! Kernel-side TCP observation: the per-connection state the `sockops` program keeps, the
//! record it emits through the `TCP_EVENTS` ring buffer when a connection closes (or a connect
//! fails), and the constants both sides agree on.

use crate::SockAddr;

/// Maximum entries of the socket cookie → [`ConnState`] map (LRU; entries are deleted when the
/// socket reaches `TCP_CLOSE`).
pub const CONN_STATE_ENTRIES: u32 = 65_536;

/// Size in bytes of the `TCP_EVENTS` ring buffer (a power of two and a multiple of the page
/// size): room for about 2 000 records between two reads.
pub const TCP_EVENTS_BYTES: u32 = 256 * 1024;

/// Words of the `OBSERVE_CONFIG` array map (see [`ObserveConfigKey`]).
pub const OBSERVE_CONFIG_ENTRIES: u32 = 2;

/// Index of each word of the `OBSERVE_CONFIG` array map (one `u64` per key).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObserveConfigKey {
    /// Offset of `sock_cookie` in the `tcp:tcp_receive_reset` tracepoint record, plus one
    /// (0 = unknown: the tracepoint program then does nothing).
    ResetCookieOffset = 0,
    /// Reserved; always zero.
    Reserved = 1,
}

/// The `ResetCookieOffset` value (offset + 1) the tracepoint program reads: the verifier only
/// accepts constant offsets inside a tracepoint record, so the program reads `sock_cookie` at
/// offset 64 (its position on the 6.18 kernel this was verified on) and userspace attaches it
/// only when the record's format says so.
pub const RESET_COOKIE_AT_64: u64 = 65;

/// Connection direction: this socket called `connect()`.
pub const DIRECTION_OUTBOUND: u32 = 1;
/// Connection direction: this socket was accepted from a listener.
pub const DIRECTION_INBOUND: u32 = 2;

/// Outcome: established and closed by the FIN exchange.
pub const OUTCOME_OK: u32 = 0;
/// Outcome: the connect was answered by a reset.
pub const OUTCOME_REFUSED: u32 = 1;
/// Outcome: the kernel gave up retransmitting (SYN or data), or the application abandoned a
/// connect after its SYN had been retransmitted.
pub const OUTCOME_TIMEOUT: u32 = 2;
/// Outcome: an established connection ended by a reset, received or sent.
pub const OUTCOME_RESET: u32 = 3;
/// Outcome: any other failed connect (e.g. ICMP unreachable, abandoned before a SYN
/// retransmission).
pub const OUTCOME_ERROR: u32 = 4;

/// [`ConnState::flags`]: the connection reached ESTABLISHED.
pub const FLAG_ESTABLISHED: u32 = 1;
/// [`ConnState::flags`]: a reset was received (`tcp:tcp_receive_reset`).
pub const FLAG_RST_RECEIVED: u32 = 1 << 1;
/// [`ConnState::flags`]: the retransmission timer expired for good (`BPF_SOCK_OPS_RTO_CB`
/// with its "expired" argument set).
pub const FLAG_RTO_EXPIRED: u32 = 1 << 2;
/// [`ConnState::flags`]: the peer's FIN was received (it counts one unit of `bytes_received`).
pub const FLAG_FIN_RECEIVED: u32 = 1 << 3;
/// [`ConnState::flags`]: our FIN was acknowledged (it counts one unit of `bytes_acked`).
pub const FLAG_FIN_ACKED: u32 = 1 << 4;

/// What the `sockops` program remembers about one observed connection, keyed by socket
/// cookie in `CONN_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnState {
    /// `bpf_ktime_get_ns()` at `connect()` (outbound) or at establishment (inbound).
    pub start_ns: u64,
    /// `bpf_ktime_get_ns()` at establishment; 0 until then.
    pub established_ns: u64,
    /// `bytes_acked` at establishment (the SYN counts one on the active side).
    pub base_acked: u64,
    /// `bytes_received` at establishment.
    pub base_received: u64,
    /// `bytes_received` when FIN_WAIT2 was entered (tells a FIN that arrives there).
    pub fin_wait2_received: u64,
    /// `DIRECTION_*`.
    pub direction: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// One observed TCP connection, emitted once when it closes (or once per failed connect).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpEvent {
    /// This socket's address.
    pub local: SockAddr,
    /// The peer's address.
    pub remote: SockAddr,
    /// Socket cookie (unique per socket while the system runs).
    pub cookie: u64,
    /// Nanoseconds from `start_ns` to `TCP_CLOSE`.
    pub duration_ns: u64,
    /// Nanoseconds from `connect()` to ESTABLISHED (outbound connections that established;
    /// else 0).
    pub connect_ns: u64,
    /// Payload bytes the peer acknowledged (SYN and FIN excluded).
    pub bytes_sent: u64,
    /// Payload bytes received in sequence (SYN and FIN excluded).
    pub bytes_received: u64,
    /// Smoothed RTT in microseconds at close (0 = no sample).
    pub srtt_us: u32,
    /// Segments retransmitted (`total_retrans`), SYNs included.
    pub retransmits: u32,
    /// `DIRECTION_*`.
    pub direction: u32,
    /// `OUTCOME_*`.
    pub outcome: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: ConnState and TcpEvent are repr(C), Copy, made of u64/u32/SockAddr fields laid
    // out without implicit padding (checked by the layout tests), and every bit pattern is a
    // valid value.
    unsafe impl aya::Pod for super::ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ConnState>(), 5 * 8 + 2 * 4);
        assert_eq!(core::mem::size_of::<TcpEvent>(), 2 * 24 + 5 * 8 + 4 * 4);
        assert_eq!(core::mem::align_of::<TcpEvent>(), 8);
    }

    #[test]
    fn flags_are_distinct_bits() {
        let all = [
            FLAG_ESTABLISHED,
            FLAG_RST_RECEIVED,
            FLAG_RTO_EXPIRED,
            FLAG_FIN_RECEIVED,
            FLAG_FIN_ACKED,
        ];
        let mut seen = 0u32;
        for f in all {
            assert_eq!(f.count_ones(), 1);
            assert_eq!(seen & f, 0);
            seen |= f;
        }
    }
}
