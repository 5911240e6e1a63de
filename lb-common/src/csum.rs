//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! XDP has no checksum helpers, so the data plane patches checksums with
//! [`replace16`]/[`replace32`] when it rewrites fields, and computes the outer
//! IPv4 header checksum with [`fold`] over a fixed 20-byte header.

/// One's-complement sum of big-endian 16-bit words, not yet folded.
#[inline(always)]
pub fn sum_words(bytes: &[u8], mut acc: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for w in &mut chunks {
        acc = acc.wrapping_add(u16::from_be_bytes([w[0], w[1]]) as u32);
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add((*last as u32) << 8);
    }
    acc
}

/// Folds a 32-bit accumulator into the 16-bit one's-complement checksum
/// (already inverted, ready to store).
#[inline(always)]
pub const fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// RFC 1071 checksum of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    fold(sum_words(bytes, 0))
}

/// RFC 1624 eqn. 3: new checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let acc = (!check as u32) + (!old as u32) + (new as u32);
    fold(acc)
}

/// As [`replace16`] for a 32-bit field (an IPv4 address).
#[inline(always)]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let acc = (!check as u32)
        + (!(old >> 16) as u16 as u32)
        + (!(old as u16) as u32)
        + (new >> 16)
        + (new & 0xffff);
    fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checksum computed the slow, obvious way: sum of 16-bit words with
    /// end-around carry after every addition.
    fn reference(bytes: &[u8]) -> u16 {
        let mut sum: u16 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hi = bytes[i] as u16;
            let lo = if i + 1 < bytes.len() {
                bytes[i + 1] as u16
            } else {
                0
            };
            let (s, carry) = sum.overflowing_add((hi << 8) | lo);
            sum = s + carry as u16;
            i += 2;
        }
        !sum
    }

    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example words sum to 0xddf2 (before inversion).
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&bytes), !0xddf2);
    }

    #[test]
    fn matches_reference_on_random_buffers() {
        let mut s = 7;
        for len in 0..200 {
            let buf: Vec<u8> = (0..len).map(|_| lcg(&mut s) as u8).collect();
            assert_eq!(checksum(&buf), reference(&buf), "len {len}");
        }
    }

    #[test]
    fn known_ipv4_header() {
        // Header from Wikipedia's IPv4 checksum example, checksum field zeroed.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
    }

    #[test]
    fn incremental_updates_match_recomputation() {
        let mut s = 99;
        for _ in 0..2000 {
            let mut buf: Vec<u8> = (0..40).map(|_| lcg(&mut s) as u8).collect();
            let pos = (lcg(&mut s) as usize % 9) * 4;
            let before = checksum(&buf);
            let old32 = u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap());
            let new32 = lcg(&mut s) as u32;
            buf[pos..pos + 4].copy_from_slice(&new32.to_be_bytes());
            let want = reference(&buf);
            let got = replace32(before, old32, new32);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                got == want || (got ^ want) == 0xffff,
                "{got:#x} vs {want:#x}"
            );

            let before = checksum(&buf);
            let old16 = u16::from_be_bytes([buf[pos], buf[pos + 1]]);
            let new16 = lcg(&mut s) as u16;
            buf[pos..pos + 2].copy_from_slice(&new16.to_be_bytes());
            let want = reference(&buf);
            let got = replace16(before, old16, new16);
            assert!(
                got == want || (got ^ want) == 0xffff,
                "{got:#x} vs {want:#x}"
            );
        }
    }
}
