//! IPv4 header (RFC 791).

use super::{Header, be16};

pub const IPV4_MIN_HDR_LEN: usize = 20;
/// The More Fragments flag and the fragment offset, in host order.
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub flags_frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for Ipv4Hdr {}

impl Ipv4Hdr {
    #[inline(always)]
    pub const fn version(&self) -> u8 {
        self.version_ihl >> 4
    }
    /// Header length in bytes (IHL × 4); 20 without options, at most 60.
    #[inline(always)]
    pub const fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }
    #[inline(always)]
    pub const fn total_len(&self) -> u16 {
        be16(self.total_len)
    }
    #[inline(always)]
    pub const fn frag_field(&self) -> u16 {
        be16(self.flags_frag_off)
    }
    /// True for every fragment, first included: only unfragmented datagrams
    /// carry a 5-tuple that every piece of the flow shares.
    #[inline(always)]
    pub const fn is_fragment(&self) -> bool {
        self.frag_field() & (IPV4_MF | IPV4_FRAG_OFFSET_MASK) != 0
    }
}
