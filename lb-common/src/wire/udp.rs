//! UDP header (RFC 768).

use super::{Header, be16};

pub const UDP_HDR_LEN: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for UdpHdr {}

impl UdpHdr {
    #[inline(always)]
    pub const fn src_port(&self) -> u16 {
        be16(self.src_port)
    }
    #[inline(always)]
    pub const fn dst_port(&self) -> u16 {
        be16(self.dst_port)
    }
    #[inline(always)]
    pub const fn length(&self) -> u16 {
        be16(self.len)
    }
}
