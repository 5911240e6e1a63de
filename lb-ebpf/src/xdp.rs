//! The XDP entry points: the balancer and the backends' decapsulator.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{
    conntrack,
    icmp::too_big_quote,
    maps::{CONFIG_FLAG_DEBUG, FAMILY_V4, FAMILY_V6, FlowKey, LbConfig, VipInfo, VipKey},
    packet::PacketBytes,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed, parse},
    ring::flow_slot,
    stats::Counter,
    viptable::{MAX_PROBES, key_words, slot_hash, words_eq},
    wire::tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    ctx::XdpBytes,
    forward::forward,
    lb::{Entry, cached, choose, lookup, record},
    maps::{CONFIG, STATS_BACKEND, STATS_VIP, VIP_TABLE, VIP_TABLE_GEN, account, count},
};

#[inline(always)]
fn verdict(action: u32) -> u32 {
    let c = match action {
        xdp_action::XDP_DROP => Counter::VerdictDrop,
        xdp_action::XDP_PASS => Counter::VerdictPass,
        xdp_action::XDP_TX => Counter::VerdictTx,
        xdp_action::XDP_REDIRECT => Counter::VerdictRedirect,
        _ => Counter::VerdictAborted,
    };
    count(c);
    action
}

/// Index in `VIP_TABLE` of the slot holding `words`, if any. Returns a
/// plain index rather than the entry so that every way out of the probe
/// loop leaves the verifier the same kind of state, and it can prune them.
#[inline(always)]
fn probe(words: &[u32; 5], base: u32, mask: u32) -> Option<u32> {
    let h = slot_hash(words);
    let mut i = 0;
    while i < MAX_PROBES {
        let idx = base + (h.wrapping_add(i) & mask);
        let slot = VIP_TABLE.get(idx)?;
        if slot.key.family == 0 {
            return None;
        }
        if words_eq(&key_words(&slot.key), words) {
            return Some(idx);
        }
        i += 1;
    }
    None
}

/// The VIP for this destination: the exact port first, then port 0 (all
/// ports of that address and protocol).
#[inline(always)]
fn lookup_vip(
    addr: &[u8; 16],
    port: u16,
    proto: u8,
    is_ipv6: bool,
    epoch: u32,
    cfg: &LbConfig,
) -> Option<VipInfo> {
    let generation = epoch & 1;
    let mask = cfg.vip_slots.wrapping_sub(1);
    let base = generation * cfg.vip_slots;
    let family = if is_ipv6 { FAMILY_V6 } else { FAMILY_V4 };
    let mut key = VipKey {
        addr: *addr,
        port,
        proto,
        family,
    };
    let idx = match probe(&key_words(&key), base, mask) {
        Some(idx) => idx,
        None => {
            key.port = 0;
            probe(&key_words(&key), base, mask)?
        }
    };
    Some(VIP_TABLE.get(idx)?.info)
}

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let parsed = match parse(&pkt) {
        Ok(p) => p,
        Err(reason) => {
            // Not understood: the kernel decides (and drops what is broken).
            count(reason);
            return verdict(xdp_action::XDP_PASS);
        }
    };
    count(parsed.counter());
    verdict(balance(&pkt, &parsed))
}

#[inline(always)]
fn balance(pkt: &XdpBytes, parsed: &Parsed) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if cfg.ring_size == 0 {
        // Loaded but not yet programmed: hands off.
        count(Counter::LbNotConfigured);
        return xdp_action::XDP_PASS;
    }
    let Some(&epoch) = VIP_TABLE_GEN.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let family = if parsed.is_ipv6 { FAMILY_V6 } else { FAMILY_V4 };
    // `allow_new`: false for an ICMP error about a flow, which must neither
    // start nor refresh state (mid-stream rules apply).
    let (key, syn, closing, allow_new) = match parsed.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let key = parsed.flow_key();
            let is_tcp = parsed.proto == IPPROTO_TCP;
            let syn = is_tcp && parsed.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let closing = is_tcp && parsed.tcp_flags & (TCP_FIN | TCP_RST) != 0;
            (key, syn, closing, true)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let Some(q) = too_big_quote(pkt, parsed) else {
                count(Counter::LbNotVip);
                return xdp_action::XDP_PASS;
            };
            let key = FlowKey {
                src: q.client,
                dst: q.vip,
                src_port: q.client_port,
                dst_port: q.vip_port,
                proto: q.proto,
                family,
                _pad: [0; 2],
            };
            (key, false, false, false)
        }
        _ => {
            count(Counter::LbNotVip);
            return xdp_action::XDP_PASS;
        }
    };
    // The fast path: an established TCP flow this CPU has seen. (A FIN or
    // RST goes the full way, to mark its entry closing.)
    let fast = if allow_new && key.proto == IPPROTO_TCP && !syn && !closing {
        cached(&key, epoch, cfg)
    } else {
        None
    };
    // `table`: the flow's place in the connection table, for recording it.
    let (choice, vip_id, mode, table) = match fast {
        Some((choice, vip_id, mode)) => (choice, vip_id, mode, None),
        None => {
            // A SYN's ring slot, hashed before the VIP lookup although a SYN
            // to a non-VIP address wastes it: the hash is a long dependent
            // chain (Murmur3: nine rounds, a tail and a finaliser), and
            // started here the CPU runs it beside the VIP and connection-table
            // hashes instead of after them. A new flow gains 5-10 ns; a SYN
            // to the host itself pays about 15 (`cargo xtask bench`).
            let syn_slot = if syn {
                Some(flow_slot(&key, cfg.hash_seed, cfg.ring_size))
            } else {
                None
            };
            let Some(vip) = lookup_vip(
                &key.dst,
                key.dst_port,
                key.proto,
                parsed.is_ipv6,
                epoch,
                cfg,
            ) else {
                count(Counter::LbNotVip);
                return xdp_action::XDP_PASS;
            };
            if !allow_new {
                count(Counter::LbIcmpTooBig);
            }
            let flow = conntrack::probe(&key, cfg.conntrack_seed, cfg.conntrack_bucket_mask);
            // A SYN is not looked up here: it follows the ring whatever an
            // old entry says (its own slot is found when it is recorded).
            let at = if syn { None } else { lookup(&key, &flow) };
            let Some(choice) = choose(
                &key, at, &vip, epoch, cfg, syn, closing, allow_new, syn_slot,
            ) else {
                count(Counter::LbNoBackend);
                return xdp_action::XDP_DROP;
            };
            (
                choice,
                vip.vip_id,
                vip.mode,
                Some((
                    flow,
                    match at {
                        Some(f) => Entry::At(f.idx),
                        None if syn => Entry::Unknown,
                        None => Entry::Absent,
                    },
                )),
            )
        }
    };
    // One forwarding tail for every path: inlined twice, the encapsulation
    // code doubled the program and its stack frame.
    let bytes = pkt.len() as u64;
    match forward(pkt, parsed, mode, choice.backend, cfg) {
        Ok(action) => {
            // State and stats only for packets that really left.
            if choice.new_flow
                && let Some((flow, entry)) = &table
            {
                record(
                    &key,
                    *entry,
                    flow,
                    &choice,
                    (vip_id, mode, epoch),
                    closing,
                    cfg,
                );
                if cfg.flags & CONFIG_FLAG_DEBUG != 0 {
                    debug!(
                        pkt.ctx(),
                        "new flow: vip {} port {} -> backend {} (client port {})",
                        vip_id,
                        key.dst_port,
                        choice.backend_id,
                        key.src_port
                    );
                }
            }
            account(&STATS_VIP, vip_id, bytes, choice.new_flow);
            account(&STATS_BACKEND, choice.backend_id, bytes, choice.new_flow);
            action
        }
        Err(reason) => {
            count(reason);
            if cfg.flags & CONFIG_FLAG_DEBUG != 0 {
                debug!(pkt.ctx(), "drop: vip {} reason {}", vip_id, reason.index());
            }
            xdp_action::XDP_DROP
        }
    }
}
