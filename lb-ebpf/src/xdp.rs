//! The XDP entry points: the balancer and the backends' decapsulator.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{
    icmp::too_big_quote,
    maps::{CONFIG_FLAG_DEBUG, FAMILY_V4, FAMILY_V6, FlowKey, LbConfig, VipInfo, VipKey},
    packet::PacketBytes,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed, parse},
    stats::Counter,
    viptable::{MAX_PROBES, key_words, slot_hash, words_eq},
    wire::tcp::{TCP_ACK, TCP_SYN},
};

use crate::{
    ctx::XdpBytes,
    forward::forward,
    lb::{cached, choose, record},
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
    let (key, vip, syn, allow_new) = match parsed.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let key = FlowKey {
                src: parsed.src_addr,
                dst: parsed.dst_addr,
                src_port: parsed.src_port,
                dst_port: parsed.dst_port,
                proto: parsed.proto,
                family,
                _pad: [0; 2],
            };
            let syn =
                parsed.proto == IPPROTO_TCP && parsed.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            // The fast path: an established TCP flow this CPU has seen.
            if parsed.proto == IPPROTO_TCP
                && !syn
                && let Some((choice, vip_id, mode)) = cached(&key, epoch, cfg)
            {
                let bytes = pkt.len() as u64;
                return match forward(pkt, parsed, mode, choice.backend, cfg) {
                    Ok(action) => {
                        account(&STATS_VIP, vip_id, bytes, false);
                        account(&STATS_BACKEND, choice.backend_id, bytes, false);
                        action
                    }
                    Err(reason) => {
                        count(reason);
                        xdp_action::XDP_DROP
                    }
                };
            }
            let Some(vip) = lookup_vip(
                &parsed.dst_addr,
                parsed.dst_port,
                parsed.proto,
                parsed.is_ipv6,
                epoch,
                cfg,
            ) else {
                count(Counter::LbNotVip);
                return xdp_action::XDP_PASS;
            };
            (key, vip, syn, true)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let Some(q) = too_big_quote(pkt, parsed) else {
                count(Counter::LbNotVip);
                return xdp_action::XDP_PASS;
            };
            let Some(vip) = lookup_vip(&q.vip, q.vip_port, q.proto, parsed.is_ipv6, epoch, cfg)
            else {
                count(Counter::LbNotVip);
                return xdp_action::XDP_PASS;
            };
            count(Counter::LbIcmpTooBig);
            let key = FlowKey {
                src: q.client,
                dst: q.vip,
                src_port: q.client_port,
                dst_port: q.vip_port,
                proto: q.proto,
                family,
                _pad: [0; 2],
            };
            // An error is no reason to start a flow; mid-stream rules apply.
            (key, vip, false, false)
        }
        _ => {
            count(Counter::LbNotVip);
            return xdp_action::XDP_PASS;
        }
    };
    let bytes = pkt.len() as u64;
    let Some(choice) = choose(&key, &vip, epoch, cfg, syn, allow_new) else {
        count(Counter::LbNoBackend);
        return xdp_action::XDP_DROP;
    };
    match forward(pkt, parsed, vip.mode, choice.backend, cfg) {
        Ok(action) => {
            // State and stats only for packets that really left.
            if choice.new_flow {
                record(&key, &choice, &vip, epoch, cfg);
                if cfg.flags & CONFIG_FLAG_DEBUG != 0 {
                    debug!(
                        pkt.ctx(),
                        "new flow: vip {} port {} -> backend {} (client port {})",
                        vip.vip_id,
                        key.dst_port,
                        choice.backend_id,
                        key.src_port
                    );
                }
            }
            account(&STATS_VIP, vip.vip_id, bytes, choice.new_flow);
            account(&STATS_BACKEND, choice.backend_id, bytes, choice.new_flow);
            action
        }
        Err(reason) => {
            count(reason);
            if cfg.flags & CONFIG_FLAG_DEBUG != 0 {
                debug!(
                    pkt.ctx(),
                    "drop: vip {} reason {}",
                    vip.vip_id,
                    reason.index()
                );
            }
            xdp_action::XDP_DROP
        }
    }
}
