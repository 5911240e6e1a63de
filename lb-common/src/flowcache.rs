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

crate::layout!(CachedFlow {
    key,
    backend_id,
    hits,
    vip_epoch,
    vip_id,
    mode,
    _pad
});

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
/// each word together costs, and the five words fewer save 2-4 ns of an
/// established packet's 65 (`cargo xtask bench`, old and new side by side).
#[inline(always)]
pub fn slot_of(key: &FlowKey) -> u32 {
    // The subnet word rotated, so that a subnet and an interface ID do not
    // cancel out (`…:0:1::2` and `…:0:2::1`).
    let client = word(&key.src, 0) ^ word(&key.src, 4).rotate_left(16) ^ word(&key.src, 12);
    let ports = key.src_port as u32 | (key.dst_port as u32) << 16;
    let kind = key.proto as u32 | (key.family as u32) << 8;
    // Murmur3's finaliser: clients and ports arrive in structured runs.
    crate::hash::fmix(client.rotate_left(11) ^ ports ^ kind.wrapping_mul(0x9e37_79b9))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> FlowKey {
        crate::testframe::flow_key(n, 6)
    }

    /// Consecutive IPv4 clients (each on its own port, as `key` makes them).
    #[test]
    fn slots_spread() {
        let clients = (0..SLOTS as u32 * 16).map(|n| key(0xc612_0000 + n));
        assert!(busiest(clients) < 48);
    }

    const SLOTS: usize = 4096;

    /// The largest number of `keys` that share one of [`SLOTS`] slots.
    fn busiest(keys: impl Iterator<Item = FlowKey>) -> u32 {
        let mut hist = vec![0u32; SLOTS];
        for k in keys {
            hist[(slot_of(&k) as usize) & (SLOTS - 1)] += 1;
        }
        *hist.iter().max().unwrap()
    }

    fn v6_client(subnet: u32, interface_low: u32) -> FlowKey {
        let mut k = key(0);
        k.family = 6;
        k.src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        k.src[4..8].copy_from_slice(&subnet.to_be_bytes());
        k.src[12..16].copy_from_slice(&interface_low.to_be_bytes());
        k.src_port = 40000;
        k
    }

    /// IPv6 clients on one source port that differ only in their subnet,
    /// only in the low half of their interface ID, or in both the same way
    /// (`…:0:1::2` and `…:0:2::1`, which a plain XOR of the words mixes up).
    #[test]
    fn ipv6_clients_spread() {
        let n = SLOTS as u32 * 16;
        let subnets = (1..=n).map(|s| v6_client(s, 1));
        assert!(busiest(subnets) < 48);
        let interfaces = (1..=n).map(|i| v6_client(1, i));
        assert!(busiest(interfaces) < 48);
        let swapped = (1..=n).flat_map(|i| [v6_client(i, i + 1), v6_client(i + 1, i)]);
        assert!(busiest(swapped) < 2 * 48);
    }

    /// One client's connections, told apart only by their source port.
    #[test]
    fn one_clients_ports_spread() {
        let ports = (1..=60000u16).map(|p| {
            let mut k = key(0xc612_0001);
            k.src_port = p;
            k
        });
        assert!(busiest(ports) < 48);
    }

    /// A collision costs only speed (`cached` compares the whole key), but
    /// these must not share a slot of the cache.
    #[test]
    fn clients_ports_and_protocols_move_the_slot() {
        let slot = |k: &FlowKey| slot_of(k) as usize & (SLOTS - 1);
        let a = key(0xc612_0001);
        let mut b = a;
        b.src_port ^= 1;
        assert_ne!(slot(&a), slot(&b));
        b = a;
        b.src[3] ^= 1;
        assert_ne!(slot(&a), slot(&b));
        b = a;
        b.proto = 17;
        assert_ne!(slot(&a), slot(&b));
    }

    #[test]
    fn layout() {
        assert_eq!(core::mem::size_of::<CachedFlow>(), 64);
    }
}
