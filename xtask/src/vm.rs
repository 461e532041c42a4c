//! `cargo xtask integration-test`: the privileged kernel suite on the host kernel (`local`) or
//! inside qemu on Debian's kernels (`vm --kernel 5.10 ...`).
//!
//! The suite is the same in both: `sidecar check` must pass every probe, then each privileged
//! test binary of the agent (real programs attached to real cgroups and network namespaces,
//! real sockets and peers) runs with one thread.
//!
//! For a VM, the kernel package comes from Debian's archive through apt (a private apt
//! configuration, nothing of the host's is changed) into `target/vm/cache`. A cpio initramfs
//! holds busybox, the tools the tests start (iproute2, bpftool, nsenter, python3 with its
//! standard library, curl) with their shared libraries, the kernel's network modules (modprobe
//! works as on a real system) and the test binaries at their host paths (the paths compiled
//! into them stay valid). qemu boots it with software emulation (TCG: /dev/kvm hangs a guest on
//! this kind of machine); `/init` runs the suite and prints a marker per step and a final
//! marker on the serial console, which is all the host reads. Each kernel has a time limit.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::build;
use crate::setup;
use crate::util::{self, sh};

/// Flags of `cargo xtask integration-test`.
#[derive(Debug, clap::Args)]
pub struct IntegrationArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Run the privileged kernel suite on this machine's kernel.
    Local,
    /// Boot each kernel in qemu (software emulation) and run the suite inside.
    Vm(VmArgs),
}

/// Flags of `cargo xtask integration-test vm`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Kernel series to test, from Debian's archive: 5.10 (bullseye), 6.1 (bookworm), 6.12
    /// (trixie). Repeatable.
    #[arg(long = "kernel", required = true, value_parser = parse_series)]
    kernels: Vec<&'static Series>,
    /// Time limit per kernel, boot included, in seconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout_secs: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory_mib: u32,
    /// What runs in each VM: `full` (kernel tests and the end-to-end test of the agent binary)
    /// or `kernel` (`sidecar check` and the kernel tests only, what CI runs).
    #[arg(long, value_enum, default_value_t = SuiteKind::Full)]
    suite: SuiteKind,
}

/// The parts of the suite to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SuiteKind {
    /// `sidecar check` and the kernel tests (`sidecar/tests/ebpf_*`).
    Kernel,
    /// The kernel tests and the end-to-end tests that run with the VM's tools.
    Full,
}

/// Time limit per kernel (boot, suite, shutdown); the suite takes about 4 minutes under TCG
/// on a 2-core machine.
const DEFAULT_TIMEOUT_SECS: u64 = 900;
/// Guest memory: the initramfs (~150 MiB) lives in it.
const DEFAULT_MEMORY_MIB: u32 = 2048;

/// A Debian kernel series and where it comes from.
#[derive(Debug)]
pub struct Series {
    /// What users type: `5.10`.
    pub name: &'static str,
    /// The Debian release that carries it.
    pub suite: &'static str,
}

/// The kernel series the VM tests know.
pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        suite: "bullseye",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
    },
    Series {
        name: "6.12",
        suite: "trixie",
    },
];

fn parse_series(s: &str) -> Result<&'static Series, String> {
    SERIES.iter().find(|k| k.name == s).ok_or_else(|| {
        let known: Vec<&str> = SERIES.iter().map(|k| k.name).collect();
        format!("unknown kernel series {s:?}; known: {}", known.join(", "))
    })
}

/// End-to-end tests of `tests/` in the suite: the real agent binary in a pod world of
/// namespaces and cgroups, with curl and Python's standard library as peers (the tests that
/// need the venv's packages, nghttp2 or Prometheus run on the host only).
const E2E_TESTS: &[&str] = &["e2e"];

/// Console markers `/init` prints; the host reads nothing else.
const STEP_MARK: &str = "SIDECAR-VM-STEP";
const DONE_MARK: &str = "SIDECAR-VM-DONE";

/// Modules loaded before the suite (the kernel also loads others on demand through modprobe).
const MODULES: &[&str] = &[
    "veth",
    "tun",
    "sch_netem",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

/// Host programs the tests start, copied with their libraries.
const TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/bpftool",
    "/usr/bin/ss",
    "/usr/bin/nsenter",
    "/usr/bin/setpriv",
    "/usr/bin/curl",
    "/usr/bin/python3.11",
];

/// Parts of Python's standard library the peers never import.
const PYTHON_SKIP: &[&str] = &[
    "test",
    "dist-packages",
    "site-packages",
    "idlelib",
    "tkinter",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "turtledemo",
];

/// Entry point.
pub fn run(args: &IntegrationArgs) -> Result<()> {
    setup::run()?;
    build::all()?;
    match &args.mode {
        Mode::Local => run_local(&Suite::build(SuiteKind::Full)?),
        Mode::Vm(vm) => run_vms(vm),
    }
}

/// The VM suite on `kernels` with the default limits, after set-up and build (what
/// `cargo xtask test` runs).
pub fn run_default_vms(kernels: &[&str], suite: SuiteKind) -> Result<()> {
    let args = VmArgs {
        kernels: kernels
            .iter()
            .map(|k| parse_series(k).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?,
        timeout_secs: DEFAULT_TIMEOUT_SECS,
        memory_mib: DEFAULT_MEMORY_MIB,
        suite,
    };
    run_vms(&args)
}

fn run_vms(vm: &VmArgs) -> Result<()> {
    setup::ensure_vm_packages()?;
    let suite = Suite::build(vm.suite)?;
    let mut outcomes = Vec::new();
    for series in &vm.kernels {
        let started = Instant::now();
        let outcome = run_vm(series, &suite, vm).unwrap_or_else(|e| Outcome {
            kernel: format!("{} (not run)", series.name),
            steps: Vec::new(),
            error: Some(format!("{e:#}")),
        });
        eprintln!(
            "--- kernel {}: {} in {:.0} s",
            series.name,
            if outcome.passed() { "PASS" } else { "FAIL" },
            started.elapsed().as_secs_f64()
        );
        outcomes.push(outcome);
    }
    report(&outcomes)
}

/// The suite: `sidecar check`, then each privileged test binary.
pub struct Suite {
    sidecar: PathBuf,
    tests: Vec<(String, PathBuf)>,
}

impl Suite {
    /// Builds the test binaries (release, the eBPF object embedded) and lists them.
    pub fn build(kind: SuiteKind) -> Result<Self> {
        // The privileged kernel tests are the agent's `ebpf_*` integration tests.
        let mut names: Vec<String> = fs::read_dir(util::workspace_root().join("sidecar/tests"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".rs").map(str::to_string))
            .filter(|n| n.starts_with("ebpf_"))
            .collect();
        names.sort();
        // The same selection as every other build and test step (`build::PACKAGES`): the
        // same feature unification, so nothing is rebuilt after them.
        let e2e: Vec<String> = match kind {
            SuiteKind::Full => E2E_TESTS.iter().map(|t| t.to_string()).collect(),
            SuiteKind::Kernel => Vec::new(),
        };
        let all = build::test_executables()?;
        let pick = |package: &str, names: &[String]| -> Vec<(String, PathBuf)> {
            names
                .iter()
                .filter_map(|n| {
                    all.iter()
                        .find(|t| t.package == package && t.kind == "test" && &t.name == n)
                        .map(|t| (n.clone(), t.path.clone()))
                })
                .collect()
        };
        let mut tests = pick("sidecar", &names);
        tests.extend(pick("sidecar-tests", &e2e));
        let wanted = names.len() + e2e.len();
        if tests.len() != wanted {
            bail!(
                "cargo listed {} of the {wanted} test binaries ({} and {})",
                tests.len(),
                names.join(", "),
                e2e.join(", ")
            );
        }
        Ok(Self {
            sidecar: build::sidecar_binary(),
            tests,
        })
    }

    /// Every step as (name, command line).
    fn steps(&self) -> Vec<(String, Vec<String>)> {
        let mut steps = vec![(
            "sidecar-check".to_string(),
            vec![self.sidecar.display().to_string(), "check".to_string()],
        )];
        for (name, exe) in &self.tests {
            steps.push((
                name.clone(),
                vec![exe.display().to_string(), "--test-threads=1".to_string()],
            ));
        }
        steps
    }
}

fn run_local(suite: &Suite) -> Result<()> {
    let kernel = util::output(Command::new("uname").arg("-r"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut steps = Vec::new();
    for (name, argv) in suite.steps() {
        eprintln!("\n=== {name}");
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .status()
            .with_context(|| format!("cannot start {}", argv[0]))?;
        steps.push(Step {
            name,
            code: status.code().unwrap_or(-1),
        });
    }
    report(&[Outcome {
        kernel: format!("{kernel} (host)"),
        steps,
        error: None,
    }])
}

/// One step's result.
struct Step {
    name: String,
    code: i32,
}

/// One kernel's result.
struct Outcome {
    kernel: String,
    steps: Vec<Step>,
    error: Option<String>,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.error.is_none() && !self.steps.is_empty() && self.steps.iter().all(|s| s.code == 0)
    }
}

fn report(outcomes: &[Outcome]) -> Result<()> {
    let mut table = String::from("\nintegration-test results\n");
    for o in outcomes {
        let _ = writeln!(
            table,
            "  {:<40} {}",
            o.kernel,
            if o.passed() { "PASS" } else { "FAIL" }
        );
        for s in &o.steps {
            let _ = writeln!(
                table,
                "      {:<36} {}",
                s.name,
                if s.code == 0 {
                    "ok".to_string()
                } else {
                    format!("exit {}", s.code)
                }
            );
        }
        if let Some(e) = &o.error {
            let _ = writeln!(table, "      error: {e}");
        }
    }
    eprintln!("{table}");
    if outcomes.iter().all(Outcome::passed) {
        Ok(())
    } else {
        bail!("the integration suite failed on at least one kernel")
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels from Debian's archive

/// Where everything of the VM tests lives.
fn vm_dir() -> PathBuf {
    util::workspace_root().join("target/vm")
}

/// Downloads (once) the newest cloud kernel of `series` and unpacks it; returns the unpacked
/// tree and the kernel release (`uname -r`).
fn fetch_kernel(series: &Series) -> Result<(PathBuf, String)> {
    let cache = vm_dir().join("cache").join(series.suite);
    let lists = cache.join("lists");
    let archives = cache.join("archives");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(archives.join("partial"))?;
    let sources = cache.join("sources.list");
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    fs::write(
        &sources,
        format!(
            "deb [signed-by={keyring}] http://deb.debian.org/debian {s} main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian {s}-updates main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian-security {s}-security main\n",
            s = series.suite
        ),
    )?;
    let apt_opts: Vec<String> = vec![
        format!("-oDir::Etc::SourceList={}", sources.display()),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", cache.display()),
        format!("-oDir::Cache::Archives={}", archives.display()),
        "-oDir::State::Status=/dev/null".into(),
        "-oAPT::Architecture=amd64".into(),
        "-oDebug::NoLocking=1".into(),
        "-oAPT::Sandbox::User=root".into(),
    ];
    sh(Command::new("apt-get")
        .args(&apt_opts)
        .args(["update", "-q"]))
    .with_context(|| format!("apt-get update for {} failed", series.suite))?;
    // The meta package names the newest kernel of the suite.
    let depends = util::output(
        Command::new("apt-cache")
            .args(&apt_opts)
            .args(["depends", "linux-image-cloud-amd64"]),
    )
    .context("apt-cache depends linux-image-cloud-amd64 failed")?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .with_context(|| {
            format!(
                "no linux-image dependency in linux-image-cloud-amd64 of {}",
                series.suite
            )
        })?
        .to_string();
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let unpacked = vm_dir().join("kernels").join(&release);
    if !unpacked
        .join("boot")
        .join(format!("vmlinuz-{release}"))
        .is_file()
    {
        let debs = || -> Result<Vec<PathBuf>> {
            Ok(fs::read_dir(&archives)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
                    })
                })
                .collect())
        };
        if debs()?.is_empty() {
            sh(Command::new("apt-get")
                .current_dir(&archives)
                .args(&apt_opts)
                .args(["download", "-q", &package]))
            .with_context(|| format!("apt-get download {package} failed"))?;
        }
        let deb = debs()?
            .into_iter()
            .next()
            .with_context(|| format!("{package}: no .deb in {}", archives.display()))?;
        let _ = fs::remove_dir_all(&unpacked);
        fs::create_dir_all(&unpacked)?;
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    Ok((unpacked, release))
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// Builds `<vm>/initramfs-<release>.cpio` for `suite` on the unpacked kernel.
fn build_initramfs(kernel: &Path, release: &str, suite: &Suite) -> Result<PathBuf> {
    let root = vm_dir().join(format!("root-{release}"));
    let _ = fs::remove_dir_all(&root);
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "root",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    let mut copied = BTreeSet::new();
    copy_with_libs(&root, Path::new("/bin/busybox"), false, &mut copied)
        .context("busybox (Debian package busybox-static) is missing")?;
    for tool in TOOLS {
        copy_with_libs(&root, Path::new(tool), false, &mut copied)
            .with_context(|| format!("copying {tool}"))?;
    }
    std::os::unix::fs::symlink("python3.11", root.join("usr/bin/python3"))?;
    // Python's standard library, and the libraries of its extension modules.
    let pylib = Path::new("/usr/lib/python3.11");
    let mut tar = Command::new("tar");
    tar.arg("-C").arg("/usr/lib");
    for skip in PYTHON_SKIP {
        tar.arg(format!("--exclude=python3.11/{skip}"));
    }
    tar.args(["-cf", "-", "python3.11"]);
    let out = tar.output().context("tar of python3.11")?;
    if !out.status.success() {
        bail!("tar of {} failed", pylib.display());
    }
    fs::create_dir_all(root.join("usr/lib"))?;
    let mut untar = Command::new("tar")
        .arg("-C")
        .arg(root.join("usr/lib"))
        .args(["-xf", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    untar
        .stdin
        .take()
        .context("tar stdin")?
        .write_all(&out.stdout)?;
    if !untar.wait()?.success() {
        bail!("unpacking python3.11 into the initramfs failed");
    }
    for entry in fs::read_dir(pylib.join("lib-dynload"))? {
        let path = entry?.path();
        for lib in shared_libraries(&path)? {
            copy_file(&root, &lib, false, &mut copied)?;
        }
    }
    // The agent and the test binaries at their host paths (the tests find peers and the agent
    // by paths compiled into them), stripped of debug information.
    copy_with_libs(&root, &suite.sidecar, true, &mut copied)?;
    for (_, exe) in &suite.tests {
        copy_with_libs(&root, exe, true, &mut copied)?;
    }
    let peers = util::workspace_root().join("tests/peers");
    for entry in fs::read_dir(&peers)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "py") {
            copy_file(&root, &path, false, &mut copied)?;
        }
    }
    copy_modules(kernel, release, &root)?;
    write_init(&root, suite)?;

    let cpio = vm_dir().join(format!("initramfs-{release}.cpio"));
    let file = fs::File::create(&cpio)?;
    let mut find = Command::new("find")
        .current_dir(&root)
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()
        .context("find")?;
    let list = find.stdout.take().context("find stdout")?;
    let status = Command::new("cpio")
        .current_dir(&root)
        .args(["-o", "-H", "newc", "--quiet"])
        .stdin(list)
        .stdout(file)
        .status()
        .context("cpio (Debian package cpio) is missing")?;
    if !find.wait()?.success() || !status.success() {
        bail!("packing {} failed", cpio.display());
    }
    Ok(cpio)
}

/// The shared libraries `ldd` lists for `path` (none for static binaries).
fn shared_libraries(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(path).output().context("ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// Copies `path` and its libraries to the same paths under `root`.
fn copy_with_libs(
    root: &Path,
    path: &Path,
    strip: bool,
    copied: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    copy_file(root, path, strip, copied)?;
    for lib in shared_libraries(path)? {
        copy_file(root, &lib, false, copied)?;
    }
    Ok(())
}

fn copy_file(root: &Path, path: &Path, strip: bool, copied: &mut BTreeSet<PathBuf>) -> Result<()> {
    if !copied.insert(path.to_path_buf()) {
        return Ok(());
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    let dest = root.join(relative);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    if strip {
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dest)
            .arg(path)
            .status()
            .context("strip (Debian package binutils)")?;
        if !status.success() {
            bail!("strip {} failed ({status})", path.display());
        }
    } else {
        fs::copy(path, &dest).with_context(|| format!("copying {}", path.display()))?;
    }
    Ok(())
}

/// The kernel's network, library and crypto modules, uncompressed, with `depmod` run so that
/// busybox's modprobe (and the kernel's on-demand loading) finds them.
fn copy_modules(kernel: &Path, release: &str, root: &Path) -> Result<()> {
    // Newer Debian releases keep them under /usr (merged /usr).
    let from = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| kernel.join(dir).join(release))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("no modules directory for {release} in {}", kernel.display()))?;
    let to = root.join("lib/modules").join(release);
    for dir in [
        "kernel/net",
        "kernel/drivers/net",
        "kernel/lib",
        "kernel/crypto",
    ] {
        if from.join(dir).is_dir() {
            fs::create_dir_all(to.join(dir))?;
            sh(Command::new("cp")
                .arg("-r")
                .arg(from.join(dir).join("."))
                .arg(to.join(dir)))?;
        }
    }
    for file in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if from.join(file).is_file() {
            fs::copy(from.join(file), to.join(file))?;
        }
    }
    // Newer kernels ship modules xz- or zstd-compressed; busybox's modprobe wants them plain.
    sh(Command::new("find")
        .arg(&to)
        .args(["-name", "*.ko.xz", "-exec", "xz", "-d", "{}", "+"]))?;
    sh(Command::new("find").arg(&to).args([
        "-name", "*.ko.zst", "-exec", "zstd", "-q", "-d", "--rm", "{}", "+",
    ]))?;
    sh(Command::new("depmod").arg("-b").arg(root).arg(release))
        .context("depmod (Debian package kmod)")?;
    Ok(())
}

fn write_init(root: &Path, suite: &Suite) -> Result<()> {
    let mut init = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
# /tmp and /run stay on the (writable) initramfs: a tmpfs over them would hide the test
# binaries of a workspace that lives under /tmp.
mkdir -p /sys/fs/cgroup /sys/fs/bpf /sys/kernel/tracing /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
ip link set lo up
hostname sidecar-vm
"#,
    );
    for module in MODULES {
        let _ = writeln!(
            init,
            "modprobe {module} || echo \"modprobe {module} failed\""
        );
    }
    init.push_str("echo \"kernel $(uname -r)\"\n");
    for (name, argv) in suite.steps() {
        let _ = writeln!(init, "echo \"=== {name}\"");
        let _ = writeln!(init, "{}", argv.join(" "));
        let _ = writeln!(init, "echo \"{STEP_MARK} {name} $?\"");
    }
    let _ = writeln!(init, "echo {DONE_MARK}");
    init.push_str("sync\nreboot -f\n");
    let path = root.join("init");
    fs::write(&path, init)?;
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Booting

fn run_vm(series: &Series, suite: &Suite, args: &VmArgs) -> Result<Outcome> {
    eprintln!("\n=== kernel {} ({})", series.name, series.suite);
    let (kernel, release) = fetch_kernel(series)?;
    let initramfs = build_initramfs(&kernel, &release, suite)?;
    let vmlinuz = kernel.join("boot").join(format!("vmlinuz-{release}"));
    let log_path = vm_dir().join(format!("console-{release}.log"));
    let mut log = fs::File::create(&log_path)?;
    eprintln!(
        "booting {release} under qemu (TCG); console: {}",
        log_path.display()
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
        ])
        .args(["-smp", "2", "-m", &args.memory_mib.to_string()])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("qemu-system-x86_64 (Debian package qemu-system-x86) is missing")?;
    let (tx, rx) = mpsc::channel::<String>();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut steps = Vec::new();
    let mut done = false;
    let mut error = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if let Some(rest) = line.strip_prefix(STEP_MARK) {
                    let mut parts = rest.split_whitespace();
                    if let (Some(name), Some(code)) = (parts.next(), parts.next()) {
                        let code = code.parse().unwrap_or(-1);
                        eprintln!("    {name}: {}", if code == 0 { "ok" } else { "FAILED" });
                        steps.push(Step {
                            name: name.to_string(),
                            code,
                        });
                    }
                } else if line.trim() == DONE_MARK {
                    done = true;
                } else if line.starts_with("test result:")
                    || line.contains("panicked at")
                    || line.contains("Kernel panic")
                    || line.starts_with("kernel ")
                    || line.contains("modprobe ")
                {
                    eprintln!("    | {line}");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    error = Some(format!(
                        "no end marker within {} s (see {})",
                        args.timeout_secs,
                        log_path.display()
                    ));
                    let _ = child.kill();
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    if error.is_none() && !done {
        error = Some(format!(
            "the guest stopped before the end marker (see {})",
            log_path.display()
        ));
    }
    let expected = suite.steps().len();
    if error.is_none() && steps.len() != expected {
        error = Some(format!("{} of {expected} steps reported", steps.len()));
    }
    Ok(Outcome {
        kernel: release,
        steps,
        error,
    })
}
