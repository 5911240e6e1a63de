//! Next hops over rtnetlink: which interface a backend is reached through,
//! that interface's MAC, and the MAC of the next hop (the backend itself on
//! a shared segment, else the gateway).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::LinkAttribute,
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage,
            NeighbourState,
        },
        route::{RouteAddress, RouteAttribute},
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    /// The egress interface's own MAC (the frame's source).
    pub src_mac: [u8; 6],
    /// Where the frame goes on the wire.
    pub mac: [u8; 6],
    /// The address whose MAC that is (backend or gateway).
    pub via: IpAddr,
}

/// A neighbour entry the kernel keeps resolved by itself ("managed", Linux
/// 5.16 or later): it solicits the address without waiting for a packet to
/// need it, refreshes it, and never lets it expire. XDP programs look next
/// hops up with `bpf_fib_lookup` and cannot prompt a resolution themselves.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Managed {
    pub ifindex: u32,
    /// The next hop: the address itself on a shared segment, else its
    /// gateway.
    pub via: IpAddr,
    /// lbd created the entry: it is deleted when lbd is done with it. An
    /// entry that existed before (the gateway's, say) was only flagged
    /// managed, and only loses the flag. (A record without it, from an
    /// older lbd, is taken as one that existed: flag cleared, never
    /// deleted.)
    #[serde(default)]
    pub created: bool,
}

impl Managed {
    /// Which kernel entry it is.
    pub fn key(&self) -> (u32, IpAddr) {
        (self.ifindex, self.via)
    }
}

/// What [`Resolver::unmanage`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmanaged {
    /// lbd had created the entry: deleted.
    Deleted,
    /// The entry was there before lbd: only its managed flag was cleared
    /// (it ages like any other entry from now on).
    FlagCleared,
    /// Gone already, or no longer managed (someone else changed it): left
    /// alone.
    LeftAlone,
}

/// What the kernel knows now of the next hop towards an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Resolved(NextHop),
    /// Routed through interface `ifindex` to `via`, whose MAC is not
    /// known (yet).
    Unresolved {
        ifindex: u32,
        via: IpAddr,
    },
    /// No route, or the route's interface has no Ethernet address: why.
    NoRoute(String),
}

/// What the kernel holds for one neighbour.
struct Entry {
    state: NeighbourState,
    managed: bool,
    /// Its MAC, once it had one.
    lladdr: Option<Vec<u8>>,
}

impl Entry {
    fn of(n: &NeighbourMessage) -> Entry {
        Entry {
            state: n.header.state,
            managed: n.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::ExtFlags(f) if f.contains(NeighbourExtFlags::Managed))
            }),
            lladdr: n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) if !l.is_empty() => Some(l.clone()),
                _ => None,
            }),
        }
    }
}

#[derive(Clone)]
pub struct Resolver {
    handle: Handle,
}

impl Resolver {
    /// Opens a netlink connection in the current network namespace. Must be
    /// called inside a tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Resolver { handle })
    }

    /// Interface index by name.
    pub async fn ifindex(&self, name: &str) -> Result<u32> {
        link_index(&self.handle, name).await
    }

    /// The attributes the kernel reports for interface `ifindex`.
    async fn link_attributes(&self, ifindex: u32) -> Result<Vec<LinkAttribute>> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links
            .try_next()
            .await
            .context("reading link")?
            .with_context(|| format!("no interface with index {ifindex}"))?;
        Ok(link.attributes)
    }

    async fn link_mac(&self, ifindex: u32) -> Result<[u8; 6]> {
        for attr in self.link_attributes(ifindex).await? {
            if let LinkAttribute::Address(a) = attr
                && let Ok(mac) = <[u8; 6]>::try_from(a.as_slice())
            {
                return Ok(mac);
            }
        }
        bail!("interface {ifindex} has no Ethernet address")
    }

    /// The interface's MTU, asked of the kernel over netlink: sysfs would
    /// describe the root namespace's interface of that name when lbd was
    /// moved into a namespace with `setns` (sysfs is per mount, not per
    /// network namespace).
    pub async fn mtu(&self, ifindex: u32) -> Result<u32> {
        for attr in self.link_attributes(ifindex).await? {
            if let LinkAttribute::Mtu(m) = attr {
                return Ok(m);
            }
        }
        bail!("interface {ifindex} reports no MTU")
    }

    /// The kernel's route to `dst`: egress interface and gateway, if any.
    async fn route(&self, dst: IpAddr) -> Result<(u32, Option<IpAddr>)> {
        let len = if dst.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, len)
            .context("building a route request")?
            .build();
        let mut routes = self.handle.route().get(msg).execute();
        let route = routes
            .try_next()
            .await
            .with_context(|| format!("no route to {dst}"))?
            .with_context(|| format!("no route to {dst}"))?;
        let mut oif = None;
        let mut gateway = None;
        for attr in route.attributes {
            match attr {
                RouteAttribute::Oif(i) => oif = Some(i),
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(a)),
                _ => {}
            }
        }
        Ok((
            oif.with_context(|| format!("route to {dst} has no interface"))?,
            gateway,
        ))
    }

    /// Has the kernel resolve the next hop towards `dst` and keep it
    /// resolved (see [`Managed`]). `None`: an entry that is already managed,
    /// or that someone configured (permanent, or on a link without ARP),
    /// and is left as it is. A route lookup and a get of that one entry,
    /// then (if needed) the change: no table dump.
    pub async fn manage(&self, dst: IpAddr) -> Result<Option<Managed>> {
        let (ifindex, gateway) = self.route(dst).await?;
        let via = gateway.unwrap_or(dst);
        let existing = self.entry(ifindex, via).await?;
        if let Some(e) = &existing
            && (e.managed || matches!(e.state, NeighbourState::Permanent | NeighbourState::Noarp))
        {
            return Ok(None);
        }
        // Replacing keeps a resolved entry resolved and starts resolving a
        // failed one, as `ip neigh replace ADDR dev DEV managed` does.
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, via)
            .state(NeighbourState::None)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        req.execute().await.with_context(|| {
            format!(
                "asking the kernel to resolve {via} (next hop towards {dst}) on interface {ifindex} \
                 as a managed neighbour (Linux 5.16 or later)"
            )
        })?;
        Ok(Some(Managed {
            ifindex,
            via,
            created: existing.is_none(),
        }))
    }

    /// Undoes [`Resolver::manage`]: an entry lbd created is deleted; one
    /// that was there before only loses its managed flag (rewritten as
    /// `stale` with the MAC it has, which the kernel confirms on its next
    /// use, as after `ip neigh change ADDR dev DEV nud stale`; without a
    /// MAC it is left to expire). An entry that is gone or no longer
    /// managed (someone else changed it) is left alone.
    pub async fn unmanage(&self, n: &Managed) -> Result<Unmanaged> {
        let e = match self.entry(n.ifindex, n.via).await? {
            Some(e) if e.managed => e,
            _ => return Ok(Unmanaged::LeftAlone),
        };
        if !n.created {
            let (state, lladdr) = match e.lladdr {
                Some(l) => (NeighbourState::Stale, Some(l)),
                None => (NeighbourState::None, None),
            };
            let mut req = self
                .handle
                .neighbours()
                .add(n.ifindex, n.via)
                .state(state)
                .replace();
            if let Some(l) = &lladdr {
                req = req.link_layer_address(l);
            }
            req.execute().await.with_context(|| {
                format!(
                    "clearing the managed flag of the neighbour {} ({}), which was there before lbd",
                    n.via, n.ifindex
                )
            })?;
            return Ok(Unmanaged::FlagCleared);
        }
        let mut msg = NeighbourMessage::default();
        msg.header.family = family_of(n.via);
        msg.header.ifindex = n.ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(n.via)));
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(Unmanaged::Deleted),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.is_some_and(|c| c.get() == -libc::ENOENT) =>
            {
                Ok(Unmanaged::LeftAlone)
            }
            Err(e) => Err(e).with_context(|| {
                format!("deleting the managed neighbour {} ({})", n.via, n.ifindex)
            }),
        }
    }

    /// The kernel's entry for `via` on interface `ifindex`, if any: a get
    /// of that one entry (Linux 5.0 or later), not a dump of the table.
    async fn entry(&self, ifindex: u32, via: IpAddr) -> Result<Option<Entry>> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family_of(via);
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(via)));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(msg));
        req.header.flags = NLM_F_REQUEST;
        let what = || format!("reading the neighbour entry of {via} on interface {ifindex}");
        let mut answers = self
            .handle
            .clone()
            .request(req)
            .map_err(anyhow::Error::from)
            .with_context(what)?;
        let mut found = None;
        while let Some(m) = answers.next().await {
            match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                    found = Some(Entry::of(&n));
                }
                NetlinkPayload::Error(e) if e.code.is_some_and(|c| c.get() == -libc::ENOENT) => {
                    return Ok(None);
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(anyhow::Error::from(rtnetlink::Error::NetlinkError(e)))
                        .with_context(what);
                }
                _ => {}
            }
        }
        Ok(found)
    }

    /// Every resolved neighbour entry of both families, in one dump each:
    /// (interface, address) -> MAC.
    async fn neighbours(&self) -> Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        let mut out = HashMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut dump = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(n) = dump.try_next().await.context("dumping neighbours")? {
                if matches!(
                    n.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed
                ) {
                    continue;
                }
                let mut dst = None;
                let mut mac = None;
                for attr in n.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            dst = Some(IpAddr::V4(a))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            dst = Some(IpAddr::V6(a))
                        }
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = <[u8; 6]>::try_from(l.as_slice()).ok()
                        }
                        _ => {}
                    }
                }
                if let (Some(dst), Some(mac)) = (dst, mac) {
                    out.insert((n.header.ifindex, dst), mac);
                }
            }
        }
        Ok(out)
    }

    /// Resolves the next hop of `backend`; see [`Resolver::resolve_many`].
    pub async fn resolve(&self, backend: IpAddr, timeout: Duration) -> Result<NextHop> {
        self.resolve_many(&[backend], timeout)
            .await
            .pop()
            .map(|(_, r)| r)
            .context("no answer for the backend")?
    }

    /// Each backend's egress interface, next-hop address (the backend, or
    /// its gateway) and the interface's MAC, or why not.
    async fn routes(&self, backends: &[IpAddr]) -> Vec<Result<(u32, IpAddr, [u8; 6])>> {
        let mut macs: HashMap<u32, [u8; 6]> = HashMap::new();
        let mut out = Vec::new();
        for &b in backends {
            let r = async {
                let (ifindex, gateway) = self.route(b).await?;
                let src_mac = match macs.get(&ifindex) {
                    Some(m) => *m,
                    None => {
                        let m = self.link_mac(ifindex).await?;
                        macs.insert(ifindex, m);
                        m
                    }
                };
                Ok((ifindex, gateway.unwrap_or(b), src_mac))
            }
            .await;
            out.push(r);
        }
        out
    }

    /// What the kernel knows of the next hops of `addrs` now, in their
    /// order: a route lookup each and one neighbour dump, prompting
    /// nothing (see [`Resolver::manage`] for that).
    pub async fn lookup_many(&self, addrs: &[IpAddr]) -> Result<Vec<Lookup>> {
        let routes = self.routes(addrs).await;
        let table = self.neighbours().await?;
        Ok(routes
            .into_iter()
            .map(|r| match r {
                Err(e) => Lookup::NoRoute(format!("{e:#}")),
                Ok((ifindex, via, src_mac)) => match table.get(&(ifindex, via)) {
                    Some(mac) => Lookup::Resolved(NextHop {
                        ifindex,
                        src_mac,
                        mac: *mac,
                        via,
                    }),
                    None => Lookup::Unresolved { ifindex, via },
                },
            })
            .collect())
    }

    /// Resolves the next hops of `backends` together: a route lookup each,
    /// then one neighbour dump per round for all of them, prompting
    /// neighbour discovery for those the kernel has no entry for yet (a
    /// datagram to the discard port makes it ARP / solicit), until every
    /// one is resolved or `timeout` has passed. Answers in `backends`'
    /// order.
    pub async fn resolve_many(
        &self,
        backends: &[IpAddr],
        timeout: Duration,
    ) -> Vec<(IpAddr, Result<NextHop>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let routes = self.routes(backends).await;
        let mut hops: Vec<Option<Result<NextHop>>> = routes
            .iter()
            .map(|r| r.as_ref().err().map(|e| Err(anyhow::anyhow!("{e:#}"))))
            .collect();
        let mut prompted = false;
        loop {
            let table = match self.neighbours().await {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("{e:#}");
                    for h in hops.iter_mut().filter(|h| h.is_none()) {
                        *h = Some(Err(anyhow::anyhow!("{msg}")));
                    }
                    break;
                }
            };
            for (i, r) in routes.iter().enumerate() {
                if let (None, Ok((ifindex, via, src_mac))) = (&hops[i], r)
                    && let Some(mac) = table.get(&(*ifindex, *via))
                {
                    hops[i] = Some(Ok(NextHop {
                        ifindex: *ifindex,
                        src_mac: *src_mac,
                        mac: *mac,
                        via: *via,
                    }));
                }
            }
            let missing: Vec<usize> = (0..hops.len()).filter(|i| hops[*i].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            if !prompted {
                for &i in &missing {
                    if let Ok((_, via, _)) = &routes[i] {
                        prompt_discovery(*via);
                    }
                }
                prompted = true;
            }
            if tokio::time::Instant::now() >= deadline {
                for &i in &missing {
                    let via = routes[i].as_ref().map(|r| r.1).unwrap_or(backends[i]);
                    hops[i] = Some(Err(anyhow::anyhow!(
                        "no neighbour entry (MAC) for {via}, next hop of backend {}, within {timeout:?}",
                        backends[i]
                    )));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        backends
            .iter()
            .zip(hops)
            .map(|(b, h)| (*b, h.unwrap_or_else(|| Err(anyhow::anyhow!("unresolved")))))
            .collect()
    }
}

fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour_address(addr: IpAddr) -> NeighbourAddress {
    match addr {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// Sends one empty datagram to `addr`'s discard port: the kernel resolves
/// the neighbour to deliver it.
fn prompt_discovery(addr: IpAddr) {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal socket address");
    if let Ok(sock) = UdpSocket::bind(local) {
        let _ = sock.send_to(&[], SocketAddr::new(addr, 9));
    }
}

/// Watches link, neighbour and route changes; every change marks `dirty`
/// (the controller re-resolves on its next tick, so a burst of events costs
/// one refresh).
pub fn watch(dirty: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    use rtnetlink::{
        constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH},
        sys::{AsyncSocket, SocketAddr as NlAddr},
    };
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    conn.socket_mut()
        .socket_mut()
        .bind(&NlAddr::new(0, groups))
        .context("subscribing to link, neighbour and route changes")?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Ok(())
}

/// Interface index by name, over `handle`.
pub(crate) async fn link_index(handle: &Handle, name: &str) -> Result<u32> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) | Err(_) => bail!("interface {name:?} does not exist"),
    }
}
