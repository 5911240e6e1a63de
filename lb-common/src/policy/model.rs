//! The data plane's maps as vectors, for host tests: the policy's fixture
//! tables and the kernel parity test run [`super::decide`] and
//! [`super::apply`] over this, one CPU, with a clock the test sets.

use core::cell::Cell;
use std::{vec, vec::Vec};

use crate::{
    conntrack::{BucketHead, ConnSlot, Table, WAYS},
    flowcache::CachedFlow,
    maps::{BackendInfo, LbConfig, RingState, VipInfo, VipKey},
    policy::{CacheSlot, Maps, MapsMut},
    ring::{RING_CHUNK, RingChunk, chunks_per_vip, ring_pos},
    stats::Counter,
    viptable::{self, VipSlot},
};

/// The connection table over vectors.
#[derive(Clone, Debug)]
pub struct VecTable {
    pub heads: Vec<BucketHead>,
    pub slots: Vec<ConnSlot>,
}

impl VecTable {
    pub fn new(buckets: u32) -> Self {
        VecTable {
            heads: vec![BucketHead::default(); buckets as usize],
            slots: vec![ConnSlot::default(); (buckets * WAYS) as usize],
        }
    }
}

impl Table for VecTable {
    fn head(&self, bucket: u32) -> Option<&BucketHead> {
        self.heads.get(bucket as usize)
    }
    fn head_mut(&mut self, bucket: u32) -> Option<&mut BucketHead> {
        self.heads.get_mut(bucket as usize)
    }
    fn slot(&self, idx: u32) -> Option<&ConnSlot> {
        self.slots.get(idx as usize)
    }
    fn slot_mut(&mut self, idx: u32) -> Option<&mut ConnSlot> {
        self.slots.get_mut(idx as usize)
    }
}

/// Every map the policy reads, and the clock.
#[derive(Clone, Debug)]
pub struct Model {
    pub config: LbConfig,
    /// `VIP_TABLE_GEN`.
    pub epoch: u32,
    pub vip_table: Vec<VipSlot>,
    pub ring_states: Vec<RingState>,
    pub rings: Vec<RingChunk>,
    pub backends: Vec<BackendInfo>,
    pub table: VecTable,
    /// One CPU's flow cache (cells: the decision counts hits in place).
    pub cache: Vec<Cell<CachedFlow>>,
    /// Cells: the decision counts as it goes.
    pub counters: Vec<Cell<u64>>,
    pub now_ticks: u32,
    pub now_ns: u64,
}

/// Sizes of a model.
#[derive(Clone, Copy, Debug)]
pub struct ModelSizes {
    pub max_vips: u32,
    pub max_backends: u32,
    pub ring_size: u32,
    pub conntrack_buckets: u32,
    pub flow_cache_slots: u32,
}

impl Model {
    /// Empty maps of these sizes; `config` gets the sizes the data plane
    /// derives from its maps (VIP slots, cache slots, bucket mask).
    pub fn new(sizes: ModelSizes, config: LbConfig) -> Self {
        let vip_slots = viptable::slots_for(sizes.max_vips);
        Model {
            config: LbConfig {
                ring_size: sizes.ring_size,
                vip_slots,
                flow_cache_slots: sizes.flow_cache_slots,
                conntrack_bucket_mask: sizes.conntrack_buckets - 1,
                ..config
            },
            epoch: 0,
            vip_table: vec![VipSlot::default(); 2 * vip_slots as usize],
            ring_states: vec![RingState::default(); sizes.max_vips as usize],
            rings: vec![
                RingChunk::default();
                (sizes.max_vips * chunks_per_vip(sizes.ring_size)) as usize
            ],
            backends: vec![BackendInfo::default(); sizes.max_backends as usize],
            table: VecTable::new(sizes.conntrack_buckets),
            cache: vec![Cell::new(CachedFlow::default()); sizes.flow_cache_slots as usize],
            counters: vec![Cell::new(0); Counter::COUNT as usize],
            now_ticks: 0,
            now_ns: 0,
        }
    }

    /// Replaces the VIP set the way userspace does: the idle generation is
    /// written whole, then the epoch flips to it.
    pub fn set_vips(&mut self, vips: &[(VipKey, VipInfo)]) -> Result<(), viptable::VipTableError> {
        let slots = self.config.vip_slots;
        let built = viptable::build(vips, slots)?;
        self.epoch = self.epoch.wrapping_add(1);
        let base = ((self.epoch & 1) * slots) as usize;
        self.vip_table[base..base + slots as usize].copy_from_slice(&built);
        Ok(())
    }

    /// Writes generation `generation` of VIP `vip_id`'s ring.
    pub fn write_ring(&mut self, vip_id: u32, generation: u8, table: &[u32]) {
        let m = self.config.ring_size;
        assert_eq!(table.len(), m as usize, "ring of the configured size");
        for (slot, id) in table.iter().enumerate() {
            let (element, lane) = ring_pos(vip_id, generation, m, slot as u32);
            self.rings[element as usize].ids[(lane % RING_CHUNK) as usize] = *id;
        }
    }

    /// Slot `slot` of generation `generation` of the VIP's ring.
    pub fn ring_slot(&self, vip_id: u32, generation: u8, slot: u32) -> u32 {
        let (element, lane) = ring_pos(vip_id, generation, self.config.ring_size, slot);
        self.rings[element as usize].ids[lane as usize]
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.counters[c.index() as usize].get()
    }

    /// Every counter back to zero.
    pub fn reset_counters(&self) {
        self.counters.iter().for_each(|c| c.set(0));
    }
}

impl Maps for Model {
    type Table = VecTable;

    fn table(&self) -> &VecTable {
        &self.table
    }
    fn vip_slot(&self, idx: u32) -> Option<&VipSlot> {
        self.vip_table.get(idx as usize)
    }
    fn ring_state(&self, vip_id: u32) -> Option<&RingState> {
        self.ring_states.get(vip_id as usize)
    }
    fn ring_chunk(&self, element: u32) -> Option<&RingChunk> {
        self.rings.get(element as usize)
    }
    fn backend(&self, id: u32) -> Option<&BackendInfo> {
        self.backends.get(id as usize)
    }
    type Cache<'a> = ModelCacheSlot<'a>;

    fn cache(&self, idx: u32) -> Option<ModelCacheSlot<'_>> {
        let cell = self.cache.get(idx as usize)?;
        Some(ModelCacheSlot {
            flow: cell.get(),
            cell,
        })
    }
    fn count(&self, counter: Counter) {
        let c = &self.counters[counter.index() as usize];
        c.set(c.get() + 1);
    }
    fn now_ticks(&self) -> u32 {
        self.now_ticks
    }
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
}

impl MapsMut for Model {
    fn table_mut(&mut self) -> &mut VecTable {
        &mut self.table
    }
    fn cache_mut(&mut self, idx: u32) -> Option<&mut CachedFlow> {
        self.cache.get_mut(idx as usize).map(Cell::get_mut)
    }
}

/// A slot of the model's flow cache: a copy to read, the cell to count in.
pub struct ModelCacheSlot<'a> {
    flow: CachedFlow,
    cell: &'a Cell<CachedFlow>,
}

impl CacheSlot for ModelCacheSlot<'_> {
    fn flow(&self) -> &CachedFlow {
        &self.flow
    }
    fn hit(&self, hits: u32) {
        self.cell.set(CachedFlow { hits, ..self.flow });
    }
}
