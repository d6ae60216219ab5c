//! How the gateway's HTTP connections are accepted and served, with the limits a listener facing untrusted
//! clients needs ([`HttpLimits`]): a cap on open connections, a deadline for a request's headers and one for its
//! body, and the body size limit enforced before any of the body is read when the request declares its length.
//!
//! It owns the accept loop and each connection's HTTP/1 state (hyper's `http1::Builder`, which `axum::serve` does
//! not expose); what a request means is the router's business. It must not know about routes, keys or the control
//! plane.
//!
//! - **Connection cap**: at most [`HttpLimits::max_connections`] connections are open at once. One that arrives
//!   while all are taken is closed at once, after a best-effort `503` with `Retry-After: 1` written without reading
//!   its request (it does not wait: a waiting connection would hold a descriptor, which is what the cap protects, and
//!   a client told at once can retry or go elsewhere).
//! - **Header-read timeout**: a connection whose request head has not fully arrived within
//!   [`HttpLimits::header_read_timeout`] is closed (hyper's `header_read_timeout`; it also closes keep-alive
//!   connections idle for that long).
//! - **Body**: a declared `Content-Length` over [`HttpLimits::max_body_bytes`] is answered `413` before the body is
//!   read; otherwise the body is read, up to the limit (`413` past it), within [`HttpLimits::body_read_timeout`]
//!   (`408` after it), and handed to the router whole. Both answers close the connection.
//! - **Shutdown**: when the `shutdown` future completes, no new connection is accepted, idle connections close,
//!   and [`serve`] returns once the requests in flight are answered.

use std::{
    convert::Infallible,
    future::Future,
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::DefaultBodyLimit,
    http::{HeaderValue, Request, StatusCode, header},
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tower::ServiceExt;

/// Limits of the gateway's HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest wait for a request's head (request line and headers), from the connection's first byte or the end
    /// of its previous request; the connection is closed after it.
    pub header_read_timeout: Duration,
    /// Longest wait for a request's whole body once its head is read (`408` after it).
    pub body_read_timeout: Duration,
    /// Most connections open at once; more are refused at once.
    pub max_connections: usize,
    /// Largest request body (`413` past it, before reading when the length is declared).
    pub max_body_bytes: usize,
}

/// Default [`HttpLimits::header_read_timeout`].
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`HttpLimits::body_read_timeout`]: 2 MiB at 70 KiB/s.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`HttpLimits::max_body_bytes`]: 2 MiB, axum's default body limit, which the gateway was built on.
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// File descriptors kept for everything but gateway connections (agents, the manifest watcher, webhooks, model
/// files, logs) when the default connection cap is derived from the process's descriptor limit.
pub const RESERVED_DESCRIPTORS: u64 = 256;
/// Upper bound of the default connection cap, whatever the descriptor limit.
pub const MAX_CONNECTIONS_CEILING: usize = 16_384;

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_timeout: BODY_READ_TIMEOUT,
            max_connections: default_max_connections(),
            max_body_bytes: MAX_BODY_BYTES,
        }
    }
}

/// Raises the soft limit on open descriptors towards the hard limit (at most 65,536), as servers do at start, so
/// the connection cap can be well above what slow clients could hold; returns the soft limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    let wanted = hard.min(65_536);
    if wanted > soft && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
        return wanted;
    }
    soft
}

/// The default connection cap: the soft limit on open descriptors less [`RESERVED_DESCRIPTORS`], at least 64 and
/// at most [`MAX_CONNECTIONS_CEILING`] (768 under the usual `ulimit -n 1024`).
pub fn default_max_connections() -> usize {
    let soft =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let usable = soft.saturating_sub(RESERVED_DESCRIPTORS).clamp(64, MAX_CONNECTIONS_CEILING as u64);
    usize::try_from(usable).unwrap_or(MAX_CONNECTIONS_CEILING)
}

/// Serves `router` on `listener` under `limits` until `shutdown` completes, then stops accepting, lets idle
/// connections close and returns when the requests in flight are answered.
pub async fn serve<F>(listener: TcpListener, router: Router, limits: HttpLimits, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let router = router.layer(DefaultBodyLimit::max(limits.max_body_bytes));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // `closing` tells connections to finish; `open` counts them (each holds a receiver).
    let (closing_tx, closing) = watch::channel(false);
    let (open_tx, open) = watch::channel(());
    let mut refused = Refusals::default();
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before it was accepted: wait a little
                    // rather than spin, as axum::serve does.
                    tracing::warn!(error = %e, "accepting a gateway connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refuse(&tcp);
            refused.note(limits.max_connections);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (router, closing, open) = (router.clone(), closing.clone(), open.clone());
        tokio::spawn(async move {
            connection(tcp, router, limits, closing).await;
            tracing::trace!(%peer, "gateway connection closed");
            drop((slot, open));
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drop(open);
    open_tx.closed().await;
    Ok(())
}

/// Warns about refused connections at most once a second, with how many there were.
#[derive(Debug, Default)]
struct Refusals {
    since_warning: u64,
    last_warning: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, cap: usize) {
        self.since_warning += 1;
        if self.last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(
                refused = self.since_warning,
                max_connections = cap,
                "gateway connections refused: all {cap} connection slots are taken"
            );
            self.since_warning = 0;
            self.last_warning = Some(Instant::now());
        }
    }
}

/// Tells a connection over the cap so, without reading from it or waiting on it, then closes it.
fn refuse(tcp: &TcpStream) {
    let _ = tcp.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
}

async fn connection(tcp: TcpStream, router: Router, limits: HttpLimits, mut closing: watch::Receiver<bool>) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let router = router.clone();
        async move { Ok::<_, Infallible>(handle(router, limits, request).await) }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(tcp), service));
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "gateway connection ended");
                }
                return;
            }
            _ = closing.wait_for(|c| *c), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Applies the body limits, then hands the request, its body read, to the router.
async fn handle(router: Router, limits: HttpLimits, request: Request<Incoming>) -> Response {
    let limit = limits.max_body_bytes;
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > limit as u64) {
        return closing(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is declared as {declared} bytes, more than the limit of {limit}"),
        );
    }
    let (parts, body) = request.into_parts();
    let body = if hyper::body::Body::is_end_stream(&body) {
        Body::empty()
    } else {
        match tokio::time::timeout(limits.body_read_timeout, Limited::new(body, limit).collect()).await {
            Ok(Ok(collected)) => Body::from(collected.to_bytes()),
            Ok(Err(e)) if e.is::<LengthLimitError>() => {
                return closing(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is more than the limit of {limit}"));
            }
            Ok(Err(e)) => return closing(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
            Err(_) => {
                let within = limits.body_read_timeout.as_secs_f64();
                return closing(StatusCode::REQUEST_TIMEOUT, format!("the body did not arrive within {within} s"));
            }
        }
    };
    match router.oneshot(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// An answer in the gateway's problem shape that closes the connection (its body may be partly unread).
fn closing(status: StatusCode, detail: String) -> Response {
    let mut response =
        (status, Json(json!({ "title": status.canonical_reason(), "status": status.as_u16(), "detail": detail })))
            .into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Duration = Duration::from_millis(300);

    async fn start(limits: HttpLimits) -> (std::net::SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let router = Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route("/echo", post(|body: axum::body::Bytes| async move { body.len().to_string() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = watch::channel(false);
        let served = tokio::spawn(async move {
            serve(listener, router, limits, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        });
        (addr, stop, served)
    }

    fn limits() -> HttpLimits {
        HttpLimits { header_read_timeout: SHORT, body_read_timeout: SHORT, max_connections: 64, max_body_bytes: 1000 }
    }

    /// Writes `request`, reads until the server closes (or 5 s pass): the response and how long it took.
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> (String, Duration) {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut response = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut response)).await;
        assert!(read.is_ok(), "the server did not close the connection within 5 s");
        (String::from_utf8_lossy(&response).into_owned(), started.elapsed())
    }

    fn get_hello() -> &'static [u8] {
        b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_headers_are_cut_off_while_normal_requests_are_served() {
        let (addr, _stop, _) = start(limits()).await;
        // Slow-header clients: part of a request head, then nothing.
        let mut slow = Vec::new();
        for _ in 0..20 {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
            slow.push(tcp);
        }
        let (response, took) = exchange(addr, get_hello()).await;
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("hello"), "{response}");
        assert!(took < SHORT, "a normal request waited {took:?} beside slow ones");
        // Each slow connection is closed by the server after the header timeout.
        let started = Instant::now();
        for mut tcp in slow {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "a slow-header connection was still open after 5 s");
        }
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_keep_alive_connection_left_idle_is_closed_after_the_header_timeout() {
        let (addr, _stop, _) = start(limits()).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let started = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.expect("still open").unwrap();
        assert_eq!(n, 0, "closed, not answered");
        assert!(started.elapsed() >= SHORT / 2, "{:?}", started.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_declared_length_over_the_limit_is_refused_before_the_body_is_read() {
        let (addr, _stop, _) = start(limits()).await;
        let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\nshort";
        let (response, took) = exchange(addr, request).await;
        assert!(response.starts_with("HTTP/1.1 413"), "{response}");
        assert!(response.contains("declared as 1073741824 bytes, more than the limit of 1000"), "{response}");
        assert!(took < SHORT, "413 after {took:?}: the body was waited for");
        // At the limit: served.
        let body = "x".repeat(1000);
        let request =
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n{body}");
        let (response, _) = exchange(addr, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("1000"), "{response}");
        // A chunked body (no declared length) past the limit: 413 once the limit is crossed.
        let chunk = "x".repeat(600);
        let request = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
        );
        let (response, _) = exchange(addr, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_slower_than_the_body_timeout_gets_408() {
        let (addr, _stop, _) = start(limits()).await;
        let (response, took) =
            exchange(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten..").await;
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(took >= SHORT && took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_are_refused_at_once_and_a_freed_slot_serves_again() {
        let (addr, _stop, _) =
            start(HttpLimits { max_connections: 2, header_read_timeout: Duration::from_secs(30), ..limits() }).await;
        let idle: Vec<TcpStream> =
            vec![TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap()];
        tokio::time::sleep(Duration::from_millis(100)).await; // both accepted
        let (response, took) = exchange(addr, get_hello()).await;
        assert!(response.is_empty() || response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(response.is_empty() || response.contains("Retry-After: 1"), "{response}");
        assert!(took < Duration::from_secs(1), "refused after {took:?}");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await; // both slots freed
        let (response, _) = exchange(addr, get_hello()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_stops_accepting_and_returns_once_connections_are_done() {
        let (addr, stop, served) = start(limits()).await;
        let (response, _) = exchange(addr, get_hello()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), served).await.expect("serve did not return").unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    }

    #[test]
    fn the_default_cap_stays_below_the_descriptor_limit() {
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let cap = default_max_connections() as u64;
        assert!((64..=MAX_CONNECTIONS_CEILING as u64).contains(&cap), "{cap}");
        assert!(soft < 64 + RESERVED_DESCRIPTORS || cap <= soft - RESERVED_DESCRIPTORS, "{cap} of {soft}");
    }
}
