//! The VIP syntax shared by the configuration, the control API and `lbctl`:
//! `198.18.100.1:80/tcp`, `[fd00:198:18:100::1]:53/udp`; port 0 means every
//! port of that address and protocol.

use std::{fmt, net::IpAddr, str::FromStr};

use lb_common::{
    maps::{Family, VipKey},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{input:?} is not a VIP: {why} (expected ADDRESS:PORT/PROTO, e.g. 198.18.100.1:80/tcp or [fd00:198:18:100::1]:53/udp)"
)]
pub struct VipSpecError {
    pub input: String,
    pub why: &'static str,
}

impl FromStr for VipSpec {
    type Err = VipSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| VipSpecError {
            input: s.to_owned(),
            why,
        };
        let (host_port, proto) = s.rsplit_once('/').ok_or_else(|| err("no /tcp or /udp"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(err("protocol must be tcp or udp")),
        };
        let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| err("IPv6 needs [ADDRESS]:PORT"))?;
            (h, p)
        } else {
            host_port.rsplit_once(':').ok_or_else(|| err("no :PORT"))?
        };
        let addr: IpAddr = host.parse().map_err(|_| err("not an IP address"))?;
        if matches!(addr, IpAddr::V6(_)) && !host_port.starts_with('[') {
            return Err(err("IPv6 addresses go in brackets"));
        }
        if !is_unicast(addr) {
            return Err(err("the address must be a unicast address"));
        }
        // XDP sees what arrives on the interface, and nothing arrives there for
        // a loopback address.
        if addr.is_loopback() {
            return Err(err("the address must not be a loopback address"));
        }
        let port: u16 = port.parse().map_err(|_| err("port must be 0..=65535"))?;
        Ok(VipSpec { addr, port, proto })
    }
}

impl fmt::Display for VipSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

impl VipSpec {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The `VIPS` map key.
    pub fn key(&self) -> VipKey {
        let (addr, family) = addr16(self.addr);
        VipKey {
            addr,
            port: self.port,
            proto: self.proto.number(),
            family: family.wire(),
        }
    }
}

/// Neither unspecified, multicast nor the IPv4 broadcast address: an
/// address one host can own, as VIPs and backends must be. Loopback is
/// left to the callers, which word it differently.
pub fn is_unicast(ip: IpAddr) -> bool {
    let broadcast = matches!(ip, IpAddr::V4(a) if a.is_broadcast());
    !(ip.is_unspecified() || ip.is_multicast() || broadcast)
}

/// An address in the maps' 16-byte form, with its family.
pub fn addr16(ip: IpAddr) -> ([u8; 16], Family) {
    match ip {
        IpAddr::V4(a) => (lb_common::parse::v4_in_16(a.octets()), Family::V4),
        IpAddr::V6(a) => (a.octets(), Family::V6),
    }
}

/// The address a map's 16-byte form and family stand for.
pub fn ip_of(addr: &[u8; 16], family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([addr[0], addr[1], addr[2], addr[3]]),
        Family::V6 => IpAddr::from(*addr),
    }
}

impl Serialize for VipSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_families() {
        for s in [
            "198.18.100.1:80/tcp",
            "[fd00:198:18:100::1]:53/udp",
            "198.18.100.2:0/udp",
        ] {
            let v: VipSpec = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
        let v: VipSpec = "198.18.100.1:80/tcp".parse().unwrap();
        assert_eq!(v.key().addr[..4], [198, 18, 100, 1]);
        assert_eq!(v.key().proto, IPPROTO_TCP);
    }

    #[test]
    fn rejects_malformed_with_a_reason() {
        for (s, why) in [
            ("198.18.100.1:80", "no /tcp"),
            ("198.18.100.1:80/icmp", "protocol"),
            ("198.18.100.1/tcp", "no :PORT"),
            ("198.18.100.300:80/tcp", "not an IP"),
            ("198.18.100.1:65536/tcp", "port"),
            ("fd00::1:80/tcp", "brackets"),
            ("[fd00::1]80/tcp", "[ADDRESS]:PORT"),
            ("0.0.0.0:80/tcp", "unicast"),
            ("[::]:80/tcp", "unicast"),
            ("224.0.0.1:80/tcp", "unicast"),
            ("[ff02::1]:53/udp", "unicast"),
            ("255.255.255.255:80/tcp", "unicast"),
            ("127.0.0.1:80/tcp", "loopback"),
            ("127.1.2.3:0/udp", "loopback"),
            ("[::1]:80/tcp", "loopback"),
            ("", "no /tcp"),
        ] {
            let e = s.parse::<VipSpec>().unwrap_err();
            assert!(e.to_string().contains(why), "{s:?}: {e}");
            assert!(e.to_string().contains("expected ADDRESS:PORT/PROTO"));
        }
    }
}
