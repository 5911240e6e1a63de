//! Accepts control connections and hands each request to the main loop,
//! which owns the controller (one change at a time, in order).

use std::{os::unix::fs::PermissionsExt, path::Path};

use anyhow::{Context, Result};
use serde_json::Value;
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use super::http::{self, Request};

pub struct ApiCall {
    pub request: Request,
    pub reply: oneshot::Sender<(u16, Value)>,
    /// Fires once the answer is written: lets lbd exit after a teardown
    /// without cutting its own answer off.
    pub written: oneshot::Receiver<()>,
}

/// Binds the socket (replacing a stale one), restricts it to root.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to mode 0600", path.display()))?;
    Ok(listener)
}

/// Connections served at once; more wait in the listen backlog, so a flood
/// of clients cannot exhaust lbd's file descriptors (which health checks
/// need).
const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request.
const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The listeners lbd serves: the control socket and `/metrics`.
trait Listener {
    type Stream;
    fn next(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections until the listener fails for good, at most
/// [`MAX_CONNECTIONS`] served at once, each by `handle` in a task of its own.
async fn accept_loop<L, F, Fut>(listener: L, handle: F)
where
    L: Listener,
    F: Fn(L::Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok(stream) = listener.next().await else {
            continue;
        };
        let served = handle(stream);
        tokio::spawn(async move {
            let _permit = permit;
            served.await;
        });
    }
}

pub async fn serve(listener: UnixListener, calls: mpsc::Sender<ApiCall>) {
    accept_loop(listener, |stream: tokio::net::UnixStream| {
        let calls = calls.clone();
        async move {
            let (rd, wr) = stream.into_split();
            let request = tokio::time::timeout(READ_DEADLINE, http::read_request(rd)).await;
            let mut written = None;
            let (status, body) = match request {
                Ok(Ok(request)) => {
                    let (tx, rx) = oneshot::channel();
                    let (done_tx, done_rx) = oneshot::channel();
                    written = Some(done_tx);
                    let call = ApiCall {
                        request,
                        reply: tx,
                        written: done_rx,
                    };
                    if calls.send(call).await.is_err() {
                        return;
                    }
                    rx.await
                        .unwrap_or((500, serde_json::json!({"error": "lbd is shutting down"})))
                }
                Ok(Err(e)) => (400, serde_json::json!({"error": format!("{e:#}")})),
                Err(_) => (
                    400,
                    serde_json::json!({"error": "request not received within 10 s"}),
                ),
            };
            let body = serde_json::to_vec(&body).unwrap_or_default();
            let _ = http::write_response(wr, status, &body).await;
            if let Some(done) = written {
                let _ = done.send(());
            }
        }
    })
    .await
}

/// Serves `GET /metrics` on `listener`; each scrape asks the main loop for
/// the text (it owns the maps).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) {
    accept_loop(listener, |stream: tokio::net::TcpStream| {
        let scrapes = scrapes.clone();
        async move {
            let (rd, wr) = stream.into_split();
            let request = tokio::time::timeout(READ_DEADLINE, http::read_request(rd)).await;
            let (status, body) = match request {
                Ok(Ok(r)) if r.method == "GET" && r.path == "/metrics" => {
                    let (tx, rx) = oneshot::channel();
                    if scrapes.send(tx).await.is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(text) => (200, text),
                        Err(_) => (500, "lbd is shutting down\n".to_owned()),
                    }
                }
                Ok(Ok(r)) => (
                    404,
                    format!("no such endpoint: {} (try /metrics)\n", r.path),
                ),
                _ => (400, "bad request\n".to_owned()),
            };
            let _ = http::write_text(wr, status, &body).await;
        }
    })
    .await
}
