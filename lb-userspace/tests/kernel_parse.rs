//! Kernel tier: the parser inside the real XDP program. Every frame must come
//! back untouched with XDP_PASS (no VIP is configured) and bump exactly one
//! parse outcome and the pass verdict. The parser proper runs behind an open
//! VIP-address filter; one test checks what the empty filter refuses first.

mod kernel;

use kernel::{Harness, XDP_PASS, delta};
use lb_common::{
    parse::IPPROTO_ICMP,
    testframe::{self, FrameSpec, L4},
};

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    outcome: &'static str,
}

fn v4tcp() -> FrameSpec {
    FrameSpec::v4_tcp([198, 18, 0, 10], [198, 18, 100, 1], 40000, 80)
}
fn v4udp() -> FrameSpec {
    FrameSpec::v4_udp([198, 18, 0, 10], [198, 18, 100, 1], 40000, 53)
}
fn v6tcp() -> FrameSpec {
    FrameSpec::v6_tcp(testframe::v6(0x10), testframe::v6_vip(1), 40000, 80)
}
fn v6udp() -> FrameSpec {
    FrameSpec::v6_udp(testframe::v6(0x10), testframe::v6_vip(1), 40000, 53)
}

fn patched(spec: FrameSpec, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut f = testframe::build(&spec);
    f[at..at + bytes.len()].copy_from_slice(bytes);
    f
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
        Case {
            name: "ipv4 tcp",
            frame: testframe::build(&v4tcp()),
            outcome: "parse_tcp",
        },
        Case {
            name: "ipv4 udp",
            frame: testframe::build(&v4udp()),
            outcome: "parse_udp",
        },
        Case {
            name: "ipv6 tcp",
            frame: testframe::build(&v6tcp()),
            outcome: "parse_tcp",
        },
        Case {
            name: "ipv6 udp",
            frame: testframe::build(&v6udp()),
            outcome: "parse_udp",
        },
        Case {
            name: "ipv4 tcp, vlan tag",
            frame: testframe::build(&FrameSpec {
                vlan: Some(100),
                ..v4tcp()
            }),
            outcome: "parse_tcp",
        },
        Case {
            name: "ipv6 udp, vlan tag",
            frame: testframe::build(&FrameSpec {
                vlan: Some(100),
                ..v6udp()
            }),
            outcome: "parse_udp",
        },
        Case {
            name: "ipv4 udp with 40 bytes of options",
            frame: testframe::build(&FrameSpec {
                ipv4_options: 40,
                ..v4udp()
            }),
            outcome: "parse_udp",
        },
        Case {
            name: "icmp",
            frame: testframe::build(&FrameSpec {
                l4: L4::Raw {
                    proto: IPPROTO_ICMP,
                    payload_len: 16,
                },
                ..v4udp()
            }),
            outcome: "parse_other_l4",
        },
        Case {
            name: "arp",
            frame: patched(v4udp(), 12, &[0x08, 0x06]),
            outcome: "parse_not_ip",
        },
        Case {
            name: "ihl 4",
            frame: patched(v4tcp(), 14, &[0x44]),
            outcome: "parse_bad_l3",
        },
        Case {
            name: "ipv4 version 6",
            frame: patched(v4tcp(), 14, &[0x65]),
            outcome: "parse_bad_l3",
        },
        Case {
            name: "ipv4 more-fragments",
            frame: patched(v4udp(), 20, &[0x20, 0x00]),
            outcome: "parse_ipv4_fragment",
        },
        Case {
            name: "ipv4 later fragment",
            frame: patched(v4udp(), 20, &[0x00, 0x10]),
            outcome: "parse_ipv4_fragment",
        },
        Case {
            name: "ipv6 fragment header",
            frame: patched(v6udp(), 20, &[44]),
            outcome: "parse_ipv6_ext_header",
        },
        Case {
            name: "ipv6 hop-by-hop",
            frame: patched(v6tcp(), 20, &[0]),
            outcome: "parse_ipv6_ext_header",
        },
        Case {
            name: "tcp data offset 4",
            frame: patched(v4tcp(), 46, &[0x40]),
            outcome: "parse_bad_l4",
        },
        Case {
            name: "ipv4 total length past the frame",
            frame: patched(v4udp(), 16, &[0x05, 0xdc]),
            outcome: "parse_truncated_l3",
        },
        Case {
            name: "tcp header cut (ip length agrees)",
            frame: testframe::truncate_datagram(&testframe::build(&v4tcp()), 12),
            outcome: "parse_truncated_l4",
        },
        Case {
            name: "udp header cut, ipv6 (ip length agrees)",
            frame: testframe::truncate_datagram(&testframe::build(&v6udp()), 4),
            outcome: "parse_truncated_l4",
        },
    ];
    // Every truncation point of an IPv4 TCP and an IPv6 UDP frame. The kernel
    // refuses test frames shorter than an Ethernet header, so start there.
    for (spec, label) in [(v4tcp(), "ipv4 tcp"), (v6udp(), "ipv6 udp")] {
        let full = testframe::build(&spec);
        for cut in 14..full.len() {
            cases.push(Case {
                name: Box::leak(format!("{label} cut at {cut}").into_boxed_str()),
                frame: full[..cut].to_vec(),
                outcome: "parse_truncated_l3",
            });
        }
    }
    let tagged = testframe::build(&FrameSpec {
        vlan: Some(7),
        ..v4udp()
    });
    cases.push(Case {
        name: "vlan tag cut",
        frame: tagged[..16].to_vec(),
        outcome: "parse_truncated_l2",
    });
    cases
}

/// Sets every bit of the VIP-address filter: every address may be a VIP, so
/// every IP frame gets the full parse (as it does for a VIP's address).
fn open_filter(h: &mut Harness) {
    let mut filter = lb_userspace::maps::VIP_FILTER
        .array_mut(&mut h.ebpf)
        .expect("VIP_FILTER");
    for word in 0..lb_common::vipfilter::FILTER_WORDS {
        filter.set(word, u64::MAX, 0).expect("write VIP_FILTER");
    }
}

/// With no VIP (an empty filter), an IP frame leaves after one read of its
/// destination address: the filter's outcome, not the parser's; what is not
/// IP, or too short to hold the address, still gets the parser's.
#[test]
fn the_empty_filter_refuses_before_the_parse() {
    let mut h = Harness::load();
    for case in &cases() {
        let before = h.counters();
        let out = h.run(&case.frame);
        let d = delta(&before, &h.counters());
        assert_eq!(out.verdict, XDP_PASS, "{}: verdict", case.name);
        assert_eq!(out.frame, case.frame, "{}: frame untouched", case.name);
        let refused = d.get("parse_not_vip_address") == Some(&1);
        if refused {
            let want: std::collections::BTreeMap<_, _> = [
                ("parse_not_vip_address", 1u64),
                ("lb_not_configured", 1),
                ("verdict_pass", 1),
            ]
            .into_iter()
            .collect();
            assert_eq!(d, want, "{}: counter deltas", case.name);
        } else {
            assert!(
                matches!(
                    case.outcome,
                    "parse_not_ip" | "parse_truncated_l2" | "parse_truncated_l3"
                ),
                "{}: {:?} reached the parser past an empty filter",
                case.name,
                d
            );
            assert_eq!(d.get(case.outcome), Some(&1), "{}: {:?}", case.name, d);
        }
    }
}

#[test]
fn every_frame_passes_untouched_and_counts_one_outcome() {
    let mut h = Harness::load();
    open_filter(&mut h);
    let cases = cases();
    for case in &cases {
        let before = h.counters();
        let out = h.run(&case.frame);
        let after = h.counters();
        assert_eq!(out.verdict, XDP_PASS, "{}: verdict", case.name);
        assert_eq!(
            out.frame, case.frame,
            "{}: frame must be untouched",
            case.name
        );
        let d = delta(&before, &after);
        let mut want: std::collections::BTreeMap<_, _> =
            [(case.outcome, 1u64), ("verdict_pass", 1)]
                .into_iter()
                .collect();
        // Parsed packets would go on to the VIP lookup, but nothing has
        // been configured: the program keeps its hands off.
        if matches!(case.outcome, "parse_tcp" | "parse_udp" | "parse_other_l4") {
            want.insert("lb_not_configured", 1);
        }
        assert_eq!(d, want, "{}: counter deltas", case.name);
    }
    assert!(cases.len() > 100, "table shrank: {}", cases.len());
}
