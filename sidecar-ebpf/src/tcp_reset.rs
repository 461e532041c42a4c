//! `tracepoint/tcp/tcp_receive_reset`: marks an observed connection as reset by its peer, so
//! the `sockops` observation ([`crate::observe`]) can tell a refused connect and a reset
//! connection from other failures.
//!
//! The tracepoint fires for every socket of the system; only sockets present in `CONN_STATE`
//! (those of the pod, by cookie) are touched. The offset of `sock_cookie` in the tracepoint
//! record differs between kernels: userspace reads it from the tracepoint's `format` file and
//! checks that it is the one this program reads (64, as on the 6.18 kernel this was verified
//! on) and writes it (plus one) into `OBSERVE_CONFIG`; otherwise the program is not attached,
//! and with any other value it does nothing.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext, EbpfContext};
use sidecar_common::observe::{ObserveConfigKey, FLAG_RST_RECEIVED, RESET_COOKIE_AT_64};

use crate::maps::{CONN_STATE, OBSERVE_CONFIG};

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn sc_tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _seen: Result<(), ()> = try_receive_reset(&ctx);
    0
}

fn try_receive_reset(ctx: &TracePointContext) -> Result<(), ()> {
    let offset = OBSERVE_CONFIG
        .get(ObserveConfigKey::ResetCookieOffset as u32)
        .copied()
        .unwrap_or(0);
    // The verifier only accepts constant offsets into a tracepoint record, none past its end
    // (and the program cannot use the GPL-only bpf_probe_read_kernel): the one position this
    // program reads is the one userspace confirmed from the record's format.
    if offset != RESET_COOKIE_AT_64 {
        return Err(());
    }
    let cookie = read_u64::<64>(ctx);
    let state = CONN_STATE.get_ptr_mut(cookie).ok_or(())?;
    // SAFETY: a non-null pointer from a map lookup points to a whole value.
    unsafe { (*state).flags |= FLAG_RST_RECEIVED };
    Ok(())
}

/// The 8-byte record field at `OFF` (8-byte aligned, inside the record).
#[inline(always)]
fn read_u64<const OFF: usize>(ctx: &TracePointContext) -> u64 {
    // SAFETY: a tracepoint program may load any aligned constant offset inside its record;
    // userspace attaches this program only when the record holds an 8-byte field at `OFF`.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(OFF).cast::<u64>()) }
}
