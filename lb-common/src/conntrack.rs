//! The connection table: a set-associative hash table in a BPF `ARRAY`,
//! shared by all CPUs, with two candidate buckets per flow.
//!
//! Why not the kernel's LRU hash (DESIGN.md §3)? Every lookup and insert of
//! an LRU hash is a chain of helper calls, and on this kernel every call and
//! return goes through a return thunk: the insert alone cost 220-750 ns per
//! new flow (free-list pops, shrinking over cold nodes), five times the rest
//! of the packet's path. An `ARRAY` lookup is inlined by the verifier into a
//! bounds check and an add, so probing and writing here is plain loads and
//! stores: no calls, no locks, no allocation.
//!
//! Layout: `slots = buckets * WAYS`, one 64-byte [`ConnSlot`] (one cache
//! line) per flow. A flow's 64-bit keyed hash names two buckets; it may live
//! in either. Inserting picks the bucket with more free ways (the "power of
//! two choices": at half load, 1 flow in 30,000 finds both full, against 1 in
//! 27 with one bucket), then the free or stalest way in it. Entries are never
//! deleted: a UDP entry goes stale after its timeout, a TCP entry when the
//! client's FIN or RST has been seen, and any entry when it is the least
//! recently used of the ways a new flow may take. A flow whose entry was
//! displaced is not broken: it falls back to the ring, which still holds its
//! backend unless the ring changed since (then the second chance applies).
//!
//! Concurrency: CPUs write slots without locks or ordering. A slot carries a
//! seal, a hash over everything a reader acts on (key and backend).
//! A reader that catches a slot mid-write, or a slot two CPUs wrote at once,
//! holds fields from different writes, whose seal does not match them (but
//! for a 2^-32 chance), and treats the slot as a miss: the flow takes the
//! ring, and a torn entry never sends a flow to another flow's backend.
//! Because validity is a property of the content, neither side needs
//! barriers. `last_seen` and `flags` are single aligned stores outside the
//! seal: a stale value there only changes which way is evicted first.
//!
//! Everything here runs unchanged in the XDP program (over the map) and on
//! the host (over a slice, in tests and in `lbctl explain`).

use crate::maps::FlowKey;

/// Ways per bucket.
pub const WAYS: u32 = 4;

/// `last_seen` counts ticks of 2^20 ns (1.05 ms) of `CLOCK_MONOTONIC`,
/// wrapping every 52 days; ages are compared with wrapping arithmetic.
pub const TICK_SHIFT: u32 = 20;

/// `ConnSlot::flags`: the client sent FIN or RST. The entry still steers the
/// flow's last packets, but it is the first to be reused.
pub const SLOT_CLOSING: u8 = 1;

/// How far back a closing entry's `last_seen` is set: older than any live
/// entry, so it is evicted first (about 9.8 days of ticks).
pub const CLOSING_AGE: u32 = 1 << 29;

/// One flow: 64 bytes, one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlot {
    /// `family` 0: an empty slot.
    pub key: FlowKey,
    pub backend_id: u32,
    /// Ticks (see [`TICK_SHIFT`]) of the flow's last packet.
    pub last_seen: u32,
    pub flags: u8,
    pub _pad: u8,
    /// The top 16 bits of the flow's hash: probing compares this first, and
    /// only reads the key of a slot whose tag matches.
    pub tag: u16,
    /// See the module comment; never 0 in a written slot.
    pub seal: u32,
    /// Keeps one slot per cache line.
    pub _reserved: [u8; 8],
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data with explicit padding.
unsafe impl aya::Pod for ConnSlot {}

/// Slot storage: the `CONNTRACK` map in the data plane, a slice on the host.
pub trait Slots {
    fn slot(&self, idx: u32) -> Option<&ConnSlot>;
    fn slot_mut(&mut self, idx: u32) -> Option<&mut ConnSlot>;
}

impl Slots for [ConnSlot] {
    fn slot(&self, idx: u32) -> Option<&ConnSlot> {
        self.get(idx as usize)
    }
    fn slot_mut(&mut self, idx: u32) -> Option<&mut ConnSlot> {
        self.get_mut(idx as usize)
    }
}

/// Where a flow may live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub hash: u64,
    /// First slot of each candidate bucket.
    pub buckets: [u32; 2],
}

/// Field-wise equality (a derived `==` on the arrays would call `memcmp`, a
/// slow byte loop in BPF).
#[inline(always)]
pub fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    // Eight-byte words: five live values per key rather than fourteen
    // fields, which the BPF backend would otherwise spill to the stack.
    (half(&a.src, 0) ^ half(&b.src, 0))
        | (half(&a.src, 8) ^ half(&b.src, 8))
        | (half(&a.dst, 0) ^ half(&b.dst, 0))
        | (half(&a.dst, 8) ^ half(&b.dst, 8))
        | (rest(a) ^ rest(b))
        == 0
}

#[inline(always)]
fn half(b: &[u8; 16], i: usize) -> u64 {
    u64::from_ne_bytes([
        b[i],
        b[i + 1],
        b[i + 2],
        b[i + 3],
        b[i + 4],
        b[i + 5],
        b[i + 6],
        b[i + 7],
    ])
}

/// Ports, protocol and family in one word.
#[inline(always)]
fn rest(k: &FlowKey) -> u64 {
    k.src_port as u64 | (k.dst_port as u64) << 16 | (k.proto as u64) << 32 | (k.family as u64) << 40
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
const fn absorb(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(K);
    h ^ (h >> 32)
}

/// Murmur3's 64-bit finaliser.
#[inline(always)]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Keyed 64-bit hash of a flow, local to one LB node: unlike the ring's
/// flow hash it need not agree with any peer, so each instance draws its own
/// random seed and a sender cannot aim flows at one bucket.
#[inline(always)]
pub fn table_hash(key: &FlowKey, seed: u64) -> u64 {
    // Eight-byte loads straight from the key: building a word array first
    // put it on the BPF stack, which the balancer cannot spare.
    let mut h = seed ^ K;
    h = absorb(h, half(&key.src, 0));
    h = absorb(h, half(&key.src, 8));
    h = absorb(h, half(&key.dst, 0));
    h = absorb(h, half(&key.dst, 8));
    h = absorb(h, rest(key));
    fmix64(h)
}

/// The two candidate buckets of `key`; `bucket_mask` is buckets - 1 (a power
/// of two minus one).
#[inline(always)]
pub fn probe(key: &FlowKey, seed: u64, bucket_mask: u32) -> Probe {
    let hash = table_hash(key, seed);
    Probe {
        hash,
        buckets: [
            (hash as u32 & bucket_mask) * WAYS,
            ((hash >> 32) as u32 & bucket_mask) * WAYS,
        ],
    }
}

/// The seal of a slot for a flow of hash `hash`. Never 0, so an all-zero
/// slot can never look sealed.
#[inline(always)]
pub fn seal(hash: u64, backend_id: u32) -> u32 {
    let mut h = (hash ^ (hash >> 29)) as u32;
    h ^= backend_id.wrapping_mul(0xcc9e_2d51);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h | 1
}

#[inline(always)]
pub const fn tag(hash: u64) -> u16 {
    (hash >> 48) as u16
}

impl ConnSlot {
    /// Whether this slot is a complete entry for `key` (whose probe hash is
    /// `hash`).
    #[inline(always)]
    pub fn holds(&self, key: &FlowKey, hash: u64) -> bool {
        self.tag == tag(hash)
            && same_flow(&self.key, key)
            && self.seal == seal(hash, self.backend_id)
    }

    /// Writes a complete entry.
    #[inline(always)]
    pub fn fill(&mut self, key: &FlowKey, hash: u64, backend_id: u32, now: u32) {
        self.key = *key;
        self.tag = tag(hash);
        self.backend_id = backend_id;
        self.last_seen = now;
        self.flags = 0;
        self.seal = seal(hash, backend_id);
    }

    /// A packet of the flow went through at `now`. Writes only what changed,
    /// so a busy flow dirties its line about once a millisecond.
    #[inline(always)]
    pub fn touch(&mut self, now: u32, closing: bool) {
        if self.flags & SLOT_CLOSING != 0 {
            return;
        }
        if closing {
            self.flags = SLOT_CLOSING;
            self.last_seen = now.wrapping_sub(CLOSING_AGE);
        } else if self.last_seen != now {
            self.last_seen = now;
        }
    }

    /// Whether a UDP entry has been idle for `udp_timeout` ticks (0: every
    /// packet starts a new flow).
    #[inline(always)]
    pub fn expired(&self, now: u32, udp_timeout: u32) -> bool {
        self.key.proto == crate::parse::IPPROTO_UDP
            && now.wrapping_sub(self.last_seen) >= udp_timeout
    }

    /// Empty, closing, or an expired UDP flow: reusing it breaks nothing.
    #[inline(always)]
    fn free(&self, now: u32, udp_timeout: u32) -> bool {
        self.key.family == 0 || self.flags & SLOT_CLOSING != 0 || self.expired(now, udp_timeout)
    }

    /// How much this slot deserves eviction: free ones first, then the least
    /// recently used.
    #[inline(always)]
    fn staleness(&self, now: u32, udp_timeout: u32) -> u32 {
        if self.free(now, udp_timeout) {
            u32::MAX
        } else {
            now.wrapping_sub(self.last_seen)
        }
    }
}

/// Index of the slot holding `key`, if any.
#[inline(always)]
pub fn find<S: Slots + ?Sized>(slots: &S, key: &FlowKey, p: &Probe) -> Option<u32> {
    find_in(slots, key, p.hash, p.buckets[0]).or_else(|| find_in(slots, key, p.hash, p.buckets[1]))
}

/// [`find`] in one bucket (`first` is its first slot).
#[inline(always)]
pub fn find_in<S: Slots + ?Sized>(slots: &S, key: &FlowKey, hash: u64, first: u32) -> Option<u32> {
    let mut way = 0;
    while way < WAYS {
        if let Some(s) = slots.slot(first + way)
            && s.holds(key, hash)
        {
            return Some(first + way);
        }
        way += 1;
    }
    None
}

/// Where a new entry for `key` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub idx: u32,
    /// The slot held another flow that was neither closing nor expired: the
    /// table is too small for the load.
    pub evicts_live: bool,
}

/// One bucket, seen by an insert.
struct BucketScan {
    free: u32,
    /// The stalest way and its staleness.
    stalest: u32,
    staleness: u32,
}

#[inline(always)]
fn scan<S: Slots + ?Sized>(
    slots: &S,
    first: u32,
    now: u32,
    udp_timeout: u32,
) -> Option<BucketScan> {
    let mut b = BucketScan {
        free: 0,
        stalest: first,
        staleness: 0,
    };
    let mut way = 0;
    while way < WAYS {
        let idx = first + way;
        let stale = slots.slot(idx)?.staleness(now, udp_timeout);
        if stale == u32::MAX {
            b.free += 1;
        }
        if way == 0 || stale > b.staleness {
            b.stalest = idx;
            b.staleness = stale;
        }
        way += 1;
    }
    Some(b)
}

/// Chooses the slot for a new entry of a flow that has none (callers reuse
/// the flow's own slot, from [`find`], when it has one): a slot of the bucket
/// with more free ways, the stalest way in it.
#[inline(always)]
pub fn place<S: Slots + ?Sized>(
    slots: &S,
    p: &Probe,
    now: u32,
    udp_timeout: u32,
) -> Option<Placement> {
    let a = scan(slots, p.buckets[0], now, udp_timeout)?;
    let b = scan(slots, p.buckets[1], now, udp_timeout)?;
    let pick = if b.free > a.free || (a.free == 0 && b.free == 0 && b.staleness > a.staleness) {
        b
    } else {
        a
    };
    Some(Placement {
        idx: pick.stalest,
        evicts_live: pick.staleness != u32::MAX,
    })
}

/// Ticks of a `CLOCK_MONOTONIC` time in ns.
#[inline(always)]
pub const fn ticks(ns: u64) -> u32 {
    (ns >> TICK_SHIFT) as u32
}

/// Whether a slot read from the table holds a complete entry (for counting
/// and listing; the data plane checks seals against the probing key).
pub fn in_use(s: &ConnSlot, seed: u64) -> bool {
    s.key.family != 0 && s.seal == seal(table_hash(&s.key, seed), s.backend_id)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    const SEED: u64 = 0x0123_4567_89ab_cdef;

    fn key(n: u32, proto: u8) -> FlowKey {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&n.to_be_bytes());
        FlowKey {
            src,
            dst: [7; 16],
            src_port: (n % 60000) as u16,
            dst_port: 443,
            proto,
            family: 4,
            _pad: [0; 2],
        }
    }

    /// The data plane's insert, in terms of this module: the flow's own slot
    /// if it has one, else a placement.
    fn insert(t: &mut [ConnSlot], mask: u32, k: &FlowKey, backend: u32, now: u32) -> Placement {
        let p = probe(k, SEED, mask);
        let at = match find(t, k, &p) {
            Some(idx) => Placement {
                idx,
                evicts_live: false,
            },
            None => place(t, &p, now, 1000).unwrap(),
        };
        t.slot_mut(at.idx).unwrap().fill(k, p.hash, backend, now);
        at
    }

    fn lookup(t: &[ConnSlot], mask: u32, k: &FlowKey) -> Option<u32> {
        let p = probe(k, SEED, mask);
        find(t, k, &p).map(|i| t[i as usize].backend_id)
    }

    #[test]
    fn layout() {
        assert_eq!(core::mem::size_of::<ConnSlot>(), 64);
    }

    #[test]
    fn equality_sees_every_field() {
        let a = key(1, 6);
        assert!(same_flow(&a, &a));
        for f in [
            |k: &mut FlowKey| k.dst[15] ^= 1,
            |k: &mut FlowKey| k.src[0] ^= 1,
            |k: &mut FlowKey| k.dst_port = 80,
            |k: &mut FlowKey| k.src_port ^= 1,
            |k: &mut FlowKey| k.proto = 17,
            |k: &mut FlowKey| k.family = 6,
        ] {
            let mut b = a;
            f(&mut b);
            assert!(!same_flow(&a, &b));
        }
    }

    #[test]
    fn insert_then_find() {
        let mask = 63;
        let mut t = vec![ConnSlot::default(); 64 * WAYS as usize];
        for n in 0..100 {
            insert(&mut t, mask, &key(n, 6), n + 1, 5);
        }
        for n in 0..100 {
            assert_eq!(lookup(&t, mask, &key(n, 6)), Some(n + 1));
        }
        assert_eq!(lookup(&t, mask, &key(100, 6)), None);
        assert_eq!(lookup(&t, mask, &key(1, 17)), None);
        assert_eq!(t.iter().filter(|s| in_use(s, SEED)).count(), 100);
    }

    #[test]
    fn a_flow_keeps_one_slot() {
        let mask = 15;
        let mut t = vec![ConnSlot::default(); 16 * WAYS as usize];
        let k = key(9, 6);
        let first = insert(&mut t, mask, &k, 1, 5).idx;
        // A SYN reusing the tuple, then a re-pick: same slot, new backend.
        assert_eq!(insert(&mut t, mask, &k, 2, 6).idx, first);
        assert_eq!(insert(&mut t, mask, &k, 3, 7).idx, first);
        assert_eq!(lookup(&t, mask, &k), Some(3));
        assert_eq!(t.iter().filter(|s| in_use(s, SEED)).count(), 1);
    }

    #[test]
    fn torn_slots_read_as_misses() {
        let mask = 0;
        let mut t = vec![ConnSlot::default(); WAYS as usize];
        let (a, b) = (key(1, 6), key(2, 6));
        let ia = insert(&mut t, mask, &a, 1, 5).idx as usize;
        let pb = probe(&b, SEED, mask);
        let mut written_b = ConnSlot::default();
        written_b.fill(&b, pb.hash, 2, 5);
        let written_a = t[ia];
        // A's key with any field of B's write (as a reader racing a writer,
        // or two writers, can see) never passes as A's entry.
        let mixes: [fn(&mut ConnSlot, &ConnSlot); 3] = [
            |s, o| s.backend_id = o.backend_id,
            |s, o| s.seal = o.seal,
            |s, o| s.tag = o.tag,
        ];
        for mix in mixes {
            let mut torn = written_a;
            mix(&mut torn, &written_b);
            t[ia] = torn;
            assert_eq!(lookup(&t, mask, &a), None);
        }
        // A zeroed seal never matches.
        let mut half = written_a;
        half.seal = 0;
        t[ia] = half;
        assert_eq!(lookup(&t, mask, &a), None);
        // Outside the seal: recency and flags do not invalidate.
        let mut touched = written_a;
        touched.touch(99, true);
        t[ia] = touched;
        assert_eq!(lookup(&t, mask, &a), Some(1));
    }

    #[test]
    fn the_stalest_way_goes_first() {
        // One bucket: both candidates are bucket 0.
        let mask = 0;
        let mut t = vec![ConnSlot::default(); WAYS as usize];
        for n in 0..WAYS {
            // Flow 2 is the least recently used.
            let now = if n == 2 { 10 } else { 20 + n };
            assert!(!insert(&mut t, mask, &key(n, 6), n + 1, now).evicts_live);
        }
        let at = insert(&mut t, mask, &key(50, 6), 99, 30);
        assert!(at.evicts_live);
        assert_eq!(lookup(&t, mask, &key(2, 6)), None);
        for n in [0, 1, 3] {
            assert_eq!(lookup(&t, mask, &key(n, 6)), Some(n + 1));
        }
    }

    #[test]
    fn closed_and_expired_flows_go_before_live_ones() {
        let mask = 0;
        let mut t = vec![ConnSlot::default(); WAYS as usize];
        // Flow 0 is the oldest, but flow 1 closed and flow 3 is UDP past its
        // timeout of 1000 ticks.
        insert(&mut t, mask, &key(0, 6), 1, 100);
        insert(&mut t, mask, &key(1, 6), 2, 5000);
        insert(&mut t, mask, &key(2, 6), 3, 5000);
        insert(&mut t, mask, &key(3, 17), 4, 3000);
        let p1 = probe(&key(1, 6), SEED, mask);
        let i1 = find(&t[..], &key(1, 6), &p1).unwrap();
        t[i1 as usize].touch(5001, true);
        // The closed flow is still steered.
        assert_eq!(lookup(&t, mask, &key(1, 6)), Some(2));
        let now = 5002;
        assert!(!insert(&mut t, mask, &key(10, 6), 11, now).evicts_live);
        assert!(!insert(&mut t, mask, &key(11, 6), 12, now).evicts_live);
        assert_eq!(lookup(&t, mask, &key(1, 6)), None);
        assert_eq!(lookup(&t, mask, &key(3, 17)), None);
        assert_eq!(lookup(&t, mask, &key(0, 6)), Some(1));
        // Now only live flows: the least recently used (flow 0) goes.
        assert!(insert(&mut t, mask, &key(12, 6), 13, now).evicts_live);
        assert_eq!(lookup(&t, mask, &key(0, 6)), None);
    }

    #[test]
    fn touch_keeps_a_closing_entry_old() {
        let mut s = ConnSlot::default();
        s.fill(&key(1, 6), 0, 1, 100);
        s.touch(200, false);
        assert_eq!(s.last_seen, 200);
        s.touch(300, true);
        assert_eq!(s.last_seen, 300u32.wrapping_sub(CLOSING_AGE));
        s.touch(400, false);
        assert_eq!(s.last_seen, 300u32.wrapping_sub(CLOSING_AGE));
        assert_eq!(s.flags, SLOT_CLOSING);
    }

    #[test]
    fn ages_survive_the_tick_counter_wrapping() {
        let mut t = vec![ConnSlot::default(); WAYS as usize];
        let before_wrap = u32::MAX - 5;
        insert(&mut t, 0, &key(1, 17), 1, before_wrap);
        let s = &t[find(&t[..], &key(1, 17), &probe(&key(1, 17), SEED, 0)).unwrap() as usize];
        assert!(!s.expired(before_wrap.wrapping_add(999), 1000));
        assert!(s.expired(before_wrap.wrapping_add(1000), 1000));
        assert!(s.expired(before_wrap, 0));
    }

    /// Flows that cannot all be held at once, at a given load: the table
    /// fills with live flows only (none ever closes), so every eviction is
    /// a live flow displaced by bucket pressure.
    fn displaced_at(load: f64) -> f64 {
        let buckets = 1u32 << 14;
        let mask = buckets - 1;
        let mut t = vec![ConnSlot::default(); (buckets * WAYS) as usize];
        let n = (load * (buckets * WAYS) as f64) as u32;
        let mut evicted = 0;
        for i in 0..n {
            if insert(&mut t, mask, &key(0x0a00_0000 + i, 6), 1, 100).evicts_live {
                evicted += 1;
            }
        }
        evicted as f64 / n as f64
    }

    #[test]
    fn two_choices_hold_nearly_every_flow_until_half_full() {
        assert!(displaced_at(0.25) == 0.0);
        let half = displaced_at(0.5);
        assert!(half < 2e-4, "{half}");
        let three_quarters = displaced_at(0.75);
        assert!(three_quarters < 0.02, "{three_quarters}");
    }

    #[test]
    fn buckets_spread_and_depend_on_the_seed() {
        let mask = 1023;
        let mut hist = vec![0u32; 1024];
        let mut moved = 0;
        for n in 0..(1024 * 16) {
            let k = key(0xc612_0000 + n, 6);
            let p = probe(&k, SEED, mask);
            hist[(p.buckets[0] / WAYS) as usize] += 1;
            if probe(&k, SEED + 1, mask).buckets != p.buckets {
                moved += 1;
            }
        }
        let max = *hist.iter().max().unwrap();
        assert!(max < 48, "busiest bucket holds {max} of a mean 16");
        assert!(moved > 1024 * 16 * 99 / 100);
        let seals: Vec<u32> = (0..1000)
            .map(|n| seal(table_hash(&key(n, 6), SEED), 1))
            .collect();
        assert!(seals.iter().all(|&s| s != 0));
    }
}
