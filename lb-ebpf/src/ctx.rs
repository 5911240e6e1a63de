//! Packet access over an XDP context, in the shape the verifier accepts.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{packet::PacketBytes, wire::Header};

pub struct XdpBytes<'a> {
    ctx: &'a XdpContext,
}

impl<'a> XdpBytes<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx }
    }

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

    /// Writable view of a header. Packet memory is not owned by this view, so
    /// a shared receiver is honest; callers never keep two overlapping
    /// headers alive at once.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub fn header_mut<T: Header>(&self, offset: usize) -> Option<&mut T> {
        let start = self.data() + offset;
        if start + core::mem::size_of::<T>() > self.data_end() {
            return None;
        }
        // SAFETY: in bounds (checked above), alignment 1, and XDP owns the
        // packet exclusively while it runs.
        Some(unsafe { &mut *(start as *mut T) })
    }

    /// Moves the packet start by `delta` bytes (negative grows the head).
    /// Every pointer taken before is invalid afterwards.
    #[inline(always)]
    pub fn adjust_head(&self, delta: i32) -> bool {
        // SAFETY: the helper validates the delta against the headroom.
        unsafe { bpf_xdp_adjust_head(self.ctx.ctx, delta) == 0 }
    }

    #[inline(always)]
    pub fn ctx(&self) -> &XdpContext {
        self.ctx
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
