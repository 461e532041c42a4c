//! The Python virtualenv of the peers that need PyPI packages (grpcio, websockets): where its
//! interpreter is and whether it has what `tests/peers/requirements.txt` lists.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::cmd::run_timeout;
use crate::error::{Error, Result};
use crate::sidecar::workspace_root;

/// Environment variable naming the virtualenv's interpreter (`cargo xtask test` sets it).
pub const PYTHON_ENV: &str = "SIDECAR_TESTS_PYTHON";

/// Modules the peers import from the virtualenv (see `tests/peers/requirements.txt`).
pub const MODULES: &[&str] = &["grpc", "websockets"];

/// The virtualenv's interpreter: `$SIDECAR_TESTS_PYTHON`, else `<workspace>/.venv/bin/python3`
/// (where `cargo xtask setup` creates it).
pub fn python_venv() -> PathBuf {
    match std::env::var_os(PYTHON_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".venv/bin/python3"),
    }
}

/// [`python_venv`] as a string, for command lines.
pub fn python_venv_str() -> String {
    python_venv().to_string_lossy().into_owned()
}

/// Checks that the interpreter exists and imports every module of [`MODULES`]; the error says
/// how to get them.
pub fn check() -> Result<()> {
    let python = python_venv();
    if !python.is_file() {
        return Err(Error::Missing(format!(
            "the peers' Python virtualenv at {} (create it with `cargo xtask setup`, or point \
             {PYTHON_ENV} at an interpreter with `pip install -r tests/peers/requirements.txt`)",
            python.display()
        )));
    }
    let script = format!("import {}", MODULES.join(", "));
    let out = run_timeout(
        Command::new(&python).args(["-c", &script]),
        Duration::from_secs(60),
    )?;
    if out.success() {
        return Ok(());
    }
    Err(Error::Missing(format!(
        "Python modules {} in {} (run `cargo xtask setup`, or `{} -m pip install -r \
         tests/peers/requirements.txt`): {}",
        MODULES.join(", "),
        python.display(),
        python.display(),
        out.stderr_str().trim()
    )))
}
