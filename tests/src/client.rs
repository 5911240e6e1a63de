//! Test clients: HTTP GETs and UDP echoes, every operation under a timeout.
//!
//! These use the network namespace of the calling thread: run them inside
//! [`crate::in_netns`] (usually the client namespace).

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{
    Method, Version,
    body::Bytes,
    client::conn::http1::SendRequest,
    header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderMap, TRANSFER_ENCODING},
};
use hyper_util::rt::TokioIo;

use crate::http::MAX_BODY;

/// A response as the test client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Names in lower case, as hyper gives them.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One keep-alive HTTP/1.1 connection: several requests, one TCP flow (so
/// one conntrack entry and one backend on the LB).
///
/// hyper speaks the HTTP; the connection's own current-thread runtime runs
/// it only while a request is under way, on the calling thread, so the
/// socket stays in the namespace it was made in and no thread is left
/// behind.
pub struct HttpConn {
    addr: SocketAddr,
    local: SocketAddr,
    timeout: Duration,
    sender: SendRequest<Empty<Bytes>>,
    open: bool,
    /// Dropped last: the connection's task, and so its socket, go with it.
    runtime: tokio::runtime::Runtime,
}

impl HttpConn {
    /// Connects to `addr`; `timeout` bounds the connect and then each
    /// request, from sending it to the end of the response.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        Self::over(stream, addr, timeout)
    }

    /// Connects from `local` (address and port), so a test can ask where a
    /// flow will go before it starts.
    pub fn connect_from(local: SocketAddr, addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&local.into())
            .with_context(|| format!("binding {local}"))?;
        socket
            .connect_timeout(&addr.into(), timeout)
            .with_context(|| format!("connecting to {addr} from {local}"))?;
        Self::over(socket.into(), addr, timeout)
    }

    fn over(stream: TcpStream, addr: SocketAddr, timeout: Duration) -> Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let local = stream.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("starting the client's runtime")?;
        let (sender, conn) = runtime.block_on(async {
            let stream = tokio::net::TcpStream::from_std(stream)?;
            anyhow::Ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?)
        })?;
        // Ends with the connection; its errors reach the request's future.
        runtime.spawn(conn);
        Ok(HttpConn {
            addr,
            local,
            timeout,
            sender,
            open: true,
            runtime,
        })
    }

    /// Our end of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.local)
    }

    /// Whether the server has not (yet) asked to close the connection.
    pub fn is_open(&self) -> bool {
        self.open && !self.sender.is_closed()
    }

    /// Sends `GET path` and reads the whole response, whatever its status.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, true)
    }

    /// Sends `method path` (no body); `keep_alive: false` asks the server
    /// to close the connection after answering.
    pub fn request(&mut self, method: &str, path: &str, keep_alive: bool) -> Result<Response> {
        if !self.is_open() {
            bail!("connection to {} was closed by the server", self.addr);
        }
        let method: Method = method
            .parse()
            .with_context(|| format!("bad method {method:?}"))?;
        let req = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, self.addr.to_string())
            .header(CONNECTION, if keep_alive { "keep-alive" } else { "close" })
            .body(Empty::new())
            .with_context(|| format!("bad request {method} {path}"))?;
        let (sender, timeout) = (&mut self.sender, self.timeout);
        let exchange = async {
            sender.ready().await?;
            let (head, body) = sender.send_request(req).await?.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the body (at most {MAX_BODY} bytes): {e}"))?
                .to_bytes();
            anyhow::Ok((head, body))
        };
        let (head, body) = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, exchange).await })
            .map_err(|_| anyhow::anyhow!("no complete response within {timeout:?}"))
            .and_then(|r| r)
            .with_context(|| format!("{method} {path} on {}", self.addr))?;
        let head_only = method == Method::HEAD || matches!(head.status.as_u16(), 204 | 304);
        if !keep_alive || !stays_open(head.version, &head.headers, head_only) {
            self.open = false;
        }
        Ok(Response {
            status: head.status.as_u16(),
            headers: head
                .headers
                .iter()
                .map(|(n, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (n.as_str().to_owned(), v)
                })
                .collect(),
            body: body.to_vec(),
        })
    }
}

/// Whether a connection stays open after a response (RFC 9112 §9.3): not
/// after `Connection: close`, nor an HTTP/1.0 answer without keep-alive,
/// nor a body that runs to the end of the connection.
fn stays_open(version: Version, headers: &HeaderMap, head_only: bool) -> bool {
    let tokens = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let (mut close, mut keep) = (false, false);
    for t in tokens {
        close |= t.eq_ignore_ascii_case("close");
        keep |= t.eq_ignore_ascii_case("keep-alive");
    }
    let framed = head_only
        || headers.contains_key(CONTENT_LENGTH)
        || headers.contains_key(TRANSFER_ENCODING);
    !close && (version == Version::HTTP_11 || keep) && framed
}

/// One GET on a fresh connection; returns the body, or an error unless the
/// status is 200.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let mut conn = HttpConn::connect(addr, timeout)?;
    let resp = conn.request("GET", path, false)?;
    if resp.status != 200 {
        bail!(
            "GET {path} from {addr}: status {}: {}",
            resp.status,
            resp.text().trim()
        );
    }
    Ok(resp.text())
}

/// Sends `payload` in one datagram from an ephemeral port to `dst` and
/// returns the first reply; fails after `timeout`. The socket is connected,
/// so a reply from any other address (say, a DSR backend answering from
/// its own address instead of the VIP) is not taken as the answer.
pub fn udp_echo(dst: SocketAddr, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    udp_echo_from(0, dst, payload, timeout)
}

/// As [`udp_echo`], from local port `src_port` (0: any). A chosen port makes
/// each exchange a distinct flow, which tests counting flows rely on.
pub fn udp_echo_from(
    src_port: u16,
    dst: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let local: SocketAddr = match dst {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, src_port).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, src_port).into(),
    };
    let sock = UdpSocket::bind(local).context("binding a UDP socket")?;
    sock.connect(dst)
        .with_context(|| format!("connecting UDP socket to {dst}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    sock.send(payload)
        .with_context(|| format!("sending a datagram to {dst}"))?;
    let mut buf = vec![0; 65536];
    let n = sock
        .recv(&mut buf)
        .with_context(|| format!("no UDP reply from {dst} within {timeout:?}"))?;
    buf.truncate(n);
    Ok(buf)
}

/// Splits a test server's UDP echo (`NAME:payload`) into name and payload.
pub fn split_echo(reply: &[u8]) -> Option<(&str, &[u8])> {
    let colon = reply.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&reply[..colon]).ok()?;
    Some((name, &reply[colon + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HEAD, asking to close, and a connection used from another thread,
    /// against the test server on loopback.
    #[test]
    fn head_close_and_threads() {
        let args = ["--name", "s", "--http", "127.0.0.1:0"].map(String::from);
        let server =
            crate::testserver::Server::bind(&crate::testserver::Config::from_args(args).unwrap())
                .unwrap();
        let line: serde_json::Value =
            serde_json::from_str(&server.listening_line().unwrap()).unwrap();
        let addr: SocketAddr = line["http"][0].as_str().unwrap().parse().unwrap();
        // Serving threads run until the test process exits.
        std::thread::spawn(move || server.serve());
        let t = Duration::from_secs(5);

        let mut c = HttpConn::connect(addr, t).unwrap();
        let r = c.request("HEAD", "/", true).unwrap();
        assert_eq!((r.status, r.body.len()), (200, 0));
        assert_eq!(r.header("Content-Length"), Some("2"));
        let mut c = std::thread::spawn(move || {
            assert_eq!(c.get("/").unwrap().text(), "s\n");
            c
        })
        .join()
        .unwrap();
        assert!(c.is_open());
        assert_eq!(c.request("GET", "/", false).unwrap().text(), "s\n");
        assert!(!c.is_open());
        assert!(c.get("/").is_err());
    }

    #[test]
    fn keep_alive_rules() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (n, v) in pairs {
                m.append(
                    hyper::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let len = ("content-length", "1");
        assert!(stays_open(Version::HTTP_11, &h(&[len]), false));
        assert!(!stays_open(
            Version::HTTP_11,
            &h(&[len, ("connection", "x, Close")]),
            false
        ));
        assert!(!stays_open(Version::HTTP_10, &h(&[len]), false));
        assert!(stays_open(
            Version::HTTP_10,
            &h(&[len, ("connection", "keep-alive")]),
            false
        ));
        // No length: the body ends with the connection.
        assert!(!stays_open(Version::HTTP_11, &h(&[]), false));
        assert!(stays_open(Version::HTTP_11, &h(&[]), true));
    }

    #[test]
    fn splits_echo() {
        assert_eq!(split_echo(b"backend1:a:b"), Some(("backend1", &b"a:b"[..])));
        assert_eq!(split_echo(b"nocolon"), None);
    }
}
