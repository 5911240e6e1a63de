//! IPv6 fixed header (RFC 8200) and the extension header numbers.

use super::{Header, be16};

pub const IPV6_HDR_LEN: usize = 40;

pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_ESP: u8 = 50;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;
pub const NEXTHDR_MOBILITY: u8 = 135;
pub const NEXTHDR_HIP: u8 = 139;
pub const NEXTHDR_SHIM6: u8 = 140;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Hdr {
    pub version_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for Ipv6Hdr {}

impl Ipv6Hdr {
    #[inline(always)]
    pub const fn version(&self) -> u8 {
        self.version_tc_flow[0] >> 4
    }
    #[inline(always)]
    pub const fn traffic_class(&self) -> u8 {
        (self.version_tc_flow[0] << 4) | (self.version_tc_flow[1] >> 4)
    }
    #[inline(always)]
    pub const fn payload_len(&self) -> u16 {
        be16(self.payload_len)
    }
}

/// Extension headers that sit between the fixed header and L4. We do not walk
/// them: a chain of unbounded length is costly to verify, and traffic to a
/// load-balanced service does not carry them in practice.
#[inline(always)]
pub const fn is_extension_header(next_header: u8) -> bool {
    matches!(
        next_header,
        NEXTHDR_HOP
            | NEXTHDR_ROUTING
            | NEXTHDR_FRAGMENT
            | NEXTHDR_ESP
            | NEXTHDR_AUTH
            | NEXTHDR_DEST
            | NEXTHDR_MOBILITY
            | NEXTHDR_HIP
            | NEXTHDR_SHIM6
    )
}
