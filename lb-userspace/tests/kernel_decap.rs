//! Kernel tier: the backends' decapsulator turns what the balancer sends (ipip
//! and GUE) back into the client's original datagram for configured VIPs,
//! drops what is encapsulated for anything else or malformed, and leaves
//! everything else alone. (Its keep-or-send-on decision against real
//! sockets is `tests/tests/decap_sockets.rs`: it needs a namespace.)

mod kernel;

use std::collections::BTreeMap;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use kernel::{Harness, XDP_DROP, XDP_PASS, XDP_TX};
use lb_common::{
    decap::{DecapConfig, DecapCounter, DecapTraffic, DecapVipKey},
    maps::{BackendInfo, BackendState, Family, LbConfig, Mode, VipKey},
    parse::{IPPROTO_TCP, IPPROTO_UDP, parse},
    testframe::{self, FrameSpec, LB_MAC},
};
use lb_userspace::{
    dataplane::{DECAP_PROGRAM, MapSizes},
    programming,
};

const M: u32 = 7;

const GUE_PORT: u16 = 6080;

fn vip_key(addr: &[u8]) -> DecapVipKey {
    let mut a = [0; 16];
    a[..addr.len()].copy_from_slice(addr);
    DecapVipKey::new(a, if addr.len() == 16 { 6 } else { 4 })
}

/// The decapsulator's counters, by name.
fn decap_counters(h: &Harness) -> BTreeMap<&'static str, u64> {
    let m: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(h.ebpf.map("DECAP_STATS").unwrap()).unwrap();
    DecapCounter::ALL
        .iter()
        .map(|c| (c.name(), m.get(&c.index(), 0).unwrap().iter().sum()))
        .collect()
}

fn setup(backend_v6: bool, mode: Mode) -> Harness {
    let mut h = Harness::load_with(&MapSizes {
        max_vips: 4,
        max_backends: 4,
        ring_size: M,
        conntrack_entries: 64,
        ..Default::default()
    });
    programming::set_config(
        &mut h.ebpf,
        &LbConfig {
            encap_src_v4: [198, 18, 0, 2],
            encap_src_v6: testframe::v6(2),
            hash_seed: 1,
            ring_size: M,
            flags: 0,
            udp_timeout_ns: u64::MAX,
            gue_port: GUE_PORT,
            ..Default::default()
        },
    )
    .unwrap();
    let (addr, family) = if backend_v6 {
        (testframe::v6(0x20), Family::V6.wire())
    } else {
        let mut a = [0; 16];
        a[..4].copy_from_slice(&[198, 18, 0, 20]);
        (a, Family::V4.wire())
    };
    let b = BackendInfo {
        addr,
        family,
        state: BackendState::Up.wire(),
        next_hop_mac: [2, 0, 0, 0, 0, 0x20],
        src_mac: LB_MAC,
        _pad: [0; 2],
        ifindex: 0,
        vip_id: lb_common::maps::BACKEND_ANY_VIP,
    };
    programming::set_backend(&mut h.ebpf, 1, &b).unwrap();
    for (id, (addr, fam)) in [
        ([198u8, 18, 100, 1].as_slice(), Family::V4.wire()),
        (testframe::v6_vip(1).as_slice(), Family::V6.wire()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut a = [0; 16];
        a[..addr.len()].copy_from_slice(addr);
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let key = VipKey {
                addr: a,
                port: 0,
                proto,
                family: fam,
            };
            let vip_id = id as u32 * 2 + (proto == IPPROTO_UDP) as u32;
            programming::install_vip(&mut h.ebpf, &key, vip_id, mode, &[1; M as usize]).unwrap();
        }
    }
    let mut cfg: Array<&mut MapData, DecapConfig> =
        Array::try_from(h.ebpf.map_mut("DECAP_CONFIG").unwrap()).unwrap();
    cfg.set(
        0,
        DecapConfig {
            gue_port: GUE_PORT,
            ..Default::default()
        },
        0,
    )
    .unwrap();
    let mut vips: PerCpuHashMap<&mut MapData, DecapVipKey, DecapTraffic> =
        PerCpuHashMap::try_from(h.ebpf.map_mut("DECAP_VIPS").unwrap()).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    for v in [&[198u8, 18, 100, 1][..], &testframe::v6_vip(1)[..]] {
        let zero = PerCpuValues::try_from(vec![DecapTraffic::default(); cpus]).unwrap();
        vips.insert(vip_key(v), zero, 0).unwrap();
    }
    h
}

/// Balancer output, decapsulated, must equal the client's frame except for
/// the MAC addresses, which are those the balancer wrote.
#[test]
fn round_trip_through_balancer_and_decapsulator() {
    let cases = [
        (
            "4in4 tcp",
            false,
            FrameSpec::v4_tcp([198, 18, 0, 10], [198, 18, 100, 1], 1000, 80),
        ),
        (
            "4in4 udp",
            false,
            FrameSpec::v4_udp([198, 18, 0, 10], [198, 18, 100, 1], 1000, 53),
        ),
        (
            "6in6 tcp",
            true,
            FrameSpec::v6_tcp(testframe::v6(0x10), testframe::v6_vip(1), 1000, 80),
        ),
        (
            "6in6 udp",
            true,
            FrameSpec::v6_udp(testframe::v6(0x10), testframe::v6_vip(1), 1000, 53),
        ),
        (
            "6in4 tcp",
            false,
            FrameSpec::v6_tcp(testframe::v6(0x10), testframe::v6_vip(1), 1000, 80),
        ),
    ];
    for (mode, (name, backend_v6, spec)) in [Mode::Ipip, Mode::Gue]
        .into_iter()
        .flat_map(|m| cases.clone().into_iter().map(move |c| (m, c)))
    {
        let name = format!("{mode} {name}");
        let mut h = setup(backend_v6, mode);
        let original = testframe::build(&spec);
        let encapsulated = h.run(&original);
        assert_eq!(encapsulated.verdict, XDP_TX, "{name}");
        assert!(encapsulated.frame.len() > original.len(), "{name}: grew");
        let decapsulated = h.run_program(DECAP_PROGRAM, &encapsulated.frame);
        assert_eq!(decapsulated.verdict, XDP_PASS, "{name}");
        let mut want = original.clone();
        want[..12].copy_from_slice(&encapsulated.frame[..12]);
        assert_eq!(decapsulated.frame, want, "{name}: inner frame restored");
        assert!(parse(decapsulated.frame.as_slice()).is_ok());
        let c = decap_counters(&h);
        assert_eq!((c["decapsulated"], c["passed"]), (1, 0), "{name}: counted");
    }
}

/// Encapsulated for an address that is not a VIP, or not as the balancer
/// writes it: dropped and counted by reason, never handed to the stack.
#[test]
fn not_a_vip_or_malformed_is_dropped() {
    let mut h = setup(false, Mode::Gue);
    let wrap = |gue: bool| testframe::Wrap {
        src_mac: LB_MAC,
        dst_mac: [2, 0, 0, 0, 0, 0x20],
        outer_src: vec![198, 18, 0, 2],
        outer_dst: vec![198, 18, 0, 20],
        ttl: 64,
        tos: 0,
        gue: gue.then_some((50000, GUE_PORT, None)),
    };
    let to = |dst: [u8; 4]| testframe::build(&FrameSpec::v4_tcp([198, 18, 0, 10], dst, 1000, 80));
    let gue_at = 14 + 20 + 8;
    let good = testframe::encapsulate(&to([198, 18, 100, 1]), &wrap(true));
    let mut bad_version = good.clone();
    bad_version[gue_at] |= 0x40;
    let mut bad_proto = good.clone();
    bad_proto[gue_at + 1] = 41;
    let rows: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "ipip for an address that is not a VIP",
            testframe::encapsulate(&to([198, 18, 100, 2]), &wrap(false)),
            "drop_not_vip",
        ),
        (
            "GUE for an address that is not a VIP",
            testframe::encapsulate(&to([10, 1, 2, 3]), &wrap(true)),
            "drop_not_vip",
        ),
        ("GUE version 1", bad_version, "drop_malformed_outer"),
        (
            "GUE says IPv6, an IPv4 packet follows",
            bad_proto,
            "drop_malformed_inner",
        ),
        (
            "inner header cut off",
            good[..gue_at + 4 + 10].to_vec(),
            "drop_malformed_inner",
        ),
    ];
    for (name, f, counter) in rows {
        let before = decap_counters(&h);
        let out = h.run_program(DECAP_PROGRAM, &f);
        let after = decap_counters(&h);
        assert_eq!(out.verdict, XDP_DROP, "{name}");
        let changed: Vec<_> = after
            .iter()
            .filter(|(k, v)| before[*k] != **v)
            .map(|(k, v)| (*k, v - before[k]))
            .collect();
        assert_eq!(changed, vec![(counter, 1)], "{name}");
    }
}

#[test]
fn everything_else_passes_untouched() {
    let mut h = setup(false, Mode::Ipip);
    let plain = testframe::build(&FrameSpec::v4_tcp([1; 4], [2; 4], 1, 2));
    let mut arp = plain.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut gre = plain.clone();
    gre[23] = 47;
    let frames = [plain, arp, gre, vec![0u8; 14]];
    for f in frames {
        let out = h.run_program(DECAP_PROGRAM, &f);
        assert_eq!(out.verdict, XDP_PASS);
        assert_eq!(out.frame, f);
    }
    // Only what is not encapsulated for us counts as passed.
    assert_eq!(decap_counters(&h)["passed"], 4);
}
