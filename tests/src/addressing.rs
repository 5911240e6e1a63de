//! The address plan of the test topology.
//!
//! IPv4 comes from 198.18.0.0/15 (RFC 2544 benchmarking) and IPv6 from the
//! ULA fd00:198:18::/48, so no test address can collide with a real network.
//! IPv6 host parts are the IPv4 host number written as hex digits
//! (198.18.0.20 <-> fd00:198:18::20), to keep the two easy to match by eye.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};

/// The hosts' shared subnet.
pub const SUBNET_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
pub const PREFIX_LEN_V4: u8 = 24;
pub const SUBNET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0);
pub const PREFIX_LEN_V6: u8 = 64;

/// Where VIPs live; the client routes these to the LB.
pub const VIP_NET_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 0);
pub const VIP_PREFIX_LEN_V4: u8 = 24;
pub const VIP_NET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0x100, 0, 0, 0, 0);
pub const VIP_PREFIX_LEN_V6: u8 = 64;

/// The fleet's client subnet, between the router and the client: apart from
/// the shared one, so the client's traffic must cross the router. Same
/// prefix lengths ([`PREFIX_LEN_V4`], [`PREFIX_LEN_V6`]).
pub const CLIENT_NET_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 0);
pub const CLIENT_NET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 1, 0, 0, 0, 0);

/// The client's host number: on the shared subnet in a single-LB topology,
/// on the client subnet in a fleet.
pub const CLIENT_HOST: u8 = 10;
/// A fleet's router, on both the shared and the client subnet.
pub const ROUTER_HOST: u8 = 1;
/// The LB of a single-LB topology, and the first LB node of a fleet: LB node
/// `i` is host `LB_HOST + i`.
pub const LB_HOST: u8 = 2;
/// Most LB nodes a fleet may have: their host numbers stay below
/// [`CLIENT_HOST`], so no fleet address reads like the client's.
pub const MAX_LBS: usize = (CLIENT_HOST - LB_HOST) as usize;
/// Backend `i` is host `BACKEND_HOST_BASE + i`.
pub const BACKEND_HOST_BASE: u8 = 20;
/// Most backends a topology may have (their host numbers stay below 255).
pub const MAX_BACKENDS: usize = 200;

/// IPv4 address of host number `host` on the shared subnet.
pub fn host_v4(host: u8) -> Ipv4Addr {
    let [a, b, c, _] = SUBNET_V4.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// IPv6 address of host number `host`: the decimal number read as hex.
pub fn host_v6(host: u8) -> Ipv6Addr {
    let mut s = SUBNET_V6.segments();
    s[7] = decimal_as_hex(host);
    Ipv6Addr::from(s)
}

/// IPv4 address of host number `host` on the fleet's client subnet.
pub fn client_net_v4(host: u8) -> Ipv4Addr {
    let [a, b, c, _] = CLIENT_NET_V4.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// IPv6 address of host number `host` on the fleet's client subnet.
pub fn client_net_v6(host: u8) -> Ipv6Addr {
    let mut s = CLIENT_NET_V6.segments();
    s[7] = decimal_as_hex(host);
    Ipv6Addr::from(s)
}

/// Host number of LB node `i` of a fleet.
pub fn lb_host(i: usize) -> Result<u8> {
    if i >= MAX_LBS {
        bail!("LB node index {i} out of range (at most {MAX_LBS} LB nodes)");
    }
    u8::try_from(i)
        .ok()
        .and_then(|i| LB_HOST.checked_add(i))
        .with_context(|| format!("LB node index {i} out of range"))
}

/// Host number of backend `i`.
pub fn backend_host(i: usize) -> Result<u8> {
    if i >= MAX_BACKENDS {
        bail!("backend index {i} out of range (at most {MAX_BACKENDS} backends)");
    }
    u8::try_from(i)
        .ok()
        .and_then(|i| BACKEND_HOST_BASE.checked_add(i))
        .with_context(|| format!("backend index {i} out of range"))
}

/// `n`-th IPv4 VIP: 198.18.100.n.
pub fn vip_v4(n: u8) -> Ipv4Addr {
    let [a, b, c, _] = VIP_NET_V4.octets();
    Ipv4Addr::new(a, b, c, n)
}

/// `n`-th IPv6 VIP: fd00:198:18:100::n (`n` is the raw last group, so
/// `vip_v6(0x10)` is fd00:198:18:100::10).
pub fn vip_v6(n: u16) -> Ipv6Addr {
    let mut s = VIP_NET_V6.segments();
    s[7] = n;
    Ipv6Addr::from(s)
}

/// Prefix length of a single-host route for `ip`'s family.
pub fn host_prefix_len(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// 20 -> 0x20: each decimal digit becomes a hex digit.
fn decimal_as_hex(n: u8) -> u16 {
    let (h, t, o) = (
        u16::from(n / 100),
        u16::from(n / 10 % 10),
        u16::from(n % 10),
    );
    (h << 8) | (t << 4) | o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_matches_design() {
        assert_eq!(host_v4(CLIENT_HOST).to_string(), "198.18.0.10");
        assert_eq!(host_v6(CLIENT_HOST).to_string(), "fd00:198:18::10");
        assert_eq!(host_v6(LB_HOST).to_string(), "fd00:198:18::2");
        let b0 = backend_host(0).unwrap();
        assert_eq!(host_v4(b0).to_string(), "198.18.0.20");
        assert_eq!(host_v6(b0).to_string(), "fd00:198:18::20");
        assert_eq!(
            host_v6(backend_host(17).unwrap()).to_string(),
            "fd00:198:18::37"
        );
        assert_eq!(
            host_v6(backend_host(199).unwrap()).to_string(),
            "fd00:198:18::219"
        );
        assert!(backend_host(MAX_BACKENDS).is_err());
        assert_eq!(vip_v4(1).to_string(), "198.18.100.1");
        assert_eq!(vip_v6(1).to_string(), "fd00:198:18:100::1");
        assert_eq!(SUBNET_V6.to_string(), "fd00:198:18::");
        assert_eq!(host_v4(ROUTER_HOST).to_string(), "198.18.0.1");
        assert_eq!(client_net_v4(CLIENT_HOST).to_string(), "198.18.1.10");
        assert_eq!(client_net_v6(ROUTER_HOST).to_string(), "fd00:198:18:1::1");
        assert_eq!(client_net_v6(CLIENT_HOST).to_string(), "fd00:198:18:1::10");
        assert_eq!(lb_host(0).unwrap(), LB_HOST);
        assert_eq!(host_v4(lb_host(2).unwrap()).to_string(), "198.18.0.4");
        assert_eq!(lb_host(MAX_LBS - 1).unwrap(), CLIENT_HOST - 1);
        assert!(lb_host(MAX_LBS).is_err());
    }
}
