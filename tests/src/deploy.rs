//! Offline checks of Kubernetes manifests: `kubernetes-validate` (the API's JSON schemas, strict:
//! unknown fields are errors) and Helm, both from the peers' virtualenv
//! (`tests/peers/requirements.txt`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cmd::run_timeout;
use crate::error::{Error, Result};
use crate::venv::python_venv;

pub use crate::sidecar::workspace_root;

/// Kubernetes versions every manifest is validated against: the oldest with native sidecars
/// (init containers with `restartPolicy: Always`, beta and on by default since 1.29) and the
/// newest schema set `kubernetes-validate` carries.
pub const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

/// How long one validation or Helm command may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A program installed in the virtualenv's `bin/` (next to its interpreter), e.g. `helm`.
pub fn venv_bin(name: &str) -> PathBuf {
    let python = python_venv();
    python
        .parent()
        .map(|bin| bin.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Validates every document of every file against the schemas of each of
/// [`KUBERNETES_VERSIONS`], strictly. The error carries the validator's output (which names the
/// file, the document and the field).
pub fn kubernetes_validate(files: &[&Path]) -> Result<()> {
    let validator = venv_bin("kubernetes-validate");
    if !validator.is_file() {
        return Err(Error::Missing(format!(
            "{} (run `cargo xtask setup`, which installs tests/peers/requirements.txt into the \
             peers' virtualenv)",
            validator.display()
        )));
    }
    for version in KUBERNETES_VERSIONS {
        let mut cmd = Command::new(&validator);
        cmd.args(["--strict", "--no-warn", "-k", version])
            .args(files);
        let done = run_timeout(&mut cmd, TIMEOUT)?;
        if !done.status.success() || done.timed_out {
            return Err(Error::Unexpected(format!(
                "`{}` failed ({}):\n{}{}",
                done.command,
                done.status,
                done.stdout_str(),
                done.stderr_str()
            )));
        }
    }
    Ok(())
}

/// Validates manifests given as text (written to a temporary file first).
pub fn kubernetes_validate_text(name: &str, yaml: &str) -> Result<()> {
    let dir = crate::tempdir::TempDir::create(&format!("validate-{name}"))?;
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).map_err(|source| Error::Io {
        what: format!("writing {}", file.display()),
        source,
    })?;
    kubernetes_validate(&[&file])
}

/// Runs the virtualenv's `helm` with `args`; returns its standard output.
pub fn helm(args: &[&str]) -> Result<String> {
    let helm = venv_bin("helm");
    if !helm.is_file() {
        return Err(Error::Missing(format!(
            "{} (run `cargo xtask setup`: the helm-binary package of tests/peers/requirements.txt)",
            helm.display()
        )));
    }
    let mut cmd = Command::new(&helm);
    cmd.args(args);
    let done = run_timeout(&mut cmd, TIMEOUT)?.ok()?;
    Ok(done.stdout_str())
}
