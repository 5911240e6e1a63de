//! One health check against one backend.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

use crate::config::CheckKind;

/// Runs `kind` against `addr` within `limit`; `Err` says why it failed.
pub async fn probe(kind: &CheckKind, addr: SocketAddr, limit: Duration) -> Result<(), String> {
    match timeout(limit, run(kind, addr)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

async fn run(kind: &CheckKind, addr: SocketAddr) -> Result<(), String> {
    match kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("connect: {e}")),
        CheckKind::Http {
            path,
            expect_status,
            host,
        } => http(addr, path, *expect_status, host.as_deref()).await,
        CheckKind::Udp { payload, expect } => udp(addr, payload, expect).await,
    }
}

/// `GET path`: passes when the status line carries `expect_status`.
async fn http(
    addr: SocketAddr,
    path: &str,
    expect_status: u16,
    host: Option<&str>,
) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let host = host.map_or_else(|| addr.ip().to_string(), str::to_owned);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    // The status line is all we need; read a bounded amount.
    let mut buf = vec![0u8; 512];
    let mut got = 0;
    while got < buf.len() && !buf[..got].windows(2).any(|w| w == b"\r\n") {
        let n = s
            .read(&mut buf[got..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    if status == expect_status {
        Ok(())
    } else {
        Err(format!("status {status}, expected {expect_status}"))
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
    use tokio::net::TcpListener;

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
        assert_eq!(probe(&CheckKind::Tcp, addr, t).await, Ok(()));
        let ok = CheckKind::Http {
            path: "/health".into(),
            expect_status: 200,
            host: None,
        };
        assert_eq!(probe(&ok, addr, t).await, Ok(()));
        let bad = CheckKind::Http {
            path: "/other".into(),
            expect_status: 200,
            host: None,
        };
        assert!(
            probe(&bad, addr, t)
                .await
                .unwrap_err()
                .contains("status 503")
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
            probe(&kind, silent, Duration::from_millis(200))
                .await
                .is_err()
        );
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(
            probe(&CheckKind::Tcp, closed, Duration::from_secs(1))
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
        assert_eq!(probe(&ok, addr, t).await, Ok(()));
        let bad = CheckKind::Udp {
            payload: b"ping".to_vec(),
            expect: b"pong".to_vec(),
        };
        assert!(probe(&bad, addr, t).await.is_err());
    }
}
