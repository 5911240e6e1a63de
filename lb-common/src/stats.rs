//! Indexes of the global per-CPU counters (`STATS_GLOBAL`).
//!
//! Every packet the program sees increments exactly one parse outcome and
//! exactly one verdict, so per outcome and per verdict the sums both equal the
//! packets seen; tests rely on that.

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $idx:literal => $name:literal,)+) => {
        /// One slot in `STATS_GLOBAL`. Verdict slots equal the XDP action codes.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Counter {
            $($(#[$doc])* $variant = $idx,)+
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];

            /// Number of slots; the size of `STATS_GLOBAL`.
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable name for logs and metrics labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)+
                }
            }
        }
    };
}

counters! {
    VerdictAborted = 0 => "verdict_aborted",
    VerdictDrop = 1 => "verdict_drop",
    VerdictPass = 2 => "verdict_pass",
    VerdictTx = 3 => "verdict_tx",
    VerdictRedirect = 4 => "verdict_redirect",
    /// Ether type is neither IPv4 nor IPv6 (ARP, LLDP, ...).
    ParseNotIp = 5 => "parse_not_ip",
    /// Frame shorter than the Ethernet header or its VLAN tag.
    ParseTruncatedL2 = 6 => "parse_truncated_l2",
    /// IP header, or the length it announces, runs past the frame.
    ParseTruncatedL3 = 7 => "parse_truncated_l3",
    /// IP version that does not match the ether type, IHL below 5, or a total
    /// length shorter than the header.
    ParseBadL3 = 8 => "parse_bad_l3",
    /// Any IPv4 fragment (only unfragmented datagrams have a full 5-tuple).
    ParseIpv4Fragment = 9 => "parse_ipv4_fragment",
    /// IPv6 with an extension header (fragment header included): not followed.
    ParseIpv6ExtHeader = 10 => "parse_ipv6_ext_header",
    /// TCP or UDP header runs past the frame.
    ParseTruncatedL4 = 11 => "parse_truncated_l4",
    /// TCP data offset below 5 words or past the frame.
    ParseBadL4 = 12 => "parse_bad_l4",
    ParseTcp = 13 => "parse_tcp",
    ParseUdp = 14 => "parse_udp",
    /// A well-formed IP packet of another protocol (ICMP, GRE, ...).
    ParseOtherL4 = 15 => "parse_other_l4",
    /// Well-formed, but not addressed to a VIP: passed to the kernel.
    LbNotVip = 16 => "lb_not_vip",
    /// Packet of a flow found in the connection table.
    LbConntrackHit = 17 => "lb_conntrack_hit",
    /// Packet to a VIP with no connection-table entry.
    LbConntrackMiss = 18 => "lb_conntrack_miss",
    /// Non-SYN TCP without an entry kept its backend via the previous ring.
    LbSecondChanceHit = 19 => "lb_second_chance_hit",
    /// A known flow's backend was down: picked again from the ring.
    LbRepickDown = 20 => "lb_repick_down",
    /// A UDP entry older than the timeout: treated as a new flow.
    LbUdpExpired = 21 => "lb_udp_expired",
    /// A flow recorded in the connection table for the first time.
    LbNewFlow = 22 => "lb_new_flow",
    /// The VIP has no usable backend: dropped.
    LbNoBackend = 23 => "lb_no_backend",
    /// Growing the head for encapsulation failed: dropped.
    LbEncapFailed = 24 => "lb_encap_failed",
    /// No connection-table slot could be written (a table smaller than
    /// `CONFIG` says); the packet is still forwarded.
    LbConntrackInsertFailed = 25 => "lb_conntrack_insert_failed",
    /// ICMP fragmentation-needed / packet-too-big quoting a VIP flow, sent to
    /// that flow's backend.
    LbIcmpTooBig = 26 => "lb_icmp_too_big",
    /// IPv4 VIP over an IPv6 backend in ipip mode is not a supported tunnel.
    LbUnsupportedEncap = 27 => "lb_unsupported_encap",
    /// No configuration written yet (ring size 0): passed to the kernel.
    LbNotConfigured = 28 => "lb_not_configured",
    /// The encapsulated frame would exceed the egress MTU: dropped.
    LbFrameTooBig = 29 => "lb_frame_too_big",
    /// Of the connection-table hits, those served by the per-CPU flow cache.
    LbFlowCacheHit = 30 => "lb_flow_cache_hit",
    /// A new entry displaced an embryonic flow's (one packet seen, not yet
    /// expired): during a flood, mostly the flood's own entries. Never an
    /// established flow (see `conntrack`). The displaced flow keeps its
    /// backend while the ring does not change.
    LbConntrackEvicted = 31 => "lb_conntrack_evicted",
    /// IPv4 TTL or IPv6 hop limit 0: not forwarded (a router would drop
    /// it), dropped.
    LbTtlExpired = 32 => "lb_ttl_expired",
    /// A new flow was not recorded: every way it may take held an
    /// established flow. The connection table is too small for its real
    /// load (a flood of spoofed packets never fills it with established
    /// flows). The flow follows the ring.
    LbConntrackFull = 33 => "lb_conntrack_full",
    /// `gue` mode, a mid-stream packet without an entry inside the
    /// second-chance window: sent to the live ring's backend naming the
    /// previous ring's as its second hop.
    LbSecondHop = 34 => "lb_second_hop",
    /// IPv4 or IPv6 to an address no VIP has (the VIP-address filter):
    /// passed to the kernel without the full parse, counted once more in
    /// `lb_not_vip` (or `lb_not_configured`).
    ParseNotVipAddress = 35 => "parse_not_vip_address",
}

impl Counter {
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    pub const fn is_verdict(self) -> bool {
        (self as u32) <= Counter::VerdictRedirect as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_slot_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i, "{c:?}");
        }
    }

    #[test]
    fn names_are_unique() {
        for a in Counter::ALL {
            for b in Counter::ALL {
                if a != b {
                    assert_ne!(a.name(), b.name());
                }
            }
        }
    }
}
