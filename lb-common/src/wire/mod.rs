//! Typed views over protocol headers, one protocol per file.
//!
//! Every multi-byte field is stored as a byte array in network order, so the
//! structs have alignment 1 and can be overlaid on packet bytes at any offset
//! (VLAN tags and IPv4 options make L3/L4 offsets odd-aligned).

pub mod ethernet;
pub mod gue;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;

/// Marker for header structs that may be read from arbitrary packet bytes:
/// `#[repr(C)]`, alignment 1, no invalid bit patterns.
///
/// # Safety
/// Implementors must be plain byte structs as described above.
pub unsafe trait Header: Sized {}

#[inline(always)]
pub(crate) const fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}
