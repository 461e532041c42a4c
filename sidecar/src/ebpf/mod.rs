//! Owns the eBPF interception programs at run time: loads the embedded object, writes its
//! configuration, attaches the programs to the pod's and the sidecar's cgroups through links,
//! reads map statistics, and detaches everything when dropped.
//!
//! Attachment plan of the default redirect mode, [`RedirectMode::Ebpf`] (all in multi-attach
//! mode, so other programs keep running; see [`attach_mode`]). The other modes attach only
//! `sc_sockops` and the reset tracepoint: see [`RedirectMode::attach_plan`].
//!
//! | program         | hook                | cgroup           |
//! |-----------------|---------------------|------------------|
//! | `sc_getsockopt` | `cgroup/getsockopt` | sidecar's own    |
//! | `sc_sockops`    | `sockops`           | target (pod/app) |
//! | `sc_connect4`   | `cgroup/connect4`   | target (pod/app) |
//! | `sc_connect6`   | `cgroup/connect6`   | target (pod/app) |
//! | `sc_sk_lookup`  | `sk_lookup`         | (the caller's network namespace, by [`inbound`]) |
//! | `sc_tcp_receive_reset` | tracepoint `tcp/tcp_receive_reset` | (system-wide, by [`observe`]; optional) |
//!
//! TCP observation (per-connection RTT, retransmits, bytes, outcome from `sockops`, read from
//! a ring buffer) is set up by [`observe`]; the programs' aya-log lines are bridged by [`log`].
//!
//! The interception policy (exclusions, include list, inbound ports) lives in maps written by
//! [`policy`]; inbound steering is attached by [`inbound`].
//!
//! The links are owned by this process (bpf_link on kernels >= 5.7): they vanish when the
//! [`Interception`] is dropped or the process exits, and nothing is pinned.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapError},
    programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use sidecar_common::{ConfigKey, SockAddr, DEFAULT_PAGE_SIZE};
use tracing::{debug, info, warn};

pub mod inbound;
pub mod log;
pub mod observe;
pub mod policy;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded by `build.rs` (empty when the
/// binary was built before the object existed).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sidecar-ebpf.o"));

/// Name of the `cgroup/connect4` program in the object.
pub const PROG_CONNECT4: &str = "sc_connect4";
/// Name of the `cgroup/connect6` program in the object.
pub const PROG_CONNECT6: &str = "sc_connect6";
/// Name of the `sockops` program in the object.
pub const PROG_SOCKOPS: &str = "sc_sockops";
/// Name of the `cgroup/getsockopt` program in the object.
pub const PROG_GETSOCKOPT: &str = "sc_getsockopt";
/// Every program of the object, in load order.
pub const PROGRAMS: [&str; 4] = [PROG_GETSOCKOPT, PROG_SOCKOPS, PROG_CONNECT4, PROG_CONNECT6];

/// Name of the configuration array map.
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the cookie → original destination map.
pub const MAP_ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
/// Name of the application local address → original destination map.
pub const MAP_ORIG_DST_BY_PEER: &str = "ORIG_DST_BY_PEER";

/// How connections reach the proxy: which programs [`Interception::attach_with_mode`]
/// attaches, and where the proxy learns a connection's original destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RedirectMode {
    /// The eBPF programs redirect: `cgroup/connect4|6` outbound, `sk_lookup` inbound,
    /// `cgroup/getsockopt` answers `SO_ORIGINAL_DST`.
    #[default]
    Ebpf,
    /// The user's iptables/nftables rules (`REDIRECT`) send the traffic to the proxy; the
    /// original destination comes from conntrack. Only the observation programs attach.
    Iptables,
    /// No redirection at all: only the observation programs attach.
    Off,
}

/// Where a program of an attach plan is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The sidecar's own cgroup.
    SidecarCgroup,
    /// The target (pod/app) cgroup.
    TargetCgroup,
    /// The network namespace of the caller (by [`Interception::attach_inbound`]).
    Netns,
}

/// The attach plan of [`RedirectMode::Ebpf`], in attach order: answers first, bookkeeping
/// next, redirection last, inbound steering once the listeners are known.
const PLAN_EBPF: &[(&str, Hook)] = &[
    (PROG_GETSOCKOPT, Hook::SidecarCgroup),
    (PROG_SOCKOPS, Hook::TargetCgroup),
    (PROG_CONNECT4, Hook::TargetCgroup),
    (PROG_CONNECT6, Hook::TargetCgroup),
    (inbound::PROG_SK_LOOKUP, Hook::Netns),
];

/// The attach plan of the modes that do not redirect: observation only.
const PLAN_OBSERVE: &[(&str, Hook)] = &[(PROG_SOCKOPS, Hook::TargetCgroup)];

impl RedirectMode {
    /// The mode's name as the flag takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
            Self::Off => "off",
        }
    }

    /// The programs this mode attaches and where, in attach order. The optional reset
    /// tracepoint of the TCP observation (system-wide) comes with every mode and is not
    /// listed.
    pub fn attach_plan(self) -> &'static [(&'static str, Hook)] {
        match self {
            Self::Ebpf => PLAN_EBPF,
            Self::Iptables | Self::Off => PLAN_OBSERVE,
        }
    }

    /// Whether the mode attaches `program` (a `PROG_*` name).
    pub fn attaches(self, program: &str) -> bool {
        self.attach_plan().iter().any(|(p, _)| *p == program)
    }

    /// Whether the eBPF programs redirect connections in this mode (so the interception
    /// policy maps and inbound steering are used).
    pub fn redirects_in_kernel(self) -> bool {
        self.attaches(PROG_CONNECT4)
    }

    /// Whether inbound connections are steered by `sk_lookup` in this mode.
    pub fn steers_inbound(self) -> bool {
        self.attaches(inbound::PROG_SK_LOOKUP)
    }
}

impl std::fmt::Display for RedirectMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `statfs` magic of a cgroup v2 filesystem (`CGROUP2_SUPER_MAGIC`).
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Errors of loading, attaching and reading the interception programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The binary embeds an empty placeholder instead of the eBPF object.
    #[error(
        "this sidecar binary was built without its eBPF object; build it with `cargo xtask build`"
    )]
    MissingObject,
    /// A cgroup path could not be inspected (usually: it does not exist).
    #[error("cgroup {}: {source}", path.display())]
    CgroupPath {
        /// The path given.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },
    /// A cgroup path exists but is not a directory.
    #[error("cgroup {} is not a directory", path.display())]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// A cgroup path is not on a cgroup v2 filesystem.
    #[error(
        "{} is not on a cgroup v2 filesystem (statfs magic {magic:#x}, expected {:#x}); \
         pass a directory under the cgroup2 mount (see `grep cgroup2 /proc/mounts`)",
        path.display(),
        CGROUP2_SUPER_MAGIC
    )]
    NotCgroup2 {
        /// The path given.
        path: PathBuf,
        /// The filesystem magic found.
        magic: u64,
    },
    /// The sidecar's cgroup is the target cgroup.
    #[error(
        "the sidecar cgroup {} is the target cgroup itself: the sidecar must run in its own \
         cgroup (e.g. a sibling or a child of the application's cgroup), or its own connections \
         could not be told apart from the application's and would be redirected to itself",
        path.display()
    )]
    SameCgroup {
        /// The cgroup both point to.
        path: PathBuf,
    },
    /// No cgroup v2 filesystem is mounted.
    #[error("no cgroup v2 filesystem is mounted (none listed in /proc/mounts)")]
    NoCgroup2Mount,
    /// This process's own cgroup could not be determined.
    #[error("cannot determine this process's cgroup v2 from /proc/self/cgroup: {0}")]
    OwnCgroup(String),
    /// The kernel refused a bpf() operation for lack of privilege.
    #[error(
        "{what}: permission denied (running as uid {uid}); the sidecar needs root, or \
         CAP_BPF + CAP_NET_ADMIN (CAP_SYS_ADMIN on kernels before 5.8): {detail}"
    )]
    PermissionDenied {
        /// The operation refused.
        what: String,
        /// Effective uid of this process.
        uid: u32,
        /// The underlying error.
        detail: String,
    },
    /// The object could not be parsed or its maps created.
    #[error("cannot load the eBPF object: {}", chain(.0))]
    Object(#[source] aya::EbpfError),
    /// The object lacks a program or map this module expects.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The verifier rejected a program.
    #[error(
        "the kernel rejected eBPF program {program} ({io_error}); verifier log:\n{verifier_log}"
    )]
    Verifier {
        /// Program name.
        program: &'static str,
        /// The bpf(BPF_PROG_LOAD) error.
        io_error: io::Error,
        /// The verifier's log.
        verifier_log: String,
    },
    /// Any other program error (wrong type, load syscall).
    #[error("eBPF program {program}: {}", chain(source))]
    Program {
        /// Program name.
        program: &'static str,
        /// The error.
        #[source]
        source: ProgramError,
    },
    /// Attaching a program to a cgroup failed.
    #[error(
        "cannot attach eBPF program {program} to cgroup {}: {}",
        cgroup.display(),
        chain(source)
    )]
    Attach {
        /// Program name.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The error.
        #[source]
        source: ProgramError,
    },
    /// A policy has more entries than a kernel map holds; nothing was changed.
    #[error("policy too large for eBPF map {map}: {len} entries, at most {max}")]
    PolicyTooLarge {
        /// Map name.
        map: &'static str,
        /// Entries asked for.
        len: usize,
        /// The map's bound.
        max: u32,
    },
    /// A socket given as inbound listener cannot be used.
    #[error("inbound listener: {reason}")]
    InboundListener {
        /// What is wrong with it.
        reason: String,
    },
    /// The network namespace to attach to could not be opened.
    #[error("network namespace {}: {source}", path.display())]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },
    /// Attaching a program to a network namespace failed.
    #[error(
        "cannot attach eBPF program {program} to the network namespace: {}",
        chain(source)
    )]
    AttachNetns {
        /// Program name.
        program: &'static str,
        /// The error.
        #[source]
        source: ProgramError,
    },
    /// The TCP observation reader was already taken.
    #[error("the TCP observation reader was already taken")]
    ObserverTaken,
    /// Reading or writing a map failed.
    #[error("eBPF map {map}: {}", chain(source))]
    Map {
        /// Map name.
        map: &'static str,
        /// The error.
        #[source]
        source: MapError,
    },
}

/// What to intercept.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    /// cgroup v2 directory of the pod/app whose outbound TCP connections are redirected.
    pub target_cgroup: PathBuf,
    /// cgroup v2 directory the proxy process runs in (its connections are never redirected and
    /// its `getsockopt(SO_ORIGINAL_DST)` calls are answered). Default: this process's own.
    pub sidecar_cgroup: Option<PathBuf>,
    /// Port of the proxy's outbound listeners on 127.0.0.1 and ::1. 0 disables redirection.
    pub outbound_port: u16,
}

/// The attached interception programs; dropping it detaches them.
pub struct Interception {
    bpf: Ebpf,
    target_cgroup: PathBuf,
    sidecar_cgroup: PathBuf,
    /// Policy maps, written from `&self` by [`Interception::apply_policy`].
    policy: policy::SharedPolicyMaps,
    /// Inbound steering, once [`Interception::attach_inbound`] ran.
    inbound: Option<inbound::Inbound>,
    /// The TCP observation reader until [`Interception::take_observer`] hands it out.
    observer: Option<observe::TcpObserver>,
    /// Which programs were attached.
    mode: RedirectMode,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("target_cgroup", &self.target_cgroup)
            .field("sidecar_cgroup", &self.sidecar_cgroup)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Interception {
    /// Validates the cgroups, loads the programs, writes their configuration and attaches
    /// them ([`RedirectMode::Ebpf`]). On error nothing stays attached.
    pub fn attach(cfg: &InterceptConfig) -> Result<Self, EbpfError> {
        Self::attach_with_mode(cfg, RedirectMode::Ebpf)
    }

    /// Like [`Interception::attach`], attaching the cgroup programs of `mode`'s
    /// [`attach plan`](RedirectMode::attach_plan) only (the `sk_lookup` program of the plan is
    /// attached later by [`Interception::attach_inbound`]). The TCP observation (ring buffer,
    /// reset tracepoint) is set up in every mode.
    pub fn attach_with_mode(cfg: &InterceptConfig, mode: RedirectMode) -> Result<Self, EbpfError> {
        check_cgroup_dir(&cfg.target_cgroup)?;
        let sidecar_cgroup = match &cfg.sidecar_cgroup {
            Some(dir) => dir.clone(),
            None => own_cgroup()?,
        };
        check_cgroup_dir(&sidecar_cgroup)?;
        let target_id = cgroup_id(&cfg.target_cgroup)?;
        let sidecar_id = cgroup_id(&sidecar_cgroup)?;
        if target_id == sidecar_id {
            return Err(EbpfError::SameCgroup {
                path: cfg.target_cgroup.clone(),
            });
        }
        if cfg.outbound_port == 0 && mode.redirects_in_kernel() {
            warn!("outbound port 0: the programs are attached but redirect nothing");
        }
        let cgroup_programs: Vec<(&'static str, Hook)> = mode
            .attach_plan()
            .iter()
            .copied()
            .filter(|(_, hook)| *hook != Hook::Netns)
            .collect();

        let mut bpf = load_object()?;
        write_config(&mut bpf, cfg.outbound_port, sidecar_id)?;
        for program in PROGRAMS {
            if cgroup_programs.iter().any(|(p, _)| *p == program) {
                load_program(&mut bpf, program)?;
            }
        }
        // TCP observation: reset tracepoint and ring buffer, ready before sockops runs.
        let observer = observe::prepare(&mut bpf)?;
        // Policy maps, empty until `apply_policy`: an empty policy redirects everything.
        let policy = policy::PolicyMaps::take(&mut bpf)?;

        let target = open_cgroup(&cfg.target_cgroup)?;
        let sidecar = open_cgroup(&sidecar_cgroup)?;
        // In plan order: answers first, bookkeeping next, redirection last, so a connection
        // is only redirected once everything that serves it is in place. On error `bpf` is
        // dropped, which detaches whatever was attached already.
        for (program, hook) in cgroup_programs {
            let (fd, path) = match hook {
                Hook::SidecarCgroup => (&sidecar, sidecar_cgroup.as_path()),
                _ => (&target, cfg.target_cgroup.as_path()),
            };
            attach_one(&mut bpf, program, fd, path)?;
        }
        info!(
            target_cgroup = %cfg.target_cgroup.display(),
            sidecar_cgroup = %sidecar_cgroup.display(),
            outbound_port = cfg.outbound_port,
            redirect = %mode,
            "eBPF interception attached"
        );
        Ok(Self {
            bpf,
            target_cgroup: cfg.target_cgroup.clone(),
            sidecar_cgroup,
            policy: std::sync::Mutex::new(policy),
            inbound: None,
            observer: Some(observer),
            mode,
        })
    }

    /// The redirect mode the programs were attached for.
    pub fn mode(&self) -> RedirectMode {
        self.mode
    }

    /// Detaches every program now (dropping the value does the same).
    pub fn detach(self) {
        drop(self);
    }

    /// The target (pod/app) cgroup the connect and sockops programs are attached to.
    pub fn target_cgroup(&self) -> &Path {
        &self.target_cgroup
    }

    /// The sidecar cgroup the getsockopt program is attached to.
    pub fn sidecar_cgroup(&self) -> &Path {
        &self.sidecar_cgroup
    }

    /// Number of entries in (`ORIG_DST_BY_COOKIE`, `ORIG_DST_BY_PEER`): connects redirected
    /// but not yet established, and established redirected connections not yet closed.
    pub fn orig_dst_entries(&self) -> Result<(usize, usize), EbpfError> {
        Ok((
            self.count::<u64>(MAP_ORIG_DST_BY_COOKIE)?,
            self.count::<SockAddr>(MAP_ORIG_DST_BY_PEER)?,
        ))
    }

    /// Fill of the maps whose entry count grows with traffic: (map name, entries, capacity)
    /// for `ORIG_DST_BY_COOKIE`, `ORIG_DST_BY_PEER` and `CONN_STATE` (LRU hashes: when full,
    /// the kernel evicts the least recently used entry, so a ratio near 1 means connections
    /// may lose their original destination or observation state). A map that cannot be read
    /// is left out (logged at debug). Read-only; walks every key, so call it at collection
    /// time, not per request.
    ///
    /// The policy maps are not listed: their handles live in [`policy`] and a policy larger
    /// than a map is refused before anything is written.
    pub fn map_fill(&self) -> Vec<(String, usize, usize)> {
        use sidecar_common::observe::{ConnState, CONN_STATE_ENTRIES};
        use sidecar_common::{ORIG_DST_BY_COOKIE_ENTRIES, ORIG_DST_BY_PEER_ENTRIES};

        let maps = [
            (
                MAP_ORIG_DST_BY_COOKIE,
                self.count_entries::<u64, SockAddr>(MAP_ORIG_DST_BY_COOKIE),
                ORIG_DST_BY_COOKIE_ENTRIES,
            ),
            (
                MAP_ORIG_DST_BY_PEER,
                self.count_entries::<SockAddr, SockAddr>(MAP_ORIG_DST_BY_PEER),
                ORIG_DST_BY_PEER_ENTRIES,
            ),
            (
                observe::MAP_CONN_STATE,
                self.count_entries::<u64, ConnState>(observe::MAP_CONN_STATE),
                CONN_STATE_ENTRIES,
            ),
        ];
        maps.into_iter()
            .filter_map(|(name, entries, capacity)| match entries {
                Ok(n) => Some((name.to_string(), n, capacity as usize)),
                Err(e) => {
                    debug!(map = name, error = %e, "cannot count map entries");
                    None
                }
            })
            .collect()
    }

    /// Number of keys in the hash map `name` (key `K`, value `V`).
    fn count_entries<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<usize, EbpfError> {
        let map = self
            .bpf
            .map(name)
            .ok_or(EbpfError::Missing { kind: "map", name })?;
        let map: HashMap<_, K, V> =
            HashMap::try_from(map).map_err(|source| EbpfError::Map { map: name, source })?;
        let mut n = 0;
        for key in map.keys() {
            key.map_err(|source| EbpfError::Map { map: name, source })?;
            n += 1;
        }
        Ok(n)
    }

    fn count<K: aya::Pod>(&self, name: &'static str) -> Result<usize, EbpfError> {
        self.count_entries::<K, SockAddr>(name)
    }
}

impl Drop for Interception {
    fn drop(&mut self) {
        // The links are closed when `self.bpf` is dropped right after this.
        info!(
            target_cgroup = %self.target_cgroup.display(),
            "detaching eBPF interception"
        );
    }
}

/// Parses the embedded object and creates its maps (programs are not loaded yet).
pub(crate) fn load_object() -> Result<Ebpf, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::MissingObject);
    }
    EbpfLoader::new().load(OBJECT).map_err(|e| {
        if is_permission_error(&e) {
            permission_denied("loading the eBPF object (creating its maps)", &e)
        } else {
            EbpfError::Object(e)
        }
    })
}

/// Loads one program of the object into the kernel (runs the verifier; does not attach).
pub(crate) fn load_program(bpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfError> {
    let program = bpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    let result = match name {
        PROG_SOCKOPS => <&mut SockOps>::try_from(program).and_then(|p| p.load()),
        PROG_GETSOCKOPT => <&mut CgroupSockopt>::try_from(program).and_then(|p| p.load()),
        _ => <&mut CgroupSockAddr>::try_from(program).and_then(|p| p.load()),
    };
    result.map_err(|e| program_error(name, e))
}

fn program_error(program: &'static str, e: ProgramError) -> EbpfError {
    match e {
        // The verifier reports a rejected program as EACCES (or EINVAL) with its log; only an
        // EPERM, or an EACCES without any verifier output, is about privileges.
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let denied = match io_error.raw_os_error() {
                Some(libc::EPERM) => true,
                Some(libc::EACCES) => log.trim().is_empty(),
                _ => false,
            };
            if denied {
                let what = format!("loading eBPF program {program}");
                return permission_denied(&what, &io_error);
            }
            EbpfError::Verifier {
                program,
                io_error,
                verifier_log: log,
            }
        }
        source if is_permission_error(&source) => {
            permission_denied(&format!("loading eBPF program {program}"), &source)
        }
        source => EbpfError::Program { program, source },
    }
}

fn attach_one(
    bpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    cgroup_path: &Path,
) -> Result<(), EbpfError> {
    let program = bpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    let mode = attach_mode();
    let result =
        match name {
            PROG_SOCKOPS => {
                <&mut SockOps>::try_from(program).and_then(|p| p.attach(cgroup, mode).map(drop))
            }
            PROG_GETSOCKOPT => <&mut CgroupSockopt>::try_from(program)
                .and_then(|p| p.attach(cgroup, mode).map(drop)),
            _ => <&mut CgroupSockAddr>::try_from(program)
                .and_then(|p| p.attach(cgroup, mode).map(drop)),
        };
    result.map_err(|source| {
        if is_permission_error(&source) {
            permission_denied(
                &format!("attaching {name} to {}", cgroup_path.display()),
                &source,
            )
        } else {
            EbpfError::Attach {
                program: name,
                cgroup: cgroup_path.to_path_buf(),
                source,
            }
        }
    })?;
    debug!(program = name, cgroup = %cgroup_path.display(), "attached");
    Ok(())
}

/// The attach mode that coexists with other programs on the cgroup.
///
/// aya 0.14 attaches through `bpf_link` on kernels >= 5.7 and passes the mode as link flags,
/// which the kernel rejects with `EINVAL` unless they are 0 (aya-rs/aya#1078); cgroup links
/// are always in multi-attach mode anyway. Older kernels get `BPF_PROG_ATTACH` with
/// `BPF_F_ALLOW_MULTI`. The version test mirrors the one aya makes.
fn attach_mode() -> CgroupAttachMode {
    match KernelVersion::current() {
        Ok(v) if v >= KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

fn write_config(bpf: &mut Ebpf, outbound_port: u16, sidecar_id: u64) -> Result<(), EbpfError> {
    let name = MAP_CONFIG;
    let map = bpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let mut config: Array<_, u64> =
        Array::try_from(map).map_err(|source| EbpfError::Map { map: name, source })?;
    let words = [
        (ConfigKey::OutboundPort, u64::from(outbound_port)),
        (ConfigKey::SidecarCgroupId, sidecar_id),
        (ConfigKey::PageSize, page_size()),
    ];
    for (key, value) in words {
        config
            .set(key as u32, value, 0)
            .map_err(|source| EbpfError::Map { map: name, source })?;
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system; no memory is passed.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(DEFAULT_PAGE_SIZE)
}

fn open_cgroup(dir: &Path) -> Result<fs::File, EbpfError> {
    fs::File::open(dir).map_err(|source| EbpfError::CgroupPath {
        path: dir.to_path_buf(),
        source,
    })
}

/// Checks that `dir` exists, is a directory and lies on a cgroup v2 filesystem.
pub fn check_cgroup_dir(dir: &Path) -> Result<(), EbpfError> {
    let meta = fs::metadata(dir).map_err(|source| EbpfError::CgroupPath {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(EbpfError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let magic = fs_magic(dir).map_err(|source| EbpfError::CgroupPath {
        path: dir.to_path_buf(),
        source,
    })?;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(EbpfError::NotCgroup2 {
            path: dir.to_path_buf(),
            magic,
        });
    }
    Ok(())
}

/// The `f_type` magic of the filesystem holding `path`.
fn fs_magic(path: &Path) -> io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c_path` is a NUL-terminated string and `buf` a writable statfs buffer that the
    // call fills in; it is read only after the call reports success.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so the buffer is initialised.
    let stat = unsafe { buf.assume_init() };
    // f_type's C type differs between architectures; the magic fits in 32 bits.
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_type as u64 & 0xffff_ffff)
}

/// The mount point of the cgroup v2 filesystem, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| EbpfError::CgroupPath {
        path: PathBuf::from("/proc/mounts"),
        source,
    })?;
    parse_cgroup2_mount(&mounts).ok_or(EbpfError::NoCgroup2Mount)
}

/// This process's cgroup v2 directory (absolute path inside the cgroup2 mount).
pub fn own_cgroup() -> Result<PathBuf, EbpfError> {
    let text =
        fs::read_to_string("/proc/self/cgroup").map_err(|e| EbpfError::OwnCgroup(e.to_string()))?;
    let relative = parse_own_cgroup(&text).ok_or_else(|| {
        EbpfError::OwnCgroup("no cgroup v2 entry (a line starting with \"0::\")".to_string())
    })?;
    Ok(cgroup2_mount()?.join(relative.trim_start_matches('/')))
}

/// The cgroup v2 id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for tasks in it.
pub fn cgroup_id(dir: &Path) -> Result<u64, EbpfError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| EbpfError::CgroupPath {
            path: dir.to_path_buf(),
            source,
        })
}

/// First `cgroup2` mount point in a `/proc/mounts` text (octal escapes decoded).
fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// Decodes the `\ooo` octal escapes /proc/mounts uses for spaces, tabs, newlines, backslashes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path (`0::<path>` line) of a `/proc/<pid>/cgroup` text.
fn parse_own_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// Whether an error chain contains `EPERM` or `EACCES` from the kernel.
pub(crate) fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// An error and all its sources, `: `-separated (aya's errors keep the errno in a source).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        // Transparent wrappers repeat their source's text; say it once.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

fn permission_denied(what: &str, err: &(dyn std::error::Error + 'static)) -> EbpfError {
    EbpfError::PermissionDenied {
        what: what.to_string(),
        // SAFETY: geteuid has no preconditions and cannot fail.
        uid: unsafe { libc::geteuid() },
        detail: chain(err),
    }
}

/// Whether the binary embeds a (non-empty) eBPF object.
pub fn object_is_embedded() -> bool {
    !OBJECT.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_others() {
        let mounts = "\
sysfs /sys sysfs rw,nosuid 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0
cgroup2 /elsewhere cgroup2 rw 0 0
";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn decodes_octal_escapes_in_mount_points() {
        let mounts = "none /mnt/my\\040cgroups\\134x cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/mnt/my cgroups\\x"))
        );
        // A backslash not followed by three octal digits is kept as is.
        assert_eq!(unescape_mount_field("a\\9b\\"), "a\\9b\\");
    }

    #[test]
    fn reads_the_v2_line_of_proc_self_cgroup() {
        let hybrid = "12:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice\n0::/pods/app\n";
        assert_eq!(parse_own_cgroup(hybrid), Some("/pods/app"));
        assert_eq!(parse_own_cgroup("0::/\n"), Some("/"));
        assert_eq!(parse_own_cgroup("3:memory:/x\n"), None);
    }

    #[test]
    fn rejects_missing_file_and_non_cgroup_paths() {
        let missing = Path::new("/nonexistent/sidecar-test-cgroup");
        assert!(matches!(
            check_cgroup_dir(missing),
            Err(EbpfError::CgroupPath { .. })
        ));

        let file = std::env::temp_dir().join(format!("sidecar-ebpf-test-{}", std::process::id()));
        fs::write(&file, b"x").unwrap();
        let not_dir = check_cgroup_dir(&file);
        fs::remove_file(&file).unwrap();
        assert!(matches!(not_dir, Err(EbpfError::NotADirectory { .. })));

        // /proc is procfs, never cgroup2.
        match check_cgroup_dir(Path::new("/proc")) {
            Err(EbpfError::NotCgroup2 { magic, .. }) => assert_ne!(magic, CGROUP2_SUPER_MAGIC),
            other => panic!("expected NotCgroup2, got {other:?}"),
        }
    }

    #[test]
    fn cgroup_id_is_the_inode_number() {
        let dir = std::env::temp_dir();
        let expected = fs::metadata(&dir).unwrap().ino();
        assert_eq!(cgroup_id(&dir).unwrap(), expected);
    }

    #[test]
    fn recognises_permission_errors_anywhere_in_a_chain() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let wrapped = MapError::CreateError {
            name: "CONFIG".into(),
            io_error: eperm,
        };
        assert!(is_permission_error(&wrapped));
        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        assert!(!is_permission_error(&einval));
        let denied = permission_denied("loading", &wrapped);
        let text = denied.to_string();
        assert!(text.contains("permission denied"), "{text}");
        assert!(text.contains("CAP_BPF"), "{text}");
    }

    #[test]
    fn attach_plan_per_redirect_mode() {
        let names = |m: RedirectMode| -> Vec<&str> {
            m.attach_plan().iter().map(|(p, _)| *p).collect::<Vec<_>>()
        };
        // Today's behaviour: every program, answers before redirection.
        assert_eq!(
            names(RedirectMode::Ebpf),
            [
                PROG_GETSOCKOPT,
                PROG_SOCKOPS,
                PROG_CONNECT4,
                PROG_CONNECT6,
                inbound::PROG_SK_LOOKUP
            ]
        );
        assert_eq!(
            RedirectMode::Ebpf.attach_plan()[0],
            (PROG_GETSOCKOPT, Hook::SidecarCgroup)
        );
        assert!(RedirectMode::Ebpf
            .attach_plan()
            .iter()
            .all(|(p, h)| (*p == PROG_GETSOCKOPT) == (*h == Hook::SidecarCgroup)));
        assert!(RedirectMode::Ebpf.redirects_in_kernel());
        assert!(RedirectMode::Ebpf.steers_inbound());
        // Observation only: sockops on the target, nothing that redirects or answers.
        for mode in [RedirectMode::Iptables, RedirectMode::Off] {
            assert_eq!(
                mode.attach_plan(),
                [(PROG_SOCKOPS, Hook::TargetCgroup)],
                "{mode}"
            );
            for p in [
                PROG_CONNECT4,
                PROG_CONNECT6,
                PROG_GETSOCKOPT,
                inbound::PROG_SK_LOOKUP,
            ] {
                assert!(!mode.attaches(p), "{mode} attaches {p}");
            }
            assert!(!mode.redirects_in_kernel());
            assert!(!mode.steers_inbound());
        }
        // Every planned cgroup program is one the object has and `attach` loads.
        for mode in [
            RedirectMode::Ebpf,
            RedirectMode::Iptables,
            RedirectMode::Off,
        ] {
            for (p, hook) in mode.attach_plan() {
                assert!(
                    PROGRAMS.contains(p) || *hook == Hook::Netns,
                    "{mode}: {p} is not a cgroup program"
                );
            }
        }
        assert_eq!(RedirectMode::default(), RedirectMode::Ebpf);
        assert_eq!(RedirectMode::Iptables.to_string(), "iptables");
    }

    #[test]
    fn missing_object_error_says_how_to_build() {
        let text = EbpfError::MissingObject.to_string();
        assert!(text.contains("cargo xtask build"), "{text}");
    }

    #[test]
    fn same_cgroup_error_explains_why() {
        let text = EbpfError::SameCgroup {
            path: PathBuf::from("/sys/fs/cgroup/pod"),
        }
        .to_string();
        assert!(text.contains("its own cgroup"), "{text}");
    }
}
