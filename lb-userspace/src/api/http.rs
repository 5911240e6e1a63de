//! Just enough HTTP/1.1 for the control API, with hard limits so a
//! misbehaving client cannot make lbd buffer without bound.

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

pub async fn read_request<R: tokio::io::AsyncRead + Unpin>(r: R) -> Result<Request> {
    // Bounds everything read, a header line without a newline included.
    let mut r = BufReader::new(r.take((MAX_HEAD + MAX_BODY) as u64));
    let mut line = String::new();
    let mut head_len = 0;
    r.read_line(&mut line)
        .await
        .context("reading the request line")?;
    head_len += line.len();
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("unsupported protocol {version}");
    }
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        let n = r.read_line(&mut h).await.context("reading headers")?;
        head_len += n;
        if head_len > MAX_HEAD {
            bail!("headers over {MAX_HEAD} bytes");
        }
        if n == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            content_length = v.trim().parse().context("bad Content-Length")?;
        }
    }
    if content_length > MAX_BODY {
        bail!("body of {content_length} bytes is over the {MAX_BODY}-byte limit");
    }
    let mut body = vec![0; content_length];
    r.read_exact(&mut body).await.context("reading the body")?;
    Ok(Request { method, path, body })
}

/// A Prometheus exposition answer.
pub async fn write_text<W: AsyncWrite + Unpin>(w: W, status: u16, body: &str) -> Result<()> {
    write_with_type(
        w,
        status,
        "text/plain; version=0.0.4; charset=utf-8",
        body.as_bytes(),
    )
    .await
}

pub async fn write_response<W: AsyncWrite + Unpin>(w: W, status: u16, body: &[u8]) -> Result<()> {
    write_with_type(w, status, "application/json", body).await
}

async fn write_with_type<W: AsyncWrite + Unpin>(
    mut w: W,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_a_request_with_a_body() {
        let raw = b"POST /v1/backends/add HTTP/1.1\r\nHost: lbd\r\nContent-Length: 2\r\n\r\n{}";
        let r = read_request(&raw[..]).await.unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("POST", "/v1/backends/add", &b"{}"[..])
        );
    }

    #[tokio::test]
    async fn refuses_garbage_and_oversize() {
        assert!(read_request(&b"hello\r\n\r\n"[..]).await.is_err());
        assert!(read_request(&b"GET / SPDY/3\r\n\r\n"[..]).await.is_err());
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(
            read_request(big.as_bytes())
                .await
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        let mut long = b"GET / HTTP/1.1\r\n".to_vec();
        for _ in 0..2000 {
            long.extend_from_slice(b"X-Filler: 0123456789\r\n");
        }
        assert!(read_request(long.as_slice()).await.is_err());
    }
}
