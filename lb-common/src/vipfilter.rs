//! A bitmap of VIP addresses, read before anything else.
//!
//! Most packets a balancer host sees on a busy interface may be for the
//! host itself (its own SSH, BGP, health checks). Before this filter, such a
//! packet paid for the flow-cache hash and probe, a SYN for its ring hash,
//! and two VIP-table probes (exact port, then port 0) before it was handed to
//! the kernel: several times the trivial program's cost. One bit per hash of
//! the destination address answers "certainly not a VIP" with one inlined
//! array read; only a set bit (a VIP, or an address sharing its bit) goes on
//! to the exact lookup, so a false positive costs what every packet cost
//! before, never a wrong answer.
//!
//! Userspace keeps the bitmap a superset of every VIP table generation the
//! data plane may read: it adds the new set's bits before flipping the VIP
//! table and clears the old set's only after. A reader that sees a
//! half-written word sees, per byte, either the old or the new value, and
//! both have the live VIPs' bits set.

#[cfg(doc)]
use crate::parse::parse_l2;
use crate::{
    packet::PacketBytes,
    parse::{L2, v4_in_16},
    wire::{
        ethernet::{ETHERTYPE_IPV4, ETHERTYPE_IPV6},
        ipv4::Ipv4Hdr,
        ipv6::Ipv6Hdr,
    },
};

/// Bits in the filter: 65,536 (8 KiB). With 4,096 VIP addresses (the most a
/// node takes) at most 1 in 16 other addresses shares a bit.
pub const FILTER_BITS: u32 = 1 << 16;
/// `u64` words in the filter (the map's entries).
pub const FILTER_WORDS: u32 = FILTER_BITS / 64;

/// The filter bit of a destination address (IPv4 as its 4 bytes followed by
/// zeros, as flow keys hold it).
#[inline(always)]
pub const fn addr_bit(addr: &[u8; 16]) -> u32 {
    // One multiply spreads the folded words over the high bits; the
    // addresses of one VIP subnet differ in a few low bits of one word.
    let folded = word(addr, 0)
        ^ word(addr, 4).rotate_left(8)
        ^ word(addr, 8).rotate_left(16)
        ^ word(addr, 12);
    folded.wrapping_mul(0x9e37_79b1) >> (32 - 16)
}

#[inline(always)]
const fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// The word holding `bit` and the mask of `bit` within it.
#[inline(always)]
pub const fn word_and_mask(bit: u32) -> (u32, u64) {
    (bit / 64 % FILTER_WORDS, 1u64 << (bit % 64))
}

/// The filter bit of the packet's destination address, read straight from
/// the IP header after [`parse_l2`], which is not validated here: a packet
/// the filter refuses goes to the kernel whatever its headers, as it would
/// after a full parse. `None` for anything but IPv4 or IPv6, or a frame too
/// short to hold the address; the full parse then says why.
#[inline(always)]
pub fn dst_bit<P: PacketBytes + ?Sized>(pkt: &P, l2: L2) -> Option<u32> {
    match l2.ether_type {
        ETHERTYPE_IPV4 => {
            let ip: &Ipv4Hdr = pkt.header(l2.l3_offset)?;
            Some(addr_bit(&v4_in_16(ip.dst)))
        }
        ETHERTYPE_IPV6 => {
            let ip: &Ipv6Hdr = pkt.header(l2.l3_offset)?;
            Some(addr_bit(&ip.dst))
        }
        _ => None,
    }
}

/// The filter for a set of destination addresses.
#[cfg(any(test, feature = "std"))]
pub fn build<'a>(addrs: impl IntoIterator<Item = &'a [u8; 16]>) -> std::vec::Vec<u64> {
    let mut words = std::vec![0u64; FILTER_WORDS as usize];
    for a in addrs {
        let (w, m) = word_and_mask(addr_bit(a));
        words[w as usize] |= m;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testframe;

    /// Whether `addr` passes `filter`, as the data plane reads it.
    fn may_hold(filter: &[u64], addr: &[u8; 16]) -> bool {
        let (w, m) = word_and_mask(addr_bit(addr));
        filter.get(w as usize).is_some_and(|word| word & m != 0)
    }

    fn v4(n: u32) -> [u8; 16] {
        v4_in_16(n.to_be_bytes())
    }

    fn v6(n: u32) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0xfd, 0, 0x01, 0x98]);
        a[12..].copy_from_slice(&n.to_be_bytes());
        a
    }

    #[test]
    fn every_member_passes() {
        let members: Vec<[u8; 16]> = (0..4096u32)
            .map(|n| {
                if n % 2 == 0 {
                    v4(0xc612_6400 + n)
                } else {
                    v6(n)
                }
            })
            .collect();
        let f = build(&members);
        assert!(members.iter().all(|a| may_hold(&f, a)));
    }

    /// A host's own traffic is rarely let through to the exact lookup: with
    /// a few VIPs, almost no other address of their subnets or elsewhere
    /// shares a bit.
    #[test]
    fn others_are_mostly_refused() {
        let vips: Vec<[u8; 16]> = (1..=16u32).map(|n| v4(0xc612_6400 + n)).collect();
        let f = build(&vips);
        let others = (0..65_536u32).map(|n| v4(0x0a00_0000 + n));
        let passed = others.filter(|a| may_hold(&f, a)).count();
        // 16 bits of 65,536 set: about 16 expected.
        assert!(passed < 64, "{passed} of 65536 passed");
        let near: Vec<_> = (17..=255u32).map(|n| v4(0xc612_6400 + n)).collect();
        assert!(near.iter().filter(|a| may_hold(&f, a)).count() < 4);
    }

    #[test]
    fn empty_filter_refuses_everything() {
        let f = build(core::iter::empty());
        assert!(!may_hold(&f, &v4(0xc612_6401)));
        assert!(!may_hold(&f, &v6(1)));
    }

    fn bit_of(frame: &[u8]) -> Option<u32> {
        dst_bit(frame, crate::parse::parse_l2(frame).ok()?)
    }

    /// The address the full parse finds, in every framing it accepts.
    #[test]
    fn dst_bit_reads_the_parsed_destination() {
        use testframe::FrameSpec;
        let mut tagged = FrameSpec::v4_udp([10, 0, 0, 1], [198, 18, 100, 7], 1000, 53);
        tagged.vlan = Some(12);
        let mut options = FrameSpec::v4_tcp([10, 0, 0, 1], [198, 18, 100, 8], 1000, 80);
        options.ipv4_options = 8;
        let specs = [
            FrameSpec::v4_tcp([10, 0, 0, 1], [198, 18, 100, 1], 1000, 80),
            tagged,
            options,
            FrameSpec::v6_tcp(testframe::v6(1), testframe::v6_vip(1), 1000, 80),
        ];
        for spec in &specs {
            let frame = testframe::build(spec);
            let parsed = crate::parse::parse(&frame[..]).expect("a valid frame");
            assert_eq!(bit_of(&frame), Some(addr_bit(&parsed.dst_addr)));
        }
    }

    /// Too short for the address, or not IP: the full parse decides.
    #[test]
    fn dst_bit_leaves_the_rest_to_the_parse() {
        let frame = testframe::build(&testframe::FrameSpec::v4_tcp(
            [10, 0, 0, 1],
            [198, 18, 100, 1],
            1000,
            80,
        ));
        assert_eq!(bit_of(&frame[..14 + 19]), None);
        assert!(bit_of(&frame[..14 + 20]).is_some());
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(bit_of(&arp), None);
        assert_eq!(bit_of(&frame[..10]), None);
    }

    /// Golden values: lbd and the data plane must agree on every bit, so a
    /// change here changes the map's contract (and needs a new layout
    /// fingerprint, or adopted filters would refuse live VIPs).
    #[test]
    fn bits_are_stable() {
        assert_eq!(addr_bit(&v4(0xc612_6401)), 32666);
        assert_eq!(addr_bit(&v6(1)), 40836);
        assert_eq!(addr_bit(&[0; 16]), 0);
    }
}
