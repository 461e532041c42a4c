//! Discovery from the running system: the TCP ports the pod serves (listening sockets of this
//! network namespace, from `/proc/net/tcp{,6}`) and the pod's cgroup (the parent of the
//! sidecar container's own cgroup, also found from a private cgroup namespace).

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};

use tracing::debug;

/// Where this process's network-namespace view of `/proc/net` lives.
pub const PROC_NET: &str = "/proc/self/net";

/// `st` value of a listening socket in `/proc/net/tcp` (`TCP_LISTEN`).
const TCP_LISTEN: &str = "0A";

/// Deepest cgroup level searched below `--host-cgroup-root` (Kubernetes pods sit at depth 3-5).
pub const MAX_SEARCH_DEPTH: usize = 16;
/// Most directories visited while searching for the sidecar's cgroup.
pub const MAX_SEARCH_DIRS: usize = 200_000;

/// Errors of discovery. Messages say what the container needs.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/cgroup` has no cgroup v2 line.
    #[error(
        "/proc/self/cgroup has no cgroup v2 entry (a line starting with `0::`): the node must \
         run the unified cgroup v2 hierarchy to find the pod's cgroup; otherwise pass --cgroup"
    )]
    NoCgroupV2,
    /// No cgroup2 mount shows the sidecar's own cgroup, and probing its id failed.
    #[error(
        "this container's cgroup ({rel}, as /proc/self/cgroup names it) is not visible through any \
         cgroup2 mount (cgroup2 mounts seen: {mounts}), and mounting a private cgroup2 view to \
         read its id failed ({probe}): the container needs its own cgroup2 filesystem mounted \
         (container runtimes mount it at /sys/fs/cgroup; mount the host's cgroup tree elsewhere \
         and pass --host-cgroup-root) or CAP_SYS_ADMIN with mounts allowed; or pass --cgroup"
    )]
    OwnCgroupNotVisible {
        /// The cgroup path from `/proc/self/cgroup`.
        rel: String,
        /// The cgroup2 mounts found (mount point and root), for the message.
        mounts: String,
        /// Why the private-mount probe failed.
        probe: String,
    },
    /// The host cgroup root is unusable.
    #[error(
        "--host-cgroup-root {}: {reason}. This container runs in a private cgroup namespace, so \
         the pod's cgroup is outside its own cgroup2 mount: mount the host's cgroup2 filesystem \
         into the container (a hostPath volume of /sys/fs/cgroup, e.g. at /host/sys/fs/cgroup, \
         read-only is enough) and pass that path as --host-cgroup-root; or run with the host \
         cgroup namespace; or pass --cgroup",
        path.display()
    )]
    HostRoot {
        /// The configured host root.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The sidecar's cgroup was not found below the host root.
    #[error(
        "this container's cgroup (id {id}) was not found under --host-cgroup-root {} (searched \
         {searched} directories, depth <= {MAX_SEARCH_DEPTH}{}): that path must be the host's \
         whole cgroup2 hierarchy (a hostPath volume of /sys/fs/cgroup); or pass --cgroup",
        root.display(),
        if *truncated { ", search limit reached" } else { "" }
    )]
    NotFound {
        /// The sidecar's cgroup id.
        id: u64,
        /// Where it was searched.
        root: PathBuf,
        /// How many directories were visited.
        searched: usize,
        /// Whether the search stopped at a limit.
        truncated: bool,
    },
    /// The sidecar runs in the root cgroup itself.
    #[error(
        "the sidecar runs in the root cgroup ({}): it has no pod cgroup above it; run it in a \
         cgroup of its own inside the pod's (as a Kubernetes container is), or pass --cgroup",
        dir.display()
    )]
    InRootCgroup {
        /// The root cgroup directory as seen here.
        dir: PathBuf,
    },
    /// The parent of the sidecar's cgroup is the root cgroup.
    #[error(
        "the sidecar's cgroup {} sits directly under the root cgroup: refusing to attach to the \
         root cgroup (it would intercept the whole node); run the sidecar in its own cgroup \
         inside the pod's (as a Kubernetes container is), or pass --cgroup",
        sidecar.display()
    )]
    ParentIsRoot {
        /// The sidecar's own cgroup directory.
        sidecar: PathBuf,
    },
}

fn read(path: &Path) -> Result<String, DiscoverError> {
    fs::read_to_string(path).map_err(|source| DiscoverError::Read {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Served ports
// ---------------------------------------------------------------------------------------------

/// A listening TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    /// Local address (unspecified for a wildcard listener).
    pub addr: IpAddr,
    /// Local port.
    pub port: u16,
}

impl Listener {
    /// Whether only loopback clients can reach it (127.0.0.0/8, ::1, ::ffff:127.x.y.z).
    pub fn loopback_only(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => a.is_loopback(),
            IpAddr::V6(a) => {
                a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        }
    }
}

/// Decodes a `/proc/net/tcp{,6}` address: 8 (IPv4) or 32 (IPv6) hex digits, each 32-bit word
/// printed in host byte order.
fn decode_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let digits = hex.get(i * 8..i * 8 + 8)?;
        u32::from_str_radix(digits, 16).ok().map(u32::to_ne_bytes)
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// The listening sockets in a `/proc/net/tcp` or `/proc/net/tcp6` text. The header and lines
/// that do not parse are skipped.
pub fn listeners(text: &str) -> Vec<Listener> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_slot, local, _remote, state) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            if state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(Listener {
                addr: decode_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

/// Ports with at least one listener reachable from outside the pod (not loopback-only).
pub fn served_ports_from(texts: &[&str]) -> BTreeSet<u16> {
    texts
        .iter()
        .flat_map(|t| listeners(t))
        .filter(|l| !l.loopback_only() && l.port != 0)
        .map(|l| l.port)
        .collect()
}

/// The ports this network namespace (the pod's) serves: TCP listeners in `<proc_net>/tcp` and
/// `<proc_net>/tcp6` not bound to loopback only. A missing `tcp6` (IPv6 disabled) is fine.
pub fn served_ports(proc_net: &Path) -> Result<BTreeSet<u16>, DiscoverError> {
    let v4 = read(&proc_net.join("tcp"))?;
    let v6_path = proc_net.join("tcp6");
    let v6 = match fs::read_to_string(&v6_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(DiscoverError::Read {
                path: v6_path,
                source,
            })
        }
    };
    Ok(served_ports_from(&[&v4, &v6]))
}

// ---------------------------------------------------------------------------------------------
// Pod cgroup
// ---------------------------------------------------------------------------------------------

/// Where the sidecar found the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's cgroup directory (the parent of the sidecar's): pass it as the target.
    pub pod: PathBuf,
    /// The sidecar container's own cgroup directory: pass it as the proxy cgroup.
    pub sidecar: PathBuf,
    /// The sidecar's cgroup id (inode number of its cgroup directory).
    pub sidecar_id: u64,
    /// Whether it was found by searching the host root (private cgroup namespace).
    pub via_host_root: bool,
}

/// The cgroup v2 path of a `/proc/<pid>/cgroup` text (the `0::` line).
pub fn parse_self_cgroup(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)"))
}

/// A cgroup2 mount of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    /// The cgroup the mount shows at its top, relative to this process's cgroup namespace root
    /// (`/..` components when it lies outside the namespace).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

/// The cgroup2 mounts of a `/proc/self/mountinfo` text, in order; when several share a mount
/// point only the last (the visible one) is kept.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut mounts: Vec<CgroupMount> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mount = CgroupMount {
            root: unescape_octal(root),
            mount_point: PathBuf::from(unescape_octal(mount_point)),
        };
        mounts.retain(|m| m.mount_point != mount.mount_point);
        mounts.push(mount);
    }
    mounts
}

/// Decodes the `\ooo` octal escapes of `/proc/self/mountinfo` fields.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match escaped {
            Some(b) => {
                out.push(b);
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

/// Whether a cgroup directory is the root of the hierarchy (it has no `cgroup.type`).
fn is_root_cgroup(dir: &Path) -> bool {
    !dir.join("cgroup.type").exists()
}

/// Finds the pod's cgroup for this process: the parent of its own cgroup.
///
/// With the host cgroup namespace, `/proc/self/cgroup` names the full path and the parent is
/// read through the cgroup2 mount. In a private cgroup namespace (the Kubernetes default on
/// cgroup v2: the container sees itself at `/`), the container's own cgroup2 mount gives its
/// cgroup id (when no mount shows it, e.g. the host's tree is mounted over `/sys/fs/cgroup`,
/// the id is read from a cgroup2 mount made in a private mount namespace of a short-lived
/// thread), and that id is searched below `host_root`, the host's cgroup2 hierarchy mounted
/// into the container.
pub fn pod_cgroup(host_root: &Path) -> Result<PodCgroup, DiscoverError> {
    let self_cgroup = read(Path::new("/proc/self/cgroup"))?;
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    locate(
        &self_cgroup,
        &mountinfo,
        host_root,
        true,
        &probe_own_cgroup_id,
    )
}

/// Learns the id of this process's cgroup (given relative to its cgroup namespace root) when
/// no mount shows it.
type Probe<'a> = &'a dyn Fn(&str) -> Result<u64, String>;

/// [`pod_cgroup`] over given `/proc/self/cgroup` and `/proc/self/mountinfo` texts.
/// `check_host_root` verifies that `host_root` is a cgroup v2 filesystem before searching it.
fn locate(
    self_cgroup: &str,
    mountinfo: &str,
    host_root: &Path,
    check_host_root: bool,
    probe: Probe<'_>,
) -> Result<PodCgroup, DiscoverError> {
    let rel = parse_self_cgroup(self_cgroup).ok_or(DiscoverError::NoCgroupV2)?;
    let mounts = cgroup2_mounts(mountinfo);
    // Candidates: mounts whose top is inside our namespace and above our cgroup. Prefer one
    // where our cgroup is strictly below the top (its parent is then visible too).
    let mut candidates: Vec<(PathBuf, bool)> = mounts
        .iter()
        .filter(|m| !m.root.split('/').any(|c| c == ".."))
        .filter_map(|m| {
            let suffix = Path::new(rel).strip_prefix(&m.root).ok()?;
            let at_top = suffix.as_os_str().is_empty();
            Some((m.mount_point.join(suffix), at_top))
        })
        .filter(|(dir, _)| dir.is_dir())
        .collect();
    // Stable: among equals, mountinfo order.
    candidates.sort_by_key(|(_, at_top)| *at_top);
    // `visible`: our cgroup, when its parent can be reached through the same mount.
    let (visible, id) = match candidates.into_iter().next() {
        Some((own, _)) if is_root_cgroup(&own) => {
            return Err(DiscoverError::InRootCgroup { dir: own })
        }
        Some((own, at_top)) => {
            let id = inode(&own)?;
            ((!at_top).then_some(own), id)
        }
        None => match probe(rel) {
            Ok(id) => (None, id),
            Err(why) => {
                let seen = mounts
                    .iter()
                    .map(|m| format!("{} (root {})", m.mount_point.display(), m.root))
                    .collect::<Vec<_>>();
                return Err(DiscoverError::OwnCgroupNotVisible {
                    rel: rel.to_string(),
                    mounts: if seen.is_empty() {
                        "none".to_string()
                    } else {
                        seen.join(", ")
                    },
                    probe: why,
                });
            }
        },
    };

    let (sidecar, via_host_root) = match visible {
        Some(own) => (own, false),
        None => {
            // Private cgroup namespace: our cgroup's parent is outside what we see; search the
            // host's hierarchy for our id.
            if check_host_root {
                crate::ebpf::check_cgroup_dir(host_root).map_err(|e| DiscoverError::HostRoot {
                    path: host_root.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
            let found = find_cgroup_by_id(host_root, id)?;
            match found.path {
                Some(path) if path != host_root => (path, true),
                Some(_) => {
                    return Err(DiscoverError::HostRoot {
                        path: host_root.to_path_buf(),
                        reason: "it is this container's own cgroup, not the host's hierarchy"
                            .to_string(),
                    })
                }
                None => {
                    return Err(DiscoverError::NotFound {
                        id,
                        root: host_root.to_path_buf(),
                        searched: found.searched,
                        truncated: found.truncated,
                    })
                }
            }
        }
    };
    let pod = sidecar
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !is_root_cgroup(p))
        .ok_or_else(|| DiscoverError::ParentIsRoot {
            sidecar: sidecar.clone(),
        })?;
    debug!(pod = %pod.display(), sidecar = %sidecar.display(), id, "found the pod's cgroup");
    Ok(PodCgroup {
        pod,
        sidecar,
        sidecar_id: id,
        via_host_root,
    })
}

/// Reads the id of this process's cgroup (`rel`, relative to its cgroup namespace root) from a
/// cgroup2 mount made on a short-lived thread inside a private mount namespace of its own:
/// nothing becomes visible to any other thread or process, and nothing is left behind.
/// Needs CAP_SYS_ADMIN and a security profile that allows mounting.
fn probe_own_cgroup_id(rel: &str) -> Result<u64, String> {
    let rel = rel.trim_start_matches('/').to_string();
    std::thread::Builder::new()
        .name("cgroup-probe".to_string())
        .spawn(move || probe_in_private_mount_namespace(&rel))
        .map_err(|e| format!("cannot start the probe thread: {e}"))?
        .join()
        .map_err(|_| "the probe thread panicked".to_string())?
}

/// Runs on a thread of its own: that thread's mount namespace is changed for good.
fn probe_in_private_mount_namespace(rel: &str) -> Result<u64, String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::ptr;

    let os_err = |what: &str| format!("{what}: {}", io::Error::last_os_error());
    // SAFETY: unshare(2) with a flag only: this thread gets its own copy of the mount namespace
    // (and of its fs_struct); no memory is passed.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(os_err("unshare(CLONE_NEWNS)"));
    }
    // SAFETY: a NUL-terminated path and null source/type/data, as a propagation change takes.
    let rc = unsafe {
        libc::mount(
            ptr::null(),
            c"/".as_ptr(),
            ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            ptr::null(),
        )
    };
    if rc != 0 {
        return Err(os_err("making the private mount namespace private"));
    }
    // Any existing directory serves as the mount point; it is covered only in this namespace.
    let target = std::env::temp_dir();
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| format!("temporary directory path: {e}"))?;
    // SAFETY: NUL-terminated strings for source, target and type; null data.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target_c.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            ptr::null(),
        )
    };
    if rc != 0 {
        return Err(os_err(&format!(
            "mount -t cgroup2 on {} (in a private mount namespace)",
            target.display()
        )));
    }
    let id = fs::metadata(target.join(rel))
        .map(|m| m.ino())
        .map_err(|e| format!("{}: {e}", target.join(rel).display()));
    // SAFETY: the NUL-terminated target mounted above, in this thread's own namespace.
    unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH) };
    id
}

fn inode(path: &Path) -> Result<u64, DiscoverError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| DiscoverError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Outcome of [`find_cgroup_by_id`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Search {
    /// The directory whose inode is the id, if found.
    pub path: Option<PathBuf>,
    /// Directories visited.
    pub searched: usize,
    /// Whether a limit ([`MAX_SEARCH_DEPTH`], [`MAX_SEARCH_DIRS`]) stopped the search.
    pub truncated: bool,
}

/// Breadth-first search below `root` (itself included) for the directory whose inode number is
/// `id` (a cgroup's id), without leaving `root`'s filesystem and within the search limits.
/// Subdirectories that vanish or cannot be read are skipped (cgroups come and go).
pub fn find_cgroup_by_id(root: &Path, id: u64) -> Result<Search, DiscoverError> {
    let meta = fs::metadata(root).map_err(|source| DiscoverError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let mut search = Search {
        path: None,
        searched: 0,
        truncated: false,
    };
    if meta.ino() == id {
        search.path = Some(root.to_path_buf());
        return Ok(search);
    }
    let dev = meta.dev();
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        if search.searched >= MAX_SEARCH_DIRS {
            search.truncated = true;
            break;
        }
        search.searched += 1;
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(source) if dir == root => {
                return Err(DiscoverError::Read {
                    path: dir.clone(),
                    source,
                })
            }
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.ino() == id {
                // Confirm with stat (d_ino can differ from st_ino on some filesystems).
                if fs::metadata(&path).is_ok_and(|m| m.ino() == id && m.dev() == dev) {
                    search.path = Some(path);
                    return Ok(search);
                }
            }
            if depth + 1 < MAX_SEARCH_DEPTH {
                queue.push_back((path, depth + 1));
            } else {
                search.truncated = true;
            }
        }
    }
    Ok(search)
}

#[cfg(test)]
mod tests;
