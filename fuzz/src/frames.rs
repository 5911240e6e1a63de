//! Frames for the parser and ICMP targets: a description decoded from fuzz
//! bytes that `lb_common::testframe` serialises, and reference readings of
//! a frame written from the wire formats (byte offsets, not the wire
//! structs the parser uses), so that a parser change that reads the wrong
//! bytes disagrees with them.

use lb_common::{
    icmp::QuotedFlow,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed, v4_in_16},
    stats::Counter,
    testframe::{self, FrameSpec, L4},
    wire::ipv6::is_extension_header,
};

use crate::Reader;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize, v6: bool) -> [u8; 16] {
    if v6 {
        b[at..at + 16].try_into().expect("16 bytes")
    } else {
        v4_in_16(b[at..at + 4].try_into().expect("4 bytes"))
    }
}

/// The parser's contract (`lb_common::parse` and the counters' docs),
/// restated over plain byte offsets.
pub fn reference_parse(f: &[u8]) -> Result<Parsed, Counter> {
    if f.len() < 14 {
        return Err(Counter::ParseTruncatedL2);
    }
    let (mut ether_type, mut l3) = (be16(f, 12), 14);
    // One tag, 802.1Q or 802.1ad; a second one is not looked into.
    if ether_type == 0x8100 || ether_type == 0x88a8 {
        if f.len() < 18 {
            return Err(Counter::ParseTruncatedL2);
        }
        ether_type = be16(f, 16);
        l3 = 18;
    }
    let (v6, l4, l4_len) = match ether_type {
        0x0800 => {
            if f.len() < l3 + 20 {
                return Err(Counter::ParseTruncatedL3);
            }
            let ihl = (f[l3] & 0x0f) as usize * 4;
            let total = be16(f, l3 + 2) as usize;
            if f[l3] >> 4 != 4 || ihl < 20 || total < ihl {
                return Err(Counter::ParseBadL3);
            }
            if l3 + total > f.len() {
                return Err(Counter::ParseTruncatedL3);
            }
            // More Fragments or a fragment offset: any piece of a datagram.
            if be16(f, l3 + 6) & 0x3fff != 0 {
                return Err(Counter::ParseIpv4Fragment);
            }
            (false, l3 + ihl, total - ihl)
        }
        0x86dd => {
            if f.len() < l3 + 40 {
                return Err(Counter::ParseTruncatedL3);
            }
            let payload = be16(f, l3 + 4) as usize;
            if f[l3] >> 4 != 6 {
                return Err(Counter::ParseBadL3);
            }
            if l3 + 40 + payload > f.len() {
                return Err(Counter::ParseTruncatedL3);
            }
            if is_extension_header(f[l3 + 6]) {
                return Err(Counter::ParseIpv6ExtHeader);
            }
            (true, l3 + 40, payload)
        }
        _ => return Err(Counter::ParseNotIp),
    };
    let proto = if v6 { f[l3 + 6] } else { f[l3 + 9] };
    let (src_at, dst_at) = if v6 {
        (l3 + 8, l3 + 24)
    } else {
        (l3 + 12, l3 + 16)
    };
    let mut p = Parsed {
        l3_offset: l3,
        l4_offset: l4,
        is_ipv6: v6,
        proto,
        src_addr: addr(f, src_at, v6),
        dst_addr: addr(f, dst_at, v6),
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        has_ip_options: l4 - l3 > 20 && !v6,
        tos: if v6 {
            f[l3] << 4 | f[l3 + 1] >> 4
        } else {
            f[l3 + 1]
        },
        ttl: if v6 { f[l3 + 7] } else { f[l3 + 8] },
    };
    match proto {
        IPPROTO_TCP => {
            if l4_len < 20 {
                return Err(Counter::ParseTruncatedL4);
            }
            let doff = (f[l4 + 12] >> 4) as usize * 4;
            if doff < 20 || doff > l4_len {
                return Err(Counter::ParseBadL4);
            }
            p.tcp_flags = f[l4 + 13];
        }
        IPPROTO_UDP => {
            if l4_len < 8 {
                return Err(Counter::ParseTruncatedL4);
            }
        }
        _ => return Ok(p),
    }
    p.src_port = be16(f, l4);
    p.dst_port = be16(f, l4 + 2);
    Ok(p)
}

/// What an ICMP too-big error in `f` quotes, read by offsets from
/// `p.l4_offset` (RFC 792 / RFC 4443: an 8-byte ICMP header, then the
/// offending packet's IP header and the start of its L4 header).
pub fn reference_quote(f: &[u8], p: &Parsed) -> Option<QuotedFlow> {
    let l4 = p.l4_offset;
    let icmp = f.get(l4..l4.checked_add(8)?)?;
    let inner = l4 + 8;
    let (proto, client, vip, ports_at) = if p.is_ipv6 {
        if p.proto != IPPROTO_ICMPV6 || icmp[0] != 2 {
            return None;
        }
        let ip = f.get(inner..inner + 40)?;
        (ip[6], addr(ip, 24, true), addr(ip, 8, true), inner + 40)
    } else {
        if p.proto != IPPROTO_ICMP || icmp[0] != 3 || icmp[1] != 4 {
            return None;
        }
        let ip = f.get(inner..inner + 20)?;
        let ihl = (ip[0] & 0x0f) as usize * 4;
        if ihl < 20 {
            return None;
        }
        (ip[9], addr(ip, 16, false), addr(ip, 12, false), inner + ihl)
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let ports = f.get(ports_at..ports_at + 4)?;
    // The quote is the reply (VIP -> client): its source port is the VIP's.
    Some(QuotedFlow {
        client,
        vip,
        client_port: be16(ports, 2),
        vip_port: be16(ports, 0),
        proto,
    })
}

/// A frame `testframe` can build, and what parsing it must give.
pub struct BuiltFrame {
    pub spec: FrameSpec,
    pub expect: Result<Parsed, Counter>,
}

/// A valid frame description from fuzz bytes: either family, a VLAN tag or
/// not, IPv4 options, TCP with any flags, UDP, or another protocol.
pub fn spec_from(r: &mut Reader) -> BuiltFrame {
    let v6 = r.bool();
    let vlan = r.bool().then(|| r.u16() & 0x0fff);
    let (src, dst) = if v6 {
        (r.array::<16>().to_vec(), r.array::<16>().to_vec())
    } else {
        (r.array::<4>().to_vec(), r.array::<4>().to_vec())
    };
    let options = if v6 { 0 } else { 4 * r.below(11) };
    let (ttl, tos) = (r.u8(), r.u8());
    let l4 = match r.below(3) {
        0 => L4::Tcp {
            src_port: r.u16(),
            dst_port: r.u16(),
            flags: r.u8(),
        },
        1 => L4::Udp {
            src_port: r.u16(),
            dst_port: r.u16(),
        },
        _ => {
            // A raw payload under the TCP or UDP number would be a short
            // header, which the truncation cases cover.
            let proto = match r.u8() {
                p @ (IPPROTO_TCP | IPPROTO_UDP) => p ^ 0x80,
                p => p,
            };
            L4::Raw {
                proto,
                payload_len: r.below(64),
            }
        }
    };
    let payload = r.bytes(255);
    let l3 = if vlan.is_some() { 18 } else { 14 };
    let l4_offset = l3 + if v6 { 40 } else { 20 + options };
    let (proto, src_port, dst_port, tcp_flags) = match l4 {
        L4::Tcp {
            src_port,
            dst_port,
            flags,
        } => (IPPROTO_TCP, src_port, dst_port, flags),
        L4::Udp { src_port, dst_port } => (IPPROTO_UDP, src_port, dst_port, 0),
        L4::Raw { proto, .. } => (proto, 0, 0, 0),
    };
    let to16 = |a: &[u8]| addr(a, 0, v6);
    let expect = if v6 && is_extension_header(proto) {
        Err(Counter::ParseIpv6ExtHeader)
    } else {
        Ok(Parsed {
            l3_offset: l3,
            l4_offset,
            is_ipv6: v6,
            proto,
            src_addr: to16(&src),
            dst_addr: to16(&dst),
            src_port,
            dst_port,
            tcp_flags,
            has_ip_options: options > 0,
            tos,
            ttl,
        })
    };
    let spec = FrameSpec {
        src_mac: testframe::CLIENT_MAC,
        dst_mac: testframe::LB_MAC,
        vlan,
        src_ip: src,
        dst_ip: dst,
        ttl,
        tos,
        ipv4_options: options,
        l4,
        payload,
    };
    BuiltFrame { spec, expect }
}
