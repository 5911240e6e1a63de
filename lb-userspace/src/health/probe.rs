//! One health check against one backend.

use std::{error::Error as _, net::SocketAddr, time::Duration};

use http_body_util::Empty;
use hyper::{
    body::Bytes,
    header::{CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpStream, UdpSocket},
    time::timeout,
};

use super::tcp::CheckSockets;
use crate::config::CheckKind;

/// Runs `kind` against `addr` within `limit`; `Err` says why it failed.
/// TCP checks run on `sockets` (see [`super::tcp`]).
pub async fn probe(
    kind: &CheckKind,
    addr: SocketAddr,
    limit: Duration,
    sockets: &CheckSockets,
) -> Result<(), String> {
    match timeout(limit, run(kind, addr, sockets)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

async fn run(kind: &CheckKind, addr: SocketAddr, sockets: &CheckSockets) -> Result<(), String> {
    match kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => sockets.check(addr).await,
        CheckKind::Http {
            path,
            expect_status,
            host,
        } => http(addr, path, *expect_status, host.as_deref()).await,
        CheckKind::Udp { payload, expect } => udp(addr, payload, expect).await,
    }
}

/// `GET path`: passes when the answer's status is `expect_status`. The
/// body is not read: the status is the verdict.
async fn http(
    addr: SocketAddr,
    path: &str,
    expect_status: u16,
    host: Option<&str>,
) -> Result<(), String> {
    let host = host.map_or_else(|| addr.ip().to_string(), str::to_owned);
    let request = hyper::Request::get(path)
        .header(HOST, host)
        .header(USER_AGENT, "lbd-health-check")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request ({e})"))?;
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| format!("HTTP: {}", why(&e)))?;
    // Driven here rather than spawned, so nothing outlives the probe's
    // timeout; the connection closes when both are dropped.
    let exchange = sender.send_request(request);
    tokio::pin!(conn, exchange);
    let answer = tokio::select! {
        answer = &mut exchange => answer,
        // The connection ended first (the answer may be in already).
        _ = &mut conn => exchange.await,
    };
    let status = answer
        .map_err(|e| {
            if e.is_parse() {
                format!("not an HTTP response: {}", why(&e))
            } else {
                why(&e)
            }
        })?
        .status()
        .as_u16();
    if status == expect_status {
        Ok(())
    } else {
        Err(format!("status {status}, expected {expect_status}"))
    }
}

/// hyper's error and its cause, which says what happened on the wire.
fn why(e: &hyper::Error) -> String {
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A datagram out; passes when the reply contains `expect`.
async fn udp(addr: SocketAddr, payload: &[u8], expect: &[u8]) -> Result<(), String> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|_| "bad local address".to_owned())?;
    let s = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("bind: {e}"))?;
    s.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.send(payload).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 2048];
    let n = s.recv(&mut buf).await.map_err(|e| format!("recv: {e}"))?;
    let reply = &buf[..n];
    // An empty expectation accepts any reply; otherwise the reply
    // must contain it (servers often prefix their own identity).
    if expect.is_empty() || reply.windows(expect.len()).any(|w| w == expect) {
        Ok(())
    } else {
        Err(format!(
            "reply {:?} lacks {:?}",
            String::from_utf8_lossy(reply),
            String::from_utf8_lossy(expect)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One probe on a fresh set of check sockets.
    async fn probe_once(kind: &CheckKind, addr: SocketAddr, limit: Duration) -> Result<(), String> {
        probe(kind, addr, limit, &CheckSockets::default()).await
    }
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    #[tokio::test]
    async fn tcp_and_http_against_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /health ") {
                    "200 OK"
                } else {
                    "503 Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        assert_eq!(probe_once(&CheckKind::Tcp, addr, t).await, Ok(()));
        let ok = CheckKind::Http {
            path: "/health".into(),
            expect_status: 200,
            host: None,
        };
        assert_eq!(probe_once(&ok, addr, t).await, Ok(()));
        let bad = CheckKind::Http {
            path: "/other".into(),
            expect_status: 200,
            host: None,
        };
        assert!(
            probe_once(&bad, addr, t)
                .await
                .unwrap_err()
                .contains("status 503")
        );
    }

    /// A server that reads one request head and answers `raw`; the heads
    /// it read come out of the returned channel.
    async fn answering(raw: &'static [u8]) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(raw).await;
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned()).await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn http_sends_the_host_and_reads_only_the_status() {
        // A body announced but never sent: the status alone decides.
        let (addr, mut heads) = answering(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let kind = CheckKind::Http {
            path: "/ready?deep=1".into(),
            expect_status: 204,
            host: Some("app.example".into()),
        };
        assert_eq!(
            probe_once(&kind, addr, Duration::from_secs(2)).await,
            Ok(())
        );
        let head = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /ready?deep=1 http/1.1\r\n"), "{head}");
        assert!(head.contains("host: app.example\r\n"), "{head}");

        let (addr, _heads) =
            answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial").await;
        let kind = CheckKind::Http {
            path: "/".into(),
            expect_status: 200,
            host: None,
        };
        assert_eq!(
            probe_once(&kind, addr, Duration::from_secs(2)).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn http_garbage_and_hang_ups_fail_with_a_reason() {
        let kind = CheckKind::Http {
            path: "/health".into(),
            expect_status: 200,
            host: None,
        };
        let t = Duration::from_secs(2);
        let (addr, _h) = answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
        let e = probe_once(&kind, addr, t).await.unwrap_err();
        assert!(e.contains("not an HTTP response"), "{e}");
        let (addr, _h) = answering(b"").await;
        let e = probe_once(&kind, addr, t).await.unwrap_err();
        assert!(!e.is_empty() && !e.contains("no answer within"), "{e}");
    }

    /// The check passes on the SYN-ACK and resets before the handshake's
    /// last ACK: the listener never has a connection to accept (and the
    /// checker no TIME_WAIT socket).
    #[tokio::test]
    async fn a_tcp_check_leaves_no_connection_to_accept() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(
            probe_once(&CheckKind::Tcp, addr, Duration::from_secs(2)).await,
            Ok(())
        );
        let accepted = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
        assert!(
            accepted.is_err(),
            "the backend was handed a connection: {accepted:?}"
        );
    }

    #[tokio::test]
    async fn refused_and_silent_backends_fail() {
        // Bound but never accepting or answering.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent = udp.local_addr().unwrap();
        let kind = CheckKind::Udp {
            payload: b"ping".to_vec(),
            expect: vec![],
        };
        assert!(
            probe_once(&kind, silent, Duration::from_millis(200))
                .await
                .is_err()
        );
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(
            probe_once(&CheckKind::Tcp, closed, Duration::from_secs(1))
                .await
                .unwrap_err()
                .contains("connect")
        );
    }

    #[tokio::test]
    async fn udp_reply_must_contain_the_expectation() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, peer)) = server.recv_from(&mut buf).await {
                let mut reply = b"b0:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = server.send_to(&reply, peer).await;
            }
        });
        let t = Duration::from_secs(1);
        let ok = CheckKind::Udp {
            payload: b"ping".to_vec(),
            expect: b"ping".to_vec(),
        };
        assert_eq!(probe_once(&ok, addr, t).await, Ok(()));
        let bad = CheckKind::Udp {
            payload: b"ping".to_vec(),
            expect: b"pong".to_vec(),
        };
        assert!(probe_once(&bad, addr, t).await.is_err());
    }
}
