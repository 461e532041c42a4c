//! Kernel TCP observations as metrics: the `sidecar.tcp.*` instruments and how one
//! [`TcpObservation`] (a connection the eBPF `sockops` program saw close, or a failed connect)
//! is recorded on them.
//!
//! Attributes are bounded: the peer's IP address, the port that names the service (the peer's
//! port for outbound connections, the pod's own port for inbound ones, never an ephemeral
//! client port), the direction, and, on `sidecar.tcp.connections`, the outcome.

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;

use super::{semconv as sc, Telemetry, CONNECTION_DURATION_BUCKETS};

/// `sidecar.tcp.rtt` histogram (s).
pub const METRIC_TCP_RTT: &str = "sidecar.tcp.rtt";
/// `sidecar.tcp.retransmits` counter (`{segment}`).
pub const METRIC_TCP_RETRANSMITS: &str = "sidecar.tcp.retransmits";
/// `sidecar.tcp.connections` counter (`{connection}`).
pub const METRIC_TCP_CONNECTIONS: &str = "sidecar.tcp.connections";
/// `sidecar.tcp.bytes` counter (By).
pub const METRIC_TCP_BYTES: &str = "sidecar.tcp.bytes";
/// `sidecar.tcp.connection.duration` histogram (s).
pub const METRIC_TCP_CONNECTION_DURATION: &str = "sidecar.tcp.connection.duration";
/// `sidecar.tcp.connect.duration` histogram (s).
pub const METRIC_TCP_CONNECT_DURATION: &str = "sidecar.tcp.connect.duration";
/// `sidecar.tcp.ringbuf.overflows` counter (`{record}`).
pub const METRIC_TCP_RINGBUF_OVERFLOWS: &str = "sidecar.tcp.ringbuf.overflows";

/// `sidecar.tcp.direction` attribute: `outbound` or `inbound`.
pub const SIDECAR_TCP_DIRECTION: &str = "sidecar.tcp.direction";
/// `sidecar.tcp.outcome` attribute: `ok`, `refused`, `timeout`, `reset` or `error`.
pub const SIDECAR_TCP_OUTCOME: &str = "sidecar.tcp.outcome";

/// Bucket boundaries (seconds) of `sidecar.tcp.rtt` and `sidecar.tcp.connect.duration`: from
/// 100 µs (same host, same zone) to 2.5 s (lossy long-haul links).
pub const RTT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Who opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpDirection {
    /// A process of the pod called `connect()`.
    Outbound,
    /// A process of the pod accepted it from a listener.
    Inbound,
}

impl TcpDirection {
    /// The `sidecar.tcp.direction` value.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpDirection::Outbound => "outbound",
            TcpDirection::Inbound => "inbound",
        }
    }
}

/// How the connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpOutcome {
    /// Established and closed by the FIN exchange.
    Ok,
    /// The connect was answered by a reset.
    Refused,
    /// The kernel gave up retransmitting, or a connect was abandoned after SYN retransmissions.
    Timeout,
    /// An established connection ended by a reset (received or sent).
    Reset,
    /// Any other failed connect (ICMP error, abandoned before a SYN retransmission).
    Error,
}

impl TcpOutcome {
    /// The `sidecar.tcp.outcome` value.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpOutcome::Ok => "ok",
            TcpOutcome::Refused => "refused",
            TcpOutcome::Timeout => "timeout",
            TcpOutcome::Reset => "reset",
            TcpOutcome::Error => "error",
        }
    }
}

/// One TCP connection of the pod as the kernel saw it, reported once when it closed (or when
/// its connect failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpObservation {
    /// The pod-side address.
    pub local: SocketAddr,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Who opened it.
    pub direction: TcpDirection,
    /// How it ended.
    pub outcome: TcpOutcome,
    /// Whether it was ever established (false for a failed connect; a connection that timed
    /// out after establishment has `Timeout` and `true`).
    pub established: bool,
    /// Smoothed RTT at close, when the kernel had a sample.
    pub srtt: Option<Duration>,
    /// Segments retransmitted (SYN retransmissions included).
    pub retransmits: u32,
    /// Payload bytes the peer acknowledged.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// From `connect()` (outbound) or acceptance (inbound) to close.
    pub duration: Duration,
    /// From `connect()` to established, for outbound connections that established.
    pub connect_latency: Option<Duration>,
}

/// The `sidecar.tcp.*` instruments, created once with the others.
pub(super) struct TcpInstruments {
    rtt: Histogram<f64>,
    retransmits: Counter<u64>,
    connections: Counter<u64>,
    bytes: Counter<u64>,
    connection_duration: Histogram<f64>,
    connect_duration: Histogram<f64>,
    overflows: Counter<u64>,
    /// Total behind `overflows`, for `/stats`.
    overflows_total: std::sync::atomic::AtomicU64,
}

impl TcpInstruments {
    pub(super) fn new(meter: &Meter) -> Self {
        Self {
            rtt: meter
                .f64_histogram(METRIC_TCP_RTT)
                .with_unit("s")
                .with_description("Smoothed round-trip time of TCP connections, at close.")
                .with_boundaries(RTT_BUCKETS.to_vec())
                .build(),
            retransmits: meter
                .u64_counter(METRIC_TCP_RETRANSMITS)
                .with_unit("{segment}")
                .with_description("TCP segments retransmitted, counted when connections close.")
                .build(),
            connections: meter
                .u64_counter(METRIC_TCP_CONNECTIONS)
                .with_unit("{connection}")
                .with_description("TCP connections closed or failed, by outcome.")
                .build(),
            bytes: meter
                .u64_counter(METRIC_TCP_BYTES)
                .with_unit("By")
                .with_description("TCP payload bytes sent (acknowledged) and received.")
                .build(),
            connection_duration: meter
                .f64_histogram(METRIC_TCP_CONNECTION_DURATION)
                .with_unit("s")
                .with_description("Lifetime of established TCP connections.")
                .with_boundaries(CONNECTION_DURATION_BUCKETS.to_vec())
                .build(),
            connect_duration: meter
                .f64_histogram(METRIC_TCP_CONNECT_DURATION)
                .with_unit("s")
                .with_description("Time from connect() to established, outbound connections.")
                .with_boundaries(RTT_BUCKETS.to_vec())
                .build(),
            overflows: meter
                .u64_counter(METRIC_TCP_RINGBUF_OVERFLOWS)
                .with_unit("{record}")
                .with_description("TCP observation records lost because the ring buffer was full.")
                .build(),
            overflows_total: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// The attributes every `sidecar.tcp.*` point of one connection carries.
fn base_attributes(obs: &TcpObservation) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(6);
    attrs.push(KeyValue::new(sc::NETWORK_TRANSPORT, "tcp"));
    attrs.push(KeyValue::new(SIDECAR_TCP_DIRECTION, obs.direction.as_str()));
    attrs.push(KeyValue::new(
        sc::NETWORK_PEER_ADDRESS,
        obs.remote.ip().to_canonical().to_string(),
    ));
    match obs.direction {
        TcpDirection::Outbound => attrs.push(KeyValue::new(
            sc::NETWORK_PEER_PORT,
            i64::from(obs.remote.port()),
        )),
        TcpDirection::Inbound => {
            attrs.push(KeyValue::new(sc::SERVER_PORT, i64::from(obs.local.port())))
        }
    }
    attrs
}

impl Telemetry {
    /// Records one kernel TCP observation on the `sidecar.tcp.*` instruments.
    pub fn tcp_observed(&self, obs: &TcpObservation) {
        self.inner.summary.record_tcp(obs);
        let tcp = &self.inner.tcp;
        let mut attrs = base_attributes(obs);
        tcp.retransmits.add(u64::from(obs.retransmits), &attrs);
        if obs.established {
            if let Some(srtt) = obs.srtt {
                tcp.rtt.record(srtt.as_secs_f64(), &attrs);
            }
            tcp.connection_duration
                .record(obs.duration.as_secs_f64(), &attrs);
            if let Some(latency) = obs.connect_latency {
                tcp.connect_duration.record(latency.as_secs_f64(), &attrs);
            }
            attrs.push(KeyValue::new(sc::NETWORK_IO_DIRECTION, "transmit"));
            tcp.bytes.add(obs.bytes_sent, &attrs);
            attrs.pop();
            attrs.push(KeyValue::new(sc::NETWORK_IO_DIRECTION, "receive"));
            tcp.bytes.add(obs.bytes_received, &attrs);
            attrs.pop();
        }
        attrs.push(KeyValue::new(SIDECAR_TCP_OUTCOME, obs.outcome.as_str()));
        tcp.connections.add(1, &attrs);
    }

    /// Counts `lost` observation records the kernel could not queue (ring buffer full).
    pub fn tcp_ringbuf_overflows(&self, lost: u64) {
        if lost > 0 {
            self.inner.tcp.overflows.add(lost, &[]);
            self.inner
                .tcp
                .overflows_total
                .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Observation records lost so far (the total of `sidecar.tcp.ringbuf.overflows`).
    pub fn tcp_ringbuf_overflows_total(&self) -> u64 {
        self.inner
            .tcp
            .overflows_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::Value;

    use super::super::testing::MetricPoint;
    use super::*;

    fn outbound_ok() -> TcpObservation {
        TcpObservation {
            local: "198.18.0.1:40000".parse().unwrap(),
            remote: "198.18.0.2:8080".parse().unwrap(),
            direction: TcpDirection::Outbound,
            outcome: TcpOutcome::Ok,
            established: true,
            srtt: Some(Duration::from_micros(20_500)),
            retransmits: 3,
            bytes_sent: 1000,
            bytes_received: 250,
            duration: Duration::from_millis(1500),
            connect_latency: Some(Duration::from_millis(21)),
        }
    }

    fn attr_str<'a>(p: &'a MetricPoint, key: &str) -> Option<&'a str> {
        match p.attr(key)? {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn attr_i64(p: &MetricPoint, key: &str) -> Option<i64> {
        match p.attr(key)? {
            Value::I64(v) => Some(*v),
            _ => None,
        }
    }

    #[test]
    fn an_established_outbound_connection_fills_every_instrument() {
        let (t, tt) = Telemetry::for_tests();
        t.tcp_observed(&outbound_ok());

        let rtt = tt.metric_points(METRIC_TCP_RTT);
        assert_eq!(rtt.len(), 1, "{rtt:?}");
        assert_eq!(rtt[0].unit, "s");
        assert_eq!(rtt[0].count(), Some(1));
        match &rtt[0].value {
            super::super::testing::PointValue::Histogram { sum, bounds, .. } => {
                assert!((sum - 0.0205).abs() < 1e-9, "{sum}");
                assert_eq!(bounds, &RTT_BUCKETS.to_vec());
            }
            other => panic!("not a histogram: {other:?}"),
        }
        assert_eq!(attr_str(&rtt[0], "network.transport"), Some("tcp"));
        assert_eq!(attr_str(&rtt[0], SIDECAR_TCP_DIRECTION), Some("outbound"));
        assert_eq!(
            attr_str(&rtt[0], "network.peer.address"),
            Some("198.18.0.2")
        );
        assert_eq!(attr_i64(&rtt[0], "network.peer.port"), Some(8080));
        assert_eq!(rtt[0].attr("server.port"), None);
        assert_eq!(rtt[0].attr(SIDECAR_TCP_OUTCOME), None);

        let retrans = tt.metric_points(METRIC_TCP_RETRANSMITS);
        assert_eq!(retrans.len(), 1);
        assert_eq!(retrans[0].unit, "{segment}");
        assert_eq!(retrans[0].sum_value(), Some(3.0));

        let conns = tt.metric_points(METRIC_TCP_CONNECTIONS);
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].unit, "{connection}");
        assert_eq!(conns[0].sum_value(), Some(1.0));
        assert_eq!(attr_str(&conns[0], SIDECAR_TCP_OUTCOME), Some("ok"));

        let mut bytes = tt.metric_points(METRIC_TCP_BYTES);
        bytes.sort_by_key(|p| attr_str(p, "network.io.direction").map(str::to_owned));
        assert_eq!(bytes.len(), 2, "{bytes:?}");
        assert_eq!(bytes[0].unit, "By");
        assert_eq!(attr_str(&bytes[0], "network.io.direction"), Some("receive"));
        assert_eq!(bytes[0].sum_value(), Some(250.0));
        assert_eq!(
            attr_str(&bytes[1], "network.io.direction"),
            Some("transmit")
        );
        assert_eq!(bytes[1].sum_value(), Some(1000.0));

        let life = tt.metric_points(METRIC_TCP_CONNECTION_DURATION);
        assert_eq!(life.len(), 1);
        assert_eq!(life[0].unit, "s");
        assert_eq!(life[0].count(), Some(1));
        let connect = tt.metric_points(METRIC_TCP_CONNECT_DURATION);
        assert_eq!(connect.len(), 1);
        match &connect[0].value {
            super::super::testing::PointValue::Histogram { sum, .. } => {
                assert!((sum - 0.021).abs() < 1e-9, "{sum}")
            }
            other => panic!("not a histogram: {other:?}"),
        }
    }

    #[test]
    fn a_refused_connect_counts_only_the_connection_and_its_retransmits() {
        let (t, tt) = Telemetry::for_tests();
        let refused = TcpObservation {
            outcome: TcpOutcome::Refused,
            established: false,
            srtt: None,
            retransmits: 0,
            bytes_sent: 0,
            bytes_received: 0,
            connect_latency: None,
            ..outbound_ok()
        };
        t.tcp_observed(&refused);
        t.tcp_observed(&refused);
        let conns = tt.metric_points(METRIC_TCP_CONNECTIONS);
        assert_eq!(conns.len(), 1);
        assert_eq!(attr_str(&conns[0], SIDECAR_TCP_OUTCOME), Some("refused"));
        assert_eq!(conns[0].sum_value(), Some(2.0));
        for name in [
            METRIC_TCP_RTT,
            METRIC_TCP_BYTES,
            METRIC_TCP_CONNECTION_DURATION,
            METRIC_TCP_CONNECT_DURATION,
        ] {
            assert!(tt.metric_points(name).is_empty(), "{name} recorded");
        }
    }

    #[test]
    fn inbound_connections_name_the_pod_port_not_the_client_port() {
        let (t, tt) = Telemetry::for_tests();
        for client_port in [50001, 50002, 50003] {
            t.tcp_observed(&TcpObservation {
                local: "198.18.0.1:8080".parse().unwrap(),
                remote: SocketAddr::new("198.18.0.2".parse().unwrap(), client_port),
                direction: TcpDirection::Inbound,
                outcome: TcpOutcome::Reset,
                connect_latency: None,
                ..outbound_ok()
            });
        }
        let conns = tt.metric_points(METRIC_TCP_CONNECTIONS);
        assert_eq!(conns.len(), 1, "one series for three clients: {conns:?}");
        assert_eq!(conns[0].sum_value(), Some(3.0));
        assert_eq!(attr_str(&conns[0], SIDECAR_TCP_DIRECTION), Some("inbound"));
        assert_eq!(attr_str(&conns[0], SIDECAR_TCP_OUTCOME), Some("reset"));
        assert_eq!(attr_i64(&conns[0], "server.port"), Some(8080));
        assert_eq!(conns[0].attr("network.peer.port"), None);
        assert!(tt.metric_points(METRIC_TCP_CONNECT_DURATION).is_empty());
    }

    #[test]
    fn mapped_ipv4_peers_are_reported_as_ipv4() {
        let (t, tt) = Telemetry::for_tests();
        t.tcp_observed(&TcpObservation {
            remote: "[::ffff:198.18.0.9]:443".parse().unwrap(),
            ..outbound_ok()
        });
        let conns = tt.metric_points(METRIC_TCP_CONNECTIONS);
        assert_eq!(
            attr_str(&conns[0], "network.peer.address"),
            Some("198.18.0.9")
        );
    }

    #[test]
    fn overflows_are_counted_without_attributes() {
        let (t, tt) = Telemetry::for_tests();
        t.tcp_ringbuf_overflows(0);
        assert!(tt.metric_points(METRIC_TCP_RINGBUF_OVERFLOWS).is_empty());
        t.tcp_ringbuf_overflows(5);
        t.tcp_ringbuf_overflows(2);
        assert_eq!(t.tcp_ringbuf_overflows_total(), 7);
        let points = tt.metric_points(METRIC_TCP_RINGBUF_OVERFLOWS);
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].unit, "{record}");
        assert_eq!(points[0].sum_value(), Some(7.0));
        assert!(points[0].attributes.is_empty());
    }

    #[test]
    fn outcome_and_direction_values_are_the_documented_ones() {
        let outcomes = [
            (TcpOutcome::Ok, "ok"),
            (TcpOutcome::Refused, "refused"),
            (TcpOutcome::Timeout, "timeout"),
            (TcpOutcome::Reset, "reset"),
            (TcpOutcome::Error, "error"),
        ];
        for (o, s) in outcomes {
            assert_eq!(o.as_str(), s);
        }
        assert_eq!(TcpDirection::Outbound.as_str(), "outbound");
        assert_eq!(TcpDirection::Inbound.as_str(), "inbound");
    }
}
