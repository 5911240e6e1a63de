//! Small helper programs shipped in the same object.
//!
//! - `pass`: attached to the peer of a veth that runs the balancer in native
//!   mode. A veth delivers XDP_TX/REDIRECT frames only to a peer in XDP
//!   (NAPI) mode; without a program there they vanish (DESIGN.md §2).
//! - `mac_swap_tx`: the trivial forwarder benchmarks compare against.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::wire::ethernet::EthHdr;

use crate::ctx::XdpBytes;

#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn mac_swap_tx(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let Some(eth) = pkt.header_mut::<EthHdr>(0) else {
        return xdp_action::XDP_DROP;
    };
    core::mem::swap(&mut eth.dst, &mut eth.src);
    xdp_action::XDP_TX
}
