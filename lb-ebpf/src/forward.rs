//! Sending the packet to its backend: L2 DSR (MAC rewrite), IPIP or GUE
//! encapsulation (4in4, 6in6, 6in4), then XDP_TX out of the interface it
//! came in on (lbd only accepts backends whose next hop is there).

use aya_ebpf::bindings::xdp_action;
use lb_common::{
    encap::{
        IPPROTO_IPIP, IPPROTO_IPV6, gue_overhead, gue_source_port, write_gue, write_outer_ipv4,
        write_outer_ipv6,
    },
    maps::{BackendInfo, Family, LbConfig, Mode},
    packet::PacketBytes,
    parse::{IPPROTO_UDP, Parsed},
    stats::Counter,
    wire::{
        ethernet::{ETH_HDR_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, EthHdr},
        gue::{GueHdr, GueSecondHop},
        ipv4::Ipv4Hdr,
        ipv6::Ipv6Hdr,
        udp::{UDP_HDR_LEN, UdpHdr},
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
    second_hop: Option<&BackendInfo>,
    cfg: &LbConfig,
) -> Result<u32, Counter> {
    // A packet at TTL 0 must not be forwarded; encapsulated, it would
    // leave with an outer TTL of 0 as well.
    if parsed.ttl == 0 {
        return Err(Counter::LbTtlExpired);
    }
    if mode != Mode::L2dsr {
        encapsulate(pkt, parsed, backend, second_hop, mode == Mode::Gue, cfg)?;
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
pub fn set_mac(to: &mut [u8; 6], from: &[u8; 6]) {
    for (i, byte) in from.iter().enumerate() {
        // SAFETY: `i` < 6, inside `to`.
        unsafe { core::ptr::write_volatile(to.as_mut_ptr().add(i), *byte) };
    }
}

/// The GUE source port of the packet's flow, from the packet's own bytes
/// (copies of the parsed addresses on the stack would be merged into
/// misaligned word accesses the verifier refuses).
#[inline(always)]
fn source_port(pkt: &XdpBytes, parsed: &Parsed) -> Result<u16, Counter> {
    let word = |b: &[u8; 4]| u32::from_be_bytes(*b);
    let client = if parsed.is_ipv6 {
        let ip: &Ipv6Hdr = pkt.header(parsed.l3_offset).ok_or(Counter::LbEncapFailed)?;
        let (Some(head), Some(tail)) = (ip.src.first_chunk::<4>(), ip.src.last_chunk::<4>()) else {
            return Err(Counter::LbEncapFailed);
        };
        word(head) ^ word(tail)
    } else {
        let ip: &Ipv4Hdr = pkt.header(parsed.l3_offset).ok_or(Counter::LbEncapFailed)?;
        word(&ip.src)
    };
    // Both ports: the first word of TCP, UDP and (quoting nothing useful,
    // but harmlessly) ICMP headers.
    let l4: &UdpHdr = pkt.header(parsed.l4_offset).ok_or(Counter::LbEncapFailed)?;
    let ports = u32::from_be_bytes([
        l4.src_port[0],
        l4.src_port[1],
        l4.dst_port[0],
        l4.dst_port[1],
    ]);
    Ok(gue_source_port(client, ports))
}

/// Puts `[Ethernet][outer IP]` (and for GUE `[UDP][GUE][second hop]`) in
/// front of the inner IP datagram. The inner L2 header (and any VLAN tag)
/// is replaced, so the head grows by the outer headers minus what the VLAN
/// tag gave back.
#[inline(always)]
fn encapsulate(
    pkt: &XdpBytes,
    parsed: &Parsed,
    backend: &BackendInfo,
    second_hop: Option<&BackendInfo>,
    gue: bool,
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
    let ip_len: usize = if outer_v6 { 40 } else { 20 };
    let outer_len = if gue {
        ip_len + gue_overhead(second_hop.is_some())
    } else {
        ip_len
    };
    // Before the head moves: the inner addresses are in `parsed`.
    let src_port = if gue { source_port(pkt, parsed)? } else { 0 };
    let (outer_proto, outer_payload) = if gue {
        (
            IPPROTO_UDP,
            inner_len.wrapping_add((outer_len - ip_len) as u16),
        )
    } else {
        (inner_proto, inner_len)
    };
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
            outer_payload,
            parsed.tos,
            ttl,
            outer_proto,
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
            outer_payload,
            parsed.tos,
            ttl,
            outer_proto,
        );
    }
    if gue {
        let l4 = ETH_HDR_LEN + ip_len;
        let udp: &mut UdpHdr = pkt.header_mut(l4).ok_or(Counter::LbEncapFailed)?;
        let gue: &mut GueHdr = pkt
            .header_mut(l4 + UDP_HDR_LEN)
            .ok_or(Counter::LbEncapFailed)?;
        let hop = match second_hop {
            Some(b) => Some((
                pkt.header_mut::<GueSecondHop>(l4 + UDP_HDR_LEN + 4)
                    .ok_or(Counter::LbEncapFailed)?,
                b,
            )),
            None => None,
        };
        write_gue(
            udp,
            gue,
            hop,
            src_port,
            cfg.gue_port,
            inner_len,
            inner_proto,
        );
    }
    Ok(())
}
