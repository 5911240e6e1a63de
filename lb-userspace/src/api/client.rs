//! The control API's client side, for `lbctl` and tests.

use std::{
    error::Error as _,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{
    body::Bytes,
    header::{CONTENT_TYPE, HOST},
};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Why no answer came back. Any HTTP answer, refusals included, is not an
/// error here: callers tell "lbd is not there" (this) from "lbd said no"
/// (the status) because operators react differently to the two.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach lbd at {} (is it running? are you root?)", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer from lbd at {}: {doing} failed", socket.display())]
    Io {
        socket: PathBuf,
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no usable answer from lbd at {}: {why}", socket.display())]
    Malformed { socket: PathBuf, why: String },
}

/// Adding a backend may wait for neighbour discovery (a few seconds); past
/// this, lbd is taken to be stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Far above any listing lbd can produce; only bounds a peer that is not lbd.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Sends one request; returns the HTTP status and the parsed JSON body,
/// whatever the status. Blocks: it runs its own small runtime (on a thread
/// of its own when called from inside one, where blocking is not allowed).
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let run = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ClientError::Io {
                socket: socket.to_owned(),
                doing: "starting the client runtime",
                source,
            })?
            .block_on(exchange(socket, method, path, body))
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| match s.spawn(run).join() {
        Ok(answer) => answer,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let io_err = |doing| {
        move |source| ClientError::Io {
            socket: socket.to_owned(),
            doing,
            source,
        }
    };
    let malformed = |why: String| ClientError::Malformed {
        socket: socket.to_owned(),
        why,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "lbd")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| {
            io_err("building the request")(io::Error::new(io::ErrorKind::InvalidInput, e))
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| io_err("starting the HTTP exchange")(io::Error::other(e)))?;
    // Ends with the connection; its errors reach the request's future.
    tokio::spawn(conn);
    let answer = async {
        let response = sender.send_request(request).await.map_err(|e| {
            if e.is_parse() || e.is_incomplete_message() {
                malformed(not_an_answer(&e))
            } else {
                io_err("the HTTP exchange")(io::Error::other(e))
            }
        })?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    malformed(format!("HTTP {status} with a body over {MAX_ANSWER} bytes"))
                } else {
                    io_err("reading the answer")(io::Error::other(e))
                }
            })?
            .to_bytes();
        let value = serde_json::from_slice(&body).map_err(|e| {
            malformed(format!(
                "HTTP {status} with a body that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&body)
            ))
        })?;
        Ok((status, value))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| {
            io_err("reading the answer")(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing within {ANSWER_TIMEOUT:?}"),
            ))
        })?
}

/// Why hyper could not read an answer, for people.
fn not_an_answer(e: &hyper::Error) -> String {
    if e.is_incomplete_message() {
        return "the connection closed without an answer".to_owned();
    }
    match e.source() {
        Some(cause) => format!("the answer is not HTTP ({e}: {cause})"),
        None => format!("the answer is not HTTP ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixListener,
    };

    use super::*;

    /// A socket that reads one request and answers `raw`; returns what the
    /// client sent.
    fn answer_once(name: &str, raw: &'static [u8]) -> (PathBuf, std::thread::JoinHandle<String>) {
        let dir = std::env::temp_dir().join(format!("lbd-client-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0; 4096];
            while !String::from_utf8_lossy(&got).contains("\r\n\r\n{") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(raw).unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        (path, server)
    }

    fn cleanup(socket: &Path) {
        if let Some(dir) = socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn answers_parse_and_garbage_says_why() {
        let (path, server) = answer_once(
            "ok",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 8\r\n\r\n{\"a\": 1}",
        );
        let body = serde_json::json!({"vip": "x"});
        let answer = call(&path, "POST", "/v1/vips/add", Some(&body)).unwrap();
        assert_eq!(answer, (404, serde_json::json!({"a": 1})));
        let sent = server.join().unwrap().to_ascii_lowercase();
        assert!(sent.starts_with("post /v1/vips/add http/1.1\r\n"), "{sent}");
        assert!(sent.contains("host: lbd\r\n"), "{sent}");
        assert!(sent.ends_with("{\"vip\":\"x\"}"), "{sent}");
        cleanup(&path);

        for (name, raw, why) in [
            ("empty", &b""[..], "without an answer"),
            ("hello", b"hello\r\n\r\n", "not HTTP"),
            ("nojson", b"HTTP/1.1 200 OK\r\n\r\nnope", "not JSON"),
        ] {
            let (path, server) = answer_once(name, raw);
            let e = call(&path, "POST", "/v1/x", Some(&body)).unwrap_err();
            server.join().unwrap();
            cleanup(&path);
            assert!(
                matches!(&e, ClientError::Malformed { why: w, .. } if w.contains(why)),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn no_socket_is_a_connect_error() {
        let e = call(Path::new("/nonexistent/lbd.sock"), "GET", "/v1/vips", None).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn works_from_inside_a_runtime() {
        let (path, server) =
            answer_once("nested", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]");
        let body = serde_json::json!({});
        let answer = call(&path, "POST", "/v1/x", Some(&body)).unwrap();
        assert_eq!(answer, (200, serde_json::json!([])));
        server.join().unwrap();
        cleanup(&path);
    }
}
