//! UDP echo that answers from the address each datagram was sent to.
//!
//! A socket bound to 0.0.0.0 would otherwise reply from the address the
//! route to the client picks (the backend's own address), but with DSR the
//! client sent to the VIP and its connected socket only accepts replies from
//! the VIP. IP_PKTINFO / IPV6_RECVPKTINFO tell us the destination of each
//! datagram, and the same control message on send makes it the source.

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd,
    ptr,
    sync::atomic::Ordering,
};

use super::Stats;

/// Room for one pktinfo control message of either family.
const CONTROL_LEN: usize = 64;

/// 8-byte aligned buffer, as cmsg headers require.
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

fn setsockopt_int(sock: &UdpSocket, level: libc::c_int, opt: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the pointer and length describe `one`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            ptr::from_ref(&one).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to report each datagram's destination address.
pub fn enable_pktinfo(sock: &UdpSocket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_PKTINFO)
    }
}

/// Receives one datagram: its length, sender and destination address.
fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    // SAFETY (all blocks below): every pointer handed to the kernel points
    // into a live local of the stated size; cmsg pointers come from the
    // CMSG_* helpers over `msg`, which bound them by msg_controllen, and the
    // payload reads use read_unaligned.
    let mut peer: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut control = Control([0; CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = ptr::from_mut(&mut peer).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN;
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let peer = sockaddr_to_std(&peer)?;
    let mut dst = None;
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        let (level, ty) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
            let info: libc::in_pktinfo = unsafe { ptr::read_unaligned(data.cast()) };
            dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                info.ipi_addr.s_addr,
            ))));
        } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
            let info: libc::in6_pktinfo = unsafe { ptr::read_unaligned(data.cast()) };
            dst = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
        }
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n, peer, dst))
}

/// Sends `buf` to `peer`, from source address `src` when given.
fn send(sock: &UdpSocket, buf: &[u8], peer: SocketAddr, src: Option<IpAddr>) -> io::Result<usize> {
    let Some(src) = src else {
        return sock.send_to(buf, peer);
    };
    // SAFETY: as in `recv`; the control buffer is sized with CMSG_SPACE for
    // the one message written into it.
    let (mut name, namelen) = std_to_sockaddr(peer);
    let mut control = Control([0; CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = ptr::from_mut(&mut name).cast();
    msg.msg_namelen = namelen;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    let (level, ty, len) = match src {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            mem::size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            mem::size_of::<libc::in6_pktinfo>(),
        ),
    };
    let len = len as libc::c_uint;
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(len) } as usize;
    if msg.msg_controllen > CONTROL_LEN {
        return Err(io::Error::other("control buffer too small"));
    }
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = ty;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len) as usize;
        let data = libc::CMSG_DATA(cmsg);
        match src {
            IpAddr::V4(a) => {
                // ifindex 0: let the route to the peer pick the interface.
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                ptr::write_unaligned(data.cast(), info);
            }
            IpAddr::V6(a) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                ptr::write_unaligned(data.cast(), info);
            }
        }
    }
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    // SAFETY: the family field says which sockaddr type the storage holds,
    // and sockaddr_storage is large and aligned enough for either.
    unsafe {
        match libc::c_int::from(ss.ss_family) {
            libc::AF_INET => {
                let a: &libc::sockaddr_in = &*ptr::from_ref(ss).cast();
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a: &libc::sockaddr_in6 = &*ptr::from_ref(ss).cast();
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            f => Err(io::Error::other(format!("unexpected address family {f}"))),
        }
    }
}

fn std_to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage, and we write a sockaddr
    // type that fits in it at its start.
    unsafe {
        let mut ss: libc::sockaddr_storage = mem::zeroed();
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                ptr::write(ptr::from_mut(&mut ss).cast(), sin);
                mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                ptr::write(ptr::from_mut(&mut ss).cast(), sin6);
                mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
}

/// Echoes every datagram on `sock` as `NAME:` + payload, forever. Errors
/// on single datagrams (a peer gone away) are logged and skipped.
pub fn serve(sock: UdpSocket, name: &str, stats: &Stats) {
    let mut buf = vec![0u8; 65536];
    let prefix = format!("{name}:");
    let mut reply = Vec::with_capacity(buf.len() + prefix.len());
    loop {
        let (n, peer, dst) = match recv(&sock, &mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("lb-testserver {name}: udp recv: {e}");
                // Never spin on a persistent error.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        reply.clear();
        reply.extend_from_slice(prefix.as_bytes());
        reply.extend_from_slice(&buf[..n]);
        // A reply can be larger than 64 KiB minus headers only in theory;
        // the kernel's EMSGSIZE then just lands in the log.
        match send(&sock, &reply, peer, dst) {
            Ok(_) => {
                stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => eprintln!("lb-testserver {name}: udp reply to {peer}: {e}"),
        }
    }
}
