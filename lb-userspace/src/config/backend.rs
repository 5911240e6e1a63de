//! The rules a backend of a VIP must follow, written once for the
//! configuration loader and the control API (`lbctl add-backend`), so both
//! refuse the same backends with the same words.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{ForwardMode, MAX_WEIGHT, VipSpec, vip::is_unicast};

/// The ipip outer source addresses (`dataplane.encap_source_v4` and
/// `dataplane.encap_source_v6`): no ipip backend of a family without one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncapSources {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// The first rule a backend breaks. Each message reads on its own, as the
/// control API answers with it; the configuration loader puts the field path
/// (`vip[1].backend[0].address: `) in front.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendRule {
    #[error("{addr} must be a unicast, non-loopback address")]
    NotUnicast { addr: IpAddr },
    #[error("backend {addr} is listed twice for {vip}")]
    ListedTwice { vip: VipSpec, addr: IpAddr },
    #[error("an IPv4 VIP cannot be tunnelled to an IPv6 backend (4in6 is not supported)")]
    FourInSix,
    #[error("l2dsr backends must be of the VIP's address family")]
    L2dsrFamily,
    #[error("ipip to an IPv4 backend needs dataplane.encap_source_v4")]
    NoEncapSourceV4,
    #[error("ipip to an IPv6 backend needs dataplane.encap_source_v6")]
    NoEncapSourceV6,
    #[error("{weight} is out of range (0..={MAX_WEIGHT}; 0 drains)")]
    Weight { weight: u32 },
}

/// The part of a backend a rule is about, so an error can point at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendField {
    Address,
    Weight,
}

impl BackendField {
    /// The field's name in the configuration (`[[vip.backend]]`).
    pub const fn name(self) -> &'static str {
        match self {
            BackendField::Address => "address",
            BackendField::Weight => "weight",
        }
    }
}

impl BackendRule {
    pub const fn field(&self) -> BackendField {
        match self {
            BackendRule::Weight { .. } => BackendField::Weight,
            _ => BackendField::Address,
        }
    }
}

/// Checks backend `addr` with `weight` for `vip`, forwarded by `mode`;
/// `existing` are the VIP's other backends (the ones listed before it in the
/// file, or the ones it has at runtime). A set rather than a slice, so a VIP
/// with many backends in the file is checked in n log n, not n squared.
/// The address rules come before the weight, so a backend listed twice is
/// reported as such whatever its weight.
pub fn check_backend(
    vip: &VipSpec,
    mode: ForwardMode,
    addr: IpAddr,
    weight: u32,
    encap: EncapSources,
    existing: &BTreeSet<IpAddr>,
) -> Result<(), BackendRule> {
    if !is_unicast(addr) || addr.is_loopback() {
        return Err(BackendRule::NotUnicast { addr });
    }
    if existing.contains(&addr) {
        return Err(BackendRule::ListedTwice { vip: *vip, addr });
    }
    match (mode, vip.is_ipv6(), addr.is_ipv6()) {
        (ForwardMode::Ipip | ForwardMode::Gue, false, true) => {
            return Err(BackendRule::FourInSix);
        }
        (ForwardMode::L2dsr, v, b) if v != b => return Err(BackendRule::L2dsrFamily),
        (ForwardMode::Ipip | ForwardMode::Gue, _, false) if encap.v4.is_none() => {
            return Err(BackendRule::NoEncapSourceV4);
        }
        (ForwardMode::Ipip | ForwardMode::Gue, _, true) if encap.v6.is_none() => {
            return Err(BackendRule::NoEncapSourceV6);
        }
        _ => {}
    }
    if weight > MAX_WEIGHT {
        return Err(BackendRule::Weight { weight });
    }
    Ok(())
}
