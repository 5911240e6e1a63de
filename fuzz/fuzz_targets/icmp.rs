//! ICMP too-big quotes (`lb_common::icmp::too_big_quote`, which steers a
//! router's error about a reply to the flow's backend): over any frame and
//! any `Parsed`, not only the parser's, it stays within the frame, and what
//! it reads agrees with a reading by byte offsets; and an error quoting a
//! frame `testframe` built names that frame's flow, client and VIP sides
//! swapped back.
#![no_main]

use lb_common::{
    icmp::too_big_quote,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed, parse},
    testframe,
};
use lb_fuzz::{
    Reader,
    frames::{reference_quote, spec_from},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The frame as it arrived.
    if let Ok(p) = parse(data) {
        assert_eq!(too_big_quote(data, &p), reference_quote(data, &p), "{p:?}");
    }

    // Any offset and protocol, as a caller that got `Parsed` wrong would
    // pass them: still no read past the frame.
    let mut r = Reader::new(data);
    let (offset, is_ipv6, any_proto) = (r.below(3), r.bool(), r.u8());
    let p = Parsed {
        l3_offset: 14,
        l4_offset: match offset {
            0 => r.u8() as usize,
            1 => usize::MAX - r.u8() as usize,
            _ => r.u64() as usize,
        },
        is_ipv6,
        proto: r.pick(&[IPPROTO_ICMP, IPPROTO_ICMPV6, any_proto]),
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        has_ip_options: false,
        tos: 0,
        ttl: 64,
    };
    assert_eq!(too_big_quote(data, &p), reference_quote(data, &p), "{p:?}");

    // A router's error about a reply this input describes.
    let reply = spec_from(&mut r);
    let Ok(rp) = reply.expect else { return };
    let offending = testframe::build(&reply.spec);
    let router = r.array::<16>();
    let to = rp.src_addr;
    let error = if rp.is_ipv6 {
        testframe::icmp6_too_big(&offending, router, to, r.u32())
    } else {
        let four = |a: [u8; 16]| [a[0], a[1], a[2], a[3]];
        testframe::icmp_too_big(&offending, four(router), four(to), r.u16())
    };
    let ep = parse(error.as_slice()).expect("a built ICMP error parses");
    let q = too_big_quote(error.as_slice(), &ep);
    if rp.proto == IPPROTO_TCP || rp.proto == IPPROTO_UDP {
        let q = q.expect("a too-big quoting TCP or UDP");
        assert_eq!(
            (q.client, q.vip, q.client_port, q.vip_port, q.proto),
            (rp.dst_addr, rp.src_addr, rp.dst_port, rp.src_port, rp.proto)
        );
    } else {
        assert_eq!(q, None, "quotes proto {}", rp.proto);
    }
});
