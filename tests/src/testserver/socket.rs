//! Listening sockets for the test server, with the options std cannot set
//! before `bind`.

use std::net::{SocketAddr, TcpListener, UdpSocket};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use super::udp;

/// A socket of `ty` bound to `addr`:
/// - SO_REUSEADDR, so a restarted server gets its port back at once;
/// - IPV6_V6ONLY on IPv6, so `[::]:p` and `0.0.0.0:p` can both be bound;
/// - IP(V6)_FREEBIND, so a VIP can be bound before (or without) being
///   configured on `lo`.
fn bound(addr: SocketAddr, ty: Type, proto: Protocol) -> Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))
        .with_context(|| format!("creating a socket for {addr}"))?;
    sock.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => sock.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            sock.set_only_v6(true)?;
            sock.set_freebind_v6(true)?;
        }
    }
    sock.bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    Ok(sock)
}

/// A TCP listener on `addr`.
pub fn tcp_listener(addr: SocketAddr) -> Result<TcpListener> {
    let sock = bound(addr, Type::STREAM, Protocol::TCP)?;
    sock.listen(1024)
        .with_context(|| format!("listening on {addr}"))?;
    Ok(sock.into())
}

/// A UDP socket on `addr` that reports each datagram's destination address
/// (see [`udp::enable_pktinfo`]).
pub fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let sock: UdpSocket = bound(addr, Type::DGRAM, Protocol::UDP)?.into();
    udp::enable_pktinfo(&sock, addr.is_ipv6())
        .with_context(|| format!("enabling packet info on {addr}"))?;
    Ok(sock)
}
