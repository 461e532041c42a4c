//! `http.route` of inbound requests: configured templates (`/users/{id}`), a heuristic for
//! paths no template matches, and a cap on the number of distinct routes (beyond it `_OTHER`).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

/// Attribute name (semantic conventions): the matched route template of a server request.
pub const HTTP_ROUTE: &str = "http.route";

/// The route recorded once the cap on distinct routes is reached.
pub const OTHER_ROUTE: &str = "_OTHER";

/// Default cap on distinct routes per sidecar (`--max-routes`).
pub const DEFAULT_MAX_ROUTES: usize = 100;

/// What a heuristic route puts in place of an identifier-like segment.
pub const ID_PLACEHOLDER: &str = "{id}";

/// A route template that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The template does not start with `/`.
    #[error("route template {0:?} must start with '/'")]
    NotAbsolute(String),
    /// A segment opens `{` without a closing `}`, has an empty name, or mixes a placeholder
    /// with literal text.
    #[error("route template {template:?} has an invalid segment {segment:?}")]
    BadSegment {
        /// The whole template.
        template: String,
        /// The offending segment.
        segment: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Param,
}

/// One parsed template such as `/orders/{order}/items/{item}`.
#[derive(Clone, Debug)]
struct Template {
    text: Box<str>,
    segments: Vec<Segment>,
}

impl Template {
    fn parse(text: &str) -> Result<Self, RouteError> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(RouteError::NotAbsolute(text.to_owned()));
        };
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if let Some(inner) = seg.strip_prefix('{') {
                let valid = inner
                    .strip_suffix('}')
                    .is_some_and(|name| !name.is_empty() && !name.contains(['{', '}']));
                if !valid {
                    return Err(RouteError::BadSegment {
                        template: text.to_owned(),
                        segment: seg.to_owned(),
                    });
                }
                segments.push(Segment::Param);
            } else if seg.contains(['{', '}']) {
                return Err(RouteError::BadSegment {
                    template: text.to_owned(),
                    segment: seg.to_owned(),
                });
            } else {
                segments.push(Segment::Literal(seg.into()));
            }
        }
        Ok(Self {
            text: text.into(),
            segments,
        })
    }

    /// True when `path` (no query) has as many segments and every literal segment is equal;
    /// a `{name}` segment matches any one segment.
    fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match (seg, parts.next()) {
                (_, None) => return false,
                (Segment::Param, Some(_)) => {}
                (Segment::Literal(l), Some(p)) if **l == *p => {}
                (Segment::Literal(_), Some(_)) => return false,
            }
        }
        parts.next().is_none()
    }
}

/// Maps request paths to `http.route` values and caps how many distinct values are recorded.
#[derive(Debug)]
pub struct RouteTable {
    templates: Vec<Template>,
    max_routes: usize,
    seen: Mutex<HashSet<Box<str>>>,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self {
            templates: Vec::new(),
            max_routes: DEFAULT_MAX_ROUTES,
            seen: Mutex::new(HashSet::new()),
        }
    }
}

impl RouteTable {
    /// A table over these templates (first match wins) and at most `max_routes` distinct
    /// routes.
    pub fn new<S: AsRef<str>>(
        templates: impl IntoIterator<Item = S>,
        max_routes: usize,
    ) -> Result<Self, RouteError> {
        let templates = templates
            .into_iter()
            .map(|t| Template::parse(t.as_ref().trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            templates,
            max_routes,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// The `http.route` of `path` (the path only, no query): the first matching template,
    /// else the heuristic route; `_OTHER` once `max_routes` other routes have been recorded.
    pub fn route(&self, path: &str) -> String {
        let route = match self.templates.iter().find(|t| t.matches(path)) {
            Some(t) => t.text.to_string(),
            None => heuristic_route(path),
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(route.as_str()) {
            return route;
        }
        if seen.len() >= self.max_routes {
            return OTHER_ROUTE.to_owned();
        }
        seen.insert(route.as_str().into());
        route
    }
}

/// The path with every identifier-like segment replaced by `{id}` (see [`is_identifier`]).
pub fn heuristic_route(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if is_identifier(seg) {
            out.push_str(ID_PLACEHOLDER);
        } else {
            out.push_str(seg);
        }
    }
    out
}

/// A segment is an identifier when it is
/// - all ASCII digits (`42`), or
/// - a UUID (`8-4-4-4-12` hex digits), or
/// - at least 16 characters, all hex digits (`5f0c3e9a1b2d4c6e`), or
/// - at least 20 characters from the base64/base64url alphabet (`A-Z a-z 0-9 + / - _ =`, no
///   `/` inside a segment) with at least one digit and at least one letter.
pub fn is_identifier(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let b = seg.as_bytes();
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    if is_uuid(b) {
        return true;
    }
    if b.len() >= 16 && b.iter().all(u8::is_ascii_hexdigit) {
        return true;
    }
    b.len() >= 20
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'_' | b'='))
        && b.iter().any(u8::is_ascii_digit)
        && b.iter().any(u8::is_ascii_alphabetic)
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_whole_segments() {
        let t = RouteTable::new(["/users/{id}", "/orders/{order}/items/{item}", "/"], 100).unwrap();
        assert_eq!(t.route("/users/42"), "/users/{id}");
        assert_eq!(t.route("/users/alice"), "/users/{id}");
        assert_eq!(
            t.route("/orders/7/items/x9"),
            "/orders/{order}/items/{item}"
        );
        assert_eq!(t.route("/"), "/");
        // Not a template match: too many / too few segments, other literal.
        assert_eq!(t.route("/users/42/posts"), "/users/{id}/posts");
        assert_eq!(t.route("/users"), "/users");
        assert_eq!(t.route("/Users/bob"), "/Users/bob");
        assert_eq!(t.route("/orders/7/items"), "/orders/{id}/items");
    }

    #[test]
    fn bad_templates_are_errors() {
        assert_eq!(
            RouteTable::new(["users/{id}"], 1).unwrap_err(),
            RouteError::NotAbsolute("users/{id}".into())
        );
        for bad in ["/a/{}", "/a/{id", "/a/x{id}", "/a/{i{d}}"] {
            assert!(
                matches!(
                    RouteTable::new([bad], 1),
                    Err(RouteError::BadSegment { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn heuristic_replaces_identifier_segments() {
        assert_eq!(heuristic_route("/users/42"), "/users/{id}");
        assert_eq!(
            heuristic_route("/o/123e4567-e89b-12d3-a456-426614174000/x"),
            "/o/{id}/x"
        );
        assert_eq!(heuristic_route("/blob/5f0c3e9a1b2d4c6e"), "/blob/{id}");
        assert_eq!(heuristic_route("/t/dGhpcyBpcyBhIHRva2VuMTIz"), "/t/{id}");
        // Words, short hex and version-like segments stay.
        assert_eq!(heuristic_route("/api/v2/cafe/users"), "/api/v2/cafe/users");
        assert_eq!(heuristic_route("/"), "/");
        assert_eq!(heuristic_route("/a//b/"), "/a//b/");
        assert_eq!(
            heuristic_route("/averyveryverylongwordwithoutdigits"),
            "/averyveryverylongwordwithoutdigits"
        );
        assert!(!is_identifier("123e4567-e89b-12d3"));
        assert!(!is_identifier("release-notes-v2"));
        assert!(
            is_identifier("123e4567-e89b-12d3-a456-42661417400g"),
            "base64url-like"
        );
        assert!(!is_identifier(""));
    }

    #[test]
    fn cap_turns_new_routes_into_other() {
        let t = RouteTable::new(["/users/{id}"], 3).unwrap();
        assert_eq!(t.route("/users/1"), "/users/{id}");
        assert_eq!(t.route("/a"), "/a");
        assert_eq!(t.route("/b"), "/b");
        // Cap reached: new routes are _OTHER, known ones stay.
        assert_eq!(t.route("/c"), OTHER_ROUTE);
        assert_eq!(t.route("/d/7"), OTHER_ROUTE);
        assert_eq!(t.route("/a"), "/a");
        assert_eq!(t.route("/users/2"), "/users/{id}");
        let none = RouteTable::new(Vec::<String>::new(), 0).unwrap();
        assert_eq!(none.route("/x"), OTHER_ROUTE);
    }

    #[test]
    fn default_cap_is_filled_by_distinct_routes() {
        let t = RouteTable::default();
        for i in 0..DEFAULT_MAX_ROUTES {
            assert_eq!(t.route(&format!("/r{i}")), format!("/r{i}"));
        }
        assert_eq!(t.route("/one-more"), OTHER_ROUTE);
        assert_eq!(t.route("/r0"), "/r0");
    }
}
