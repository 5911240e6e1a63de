//! Every map of the balancer, declared once.
//!
//! [`for_each_map!`] hands the list to a macro of the caller's: the data
//! plane declares its BPF statics from it (`lb-ebpf/src/maps.rs`), the
//! controller its typed handles (`lb_userspace::maps`), and this module the
//! [`MAPS`] table that the pin list, the size checks and the layout
//! [`fingerprint`] are read from. A map added here exists everywhere; a name
//! is never spelled twice.

use crate::layout::{Field, Layout};

/// `BPF_F_MMAPABLE`: userspace maps the values (reading the connection
/// table's heads; writing rings, the VIP filter, and a ring state in one
/// 8-byte store).
pub const MMAPABLE: u32 = 1 << 10;

/// The two map kinds the balancer uses: both are inlined by the verifier
/// into a bounds check and an add, where a hash map costs helper calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    PerCpuArray,
}

/// Where a map's `max_entries` comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Fixed(u32),
    /// Two generations of `viptable::slots_for(max_vips)`.
    VipTable,
    MaxVips,
    MaxBackends,
    /// `max_vips * ring::chunks_per_vip(ring_size)`.
    Rings,
    /// Connection-table slots (a power of two, `WAYS` per bucket).
    ConntrackSlots,
    /// One head per bucket.
    ConntrackBuckets,
    FlowCacheSlots,
    /// `stats::Counter::COUNT`.
    Counters,
}

/// One map: what both sides must agree on.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub value: &'static str,
    pub value_size: usize,
    pub value_fields: &'static [Field],
    pub size: Size,
    pub flags: u32,
    /// Carries state across restarts (pinned, adopted by the next lbd).
    pub pinned: bool,
}

impl MapSpec {
    const fn of<T: Layout>(
        name: &'static str,
        kind: MapKind,
        size: Size,
        flags: u32,
        pinned: bool,
    ) -> Self {
        MapSpec {
            name,
            kind,
            value: T::NAME,
            value_size: T::SIZE,
            value_fields: T::FIELDS,
            size,
            flags,
            pinned,
        }
    }
}

/// Calls `$callback!` with every map, one `NAME: Kind<Value>, size, flags;`
/// entry each (doc comments first). Kinds are the type names of
/// `aya_ebpf::maps` and `aya::maps`.
#[macro_export]
macro_rules! for_each_map {
    ($callback:ident) => {
        $callback! {
            /// Two generations of `CONFIG.vip_slots` slots of an
            /// open-addressing table (see `lb_common::viptable`).
            VIP_TABLE: Array<$crate::viptable::VipSlot>, VipTable, 0;
            /// The live `VIP_TABLE` generation in bit 0; every change bumps
            /// it, which also retires the per-CPU flow caches.
            VIP_TABLE_GEN: Array<u32>, Fixed(1), 0;
            /// One bit per hash of a VIP address, read before anything else
            /// (see `lb_common::vipfilter`). Mappable: lbd reads and writes
            /// its words with loads and stores, not a system call each.
            VIP_FILTER: Array<u64>, Fixed($crate::vipfilter::FILTER_WORDS), $crate::manifest::MMAPABLE;
            /// Per VIP: the live ring generation and the second-chance
            /// deadline, in one word (see `lb_common::maps::RingState`).
            RING_STATE: Array<$crate::maps::RingState>, MaxVips, $crate::manifest::MMAPABLE;
            /// Two generations of M slots per VIP, 16 slots per element
            /// (see `lb_common::ring`). Mappable, so that lbd writes a ring
            /// with stores rather than a map update per element.
            RINGS: Array<$crate::ring::RingChunk>, Rings, $crate::manifest::MMAPABLE;
            /// Backend slots; id 0 is "no backend".
            BACKENDS: Array<$crate::maps::BackendInfo>, MaxBackends, 0;
            /// The connection table (see `lb_common::conntrack`). Mappable so
            /// that its values start on a page, every slot on a cache line of
            /// its own.
            CONNTRACK: Array<$crate::conntrack::ConnSlot>, ConntrackSlots, $crate::manifest::MMAPABLE;
            /// One head per `CONNTRACK` bucket. Mappable: lbd counts live
            /// flows by reading the heads (4 bytes per flow).
            CONNTRACK_HEADS: Array<$crate::conntrack::BucketHead>, ConntrackBuckets, $crate::manifest::MMAPABLE;
            /// Per-CPU cache of established TCP flows (see
            /// `lb_common::flowcache`).
            FLOW_CACHE: PerCpuArray<$crate::flowcache::CachedFlow>, FlowCacheSlots, 0;
            /// Traffic per backend id.
            STATS_BACKEND: PerCpuArray<$crate::maps::Traffic>, MaxBackends, 0;
            /// Traffic per VIP id.
            STATS_VIP: PerCpuArray<$crate::maps::Traffic>, MaxVips, 0;
            /// One slot per `lb_common::stats::Counter`.
            STATS_GLOBAL: PerCpuArray<u64>, Counters, 0;
            /// `CONFIG[0]`: the data plane's configuration.
            CONFIG: Array<$crate::maps::LbConfig>, Fixed(1), 0;
        }
    };
}

macro_rules! specs {
    ($($(#[$doc:meta])* $name:ident : $kind:ident < $value:ty >, $size:ident $(($n:expr))?, $flags:expr;)+) => {
        /// Every map, in declaration order.
        pub const MAPS: &[MapSpec] = &[$(
            MapSpec::of::<$value>(stringify!($name), MapKind::$kind, Size::$size $(($n))?, $flags, true),
        )+];
    };
}

for_each_map!(specs);

/// Looks a map up by name.
pub fn spec(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name == name)
}

/// Types whose layout is part of the contract besides map values: keys the
/// data plane hashes and compares, and values nested in other values.
const NESTED: &[(&str, usize, &[Field])] = &[
    nested::<crate::maps::VipKey>(),
    nested::<crate::maps::VipInfo>(),
    nested::<crate::maps::FlowKey>(),
];

const fn nested<T: Layout>() -> (&'static str, usize, &'static [Field]) {
    (T::NAME, T::SIZE, T::FIELDS)
}

/// Numbers that are not in any layout but change what the bytes mean.
const CONSTANTS: &[(&str, u64)] = &[
    ("conntrack::WAYS", crate::conntrack::WAYS as u64),
    ("conntrack::TICK_SHIFT", crate::conntrack::TICK_SHIFT as u64),
    (
        "conntrack::STAMP_SHIFT",
        crate::conntrack::STAMP_SHIFT as u64,
    ),
    ("ring::RING_CHUNK", crate::ring::RING_CHUNK as u64),
    ("viptable::MAX_PROBES", crate::viptable::MAX_PROBES as u64),
    (
        "vipfilter::FILTER_BITS",
        crate::vipfilter::FILTER_BITS as u64,
    ),
    // The filter's hash, by its value for one address: a new hash makes an
    // adopted filter refuse live VIPs, so it must change the fingerprint.
    (
        "vipfilter::addr_bit(198.18.100.1)",
        crate::vipfilter::addr_bit(&crate::parse::v4_in_16([198, 18, 100, 1])) as u64,
    ),
];

/// FNV-1a, 64 bits: stable across compilers and platforms, which a
/// fingerprint naming directories on disk must be.
struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn str(&mut self, s: &str) {
        self.num(s.len() as u64);
        self.bytes(s.as_bytes());
    }
    fn num(&mut self, n: u64) {
        self.bytes(&n.to_le_bytes());
    }
    fn fields(&mut self, fields: &[Field]) {
        self.num(fields.len() as u64);
        for f in fields {
            self.str(f.name);
            self.num(f.offset as u64);
            self.num(f.size as u64);
        }
    }
}

/// The layout fingerprint of a set of maps: names, kinds, value types with
/// their field layouts, flags, the nested types, the counters' names and
/// the constants above. Separated from [`fingerprint`] so a test can show
/// that a changed value type changes it.
pub fn fingerprint_of(maps: &[MapSpec]) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.num(maps.len() as u64);
    for m in maps {
        h.str(m.name);
        h.num(m.kind as u64);
        h.str(m.value);
        h.num(m.value_size as u64);
        h.fields(m.value_fields);
        h.num(m.flags as u64);
        h.num(m.pinned as u64);
    }
    for (name, size, fields) in NESTED {
        h.str(name);
        h.num(*size as u64);
        h.fields(fields);
    }
    for c in crate::stats::Counter::ALL {
        h.str(c.name());
    }
    for (name, value) in CONSTANTS {
        h.str(name);
        h.num(*value);
    }
    h.0
}

/// This build's layout fingerprint, which names the pin directory: an lbd
/// only ever adopts maps laid out exactly as it reads them.
pub fn fingerprint() -> u64 {
    fingerprint_of(MAPS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, a) in MAPS.iter().enumerate() {
            assert!(
                MAPS[i + 1..].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
            // BPF object names are at most 15 characters.
            assert!(a.name.len() <= 15, "{} is too long a map name", a.name);
        }
    }

    #[test]
    fn the_fingerprint_is_stable_for_the_same_layout() {
        assert_eq!(fingerprint(), fingerprint_of(MAPS));
    }

    /// The value type of one map changed (another type of the same size):
    /// the fingerprint changes.
    #[test]
    fn a_changed_value_type_changes_the_fingerprint() {
        let mut changed: std::vec::Vec<MapSpec> = MAPS.to_vec();
        let i = changed.iter().position(|m| m.name == "BACKENDS").unwrap();
        changed[i] = MapSpec::of::<crate::maps::FlowKey>(
            "BACKENDS",
            MapKind::Array,
            Size::MaxBackends,
            0,
            true,
        );
        assert_eq!(changed[i].value_size, MAPS[i].value_size, "same size");
        assert_ne!(fingerprint_of(&changed), fingerprint());
    }

    /// A field moved inside a value (same type size): the fingerprint
    /// changes.
    #[test]
    fn a_moved_field_changes_the_fingerprint() {
        #[repr(C)]
        struct Moved {
            vip_id: u32,
            _pad: [u8; 3],
            mode: u8,
        }
        crate::layout!(Moved { vip_id, _pad, mode });
        let _ = Moved {
            vip_id: 0,
            _pad: [0; 3],
            mode: 0,
        };
        let mut changed: std::vec::Vec<MapSpec> = MAPS.to_vec();
        let i = changed.iter().position(|m| m.name == "VIP_TABLE").unwrap();
        changed[i].value_fields = Moved::FIELDS;
        assert_ne!(fingerprint_of(&changed), fingerprint());
    }
}
