//! TCP checks on sockets that outlive the check.
//!
//! A check asks one thing, whether the backend answers a SYN with a SYN-ACK,
//! and the reset that ends it follows the SYN-ACK alone (no final ACK, see
//! [`hold_handshake_ack`]), so the backend's kernel drops a half-open
//! request instead of queueing a connection for `accept`, and nobody keeps
//! a TIME_WAIT socket.
//!
//! A socket per check (HAProxy's way, and this one's before) costs eight
//! system calls and a socket's allocation, poller registration and release
//! on top of the handshake itself. Here a finished check's socket is
//! disconnected instead of closed (`connect` to `AF_UNSPEC`, which sends the
//! same reset) and goes back to an idle list, still registered with the
//! poller, for the next check of the same address family: a check is then
//! four calls, `TCP_QUICKACK` off (the disconnect resets it), `connect`, one
//! read of the socket's state when the poller says it changed, and the
//! disconnect.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{Interest, unix::AsyncFd};

/// Idle sockets kept per address family: enough for every check that
/// starts in the same instant at ten thousand checks a second; more than
/// that are closed as they come back.
const IDLE_KEPT: usize = 1024;

/// Reusable check sockets, per address family. One per runtime: a socket is
/// registered with the poller of the runtime that created it.
#[derive(Debug, Default)]
pub struct CheckSockets {
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    v4: Vec<AsyncFd<Socket>>,
    v6: Vec<AsyncFd<Socket>>,
    opened: u64,
}

impl Idle {
    fn of(&mut self, v6: bool) -> &mut Vec<AsyncFd<Socket>> {
        if v6 { &mut self.v6 } else { &mut self.v4 }
    }
}

/// Where a check's socket stands, from the kernel's own record of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The SYN-ACK came: the backend answers.
    Answered,
    /// No answer yet.
    Waiting,
    /// Refused, unreachable, or reset: the socket's error says which.
    Failed,
}

impl CheckSockets {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Sockets opened so far, over the pool's life (idle ones are reused,
    /// so at a steady rate this stops growing).
    pub fn opened(&self) -> u64 {
        self.idle.lock().map_or(0, |i| i.opened)
    }

    /// Whether `addr` answers a SYN. Runs until it knows: the caller bounds
    /// it with its timeout (dropping the future disconnects the socket and
    /// returns it all the same).
    pub async fn check(&self, addr: SocketAddr) -> Result<(), String> {
        let v6 = addr.is_ipv6();
        let fd = self.take(v6).map_err(|e| format!("socket: {e}"))?;
        let mut lease = Lease {
            pool: self,
            fd: Some(fd),
            v6,
        };
        lease.run(addr).await
    }

    fn take(&self, v6: bool) -> io::Result<AsyncFd<Socket>> {
        if let Ok(mut idle) = self.idle.lock() {
            if let Some(fd) = idle.of(v6).pop() {
                return Ok(fd);
            }
            idle.opened += 1;
        }
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let s = Socket::new(
            domain,
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        // SAFETY: the socket is owned by the AsyncFd from here on, and a
        // socket2::Socket's descriptor is the one it was created with.
        unsafe { AsyncFd::register_with_interest(s, Interest::WRITABLE) }.map_err(io::Error::from)
    }

    fn give_back(&self, v6: bool, fd: AsyncFd<Socket>) {
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.of(v6);
            if list.len() < IDLE_KEPT {
                list.push(fd);
            }
        }
    }
}

/// A socket out of the pool for one check. However the check ends (an
/// answer, a failure, or the caller's timeout dropping it), the socket is
/// disconnected and goes back, or is closed if it cannot be disconnected.
struct Lease<'a> {
    pool: &'a CheckSockets,
    fd: Option<AsyncFd<Socket>>,
    v6: bool,
}

impl Lease<'_> {
    async fn run(&mut self, addr: SocketAddr) -> Result<(), String> {
        let Some(fd) = self.fd.as_ref() else {
            return Err("socket: none".to_owned());
        };
        forget_stale_readiness(fd);
        hold_handshake_ack(fd.get_ref());
        match fd.get_ref().connect(&SockAddr::from(addr)) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(format!("connect: {e}")),
        }
        loop {
            // Readiness left over from the socket's last check (its
            // disconnect wakes the poller too) can end this wait early:
            // the socket's state, not the wake-up, says what happened.
            let mut ready = fd.writable().await.map_err(|e| format!("connect: {e}"))?;
            match stage(fd.get_ref()) {
                Stage::Answered => return Ok(()),
                Stage::Waiting => ready.clear_ready(),
                Stage::Failed => {
                    let why = match fd.get_ref().take_error() {
                        Ok(Some(e)) => e,
                        Ok(None) => io::Error::from_raw_os_error(libc::ECONNRESET),
                        Err(e) => e,
                    };
                    return Err(format!("connect: {why}"));
                }
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take()
            && disconnect(fd.get_ref()).is_ok()
        {
            self.pool.give_back(self.v6, fd);
        }
    }
}

/// Clears readiness the poller reported for the socket's previous check, so
/// the first wait of this one is not woken by it (only a saving: [`Lease::run`]
/// reads the socket's state after every wake-up either way).
fn forget_stale_readiness(fd: &AsyncFd<Socket>) {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    if let std::task::Poll::Ready(Ok(mut ready)) = fd.poll_write_ready(&mut cx) {
        ready.clear_ready();
    }
}

/// The kernel's TCP state of `s` (the first byte of `TCP_INFO`).
fn stage(s: &Socket) -> Stage {
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_SYN_SENT: u8 = 2;
    let mut state: u8 = 0;
    let mut len = std::mem::size_of::<u8>() as libc::socklen_t;
    // SAFETY: a valid socket; the kernel writes at most `len` bytes of the
    // tcp_info it fills, and `len` is the size of `state`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut state).cast(),
            &mut len,
        )
    };
    match (rc, state) {
        (0, TCP_ESTABLISHED) => Stage::Answered,
        (0, TCP_SYN_SENT) => Stage::Waiting,
        _ => Stage::Failed,
    }
}

/// Ends the socket's connection (a reset if it had one) and leaves it
/// unconnected and reusable: `connect` to an `AF_UNSPEC` address.
fn disconnect(s: &Socket) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr is a valid AF_UNSPEC address.
    let mut unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
    unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: a valid socket, and an address of the size passed.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &raw const unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Holds back the handshake's final ACK: `TCP_QUICKACK` off puts the socket
/// in delayed-ACK mode before the SYN-ACK arrives, so the reset that ends
/// the check follows the SYN-ACK alone, as HAProxy's TCP checks do. The
/// disconnect clears the mode, so it is set again for every check. Best
/// effort: without it the check is the same, only dearer for both ends.
fn hold_handshake_ack(s: &Socket) {
    let off: libc::c_int = 0;
    // SAFETY: a valid socket and an option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&raw const off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "TCP_QUICKACK off refused");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_socket_serves_check_after_check_whatever_their_outcome() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = CheckSockets::new();
        for round in 0..50 {
            assert_eq!(pool.check(up).await, Ok(()), "round {round}");
            let e = pool.check(refused).await.unwrap_err();
            assert!(e.contains("refused"), "round {round}: {e}");
        }
        assert_eq!(pool.opened(), 1, "one socket for a hundred checks");
        // Nothing reached accept: every check ended before the last ACK.
        let accepted = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(accepted.is_err(), "a connection to accept: {accepted:?}");
    }

    /// A loopback listener that drops every SYN: its accept queue (room
    /// for one) is full and nobody accepts.
    fn deaf_listener() -> (Socket, std::net::TcpStream, SocketAddr) {
        let l = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        l.bind(&SockAddr::from(
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        ))
        .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        (l, queued, addr)
    }

    #[tokio::test]
    async fn a_check_cut_short_gives_its_socket_back_unconnected() {
        let (_l, _queued, deaf) = deaf_listener();
        let pool = CheckSockets::new();
        let cut = tokio::time::timeout(Duration::from_millis(100), pool.check(deaf)).await;
        assert!(cut.is_err(), "a SYN to a full queue was answered: {cut:?}");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(pool.check(l.local_addr().unwrap()).await, Ok(()));
        assert_eq!(pool.opened(), 1);
    }

    #[tokio::test]
    async fn checks_at_once_each_get_a_socket_and_ipv6_its_own() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        let pool = CheckSockets::new();
        let all = futures_util::future::join_all((0..8).map(|_| pool.check(up))).await;
        assert!(all.iter().all(Result::is_ok), "{all:?}");
        assert_eq!(pool.opened(), 8);
        if let Ok(l6) = tokio::net::TcpListener::bind("[::1]:0").await {
            assert_eq!(pool.check(l6.local_addr().unwrap()).await, Ok(()));
            assert_eq!(pool.opened(), 9, "v4 sockets do not serve v6");
        }
        let all = futures_util::future::join_all((0..8).map(|_| pool.check(up))).await;
        assert!(all.iter().all(Result::is_ok), "{all:?}");
        assert_eq!(pool.opened(), 9, "the idle ones were reused");
    }
}
