//! Kernel-side TCP observation, called from the `sockops` program on the pod cgroup: keeps one
//! [`ConnState`] per connection in `CONN_STATE` (keyed by socket cookie) from `connect()` or
//! acceptance to `TCP_CLOSE`, and then emits one [`TcpEvent`] through the `TCP_EVENTS` ring
//! buffer (one per closed connection, one per failed connect).
//!
//! Connections whose peer or local address is loopback are not observed: they are the legs
//! inside the pod (application ↔ proxy, proxy from 127.0.0.6 to the application) or local traffic, whose RTT and retransmits say nothing about the
//! network. What is measured, read from the `sockops` context at close:
//! - RTT: `srtt_us` (the kernel stores it times 8);
//! - retransmits: `total_retrans` (segments, SYN retransmissions included);
//! - bytes: `bytes_acked` / `bytes_received` minus their value at establishment (the active
//!   side's SYN counts one) and minus one for a FIN acknowledged / received;
//! - outcome: reset seen by `tcp:tcp_receive_reset` (see [`crate::tcp_reset`]), retransmission
//!   timer expired (`BPF_SOCK_OPS_RTO_CB`), and the state the socket closed from.

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING, BPF_TCP_ESTABLISHED, BPF_TCP_FIN_WAIT1,
        BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK, BPF_TCP_SYN_RECV, BPF_TCP_SYN_SENT,
    },
    helpers::bpf_ktime_get_ns,
    programs::SockOpsContext,
};
use aya_log_ebpf::{debug, warn};
use sidecar_common::{
    observe::{
        ConnState, TcpEvent, DIRECTION_INBOUND, DIRECTION_OUTBOUND, FLAG_ESTABLISHED,
        FLAG_FIN_ACKED, FLAG_FIN_RECEIVED, FLAG_RST_RECEIVED, FLAG_RTO_EXPIRED, OUTCOME_ERROR,
        OUTCOME_OK, OUTCOME_REFUSED, OUTCOME_RESET, OUTCOME_TIMEOUT,
    },
    SockAddr, AF_INET, AF_INET6,
};

use crate::{
    kernel::read_words,
    maps::{CONN_STATE, TCP_EVENTS, TCP_EVENTS_LOST},
};

/// Callback flags an observed socket needs: every state change, and retransmission timeouts.
const OBSERVE_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;

/// `TCP_CONNECT_CB`: an outbound connect is starting.
#[inline(always)]
pub fn on_connect(ctx: &SockOpsContext, cookie: u64) {
    start(ctx, cookie, DIRECTION_OUTBOUND, 0);
}

/// `ACTIVE_ESTABLISHED_CB`: an observed outbound connect completed.
#[inline(always)]
pub fn on_active_established(ctx: &SockOpsContext, cookie: u64) {
    let Some(state) = CONN_STATE.get_ptr_mut(cookie) else {
        return;
    };
    let ops = ctx.ops;
    // SAFETY: a non-null pointer from a map lookup points to a whole value, only touched by
    // callbacks of this socket (which run under its lock); `bytes_acked` and `bytes_received`
    // are readable u64 fields of the sock_ops context.
    unsafe {
        (*state).established_ns = bpf_ktime_get_ns();
        (*state).base_acked = core::ptr::read_volatile(&(*ops).bytes_acked);
        (*state).base_received = core::ptr::read_volatile(&(*ops).bytes_received);
        (*state).flags |= FLAG_ESTABLISHED;
    }
}

/// `PASSIVE_ESTABLISHED_CB`: a connection was accepted from a listener of the pod.
#[inline(always)]
pub fn on_passive_established(ctx: &SockOpsContext, cookie: u64) {
    // SAFETY: readable u64 fields of the sock_ops context.
    let (acked, received) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ops).bytes_acked),
            core::ptr::read_volatile(&(*ctx.ops).bytes_received),
        )
    };
    let now = start(ctx, cookie, DIRECTION_INBOUND, FLAG_ESTABLISHED);
    if now == 0 {
        return;
    }
    if let Some(state) = CONN_STATE.get_ptr_mut(cookie) {
        // SAFETY: a non-null pointer from a map lookup points to a whole value.
        unsafe {
            (*state).established_ns = now;
            (*state).base_acked = acked;
            (*state).base_received = received;
        }
    }
}

/// `RTO_CB`: args are (retransmissions so far, RTO, expired); "expired" means the kernel is
/// giving up on the connection.
#[inline(always)]
pub fn on_rto(ctx: &SockOpsContext, cookie: u64) {
    if ctx.arg(2) == 0 {
        return;
    }
    if let Some(state) = CONN_STATE.get_ptr_mut(cookie) {
        // SAFETY: a non-null pointer from a map lookup points to a whole value.
        unsafe { (*state).flags |= FLAG_RTO_EXPIRED };
    }
}

/// `STATE_CB`: args are (old state, new state).
#[inline(always)]
pub fn on_state_change(ctx: &SockOpsContext, cookie: u64) {
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    let Some(state) = CONN_STATE.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: readable u64 field of the sock_ops context.
    let received = unsafe { core::ptr::read_volatile(&(*ctx.ops).bytes_received) };
    if new != BPF_TCP_CLOSE {
        // SAFETY: a non-null pointer from a map lookup points to a whole value.
        unsafe {
            if new == BPF_TCP_CLOSE_WAIT || new == BPF_TCP_CLOSING {
                (*state).flags |= FLAG_FIN_RECEIVED;
            }
            if old == BPF_TCP_FIN_WAIT1 && new == BPF_TCP_FIN_WAIT2 {
                (*state).flags |= FLAG_FIN_ACKED;
                (*state).fin_wait2_received = received;
            }
        }
        return;
    }
    // SAFETY: the value is copied out before its entry is deleted.
    let mut conn = unsafe { *state };
    let _ = CONN_STATE.remove(cookie);
    close(ctx, cookie, &mut conn, old, received);
}

/// Records the start of an observed connection and asks for its state and RTO callbacks.
/// Returns the start time, or 0 when the connection is not observed.
#[inline(always)]
fn start(ctx: &SockOpsContext, cookie: u64, direction: u32, flags: u32) -> u64 {
    match remote_addr(ctx) {
        Some(remote) if !is_loopback(&remote) => {}
        _ => return 0,
    }
    // A loopback source (the proxy's 127.0.0.6 / ::1 leg to the application) is a leg inside
    // the pod as well, even when the destination is the pod's own address.
    if local_is_loopback(ctx) {
        return 0;
    }
    let now = now_ns();
    let state = ConnState {
        start_ns: now,
        direction,
        flags,
        ..ConnState::default()
    };
    if let Err(ret) = CONN_STATE.insert(cookie, state, u64::from(BPF_NOEXIST)) {
        // An entry for this cookie already exists only if a callback ran twice; the map is
        // LRU, so it is never full.
        warn!(ctx, "tcp observe: CONN_STATE insert failed ({})", ret);
        if CONN_STATE
            .insert(cookie, state, u64::from(BPF_ANY))
            .is_err()
        {
            return 0;
        }
    }
    let flags = ctx.cb_flags() | OBSERVE_FLAGS;
    if ctx.set_cb_flags(flags as i32).is_err() {
        let _ = CONN_STATE.remove(cookie);
        return 0;
    }
    now
}

/// Emits the record of a connection reaching `TCP_CLOSE` from state `old`.
#[inline(always)]
fn close(ctx: &SockOpsContext, cookie: u64, conn: &mut ConnState, old: u32, received: u64) {
    let now = now_ns();
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: readable fields of the sock_ops context (u32 and u64 loads of their own size).
    let (srtt, retrans, acked) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).srtt_us),
            core::ptr::read_volatile(&(*ops).total_retrans),
            core::ptr::read_volatile(&(*ops).bytes_acked),
        )
    };
    let flags = conn.flags;
    let rst = flags & FLAG_RST_RECEIVED != 0;
    let expired = flags & FLAG_RTO_EXPIRED != 0;
    let established = flags & FLAG_ESTABLISHED != 0;
    let outcome = if !established {
        if old != BPF_TCP_SYN_SENT {
            warn!(
                ctx,
                "tcp observe: unestablished socket closed from state {}", old
            );
        }
        let outcome = if rst {
            OUTCOME_REFUSED
        } else if expired || retrans > 0 {
            OUTCOME_TIMEOUT
        } else {
            OUTCOME_ERROR
        };
        // Failed connects are rare enough to be worth a debug line.
        debug!(
            ctx,
            "tcp observe: connect failed (outcome {}, {} SYN retransmits)", outcome, retrans
        );
        outcome
    } else if rst {
        OUTCOME_RESET
    } else if expired {
        OUTCOME_TIMEOUT
    } else if old == BPF_TCP_ESTABLISHED
        || old == BPF_TCP_CLOSE_WAIT
        || old == BPF_TCP_FIN_WAIT1
        || old == BPF_TCP_SYN_RECV
    {
        // Closed without the FIN exchange and without a timeout: aborted, which sends a reset.
        OUTCOME_RESET
    } else {
        // FIN_WAIT2, CLOSING or LAST_ACK: the normal ends.
        if old == BPF_TCP_CLOSING || old == BPF_TCP_LAST_ACK {
            conn.flags |= FLAG_FIN_ACKED;
        }
        if old == BPF_TCP_FIN_WAIT2 && received > conn.fin_wait2_received {
            conn.flags |= FLAG_FIN_RECEIVED;
        }
        OUTCOME_OK
    };

    let Some(mut entry) = TCP_EVENTS.reserve::<TcpEvent>(0) else {
        count_lost();
        return;
    };
    let (local, remote) = match (local_addr(ctx), remote_addr(ctx)) {
        (Some(l), Some(r)) => (l, r),
        _ => {
            entry.discard(0);
            return;
        }
    };
    let (sent, rcvd, connect_ns) = if established {
        let fin_acked = u64::from(conn.flags & FLAG_FIN_ACKED != 0);
        let fin_received = u64::from(conn.flags & FLAG_FIN_RECEIVED != 0);
        let connect_ns = if conn.direction == DIRECTION_OUTBOUND {
            conn.established_ns.saturating_sub(conn.start_ns)
        } else {
            0
        };
        (
            acked
                .saturating_sub(conn.base_acked)
                .saturating_sub(fin_acked),
            received
                .saturating_sub(conn.base_received)
                .saturating_sub(fin_received),
            connect_ns,
        )
    } else {
        (0, 0, 0)
    };
    let event = TcpEvent {
        local,
        remote,
        cookie,
        duration_ns: now.saturating_sub(conn.start_ns),
        connect_ns,
        bytes_sent: sent,
        bytes_received: rcvd,
        srtt_us: srtt >> 3,
        retransmits: retrans,
        direction: conn.direction,
        outcome,
    };
    entry.write(event);
    entry.submit(0);
}

/// Monotonic time in nanoseconds.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: the helper has no arguments and no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Counts a record the ring buffer had no room for (per CPU; userspace sums them).
#[inline(always)]
fn count_lost() {
    if let Some(counter) = TCP_EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: a non-null pointer into this CPU's slot of a per-CPU array.
        unsafe { *counter += 1 };
    }
}

/// The socket's local address (host-order port).
#[inline(always)]
fn local_addr(ctx: &SockOpsContext) -> Option<SockAddr> {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: `family`, `local_ip4`, `local_ip6`, `local_port` are readable u32 fields of the
    // sock_ops context; `local_port` is in host byte order.
    unsafe {
        let port = core::ptr::read_volatile(&(*ops).local_port) as u16;
        match core::ptr::read_volatile(&(*ops).family) {
            AF_INET => Some(SockAddr::v4(
                core::ptr::read_volatile(&(*ops).local_ip4),
                port,
            )),
            AF_INET6 => Some(SockAddr::v6(read_words(&(*ops).local_ip6), port)),
            _ => None,
        }
    }
}

/// The peer's address (host-order port).
#[inline(always)]
fn remote_addr(ctx: &SockOpsContext) -> Option<SockAddr> {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: `family`, `remote_ip4`, `remote_ip6`, `remote_port` are readable u32 fields of
    // the sock_ops context. `remote_port` holds the network-order port in its upper 16 bits.
    unsafe {
        let raw = core::ptr::read_volatile(&(*ops).remote_port);
        let port = u16::from_be((raw >> 16) as u16);
        match core::ptr::read_volatile(&(*ops).family) {
            AF_INET => Some(SockAddr::v4(
                core::ptr::read_volatile(&(*ops).remote_ip4),
                port,
            )),
            AF_INET6 => Some(SockAddr::v6(read_words(&(*ops).remote_ip6), port)),
            _ => None,
        }
    }
}

/// Whether the socket's local address is loopback (the address only: the port does not matter).
#[inline(always)]
fn local_is_loopback(ctx: &SockOpsContext) -> bool {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: `family`, `local_ip4` and `local_ip6` are readable u32 fields of the sock_ops
    // context.
    let local = unsafe {
        match core::ptr::read_volatile(&(*ops).family) {
            AF_INET => SockAddr::v4(core::ptr::read_volatile(&(*ops).local_ip4), 0),
            AF_INET6 => SockAddr::v6(read_words(&(*ops).local_ip6), 0),
            _ => return false,
        }
    };
    is_loopback(&local)
}

/// Whether an address is loopback: 127.0.0.0/8, `::1`, or IPv4-mapped 127.0.0.0/8.
#[inline(always)]
fn is_loopback(addr: &SockAddr) -> bool {
    let first_octet = |word: u32| u32::from_be(word) >> 24;
    match addr.family {
        AF_INET => first_octet(addr.addr[0]) == 127,
        _ => {
            let w = addr.addr;
            let prefix_zero = w[0] == 0 && w[1] == 0;
            let v6_loopback = prefix_zero && w[2] == 0 && u32::from_be(w[3]) == 1;
            let mapped = prefix_zero && u32::from_be(w[2]) == 0x0000_ffff;
            v6_loopback || (mapped && first_octet(w[3]) == 127)
        }
    }
}
