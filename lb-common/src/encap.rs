//! Outer headers for IPIP forwarding, built as plain values so they are
//! host-testable; the data plane only copies them into the packet.

use crate::{
    csum,
    wire::{ipv4::Ipv4Hdr, ipv6::Ipv6Hdr},
};

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// Outer IPv4 header around an inner datagram of `inner_len` bytes.
/// TTL and DSCP/ECN come from the inner packet so that the tunnel is
/// invisible to traceroute and QoS policy alike.
#[inline(always)]
pub fn outer_ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    inner_len: u16,
    tos: u8,
    ttl: u8,
    proto: u8,
) -> Ipv4Hdr {
    let total_len = inner_len.wrapping_add(20);
    let mut hdr = Ipv4Hdr {
        version_ihl: 0x45,
        tos,
        total_len: total_len.to_be_bytes(),
        id: [0, 0],
        // Don't Fragment: an LB must not fragment; PMTU discovery handles size.
        flags_frag_off: [0x40, 0x00],
        ttl,
        proto,
        check: [0, 0],
        src,
        dst,
    };
    hdr.check = ipv4_header_checksum(&hdr).to_be_bytes();
    hdr
}

/// Checksum of a 20-byte header (no options), computed over fixed fields so
/// it compiles to straight-line code for the verifier.
#[inline(always)]
pub fn ipv4_header_checksum(h: &Ipv4Hdr) -> u16 {
    let w = |a: u8, b: u8| ((a as u32) << 8) | b as u32;
    let acc = w(h.version_ihl, h.tos)
        + w(h.total_len[0], h.total_len[1])
        + w(h.id[0], h.id[1])
        + w(h.flags_frag_off[0], h.flags_frag_off[1])
        + w(h.ttl, h.proto)
        + w(h.src[0], h.src[1])
        + w(h.src[2], h.src[3])
        + w(h.dst[0], h.dst[1])
        + w(h.dst[2], h.dst[3]);
    csum::fold(acc)
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
            let h = outer_ipv4(
                [198, 18, 0, 2],
                [198, 18, 0, 20],
                len,
                tos,
                ttl,
                IPPROTO_IPIP,
            );
            assert_eq!(
                crate::csum::checksum(&bytes_of(&h)),
                0,
                "valid header sums to zero"
            );
            assert_eq!(h.total_len(), len + 20);
            assert_eq!((h.tos, h.ttl), (tos, ttl));
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
}
