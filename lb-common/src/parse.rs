//! From raw frame to the fields the balancer decides on.
//!
//! One pass, no loops: Ethernet, at most one VLAN tag, IPv4 (honouring IHL)
//! or IPv6 (without walking extension headers), then TCP/UDP ports. Any other
//! L4 protocol parses successfully with ports zero, so callers can still look
//! at it (ICMP errors, for instance).

use crate::{
    maps::{Family, FlowKey},
    packet::PacketBytes,
    stats::Counter,
    wire::{
        ethernet::{
            ETH_HDR_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, EthHdr, VLAN_HDR_LEN, VlanHdr,
            is_vlan_tpid,
        },
        ipv4::{IPV4_MIN_HDR_LEN, Ipv4Hdr},
        ipv6::{IPV6_HDR_LEN, Ipv6Hdr, is_extension_header},
        tcp::{TCP_MIN_HDR_LEN, TcpHdr},
        udp::UdpHdr,
    },
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IPv4 address in the 16-byte form used throughout (first 4 bytes).
/// Spelled out element by element: a zero-filled array plus a copy makes
/// LLVM call `memset`, which in BPF is a slow byte loop.
#[inline(always)]
pub const fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub is_ipv6: bool,
    /// L4 protocol number (IPv4 protocol / IPv6 next header).
    pub proto: u8,
    /// Addresses as 16 bytes; IPv4 addresses fill the first 4, the rest is 0.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Zero unless `proto` is TCP or UDP.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte; zero for other protocols.
    pub tcp_flags: u8,
    /// IPv4 header carries options (IHL > 5).
    pub has_ip_options: bool,
    /// DSCP/ECN byte (IPv4 TOS, IPv6 traffic class).
    pub tos: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
}

impl Parsed {
    /// The parse-outcome counter for a packet that parsed.
    #[inline(always)]
    pub const fn counter(&self) -> Counter {
        match self.proto {
            IPPROTO_TCP => Counter::ParseTcp,
            IPPROTO_UDP => Counter::ParseUdp,
            _ => Counter::ParseOtherL4,
        }
    }

    /// The packet's flow, as the connection table keys it.
    #[inline(always)]
    pub const fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: self.src_addr,
            dst: self.dst_addr,
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
            family: Family::of(self.is_ipv6).wire(),
            _pad: [0; 2],
        }
    }
}

/// Parses `pkt`; the error is the parse-outcome counter that explains why the
/// packet has no usable 5-tuple.
#[inline(always)]
pub fn parse<P: PacketBytes + ?Sized>(pkt: &P) -> Result<Parsed, Counter> {
    let l2 = parse_l2(pkt)?;
    parse_l3(pkt, l2)
}

/// What the link layer says: the ether type and where its payload starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2 {
    pub ether_type: u16,
    pub l3_offset: usize,
}

/// The Ethernet header and at most one VLAN tag (the first half of
/// [`parse`], for callers that look at the IP header before the rest).
#[inline(always)]
pub fn parse_l2<P: PacketBytes + ?Sized>(pkt: &P) -> Result<L2, Counter> {
    let eth: &EthHdr = pkt.header(0).ok_or(Counter::ParseTruncatedL2)?;
    let mut ether_type = eth.ether_type();
    let mut l3_offset = ETH_HDR_LEN;
    if is_vlan_tpid(ether_type) {
        let vlan: &VlanHdr = pkt.header(ETH_HDR_LEN).ok_or(Counter::ParseTruncatedL2)?;
        ether_type = vlan.ether_type();
        l3_offset += VLAN_HDR_LEN;
    }
    Ok(L2 {
        ether_type,
        l3_offset,
    })
}

/// The rest of [`parse`] after [`parse_l2`].
#[inline(always)]
pub fn parse_l3<P: PacketBytes + ?Sized>(pkt: &P, l2: L2) -> Result<Parsed, Counter> {
    let L2 {
        ether_type,
        l3_offset,
    } = l2;
    match ether_type {
        ETHERTYPE_IPV4 => parse_ipv4(pkt, l3_offset),
        ETHERTYPE_IPV6 => parse_ipv6(pkt, l3_offset),
        _ => Err(Counter::ParseNotIp),
    }
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(pkt: &P, l3_offset: usize) -> Result<Parsed, Counter> {
    let ip: &Ipv4Hdr = pkt.header(l3_offset).ok_or(Counter::ParseTruncatedL3)?;
    if ip.version() != 4 {
        return Err(Counter::ParseBadL3);
    }
    let header_len = ip.header_len();
    let total_len = ip.total_len() as usize;
    if header_len < IPV4_MIN_HDR_LEN || total_len < header_len {
        return Err(Counter::ParseBadL3);
    }
    // Ethernet may pad short frames, so only a frame shorter than the datagram
    // is wrong.
    if l3_offset + total_len > pkt.len() {
        return Err(Counter::ParseTruncatedL3);
    }
    if ip.is_fragment() {
        return Err(Counter::ParseIpv4Fragment);
    }
    let parsed = Parsed {
        l3_offset,
        l4_offset: l3_offset + header_len,
        is_ipv6: false,
        proto: ip.proto,
        src_addr: v4_in_16(ip.src),
        dst_addr: v4_in_16(ip.dst),
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        has_ip_options: header_len > IPV4_MIN_HDR_LEN,
        tos: ip.tos,
        ttl: ip.ttl,
    };
    let l4_len = total_len - header_len;
    parse_l4(pkt, parsed, l4_len)
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(pkt: &P, l3_offset: usize) -> Result<Parsed, Counter> {
    let ip: &Ipv6Hdr = pkt.header(l3_offset).ok_or(Counter::ParseTruncatedL3)?;
    if ip.version() != 6 {
        return Err(Counter::ParseBadL3);
    }
    let payload_len = ip.payload_len() as usize;
    if l3_offset + IPV6_HDR_LEN + payload_len > pkt.len() {
        return Err(Counter::ParseTruncatedL3);
    }
    if is_extension_header(ip.next_header) {
        return Err(Counter::ParseIpv6ExtHeader);
    }
    let parsed = Parsed {
        l3_offset,
        l4_offset: l3_offset + IPV6_HDR_LEN,
        is_ipv6: true,
        proto: ip.next_header,
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        has_ip_options: false,
        tos: ip.traffic_class(),
        ttl: ip.hop_limit,
    };
    parse_l4(pkt, parsed, payload_len)
}

/// `l4_len` is what the IP header says the L4 segment spans; the frame may be
/// longer (padding) but never shorter, which the callers checked.
#[inline(always)]
fn parse_l4<P: PacketBytes + ?Sized>(
    pkt: &P,
    mut parsed: Parsed,
    l4_len: usize,
) -> Result<Parsed, Counter> {
    match parsed.proto {
        IPPROTO_TCP => {
            if l4_len < TCP_MIN_HDR_LEN {
                return Err(Counter::ParseTruncatedL4);
            }
            let tcp: &TcpHdr = pkt
                .header(parsed.l4_offset)
                .ok_or(Counter::ParseTruncatedL4)?;
            let tcp_len = tcp.header_len();
            if tcp_len < TCP_MIN_HDR_LEN || tcp_len > l4_len {
                return Err(Counter::ParseBadL4);
            }
            parsed.src_port = tcp.src_port();
            parsed.dst_port = tcp.dst_port();
            parsed.tcp_flags = tcp.flags;
        }
        IPPROTO_UDP => {
            if l4_len < core::mem::size_of::<UdpHdr>() {
                return Err(Counter::ParseTruncatedL4);
            }
            let udp: &UdpHdr = pkt
                .header(parsed.l4_offset)
                .ok_or(Counter::ParseTruncatedL4)?;
            parsed.src_port = udp.src_port();
            parsed.dst_port = udp.dst_port();
        }
        _ => {}
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testframe::{self, FrameSpec, L4};

    fn parse_bytes(b: &[u8]) -> Result<Parsed, Counter> {
        parse(b)
    }

    #[test]
    fn ipv4_tcp() {
        let f = testframe::build(&FrameSpec::v4_tcp(
            [198, 18, 0, 1],
            [198, 18, 100, 1],
            40000,
            80,
        ));
        let p = parse_bytes(&f).unwrap();
        assert_eq!(p.counter(), Counter::ParseTcp);
        assert_eq!((p.src_port, p.dst_port), (40000, 80));
        assert_eq!(&p.dst_addr[..4], &[198, 18, 100, 1]);
        assert_eq!(&p.dst_addr[4..], &[0; 12]);
        assert_eq!(p.l4_offset, 34);
        assert_eq!(p.tcp_flags, crate::wire::tcp::TCP_SYN);
    }

    #[test]
    fn ipv4_udp_with_vlan_and_options() {
        let mut spec = FrameSpec::v4_udp([198, 18, 0, 1], [198, 18, 100, 1], 5353, 53);
        spec.vlan = Some(42);
        spec.ipv4_options = 8;
        let f = testframe::build(&spec);
        let p = parse_bytes(&f).unwrap();
        assert_eq!(p.counter(), Counter::ParseUdp);
        assert_eq!(p.l3_offset, 18);
        assert_eq!(p.l4_offset, 18 + 28);
        assert!(p.has_ip_options);
        assert_eq!((p.src_port, p.dst_port), (5353, 53));
    }

    #[test]
    fn ipv6_tcp_and_udp() {
        let src = testframe::v6(0x1);
        let dst = testframe::v6_vip(0x1);
        let f = testframe::build(&FrameSpec::v6_tcp(src, dst, 1234, 443));
        let p = parse_bytes(&f).unwrap();
        assert!(p.is_ipv6);
        assert_eq!(p.counter(), Counter::ParseTcp);
        assert_eq!(p.dst_addr, dst);
        assert_eq!(p.l4_offset, 54);
        let f = testframe::build(&FrameSpec::v6_udp(src, dst, 1234, 53));
        assert_eq!(parse_bytes(&f).unwrap().counter(), Counter::ParseUdp);
    }

    #[test]
    fn other_protocols_parse_without_ports() {
        let mut spec = FrameSpec::v4_udp([198, 18, 0, 1], [198, 18, 100, 1], 1, 2);
        spec.l4 = L4::Raw {
            proto: IPPROTO_ICMP,
            payload_len: 8,
        };
        let p = parse_bytes(&testframe::build(&spec)).unwrap();
        assert_eq!(p.counter(), Counter::ParseOtherL4);
        assert_eq!((p.src_port, p.dst_port), (0, 0));
    }

    #[test]
    fn not_ip() {
        let mut f = testframe::build(&FrameSpec::v4_udp([1; 4], [2; 4], 1, 2));
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse_bytes(&f), Err(Counter::ParseNotIp));
        // A VLAN-tagged ARP is not IP either.
        let mut spec = FrameSpec::v4_udp([1; 4], [2; 4], 1, 2);
        spec.vlan = Some(7);
        let mut f = testframe::build(&spec);
        f[16..18].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse_bytes(&f), Err(Counter::ParseNotIp));
    }

    /// Every prefix of a valid frame must fail with the counter of the layer
    /// it cuts into, and never parse.
    #[test]
    fn every_truncation_point() {
        let cases = [
            (FrameSpec::v4_tcp([1; 4], [2; 4], 1, 2), 14usize, 20usize),
            (FrameSpec::v4_udp([1; 4], [2; 4], 1, 2), 14, 20),
            (FrameSpec::v6_tcp([1; 16], [2; 16], 1, 2), 14, 40),
            (FrameSpec::v6_udp([1; 16], [2; 16], 1, 2), 14, 40),
            (
                FrameSpec {
                    vlan: Some(5),
                    ..FrameSpec::v4_tcp([1; 4], [2; 4], 1, 2)
                },
                18,
                20,
            ),
        ];
        for (spec, l2_len, l3_hdr_len) in cases {
            let full = testframe::build(&spec);
            assert!(parse_bytes(&full).is_ok());
            for cut in 0..full.len() {
                let got = parse_bytes(&full[..cut]);
                let want = if cut < l2_len {
                    Counter::ParseTruncatedL2
                } else if cut < l2_len + l3_hdr_len {
                    Counter::ParseTruncatedL3
                } else {
                    // The IP header fits, but the length it announces does not.
                    Counter::ParseTruncatedL3
                };
                assert_eq!(got, Err(want), "{spec:?} cut at {cut}");
            }
        }
    }

    /// L4 truncation that the IP length agrees with (a short datagram that
    /// claims to be TCP/UDP).
    #[test]
    fn l4_shorter_than_its_header() {
        for (spec, hdr) in [
            (FrameSpec::v4_tcp([1; 4], [2; 4], 1, 2), 20),
            (FrameSpec::v4_udp([1; 4], [2; 4], 1, 2), 8),
            (FrameSpec::v6_tcp([1; 16], [2; 16], 1, 2), 20),
            (FrameSpec::v6_udp([1; 16], [2; 16], 1, 2), 8),
        ] {
            for l4_len in 0..hdr {
                let f = testframe::truncate_datagram(&testframe::build(&spec), l4_len);
                assert_eq!(
                    parse_bytes(&f),
                    Err(Counter::ParseTruncatedL4),
                    "{spec:?} l4_len {l4_len}"
                );
            }
        }
    }

    #[test]
    fn bad_ipv4_headers() {
        let good = testframe::build(&FrameSpec::v4_tcp([1; 4], [2; 4], 1, 2));
        for ihl in 0..5u8 {
            let mut f = good.clone();
            f[14] = 0x40 | ihl;
            assert_eq!(parse_bytes(&f), Err(Counter::ParseBadL3), "ihl {ihl}");
        }
        // IHL larger than the frame.
        let mut f = good.clone();
        f[14] = 0x4f;
        assert!(matches!(
            parse_bytes(&f),
            Err(Counter::ParseBadL3 | Counter::ParseTruncatedL3)
        ));
        // Version 6 inside an IPv4 ether type.
        let mut f = good.clone();
        f[14] = 0x65;
        assert_eq!(parse_bytes(&f), Err(Counter::ParseBadL3));
        // Total length below the header length.
        let mut f = good.clone();
        f[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(parse_bytes(&f), Err(Counter::ParseBadL3));
        // Total length beyond the frame.
        let mut f = good.clone();
        f[16..18].copy_from_slice(&1500u16.to_be_bytes());
        assert_eq!(parse_bytes(&f), Err(Counter::ParseTruncatedL3));
        // Bad IPv6 version.
        let mut f = testframe::build(&FrameSpec::v6_udp([1; 16], [2; 16], 1, 2));
        f[14] = 0x40;
        assert_eq!(parse_bytes(&f), Err(Counter::ParseBadL3));
    }

    #[test]
    fn bad_tcp_data_offset() {
        let good = testframe::build(&FrameSpec::v4_tcp([1; 4], [2; 4], 1, 2));
        for doff in [0u8, 4, 7, 15] {
            let mut f = good.clone();
            f[34 + 12] = doff << 4;
            assert_eq!(parse_bytes(&f), Err(Counter::ParseBadL4), "doff {doff}");
        }
    }

    #[test]
    fn ipv4_fragments() {
        let good = testframe::build(&FrameSpec::v4_udp([1; 4], [2; 4], 1, 2));
        for field in [0x2000u16, 0x0001, 0x2010, 0x1fff] {
            let mut f = good.clone();
            f[20..22].copy_from_slice(&field.to_be_bytes());
            assert_eq!(
                parse_bytes(&f),
                Err(Counter::ParseIpv4Fragment),
                "{field:#x}"
            );
        }
        // Don't Fragment alone is not a fragment.
        let mut f = good.clone();
        f[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
        assert!(parse_bytes(&f).is_ok());
    }

    #[test]
    fn ipv6_extension_headers_are_not_followed() {
        for nh in [0u8, 43, 44, 50, 51, 60, 135, 139, 140] {
            let mut f = testframe::build(&FrameSpec::v6_udp([1; 16], [2; 16], 1, 2));
            f[14 + 6] = nh;
            assert_eq!(parse_bytes(&f), Err(Counter::ParseIpv6ExtHeader), "nh {nh}");
        }
    }

    #[test]
    fn ethernet_padding_is_accepted() {
        let mut f = testframe::build(&FrameSpec::v4_udp([1; 4], [2; 4], 1, 2));
        f.extend_from_slice(&[0; 18]);
        assert_eq!(parse_bytes(&f).unwrap().counter(), Counter::ParseUdp);
    }
}
