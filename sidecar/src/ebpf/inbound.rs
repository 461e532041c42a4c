//! Owns inbound steering at run time: loads the `sk_lookup` program, attaches it to the
//! calling thread's network namespace through a link owned by this process, and keeps the
//! proxy's inbound listener sockets in the `INBOUND_LISTENERS` socket map.
//!
//! The program steers TCP connections to the ports of the `INBOUND_PORTS` map (written by
//! [`Interception::apply_policy`]) onto the listener of their address family, unless they come
//! from a loopback address. A listener that closes leaves the map by itself (the kernel removes
//! closed sockets from socket maps), so new connections then reach the application directly:
//! fail-open. The link is closed with the [`Interception`] (or when the process exits), which
//! detaches the program from the namespace.

use std::{fs, os::fd::BorrowedFd};

use aya::{
    maps::{Map, MapData, MapError, SockMap},
    programs::{sk_lookup::SkLookupLinkId, SkLookup},
    Ebpf,
};
use sidecar_common::policy::{INBOUND_LISTENER_ENTRIES, INBOUND_LISTENER_V4, INBOUND_LISTENER_V6};
use socket2::{Domain, SockRef, Type};
use tracing::info;

use super::{is_permission_error, permission_denied, program_error, EbpfError, Interception};

/// Name of the `sk_lookup` program in the object.
pub const PROG_SK_LOOKUP: &str = "sc_sk_lookup";
/// Name of the inbound listener socket map.
pub const MAP_INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
/// The network namespace the program is attached to: the calling thread's (not
/// `/proc/self/ns/net`, which names the main thread's namespace).
pub const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// Inbound steering state kept by [`Interception`] once [`Interception::attach_inbound`] ran.
pub(crate) struct Inbound {
    /// The `INBOUND_LISTENERS` map, taken out of the object.
    listeners: SockMap<MapData>,
    /// The program's link to the namespace, while attached.
    link: Option<SkLookupLinkId>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

/// Loads the `sk_lookup` program (runs the verifier; does not attach). Loading twice is a
/// no-op.
pub(crate) fn load_sk_lookup(bpf: &mut Ebpf) -> Result<(), EbpfError> {
    program(bpf)?
        .load()
        .or_else(|e| match e {
            aya::programs::ProgramError::AlreadyLoaded => Ok(()),
            e => Err(e),
        })
        .map_err(|e| program_error(PROG_SK_LOOKUP, e))
}

fn program(bpf: &mut Ebpf) -> Result<&mut SkLookup, EbpfError> {
    let program = bpf.program_mut(PROG_SK_LOOKUP).ok_or(EbpfError::Missing {
        kind: "program",
        name: PROG_SK_LOOKUP,
    })?;
    <&mut SkLookup>::try_from(program).map_err(|source| EbpfError::Program {
        program: PROG_SK_LOOKUP,
        source,
    })
}

/// Which slots of the listener map the given sockets fill.
fn listener_slots<'a>(
    listeners: &[BorrowedFd<'a>],
) -> Result<[Option<BorrowedFd<'a>>; INBOUND_LISTENER_ENTRIES as usize], EbpfError> {
    let mut v4 = None;
    let mut v6 = None;
    let mut dual_stack = None;
    for fd in listeners {
        let sock = SockRef::from(fd);
        let invalid = |reason: String| EbpfError::InboundListener { reason };
        let ty = sock
            .r#type()
            .map_err(|e| invalid(format!("cannot read the socket type: {e}")))?;
        let accepting = sock
            .is_listener()
            .map_err(|e| invalid(format!("cannot read SO_ACCEPTCONN: {e}")))?;
        if ty != Type::STREAM || !accepting {
            return Err(invalid(
                "not a listening TCP socket (call listen() before attaching)".to_string(),
            ));
        }
        let domain = sock
            .domain()
            .map_err(|e| invalid(format!("cannot read the address family: {e}")))?;
        let slot = if domain == Domain::IPV4 {
            &mut v4
        } else if domain == Domain::IPV6 {
            if !sock.only_v6().unwrap_or(true) {
                dual_stack = Some(*fd);
            }
            &mut v6
        } else {
            return Err(invalid(format!(
                "address family {domain:?} is not IPv4/IPv6"
            )));
        };
        if slot.replace(*fd).is_some() {
            return Err(invalid(format!(
                "two {domain:?} listeners given; pass at most one per family"
            )));
        }
    }
    // A dual-stack IPv6 listener also takes IPv4 connections when no IPv4 one is given.
    let v4 = v4.or(dual_stack);
    let mut slots = [None; INBOUND_LISTENER_ENTRIES as usize];
    slots[INBOUND_LISTENER_V4 as usize] = v4;
    slots[INBOUND_LISTENER_V6 as usize] = v6;
    Ok(slots)
}

impl Interception {
    /// Steers inbound TCP connections to the pod's ports (the `inbound_ports` of the applied
    /// policy) onto the proxy's inbound listeners, in the calling thread's network namespace.
    ///
    /// `listeners` are listening TCP sockets, at most one IPv4 and one IPv6, told apart by
    /// their address family; a dual-stack IPv6 listener (`IPV6_V6ONLY` off) also serves IPv4
    /// when no IPv4 listener is given. A family without a listener is not steered. The
    /// accepted sockets keep the original destination as their local address.
    ///
    /// The first call loads `sk_lookup` and attaches it to the namespace; later calls only
    /// replace the listeners (slots not given are emptied). The program is attached after the
    /// listeners are in the map. Needs Linux 5.9. Refused when the interception was attached
    /// for a [`super::RedirectMode`] without inbound steering.
    pub fn attach_inbound(&mut self, listeners: &[BorrowedFd<'_>]) -> Result<(), EbpfError> {
        if !self.mode.steers_inbound() {
            return Err(EbpfError::InboundListener {
                reason: format!(
                    "inbound steering is not part of redirect mode `{}`",
                    self.mode
                ),
            });
        }
        let slots = listener_slots(listeners)?;
        if self.inbound.is_none() {
            let map = self
                .bpf
                .take_map(MAP_INBOUND_LISTENERS)
                .ok_or(EbpfError::Missing {
                    kind: "map",
                    name: MAP_INBOUND_LISTENERS,
                })?;
            self.inbound = Some(Inbound {
                listeners: sock_map(map)?,
                link: None,
            });
        }
        let inbound = self.inbound.as_mut().ok_or(EbpfError::Missing {
            kind: "map",
            name: MAP_INBOUND_LISTENERS,
        })?;
        set_listeners(&mut inbound.listeners, &slots)?;
        if inbound.link.is_none() {
            let netns = fs::File::open(OWN_NETNS).map_err(|source| EbpfError::Netns {
                path: OWN_NETNS.into(),
                source,
            })?;
            load_sk_lookup(&mut self.bpf)?;
            let link = program(&mut self.bpf)?.attach(&netns).map_err(|source| {
                if is_permission_error(&source) {
                    permission_denied("attaching sk_lookup to this network namespace", &source)
                } else {
                    EbpfError::AttachNetns {
                        program: PROG_SK_LOOKUP,
                        source,
                    }
                }
            })?;
            inbound.link = Some(link);
        }
        info!(
            ipv4 = slots[INBOUND_LISTENER_V4 as usize].is_some(),
            ipv6 = slots[INBOUND_LISTENER_V6 as usize].is_some(),
            "inbound steering attached"
        );
        Ok(())
    }

    /// Stops inbound steering now: detaches `sk_lookup` from the namespace (dropping the
    /// [`Interception`] does the same). The listeners stay in the map until they close.
    pub fn detach_inbound(&mut self) -> Result<(), EbpfError> {
        let Some(link) = self.inbound.as_mut().and_then(|i| i.link.take()) else {
            return Ok(());
        };
        program(&mut self.bpf)?
            .detach(link)
            .map_err(|source| EbpfError::Program {
                program: PROG_SK_LOOKUP,
                source,
            })?;
        info!("inbound steering detached");
        Ok(())
    }
}

fn sock_map(map: Map) -> Result<SockMap<MapData>, EbpfError> {
    SockMap::try_from(map).map_err(|source| EbpfError::Map {
        map: MAP_INBOUND_LISTENERS,
        source,
    })
}

/// Puts each given listener in its slot first, then empties the slots without one.
fn set_listeners(
    map: &mut SockMap<MapData>,
    slots: &[Option<BorrowedFd<'_>>],
) -> Result<(), EbpfError> {
    let err = |source| EbpfError::Map {
        map: MAP_INBOUND_LISTENERS,
        source,
    };
    for (index, fd) in (0u32..).zip(slots) {
        if let Some(fd) = fd {
            map.set(index, fd, 0).map_err(err)?;
        }
    }
    for (index, fd) in (0u32..).zip(slots) {
        if fd.is_none() {
            match map.clear_index(&index) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(err(e)),
            }
        }
    }
    Ok(())
}
