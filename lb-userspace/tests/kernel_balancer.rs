//! Kernel tier: the balancer on crafted frames, as a table of fixtures. Each
//! row: the maps' state (set up by the rows before it), a frame in, the
//! verdict, the frame out byte for byte, and the exact global counter deltas.
//! Expected frames are assembled here by hand, independently of the data
//! plane's header builders.

mod kernel;

use std::{collections::BTreeMap, time::Duration};

use aya::maps::{MapData, PerCpuArray};
use kernel::{Harness, XDP_DROP, XDP_PASS, XDP_TX, delta};
use lb_common::{
    csum,
    maps::{BackendInfo, BackendState, Family, LbConfig, Mode, Traffic, VipKey},
    parse::{IPPROTO_TCP, IPPROTO_UDP, parse},
    testframe::{self, FrameSpec, L4, LB_MAC},
    wire::tcp::TCP_ACK,
};
use lb_userspace::{dataplane::MapSizes, programming, snapshot};

const M: u32 = 13;
const SECOND_CHANCE: Duration = Duration::from_secs(600);
const ENCAP_SRC_V4: [u8; 4] = [198, 18, 0, 2];
const CLIENT_V4: [u8; 4] = [198, 18, 0, 10];
const GUE_PORT: u16 = 6081;

fn v16(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0; 16];
    o[..4].copy_from_slice(&a);
    o
}

fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0x00, 0xc6, 0x12, 0x01, id as u8]
}

/// Backends 1, 2: IPv4; 3, 4: IPv6.
fn backend(id: u32) -> BackendInfo {
    let (addr, family) = match id {
        1 | 2 => (v16([198, 18, 0, 19 + id as u8]), Family::V4.wire()),
        _ => (testframe::v6(0x20 + id as u16), Family::V6.wire()),
    };
    BackendInfo {
        addr,
        family,
        state: BackendState::Up.wire(),
        next_hop_mac: backend_mac(id),
        src_mac: LB_MAC,
        _pad: [0; 2],
        ifindex: 0,
        vip_id: lb_common::maps::BACKEND_ANY_VIP,
    }
}

struct Vip {
    id: u32,
}

fn vip_key(addr: &[u8], port: u16, proto: u8) -> VipKey {
    let (a, family) = if addr.len() == 4 {
        (v16(addr.try_into().unwrap()), Family::V4.wire())
    } else {
        (addr.try_into().unwrap(), Family::V6.wire())
    };
    VipKey {
        addr: a,
        port,
        proto,
        family,
    }
}

struct Bench {
    h: Harness,
}

impl Bench {
    fn new() -> Self {
        Self::with_conntrack(4096)
    }

    fn with_conntrack(conntrack_entries: u32) -> Self {
        let sizes = MapSizes {
            max_vips: 16,
            max_backends: 16,
            ring_size: M,
            conntrack_entries,
            ..Default::default()
        };
        let mut h = Harness::load_with(&sizes);
        programming::set_config(
            &mut h.ebpf,
            &LbConfig {
                encap_src_v4: ENCAP_SRC_V4,
                encap_src_v6: testframe::v6(2),
                hash_seed: 0x5eed,
                ring_size: M,
                flags: 0,
                udp_timeout_ns: 30_000_000_000,
                gue_port: GUE_PORT,
                ..Default::default()
            },
        )
        .unwrap();
        for id in 1..=4 {
            programming::set_backend(&mut h.ebpf, id, &backend(id)).unwrap();
        }
        Bench { h }
    }

    fn vip(&mut self, id: u32, key: VipKey, mode: Mode, all_to: u32) -> Vip {
        programming::install_vip(&mut self.h.ebpf, &key, id, mode, &vec![all_to; M as usize])
            .unwrap();
        Vip { id }
    }

    fn ring_all(&mut self, vip: &Vip, to: u32) {
        self.ring_all_window(vip, to, SECOND_CHANCE);
    }

    fn ring_all_window(&mut self, vip: &Vip, to: u32, second_chance: Duration) {
        programming::publish_ring(
            &mut self.h.ebpf,
            vip.id,
            &vec![to; M as usize],
            second_chance,
        )
        .unwrap();
    }

    fn state(&mut self, id: u32, state: BackendState) {
        let b = BackendInfo {
            state: state.wire(),
            ..backend(id)
        };
        programming::set_backend(&mut self.h.ebpf, id, &b).unwrap();
    }

    /// Runs one row and checks it.
    fn check(
        &mut self,
        name: &str,
        frame: &[u8],
        verdict: u32,
        out: &[u8],
        counters: &[(&'static str, u64)],
    ) {
        let before = self.h.counters();
        let got = self.h.run(frame);
        let d = delta(&before, &self.h.counters());
        let want: BTreeMap<&'static str, u64> = counters.iter().copied().collect();
        assert_eq!(got.verdict, verdict, "{name}: verdict");
        assert_eq!(hex(&got.frame), hex(out), "{name}: output frame");
        assert_eq!(d, want, "{name}: counter deltas");
    }

    fn traffic(&self, map: &str, id: u32) -> Traffic {
        let m: PerCpuArray<&MapData, Traffic> =
            PerCpuArray::try_from(self.h.ebpf.map(map).unwrap()).unwrap();
        m.get(&id, 0)
            .unwrap()
            .iter()
            .fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets + t.packets,
                bytes: a.bytes + t.bytes,
                new_flows: a.new_flows + t.new_flows,
            })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn inner_of(frame: &[u8]) -> (&[u8], u8, u8, bool) {
    let p = parse(frame).unwrap();
    let inner = &frame[p.l3_offset..];
    let ttl = if p.is_ipv6 { inner[7] } else { inner[8] };
    (inner, p.tos, ttl, p.is_ipv6)
}

/// Expected IPIP output towards backend `id`, built from first principles.
fn encapsulated(frame: &[u8], id: u32) -> Vec<u8> {
    let (inner, tos, ttl, inner_v6) = inner_of(frame);
    let b = backend(id);
    let mut out = Vec::new();
    out.extend_from_slice(&b.next_hop_mac);
    out.extend_from_slice(&LB_MAC);
    let proto = if inner_v6 { 41 } else { 4 };
    if b.family == Family::V4.wire() {
        out.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, tos];
        ip.extend_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, ttl, proto, 0, 0]);
        ip.extend_from_slice(&ENCAP_SRC_V4);
        ip.extend_from_slice(&b.addr[..4]);
        let c = csum::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
    } else {
        out.extend_from_slice(&[0x86, 0xdd]);
        out.extend_from_slice(&[0x60 | (tos >> 4), tos << 4, 0, 0]);
        out.extend_from_slice(&(inner.len() as u16).to_be_bytes());
        out.extend_from_slice(&[proto, ttl]);
        out.extend_from_slice(&testframe::v6(2));
        out.extend_from_slice(&b.addr);
    }
    out.extend_from_slice(inner);
    out
}

/// Expected GUE output towards backend `id`, naming backend `hop` as the
/// second hop, written by the test frame builder (not the data plane's
/// writers), then checked field by field where the builder could share a
/// mistake with the data plane: checksums and lengths.
fn gue(frame: &[u8], id: u32, hop: Option<u32>) -> Vec<u8> {
    let p = parse(frame).unwrap();
    let (_, tos, ttl, _) = inner_of(frame);
    let b = backend(id);
    let v4 = b.family == Family::V4.wire();
    let addr = |b: &BackendInfo| {
        if b.family == Family::V4.wire() {
            b.addr[..4].to_vec()
        } else {
            b.addr.to_vec()
        }
    };
    let client = if p.is_ipv6 {
        &p.src_addr[..]
    } else {
        &p.src_addr[..4]
    };
    let w = testframe::Wrap {
        src_mac: LB_MAC,
        dst_mac: b.next_hop_mac,
        outer_src: if v4 {
            ENCAP_SRC_V4.to_vec()
        } else {
            testframe::v6(2).to_vec()
        },
        outer_dst: addr(&b),
        ttl,
        tos,
        gue: Some((
            lb_common::encap::gue_source_port_of(client, p.src_port, p.dst_port),
            GUE_PORT,
            hop.map(|h| addr(&backend(h))),
        )),
    };
    let out = testframe::encapsulate(frame, &w);
    let ip_len = if v4 { 20 } else { 40 };
    if v4 {
        assert_eq!(
            csum::checksum(&out[14..34]),
            0,
            "outer IPv4 checksum verifies"
        );
        assert_eq!(out[23], 17, "outer protocol UDP");
    } else {
        assert_eq!(out[20], 17, "outer next header UDP");
    }
    let udp = &out[14 + ip_len..];
    assert_eq!(
        u16::from_be_bytes([udp[4], udp[5]]) as usize,
        udp.len(),
        "UDP length covers the rest of the frame"
    );
    assert_eq!(&udp[6..8], &[0, 0], "UDP checksum 0");
    assert!(
        u16::from_be_bytes([udp[0], udp[1]]) >= 49152,
        "source port from the flow hash"
    );
    assert_eq!(
        &out[out.len() - (frame.len() - p.l3_offset)..],
        &frame[p.l3_offset..],
        "inner datagram untouched"
    );
    out
}

/// Expected L2 DSR output: only the MACs change.
fn mac_rewritten(frame: &[u8], id: u32) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&backend_mac(id));
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

fn tcp4(dst: [u8; 4], sport: u16, dport: u16) -> FrameSpec {
    FrameSpec::v4_tcp(CLIENT_V4, dst, sport, dport)
}
fn udp4(dst: [u8; 4], sport: u16, dport: u16) -> FrameSpec {
    FrameSpec::v4_udp(CLIENT_V4, dst, sport, dport)
}
fn tcp6(dst: [u8; 16], sport: u16, dport: u16) -> FrameSpec {
    FrameSpec::v6_tcp(testframe::v6(0x10), dst, sport, dport)
}
fn udp6(dst: [u8; 16], sport: u16, dport: u16) -> FrameSpec {
    FrameSpec::v6_udp(testframe::v6(0x10), dst, sport, dport)
}
fn ack(mut s: FrameSpec) -> FrameSpec {
    if let L4::Tcp { flags, .. } = &mut s.l4 {
        *flags = TCP_ACK;
    }
    s
}

/// Expected output frame, computed from the input frame.
type Expect = Box<dyn Fn(&[u8]) -> Vec<u8>>;
/// name, input frame, verdict, expected output, counter deltas.
type Row = (
    &'static str,
    Vec<u8>,
    u32,
    Expect,
    &'static [(&'static str, u64)],
);

const TX_TCP_NEW: &[(&str, u64)] = &[
    ("parse_tcp", 1),
    ("lb_conntrack_miss", 1),
    ("lb_new_flow", 1),
    ("verdict_tx", 1),
];
const TX_UDP_NEW: &[(&str, u64)] = &[
    ("parse_udp", 1),
    ("lb_conntrack_miss", 1),
    ("lb_new_flow", 1),
    ("verdict_tx", 1),
];

#[test]
fn forwarding_modes_families_and_protocols() {
    let mut b = Bench::new();
    let v4 = [198, 18, 100, 1];
    let v4l2 = [198, 18, 100, 2];
    let v6 = testframe::v6_vip(1);
    let v6l2 = testframe::v6_vip(2);
    let v6o4 = testframe::v6_vip(3);
    b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    b.vip(1, vip_key(&v4, 53, IPPROTO_UDP), Mode::Ipip, 2);
    b.vip(2, vip_key(&v6, 80, IPPROTO_TCP), Mode::Ipip, 3);
    b.vip(3, vip_key(&v6, 53, IPPROTO_UDP), Mode::Ipip, 4);
    b.vip(4, vip_key(&v4l2, 0, IPPROTO_TCP), Mode::L2dsr, 1);
    b.vip(5, vip_key(&v4l2, 0, IPPROTO_UDP), Mode::L2dsr, 2);
    b.vip(6, vip_key(&v6l2, 443, IPPROTO_TCP), Mode::L2dsr, 3);
    b.vip(7, vip_key(&v6l2, 443, IPPROTO_UDP), Mode::L2dsr, 4);
    b.vip(8, vip_key(&v6o4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    b.vip(
        9,
        vip_key(&[198, 18, 100, 9], 80, IPPROTO_TCP),
        Mode::Ipip,
        0,
    );
    b.vip(
        10,
        vip_key(&[198, 18, 100, 10], 80, IPPROTO_TCP),
        Mode::Ipip,
        3,
    );

    let rows: Vec<Row> = vec![
        (
            "ipip 4in4 tcp",
            testframe::build(&tcp4(v4, 1000, 80)),
            XDP_TX,
            Box::new(|f| encapsulated(f, 1)),
            TX_TCP_NEW,
        ),
        (
            "ipip 4in4 udp",
            testframe::build(&udp4(v4, 1000, 53)),
            XDP_TX,
            Box::new(|f| encapsulated(f, 2)),
            TX_UDP_NEW,
        ),
        (
            "ipip 6in6 tcp",
            testframe::build(&tcp6(v6, 1000, 80)),
            XDP_TX,
            Box::new(|f| encapsulated(f, 3)),
            TX_TCP_NEW,
        ),
        (
            "ipip 6in6 udp",
            testframe::build(&udp6(v6, 1000, 53)),
            XDP_TX,
            Box::new(|f| encapsulated(f, 4)),
            TX_UDP_NEW,
        ),
        (
            "ipip 6in4 tcp",
            testframe::build(&tcp6(v6o4, 1000, 80)),
            XDP_TX,
            Box::new(|f| encapsulated(f, 1)),
            TX_TCP_NEW,
        ),
        (
            "l2dsr v4 tcp, any port",
            testframe::build(&tcp4(v4l2, 1000, 22)),
            XDP_TX,
            Box::new(|f| mac_rewritten(f, 1)),
            TX_TCP_NEW,
        ),
        (
            "l2dsr v4 udp, any port",
            testframe::build(&udp4(v4l2, 1000, 9999)),
            XDP_TX,
            Box::new(|f| mac_rewritten(f, 2)),
            TX_UDP_NEW,
        ),
        (
            "l2dsr v6 tcp",
            testframe::build(&tcp6(v6l2, 1000, 443)),
            XDP_TX,
            Box::new(|f| mac_rewritten(f, 3)),
            TX_TCP_NEW,
        ),
        (
            "l2dsr v6 udp",
            testframe::build(&udp6(v6l2, 1000, 443)),
            XDP_TX,
            Box::new(|f| mac_rewritten(f, 4)),
            TX_UDP_NEW,
        ),
        (
            "vlan-tagged frame: tag dropped, inner datagram encapsulated",
            testframe::build(&FrameSpec {
                vlan: Some(42),
                ..tcp4(v4, 1001, 80)
            }),
            XDP_TX,
            Box::new(|f| encapsulated(f, 1)),
            TX_TCP_NEW,
        ),
        (
            "ipv4 options travel inside the tunnel",
            testframe::build(&FrameSpec {
                ipv4_options: 12,
                ..tcp4(v4, 1002, 80)
            }),
            XDP_TX,
            Box::new(|f| encapsulated(f, 1)),
            TX_TCP_NEW,
        ),
        (
            "ttl and dscp copied to the outer header",
            testframe::build(&FrameSpec {
                ttl: 7,
                tos: 0xb8,
                ..tcp4(v4, 1003, 80)
            }),
            XDP_TX,
            Box::new(|f| encapsulated(f, 1)),
            TX_TCP_NEW,
        ),
        (
            "traffic class and hop limit copied, 6in6",
            testframe::build(&FrameSpec {
                ttl: 3,
                tos: 0x2e,
                ..udp6(v6, 1004, 53)
            }),
            XDP_TX,
            Box::new(|f| encapsulated(f, 4)),
            TX_UDP_NEW,
        ),
        (
            "not a VIP address",
            testframe::build(&tcp4([198, 18, 100, 200], 1000, 80)),
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[
                ("parse_not_vip_address", 1),
                ("lb_not_vip", 1),
                ("verdict_pass", 1),
            ],
        ),
        (
            "VIP address, other port",
            testframe::build(&tcp4(v4, 1000, 81)),
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[("parse_tcp", 1), ("lb_not_vip", 1), ("verdict_pass", 1)],
        ),
        (
            "VIP address, other protocol",
            testframe::build(&udp4(v4, 1000, 80)),
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[("parse_udp", 1), ("lb_not_vip", 1), ("verdict_pass", 1)],
        ),
        (
            "arp",
            {
                let mut f = testframe::build(&udp4(v4, 1, 2));
                f[12..14].copy_from_slice(&[0x08, 0x06]);
                f
            },
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[("parse_not_ip", 1), ("verdict_pass", 1)],
        ),
        (
            "fragment to a VIP never reaches a backend",
            {
                let mut f = testframe::build(&udp4(v4, 1000, 53));
                f[20..22].copy_from_slice(&[0x20, 0x00]);
                f
            },
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[("parse_ipv4_fragment", 1), ("verdict_pass", 1)],
        ),
        (
            "ipv6 extension header to a VIP",
            {
                let mut f = testframe::build(&udp6(v6, 1000, 53));
                f[20] = 44;
                f
            },
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[("parse_ipv6_ext_header", 1), ("verdict_pass", 1)],
        ),
        (
            "truncated tcp header to a VIP",
            testframe::truncate_datagram(&testframe::build(&tcp4(v4, 1000, 80)), 10),
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[("parse_truncated_l4", 1), ("verdict_pass", 1)],
        ),
        (
            "frame cut inside the ip header",
            testframe::build(&tcp4(v4, 1000, 80))[..30].to_vec(),
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[("parse_truncated_l3", 1), ("verdict_pass", 1)],
        ),
        (
            "VIP with an empty ring drops",
            testframe::build(&tcp4([198, 18, 100, 9], 1000, 80)),
            XDP_DROP,
            Box::new(|f| f.to_vec()),
            &[
                ("parse_tcp", 1),
                ("lb_conntrack_miss", 1),
                ("lb_no_backend", 1),
                ("verdict_drop", 1),
            ],
        ),
        (
            "ipv4 VIP over an ipv6 backend is refused, not mangled",
            testframe::build(&tcp4([198, 18, 100, 10], 1000, 80)),
            XDP_DROP,
            Box::new(|f| f.to_vec()),
            &[
                ("parse_tcp", 1),
                ("lb_conntrack_miss", 1),
                ("lb_unsupported_encap", 1),
                ("verdict_drop", 1),
            ],
        ),
        (
            "icmp frag-needed quoting a VIP reply goes to that flow's backend",
            {
                let reply = testframe::build(&FrameSpec::v4_tcp(v4, CLIENT_V4, 80, 1000));
                testframe::icmp_too_big(&reply, [198, 18, 0, 1], v4, 1400)
            },
            XDP_TX,
            Box::new(|f| encapsulated(f, 1)),
            &[
                ("parse_other_l4", 1),
                ("lb_icmp_too_big", 1),
                ("lb_conntrack_hit", 1),
                ("verdict_tx", 1),
            ],
        ),
        (
            "icmpv6 packet-too-big quoting a VIP reply goes to that flow's backend",
            {
                let reply = testframe::build(&FrameSpec::v6_udp(v6, testframe::v6(0x10), 53, 1000));
                testframe::icmp6_too_big(&reply, testframe::v6(1), v6, 1280)
            },
            XDP_TX,
            Box::new(|f| encapsulated(f, 4)),
            &[
                ("parse_other_l4", 1),
                ("lb_icmp_too_big", 1),
                ("lb_conntrack_hit", 1),
                ("verdict_tx", 1),
            ],
        ),
        (
            "icmp too-big about an unknown flow uses the ring, creates nothing",
            {
                let reply = testframe::build(&FrameSpec::v4_tcp(v4, CLIENT_V4, 80, 4242));
                testframe::icmp_too_big(&reply, [198, 18, 0, 1], v4, 1400)
            },
            XDP_TX,
            Box::new(|f| encapsulated(f, 1)),
            &[
                ("parse_other_l4", 1),
                ("lb_icmp_too_big", 1),
                ("lb_conntrack_miss", 1),
                ("verdict_tx", 1),
            ],
        ),
        (
            "other icmp to a VIP address passes",
            testframe::build(&FrameSpec {
                l4: L4::Raw {
                    proto: 1,
                    payload_len: 8,
                },
                ..udp4(v4, 0, 0)
            }),
            XDP_PASS,
            Box::new(|f| f.to_vec()),
            &[
                ("parse_other_l4", 1),
                ("lb_not_vip", 1),
                ("verdict_pass", 1),
            ],
        ),
    ];
    for (name, frame, verdict, out, counters) in rows {
        let expected = out(&frame);
        b.check(name, &frame, verdict, &expected, counters);
    }
}

/// Flow stickiness, second chance, down re-pick, drain and UDP expiry, in
/// one sequence over shared state.
#[test]
fn connection_table_rules() {
    let mut b = Bench::new();
    let v4 = [198, 18, 100, 1];
    let tcp = b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    let udp = b.vip(1, vip_key(&v4, 53, IPPROTO_UDP), Mode::Ipip, 1);
    let flow_a = tcp4(v4, 2000, 80);

    let syn = testframe::build(&flow_a);
    b.check(
        "SYN on ring gen 0 -> backend 1",
        &syn,
        XDP_TX,
        &encapsulated(&syn, 1),
        TX_TCP_NEW,
    );

    b.ring_all(&tcp, 2);
    let a_ack = testframe::build(&ack(flow_a.clone()));
    b.check(
        "established flow stays on backend 1 after the ring moved to 2",
        &a_ack,
        XDP_TX,
        &encapsulated(&a_ack, 1),
        &[("parse_tcp", 1), ("lb_conntrack_hit", 1), ("verdict_tx", 1)],
    );

    let syn_b = testframe::build(&tcp4(v4, 2001, 80));
    b.check(
        "new SYN follows the new ring",
        &syn_b,
        XDP_TX,
        &encapsulated(&syn_b, 2),
        TX_TCP_NEW,
    );

    let c_ack = testframe::build(&ack(tcp4(v4, 2002, 80)));
    b.check(
        "mid-stream packet without an entry: second chance keeps the old ring's backend",
        &c_ack,
        XDP_TX,
        &encapsulated(&c_ack, 1),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_second_chance_hit", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );

    b.state(1, BackendState::Down);
    b.check(
        "backend 1 down: its flow is re-picked from the ring",
        &a_ack,
        XDP_TX,
        &encapsulated(&a_ack, 2),
        &[
            ("parse_tcp", 1),
            ("lb_repick_down", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );
    let d_ack = testframe::build(&ack(tcp4(v4, 2003, 80)));
    b.check(
        "second chance skips a down backend",
        &d_ack,
        XDP_TX,
        &encapsulated(&d_ack, 2),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );

    b.state(1, BackendState::Up);
    b.state(2, BackendState::Draining);
    b.ring_all(&tcp, 1);
    // A ring change retires no flow cache: the flow is served from this
    // CPU's cache, its backend still keeping flows.
    b.check(
        "draining backend 2 keeps its established flow",
        &a_ack,
        XDP_TX,
        &encapsulated(&a_ack, 2),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_hit", 1),
            ("lb_flow_cache_hit", 1),
            ("verdict_tx", 1),
        ],
    );
    let e_syn = testframe::build(&tcp4(v4, 2004, 80));
    b.check(
        "while new flows avoid it",
        &e_syn,
        XDP_TX,
        &encapsulated(&e_syn, 1),
        TX_TCP_NEW,
    );

    // UDP: sticky within the timeout, a new flow after it.
    let u = testframe::build(&udp4(v4, 3000, 53));
    b.check(
        "udp first packet",
        &u,
        XDP_TX,
        &encapsulated(&u, 1),
        TX_UDP_NEW,
    );
    b.ring_all(&udp, 2);
    b.check(
        "udp within the timeout stays",
        &u,
        XDP_TX,
        &encapsulated(&u, 1),
        &[("parse_udp", 1), ("lb_conntrack_hit", 1), ("verdict_tx", 1)],
    );
    programming::set_config(
        &mut b.h.ebpf,
        &LbConfig {
            encap_src_v4: ENCAP_SRC_V4,
            encap_src_v6: testframe::v6(2),
            hash_seed: 0x5eed,
            ring_size: M,
            flags: 0,
            udp_timeout_ns: 0,
            ..Default::default()
        },
    )
    .unwrap();
    b.check(
        "udp entry past its timeout is a new flow on the current ring",
        &u,
        XDP_TX,
        &encapsulated(&u, 2),
        &[
            ("parse_udp", 1),
            ("lb_udp_expired", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );

    // Per-VIP and per-backend counters are exact: bytes are frame bytes as
    // received, before encapsulation.
    let tcp_vip = b.traffic("STATS_VIP", tcp.id);
    let tcp_frames = [&syn, &a_ack, &syn_b, &c_ack, &a_ack, &d_ack, &a_ack, &e_syn];
    assert_eq!(tcp_vip.packets, tcp_frames.len() as u64);
    assert_eq!(
        tcp_vip.bytes,
        tcp_frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(tcp_vip.new_flows, 6);
    let b1 = b.traffic("STATS_BACKEND", 1);
    let b2 = b.traffic("STATS_BACKEND", 2);
    // Backend 1: syn, a_ack (sticky), c_ack (second chance), e_syn, 2 udp.
    assert_eq!((b1.packets, b1.new_flows), (6, 4));
    // Backend 2: syn_b, a_ack (re-pick), d_ack, a_ack (draining), udp (expired).
    assert_eq!((b2.packets, b2.new_flows), (5, 4));
    assert_eq!(b.traffic("STATS_VIP", udp.id).packets, 3);
}

fn flow_key(frame: &[u8]) -> lb_common::maps::FlowKey {
    parse(frame).unwrap().flow_key()
}

fn conntrack_entry(b: &Bench, frame: &[u8]) -> Option<u32> {
    snapshot::conntrack_entry(&b.h.ebpf, &flow_key(frame))
        .unwrap()
        .map(|(_, slot)| slot.backend_id)
}

fn with_config(b: &mut Bench, f: impl FnOnce(&mut LbConfig)) {
    let mut cfg = LbConfig {
        encap_src_v4: ENCAP_SRC_V4,
        encap_src_v6: testframe::v6(2),
        hash_seed: 0x5eed,
        ring_size: M,
        flags: 0,
        udp_timeout_ns: 30_000_000_000,
        gue_port: GUE_PORT,
        ..Default::default()
    };
    f(&mut cfg);
    programming::set_config(&mut b.h.ebpf, &cfg).unwrap();
}

/// Rules at the edges: SYN reuse, the second-chance window, re-added VIPs,
/// ICMP about quiet UDP flows, VLAN with l2dsr, padding, MTU.
#[test]
fn edge_rules() {
    let mut b = Bench::new();
    let v4 = [198, 18, 100, 1];
    let tcp = b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    let udp = b.vip(1, vip_key(&v4, 53, IPPROTO_UDP), Mode::Ipip, 1);

    // A SYN always follows the live ring, even with an entry, and replaces it.
    let syn = testframe::build(&tcp4(v4, 4000, 80));
    b.check(
        "first SYN",
        &syn,
        XDP_TX,
        &encapsulated(&syn, 1),
        TX_TCP_NEW,
    );
    b.ring_all(&tcp, 2);
    b.check(
        "SYN reusing the tuple after a ring change follows the new ring",
        &syn,
        XDP_TX,
        &encapsulated(&syn, 2),
        TX_TCP_NEW,
    );
    assert_eq!(conntrack_entry(&b, &syn), Some(2), "entry replaced");

    // Past the second-chance window, a mid-stream miss uses the live ring.
    b.ring_all_window(&tcp, 1, Duration::ZERO);
    let late = testframe::build(&ack(tcp4(v4, 4001, 80)));
    b.check(
        "no second chance once the window has passed",
        &late,
        XDP_TX,
        &encapsulated(&late, 1),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );

    // Re-adding a VIP id clears its old generations: no second chance to
    // the previous owner's backends.
    b.vip(
        0,
        vip_key(&[198, 18, 100, 5], 80, IPPROTO_TCP),
        Mode::Ipip,
        2,
    );
    let fresh = testframe::build(&ack(tcp4([198, 18, 100, 5], 4002, 80)));
    b.check(
        "re-used vip id: no second chance into the previous owner's ring",
        &fresh,
        XDP_TX,
        &encapsulated(&fresh, 2),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );

    // ICMP about a UDP flow whose entry is past its timeout still goes to
    // that flow's backend and refreshes nothing.
    let u = testframe::build(&udp4(v4, 5000, 53));
    b.check("udp flow", &u, XDP_TX, &encapsulated(&u, 1), TX_UDP_NEW);
    b.ring_all(&udp, 2);
    with_config(&mut b, |c| c.udp_timeout_ns = 0);
    let reply = testframe::build(&FrameSpec::v4_udp(v4, CLIENT_V4, 53, 5000));
    let icmp = testframe::icmp_too_big(&reply, [198, 18, 0, 1], v4, 1400);
    b.check(
        "icmp about an expired udp flow goes to its backend",
        &icmp,
        XDP_TX,
        &encapsulated(&icmp, 1),
        &[
            ("parse_other_l4", 1),
            ("lb_icmp_too_big", 1),
            ("lb_conntrack_hit", 1),
            ("verdict_tx", 1),
        ],
    );
    b.check(
        "and did not refresh it",
        &u,
        XDP_TX,
        &encapsulated(&u, 2),
        &[
            ("parse_udp", 1),
            ("lb_udp_expired", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );
    with_config(&mut b, |_| {});

    let unknown_reply = testframe::build(&FrameSpec::v4_tcp(v4, CLIENT_V4, 80, 4999));
    let unknown = testframe::icmp_too_big(&unknown_reply, [198, 18, 0, 1], v4, 1400);
    b.h.run(&unknown);
    let client_side = testframe::build(&tcp4(v4, 4999, 80));
    assert_eq!(
        conntrack_entry(&b, &client_side),
        None,
        "an ICMP error creates no entry"
    );

    // l2dsr keeps a VLAN tag: only the MACs change.
    let l2 = b.vip(
        2,
        vip_key(&[198, 18, 100, 2], 0, IPPROTO_TCP),
        Mode::L2dsr,
        1,
    );
    let _ = l2;
    let tagged = testframe::build(&FrameSpec {
        vlan: Some(300),
        ..tcp4([198, 18, 100, 2], 4003, 22)
    });
    b.check(
        "l2dsr with a vlan tag",
        &tagged,
        XDP_TX,
        &mac_rewritten(&tagged, 1),
        TX_TCP_NEW,
    );

    // Ethernet padding after a short datagram rides along after the inner
    // datagram; the outer length covers the datagram only.
    let mut padded = testframe::build(&tcp4(v4, 4004, 80));
    padded.extend_from_slice(&[0; 6]);
    let mut want = encapsulated(&padded[..padded.len() - 6], 2);
    want.extend_from_slice(&[0; 6]);
    b.check("ethernet padding", &padded, XDP_TX, &want, TX_TCP_NEW);

    // MTU: an encapsulated frame that would not fit is dropped and counted.
    b.ring_all(&tcp, 1);
    let big = testframe::build(&FrameSpec {
        payload: vec![7; 60],
        ..tcp4(v4, 4006, 80)
    });
    with_config(&mut b, |c| c.max_frame_len = (big.len() + 19) as u32);
    b.check(
        "encapsulated frame over the MTU",
        &big,
        XDP_DROP,
        &big,
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_frame_too_big", 1),
            ("verdict_drop", 1),
        ],
    );
    with_config(&mut b, |c| c.max_frame_len = (big.len() + 20) as u32);
    b.check(
        "encapsulated frame exactly at the MTU",
        &big,
        XDP_TX,
        &encapsulated(&big, 1),
        TX_TCP_NEW,
    );

    // TTL 0 (hop limit 0): never forwarded, counted, no entry recorded.
    let v6 = testframe::v6_vip(1);
    b.vip(2, vip_key(&v6, 80, IPPROTO_TCP), Mode::Ipip, 3);
    b.vip(
        3,
        vip_key(&[198, 18, 100, 2], 80, IPPROTO_TCP),
        Mode::L2dsr,
        1,
    );
    for (name, spec) in [
        ("IPv4 TTL 0, ipip", tcp4(v4, 4010, 80)),
        ("IPv6 hop limit 0, ipip", tcp6(v6, 4011, 80)),
        ("IPv4 TTL 0, l2dsr", tcp4([198, 18, 100, 2], 4012, 80)),
    ] {
        let dead = testframe::build(&FrameSpec { ttl: 0, ..spec });
        b.check(
            name,
            &dead,
            XDP_DROP,
            &dead,
            &[
                ("parse_tcp", 1),
                ("lb_conntrack_miss", 1),
                ("lb_ttl_expired", 1),
                ("verdict_drop", 1),
            ],
        );
        assert_eq!(conntrack_entry(&b, &dead), None, "{name}: no entry");
    }
    let one = testframe::build(&FrameSpec {
        ttl: 1,
        ..tcp4(v4, 4013, 80)
    });
    b.check(
        "TTL 1 is forwarded (the outer header carries it on)",
        &one,
        XDP_TX,
        &encapsulated(&one, 1),
        TX_TCP_NEW,
    );
}

/// For 10,000 random flows the backend the kernel picks is the one userspace
/// computes from the same Maglev table and the shared flow hash.
#[test]
fn kernel_and_userspace_agree_on_10000_random_flows_v4_udp_and_v6_tcp() {
    use lb_common::{
        maglev::{self, MaglevBackend},
        maps::FlowKey,
        ring::flow_slot,
    };
    const RING: u32 = 1009;
    const SEED: u32 = 0xc0ffee;
    let sizes = MapSizes {
        max_vips: 2,
        max_backends: 32,
        ring_size: RING,
        conntrack_entries: 16384,
        ..Default::default()
    };
    let mut h = Harness::load_with(&sizes);
    let cfg = LbConfig {
        encap_src_v4: ENCAP_SRC_V4,
        encap_src_v6: testframe::v6(2),
        hash_seed: SEED,
        ring_size: RING,
        flags: 0,
        udp_timeout_ns: 30_000_000_000,
        ..Default::default()
    };
    programming::set_config(&mut h.ebpf, &cfg).unwrap();
    let backends: Vec<MaglevBackend> = (1..=10u32)
        .map(|id| MaglevBackend {
            id,
            identity: v16([198, 18, 0, 20 + id as u8]),
            weight: 1 + id % 3,
        })
        .collect();
    for mb in &backends {
        let info = BackendInfo {
            addr: mb.identity,
            family: Family::V4.wire(),
            ..backend(1)
        };
        programming::set_backend(&mut h.ebpf, mb.id, &info).unwrap();
    }
    // The same ten backends by IPv6 address, ids 11..=20, for an IPv6 VIP.
    let backends6: Vec<MaglevBackend> = backends
        .iter()
        .map(|b| MaglevBackend {
            id: b.id + 10,
            identity: testframe::v6(0x20 + b.id as u16),
            weight: b.weight,
        })
        .collect();
    for mb in &backends6 {
        let info = BackendInfo {
            addr: mb.identity,
            family: Family::V6.wire(),
            ..backend(1)
        };
        programming::set_backend(&mut h.ebpf, mb.id, &info).unwrap();
    }
    let table6 = maglev::build(&backends6, RING, SEED).unwrap();
    let vip6 = testframe::v6_vip(1);
    programming::install_vip(
        &mut h.ebpf,
        &vip_key(&vip6, 0, IPPROTO_TCP),
        0,
        Mode::Ipip,
        &table6,
    )
    .unwrap();
    let table = maglev::build(&backends, RING, SEED).unwrap();
    let vip = [198, 18, 100, 1];
    let key = vip_key(&vip, 0, IPPROTO_UDP);
    programming::install_vip(&mut h.ebpf, &key, 1, Mode::Ipip, &table).unwrap();

    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut per_backend = BTreeMap::new();
    for n in 0..10_000 {
        let r = next();
        if n % 2 == 1 {
            // IPv6 TCP SYNs: the hash covers all 16 address bytes.
            let mut src = testframe::v6(0);
            src[8..].copy_from_slice(&r.to_be_bytes());
            let (sport, dport) = ((r >> 24) as u16, (r >> 40) as u16);
            let frame = testframe::build(&FrameSpec::v6_tcp(src, vip6, sport, dport));
            let flow = FlowKey {
                src,
                dst: vip6,
                src_port: sport,
                dst_port: dport,
                proto: IPPROTO_TCP,
                family: Family::V6.wire(),
                _pad: [0; 2],
            };
            let want = table6[flow_slot(&flow, SEED, RING) as usize];
            let out = h.run(&frame);
            assert_eq!(out.verdict, XDP_TX);
            // Last byte of the outer IPv6 destination (bytes 38..54).
            let got = out.frame[53] as u32 - 0x20 + 10;
            assert_eq!(got, want, "flow {src:?}:{sport} -> {dport}");
            *per_backend.entry(want).or_insert(0u32) += 1;
            continue;
        }
        let src = [198, 18, (r >> 8) as u8 & 1, (r >> 16) as u8];
        let (sport, dport) = ((r >> 24) as u16, (r >> 40) as u16);
        let frame = testframe::build(&FrameSpec::v4_udp(src, vip, sport, dport));
        let flow = FlowKey {
            src: v16(src),
            dst: v16(vip),
            src_port: sport,
            dst_port: dport,
            proto: IPPROTO_UDP,
            family: Family::V4.wire(),
            _pad: [0; 2],
        };
        let want = table[flow_slot(&flow, SEED, RING) as usize];
        let out = h.run(&frame);
        assert_eq!(out.verdict, XDP_TX);
        // Outer IPv4 destination = the chosen backend.
        let got = out.frame[33] - 20;
        assert_eq!(got as u32, want, "flow {src:?}:{sport} -> {dport}");
        *per_backend.entry(want).or_insert(0u32) += 1;
    }
    assert_eq!(
        per_backend.len(),
        20,
        "every backend of both VIPs got flows: {per_backend:?}"
    );
}

/// A backend slot reused for another VIP's backend never receives the flows
/// the connection table (or the flow cache) still has for the old one.
#[test]
fn a_reused_backend_slot_gets_no_foreign_flows() {
    let mut b = Bench::new();
    let v4 = [198, 18, 100, 1];
    for id in 1..=2 {
        let info = BackendInfo {
            vip_id: 0,
            ..backend(id)
        };
        programming::set_backend(&mut b.h.ebpf, id, &info).unwrap();
    }
    let tcp = b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    let syn = testframe::build(&tcp4(v4, 6000, 80));
    b.check(
        "flow placed on slot 1",
        &syn,
        XDP_TX,
        &encapsulated(&syn, 1),
        TX_TCP_NEW,
    );
    b.ring_all(&tcp, 2);
    // Slot 1 now belongs to a backend of VIP 7.
    programming::set_backend(
        &mut b.h.ebpf,
        1,
        &BackendInfo {
            vip_id: 7,
            ..backend(1)
        },
    )
    .unwrap();
    let a = testframe::build(&ack(tcp4(v4, 6000, 80)));
    b.check(
        "its flow is re-picked from VIP 0's ring, not sent to VIP 7's backend",
        &a,
        XDP_TX,
        &encapsulated(&a, 2),
        &[
            ("parse_tcp", 1),
            ("lb_repick_down", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );
}

const TX_TCP_HIT: &[(&str, u64)] = &[("parse_tcp", 1), ("lb_conntrack_hit", 1), ("verdict_tx", 1)];

fn fin(mut s: FrameSpec) -> FrameSpec {
    if let L4::Tcp { flags, .. } = &mut s.l4 {
        *flags = TCP_ACK | lb_common::wire::tcp::TCP_FIN;
    }
    s
}

/// Moves the head stamp of `frame`'s flow `stamps` back in time.
fn age_entry(b: &mut Bench, frame: &[u8], stamps: u16) {
    use aya::maps::Array;
    use lb_common::conntrack::{BucketHead, WAYS};
    let (idx, _) = snapshot::conntrack_entry(&b.h.ebpf, &flow_key(frame))
        .unwrap()
        .expect("an entry to age");
    let mut heads: Array<&mut MapData, BucketHead> =
        Array::try_from(b.h.ebpf.map_mut("CONNTRACK_HEADS").unwrap()).unwrap();
    let mut head = heads.get(&(idx / WAYS), 0).unwrap();
    let word = &mut head.ways[(idx % WAYS) as usize];
    let stamp = ((*word >> 16) as u16).wrapping_sub(stamps);
    *word = (*word & 0xffff) | (stamp as u32) << 16;
    heads.set(idx / WAYS, head, 0).unwrap();
}

/// A full table: closed flows are reused first, then the stalest embryonic
/// flow (counted); an established flow is never displaced: a new flow that
/// finds only established flows is not recorded (counted) and follows the
/// ring. One bucket of four slots, so every flow competes for it.
#[test]
fn a_full_table_reuses_closed_then_embryonic_flows_and_never_established_ones() {
    let mut b = Bench::with_conntrack(lb_common::conntrack::WAYS);
    let v4 = [198, 18, 100, 1];
    let tcp = b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    let flows: Vec<FrameSpec> = (0..7).map(|i| tcp4(v4, 3000 + i, 80)).collect();
    let syn = |i: usize| testframe::build(&flows[i]);
    let est = |i: usize| testframe::build(&ack(flows[i].clone()));

    for i in 0..4 {
        b.check(
            "SYN",
            &syn(i),
            XDP_TX,
            &encapsulated(&syn(i), 1),
            TX_TCP_NEW,
        );
        b.check(
            "its next packet establishes it",
            &est(i),
            XDP_TX,
            &encapsulated(&est(i), 1),
            TX_TCP_HIT,
        );
    }
    // The ring moves on and no second chance applies: a flow without an
    // entry shows it by landing on backend 2.
    b.ring_all_window(&tcp, 2, Duration::ZERO);
    for i in 0..4 {
        assert_eq!(conntrack_entry(&b, &est(i)), Some(1), "flow {i} recorded");
    }
    // Flow 2 idle for a minute (stamps count 4.3 s): older, still kept.
    age_entry(&mut b, &est(2), 15);

    let fin1 = testframe::build(&fin(flows[1].clone()));
    b.check(
        "the client's FIN still follows the entry",
        &fin1,
        XDP_TX,
        &encapsulated(&fin1, 1),
        TX_TCP_HIT,
    );
    b.check(
        "a new flow takes the closed flow's slot: nothing live is displaced",
        &syn(4),
        XDP_TX,
        &encapsulated(&syn(4), 2),
        TX_TCP_NEW,
    );
    assert_eq!(conntrack_entry(&b, &est(1)), None);
    b.check(
        "the next new flow displaces the embryonic one (flow 4), counted, not the idle flow 2",
        &syn(5),
        XDP_TX,
        &encapsulated(&syn(5), 2),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_new_flow", 1),
            ("lb_conntrack_evicted", 1),
            ("verdict_tx", 1),
        ],
    );
    assert_eq!(conntrack_entry(&b, &est(4)), None);
    b.check(
        "flow 5's next packet establishes it",
        &est(5),
        XDP_TX,
        &encapsulated(&est(5), 2),
        TX_TCP_HIT,
    );
    b.check(
        "every way established: a new flow follows the ring, not recorded, counted",
        &syn(6),
        XDP_TX,
        &encapsulated(&syn(6), 2),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_new_flow", 1),
            ("lb_conntrack_full", 1),
            ("verdict_tx", 1),
        ],
    );
    assert_eq!(conntrack_entry(&b, &est(6)), None);
    for (i, backend) in [(0, 1), (2, 1), (3, 1), (5, 2)] {
        assert_eq!(conntrack_entry(&b, &est(i)), Some(backend), "flow {i}");
    }
}

/// A slot whose seal does not match its contents (what a reader racing a
/// writer sees) is a miss: the flow takes the ring and is recorded again,
/// never sent to the backend the torn slot names. Rewriting `CONFIG` keeps
/// the table's seed, so entries stay findable.
#[test]
fn a_torn_slot_is_a_miss_never_a_wrong_backend() {
    use aya::maps::Array;
    use lb_common::conntrack::ConnSlot;
    let mut b = Bench::new();
    let v4 = [198, 18, 100, 1];
    let tcp = b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    let flow = tcp4(v4, 3500, 80);
    let syn = testframe::build(&flow);
    let est = testframe::build(&ack(flow));
    b.check("SYN", &syn, XDP_TX, &encapsulated(&syn, 1), TX_TCP_NEW);

    with_config(&mut b, |c| c.udp_timeout_ns = 5_000_000_000);
    let (idx, slot) = snapshot::conntrack_entry(&b.h.ebpf, &flow_key(&est))
        .unwrap()
        .expect("the entry survives a CONFIG rewrite");
    assert_eq!(slot.backend_id, 1);

    let mut table: Array<&mut MapData, ConnSlot> =
        Array::try_from(b.h.ebpf.map_mut("CONNTRACK").unwrap()).unwrap();
    table
        .set(
            idx,
            ConnSlot {
                backend_id: 2,
                ..slot
            },
            0,
        )
        .unwrap();
    assert_eq!(conntrack_entry(&b, &est), None);
    // Republishing the same ring (without a second-chance window) retires
    // the CPU's flow cache, so the next packet reads the table.
    b.ring_all_window(&tcp, 1, Duration::ZERO);
    b.check(
        "the torn slot is not an entry: the ring's backend 1, recorded anew",
        &est,
        XDP_TX,
        &encapsulated(&est, 1),
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_new_flow", 1),
            ("verdict_tx", 1),
        ],
    );
    assert_eq!(conntrack_entry(&b, &est), Some(1));
}

fn rst(mut s: FrameSpec) -> FrameSpec {
    if let L4::Tcp { flags, .. } = &mut s.l4 {
        *flags = TCP_ACK | lb_common::wire::tcp::TCP_RST;
    }
    s
}

/// A client reusing a port after a reset: the new SYN follows the live ring,
/// and the connection's next packets follow the SYN, not what this CPU's
/// flow cache remembered of the old connection.
#[test]
fn a_reused_port_is_not_served_the_old_connections_cached_backend() {
    let mut b = Bench::new();
    let v4 = [198, 18, 100, 1];
    let tcp = b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Ipip, 1);
    let flow = tcp4(v4, 3600, 80);
    let syn = testframe::build(&flow);
    let est = testframe::build(&ack(flow.clone()));
    let reset = testframe::build(&rst(flow));
    const TX_CACHED: &[(&str, u64)] = &[
        ("parse_tcp", 1),
        ("lb_conntrack_hit", 1),
        ("lb_flow_cache_hit", 1),
        ("verdict_tx", 1),
    ];
    b.check("SYN", &syn, XDP_TX, &encapsulated(&syn, 1), TX_TCP_NEW);
    b.check(
        "the first ACK reads the table and fills this CPU's cache",
        &est,
        XDP_TX,
        &encapsulated(&est, 1),
        TX_TCP_HIT,
    );
    b.check(
        "the next one is served from the cache",
        &est,
        XDP_TX,
        &encapsulated(&est, 1),
        TX_CACHED,
    );
    b.ring_all(&tcp, 2);
    b.check(
        "after the ring change, still from the cache (ring changes retire none)",
        &est,
        XDP_TX,
        &encapsulated(&est, 1),
        TX_CACHED,
    );
    b.check(
        "the client resets",
        &reset,
        XDP_TX,
        &encapsulated(&reset, 1),
        TX_TCP_HIT,
    );
    b.check(
        "the reused port's SYN follows the live ring",
        &syn,
        XDP_TX,
        &encapsulated(&syn, 2),
        TX_TCP_NEW,
    );
    b.check(
        "and so does the new connection's ACK",
        &est,
        XDP_TX,
        &encapsulated(&est, 2),
        TX_CACHED,
    );
    assert_eq!(conntrack_entry(&b, &est), Some(2));
}

/// `RING_STATE` words are stored through a one-page mapping: an id on a
/// later page lands in its own word, read back by the map and by the
/// program (its second chance opens on the previous generation).
#[test]
fn ring_state_of_an_id_past_the_first_page() {
    let mut h = kernel::Harness::load_with(&MapSizes {
        max_vips: 1024,
        max_backends: 16,
        ring_size: M,
        conntrack_entries: 1024,
        ..Default::default()
    });
    programming::set_config(
        &mut h.ebpf,
        &LbConfig {
            ring_size: M,
            ..Default::default()
        },
    )
    .unwrap();
    for id in [0u32, 511, 512, 1023] {
        let s = lb_common::maps::RingState::new((id & 1) as u8, 1 << 40 | (id as u64) << 1);
        programming::store_ring_state(&h.ebpf, id, s).unwrap();
    }
    for id in [0u32, 511, 512, 1023] {
        let got = programming::ring_state(&h.ebpf, id).unwrap();
        assert_eq!(got.live_generation(), (id & 1) as u8, "id {id}");
        assert_eq!(
            got.second_chance_until_ns(),
            1 << 40 | (id as u64) << 1,
            "id {id}"
        );
    }
    assert_eq!(
        programming::ring_state(&h.ebpf, 1).unwrap(),
        Default::default()
    );
    assert!(programming::store_ring_state(&h.ebpf, 1024, Default::default()).is_err());
}

/// GUE in every family combination, new flows and a second hop: after a
/// ring change, a mid-stream packet without an entry goes to the live
/// ring's backend naming the previous ring's as its second hop, and
/// nothing is recorded; a SYN never carries one; ICMP errors about a flow
/// take the plain second chance.
#[test]
fn gue_families_and_second_hop() {
    let mut b = Bench::new();
    let v4 = [198, 18, 100, 1];
    let v6 = testframe::v6_vip(1);
    let v6o4 = testframe::v6_vip(3);
    let tcp4v = b.vip(0, vip_key(&v4, 80, IPPROTO_TCP), Mode::Gue, 1);
    b.vip(1, vip_key(&v4, 53, IPPROTO_UDP), Mode::Gue, 2);
    let tcp6v = b.vip(2, vip_key(&v6, 80, IPPROTO_TCP), Mode::Gue, 3);
    b.vip(3, vip_key(&v6, 53, IPPROTO_UDP), Mode::Gue, 4);
    let o4 = b.vip(4, vip_key(&v6o4, 80, IPPROTO_TCP), Mode::Gue, 1);

    // name, frame, backend, counter deltas
    type NewFlow = (&'static str, FrameSpec, u32, &'static [(&'static str, u64)]);
    let new_flows: Vec<NewFlow> = vec![
        ("gue 4in4 tcp", tcp4(v4, 3000, 80), 1, TX_TCP_NEW),
        ("gue 4in4 udp", udp4(v4, 3000, 53), 2, TX_UDP_NEW),
        ("gue 6in6 tcp", tcp6(v6, 3000, 80), 3, TX_TCP_NEW),
        ("gue 6in6 udp", udp6(v6, 3000, 53), 4, TX_UDP_NEW),
        ("gue 6in4 tcp", tcp6(v6o4, 3000, 80), 1, TX_TCP_NEW),
        (
            "gue: ttl and dscp copied to the outer header",
            FrameSpec {
                ttl: 9,
                tos: 0xb8,
                ..tcp4(v4, 3001, 80)
            },
            1,
            TX_TCP_NEW,
        ),
    ];
    for (name, spec, to, counters) in new_flows {
        let f = testframe::build(&spec);
        b.check(name, &f, XDP_TX, &gue(&f, to, None), counters);
    }

    b.ring_all(&tcp4v, 2);
    b.ring_all(&tcp6v, 4);
    b.ring_all(&o4, 2);
    const SECOND_HOP: &[(&str, u64)] = &[
        ("parse_tcp", 1),
        ("lb_conntrack_miss", 1),
        ("lb_second_hop", 1),
        ("verdict_tx", 1),
    ];
    let hops: Vec<(&str, FrameSpec, u32, u32)> = vec![
        ("gue 4in4, second hop", ack(tcp4(v4, 3100, 80)), 2, 1),
        ("gue 6in6, second hop", ack(tcp6(v6, 3100, 80)), 4, 3),
        ("gue 6in4, second hop", ack(tcp6(v6o4, 3100, 80)), 2, 1),
    ];
    for (name, spec, to, hop) in hops {
        let f = testframe::build(&spec);
        b.check(name, &f, XDP_TX, &gue(&f, to, Some(hop)), SECOND_HOP);
        // Nothing was recorded: the next packet asks again.
        b.check(
            &format!("{name}, again"),
            &f,
            XDP_TX,
            &gue(&f, to, Some(hop)),
            SECOND_HOP,
        );
    }
    let syn = testframe::build(&tcp4(v4, 3101, 80));
    b.check(
        "a SYN after the change: the live ring, no second hop",
        &syn,
        XDP_TX,
        &gue(&syn, 2, None),
        TX_TCP_NEW,
    );
    let old = testframe::build(&ack(tcp4(v4, 3000, 80)));
    b.check(
        "a flow with an entry keeps its backend, no second hop",
        &old,
        XDP_TX,
        &gue(&old, 1, None),
        &[("parse_tcp", 1), ("lb_conntrack_hit", 1), ("verdict_tx", 1)],
    );

    b.state(1, BackendState::Down);
    let f = testframe::build(&ack(tcp4(v4, 3102, 80)));
    b.check(
        "the previous ring's backend is down: the live ring alone",
        &f,
        XDP_TX,
        &gue(&f, 2, None),
        TX_TCP_NEW,
    );
    b.state(1, BackendState::Up);

    b.ring_all_window(&tcp4v, 1, Duration::ZERO);
    b.ring_all_window(&tcp4v, 2, Duration::ZERO);
    let f = testframe::build(&ack(tcp4(v4, 3103, 80)));
    b.check(
        "no second-chance window: the second hop still (the backend tells, not a deadline)",
        &f,
        XDP_TX,
        &gue(&f, 2, Some(1)),
        SECOND_HOP,
    );

    // MTU headroom: GUE adds the outer IP header and 12 bytes, 32 more
    // with a second hop (IPv6 outer: 40 + 12 + 20).
    let syn = testframe::build(&tcp4(v4, 3200, 80));
    let too_big: &[(&str, u64)] = &[
        ("parse_tcp", 1),
        ("lb_conntrack_miss", 1),
        ("lb_frame_too_big", 1),
        ("verdict_drop", 1),
    ];
    with_config(&mut b, |c| {
        c.max_frame_len = (syn.len() + 20 + 12 - 1) as u32
    });
    b.check("gue: one byte over the MTU", &syn, XDP_DROP, &syn, too_big);
    with_config(&mut b, |c| c.max_frame_len = (syn.len() + 20 + 12) as u32);
    b.check(
        "gue: exactly at the MTU",
        &syn,
        XDP_TX,
        &gue(&syn, 2, None),
        TX_TCP_NEW,
    );
    let hop = testframe::build(&ack(tcp6(v6, 3200, 80)));
    let at = hop.len() + 40 + 12 + 20;
    with_config(&mut b, |c| c.max_frame_len = (at - 1) as u32);
    b.check(
        "gue: a second hop's 20 bytes count",
        &hop,
        XDP_DROP,
        &hop,
        &[
            ("parse_tcp", 1),
            ("lb_conntrack_miss", 1),
            ("lb_second_hop", 1),
            ("lb_frame_too_big", 1),
            ("verdict_drop", 1),
        ],
    );
    with_config(&mut b, |c| c.max_frame_len = at as u32);
    b.check(
        "gue: a second hop exactly at the MTU",
        &hop,
        XDP_TX,
        &gue(&hop, 4, Some(3)),
        SECOND_HOP,
    );
}
