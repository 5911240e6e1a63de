//! The connection table's global BPF functions. The per-packet decision is
//! `lb_common::policy`; these two are where it reaches the table.
//!
//! Global functions (exported at link time, see `lb-ebpf/rustflags`):
//! inlined, probing eight ways kept the key's words and every way's fields
//! live at once, and the spills pushed the balancer's frame past the
//! verifier's 512 bytes; global, each is verified once rather than once per
//! path of the balancer that reaches it. They take raw pointers (a global
//! function's pointer arguments may be null as far as the verifier knows,
//! and it sizes the memory behind them from their types) and return one
//! word, in a register.

use lb_common::{
    conntrack::{Placement, Probe, Timeouts, find, own_or_place},
    maps::FlowKey,
};

use crate::maps::ConnTable;

pub const NOT_FOUND: u64 = u64::MAX;

/// `key`'s entry: the slot in the low half, the backend read when the seal
/// was checked in the high half; [`NOT_FOUND`] if it has none.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_find_slot(key: *const FlowKey, probe: *const Probe) -> u64 {
    // SAFETY: null-checked; sized by the verifier from the types.
    let (Some(key), Some(probe)) = (unsafe { key.as_ref() }, unsafe { probe.as_ref() }) else {
        return NOT_FOUND;
    };
    match find(&ConnTable, key, probe) {
        Some(f) => f.idx as u64 | (f.backend_id as u64) << 32,
        None => NOT_FOUND,
    }
}

/// Where a new flow's entry goes (only new flows pay for the call): the
/// slot the flow already has, or the free or stalest embryonic way of the
/// emptier of its two buckets, read from their heads. `timeouts` is
/// [`lb_common::conntrack::Timeouts::to_word`]; `find_first` is 0 when the
/// caller has looked the flow up already (only a SYN has not). Returns the
/// slot in the low 32 bits, bit 32 set if it displaces a live flow, bit 33
/// if it is the flow's own, bit 34 alone if every way holds an established
/// flow, `u64::MAX` if no slot could be read.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_entry_slot(
    key: *const FlowKey,
    probe: *const Probe,
    now: u32,
    timeouts: u32,
    find_first: u32,
) -> u64 {
    // SAFETY: null-checked; sized by the verifier from the types.
    let (Some(key), Some(probe)) = (unsafe { key.as_ref() }, unsafe { probe.as_ref() }) else {
        return u64::MAX;
    };
    let timeouts = Timeouts::from_word(timeouts);
    match own_or_place(&ConnTable, key, probe, now, timeouts, find_first != 0) {
        Some((Placement::Way { idx, evicts_live }, own)) => {
            idx as u64 | (evicts_live as u64) << 32 | (own as u64) << 33
        }
        Some((Placement::Full, _)) => 1 << 34,
        None => u64::MAX,
    }
}
