//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4).
//!
//! The controller builds a VIP's ring with [`build`] and writes it into one
//! generation of `RINGS`; the data plane indexes it with
//! `flow_hash % ring size`. Every LB node must produce the same table from the
//! same configuration, so the table depends only on the set of backends,
//! the ring size and the seed, never on the order backends were configured.
//!
//! Weights: the paper's population loop lets every backend claim one slot
//! per round. Here a backend of weight `w` earns `w` credit per round and
//! claims a slot for every `max_weight` credit, so the heaviest backends
//! claim one slot per round and the others proportionally fewer. With equal
//! weights this is exactly the paper's algorithm, and so inherits its
//! balance (every backend gets `floor(m/N)` or `ceil(m/N)` slots) and its
//! near-minimal disruption.

use core::fmt;
use core::net::{Ipv4Addr, Ipv6Addr};

#[cfg(any(test, feature = "std"))]
use std::{cmp::Reverse, collections::BTreeMap, collections::BinaryHeap, vec, vec::Vec};

#[cfg(any(test, feature = "std"))]
use crate::hash::maglev_offset_skip;

/// The size the paper evaluates and Katran defaults to, prime; the default
/// before ring sizes were chosen from the backend capacity ("auto"). A fleet
/// that must keep its rings through an upgrade sets it explicitly.
pub const CLASSIC_RING_SIZE: u32 = 65537;

/// The smallest size for which a permutation exists (skip must lie in
/// `[1, m)`).
pub const MIN_RING_SIZE: u32 = 2;

/// Largest accepted ring size, a prime. Each VIP holds two generations of
/// `u32` slots in `RINGS` (16 to an element), so this is 8 MB of locked
/// kernel memory per VIP; it still gives 100 slots per backend to 10,000
/// backends.
pub const MAX_RING_SIZE: u32 = 1_000_003;

/// Slots per backend an automatic ring size provides: the paper's figure,
/// below which one backend's share of the ring is coarse (1% of it per
/// slot).
pub const SLOTS_PER_BACKEND: u32 = 100;

/// The default backend capacity of a VIP, which sizes an automatic ring.
pub const DEFAULT_MAX_BACKENDS_PER_VIP: u32 = 1000;

/// The largest capacity an automatic ring size serves: 100 slots for each
/// fits in [`MAX_RING_SIZE`].
pub const MAX_AUTO_BACKENDS: u32 = MAX_RING_SIZE / SLOTS_PER_BACKEND;

/// The default ring size: automatic, for [`DEFAULT_MAX_BACKENDS_PER_VIP`]
/// (100,003).
pub const DEFAULT_RING_SIZE: u32 = auto_ring_size(DEFAULT_MAX_BACKENDS_PER_VIP);

/// The automatic ring size for VIPs of up to `capacity` backends: the
/// smallest prime at least [`SLOTS_PER_BACKEND`] times it, at most
/// [`MAX_RING_SIZE`]. It depends on the capacity alone, never on the
/// backends present, so backends coming and going never resize a ring (a
/// new size moves nearly every slot).
pub const fn auto_ring_size(capacity: u32) -> u32 {
    prime_at_least(capacity.saturating_mul(SLOTS_PER_BACKEND))
}

const _: () = assert!(
    is_prime(CLASSIC_RING_SIZE)
        && is_prime(MAX_RING_SIZE)
        && DEFAULT_RING_SIZE == 100_003
        && auto_ring_size(MAX_AUTO_BACKENDS) == MAX_RING_SIZE
);

/// Deterministic primality test (trial division by 6k +- 1; at most ~11,000
/// divisions for any `u32`, cheap next to building a ring).
pub const fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // u64: i * i overflows u32 for the largest candidates.
    let n = n as u64;
    let mut i = 5u64;
    while i * i <= n {
        if n.is_multiple_of(i) || n.is_multiple_of(i + 2) {
            return false;
        }
        i += 6;
    }
    true
}

/// One backend as the ring builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Value stored in the table's slots (the `BACKENDS` index); 0 is
    /// reserved for "no backend".
    pub id: u32,
    /// The backend's address (IPv4 in the first 4 bytes, the rest zero). It,
    /// not `id`, decides the backend's permutation, so re-numbering backends
    /// does not reshuffle the ring.
    pub identity: [u8; 16],
    /// Relative share of the ring; 0 drains the backend (no slots).
    pub weight: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaglevError {
    NotPrime(u32),
    TooLarge { size: u32, max: u32 },
    TooSmall(u32),
    ZeroId,
    DuplicateIdentity([u8; 16]),
    DuplicateId(u32),
    TooManyBackends { backends: usize, size: u32 },
}

/// The smallest prime `>= n` that is a valid ring size (at most
/// [`MAX_RING_SIZE`]). Terminates because `MAX_RING_SIZE` is prime.
pub const fn prime_at_least(n: u32) -> u32 {
    let mut c = if n < MIN_RING_SIZE {
        MIN_RING_SIZE
    } else if n > MAX_RING_SIZE {
        MAX_RING_SIZE
    } else {
        n
    };
    while !is_prime(c) {
        c += 1;
    }
    c
}

/// Shows an identity the way the operator wrote it. Identities carry no
/// address family, so an IPv6 address whose last 12 bytes are zero is shown
/// in IPv4 form.
struct Identity<'a>(&'a [u8; 16]);

impl fmt::Display for Identity<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] => Ipv4Addr::new(a, b, c, d).fmt(f),
            bytes => Ipv6Addr::from(bytes).fmt(f),
        }
    }
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotPrime(n) => write!(
                f,
                "ring size {n} is not prime; use a prime such as {}",
                prime_at_least(n)
            ),
            Self::TooLarge { size, max } => write!(
                f,
                "ring size {size} is larger than the maximum {max}; \
                 each slot costs kernel memory for every VIP"
            ),
            Self::TooSmall(n) => write!(
                f,
                "ring size {n} is too small; the minimum is {MIN_RING_SIZE} \
                 and the default is \"auto\""
            ),
            Self::ZeroId => {
                f.write_str("backend id 0 is reserved for \"no backend\"; ids start at 1")
            }
            Self::DuplicateIdentity(ref addr) => write!(
                f,
                "backend address {} is listed more than once",
                Identity(addr)
            ),
            Self::DuplicateId(id) => write!(f, "backend id {id} is used by more than one backend"),
            Self::TooManyBackends { backends, size } => write!(
                f,
                "{backends} active backends do not fit in a ring of {size} slots; \
                 use a larger ring size (at least 100 slots per backend keeps the load even)"
            ),
        }
    }
}

#[cfg(any(test, feature = "std"))]
impl std::error::Error for MaglevError {}

/// Checks a ring size on its own, so configuration can be validated before
/// any backend is known.
pub fn check_ring_size(m: u32) -> Result<(), MaglevError> {
    if m < MIN_RING_SIZE {
        Err(MaglevError::TooSmall(m))
    } else if m > MAX_RING_SIZE {
        Err(MaglevError::TooLarge {
            size: m,
            max: MAX_RING_SIZE,
        })
    } else if !is_prime(m) {
        Err(MaglevError::NotPrime(m))
    } else {
        Ok(())
    }
}

/// The slots taken so far, one bit each: 8 KiB for 65,537 slots, so the
/// walks' probes stay in the L1 cache where the table itself (256 KiB) does
/// not.
#[cfg(any(test, feature = "std"))]
struct Taken {
    words: Vec<u64>,
}

#[cfg(any(test, feature = "std"))]
impl Taken {
    fn new(m: u32) -> Self {
        Taken {
            words: vec![0; (m as usize).div_ceil(64)],
        }
    }

    /// 1 if slot `p` is taken, else 0.
    #[inline(always)]
    fn get(&self, p: u32) -> u64 {
        (self.words[(p >> 6) as usize] >> (p & 63)) & 1
    }

    /// The free slots below `m`, in order.
    fn free(&self, m: u32) -> Vec<u32> {
        let mut free = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut open = !word;
            while open != 0 {
                let q = (w as u32) << 6 | open.trailing_zeros();
                if q >= m {
                    return free;
                }
                free.push(q);
                open &= open - 1;
            }
        }
        free
    }

    #[inline(always)]
    fn set(&mut self, p: u32) {
        self.words[(p >> 6) as usize] |= 1u64 << (p & 63);
    }
}

/// Every backend's walk through its permutation of the slots, as parallel
/// arrays (the claim loop reads one `u32` of each per claim).
#[cfg(any(test, feature = "std"))]
struct Walks {
    m: u32,
    ids: Vec<u32>,
    pos: Vec<u32>,
    skip: Vec<u32>,
    taken: Taken,
    table: Vec<u32>,
    /// Slots still free.
    free_count: u32,
    /// From this many free slots on, claims are found arithmetically
    /// ([`Walks::claim_late`]) instead of by walking.
    late_from: u32,
    /// The free slots, listed once the late phase starts.
    free: Vec<u32>,
    /// Each backend's skip inverted modulo `m`, 0 until first needed.
    skip_inverse: Vec<u32>,
}

/// `a + b` modulo `m`, for `a, b < m <= MAX_RING_SIZE` (no overflow).
#[cfg(any(test, feature = "std"))]
#[inline(always)]
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    let s = a + b;
    if s >= m { s - m } else { s }
}

/// `a * b mod m` for `a, b < m <= MAX_RING_SIZE` (products < 2^40), with
/// `per_m = 1 / m`: the quotient through f64 (exact to 2^53) is off by at
/// most one, and the remainder is corrected into [0, m). A division per
/// free slot would cost several times as much.
#[cfg(any(test, feature = "std"))]
#[inline(always)]
fn mul_mod(a: u32, b: u64, m: u32, per_m: f64) -> u32 {
    let product = u64::from(a) * b;
    let quotient = (product as f64 * per_m) as u64;
    let mut r = product as i64 - (quotient * u64::from(m)) as i64;
    if r < 0 {
        r += i64::from(m);
    } else if r >= i64::from(m) {
        r -= i64::from(m);
    }
    r as u32
}

/// The inverse of `s` modulo the prime `m` (`0 < s < m`), by the extended
/// Euclidean algorithm.
#[cfg(any(test, feature = "std"))]
fn inverse_mod(s: u32, m: u32) -> u32 {
    let (mut r0, mut r1) = (i64::from(m), i64::from(s));
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i64::from(m)) as u32
}

#[cfg(any(test, feature = "std"))]
impl Walks {
    fn new(m: u32, n: usize) -> Self {
        Walks {
            m,
            ids: Vec::with_capacity(n),
            pos: Vec::with_capacity(n),
            skip: Vec::with_capacity(n),
            taken: Taken::new(m),
            table: vec![0u32; m as usize],
            free_count: m,
            // A walk costs about m / free probes and the late claim one
            // multiplication per free slot; they cross near sqrt(m), and
            // half of that measured fastest (128 at 65,537 slots).
            late_from: m.isqrt() / 2,
            free: Vec::new(),
            skip_inverse: vec![0; n],
        }
    }

    /// Backend `i` takes the next free slot of its permutation.
    #[inline(always)]
    fn claim(&mut self, i: usize) {
        if self.free_count <= self.late_from {
            self.claim_late(i);
        } else {
            self.claim_walking(i);
        }
        self.free_count -= 1;
    }

    #[inline(always)]
    fn claim_walking(&mut self, i: usize) {
        let m = self.m;
        let skip = self.skip[i];
        let mut p = self.pos[i];
        // Terminates: m is prime, so the walk visits every slot, and at
        // least one is still free. Two probes per step, one branch: whether
        // a probe finds its slot free is a coin toss in mid-fill, so
        // branching on each probe mispredicts about once per claim.
        let skip2 = add_mod(skip, skip, m);
        let slot = loop {
            let next = add_mod(p, skip, m);
            let here = self.taken.get(p);
            let there = self.taken.get(next);
            if here & there == 0 {
                break if here == 0 { p } else { next };
            }
            p = add_mod(p, skip2, m);
        };
        self.taken.set(slot);
        self.table[slot as usize] = self.ids[i];
        self.pos[i] = add_mod(slot, skip, m);
    }

    /// The last few claims walk about m / free slots each (most of a
    /// build's probes at 1,000 backends). Backend `i`'s walk from `p`
    /// reaches slot `f` after `(f - p) / skip` steps (mod m, prime), so its
    /// claim is the free slot with the fewest steps: the slot the walk would
    /// find, found with one multiplication per free slot.
    fn claim_late(&mut self, i: usize) {
        let m = self.m;
        if self.free.is_empty() {
            self.free = self.taken.free(m);
        }
        if self.skip_inverse[i] == 0 {
            self.skip_inverse[i] = inverse_mod(self.skip[i], m);
        }
        let inverse = u64::from(self.skip_inverse[i]);
        let p = self.pos[i];
        let per_m = 1.0 / f64::from(m);
        let mut best = (u32::MAX, 0usize);
        for (at, &f) in self.free.iter().enumerate() {
            let distance = if f >= p { f - p } else { f + m - p };
            let steps = mul_mod(distance, inverse, m, per_m);
            if steps < best.0 {
                best = (steps, at);
            }
        }
        let slot = self.free.swap_remove(best.1);
        self.taken.set(slot);
        self.table[slot as usize] = self.ids[i];
        self.pos[i] = add_mod(slot, self.skip[i], m);
    }
}

/// Builds a Maglev table of `m` slots, each holding the id of a backend with
/// non-zero weight, each backend's share proportional to its weight. All
/// zeros when no backend has weight. The same set of backends gives the same
/// table whatever their order.
///
/// A backend whose share is below one slot (e.g. weight 1 next to weight
/// 1,000,000 in 65,537 slots) may get none.
#[cfg(any(test, feature = "std"))]
pub fn build(backends: &[MaglevBackend], m: u32, seed: u32) -> Result<Vec<u32>, MaglevError> {
    check_ring_size(m)?;

    // Sorting by identity makes the result independent of input order, and
    // makes the reported duplicate deterministic too.
    let mut sorted: Vec<&MaglevBackend> = backends.iter().collect();
    sorted.sort_unstable_by_key(|b| b.identity);
    if sorted.iter().any(|b| b.id == 0) {
        return Err(MaglevError::ZeroId);
    }
    if let Some(pair) = sorted.windows(2).find(|p| p[0].identity == p[1].identity) {
        return Err(MaglevError::DuplicateIdentity(pair[0].identity));
    }
    let mut ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|p| p[0] == p[1]) {
        return Err(MaglevError::DuplicateId(pair[0]));
    }

    sorted.retain(|b| b.weight > 0);
    if sorted.is_empty() {
        return Ok(vec![0u32; m as usize]);
    }
    if sorted.len() > m as usize {
        return Err(MaglevError::TooManyBackends {
            backends: sorted.len(),
            size: m,
        });
    }

    // Offset and skip are computed once per backend, never per slot.
    let n = sorted.len();
    let mut walks = Walks::new(m, n);
    for b in &sorted {
        let (offset, skip) = maglev_offset_skip(&b.identity, m, seed);
        walks.ids.push(b.id);
        walks.pos.push(offset);
        walks.skip.push(skip);
    }
    let weights: Vec<u64> = sorted.iter().map(|b| u64::from(b.weight)).collect();
    let max_weight = weights.iter().copied().max().unwrap_or(1);
    let total_weight: u64 = weights.iter().sum();

    // The order of claims, the same in all three loops: a backend of weight
    // w earns w credit per round and claims its k-th slot in round
    // ceil(k * max_weight / w) (at most one per round, as w <= max_weight);
    // within a round backends claim in identity order.
    if weights.iter().all(|&w| w == max_weight) {
        // Equal weights (the common case): every backend claims once per
        // round, which is the paper's algorithm.
        'rounds: loop {
            for i in 0..n {
                walks.claim(i);
                if walks.free_count == 0 {
                    break 'rounds;
                }
            }
        }
    } else if n as u64 * max_weight <= 4 * total_weight {
        // Weights within a small factor of each other: rounds over every
        // backend cost about m * max_weight / mean weight steps, less than
        // a priority queue's log N per claim.
        let mut credit = vec![0u64; n];
        'credit: loop {
            for i in 0..n {
                credit[i] += weights[i];
                if credit[i] >= max_weight {
                    credit[i] -= max_weight;
                    walks.claim(i);
                    if walks.free_count == 0 {
                        break 'credit;
                    }
                }
            }
        }
    } else {
        // Very uneven weights: an event queue of (round, index) replays the
        // same order without visiting idle backends in every round, which
        // would cost O(m * N). k <= m + 1 < 2^20 and weights < 2^32, so the
        // products fit in u64.
        let due = |k: u64, weight: u64| (k * max_weight).div_ceil(weight);
        let mut placed = vec![0u64; n];
        let mut queue: BinaryHeap<Reverse<(u64, usize)>> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Reverse((due(1, w), i)))
            .collect();
        for _ in 0..m {
            let Some(Reverse((_, i))) = queue.pop() else {
                break;
            };
            walks.claim(i);
            placed[i] += 1;
            queue.push(Reverse((due(placed[i] + 1, weights[i]), i)));
        }
    }
    Ok(walks.table)
}

/// Number of slots per value in `table` (0 counts empty slots).
#[cfg(any(test, feature = "std"))]
pub fn slot_counts(table: &[u32]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for &id in table {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    const M: u32 = CLASSIC_RING_SIZE;

    /// Backend `i` (1-based id) at 198.18.(i/256).(i%256).
    fn backend(i: u32, weight: u32) -> MaglevBackend {
        let mut identity = [0u8; 16];
        identity[..4].copy_from_slice(&[198, 18, (i >> 8) as u8, i as u8]);
        MaglevBackend {
            id: i,
            identity,
            weight,
        }
    }

    fn equal(n: u32) -> Vec<MaglevBackend> {
        (1..=n).map(|i| backend(i, 1)).collect()
    }

    /// Fraction of all slots whose value differs between the two tables.
    fn disruption(a: &[u32], b: &[u32]) -> f64 {
        let moved = a.iter().zip(b).filter(|(x, y)| x != y).count();
        moved as f64 / a.len() as f64
    }

    /// Fisher-Yates with SplitMix64, to shuffle without a dependency.
    fn shuffle<T>(items: &mut [T], mut state: u64) {
        for i in (1..items.len()).rev() {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            items.swap(i, (z % (i as u64 + 1)) as usize);
        }
    }

    /// The builder as it was before the claim loops were rewritten for
    /// speed (a priority queue of every claim, a modulo-free walk over the
    /// table itself), kept as the reference: a fleet upgraded node by node
    /// must build identical tables.
    fn reference_build(backends: &[MaglevBackend], m: u32, seed: u32) -> Vec<u32> {
        struct Cursor {
            id: u32,
            weight: u64,
            placed: u64,
            pos: u32,
            skip: u32,
        }
        let mut sorted: Vec<&MaglevBackend> = backends.iter().collect();
        sorted.sort_unstable_by_key(|b| b.identity);
        sorted.retain(|b| b.weight > 0);
        let mut table = vec![0u32; m as usize];
        if sorted.is_empty() {
            return table;
        }
        let mut cursors: Vec<Cursor> = sorted
            .iter()
            .map(|b| {
                let (offset, skip) = maglev_offset_skip(&b.identity, m, seed);
                Cursor {
                    id: b.id,
                    weight: b.weight.into(),
                    placed: 0,
                    pos: offset,
                    skip,
                }
            })
            .collect();
        let max_weight = cursors.iter().map(|c| c.weight).max().unwrap_or(1);
        let due = |k: u64, weight: u64| (k * max_weight).div_ceil(weight);
        let mut queue: BinaryHeap<Reverse<(u64, usize)>> = cursors
            .iter()
            .enumerate()
            .map(|(i, c)| Reverse((due(1, c.weight), i)))
            .collect();
        for _ in 0..m {
            let Some(Reverse((_, i))) = queue.pop() else {
                break;
            };
            let c = &mut cursors[i];
            while table[c.pos as usize] != 0 {
                c.pos = (c.pos + c.skip) % m;
            }
            table[c.pos as usize] = c.id;
            c.pos = (c.pos + c.skip) % m;
            c.placed += 1;
            queue.push(Reverse((due(c.placed + 1, c.weight), i)));
        }
        table
    }

    /// FNV-1a 64 over the table's little-endian bytes.
    fn fnv(table: &[u32]) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in table.iter().flat_map(|v| v.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// Every claim loop (equal weights, close weights, very uneven weights)
    /// builds exactly the table the previous builder did.
    #[test]
    fn tables_are_unchanged() {
        let uneven = |n: u32| -> Vec<MaglevBackend> {
            (1..=n)
                .map(|i| backend(i, if i == 1 { 1_000_000 } else { 1 + i % 7 }))
                .collect()
        };
        let close =
            |n: u32| -> Vec<MaglevBackend> { (1..=n).map(|i| backend(i, 50 + i % 51)).collect() };
        let mut cases = 0;
        for m in [2u32, 3, 7, 13, 97, 1009, 10007, 65537, 100_003] {
            for n in [1u32, 2, 3, 10, 100, 1000] {
                if n > m {
                    continue;
                }
                for (seed, backends) in [
                    (0, equal(n)),
                    (7, equal(n)),
                    (3, close(n)),
                    (5, uneven(n)),
                    (0, (1..=n).map(|i| backend(i, 100 * (1 + i % 2))).collect()),
                ] {
                    let mut drained = backends.clone();
                    if n > 2 {
                        drained[1].weight = 0;
                    }
                    for b in [backends, drained] {
                        assert_eq!(
                            build(&b, m, seed).unwrap(),
                            reference_build(&b, m, seed),
                            "m={m} n={n} seed={seed}"
                        );
                        cases += 1;
                    }
                }
            }
        }
        println!("{cases} tables identical to the reference builder");
        // And against tables hashed when the reference was the builder, in
        // case both ever drift together.
        let golden = [
            (fnv(&build(&equal(10), M, 0).unwrap()), GOLDEN[0]),
            (fnv(&build(&equal(100), M, 1).unwrap()), GOLDEN[1]),
            (fnv(&build(&equal(1000), M, 0).unwrap()), GOLDEN[2]),
            (fnv(&build(&close(100), 1009, 3).unwrap()), GOLDEN[3]),
            (fnv(&build(&uneven(1000), 100_003, 5).unwrap()), GOLDEN[4]),
        ];
        for (i, (got, want)) in golden.iter().enumerate() {
            assert_eq!(got, want, "golden table {i}: {got:#018x}");
        }
    }

    /// The largest ring, where the late phase's arithmetic is tightest.
    #[test]
    fn largest_ring_is_unchanged() {
        let b = equal(1000);
        assert_eq!(
            build(&b, MAX_RING_SIZE, 3).unwrap(),
            reference_build(&b, MAX_RING_SIZE, 3)
        );
    }

    /// FNV-1a of five tables built by the builder before this rewrite
    /// (`git show 9c9f97a:lb-common/src/maglev.rs`).
    const GOLDEN: [u64; 5] = [
        0xfd2a_2638_eee9_3f6e,
        0x4c01_5323_c3a2_c650,
        0x84b2_8a65_5558_1ac9,
        0x7ce8_bcfb_2803_ca1e,
        0x5d78_2067_0e8d_de74,
    ];

    #[test]
    fn skips_invert() {
        for m in [2u32, 3, 13, 1009, CLASSIC_RING_SIZE, 100_003, MAX_RING_SIZE] {
            for s in [1, 2, m / 3 + 1, m / 2, m - 2, m - 1] {
                if (1..m).contains(&s) {
                    let inv = inverse_mod(s, m);
                    assert!(inv > 0 && inv < m);
                    assert_eq!(
                        u64::from(s) * u64::from(inv) % u64::from(m),
                        1,
                        "{s} mod {m}"
                    );
                }
            }
        }
    }

    /// The f64 shortcut against exact arithmetic, where it is tightest: the
    /// largest ring and the largest operands.
    #[test]
    fn mul_mod_is_exact() {
        for m in [2u32, 13, CLASSIC_RING_SIZE, 100_003, MAX_RING_SIZE] {
            let per_m = 1.0 / f64::from(m);
            let mut values = vec![0u32, 1, 2, m / 2, m - 2, m - 1];
            let mut x = 0x9e37_79b9u32;
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                values.push(x % m);
            }
            values.retain(|&v| v < m);
            for &a in &values {
                for &b in values.iter().step_by(37) {
                    let exact = (u64::from(a) * u64::from(b) % u64::from(m)) as u32;
                    assert_eq!(
                        mul_mod(a, u64::from(b), m, per_m),
                        exact,
                        "{a} * {b} mod {m}"
                    );
                }
            }
        }
    }

    #[test]
    fn free_slots_are_listed_in_order() {
        let mut taken = Taken::new(130);
        for p in (0..130).filter(|p| p % 3 != 0) {
            taken.set(p);
        }
        assert_eq!(
            taken.free(130),
            (0..130).filter(|p| p % 3 == 0).collect::<Vec<_>>()
        );
        // Bits past m in the last word are not slots.
        assert_eq!(Taken::new(65).free(65), (0..65).collect::<Vec<_>>());
    }

    /// Late claims (found arithmetically) agree with walking: every size's
    /// build is compared with the reference builder in `tables_are_unchanged`;
    /// here the late phase is the whole build.
    #[test]
    fn late_claims_find_the_walked_slot() {
        for (m, n) in [(13u32, 3u32), (1009, 10), (10007, 100)] {
            let b = equal(n);
            let mut walks = Walks::new(m, b.len());
            walks.late_from = m;
            for x in &b {
                let (offset, skip) = maglev_offset_skip(&x.identity, m, 0);
                walks.ids.push(x.id);
                walks.pos.push(offset);
                walks.skip.push(skip);
            }
            for k in 0..m as usize {
                walks.claim(k % b.len());
            }
            assert_eq!(walks.table, reference_build(&b, m, 0), "m={m} n={n}");
        }
    }

    #[test]
    fn primes() {
        // Against a sieve for every small n.
        const LIMIT: usize = 100_000;
        let mut sieve = vec![true; LIMIT];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..LIMIT {
            if sieve[i] {
                for j in (i * i..LIMIT).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &p) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), p, "{n}");
        }
        assert!(is_prime(65537));
        assert!(!is_prime(65536));
        assert!(is_prime(1_000_003));
        assert!(!is_prime(1_000_001));
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(65521 * 65519)); // product of two large primes
    }

    #[test]
    fn ring_size_errors() {
        let b = equal(3);
        assert_eq!(build(&b, 65536, 0), Err(MaglevError::NotPrime(65536)));
        assert_eq!(
            MaglevError::NotPrime(65536).to_string(),
            "ring size 65536 is not prime; use a prime such as 65537"
        );
        assert_eq!(
            MaglevError::NotPrime(1000).to_string(),
            "ring size 1000 is not prime; use a prime such as 1009"
        );
        assert_eq!(
            build(&b, 16_777_259, 0),
            Err(MaglevError::TooLarge {
                size: 16_777_259,
                max: MAX_RING_SIZE
            })
        );
        assert_eq!(
            build(&b, MAX_RING_SIZE + 1, 0),
            Err(MaglevError::TooLarge {
                size: MAX_RING_SIZE + 1,
                max: MAX_RING_SIZE
            })
        );
        assert_eq!(build(&b, 0, 0), Err(MaglevError::TooSmall(0)));
        assert_eq!(build(&b, 1, 0), Err(MaglevError::TooSmall(1)));
        assert_eq!(check_ring_size(2), Ok(()));
        assert_eq!(check_ring_size(MAX_RING_SIZE), Ok(()));
        assert_eq!(check_ring_size(M), Ok(()));
    }

    #[test]
    fn backend_errors() {
        let mut b = equal(3);
        b[1].id = 0;
        assert_eq!(build(&b, M, 0), Err(MaglevError::ZeroId));

        let mut b = equal(3);
        b[2].id = 1;
        assert_eq!(build(&b, M, 0), Err(MaglevError::DuplicateId(1)));
        assert_eq!(
            MaglevError::DuplicateId(1).to_string(),
            "backend id 1 is used by more than one backend"
        );

        // Drained backends are still part of the configuration.
        let mut b = equal(3);
        b[2].identity = b[0].identity;
        b[2].weight = 0;
        let err = build(&b, M, 0).unwrap_err();
        assert_eq!(err, MaglevError::DuplicateIdentity(b[0].identity));
        assert_eq!(
            err.to_string(),
            "backend address 198.18.0.1 is listed more than once"
        );
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[0xfd, 0, 0x01, 0x98]);
        v6[15] = 1;
        assert_eq!(
            MaglevError::DuplicateIdentity(v6).to_string(),
            "backend address fd00:198::1 is listed more than once"
        );

        assert_eq!(
            build(&equal(8), 7, 0),
            Err(MaglevError::TooManyBackends {
                backends: 8,
                size: 7
            })
        );
        // Drained backends take no slots, so they do not count.
        let mut b = equal(8);
        b[0].weight = 0;
        assert!(build(&b, 7, 0).is_ok());
    }

    #[test]
    fn equal_weights_balance_exactly() {
        for n in [1u32, 2, 3, 7, 100] {
            let table = build(&equal(n), M, 0).unwrap();
            assert_eq!(table.len(), M as usize);
            let counts = slot_counts(&table);
            assert_eq!(
                counts.len(),
                n as usize,
                "every backend present, no empty slot"
            );
            let (lo, hi) = (M / n, M.div_ceil(n));
            for (&id, &c) in &counts {
                assert!((1..=n).contains(&id));
                assert!(
                    (lo as usize..=hi as usize).contains(&c),
                    "n={n}: backend {id} has {c} slots, want {lo}..={hi}"
                );
            }
            let min = counts.values().min().unwrap();
            let max = counts.values().max().unwrap();
            println!("N={n}: slots per backend {min}..={max}");
        }
        // A ring barely bigger than the backend count.
        let counts = slot_counts(&build(&equal(3), 7, 0).unwrap());
        let mut c: Vec<usize> = counts.values().copied().collect();
        c.sort();
        assert_eq!(c, [2, 2, 3]);
    }

    fn assert_weighted(weights: &[u32]) {
        let backends: Vec<MaglevBackend> = weights
            .iter()
            .zip(1..)
            .map(|(&w, i)| backend(i, w))
            .collect();
        let counts = slot_counts(&build(&backends, M, 0).unwrap());
        let total: u32 = weights.iter().sum();
        for b in &backends {
            let want = b.weight as f64 / total as f64;
            let got = counts[&b.id] as f64 / M as f64;
            let err = (got - want).abs() / want;
            println!(
                "weights {weights:?}: weight {} has {} slots, share {got:.5} vs {want:.5} ({:+.3}%)",
                b.weight,
                counts[&b.id],
                (got - want) / want * 100.0
            );
            assert!(err <= 0.01, "weight {}: share {got} vs {want}", b.weight);
        }
    }

    #[test]
    fn weights_are_proportional() {
        assert_weighted(&[1, 2, 3, 4]);
        assert_weighted(&[1, 10]);
        assert_weighted(&[100, 1000, 250, 7]);
    }

    #[test]
    fn drained_backends_get_no_slots() {
        let mut b = equal(5);
        b[2].weight = 0;
        let counts = slot_counts(&build(&b, M, 0).unwrap());
        assert!(!counts.contains_key(&b[2].id));
        assert_eq!(counts.len(), 4);

        for b in &mut b {
            b.weight = 0;
        }
        assert!(build(&b, M, 0).unwrap().iter().all(|&id| id == 0));
        assert!(build(&[], M, 0).unwrap().iter().all(|&id| id == 0));
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut b: Vec<MaglevBackend> = (1..=50).map(|i| backend(i, 1 + i % 4)).collect();
        let table = build(&b, M, 7).unwrap();
        for round in 0..5 {
            shuffle(&mut b, round);
            assert_eq!(build(&b, M, 7).unwrap(), table);
        }
    }

    #[test]
    fn seed_changes_table() {
        let b = equal(10);
        let a = build(&b, M, 1).unwrap();
        let c = build(&b, M, 2).unwrap();
        // Unrelated tables agree on about 1/N of the slots.
        let d = disruption(&a, &c);
        assert!(d > 0.8, "only {d} of slots changed with the seed");
    }

    #[test]
    fn removing_a_backend_moves_few_slots() {
        const N: u32 = 100;
        let all = equal(N);
        let before = build(&all, M, 0).unwrap();
        let mut worst: f64 = 0.0;
        for removed in [1, 37, 100] {
            let rest: Vec<MaglevBackend> =
                all.iter().copied().filter(|b| b.id != removed).collect();
            let after = build(&rest, M, 0).unwrap();
            let d = disruption(&before, &after);
            println!(
                "remove 1 of {N}: {:.3}% of slots changed (ideal {:.3}%, bound {:.3}%)",
                d * 100.0,
                100.0 / N as f64,
                200.0 / N as f64
            );
            assert!(!after.contains(&removed));
            assert!(d <= 2.0 / N as f64, "disruption {d}");
            worst = worst.max(d);
        }
        // Draining (weight 0) is the same as removing.
        let mut drained = all.clone();
        drained[36].weight = 0;
        let rest: Vec<MaglevBackend> = all.iter().copied().filter(|b| b.id != 37).collect();
        assert_eq!(build(&drained, M, 0).unwrap(), build(&rest, M, 0).unwrap());
        println!("worst removal disruption {:.3}%", worst * 100.0);
    }

    #[test]
    fn adding_a_backend_moves_few_slots() {
        const N: u32 = 100;
        let before = build(&equal(N), M, 0).unwrap();
        let after = build(&equal(N + 1), M, 0).unwrap();
        let d = disruption(&before, &after);
        println!(
            "add 1 to {N}: {:.3}% of slots changed (ideal {:.3}%, bound {:.3}%)",
            d * 100.0,
            100.0 / (N + 1) as f64,
            200.0 / (N + 1) as f64
        );
        assert!(d <= 2.0 / (N + 1) as f64, "disruption {d}");
    }

    #[test]
    fn changing_a_weight_moves_few_slots() {
        const N: u32 = 100;
        let mut b: Vec<MaglevBackend> = (1..=N).map(|i| backend(i, 100)).collect();
        let before = build(&b, M, 0).unwrap();
        b[10].weight = 50;
        let after = build(&b, M, 0).unwrap();
        let d = disruption(&before, &after);
        // The backend gives up half of its ~1% share.
        println!("halve 1 of {N} weights: {:.3}% of slots changed", d * 100.0);
        assert!(d <= 2.0 / N as f64, "disruption {d}");
    }

    #[test]
    fn many_backends() {
        const N: u32 = 1000;
        let start = std::time::Instant::now();
        let table = build(&equal(N), M, 0).unwrap();
        println!("build M={M} N={N}: {:?}", start.elapsed());
        let counts = slot_counts(&table);
        assert_eq!(counts.len(), N as usize);
        assert!(counts.values().all(|&c| c == 65 || c == 66));

        // Very uneven weights used to mean M rounds over N idle backends.
        let mut b: Vec<MaglevBackend> = (1..=N).map(|i| backend(i, 1)).collect();
        b[0].weight = 1_000_000;
        let start = std::time::Instant::now();
        let counts = slot_counts(&build(&b, M, 0).unwrap());
        println!("build M={M} N={N}, one weight 10^6: {:?}", start.elapsed());
        // The others' share is under one slot each; see `build`.
        assert!(counts[&1] >= M as usize * 998 / 1000);
    }

    #[test]
    fn auto_sizes() {
        assert_eq!(auto_ring_size(10), 1009);
        assert_eq!(auto_ring_size(100), 10007);
        assert_eq!(auto_ring_size(1000), 100_003);
        assert_eq!(auto_ring_size(4095), 409_517);
        assert_eq!(auto_ring_size(MAX_AUTO_BACKENDS), MAX_RING_SIZE);
        assert_eq!(auto_ring_size(u32::MAX), MAX_RING_SIZE);
        assert_eq!(auto_ring_size(0), 2);
        for c in [1u32, 2, 7, 655, 999, 1001, 9999] {
            let m = auto_ring_size(c);
            assert!(check_ring_size(m).is_ok() && m >= 100 * c);
            assert!(
                (100 * c..m).all(|k| !is_prime(k)),
                "{c}: {m} is the smallest"
            );
        }
    }

    /// Removing one of N backends from a ring sized automatically for N
    /// (100 slots each): every backend keeps floor or ceil of m/N slots, and
    /// the share of slots that change, against the ideal 1/N. Maglev's
    /// extra disruption grows with N at a fixed slots-per-backend ratio
    /// (`bench` reports the same figures): about 1.2/N for 10 backends, 2.6/N
    /// for 100 and 6.8/N for 1,000. Only a larger ratio lowers it (3.1/N for
    /// 1,000 backends at 1,000 slots each), which the memory cost forbids.
    #[test]
    fn disruption_at_auto_sizes() {
        for (n, bound) in [(10u32, 1.5), (100, 3.0), (1000, 7.5)] {
            let m = auto_ring_size(n);
            let all = equal(n);
            let before = build(&all, m, 0).unwrap();
            let counts = slot_counts(&before);
            assert_eq!(counts.len(), n as usize);
            assert!(
                counts
                    .values()
                    .all(|&c| c == (m / n) as usize || c == m.div_ceil(n) as usize)
            );
            let mut worst: f64 = 0.0;
            for removed in [1, n / 2, n] {
                let rest: Vec<MaglevBackend> =
                    all.iter().copied().filter(|b| b.id != removed).collect();
                let d = disruption(&before, &build(&rest, m, 0).unwrap());
                worst = worst.max(d);
            }
            println!(
                "N={n} M={m}: removing one moves {:.3}% of slots ({:.2}/N, ideal 1/N)",
                worst * 100.0,
                worst * n as f64
            );
            assert!(worst * n as f64 <= bound, "N={n}: {worst}");
        }
    }

    #[test]
    fn slot_counts_counts() {
        let counts = slot_counts(&[3, 1, 3, 0, 3]);
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [(0, 1), (1, 1), (3, 3)]
        );
    }
}
