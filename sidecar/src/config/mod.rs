//! Configuration: flags, environment and an optional TOML file, with the source of every value.
//!
//! Precedence, highest first: command-line flag > environment variable > config file >
//! built-in default. An environment variable set to the empty string counts as unset.
//!
//! CONTRACT: [`ConfigError`] is what every resolver returns for a bad value; the CLI prints it
//! and exits with [`crate::cli::EXIT_USAGE`].

use std::fmt;

use crate::cli::RunArgs;
use crate::export::config::ExportSettings;
use crate::telemetry::resource::ResourceAttribute;

mod load;
pub mod show;

pub use load::{load, EnvLookup, LoadError, Loaded, Setting, Settings, Source};

/// Everything `sidecar run` needs, validated: the merged flags and the resolved export and
/// resource settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Every flag, environment variable and config-file value, merged.
    pub args: RunArgs,
    /// Resolved OTLP export settings.
    pub export: ExportSettings,
    /// Resolved resource attributes with their sources.
    pub resource: Vec<ResourceAttribute>,
}

/// A configuration value that cannot be used: which setting, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Canonical name of the setting: the environment variable that sets it
    /// (e.g. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); the CLI translates it into the flag or file
    /// key that actually supplied the value.
    pub setting: String,
    /// What is wrong, e.g. "`grpcx` is not one of grpc, http/protobuf".
    pub problem: String,
}

impl ConfigError {
    /// An error for `setting`.
    pub fn new(setting: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.problem)
    }
}
