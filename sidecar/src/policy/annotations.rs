//! Pod annotations from the Downward API file (`key="value"` lines, Go-quoted, as the kubelet
//! writes them) and the interception settings they carry under Istio, Linkerd and our own names.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::Path;

use ipnet::IpNet;

use super::lists::{parse_cidrs, parse_ports, CidrSelection, PortSelection};
use super::PolicyError;

/// The pod's annotations, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotations {
    entries: BTreeMap<String, String>,
}

/// A line of the annotations file that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineIssue {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for LineIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl Annotations {
    /// Parses the Downward API annotations file: one `key="value"` per line, the value quoted
    /// with Go escapes (`\"`, `\\`, `\n`, `\t`, `\xNN`, `\uNNNN`, ...). An unquoted value is
    /// taken literally. Blank lines are skipped; malformed lines are skipped and returned as
    /// issues, the rest still parsed. A repeated key keeps its last value.
    pub fn parse(text: &str) -> (Self, Vec<LineIssue>) {
        let mut entries = BTreeMap::new();
        let mut issues = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            let Some((key, raw)) = trimmed.split_once('=') else {
                issues.push(LineIssue {
                    line: line_no,
                    reason: format!("no `=` in {:?}; expected key=\"value\"", shorten(trimmed)),
                });
                continue;
            };
            let key = key.trim();
            if key.is_empty() {
                issues.push(LineIssue {
                    line: line_no,
                    reason: "empty key".to_string(),
                });
                continue;
            }
            let raw = raw.trim();
            let value = if raw.starts_with('"') {
                match unquote_go(raw) {
                    Ok(v) => v,
                    Err(reason) => {
                        issues.push(LineIssue {
                            line: line_no,
                            reason: format!("value of {key}: {reason}"),
                        });
                        continue;
                    }
                }
            } else {
                raw.to_string()
            };
            entries.insert(key.to_string(), value);
        }
        (Self { entries }, issues)
    }

    /// Reads and parses the file at `path`. A missing file is no annotations, not an error.
    pub fn load(path: &Path) -> Result<(Self, Vec<LineIssue>), PolicyError> {
        match read_text(path)? {
            Some(text) => Ok(Self::parse(&text)),
            None => Ok((Self::default(), Vec::new())),
        }
    }

    /// Builds annotations from pairs (tests, callers with annotations from elsewhere).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            entries: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// Number of annotations.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// At most 80 characters of `s`, for messages.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_string(),
    }
}

/// The file's text, or `None` when it does not exist. Invalid UTF-8 is replaced, not fatal.
pub(crate) fn read_text(path: &Path) -> Result<Option<String>, PolicyError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PolicyError::ReadAnnotations {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Decodes a Go double-quoted string literal (what `strconv.Quote` / `%q` produce).
fn unquote_go(s: &str) -> Result<String, String> {
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .filter(|_| s.len() >= 2)
        .ok_or_else(|| "unterminated quoted string".to_string())?;
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Err("unescaped `\"` inside the quoted value".to_string()),
            '\\' => {
                let esc = chars
                    .next()
                    .ok_or_else(|| "dangling `\\` at the end of the value".to_string())?;
                match esc {
                    'a' => out.push(0x07),
                    'b' => out.push(0x08),
                    'f' => out.push(0x0c),
                    'n' => out.push(b'\n'),
                    'r' => out.push(b'\r'),
                    't' => out.push(b'\t'),
                    'v' => out.push(0x0b),
                    '\\' => out.push(b'\\'),
                    '"' => out.push(b'"'),
                    'x' => out.push(byte_from(&mut chars, "\\x")?),
                    '0'..='7' => {
                        let rest: String = chars.by_ref().take(2).collect();
                        let digits = format!("{esc}{rest}");
                        let value = (digits.len() == 3)
                            .then(|| u32::from_str_radix(&digits, 8).ok())
                            .flatten()
                            .and_then(|v| u8::try_from(v).ok())
                            .ok_or_else(|| format!("bad octal escape `\\{digits}`"))?;
                        out.push(value);
                    }
                    'u' => push_char(&mut out, scalar_from(&mut chars, 4, "\\u")?),
                    'U' => push_char(&mut out, scalar_from(&mut chars, 8, "\\U")?),
                    other => return Err(format!("unknown escape `\\{other}`")),
                }
            }
            other => push_char(&mut out, other),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

fn hex_digits(chars: &mut std::str::Chars<'_>, n: usize, what: &str) -> Result<u32, String> {
    let digits: String = chars.by_ref().take(n).collect();
    if digits.len() != n || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "bad escape `{what}{digits}`: expects {n} hex digits"
        ));
    }
    u32::from_str_radix(&digits, 16).map_err(|e| format!("bad escape `{what}{digits}`: {e}"))
}

fn byte_from(chars: &mut std::str::Chars<'_>, what: &str) -> Result<u8, String> {
    let v = hex_digits(chars, 2, what)?;
    u8::try_from(v).map_err(|_| format!("bad escape `{what}`: {v:#x} is not a byte"))
}

fn scalar_from(chars: &mut std::str::Chars<'_>, n: usize, what: &str) -> Result<char, String> {
    let v = hex_digits(chars, n, what)?;
    char::from_u32(v).ok_or_else(|| format!("bad escape `{what}`: {v:#x} is not a Unicode scalar"))
}

/// A policy setting an annotation can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Outbound destination ports never redirected.
    ExcludeOutboundPorts,
    /// Outbound destination networks never redirected.
    ExcludeOutboundCidrs,
    /// Only these outbound networks are redirected (`*` = all, empty = none).
    IncludeOutboundCidrs,
    /// Inbound ports never steered.
    ExcludeInboundPorts,
    /// Only these inbound ports are steered (`*` = all served ports, empty = none).
    IncludeInboundPorts,
}

/// Every annotation name read, with its setting. For the include settings the first valid one
/// in this order wins (ours before Istio's); exclusions from every name are merged.
pub const ANNOTATION_NAMES: &[(&str, Setting)] = &[
    (
        "sidecar.dev/exclude-outbound-ports",
        Setting::ExcludeOutboundPorts,
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        Setting::ExcludeOutboundPorts,
    ),
    (
        "config.linkerd.io/skip-outbound-ports",
        Setting::ExcludeOutboundPorts,
    ),
    (
        "sidecar.dev/exclude-outbound-cidrs",
        Setting::ExcludeOutboundCidrs,
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        Setting::ExcludeOutboundCidrs,
    ),
    (
        "sidecar.dev/include-outbound-cidrs",
        Setting::IncludeOutboundCidrs,
    ),
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        Setting::IncludeOutboundCidrs,
    ),
    (
        "sidecar.dev/exclude-inbound-ports",
        Setting::ExcludeInboundPorts,
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        Setting::ExcludeInboundPorts,
    ),
    (
        "config.linkerd.io/skip-inbound-ports",
        Setting::ExcludeInboundPorts,
    ),
    (
        "sidecar.dev/include-inbound-ports",
        Setting::IncludeInboundPorts,
    ),
    (
        "traffic.sidecar.istio.io/includeInboundPorts",
        Setting::IncludeInboundPorts,
    ),
];

/// An annotation whose value was malformed and is ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueIssue {
    /// The annotation name.
    pub key: String,
    /// Its value as written.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ValueIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {}={:?} ignored: {}",
            self.key, self.value, self.reason
        )
    }
}

/// The interception settings the annotations carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnnotationSettings {
    /// Union of every outbound port exclusion annotation.
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Union of every outbound network exclusion annotation.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// The outbound include list, when annotated.
    pub include_outbound_cidrs: Option<CidrSelection>,
    /// Union of every inbound port exclusion annotation.
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// The inbound include list, when annotated.
    pub include_inbound_ports: Option<PortSelection>,
    /// The recognised annotations that were applied, by name.
    pub applied: Vec<String>,
}

impl AnnotationSettings {
    /// Reads the settings out of the annotations; malformed values are returned as issues and
    /// ignored, every other annotation still applies.
    pub fn from_annotations(annotations: &Annotations) -> (Self, Vec<ValueIssue>) {
        let mut s = Self::default();
        let mut issues = Vec::new();
        let mut exclude_cidrs: BTreeSet<IpNet> = BTreeSet::new();
        for &(key, setting) in ANNOTATION_NAMES {
            let Some(value) = annotations.get(key) else {
                continue;
            };
            let outcome = match setting {
                Setting::ExcludeOutboundPorts => parse_ports(value)
                    .map(|p| s.exclude_outbound_ports.extend(p))
                    .map_err(|e| e.to_string()),
                Setting::ExcludeInboundPorts => parse_ports(value)
                    .map(|p| s.exclude_inbound_ports.extend(p))
                    .map_err(|e| e.to_string()),
                Setting::ExcludeOutboundCidrs => parse_cidrs(value)
                    .map(|n| exclude_cidrs.extend(n))
                    .map_err(|e| e.to_string()),
                Setting::IncludeOutboundCidrs if s.include_outbound_cidrs.is_some() => {
                    Err("overridden by a higher-priority include annotation".to_string())
                }
                Setting::IncludeOutboundCidrs => CidrSelection::parse_allow_empty(value)
                    .map(|sel| s.include_outbound_cidrs = Some(sel))
                    .map_err(|e| e.to_string()),
                Setting::IncludeInboundPorts if s.include_inbound_ports.is_some() => {
                    Err("overridden by a higher-priority include annotation".to_string())
                }
                Setting::IncludeInboundPorts => PortSelection::parse_allow_empty(value)
                    .map(|sel| s.include_inbound_ports = Some(sel))
                    .map_err(|e| e.to_string()),
            };
            match outcome {
                Ok(()) => s.applied.push(key.to_string()),
                Err(reason) => issues.push(ValueIssue {
                    key: key.to_string(),
                    value: value.to_string(),
                    reason,
                }),
            }
        }
        s.exclude_outbound_cidrs = exclude_cidrs.into_iter().collect();
        (s, issues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> BTreeSet<u16> {
        ports.iter().copied().collect()
    }

    #[test]
    fn parses_kubelet_format_with_go_escapes() {
        // As the kubelet writes it: sorted keys, `%q` values.
        let text = concat!(
            "config.linkerd.io/skip-outbound-ports=\"4567-4569,25\"\n",
            "kubectl.kubernetes.io/last-applied-configuration=\"{\\\"apiVersion\\\":\\\"v1\\\"}\\n\"\n",
            "note=\"tab\\there \\\\ back \\x41\\101\\u00e9\\U0001F600 caf\u{e9}\"\n",
            "\n",
            "traffic.sidecar.istio.io/excludeOutboundPorts=\"3306, 6379\"\n",
        );
        let (a, issues) = Annotations::parse(text);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(a.len(), 4);
        assert_eq!(
            a.get("config.linkerd.io/skip-outbound-ports"),
            Some("4567-4569,25")
        );
        assert_eq!(
            a.get("kubectl.kubernetes.io/last-applied-configuration"),
            Some("{\"apiVersion\":\"v1\"}\n")
        );
        assert_eq!(
            a.get("note"),
            Some("tab\there \\ back AA\u{e9}\u{1F600} caf\u{e9}")
        );
    }

    #[test]
    fn malformed_lines_are_reported_and_skipped() {
        let text = concat!(
            "good=\"1\"\n",
            "no equals sign\n",
            "=\"no key\"\n",
            "open=\"unterminated\n",
            "inner=\"a\"b\"\n",
            "badesc=\"\\q\"\n",
            "shorthex=\"\\x4\"\n",
            "dangling=\"abc\\\"\n",
            "plain=value without quotes\n",
            "good=\"2\"\n",
        );
        let (a, issues) = Annotations::parse(text);
        let lines: Vec<usize> = issues.iter().map(|i| i.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 8], "{issues:?}");
        assert!(issues[0].to_string().starts_with("line 2: no `=`"));
        let long = "x".repeat(500);
        let (_, long_issues) = Annotations::parse(&long);
        assert!(long_issues[0].reason.len() < 150, "{}", long_issues[0]);
        assert!(
            issues[4].reason.contains("unknown escape `\\q`"),
            "{issues:?}"
        );
        // The last value of a repeated key wins; unquoted values are literal.
        assert_eq!(a.get("good"), Some("2"));
        assert_eq!(a.get("plain"), Some("value without quotes"));
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn missing_file_is_no_annotations_and_a_directory_is_an_error() {
        let dir = std::env::temp_dir();
        let (a, issues) = Annotations::load(&dir.join("sidecar-no-such-annotations-file")).unwrap();
        assert!(a.is_empty() && issues.is_empty());
        let err = Annotations::load(&dir).unwrap_err();
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn istio_and_linkerd_names_merge_exclusions() {
        let a = Annotations::from_pairs([
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "3306, 6379",
            ),
            ("config.linkerd.io/skip-outbound-ports", "4567-4569"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "9090"),
            ("config.linkerd.io/skip-inbound-ports", "25,8000-8001"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "169.254.169.254/32, 10.0.0.0/8",
            ),
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080,9090"),
            ("unrelated.example.com/thing", "whatever"),
        ]);
        let (s, issues) = AnnotationSettings::from_annotations(&a);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            s.exclude_outbound_ports,
            set(&[3306, 6379, 4567, 4568, 4569])
        );
        assert_eq!(s.exclude_inbound_ports, set(&[9090, 25, 8000, 8001]));
        let nets: Vec<String> = s
            .exclude_outbound_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "169.254.169.254/32"]);
        assert_eq!(s.include_outbound_cidrs, Some(CidrSelection::All));
        assert_eq!(
            s.include_inbound_ports,
            Some(PortSelection::Only(set(&[8080, 9090])))
        );
        assert_eq!(s.applied.len(), 7);
    }

    #[test]
    fn malformed_values_are_ignored_and_the_rest_applies() {
        let a = Annotations::from_pairs([
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "3306,mysql",
            ),
            ("config.linkerd.io/skip-outbound-ports", "25"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/40",
            ),
            ("sidecar.dev/include-inbound-ports", "80-"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080"),
        ]);
        let (s, issues) = AnnotationSettings::from_annotations(&a);
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "sidecar.dev/include-inbound-ports",
            ]
        );
        assert!(issues[0].to_string().contains("`mysql`"), "{}", issues[0]);
        // Not even 3306 from the malformed value: the whole annotation is ignored.
        assert_eq!(s.exclude_outbound_ports, set(&[25]));
        assert!(s.exclude_outbound_cidrs.is_empty());
        // Ours was malformed, so Istio's include applies.
        assert_eq!(
            s.include_inbound_ports,
            Some(PortSelection::Only(set(&[8080])))
        );
    }

    #[test]
    fn our_include_names_win_over_istio_and_empty_means_none() {
        let a = Annotations::from_pairs([
            ("sidecar.dev/include-outbound-cidrs", ""),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.0.0.0/8",
            ),
            ("traffic.sidecar.istio.io/includeInboundPorts", ""),
        ]);
        let (s, issues) = AnnotationSettings::from_annotations(&a);
        assert_eq!(s.include_outbound_cidrs, Some(CidrSelection::Only(vec![])));
        assert_eq!(s.include_inbound_ports, Some(PortSelection::Only(set(&[]))));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].reason.contains("overridden"), "{issues:?}");
    }
}
