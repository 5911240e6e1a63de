//! The running data plane's maps, read on demand, as the per-packet policy
//! sees them: `lbctl explain` runs `lb_common::policy::decide` over this, so
//! it answers with the rules the data plane applies, from the state the
//! data plane holds, and never writes anything.
//!
//! Each value is read once, when the policy first asks for it, and kept for
//! the snapshot's life (the policy borrows it). A map read that fails makes
//! the whole answer an error, not a wrong "not found".

use std::{
    cell::RefCell,
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use aya::Ebpf;
use lb_common::{
    conntrack::{self, BucketHead, ConnSlot, Table},
    flowcache::CachedFlow,
    maps::{BackendInfo, FlowKey, LbConfig, RingState},
    policy::{self, CacheSlot, Decision, Kind, Maps},
    ring::RingChunk,
    viptable::VipSlot,
};

use crate::{
    maps::{
        BACKENDS, CONFIG, CONNTRACK, CONNTRACK_HEADS, FLOW_CACHE, RING_STATE, RINGS, VIP_TABLE,
        VIP_TABLE_GEN,
    },
    programming::{monotonic_coarse_ns, monotonic_ns},
};

/// Values read by index, kept at a stable address: boxed, and never removed
/// or replaced while the memo lives.
struct Memo<T> {
    values: RefCell<BTreeMap<u32, Box<Option<T>>>>,
}

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Memo {
            values: RefCell::new(BTreeMap::new()),
        }
    }
}

impl<T> Memo<T> {
    fn get(&self, idx: u32, read: impl FnOnce() -> Option<T>) -> Option<&T> {
        if let Some(v) = self.values.borrow().get(&idx) {
            let ptr: *const Option<T> = &**v;
            // SAFETY: the box is never dropped or moved out while `self`
            // lives (entries are only inserted), so its contents stay put
            // however the map rebalances.
            return unsafe { (*ptr).as_ref() };
        }
        let boxed = Box::new(read());
        let ptr: *const Option<T> = &*boxed;
        self.values.borrow_mut().insert(idx, boxed);
        // SAFETY: as above.
        unsafe { (*ptr).as_ref() }
    }
}

/// A read-only view of the data plane's maps.
pub struct Snapshot<'e> {
    ebpf: &'e Ebpf,
    pub config: LbConfig,
    pub epoch: u32,
    /// The flow whose per-CPU cache entries count (there is one cache per
    /// CPU; the flow's packets reach one of them).
    flow: FlowKey,
    /// The CPU whose cache served the answer, if one did.
    cache_cpu: AtomicU32,
    now_ticks: u32,
    now_ns: u64,
    vips: Memo<VipSlot>,
    ring_states: Memo<RingState>,
    rings: Memo<RingChunk>,
    backends: Memo<BackendInfo>,
    cache: Memo<CachedFlow>,
    table: SnapshotTable<'e>,
    error: RefCell<Option<anyhow::Error>>,
}

/// The connection table, read a bucket at a time.
pub struct SnapshotTable<'e> {
    ebpf: &'e Ebpf,
    heads: Memo<BucketHead>,
    slots: Memo<ConnSlot>,
    error: RefCell<Option<anyhow::Error>>,
}

fn note<T>(slot: &RefCell<Option<anyhow::Error>>, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            slot.borrow_mut().get_or_insert(e);
            None
        }
    }
}

impl Table for SnapshotTable<'_> {
    fn head(&self, bucket: u32) -> Option<&BucketHead> {
        self.heads.get(bucket, || {
            note(
                &self.error,
                CONNTRACK_HEADS.array(self.ebpf).and_then(|a| {
                    a.get(&bucket, 0)
                        .with_context(|| format!("reading CONNTRACK_HEADS[{bucket}]"))
                }),
            )
        })
    }
    fn head_mut(&mut self, _bucket: u32) -> Option<&mut BucketHead> {
        None
    }
    fn slot(&self, idx: u32) -> Option<&ConnSlot> {
        self.slots.get(idx, || {
            note(
                &self.error,
                CONNTRACK.array(self.ebpf).and_then(|a| {
                    a.get(&idx, 0)
                        .with_context(|| format!("reading CONNTRACK[{idx}]"))
                }),
            )
        })
    }
    fn slot_mut(&mut self, _idx: u32) -> Option<&mut ConnSlot> {
        None
    }
}

impl<'e> Snapshot<'e> {
    /// A view for questions about `flow`, at this moment's clocks.
    pub fn new(ebpf: &'e Ebpf, flow: FlowKey) -> Result<Self> {
        let config = CONFIG.array(ebpf)?.get(&0, 0).context("reading CONFIG")?;
        let epoch = VIP_TABLE_GEN
            .array(ebpf)?
            .get(&0, 0)
            .context("reading VIP_TABLE_GEN")?;
        Ok(Snapshot {
            ebpf,
            config,
            epoch,
            flow,
            cache_cpu: AtomicU32::new(u32::MAX),
            now_ticks: conntrack::ticks(monotonic_coarse_ns()),
            now_ns: monotonic_ns(),
            vips: Memo::default(),
            ring_states: Memo::default(),
            rings: Memo::default(),
            backends: Memo::default(),
            cache: Memo::default(),
            table: SnapshotTable {
                ebpf,
                heads: Memo::default(),
                slots: Memo::default(),
                error: RefCell::new(None),
            },
            error: RefCell::new(None),
        })
    }

    /// What the data plane would do with a packet of the snapshot's flow.
    pub fn decide(&self, kind: Kind) -> Result<Decision<'_>> {
        let d = policy::decide(self, &self.config, self.epoch, &self.flow, kind);
        if let Some(e) = self.error.borrow_mut().take() {
            return Err(e);
        }
        if let Some(e) = self.table.error.borrow_mut().take() {
            return Err(e);
        }
        Ok(d)
    }

    /// The CPU whose flow cache answered, if one did.
    pub fn cache_cpu(&self) -> Option<u32> {
        match self.cache_cpu.load(Ordering::Relaxed) {
            u32::MAX => None,
            cpu => Some(cpu),
        }
    }

    /// The flow's connection-table entry: its slot index and contents.
    pub fn conntrack_entry(&self) -> Result<Option<(u32, ConnSlot)>> {
        let probe = conntrack::probe(
            &self.flow,
            self.config.conntrack_seed,
            self.config.conntrack_bucket_mask,
        );
        let found = conntrack::find(&self.table, &self.flow, &probe);
        if let Some(e) = self.table.error.borrow_mut().take() {
            return Err(e);
        }
        Ok(found.and_then(|f| Some((f.idx, *self.table.slot(f.idx)?))))
    }

    fn read<T>(&self, what: &str, idx: u32, r: Result<T>) -> Option<T> {
        note(
            &self.error,
            r.with_context(|| format!("reading {what}[{idx}]")),
        )
    }
}

impl<'e> Maps for Snapshot<'e> {
    type Table = SnapshotTable<'e>;

    fn table(&self) -> &SnapshotTable<'e> {
        &self.table
    }
    fn vip_slot(&self, idx: u32) -> Option<&VipSlot> {
        self.vips.get(idx, || {
            self.read(
                "VIP_TABLE",
                idx,
                VIP_TABLE
                    .array(self.ebpf)
                    .and_then(|a| a.get(&idx, 0).map_err(Into::into)),
            )
        })
    }
    fn ring_state(&self, vip_id: u32) -> Option<&RingState> {
        self.ring_states.get(vip_id, || {
            self.read(
                "RING_STATE",
                vip_id,
                RING_STATE
                    .array(self.ebpf)
                    .and_then(|a| a.get(&vip_id, 0).map_err(Into::into)),
            )
        })
    }
    fn ring_chunk(&self, element: u32) -> Option<&RingChunk> {
        self.rings.get(element, || {
            self.read(
                "RINGS",
                element,
                RINGS
                    .array(self.ebpf)
                    .and_then(|a| a.get(&element, 0).map_err(Into::into)),
            )
        })
    }
    fn backend(&self, id: u32) -> Option<&BackendInfo> {
        self.backends.get(id, || {
            self.read(
                "BACKENDS",
                id,
                BACKENDS
                    .array(self.ebpf)
                    .and_then(|a| a.get(&id, 0).map_err(Into::into)),
            )
        })
    }
    type Cache<'a>
        = SnapshotCacheSlot<'a>
    where
        Self: 'a;

    /// The entry some CPU holds for the snapshot's flow in slot `idx`.
    fn cache(&self, idx: u32) -> Option<SnapshotCacheSlot<'_>> {
        self.cache
            .get(idx, || {
                let per_cpu = self.read(
                    "FLOW_CACHE",
                    idx,
                    FLOW_CACHE
                        .per_cpu(self.ebpf)
                        .and_then(|a| a.get(&idx, 0).map_err(Into::into)),
                )?;
                let (cpu, entry) = per_cpu
                    .iter()
                    .enumerate()
                    .find(|(_, c)| c.backend_id != 0 && conntrack::same_flow(&c.key, &self.flow))?;
                self.cache_cpu.store(cpu as u32, Ordering::Relaxed);
                Some(*entry)
            })
            .map(SnapshotCacheSlot)
    }
    /// A snapshot counts nothing.
    fn count(&self, _counter: lb_common::stats::Counter) {}
    fn now_ticks(&self) -> u32 {
        self.now_ticks
    }
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
}

/// A snapshot's cache entry: read, its hits not counted.
pub struct SnapshotCacheSlot<'a>(&'a CachedFlow);

impl CacheSlot for SnapshotCacheSlot<'_> {
    fn flow(&self) -> &CachedFlow {
        self.0
    }
    fn hit(&self, _hits: u32) {}
}

/// The flow's connection-table entry in a running data plane.
pub fn conntrack_entry(ebpf: &Ebpf, key: &FlowKey) -> Result<Option<(u32, ConnSlot)>> {
    Snapshot::new(ebpf, *key)?.conntrack_entry()
}
