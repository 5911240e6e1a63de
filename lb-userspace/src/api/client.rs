//! The control API's client side, for `lbctl` and tests.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Sends one request; returns the HTTP status and the parsed JSON body.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach lbd at {} (is it running? are you root?)",
            socket.display()
        )
    })?;
    // Adding a backend may wait for neighbour discovery (a few seconds).
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes()).context("sending the request")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading the answer")?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("lbd sent a malformed answer");
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("lbd sent no status")?;
    let value =
        serde_json::from_str(body).with_context(|| format!("lbd sent non-JSON: {body:?}"))?;
    Ok((status, value))
}
