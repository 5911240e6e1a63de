//! Packet access over an XDP context, in the shape the verifier accepts.

use aya_ebpf::programs::XdpContext;
use lb_common::{packet::PacketBytes, wire::Header};

pub struct XdpBytes<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpBytes<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx }
    }
}

impl XdpBytes<'_> {
    // Volatile loads keep LLVM from proving a bounds check redundant from an
    // earlier length comparison (e.g. "IP total length fits, so the TCP header
    // fits") and deleting it: the verifier cannot follow that reasoning and
    // rejects the access.
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's whole run.
        unsafe { core::ptr::read_volatile(&(*self.ctx.ctx).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.ctx.ctx).data_end) as usize }
    }
}

impl PacketBytes for XdpBytes<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn header<T: Header>(&self, offset: usize) -> Option<&T> {
        let start = self.data() + offset;
        // Compare pointers, not lengths: the verifier only learns the packet
        // range from `ptr + size <= data_end`.
        if start + core::mem::size_of::<T>() > self.data_end() {
            return None;
        }
        // SAFETY: in bounds (checked above) and `T` has alignment 1.
        Some(unsafe { &*(start as *const T) })
    }
}
