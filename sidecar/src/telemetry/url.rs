//! `url.full` for CLIENT spans: rebuilds the URL from the request line and `Host` header, drops
//! userinfo and replaces the values of secret query parameters by `REDACTED`.

use std::fmt::Write as _;
use std::net::SocketAddr;

/// Query parameters whose values are never recorded by default. The one place the default list
/// lives; [`Redactor::new`] takes another list (`--redact-query-params`), which replaces it.
pub const DEFAULT_REDACTED_QUERY_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "password",
    "secret",
    "api_key",
    "sig",
];

/// What replaces a redacted value.
pub const REDACTED: &str = "REDACTED";

/// Replaces the values of configured query parameters (names compared ASCII case-insensitively).
#[derive(Clone, Debug)]
pub struct Redactor {
    names: Box<[Box<str>]>,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new(DEFAULT_REDACTED_QUERY_PARAMS.iter().copied())
    }
}

impl Redactor {
    /// A redactor for these parameter names (surrounding blanks trimmed, empty names ignored).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            names: names
                .into_iter()
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(Box::from)
                .collect(),
        }
    }

    fn is_secret(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// Appends `query` (without the leading `?`) to `out`, redacting secret values.
    pub(crate) fn push_query(&self, out: &mut String, query: &str) {
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) if self.is_secret(name) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                _ => out.push_str(pair),
            }
        }
    }

    /// Appends `path?query#fragment` to `out` with the query redacted.
    fn push_path_and_query(&self, out: &mut String, rest: &str) {
        let (before_fragment, fragment) = match rest.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (rest, None),
        };
        match before_fragment.split_once('?') {
            Some((path, query)) => {
                out.push_str(path);
                out.push('?');
                self.push_query(out, query);
            }
            None => out.push_str(before_fragment),
        }
        if let Some(f) = fragment {
            out.push('#');
            out.push_str(f);
        }
    }

    /// `url.full` of a request: `http://host[:port]/path?query` from the request target, the
    /// `Host` header (or the destination when there is none), userinfo dropped and secret query
    /// values redacted.
    pub fn url_full(&self, target: &str, host: Option<&str>, destination: SocketAddr) -> String {
        let mut out = String::with_capacity(16 + target.len() + host.map_or(24, str::len));
        if let Some((scheme, rest)) = split_absolute(target) {
            for b in scheme.bytes() {
                out.push(char::from(b.to_ascii_lowercase()));
            }
            out.push_str("://");
            let (authority, path) = split_authority(rest);
            out.push_str(strip_userinfo(authority));
            self.push_path_and_query(&mut out, path);
            return out;
        }
        out.push_str("http://");
        match host.map(str::trim).filter(|h| !h.is_empty()) {
            Some(h) => out.push_str(strip_userinfo(h)),
            None => push_destination(&mut out, destination),
        }
        if target.starts_with('/') {
            self.push_path_and_query(&mut out, target);
        }
        // Authority-form (CONNECT) and asterisk-form (`OPTIONS *`) have no path to add.
        out
    }
}

/// `(scheme, rest after "://")` of an absolute-form request target.
fn split_absolute(target: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = target.split_once("://")?;
    let valid = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    valid.then_some((scheme, rest))
}

/// Splits `authority/path?query` into the authority and the rest (which starts with `/`, `?`,
/// `#` or is empty).
fn split_authority(rest: &str) -> (&str, &str) {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.split_at(end)
}

fn strip_userinfo(authority: &str) -> &str {
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
}

/// The authority of an absolute-form target (`http://authority/...`), if it is one.
pub fn absolute_authority(target: &str) -> Option<&str> {
    let (_, rest) = split_absolute(target)?;
    let (authority, _) = split_authority(rest);
    Some(strip_userinfo(authority)).filter(|a| !a.is_empty())
}

fn push_destination(out: &mut String, destination: SocketAddr) {
    // Writing to a String cannot fail.
    let _ = match destination {
        SocketAddr::V4(a) => write!(out, "{}", a.ip()),
        SocketAddr::V6(a) => write!(out, "[{}]", a.ip()),
    };
    if destination.port() != 80 {
        let _ = write!(out, ":{}", destination.port());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst() -> SocketAddr {
        "10.0.0.9:8080".parse().unwrap()
    }

    #[test]
    fn origin_form_uses_host_header() {
        let r = Redactor::default();
        assert_eq!(
            r.url_full("/a/b?x=1", Some("svc.local:8080"), dst()),
            "http://svc.local:8080/a/b?x=1"
        );
    }

    #[test]
    fn origin_form_without_host_uses_destination() {
        let r = Redactor::default();
        assert_eq!(r.url_full("/p", None, dst()), "http://10.0.0.9:8080/p");
        assert_eq!(
            r.url_full("/p", None, "[fd00::1]:80".parse().unwrap()),
            "http://[fd00::1]/p"
        );
    }

    #[test]
    fn secret_query_values_are_redacted() {
        let r = Redactor::default();
        let url = r.url_full(
            "/cb?token=abc&keep=1&Password=hunter2&sig=zz&api_key=k&flag&access_token=t&secret=s",
            Some("h"),
            dst(),
        );
        assert_eq!(
            url,
            "http://h/cb?token=REDACTED&keep=1&Password=REDACTED&sig=REDACTED&api_key=REDACTED\
             &flag&access_token=REDACTED&secret=REDACTED"
        );
        for secret in ["abc", "hunter2", "zz", "=k", "=t", "=s"] {
            assert!(!url.contains(secret), "{secret} leaked in {url}");
        }
    }

    #[test]
    fn absolute_form_drops_userinfo_and_redacts() {
        let r = Redactor::default();
        assert_eq!(
            r.url_full(
                "HTTP://alice:pw@Example.com:81/x?sig=1&y=2#frag",
                Some("ignored"),
                dst()
            ),
            "http://Example.com:81/x?sig=REDACTED&y=2#frag"
        );
        assert_eq!(
            absolute_authority("http://u@h:1/p"),
            Some("h:1"),
            "authority without userinfo"
        );
        assert_eq!(absolute_authority("/p"), None);
    }

    #[test]
    fn configured_list_replaces_default() {
        let r = Redactor::new(["session"]);
        assert_eq!(
            r.url_full("/?session=1&token=2", Some("h"), dst()),
            "http://h/?session=REDACTED&token=2"
        );
    }

    #[test]
    fn configured_names_are_case_insensitive_and_blank_names_ignored() {
        let r = Redactor::new([" X ", "", "Session"]);
        let mut out = String::new();
        r.push_query(&mut out, "x=1&X=2&SESSION=s&session=t&=v&token=keep");
        assert_eq!(
            out,
            "x=REDACTED&X=REDACTED&SESSION=REDACTED&session=REDACTED&=v&token=keep"
        );
        let none = Redactor::new([]);
        let mut out = String::new();
        none.push_query(&mut out, "token=abc");
        assert_eq!(out, "token=abc", "an empty list redacts nothing");
    }

    #[test]
    fn host_header_userinfo_and_asterisk_form() {
        let r = Redactor::default();
        assert_eq!(r.url_full("*", Some("u:p@h:9"), dst()), "http://h:9");
        assert_eq!(r.url_full("h2:443", Some("h2:443"), dst()), "http://h2:443");
    }
}
