//! A per-CPU, direct-mapped cache in front of the connection table.
//!
//! A `CONNTRACK` hit costs a 64-bit keyed hash, a probe of up to eight ways,
//! a seal check, a function call and a clock read: about 40 ns here, more
//! than half an established packet's budget. The cache is a per-CPU ARRAY
//! indexed by a cheap hash of the client and ports ([`slot_of`]), one way,
//! no clock: RSS keeps a flow on one CPU, so hit rates are high. It also remembers what the VIP
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

/// Four bytes of an address as a native-endian word.
#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Slot of `key` (before masking). Cheaper than the flow hash: it only has
/// to spread flows over the cache, not agree across LB nodes, and two flows
/// sharing a slot cost table lookups, never a wrong backend (an entry holds
/// its whole key). So it reads what tells one LB's flows apart: the ports,
/// protocol and family, and of the client's address the first, second and
/// last four bytes (an IPv4 address; an IPv6 routing prefix, subnet and the
/// low half of the interface ID). The VIP's address and the interface ID's
/// high half stay out: in the data plane addresses are loose bytes, putting
/// each word together costs, and the three words fewer save about 4 ns of
/// an established packet's 66 (`cargo xtask bench`).
#[inline(always)]
pub fn slot_of(key: &FlowKey) -> u32 {
    let client = word(&key.src, 0) ^ word(&key.src, 4) ^ word(&key.src, 12);
    let ports = key.src_port as u32 | (key.dst_port as u32) << 16;
    let kind = key.proto as u32 | (key.family as u32) << 8;
    let mut h = client.rotate_left(11) ^ ports ^ kind.wrapping_mul(0x9e37_79b9);
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

    /// IPv6 clients that differ only in their subnet (bytes 4..8) or in the
    /// low half of their interface ID, on one source port: what the slot
    /// reads of an IPv6 address.
    #[test]
    fn ipv6_clients_spread() {
        const SLOTS: usize = 4096;
        let mut hist = vec![0u32; SLOTS];
        for n in 0..(SLOTS as u32 * 16) {
            let mut k = key(0);
            k.family = 6;
            k.src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            k.src_port = 40000;
            if n % 2 == 0 {
                k.src[4..8].copy_from_slice(&(n / 2).to_be_bytes());
            } else {
                k.src[12..16].copy_from_slice(&(n / 2).to_be_bytes());
            }
            hist[(slot_of(&k) as usize) & (SLOTS - 1)] += 1;
        }
        let max = *hist.iter().max().unwrap();
        assert!(max < 48, "busiest slot holds {max} of a mean 16");
    }

    /// A collision costs only speed: `cached` compares the whole key.
    #[test]
    fn clients_ports_and_protocols_move_the_slot() {
        let a = key(0xc612_0001);
        let mut b = a;
        b.src_port ^= 1;
        assert_ne!(slot_of(&a), slot_of(&b));
        b = a;
        b.src[3] ^= 1;
        assert_ne!(slot_of(&a), slot_of(&b));
        b = a;
        b.proto = 17;
        assert_ne!(slot_of(&a), slot_of(&b));
    }

    #[test]
    fn layout() {
        assert_eq!(core::mem::size_of::<CachedFlow>(), 64);
    }
}
