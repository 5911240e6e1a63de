//! Decapsulator for backends on kernels without ipip/ip6tnl modules: strips
//! the outer IPv4/IPv6 header of IPIP, 6in4 and 6in6 packets and hands the
//! inner datagram to the stack as if it had arrived bare.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::packet::PacketBytes;
use lb_common::{
    encap::{IPPROTO_IPIP, IPPROTO_IPV6},
    wire::{
        ethernet::{ETH_HDR_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, EthHdr},
        ipv4::Ipv4Hdr,
        ipv6::Ipv6Hdr,
    },
};

use crate::ctx::XdpBytes;

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let Some(eth) = pkt.header::<EthHdr>(0) else {
        return xdp_action::XDP_PASS;
    };
    let (outer_len, inner_proto) = match eth.ether_type() {
        ETHERTYPE_IPV4 => {
            let Some(ip) = pkt.header::<Ipv4Hdr>(ETH_HDR_LEN) else {
                return xdp_action::XDP_PASS;
            };
            if ip.version_ihl != 0x45 || ip.is_fragment() {
                return xdp_action::XDP_PASS;
            }
            (20usize, ip.proto)
        }
        ETHERTYPE_IPV6 => {
            let Some(ip) = pkt.header::<Ipv6Hdr>(ETH_HDR_LEN) else {
                return xdp_action::XDP_PASS;
            };
            (40usize, ip.next_header)
        }
        _ => return xdp_action::XDP_PASS,
    };
    let inner_type = match inner_proto {
        IPPROTO_IPIP => ETHERTYPE_IPV4,
        IPPROTO_IPV6 => ETHERTYPE_IPV6,
        _ => return xdp_action::XDP_PASS,
    };
    // Keep the MACs: move them forward over the outer header.
    let (dst, src) = (eth.dst, eth.src);
    if !pkt.adjust_head(outer_len as i32) {
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = pkt.header_mut::<EthHdr>(0) else {
        return xdp_action::XDP_DROP;
    };
    eth.dst = dst;
    eth.src = src;
    eth.ether_type = inner_type.to_be_bytes();
    xdp_action::XDP_PASS
}
