//! The test server's HTTP side: one thread per connection, keep-alive,
//! every GET answered with the server's name.

use std::{
    io::{self, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use crate::http::{self as msg, HeadError};

use super::Stats;

/// A connection idle this long is closed, so abandoned clients do not pin
/// threads forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed at accept.
const MAX_CONNS: usize = 512;

/// Accepts connections on `listener` forever.
pub fn serve(listener: TcpListener, name: Arc<str>, stats: Arc<Stats>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("lb-testserver {name}: accept: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNS {
            active.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (name, stats, active) = (name.clone(), stats.clone(), active.clone());
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                // Errors here are a client going away; nothing to do.
                let _ = serve_conn(stream, &name, &stats);
                active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            eprintln!("lb-testserver: cannot spawn a connection thread: {e}");
        }
    }
}

/// What to send back for one request.
struct Reply {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    /// Close after this reply even if the client wants keep-alive (after
    /// a request we could not frame, the stream position is unknown).
    close: bool,
}

impl Reply {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status,
            body: body.into(),
            content_type: "text/plain",
            close: false,
        }
    }

    fn fatal(status: u16, why: &str) -> Self {
        Reply {
            close: true,
            ..Reply::text(status, format!("{why}\n"))
        }
    }
}

fn serve_conn(stream: TcpStream, name: &str, stats: &Stats) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let head = match msg::read_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) | Err(HeadError::Io(_)) | Err(HeadError::Truncated) => return Ok(()),
            Err(HeadError::TooLarge) => {
                return write_reply(
                    &mut writer,
                    &Reply::fatal(431, "head too large"),
                    false,
                    false,
                );
            }
            Err(e @ HeadError::Malformed(_)) => {
                return write_reply(
                    &mut writer,
                    &Reply::fatal(400, &e.to_string()),
                    false,
                    false,
                );
            }
        };
        let [method, target, version] = &head.start;
        if !msg::is_http1(version) {
            return write_reply(
                &mut writer,
                &Reply::fatal(400, "not HTTP/1.x"),
                false,
                false,
            );
        }
        let body_len = match head.content_length() {
            Ok(n) => n.unwrap_or(0),
            Err(why) => return write_reply(&mut writer, &Reply::fatal(400, &why), false, false),
        };
        // Requests may carry a body we ignore; read it so the next request
        // on the connection starts in the right place.
        msg::read_body(&mut reader, body_len)?;
        let reply = match method.as_str() {
            _ if !target.starts_with('/') => Reply::fatal(400, "bad request target"),
            "GET" | "HEAD" => route(target, name, stats),
            _ => Reply::text(405, "only GET and HEAD\n"),
        };
        let keep_alive = head.keep_alive(true) && !reply.close;
        write_reply(&mut writer, &reply, keep_alive, method == "HEAD")?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn route(target: &str, name: &str, stats: &Stats) -> Reply {
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match path {
        "/health" => Reply::text(200, "ok"),
        // Not counted, so polling the counters does not change them.
        "/stats" => Reply {
            content_type: "application/json",
            ..Reply::text(200, stats.json(name))
        },
        _ => {
            stats.http_requests.fetch_add(1, Ordering::Relaxed);
            Reply::text(200, format!("{name}\n"))
        }
    }
}

fn write_reply(w: &mut TcpStream, r: &Reply, keep_alive: bool, head_only: bool) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {conn}\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    if r.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    w.write_all(&out)?;
    w.flush()
}
