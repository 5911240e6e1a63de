//! Where a flow lands in `RINGS`: shared so that userspace (`explain`, parity
//! tests) computes exactly what the data plane does.

use crate::{hash::flow_hash, maps::FlowKey};

/// Ring slots per `RINGS` element.
pub const RING_CHUNK: u32 = 16;

/// One `RINGS` element: 16 consecutive ring slots, one cache line.
///
/// A `u32` array element would take 8 bytes (BPF arrays round values up to
/// 8), so a 65537-slot generation spanned 512 KiB and a new flow's random
/// slot mostly missed the CPU's L2; packed, it spans 256 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingChunk {
    /// Backend ids; 0 is no backend (and pads the last chunk).
    pub ids: [u32; RING_CHUNK as usize],
}

crate::layout!(RingChunk { ids });

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data without padding.
unsafe impl aya::Pod for RingChunk {}

/// `RINGS` elements one generation of a ring of `ring_size` slots spans.
#[inline(always)]
pub const fn chunks_per_ring(ring_size: u32) -> u32 {
    ring_size.div_ceil(RING_CHUNK)
}

/// `RINGS` elements per VIP (two generations).
#[inline(always)]
pub const fn chunks_per_vip(ring_size: u32) -> u32 {
    2 * chunks_per_ring(ring_size)
}

/// Where slot `slot` of generation `generation` of VIP `vip_id` is: the
/// `RINGS` element and the lane in it. Each generation starts on an element
/// of its own, so one generation is rewritten without touching the other.
#[inline(always)]
pub const fn ring_pos(vip_id: u32, generation: u8, ring_size: u32, slot: u32) -> (u32, u32) {
    let first = vip_id
        .wrapping_mul(2)
        .wrapping_add((generation & 1) as u32)
        .wrapping_mul(chunks_per_ring(ring_size));
    (first.wrapping_add(slot / RING_CHUNK), slot % RING_CHUNK)
}

/// The Maglev slot a flow hashes to.
#[inline(always)]
pub fn flow_slot(key: &FlowKey, seed: u32, ring_size: u32) -> u32 {
    let h = flow_hash(
        &key.src,
        &key.dst,
        key.src_port,
        key.dst_port,
        key.proto,
        seed,
    );
    if ring_size == 0 { 0 } else { h % ring_size }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_do_not_overlap() {
        // 13 slots: one element per generation.
        let m = 13;
        assert_eq!(ring_pos(0, 0, m, 0), (0, 0));
        assert_eq!(ring_pos(0, 1, m, 0), (1, 0));
        assert_eq!(ring_pos(1, 0, m, 12), (2, 12));
        assert_eq!(ring_pos(2, 1, m, 5), (5, 5));
        // 37 slots: three elements per generation, the last one partly used.
        let m = 37;
        assert_eq!(chunks_per_ring(m), 3);
        assert_eq!(ring_pos(0, 0, m, 36), (2, 4));
        assert_eq!(ring_pos(0, 1, m, 0), (3, 0));
        assert_eq!(ring_pos(1, 1, m, 17), (9 + 1, 1));
        // Every slot of every generation of 3 VIPs has its own place.
        let mut seen = std::collections::BTreeSet::new();
        for vip in 0..3 {
            for generation in 0..2 {
                for slot in 0..m {
                    let (e, lane) = ring_pos(vip, generation, m, slot);
                    assert!(e < 3 * chunks_per_vip(m) && lane < RING_CHUNK);
                    assert!(seen.insert((e, lane)));
                }
            }
        }
    }

    #[test]
    fn a_chunk_is_one_cache_line() {
        assert_eq!(core::mem::size_of::<RingChunk>(), 64);
    }
}
