//! The end-to-end topology: client, LB and backends, each in
//! its own namespace, wired to one bridge in a `fabric` namespace.
//!
//! ```text
//!  client ns ─veth─┐
//!  lb ns ────veth──┤ bridge (in a "fabric" ns)
//!  backend ns ×N ──┘
//! ```
//!
//! Nothing is ever created in the root namespace: veths are made inside the
//! fabric namespace with their other end placed straight into the host's
//! namespace, so deleting the namespaces removes everything.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

use crate::{
    addressing as plan, launcher,
    netns::{self, NS_PREFIX},
    process::{self, Children, Spawned},
};

/// The interface name inside every host namespace.
pub const HOST_IFNAME: &str = "eth0";
/// The bridge in the fabric namespace.
pub const BRIDGE: &str = "br0";
pub const MTU: u16 = 1500;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Distinguishes the topologies of one process (tests run in parallel).
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One host (client, LB or backend): its namespace, addresses and the
/// bridge port it hangs off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    name: String,
    ns: String,
    peer: String,
    mac: [u8; 6],
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Host {
    /// `client`, `lb` or `backend<i>`.
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
    /// (where an XDP program can watch everything the host sends).
    pub fn peer_ifname(&self) -> &str {
        &self.peer
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
    lb: Host,
    backends: Vec<Host>,
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

        let mut plan_hosts = vec![
            (
                "client".to_owned(),
                format!("{id}-client"),
                format!("{peer_base}c"),
                plan::CLIENT_HOST,
            ),
            (
                "lb".to_owned(),
                format!("{id}-lb"),
                format!("{peer_base}l"),
                plan::LB_HOST,
            ),
        ];
        for i in 0..n_backends {
            plan_hosts.push((
                format!("backend{i}"),
                format!("{id}-b{i}"),
                format!("{peer_base}b{i}"),
                plan::backend_host(i)?,
            ));
        }
        let mut hosts = Vec::with_capacity(plan_hosts.len());
        for (name, ns, peer, host) in plan_hosts {
            if peer.len() > MAX_IFNAME {
                bail!("interface name {peer} is longer than {MAX_IFNAME} bytes");
            }
            netns::create(&ns)?;
            namespaces.0.push(ns.clone());
            let host =
                add_host(&fabric, name, ns, peer, host).context("setting up a host namespace")?;
            hosts.push(host);
        }
        let mut hosts = hosts.into_iter();
        let (Some(client), Some(lb)) = (hosts.next(), hosts.next()) else {
            bail!("client and lb hosts missing");
        };
        let backends: Vec<Host> = hosts.collect();

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

        Ok(Topology {
            id,
            fabric,
            client,
            lb,
            backends,
            children: Children::default(),
            namespaces,
        })
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

    pub fn lb(&self) -> &Host {
        &self.lb
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

    /// Every host: client, lb, then the backends.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        [&self.client, &self.lb].into_iter().chain(&self.backends)
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

    /// Makes every backend accept `vip` for DSR: the VIP on `lo` (idempotent),
    /// no ARP replies or ARP source for it on `eth0` (only the LB may own it on
    /// the segment), and no reverse-path filtering of packets whose reply
    /// would not leave by the interface they came in on.
    pub fn add_vip_on_backends(&self, vip: IpAddr) -> Result<()> {
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
            .field("lb", &self.lb)
            .field("backends", &self.backends)
            .finish()
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
    // New interfaces copy "default": without DAD, the nodad addresses and
    // the link-local one are usable at once.
    netns::sysctl(
        &ns,
        &[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.default.router_solicitations=0",
        ],
    )?;
    let mtu = MTU.to_string();
    netns::ip(
        fabric,
        &[
            "link",
            "add",
            &peer,
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
            &ns,
        ],
    )?;
    netns::ip(fabric, &["link", "set", &peer, "master", BRIDGE, "up"])?;
    let ipv4 = plan::host_v4(host);
    let ipv6 = plan::host_v6(host);
    netns::ip(
        &ns,
        &[
            "addr",
            "add",
            &format!("{ipv4}/{}", plan::PREFIX_LEN_V4),
            "dev",
            HOST_IFNAME,
        ],
    )?;
    netns::ip(
        &ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{ipv6}/{}", plan::PREFIX_LEN_V6),
            "dev",
            HOST_IFNAME,
            "nodad",
        ],
    )?;
    netns::ip(&ns, &["link", "set", HOST_IFNAME, "up"])?;
    let mac = read_mac(&ns, HOST_IFNAME)?;
    Ok(Host {
        name,
        ns,
        peer,
        mac,
        ipv4,
        ipv6,
    })
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
