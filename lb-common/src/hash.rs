//! Flow hash and Maglev permutation parameters.
//!
//! The XDP program hashes every new flow with [`flow_hash`] to pick a ring
//! slot, and the controller uses the same function for `lbctl explain`; ECMP
//! peers running different builds must agree, so the function is fixed and
//! pure: it depends only on its arguments, never on host byte order.
//!
//! Murmur3 (x86, 32-bit) because it passes SMHasher's avalanche and bias
//! tests, needs only 32-bit multiplies and rotates (cheap on eBPF, no
//! 64-bit constants), and is reproducible with any stock implementation
//! (e.g. Python's `mmh3`) over the 37-byte message that [`flow_hash`]
//! documents.
//!
//! Everything here is `#[inline(always)]`, loop-free and panic-free so that
//! the verifier sees straight-line code.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// Decorrelates the seed of the second Maglev hash from the first (the
/// 32-bit golden ratio, as used by the kernel's jhash).
const SKIP_SEED_XOR: u32 = 0x9e37_79b9;

#[inline(always)]
const fn scramble(k: u32) -> u32 {
    k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2)
}

/// One Murmur3 body round over a 4-byte block.
#[inline(always)]
const fn round(h: u32, k: u32) -> u32 {
    (h ^ scramble(k))
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Murmur3's finaliser: full avalanche of `h`.
#[inline(always)]
pub(crate) const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Murmur3 body over 16 bytes, read as little-endian blocks as the reference
/// implementation does on x86. Destructuring keeps it free of bounds checks.
#[inline(always)]
const fn rounds16(h: u32, b: &[u8; 16]) -> u32 {
    let [
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
        b8,
        b9,
        b10,
        b11,
        b12,
        b13,
        b14,
        b15,
    ] = *b;
    let h = round(h, u32::from_le_bytes([b0, b1, b2, b3]));
    let h = round(h, u32::from_le_bytes([b4, b5, b6, b7]));
    let h = round(h, u32::from_le_bytes([b8, b9, b10, b11]));
    round(h, u32::from_le_bytes([b12, b13, b14, b15]))
}

/// Hash of a flow's 5-tuple.
///
/// Exactly `MurmurHash3_x86_32(msg, seed)` where the 37-byte `msg` is
/// `src ‖ dst ‖ src_port (big-endian) ‖ dst_port (big-endian) ‖ proto`, so
/// an operator can recompute it off-box. Addresses are the 16-byte form used
/// throughout (IPv4 in the first 4 bytes, the rest zero); ports are numeric
/// values (host order), serialised in network order.
#[inline(always)]
pub const fn flow_hash(
    src: &[u8; 16],
    dst: &[u8; 16],
    src_port: u16,
    dst_port: u16,
    proto: u8,
    seed: u32,
) -> u32 {
    let h = rounds16(seed, src);
    let h = rounds16(h, dst);
    let [sp0, sp1] = src_port.to_be_bytes();
    let [dp0, dp1] = dst_port.to_be_bytes();
    let h = round(h, u32::from_le_bytes([sp0, sp1, dp0, dp1]));
    // Murmur3 tail: the single leftover byte is scrambled but not rotated
    // into `h`.
    let h = h ^ scramble(proto as u32);
    fmix(h ^ 37)
}

/// `MurmurHash3_x86_32` of a 16-byte key.
#[inline(always)]
const fn hash16(key: &[u8; 16], seed: u32) -> u32 {
    fmix(rounds16(seed, key) ^ 16)
}

/// Maglev permutation parameters of a backend for a ring of `m` slots
/// (Maglev paper §3.4): `offset` in `[0, m)` and `skip` in `[1, m)`, from two
/// differently seeded hashes of the backend's identity (its address), so
/// that backends' permutations are independent of each other and of their
/// position in the configuration.
///
/// Slot `j` of the permutation is `(offset + j * skip) % m`; with `m` prime
/// every `skip` in `[1, m)` visits every slot. Returns `(0, 1)` when `m < 2`,
/// where no valid skip exists (ring builders reject such sizes anyway).
#[inline(always)]
pub const fn maglev_offset_skip(identity: &[u8; 16], m: u32, seed: u32) -> (u32, u32) {
    if m < 2 {
        return (0, 1);
    }
    let offset = hash16(identity, seed) % m;
    let skip = hash16(identity, seed ^ SKIP_SEED_XOR) % (m - 1) + 1;
    (offset, skip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::vec::Vec;

    /// Straightforward MurmurHash3_x86_32 over any byte slice, written from
    /// the reference C code; [`flow_hash`] must agree with it.
    fn murmur3_reference(data: &[u8], seed: u32) -> u32 {
        let mut h = seed;
        let mut chunks = data.chunks_exact(4);
        for c in &mut chunks {
            h = round(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
        let tail = chunks.remainder();
        let mut k = 0u32;
        for (i, &b) in tail.iter().enumerate() {
            k |= (b as u32) << (8 * i);
        }
        if !tail.is_empty() {
            h ^= scramble(k);
        }
        fmix(h ^ data.len() as u32)
    }

    /// SplitMix64: small, seedable, good enough to generate test inputs
    /// without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn bytes16(&mut self) -> [u8; 16] {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&self.next_u64().to_le_bytes());
            b[8..].copy_from_slice(&self.next_u64().to_le_bytes());
            b
        }
    }

    /// A tuple as the 37-byte message, so single bits can be flipped.
    fn message(rng: &mut Rng) -> [u8; 37] {
        let mut m = [0u8; 37];
        m[..16].copy_from_slice(&rng.bytes16());
        m[16..32].copy_from_slice(&rng.bytes16());
        m[32..].copy_from_slice(&rng.next_u64().to_le_bytes()[..5]);
        m
    }

    fn hash_message(m: &[u8; 37], seed: u32) -> u32 {
        let src: [u8; 16] = m[..16].try_into().unwrap();
        let dst: [u8; 16] = m[16..32].try_into().unwrap();
        let sp = u16::from_be_bytes([m[32], m[33]]);
        let dp = u16::from_be_bytes([m[34], m[35]]);
        flow_hash(&src, &dst, sp, dp, m[36], seed)
    }

    #[test]
    fn reference_matches_published_vectors() {
        assert_eq!(murmur3_reference(b"", 0), 0);
        assert_eq!(murmur3_reference(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_reference(b"hello", 0), 0x248b_fa47);
        assert_eq!(
            murmur3_reference(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    #[test]
    fn flow_hash_is_murmur3_of_the_documented_message() {
        let mut rng = Rng(1);
        for _ in 0..1000 {
            let m = message(&mut rng);
            let seed = rng.next_u64() as u32;
            assert_eq!(hash_message(&m, seed), murmur3_reference(&m, seed));
        }
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&[198, 18, 0, 10]);
        assert_eq!(hash16(&key, 7), murmur3_reference(&key, 7));
    }

    /// Pinned output: if this changes, nodes running different builds would
    /// send the same flow to different backends.
    #[test]
    fn flow_hash_is_stable() {
        let src = [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let dst = [198, 18, 100, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let a = flow_hash(&src, &dst, 40000, 80, 6, 0x1234_5678);
        assert_eq!(a, flow_hash(&src, &dst, 40000, 80, 6, 0x1234_5678));
        let mut msg = Vec::new();
        msg.extend_from_slice(&src);
        msg.extend_from_slice(&dst);
        msg.extend_from_slice(&40000u16.to_be_bytes());
        msg.extend_from_slice(&80u16.to_be_bytes());
        msg.push(6);
        assert_eq!(a, murmur3_reference(&msg, 0x1234_5678));
    }

    #[test]
    fn seed_changes_output() {
        let mut rng = Rng(2);
        let mut same = 0;
        for _ in 0..10_000 {
            let m = message(&mut rng);
            if hash_message(&m, 1) == hash_message(&m, 2) {
                same += 1;
            }
        }
        assert!(same <= 2, "{same} of 10000 hashes ignored the seed");
    }

    /// Chi-square of `hashes` spread over `buckets` (a power of two) by
    /// their low bits, and the largest relative deviation of a bucket from
    /// the mean.
    fn spread(hashes: impl Iterator<Item = u32>, buckets: usize) -> (f64, f64) {
        let mut counts = vec![0u64; buckets];
        let mut n = 0u64;
        for h in hashes {
            counts[h as usize & (buckets - 1)] += 1;
            n += 1;
        }
        let mean = n as f64 / buckets as f64;
        let chi2 = counts
            .iter()
            .map(|&c| (c as f64 - mean).powi(2) / mean)
            .sum();
        let worst = counts
            .iter()
            .map(|&c| (c as f64 - mean).abs() / mean)
            .fold(0.0, f64::max);
        (chi2, worst)
    }

    /// Random tuples and structured ones (one client sweeping source ports;
    /// consecutive IPv4 clients), since real traffic is the latter.
    #[test]
    fn distribution() {
        const BUCKETS: usize = 1024;
        // 1M keys: a bucket's mean is ~977 with sigma ~31, so +-20% is over
        // 6 sigma and a sound hash never trips it, while the chi-square bound
        // (1023 degrees of freedom, +-5 sigma) catches lumpy or suspiciously
        // even output.
        const N: usize = 1 << 20;
        let chi2_ok = |chi2: f64| {
            (1023.0 - 5.0 * 2046f64.sqrt()..1023.0 + 5.0 * 2046f64.sqrt()).contains(&chi2)
        };

        let mut rng = Rng(3);
        let random = (0..N).map(|_| hash_message(&message(&mut rng), 42));
        let (chi2, worst) = spread(random, BUCKETS);
        println!(
            "random tuples: chi2 {chi2:.0}, worst bucket {:.1}%",
            worst * 100.0
        );
        assert!(worst <= 0.2 && chi2_ok(chi2), "chi2 {chi2}, worst {worst}");

        let vip = [198, 18, 100, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let structured = (0..N).map(|i| {
            let client = [
                198,
                18,
                (i >> 16) as u8,
                (i >> 8) as u8,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ];
            flow_hash(&client, &vip, 32768 + (i & 0xff) as u16, 443, 6, 42)
        });
        let (chi2, worst) = spread(structured, BUCKETS);
        println!(
            "sequential tuples: chi2 {chi2:.0}, worst bucket {:.1}%",
            worst * 100.0
        );
        assert!(worst <= 0.2 && chi2_ok(chi2), "chi2 {chi2}, worst {worst}");
    }

    /// Flipping any single input bit flips each output bit with probability
    /// ~1/2 (strict avalanche), hence ~16 output bits on average.
    #[test]
    fn avalanche() {
        const SAMPLES: usize = 1000;
        let mut rng = Rng(4);
        // flips[input bit][output bit]
        let mut flips = vec![[0u32; 32]; 37 * 8];
        for _ in 0..SAMPLES {
            let m = message(&mut rng);
            let seed = rng.next_u64() as u32;
            let h = hash_message(&m, seed);
            for (bit, row) in flips.iter_mut().enumerate() {
                let mut flipped = m;
                flipped[bit / 8] ^= 1 << (bit % 8);
                let diff = h ^ hash_message(&flipped, seed);
                for (out, count) in row.iter_mut().enumerate() {
                    *count += (diff >> out) & 1;
                }
            }
        }
        let mut total = 0.0;
        let mut worst_bias: f64 = 0.0;
        for (bit, row) in flips.iter().enumerate() {
            let mean_flipped = row.iter().sum::<u32>() as f64 / SAMPLES as f64;
            assert!(
                (12.0..=20.0).contains(&mean_flipped),
                "input bit {bit} flips {mean_flipped} output bits on average"
            );
            total += mean_flipped;
            for &c in row {
                worst_bias = worst_bias.max((c as f64 / SAMPLES as f64 - 0.5).abs());
            }
        }
        let mean = total / flips.len() as f64;
        println!("avalanche: {mean:.2} output bits per input bit, worst bias {worst_bias:.3}");
        assert!((15.5..=16.5).contains(&mean), "mean {mean}");
        // 1000 samples: sigma of a flip rate is ~0.016; 0.1 is over 6 sigma.
        assert!(worst_bias < 0.1, "worst per-bit bias {worst_bias}");
    }

    #[test]
    fn offset_and_skip_ranges() {
        let mut rng = Rng(5);
        for m in [2u32, 3, 7, 251, 65537, 1_000_003] {
            for _ in 0..1000 {
                let (offset, skip) = maglev_offset_skip(&rng.bytes16(), m, 9);
                assert!(offset < m, "offset {offset} for m {m}");
                assert!((1..m).contains(&skip), "skip {skip} for m {m}");
            }
        }
        assert_eq!(maglev_offset_skip(&[1; 16], 0, 0), (0, 1));
        assert_eq!(maglev_offset_skip(&[1; 16], 1, 0), (0, 1));
    }

    /// Offset and skip come from independent hashes: backends with nearby
    /// addresses must not share permutations or have correlated ones.
    #[test]
    fn offset_and_skip_are_independent() {
        const M: u32 = 65537;
        let mut pairs = HashSet::new();
        let mut offsets = HashSet::new();
        for i in 0..10_000u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&[198, 18, (i >> 8) as u8, i as u8]);
            let (offset, skip) = maglev_offset_skip(&id, M, 0);
            pairs.insert((offset, skip));
            offsets.insert(offset);
        }
        // 10k draws from 65537 values: ~700 birthday collisions expected for
        // offsets alone, none for (offset, skip) pairs.
        assert!(
            offsets.len() > 9000,
            "only {} distinct offsets",
            offsets.len()
        );
        assert_eq!(pairs.len(), 10_000);
        assert_ne!(
            maglev_offset_skip(&[7; 16], M, 0),
            maglev_offset_skip(&[7; 16], M, 1)
        );
    }
}
