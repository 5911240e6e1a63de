//! Keys and values of the BPF maps (DESIGN.md §3). `#[repr(C)]` with explicit
//! padding so the kernel and userspace agree on every byte, and so that hash
//! keys never carry uninitialised padding.

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Forwarding modes (`VipInfo::mode`).
pub const MODE_IPIP: u8 = 1;
pub const MODE_L2DSR: u8 = 2;

/// Backend states (`BackendInfo::state`).
pub const BACKEND_UNUSED: u8 = 0;
pub const BACKEND_UP: u8 = 1;
/// Failed health checks: existing flows are re-picked.
pub const BACKEND_DOWN: u8 = 2;
/// Out of the ring, existing flows stay until they end.
pub const BACKEND_DRAINING: u8 = 3;

/// `VIPS` key. `port` 0 matches every port of the address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into `RINGS` and `STATS_VIP`.
    pub vip_id: u32,
    pub flags: u32,
    pub mode: u8,
    /// Which of the two ring generations is live (0 or 1); the other is the
    /// previous one, kept for the second chance.
    pub ring_gen: u8,
    pub _pad: [u8; 6],
    /// `CLOCK_MONOTONIC` ns until which the previous generation may serve a
    /// second chance. Bounded so that a flow placed after the flip and later
    /// evicted is not sent to the old table's backend; 0 while the idle
    /// generation is being rewritten.
    pub second_chance_until_ns: u64,
}

impl VipInfo {
    /// A VIP whose live ring is generation 0, with no second chance yet.
    pub const fn new(vip_id: u32, mode: u8) -> Self {
        VipInfo {
            vip_id,
            flags: 0,
            mode,
            ring_gen: 0,
            _pad: [0; 6],
            second_chance_until_ns: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    pub family: u8,
    pub state: u8,
    /// Next hop's MAC (the backend itself on a shared segment, else a router).
    pub next_hop_mac: [u8; 6],
    /// MAC of the interface the packet leaves through.
    pub src_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Egress interface; equal to the ingress one means XDP_TX, otherwise
    /// XDP_REDIRECT through `TX_PORTS`.
    pub ifindex: u32,
    /// The VIP this slot serves. A connection-table entry or an old ring
    /// naming the slot after it was reused for another VIP's backend is
    /// ignored (the flow is re-picked), never sent to that backend.
    /// `BACKEND_ANY_VIP` serves every VIP (tests, shared backends).
    pub vip_id: u32,
}

pub const BACKEND_ANY_VIP: u32 = u32::MAX;

impl BackendInfo {
    /// Whether this slot may carry traffic of VIP `vip_id`.
    #[inline(always)]
    pub const fn serves(&self, vip_id: u32) -> bool {
        self.vip_id == BACKEND_ANY_VIP || self.vip_id == vip_id
    }
}

/// A flow: the client-to-VIP 5-tuple (the connection table's key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `STATS_BACKEND` and `STATS_VIP` value (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    /// Frame bytes as received at the LB, before encapsulation.
    pub bytes: u64,
    pub new_flows: u64,
}

/// `LbConfig::flags`: data-plane debug events (aya-log) on. Off, they cost
/// one test of a word the program reads anyway.
pub const CONFIG_FLAG_DEBUG: u32 = 1;

/// `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Outer source address for IPv4 encapsulation.
    pub encap_src_v4: [u8; 4],
    /// Outer source address for IPv6 encapsulation.
    pub encap_src_v6: [u8; 16],
    pub hash_seed: u32,
    /// Maglev table size M (prime).
    pub ring_size: u32,
    pub flags: u32,
    /// UDP connection entries older than this are treated as new flows.
    pub udp_timeout_ns: u64,
    /// Largest frame the egress path carries (interface MTU + Ethernet
    /// header); an encapsulated packet that would exceed it is dropped and
    /// counted instead of vanishing in the driver. 0: unchecked.
    pub max_frame_len: u32,
    /// Slots per generation of `VIP_TABLE` (a power of two); set by
    /// userspace from the map's size.
    pub vip_slots: u32,
    /// Slots of the per-CPU `FLOW_CACHE` (a power of two); set by userspace
    /// from the map's size.
    pub flow_cache_slots: u32,
    /// Buckets of `CONNTRACK` minus one (buckets are a power of two); set
    /// by userspace from the map's size.
    pub conntrack_bucket_mask: u32,
    /// Seed of the connection table's hash (`lb_common::conntrack`): random
    /// per instance, kept across restarts (the table's entries depend on it).
    pub conntrack_seed: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)] plain-old-data with explicit padding.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for LbConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// Sizes are part of the kernel/userspace contract; a change here is a
    /// map layout change (bump the pin directory version).
    #[test]
    fn layout_is_stable() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 24);
        assert_eq!(size_of::<BackendInfo>(), 40);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Traffic>(), 24);
        assert_eq!(size_of::<LbConfig>(), 64);
    }
}

/// Longest frame the benchmark wrapper restores (a multiple of 8).
pub const BENCH_FRAME_MAX: usize = 96;

/// `BENCH_FRAME[0]`: the frame `bench_restore` puts back before every run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    /// Frame length, a multiple of 8, at most [`BENCH_FRAME_MAX`].
    pub len: u32,
    /// When non-zero, a per-CPU sequence number is written as 4 bytes at this
    /// offset (inside the source address) so every run is a new flow.
    pub vary_offset: u32,
    pub bytes: [u8; BENCH_FRAME_MAX],
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data without padding.
unsafe impl aya::Pod for BenchFrame {}
