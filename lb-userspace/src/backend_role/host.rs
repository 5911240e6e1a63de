//! The backend's own network configuration over rtnetlink: the VIPs on `lo`
//! and what the kernel says runs on the interface (program id, XDP mode).

use std::net::IpAddr;

use anyhow::{Context, Result};

use super::config::Prefix;
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::{LinkAttribute, LinkXdp, XdpAttached},
    },
};

/// Linux's loopback device: where a DSR backend holds its VIPs.
pub const LO: &str = "lo";

/// The XDP program the kernel reports on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpOnLink {
    /// `native`, `generic`, `offload` or `multiple`, as lbd's `xdp_mode`
    /// words them.
    pub mode: &'static str,
    pub program_id: u32,
}

#[derive(Clone)]
pub struct Host {
    handle: Handle,
}

/// Where a VIP address is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// On `lo` as a host address (/32 or /128).
    OnLo,
    /// On another interface or with a wider prefix: local already.
    Elsewhere,
    Absent,
}

impl Host {
    /// Opens a netlink connection in the current network namespace. Must be
    /// called inside a tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Host { handle })
    }

    pub async fn ifindex(&self, name: &str) -> Result<u32> {
        crate::neigh::link_index(&self.handle, name).await
    }

    /// The XDP program on interface `ifindex`, if any.
    pub async fn xdp(&self, ifindex: u32) -> Result<Option<XdpOnLink>> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links
            .try_next()
            .await
            .context("reading the interface")?
            .with_context(|| format!("no interface with index {ifindex}"))?;
        let mut mode = None;
        let mut program_id = 0;
        for attr in link.attributes {
            let LinkAttribute::Xdp(xdp) = attr else {
                continue;
            };
            for x in xdp {
                match x {
                    LinkXdp::Attached(XdpAttached::Driver) => mode = Some("native"),
                    LinkXdp::Attached(XdpAttached::SocketBuffer) => mode = Some("generic"),
                    LinkXdp::Attached(XdpAttached::Hardware) => mode = Some("offload"),
                    LinkXdp::Attached(XdpAttached::Multiple) => mode = Some("multiple"),
                    LinkXdp::ProgId(id) => program_id = id,
                    _ => {}
                }
            }
        }
        Ok(mode.map(|mode| XdpOnLink { mode, program_id }))
    }

    /// Every address of every interface: (interface, address, prefix).
    async fn addresses(&self) -> Result<Vec<(AddressMessage, IpAddr)>> {
        let mut dump = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(m) = dump.try_next().await.context("listing addresses")? {
            // IFA_LOCAL is the address itself on IPv4 (IFA_ADDRESS may be
            // a peer's); IPv6 only has IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push((m, ip));
            }
        }
        Ok(out)
    }

    /// Where each of `vips` is now.
    pub async fn presence(&self, lo: u32, vips: &[IpAddr]) -> Result<Vec<Presence>> {
        let all = self.addresses().await?;
        Ok(vips
            .iter()
            .map(|vip| {
                let mut p = Presence::Absent;
                for (m, ip) in &all {
                    if ip != vip {
                        continue;
                    }
                    if m.header.index == lo && m.header.prefix_len == host_prefix(*vip) {
                        return Presence::OnLo;
                    }
                    p = Presence::Elsewhere;
                }
                p
            })
            .collect())
    }

    /// The prefixes of interface `ifindex`'s own addresses (the subnets it
    /// is connected to), both families, each once; IPv6 link-local
    /// (`fe80::/10`) left out: such an address names no one without its
    /// interface.
    pub async fn connected_prefixes(&self, ifindex: u32) -> Result<Vec<Prefix>> {
        let mut out = Vec::new();
        for (m, local) in self.addresses().await? {
            if m.header.index != ifindex {
                continue;
            }
            // On a point-to-point link IFA_ADDRESS is the peer, and the
            // prefix is the peer's.
            let on_link = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
                .unwrap_or(local);
            if let IpAddr::V6(a) = on_link
                && a.is_unicast_link_local()
            {
                continue;
            }
            if let Some(p) = Prefix::of(on_link, m.header.prefix_len)
                && !out.contains(&p)
            {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Puts `vip` on `lo` as a host address. False: it was there already
    /// (someone else's, left alone).
    pub async fn add_to_lo(&self, lo: u32, vip: IpAddr) -> Result<bool> {
        match self
            .handle
            .address()
            .add(lo, vip, host_prefix(vip))
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.is_some_and(|c| c.get() == -libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("adding {vip}/{} to lo", host_prefix(vip))),
        }
    }

    /// Removes `vip`'s host address from `lo`. False: it was not there.
    pub async fn remove_from_lo(&self, lo: u32, vip: IpAddr) -> Result<bool> {
        let found = self.addresses().await?.into_iter().find(|(m, ip)| {
            *ip == vip && m.header.index == lo && m.header.prefix_len == host_prefix(vip)
        });
        let Some((m, _)) = found else {
            return Ok(false);
        };
        self.handle
            .address()
            .del(m)
            .execute()
            .await
            .with_context(|| format!("removing {vip}/{} from lo", host_prefix(vip)))?;
        Ok(true)
    }
}

pub fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}
