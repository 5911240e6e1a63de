//! Small helper programs shipped in the same object.
//!
//! - `pass`: attached to the peer of a veth that runs the balancer in native
//!   mode. A veth delivers XDP_TX frames only to a peer in XDP
//!   (NAPI) mode; without a program there they vanish.
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

/// The live-frames traffic generator (`cargo xtask bench`): every frame it
/// is given goes out of the interface unchanged.
#[xdp]
pub fn gen_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// `fwd_mac`'s next hop: destination MAC, then source MAC (benchmarks only).
#[aya_ebpf::macros::map(name = "FWD_MAC")]
static FWD_MAC: aya_ebpf::maps::Array<[u8; 12]> = aya_ebpf::maps::Array::with_max_entries(1, 0);

/// The trivial forwarder the packet-rate benchmark compares against: one
/// fixed next hop, MAC rewrite, XDP_TX.
#[xdp]
pub fn fwd_mac(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let (Some(mac), Some(eth)) = (FWD_MAC.get(0), pkt.header_mut::<EthHdr>(0)) else {
        return xdp_action::XDP_PASS;
    };
    // Byte stores: both MACs, as the balancer writes them (a frame leaving
    // with the client's source MAC would make the bridge relearn it).
    for i in 0..6 {
        // SAFETY: i < 6, inside both MACs and the 12-byte value.
        unsafe {
            core::ptr::write_volatile(eth.dst.as_mut_ptr().add(i), *mac.as_ptr().add(i));
            core::ptr::write_volatile(eth.src.as_mut_ptr().add(i), *mac.as_ptr().add(6 + i));
        }
    }
    xdp_action::XDP_TX
}
