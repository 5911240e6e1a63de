//! The backend side: what the `decap` XDP program reads of an encapsulated
//! packet, the maps it shares with `lbd` in the backend role, and its
//! counters. Parsing is generic over [`PacketBytes`], so host tests run the
//! very code the program runs.
//!
//! A frame is one of:
//! - not for the decapsulator (not IPIP/6in4/6in6, not UDP to the GUE port,
//!   a fragment): passed to the kernel untouched;
//! - encapsulated but malformed (a GUE header we do not write, an inner
//!   header that does not match what the outer one says): dropped, counted;
//! - encapsulated for an address that is not a configured VIP: dropped,
//!   counted (a backend is not an open relay);
//! - encapsulated for a VIP: decapsulated and passed to the stack, or, when
//!   it names a second hop and no local socket holds its flow, sent on.

use crate::{
    encap::{IPPROTO_IPIP, IPPROTO_IPV6},
    packet::PacketBytes,
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    wire::{
        ethernet::{ETH_HDR_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, EthHdr},
        gue::{GUE_HDR_LEN, GUE_KIND_SECOND_HOP, GUE_SECOND_HOP_HLEN, GueHdr, GueSecondHop},
        ipv4::Ipv4Hdr,
        ipv6::Ipv6Hdr,
        tcp::{TCP_ACK, TCP_SYN, TcpHdr},
        udp::{UDP_HDR_LEN, UdpHdr},
    },
};

/// `DECAP_VIPS` key: a VIP this backend serves. Aligned to 4 so that the
/// data plane builds it on its stack with word stores (at alignment 1,
/// zeroing its tail becomes a `memset` call, a byte loop in BPF).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapVipKey {
    /// IPv4 in the first 4 bytes, the rest 0.
    pub addr: [u8; 16],
    /// 4 or 6; a word rather than a byte and padding, whose zeroing would
    /// be a `memset` call in BPF.
    pub family: u32,
}

crate::layout!(DecapVipKey { addr, family });

impl DecapVipKey {
    /// `addr`: 16 bytes, an IPv4 address in the first 4; `family` 4 or 6.
    #[inline(always)]
    pub const fn new(addr: [u8; 16], family: u8) -> Self {
        DecapVipKey {
            addr,
            family: family as u32,
        }
    }
}

/// `DECAP_VIPS` value (per CPU): what arrived for the VIP, by the outer
/// header's family (index 0 IPv4, 1 IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapTraffic {
    /// Decapsulated and handed to the stack.
    pub packets: [u64; 2],
    /// Frame bytes as received.
    pub bytes: [u64; 2],
    /// Sent on to the second hop.
    pub forwarded: [u64; 2],
}

crate::layout!(DecapTraffic {
    packets,
    bytes,
    forwarded
});

/// `DECAP_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConfig {
    /// UDP destination port of GUE, host order; 0: GUE is not accepted.
    pub gue_port: u16,
    pub _pad: [u8; 2],
    pub flags: u32,
}

crate::layout!(DecapConfig {
    gue_port,
    _pad,
    flags
});

/// `DECAP_HOPS` and `DECAP_NEIGH` key: a second hop's address, laid out as
/// a [`DecapVipKey`].
pub type NeighKey = DecapVipKey;

/// `DECAP_HOPS` value: how to reach a second hop, written by `lbd` from the
/// kernel's route and neighbor tables. The program cannot ask the kernel
/// itself: `bpf_fib_lookup` refuses on an interface that does not forward,
/// and a backend must not forward. A second hop without an entry is
/// dropped and queued in `DECAP_NEIGH` for `lbd` to resolve.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapHop {
    /// The next hop's MAC (the second hop itself on a shared segment, else
    /// its gateway).
    pub dmac: [u8; 6],
    /// The egress interface's MAC.
    pub smac: [u8; 6],
    /// The egress interface.
    pub ifindex: u32,
}

crate::layout!(DecapHop {
    dmac,
    smac,
    ifindex
});

macro_rules! decap_counters {
    ($($(#[$doc:meta])* $variant:ident = $idx:literal => $name:literal,)+) => {
        /// One slot in `DECAP_STATS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DecapCounter {
            $($(#[$doc])* $variant = $idx,)+
        }

        impl DecapCounter {
            pub const ALL: &'static [DecapCounter] = &[$(DecapCounter::$variant,)+];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable name for metrics labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $(DecapCounter::$variant => $name,)+
                }
            }
        }
    };
}

decap_counters! {
    /// not encapsulated for this backend: passed to the kernel untouched
    Passed = 0 => "passed",
    /// decapsulated and handed to the stack
    Decapsulated = 1 => "decapsulated",
    /// named a second hop, kept: a local socket holds the flow
    KeptSocket = 2 => "kept_socket",
    /// named a second hop, kept: the final ACK of a handshake answered with a SYN cookie
    KeptSyncookie = 3 => "kept_syncookie",
    /// named a second hop, kept: a SYN or not TCP
    KeptNew = 4 => "kept_new",
    /// no local socket for the flow: sent on to the second hop
    Forwarded = 5 => "forwarded",
    /// dropped: the inner destination is not a configured VIP
    DropNotVip = 6 => "drop_not_vip",
    /// dropped: malformed outer header (GUE version, control, flags or length we do not write)
    DropMalformedOuter = 7 => "drop_malformed_outer",
    /// dropped: malformed inner header (truncated, or not the family the outer header says)
    DropMalformedInner = 8 => "drop_malformed_inner",
    /// dropped: the second hop is not resolved yet (queued for lbd to resolve)
    DropNoNeighbor = 9 => "drop_no_neighbor",
    /// dropped: the second hop's resolved next hop could not be used
    DropNoRoute = 10 => "drop_no_route",
    /// dropped: the headers could not be moved to send it on
    DropForwardFailed = 11 => "drop_forward_failed",
}

impl DecapCounter {
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A drop counter.
    pub const fn is_drop(self) -> bool {
        (self as u32) >= DecapCounter::DropNotVip as u32
    }
}

/// What the outer headers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outer {
    /// Not for the decapsulator: to the kernel untouched.
    NotOurs,
    /// Encapsulated, but not as we write it.
    Malformed,
    Encap(Encap),
}

/// An encapsulated packet's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encap {
    pub outer_v6: bool,
    /// Outer IP header length (20 or 40).
    pub outer_ip_len: usize,
    /// Where the inner IP header starts.
    pub inner_offset: usize,
    pub inner_v6: bool,
    /// GUE (else IPIP).
    pub gue: bool,
    /// Offset of a second-hop block ([`GueSecondHop`]).
    pub second_hop: Option<usize>,
}

/// Reads the outer headers. `gue_port` 0: GUE is not accepted.
#[inline(always)]
pub fn outer<P: PacketBytes + ?Sized>(pkt: &P, gue_port: u16) -> Outer {
    let Some(eth) = pkt.header::<EthHdr>(0) else {
        return Outer::NotOurs;
    };
    let (outer_v6, outer_ip_len, proto) = match eth.ether_type() {
        ETHERTYPE_IPV4 => {
            let Some(ip) = pkt.header::<Ipv4Hdr>(ETH_HDR_LEN) else {
                return Outer::NotOurs;
            };
            // Options and fragments are never written by the balancer;
            // the kernel deals with them.
            if ip.version_ihl != 0x45 || ip.is_fragment() {
                return Outer::NotOurs;
            }
            (false, 20usize, ip.proto)
        }
        ETHERTYPE_IPV6 => {
            let Some(ip) = pkt.header::<Ipv6Hdr>(ETH_HDR_LEN) else {
                return Outer::NotOurs;
            };
            (true, 40usize, ip.next_header)
        }
        _ => return Outer::NotOurs,
    };
    let l4 = ETH_HDR_LEN + outer_ip_len;
    match proto {
        IPPROTO_IPIP | IPPROTO_IPV6 => Outer::Encap(Encap {
            outer_v6,
            outer_ip_len,
            inner_offset: l4,
            inner_v6: proto == IPPROTO_IPV6,
            gue: false,
            second_hop: None,
        }),
        IPPROTO_UDP => {
            let Some(udp) = pkt.header::<UdpHdr>(l4) else {
                return Outer::NotOurs;
            };
            if gue_port == 0 || udp.dst_port() != gue_port {
                return Outer::NotOurs;
            }
            let Some(gue) = pkt.header::<GueHdr>(l4 + UDP_HDR_LEN) else {
                return Outer::Malformed;
            };
            let inner_v6 = match gue.proto {
                IPPROTO_IPIP => false,
                IPPROTO_IPV6 => true,
                _ => return Outer::Malformed,
            };
            if gue.version() != 0 || gue.control() || gue.flags != [0, 0] {
                return Outer::Malformed;
            }
            let opts = l4 + UDP_HDR_LEN + GUE_HDR_LEN;
            let second_hop = match gue.hlen() {
                0 => None,
                GUE_SECOND_HOP_HLEN => {
                    let Some(hop) = pkt.header::<GueSecondHop>(opts) else {
                        return Outer::Malformed;
                    };
                    let family_ok = (hop.family == 4 && !outer_v6) || (hop.family == 6 && outer_v6);
                    if hop.kind != GUE_KIND_SECOND_HOP || !family_ok {
                        return Outer::Malformed;
                    }
                    Some(opts)
                }
                _ => return Outer::Malformed,
            };
            Outer::Encap(Encap {
                outer_v6,
                outer_ip_len,
                inner_offset: opts + 4 * gue.hlen() as usize,
                inner_v6,
                gue: true,
                second_hop,
            })
        }
        _ => Outer::NotOurs,
    }
}

/// What the inner packet says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inner {
    /// Its destination, as `DECAP_VIPS` is keyed.
    pub vip: DecapVipKey,
    /// The inner L4 header's offset and, for TCP, its flags.
    pub l4_offset: usize,
    pub tcp_flags: Option<u8>,
    /// Inner IP header length.
    pub ip_len: usize,
}

impl Inner {
    /// A packet that may be a new connection's or is not TCP: kept
    /// whatever it names (a SYN never carries a second hop; UDP has no
    /// socket to ask).
    #[inline(always)]
    pub const fn is_new_or_not_tcp(&self) -> bool {
        match self.tcp_flags {
            None => true,
            Some(f) => f & (TCP_SYN | TCP_ACK) == TCP_SYN,
        }
    }

    /// A handshake's final ACK could be answered from a SYN cookie.
    #[inline(always)]
    pub const fn maybe_cookie_ack(&self) -> bool {
        matches!(self.tcp_flags, Some(f) if f & (TCP_SYN | TCP_ACK) == TCP_ACK)
    }
}

/// Reads the inner IP header at `e.inner_offset`; `None`: malformed.
#[inline(always)]
pub fn inner<P: PacketBytes + ?Sized>(pkt: &P, e: &Encap) -> Option<Inner> {
    let off = e.inner_offset;
    let (vip, proto, ip_len) = if e.inner_v6 {
        let ip = pkt.header::<Ipv6Hdr>(off)?;
        if ip.version() != 6 {
            return None;
        }
        (DecapVipKey::new(ip.dst, 6), ip.next_header, 40usize)
    } else {
        let ip = pkt.header::<Ipv4Hdr>(off)?;
        if ip.version() != 4 || ip.header_len() < 20 {
            return None;
        }
        let addr = crate::parse::v4_in_16(ip.dst);
        let proto = if ip.is_fragment() { 0 } else { ip.proto };
        (DecapVipKey::new(addr, 4), proto, ip.header_len())
    };
    let l4_offset = off + ip_len;
    let tcp_flags = if proto == IPPROTO_TCP {
        Some(pkt.header::<TcpHdr>(l4_offset)?.flags)
    } else {
        None
    };
    Some(Inner {
        vip,
        l4_offset,
        tcp_flags,
        ip_len,
    })
}

/// Index of an outer family in [`DecapTraffic`].
#[inline(always)]
pub const fn family_index(outer_v6: bool) -> usize {
    outer_v6 as usize
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)] plain-old-data with explicit padding.
    unsafe impl aya::Pod for DecapVipKey {}
    unsafe impl aya::Pod for DecapTraffic {}
    unsafe impl aya::Pod for DecapConfig {}
    unsafe impl aya::Pod for DecapHop {}
}

#[cfg(test)]
mod tests;
