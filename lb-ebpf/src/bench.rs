//! Benchmark support (`cargo xtask bench --xdp`), never attached in service.
//!
//! BPF_PROG_TEST_RUN with a repeat count reuses one buffer, so a program that
//! encapsulates sees its own output from the second run on and the timing
//! measures the wrong path. `bench_restore` puts the original frame back
//! (optionally with a fresh source address, for the new-flow path) and
//! tail-calls the program under test; timing it with a trivial target gives
//! the wrapper's own cost to subtract.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{
    benchframe::{BENCH_FRAME_MAX, BenchFrame},
    conntrack::same_flow,
    flowcache::slot_of,
    maps::Mode,
    packet::PacketBytes,
    parse::{parse_l2, parse_l3},
    stats::Counter,
    vipfilter,
};

use crate::{
    ctx::XdpBytes,
    forward::forward,
    maps::{BACKENDS, CONFIG, FLOW_CACHE, STATS_BACKEND, STATS_VIP, VIP_FILTER, account, count},
};

#[map(name = "BENCH_FRAME")]
static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

#[map(name = "BENCH_SEQ")]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "BENCH_TARGET")]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[repr(C)]
struct Word([u8; 8]);
// SAFETY: plain bytes, alignment 1.
unsafe impl lb_common::wire::Header for Word {}

#[repr(C)]
struct Seq([u8; 4]);
// SAFETY: plain bytes, alignment 1.
unsafe impl lb_common::wire::Header for Seq {}

#[xdp]
pub fn bench_restore(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let Some(frame) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let want = frame.len as usize;
    let have = pkt.len();
    // Encapsulation only ever grows the head: give the growth back.
    if have > want && !pkt.adjust_head((have - want) as i32) {
        return xdp_action::XDP_ABORTED;
    }
    let mut i = 0;
    while i < BENCH_FRAME_MAX / 8 {
        let off = i * 8;
        if off >= want {
            break;
        }
        let Some(w) = pkt.header_mut::<Word>(off) else {
            break;
        };
        let mut b = [0u8; 8];
        b.copy_from_slice(&frame.bytes[off..off + 8]);
        w.0 = b;
        i += 1;
    }
    // Masked so the verifier sees a bounded offset (the range check alone
    // lands on a copy of the register).
    let vary = (frame.vary_offset & 0x7f) as usize;
    if vary != 0
        && vary + 4 <= BENCH_FRAME_MAX
        && let Some(seq) = BENCH_SEQ.get_ptr_mut(0)
        && let Some(dst) = pkt.header_mut::<Seq>(vary)
    {
        // SAFETY: per-CPU slot.
        let n = unsafe {
            *seq = (*seq).wrapping_add(1);
            *seq
        };
        dst.0 = n.to_be_bytes();
    }
    // SAFETY: a tail call either jumps or returns here.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// The least an encapsulating balancer that keeps flows on their backends
/// does for an established packet, built from this balancer's own parts:
/// the parse, one per-CPU flow-cache lookup with its key check, the
/// backend's record and the ipip encapsulation. No VIP-address filter, no
/// policy, no counters: the floor `cargo xtask bench` reports under the
/// established rows.
#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    floor::<false>(&ctx)
}

/// The floor plus what the balancer adds on the same path for operators
/// and for traffic to the host: the VIP-address filter and the six counter
/// updates of a flow-cache hit (parse outcome, connection-table and
/// flow-cache hits, verdict, the VIP's and the backend's traffic).
#[xdp]
pub fn bench_floor_counted(ctx: XdpContext) -> u32 {
    floor::<true>(&ctx)
}

#[inline(always)]
fn floor<const COUNTED: bool>(ctx: &XdpContext) -> u32 {
    let pkt = XdpBytes::new(ctx);
    let Ok(parsed) = parse_l2(&pkt).and_then(|l2| {
        if COUNTED && let Some(bit) = vipfilter::dst_bit(&pkt, l2) {
            let (word, mask) = vipfilter::word_and_mask(bit);
            if VIP_FILTER.get(word).is_some_and(|w| w & mask == 0) {
                return Err(Counter::ParseNotVipAddress);
            }
        }
        parse_l3(&pkt, l2)
    }) else {
        return xdp_action::XDP_PASS;
    };
    let key = parsed.flow_key();
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let slot = slot_of(&key) & cfg.flow_cache_slots.wrapping_sub(1);
    let Some(cached) = FLOW_CACHE.get(slot) else {
        return xdp_action::XDP_PASS;
    };
    // The whole key is compared whatever the slot holds (`same_flow` has no
    // early exit, and an empty slot's zero key never matches a parsed one),
    // so a miss costs what a hit does: on a CPU whose cache the balancer did
    // not fill, the floor takes the first backend rather than failing.
    let (backend_id, vip_id) = if same_flow(&cached.key, &key) {
        (cached.backend_id, cached.vip_id)
    } else {
        (1, 0)
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return xdp_action::XDP_PASS;
    };
    let bytes = pkt.len() as u64;
    match forward(&pkt, &parsed, Mode::Ipip, backend, None, cfg) {
        Ok(action) => {
            if COUNTED {
                count(parsed.counter());
                count(Counter::LbConntrackHit);
                count(Counter::LbFlowCacheHit);
                count(Counter::VerdictTx);
                account(&STATS_VIP, vip_id, bytes, false);
                account(&STATS_BACKEND, backend_id, bytes, false);
            }
            action
        }
        Err(_) => xdp_action::XDP_DROP,
    }
}
