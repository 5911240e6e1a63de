//! The balancer's maps, declared from the manifest in `lb_common::manifest`
//! (sizes here are compiled defaults; `lbd` sets the configured ones at load
//! time), and the policy's map traits over them.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, PerCpuArray},
};
use lb_common::{
    conntrack::{BucketHead, ConnSlot, Found, Placement, Probe, Table, Timeouts, ticks},
    flowcache::CachedFlow,
    manifest::Size,
    maps::{BackendInfo, FlowKey, RingState, Traffic},
    policy::{CacheSlot, Maps, MapsMut},
    ring::RingChunk,
    stats::Counter,
    viptable::VipSlot,
};

/// `max_entries` in the object for a size source; lbd overrides every one
/// but the fixed ones.
const fn default_entries(size: Size) -> u32 {
    match size {
        Size::Fixed(n) => n,
        Size::VipTable => 2 * 512,
        Size::MaxVips => 64,
        Size::MaxBackends => 4096,
        Size::Rings => 16 * 2 * 4097,
        Size::ConntrackSlots => 65536,
        Size::ConntrackBuckets => 16384,
        Size::FlowCacheSlots => 65536,
        Size::Counters => Counter::COUNT,
    }
}

macro_rules! bpf_maps {
    ($($(#[$doc:meta])* $name:ident : $kind:ident < $value:ty >, $size:ident $(($n:expr))?, $flags:expr;)+) => {$(
        $(#[$doc])*
        #[map]
        pub static $name: $kind<$value> =
            $kind::with_max_entries(default_entries(Size::$size $(($n))?), $flags);
    )+};
}

lb_common::for_each_map!(bpf_maps);

/// `CONNTRACK` and its heads as the shared table logic sees them.
pub struct ConnTable;

impl Table for ConnTable {
    #[inline(always)]
    fn head(&self, bucket: u32) -> Option<&BucketHead> {
        CONNTRACK_HEADS.get(bucket)
    }

    #[inline(always)]
    fn head_mut(&mut self, bucket: u32) -> Option<&mut BucketHead> {
        // SAFETY: as for `slot_mut`; a head word is one aligned store.
        CONNTRACK_HEADS
            .get_ptr_mut(bucket)
            .map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn slot(&self, idx: u32) -> Option<&ConnSlot> {
        CONNTRACK.get(idx)
    }

    #[inline(always)]
    fn slot_mut(&mut self, idx: u32) -> Option<&mut ConnSlot> {
        // SAFETY: a map value, valid for the program run. Other CPUs may
        // write it concurrently; the slot's seal makes torn reads harmless.
        CONNTRACK.get_ptr_mut(idx).map(|p| unsafe { &mut *p })
    }
}

/// One of this CPU's flow-cache slots.
pub struct KernelCacheSlot(*mut CachedFlow);

impl CacheSlot for KernelCacheSlot {
    #[inline(always)]
    fn flow(&self) -> &CachedFlow {
        // SAFETY: a per-CPU map value, valid for the program run; XDP runs
        // with preemption off, so nothing else touches it meanwhile.
        unsafe { &*self.0 }
    }

    #[inline(always)]
    fn hit(&self, hits: u32) {
        // SAFETY: as above; the only writer on this CPU.
        unsafe { (*self.0).hits = hits };
    }
}

/// The maps and clocks, as the policy sees them. Holds nothing (the maps
/// are statics): `&KERNEL_MAPS` is a `'static` borrow, so a decision's
/// references into map values outlive any handle used to write.
pub struct KernelMaps {
    table: ConnTable,
}

pub const KERNEL_MAPS: KernelMaps = KernelMaps { table: ConnTable };

impl KernelMaps {
    /// A handle to write through.
    #[inline(always)]
    pub const fn new() -> Self {
        KERNEL_MAPS
    }
}

impl Maps for KernelMaps {
    type Table = ConnTable;

    #[inline(always)]
    fn table(&self) -> &ConnTable {
        &self.table
    }

    #[inline(always)]
    fn vip_slot(&self, idx: u32) -> Option<&VipSlot> {
        VIP_TABLE.get(idx)
    }

    #[inline(always)]
    fn ring_state(&self, vip_id: u32) -> Option<&RingState> {
        RING_STATE.get(vip_id)
    }

    #[inline(always)]
    fn ring_chunk(&self, element: u32) -> Option<&RingChunk> {
        RINGS.get(element)
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<&BackendInfo> {
        BACKENDS.get(id)
    }

    type Cache<'a> = KernelCacheSlot;

    #[inline(always)]
    fn cache(&self, idx: u32) -> Option<KernelCacheSlot> {
        FLOW_CACHE.get_ptr_mut(idx).map(KernelCacheSlot)
    }

    #[inline(always)]
    fn count(&self, counter: Counter) {
        count(counter);
    }

    /// The coarse clock (the last timer tick's `CLOCK_MONOTONIC`): exact to
    /// a few milliseconds, which ticks of 1 ms and timeouts of seconds do
    /// not notice, and without `bpf_ktime_get_ns`'s serialised TSC read,
    /// which cost a connection-table hit a third of its time.
    #[inline(always)]
    fn now_ticks(&self) -> u32 {
        // SAFETY: no preconditions.
        ticks(unsafe { bpf_ktime_get_coarse_ns() })
    }

    #[inline(always)]
    fn now_ns(&self) -> u64 {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    }

    #[inline(always)]
    fn find(&self, key: &FlowKey, probe: &Probe) -> Option<Found> {
        match crate::lb::lb_find_slot(key, probe) {
            crate::lb::NOT_FOUND => None,
            found => Some(Found {
                idx: found as u32,
                backend_id: (found >> 32) as u32,
            }),
        }
    }
}

impl MapsMut for KernelMaps {
    #[inline(always)]
    fn table_mut(&mut self) -> &mut ConnTable {
        &mut self.table
    }

    #[inline(always)]
    fn cache_mut(&mut self, idx: u32) -> Option<&mut CachedFlow> {
        // SAFETY: per-CPU slot; XDP runs with preemption off, so nothing
        // else touches it while this program holds it.
        FLOW_CACHE.get_ptr_mut(idx).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn entry_slot(
        &mut self,
        key: &FlowKey,
        probe: &Probe,
        now: u32,
        timeouts: Timeouts,
        find_first: bool,
    ) -> Option<(Placement, bool)> {
        match crate::lb::lb_entry_slot(key, probe, now, timeouts.to_word(), find_first as u32) {
            u64::MAX => None,
            at if at & 1 << 34 != 0 => Some((Placement::Full, false)),
            at => Some((
                Placement::Way {
                    idx: at as u32,
                    evicts_live: at & 1 << 32 != 0,
                },
                at & 1 << 33 != 0,
            )),
        }
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = STATS_GLOBAL.get_ptr_mut(counter.index()) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn account(map: &PerCpuArray<Traffic>, id: u32, bytes: u64, new_flow: bool) {
    if let Some(t) = map.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
            if new_flow {
                (*t).new_flows += 1;
            }
        }
    }
}
