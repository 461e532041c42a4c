//! What the kernel has attached to a cgroup, asked directly with `bpf(2)`: `BPF_PROG_QUERY`
//! for the ids, then each program's name from `BPF_OBJ_GET_INFO_BY_FD`.
//!
//! Not `bpftool cgroup show`: bpftool 7.x asks for per-program attach flags that kernels before
//! 6.6 reject, so on the older kernels of the VM tests it fails as soon as a program is
//! attached.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::error::{Error, IoContext, Result};

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

/// Attach types are small integers (`enum bpf_attach_type`); every one is asked, those this
/// kernel does not know or that are not cgroup hooks answer EINVAL or ENODEV.
const ATTACH_TYPES: u32 = 64;

/// `union bpf_attr` for `BPF_PROG_QUERY`, as every kernel since 4.15 knows it.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_PROG_GET_FD_BY_ID`.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_prog_info` up to its `name` (stable since 4.15); the kernel fills
/// only as much as `info_len` says.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-initialised `union bpf_attr` prefix for `cmd` of the size
    // passed; any pointer inside it refers to a buffer the caller keeps alive for the call.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Ids of the programs attached directly to the cgroup directory `dir`, for every attach type.
pub fn cgroup_program_ids(dir: &Path) -> Result<Vec<u32>> {
    let cgroup = File::open(dir).ctx(|| format!("opening cgroup {}", dir.display()))?;
    let mut all = Vec::new();
    for attach_type in 0..ATTACH_TYPES {
        let mut ids = [0u32; 64];
        let mut attr = ProgQueryAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..ProgQueryAttr::default()
        };
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => all.extend_from_slice(&ids[..(attr.prog_cnt as usize).min(ids.len())]),
            // A type this kernel does not know or not a cgroup hook (EINVAL); a device hook
            // (tcx, netkit) asked of a cgroup (ENODEV, 6.6+).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) => {}
            Err(e) => {
                return Err(Error::Unexpected(format!(
                    "BPF_PROG_QUERY of {} for attach type {attach_type}: {e}",
                    dir.display()
                )))
            }
        }
    }
    Ok(all)
}

/// The kernel's name of the loaded program `id` (at most 15 bytes, as bpftool shows it).
pub fn program_name(id: u32) -> Result<String> {
    let mut get = GetFdByIdAttr {
        prog_id: id,
        ..GetFdByIdAttr::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut get)
        .map_err(|e| Error::Unexpected(format!("BPF_PROG_GET_FD_BY_ID {id}: {e}")))?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = ProgInfoHead::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfoHead>() as u32,
        info: &mut info as *mut ProgInfoHead as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .map_err(|e| Error::Unexpected(format!("BPF_OBJ_GET_INFO_BY_FD of program {id}: {e}")))?;
    let end = info
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.name.len());
    Ok(String::from_utf8_lossy(&info.name[..end]).into_owned())
}

/// Names of the programs attached directly to the cgroup directory `dir`, sorted.
pub fn cgroup_program_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = cgroup_program_ids(dir)?
        .into_iter()
        .map(program_name)
        .collect::<Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}
