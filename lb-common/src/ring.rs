//! Where a flow lands in `RINGS`: shared so that userspace (`explain`, parity
//! tests) computes exactly what the data plane does.

use crate::{hash::flow_hash, maps::FlowKey};

/// Index into `RINGS` of slot `slot` of generation `generation` of VIP `vip_id`.
#[inline(always)]
pub const fn ring_index(vip_id: u32, generation: u8, ring_size: u32, slot: u32) -> u32 {
    vip_id
        .wrapping_mul(2)
        .wrapping_add((generation & 1) as u32)
        .wrapping_mul(ring_size)
        .wrapping_add(slot)
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
        let m = 13;
        assert_eq!(ring_index(0, 0, m, 0), 0);
        assert_eq!(ring_index(0, 1, m, 0), 13);
        assert_eq!(ring_index(1, 0, m, 12), 26 + 12);
        assert_eq!(ring_index(2, 1, m, 5), 4 * 13 + 13 + 5);
    }
}
