//! The end-to-end topology: client, LB and backends, each in
//! its own namespace, wired to one bridge in a `fabric` namespace.
//!
//! ```text
//!  client ns ─veth─┐
//!  lb ns ────veth──┤ bridge (in a "fabric" ns)
//!  backend ns ×N ──┘
//! ```
//!
//! A fleet ([`Topology::fleet`]) puts several LB nodes behind a router that
//! spreads flows over them (ECMP); the client sits behind the router on a
//! subnet of its own, and the backends answer it through the router:
//!
//! ```text
//!  client ns ─veth─ router ns ─veth─┐
//!  lb0 ns … lbN ns ──────veth ×N────┤ bridge (in a "fabric" ns)
//!  backend ns ×M ───────────veth ×M─┘
//! ```
//!
//! Nothing is ever created in the root namespace: veths are made inside the
//! fabric namespace with their other end placed straight into the host's
//! namespace, so deleting the namespaces removes everything.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context, Result, bail};

use crate::{
    addressing as plan,
    backend_role::BackendVips,
    launcher,
    netns::{self, NS_PREFIX},
    process::{self, Children, Spawned},
};

/// The interface name inside every host namespace.
pub const HOST_IFNAME: &str = "eth0";
/// A fleet router's interface towards the client (its `eth0` is on the
/// bridge).
pub const ROUTER_CLIENT_IFNAME: &str = "eth1";
/// The bridge in the fabric namespace.
pub const BRIDGE: &str = "br0";
pub const MTU: u16 = 1500;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Distinguishes the topologies of one process (tests run in parallel).
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One host (client, router, LB or backend): its namespace, addresses and
/// the other end of its veth (a bridge port, or the router for a fleet's
/// client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    name: String,
    ns: String,
    peer: String,
    peer_ns: String,
    mac: [u8; 6],
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Host {
    /// `client`, `lb` or `backend<i>`; in a fleet also `router` and
    /// `lb<i>` (no plain `lb`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its network namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Its interface, inside its namespace.
    pub fn ifname(&self) -> &str {
        HOST_IFNAME
    }

    /// The other end of its veth: a bridge port in the fabric namespace
    /// (where an XDP program can watch everything the host sends), except
    /// for a fleet's client, whose peer is the router's
    /// [`ROUTER_CLIENT_IFNAME`].
    pub fn peer_ifname(&self) -> &str {
        &self.peer
    }

    /// The namespace [`Host::peer_ifname`] is in: the fabric's, or the
    /// router's for a fleet's client.
    pub fn peer_ns(&self) -> &str {
        &self.peer_ns
    }

    /// MAC address of its `eth0`.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// MAC address of its `eth0`, as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// Its address of `ip`'s family (`true`: IPv6).
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }
}

/// Deletes the namespaces it names on drop; the last field of
/// [`Topology`], so it goes after the processes are stopped.
#[derive(Default)]
struct OwnedNamespaces(Vec<String>);

impl Drop for OwnedNamespaces {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            netns::delete(ns);
        }
    }
}

/// A test topology; dropping it (also while a test panics) stops the
/// processes it started and deletes its namespaces, with the veths, the
/// bridge and any XDP programs attached to them.
pub struct Topology {
    id: String,
    fabric: String,
    client: Host,
    /// Only in a fleet.
    router: Option<Host>,
    /// Never empty: the LB, or a fleet's LB nodes.
    lbs: Vec<Host>,
    backends: Vec<Host>,
    /// The VIPs the backends serve, and the backend lbds serving them once
    /// the fabric runs.
    backend_vips: Arc<Mutex<BackendVips>>,
    children: Children,
    // Last: dropped after `Drop::drop` stopped the children.
    namespaces: OwnedNamespaces,
}

impl Topology {
    /// Builds a topology with `n_backends` backends. Also removes what
    /// killed runs left behind (see [`netns::cleanup_stale`]).
    pub fn new(n_backends: usize) -> Result<Topology> {
        if n_backends > plan::MAX_BACKENDS {
            bail!("at most {} backends", plan::MAX_BACKENDS);
        }
        let mut b = Builder::start()?;
        let client = b.bridge_host("client", "client", "c", plan::CLIENT_HOST)?;
        let lb = b.bridge_host("lb", "lb", "l", plan::LB_HOST)?;
        let backends = b.backends(n_backends)?;

        // The client reaches VIPs through the LB.
        let vips4 = format!("{}/{}", plan::VIP_NET_V4, plan::VIP_PREFIX_LEN_V4);
        let vips6 = format!("{}/{}", plan::VIP_NET_V6, plan::VIP_PREFIX_LEN_V6);
        netns::ip(
            client.ns(),
            &["route", "add", &vips4, "via", &lb.ipv4.to_string()],
        )?;
        netns::ip(
            client.ns(),
            &["-6", "route", "add", &vips6, "via", &lb.ipv6.to_string()],
        )?;

        Ok(b.finish(client, None, vec![lb], backends))
    }

    /// Builds a fleet: a router, `n_lbs` LB nodes and `n_backends` backends
    /// on the bridge, and the client behind the router on its own subnet.
    ///
    /// The router forwards, hashes flows on their 5-tuple over the next hops
    /// of a multipath route, and does no reverse-path filtering (backends
    /// answer from the VIP, which it routes to the LB nodes). It has no route
    /// to any VIP yet: that is for BGP to give it (see [`crate::bird`]).
    /// Every other host routes through the router by default, so backends
    /// answer the client directly (DSR). The LB nodes' `lo` is up, for the
    /// VIP routes lbd announces from. Addresses on downed links stay
    /// (`keep_addr_on_down`), so tests can take a link down and up again.
    pub fn fleet(n_lbs: usize, n_backends: usize) -> Result<Topology> {
        if n_lbs == 0 || n_lbs > plan::MAX_LBS {
            bail!("a fleet has 1 to {} LB nodes, not {n_lbs}", plan::MAX_LBS);
        }
        if n_backends > plan::MAX_BACKENDS {
            bail!("at most {} backends", plan::MAX_BACKENDS);
        }
        let mut b = Builder::start()?;
        let router = b.bridge_host("router", "router", "r", plan::ROUTER_HOST)?;
        let client = b.client_behind(&router)?;
        let lbs = (0..n_lbs)
            .map(|i| {
                b.bridge_host(
                    &format!("lb{i}"),
                    &format!("lb{i}"),
                    &format!("l{i}"),
                    plan::lb_host(i)?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let backends = b.backends(n_backends)?;

        setup_router(&router)?;
        default_route(&client, plan::client_net_v4(plan::ROUTER_HOST).into())?;
        default_route(&client, plan::client_net_v6(plan::ROUTER_HOST).into())?;
        for h in lbs.iter().chain(&backends) {
            default_route(h, router.ipv4.into())?;
            default_route(h, router.ipv6.into())?;
        }
        for h in [&client, &router].into_iter().chain(&lbs).chain(&backends) {
            netns::sysctl(
                h.ns(),
                &[
                    "net.ipv6.conf.all.keep_addr_on_down=1",
                    "net.ipv6.conf.default.keep_addr_on_down=1",
                ],
            )
            .with_context(|| format!("keep_addr_on_down on {}", h.name()))?;
        }

        Ok(b.finish(client, Some(router), lbs, backends))
    }

    /// This topology's unique prefix (`lbt<pid>x<k>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lbd instance name for this topology (pins, lock, socket names).
    pub fn instance_name(&self) -> String {
        self.id.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    }

    /// The namespace holding the bridge and the hosts' peers.
    pub fn fabric_ns(&self) -> &str {
        &self.fabric
    }

    /// The bridge's name in [`Topology::fabric_ns`].
    pub fn bridge(&self) -> &str {
        BRIDGE
    }

    pub fn client(&self) -> &Host {
        &self.client
    }

    /// The LB; in a fleet, the first LB node.
    pub fn lb(&self) -> &Host {
        // Both constructors put at least one LB in.
        &self.lbs[0]
    }

    /// The LB nodes of a fleet (just the LB otherwise).
    pub fn lbs(&self) -> &[Host] {
        &self.lbs
    }

    /// LB node `i`; panics when there is no such node (a test bug).
    pub fn lb_node(&self, i: usize) -> &Host {
        match self.lbs.get(i) {
            Some(lb) => lb,
            None => panic!("lb{i} requested, topology has {} LB nodes", self.lbs.len()),
        }
    }

    /// A fleet's router (its `eth0`, on the bridge; the client side is
    /// [`ROUTER_CLIENT_IFNAME`]); panics for a topology without one, which
    /// [`Topology::new`] builds (a test bug).
    pub fn router(&self) -> &Host {
        match &self.router {
            Some(r) => r,
            None => panic!("router requested, but only Topology::fleet has one"),
        }
    }

    pub fn backends(&self) -> &[Host] {
        &self.backends
    }

    /// Backend `i`; panics when there is no such backend (a test bug).
    pub fn backend(&self, i: usize) -> &Host {
        match self.backends.get(i) {
            Some(b) => b,
            None => panic!("backend{i} requested, topology has {}", self.backends.len()),
        }
    }

    /// Every host: client, router (in a fleet), the LB(s), then the backends.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        std::iter::once(&self.client)
            .chain(&self.router)
            .chain(&self.lbs)
            .chain(&self.backends)
    }

    /// Every namespace this topology created (fabric first).
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.0.clone()
    }

    /// Runs `ip netns exec <ns> args...` (under [`crate::cmd::DEFAULT_TIMEOUT`])
    /// and returns its stdout.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        netns::exec(ns, args)
    }

    /// Starts `cmd` in `ns` (see [`process::spawn_in_netns`]); the process is
    /// stopped when the returned [`Spawned`] or this topology is dropped.
    pub fn spawn(&self, ns: &str, cmd: &mut Command) -> Result<Spawned> {
        process::spawn_registered(&self.children, ns, cmd)
    }

    /// Runs `f` on a thread inside `ns` (see [`netns::in_netns`]).
    pub fn in_ns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::in_netns(ns, f)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::in_netns(self.client.ns(), f)
    }

    /// Makes every backend accept `vip` for DSR (idempotent). Once
    /// [`crate::fabric::prepare`] runs `lbd` in the backend role on them,
    /// their lbds do it (the VIP added to their files, then a reload): the
    /// VIP on `lo`, decapsulated, and the DSR sysctls. Before that, and
    /// for topologies without a fabric, it is done here by hand, and the
    /// lbds started later find the address there (and leave it at teardown).
    pub fn add_vip_on_backends(&self, vip: IpAddr) -> Result<()> {
        let mut served = self.backend_vips.lock().unwrap_or_else(|e| e.into_inner());
        if !served.vips.contains(&vip) {
            served.vips.push(vip);
        }
        if served.served_by.is_empty() {
            return self.add_vip_by_hand(vip);
        }
        for role in &served.served_by {
            role.serve(&served.vips)
                .with_context(|| format!("adding VIP {vip} on {}", role.ns))?;
        }
        Ok(())
    }

    /// The VIP on `lo` (idempotent), no ARP replies or ARP source for it on
    /// `eth0` (only the LB may own it on the segment), and no reverse-path
    /// filtering of packets whose reply would not leave by the interface
    /// they came in on.
    fn add_vip_by_hand(&self, vip: IpAddr) -> Result<()> {
        let cidr = format!("{vip}/{}", plan::host_prefix_len(vip));
        for b in &self.backends {
            let family = if vip.is_ipv6() { "-6" } else { "-4" };
            netns::ip(b.ns(), &[family, "addr", "replace", &cidr, "dev", "lo"])
                .with_context(|| format!("adding VIP {vip} to {}", b.name()))?;
            // rp_filter uses the larger of "all" and the interface's value,
            // so set both; arp_* use the larger too, and 1/2 are what we want.
            netns::sysctl(
                b.ns(),
                &[
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv4.conf.lo.rp_filter=0",
                    &format!("net.ipv4.conf.{HOST_IFNAME}.rp_filter=0"),
                ],
            )
            .with_context(|| format!("DSR sysctls on {}", b.name()))?;
        }
        Ok(())
    }

    /// The backends' VIPs and who serves them (see
    /// [`Topology::add_vip_on_backends`]).
    pub(crate) fn backend_vips(&self) -> Arc<Mutex<BackendVips>> {
        self.backend_vips.clone()
    }

    /// `ethtool -K eth0 tx off` in `ns`: veth's checksum offload leaves
    /// partial checksums that an XDP_TX'd frame would carry out unfixed.
    pub fn disable_tx_checksum_offload(&self, ns: &str) -> Result<()> {
        self.disable_tx_checksum_offload_on(ns, HOST_IFNAME)
    }

    /// [`Topology::disable_tx_checksum_offload`] for any interface `dev`
    /// (say, a peer in the fabric namespace).
    pub fn disable_tx_checksum_offload_on(&self, ns: &str, dev: &str) -> Result<()> {
        self.exec(ns, &["ethtool", "-K", dev, "tx", "off"])
            .with_context(|| format!("disabling tx checksum offload on {dev} in {ns}"))
            .map(drop)
    }

    /// Starts a test server called `name` in `ns` and waits until it listens.
    pub fn start_server(
        &self,
        ns: &str,
        name: &str,
        http: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Result<Spawned> {
        let mut server = self.spawn(ns, &mut launcher::testserver_command(name, http, udp)?)?;
        launcher::wait_listening(&mut server, launcher::LISTEN_TIMEOUT)
            .with_context(|| format!("test server {name} in {ns}"))?;
        Ok(server)
    }

    /// Starts one test server per backend, named `backend<i>`, with HTTP on
    /// `port_http` and UDP echo on `port_udp`, both on `0.0.0.0` and `[::]` (so
    /// also on any VIP), and waits until all listen.
    pub fn start_servers(&self, port_http: u16, port_udp: u16) -> Result<Vec<Spawned>> {
        let any4 = IpAddr::from(Ipv4Addr::UNSPECIFIED);
        let any6 = IpAddr::from(Ipv6Addr::UNSPECIFIED);
        let http = [
            SocketAddr::new(any4, port_http),
            SocketAddr::new(any6, port_http),
        ];
        let udp = [
            SocketAddr::new(any4, port_udp),
            SocketAddr::new(any6, port_udp),
        ];
        // Start all, then wait for all: they come up in parallel.
        let mut servers = self
            .backends
            .iter()
            .map(|b| {
                self.spawn(
                    b.ns(),
                    &mut launcher::testserver_command(b.name(), &http, &udp)?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        for (server, b) in servers.iter_mut().zip(&self.backends) {
            launcher::wait_listening(server, launcher::LISTEN_TIMEOUT)
                .with_context(|| format!("test server {}", b.name()))?;
        }
        Ok(servers)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Stop our processes gently first (lbd may want to detach); whatever
        // else is still in the namespaces is SIGKILLed when `namespaces`
        // is dropped right after this.
        self.children.stop_all();
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("id", &self.id)
            .field("client", &self.client)
            .field("router", &self.router)
            .field("lbs", &self.lbs)
            .field("backends", &self.backends)
            .finish()
    }
}

/// A topology being built: every namespace it creates is deleted if it is
/// dropped, so a failure half-way leaves nothing behind; [`Builder::finish`]
/// hands them to the [`Topology`].
struct Builder {
    id: String,
    peer_base: String,
    fabric: String,
    namespaces: OwnedNamespaces,
}

impl Builder {
    /// Sweeps up what killed runs left behind (see
    /// [`netns::cleanup_stale`]), then makes the fabric and its bridge.
    fn start() -> Result<Builder> {
        // Best effort: leftovers only cost names we will not reuse anyway.
        if let Err(e) = netns::cleanup_stale(NS_PREFIX) {
            eprintln!("warning: cleaning up stale namespaces: {e:#}");
        }
        let pid = std::process::id();
        let k = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let id = format!("{NS_PREFIX}{pid}x{k}");
        // Peers only need to be unique in their fabric namespace, but the
        // run's numbers in them make `ip link` output and logs readable.
        let peer_base = format!("p{}x{k}", pid % 100_000);

        let mut namespaces = OwnedNamespaces::default();
        let fabric = format!("{id}-fabric");
        netns::create(&fabric)?;
        namespaces.0.push(fabric.clone());
        setup_fabric(&fabric)?;
        Ok(Builder {
            id,
            peer_base,
            fabric,
            namespaces,
        })
    }

    /// Creates namespace `<id>-<role>`, to be deleted with the topology.
    fn namespace(&mut self, role: &str) -> Result<String> {
        let ns = format!("{}-{role}", self.id);
        netns::create(&ns)?;
        self.namespaces.0.push(ns.clone());
        Ok(ns)
    }

    /// Host `name` in a new namespace `<id>-<role>`, on the bridge through
    /// port `<peer base><port>`, as host number `host` of the shared subnet.
    fn bridge_host(&mut self, name: &str, role: &str, port: &str, host: u8) -> Result<Host> {
        let peer = format!("{}{port}", self.peer_base);
        if peer.len() > MAX_IFNAME {
            bail!("interface name {peer} is longer than {MAX_IFNAME} bytes");
        }
        let ns = self.namespace(role)?;
        add_host(&self.fabric, name.to_owned(), ns, peer, host)
            .context("setting up a host namespace")
    }

    fn backends(&mut self, n: usize) -> Result<Vec<Host>> {
        (0..n)
            .map(|i| {
                let role = format!("b{i}");
                self.bridge_host(&format!("backend{i}"), &role, &role, plan::backend_host(i)?)
            })
            .collect()
    }

    /// A fleet's client: its own namespace and a veth straight to the
    /// router's [`ROUTER_CLIENT_IFNAME`], on the client subnet.
    fn client_behind(&mut self, router: &Host) -> Result<Host> {
        let ns = self.namespace("client")?;
        add_client_behind(router, ns).context("setting up the client behind the router")
    }

    fn finish(
        self,
        client: Host,
        router: Option<Host>,
        lbs: Vec<Host>,
        backends: Vec<Host>,
    ) -> Topology {
        Topology {
            id: self.id,
            fabric: self.fabric,
            client,
            router,
            lbs,
            backends,
            backend_vips: Arc::default(),
            children: Children::default(),
            namespaces: self.namespaces,
        }
    }
}

/// The bridge, with multicast snooping off so IPv6 neighbour discovery
/// floods like ARP does, and no IPv6 of its own on the fabric's ports (they
/// would only add router solicitations and MLD to what tests observe).
fn setup_fabric(fabric: &str) -> Result<()> {
    netns::sysctl(
        fabric,
        &[
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    )?;
    netns::ip(
        fabric,
        &[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ],
    )?;
    netns::ip(fabric, &["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Wires host namespace `ns` to the bridge and gives it its addresses.
fn add_host(fabric: &str, name: String, ns: String, peer: String, host: u8) -> Result<Host> {
    prepare_host_ns(&ns)?;
    add_veth(fabric, &peer, &ns)?;
    netns::ip(fabric, &["link", "set", &peer, "master", BRIDGE, "up"])?;
    let ipv4 = plan::host_v4(host);
    let ipv6 = plan::host_v6(host);
    add_addresses(&ns, HOST_IFNAME, ipv4, ipv6)?;
    netns::ip(&ns, &["link", "set", HOST_IFNAME, "up"])?;
    let mac = read_mac(&ns, HOST_IFNAME)?;
    Ok(Host {
        name,
        ns,
        peer,
        peer_ns: fabric.to_owned(),
        mac,
        ipv4,
        ipv6,
    })
}

/// Wires the fleet's client namespace `ns` to the router and addresses both
/// ends on the client subnet.
fn add_client_behind(router: &Host, ns: String) -> Result<Host> {
    prepare_host_ns(&ns)?;
    add_veth(router.ns(), ROUTER_CLIENT_IFNAME, &ns)?;
    add_addresses(
        router.ns(),
        ROUTER_CLIENT_IFNAME,
        plan::client_net_v4(plan::ROUTER_HOST),
        plan::client_net_v6(plan::ROUTER_HOST),
    )?;
    netns::ip(router.ns(), &["link", "set", ROUTER_CLIENT_IFNAME, "up"])?;
    let ipv4 = plan::client_net_v4(plan::CLIENT_HOST);
    let ipv6 = plan::client_net_v6(plan::CLIENT_HOST);
    add_addresses(&ns, HOST_IFNAME, ipv4, ipv6)?;
    netns::ip(&ns, &["link", "set", HOST_IFNAME, "up"])?;
    let mac = read_mac(&ns, HOST_IFNAME)?;
    Ok(Host {
        name: "client".to_owned(),
        ns,
        peer: ROUTER_CLIENT_IFNAME.to_owned(),
        peer_ns: router.ns().to_owned(),
        mac,
        ipv4,
        ipv6,
    })
}

/// New interfaces copy "default": without DAD, the nodad addresses and the
/// link-local one are usable at once.
fn prepare_host_ns(ns: &str) -> Result<()> {
    netns::sysctl(
        ns,
        &[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.default.router_solicitations=0",
        ],
    )
}

/// A veth `name` in namespace `local` whose other end is `eth0` in `remote`.
fn add_veth(local: &str, name: &str, remote: &str) -> Result<()> {
    let mtu = MTU.to_string();
    netns::ip(
        local,
        &[
            "link",
            "add",
            name,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IFNAME,
            "mtu",
            &mtu,
            "netns",
            remote,
        ],
    )
    .map(drop)
}

/// `ipv4` and `ipv6` on `dev` in `ns`, with the plan's prefix lengths.
fn add_addresses(ns: &str, dev: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<()> {
    netns::ip(
        ns,
        &[
            "addr",
            "add",
            &format!("{ipv4}/{}", plan::PREFIX_LEN_V4),
            "dev",
            dev,
        ],
    )?;
    netns::ip(
        ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{ipv6}/{}", plan::PREFIX_LEN_V6),
            "dev",
            dev,
            "nodad",
        ],
    )
    .map(drop)
}

/// The fleet router's forwarding: on; flows hashed on their 5-tuple
/// (addresses, protocol, ports: fields 0x37) because policy 1 would reuse a
/// hash the packet brings along, which over veth is the sending socket's own
/// and which TCP re-draws after a timeout, moving the flow to another LB
/// node; no reverse-path filter, as backends answer the client from a VIP
/// (no route back to it before BGP provides one, and never via the client).
fn setup_router(router: &Host) -> Result<()> {
    let mut settings = vec![
        "net.ipv4.ip_forward=1".to_owned(),
        "net.ipv6.conf.all.forwarding=1".to_owned(),
        "net.ipv4.fib_multipath_hash_policy=3".to_owned(),
        "net.ipv4.fib_multipath_hash_fields=0x0037".to_owned(),
        "net.ipv6.fib_multipath_hash_policy=3".to_owned(),
        "net.ipv6.fib_multipath_hash_fields=0x0037".to_owned(),
    ];
    // rp_filter uses the larger of "all" and the interface's value.
    for conf in ["all", "default", HOST_IFNAME, ROUTER_CLIENT_IFNAME] {
        settings.push(format!("net.ipv4.conf.{conf}.rp_filter=0"));
    }
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    netns::sysctl(router.ns(), &settings).context("routing sysctls on the router")
}

/// `host`'s default route of `via`'s family, through `via`.
fn default_route(host: &Host, via: IpAddr) -> Result<()> {
    let family = if via.is_ipv6() { "-6" } else { "-4" };
    netns::ip(
        host.ns(),
        &[family, "route", "add", "default", "via", &via.to_string()],
    )
    .with_context(|| format!("default route of {} via {via}", host.name()))
    .map(drop)
}

/// MAC of `dev` in `ns`, from `ip -j link`.
fn read_mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = netns::ip(ns, &["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("`ip -j link` gave {out:?}"))?;
    let addr = v[0]["address"]
        .as_str()
        .with_context(|| format!("no address for {dev} in {ns}: {out}"))?;
    parse_mac(addr).with_context(|| format!("bad MAC {addr:?} for {dev} in {ns}"))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
    }
}
