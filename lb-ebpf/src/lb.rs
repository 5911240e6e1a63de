//! Backend selection: connection table first, then the Maglev ring, with the
//! second chance and re-pick rules of DESIGN.md §3.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    flowcache::{CachedFlow, REFRESH_EVERY, same_flow, slot_of},
    maps::{BACKEND_DRAINING, BACKEND_UP, BackendInfo, ConnEntry, FlowKey, LbConfig, VipInfo},
    parse::IPPROTO_UDP,
    ring::{flow_slot, ring_index},
    stats::Counter,
};

use crate::maps::{BACKENDS, CONNTRACK, FLOW_CACHE, RINGS, count};

pub struct Choice {
    pub backend_id: u32,
    /// Points into `BACKENDS`: copying it would cost stack the verifier
    /// caps at 512 bytes.
    pub backend: &'static BackendInfo,
    /// A new flow, to record once the packet is on its way.
    pub new_flow: bool,
    pub now_ns: u64,
}

/// Flows on a draining backend stay; a down (or removed) one loses them.
#[inline(always)]
fn usable(b: &BackendInfo) -> bool {
    b.state == BACKEND_UP || b.state == BACKEND_DRAINING
}

#[inline(always)]
fn ring_pick(
    vip: &VipInfo,
    generation: u8,
    slot: u32,
    cfg: &LbConfig,
) -> Option<(u32, &'static BackendInfo)> {
    let id = *RINGS.get(ring_index(vip.vip_id, generation, cfg.ring_size, slot))?;
    if id == 0 {
        return None;
    }
    Some((id, BACKENDS.get(id)?))
}

/// This CPU's cache slot for `key`.
#[inline(always)]
fn cache_slot(key: &FlowKey, cfg: &LbConfig) -> Option<&'static mut CachedFlow> {
    if cfg.flow_cache_slots == 0 {
        return None;
    }
    let p = FLOW_CACHE.get_ptr_mut(slot_of(key) & (cfg.flow_cache_slots - 1))?;
    // SAFETY: per-CPU slot; XDP runs with preemption off, so nothing else
    // touches it while this program holds it.
    Some(unsafe { &mut *p })
}

#[inline(always)]
fn cache_fill(key: &FlowKey, backend_id: u32, vip: &VipInfo, epoch: u32, cfg: &LbConfig) {
    if key.proto != IPPROTO_UDP
        && let Some(c) = cache_slot(key, cfg)
    {
        c.key = *key;
        c.backend_id = backend_id;
        c.hits = 0;
        c.vip_epoch = epoch;
        c.vip_id = vip.vip_id;
        c.mode = vip.mode;
    }
}

/// An established TCP flow served from this CPU's cache: its choice, VIP id
/// and forwarding mode, without the VIP or connection-table lookups.
#[inline(always)]
pub fn cached(key: &FlowKey, epoch: u32, cfg: &LbConfig) -> Option<(Choice, u32, u8)> {
    let c = cache_slot(key, cfg)?;
    if c.backend_id == 0 || c.vip_epoch != epoch || !same_flow(&c.key, key) {
        return None;
    }
    let b = BACKENDS.get(c.backend_id)?;
    if !usable(b) || !b.serves(c.vip_id) {
        return None;
    }
    c.hits = c.hits.wrapping_add(1);
    // Every REFRESH_EVERY-th hit takes the full path, so the LRU keeps
    // seeing the flow as alive (and refills this entry).
    if c.hits % REFRESH_EVERY == 0 {
        return None;
    }
    count(Counter::LbConntrackHit);
    count(Counter::LbFlowCacheHit);
    let choice = Choice {
        backend_id: c.backend_id,
        backend: b,
        new_flow: false,
        now_ns: 0,
    };
    Some((choice, c.vip_id, c.mode))
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Picks the backend for `key`; `None` means the VIP has no usable backend.
/// `allow_new` is false for packets that must neither create nor refresh
/// state (ICMP errors about a flow).
#[inline(always)]
pub fn choose(
    key: &FlowKey,
    vip: &VipInfo,
    epoch: u32,
    cfg: &LbConfig,
    tcp_syn: bool,
    allow_new: bool,
) -> Option<Choice> {
    let is_udp = key.proto == IPPROTO_UDP;
    // Only UDP entries age by time: TCP ones live until the LRU evicts them,
    // and reading the clock is a measurable share of a packet's budget.
    let now = if is_udp { now_ns() } else { 0 };
    // A SYN starts a connection: it always follows the live ring, so a client
    // reusing a port after a change (or after a drain began) lands on the
    // current backends, and its entry is overwritten.
    let mut missed = tcp_syn;
    if tcp_syn {
        count(Counter::LbConntrackMiss);
    } else if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: map value pointer valid for this program run.
        let entry = unsafe { &mut *entry };
        let expired =
            is_udp && allow_new && now.wrapping_sub(entry.last_seen_ns) > cfg.udp_timeout_ns;
        if expired {
            count(Counter::LbUdpExpired);
        } else if let Some(b) = BACKENDS.get(entry.backend_id)
            && usable(b)
            && b.serves(vip.vip_id)
        {
            count(Counter::LbConntrackHit);
            if is_udp && allow_new {
                entry.last_seen_ns = now;
            }
            cache_fill(key, entry.backend_id, vip, epoch, cfg);
            return Some(Choice {
                backend_id: entry.backend_id,
                backend: b,
                new_flow: false,
                now_ns: now,
            });
        } else {
            count(Counter::LbRepickDown);
        }
    } else {
        count(Counter::LbConntrackMiss);
        missed = true;
    }
    let slot = flow_slot(key, cfg.hash_seed, cfg.ring_size);
    let mut picked = None;
    // Second chance: a mid-stream TCP packet we have no entry for belongs to
    // a flow another node (or an evicted entry) placed, most likely on the
    // ring before the last change. Keep it there while that backend lives,
    // for a bounded time after the change (afterwards flows placed on the
    // new ring are the likelier owners).
    if missed
        && !tcp_syn
        && !is_udp
        && vip.second_chance_until_ns != 0
        && now_ns() < vip.second_chance_until_ns
        && let Some((id, b)) = ring_pick(vip, vip.ring_gen ^ 1, slot, cfg)
        && usable(b)
        && b.serves(vip.vip_id)
    {
        count(Counter::LbSecondChanceHit);
        picked = Some((id, b));
    }
    let (backend_id, backend) = match picked {
        Some(p) => p,
        None => ring_pick(vip, vip.ring_gen, slot, cfg)?,
    };
    Some(Choice {
        backend_id,
        backend,
        new_flow: allow_new,
        now_ns: now,
    })
}

/// Records a new flow's entry; called once the packet was forwarded.
#[inline(always)]
pub fn record(key: &FlowKey, choice: &Choice, vip: &VipInfo, epoch: u32, cfg: &LbConfig) {
    cache_fill(key, choice.backend_id, vip, epoch, cfg);
    let entry = ConnEntry {
        backend_id: choice.backend_id,
        _pad: 0,
        last_seen_ns: choice.now_ns,
    };
    if CONNTRACK.insert(key, entry, 0).is_err() {
        count(Counter::LbConntrackInsertFailed);
    }
    count(Counter::LbNewFlow);
}
