//! The balancer's entry point: it parses, asks `lb_common::policy` what to
//! do, and does it (the backends' decapsulator is `decap.rs`).

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{
    maps::CONFIG_FLAG_DEBUG,
    packet::PacketBytes,
    parse::{Parsed, parse_l2, parse_l3},
    policy::{self, Verdict},
    stats::Counter,
    vipfilter,
};

use crate::{
    ctx::XdpBytes,
    forward::forward,
    maps::{
        CONFIG, KERNEL_MAPS, KernelMaps, STATS_BACKEND, STATS_VIP, VIP_FILTER, VIP_TABLE_GEN,
        account, count,
    },
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

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    let pkt = XdpBytes::new(&ctx);
    let parsed = match parse_l2(&pkt).and_then(|l2| {
        // Traffic for the host itself leaves before the rest of the parse:
        // one read of the destination address and one bit (see
        // `lb_common::vipfilter`).
        if let Some(bit) = vipfilter::dst_bit(&pkt, l2) {
            let (word, mask) = vipfilter::word_and_mask(bit);
            if VIP_FILTER.get(word).is_some_and(|w| w & mask == 0) {
                return Err(Counter::ParseNotVipAddress);
            }
        }
        parse_l3(&pkt, l2)
    }) {
        Ok(p) => p,
        Err(Counter::ParseNotVipAddress) => {
            count(Counter::ParseNotVipAddress);
            count(match CONFIG.get(0) {
                Some(cfg) if policy::configured(cfg) => Counter::LbNotVip,
                _ => Counter::LbNotConfigured,
            });
            return verdict(xdp_action::XDP_PASS);
        }
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
    let (Some(cfg), Some(&epoch)) = (CONFIG.get(0), VIP_TABLE_GEN.get(0)) else {
        return xdp_action::XDP_PASS;
    };
    if !policy::configured(cfg) {
        // Loaded but not yet programmed: hands off.
        count(Counter::LbNotConfigured);
        return xdp_action::XDP_PASS;
    }
    let Some((key, kind)) = policy::classify(pkt, parsed) else {
        count(Counter::LbNotVip);
        return xdp_action::XDP_PASS;
    };
    let decision = policy::decide(&KERNEL_MAPS, cfg, epoch, &key, kind);
    let fwd = match decision.verdict {
        Verdict::Forward(f) => f,
        Verdict::Pass(_) => return xdp_action::XDP_PASS,
        Verdict::Drop(_) => return xdp_action::XDP_DROP,
    };
    let plan = fwd.plan;
    // One forwarding tail for every path: inlined twice, the encapsulation
    // code doubled the program and its stack frame.
    let bytes = pkt.len() as u64;
    match forward(pkt, parsed, plan.mode(), fwd.backend, fwd.second_hop, cfg) {
        Ok(action) => {
            // State and stats only for packets that really left.
            policy::apply(&mut KernelMaps::new(), cfg, epoch, &key, &plan);
            let new_flow = plan.new_flow();
            if new_flow && cfg.flags & CONFIG_FLAG_DEBUG != 0 {
                debug!(
                    pkt.ctx(),
                    "new flow: vip {} port {} -> backend {} (client port {})",
                    plan.vip_id,
                    key.dst_port,
                    plan.backend_id,
                    key.src_port
                );
            }
            account(&STATS_VIP, plan.vip_id, bytes, new_flow);
            account(&STATS_BACKEND, plan.backend_id, bytes, new_flow);
            action
        }
        Err(reason) => {
            count(reason);
            if cfg.flags & CONFIG_FLAG_DEBUG != 0 {
                debug!(
                    pkt.ctx(),
                    "drop: vip {} reason {}",
                    plan.vip_id,
                    reason.index()
                );
            }
            xdp_action::XDP_DROP
        }
    }
}
