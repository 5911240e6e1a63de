//! A spoofed SYN flood, as `hping3 --flood --rand-source` sends one: TCP
//! SYNs to one VIP and port, each from a random source address and port,
//! written as whole Ethernet frames on a host's interface (an `AF_PACKET`
//! socket, in batches with `sendmmsg`). The sources are drawn from
//! 198.19.0.0/16, inside the benchmarking range the topologies use and
//! routed nowhere in them, so answers to them go nowhere.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use lb_userspace::dataplane::AttachMode;

use crate::{Host, HttpConn, Spawned, Topology, addressing, fabric::Fabric, in_netns, lbd, scrape};

/// The VIP's port on a [`FloodedNode`].
pub const PORT: u16 = 80;

/// What the flood test and the flood benchmark run: one LB (generic XDP)
/// in front of three backends serving `VIP:80/tcp`, a fourth backend ready
/// to join. No health checks: the flood reaches the backends' listeners
/// too, and a check failing under it would change rings for another
/// reason. Dropped, it stops lbd and tears the topology down.
pub struct FloodedNode {
    // Fields drop in this order: lbd first, the topology last.
    lbd: Spawned,
    _teardown: lbd::Teardown,
    _fabric: Fabric,
    _servers: Vec<Spawned>,
    pub vip: Ipv4Addr,
    pub socket: PathBuf,
    metrics: String,
    pub t: Topology,
}

impl FloodedNode {
    /// `table` connection-table slots, `second_chance_window` as the
    /// configuration writes it, `/metrics` on `metrics` (host:port).
    pub fn start(
        tag: &str,
        table: u32,
        second_chance_window: &str,
        metrics: &str,
    ) -> Result<FloodedNode> {
        let t = Topology::new(4)?;
        let servers = t.start_servers(PORT, 53)?;
        let fabric = crate::fabric::prepare(&t, AttachMode::Generic)?;
        let vip = addressing::vip_v4(1);
        t.add_vip_on_backends(vip.into())?;
        let dir = std::env::temp_dir().join(format!("{}-{tag}", t.id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("lb.toml");
        std::fs::write(
            &config,
            format!(
                "{pre}second_chance_window = \"{second_chance_window}\"\n\
                 [[vip]]\naddress = \"{vip}:{PORT}/tcp\"\nmode = \"ipip\"\n{backends}",
                pre = lbd::Preamble {
                    conntrack_entries: table,
                    instance_extra: &format!("metrics_listen = \"{metrics}\"\n"),
                    ..Default::default()
                }
                .render(&t, &dir),
                backends = lbd::backend_tables(&t.backends()[..3]),
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let teardown = lbd::Teardown::new(config.clone());
        let (lbd, _) = lbd::start(&t, &config)?;
        Ok(FloodedNode {
            lbd,
            _teardown: teardown,
            _fabric: fabric,
            _servers: servers,
            vip,
            socket: dir.join("lbd.sock"),
            metrics: metrics.to_owned(),
            t,
        })
    }

    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.vip), PORT)
    }

    /// The flood's target: the VIP's port, through the LB's MAC.
    pub fn flood_target(&self) -> Target {
        Target {
            vip: self.vip,
            port: PORT,
            to_mac: self.t.lb().mac(),
        }
    }

    /// A sample of lbd's `/metrics` (0 when it is not exported).
    pub fn sample(&self, metric: &str, labels: &str) -> Result<u64> {
        let text = scrape::scrape(&self.t, &self.metrics)?;
        Ok(scrape::sample(&text, metric, labels).unwrap_or(0))
    }

    /// The two ring changes, each moving a share of every backend's flows:
    /// the first adds the fourth backend, the second triples the first
    /// backend's weight.
    pub fn change_ring(&self, which: usize) -> Result<()> {
        let vip = format!("{}:{PORT}/tcp", self.vip);
        let args = match which {
            0 => vec![
                "add-backend".to_owned(),
                vip,
                self.t.backend(3).ipv4().to_string(),
            ],
            _ => vec![
                "set-weight".to_owned(),
                vip,
                self.t.backend(0).ipv4().to_string(),
                "3".to_owned(),
            ],
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::lbctl(&self.socket, &args).map(drop)
    }

    /// Stops lbd with SIGTERM and checks how it exited.
    pub fn stop(mut self) -> Result<()> {
        lbd::stop(&mut self.lbd).map(drop)
    }
}

/// Long-lived connections from the client to a VIP, each asking at a steady
/// pace; a request that fails, or lands on another backend than the
/// connection's first, breaks the connection (it is not asked again).
pub struct KeepAlive {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Tally>>,
}

/// What the connections of a [`KeepAlive`] went through.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub connections: usize,
    pub requests: usize,
    /// Per broken connection, how it broke.
    pub broken: BTreeMap<usize, String>,
}

impl KeepAlive {
    /// Opens `n` connections to `target` from the client (returns once all
    /// are open and have answered once), then asks on each every `every`.
    pub fn start(t: &Topology, target: SocketAddr, n: usize, every: Duration) -> Result<KeepAlive> {
        let stop = Arc::new(AtomicBool::new(false));
        let (opened_tx, opened) = std::sync::mpsc::channel::<Result<()>>();
        let (ns, flag) = (t.client().ns().to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            in_netns(&ns, move || -> Result<Tally> {
                let open = || -> Result<Vec<(HttpConn, String)>> {
                    (0..n)
                        .map(|_| {
                            let mut c = HttpConn::connect(target, Duration::from_secs(3))?;
                            let who = c.get("/")?.text();
                            Ok((c, who))
                        })
                        .collect()
                };
                let mut conns = match open() {
                    Ok(c) => {
                        let _ = opened_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let mut tally = Tally {
                    connections: n,
                    ..Tally::default()
                };
                while !flag.load(Ordering::SeqCst) {
                    for (i, (c, who)) in conns.iter_mut().enumerate() {
                        if tally.broken.contains_key(&i) {
                            continue;
                        }
                        tally.requests += 1;
                        match c.get("/") {
                            Ok(r) if r.text() == *who => {}
                            Ok(r) => {
                                tally
                                    .broken
                                    .insert(i, format!("moved from {who} to {}", r.text()));
                            }
                            Err(e) => {
                                tally.broken.insert(i, format!("{e:#}"));
                            }
                        }
                    }
                    std::thread::sleep(every);
                }
                Ok(tally)
            })?
        });
        opened
            .recv()
            .context("the connections' thread ended before opening them")??;
        Ok(KeepAlive { stop, thread })
    }

    /// Stops asking and reports.
    pub fn finish(self) -> Result<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the connections' thread panicked"))?
    }
}

/// Frames handed to the kernel per `sendmmsg`.
const BATCH: usize = 64;
/// Ethernet, IPv4 and TCP headers, no options, no payload.
const FRAME_LEN: usize = 14 + 20 + 20;

/// What a flood sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flooded {
    pub sent: u64,
    pub elapsed: Duration,
}

impl Flooded {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Where the flood goes: from `from` (its interface and MAC) to the next
/// hop `to_mac`, for `vip:port`.
#[derive(Clone, Debug)]
pub struct Target {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub to_mac: [u8; 6],
}

/// Sends SYNs from `from` until `duration` has passed or `stop` is set, at
/// most `max_rate` per second (0: as fast as one thread can). Runs in
/// `from`'s namespace on the calling thread.
pub fn syn_flood(
    from: &Host,
    target: &Target,
    duration: Duration,
    max_rate: u64,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Result<Flooded> {
    let (ifname, src_mac, target) = (from.ifname().to_owned(), from.mac(), target.clone());
    in_netns(from.ns(), move || {
        flood_here(&ifname, src_mac, &target, duration, max_rate, &stop, seed)
    })?
}

fn flood_here(
    ifname: &str,
    src_mac: [u8; 6],
    target: &Target,
    duration: Duration,
    max_rate: u64,
    stop: &AtomicBool,
    seed: u64,
) -> Result<Flooded> {
    let socket = packet_socket(ifname)?;
    let mut frames = vec![[0u8; FRAME_LEN]; BATCH];
    let mut rng = seed | 1;
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        if max_rate > 0 {
            let due = (start.elapsed().as_secs_f64() * max_rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        for f in frames.iter_mut() {
            rng = xorshift(rng);
            let src = Ipv4Addr::new(198, 19, (rng >> 8) as u8, (rng >> 16) as u8 | 1);
            let sport = 1024 + (rng >> 32) as u16 % 64_000;
            syn_frame(f, src_mac, target, src, sport, (rng >> 24) as u32);
        }
        sent += send_batch(&socket, &frames)? as u64;
    }
    Ok(Flooded {
        sent,
        elapsed: start.elapsed(),
    })
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// An `AF_PACKET` socket sending on `ifname`.
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_IP as u16).to_be() as i32;
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening an AF_PACKET socket");
    }
    // SAFETY: a descriptor just returned, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {ifname}");
    }
    // SAFETY: zeroed sockaddr_ll, then the fields bind needs.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto as u16;
    addr.sll_ifindex = index as i32;
    // SAFETY: a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding to {ifname}"));
    }
    Ok(fd)
}

/// Hands every frame to the kernel (retrying while its queue is full);
/// returns how many were sent.
fn send_batch(socket: &OwnedFd, frames: &[[u8; FRAME_LEN]]) -> Result<usize> {
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdrs pointing at the iovecs above, which outlive
    // the call.
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut done = 0;
    while done < msgs.len() {
        // SAFETY: the messages from `done` on, all valid.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs[done..].as_mut_ptr(),
                (msgs.len() - done) as u32,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock
            {
                std::thread::yield_now();
                continue;
            }
            return Err(e).context("sendmmsg");
        }
        done += n as usize;
    }
    Ok(done)
}

/// Writes a SYN from `src:sport` to the target into `f`, checksums and all.
fn syn_frame(
    f: &mut [u8; FRAME_LEN],
    src_mac: [u8; 6],
    t: &Target,
    src: Ipv4Addr,
    sport: u16,
    seq: u32,
) {
    f[0..6].copy_from_slice(&t.to_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&t.vip.octets());
    let sum = fold(sum16(ip, 0));
    ip[10..12].copy_from_slice(&(!sum).to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&t.port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&[0; 4]);
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp[16..20].copy_from_slice(&[0; 4]);
    let mut pseudo = sum16(&src.octets(), 0);
    pseudo = sum16(&t.vip.octets(), pseudo);
    pseudo += 6 + 20;
    let sum = fold(sum16(tcp, pseudo));
    tcp[16..18].copy_from_slice(&(!sum).to_be_bytes());
}

fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    for pair in bytes.chunks(2) {
        acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame whose IPv4 and TCP checksums verify (sum to 0xffff).
    #[test]
    fn syn_frames_carry_valid_checksums() {
        let mut f = [0u8; FRAME_LEN];
        let t = Target {
            vip: Ipv4Addr::new(198, 18, 100, 1),
            port: 80,
            to_mac: [2, 0, 0, 0, 0, 2],
        };
        syn_frame(
            &mut f,
            [2, 0, 0, 0, 0, 1],
            &t,
            Ipv4Addr::new(198, 19, 7, 9),
            40_000,
            77,
        );
        assert_eq!(fold(sum16(&f[14..34], 0)), 0xffff);
        let mut pseudo = sum16(&f[26..30], 0);
        pseudo = sum16(&f[30..34], pseudo);
        pseudo += 6 + 20;
        assert_eq!(fold(sum16(&f[34..54], pseudo)), 0xffff);
        assert_eq!(f[47], 0x02, "SYN only");
    }
}
