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

impl PacketBytes for XdpBytes<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.ctx.data_end() - self.ctx.data()
    }

    #[inline(always)]
    fn header<T: Header>(&self, offset: usize) -> Option<&T> {
        let start = self.ctx.data() + offset;
        // Compare pointers, not lengths: the verifier only learns the packet
        // range from `ptr + size <= data_end`.
        if start + core::mem::size_of::<T>() > self.ctx.data_end() {
            return None;
        }
        // SAFETY: in bounds (checked above) and `T` has alignment 1.
        Some(unsafe { &*(start as *const T) })
    }
}
