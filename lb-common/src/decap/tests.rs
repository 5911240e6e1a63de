//! The decapsulator's reading of frames, one row per case.

use super::*;
use crate::testframe::{self, FrameSpec, Wrap, encapsulate};
use std::vec::Vec;

const PORT: u16 = 6080;
const VIP4: [u8; 4] = [198, 18, 100, 1];

fn client4(flags: u8) -> Vec<u8> {
    let mut s = FrameSpec::v4_tcp([198, 18, 0, 10], VIP4, 40000, 80);
    s.l4 = testframe::L4::Tcp {
        src_port: 40000,
        dst_port: 80,
        flags,
    };
    testframe::build(&s)
}

fn client6() -> Vec<u8> {
    testframe::build(&FrameSpec::v6_tcp(
        testframe::v6(10),
        testframe::v6_vip(1),
        40000,
        80,
    ))
}

fn wrap(outer_v6: bool, gue: Gue) -> Wrap {
    let (src, dst) = if outer_v6 {
        (testframe::v6(2).to_vec(), testframe::v6(0x20).to_vec())
    } else {
        (vec![198, 18, 0, 2], vec![198, 18, 0, 20])
    };
    Wrap {
        src_mac: testframe::LB_MAC,
        dst_mac: [2, 0, 0, 0, 0, 0x20],
        outer_src: src,
        outer_dst: dst,
        ttl: 64,
        tos: 0,
        gue,
    }
}

fn encap_of(f: &[u8]) -> Encap {
    match outer(f, PORT) {
        Outer::Encap(e) => e,
        o => panic!("not encapsulated: {o:?}"),
    }
}

/// GUE's `(source port, destination port, second hop)`; `None`: IPIP.
type Gue = Option<(u16, u16, Option<Vec<u8>>)>;
/// What, inner frame, outer IPv6, GUE, inner offset, second-hop offset.
type Row = (&'static str, Vec<u8>, bool, Gue, usize, Option<usize>);

#[test]
fn every_family_combination_is_read() {
    let hop4 = Some(vec![198u8, 18, 0, 21]);
    let hop6 = Some(testframe::v6(0x21).to_vec());
    let rows: Vec<Row> = vec![
        ("ipip 4in4", client4(0x10), false, None, 34, None),
        ("ipip 6in6", client6(), true, None, 54, None),
        ("ipip 6in4", client6(), false, None, 34, None),
        (
            "gue 4in4",
            client4(0x10),
            false,
            Some((50000, PORT, None)),
            46,
            None,
        ),
        (
            "gue 6in6",
            client6(),
            true,
            Some((50000, PORT, None)),
            66,
            None,
        ),
        (
            "gue 6in4",
            client6(),
            false,
            Some((50000, PORT, None)),
            46,
            None,
        ),
        (
            "gue 4in4 hop",
            client4(0x10),
            false,
            Some((50000, PORT, hop4.clone())),
            66,
            Some(46),
        ),
        (
            "gue 6in6 hop",
            client6(),
            true,
            Some((50000, PORT, hop6.clone())),
            86,
            Some(66),
        ),
        (
            "gue 6in4 hop",
            client6(),
            false,
            Some((50000, PORT, hop4)),
            66,
            Some(46),
        ),
    ];
    for (what, inner_frame, v6, gue, inner_off, hop) in rows {
        let inner_v6 = inner_frame[12..14] == [0x86, 0xdd];
        let f = encapsulate(&inner_frame, &wrap(v6, gue.clone()));
        let e = encap_of(&f);
        assert_eq!(e.outer_v6, v6, "{what}");
        assert_eq!(e.gue, gue.is_some(), "{what}");
        assert_eq!(e.inner_offset, inner_off, "{what}");
        assert_eq!(e.inner_v6, inner_v6, "{what}");
        assert_eq!(e.second_hop, hop, "{what}");
        let i = inner(&f[..], &e).unwrap_or_else(|| panic!("{what}: inner"));
        assert_eq!(i.vip.family, if inner_v6 { 6 } else { 4 }, "{what}");
        assert_eq!(&f[inner_off..], &inner_frame[14..], "{what}: the datagram");
    }
}

#[test]
fn what_is_not_ours_is_left_alone() {
    // Plain TCP to the backend, UDP to another port, GUE while GUE is off.
    let plain = client4(0x10);
    assert_eq!(outer(&plain[..], PORT), Outer::NotOurs);
    let other = encapsulate(&client4(0x10), &wrap(false, Some((50000, 6081, None))));
    assert_eq!(outer(&other[..], PORT), Outer::NotOurs);
    let gue = encapsulate(&client4(0x10), &wrap(false, Some((50000, PORT, None))));
    assert_eq!(outer(&gue[..], 0), Outer::NotOurs);
    assert_eq!(outer(&plain[..10], PORT), Outer::NotOurs, "runt");
}

#[test]
fn gue_we_do_not_write_is_malformed() {
    let good = encapsulate(&client4(0x10), &wrap(false, Some((50000, PORT, None))));
    let gue_at = 14 + 20 + 8;
    let hop = encapsulate(
        &client4(0x10),
        &wrap(false, Some((50000, PORT, Some(vec![198, 18, 0, 21])))),
    );
    let rows: Vec<(&str, Vec<u8>)> = vec![
        ("version 1", {
            let mut f = good.clone();
            f[gue_at] |= 0x40;
            f
        }),
        ("control", {
            let mut f = good.clone();
            f[gue_at] |= 0x20;
            f
        }),
        ("a flag", {
            let mut f = good.clone();
            f[gue_at + 2] = 0x80;
            f
        }),
        ("proto 17", {
            let mut f = good.clone();
            f[gue_at + 1] = 17;
            f
        }),
        ("hlen 2", {
            let mut f = good.clone();
            f[gue_at] = 2;
            f
        }),
        ("second hop kind 2", {
            let mut f = hop.clone();
            f[gue_at + 4] = 2;
            f
        }),
        ("IPv6 second hop in IPv4", {
            let mut f = hop.clone();
            f[gue_at + 5] = 6;
            f
        }),
        ("GUE header cut off", good[..gue_at + 2].to_vec()),
    ];
    for (what, f) in rows {
        assert_eq!(outer(&f[..], PORT), Outer::Malformed, "{what}");
    }
}

#[test]
fn inner_header_must_match_the_outer() {
    // The GUE header says IPv6 but an IPv4 packet follows; a cut-off inner.
    let mut f = encapsulate(&client4(0x10), &wrap(false, Some((50000, PORT, None))));
    f[14 + 20 + 8 + 1] = 41;
    let e = encap_of(&f);
    assert_eq!(inner(&f[..], &e), None);
    let f = encapsulate(&client4(0x10), &wrap(false, None));
    let e = encap_of(&f);
    assert_eq!(inner(&f[..e.inner_offset + 30], &e), None, "TCP header cut");
}

#[test]
fn which_packets_may_start_a_connection() {
    for (flags, new, cookie) in [
        (0x02, true, false),  // SYN
        (0x12, false, false), // SYN-ACK
        (0x10, false, true),  // ACK: maybe a cookie's
        (0x18, false, true),  // PSH-ACK
        (0x11, false, true),  // FIN-ACK
        (0x04, false, false), // RST
    ] {
        let f = encapsulate(&client4(flags), &wrap(false, None));
        let e = encap_of(&f);
        let i = inner(&f[..], &e).unwrap();
        assert_eq!(i.is_new_or_not_tcp(), new, "flags {flags:#x}");
        assert_eq!(i.maybe_cookie_ack(), cookie, "flags {flags:#x}");
        assert_eq!(i.tcp_flags, Some(flags));
        assert_eq!(i.vip.addr[..4], VIP4);
    }
    let udp = testframe::build(&FrameSpec::v4_udp([198, 18, 0, 10], VIP4, 4000, 53));
    let f = encapsulate(&udp, &wrap(false, None));
    let e = encap_of(&f);
    assert!(inner(&f[..], &e).unwrap().is_new_or_not_tcp());
}
