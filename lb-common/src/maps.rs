//! Keys and values of the BPF maps (docs/ARCHITECTURE.md). `#[repr(C)]` with explicit
//! padding so the kernel and userspace agree on every byte, and so that hash
//! keys never carry uninitialised padding.

/// A C-like enum carried as one byte in map values. The byte, not the enum,
/// is what crosses the kernel/userspace boundary (a Rust enum read from a
/// map holding any other value would be undefined behaviour), so the fields
/// stay `u8` and every conversion goes through `from_wire`/`wire` here.
macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:literal => $label:literal,)+ } else $fallback:ident) => {
        $(#[$doc])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $value,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The byte in the map value.
            #[inline(always)]
            pub const fn wire(self) -> u8 {
                self as u8
            }

            /// The enum for a map byte; an unknown byte reads as
            #[doc = concat!("`", stringify!($fallback), "`.")]
            #[inline(always)]
            pub const fn from_wire(b: u8) -> Self {
                match b {
                    $($value => $name::$variant,)+
                    _ => $name::$fallback,
                }
            }

            /// The name operators see (configuration, API, metrics).
            pub const fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

wire_enum! {
    /// Address family of a key or backend.
    Family {
        V4 = 4 => "ipv4",
        V6 = 6 => "ipv6",
    } else V4
}

impl Family {
    #[inline(always)]
    pub const fn of(is_ipv6: bool) -> Self {
        if is_ipv6 { Family::V6 } else { Family::V4 }
    }
}

wire_enum! {
    /// How a VIP's packets reach their backend (`VipInfo::mode`).
    Mode {
        /// IP-in-IP: 4in4, 6in6, or an IPv6 VIP over an IPv4 backend.
        Ipip = 1 => "ipip",
        /// Destination MAC rewritten; backends share the L2 segment.
        L2dsr = 2 => "l2dsr",
        /// Generic UDP Encapsulation (`lb_common::wire::gue`): IPIP's
        /// families inside UDP, so backends' NICs spread flows over their
        /// receive queues, and a second hop for flows the backend does not
        /// hold.
        Gue = 3 => "gue",
    } else Ipip
}

wire_enum! {
    /// A backend slot's state (`BackendInfo::state`).
    BackendState {
        /// Free slot, or a removed backend: flows naming it are re-picked.
        Unused = 0 => "unused",
        Up = 1 => "up",
        /// Failed health checks: existing flows are re-picked.
        Down = 2 => "down",
        /// Out of the ring, existing flows stay until they end.
        Draining = 3 => "draining",
    } else Unused
}

impl BackendState {
    /// Whether flows already on the backend may stay there.
    #[inline(always)]
    pub const fn keeps_flows(self) -> bool {
        matches!(self, BackendState::Up | BackendState::Draining)
    }
}

/// `VIP_TABLE` key. `port` 0 matches every port of the address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

crate::layout!(VipKey {
    addr,
    port,
    proto,
    family
});

/// What the VIP table says of a VIP. Its ring generation lives apart, in
/// [`RingState`], so that publishing one VIP's ring rewrites neither the VIP
/// table nor anything another VIP's flows depend on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into `RINGS`, `RING_STATE` and `STATS_VIP`.
    pub vip_id: u32,
    /// [`Mode`] as a byte.
    pub mode: u8,
    pub _pad: [u8; 3],
}

crate::layout!(VipInfo { vip_id, mode, _pad });

impl VipInfo {
    pub const fn new(vip_id: u32, mode: Mode) -> Self {
        VipInfo {
            vip_id,
            mode: mode.wire(),
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    pub const fn mode(&self) -> Mode {
        Mode::from_wire(self.mode)
    }
}

/// `RING_STATE[vip_id]`: which of the VIP's two ring generations is live,
/// and until when the other one may serve a second chance, in one aligned
/// word so that a reader never sees one without the other (userspace stores
/// it through a shared mapping in one 8-byte store).
///
/// Bit 0 is the live generation; the rest is the `CLOCK_MONOTONIC` time in
/// ns (its bit 0 dropped) until which the previous generation may serve a
/// second chance, 0 for none. Bounded so that a flow placed after the flip
/// and later evicted is not sent to the old table's backend; 0 while the idle
/// generation is being rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingState {
    pub word: u64,
}

crate::layout!(RingState { word });

impl RingState {
    pub const fn new(live_generation: u8, second_chance_until_ns: u64) -> Self {
        RingState {
            word: (second_chance_until_ns & !1) | (live_generation & 1) as u64,
        }
    }

    #[inline(always)]
    pub const fn live_generation(&self) -> u8 {
        (self.word & 1) as u8
    }

    /// Whether the previous generation may serve a second chance at `now_ns`.
    #[inline(always)]
    pub const fn second_chance_open(&self, now_ns: u64) -> bool {
        let until = self.word & !1;
        until != 0 && now_ns < until
    }

    /// Whether the previous generation holds the ring before the last
    /// change, whatever the window: the deadline is 0 only while the idle
    /// generation is being rewritten and for a VIP that has had no change.
    /// `gue`'s second hop reads it for as long as it lasts, since the
    /// backend, not a deadline, tells which ring a flow belongs to.
    #[inline(always)]
    pub const fn previous_intact(&self) -> bool {
        self.word & !1 != 0
    }

    pub const fn second_chance_until_ns(&self) -> u64 {
        self.word & !1
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// [`Family`] as a byte.
    pub family: u8,
    /// [`BackendState`] as a byte.
    pub state: u8,
    /// Next hop's MAC (the backend itself on a shared segment, else a router).
    pub next_hop_mac: [u8; 6],
    /// MAC of the interface the packet leaves through.
    pub src_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The interface the next hop is on (the one the balancer is attached
    /// to: frames leave with XDP_TX). Kept for the controller's checks.
    pub ifindex: u32,
    /// The VIP this slot serves. A connection-table entry or an old ring
    /// naming the slot after it was reused for another VIP's backend is
    /// ignored (the flow is re-picked), never sent to that backend.
    /// `BACKEND_ANY_VIP` serves every VIP (tests, shared backends).
    pub vip_id: u32,
}

crate::layout!(BackendInfo {
    addr,
    family,
    state,
    next_hop_mac,
    src_mac,
    _pad,
    ifindex,
    vip_id
});

pub const BACKEND_ANY_VIP: u32 = u32::MAX;

impl BackendInfo {
    /// Whether this slot may carry traffic of VIP `vip_id`.
    #[inline(always)]
    pub const fn serves(&self, vip_id: u32) -> bool {
        self.vip_id == BACKEND_ANY_VIP || self.vip_id == vip_id
    }

    #[inline(always)]
    pub const fn state(&self) -> BackendState {
        BackendState::from_wire(self.state)
    }

    #[inline(always)]
    pub const fn family(&self) -> Family {
        Family::from_wire(self.family)
    }

    /// Whether a flow of VIP `vip_id` already on this backend stays there.
    #[inline(always)]
    pub const fn keeps_flows_of(&self, vip_id: u32) -> bool {
        self.state().keeps_flows() && self.serves(vip_id)
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

crate::layout!(FlowKey {
    src,
    dst,
    src_port,
    dst_port,
    proto,
    family,
    _pad
});

/// `STATS_BACKEND` and `STATS_VIP` value (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    /// Frame bytes as received at the LB, before encapsulation.
    pub bytes: u64,
    pub new_flows: u64,
}

crate::layout!(Traffic {
    packets,
    bytes,
    new_flows
});

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
    /// An established TCP entry without a packet for this long is free for
    /// reuse (0: never).
    pub tcp_idle_timeout_ns: u64,
    /// UDP destination port of GUE encapsulation, host order.
    pub gue_port: u16,
    pub _pad: [u8; 6],
}

crate::layout!(LbConfig {
    encap_src_v4,
    encap_src_v6,
    hash_seed,
    ring_size,
    flags,
    udp_timeout_ns,
    max_frame_len,
    vip_slots,
    flow_cache_slots,
    conntrack_bucket_mask,
    conntrack_seed,
    tcp_idle_timeout_ns,
    gue_port,
    _pad
});

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)] plain-old-data with explicit padding.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for RingState {}
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
    /// map layout change, which the manifest's fingerprint (the pin
    /// directory's name) follows by itself.
    #[test]
    fn layout_is_stable() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 8);
        assert_eq!(size_of::<RingState>(), 8);
        assert_eq!(size_of::<BackendInfo>(), 40);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Traffic>(), 24);
        assert_eq!(size_of::<LbConfig>(), 80);
    }
}
