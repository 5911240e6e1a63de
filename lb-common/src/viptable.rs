//! The VIP table: open addressing in a BPF array, two generations.
//!
//! A hash-map lookup is a helper call (several nested kernel calls, each
//! paying the CPU's return-thunk mitigation): about 60 ns per lookup on our
//! test machines, on every packet, VIP or not. Array lookups are inlined by
//! the verifier, so the table lives in an ARRAY map and is probed here, with
//! a bounded number of probes. Userspace builds a whole generation and flips
//! `VIP_TABLE_GEN` (one aligned u32 store), so readers never see a half-made
//! table or a torn entry.

use crate::maps::{VipInfo, VipKey};

/// Probes per lookup; userspace refuses a table where a key would need more.
pub const MAX_PROBES: u32 = 8;

/// One slot. An empty slot has `key.family == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    pub _pad: u32,
    pub info: VipInfo,
}

crate::layout!(VipSlot { key, _pad, info });

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data with explicit padding.
unsafe impl aya::Pod for VipSlot {}

/// The key as five words, for hashing and a five-compare equality test.
/// Spelled out field by field: a transmute or an array `==` makes LLVM call
/// `memmove`/`memcmp`, which in BPF are slow byte-loop subprograms.
#[inline(always)]
pub fn key_words(k: &VipKey) -> [u32; 5] {
    let a = &k.addr;
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        k.port as u32 | (k.proto as u32) << 16 | (k.family as u32) << 24,
    ]
}

/// Word-wise equality without a `memcmp` call (see [`key_words`]).
#[inline(always)]
pub fn words_eq(a: &[u32; 5], b: &[u32; 5]) -> bool {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
}

/// Where probing for `words` starts (before masking).
#[inline(always)]
pub fn slot_hash(words: &[u32; 5]) -> u32 {
    let mut h = words[0]
        ^ words[1].rotate_left(7)
        ^ words[2].rotate_left(13)
        ^ words[3].rotate_left(19)
        ^ words[4].rotate_left(25);
    // A 32-bit finaliser (lowbias32): mixes every input bit into the low bits
    // the mask keeps.
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// Slots per generation for `max_vips` VIPs: a power of two with 8 slots
/// per VIP, so a miss (most traffic that is not for a VIP) usually ends at
/// the first, empty slot. At least 16.
pub const fn slots_for(max_vips: u32) -> u32 {
    let want = if max_vips < 2 { 16 } else { max_vips * 8 };
    want.next_power_of_two()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipTableError {
    TooMany { vips: usize, slots: u32 },
    Crowded { key: VipKey },
    Duplicate { key: VipKey },
}

impl core::fmt::Display for VipTableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VipTableError::TooMany { vips, slots } => {
                write!(f, "{vips} VIPs do not fit a table of {slots} slots")
            }
            VipTableError::Crowded { key } => write!(
                f,
                "VIP {key:?} found no free slot within {MAX_PROBES} probes; raise max_vips"
            ),
            VipTableError::Duplicate { key } => write!(f, "VIP {key:?} is listed twice"),
        }
    }
}

#[cfg(any(test, feature = "std"))]
impl std::error::Error for VipTableError {}

/// Builds one generation: `slots` entries (a power of two) holding `vips`.
#[cfg(any(test, feature = "std"))]
pub fn build(
    vips: &[(VipKey, VipInfo)],
    slots: u32,
) -> Result<std::vec::Vec<VipSlot>, VipTableError> {
    if !slots.is_power_of_two() || vips.len() > slots as usize / 2 {
        return Err(VipTableError::TooMany {
            vips: vips.len(),
            slots,
        });
    }
    let mut table = std::vec![VipSlot::default(); slots as usize];
    // Sorted insertion: the same set gives the same table on every node.
    let mut sorted = vips.to_vec();
    sorted.sort_by_key(|(k, _)| key_words(k));
    for (key, info) in sorted {
        let words = key_words(&key);
        let h = slot_hash(&words);
        let mut placed = false;
        for i in 0..MAX_PROBES {
            let s = &mut table[(h.wrapping_add(i) & (slots - 1)) as usize];
            if s.key.family == 0 {
                *s = VipSlot { key, _pad: 0, info };
                placed = true;
                break;
            }
            if words_eq(&key_words(&s.key), &words) {
                return Err(VipTableError::Duplicate { key });
            }
        }
        if !placed {
            return Err(VipTableError::Crowded { key });
        }
    }
    Ok(table)
}

/// Index (in `0..=mask`) of the slot holding `words`, if any. Returns a
/// plain index rather than the entry so that every way out of the probe
/// loop leaves the verifier the same kind of state, and it can prune them.
#[inline(always)]
fn probe<'a>(
    words: &[u32; 5],
    mask: u32,
    get: &impl Fn(u32) -> Option<&'a VipSlot>,
) -> Option<u32> {
    let h = slot_hash(words);
    let mut i = 0;
    while i < MAX_PROBES {
        let idx = h.wrapping_add(i) & mask;
        let slot = get(idx)?;
        if slot.key.family == 0 {
            return None;
        }
        if words_eq(&key_words(&slot.key), words) {
            return Some(idx);
        }
        i += 1;
    }
    None
}

/// The slot (an index into one generation of `mask + 1` slots, read
/// through `get`) of the VIP for a destination: the exact port first, then
/// port 0 (every port of that address and protocol). The data plane and
/// userspace both look VIPs up through this.
#[inline(always)]
pub fn find<'a>(
    addr: &[u8; 16],
    port: u16,
    proto: u8,
    family: u8,
    get: impl Fn(u32) -> Option<&'a VipSlot>,
    mask: u32,
) -> Option<u32> {
    let mut key = VipKey {
        addr: *addr,
        port,
        proto,
        family,
    };
    match probe(&key_words(&key), mask, &get) {
        Some(idx) => Some(idx),
        None if port != 0 => {
            key.port = 0;
            probe(&key_words(&key), mask, &get)
        }
        None => None,
    }
}

/// Looks `key` up in one generation (exactly: no fallback to port 0).
pub fn lookup(table: &[VipSlot], key: &VipKey) -> Option<VipInfo> {
    let mask = (table.len() as u32).wrapping_sub(1);
    let idx = probe(&key_words(key), mask, &|i| table.get(i as usize))?;
    Some(table.get(idx as usize)?.info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{Family, Mode};

    fn key(n: u32, port: u16, v6: bool) -> VipKey {
        let mut addr = [0u8; 16];
        if v6 {
            addr[..4].copy_from_slice(&[0xfd, 0, 1, 0x98]);
            addr[12..].copy_from_slice(&n.to_be_bytes());
        } else {
            addr[..4].copy_from_slice(&(0xc612_6400 + n).to_be_bytes());
        }
        VipKey {
            addr,
            port,
            proto: 6,
            family: Family::of(v6).wire(),
        }
    }

    #[test]
    fn every_vip_is_found_and_others_are_not() {
        for max_vips in [1u32, 4, 64, 1024, 4096] {
            let slots = slots_for(max_vips);
            let vips: Vec<_> = (0..max_vips)
                .map(|i| {
                    (
                        key(i / 2, 80 + (i % 2) as u16, i % 3 == 0),
                        VipInfo::new(i, Mode::Ipip),
                    )
                })
                .collect();
            let t = build(&vips, slots).unwrap();
            for (k, info) in &vips {
                assert_eq!(lookup(&t, k), Some(*info));
            }
            for i in 0..1000 {
                assert_eq!(lookup(&t, &key(100_000 + i, 80, false)), None);
            }
        }
    }

    #[test]
    fn same_set_same_table_in_any_order() {
        let mut vips: Vec<_> = (0..50)
            .map(|i| (key(i, 443, false), VipInfo::new(i, Mode::Ipip)))
            .collect();
        let a = build(&vips, 256).unwrap();
        vips.reverse();
        assert_eq!(build(&vips, 256).unwrap(), a);
    }

    #[test]
    fn refuses_overfull_and_duplicate() {
        let vips: Vec<_> = (0..9)
            .map(|i| (key(i, 1, false), VipInfo::new(i, Mode::Ipip)))
            .collect();
        assert!(matches!(
            build(&vips, 16),
            Err(VipTableError::TooMany { .. })
        ));
        let dup = vec![
            (key(1, 1, false), VipInfo::new(0, Mode::Ipip)),
            (key(1, 1, false), VipInfo::new(1, Mode::Ipip)),
        ];
        assert!(matches!(
            build(&dup, 16),
            Err(VipTableError::Duplicate { .. })
        ));
    }

    #[test]
    fn slot_layout() {
        assert_eq!(core::mem::size_of::<VipSlot>(), 32);
        assert_eq!(slots_for(64), 512);
        assert_eq!(slots_for(1), 16);
    }
}
