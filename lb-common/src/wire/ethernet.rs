//! Ethernet II and IEEE 802.1Q/802.1ad tags.

use super::{Header, be16};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

pub const ETH_HDR_LEN: usize = 14;
pub const VLAN_HDR_LEN: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for EthHdr {}

impl EthHdr {
    #[inline(always)]
    pub const fn ether_type(&self) -> u16 {
        be16(self.ether_type)
    }
}

/// The 4 bytes after the outer ether type when it is a VLAN TPID.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for VlanHdr {}

impl VlanHdr {
    #[inline(always)]
    pub const fn vlan_id(&self) -> u16 {
        be16(self.tci) & 0x0fff
    }
    #[inline(always)]
    pub const fn ether_type(&self) -> u16 {
        be16(self.ether_type)
    }
}

#[inline(always)]
pub const fn is_vlan_tpid(ether_type: u16) -> bool {
    ether_type == ETHERTYPE_VLAN || ether_type == ETHERTYPE_QINQ
}
