//! The control API's client side, for `lbctl` and tests.

use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

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

/// Sends one request; returns the HTTP status and the parsed JSON body,
/// whatever the status.
pub fn call(
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
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err("setting the answer timeout"))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes())
        .map_err(io_err("sending the request"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(io_err("reading the answer"))?;
    parse_answer(&raw).map_err(|why| ClientError::Malformed {
        socket: socket.to_owned(),
        why,
    })
}

fn parse_answer(raw: &[u8]) -> Result<(u16, Value), String> {
    if raw.is_empty() {
        return Err("the connection closed without an answer".into());
    }
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer has no HTTP header")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("the answer has no HTTP status")?;
    let value = serde_json::from_str(body)
        .map_err(|e| format!("HTTP {status} with a body that is not JSON ({e}): {body:?}"))?;
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_garbage_says_why() {
        let (status, v) =
            parse_answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n{\"a\": 1}").unwrap();
        assert_eq!((status, v), (404, serde_json::json!({"a": 1})));
        for (raw, why) in [
            (&b""[..], "without an answer"),
            (b"hello", "no HTTP header"),
            (b"HTTP/1.1\r\n\r\n{}", "no HTTP status"),
            (b"HTTP/1.1 200 OK\r\n\r\nnope", "not JSON"),
        ] {
            let e = parse_answer(raw).unwrap_err();
            assert!(e.contains(why), "{raw:?}: {e}");
        }
    }
}
