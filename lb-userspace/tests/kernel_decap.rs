//! Kernel tier: the backends' decapsulator turns what the balancer sends back
//! into the client's original datagram, and leaves everything else alone.

mod kernel;

use kernel::{Harness, XDP_PASS, XDP_TX};
use lb_common::{
    maps::{BackendInfo, BackendState, Family, LbConfig, Mode, VipKey},
    parse::{IPPROTO_TCP, IPPROTO_UDP, parse},
    testframe::{self, FrameSpec, LB_MAC},
};
use lb_userspace::{
    dataplane::{DECAP_PROGRAM, MapSizes},
    programming,
};

const M: u32 = 7;

fn setup(backend_v6: bool) -> Harness {
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
            programming::install_vip(&mut h.ebpf, &key, vip_id, Mode::Ipip, &[1; M as usize])
                .unwrap();
        }
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
    for (name, backend_v6, spec) in cases {
        let mut h = setup(backend_v6);
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
    }
}

#[test]
fn everything_else_passes_untouched() {
    let mut h = setup(false);
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
}
