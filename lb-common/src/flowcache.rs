//! A per-CPU, direct-mapped cache in front of the connection table.
//!
//! A `CONNTRACK` hit costs a 64-bit keyed hash, a probe of up to eight ways,
//! a seal check, a function call and a clock read: about 40 ns here, more
//! than half an established packet's budget. The cache is a per-CPU ARRAY
//! indexed by a cheap hash of the 5-tuple, one way, no clock: RSS keeps a
//! flow on one CPU, so hit rates are high. It also remembers what the VIP
//! lookup said (see `vip_epoch`), so a hit skips that lookup too. It holds
//! only TCP flows (UDP needs the table's timestamps), filled from the
//! table's entry by a flow's second packet, or by a SYN that replaces an old
//! connection's entry. The table stays the source of truth: every
//! `REFRESH_EVERY`-th hit goes to the table anyway, which keeps the flow's
//! recency there current so the table does not evict flows the cache is
//! serving.

use crate::maps::FlowKey;

/// One hit in this many is looked up in `CONNTRACK` too.
pub const REFRESH_EVERY: u32 = 32;

/// 64 bytes: one cache line. Aligned to 8 (as BPF array values are), so
/// filling it takes eight-byte stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: FlowKey,
    /// 0: empty slot.
    pub backend_id: u32,
    pub hits: u32,
    /// `VIP_TABLE_GEN` when cached. The entry also carries what the VIP
    /// lookup would have said (id and mode), so a hit skips that lookup; any
    /// change to the VIP table bumps the counter and retires every entry.
    pub vip_epoch: u32,
    pub vip_id: u32,
    pub mode: u8,
    pub _pad: [u8; 7],
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data without padding.
unsafe impl aya::Pod for CachedFlow {}

#[inline(always)]
fn words(k: &FlowKey) -> [u32; 10] {
    let w = |b: &[u8; 16], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [
        w(&k.src, 0),
        w(&k.src, 4),
        w(&k.src, 8),
        w(&k.src, 12),
        w(&k.dst, 0),
        w(&k.dst, 4),
        w(&k.dst, 8),
        w(&k.dst, 12),
        k.src_port as u32 | (k.dst_port as u32) << 16,
        k.proto as u32 | (k.family as u32) << 8,
    ]
}

/// Slot of `key` (before masking). Cheaper than the flow hash: it only has
/// to spread flows over the cache, not agree across LB nodes.
#[inline(always)]
pub fn slot_of(key: &FlowKey) -> u32 {
    let w = words(key);
    let mut h = w[0] ^ w[1] ^ w[2] ^ w[3];
    h = h.rotate_left(11) ^ w[4] ^ w[5] ^ w[6] ^ w[7];
    h = h.rotate_left(11) ^ w[8] ^ w[9].wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> FlowKey {
        crate::testframe::flow_key(n, 6)
    }

    #[test]
    fn slots_spread() {
        const SLOTS: usize = 4096;
        let mut hist = vec![0u32; SLOTS];
        for n in 0..(SLOTS as u32 * 16) {
            hist[(slot_of(&key(0xc612_0000 + n)) as usize) & (SLOTS - 1)] += 1;
        }
        let max = *hist.iter().max().unwrap();
        assert!(max < 48, "busiest slot holds {max} of a mean 16");
    }

    #[test]
    fn layout() {
        assert_eq!(core::mem::size_of::<CachedFlow>(), 64);
    }
}
