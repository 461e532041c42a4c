//! The sidecar's eBPF programs: outbound connect redirection, connection bookkeeping and the
//! original-destination answer for the proxy.
//!
//! One file per hook; each entry point is a thin wrapper around a `try_*` function:
//! - [`connect`]: `cgroup/connect4` and `cgroup/connect6` on the pod cgroup rewrite outbound TCP
//!   destinations to the proxy and remember the original destination by socket cookie;
//! - [`sockops`]: on the pod cgroup, moves that record to the application socket's local address
//!   once the connection is established, and forgets it when the socket closes;
//! - [`getsockopt`]: `cgroup/getsockopt` on the sidecar's own cgroup answers
//!   `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` for sockets the proxy accepted;
//! - [`sk_lookup`]: on the pod's network namespace, steers inbound TCP to the served ports
//!   onto the proxy's inbound listener.
//!
//! Policy lookups (exclusions, include list, inbound ports) are in [`policy`].
//! TCP observation (RTT, retransmits, bytes, outcome per connection, emitted through a ring
//! buffer) runs inside `sockops` ([`observe`]) with [`tcp_reset`] marking resets.
//! Maps are declared in [`maps`]; kernel constants and context readers in [`kernel`].
#![no_std]
#![no_main]

mod connect;
mod getsockopt;
mod kernel;
mod maps;
mod observe;
mod policy;
mod sk_lookup;
mod sockops;
mod tcp_reset;

/// eBPF programs cannot unwind or print; nothing in them can panic at run time (the verifier
/// would reject a program that reached this), so this handler only satisfies `no_std`.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License string the kernel reads from the object. The programs call no GPL-only helper, so
/// the project's own license is declared.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 11] = *b"Apache-2.0\0";
