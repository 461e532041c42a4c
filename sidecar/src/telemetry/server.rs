//! Server side of HTTP telemetry: the SERVER span and the `http.server.*` instruments for the
//! requests the proxy receives on behalf of the pod's application (inbound).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::{Histogram, Meter, UpDownCounter};
use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use opentelemetry::KeyValue;

use super::route::HTTP_ROUTE;
use super::semconv as sc;
use super::{
    finish_span, set_tcp_info_attributes, span_traceparent, HttpRequestEnd, HttpRequestStart,
    Inner, Telemetry, BODY_SIZE_BUCKETS, DURATION_BUCKETS,
};

/// The `http.server.*` instruments, created once with the client ones.
pub(super) struct ServerInstruments {
    duration: Histogram<f64>,
    request_body: Histogram<u64>,
    response_body: Histogram<u64>,
    active: UpDownCounter<i64>,
}

impl ServerInstruments {
    pub(super) fn new(meter: &Meter) -> Self {
        Self {
            duration: meter
                .f64_histogram(sc::METRIC_SERVER_DURATION)
                .with_unit("s")
                .with_description("Duration of HTTP server requests.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            request_body: meter
                .u64_histogram(sc::METRIC_SERVER_REQUEST_BODY_SIZE)
                .with_unit("By")
                .with_description("Size of HTTP server request bodies.")
                .with_boundaries(BODY_SIZE_BUCKETS.to_vec())
                .build(),
            response_body: meter
                .u64_histogram(sc::METRIC_SERVER_RESPONSE_BODY_SIZE)
                .with_unit("By")
                .with_description("Size of HTTP server response bodies.")
                .with_boundaries(BODY_SIZE_BUCKETS.to_vec())
                .build(),
            active: meter
                .i64_up_down_counter(sc::METRIC_SERVER_ACTIVE_REQUESTS)
                .with_unit("{request}")
                .with_description("Number of inbound HTTP requests that are currently active.")
                .build(),
        }
    }
}

/// What a SERVER span knows beyond [`HttpRequestStart`] (whose `destination` is the served
/// address: the original destination of the inbound connection).
#[derive(Clone, Debug)]
pub struct ServerRequestInfo<'a> {
    /// Remote peer of the accepted connection (`client.address`, `client.port`).
    pub client: SocketAddr,
    /// `User-Agent` header value, if any.
    pub user_agent: Option<&'a str>,
}

/// A SERVER span in flight for one inbound request.
///
/// Dropping it without [`Telemetry::server_request_end`] (a cancelled task) still ends the span
/// and takes the request off `http.server.active_requests`.
pub struct ServerRequest {
    inner: Arc<Inner>,
    span: Option<opentelemetry_sdk::trace::Span>,
    traceparent: Option<String>,
    /// `http.request.method`, `url.scheme`, `server.port`: the attributes of
    /// `http.server.active_requests` and the first three of the other server instruments.
    base_attrs: Vec<KeyValue>,
    /// `http.route`, when the request target has a path.
    route: Option<String>,
    version: &'static str,
    start: SystemTime,
    ended: bool,
}

impl ServerRequest {
    /// `traceparent` value to put on the request forwarded to the application (the SERVER
    /// span's context), or `None` when tracing is off and the incoming header (if any) must
    /// pass unchanged.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// True while the span records attributes (sampled and not yet ended): only then is it
    /// worth measuring what [`Self::set_tcp_info`] takes.
    pub fn is_recording(&self) -> bool {
        self.span.as_ref().is_some_and(|s| s.is_recording())
    }

    /// Adds `sidecar.connection.rtt` (s) and `sidecar.connection.retransmits` of the client-facing socket.
    pub fn set_tcp_info(&mut self, rtt: Duration, retransmits: u32) {
        if let Some(span) = self.span.as_mut() {
            set_tcp_info_attributes(span, rtt, retransmits);
        }
    }

    /// The exchange continues over another protocol version (`Upgrade: h2c`): see
    /// [`super::ClientRequest::set_version`].
    pub fn set_version(&mut self, version: super::HttpVersion) {
        self.version = sc::protocol_version(version);
    }
}

impl Drop for ServerRequest {
    fn drop(&mut self) {
        if !self.ended {
            self.inner.server.active.add(-1, &self.base_attrs);
        }
    }
}

impl std::fmt::Debug for ServerRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRequest")
            .field("traceparent", &self.traceparent)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// `url.path` and `url.query` of a request target: origin-form `/p?q`, or the path of an
/// absolute-form `http://h/p?q` (`/` when it has none). Authority-form (`CONNECT`) and
/// asterisk-form (`OPTIONS *`) have neither.
fn path_and_query(target: &str) -> (Option<&str>, Option<&str>) {
    let rest = if target.starts_with('/') {
        target
    } else if let Some((_, after)) = target.split_once("://") {
        match after.find(['/', '?', '#']) {
            Some(i) => after.get(i..).unwrap_or_default(),
            None => "",
        }
    } else {
        return (None, None);
    };
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    (Some(if path.is_empty() { "/" } else { path }), query)
}

impl Telemetry {
    /// Starts the SERVER span for an inbound request (its parent is the incoming
    /// `traceparent`, if any) and counts it as active.
    pub fn server_request_start(
        &self,
        req: &HttpRequestStart<'_>,
        info: &ServerRequestInfo<'_>,
    ) -> ServerRequest {
        let inner = &self.inner;
        let known = sc::known_method(req.method);
        let method = known.unwrap_or(sc::OTHER_METHOD);
        let served_port = i64::from(req.destination.port());
        let version = sc::protocol_version(req.version);

        let base_attrs = vec![
            KeyValue::new(sc::HTTP_REQUEST_METHOD, method),
            KeyValue::new(sc::URL_SCHEME, "http"),
            KeyValue::new(sc::SERVER_PORT, served_port),
        ];
        inner.server.active.add(1, &base_attrs);

        let parent = inner.parent_context(req);
        let mut span_attrs = Vec::with_capacity(16);
        span_attrs.push(KeyValue::new(sc::HTTP_REQUEST_METHOD, method));
        if known.is_none() {
            span_attrs.push(KeyValue::new(
                sc::HTTP_REQUEST_METHOD_ORIGINAL,
                req.method.to_owned(),
            ));
        }
        span_attrs.push(KeyValue::new(sc::URL_SCHEME, "http"));
        let (path, query) = path_and_query(req.target);
        let route = path.map(|p| inner.routes.route(p));
        if let Some(path) = path {
            span_attrs.push(KeyValue::new(sc::URL_PATH, path.to_owned()));
        }
        if let Some(route) = &route {
            span_attrs.push(KeyValue::new(HTTP_ROUTE, route.clone()));
        }
        if let Some(query) = query {
            let mut redacted = String::with_capacity(query.len());
            inner.redactor.push_query(&mut redacted, query);
            span_attrs.push(KeyValue::new(sc::URL_QUERY, redacted));
        }
        if let Some(host) = req.host.and_then(sc::host_of_authority) {
            span_attrs.push(KeyValue::new(sc::SERVER_ADDRESS, host));
        }
        span_attrs.push(KeyValue::new(sc::SERVER_PORT, served_port));
        let client_ip = info.client.ip().to_string();
        let client_port = i64::from(info.client.port());
        span_attrs.push(KeyValue::new(sc::CLIENT_ADDRESS, client_ip.clone()));
        span_attrs.push(KeyValue::new(sc::CLIENT_PORT, client_port));
        span_attrs.push(KeyValue::new(sc::NETWORK_PEER_ADDRESS, client_ip));
        span_attrs.push(KeyValue::new(sc::NETWORK_PEER_PORT, client_port));
        if let Some(ua) = info.user_agent {
            span_attrs.push(KeyValue::new(sc::USER_AGENT_ORIGINAL, ua.to_owned()));
        }
        let method_name = known.unwrap_or("HTTP");
        let span_name = match &route {
            Some(route) => format!("{method_name} {route}"),
            None => method_name.to_owned(),
        };
        let span = inner
            .tracer
            .span_builder(span_name)
            .with_kind(SpanKind::Server)
            .with_start_time(req.start)
            .with_attributes(span_attrs)
            .start_with_context(&inner.tracer, &parent);
        let traceparent = span_traceparent(&span);

        ServerRequest {
            inner: Arc::clone(inner),
            span: Some(span),
            traceparent,
            base_attrs,
            route,
            version,
            start: req.start,
            ended: false,
        }
    }

    /// Ends the SERVER span and records `http.server.request.duration` and the body-size
    /// histograms. A 4xx is not an error on this side; a 5xx or a transport failure is.
    pub fn server_request_end(&self, req: ServerRequest, end: HttpRequestEnd) {
        let mut req = req;
        req.ended = true;
        let inner = &self.inner;
        inner.server.active.add(-1, &req.base_attrs);

        let error = sc::http_server_error_type(end.status, end.error);
        let mut attrs = std::mem::take(&mut req.base_attrs);
        attrs.push(KeyValue::new(sc::NETWORK_PROTOCOL_VERSION, req.version));
        if let Some(route) = req.route.take() {
            attrs.push(KeyValue::new(HTTP_ROUTE, route));
        }
        if let Some(status) = end.status {
            attrs.push(KeyValue::new(
                sc::HTTP_RESPONSE_STATUS_CODE,
                i64::from(status),
            ));
        }
        if let Some(e) = error {
            attrs.push(KeyValue::new(sc::ERROR_TYPE, e.as_attribute()));
        }
        let elapsed = end.end.duration_since(req.start).unwrap_or_default();
        inner.server.duration.record(elapsed.as_secs_f64(), &attrs);
        inner
            .summary
            .record_server_request(&attrs, elapsed, end.status, error.is_some());
        inner
            .server
            .request_body
            .record(end.request_body_bytes, &attrs);
        inner
            .server
            .response_body
            .record(end.response_body_bytes, &attrs);

        finish_span(req.span.take(), &end, error, req.version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::TestTelemetry;
    use crate::telemetry::{ErrorType, HttpVersion};
    use opentelemetry::trace::{SpanKind, Status};
    use opentelemetry::Value;
    use opentelemetry_sdk::trace::SpanData;

    fn start<'a>(target: &'a str, traceparent: Option<&'a str>) -> HttpRequestStart<'a> {
        HttpRequestStart {
            method: "GET",
            target,
            host: Some("Orders.svc:8080"),
            version: HttpVersion::Http11,
            destination: "10.0.0.5:8080".parse().unwrap(),
            traceparent,
            tracestate: None,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            reused_connection: false,
        }
    }

    fn info() -> ServerRequestInfo<'static> {
        ServerRequestInfo {
            client: "10.0.0.9:41000".parse().unwrap(),
            user_agent: Some("curl/8"),
        }
    }

    fn end(start: SystemTime, status: Option<u16>, error: Option<ErrorType>) -> HttpRequestEnd {
        HttpRequestEnd {
            status,
            request_body_bytes: 0,
            response_body_bytes: 7,
            error,
            end: start + Duration::from_millis(30),
        }
    }

    fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn targets_split_into_path_and_query() {
        assert_eq!(path_and_query("/a/b?x=1#f"), (Some("/a/b"), Some("x=1")));
        assert_eq!(path_and_query("/"), (Some("/"), None));
        assert_eq!(path_and_query("http://h:1/p?q"), (Some("/p"), Some("q")));
        assert_eq!(path_and_query("http://h?q"), (Some("/"), Some("q")));
        assert_eq!(path_and_query("http://h"), (Some("/"), None));
        assert_eq!(path_and_query("*"), (None, None));
        assert_eq!(path_and_query("h:443"), (None, None));
    }

    #[test]
    fn server_span_and_metrics() {
        let (t, tt) = Telemetry::for_tests();
        let s = start(
            "/orders?id=3&token=abc",
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let mut req = t.server_request_start(&s, &info());
        let tp = req.traceparent().unwrap().to_owned();
        assert!(req.is_recording());
        req.set_tcp_info(Duration::from_micros(1500), 2);
        t.server_request_end(req, end(s.start, Some(404), None));

        let spans = tt.spans();
        assert_eq!(spans.len(), 1);
        let span = &spans[0];
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(span.name, "GET /orders");
        assert_eq!(attr(span, "http.route"), Some(&Value::from("/orders")));
        assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(
            tp,
            format!(
                "00-{}-{}-01",
                span.span_context.trace_id(),
                span.span_context.span_id()
            )
        );
        assert_eq!(span.status, Status::Unset, "4xx is not a server error");
        assert_eq!(attr(span, "error.type"), None);
        assert_eq!(attr(span, "url.path"), Some(&Value::from("/orders")));
        assert_eq!(
            attr(span, "url.query"),
            Some(&Value::from("id=3&token=REDACTED"))
        );
        assert_eq!(
            attr(span, "server.address"),
            Some(&Value::from("orders.svc"))
        );
        assert_eq!(attr(span, "server.port"), Some(&Value::I64(8080)));
        assert_eq!(attr(span, "client.address"), Some(&Value::from("10.0.0.9")));
        assert_eq!(attr(span, "client.port"), Some(&Value::I64(41000)));
        assert_eq!(
            attr(span, "user_agent.original"),
            Some(&Value::from("curl/8"))
        );
        assert_eq!(
            attr(span, "sidecar.connection.rtt"),
            Some(&Value::F64(0.0015))
        );
        assert_eq!(
            attr(span, "sidecar.connection.retransmits"),
            Some(&Value::I64(2))
        );
        assert_eq!(
            attr(span, "http.response.status_code"),
            Some(&Value::I64(404))
        );
        assert_eq!(attr(span, "url.full"), None);

        let points = tt.metric_points("http.server.request.duration");
        assert_eq!(points.len(), 1, "{points:?}");
        let mut keys: Vec<&str> = points[0]
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "http.request.method",
                "http.response.status_code",
                "http.route",
                "network.protocol.version",
                "server.port",
                "url.scheme"
            ]
        );
        assert_eq!(points[0].unit, "s");
        assert_eq!(points[0].count(), Some(1));
        let active = tt.metric_points("http.server.active_requests");
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].sum_value(), Some(0.0));
        for name in [
            "http.server.request.body.size",
            "http.server.response.body.size",
        ] {
            let p = tt.metric_points(name);
            assert_eq!(p.len(), 1, "{name}");
            assert_eq!(p[0].unit, "By");
        }
        assert!(
            tt.metric_points("http.client.request.duration").is_empty(),
            "server requests are not client requests"
        );
        assert!(
            tt.summary().destinations.is_empty(),
            "the summary lists outbound destinations only"
        );
    }

    /// `for_tests` with these route templates and cap.
    fn with_routes(templates: &[&str], max: usize) -> (Telemetry, TestTelemetry) {
        let (mut t, tt) = Telemetry::for_tests();
        Arc::get_mut(&mut t.inner).unwrap().routes =
            crate::telemetry::route::RouteTable::new(templates, max).unwrap();
        (t, tt)
    }

    fn routes_of(tt: &TestTelemetry) -> Vec<(String, u64)> {
        let mut routes: Vec<(String, u64)> = tt
            .metric_points("http.server.request.duration")
            .iter()
            .map(|p| {
                let route = match p.attr("http.route") {
                    Some(Value::String(s)) => s.to_string(),
                    None => "(none)".to_owned(),
                    other => panic!("http.route is not a string: {other:?}"),
                };
                (route, p.count().unwrap())
            })
            .collect();
        routes.sort();
        routes
    }

    #[test]
    fn templates_give_one_route_series_and_span_names() {
        let (t, tt) = with_routes(&["/users/{id}"], 100);
        for target in ["/users/42?token=abc", "/users/43", "http://h:1/users/44"] {
            let s = start(target, None);
            let req = t.server_request_start(&s, &info());
            t.server_request_end(req, end(s.start, Some(200), None));
        }
        let s = start("*", None);
        let req = t.server_request_start(&s, &info());
        t.server_request_end(req, end(s.start, Some(200), None));

        let spans = tt.spans();
        assert_eq!(spans.len(), 4);
        for span in &spans[..3] {
            assert_eq!(span.name, "GET /users/{id}");
            assert_eq!(attr(span, "http.route"), Some(&Value::from("/users/{id}")));
        }
        assert_eq!(spans[3].name, "GET", "no path, no route");
        assert_eq!(attr(&spans[3], "http.route"), None);
        let points = tt.metric_points("http.server.request.duration");
        assert_eq!(points.len(), 2, "{points:?}");
        assert_eq!(
            routes_of(&tt),
            [("(none)".to_owned(), 1), ("/users/{id}".to_owned(), 3)]
        );
        let active = tt.metric_points("http.server.active_requests");
        assert!(
            active.iter().all(|p| p.attr("http.route").is_none()),
            "active_requests has no http.route (semantic conventions)"
        );
    }

    #[test]
    fn heuristic_routes_and_the_cap_on_metrics() {
        let (t, tt) = with_routes(&[], 2);
        for target in [
            "/users/42",
            "/users/43",
            "/items/7/a",
            "/new/9",
            "/users/44",
        ] {
            let s = start(target, None);
            let req = t.server_request_start(&s, &info());
            t.server_request_end(req, end(s.start, Some(200), None));
        }
        assert_eq!(
            routes_of(&tt),
            [
                ("/items/{id}/a".to_owned(), 1),
                ("/users/{id}".to_owned(), 3),
                ("_OTHER".to_owned(), 1),
            ]
        );
        let spans = tt.spans();
        assert_eq!(spans[3].name, "GET _OTHER");
    }

    #[test]
    fn server_errors_are_5xx_and_transport_failures() {
        let (t, tt) = Telemetry::for_tests();
        let s = start("/", None);
        let req = t.server_request_start(&s, &info());
        t.server_request_end(req, end(s.start, Some(503), None));
        let req = t.server_request_start(&s, &info());
        t.server_request_end(req, end(s.start, None, Some(ErrorType::ConnectionReset)));
        let dropped = t.server_request_start(&s, &info());
        drop(dropped);

        let spans = tt.spans();
        assert_eq!(spans.len(), 3);
        assert_eq!(attr(&spans[0], "error.type"), Some(&Value::from("503")));
        assert_eq!(spans[0].status, Status::error(""));
        assert_eq!(
            attr(&spans[1], "error.type"),
            Some(&Value::from("connection_reset"))
        );
        assert_eq!(spans[1].status, Status::error("connection_reset"));
        assert_eq!(
            spans[1].parent_span_id,
            opentelemetry::trace::SpanId::INVALID
        );

        let points = tt.metric_points("http.server.request.duration");
        let errors: Vec<_> = points
            .iter()
            .filter_map(|p| p.attr("error.type").cloned())
            .collect();
        assert_eq!(errors.len(), 2, "{points:?}");
        let active = tt.metric_points("http.server.active_requests");
        assert_eq!(
            active[0].sum_value(),
            Some(0.0),
            "dropped request is not active"
        );
    }
}
