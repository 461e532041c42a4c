//! HTTP/2 cleartext measurement: drives the sans-IO [`H2Translator`](super::h2::H2Translator)
//! over the two sockets of a connection and turns every stream into a span and metrics: an HTTP
//! exchange (CLIENT outbound, SERVER inbound), or a gRPC call when the request's `content-type`
//! is `application/grpc*`. Every request header block gets the span's `traceparent`; everything
//! else (DATA, flow control, SETTINGS, PING, GOAWAY) passes unchanged, so the endpoints' flow
//! control and concurrency limits hold end to end.
//!
//! If the application's bytes stop making sense as HTTP/2 (or the upstream's), that direction
//! is forwarded as it is from there on: the application gets the same bytes and the same
//! errors from its peer it would have had without the sidecar; only the measuring stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::h2::{H2Error, H2Translator, RequestHead, StreamEnd, StreamOutcome};
use crate::proxy::forward::{self, read_into, shutdown_write, write_counted, ConnShared, DirEnd};
use crate::proxy::sockopt;
use crate::telemetry::rpc::is_grpc_content_type;
use crate::telemetry::{
    ClientRequest, ConnectionDirection, ErrorType, HttpRequestEnd, HttpRequestStart, HttpVersion,
    RpcCall, RpcCallEnd, ServerRequest, ServerRequestInfo, Telemetry,
};

/// The telemetry of one stream in flight.
pub(crate) enum Call {
    /// An HTTP exchange seen from the pod's application (outbound).
    Client(ClientRequest),
    /// An HTTP exchange served to a remote caller (inbound).
    Server(ServerRequest),
    /// A gRPC call, either way.
    Rpc(RpcCall),
}

impl Call {
    fn traceparent(&self) -> Option<&str> {
        match self {
            Call::Client(r) => r.traceparent(),
            Call::Server(r) => r.traceparent(),
            Call::Rpc(r) => r.traceparent(),
        }
    }

    fn is_recording(&self) -> bool {
        match self {
            Call::Client(r) => r.is_recording(),
            Call::Server(r) => r.is_recording(),
            Call::Rpc(r) => r.is_recording(),
        }
    }

    /// Adds the `TCP_INFO` attributes of `socket` to a recording span.
    fn add_tcp_info(&mut self, socket: &TcpStream) {
        if !self.is_recording() {
            return;
        }
        match sockopt::tcp_info(socket) {
            Ok(info) => match self {
                Call::Client(r) => r.set_tcp_info(info.rtt, info.total_retrans),
                Call::Server(r) => r.set_tcp_info(info.rtt, info.total_retrans),
                Call::Rpc(r) => r.set_tcp_info(info.rtt, info.total_retrans),
            },
            Err(e) => tracing::trace!(error = %e, "TCP_INFO unavailable"),
        }
    }
}

/// The translator and the calls of the streams it tracks, shared by both directions.
struct State {
    translator: H2Translator,
    calls: HashMap<u32, Call>,
}

/// One HTTP/2 connection being proxied.
pub(crate) struct Http2<'a> {
    /// The application's socket (outbound), or the remote caller's (inbound).
    pub client: &'a TcpStream,
    /// The socket to the original destination.
    pub upstream: &'a TcpStream,
    /// Connection counters and error.
    pub shared: &'a ConnShared,
    /// Where streams are reported.
    pub telemetry: &'a Telemetry,
    /// Outbound: CLIENT spans; inbound: SERVER spans.
    pub direction: ConnectionDirection,
    /// Remote end of `client` (`client.address` of SERVER spans).
    pub peer: SocketAddr,
}

impl Http2<'_> {
    /// Proxies the connection until both directions end. `from_client` and `from_upstream`
    /// are bytes already read from each side (detection, or what followed an h2c upgrade);
    /// `calls` holds streams already started (stream 1 of an upgrade). Returns true when both
    /// directions ended cleanly.
    pub(crate) async fn run(
        &self,
        translator: H2Translator,
        from_client: BytesMut,
        from_upstream: BytesMut,
        calls: HashMap<u32, Call>,
    ) -> bool {
        let state = Mutex::new(State { translator, calls });
        let clean = forward::drive(
            self.requests(&state, from_client),
            self.responses(&state, from_upstream),
        )
        .await;
        let mut st = lock(&state);
        let mut ends = Vec::new();
        st.translator.close(&mut ends);
        self.finish(&mut st.calls, &mut ends);
        // Streams the translator stopped tracking (it gave up on a direction): still ended.
        let error = self.shared.error().unwrap_or(ErrorType::IncompleteResponse);
        for (_, call) in st.calls.drain() {
            end_call(self.telemetry, call, None, Some(error), 0, 0);
        }
        clean
    }

    /// Starts the call of a new stream and returns the `traceparent` to put on it.
    fn start(&self, calls: &mut HashMap<u32, Call>, head: &RequestHead) -> Option<String> {
        let start = HttpRequestStart {
            method: &head.method,
            target: &head.path,
            host: head.authority.as_deref(),
            version: HttpVersion::Http2,
            destination: self.shared.destination,
            traceparent: head.traceparent.as_deref(),
            tracestate: head.tracestate.as_deref(),
            start: SystemTime::now(),
            reused_connection: head.stream_id > 1,
        };
        let grpc = head
            .content_type
            .as_deref()
            .is_some_and(is_grpc_content_type);
        let call = match (grpc, self.direction) {
            (true, ConnectionDirection::Outbound) => {
                Call::Rpc(self.telemetry.rpc_call_start(&start, self.direction, None))
            }
            (true, ConnectionDirection::Inbound) => Call::Rpc(self.telemetry.rpc_call_start(
                &start,
                self.direction,
                Some(self.peer),
            )),
            (false, ConnectionDirection::Outbound) => {
                Call::Client(self.telemetry.client_request_start(&start))
            }
            (false, ConnectionDirection::Inbound) => {
                let info = ServerRequestInfo {
                    client: self.peer,
                    user_agent: head.user_agent.as_deref(),
                };
                Call::Server(self.telemetry.server_request_start(&start, &info))
            }
        };
        let traceparent = call.traceparent().map(str::to_owned);
        calls.insert(head.stream_id, call);
        traceparent
    }

    /// Ends the calls of finished streams.
    fn finish(&self, calls: &mut HashMap<u32, Call>, ends: &mut Vec<StreamEnd>) {
        for end in ends.drain(..) {
            let Some(mut call) = calls.remove(&end.stream_id) else {
                continue;
            };
            call.add_tcp_info(match self.direction {
                ConnectionDirection::Outbound => self.upstream,
                ConnectionDirection::Inbound => self.client,
            });
            let error = match end.outcome {
                StreamOutcome::Complete => None,
                StreamOutcome::Reset { .. } | StreamOutcome::Refused => {
                    Some(ErrorType::StreamReset)
                }
                StreamOutcome::ConnectionClosed => {
                    Some(self.shared.error().unwrap_or(ErrorType::IncompleteResponse))
                }
            };
            end_call(
                self.telemetry,
                call,
                Some(&end),
                error,
                end.request_body_bytes,
                end.response_body_bytes,
            );
        }
    }

    /// Application → upstream: every header block re-encoded with `traceparent` set.
    async fn requests(&self, state: &Mutex<State>, buf: BytesMut) -> DirEnd {
        let step = |st: &mut State,
                    input: &mut BytesMut,
                    out: &mut BytesMut,
                    ends: &mut Vec<StreamEnd>| {
            let State { translator, calls } = st;
            translator.from_client(input, out, &mut |head| self.start(calls, head), ends)
        };
        self.follow(
            state,
            buf,
            self.client,
            self.upstream,
            &self.shared.bytes_sent,
            step,
            "application",
        )
        .await
    }

    /// Upstream → application: forwarded unchanged, decoded on the way.
    async fn responses(&self, state: &Mutex<State>, buf: BytesMut) -> DirEnd {
        let step = |st: &mut State,
                    input: &mut BytesMut,
                    out: &mut BytesMut,
                    ends: &mut Vec<StreamEnd>| {
            st.translator.from_upstream(input, out, ends)
        };
        self.follow(
            state,
            buf,
            self.upstream,
            self.client,
            &self.shared.bytes_received,
            step,
            "upstream",
        )
        .await
    }

    /// One direction: reads `src`, lets `step` translate what arrived (ending the calls of the
    /// streams it finishes), writes the result to `dst`. After a translation error the rest is
    /// forwarded as it is; a partial frame at the end of the stream is passed on as well.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        state: &Mutex<State>,
        mut buf: BytesMut,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        step: impl Fn(
            &mut State,
            &mut BytesMut,
            &mut BytesMut,
            &mut Vec<StreamEnd>,
        ) -> Result<(), H2Error>,
        from: &'static str,
    ) -> DirEnd {
        let shared = self.shared;
        let mut out = BytesMut::new();
        let mut ends = Vec::new();
        loop {
            if !buf.is_empty() {
                let result = {
                    let mut st = lock(state);
                    let result = step(&mut st, &mut buf, &mut out, &mut ends);
                    self.finish(&mut st.calls, &mut ends);
                    result
                };
                if !out.is_empty() {
                    if let Err(e) = write_counted(dst, &out, counter).await {
                        return DirEnd::write_failed(shared, e);
                    }
                    out.clear();
                }
                if let Err(e) = result {
                    tracing::debug!(
                        destination = %shared.destination,
                        error = %e,
                        from,
                        "HTTP/2 not followed; forwarding the rest as it is"
                    );
                    return forward::pump(src, dst, &buf, counter, shared).await;
                }
            }
            match read_into(src, &mut buf).await {
                Ok(0) => {
                    if !buf.is_empty() {
                        if let Err(e) = write_counted(dst, &buf, counter).await {
                            return DirEnd::write_failed(shared, e);
                        }
                    }
                    shutdown_write(dst);
                    return DirEnd::Eof;
                }
                Ok(_) => {}
                Err(e) => return DirEnd::read_failed(shared, e),
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends one call with what its stream showed (`end` is `None` when the stream was never seen to
/// finish).
fn end_call(
    telemetry: &Telemetry,
    call: Call,
    end: Option<&StreamEnd>,
    error: Option<ErrorType>,
    request_body_bytes: u64,
    response_body_bytes: u64,
) {
    let now = SystemTime::now();
    let status = end.and_then(|e| e.status);
    match call {
        Call::Client(r) => telemetry.client_request_end(
            r,
            HttpRequestEnd {
                status,
                request_body_bytes,
                response_body_bytes,
                error,
                end: now,
            },
        ),
        Call::Server(r) => telemetry.server_request_end(
            r,
            HttpRequestEnd {
                status,
                request_body_bytes,
                response_body_bytes,
                error,
                end: now,
            },
        ),
        Call::Rpc(r) => {
            let (reset_code, refused) = match end.map(|e| e.outcome) {
                Some(StreamOutcome::Reset { code, .. }) => (Some(code), false),
                Some(StreamOutcome::Refused) => (None, true),
                _ => (None, false),
            };
            telemetry.rpc_call_end(
                r,
                RpcCallEnd {
                    grpc_status: end.and_then(|e| e.grpc_status),
                    http_status: status,
                    reset_code,
                    refused,
                    error,
                    request_body_bytes,
                    response_body_bytes,
                    end: now,
                },
            );
        }
    }
}
