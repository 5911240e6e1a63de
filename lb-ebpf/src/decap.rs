//! The backends' decapsulator (`lbd` in the backend role attaches it): strips
//! IPIP, 6in4, 6in6 and GUE outer headers and hands the inner datagram to
//! the stack as if it had arrived bare, for configured VIPs only. A GUE
//! packet that names a second hop is kept only when a local socket holds
//! its flow (or it may start one); otherwise it is sent on to the second
//! hop, once. The rules are `lb_common::decap`; this is the glue.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, xdp_action,
    },
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp,
        bpf_tcp_check_syncookie,
    },
    macros::{map, xdp},
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use lb_common::{
    decap::{
        self, DecapConfig, DecapCounter, DecapHop, DecapTraffic, DecapVipKey, Encap, Inner,
        NeighKey, Outer, family_index,
    },
    encap::{copy_addr, write_outer_ipv4, write_outer_ipv6},
    packet::PacketBytes,
    parse::IPPROTO_UDP,
    wire::{
        ethernet::{ETH_HDR_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, EthHdr},
        gue::{GUE_SECOND_HOP_LEN, GueHdr, GueSecondHop},
        ipv4::Ipv4Hdr,
        ipv6::Ipv6Hdr,
        tcp::TcpHdr,
        udp::{UDP_HDR_LEN, UdpHdr},
    },
};

use crate::{ctx::XdpBytes, forward::set_mac};

/// The VIPs this backend serves, with what arrived for each (per CPU).
#[map]
pub static DECAP_VIPS: PerCpuHashMap<DecapVipKey, DecapTraffic> =
    PerCpuHashMap::with_max_entries(1024, 0);

/// `DECAP_CONFIG[0]`.
#[map]
pub static DECAP_CONFIG: Array<DecapConfig> = Array::with_max_entries(1, 0);

/// One slot per `DecapCounter`.
#[map]
pub static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapCounter::COUNT, 0);

/// How to reach each second hop (see `lb_common::decap::DecapHop`),
/// written by lbd. LRU: second hops nobody uses any more (or made up by
/// whoever sent the packet) make room for the ones in use.
#[map]
pub static DECAP_HOPS: LruHashMap<NeighKey, DecapHop> = LruHashMap::with_max_entries(4096, 0);

/// Second hops without a `DECAP_HOPS` entry, with when one was wanted
/// (coarse ns); lbd resolves them and removes them.
#[map]
pub static DECAP_NEIGH: LruHashMap<NeighKey, u64> = LruHashMap::with_max_entries(256, 0);

const TCP_LISTEN: u32 = 10;

#[inline(always)]
fn count(c: DecapCounter) {
    if let Some(slot) = DECAP_STATS.get_ptr_mut(c.index()) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn drop_as(c: DecapCounter) -> u32 {
    count(c);
    xdp_action::XDP_DROP
}

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let gue_port = DECAP_CONFIG.get(0).map_or(0, |c| c.gue_port);
    let e = match decap::outer(&pkt, gue_port) {
        Outer::NotOurs => {
            count(DecapCounter::Passed);
            return xdp_action::XDP_PASS;
        }
        Outer::Malformed => return drop_as(DecapCounter::DropMalformedOuter),
        Outer::Encap(e) => e,
    };
    let Some(inner) = decap::inner(&pkt, &e) else {
        return drop_as(DecapCounter::DropMalformedInner);
    };
    let Some(traffic) = DECAP_VIPS.get_ptr_mut(inner.vip) else {
        return drop_as(DecapCounter::DropNotVip);
    };
    let fam = family_index(e.outer_v6);
    let bytes = pkt.len() as u64;
    if let Some(hop) = e.second_hop {
        let kept = if inner.is_new_or_not_tcp() {
            DecapCounter::KeptNew
        } else {
            match socket_holds(&ctx, &pkt, &e, &inner) {
                Some(c) => c,
                None => {
                    return match send_on(&ctx, &pkt, &e, hop) {
                        Ok(action) => {
                            // SAFETY: per-CPU value, no concurrent writer.
                            unsafe { (*traffic).forwarded[fam] += 1 };
                            count(DecapCounter::Forwarded);
                            action
                        }
                        Err(c) => drop_as(c),
                    };
                }
            }
        };
        count(kept);
    }
    if !strip(&pkt, &e) {
        return drop_as(DecapCounter::DropMalformedOuter);
    }
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        (*traffic).packets[fam] += 1;
        (*traffic).bytes[fam] += bytes;
    }
    count(DecapCounter::Decapsulated);
    xdp_action::XDP_PASS
}

/// Removes the outer headers, keeping the MACs, so the stack sees the inner
/// datagram as if it had arrived bare.
#[inline(always)]
fn strip(pkt: &XdpBytes, e: &Encap) -> bool {
    let Some(eth) = pkt.header::<EthHdr>(0) else {
        return false;
    };
    let (dst, src) = (eth.dst, eth.src);
    if !pkt.adjust_head((e.inner_offset - ETH_HDR_LEN) as i32) {
        return false;
    }
    let Some(eth) = pkt.header_mut::<EthHdr>(0) else {
        return false;
    };
    eth.dst = dst;
    eth.src = src;
    let inner_type = if e.inner_v6 {
        ETHERTYPE_IPV6
    } else {
        ETHERTYPE_IPV4
    };
    eth.ether_type = inner_type.to_be_bytes();
    true
}

/// Whether this host holds the flow: an established or closing socket, a
/// pending handshake, or (for the final ACK of a handshake answered with a
/// SYN cookie, which leaves no state behind) a listener that accepts the
/// cookie. `None`: it does not; the packet belongs to the second hop.
#[inline(always)]
fn socket_holds(
    ctx: &XdpContext,
    pkt: &XdpBytes,
    e: &Encap,
    inner: &Inner,
) -> Option<DecapCounter> {
    let th = pkt.header::<TcpHdr>(inner.l4_offset)?;
    // Built whole, each family's tuple: zero-filling the union first would
    // be a `memset` call (a byte loop in BPF).
    let sport = u16::from_ne_bytes(th.src_port);
    let dport = u16::from_ne_bytes(th.dst_port);
    let sk: *mut bpf_sock = if e.inner_v6 {
        let ip = pkt.header::<Ipv6Hdr>(e.inner_offset)?;
        let mut t = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: words(&ip.src),
            daddr: words(&ip.dst),
            sport,
            dport,
        };
        lookup(
            ctx,
            (&mut t as *mut bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2).cast(),
            size_of_val(&t),
        )
    } else {
        let ip = pkt.header::<Ipv4Hdr>(e.inner_offset)?;
        let mut t = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: u32::from_ne_bytes(ip.src),
            daddr: u32::from_ne_bytes(ip.dst),
            sport,
            dport,
        };
        lookup(
            ctx,
            (&mut t as *mut bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1).cast(),
            size_of_val(&t),
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket the lookup returned; released below on every path.
    let state = unsafe { (*sk).state };
    let held = if state != TCP_LISTEN {
        Some(DecapCounter::KeptSocket)
    } else if inner.maybe_cookie_ack() {
        // The fixed header only (the verifier checks the length against
        // what was bounds-checked; the cookie needs only the addresses).
        let ip_len = if e.inner_v6 { 40 } else { 20 };
        let iph: Option<*const u8> = if e.inner_v6 {
            pkt.header::<Ipv6Hdr>(e.inner_offset)
                .map(|ip| (ip as *const Ipv6Hdr).cast())
        } else {
            pkt.header::<Ipv4Hdr>(e.inner_offset)
                .map(|ip| (ip as *const Ipv4Hdr).cast())
        };
        let valid = match iph {
            // SAFETY: both pointers are into the packet, their lengths
            // checked (the IP header's by `header`, the TCP header's 20
            // bytes above).
            Some(iph) => unsafe {
                bpf_tcp_check_syncookie(
                    sk.cast(),
                    iph.cast_mut().cast(),
                    ip_len,
                    (th as *const TcpHdr).cast_mut().cast(),
                    20,
                ) == 0
            },
            None => false,
        };
        valid.then_some(DecapCounter::KeptSyncookie)
    } else {
        None
    };
    // SAFETY: the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    held
}

/// A 16-byte address from the packet as the helpers take it.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let p = a.as_ptr().cast::<u32>();
    // SAFETY: 16 readable bytes; unaligned reads of packet memory.
    unsafe {
        [
            p.read_unaligned(),
            p.add(1).read_unaligned(),
            p.add(2).read_unaligned(),
            p.add(3).read_unaligned(),
        ]
    }
}

/// `bpf_skc_lookup_tcp` in this namespace.
#[inline(always)]
fn lookup(ctx: &XdpContext, tuple: *mut bpf_sock_tuple, size: usize) -> *mut bpf_sock {
    // SAFETY: the helper reads `size` bytes of the tuple; the context is
    // this program's.
    unsafe {
        bpf_skc_lookup_tcp(
            ctx.ctx.cast(),
            tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    }
}

/// A 16-byte address on the stack, aligned so it can be copied as words.
#[repr(C, align(8))]
struct Addr16([u8; 16]);

/// Re-encapsulates to the second hop without it (so the next backend keeps
/// the packet whatever it holds: no loops) and sends it: the same outer
/// family, this backend as the source, the UDP source port kept (the flow's
/// receive queue), the next hop as lbd resolved it.
#[inline(always)]
fn send_on(ctx: &XdpContext, pkt: &XdpBytes, e: &Encap, hop: usize) -> Result<u32, DecapCounter> {
    let malformed = DecapCounter::DropMalformedOuter;
    let l4 = ETH_HDR_LEN + e.outer_ip_len;
    let (mut own, mut next) = (Addr16([0; 16]), Addr16([0; 16]));
    {
        let h = pkt.header::<GueSecondHop>(hop).ok_or(malformed)?;
        if e.outer_v6 {
            copy_addr(&mut next.0, &h.addr);
        } else {
            // Only the first 4 bytes of an IPv4 second hop count: the key
            // lbd resolves has the rest 0, whatever the sender put there.
            let Some(a) = h.addr.first_chunk::<4>() else {
                return Err(malformed);
            };
            next.0 = lb_common::parse::v4_in_16(*a);
        }
    }
    let (sport, dport) = {
        let udp = pkt.header::<UdpHdr>(l4).ok_or(malformed)?;
        (udp.src_port, udp.dst_port)
    };
    let proto = pkt
        .header::<GueHdr>(l4 + UDP_HDR_LEN)
        .ok_or(malformed)?
        .proto;
    let (tos, ttl, outer_payload) = if e.outer_v6 {
        let ip = pkt.header::<Ipv6Hdr>(ETH_HDR_LEN).ok_or(malformed)?;
        copy_addr(&mut own.0, &ip.dst);
        (ip.traffic_class(), ip.hop_limit, ip.payload_len())
    } else {
        let ip = pkt.header::<Ipv4Hdr>(ETH_HDR_LEN).ok_or(malformed)?;
        own.0 = lb_common::parse::v4_in_16(ip.dst);
        (ip.tos, ip.ttl, ip.total_len().wrapping_sub(20))
    };
    // The UDP datagram without the second hop: what follows the outer IP
    // header, less the 20 bytes that go.
    let udp_len = outer_payload.wrapping_sub(GUE_SECOND_HOP_LEN as u16);
    if !pkt.adjust_head(GUE_SECOND_HOP_LEN as i32) {
        return Err(DecapCounter::DropForwardFailed);
    }
    let failed = DecapCounter::DropForwardFailed;
    // Everything in front of the GUE header moved with the head: write it
    // all again (the MACs once the next hop is known).
    let ether_type = if e.outer_v6 {
        ETHERTYPE_IPV6
    } else {
        ETHERTYPE_IPV4
    };
    pkt.header_mut::<EthHdr>(0).ok_or(failed)?.ether_type = ether_type.to_be_bytes();
    if e.outer_v6 {
        let ip = pkt.header_mut::<Ipv6Hdr>(ETH_HDR_LEN).ok_or(failed)?;
        write_outer_ipv6(ip, &own.0, &next.0, udp_len, tos, ttl, IPPROTO_UDP);
    } else {
        let ip = pkt.header_mut::<Ipv4Hdr>(ETH_HDR_LEN).ok_or(failed)?;
        let (Some(src), Some(dst)) = (own.0.first_chunk::<4>(), next.0.first_chunk::<4>()) else {
            return Err(failed);
        };
        write_outer_ipv4(ip, src, dst, udp_len, tos, ttl, IPPROTO_UDP);
    }
    {
        let udp = pkt.header_mut::<UdpHdr>(l4).ok_or(failed)?;
        udp.src_port = sport;
        udp.dst_port = dport;
        udp.len = udp_len.to_be_bytes();
        udp.check = [0, 0];
    }
    pkt.header_mut::<GueHdr>(l4 + UDP_HDR_LEN)
        .ok_or(failed)?
        .write(proto, 0);
    next_hop(ctx, pkt, e.outer_v6, &next)
}

/// Addresses the frame to the second hop's next hop, as lbd resolved it,
/// and picks the verdict. An unresolved second hop is queued for lbd.
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    pkt: &XdpBytes,
    v6: bool,
    next: &Addr16,
) -> Result<u32, DecapCounter> {
    let key = NeighKey::new(next.0, if v6 { 6 } else { 4 });
    // SAFETY: a map value, read once.
    let Some(hop) = (unsafe { DECAP_HOPS.get(key) }) else {
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let _ = DECAP_NEIGH.insert(key, now, 0);
        return Err(DecapCounter::DropNoNeighbor);
    };
    if hop.ifindex == 0 {
        return Err(DecapCounter::DropNoRoute);
    }
    let eth = pkt
        .header_mut::<EthHdr>(0)
        .ok_or(DecapCounter::DropForwardFailed)?;
    set_mac(&mut eth.dst, &hop.dmac);
    set_mac(&mut eth.src, &hop.smac);
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        Ok(xdp_action::XDP_TX)
    } else {
        // SAFETY: no preconditions; the kernel checks the interface.
        Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
    }
}
