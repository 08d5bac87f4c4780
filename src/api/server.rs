//! The HTTP edge: our own accept loop over hyper, because `axum::serve` sets no timer and so
//! no timeouts at all.
//!
//! * Header-read timeout (hyper's, per connection): a request head not complete within
//!   `header_read_timeout` closes the connection. hyper starts that timer whenever the
//!   connection waits for a head, so an idle keep-alive connection is closed after the same
//!   bound. hyper's HTTP/1-or-2 detection reads the first bytes before that timer exists,
//!   so a connection that sends nothing at all is closed here, by the same bound on its
//!   first byte (else each such connection would hold a file descriptor forever).
//! * Body-read timeout: `JsonBody` reads the whole body within `body_read_timeout` or answers
//!   408 (a trickling body cannot hold a connection longer).
//! * Graceful shutdown: when `shutdown` resolves, the listener closes, every connection is
//!   told to finish its current response and close, and `serve` returns once they have.
//!   Upgraded connections (WebSockets) are no longer hyper's: their handler ends them.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Connection-level limits of the HTTP edge.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// A request head must arrive within this; also how long an idle keep-alive connection
    /// stays open.
    pub header_read: Duration,
    /// A request body must arrive whole within this.
    pub body_read: Duration,
    /// Most connections open at once on one listening port (0: no limit); one more is
    /// answered 503 with `Retry-After` and closed.
    pub max_connections: usize,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(30),
            body_read: Duration::from_secs(30),
            max_connections: 0,
        }
    }
}

/// What a connection past `--max-connections` is told before it is closed: a whole HTTP/1.1
/// response with the OpenAI error object, so a client sees why and when to come back.
fn too_many_connections() -> Vec<u8> {
    let why = "too many connections: the server's --max-connections is reached; retry shortly";
    let body = super::ApiError::Unavailable(why.into())
        .in_stream_json()
        .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains the connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: HttpTimeouts,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .keep_alive(true);
    // HTTP/2 cleartext beside HTTP/1.1 (prior knowledge, as gRPC clients speak it): the gRPC
    // front (api/grpc/) and any HTTP/2 client. Idle connections are pinged, and closed when
    // the peer stops answering.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(timeouts.header_read))
        .keep_alive_timeout(Duration::from_secs(20));
    // Each connection task holds a receiver; `closed()` resolves when all are gone.
    let (close_tx, close_rx) = watch::channel(());
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = (timeouts.max_connections > 0)
        .then(|| std::sync::Arc::new(tokio::sync::Semaphore::new(timeouts.max_connections)));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Held for the connection's life.
        let slot = match slots.as_ref().map(|s| s.clone().try_acquire_owned()) {
            Some(Err(_)) => {
                tokio::spawn(refuse(stream));
                continue;
            }
            Some(Ok(permit)) => Some(permit),
            None => None,
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            let first_byte = tokio::time::timeout(timeouts.header_read, stream.peek(&mut first));
            if !matches!(first_byte.await, Ok(Ok(n)) if n > 0) {
                // Silent past the bound, closed by the peer, or failed: nothing to serve.
                drop(close_rx);
                return;
            }
            let _slot = slot;
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection from {peer} ended: {e}");
            }
            drop(close_rx);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(close_rx);
    close_tx.closed().await;
}

/// Answers a connection past the limit and closes it (bounded: a peer that does not read
/// cannot hold the task).
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let write = async {
        stream.write_all(&too_many_connections()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}
