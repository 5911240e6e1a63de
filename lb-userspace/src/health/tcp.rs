//! TCP checks on sockets that outlive the check.
//!
//! A check asks one thing, whether the backend answers a SYN with a SYN-ACK,
//! and the reset that ends it follows the SYN-ACK alone (no final ACK, see
//! [`hold_handshake_ack`]), so the backend's kernel drops a half-open
//! request instead of queueing a connection for `accept`, and nobody keeps
//! a TIME_WAIT socket.
//!
//! A socket per check (HAProxy's way, and this one's before) costs a
//! socket's allocation and release and nine system calls on top of the
//! handshake itself. Here a finished check's socket is disconnected instead
//! of closed (`connect` to `AF_UNSPEC`, which sends the same reset and
//! releases the port) and goes back to an idle list for the next check of
//! the same address family: a check is then `TCP_QUICKACK` off (the
//! disconnect clears it), `connect`, the poller's add, one read of the
//! socket's TCP state per wake-up, the poller's delete and the disconnect.
//!
//! The socket joins the runtime's poller for one check only, after its
//! `connect`: the poller's record of a socket keeps "closed" for good once
//! it has seen one (a disconnected socket reports a hang-up), so a socket
//! that stayed registered would look ready forever and its next check
//! would spin instead of waiting for the backend.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{Interest, unix::AsyncFd};

/// Most idle sockets kept per address family: enough for every check that
/// starts in the same instant at ten thousand checks a second; more than
/// that are closed as they come back. Fewer under a low open-files limit
/// ([`idle_kept`]).
const IDLE_KEPT: usize = 1024;

/// Idle sockets kept per family: [`IDLE_KEPT`], or an eighth of the
/// open-files limit if that is less, so that idle sockets never crowd out
/// HTTP checks, the API or the maps.
fn idle_kept() -> usize {
    static KEPT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KEPT.get_or_init(|| (super::open_files_limit() / 8).min(IDLE_KEPT))
}

/// Reusable check sockets, per address family.
#[derive(Debug, Default)]
pub struct CheckSockets {
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    v4: Vec<Socket>,
    v6: Vec<Socket>,
    opened: u64,
}

impl Idle {
    fn of(&mut self, v6: bool) -> &mut Vec<Socket> {
        if v6 { &mut self.v6 } else { &mut self.v4 }
    }
}

/// Where a check's socket stands, from the kernel's own record of it.
#[derive(Debug)]
enum Stage {
    /// The SYN-ACK came: the backend answers.
    Answered,
    /// No answer yet.
    Waiting,
    /// Refused, unreachable, or reset, and why.
    Failed(io::Error),
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
        // An IPv4-mapped IPv6 address is checked over IPv4: an IPv6 socket
        // that once connected to one keeps IPv4's handling, which must not
        // follow it into a later check of a real IPv6 backend.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let v6 = addr.is_ipv6();
        let socket = self.take(v6).map_err(|e| format!("socket: {e}"))?;
        let mut lease = Lease {
            pool: self,
            held: Held::Idle(socket),
            v6,
        };
        lease.run(addr).await
    }

    fn take(&self, v6: bool) -> io::Result<Socket> {
        if let Ok(mut idle) = self.idle.lock() {
            if let Some(s) = idle.of(v6).pop() {
                return Ok(s);
            }
            idle.opened += 1;
        }
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        Socket::new(
            domain,
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )
    }

    fn give_back(&self, v6: bool, s: Socket) {
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.of(v6);
            if list.len() < idle_kept() {
                list.push(s);
            }
        }
    }
}

/// A leased socket: idle, or in the poller for the check under way.
enum Held {
    Idle(Socket),
    Polled(AsyncFd<Socket>),
    Gone,
}

/// A socket out of the pool for one check. However the check ends (an
/// answer, a failure, or the caller's timeout dropping it), the socket
/// leaves the poller, is disconnected and goes back, or is closed if it
/// cannot be disconnected.
struct Lease<'a> {
    pool: &'a CheckSockets,
    held: Held,
    v6: bool,
}

impl Lease<'_> {
    async fn run(&mut self, addr: SocketAddr) -> Result<(), String> {
        let Held::Idle(s) = std::mem::replace(&mut self.held, Held::Gone) else {
            return Err("socket: not idle".to_owned());
        };
        hold_handshake_ack(&s);
        match s.connect(&SockAddr::from(addr)) {
            Ok(()) => {
                self.held = Held::Idle(s);
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                self.held = Held::Idle(s);
                return Err(format!("connect: {e}"));
            }
        }
        // SAFETY: the AsyncFd owns the socket until `into_inner` hands it
        // back, and a socket2::Socket's descriptor never changes.
        let fd = match unsafe { AsyncFd::register_with_interest(s, Interest::WRITABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                // Kept, so that the lease disconnects it (a reset) rather
                // than closing a connection that may be up already.
                let (s, why) = e.into_parts();
                self.held = Held::Idle(s);
                return Err(format!("poller: {why}"));
            }
        };
        self.held = Held::Polled(fd);
        let Held::Polled(fd) = &self.held else {
            return Err("socket: not polled".to_owned());
        };
        loop {
            let mut ready = fd.writable().await.map_err(|e| format!("connect: {e}"))?;
            match stage(fd.get_ref()) {
                Stage::Answered => return Ok(()),
                Stage::Waiting => ready.clear_ready(),
                Stage::Failed(why) => return Err(format!("connect: {why}")),
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let s = match std::mem::replace(&mut self.held, Held::Gone) {
            Held::Idle(s) => s,
            Held::Polled(fd) => fd.into_inner(),
            Held::Gone => return,
        };
        if disconnect(&s).is_ok() {
            self.pool.give_back(self.v6, s);
        }
    }
}

/// Where `s` stands: its TCP state (the first byte of `TCP_INFO`), and its
/// error when it is neither connected nor still connecting. A handshake
/// that completed counts however far the connection went since (the
/// backend may have closed its end already), unless it left an error.
fn stage(s: &Socket) -> Stage {
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_SYN_SENT: u8 = 2;
    const TCP_CLOSE: u8 = 7;
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
    if rc != 0 {
        return Stage::Failed(io::Error::last_os_error());
    }
    match state {
        TCP_ESTABLISHED => Stage::Answered,
        TCP_SYN_SENT => Stage::Waiting,
        _ => match s.take_error() {
            Ok(Some(e)) | Err(e) => Stage::Failed(e),
            Ok(None) if state == TCP_CLOSE => {
                Stage::Failed(io::Error::from_raw_os_error(libc::ECONNRESET))
            }
            Ok(None) => Stage::Answered,
        },
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

    /// A socket that served checks before (its disconnects woke the poller,
    /// a refusal left a hang-up) waits for a silent backend like a new
    /// one: the caller's timeout ends the check, on time, and the runtime
    /// kept running meanwhile. Run on a thread of its own so that a check
    /// that spun instead of waiting fails this test rather than hanging it.
    #[test]
    fn a_reused_socket_waits_for_a_silent_backend_without_spinning() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let outcome = rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let up = l.local_addr().unwrap();
                let refused = {
                    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                    l.local_addr().unwrap()
                };
                let (_l, _queued, deaf) = deaf_listener();
                let pool = CheckSockets::new();
                assert!(pool.check(refused).await.is_err());
                // Last before the silent backend: a check that was answered,
                // whose disconnect leaves the socket's error set to "reset".
                assert_eq!(pool.check(up).await, Ok(()));
                // Let the poller see the disconnects' wake-ups.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
                let ticker = {
                    let ticks = ticks.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                };
                let started = std::time::Instant::now();
                let cut = tokio::time::timeout(Duration::from_millis(300), pool.check(deaf)).await;
                let waited = started.elapsed();
                ticker.abort();
                (
                    cut.is_err(),
                    waited,
                    ticks.load(std::sync::atomic::Ordering::Relaxed),
                    pool.opened(),
                )
            });
            let _ = tx.send(outcome);
        });
        let (timed_out, waited, ticks, opened) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the check spun instead of waiting: its timeout never fired");
        assert!(timed_out, "a SYN to a full queue was answered");
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
        assert!(
            ticks >= 10,
            "the runtime was starved: {ticks} ticks in {waited:?}"
        );
        assert_eq!(opened, 1, "the same socket all along");
    }

    #[tokio::test]
    async fn ipv4_mapped_addresses_are_checked_over_ipv4() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{port}").parse().unwrap();
        let pool = CheckSockets::new();
        assert_eq!(pool.check(mapped).await, Ok(()));
        let idle = pool.idle.lock().unwrap();
        assert_eq!((idle.v4.len(), idle.v6.len()), (1, 0));
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
