//! Interception policy: which outbound destinations and inbound ports the kernel programs
//! redirect, from flags, environment and pod annotations, resolved against the ports the pod
//! serves.
//!
//! CONTRACT (shared by the policy/config work and the eBPF loader): `KernelPolicy` is what the
//! loader writes into the kernel maps (`Interception::apply_policy`). Keep its fields.
//!
//! Sources and precedence (see docs/kubernetes.md):
//! - exclusions (ports, networks) are the union of the flags/environment and every annotation
//!   naming them (Istio, Linkerd, `sidecar.dev/...`): excluded anywhere means not intercepted;
//! - inclusions (`--include-outbound-cidrs`, `--include-inbound-ports`): the flag/environment
//!   value when set, else the annotation (`sidecar.dev/...` before Istio's), else everything;
//! - inbound ports = (included ports, or every port the pod listens on) minus exclusions minus
//!   the sidecar's own ports.

use std::collections::BTreeSet;
use std::path::PathBuf;

use ipnet::IpNet;

mod annotations;
mod lists;
mod watch;

pub use annotations::{
    AnnotationSettings, Annotations, LineIssue, Setting, ValueIssue, ANNOTATION_NAMES,
};
pub use lists::{
    fmt_ports, parse_cidrs, parse_ports, CidrSelection, CidrSet, ItemError, ListError,
    PortSelection, PortSet,
};
pub use watch::{PolicyWatcher, WatchConfig};

/// The resolved policy in the form the kernel maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Outbound destination ports never redirected.
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Outbound destination networks never redirected (IPv4 and IPv6 mixed).
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// When non-empty, only destinations inside these networks are redirected (exclusions
    /// still win).
    pub include_outbound_cidrs: Vec<IpNet>,
    /// Local ports whose inbound TCP connections are steered to the inbound proxy listener
    /// (already resolved: served/included ports minus excluded ports minus the sidecar's own).
    pub inbound_ports: BTreeSet<u16>,
}

/// Errors of the policy sources.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The annotations file exists but cannot be read.
    #[error("cannot read the annotations file {}: {source}", path.display())]
    ReadAnnotations {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A signal handler (SIGHUP) could not be installed.
    #[error("cannot install the SIGHUP handler for policy reloads: {0}")]
    Signal(#[source] std::io::Error),
}

/// The policy as configured by flags and environment (`None` = not set there).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// `--exclude-outbound-ports`.
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// `--exclude-outbound-cidrs`.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// `--include-outbound-cidrs`; `None` = not set (annotation, else all).
    pub include_outbound_cidrs: Option<CidrSelection>,
    /// `--exclude-inbound-ports`.
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// `--include-inbound-ports`; `None` = not set (annotation, else every served port).
    pub include_inbound_ports: Option<PortSelection>,
}

/// Every IPv4 and IPv6 destination, as exclusions: how "redirect nothing" is expressed.
fn everything() -> [IpNet; 2] {
    [
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

/// Resolves flags/environment, annotations and the discovered served ports into the policy
/// the kernel enforces. Malformed annotation values are ignored here (see
/// [`AnnotationSettings::from_annotations`] for the issues; [`PolicyWatcher`] logs them).
pub fn resolve(
    cfg: &PolicyConfig,
    annotations: &Annotations,
    served_ports: &BTreeSet<u16>,
    own_ports: &BTreeSet<u16>,
) -> KernelPolicy {
    let (settings, _issues) = AnnotationSettings::from_annotations(annotations);
    resolve_settings(cfg, &settings, served_ports, own_ports)
}

/// [`resolve`] with the annotations already interpreted.
pub fn resolve_settings(
    cfg: &PolicyConfig,
    ann: &AnnotationSettings,
    served_ports: &BTreeSet<u16>,
    own_ports: &BTreeSet<u16>,
) -> KernelPolicy {
    let exclude_outbound_ports = cfg
        .exclude_outbound_ports
        .union(&ann.exclude_outbound_ports)
        .copied()
        .collect();

    let mut exclude_cidrs: BTreeSet<IpNet> = cfg
        .exclude_outbound_cidrs
        .iter()
        .chain(&ann.exclude_outbound_cidrs)
        .copied()
        .collect();
    let include = cfg
        .include_outbound_cidrs
        .as_ref()
        .or(ann.include_outbound_cidrs.as_ref());
    let include_outbound_cidrs = match include {
        None | Some(CidrSelection::All) => Vec::new(),
        Some(CidrSelection::Only(nets)) if nets.is_empty() => {
            // Include nothing: the kernel's empty include list means "all", so exclude all.
            exclude_cidrs.extend(everything());
            Vec::new()
        }
        Some(CidrSelection::Only(nets)) => {
            let set: BTreeSet<IpNet> = nets.iter().copied().collect();
            set.into_iter().collect()
        }
    };

    let included: &BTreeSet<u16> = match cfg
        .include_inbound_ports
        .as_ref()
        .or(ann.include_inbound_ports.as_ref())
    {
        None | Some(PortSelection::All) => served_ports,
        Some(PortSelection::Only(ports)) => ports,
    };
    let inbound_ports = included
        .iter()
        .copied()
        .filter(|p| {
            !cfg.exclude_inbound_ports.contains(p)
                && !ann.exclude_inbound_ports.contains(p)
                && !own_ports.contains(p)
        })
        .collect();

    KernelPolicy {
        exclude_outbound_ports,
        exclude_outbound_cidrs: exclude_cidrs.into_iter().collect(),
        include_outbound_cidrs,
        inbound_ports,
    }
}

impl KernelPolicy {
    /// One-line description for logs (port sets as ranges).
    pub fn summary(&self) -> String {
        let nets = |v: &[IpNet]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        format!(
            "inbound ports {}; outbound: exclude ports {}, exclude networks {}, include networks {}",
            fmt_ports(&self.inbound_ports),
            fmt_ports(&self.exclude_outbound_ports),
            nets(&self.exclude_outbound_cidrs),
            if self.include_outbound_cidrs.is_empty() {
                "all".to_string()
            } else {
                nets(&self.include_outbound_cidrs)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> BTreeSet<u16> {
        ports.iter().copied().collect()
    }

    fn nets(list: &str) -> Vec<IpNet> {
        parse_cidrs(list).unwrap()
    }

    fn own() -> BTreeSet<u16> {
        set(&[15001, 15006])
    }

    #[test]
    fn defaults_steer_every_served_port_but_our_own_and_redirect_everything() {
        let served = set(&[8080, 9090, 15006]);
        let p = resolve(
            &PolicyConfig::default(),
            &Annotations::default(),
            &served,
            &own(),
        );
        assert_eq!(
            p,
            KernelPolicy {
                inbound_ports: set(&[8080, 9090]),
                ..KernelPolicy::default()
            }
        );
        assert_eq!(
            p.summary(),
            "inbound ports 8080,9090; outbound: exclude ports none, exclude networks none, \
             include networks all"
        );
    }

    #[test]
    fn exclusions_are_the_union_of_flags_and_annotations() {
        let cfg = PolicyConfig {
            exclude_outbound_ports: set(&[5432]),
            exclude_outbound_cidrs: nets("10.0.0.0/8"),
            exclude_inbound_ports: set(&[9090]),
            ..PolicyConfig::default()
        };
        let ann = Annotations::from_pairs([
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "3306"),
            ("config.linkerd.io/skip-outbound-ports", "4567-4568"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/8,fd00::/8",
            ),
            ("config.linkerd.io/skip-inbound-ports", "8081"),
        ]);
        let p = resolve(&cfg, &ann, &set(&[8080, 8081, 9090]), &own());
        assert_eq!(p.exclude_outbound_ports, set(&[3306, 4567, 4568, 5432]));
        assert_eq!(p.exclude_outbound_cidrs, nets("10.0.0.0/8,fd00::/8"));
        assert!(p.include_outbound_cidrs.is_empty());
        assert_eq!(p.inbound_ports, set(&[8080]));
    }

    #[test]
    fn include_flags_win_over_annotations_which_win_over_defaults() {
        let ann = Annotations::from_pairs([
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.96.0.0/12",
            ),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080"),
        ]);
        let served = set(&[8080, 9090]);
        // Annotation used where the flag is unset.
        let p = resolve(&PolicyConfig::default(), &ann, &served, &own());
        assert_eq!(p.include_outbound_cidrs, nets("10.96.0.0/12"));
        assert_eq!(p.inbound_ports, set(&[8080]));
        // The flag wins when set.
        let cfg = PolicyConfig {
            include_outbound_cidrs: Some(CidrSelection::All),
            include_inbound_ports: Some(PortSelection::Only(set(&[9090, 7000, 15001]))),
            ..PolicyConfig::default()
        };
        let p = resolve(&cfg, &ann, &served, &own());
        assert!(p.include_outbound_cidrs.is_empty());
        // An explicit list is used as is (not intersected with served ports), minus our own.
        assert_eq!(p.inbound_ports, set(&[7000, 9090]));
    }

    #[test]
    fn including_nothing_excludes_everything() {
        let ann = Annotations::from_pairs([
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", ""),
            ("traffic.sidecar.istio.io/includeInboundPorts", ""),
        ]);
        let p = resolve(&PolicyConfig::default(), &ann, &set(&[8080]), &own());
        assert_eq!(p.exclude_outbound_cidrs, nets("0.0.0.0/0,::/0"));
        assert!(p.include_outbound_cidrs.is_empty());
        assert!(p.inbound_ports.is_empty());
    }

    #[test]
    fn malformed_annotations_do_not_change_the_flag_policy() {
        let cfg = PolicyConfig {
            exclude_outbound_ports: set(&[25]),
            ..PolicyConfig::default()
        };
        let ann = Annotations::from_pairs([
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "x"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "8080-80"),
        ]);
        let served = set(&[8080, 9090]);
        assert_eq!(
            resolve(&cfg, &ann, &served, &own()),
            resolve(&cfg, &Annotations::default(), &served, &own())
        );
    }
}
