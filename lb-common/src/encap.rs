//! Outer headers for IPIP and GUE forwarding, written in place into the
//! packet by plain functions that host tests run on plain headers.

use crate::{
    csum,
    maps::BackendInfo,
    wire::{
        gue::{
            GUE_HDR_LEN, GUE_KIND_SECOND_HOP, GUE_SECOND_HOP_HLEN, GUE_SECOND_HOP_LEN, GueHdr,
            GueSecondHop,
        },
        ipv4::Ipv4Hdr,
        ipv6::Ipv6Hdr,
        udp::{UDP_HDR_LEN, UdpHdr},
    },
};

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// Writes, in place, the outer IPv4 header around an inner datagram of
/// `inner_len` bytes. TTL and DSCP/ECN come from the inner packet so that
/// the tunnel is invisible to traceroute and QoS policy alike. The addresses
/// travel as 4-byte words and the checksum is summed from the values being
/// written, not from the header's bytes: BPF handles an array of alignment
/// 1 a byte at a time.
#[inline(always)]
pub fn write_outer_ipv4(
    ip: &mut Ipv4Hdr,
    src: &[u8; 4],
    dst: &[u8; 4],
    inner_len: u16,
    tos: u8,
    ttl: u8,
    proto: u8,
) {
    let total_len = inner_len.wrapping_add(20);
    let (s, d) = (u32::from_be_bytes(*src), u32::from_be_bytes(*dst));
    // Don't Fragment: an LB must not fragment; PMTU discovery handles size.
    const DF: u16 = 0x4000;
    let acc = (0x45 << 8 | tos as u32)
        + total_len as u32
        + DF as u32
        + ((ttl as u32) << 8 | proto as u32)
        + (s >> 16)
        + (s & 0xffff)
        + (d >> 16)
        + (d & 0xffff);
    ip.version_ihl = 0x45;
    ip.tos = tos;
    ip.total_len = total_len.to_be_bytes();
    ip.id = [0, 0];
    ip.flags_frag_off = DF.to_be_bytes();
    ip.ttl = ttl;
    ip.proto = proto;
    ip.check = csum::fold(acc).to_be_bytes();
    ip.src = s.to_be_bytes();
    ip.dst = d.to_be_bytes();
}

/// Writes, in place, the outer IPv6 header around an inner datagram of
/// `inner_len` bytes. In place rather than built and copied: a 40-byte
/// header of alignment 1 is copied a byte at a time in BPF, and so are its
/// addresses (see [`copy_addr`]).
#[inline(always)]
pub fn write_outer_ipv6(
    ip: &mut Ipv6Hdr,
    src: &[u8; 16],
    dst: &[u8; 16],
    inner_len: u16,
    tclass: u8,
    hop_limit: u8,
    next_header: u8,
) {
    ip.version_tc_flow = [0x60 | (tclass >> 4), tclass << 4, 0, 0];
    ip.payload_len = inner_len.to_be_bytes();
    ip.next_header = next_header;
    ip.hop_limit = hop_limit;
    copy_addr(&mut ip.src, src);
    copy_addr(&mut ip.dst, dst);
}

/// Copies a 16-byte address as two 8-byte words: as an array of alignment
/// 1 it would be sixteen byte loads and sixteen byte stores in BPF. Both
/// ends must be packet or map memory (the verifier refuses misaligned stack
/// access), as they are in the data plane.
#[inline(always)]
pub fn copy_addr(to: &mut [u8; 16], from: &[u8; 16]) {
    let from = from.as_ptr().cast::<u64>();
    let to = to.as_mut_ptr().cast::<u64>();
    // SAFETY: both point at 16 valid bytes; the accesses are unaligned.
    unsafe {
        to.write_unaligned(from.read_unaligned());
        to.add(1).write_unaligned(from.add(1).read_unaligned());
    }
}

/// Bytes GUE adds after the outer IP header: UDP, the GUE header and, with
/// a second hop, its private block.
#[inline(always)]
pub const fn gue_overhead(second_hop: bool) -> usize {
    UDP_HDR_LEN + GUE_HDR_LEN + if second_hop { GUE_SECOND_HOP_LEN } else { 0 }
}

/// The outer UDP source port for a flow, in 49152..=65535, so that a
/// backend's NIC spreads flows over its receive queues (RSS hashes the
/// outer header) while each flow keeps one queue. `client` is the client
/// address's first and last 32-bit words XORed (an IPv4 address: itself),
/// `ports` the L4 header's first word (both ports), both as read from the
/// packet: the data plane takes them from packet memory, where the
/// verifier accepts any alignment.
#[inline(always)]
pub const fn gue_source_port(client: u32, ports: u32) -> u16 {
    let h = (client ^ ports).wrapping_mul(0x9e37_79b1);
    0xc000 | (h >> 18) as u16
}

/// [`gue_source_port`] of a client address (4 or 16 bytes) and ports.
pub fn gue_source_port_of(client: &[u8], client_port: u16, vip_port: u16) -> u16 {
    let word =
        |i: usize| u32::from_be_bytes([client[i], client[i + 1], client[i + 2], client[i + 3]]);
    let addr = if client.len() == 16 {
        word(0) ^ word(12)
    } else {
        word(0)
    };
    gue_source_port(addr, (client_port as u32) << 16 | vip_port as u32)
}

/// Writes, in place, the UDP and GUE headers (and the second hop's block)
/// after the outer IP header, around an inner datagram of `inner_len`
/// bytes carrying IP protocol `inner_proto` (4 or 41). The UDP checksum is
/// 0: allowed for IPv4 (RFC 768) and for tunnel protocols over IPv6 (RFC
/// 6935/6936); the inner packet keeps its own checksums end to end.
#[inline(always)]
pub fn write_gue(
    udp: &mut UdpHdr,
    gue: &mut GueHdr,
    second_hop: Option<(&mut GueSecondHop, &BackendInfo)>,
    src_port: u16,
    dst_port: u16,
    inner_len: u16,
    inner_proto: u8,
) {
    let has_hop = second_hop.is_some();
    let len = inner_len.wrapping_add(gue_overhead(has_hop) as u16);
    udp.src_port = src_port.to_be_bytes();
    udp.dst_port = dst_port.to_be_bytes();
    udp.len = len.to_be_bytes();
    udp.check = [0, 0];
    gue.write(inner_proto, if has_hop { GUE_SECOND_HOP_HLEN } else { 0 });
    if let Some((block, hop)) = second_hop {
        block.kind = GUE_KIND_SECOND_HOP;
        block.family = hop.family;
        block._reserved = [0, 0];
        copy_addr(&mut block.addr, &hop.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(h: &Ipv4Hdr) -> [u8; 20] {
        // SAFETY: Ipv4Hdr is 20 plain bytes.
        unsafe { core::mem::transmute_copy(h) }
    }

    #[test]
    fn outer_ipv4_checksum_verifies() {
        for (len, tos, ttl) in [(40u16, 0u8, 64u8), (1480, 0xb8, 1), (0, 255, 255)] {
            for (src, dst) in [
                ([198, 18, 0, 2], [198, 18, 0, 20]),
                ([255, 255, 255, 255], [255, 255, 255, 254]),
                ([0, 0, 0, 0], [10, 0, 0, 1]),
            ] {
                // SAFETY: Ipv4Hdr is 20 plain bytes; any value is valid.
                let mut h: Ipv4Hdr = unsafe { core::mem::transmute([0xa5u8; 20]) };
                write_outer_ipv4(&mut h, &src, &dst, len, tos, ttl, IPPROTO_IPIP);
                assert_eq!(
                    crate::csum::checksum(&bytes_of(&h)),
                    0,
                    "valid header sums to zero"
                );
                assert_eq!(h.total_len(), len + 20);
                assert_eq!(
                    (h.version_ihl, h.tos, h.ttl, h.proto),
                    (0x45, tos, ttl, IPPROTO_IPIP)
                );
                assert_eq!((h.id, h.flags_frag_off), ([0, 0], [0x40, 0]));
                assert_eq!((h.src, h.dst), (src, dst));
            }
        }
    }

    #[test]
    fn outer_ipv6_fields() {
        // SAFETY: Ipv6Hdr is 40 plain bytes; any value is valid.
        let mut h: Ipv6Hdr = unsafe { core::mem::transmute([0xffu8; 40]) };
        let src: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let dst: [u8; 16] = core::array::from_fn(|i| 0xf0 - i as u8);
        write_outer_ipv6(&mut h, &src, &dst, 60, 0xb8, 17, IPPROTO_IPV6);
        assert_eq!(h.version(), 6);
        assert_eq!(h.traffic_class(), 0xb8);
        assert_eq!(h.version_tc_flow, [0x6b, 0x80, 0, 0], "flow label zero");
        assert_eq!(h.payload_len(), 60);
        assert_eq!(h.hop_limit, 17);
        assert_eq!(h.next_header, IPPROTO_IPV6);
        assert_eq!((h.src, h.dst), (src, dst));
    }

    #[test]
    fn gue_headers() {
        use crate::maps::Family;
        let mut udp = UdpHdr {
            src_port: [0xff; 2],
            dst_port: [0xff; 2],
            len: [0xff; 2],
            check: [0xff; 2],
        };
        let mut gue = GueHdr {
            ver_c_hlen: 0xff,
            proto: 0xff,
            flags: [0xff; 2],
        };
        write_gue(&mut udp, &mut gue, None, 50000, 6080, 60, IPPROTO_IPIP);
        assert_eq!(udp.src_port(), 50000);
        assert_eq!(udp.dst_port(), 6080);
        assert_eq!(udp.length(), 60 + 12);
        assert_eq!(udp.check, [0, 0]);
        assert_eq!(
            [gue.ver_c_hlen, gue.proto, gue.flags[0], gue.flags[1]],
            [0, 4, 0, 0]
        );

        let mut block = GueSecondHop {
            kind: 0xff,
            family: 0xff,
            _reserved: [0xff; 2],
            addr: [0xff; 16],
        };
        let hop = BackendInfo {
            addr: crate::testframe::v6(0x21),
            family: Family::V6.wire(),
            ..Default::default()
        };
        write_gue(
            &mut udp,
            &mut gue,
            Some((&mut block, &hop)),
            50001,
            6080,
            80,
            IPPROTO_IPV6,
        );
        assert_eq!(udp.length(), 80 + 32);
        assert_eq!([gue.ver_c_hlen, gue.proto], [5, 41]);
        assert_eq!((block.kind, block.family, block._reserved), (1, 6, [0, 0]));
        assert_eq!(block.addr, hop.addr);
    }

    #[test]
    fn gue_source_ports_spread_and_stay_high() {
        let mut seen = std::collections::HashSet::new();
        for port in 1000..2000u16 {
            let p = gue_source_port_of(&[198, 18, 0, 10], port, 80);
            assert!(p >= 49152);
            assert_eq!(p, gue_source_port_of(&[198, 18, 0, 10], port, 80), "stable");
            seen.insert(p);
        }
        assert!(seen.len() > 900, "{} distinct of 1000", seen.len());
    }
}
