//! Map definitions (DESIGN.md §3). Sizes here are compiled defaults; `lbd`
//! sets the configured ones at load time (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, PerCpuArray},
};
use lb_common::{
    conntrack::{BucketHead, ConnSlot, Table},
    flowcache::CachedFlow,
    maps::{BackendInfo, LbConfig, Traffic},
    ring::RingChunk,
    stats::Counter,
    viptable::VipSlot,
};

/// Two generations of `CONFIG.vip_slots` slots (see `lb_common::viptable`).
#[map(name = "VIP_TABLE")]
pub static VIP_TABLE: Array<VipSlot> = Array::with_max_entries(2 * 512, 0);

/// The live `VIP_TABLE` generation (0 or 1).
#[map(name = "VIP_TABLE_GEN")]
pub static VIP_TABLE_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Two generations of M slots per VIP, 16 slots per element (see
/// `lb_common::ring`).
#[map(name = "RINGS")]
pub static RINGS: Array<RingChunk> = Array::with_max_entries(16 * 2 * 4097, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(4096, 0);

/// The connection table (see `lb_common::conntrack`). Mappable so that its
/// values start on a page, every slot on a cache line of its own.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: Array<ConnSlot> = Array::with_max_entries(65536, BPF_F_MMAPABLE);

/// Per-CPU cache of established TCP flows (see `lb_common::flowcache`).
#[map(name = "FLOW_CACHE")]
pub static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(65536, 0);

/// One head per `CONNTRACK` bucket (see `lb_common::conntrack`). Mappable:
/// lbd counts live flows by reading the heads (4 bytes per flow).
#[map(name = "CONNTRACK_HEADS")]
pub static CONNTRACK_HEADS: Array<BucketHead> = Array::with_max_entries(16384, BPF_F_MMAPABLE);

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

#[map(name = "STATS_BACKEND")]
pub static STATS_BACKEND: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(4096, 0);

#[map(name = "STATS_VIP")]
pub static STATS_VIP: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(256, 0);

#[map(name = "STATS_GLOBAL")]
pub static STATS_GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// ifindex -> ifindex, for next hops on another interface (XDP_REDIRECT).
#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

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
