//! Backend selection: the per-CPU flow cache, then the connection table,
//! then the Maglev ring, with the second chance and re-pick rules of
//! DESIGN.md §3.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use lb_common::{
    conntrack::{
        self, Found, Placement, Probe, Table, fill, find, own_or_place, same_flow, ticks, touch,
    },
    flowcache::{CachedFlow, REFRESH_EVERY, slot_of},
    maps::{BACKEND_DRAINING, BACKEND_UP, BackendInfo, FlowKey, LbConfig, VipInfo},
    parse::IPPROTO_UDP,
    ring::{RING_CHUNK, flow_slot, ring_pos},
    stats::Counter,
};

use crate::maps::{BACKENDS, ConnTable, FLOW_CACHE, RINGS, count};

pub struct Choice {
    pub backend_id: u32,
    /// Points into `BACKENDS`: copying it would cost stack the verifier
    /// caps at 512 bytes.
    pub backend: &'static BackendInfo,
    /// A new flow, to record once the packet is on its way.
    pub new_flow: bool,
    /// Ticks (`lb_common::conntrack::TICK_SHIFT`) when the packet arrived.
    pub now: u32,
}

/// Flows on a draining backend stay; a down (or removed) one loses them.
#[inline(always)]
fn usable(b: &BackendInfo) -> bool {
    b.state == BACKEND_UP || b.state == BACKEND_DRAINING
}

/// The coarse clock (the last timer tick's `CLOCK_MONOTONIC`): exact to a
/// few milliseconds, which ticks of 1 ms and timeouts of seconds do not
/// notice, and without `bpf_ktime_get_ns`'s serialised TSC read, which cost
/// a connection-table hit a third of its time.
#[inline(always)]
fn now_ticks() -> u32 {
    // SAFETY: no preconditions.
    ticks(unsafe { bpf_ktime_get_coarse_ns() })
}

#[inline(always)]
fn udp_timeout_ticks(cfg: &LbConfig) -> u32 {
    conntrack::udp_timeout_ticks(cfg.udp_timeout_ns)
}

#[inline(always)]
fn ring_pick(
    vip: &VipInfo,
    generation: u8,
    slot: u32,
    cfg: &LbConfig,
) -> Option<(u32, &'static BackendInfo)> {
    let (element, lane) = ring_pos(vip.vip_id, generation, cfg.ring_size, slot);
    let id = RINGS.get(element)?.ids[(lane % RING_CHUNK) as usize];
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
fn cache_fill(key: &FlowKey, backend_id: u32, vip_id: u32, mode: u8, epoch: u32, cfg: &LbConfig) {
    if key.proto != IPPROTO_UDP
        && let Some(c) = cache_slot(key, cfg)
    {
        c.key = *key;
        c.backend_id = backend_id;
        c.hits = 0;
        c.vip_epoch = epoch;
        c.vip_id = vip_id;
        c.mode = mode;
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
    // Every REFRESH_EVERY-th hit takes the full path, so the table keeps
    // seeing the flow as recently used (and refills this entry).
    if c.hits % REFRESH_EVERY == 0 {
        return None;
    }
    count(Counter::LbConntrackHit);
    count(Counter::LbFlowCacheHit);
    let choice = Choice {
        backend_id: c.backend_id,
        backend: b,
        new_flow: false,
        now: 0,
    };
    Some((choice, c.vip_id, c.mode))
}

const NOT_FOUND: u64 = u64::MAX;

/// `key`'s connection-table entry, if it has one.
#[inline(always)]
pub fn lookup(key: &FlowKey, probe: &Probe) -> Option<Found> {
    match lb_find_slot(key, probe) {
        NOT_FOUND => None,
        found => Some(Found {
            idx: found as u32,
            backend_id: (found >> 32) as u32,
        }),
    }
}

/// A global BPF function (exported at link time, see `lb-ebpf/rustflags`):
/// inlined, probing eight ways kept the key's words and every way's fields
/// live at once, and the spills pushed the balancer's frame past the
/// verifier's 512 bytes; global, it is verified once rather than once per
/// path of the balancer that reaches it. Takes raw pointers (a global
/// function's pointer arguments may be null as far as the verifier knows)
/// and returns one word, in a register: the slot in the low half, the
/// backend read when the seal was checked in the high half.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_find_slot(key: *const FlowKey, probe: *const Probe) -> u64 {
    // SAFETY: null-checked; see `lb_entry_slot`.
    let (Some(key), Some(probe)) = (unsafe { key.as_ref() }, unsafe { probe.as_ref() }) else {
        return NOT_FOUND;
    };
    match find(&ConnTable, key, probe) {
        Some(f) => f.idx as u64 | (f.backend_id as u64) << 32,
        None => NOT_FOUND,
    }
}

/// Picks the backend for `key`; `None` means the VIP has no usable backend.
/// `at` is the flow's connection-table slot, if it has one (a SYN is not
/// looked up: it follows the live ring whatever an old entry says).
/// `allow_new` is false for packets that must neither create nor refresh
/// state (ICMP errors about a flow); `closing`: the client's FIN or RST.
/// `slot`: the flow's ring slot, if the caller already hashed it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn choose(
    key: &FlowKey,
    at: Option<Found>,
    vip: &VipInfo,
    epoch: u32,
    cfg: &LbConfig,
    tcp_syn: bool,
    closing: bool,
    allow_new: bool,
    slot: Option<u32>,
) -> Option<Choice> {
    let is_udp = key.proto == IPPROTO_UDP;
    let now = now_ticks();
    // A SYN starts a connection: it always follows the live ring, so a client
    // reusing a port after a change (or after a drain began) lands on the
    // current backends, and its entry is overwritten.
    let mut missed = tcp_syn;
    if tcp_syn {
        count(Counter::LbConntrackMiss);
    } else if let Some(found) = at {
        // The backend comes from `found`, checked against the seal; the slot
        // itself may have been reused by another CPU since (then the fields
        // read below belong to another flow, which only affects its expiry
        // and recency, never where this packet goes).
        let expired = ConnTable
            .slot(found.idx)
            .is_some_and(|s| s.expired(now, udp_timeout_ticks(cfg)));
        if allow_new && expired {
            count(Counter::LbUdpExpired);
        } else if let Some(b) = BACKENDS.get(found.backend_id)
            && usable(b)
            && b.serves(vip.vip_id)
        {
            count(Counter::LbConntrackHit);
            // ICMP errors about a flow neither refresh it nor fill the cache.
            // A closing flow's last packets take this path, so its entry
            // stays the one that ends it.
            if allow_new && touch(&mut ConnTable, found.idx, now, closing) == Some(false) {
                cache_fill(key, found.backend_id, vip.vip_id, vip.mode, epoch, cfg);
            }
            return Some(Choice {
                backend_id: found.backend_id,
                backend: b,
                new_flow: false,
                now,
            });
        } else {
            count(Counter::LbRepickDown);
        }
    } else {
        count(Counter::LbConntrackMiss);
        missed = true;
    }
    let slot = match slot {
        Some(s) => s,
        None => flow_slot(key, cfg.hash_seed, cfg.ring_size),
    };
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
        // SAFETY: no preconditions.
        && unsafe { bpf_ktime_get_ns() } < vip.second_chance_until_ns
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
        now,
    })
}

/// Where a new flow's entry goes, a global function like [`lb_find_slot`]
/// (only new flows pay for the call): the slot the flow already has, or
/// the free or stalest way of the emptier of its two buckets, read from
/// their heads. `find_first` is 0 when the caller has looked the flow up
/// already (only a SYN has not). Returns the slot in the low 32 bits, bit
/// 32 set if it displaces a live flow, bit 33 if it is the flow's own,
/// `u64::MAX` if no slot could be read.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_entry_slot(
    key: *const FlowKey,
    probe: *const Probe,
    now: u32,
    udp_timeout: u32,
    find_first: u32,
) -> u64 {
    // SAFETY: null-checked; a global function's pointer arguments point at
    // memory the verifier sized from their types.
    let (Some(key), Some(probe)) = (unsafe { key.as_ref() }, unsafe { probe.as_ref() }) else {
        return u64::MAX;
    };
    match own_or_place(&ConnTable, key, probe, now, udp_timeout, find_first != 0) {
        Some((at, own)) => at.idx as u64 | (at.evicts_live as u64) << 32 | (own as u64) << 33,
        None => u64::MAX,
    }
}

/// What the balancer knows of a flow's connection-table entry when it
/// records the flow.
#[derive(Clone, Copy)]
pub enum Entry {
    /// Its slot: an expired UDP flow, a re-pick after its backend went down.
    At(u32),
    /// Looked up, and it has none.
    Absent,
    /// Not looked up: a SYN, which follows the ring whatever an old entry
    /// says (its own slot, if any, is found when it is recorded).
    Unknown,
}

/// Records a new flow's entry, in its own slot if it has one; called once
/// the packet was forwarded.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn record(
    key: &FlowKey,
    entry: Entry,
    probe: &Probe,
    choice: &Choice,
    (vip_id, mode, epoch): (u32, u8, u32),
    closing: bool,
    cfg: &LbConfig,
) {
    let placed = match entry {
        Entry::At(idx) => Some((
            Placement {
                idx,
                evicts_live: false,
            },
            true,
        )),
        Entry::Absent | Entry::Unknown => {
            let find_first = matches!(entry, Entry::Unknown) as u32;
            match lb_entry_slot(key, probe, choice.now, udp_timeout_ticks(cfg), find_first) {
                u64::MAX => None,
                at => Some((
                    Placement {
                        idx: at as u32,
                        evicts_live: at & 1 << 32 != 0,
                    },
                    at & 1 << 33 != 0,
                )),
            }
        }
    };
    let own = placed.is_some_and(|(_, own)| own);
    let placed = placed.map(|(p, _)| p);
    let mut table = ConnTable;
    match placed.and_then(|p| {
        fill(&mut table, p.idx, key, probe, choice.backend_id, choice.now)?;
        if closing {
            touch(&mut table, p.idx, choice.now, true)?;
        }
        Some(p)
    }) {
        Some(p) => {
            if p.evicts_live {
                count(Counter::LbConntrackEvicted);
            }
        }
        None => count(Counter::LbConntrackInsertFailed),
    }
    // A flow that had an entry (a SYN reusing a port, a re-pick) may be in
    // this CPU's cache with its old backend: replace it, or the next packet
    // would go there. Other new flows leave the cache to their next packet:
    // a new flow's cache slot is a cold line (two dependent misses in a
    // per-CPU array), and many flows never send a second packet.
    if own && !closing {
        cache_fill(key, choice.backend_id, vip_id, mode, epoch, cfg);
    }
    count(Counter::LbNewFlow);
}
