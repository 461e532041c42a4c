//! Semantic-convention names and the small pure functions that turn what the proxy saw into
//! attribute values (method normalisation, `server.address`, `error.type`).

use std::net::SocketAddr;

use super::{ConnectionProtocol, ErrorType, HttpVersion};

/// `http.request.method`
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
/// `http.request.method_original`
pub const HTTP_REQUEST_METHOD_ORIGINAL: &str = "http.request.method_original";
/// `http.response.status_code`
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
/// `http.request.body.size` (span attribute)
pub const HTTP_REQUEST_BODY_SIZE: &str = "http.request.body.size";
/// `http.response.body.size` (span attribute)
pub const HTTP_RESPONSE_BODY_SIZE: &str = "http.response.body.size";
/// `server.address`
pub const SERVER_ADDRESS: &str = "server.address";
/// `server.port`
pub const SERVER_PORT: &str = "server.port";
/// `url.scheme`
pub const URL_SCHEME: &str = "url.scheme";
/// `url.full`
pub const URL_FULL: &str = "url.full";
/// `network.peer.address`
pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
/// `network.peer.port`
pub const NETWORK_PEER_PORT: &str = "network.peer.port";
/// `network.protocol.version`
pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
/// `network.transport`
pub const NETWORK_TRANSPORT: &str = "network.transport";
/// `network.io.direction`
pub const NETWORK_IO_DIRECTION: &str = "network.io.direction";
/// `error.type`
pub const ERROR_TYPE: &str = "error.type";
/// `tls.protocol.name` (normalised lower-case protocol name: `tls` for a ClientHello seen).
pub const TLS_PROTOCOL_NAME: &str = "tls.protocol.name";
/// `sidecar.tls.client.alpn` (project-specific: the ALPN ids the client offered, joined with
/// `,`, at most four; OTel's `tls.next_protocol` is the *negotiated* id, which a passthrough
/// proxy cannot see under TLS 1.3, so it is not set).
pub const SIDECAR_TLS_CLIENT_ALPN: &str = "sidecar.tls.client.alpn";
/// `sidecar.protocol` (project-specific: what the proxy recognised on a connection).
pub const SIDECAR_PROTOCOL: &str = "sidecar.protocol";
/// `client.address` (SERVER spans: the remote peer's IP).
pub const CLIENT_ADDRESS: &str = "client.address";
/// `client.port` (SERVER spans: the remote peer's port).
pub const CLIENT_PORT: &str = "client.port";
/// `url.path` (SERVER spans).
pub const URL_PATH: &str = "url.path";
/// `url.query` (SERVER spans; secret values redacted).
pub const URL_QUERY: &str = "url.query";
/// `user_agent.original` (SERVER spans).
pub const USER_AGENT_ORIGINAL: &str = "user_agent.original";
/// `sidecar.direction` (project-specific: `inbound` or `outbound` proxied connection).
pub const SIDECAR_DIRECTION: &str = "sidecar.direction";
/// `sidecar.connection.rtt` (project-specific span attribute: smoothed RTT from `TCP_INFO`, s).
pub const SIDECAR_CONNECTION_RTT: &str = "sidecar.connection.rtt";
/// `sidecar.connection.retransmits` (project-specific span attribute: `TCP_INFO` total retransmits).
pub const SIDECAR_CONNECTION_RETRANSMITS: &str = "sidecar.connection.retransmits";

/// `rpc.system.name` (`grpc` for gRPC calls).
pub const RPC_SYSTEM_NAME: &str = "rpc.system.name";
/// `rpc.method` (fully-qualified method, `package.Service/Method`).
pub const RPC_METHOD: &str = "rpc.method";
/// `rpc.method_original` (the method as sent, when `rpc.method` is `_OTHER`).
pub const RPC_METHOD_ORIGINAL: &str = "rpc.method_original";
/// `rpc.response.status_code` (gRPC: the status code name, `OK`, `NOT_FOUND`, ...).
pub const RPC_RESPONSE_STATUS_CODE: &str = "rpc.response.status_code";
/// `rpc.client.call.duration` histogram (s).
pub const METRIC_RPC_CLIENT_DURATION: &str = "rpc.client.call.duration";
/// `rpc.server.call.duration` histogram (s).
pub const METRIC_RPC_SERVER_DURATION: &str = "rpc.server.call.duration";

/// `http.client.request.duration` histogram (s).
pub const METRIC_CLIENT_DURATION: &str = "http.client.request.duration";
/// `http.client.request.body.size` histogram (By).
pub const METRIC_CLIENT_REQUEST_BODY_SIZE: &str = "http.client.request.body.size";
/// `http.client.response.body.size` histogram (By).
pub const METRIC_CLIENT_RESPONSE_BODY_SIZE: &str = "http.client.response.body.size";
/// `http.client.active_requests` up-down counter (`{request}`).
pub const METRIC_CLIENT_ACTIVE_REQUESTS: &str = "http.client.active_requests";
/// `sidecar.proxy.connection.duration` histogram (s).
pub const METRIC_CONNECTION_DURATION: &str = "sidecar.proxy.connection.duration";
/// `sidecar.proxy.connection.io` counter (By).
pub const METRIC_CONNECTION_IO: &str = "sidecar.proxy.connection.io";
/// `http.server.request.duration` histogram (s).
pub const METRIC_SERVER_DURATION: &str = "http.server.request.duration";
/// `http.server.request.body.size` histogram (By).
pub const METRIC_SERVER_REQUEST_BODY_SIZE: &str = "http.server.request.body.size";
/// `http.server.response.body.size` histogram (By).
pub const METRIC_SERVER_RESPONSE_BODY_SIZE: &str = "http.server.response.body.size";
/// `http.server.active_requests` up-down counter (`{request}`).
pub const METRIC_SERVER_ACTIVE_REQUESTS: &str = "http.server.active_requests";

/// Value of `http.request.method` for methods outside the known set.
pub const OTHER_METHOD: &str = "_OTHER";

/// Methods the HTTP semantic conventions know (case-sensitive, as RFC 9110 defines them).
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Returns the method as `http.request.method` spells it: the known method itself (static, so
/// no allocation per request), or `None` for anything else (`_OTHER`).
pub fn known_method(method: &str) -> Option<&'static str> {
    KNOWN_METHODS.iter().copied().find(|m| *m == method)
}

/// `network.protocol.version` for an HTTP version.
pub fn protocol_version(v: HttpVersion) -> &'static str {
    match v {
        HttpVersion::Http10 => "1.0",
        HttpVersion::Http11 => "1.1",
        HttpVersion::Http2 => "2",
    }
}

/// `error.type` for a transport failure: a short snake_case value.
pub fn error_type_str(e: ErrorType) -> &'static str {
    match e {
        ErrorType::ConnectionRefused => "connection_refused",
        ErrorType::ConnectionReset => "connection_reset",
        ErrorType::Timeout => "timeout",
        ErrorType::IncompleteResponse => "incomplete_response",
        ErrorType::Io => "io",
        ErrorType::StreamReset => "stream_reset",
    }
}

/// `sidecar.protocol` value.
pub fn connection_protocol_str(p: ConnectionProtocol) -> &'static str {
    match p {
        ConnectionProtocol::Http1 => "http1",
        ConnectionProtocol::Opaque => "opaque",
        ConnectionProtocol::Tls => "tls",
        ConnectionProtocol::Http2 => "http2",
    }
}

/// `error.type` of an HTTP exchange: the status code when it is 400 or more, else the
/// transport error, else none.
pub fn http_error_type(status: Option<u16>, error: Option<ErrorType>) -> Option<ErrorKind> {
    match (status, error) {
        (Some(s), _) if s >= 400 => Some(ErrorKind::Status(s)),
        (_, Some(e)) => Some(ErrorKind::Transport(e)),
        _ => None,
    }
}

/// `error.type` of an exchange the proxy served (SERVER side): the status code when it is 500
/// or more (a 4xx is the client's error, not the server's), else the transport error, else none.
pub fn http_server_error_type(status: Option<u16>, error: Option<ErrorType>) -> Option<ErrorKind> {
    match (status, error) {
        (Some(s), _) if s >= 500 => Some(ErrorKind::Status(s)),
        (_, Some(e)) => Some(ErrorKind::Transport(e)),
        _ => None,
    }
}

/// Why an exchange counts as failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// HTTP status code >= 400.
    Status(u16),
    /// Transport-level failure.
    Transport(ErrorType),
}

impl ErrorKind {
    /// The `error.type` attribute value.
    pub fn as_attribute(self) -> opentelemetry::Value {
        match self {
            ErrorKind::Status(s) => opentelemetry::Value::from(s.to_string()),
            ErrorKind::Transport(e) => opentelemetry::Value::from(error_type_str(e)),
        }
    }
}

/// Host part of a `Host` header value (or of an authority): strips the port and the IPv6
/// brackets and lower-cases it. Returns `None` for an empty or malformed value.
pub fn host_of_authority(authority: &str) -> Option<String> {
    let authority = authority.trim();
    // Userinfo never belongs in a Host header, but an absolute-form target may carry it.
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, after)| after);
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, _) = rest.split_once(']')?;
        inside
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_ascii_whitespace() || c == '/') {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// `server.address` of a request: the host of the `Host` header, else the host of an
/// absolute-form target, else the destination IP.
pub fn server_address(host: Option<&str>, target: &str, destination: SocketAddr) -> String {
    host.and_then(host_of_authority)
        .or_else(|| super::url::absolute_authority(target).and_then(host_of_authority))
        .unwrap_or_else(|| destination.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_are_case_sensitive() {
        assert_eq!(known_method("GET"), Some("GET"));
        assert_eq!(known_method("PATCH"), Some("PATCH"));
        assert_eq!(known_method("get"), None);
        assert_eq!(known_method("PURGE"), None);
    }

    #[test]
    fn host_header_loses_port_and_brackets() {
        assert_eq!(
            host_of_authority("Example.COM:8080").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            host_of_authority("example.com").as_deref(),
            Some("example.com")
        );
        assert_eq!(host_of_authority("[::1]:80").as_deref(), Some("::1"));
        assert_eq!(host_of_authority("[fd00::2]").as_deref(), Some("fd00::2"));
        assert_eq!(
            host_of_authority("10.0.0.1:80").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(host_of_authority(""), None);
        assert_eq!(host_of_authority("[::1"), None);
    }

    #[test]
    fn server_address_falls_back_to_destination_ip() {
        let dst: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(server_address(Some("svc:8080"), "/", dst), "svc");
        assert_eq!(
            server_address(None, "http://user:pw@abs.example:81/x", dst),
            "abs.example"
        );
        assert_eq!(server_address(None, "/x", dst), "10.1.2.3");
        let dst6: SocketAddr = "[fd00::7]:80".parse().unwrap();
        assert_eq!(server_address(Some(" "), "/x", dst6), "fd00::7");
    }

    #[test]
    fn error_type_prefers_status_then_transport() {
        assert_eq!(
            http_error_type(Some(503), Some(ErrorType::ConnectionReset)),
            Some(ErrorKind::Status(503))
        );
        assert_eq!(
            http_error_type(Some(200), Some(ErrorType::IncompleteResponse)),
            Some(ErrorKind::Transport(ErrorType::IncompleteResponse))
        );
        assert_eq!(
            http_error_type(Some(404), None),
            Some(ErrorKind::Status(404))
        );
        assert_eq!(http_error_type(Some(399), None), None);
        assert_eq!(http_server_error_type(Some(404), None), None);
        assert_eq!(
            http_server_error_type(Some(404), Some(ErrorType::ConnectionReset)),
            Some(ErrorKind::Transport(ErrorType::ConnectionReset))
        );
        assert_eq!(
            http_server_error_type(Some(500), Some(ErrorType::ConnectionReset)),
            Some(ErrorKind::Status(500))
        );
        assert_eq!(http_server_error_type(None, None), None);
        assert_eq!(http_error_type(None, None), None);
        assert_eq!(
            ErrorKind::Status(404).as_attribute(),
            opentelemetry::Value::from("404")
        );
        assert_eq!(
            ErrorKind::Transport(ErrorType::Timeout).as_attribute(),
            opentelemetry::Value::from("timeout")
        );
        assert_eq!(
            error_type_str(ErrorType::ConnectionRefused),
            "connection_refused"
        );
        assert_eq!(error_type_str(ErrorType::Io), "io");
    }
}
