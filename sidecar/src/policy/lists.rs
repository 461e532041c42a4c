//! Comma lists of ports, port ranges and IP networks, as flags, environment variables and pod
//! annotations write them (`"8080, 9000-9010"`, `"10.0.0.0/8,fd00::/8"`, `"*"`).
//!
//! Whitespace around items is ignored, empty items are skipped, and every bad item is reported
//! (not only the first), each naming the item and what is wrong with it.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// One item of a comma list that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemError {
    /// The item as written (trimmed).
    pub item: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.item, self.reason)
    }
}

/// Why a comma list was rejected: every bad item, in order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// Some items are invalid.
    #[error("{}", join_items(.0))]
    BadItems(Vec<ItemError>),
    /// The list has no item where at least one is needed.
    #[error("the list is empty; {0}")]
    Empty(&'static str),
}

fn join_items(items: &[ItemError]) -> String {
    let list = items
        .iter()
        .map(ItemError::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() == 1 {
        format!("bad item {list}")
    } else {
        format!("{} bad items: {list}", items.len())
    }
}

/// The non-empty, trimmed items of a comma list.
fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

fn bad(item: &str, reason: impl Into<String>) -> ItemError {
    ItemError {
        item: item.to_string(),
        reason: reason.into(),
    }
}

/// Parses one port number, 1 to 65535.
fn port(item: &str, whole: &str) -> Result<u16, ItemError> {
    match item.trim().parse::<u32>() {
        Ok(0) => Err(bad(whole, "port 0 is not a valid port (1-65535)")),
        Ok(p) => {
            u16::try_from(p).map_err(|_| bad(whole, format!("port {p} is out of range (1-65535)")))
        }
        Err(_) => Err(bad(
            whole,
            "not a port (1-65535) or a port range such as 8000-8100",
        )),
    }
}

/// Parses one item: a port or an inclusive range `A-B`.
fn port_item(item: &str) -> Result<std::ops::RangeInclusive<u16>, ItemError> {
    match item.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a, item)?, port(b, item)?);
            if a > b {
                return Err(bad(item, format!("range start {a} is after its end {b}")));
            }
            Ok(a..=b)
        }
        None => port(item, item).map(|p| p..=p),
    }
}

/// Parses a comma list of ports and ranges (`"80, 8000-8100"`) into a set; an empty list is an
/// empty set.
pub fn parse_ports(s: &str) -> Result<BTreeSet<u16>, ListError> {
    let mut set = BTreeSet::new();
    let mut errors = Vec::new();
    for item in items(s) {
        match port_item(item) {
            Ok(range) => set.extend(range),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ListError::BadItems(errors))
    }
}

/// Parses one network: `10.0.0.0/8`, `fd00::/8`, or a bare address (a single host). Host bits
/// after the prefix are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
fn cidr_item(item: &str) -> Result<IpNet, ItemError> {
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = item.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(bad(
        item,
        "not an IP network such as 10.0.0.0/8 or fd00::/8, nor an IP address",
    ))
}

/// Parses a comma list of IP networks (IPv4 and IPv6 mixed); duplicates are removed and the
/// result is sorted.
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, ListError> {
    let mut set = BTreeSet::new();
    let mut errors = Vec::new();
    for item in items(s) {
        match cidr_item(item) {
            Ok(net) => {
                set.insert(net);
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(set.into_iter().collect())
    } else {
        Err(ListError::BadItems(errors))
    }
}

/// Whether a list is the wildcard `*` (alone or among other items, as Istio reads it).
fn has_wildcard(s: &str) -> bool {
    items(s).any(|i| i == "*")
}

/// A set of ports from a comma list of ports and ranges (an exclusion flag's value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(pub BTreeSet<u16>);

impl FromStr for PortSet {
    type Err = ListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_ports(s).map(Self)
    }
}

/// A list of IP networks from a comma list (an exclusion flag's value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrSet(pub Vec<IpNet>);

impl FromStr for CidrSet {
    type Err = ListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_cidrs(s).map(Self)
    }
}

/// Which inbound ports to steer: all ports the pod serves (`*`), or exactly these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSelection {
    /// Every port the pod listens on (discovered).
    All,
    /// Exactly these ports; empty means none.
    Only(BTreeSet<u16>),
}

impl PortSelection {
    /// Parses `*` or a comma list; an empty list is `Only(empty)` (nothing), as Istio reads an
    /// empty `includeInboundPorts`.
    pub fn parse_allow_empty(s: &str) -> Result<Self, ListError> {
        if has_wildcard(s) {
            return Ok(Self::All);
        }
        parse_ports(s).map(Self::Only)
    }
}

impl FromStr for PortSelection {
    type Err = ListError;

    /// Parses a flag value: `*` or a non-empty comma list.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Self::parse_allow_empty(s)? {
            Self::Only(set) if set.is_empty() => Err(ListError::Empty(
                "give `*` for every served port, or list ports; to steer no inbound port, \
                 exclude them all with --exclude-inbound-ports 1-65535",
            )),
            sel => Ok(sel),
        }
    }
}

/// Which outbound destinations to redirect: all (`*`), or only those inside these networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CidrSelection {
    /// Every destination.
    All,
    /// Only destinations inside these networks; empty means none.
    Only(Vec<IpNet>),
}

impl CidrSelection {
    /// Parses `*` or a comma list; an empty list is `Only(empty)` (nothing), as Istio reads an
    /// empty `includeOutboundIPRanges`.
    pub fn parse_allow_empty(s: &str) -> Result<Self, ListError> {
        if has_wildcard(s) {
            return Ok(Self::All);
        }
        parse_cidrs(s).map(Self::Only)
    }
}

impl FromStr for CidrSelection {
    type Err = ListError;

    /// Parses a flag value: `*` or a non-empty comma list.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Self::parse_allow_empty(s)? {
            Self::Only(nets) if nets.is_empty() => Err(ListError::Empty(
                "give `*` for every destination, or list networks; to redirect nothing, \
                 exclude everything with --exclude-outbound-cidrs 0.0.0.0/0,::/0",
            )),
            sel => Ok(sel),
        }
    }
}

/// Formats a port set compactly for logs: `80,443,8000-8100`; `none` when empty.
pub fn fmt_ports(ports: &BTreeSet<u16>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = ports.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while let Some(&next) = iter.peek() {
            if end.checked_add(1) == Some(next) {
                end = next;
                iter.next();
            } else {
                break;
            }
        }
        if start == end {
            out.push(start.to_string());
        } else {
            out.push(format!("{start}-{end}"));
        }
    }
    if out.is_empty() {
        "none".to_string()
    } else {
        out.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> BTreeSet<u16> {
        ports.iter().copied().collect()
    }

    #[test]
    fn ports_and_ranges_with_whitespace_and_empty_items() {
        assert_eq!(
            parse_ports(" 80 ,, 443,8000 - 8002 ,").unwrap(),
            set(&[80, 443, 8000, 8001, 8002])
        );
        assert_eq!(parse_ports("").unwrap(), set(&[]));
        assert_eq!(parse_ports(" , ").unwrap(), set(&[]));
        assert_eq!(parse_ports("65535").unwrap(), set(&[65535]));
        assert_eq!(parse_ports("7-7").unwrap(), set(&[7]));
        assert_eq!(parse_ports("1-65535").unwrap().len(), 65535);
    }

    #[test]
    fn every_bad_port_item_is_named() {
        let err = parse_ports("80, http, 0, 70000, 9-1, 5-x, 443").unwrap_err();
        let ListError::BadItems(items) = &err else {
            panic!("expected bad items, got {err:?}")
        };
        let named: Vec<&str> = items.iter().map(|i| i.item.as_str()).collect();
        assert_eq!(named, ["http", "0", "70000", "9-1", "5-x"]);
        let text = err.to_string();
        assert!(
            text.starts_with("5 bad items: `http`: not a port"),
            "{text}"
        );
        assert!(text.contains("`0`: port 0 is not a valid port"), "{text}");
        assert!(
            text.contains("`70000`: port 70000 is out of range"),
            "{text}"
        );
        assert!(
            text.contains("`9-1`: range start 9 is after its end 1"),
            "{text}"
        );
        assert_eq!(
            parse_ports("x").unwrap_err().to_string(),
            "bad item `x`: not a port (1-65535) or a port range such as 8000-8100"
        );
        // A wildcard is not a port: only include lists accept it.
        assert!(parse_ports("*").is_err());
    }

    #[test]
    fn cidrs_v4_v6_bare_addresses_truncated_and_deduplicated() {
        let nets = parse_cidrs(" 10.1.2.3/8, fd00::/8 ,192.168.1.7,, 10.0.0.0/8, ::1").unwrap();
        let text: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            ["10.0.0.0/8", "192.168.1.7/32", "::1/128", "fd00::/8"]
        );
        let err = parse_cidrs("10.0.0.0/33, 10.0.0.0/8, nope").unwrap_err();
        let ListError::BadItems(items) = &err else {
            panic!("expected bad items, got {err:?}")
        };
        let named: Vec<&str> = items.iter().map(|i| i.item.as_str()).collect();
        assert_eq!(named, ["10.0.0.0/33", "nope"]);
        assert!(err.to_string().contains("not an IP network"), "{err}");
    }

    #[test]
    fn selections_accept_wildcard_and_reject_empty_flag_values() {
        assert_eq!("*".parse::<PortSelection>().unwrap(), PortSelection::All);
        assert_eq!(
            " 80,*".parse::<PortSelection>().unwrap(),
            PortSelection::All
        );
        assert_eq!(
            "80,81".parse::<PortSelection>().unwrap(),
            PortSelection::Only(set(&[80, 81]))
        );
        let empty = " , ".parse::<PortSelection>().unwrap_err();
        assert!(empty
            .to_string()
            .contains("--exclude-inbound-ports 1-65535"));
        assert_eq!(
            PortSelection::parse_allow_empty("").unwrap(),
            PortSelection::Only(set(&[]))
        );
        assert_eq!("*".parse::<CidrSelection>().unwrap(), CidrSelection::All);
        assert!("".parse::<CidrSelection>().is_err());
        assert_eq!(
            CidrSelection::parse_allow_empty("").unwrap(),
            CidrSelection::Only(vec![])
        );
        assert!("10.0.0.0/8,bad".parse::<CidrSelection>().is_err());
    }

    #[test]
    fn port_sets_format_as_ranges() {
        assert_eq!(fmt_ports(&set(&[])), "none");
        assert_eq!(fmt_ports(&set(&[80])), "80");
        assert_eq!(
            fmt_ports(&set(&[80, 443, 8000, 8001, 8002, 65534, 65535])),
            "80,443,8000-8002,65534-65535"
        );
    }
}
