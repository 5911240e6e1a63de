//! TCP header (RFC 9293).

use super::{Header, be16};

pub const TCP_MIN_HDR_LEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub data_offset: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urgent: [u8; 2],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for TcpHdr {}

impl TcpHdr {
    #[inline(always)]
    pub const fn src_port(&self) -> u16 {
        be16(self.src_port)
    }
    #[inline(always)]
    pub const fn dst_port(&self) -> u16 {
        be16(self.dst_port)
    }
    /// Header length in bytes including options.
    #[inline(always)]
    pub const fn header_len(&self) -> usize {
        ((self.data_offset >> 4) as usize) * 4
    }
}
