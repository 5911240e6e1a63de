//! Indexes of the global per-CPU counters (`STATS_GLOBAL`).
//!
//! Every packet the program sees increments exactly one parse outcome and
//! exactly one verdict, so per outcome and per verdict the sums both equal the
//! packets seen; tests rely on that.

/// One slot in `STATS_GLOBAL`. Verdict slots equal the XDP action codes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    VerdictAborted = 0,
    VerdictDrop = 1,
    VerdictPass = 2,
    VerdictTx = 3,
    VerdictRedirect = 4,
    /// Ether type is neither IPv4 nor IPv6 (ARP, LLDP, ...).
    ParseNotIp = 5,
    /// Frame shorter than the Ethernet header or its VLAN tag.
    ParseTruncatedL2 = 6,
    /// IP header, or the length it announces, runs past the frame.
    ParseTruncatedL3 = 7,
    /// IP version that does not match the ether type, IHL below 5, or a total
    /// length shorter than the header.
    ParseBadL3 = 8,
    /// Any IPv4 fragment (only unfragmented datagrams have a full 5-tuple).
    ParseIpv4Fragment = 9,
    /// IPv6 with an extension header (fragment header included): not followed.
    ParseIpv6ExtHeader = 10,
    /// TCP or UDP header runs past the frame.
    ParseTruncatedL4 = 11,
    /// TCP data offset below 5 words or past the frame.
    ParseBadL4 = 12,
    ParseTcp = 13,
    ParseUdp = 14,
    /// A well-formed IP packet of another protocol (ICMP, GRE, ...).
    ParseOtherL4 = 15,
}

impl Counter {
    /// Number of slots; the size of `STATS_GLOBAL`.
    pub const COUNT: u32 = 16;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::VerdictAborted,
        Counter::VerdictDrop,
        Counter::VerdictPass,
        Counter::VerdictTx,
        Counter::VerdictRedirect,
        Counter::ParseNotIp,
        Counter::ParseTruncatedL2,
        Counter::ParseTruncatedL3,
        Counter::ParseBadL3,
        Counter::ParseIpv4Fragment,
        Counter::ParseIpv6ExtHeader,
        Counter::ParseTruncatedL4,
        Counter::ParseBadL4,
        Counter::ParseTcp,
        Counter::ParseUdp,
        Counter::ParseOtherL4,
    ];

    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable name for logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::VerdictAborted => "verdict_aborted",
            Counter::VerdictDrop => "verdict_drop",
            Counter::VerdictPass => "verdict_pass",
            Counter::VerdictTx => "verdict_tx",
            Counter::VerdictRedirect => "verdict_redirect",
            Counter::ParseNotIp => "parse_not_ip",
            Counter::ParseTruncatedL2 => "parse_truncated_l2",
            Counter::ParseTruncatedL3 => "parse_truncated_l3",
            Counter::ParseBadL3 => "parse_bad_l3",
            Counter::ParseIpv4Fragment => "parse_ipv4_fragment",
            Counter::ParseIpv6ExtHeader => "parse_ipv6_ext_header",
            Counter::ParseTruncatedL4 => "parse_truncated_l4",
            Counter::ParseBadL4 => "parse_bad_l4",
            Counter::ParseTcp => "parse_tcp",
            Counter::ParseUdp => "parse_udp",
            Counter::ParseOtherL4 => "parse_other_l4",
        }
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
