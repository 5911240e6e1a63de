//! Backend selection: connection table first, then the Maglev ring, with the
//! second chance and re-pick rules of DESIGN.md §3.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    maps::{BACKEND_DRAINING, BACKEND_UP, BackendInfo, ConnEntry, FlowKey, LbConfig, VipInfo},
    parse::IPPROTO_UDP,
    ring::{flow_slot, ring_index},
    stats::Counter,
};

use crate::maps::{BACKENDS, CONNTRACK, RINGS, count};

pub struct Choice {
    pub backend_id: u32,
    pub backend: BackendInfo,
    pub new_flow: bool,
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
) -> Option<(u32, BackendInfo)> {
    let id = *RINGS.get(ring_index(vip.vip_id, generation, cfg.ring_size, slot))?;
    if id == 0 {
        return None;
    }
    let b = *BACKENDS.get(id)?;
    Some((id, b))
}

/// Picks the backend for `key`; `None` means the VIP has no usable backend.
/// `allow_new` is false for packets that must not create state (ICMP errors).
#[inline(always)]
pub fn choose(
    key: &FlowKey,
    vip: &VipInfo,
    cfg: &LbConfig,
    tcp_syn: bool,
    allow_new: bool,
) -> Option<Choice> {
    // Only UDP entries age by time: TCP ones live until the LRU evicts them,
    // and reading the clock is a measurable share of a packet's budget.
    let is_udp = key.proto == IPPROTO_UDP;
    let now = if is_udp {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let mut expired = false;
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: map value pointer valid for this program run.
        let entry = unsafe { &mut *entry };
        if is_udp && now.wrapping_sub(entry.last_seen_ns) > cfg.udp_timeout_ns {
            count(Counter::LbUdpExpired);
            expired = true;
        } else if let Some(b) = BACKENDS.get(entry.backend_id) {
            if usable(b) {
                count(Counter::LbConntrackHit);
                if is_udp {
                    entry.last_seen_ns = now;
                }
                return Some(Choice {
                    backend_id: entry.backend_id,
                    backend: *b,
                    new_flow: false,
                });
            }
            count(Counter::LbRepickDown);
        } else {
            count(Counter::LbRepickDown);
        }
    } else {
        count(Counter::LbConntrackMiss);
    }
    let slot = flow_slot(key, cfg.hash_seed, cfg.ring_size);
    let mut picked = None;
    // Second chance: a mid-stream TCP packet we have no entry for belongs to
    // a flow another node (or an evicted entry) placed, most likely on the
    // ring before the last change. Keep it there while that backend lives.
    if !tcp_syn
        && !is_udp
        && !expired
        && let Some((id, b)) = ring_pick(vip, vip.ring_gen ^ 1, slot, cfg)
        && usable(&b)
    {
        count(Counter::LbSecondChanceHit);
        picked = Some((id, b));
    }
    let (backend_id, backend) = match picked {
        Some(p) => p,
        None => ring_pick(vip, vip.ring_gen, slot, cfg)?,
    };
    if allow_new {
        let entry = ConnEntry {
            backend_id,
            _pad: 0,
            last_seen_ns: now,
        };
        if CONNTRACK.insert(key, entry, 0).is_err() {
            count(Counter::LbConntrackInsertFailed);
        }
        count(Counter::LbNewFlow);
    }
    Some(Choice {
        backend_id,
        backend,
        new_flow: allow_new,
    })
}
