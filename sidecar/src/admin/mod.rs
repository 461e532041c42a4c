//! Admin server (`--admin-addr`, default `0.0.0.0:15020`): `/metrics` (Prometheus text),
//! `/healthz`, `/readyz` and `/stats` (JSON for `sidecar top`). Read-only.
//!
//! CONTRACT: `run` creates a [`Readiness`] and flips it as the sidecar starts and drains;
//! [`AdminState`] is everything the server reads.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

pub mod prometheus;
pub mod stats;
#[cfg(test)]
mod tests;

/// What `/readyz` reports: ready once the programs are attached and the listeners are up,
/// not ready again once draining starts.
#[derive(Debug, Default)]
pub struct Readiness {
    listeners_up: AtomicBool,
    programs_attached: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    /// The proxy listeners are bound.
    pub fn set_listeners_up(&self) {
        self.listeners_up.store(true, Ordering::Release);
    }
    /// The interception programs are attached.
    pub fn set_programs_attached(&self) {
        self.programs_attached.store(true, Ordering::Release);
    }
    /// A stop signal arrived: no longer ready.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
    /// Ready to serve.
    pub fn is_ready(&self) -> bool {
        self.listeners_up.load(Ordering::Acquire)
            && self.programs_attached.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
    }
    /// True after a stop signal.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
    /// Why not ready (empty when ready), e.g. `["programs not attached"]`.
    pub fn reasons(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if !self.listeners_up.load(Ordering::Acquire) {
            r.push("proxy listeners not up");
        }
        if !self.programs_attached.load(Ordering::Acquire) {
            r.push("interception programs not attached");
        }
        if self.draining.load(Ordering::Acquire) {
            r.push("draining after a stop signal");
        }
        r
    }
}

/// What the admin server reads.
#[derive(Clone)]
pub struct AdminState {
    /// `/readyz`.
    pub readiness: Arc<Readiness>,
    /// `/metrics`: collects on every scrape.
    pub prometheus: prometheus::PrometheusReader,
    /// `/stats`: builds the snapshot on every request.
    pub stats: Arc<dyn Fn() -> stats::Stats + Send + Sync>,
}

/// Connections served at once; further clients wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Bound on reading a request head (also closes idle keep-alive connections).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish their request after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// The admin HTTP server: bound by [`AdminServer::bind`], served by [`AdminServer::spawn`].
///
/// `GET`/`HEAD` only: `/metrics` (Prometheus text format 0.0.4), `/healthz` (`ok`), `/readyz`
/// (`ready`, or 503 with the reasons one per line), `/stats` (JSON [`stats::Stats`]); other
/// paths are 404, other methods on these paths 405 with `Allow: GET, HEAD`. HTTP/1.x, one task
/// per connection, at most 64 connections at once.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl AdminServer {
    /// Binds the listening socket (port 0 picks a free port; see
    /// [`AdminServer::local_addr`]).
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled: then stops accepting, closes the listener, lets
    /// open connections finish their current request (bounded) and returns.
    pub fn spawn(self, state: AdminState, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(self.run(state, shutdown))
    }

    async fn run(self, state: AdminState, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&limit).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        state.clone(),
                        shutdown.clone(),
                        permit,
                    ));
                }
                Err(e) => {
                    tracing::debug!("admin server: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
            // Reap finished connection tasks so the set does not grow.
            while connections.try_join_next().is_some() {}
        }
        drop(self.listener);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            connections.abort_all();
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: AdminState,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(&state, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("admin server: connection from {peer}: {e}");
    }
}

/// The endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Healthz,
    Readyz,
    Stats,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/metrics" => Endpoint::Metrics,
            "/healthz" => Endpoint::Healthz,
            "/readyz" => Endpoint::Readyz,
            "/stats" => Endpoint::Stats,
            _ => return None,
        })
    }
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn respond<B>(state: &AdminState, req: Request<B>) -> Response<Full<Bytes>> {
    let Some(endpoint) = Endpoint::from_path(req.uri().path()) else {
        return response(StatusCode::NOT_FOUND, TEXT, "not found\n");
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = response(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match endpoint {
        Endpoint::Healthz => response(StatusCode::OK, TEXT, "ok\n"),
        Endpoint::Readyz => {
            let reasons = state.readiness.reasons();
            if reasons.is_empty() {
                response(StatusCode::OK, TEXT, "ready\n")
            } else {
                let mut body = String::new();
                for r in reasons {
                    body.push_str(r);
                    body.push('\n');
                }
                response(StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
            }
        }
        Endpoint::Metrics => {
            let reader = state.prometheus.clone();
            match tokio::task::spawn_blocking(move || reader.render()).await {
                Ok(Ok(text)) => response(StatusCode::OK, prometheus::CONTENT_TYPE, text),
                Ok(Err(e)) => response(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
                Err(e) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("rendering metrics: {e}\n"),
                ),
            }
        }
        Endpoint::Stats => {
            let stats = Arc::clone(&state.stats);
            match tokio::task::spawn_blocking(move || serde_json::to_vec(&stats())).await {
                Ok(Ok(json)) => response(StatusCode::OK, JSON, json),
                Ok(Err(e)) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding stats: {e}\n"),
                ),
                Err(e) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("building stats: {e}\n"),
                ),
            }
        }
    }
}
