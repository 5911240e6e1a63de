//! Sending the packet to its backend: L2 DSR (MAC rewrite) or IPIP
//! encapsulation (4in4, 6in6, 6in4), then XDP_TX out of the interface it
//! came in on (lbd only accepts backends whose next hop is there).

use aya_ebpf::bindings::xdp_action;
use lb_common::{
    encap::{IPPROTO_IPIP, IPPROTO_IPV6, write_outer_ipv4, write_outer_ipv6},
    maps::{BackendInfo, Family, LbConfig, Mode},
    packet::PacketBytes,
    parse::Parsed,
    stats::Counter,
    wire::{
        ethernet::{ETH_HDR_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, EthHdr},
        ipv4::Ipv4Hdr,
        ipv6::Ipv6Hdr,
    },
};

use crate::ctx::XdpBytes;

/// Rewrites (and maybe encapsulates) the packet for `backend` and returns the
/// verdict; `Err` carries the drop reason.
#[inline(always)]
pub fn forward(
    pkt: &XdpBytes,
    parsed: &Parsed,
    mode: Mode,
    backend: &BackendInfo,
    cfg: &LbConfig,
) -> Result<u32, Counter> {
    // A packet at TTL 0 must not be forwarded; encapsulated, it would
    // leave with an outer TTL of 0 as well.
    if parsed.ttl == 0 {
        return Err(Counter::LbTtlExpired);
    }
    if mode != Mode::L2dsr {
        encapsulate(pkt, parsed, backend, cfg)?;
    }
    let eth: &mut EthHdr = pkt.header_mut(0).ok_or(Counter::LbEncapFailed)?;
    set_mac(&mut eth.dst, &backend.next_hop_mac);
    set_mac(&mut eth.src, &backend.src_mac);
    Ok(xdp_action::XDP_TX)
}

/// Byte stores LLVM cannot merge into a `memmove` call (from a map value
/// into the packet it cannot rule out overlap, and in BPF `memmove` is a
/// slow byte-loop subprogram).
#[inline(always)]
fn set_mac(to: &mut [u8; 6], from: &[u8; 6]) {
    for (i, byte) in from.iter().enumerate() {
        // SAFETY: `i` < 6, inside `to`.
        unsafe { core::ptr::write_volatile(to.as_mut_ptr().add(i), *byte) };
    }
}

/// Puts `[Ethernet][outer IP]` in front of the inner IP datagram. The inner
/// L2 header (and any VLAN tag) is replaced, so the head grows by the outer
/// IP header minus what the VLAN tag gave back.
#[inline(always)]
fn encapsulate(
    pkt: &XdpBytes,
    parsed: &Parsed,
    backend: &BackendInfo,
    cfg: &LbConfig,
) -> Result<(), Counter> {
    // Inner length and TTL/hop limit before the head moves.
    let (inner_len, ttl) = if parsed.is_ipv6 {
        let ip: &Ipv6Hdr = pkt.header(parsed.l3_offset).ok_or(Counter::LbEncapFailed)?;
        (ip.payload_len().wrapping_add(40), ip.hop_limit)
    } else {
        let ip: &Ipv4Hdr = pkt.header(parsed.l3_offset).ok_or(Counter::LbEncapFailed)?;
        (ip.total_len(), ip.ttl)
    };
    let outer_v6 = backend.family() == Family::V6;
    if outer_v6 && !parsed.is_ipv6 {
        return Err(Counter::LbUnsupportedEncap);
    }
    let inner_proto = if parsed.is_ipv6 {
        IPPROTO_IPV6
    } else {
        IPPROTO_IPIP
    };
    let outer_len: usize = if outer_v6 { 40 } else { 20 };
    if cfg.max_frame_len != 0
        && (ETH_HDR_LEN + outer_len + inner_len as usize) > cfg.max_frame_len as usize
    {
        return Err(Counter::LbFrameTooBig);
    }
    // l3_offset is 14 or 18 (VLAN), so the delta is 16..40 and never shrinks.
    let grow = (ETH_HDR_LEN + outer_len - parsed.l3_offset) as i32;
    if !pkt.adjust_head(-grow) {
        return Err(Counter::LbEncapFailed);
    }
    let eth: &mut EthHdr = pkt.header_mut(0).ok_or(Counter::LbEncapFailed)?;
    if outer_v6 {
        eth.ether_type = ETHERTYPE_IPV6.to_be_bytes();
        let ip: &mut Ipv6Hdr = pkt.header_mut(ETH_HDR_LEN).ok_or(Counter::LbEncapFailed)?;
        write_outer_ipv6(
            ip,
            &cfg.encap_src_v6,
            &backend.addr,
            inner_len,
            parsed.tos,
            ttl,
            inner_proto,
        );
    } else {
        eth.ether_type = ETHERTYPE_IPV4.to_be_bytes();
        let ip: &mut Ipv4Hdr = pkt.header_mut(ETH_HDR_LEN).ok_or(Counter::LbEncapFailed)?;
        // An IPv4 backend's address is the first 4 of its 16 bytes.
        let Some(dst) = backend.addr.first_chunk::<4>() else {
            return Err(Counter::LbEncapFailed);
        };
        write_outer_ipv4(
            ip,
            &cfg.encap_src_v4,
            dst,
            inner_len,
            parsed.tos,
            ttl,
            inner_proto,
        );
    }
    Ok(())
}
