//! Accepts control and `/metrics` connections and hands each request to the
//! main loop, which owns the controller (one change at a time, in order).
//!
//! hyper frames the HTTP; what it cannot know is here: how many connections
//! a listener holds, which one to drop when a flood fills them, and how long
//! a connection may take to say what it wants or to take its answer.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hyper::{
    Method, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, HeaderValue},
    http::request::Parts,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixListener,
    sync::{Notify, mpsc, oneshot, watch},
    time::Instant,
};

use super::http::{self, Answer, MAX_HEAD, Refusal, Request, read_whole};

pub struct ApiCall {
    pub request: Request,
    pub reply: oneshot::Sender<(u16, Value)>,
    /// Fires once the answer is written: lets lbd exit after a teardown
    /// without cutting its own answer off.
    pub written: oneshot::Receiver<()>,
}

/// Binds the control socket at `path` and restricts it to root.
///
/// Only a stale socket (one nobody listens on any more: connecting is
/// refused) is replaced. Anything else at the path is refused: a file lbd
/// did not create is not lbd's to delete, and taking over a live socket
/// would leave the lbd behind it unreachable once this one exits (and
/// removes the path).
/// `instance.metrics_listen`'s listener, if configured (either role).
pub async fn bind_metrics(
    addr: Option<std::net::SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding instance.metrics_listen {addr}"))?,
        )),
        None => Ok(None),
    }
}

pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clear_stale(path)?;
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to mode 0600", path.display()))?;
    Ok(listener)
}

/// Removes `path` if it is a stale socket; fails if something else is there.
fn clear_stale(path: &Path) -> Result<()> {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {shown}")),
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let what = if kind.is_file() {
            "a regular file"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else {
            "not a socket"
        };
        bail!(
            "the control socket path {shown} is taken by {what}, which lbd will not delete: \
             move it away or set another instance.api_socket"
        );
    }
    match knock(path) {
        // A full backlog still means someone listens.
        Ok(()) => bail_live(path)?,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => bail_live(path)?,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot tell whether the socket {shown} is in use: connecting to it failed")
            });
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the stale socket {shown}")),
    }
}

fn bail_live(path: &Path) -> Result<()> {
    bail!(
        "the control socket {} is in use: a process (another lbd?) accepts connections on it; \
         stop it or set another instance.api_socket",
        path.display()
    )
}

/// Connects to the socket at `path` without waiting: a listener that is
/// alive but stuck must not hang lbd's start.
fn knock(path: &Path) -> io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.connect(&socket2::SockAddr::unix(path)?)
}

/// Connections one listener holds at once, so a flood of clients cannot
/// exhaust lbd's file descriptors (which health checks need). A new
/// connection past it closes the oldest one still without a complete
/// request; only when every connection is being answered does it wait.
const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send its whole request (head and
/// body). Eviction, not this, is what keeps a flood from starving lbd, so it
/// can stay generous for a scraper on a slow link; it reclaims connections
/// abandoned below the cap.
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// How long a client may take to take its answer: one that stops reading
/// would otherwise hold a connection no flood can evict.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// A pause after a failed accept (say, out of descriptors), so the loop
/// does not spin on a listener that keeps failing.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Where a connection is in its one exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No complete request yet: may be evicted, and is closed at
    /// [`READ_DEADLINE`].
    Reading,
    /// The main loop has the request: not bounded here (the main loop
    /// answers every request it takes).
    Handling,
    /// The answer is being written since then.
    Writing(Instant),
}

/// The connections of one listener, oldest first.
#[derive(Default)]
struct Conns {
    table: Mutex<Table>,
    /// A connection ended: a slot may be free.
    ended: Notify,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: BTreeMap<u64, Entry>,
}

struct Entry {
    phase: watch::Receiver<Phase>,
    /// Dropping it tells the connection to close.
    _evict: oneshot::Sender<()>,
}

/// A connection's place in [`Conns`], given up when dropped.
struct Slot {
    id: u64,
    conns: Arc<Conns>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.table().open.remove(&self.id);
        self.conns.ended.notify_one();
    }
}

/// What an admitted connection is served with.
struct Admission {
    phase: watch::Sender<Phase>,
    /// Resolves when a newer connection took this one's slot.
    evicted: oneshot::Receiver<()>,
    slot: Slot,
}

impl Conns {
    fn table(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent whatever panicked while holding it.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection, evicting the oldest connection without a
    /// complete request if need be; waits only while every slot is answering.
    async fn admit(self: &Arc<Self>) -> Admission {
        loop {
            if let Some(admission) = self.try_admit() {
                return admission;
            }
            // notify_one keeps a wake-up that comes before this wait.
            self.ended.notified().await;
        }
    }

    fn try_admit(self: &Arc<Self>) -> Option<Admission> {
        let mut t = self.table();
        if t.open.len() >= MAX_CONNECTIONS {
            let oldest = t
                .open
                .iter()
                .find(|(_, e)| *e.phase.borrow() == Phase::Reading)
                .map(|(&id, _)| id)?;
            t.open.remove(&oldest);
        }
        let id = t.next_id;
        t.next_id += 1;
        let (phase, phase_rx) = watch::channel(Phase::Reading);
        let (evict, evicted) = oneshot::channel();
        t.open.insert(
            id,
            Entry {
                phase: phase_rx,
                _evict: evict,
            },
        );
        Some(Admission {
            phase,
            evicted,
            slot: Slot {
                id,
                conns: self.clone(),
            },
        })
    }
}

/// The listeners lbd serves: the control socket and `/metrics`.
trait Listener {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn next(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections forever, each served by `serve_one` in a task of its
/// own, at most [`MAX_CONNECTIONS`] at once.
async fn accept_loop<L, F, Fut>(listener: L, serve_one: F)
where
    L: Listener,
    F: Fn(L::Stream, Admission) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let conns = Arc::new(Conns::default());
    loop {
        let stream = match listener.next().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let admission = conns.admit().await;
        tokio::spawn(serve_one(stream, admission));
    }
}

/// Serves the one request of `stream` with `handle`, which gets the request
/// read whole (or why not) and returns the answer; returns once the answer
/// is written or the connection is given up.
async fn drive<S, H, Fut>(stream: S, admission: Admission, handle: H)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Result<(Parts, Bytes), Refusal>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let Admission {
        phase,
        mut evicted,
        slot: _slot,
    } = admission;
    let mut phase_rx = phase.subscribe();
    let handle = Arc::new(handle);
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let (phase, handle) = (phase.clone(), handle.clone());
        async move {
            let read = read_whole(req).await;
            if read.is_ok() {
                phase.send_replace(Phase::Handling);
            }
            let answer = handle(read).await;
            phase.send_replace(Phase::Writing(Instant::now()));
            Ok::<_, Infallible>(answer)
        }
    });
    // One request per connection: a connection waiting for its next request
    // would be one more to evict or time out, for clients that do not reuse
    // connections anyway.
    // A client may shut its side down once the request is sent (`nc -N`,
    // scripts): it still gets its answer. Without half-close hyper drops
    // the connection at that EOF, even while the main loop is applying the
    // request, and a change would be made without its answer.
    let conn = http1::Builder::new()
        .keep_alive(false)
        .half_close(true)
        .max_header_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let read_by = Instant::now() + READ_DEADLINE;
    loop {
        let deadline = match *phase_rx.borrow_and_update() {
            Phase::Reading => Some(read_by),
            Phase::Handling => None,
            Phase::Writing(since) => Some(since + WRITE_DEADLINE),
        };
        let expired = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Errors are the client's: a malformed request hyper has
            // answered, or a connection gone.
            _ = &mut conn => return,
            _ = &mut evicted => return,
            () = expired => return,
            Ok(()) = phase_rx.changed() => {}
        }
    }
}

/// Serves the control API on `listener`: every request goes to the main
/// loop through `calls`.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<ApiCall>) {
    accept_loop(listener, move |stream, admission| {
        let calls = calls.clone();
        async move {
            let written = Arc::new(Mutex::new(None));
            let cell = written.clone();
            drive(stream, admission, move |read| {
                control(read, calls.clone(), cell.clone())
            })
            .await;
            // Written, or never will be: either way the main loop need not
            // wait any longer.
            let done = written
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    })
    .await
}

type WrittenCell = Arc<Mutex<Option<oneshot::Sender<()>>>>;

async fn control(
    read: Result<(Parts, Bytes), Refusal>,
    calls: mpsc::Sender<ApiCall>,
    written: WrittenCell,
) -> Answer {
    let request = match read {
        Ok((parts, body)) => Request::new(&parts, body),
        Err(r) => return http::json(r.status.as_u16(), &json!({"error": r.why})),
    };
    let (reply, answer) = oneshot::channel();
    let (done, written_rx) = oneshot::channel();
    *written.lock().unwrap_or_else(PoisonError::into_inner) = Some(done);
    let call = ApiCall {
        request,
        reply,
        written: written_rx,
    };
    let shutting_down = || (500, json!({"error": "lbd is shutting down"}));
    let (status, body) = if calls.send(call).await.is_ok() {
        answer.await.unwrap_or_else(|_| shutting_down())
    } else {
        shutting_down()
    };
    http::json(status, &body)
}

/// Serves `GET /metrics` on `listener` (any query string: scrapers add
/// their own parameters); each scrape asks the main loop for the text (it
/// owns the maps).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) {
    accept_loop(listener, move |stream, admission| {
        let scrapes = scrapes.clone();
        drive(stream, admission, move |read| {
            metrics(read, scrapes.clone())
        })
    })
    .await
}

async fn metrics(
    read: Result<(Parts, Bytes), Refusal>,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) -> Answer {
    let parts = match read {
        Ok((parts, _)) => parts,
        Err(r) => return http::text(r.status.as_u16(), format!("{}\n", r.why)),
    };
    if parts.uri.path() != "/metrics" {
        return http::text(
            404,
            format!("no such endpoint: {} (try /metrics)\n", parts.uri.path()),
        );
    }
    if parts.method != Method::GET && parts.method != Method::HEAD {
        let mut a = http::text(
            StatusCode::METHOD_NOT_ALLOWED.as_u16(),
            format!("{} is not allowed on /metrics\n", parts.method),
        );
        a.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return a;
    }
    let (tx, rx) = oneshot::channel();
    if scrapes.send(tx).await.is_ok()
        && let Ok(text) = rx.await
    {
        return http::text(200, text);
    }
    http::text(500, "lbd is shutting down\n".to_owned())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        path::PathBuf,
    };

    use super::*;

    /// A fresh directory for one test's sockets.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lbd-server-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_refused_and_kept() {
        let dir = scratch("file");
        let path = dir.join("lbd.sock");
        std::fs::write(&path, "precious").unwrap();
        let e = format!("{:#}", bind(&path).unwrap_err());
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("a regular file"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_keeps_answering() {
        let dir = scratch("live");
        let path = dir.join("lbd.sock");
        let first = bind(&path).unwrap();
        let e = format!("{:#}", bind(&path).unwrap_err());
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("in use"), "{e}");
        // The first listener still owns the path: a client reaches it.
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        first.accept().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let dir = scratch("stale");
        let path = dir.join("lbd.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = bind(&path).unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        listener.accept().await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Sends `raw` on a fresh blocking connection and reads the answer to
    /// its end (the servers close after one answer).
    fn exchange(mut s: impl Read + Write, raw: &[u8]) -> String {
        // The server may answer (and close) before reading all of an
        // oversized request; the answer is what matters.
        let _ = s.write_all(raw);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status(answer: &str) -> u16 {
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {answer:?}"))
    }

    fn body(answer: &str) -> &str {
        answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    /// A metrics listener whose main loop answers every scrape with one
    /// sample.
    async fn metrics_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<oneshot::Sender<String>>(4);
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send("lb_up 1\n".to_owned());
            }
        });
        tokio::spawn(serve_metrics(listener, tx));
        addr
    }

    fn get(addr: std::net::SocketAddr, target: &str) -> String {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        exchange(
            s,
            format!("GET {target} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_do_not_starve_a_scrape() {
        let addr = metrics_server().await;
        let idle: Vec<_> = (0..300)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let started = std::time::Instant::now();
        let a = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(status(&a), 200, "{a}");
        assert_eq!(body(&a), "lb_up 1\n");
        assert!(took < Duration::from_secs(1), "{took:?}");
        // The oldest were closed to make room; the newest still wait.
        let mut first = idle.first().unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(first.read(&mut [0; 16]).unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_answers_with_a_query_and_refuses_the_rest() {
        let addr = metrics_server().await;
        let ask = move |t: &'static str| tokio::task::spawn_blocking(move || get(addr, t));
        let a = ask("/metrics?name[]=lb_up").await.unwrap();
        assert_eq!((status(&a), body(&a)), (200, "lb_up 1\n"), "{a}");
        assert!(a.contains("text/plain; version=0.0.4"), "{a}");
        let a = ask("/other").await.unwrap();
        assert_eq!(status(&a), 404, "{a}");
        assert!(body(&a).contains("try /metrics"), "{a}");
        let post = tokio::task::spawn_blocking(move || {
            let s = std::net::TcpStream::connect(addr).unwrap();
            exchange(
                s,
                b"POST /metrics HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\n\r\n",
            )
        });
        let a = post.await.unwrap();
        assert_eq!(status(&a), 405, "{a}");
        assert!(a.to_ascii_lowercase().contains("allow: get, head"), "{a}");
    }

    /// A control socket whose main loop answers every call with its path.
    async fn control_server(dir: &Path) -> PathBuf {
        let path = dir.join("lbd.sock");
        let listener = bind(&path).unwrap();
        let (tx, mut rx) = mpsc::channel::<ApiCall>(4);
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let path = call.request.path.clone();
                let _ = call.reply.send((200, json!({"path": path})));
            }
        });
        tokio::spawn(serve(listener, tx));
        path
    }

    fn ask_control(path: &Path, raw: Vec<u8>) -> String {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        exchange(s, &raw)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversize_requests_are_refused_and_serving_goes_on() {
        let dir = scratch("oversize");
        let path = control_server(&dir).await;
        let p = path.clone();
        let answers = tokio::task::spawn_blocking(move || {
            let mut big_head = b"GET /v1/vips HTTP/1.1\r\nHost: lbd\r\n".to_vec();
            while big_head.len() <= MAX_HEAD {
                big_head
                    .extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
            }
            big_head.extend_from_slice(b"\r\n");
            let big_body = format!(
                "POST /v1/vips/add HTTP/1.1\r\nHost: lbd\r\nContent-Length: {}\r\n\r\n{}",
                http::MAX_BODY + 1,
                "x".repeat(http::MAX_BODY + 1)
            );
            let mut chunked =
                b"POST /v1/vips/add HTTP/1.1\r\nHost: lbd\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_vec();
            for _ in 0..80 {
                chunked.extend_from_slice(format!("400\r\n{}\r\n", "y".repeat(1024)).as_bytes());
            }
            chunked.extend_from_slice(b"0\r\n\r\n");
            [
                ask_control(&p, big_head),
                ask_control(&p, big_body.into_bytes()),
                ask_control(&p, chunked),
                ask_control(&p, b"GET /v1/vips HTTP/1.1\r\nHost: lbd\r\n\r\n".to_vec()),
            ]
        })
        .await
        .unwrap();
        assert_eq!(status(&answers[0]), 431, "{}", answers[0]);
        assert_eq!(status(&answers[1]), 413, "{}", answers[1]);
        assert!(body(&answers[1]).contains("65537 bytes"), "{}", answers[1]);
        assert_eq!(status(&answers[2]), 413, "{}", answers[2]);
        assert_eq!(status(&answers[3]), 200, "{}", answers[3]);
        assert_eq!(body(&answers[3]), r#"{"path":"/v1/vips"}"#);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Found by the `http` fuzz target: a request whose sender shut its
    /// side down reached the main loop, but its answer was never written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_half_closes_still_gets_its_answer() {
        let dir = scratch("half-close");
        let path = dir.join("lbd.sock");
        let listener = bind(&path).unwrap();
        let (tx, mut rx) = mpsc::channel::<ApiCall>(4);
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                // Long enough for the server to have read the client's EOF.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = call.reply.send((200, json!({"applied": true})));
            }
        });
        tokio::spawn(serve(listener, tx));
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"POST /v1/node/drain HTTP/1.0\r\n\r\n")
                .unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap();
        assert!(!answer.is_empty(), "no answer");
        assert_eq!(status(&answer), 200, "{answer}");
        assert_eq!(body(&answer), r#"{"applied":true}"#);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_do_not_stall_the_control_socket() {
        let dir = scratch("flood");
        let path = control_server(&dir).await;
        let idle: Vec<_> = (0..300)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        let p = path.clone();
        let started = std::time::Instant::now();
        let a = tokio::task::spawn_blocking(move || {
            ask_control(&p, b"GET /v1/vips HTTP/1.1\r\nHost: lbd\r\n\r\n".to_vec())
        })
        .await
        .unwrap();
        let took = started.elapsed();
        assert_eq!(status(&a), 200, "{a}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        drop(idle);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_slot_waits_only_while_all_are_answering() {
        let conns = Arc::new(Conns::default());
        let mut held: Vec<Admission> = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(conns.admit().await);
        }
        // Full of connections still reading: the oldest gives way.
        let newest = conns.admit().await;
        assert_eq!(
            held[0].evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        held.remove(0);
        held.push(newest);
        for a in &held {
            a.phase.send_replace(Phase::Handling);
        }
        // Full of connections being answered: the next one waits for one
        // to end.
        let waiting = conns.clone();
        let next = tokio::spawn(async move { waiting.admit().await.slot.id });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!next.is_finished());
        held.pop();
        let id = tokio::time::timeout(Duration::from_secs(1), next)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(id, MAX_CONNECTIONS as u64 + 1);
    }
}
