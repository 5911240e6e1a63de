//! The per-packet policy (`lb_common::policy::decide` and `apply`) over its
//! host model: a map state and a run of packets decoded from the input
//! (see `lb_fuzz::policy`), every decision and every write checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lb_fuzz::policy::run(data);
});
