//! Userspace half of the kernel TCP observation: sets it up at attach time (the
//! `tcp:tcp_receive_reset` tracepoint, its configuration word) and reads the `TCP_EVENTS` ring
//! buffer asynchronously, turning each record into a [`TcpObservation`] for
//! [`Telemetry::tcp_observed`], and the per-CPU `TCP_EVENTS_LOST` counter into
//! `sidecar.tcp.ringbuf.overflows`.

use std::{
    ffi::CString,
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf,
};
use sidecar_common::observe::{
    ConnState, ObserveConfigKey, TcpEvent, DIRECTION_INBOUND, DIRECTION_OUTBOUND, OUTCOME_ERROR,
    OUTCOME_OK, OUTCOME_REFUSED, OUTCOME_RESET, OUTCOME_TIMEOUT, RESET_COOKIE_AT_64,
    TCP_EVENTS_BYTES,
};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{log::KernelLog, EbpfError};
use crate::telemetry::{TcpDirection, TcpObservation, TcpOutcome, Telemetry};

/// Name of the `tcp:tcp_receive_reset` tracepoint program in the object.
pub const PROG_TCP_RESET: &str = "sc_tcp_receive_reset";
/// Name of the ring buffer of observation records.
pub const MAP_TCP_EVENTS: &str = "TCP_EVENTS";
/// Name of the per-CPU counter of records lost to a full ring buffer.
pub const MAP_TCP_EVENTS_LOST: &str = "TCP_EVENTS_LOST";
/// Name of the observation configuration array.
pub const MAP_OBSERVE_CONFIG: &str = "OBSERVE_CONFIG";
/// Name of the per-connection state map.
pub const MAP_CONN_STATE: &str = "CONN_STATE";

/// Tracepoint category and name of the reset hook.
const RESET_TRACEPOINT: (&str, &str) = ("tcp", "tcp_receive_reset");
/// Where tracefs is usually mounted, in the order aya looks.
const TRACEFS_PATHS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// Records handed out per wake-up of the reader before other work gets a turn.
const DRAIN_BATCH: usize = 1024;
/// The most records the ring buffer can hold at once (each has an 8-byte header).
const RING_RECORDS: usize = TCP_EVENTS_BYTES as usize / (std::mem::size_of::<TcpEvent>() + 8);
/// How often the lost-record counter is read while running.
const LOST_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Errors of the observation reader once it runs.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The ring buffer could not be registered with the async runtime.
    #[error("cannot poll the TCP observation ring buffer: {0}")]
    Poll(#[source] io::Error),
}

/// The ring-buffer reader; take it with [`super::Interception::take_observer`] and spawn
/// [`TcpObserver::run`].
pub struct TcpObserver {
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    log: Option<KernelLog>,
    /// Why resets are not detected, if they are not.
    reset_detection_error: Option<String>,
}

impl std::fmt::Debug for TcpObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpObserver")
            .field("reset_detection_error", &self.reset_detection_error)
            .finish_non_exhaustive()
    }
}

/// What the reader hands out while it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObserverOutput {
    /// One closed connection or failed connect.
    Connection(TcpObservation),
    /// This many more records were lost since the last report (ring buffer full).
    Lost(u64),
}

impl TcpObserver {
    /// Whether resets are seen (the `tcp:tcp_receive_reset` tracepoint is attached). Without
    /// it a refused connect is reported as `error`.
    pub fn resets_detected(&self) -> bool {
        self.reset_detection_error.is_none()
    }

    /// Why resets are not detected (the tracepoint could not be attached), if so.
    pub fn reset_detection_error(&self) -> Option<&str> {
        self.reset_detection_error.as_deref()
    }

    /// Records lost so far because the ring buffer was full (sum over CPUs).
    pub fn lost_records(&self) -> Result<u64, EbpfError> {
        sum_lost(&self.lost).map_err(|source| EbpfError::Map {
            map: MAP_TCP_EVENTS_LOST,
            source,
        })
    }

    /// Reads every record queued now, without waiting (for tests and the final drain).
    /// Returns how many records were read (at most one ring buffer's worth).
    pub fn drain_now(&mut self, sink: &mut impl FnMut(ObserverOutput)) -> usize {
        drain(&mut self.events, sink, RING_RECORDS)
    }

    /// Reads records as they arrive and records them on `telemetry` until `shutdown`, then
    /// drains what is left. Kernel log lines are forwarded by the same task.
    pub async fn run(
        self,
        telemetry: Telemetry,
        shutdown: CancellationToken,
    ) -> Result<(), ObserveError> {
        self.run_with(
            move |out| match out {
                ObserverOutput::Connection(obs) => telemetry.tcp_observed(&obs),
                ObserverOutput::Lost(n) => telemetry.tcp_ringbuf_overflows(n),
            },
            shutdown,
        )
        .await
    }

    /// Like [`TcpObserver::run`] with any sink (tests collect what arrives).
    pub async fn run_with(
        self,
        mut sink: impl FnMut(ObserverOutput) + Send,
        shutdown: CancellationToken,
    ) -> Result<(), ObserveError> {
        let TcpObserver {
            events, lost, log, ..
        } = self;
        let log_task = log.map(|log| tokio::spawn(log.run(shutdown.clone())));
        // SAFETY: the ring buffer owns its map descriptor, which stays open and is the one
        // `as_raw_fd` returns for as long as the `AsyncFd` owns it.
        let registered =
            unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) };
        let mut fd = registered.map_err(|e| ObserveError::Poll(e.into()))?;
        let mut reported_lost = sum_lost(&lost).unwrap_or(0);
        if reported_lost > 0 {
            sink(ObserverOutput::Lost(reported_lost));
        }
        let mut tick = tokio::time::interval(LOST_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                ready = fd.readable_mut() => {
                    let mut guard = ready.map_err(ObserveError::Poll)?;
                    // A full batch means more may be queued: readiness is kept, and the other
                    // branches get their turn before the next batch.
                    if drain(guard.get_inner_mut(), &mut sink, DRAIN_BATCH) < DRAIN_BATCH {
                        guard.clear_ready();
                    }
                }
                _ = tick.tick() => report_lost(&lost, &mut reported_lost, &mut sink),
            }
        }
        // What is queued at shutdown: at most one ring buffer's worth.
        drain(fd.get_mut(), &mut sink, RING_RECORDS);
        report_lost(&lost, &mut reported_lost, &mut sink);
        if let Some(task) = log_task {
            let _ = task.await;
        }
        Ok(())
    }
}

fn sum_lost(lost: &PerCpuArray<MapData, u64>) -> Result<u64, aya::maps::MapError> {
    Ok(lost
        .get(&0, 0)?
        .iter()
        .copied()
        .fold(0u64, u64::saturating_add))
}

fn report_lost(
    lost: &PerCpuArray<MapData, u64>,
    reported: &mut u64,
    sink: &mut impl FnMut(ObserverOutput),
) {
    match sum_lost(lost) {
        Ok(now) if now > *reported => {
            sink(ObserverOutput::Lost(now - *reported));
            *reported = now;
        }
        Ok(_) => {}
        Err(e) => debug!("cannot read {MAP_TCP_EVENTS_LOST}: {e}"),
    }
}

/// Hands up to `max` queued records to `sink`; returns how many were read.
fn drain(
    events: &mut RingBuf<MapData>,
    sink: &mut impl FnMut(ObserverOutput),
    max: usize,
) -> usize {
    let mut n = 0;
    while n < max {
        let Some(item) = events.next() else { break };
        n += 1;
        match parse_event(&item) {
            Some(event) => match observation(&event) {
                Some(obs) => sink(ObserverOutput::Connection(obs)),
                None => debug!(?event, "TCP observation record with unknown values skipped"),
            },
            None => debug!(len = item.len(), "short TCP observation record skipped"),
        }
    }
    n
}

/// Copies a record out of the ring buffer (which gives no alignment guarantee).
pub fn parse_event(bytes: &[u8]) -> Option<TcpEvent> {
    if bytes.len() < std::mem::size_of::<TcpEvent>() {
        return None;
    }
    // SAFETY: the slice holds at least size_of::<TcpEvent>() bytes, TcpEvent is a repr(C) Pod
    // type for which every bit pattern is valid, and read_unaligned has no alignment need.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TcpEvent>()) })
}

/// The plain-Rust view of a kernel record (IPv4-mapped addresses as IPv4); `None` for an
/// unknown family, direction or outcome.
pub fn observation(ev: &TcpEvent) -> Option<TcpObservation> {
    let local = canonical(ev.local.to_socket_addr()?);
    let remote = canonical(ev.remote.to_socket_addr()?);
    let direction = match ev.direction {
        DIRECTION_OUTBOUND => TcpDirection::Outbound,
        DIRECTION_INBOUND => TcpDirection::Inbound,
        _ => return None,
    };
    let outcome = match ev.outcome {
        OUTCOME_OK => TcpOutcome::Ok,
        OUTCOME_REFUSED => TcpOutcome::Refused,
        OUTCOME_TIMEOUT => TcpOutcome::Timeout,
        OUTCOME_RESET => TcpOutcome::Reset,
        OUTCOME_ERROR => TcpOutcome::Error,
        _ => return None,
    };
    // A failed connect is the only record without an established connection; its connect
    // time, bytes and RTT are zero.
    let established = match outcome {
        TcpOutcome::Refused | TcpOutcome::Error => false,
        // An outbound timeout is a failed connect unless the connection had established.
        TcpOutcome::Timeout => direction == TcpDirection::Inbound || ev.connect_ns > 0,
        TcpOutcome::Ok | TcpOutcome::Reset => true,
    };
    Some(TcpObservation {
        local,
        remote,
        direction,
        outcome,
        established,
        srtt: (ev.srtt_us > 0).then(|| Duration::from_micros(u64::from(ev.srtt_us))),
        retransmits: ev.retransmits,
        bytes_sent: ev.bytes_sent,
        bytes_received: ev.bytes_received,
        duration: Duration::from_nanos(ev.duration_ns),
        connect_latency: (established && direction == TcpDirection::Outbound)
            .then(|| Duration::from_nanos(ev.connect_ns)),
    })
}

impl super::Interception {
    /// Hands out the TCP observation reader (once); spawn [`TcpObserver::run`] with it.
    pub fn take_observer(&mut self) -> Result<TcpObserver, EbpfError> {
        self.observer.take().ok_or(EbpfError::ObserverTaken)
    }

    /// Connections being observed right now (entries of `CONN_STATE`).
    pub fn observed_connections(&self) -> Result<usize, EbpfError> {
        let name = MAP_CONN_STATE;
        let map = self
            .bpf
            .map(name)
            .ok_or(EbpfError::Missing { kind: "map", name })?;
        let map: aya::maps::HashMap<_, u64, ConnState> = aya::maps::HashMap::try_from(map)
            .map_err(|source| EbpfError::Map { map: name, source })?;
        let mut n = 0;
        for key in map.keys() {
            key.map_err(|source| EbpfError::Map { map: name, source })?;
            n += 1;
        }
        Ok(n)
    }
}

/// `sidecar check` lines for the observation: the tracepoint program passes the verifier, and
/// the `tcp:tcp_receive_reset` record has `sock_cookie` where the program reads it. Nothing is
/// attached or mounted.
pub(crate) fn check(bpf: &mut Ebpf) -> Vec<(String, bool, String)> {
    let mut items = Vec::with_capacity(2);
    let label = format!("program {PROG_TCP_RESET} loads");
    let loaded = bpf
        .program_mut(PROG_TCP_RESET)
        .ok_or_else(|| format!("the object has no program {PROG_TCP_RESET}"))
        .and_then(|p| <&mut TracePoint>::try_from(p).map_err(|e| e.to_string()))
        .and_then(|tp| tp.load().map_err(|e| super::chain(&e)));
    match loaded {
        Ok(()) => items.push((
            label,
            true,
            "passed the verifier (not attached)".to_string(),
        )),
        Err(e) => items.push((label, false, e)),
    }
    let label = "tracepoint tcp:tcp_receive_reset".to_string();
    let mounted = TRACEFS_PATHS
        .iter()
        .map(Path::new)
        .find(|dir| dir.join("events").is_dir());
    match mounted {
        Some(dir) => match reset_cookie_offset(dir) {
            Ok(64) => items.push((
                label,
                true,
                format!(
                    "sock_cookie at offset 64 ({}): resets are detected",
                    dir.display()
                ),
            )),
            Ok(other) => items.push((
                label,
                false,
                format!(
                    "sock_cookie at offset {other}, the program reads 64: refused connects \
                     would be reported as `error`"
                ),
            )),
            Err(e) => items.push((label, false, e)),
        },
        None if Path::new(TRACEFS_PATHS[0]).is_dir() => items.push((
            label,
            true,
            format!(
                "tracefs not mounted; `sidecar run` mounts it at {}",
                TRACEFS_PATHS[0]
            ),
        )),
        None => items.push((
            label,
            false,
            "no tracefs and no /sys/kernel/tracing: resets would not be detected".to_string(),
        )),
    }
    items
}

/// An IPv4-mapped IPv6 address (a dual-stack socket talking IPv4) as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Loads and attaches the reset tracepoint (optional: a failure is logged and resets are then
/// not detected), and takes the maps the reader needs. Called by `Interception::attach` after
/// the object is loaded and before `sockops` is attached.
pub(super) fn prepare(bpf: &mut Ebpf) -> Result<TcpObserver, EbpfError> {
    let reset_detection_error = match attach_reset_tracepoint(bpf) {
        Ok(()) => None,
        Err(reason) => {
            warn!(
                "TCP resets are not detected ({reason}): refused connects are reported with \
                 outcome `error`"
            );
            Some(reason)
        }
    };
    let events = take_map(bpf, MAP_TCP_EVENTS)?;
    let events = RingBuf::try_from(events).map_err(|source| EbpfError::Map {
        map: MAP_TCP_EVENTS,
        source,
    })?;
    let lost = take_map(bpf, MAP_TCP_EVENTS_LOST)?;
    let lost = PerCpuArray::try_from(lost).map_err(|source| EbpfError::Map {
        map: MAP_TCP_EVENTS_LOST,
        source,
    })?;
    let log = KernelLog::take(bpf);
    Ok(TcpObserver {
        events,
        lost,
        log,
        reset_detection_error,
    })
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    bpf.take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })
}

/// Loads the tracepoint program, writes the `sock_cookie` offset and attaches it.
fn attach_reset_tracepoint(bpf: &mut Ebpf) -> Result<(), String> {
    let tracefs = tracefs().map_err(|e| format!("no tracefs: {e}"))?;
    let offset = reset_cookie_offset(&tracefs)?;
    let word = offset + 1;
    if word != RESET_COOKIE_AT_64 {
        return Err(format!(
            "sock_cookie at offset {offset} of tcp:tcp_receive_reset is not one the program reads"
        ));
    }
    {
        let map = bpf
            .map_mut(MAP_OBSERVE_CONFIG)
            .ok_or_else(|| format!("the object has no map {MAP_OBSERVE_CONFIG}"))?;
        let mut config: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(map).map_err(|e| e.to_string())?;
        config
            .set(ObserveConfigKey::ResetCookieOffset as u32, word, 0)
            .map_err(|e| e.to_string())?;
    }
    let program = bpf
        .program_mut(PROG_TCP_RESET)
        .ok_or_else(|| format!("the object has no program {PROG_TCP_RESET}"))?;
    let tp: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
    tp.load()
        .map_err(|e| format!("loading {PROG_TCP_RESET}: {}", super::chain(&e)))?;
    tp.attach(RESET_TRACEPOINT.0, RESET_TRACEPOINT.1)
        .map_err(|e| format!("attaching {PROG_TCP_RESET}: {}", super::chain(&e)))?;
    debug!(
        offset,
        "tracepoint tcp:tcp_receive_reset attached (sock_cookie offset {offset})"
    );
    Ok(())
}

/// The offset of `sock_cookie` in the `tcp:tcp_receive_reset` record, from its format file.
pub fn reset_cookie_offset(tracefs: &Path) -> Result<u64, String> {
    let path = tracefs
        .join("events")
        .join(RESET_TRACEPOINT.0)
        .join(RESET_TRACEPOINT.1)
        .join("format");
    let text =
        fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    field_offset(&text, "sock_cookie", 8).ok_or_else(|| {
        format!(
            "{} has no 8-byte sock_cookie field (kernel too old)",
            path.display()
        )
    })
}

/// The offset of field `name` of size `size` in a tracepoint `format` text.
fn field_offset(format: &str, name: &str, size: u64) -> Option<u64> {
    format.lines().find_map(|line| {
        let mut decl = None;
        let mut offset = None;
        let mut field_size = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.trim().parse::<u64>().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                field_size = s.trim().parse::<u64>().ok();
            }
        }
        let ident = decl?.rsplit([' ', '*']).next()?;
        (ident == name && field_size == Some(size)).then_some(offset?)
    })
}

/// The tracefs mount, mounting it at `/sys/kernel/tracing` when nothing is mounted there
/// (a container usually has no tracefs; the kernel offers the empty directory for it).
pub fn tracefs() -> io::Result<PathBuf> {
    for dir in TRACEFS_PATHS {
        let events = Path::new(dir).join("events");
        if events.is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    let target = Path::new(TRACEFS_PATHS[0]);
    if !target.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} does not exist", target.display()),
        ));
    }
    let source = CString::new("tracefs").map_err(io::Error::other)?;
    let dir = CString::new(TRACEFS_PATHS[0]).map_err(io::Error::other)?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; no data
    // argument is passed.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            dir.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    info!("mounted tracefs at {}", target.display());
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use sidecar_common::SockAddr;

    use super::*;

    const FORMAT: &str = "name: tcp_receive_reset
ID: 2279
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 sport;\toffset:16;\tsize:2;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:46;\tsize:16;\tsigned:0;
\tfield:__u64 sock_cookie;\toffset:64;\tsize:8;\tsigned:0;

print fmt: \"sock_cookie=%llx\", REC->sock_cookie
";

    #[test]
    fn finds_field_offsets_in_a_tracepoint_format() {
        assert_eq!(field_offset(FORMAT, "sock_cookie", 8), Some(64));
        assert_eq!(field_offset(FORMAT, "skaddr", 8), Some(8));
        assert_eq!(field_offset(FORMAT, "sport", 2), Some(16));
        // Wrong size or absent field: no answer rather than a wrong read.
        assert_eq!(field_offset(FORMAT, "sock_cookie", 4), None);
        assert_eq!(field_offset(FORMAT, "family", 2), None);
        assert_eq!(field_offset("", "sock_cookie", 8), None);
    }

    fn event(direction: u32, outcome: u32) -> TcpEvent {
        TcpEvent {
            local: SockAddr::from_socket_addr("198.18.0.1:40000".parse().unwrap()),
            remote: SockAddr::from_socket_addr("[fd5e:1dec::2]:8080".parse().unwrap()),
            cookie: 7,
            duration_ns: 2_000_000_000,
            connect_ns: 21_000_000,
            bytes_sent: 100,
            bytes_received: 30,
            srtt_us: 20_123,
            retransmits: 2,
            direction,
            outcome,
        }
    }

    #[test]
    fn records_become_observations() {
        let obs = observation(&event(DIRECTION_OUTBOUND, OUTCOME_OK)).unwrap();
        assert_eq!(obs.local, "198.18.0.1:40000".parse().unwrap());
        assert_eq!(obs.remote, "[fd5e:1dec::2]:8080".parse().unwrap());
        assert_eq!(obs.direction, TcpDirection::Outbound);
        assert_eq!(obs.outcome, TcpOutcome::Ok);
        assert!(obs.established);
        assert_eq!(obs.srtt, Some(Duration::from_micros(20_123)));
        assert_eq!(obs.retransmits, 2);
        assert_eq!((obs.bytes_sent, obs.bytes_received), (100, 30));
        assert_eq!(obs.duration, Duration::from_secs(2));
        assert_eq!(obs.connect_latency, Some(Duration::from_millis(21)));

        let mapped = TcpEvent {
            local: SockAddr::from_socket_addr("[::ffff:198.18.0.1]:8080".parse().unwrap()),
            ..event(DIRECTION_INBOUND, OUTCOME_OK)
        };
        assert_eq!(
            observation(&mapped).unwrap().local,
            "198.18.0.1:8080".parse().unwrap()
        );

        let inbound = observation(&event(DIRECTION_INBOUND, OUTCOME_RESET)).unwrap();
        assert_eq!(inbound.outcome, TcpOutcome::Reset);
        assert!(inbound.established);
        assert_eq!(inbound.connect_latency, None);

        let refused = TcpEvent {
            connect_ns: 0,
            srtt_us: 0,
            ..event(DIRECTION_OUTBOUND, OUTCOME_REFUSED)
        };
        let refused = observation(&refused).unwrap();
        assert!(!refused.established);
        assert_eq!(refused.srtt, None);
        assert_eq!(refused.connect_latency, None);

        let syn_timeout = TcpEvent {
            connect_ns: 0,
            ..event(DIRECTION_OUTBOUND, OUTCOME_TIMEOUT)
        };
        assert!(!observation(&syn_timeout).unwrap().established);
        assert!(
            observation(&event(DIRECTION_OUTBOUND, OUTCOME_TIMEOUT))
                .unwrap()
                .established
        );
    }

    #[test]
    fn unknown_values_and_short_records_are_skipped() {
        assert_eq!(observation(&event(9, OUTCOME_OK)), None);
        assert_eq!(observation(&event(DIRECTION_OUTBOUND, 42)), None);
        let mut bad_family = event(DIRECTION_OUTBOUND, OUTCOME_OK);
        bad_family.local.family = 1;
        assert_eq!(observation(&bad_family), None);

        let ev = event(DIRECTION_INBOUND, OUTCOME_OK);
        // SAFETY (test): TcpEvent is plain old data; view it as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const TcpEvent).cast::<u8>(),
                std::mem::size_of::<TcpEvent>(),
            )
        };
        assert_eq!(parse_event(bytes), Some(ev));
        // Unaligned copies work too.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        assert_eq!(parse_event(&shifted[1..]), Some(ev));
        assert_eq!(parse_event(&bytes[..bytes.len() - 1]), None);
    }
}
