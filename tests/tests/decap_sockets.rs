//! Kernel tier, in a namespace: the backends' decapsulator decides between
//! keeping a packet that names a second hop and sending it on, against real
//! sockets of the namespace it runs in (BPF_PROG_TEST_RUN with the backend's
//! interface as the ingress device, so the socket and route lookups are the
//! backend's own).
//!
//! Each step is a row: frame in, verdict, frame out byte for byte, counter
//! deltas of `DECAP_STATS`.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    csum,
    decap::{DecapConfig, DecapCounter, DecapHop, DecapTraffic, DecapVipKey},
    testframe::{self, FrameSpec, L4, Wrap},
    wire::tcp::{TCP_ACK, TCP_SYN},
};
use lb_tests::{Topology, addressing, in_netns};
use lb_userspace::dataplane::{self, DECAP_PROGRAM, MapSizes};

const GUE_PORT: u16 = 6080;
const VIP_PORT: u16 = 80;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// The outer source port the "balancer" used; a forwarded packet keeps it.
const SPORT: u16 = 50123;

fn key(ip: IpAddr) -> DecapVipKey {
    let (addr, family) = match ip {
        IpAddr::V4(a) => {
            let mut o = [0; 16];
            o[..4].copy_from_slice(&a.octets());
            (o, 4)
        }
        IpAddr::V6(a) => (a.octets(), 6),
    };
    DecapVipKey::new(addr, family)
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The decapsulator loaded (not attached) inside a backend's namespace.
struct Decap {
    ebpf: Ebpf,
    ifindex: u32,
}

impl Decap {
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        let m: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("DECAP_STATS").unwrap()).unwrap();
        DecapCounter::ALL
            .iter()
            .map(|c| (c.name(), m.get(&c.index(), 0).unwrap().iter().sum()))
            .collect()
    }

    fn traffic(&self, vip: IpAddr) -> DecapTraffic {
        let m: PerCpuHashMap<&MapData, DecapVipKey, DecapTraffic> =
            PerCpuHashMap::try_from(self.ebpf.map("DECAP_VIPS").unwrap()).unwrap();
        m.get(&key(vip), 0)
            .unwrap()
            .iter()
            .fold(DecapTraffic::default(), |mut a, t| {
                for i in 0..2 {
                    a.packets[i] += t.packets[i];
                    a.bytes[i] += t.bytes[i];
                    a.forwarded[i] += t.forwarded[i];
                }
                a
            })
    }

    fn wants_neighbor(&self, ip: IpAddr) -> bool {
        let m: HashMap<&MapData, DecapVipKey, u64> =
            HashMap::try_from(self.ebpf.map("DECAP_NEIGH").unwrap()).unwrap();
        m.get(&key(ip), 0).is_ok()
    }

    /// Runs the program on `frame` as if it arrived on the backend's
    /// interface (the caller is inside the backend's namespace).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(DECAP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: Vec<u8> = [0, frame.len() as u32, 0, self.ifindex, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; frame.len() + 64];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    fn check(&mut self, name: &str, frame: &[u8], verdict: u32, out: &[u8], counters: &[&str]) {
        let before = self.counters();
        let (v, got) = self.run(frame);
        let after = self.counters();
        let d: BTreeMap<&str, u64> = after
            .iter()
            .filter(|(k, v)| before[*k] != **v)
            .map(|(k, v)| (*k, v - before[k]))
            .collect();
        let want: BTreeMap<&str, u64> = counters.iter().map(|c| (*c, 1)).collect();
        assert_eq!(v, verdict, "{name}: verdict");
        // A dropped frame's bytes are whatever the program left.
        if verdict != XDP_DROP {
            assert_eq!(hex(&got), hex(out), "{name}: output frame");
        }
        assert_eq!(d, want, "{name}: counter deltas");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn load(t: &Topology, backend: usize, vips: &[IpAddr]) -> Decap {
    let b = &t.backends()[backend];
    let ifindex: u32 = t
        .exec(
            b.ns(),
            &["cat", &format!("/sys/class/net/{}/ifindex", b.ifname())],
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let vips = vips.to_vec();
    let ebpf = in_netns(b.ns(), move || {
        let mut e = dataplane::load_balancer_with(&MapSizes {
            max_vips: 1,
            max_backends: 2,
            ring_size: 7,
            conntrack_entries: 16,
            flow_cache_slots: 1,
        })
        .unwrap();
        let prog: &mut Xdp = e.program_mut(DECAP_PROGRAM).unwrap().try_into().unwrap();
        prog.load().unwrap();
        let mut cfg: Array<&mut MapData, DecapConfig> =
            Array::try_from(e.map_mut("DECAP_CONFIG").unwrap()).unwrap();
        cfg.set(
            0,
            DecapConfig {
                gue_port: GUE_PORT,
                ..Default::default()
            },
            0,
        )
        .unwrap();
        let mut m: PerCpuHashMap<&mut MapData, DecapVipKey, DecapTraffic> =
            PerCpuHashMap::try_from(e.map_mut("DECAP_VIPS").unwrap()).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        for v in vips {
            let zero = PerCpuValues::try_from(vec![DecapTraffic::default(); cpus]).unwrap();
            m.insert(key(v), zero, 0).unwrap();
        }
        e
    })
    .unwrap();
    Decap { ebpf, ifindex }
}

/// A TCP frame from `client` to `vip`, inside GUE to the backend `to`,
/// naming `hop` as the second hop.
#[allow(clippy::too_many_arguments)]
fn gue_frame(
    t: &Topology,
    to: usize,
    client: SocketAddr,
    vip: IpAddr,
    flags: u8,
    hop: Option<IpAddr>,
) -> (Vec<u8>, Vec<u8>) {
    let mut spec = match (client.ip(), vip) {
        (IpAddr::V4(c), IpAddr::V4(v)) => {
            FrameSpec::v4_tcp(c.octets(), v.octets(), client.port(), VIP_PORT)
        }
        (IpAddr::V6(c), IpAddr::V6(v)) => {
            FrameSpec::v6_tcp(c.octets(), v.octets(), client.port(), VIP_PORT)
        }
        _ => panic!("one family"),
    };
    spec.l4 = L4::Tcp {
        src_port: client.port(),
        dst_port: VIP_PORT,
        flags,
    };
    let inner = testframe::build(&spec);
    let b = &t.backends()[to];
    let v6 = vip.is_ipv6();
    let w = Wrap {
        src_mac: testframe::LB_MAC,
        dst_mac: b.mac(),
        outer_src: octets(t.lb().ip(v6)),
        outer_dst: octets(b.ip(v6)),
        ttl: 64,
        tos: 0,
        gue: Some((SPORT, GUE_PORT, hop.map(octets))),
    };
    (testframe::encapsulate(&inner, &w), inner)
}

/// What the decapsulator hands the stack: the inner datagram behind the
/// outer frame's MACs.
fn stripped(outer: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut f = outer[..12].to_vec();
    f.extend_from_slice(&inner[12..]);
    f
}

/// What the decapsulator sends on to the second hop: the same inner
/// datagram and UDP source port, from this backend, without a second hop.
fn sent_on(t: &Topology, from: usize, to: usize, inner: &[u8], v6: bool) -> Vec<u8> {
    let (a, b) = (&t.backends()[from], &t.backends()[to]);
    let w = Wrap {
        src_mac: a.mac(),
        dst_mac: b.mac(),
        outer_src: octets(a.ip(v6)),
        outer_dst: octets(b.ip(v6)),
        ttl: 64,
        tos: 0,
        gue: Some((SPORT, GUE_PORT, None)),
    };
    let out = testframe::encapsulate(inner, &w);
    if !v6 {
        assert_eq!(csum::checksum(&out[14..34]), 0, "outer IPv4 checksum");
    }
    out
}

/// An established connection into `vip` inside backend `i`'s namespace,
/// from the backend's own address: the server side's socket is what the
/// decapsulator must find. Returns the client's address (the flow's
/// source) and the sockets, which must stay open.
fn connection(t: &Topology, i: usize, vip: IpAddr) -> (SocketAddr, TcpListener, TcpStream) {
    let b = &t.backends()[i];
    let local = b.ip(vip.is_ipv6());
    in_netns(b.ns(), move || {
        let l = TcpListener::bind(SocketAddr::new(vip, VIP_PORT)).unwrap();
        let s = socket2::Socket::new(
            socket2::Domain::for_address(SocketAddr::new(local, 0)),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        s.bind(&SocketAddr::new(local, 0).into()).unwrap();
        s.connect(&SocketAddr::new(vip, VIP_PORT).into()).unwrap();
        let c: TcpStream = s.into();
        let client = c.local_addr().unwrap();
        (client, l, c)
    })
    .unwrap()
}

/// What lbd does for a queued second hop: backend `i` learns how to reach
/// backend `j` (the same interface, `j`'s MAC).
fn resolve(t: &Topology, d: &mut Decap, i: usize, j: usize, v6: bool) {
    let (a, b) = (&t.backends()[i], &t.backends()[j]);
    let mut m: HashMap<&mut MapData, DecapVipKey, DecapHop> =
        HashMap::try_from(d.ebpf.map_mut("DECAP_HOPS").unwrap()).unwrap();
    let hop = DecapHop {
        dmac: b.mac(),
        smac: a.mac(),
        ifindex: d.ifindex,
    };
    m.insert(key(b.ip(v6)), hop, 0).unwrap();
}

#[test]
fn keeps_what_a_local_socket_holds_and_sends_the_rest_on() {
    let t = Topology::new(2).unwrap();
    let vip4 = IpAddr::from(addressing::vip_v4(1));
    let vip6 = IpAddr::from(addressing::vip_v6(1));
    t.add_vip_on_backends(vip4).unwrap();
    t.add_vip_on_backends(vip6).unwrap();
    let mut d = load(&t, 0, &[vip4, vip6]);
    let ns = t.backends()[0].ns().to_owned();
    let hop4 = IpAddr::from(t.backends()[1].ipv4());
    let hop6 = IpAddr::from(t.backends()[1].ipv6());

    for (vip, hop) in [(vip4, hop4), (vip6, hop6)] {
        let v6 = vip.is_ipv6();
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let (client, _l, _c) = connection(&t, 0, vip);
        let stranger = SocketAddr::new(client.ip(), client.port().wrapping_add(1));

        let (f, inner) = gue_frame(&t, 0, client, vip, TCP_ACK, Some(hop));
        let want = stripped(&f, &inner);
        let (f2, inner2) = gue_frame(&t, 0, stranger, vip, TCP_ACK, Some(hop));
        let (syn, syn_inner) = gue_frame(&t, 0, stranger, vip, TCP_SYN, Some(hop));
        let (plain, plain_inner) = gue_frame(&t, 0, stranger, vip, TCP_ACK, None);
        let forwarded = sent_on(&t, 0, 1, &inner2, v6);
        let f2_again = f2.clone();
        let mut dd = in_netns(&ns, move || {
            d.check(
                &format!("{fam}: an established socket holds the flow: kept"),
                &f,
                XDP_PASS,
                &want,
                &["kept_socket", "decapsulated"],
            );
            d.check(
                &format!("{fam}: no socket, second hop not yet resolved: dropped, queued"),
                &f2.clone(),
                XDP_DROP,
                &[],
                &["drop_no_neighbor"],
            );
            assert!(d.wants_neighbor(hop), "{fam}: DECAP_NEIGH names the hop");
            d
        })
        .unwrap();
        resolve(&t, &mut dd, 0, 1, v6);
        d = in_netns(&ns, move || {
            let before = dd.traffic(vip);
            let got = dd.run(&f2_again);
            assert_eq!(got.0, XDP_TX, "{fam}: sent on, out of the same interface");
            assert_eq!(
                hex(&got.1),
                hex(&forwarded),
                "{fam}: re-encapsulated to the second hop"
            );
            assert_eq!(
                dd.traffic(vip).forwarded[v6 as usize],
                before.forwarded[v6 as usize] + 1
            );
            dd.check(
                &format!("{fam}: a SYN is kept whatever it names"),
                &syn,
                XDP_PASS,
                &stripped(&syn, &syn_inner),
                &["kept_new", "decapsulated"],
            );
            dd.check(
                &format!("{fam}: without a second hop, kept"),
                &plain,
                XDP_PASS,
                &stripped(&plain, &plain_inner),
                &["decapsulated"],
            );
            dd
        })
        .unwrap();
    }

    // Not a configured VIP: dropped even with a socket for it.
    let other = IpAddr::from(addressing::vip_v4(2));
    let (f, _) = gue_frame(
        &t,
        0,
        SocketAddr::new(IpAddr::from(t.backends()[0].ipv4()), 4000),
        other,
        TCP_ACK,
        None,
    );
    in_netns(&ns, move || {
        d.check(
            "inner destination not a VIP",
            &f,
            XDP_DROP,
            &[],
            &["drop_not_vip"],
        );
    })
    .unwrap();
}

/// SYN cookies: the final ACK of a handshake the listener answered with a
/// cookie has no socket behind it, only the listener; the decapsulator asks
/// the kernel whether the cookie is valid and keeps the packet if so. A
/// made-up cookie is sent on.
#[test]
fn a_syn_cookie_handshake_is_not_sent_away() {
    let t = Topology::new(2).unwrap();
    let vip = IpAddr::from(addressing::vip_v4(1));
    t.add_vip_on_backends(vip).unwrap();
    let b0 = &t.backends()[0];
    let hop = IpAddr::from(t.backends()[1].ipv4());
    // The "client" lives on the backend's lo so the SYN-ACK comes back to a
    // raw socket there; its address is in the test range.
    let client_ip = Ipv4Addr::new(198, 18, 1, 99);
    t.exec(
        b0.ns(),
        &["ip", "addr", "add", "198.18.1.99/32", "dev", "lo"],
    )
    .unwrap();
    lb_tests::netns::sysctl(b0.ns(), &["net.ipv4.tcp_syncookies=2"]).unwrap();
    let mut d = load(&t, 0, &[vip]);
    resolve(&t, &mut d, 0, 1, false);
    let IpAddr::V4(vip4) = vip else {
        unreachable!()
    };
    let (cookie, isn, client_port, _listener) = in_netns(b0.ns(), move || {
        let l = TcpListener::bind(SocketAddr::new(vip, VIP_PORT)).unwrap();
        let (cookie, isn, port) = syn_for_cookie(client_ip, vip4);
        (cookie, isn, port, l)
    })
    .unwrap();

    let ack_with = |ack_no: u32| {
        let mut spec = FrameSpec::v4_tcp(client_ip.octets(), vip4.octets(), client_port, VIP_PORT);
        spec.l4 = L4::Tcp {
            src_port: client_port,
            dst_port: VIP_PORT,
            flags: TCP_ACK,
        };
        spec.payload = Vec::new();
        let mut inner = testframe::build(&spec);
        // seq = ISN + 1, ack = cookie + 1; checksum fixed.
        inner[14 + 20 + 4..14 + 20 + 8].copy_from_slice(&isn.wrapping_add(1).to_be_bytes());
        inner[14 + 20 + 8..14 + 20 + 12].copy_from_slice(&ack_no.to_be_bytes());
        fix_tcp_checksum(&mut inner);
        let w = Wrap {
            src_mac: testframe::LB_MAC,
            dst_mac: t.backends()[0].mac(),
            outer_src: octets(t.lb().ip(false)),
            outer_dst: octets(t.backends()[0].ip(false)),
            ttl: 64,
            tos: 0,
            gue: Some((SPORT, GUE_PORT, Some(octets(hop)))),
        };
        (testframe::encapsulate(&inner, &w), inner)
    };
    let (good, good_inner) = ack_with(cookie.wrapping_add(1));
    let (bad, bad_inner) = ack_with(cookie.wrapping_add(0x0100_0001));
    let want_good = stripped(&good, &good_inner);
    let want_bad = sent_on(&t, 0, 1, &bad_inner, false);
    in_netns(t.backends()[0].ns(), move || {
        d.check(
            "the final ACK of a SYN-cookie handshake: kept",
            &good,
            XDP_PASS,
            &want_good,
            &["kept_syncookie", "decapsulated"],
        );
        d.check(
            "an ACK with a made-up cookie: sent on",
            &bad,
            XDP_TX,
            &want_bad,
            &["forwarded"],
        );
    })
    .unwrap();
}

fn fix_tcp_checksum(f: &mut [u8]) {
    let tcp = 14 + 20;
    f[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((f.len() - tcp) as u16).to_be_bytes());
    let acc = csum::sum_words(&pseudo, 0);
    let c = csum::fold(csum::sum_words(&f[tcp..], acc));
    f[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
}

/// Sends a SYN from `client` to `vip:80` over a raw socket and returns the
/// listener's SYN-ACK sequence number (the cookie), the SYN's own sequence
/// number and its source port. The kernel answers the SYN-ACK with a RST
/// (no socket of ours holds the client's side), which leaves nothing
/// behind: a cookie listener keeps no state.
fn syn_for_cookie(client: Ipv4Addr, vip: Ipv4Addr) -> (u32, u32, u16) {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).unwrap();
    s.bind(&SocketAddr::new(IpAddr::V4(client), 0).into())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port: u16 = 41000;
    let isn: u32 = 0x1234_5678;
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&port.to_be_bytes());
    tcp.extend_from_slice(&VIP_PORT.to_be_bytes());
    tcp.extend_from_slice(&isn.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.extend_from_slice(&[6 << 4, TCP_SYN, 0xfa, 0xf0, 0, 0, 0, 0]);
    // MSS 1460.
    tcp.extend_from_slice(&[2, 4, 0x05, 0xb4]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&client.octets());
    pseudo.extend_from_slice(&vip.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    let c = csum::fold(csum::sum_words(&tcp, csum::sum_words(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    s.send_to(&tcp, &SocketAddr::new(IpAddr::V4(vip), 0).into())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut r: std::fs::File = std::fs::File::from(std::os::fd::OwnedFd::from(s));
    while Instant::now() < deadline {
        let mut buf = [0u8; 1500];
        let Ok(n) = r.read(&mut buf) else { continue };
        let ihl = (buf[0] & 0xf) as usize * 4;
        if n < ihl + 20 || buf[12..16] != vip.octets() {
            continue;
        }
        let th = &buf[ihl..n];
        let (sport, dport) = (
            u16::from_be_bytes([th[0], th[1]]),
            u16::from_be_bytes([th[2], th[3]]),
        );
        if sport == VIP_PORT && dport == port && th[13] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            let seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
            return (seq, isn, port);
        }
    }
    panic!("no SYN-ACK from the listener");
}
