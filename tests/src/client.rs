//! Test clients: HTTP GETs and UDP echoes, every operation under a timeout.
//!
//! These use the network namespace of the calling thread: run them inside
//! [`crate::in_netns`] (usually the client namespace).

use std::{
    io::{BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::http::{self, MAX_BODY};

/// A response as the test client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
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
pub struct HttpConn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    open: bool,
}

impl HttpConn {
    /// Connects to `addr`; `timeout` bounds the connect and then every
    /// single read and write on the connection.
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
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone().context("cloning the socket")?;
        Ok(HttpConn {
            addr,
            reader: BufReader::new(stream),
            writer,
            open: true,
        })
    }

    /// Our end of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }

    /// Whether the server has not (yet) asked to close the connection.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Sends `GET path` and reads the whole response, whatever its status.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, true)
    }

    /// Sends `method path` (no body); `keep_alive: false` asks the server
    /// to close the connection after answering.
    pub fn request(&mut self, method: &str, path: &str, keep_alive: bool) -> Result<Response> {
        if !self.open {
            bail!("connection to {} was closed by the server", self.addr);
        }
        let conn = if keep_alive { "keep-alive" } else { "close" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: {conn}\r\n\r\n",
            self.addr
        );
        self.writer
            .write_all(req.as_bytes())
            .with_context(|| format!("sending {method} {path} to {}", self.addr))?;
        let resp = self.read_response(method == "HEAD").with_context(|| {
            format!("reading the response to {method} {path} from {}", self.addr)
        })?;
        Ok(resp)
    }

    fn read_response(&mut self, head_only: bool) -> Result<Response> {
        let head = http::read_head(&mut self.reader)?.context("server closed the connection")?;
        let [version, status, _reason] = &head.start;
        if !http::is_http1(version) {
            bail!("not an HTTP/1.x response: {:?}", head.start);
        }
        let status: u16 = status
            .parse()
            .ok()
            .filter(|s| (100..1000).contains(s))
            .with_context(|| format!("bad status {status:?}"))?;
        if !head.keep_alive(false) {
            self.open = false;
        }
        let len = head.content_length().map_err(anyhow::Error::msg)?;
        let body = match len {
            _ if head_only || status == 204 || status == 304 => Vec::new(),
            Some(n) => http::read_body(&mut self.reader, n)?,
            None => {
                // Without a length, the body runs to the end of the connection.
                self.open = false;
                let mut body = Vec::new();
                (&mut self.reader)
                    .take(MAX_BODY as u64 + 1)
                    .read_to_end(&mut body)?;
                if body.len() > MAX_BODY {
                    bail!("body longer than {MAX_BODY} bytes");
                }
                body
            }
        };
        if !self.open {
            let _ = self.writer.shutdown(Shutdown::Both);
        }
        Ok(Response {
            status,
            headers: head.headers,
            body,
        })
    }
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

    #[test]
    fn splits_echo() {
        assert_eq!(split_echo(b"backend1:a:b"), Some(("backend1", &b"a:b"[..])));
        assert_eq!(split_echo(b"nocolon"), None);
    }
}
