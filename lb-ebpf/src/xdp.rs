//! The XDP entry point.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{parse::parse, stats::Counter};

use crate::{ctx::XdpBytes, maps::count};

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let outcome = match parse(&pkt) {
        Ok(parsed) => parsed.counter(),
        Err(reason) => reason,
    };
    count(outcome);
    count(Counter::VerdictPass);
    xdp_action::XDP_PASS
}
