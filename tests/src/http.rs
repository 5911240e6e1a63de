//! Just enough HTTP/1.1 framing for the test server: message heads of
//! bounded size, `Content-Length` bodies, keep-alive rules. Chunked
//! transfer coding is refused; no test client sends it. (The test client
//! speaks through hyper, within [`MAX_BODY`] too.)

use std::io::{self, BufRead, Read};

/// Largest message head (start line plus headers) the server accepts.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest body the server, and the test client, accept.
pub const MAX_BODY: usize = 1024 * 1024;

/// Why a message head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed the connection in the middle of a head.
    Truncated,
    /// The head is longer than [`MAX_HEAD`].
    TooLarge,
    /// The head is not HTTP/1.x.
    Malformed(String),
    Io(io::Error),
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::Truncated => write!(f, "connection closed in the middle of a message head"),
            HeadError::TooLarge => write!(f, "message head longer than {MAX_HEAD} bytes"),
            HeadError::Malformed(why) => write!(f, "malformed message head: {why}"),
            HeadError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for HeadError {}

/// Start line and headers of a request or response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Request: method, target, version. Response: version, status, reason.
    pub start: [String; 3],
    /// Names as sent; look them up with [`Head::header`].
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The HTTP version of the message, from the start line; `request`
    /// tells which field holds it.
    fn version(&self, request: bool) -> &str {
        if request {
            &self.start[2]
        } else {
            &self.start[0]
        }
    }

    /// Whether the connection stays open after this message (RFC 9112 §9.3).
    pub fn keep_alive(&self, request: bool) -> bool {
        let conn = self.header("connection").unwrap_or("");
        let has = |tok: &str| conn.split(',').any(|t| t.trim().eq_ignore_ascii_case(tok));
        if has("close") {
            return false;
        }
        self.version(request) == "HTTP/1.1" || has("keep-alive")
    }

    /// The body length announced by `Content-Length` (0 when absent);
    /// an error for a bad value, a body over [`MAX_BODY`] or any
    /// `Transfer-Encoding`.
    pub fn content_length(&self) -> Result<Option<usize>, String> {
        if self.header("transfer-encoding").is_some() {
            return Err("Transfer-Encoding is not supported".into());
        }
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.trim());
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.any(|v| v != first) {
            return Err("conflicting Content-Length headers".into());
        }
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("bad Content-Length {first:?}"));
        }
        let n: usize = first
            .parse()
            .map_err(|_| format!("bad Content-Length {first:?}"))?;
        if n > MAX_BODY {
            return Err(format!("body of {n} bytes is over {MAX_BODY}"));
        }
        Ok(Some(n))
    }
}

/// Reads one message head. `Ok(None)` when the peer closed the connection
/// cleanly before sending anything (the end of a keep-alive connection).
/// Empty lines before the start line are skipped, as RFC 9112 §2.2 asks.
pub fn read_head(r: &mut impl BufRead) -> Result<Option<Head>, HeadError> {
    let mut lines: Vec<String> = Vec::new();
    let mut used = 0usize;
    loop {
        let mut raw = Vec::new();
        let limit = (MAX_HEAD - used + 1) as u64;
        let n = r
            .by_ref()
            .take(limit)
            .read_until(b'\n', &mut raw)
            .map_err(HeadError::Io)?;
        if n == 0 {
            return if lines.is_empty() && used == 0 {
                Ok(None)
            } else {
                Err(HeadError::Truncated)
            };
        }
        used += n;
        if used > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        if raw.last() != Some(&b'\n') {
            return Err(HeadError::Truncated);
        }
        raw.pop();
        if raw.last() == Some(&b'\r') {
            raw.pop();
        }
        let line = String::from_utf8(raw)
            .map_err(|_| HeadError::Malformed("header line is not UTF-8".into()))?;
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            return parse_head(&lines).map(Some).map_err(HeadError::Malformed);
        }
        lines.push(line);
    }
}

fn parse_head(lines: &[String]) -> Result<Head, String> {
    let (start, rest) = lines.split_first().ok_or("empty head")?;
    let mut parts = start.splitn(3, ' ');
    let mut field = || parts.next().unwrap_or("").to_owned();
    let start_fields = [field(), field(), field()];
    if start_fields.iter().any(String::is_empty) {
        return Err(format!("bad start line {start:?}"));
    }
    let mut headers = Vec::with_capacity(rest.len());
    for line in rest {
        if line.starts_with([' ', '\t']) {
            return Err("obsolete header line folding".into());
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line without colon: {line:?}"))?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!("bad header name {name:?}"));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(Head {
        start: start_fields,
        headers,
    })
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `v` is an HTTP/1.x version string we speak.
pub fn is_http1(v: &str) -> bool {
    v == "HTTP/1.1" || v == "HTTP/1.0"
}

/// Reads exactly `len` body bytes.
pub fn read_body(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, HeadError> {
        read_head(&mut io::Cursor::new(s.as_bytes().to_vec()))
    }

    #[test]
    fn parses_request_and_keeps_rest() {
        let raw = b"\r\nGET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET";
        let mut cur = io::Cursor::new(raw.to_vec());
        let h = read_head(&mut cur).unwrap().unwrap();
        assert_eq!(h.start, ["GET", "/x", "HTTP/1.1"].map(String::from));
        assert_eq!(h.header("host"), Some("a"));
        assert_eq!(h.content_length(), Ok(Some(3)));
        assert!(h.keep_alive(true));
        assert_eq!(read_body(&mut cur, 3).unwrap(), b"abc");
        // The next message starts where the body ended.
        assert!(matches!(read_head(&mut cur), Err(HeadError::Truncated)));
    }

    #[test]
    fn clean_eof_is_none() {
        assert!(head("").unwrap().is_none());
    }

    #[test]
    fn keep_alive_rules() {
        let h = head("GET / HTTP/1.0\n\n").unwrap().unwrap();
        assert!(!h.keep_alive(true));
        let h = head("GET / HTTP/1.0\nConnection: Keep-Alive\n\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive(true));
        let h = head("HTTP/1.1 200 OK\nConnection: x, close\n\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive(false));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(head("GET\r\n\r\n"), Err(HeadError::Malformed(_))));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nHost"),
            Err(HeadError::Truncated)
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(head(&big), Err(HeadError::TooLarge)));
        assert!(matches!(head("\u{fffd} / HTTP/1.1\r\n\r\n"), Ok(Some(_))));
    }

    #[test]
    fn content_length_checks() {
        let cl = |s: &str| head(s).unwrap().unwrap().content_length();
        assert_eq!(cl("GET / HTTP/1.1\n\n"), Ok(None));
        assert!(cl("GET / HTTP/1.1\nContent-Length: -1\n\n").is_err());
        assert!(cl("GET / HTTP/1.1\nContent-Length: 1\nContent-Length: 2\n\n").is_err());
        assert!(cl("GET / HTTP/1.1\nContent-Length: 99999999999\n\n").is_err());
        assert!(cl("GET / HTTP/1.1\nTransfer-Encoding: chunked\n\n").is_err());
    }
}
