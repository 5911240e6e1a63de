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
    /// its gateway) and the interface's MAC, or why not. The route lookups
    /// go out together (up to [`ROUTES_IN_FLIGHT`] at a time on the one
    /// netlink socket), and each distinct interface's MAC is asked once.
    async fn routes(&self, backends: &[IpAddr]) -> Vec<Result<(u32, IpAddr, [u8; 6])>> {
        let found: Vec<Result<(u32, Option<IpAddr>)>> =
            futures_util::stream::iter(backends.to_vec())
                .map(|b| self.route(b))
                .buffered(ROUTES_IN_FLIGHT)
                .collect()
                .await;
        let mut macs: HashMap<u32, std::result::Result<[u8; 6], String>> = HashMap::new();
        for r in &found {
            if let Ok((ifindex, _)) = r
                && !macs.contains_key(ifindex)
            {
                let m = self.link_mac(*ifindex).await.map_err(|e| format!("{e:#}"));
                macs.insert(*ifindex, m);
            }
        }
        found
            .into_iter()
            .zip(backends)
            .map(|(r, &b)| {
                let (ifindex, gateway) = r?;
                match &macs[&ifindex] {
                    Ok(m) => Ok((ifindex, gateway.unwrap_or(b), *m)),
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                }
            })
            .collect()
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

    /// Resolves the next hops of `backends` together: their route lookups
    /// at once (see [`Resolver::routes`]), then rounds of one neighbour
    /// dump for all of them. Backends behind the same next hop (a gateway,
    /// or the same address in several VIPs) share it: each distinct next
    /// hop is looked for, and prompted, once (see [`Batch`]). Next hops the
    /// kernel has no entry for are prompted all at once (a datagram to the
    /// discard port makes it ARP / solicit), again every
    /// [`REPROMPT_EVERY`] while missing, until every one is resolved or
    /// `timeout` has passed. Answers in `backends`' order.
    pub async fn resolve_many(
        &self,
        backends: &[IpAddr],
        timeout: Duration,
    ) -> Vec<(IpAddr, Result<NextHop>)> {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let mut batch = Batch::new(self.routes(backends).await);
        let mut prompted: Option<tokio::time::Instant> = None;
        let mut pause = FIRST_PAUSE;
        loop {
            let table = match self.neighbours().await {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("{e:#}");
                    return batch.finish(backends, |_, _| msg.clone());
                }
            };
            batch.learn(&table);
            let missing = batch.missing();
            if missing.is_empty() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            if prompted.is_none_or(|t| now.duration_since(t) >= REPROMPT_EVERY) {
                prompt_discovery(&missing);
                prompted = Some(now);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
        batch.finish(backends, |via, backend| {
            format!(
                "no neighbour entry (MAC) for {via}, next hop of backend {backend}, within {timeout:?}"
            )
        })
    }
}

/// Route lookups [`Resolver::routes`] keeps in flight at once.
const ROUTES_IN_FLIGHT: usize = 64;
/// The first wait for prompted neighbours to resolve; it doubles each
/// round up to [`MAX_PAUSE`] (on one segment ARP answers in well under a
/// millisecond; a gateway across a switch takes longer).
const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_millis(50);
/// How often next hops still missing are prompted again (a lost ARP
/// request, or an entry that failed before and was only just retried).
const REPROMPT_EVERY: Duration = Duration::from_secs(1);

/// A backend's egress interface, next hop and the interface's MAC.
type Route = (u32, IpAddr, [u8; 6]);

/// Backends grouped by the next hop they share, for
/// [`Resolver::resolve_many`]: each distinct (interface, next hop) is one
/// entry, looked up in the neighbour table (and prompted) once, its MAC
/// then given to every backend routed through it. Pure bookkeeping, no
/// netlink.
struct Batch {
    /// Per backend, in order: interface, next hop, the interface's MAC;
    /// or why there is no route.
    routes: Vec<std::result::Result<Route, String>>,
    /// Per distinct next hop: its MAC, once the kernel has one.
    hops: std::collections::BTreeMap<(u32, IpAddr), Option<[u8; 6]>>,
}

impl Batch {
    fn new(routes: Vec<Result<(u32, IpAddr, [u8; 6])>>) -> Batch {
        let routes: Vec<_> = routes
            .into_iter()
            .map(|r| r.map_err(|e| format!("{e:#}")))
            .collect();
        let hops = routes
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|(i, via, _)| ((*i, *via), None)))
            .collect();
        Batch { routes, hops }
    }

    /// Takes the MACs of the next hops `table` (a neighbour dump) has.
    fn learn(&mut self, table: &HashMap<(u32, IpAddr), [u8; 6]>) {
        for (key, mac) in self.hops.iter_mut().filter(|(_, m)| m.is_none()) {
            *mac = table.get(key).copied();
        }
    }

    /// The distinct next-hop addresses still without a MAC.
    fn missing(&self) -> Vec<IpAddr> {
        let vias: std::collections::BTreeSet<IpAddr> = self
            .hops
            .iter()
            .filter(|(_, m)| m.is_none())
            .map(|((_, via), _)| *via)
            .collect();
        vias.into_iter().collect()
    }

    /// Every backend's answer, in order: its next hop, or why not (a
    /// backend whose next hop has no MAC gets `unresolved(via, backend)`).
    fn finish(
        self,
        backends: &[IpAddr],
        unresolved: impl Fn(IpAddr, IpAddr) -> String,
    ) -> Vec<(IpAddr, Result<NextHop>)> {
        backends
            .iter()
            .zip(self.routes)
            .map(|(&b, r)| {
                let hop = match r {
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                    Ok((ifindex, via, src_mac)) => match self.hops.get(&(ifindex, via)) {
                        Some(Some(mac)) => Ok(NextHop {
                            ifindex,
                            src_mac,
                            mac: *mac,
                            via,
                        }),
                        _ => Err(anyhow::anyhow!("{}", unresolved(via, b))),
                    },
                };
                (b, hop)
            })
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

/// Sends one empty datagram to each of `addrs`' discard port, from one
/// socket per family: the kernel resolves each neighbour to deliver it.
fn prompt_discovery(addrs: &[IpAddr]) {
    let mut socks: [Option<UdpSocket>; 2] = [None, None];
    for &addr in addrs {
        let (slot, local) = if addr.is_ipv4() {
            (0, "0.0.0.0:0")
        } else {
            (1, "[::]:0")
        };
        if socks[slot].is_none() {
            let local: SocketAddr = local.parse().expect("literal socket address");
            socks[slot] = UdpSocket::bind(local).ok();
            if let Some(s) = &socks[slot] {
                // A full send buffer must not block the caller's thread.
                let _ = s.set_nonblocking(true);
            }
        }
        if let Some(s) = &socks[slot] {
            let _ = s.send_to(&[], SocketAddr::new(addr, 9));
        }
    }
}

/// Watches link, neighbour and route changes; every change that can matter
/// to a next hop marks `dirty` (the controller re-resolves on its next
/// tick, so a burst of events costs one refresh). Neighbour notifications
/// that leave an entry's MAC and managed flag as they were (the kernel's
/// reachable / stale / delay / probe cycle, which every health check of an
/// on-link backend drives) are dropped here (see [`Changes`]): with a
/// thousand backends they would otherwise ask for a refresh every tick.
pub fn watch(dirty: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    use std::os::fd::AsRawFd;

    use rtnetlink::{
        constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH},
        sys::{AsyncSocket, SocketAddr as NlAddr},
    };
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    let sock = conn.socket_mut().socket_mut();
    sock.bind(&NlAddr::new(0, groups))
        .context("subscribing to link, neighbour and route changes")?;
    // Resolving a thousand next hops at once makes a thousand neighbour
    // notifications in a few milliseconds: room for them, past rmem_max
    // where lbd may (CAP_NET_ADMIN), so none is lost to ENOBUFS.
    let size: libc::c_int = WATCH_RCVBUF;
    // SAFETY: setsockopt with a valid fd and a c_int it reads.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = sock.set_rx_buf_sz(WATCH_RCVBUF);
    }
    tokio::spawn(conn);
    tokio::spawn(async move {
        let mut changes = Changes::default();
        while let Some((m, _)) = messages.next().await {
            let matters = match &m.payload {
                NetlinkPayload::InnerMessage(msg) => changes.matters(msg),
                _ => true,
            };
            if matters {
                dirty.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    Ok(())
}

/// Receive buffer of the change watcher's socket (bytes).
const WATCH_RCVBUF: libc::c_int = 4 << 20;

/// An entry's usable MAC and managed flag.
type Seen = (Option<Vec<u8>>, bool);

/// What the change watcher last saw of each neighbour entry: its usable
/// MAC (none while incomplete or failed, as [`Resolver::neighbours`] reads
/// it) and its managed flag. A notification matters when either changed,
/// when an entry with a MAC goes, and always for links and routes.
#[derive(Default)]
struct Changes {
    seen: HashMap<(u32, IpAddr), Seen>,
}

impl Changes {
    fn matters(&mut self, msg: &RouteNetlinkMessage) -> bool {
        match msg {
            RouteNetlinkMessage::NewNeighbour(n) => match neighbour_key(n) {
                Some(key) => {
                    let e = Entry::of(n);
                    let usable = match e.state {
                        NeighbourState::Incomplete | NeighbourState::Failed => None,
                        _ => e.lladdr,
                    };
                    let now = (usable, e.managed);
                    self.seen.get(&key) != Some(&now) && {
                        self.seen.insert(key, now);
                        true
                    }
                }
                None => true,
            },
            RouteNetlinkMessage::DelNeighbour(n) => match neighbour_key(n) {
                Some(key) => self
                    .seen
                    .remove(&key)
                    .is_none_or(|(mac, managed)| mac.is_some() || managed),
                None => true,
            },
            _ => true,
        }
    }
}

/// A neighbour message's (interface, address).
fn neighbour_key(n: &NeighbourMessage) -> Option<(u32, IpAddr)> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
            Some((n.header.ifindex, IpAddr::V4(*a)))
        }
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
            Some((n.header.ifindex, IpAddr::V6(*a)))
        }
        _ => None,
    })
}

/// Interface index by name, over `handle`.
pub(crate) async fn link_index(handle: &Handle, name: &str) -> Result<u32> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) | Err(_) => bail!("interface {name:?} does not exist"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_IF: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x99];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn backends_behind_one_gateway_share_one_next_hop() {
        let gw = ip("198.18.0.1");
        let backends: Vec<IpAddr> = (1..=1000)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0xc612_1000u32 + i)))
            .collect();
        let mut b = Batch::new(backends.iter().map(|_| Ok((3, gw, MAC_IF))).collect());
        assert_eq!(b.hops.len(), 1, "one distinct next hop");
        assert_eq!(b.missing(), vec![gw], "prompted once, not a thousand times");
        b.learn(&HashMap::from([((3, gw), GW_MAC)]));
        assert!(b.missing().is_empty());
        let out = b.finish(&backends, |_, _| unreachable!("all resolved"));
        assert_eq!(out.len(), 1000);
        for ((addr, hop), want) in out.into_iter().zip(&backends) {
            assert_eq!(addr, *want, "answers in the backends' order");
            let hop = hop.unwrap();
            assert_eq!(
                (hop.ifindex, hop.via, hop.mac, hop.src_mac),
                (3, gw, GW_MAC, MAC_IF)
            );
        }
    }

    #[test]
    fn an_unresolved_or_unrouted_backend_is_reported_alone() {
        let (a, b, c) = (ip("198.18.0.20"), ip("198.18.0.21"), ip("fd00:198:18::22"));
        let routes = vec![
            Ok((3, a, MAC_IF)),
            Err(anyhow::anyhow!("no route to {b}")),
            Ok((3, c, MAC_IF)),
            // The same backend twice (two VIPs): one next hop.
            Ok((3, a, MAC_IF)),
        ];
        let mut batch = Batch::new(routes);
        assert_eq!(
            batch.missing(),
            vec![a, c],
            "the unrouted one is not waited for"
        );
        // A table entry on another interface is not this next hop.
        batch.learn(&HashMap::from([((3, a), [7; 6]), ((4, c), [8; 6])]));
        assert_eq!(batch.missing(), vec![c]);
        let out = batch.finish(&[a, b, c, a], |via, backend| {
            format!("none for {via} ({backend})")
        });
        assert_eq!(out[0].1.as_ref().unwrap().mac, [7; 6]);
        assert_eq!(
            out[1].1.as_ref().unwrap_err().to_string(),
            format!("no route to {b}")
        );
        assert_eq!(
            out[2].1.as_ref().unwrap_err().to_string(),
            format!("none for {c} ({c})")
        );
        assert_eq!(out[3].1.as_ref().unwrap().mac, [7; 6]);
    }

    #[test]
    fn a_mac_learnt_stays_learnt() {
        let a = ip("198.18.0.20");
        let mut batch = Batch::new(vec![Ok((3, a, MAC_IF))]);
        batch.learn(&HashMap::from([((3, a), [7; 6])]));
        // A later dump without it (the entry failed meanwhile) changes
        // nothing already resolved in this round.
        batch.learn(&HashMap::new());
        assert!(batch.missing().is_empty());
    }

    fn neighbour(addr: IpAddr, state: NeighbourState, mac: Option<[u8; 6]>) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header.family = family_of(addr);
        n.header.ifindex = 3;
        n.header.state = state;
        n.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(addr)));
        if let Some(m) = mac {
            n.attributes
                .push(NeighbourAttribute::LinkLayerAddress(m.to_vec()));
        }
        n
    }

    #[test]
    fn only_neighbour_changes_that_touch_a_mac_matter() {
        use RouteNetlinkMessage::{DelNeighbour, NewNeighbour};
        let a = ip("198.18.0.20");
        let mut c = Changes::default();
        let new = |s, m| NewNeighbour(neighbour(a, s, m));
        assert!(
            c.matters(&new(NeighbourState::Incomplete, None)),
            "first sight"
        );
        assert!(!c.matters(&new(NeighbourState::Incomplete, None)));
        assert!(
            c.matters(&new(NeighbourState::Reachable, Some([1; 6]))),
            "resolved"
        );
        // The kernel's confirmation cycle: same MAC, no refresh.
        for s in [
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Reachable,
        ] {
            assert!(!c.matters(&new(s, Some([1; 6]))), "{s:?}");
        }
        assert!(
            c.matters(&new(NeighbourState::Reachable, Some([2; 6]))),
            "new MAC"
        );
        // A failed entry keeps reporting its old MAC: no longer usable.
        assert!(c.matters(&new(NeighbourState::Failed, Some([2; 6]))));
        assert!(c.matters(&new(NeighbourState::Reachable, Some([2; 6]))));
        let mut managed = neighbour(a, NeighbourState::Reachable, Some([2; 6]));
        managed
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        assert!(c.matters(&NewNeighbour(managed)), "managed flag set");
        assert!(c.matters(&DelNeighbour(neighbour(a, NeighbourState::Reachable, None))));
        assert!(
            c.matters(&DelNeighbour(neighbour(a, NeighbourState::Reachable, None))),
            "gone without being seen: asked again"
        );
        let b = ip("198.18.0.21");
        assert!(c.matters(&NewNeighbour(neighbour(
            b,
            NeighbourState::Incomplete,
            None
        ))));
        assert!(
            !c.matters(&DelNeighbour(neighbour(b, NeighbourState::Failed, None))),
            "an entry that never had a MAC going changes no next hop"
        );
        let link = RouteNetlinkMessage::NewLink(Default::default());
        assert!(c.matters(&link), "links and routes always matter");
    }
}
