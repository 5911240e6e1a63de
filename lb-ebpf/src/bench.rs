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
    packet::PacketBytes,
};

use crate::ctx::XdpBytes;

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
