//! Loading the configuration of `sidecar run` / `sidecar config`: flags, environment variables
//! and the TOML config file, merged with clap so that every source goes through the same
//! value parsers, and the source of every value remembered.
//!
//! How: the command line is parsed once by a copy of the CLI whose arguments read no
//! environment; that tells which settings the command line sets. Every other setting takes its
//! value from the environment (an injected lookup, so tests need not touch the process
//! environment), else from the config file, and those values are appended to the command line
//! as `--key=value` for a second, final parse. A value that parse rejects is reported under the
//! name the user gave it: the environment variable or the file and key.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches};

use super::{ConfigError, RunConfig};
use crate::cli::{Cli, Command, RunArgs, ShowFormat};

/// Reads an environment variable: the process environment in production, a map in tests.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Flag (and config-file key) naming the config file; the file cannot set it.
const CONFIG_KEY: &str = "config";

/// Settings whose value is a comma-separated list: the config file also accepts an array.
const LIST_KEYS: &[&str] = &[
    "exclude-outbound-ports",
    "exclude-outbound-cidrs",
    "include-outbound-cidrs",
    "exclude-inbound-ports",
    "include-inbound-ports",
    "routes",
    "redact-query-params",
    "otlp-headers",
    "otlp-traces-headers",
    "otlp-metrics-headers",
    "resource-attributes",
];

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The command line, e.g. `--outbound-port`.
    Flag(String),
    /// An environment variable, e.g. `SIDECAR_OUTBOUND_PORT`.
    Env(String),
    /// The config file, under `key`.
    File {
        /// The config file.
        path: PathBuf,
        /// The key in it, e.g. `outbound-port`.
        key: String,
    },
    /// The built-in default (or unset).
    Default,
}

impl Source {
    /// How an error message names the setting: exactly as the user supplied it (`--flag`,
    /// `ENV_VAR`, or `config file <path>: key `<key>``); `None` for a default.
    pub fn locate(&self) -> Option<String> {
        match self {
            Self::Flag(flag) => Some(flag.clone()),
            Self::Env(name) => Some(name.clone()),
            Self::File { path, key } => {
                Some(format!("config file {}: key `{key}`", path.display()))
            }
            Self::Default => None,
        }
    }
}

impl fmt::Display for Source {
    /// `flag --x`, `env X`, `file <path>` or `default`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag(flag) => write!(f, "flag {flag}"),
            Self::Env(name) => write!(f, "env {name}"),
            Self::File { path, .. } => write!(f, "file {}", path.display()),
            Self::Default => f.write_str("default"),
        }
    }
}

/// One setting of `sidecar run` with its effective raw value and source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Long flag name without `--`, also the config-file key, e.g. `outbound-port`.
    pub key: String,
    /// Environment variable that sets it, e.g. `SIDECAR_OUTBOUND_PORT`.
    pub env: Option<String>,
    /// The raw value (list items joined with `,`); `None` = unset.
    pub value: Option<String>,
    /// Where the value came from.
    pub source: Source,
    /// The value is a secret (`*headers*`): never printed.
    pub secret: bool,
}

impl Setting {
    /// The value as it may be printed: `<redacted>` for secrets, `<unset>` when unset.
    pub fn display_value(&self) -> &str {
        match &self.value {
            None => "<unset>",
            Some(_) if self.secret => "<redacted>",
            Some(v) => v,
        }
    }
}

/// The merged configuration of `sidecar run`, before the resolvers ran.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The parsed flags, every source merged.
    pub args: RunArgs,
    /// Every setting in the order of `sidecar run --help`.
    pub settings: Vec<Setting>,
}

impl Settings {
    /// The setting named `key` (long flag name without `--`).
    pub fn get(&self, key: &str) -> Option<&Setting> {
        self.settings.iter().find(|s| s.key == key)
    }

    /// Runs the export and resource resolvers; the error is `<where>: <problem>` with the
    /// setting named as the user supplied it.
    pub fn resolve(&self) -> Result<RunConfig, String> {
        self.check_redirect_policy()?;
        let export = self
            .args
            .export_options()
            .resolve()
            .map_err(|e| self.describe(&e))?;
        let resource = self
            .args
            .resource_options()
            .resolve()
            .map_err(|e| self.describe(&e))?;
        Ok(RunConfig {
            args: self.args.clone(),
            export,
            resource,
        })
    }

    /// The eBPF interception policy (`--exclude-*`, `--include-*`) only applies when the eBPF
    /// programs redirect: with `--redirect iptables` or `off`, setting any of it is an error
    /// naming the setting as supplied.
    fn check_redirect_policy(&self) -> Result<(), String> {
        let mode = self.args.redirect;
        if mode.redirects_in_kernel() {
            return Ok(());
        }
        let Some(policy) = crate::cli::POLICY_KEYS
            .iter()
            .filter_map(|key| self.get(key))
            .find(|s| s.value.is_some())
        else {
            return Ok(());
        };
        let place = policy
            .source
            .locate()
            .unwrap_or_else(|| format!("--{}", policy.key));
        let by = self
            .get("redirect")
            .and_then(|s| s.source.locate())
            .map(|p| format!(" (set by {p})"))
            .unwrap_or_default();
        let why = match mode {
            crate::ebpf::RedirectMode::Iptables => {
                "in this mode your iptables/nftables rules decide what is redirected, so the \
                 rules belong there (e.g. `-p tcp --dport 5432 -j RETURN` before the REDIRECT)"
            }
            _ => "nothing is redirected in this mode, so there is nothing to exclude or include",
        };
        Err(format!(
            "{place}: the eBPF interception policy does not apply with redirect mode `{mode}`{by}: \
             {why}; remove this setting or use --redirect ebpf"
        ))
    }

    /// `<where>: <problem>`: the resolvers name a setting by its environment variable; this
    /// names the flag, variable or config-file key that supplied the value.
    pub fn describe(&self, error: &ConfigError) -> String {
        let setting = self
            .settings
            .iter()
            .find(|s| s.env.as_deref() == Some(error.setting.as_str()));
        let place = setting
            .and_then(|s| match s.source {
                Source::Default => Some(format!("--{} (default)", s.key)),
                ref source => source.locate(),
            })
            .unwrap_or_else(|| error.setting.clone());
        let secret = setting.is_some_and(|s| s.secret) || error.setting.contains("HEADERS");
        let problem = if secret {
            redact_quoted(&error.problem)
        } else {
            error.problem.clone()
        };
        format!("{place}: {problem}")
    }
}

/// Replaces every `` `quoted` `` fragment of a message about a secret setting with
/// `<redacted>`: resolvers quote the offending value, which may be part of a credential.
fn redact_quoted(problem: &str) -> String {
    let mut out = String::with_capacity(problem.len());
    for (i, part) in problem.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("`<redacted>`");
        } else {
            out.push_str(part);
        }
    }
    out
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Loaded {
    /// `sidecar run`.
    Run(Settings),
    /// `sidecar config`.
    Config {
        /// The configuration to show.
        settings: Settings,
        /// `--format`.
        format: ShowFormat,
    },
    /// `sidecar check`.
    Check,
    /// `sidecar top`.
    Top(crate::top::TopArgs),
    /// `sidecar inject`.
    Inject(crate::inject::InjectArgs),
}

/// Why the configuration could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// A command-line problem, or `--help` / `--version`: print it as clap does (exit 0 when
    /// it goes to stdout, [`crate::cli::EXIT_USAGE`] otherwise).
    Usage(clap::Error),
    /// An invalid value from the environment or the config file, or an unusable config file:
    /// `<where>: <problem>`; exit [`crate::cli::EXIT_USAGE`].
    Invalid(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(e) => write!(f, "{e}"),
            Self::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for LoadError {}

/// One argument of `sidecar run`.
struct ArgInfo {
    id: String,
    key: String,
    env: Option<String>,
    list: bool,
}

fn run_args_table() -> Vec<ArgInfo> {
    let cmd = RunArgs::augment_args(clap::Command::new("run"));
    cmd.get_arguments()
        .filter_map(|arg| {
            let key = arg.get_long()?.to_owned();
            Some(ArgInfo {
                id: arg.get_id().to_string(),
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                list: arg.get_value_delimiter().is_some() || LIST_KEYS.contains(&key.as_str()),
                key,
            })
        })
        .collect()
}

/// The CLI with the environment switched off for `run` and `config` (the loader reads it).
fn parser_command() -> clap::Command {
    fn no_env(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|arg| arg.env(None::<&'static str>))
    }
    Cli::command()
        .mut_subcommand("run", no_env)
        .mut_subcommand("config", no_env)
}

/// Values of `*headers*` settings are credentials.
fn is_secret(key: &str) -> bool {
    key.contains("headers")
}

/// An environment value; empty counts as unset, as the OpenTelemetry specification says.
fn env_value(env: EnvLookup<'_>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

/// Parses `argv` (program name first) with `env` as the environment and reads the config file
/// it names.
pub fn load<I, T>(argv: I, env: EnvLookup<'_>) -> Result<Loaded, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let table = run_args_table();
    // Only the command line can be at fault here: the environment is not read yet.
    let first = parser_command().try_get_matches_from(&argv).map_err(|e| {
        attribute(with_env_in_help(e, &argv), |key| {
            table
                .iter()
                .find(|a| a.key == key)
                .map(|a| (format!("--{key}"), is_secret(&a.key)))
        })
    })?;
    let sub = match first.subcommand() {
        Some(("run" | "config", sub)) => sub,
        _ => {
            let cli = Cli::from_arg_matches(&first).map_err(LoadError::Usage)?;
            return match cli.command {
                Command::Check => Ok(Loaded::Check),
                Command::Top(args) => Ok(Loaded::Top(args)),
                Command::Inject(args) => Ok(Loaded::Inject(args)),
                Command::Run(_) | Command::Config(_) => Err(LoadError::Invalid(
                    "internal error: subcommand not recognised".to_owned(),
                )),
            };
        }
    };

    let on_command_line = |id: &str| matches!(sub.value_source(id), Some(ValueSource::CommandLine));
    let file = config_file(sub, &on_command_line, env)?;
    let file_values = match &file {
        Some((path, source)) => read_config_file(path, source, &table)?,
        None => BTreeMap::new(),
    };

    let mut injected: Vec<OsString> = Vec::new();
    let mut sources: Vec<(usize, Source)> = Vec::new();
    for (i, arg) in table.iter().enumerate() {
        let source = if on_command_line(&arg.id) {
            Source::Flag(format!("--{}", arg.key))
        } else if let Some((name, value)) = arg
            .env
            .as_ref()
            .and_then(|name| env_value(env, name).map(|v| (name, v)))
        {
            injected.push(format!("--{}={value}", arg.key).into());
            Source::Env(name.clone())
        } else if let (Some(value), Some((path, _))) = (file_values.get(&arg.key), &file) {
            injected.push(format!("--{}={value}", arg.key).into());
            Source::File {
                path: path.clone(),
                key: arg.key.clone(),
            }
        } else {
            Source::Default
        };
        sources.push((i, source));
    }

    let mut full = argv;
    full.extend(injected);
    let settings_of = |matches: &ArgMatches| -> Vec<Setting> {
        sources
            .iter()
            .map(|(i, source)| {
                let arg = &table[*i];
                Setting {
                    key: arg.key.clone(),
                    env: arg.env.clone(),
                    value: raw_value(matches, &arg.id),
                    source: source.clone(),
                    secret: is_secret(&arg.key),
                }
            })
            .collect()
    };
    let last = match parser_command().try_get_matches_from(&full) {
        Ok(m) => m,
        Err(e) => {
            let settings = settings_of(sub);
            return Err(attribute(e, |key| {
                let s = settings.iter().find(|s| s.key == key)?;
                s.source.locate().map(|place| (place, s.secret))
            }));
        }
    };
    let settings = match last.subcommand() {
        Some((_, sub)) => settings_of(sub),
        None => Vec::new(),
    };
    let cli = Cli::from_arg_matches(&last).map_err(LoadError::Usage)?;
    match cli.command {
        Command::Run(args) => Ok(Loaded::Run(Settings { args, settings })),
        Command::Config(c) => Ok(Loaded::Config {
            settings: Settings {
                args: c.run,
                settings,
            },
            format: c.format,
        }),
        Command::Check => Ok(Loaded::Check),
        Command::Top(args) => Ok(Loaded::Top(args)),
        Command::Inject(args) => Ok(Loaded::Inject(args)),
    }
}

/// Help and version text come from the full CLI, so that `--help` lists the environment
/// variables.
fn with_env_in_help(error: clap::Error, argv: &[OsString]) -> clap::Error {
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        | ErrorKind::DisplayVersion => Cli::command()
            .try_get_matches_from(argv)
            .err()
            .unwrap_or(error),
        _ => error,
    }
}

fn raw_value(matches: &ArgMatches, id: &str) -> Option<String> {
    let values = matches.try_get_raw(id).ok()??;
    let items: Vec<String> = values.map(|v| v.to_string_lossy().into_owned()).collect();
    Some(items.join(","))
}

/// The config file named by `--config` or `SIDECAR_CONFIG`, with that source.
fn config_file(
    sub: &ArgMatches,
    on_command_line: &dyn Fn(&str) -> bool,
    env: EnvLookup<'_>,
) -> Result<Option<(PathBuf, Source)>, LoadError> {
    if on_command_line(CONFIG_KEY) {
        let path = sub
            .try_get_one::<PathBuf>(CONFIG_KEY)
            .ok()
            .flatten()
            .cloned()
            .ok_or_else(|| LoadError::Invalid("--config: no file given".to_owned()))?;
        return Ok(Some((path, Source::Flag(format!("--{CONFIG_KEY}")))));
    }
    Ok(env_value(env, "SIDECAR_CONFIG")
        .map(|p| (PathBuf::from(p), Source::Env("SIDECAR_CONFIG".to_owned()))))
}

/// The config file's values by key, each as the string a flag would take.
fn read_config_file(
    path: &Path,
    source: &Source,
    table: &[ArgInfo],
) -> Result<BTreeMap<String, String>, LoadError> {
    let at =
        |problem: String| LoadError::Invalid(format!("config file {}: {problem}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| {
        let by = source.locate().unwrap_or_default();
        LoadError::Invalid(format!(
            "{by}: cannot read the config file {}: {e}",
            path.display()
        ))
    })?;
    let doc: toml::Table = toml::from_str(&text)
        .map_err(|e| at(format!("not valid TOML: {}", e.to_string().trim_end())))?;
    let mut values = BTreeMap::new();
    for (key, value) in doc {
        if key == CONFIG_KEY {
            return Err(at(format!(
                "key `{key}`: a config file cannot name another one (use --config or \
                 SIDECAR_CONFIG)"
            )));
        }
        let Some(arg) = table.iter().find(|a| a.key == key) else {
            let hint = closest(&key, table.iter().map(|a| a.key.as_str()))
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err(at(format!("unknown key `{key}`{hint}")));
        };
        let text = flag_value(&value, arg.list).map_err(|p| at(format!("key `{key}`: {p}")))?;
        values.insert(key, text);
    }
    Ok(values)
}

/// A TOML value as a flag value: strings as they are, numbers and booleans written out, arrays
/// (list settings only) joined with `,`.
fn flag_value(value: &toml::Value, list: bool) -> Result<String, String> {
    match value {
        toml::Value::Array(items) if list => items
            .iter()
            .map(|item| match item {
                toml::Value::Array(_) | toml::Value::Table(_) => Err(format!(
                    "list items must be strings or numbers, found {}",
                    kind(item)
                )),
                other => flag_value(other, false),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|items| items.join(",")),
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean{}, found {}",
            if list { " or an array of them" } else { "" },
            kind(other)
        )),
    }
}

fn kind(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// The known key nearest to `key` by edit distance, when close enough to be a typo.
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let key = key.replace('_', "-").to_ascii_lowercase();
    known
        .map(|k| (edit_distance(&key, k), k))
        .filter(|(d, k)| *d <= (k.len() / 4).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Turns a rejected value into `<where>: invalid value ...`, naming the flag, environment
/// variable or config-file key that supplied it (`place_of` maps a long flag name to that);
/// every other clap error (unknown flag, help) stays clap's own.
fn attribute(error: clap::Error, place_of: impl Fn(&str) -> Option<(String, bool)>) -> LoadError {
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return LoadError::Usage(error);
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return LoadError::Usage(error);
    };
    let key = arg
        .trim_start_matches('-')
        .split([' ', '='])
        .next()
        .unwrap_or_default();
    let Some((place, secret)) = place_of(key) else {
        return LoadError::Usage(error);
    };
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) if !secret => v.clone(),
        Some(_) => "<redacted>".to_owned(),
        None => String::new(),
    };
    let problem = if let Some(inner) = std::error::Error::source(&error) {
        format!("invalid value `{value}`: {inner}")
    } else if let Some(ContextValue::Strings(valid)) = error.get(ContextKind::ValidValue) {
        format!(
            "invalid value `{value}`; expected one of: {}",
            valid.join(", ")
        )
    } else {
        let text = error.to_string();
        let first = text.lines().next().unwrap_or_default();
        first.strip_prefix("error: ").unwrap_or(first).to_owned()
    };
    LoadError::Invalid(format!("{place}: {problem}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_without_environment_is_consistent() {
        parser_command().debug_assert();
        let table = run_args_table();
        assert!(
            table.iter().all(|a| a.env.is_some()),
            "every run flag has a variable"
        );
        let keys: Vec<&str> = table.iter().map(|a| a.key.as_str()).collect();
        for key in LIST_KEYS {
            assert!(keys.contains(key), "{key} is not a flag");
        }
    }

    #[test]
    fn suggestions_for_unknown_keys() {
        let keys = ["outbound-port", "inbound-port", "otlp-endpoint", "routes"];
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            closest("outbound-prot", keys.iter().copied()),
            Some("outbound-port")
        );
        assert_eq!(
            closest("otlp_endpoint", keys.iter().copied()),
            Some("otlp-endpoint")
        );
        assert_eq!(closest("colour", keys.iter().copied()), None);
    }

    #[test]
    fn toml_values_become_flag_values() {
        let v = |s: &str| -> toml::Value {
            toml::from_str::<toml::Table>(&format!("k = {s}")).unwrap()["k"].clone()
        };
        assert_eq!(flag_value(&v("\"a b\""), false).unwrap(), "a b");
        assert_eq!(flag_value(&v("15001"), false).unwrap(), "15001");
        assert_eq!(flag_value(&v("0.25"), false).unwrap(), "0.25");
        assert_eq!(flag_value(&v("true"), false).unwrap(), "true");
        assert_eq!(
            flag_value(&v("[80, \"8000-8100\"]"), true).unwrap(),
            "80,8000-8100"
        );
        assert!(flag_value(&v("[80]"), false)
            .unwrap_err()
            .contains("found an array"));
        assert!(flag_value(&v("[[80]]"), true)
            .unwrap_err()
            .contains("found an array"));
        assert!(flag_value(&v("1979-05-27"), false)
            .unwrap_err()
            .contains("date-time"));
    }

    #[test]
    fn quoted_fragments_of_secret_errors_are_redacted() {
        assert_eq!(
            redact_quoted("`tok` is not a key=value pair; `x`"),
            "`<redacted>` is not a key=value pair; `<redacted>`"
        );
        assert_eq!(redact_quoted("no quotes"), "no quotes");
    }
}
