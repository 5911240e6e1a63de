//! Map definitions. Sizes here are the compiled defaults; `lbd` overrides the
//! ones its configuration sets before loading.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::stats::Counter;

#[map(name = "STATS_GLOBAL")]
pub static STATS_GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = STATS_GLOBAL.get_ptr_mut(counter.index()) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}
