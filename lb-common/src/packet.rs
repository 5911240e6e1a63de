//! Bounds-checked access to packet bytes.
//!
//! The parser is generic over [`PacketBytes`] so the very same code runs in
//! host tests (over a byte slice) and in the XDP program (over
//! `data..data_end`, where each access is the pointer comparison the verifier
//! needs to see).

use crate::wire::Header;

pub trait PacketBytes {
    /// Bytes from the start of the frame to its end.
    fn len(&self) -> usize;

    /// The header at `offset`, or `None` when it does not fit in the packet.
    fn header<T: Header>(&self, offset: usize) -> Option<&T>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PacketBytes for [u8] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    #[inline(always)]
    fn header<T: Header>(&self, offset: usize) -> Option<&T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        let bytes = self.get(offset..end)?;
        // SAFETY: `Header` types are byte structs of alignment 1 with no invalid
        // bit patterns, and `bytes` is exactly `size_of::<T>()` long.
        Some(unsafe { &*(bytes.as_ptr() as *const T) })
    }
}
