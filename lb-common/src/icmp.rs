//! ICMP "fragmentation needed" (v4) and "packet too big" (v6) errors.
//!
//! With DSR the backend sends replies from the VIP, so a router on the way
//! back to the client addresses its too-big error to the VIP, and it arrives
//! at the balancer. It quotes the reply's headers (VIP -> client); reversed,
//! they are the client -> VIP flow, whose backend must get the error or its
//! path MTU discovery stalls.

use crate::{
    packet::PacketBytes,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed, v4_in_16},
    wire::{Header, ipv4::Ipv4Hdr, ipv6::Ipv6Hdr},
};

pub const ICMP_HDR_LEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for IcmpHdr {}

/// First 4 bytes of the quoted L4 header: the ports of TCP and UDP alike.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct QuotedPorts {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for QuotedPorts {}

/// The client -> VIP flow an ICMP too-big error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotedFlow {
    pub client: [u8; 16],
    pub vip: [u8; 16],
    pub client_port: u16,
    pub vip_port: u16,
    pub proto: u8,
}

/// `Some` when `parsed` is an ICMP too-big error quoting a TCP/UDP packet of
/// the same IP family.
#[inline(always)]
pub fn too_big_quote<P: PacketBytes + ?Sized>(pkt: &P, parsed: &Parsed) -> Option<QuotedFlow> {
    let icmp: &IcmpHdr = pkt.header(parsed.l4_offset)?;
    let inner = parsed.l4_offset + ICMP_HDR_LEN;
    let (mut flow, ports_at) = if parsed.is_ipv6 {
        if parsed.proto != IPPROTO_ICMPV6 || icmp.icmp_type != ICMPV6_PKT_TOOBIG {
            return None;
        }
        let ip: &Ipv6Hdr = pkt.header(inner)?;
        let flow = QuotedFlow {
            client: ip.dst,
            vip: ip.src,
            client_port: 0,
            vip_port: 0,
            proto: ip.next_header,
        };
        (flow, inner + 40)
    } else {
        if parsed.proto != IPPROTO_ICMP
            || icmp.icmp_type != ICMP_DEST_UNREACH
            || icmp.code != ICMP_FRAG_NEEDED
        {
            return None;
        }
        let ip: &Ipv4Hdr = pkt.header(inner)?;
        let hl = ip.header_len();
        if hl < 20 {
            return None;
        }
        let flow = QuotedFlow {
            client: v4_in_16(ip.dst),
            vip: v4_in_16(ip.src),
            client_port: 0,
            vip_port: 0,
            proto: ip.proto,
        };
        (flow, inner + hl)
    };
    if flow.proto != IPPROTO_TCP && flow.proto != IPPROTO_UDP {
        return None;
    }
    let ports: &QuotedPorts = pkt.header(ports_at)?;
    flow.vip_port = u16::from_be_bytes(ports.src);
    flow.client_port = u16::from_be_bytes(ports.dst);
    Some(flow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse::parse, testframe};

    #[test]
    fn v4_frag_needed_quoting_a_reply() {
        // The backend's reply VIP:80 -> client:40000 that was too big.
        let reply = testframe::build(&testframe::FrameSpec::v4_tcp(
            [198, 18, 100, 1],
            [198, 18, 0, 10],
            80,
            40000,
        ));
        let frame = testframe::icmp_too_big(&reply, [198, 18, 0, 1], [198, 18, 100, 1], 1400);
        let parsed = parse(frame.as_slice()).unwrap();
        let q = too_big_quote(frame.as_slice(), &parsed).unwrap();
        assert_eq!(&q.client[..4], &[198, 18, 0, 10]);
        assert_eq!(&q.vip[..4], &[198, 18, 100, 1]);
        assert_eq!(
            (q.client_port, q.vip_port, q.proto),
            (40000, 80, IPPROTO_TCP)
        );
    }

    #[test]
    fn v6_packet_too_big() {
        let reply = testframe::build(&testframe::FrameSpec::v6_udp(
            testframe::v6_vip(1),
            testframe::v6(0x10),
            53,
            5353,
        ));
        let frame = testframe::icmp6_too_big(&reply, testframe::v6(1), testframe::v6_vip(1), 1280);
        let parsed = parse(frame.as_slice()).unwrap();
        let q = too_big_quote(frame.as_slice(), &parsed).unwrap();
        assert_eq!(q.client, testframe::v6(0x10));
        assert_eq!(
            (q.client_port, q.vip_port, q.proto),
            (5353, 53, IPPROTO_UDP)
        );
    }

    #[test]
    fn other_icmp_is_not_a_quote() {
        let reply = testframe::build(&testframe::FrameSpec::v4_tcp([1; 4], [2; 4], 80, 1));
        let mut frame = testframe::icmp_too_big(&reply, [3; 4], [1; 4], 1400);
        frame[34 + 1] = 1; // host unreachable
        let parsed = parse(frame.as_slice()).unwrap();
        assert_eq!(too_big_quote(frame.as_slice(), &parsed), None);
    }
}
