//! `sidecar check`: probes whether this kernel and these privileges can run the interception
//! programs, ending with the honest test: every program of the embedded object is loaded
//! (verified, not attached).

use std::{fmt, fs, io};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
    util::KernelVersion,
};

use crate::ebpf;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    /// What was checked.
    pub name: String,
    /// Whether it is usable.
    pub ok: bool,
    /// What was found, or why it failed.
    pub detail: String,
}

/// Result of [`check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Every check, in the order run.
    pub items: Vec<CheckItem>,
}

impl CheckReport {
    /// Whether every check passed.
    pub fn all_ok(&self) -> bool {
        self.items.iter().all(|i| i.ok)
    }

    fn push(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.items.push(CheckItem {
            name: name.into(),
            ok,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .items
            .iter()
            .map(|i| i.name.chars().count())
            .max()
            .unwrap_or(0);
        for item in &self.items {
            let status = if item.ok { " ok " } else { "FAIL" };
            // Multi-line details (verifier logs) are indented under the line.
            let mut lines = item.detail.lines();
            let first = lines.next().unwrap_or("");
            writeln!(f, "[{status}] {:<width$}  {first}", item.name)?;
            for line in lines {
                writeln!(f, "       {:<width$}  {line}", "")?;
            }
        }
        let failed = self.items.iter().filter(|i| !i.ok).count();
        if failed == 0 {
            write!(f, "all {} checks passed", self.items.len())
        } else {
            write!(f, "{failed} of {} checks failed", self.items.len())
        }
    }
}

/// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Runs every check; never fails, each problem becomes a failed item.
pub fn check() -> CheckReport {
    let mut report = CheckReport::default();
    check_kernel_version(&mut report);
    check_privileges(&mut report);
    check_cgroup2(&mut report);
    check_program_types(&mut report);
    check_map_types(&mut report);
    check_cgroup_links(&mut report);
    check_object_loads(&mut report);
    report
}

fn check_kernel_version(report: &mut CheckReport) {
    // Informational: what works is decided by the probes below, not by the number.
    match KernelVersion::current() {
        Ok(v) => {
            let note = if v >= KernelVersion::new(5, 10, 0) {
                "supported floor is 5.10"
            } else {
                "below the supported floor 5.10 (untested); the probes below decide"
            };
            report.push("kernel version", true, format!("{v} ({note})"));
        }
        Err(e) => report.push("kernel version", false, format!("cannot read: {e}")),
    }
}

fn check_privileges(report: &mut CheckReport) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let caps = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s));
    let (ok, detail) = match caps {
        Some(caps) => {
            let has = |cap: u32| caps & (1u64 << cap) != 0;
            let ok = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN));
            let detail = format!(
                "uid {uid}; CapEff {caps:#x}: CAP_BPF {}, CAP_NET_ADMIN {}, CAP_SYS_ADMIN {}{}",
                yes_no(has(CAP_BPF)),
                yes_no(has(CAP_NET_ADMIN)),
                yes_no(has(CAP_SYS_ADMIN)),
                if ok {
                    ""
                } else {
                    " (needs CAP_BPF + CAP_NET_ADMIN, or CAP_SYS_ADMIN: run as root)"
                }
            );
            (ok, detail)
        }
        None => (uid == 0, format!("uid {uid}; CapEff not readable")),
    };
    report.push("privileges for bpf()", ok, detail);
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The `CapEff:` bitmask of a `/proc/<pid>/status` text.
fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn check_cgroup2(report: &mut CheckReport) {
    match ebpf::cgroup2_mount() {
        Ok(path) => match ebpf::check_cgroup_dir(&path) {
            Ok(()) => report.push("cgroup v2 mount", true, path.display().to_string()),
            Err(e) => report.push("cgroup v2 mount", false, e.to_string()),
        },
        Err(e) => report.push("cgroup v2 mount", false, e.to_string()),
    }
}

fn check_program_types(report: &mut CheckReport) {
    let types = [
        ("cgroup_sock_addr", ProgramType::CgroupSockAddr, "4.17"),
        ("sock_ops", ProgramType::SockOps, "4.13"),
        ("cgroup_sockopt", ProgramType::CgroupSockopt, "5.3"),
        ("tracepoint", ProgramType::TracePoint, "4.7"),
        ("sk_lookup", ProgramType::SkLookup, "5.9"),
    ];
    for (name, ty, since) in types {
        push_probe(
            report,
            format!("program type {name}"),
            since,
            is_program_supported(ty),
        );
    }
}

/// Adds one line for a program- or map-type probe.
fn push_probe<E: std::fmt::Display>(
    report: &mut CheckReport,
    label: String,
    since: &str,
    probe: Result<bool, E>,
) {
    match probe {
        Ok(true) => report.push(label, true, format!("supported (Linux {since}+)")),
        Ok(false) => report.push(
            label,
            false,
            format!("not supported (needs Linux {since}+)"),
        ),
        Err(e) => report.push(label, false, format!("probe failed: {e}")),
    }
}

fn check_map_types(report: &mut CheckReport) {
    let types = [
        ("lru_hash", MapType::LruHash, "4.10"),
        ("array", MapType::Array, "3.19"),
        ("ringbuf", MapType::RingBuf, "5.8"),
        ("percpu_array", MapType::PerCpuArray, "4.6"),
        ("hash", MapType::Hash, "3.19"),
        ("lpm_trie", MapType::LpmTrie, "4.11"),
        ("sockmap", MapType::SockMap, "5.7"),
    ];
    for (name, ty, since) in types {
        push_probe(
            report,
            format!("map type {name}"),
            since,
            is_map_supported(ty),
        );
    }
}

/// `BPF_LINK_CREATE` command number (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_CGROUP_INET4_CONNECT` attach type.
const BPF_CGROUP_INET4_CONNECT: u32 = 10;

fn check_cgroup_links(report: &mut CheckReport) {
    let label = "bpf_link for cgroups";
    match probe_link_create() {
        Ok(()) => report.push(
            label,
            true,
            "supported (Linux 5.7+): programs detach when the sidecar exits",
        ),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => report.push(
            label,
            false,
            "BPF_LINK_CREATE unknown (Linux < 5.7): programs would be attached without links \
             and could outlive a crashed sidecar",
        ),
        Err(e) => report.push(label, false, format!("probe failed: {e}")),
    }
}

/// Calls `bpf(BPF_LINK_CREATE)` for a cgroup attach type with invalid descriptors: a kernel
/// that knows the command rejects the descriptors (`EBADF`), an older one the command
/// (`EINVAL`).
fn probe_link_create() -> io::Result<()> {
    /// The `link_create` head of `union bpf_attr`, padded to the size the kernel reads.
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        rest: [u64; 6],
    }
    let mut attr = LinkCreateAttr {
        prog_fd: u32::MAX,
        target_fd: u32::MAX,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        flags: 0,
        rest: [0; 6],
    };
    // SAFETY: `attr` is a live, fully initialised buffer of the size passed; the kernel only
    // reads it, and fails on the invalid descriptors before creating anything.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &mut attr as *mut LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as libc::c_uint,
        )
    };
    if rc >= 0 {
        // Cannot happen with invalid descriptors; close whatever was returned to be safe.
        // SAFETY: `rc` is a descriptor the kernel just gave this process.
        unsafe { libc::close(rc as libc::c_int) };
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBADF) {
        Ok(())
    } else {
        Err(err)
    }
}

fn check_object_loads(report: &mut CheckReport) {
    if !ebpf::object_is_embedded() {
        report.push(
            "embedded eBPF object",
            false,
            ebpf::EbpfError::MissingObject.to_string(),
        );
        return;
    }
    let mut bpf = match ebpf::load_object() {
        Ok(bpf) => {
            report.push("embedded eBPF object", true, "parsed; its maps created");
            bpf
        }
        Err(e) => {
            report.push("embedded eBPF object", false, e.to_string());
            return;
        }
    };
    for program in ebpf::PROGRAMS {
        let label = format!("program {program} loads");
        match ebpf::load_program(&mut bpf, program) {
            Ok(()) => report.push(label, true, "passed the verifier (not attached)"),
            Err(e) => report.push(label, false, e.to_string()),
        }
    }
    let label = format!("program {} loads", ebpf::inbound::PROG_SK_LOOKUP);
    match ebpf::inbound::load_sk_lookup(&mut bpf) {
        Ok(()) => report.push(label, true, "passed the verifier (not attached)"),
        Err(e) => report.push(label, false, e.to_string()),
    }
    for (label, ok, detail) in ebpf::observe::check(&mut bpf) {
        report.push(label, ok, detail);
    }
    // Dropping `bpf` unloads the programs and frees the maps.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn report_display_marks_failures_and_counts_them() {
        let mut report = CheckReport::default();
        report.push("first", true, "fine");
        report.push("second check", false, "broken\nline two");
        assert!(!report.all_ok());
        let text = report.to_string();
        assert!(text.contains("[ ok ] first         fine"), "{text}");
        assert!(text.contains("[FAIL] second check  broken"), "{text}");
        assert!(text.contains("\n                     line two"), "{text}");
        assert!(text.ends_with("1 of 2 checks failed"), "{text}");
    }

    #[test]
    fn empty_report_is_ok() {
        let report = CheckReport::default();
        assert!(report.all_ok());
        assert_eq!(report.to_string(), "all 0 checks passed");
    }
}
