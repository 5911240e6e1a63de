//! A running fleet for tests, the demo and the benchmark: a
//! [`Topology::fleet`] with HTTP servers on the backends, BIRD on the router
//! and on every LB node, and lbd on every node with the same VIPs and
//! backends, announcing through its table. Nodes can be drained, killed,
//! cut off and brought back; [`LongLived`] keeps connections busy through
//! all of it and reports every failed or moved request.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    Bird, HttpConn, Spawned, Topology, addressing,
    bird::{self, Route},
    fabric::{self, Fabric},
    in_netns, lbd,
};
use lb_userspace::dataplane::AttachMode;

pub const PORT: u16 = 80;
/// Every node's `hash_seed`.
pub const SEED: u32 = 7;
/// Health checks every node runs: a dead backend is out within 0.5 s.
pub const CHECK_INTERVAL_MS: u64 = 200;
pub const CHECK_FALL: u64 = 2;

/// How long the router may take to see a change on a node: BGP updates
/// take milliseconds, a silent node BFD's 0.3 s, a session coming back a
/// couple of seconds (BIRD's connect delay and retry).
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// The VIPs every node serves: one IPv4, one IPv6, both `:80/tcp`.
pub fn vips() -> [IpAddr; 2] {
    [
        IpAddr::from(addressing::vip_v4(1)),
        IpAddr::from(addressing::vip_v6(1)),
    ]
}

/// One node's lbd and BIRD, when running.
struct Node {
    dir: PathBuf,
    config: PathBuf,
    lbd: Option<Spawned>,
    bird: Option<Bird>,
    _teardown: lbd::Teardown,
}

pub struct Fleet {
    nodes: Vec<Node>,
    /// Every VIP's forwarding mode (`ipip` unless changed before
    /// [`Fleet::add_nodes`]).
    pub mode: &'static str,
    /// `dataplane.second_chance_window` (lbd's default unless set before
    /// [`Fleet::add_nodes`]).
    pub second_chance_window: Option<&'static str>,
    pub router: Bird,
    servers: Vec<Spawned>,
    pub fabric: Fabric,
    // Last: its drop deletes the namespaces, after everything above.
    pub t: Topology,
}

impl Fleet {
    /// `n_lbs` nodes in front of `n_backends` backends, every node
    /// announcing both VIPs; returns once the router spreads both over all
    /// nodes.
    pub fn start(n_lbs: usize, n_backends: usize) -> Result<Fleet> {
        Fleet::start_with_seeds(n_lbs, n_backends, |_| SEED)
    }

    /// [`Fleet::start`] with node `i`'s `hash_seed` from `seed(i)`: a node
    /// whose rings differ from its peers' shows what identical rings buy.
    pub fn start_with_seeds(
        n_lbs: usize,
        n_backends: usize,
        seed: impl Fn(usize) -> u32,
    ) -> Result<Fleet> {
        Fleet::start_full(n_lbs, n_backends, seed, true)
    }

    /// [`Fleet::start_with_seeds`], with or without BFD between the router
    /// and the nodes (without it, a silent node is found by the BGP hold
    /// time).
    pub fn start_full(
        n_lbs: usize,
        n_backends: usize,
        seed: impl Fn(usize) -> u32,
        bfd: bool,
    ) -> Result<Fleet> {
        let mut fleet = Fleet::prepare(n_lbs, n_backends, bfd)?;
        fleet.add_nodes(n_lbs, seed, |_| String::new())?;
        Ok(fleet)
    }

    /// The topology, servers, fabric and router, without LB nodes yet.
    pub fn prepare(n_lbs: usize, n_backends: usize, bfd: bool) -> Result<Fleet> {
        let t = Topology::fleet(n_lbs, n_backends)?;
        let servers = t.start_servers(PORT, 53)?;
        let fabric = fabric::prepare(&t, AttachMode::Generic)?;
        for vip in vips() {
            t.add_vip_on_backends(vip)?;
        }
        let router = Bird::start_router(&t, bfd)?;
        Ok(Fleet {
            nodes: Vec::new(),
            mode: "ipip",
            second_chance_window: None,
            router,
            servers,
            fabric,
            t,
        })
    }

    /// Starts `n_lbs` nodes, node `i` with `hash_seed` `seed(i)` and
    /// `extra(i)` appended to its configuration; returns once the router
    /// spreads both VIPs over all of them.
    pub fn add_nodes(
        &mut self,
        n_lbs: usize,
        seed: impl Fn(usize) -> u32,
        extra: impl Fn(usize) -> String,
    ) -> Result<()> {
        for i in 0..n_lbs {
            let dir = std::env::temp_dir().join(format!("{}-node{i}", self.t.id()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let config = dir.join("lb.toml");
            std::fs::write(&config, self.node_config(i, &dir, seed(i)) + &extra(i))?;
            let teardown = lbd::Teardown::in_netns(config.clone(), self.t.lb_node(i).ns());
            self.nodes.push(Node {
                dir,
                config,
                lbd: None,
                bird: None,
                _teardown: teardown,
            });
            self.bring_up(i)?;
        }
        self.router.wait_established(ROUTE_TIMEOUT)?;
        self.wait_announced_by(&(0..n_lbs).collect::<Vec<_>>())?;
        Ok(())
    }

    /// Node `i`'s lbd configuration: the same VIPs, backends, checks and
    /// hash seed as every other node's; its own name, addresses and table.
    pub fn node_config(&self, i: usize, dir: &Path, seed: u32) -> String {
        let node = self.t.lb_node(i);
        let name = format!("{}n{i}", self.t.instance_name());
        // Flap damping off in effect: the tests and the benchmark stop and
        // start every server several times a minute on purpose, and measure
        // how fast nodes follow each time.
        let check = format!(
            "[vip.health_check]\ntype = \"tcp\"\ninterval = \"{CHECK_INTERVAL_MS}ms\"\n\
             timeout = \"150ms\"\nrise = 1\nfall = {CHECK_FALL}\nflap_limit = 1000\n"
        );
        let b4 = lbd::backend_tables(self.t.backends());
        let b6: String = self
            .t
            .backends()
            .iter()
            .map(|b| format!("[[vip.backend]]\naddress = \"{}\"\n", b.ipv6()))
            .collect();
        let [v4, v6] = vips();
        format!(
            "{pre}encap_source_v6 = \"{lb6}\"\nhash_seed = {seed}\n{window}\
             [announce]\ntable = {table}\n\
             [[vip]]\naddress = \"{v4}:{PORT}/tcp\"\nmode = \"{mode}\"\n{check}{b4}\
             [[vip]]\naddress = \"[{v6}]:{PORT}/tcp\"\nmode = \"{mode}\"\n{check}{b6}",
            mode = self.mode,
            window = self
                .second_chance_window
                .map(|w| format!("second_chance_window = \"{w}\"\n"))
                .unwrap_or_default(),
            pre = lbd::Preamble {
                on_exit: "keep",
                ..Default::default()
            }
            .render_for(node, &name, dir),
            lb6 = node.ipv6(),
            table = bird::VIP_TABLE,
        )
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Starts node `i`'s BIRD and lbd (lbd adopts the data plane a killed
    /// one left pinned).
    pub fn bring_up(&mut self, i: usize) -> Result<()> {
        let bird = Bird::start_lb(&self.t, i)?;
        let (lbd, _) = lbd::start_on(&self.t, self.t.lb_node(i), &self.nodes[i].config)?;
        self.nodes[i].bird = Some(bird);
        self.nodes[i].lbd = Some(lbd);
        Ok(())
    }

    /// Kills node `i` the way a crash does: lbd and BIRD SIGKILLed. The
    /// pinned data plane keeps forwarding what still arrives; BIRD's
    /// sessions close, and the router moves the node's flows at once.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        if let Some(b) = node.bird.as_mut() {
            b.kill()?;
        }
        if let Some(mut l) = node.lbd.take() {
            let pid = libc::pid_t::try_from(l.pid()).context("pid out of range")?;
            // SAFETY: kill(2) on a child we own and have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            l.stop();
        }
        node.bird = None;
        Ok(())
    }

    /// Takes node `i`'s link down: it goes silent (BFD finds it) and
    /// forwards nothing until [`Fleet::link_up`].
    pub fn link_down(&self, i: usize) -> Result<()> {
        let n = self.t.lb_node(i);
        self.t
            .exec(n.ns(), &["ip", "link", "set", "dev", n.ifname(), "down"])?;
        Ok(())
    }

    pub fn link_up(&self, i: usize) -> Result<()> {
        let n = self.t.lb_node(i);
        self.t
            .exec(n.ns(), &["ip", "link", "set", "dev", n.ifname(), "up"])?;
        Ok(())
    }

    /// Stops every backend's servers: every VIP is left without a healthy
    /// backend.
    pub fn stop_servers(&mut self) {
        for s in &mut self.servers {
            s.stop();
        }
    }

    /// Starts the backends' servers again.
    pub fn start_servers(&mut self) -> Result<()> {
        self.servers = self.t.start_servers(PORT, 53)?;
        Ok(())
    }

    /// The router's next hops for `vip` (none: not routed).
    pub fn router_nexthops(&self, vip: IpAddr) -> Result<std::collections::BTreeSet<IpAddr>> {
        bird::router_nexthops(
            &self.t,
            &format!("{vip}/{}", addressing::host_prefix_len(vip)),
        )
    }

    /// Node `i`'s control socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("lbd.sock")
    }

    /// `lbctl ARGS` against node `i`'s lbd; its stdout.
    pub fn lbctl(&self, i: usize, args: &[&str]) -> Result<String> {
        crate::launcher::lbctl(&self.nodes[i].dir.join("lbd.sock"), args)
            .with_context(|| format!("on node {i}"))
    }

    /// Blocks (or unblocks) node `i`'s health checks to every backend, with
    /// nftables in its namespace: its checks fail while the backends stay
    /// up for everyone else.
    pub fn block_checks(&self, i: usize, blocked: bool) -> Result<()> {
        let ns = self.t.lb_node(i).ns();
        if blocked {
            let port = PORT.to_string();
            self.t
                .exec(ns, &["nft", "add", "table", "inet", "lbtest"])?;
            self.t.exec(
                ns,
                &[
                    "nft",
                    "add chain inet lbtest out { type filter hook output priority 0; }",
                ],
            )?;
            self.t.exec(
                ns,
                &[
                    "nft", "add", "rule", "inet", "lbtest", "out", "tcp", "dport", &port, "drop",
                ],
            )?;
        } else {
            self.t
                .exec(ns, &["nft", "delete", "table", "inet", "lbtest"])?;
        }
        Ok(())
    }

    /// The router's routes to both VIPs, through exactly these nodes.
    fn routes_via(&self, nodes: &[usize]) -> Vec<Route> {
        vips()
            .into_iter()
            .map(|vip| Route::to_vip(vip, nodes.iter().map(|&i| self.t.lb_node(i))))
            .collect()
    }

    /// Waits until the router sends both VIPs to exactly `nodes`; returns
    /// the slower of the two families' times.
    pub fn wait_announced_by(&self, nodes: &[usize]) -> Result<Duration> {
        self.wait_announced_by_since(nodes, Instant::now())
    }

    /// [`Fleet::wait_announced_by`], timed from `since`.
    pub fn wait_announced_by_since(&self, nodes: &[usize], since: Instant) -> Result<Duration> {
        let took = bird::wait_routes(&self.t, &self.routes_via(nodes), since, ROUTE_TIMEOUT)?;
        took.into_iter().max().context("no routes waited for")
    }

    /// Every node's `lb_vip_packets_total`-like count of forwarded packets
    /// (`verdict_tx` from `lbctl counters`).
    pub fn forwarded(&self) -> Result<Vec<u64>> {
        self.counter("verdict_tx")
    }

    /// Global counter `name` on each node.
    pub fn counter(&self, name: &str) -> Result<Vec<u64>> {
        (0..self.nodes.len())
            .map(|i| {
                let c: BTreeMap<String, u64> =
                    serde_json::from_str(&self.lbctl(i, &["counters", "--json"])?)
                        .context("lbctl counters")?;
                Ok(c.get(name).copied().unwrap_or(0))
            })
            .collect()
    }

    /// Decapsulator counter `name` on each backend.
    pub fn backend_counter(&self, name: &str) -> Result<Vec<u64>> {
        self.fabric
            .backends()
            .iter()
            .map(|b| {
                let c: BTreeMap<String, u64> =
                    serde_json::from_str(&crate::lbctl(&b.socket(), &["counters", "--json"])?)
                        .context("lbctl counters on a backend")?;
                Ok(c.get(name).copied().unwrap_or(0))
            })
            .collect()
    }

    /// Waits for node `i`'s lbd to print a line matching `want`.
    pub fn wait_for_line(
        &mut self,
        i: usize,
        want: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let l = self.nodes[i]
            .lbd
            .as_mut()
            .with_context(|| format!("node {i}'s lbd is not running"))?;
        l.wait_for_line(want, timeout)
    }
}

/// `n` new connections to each VIP, one request each; backend -> count.
pub fn spread(t: &Topology, n: usize) -> Result<BTreeMap<String, usize>> {
    t.in_client(move || -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for vip in vips() {
            for _ in 0..n {
                let mut c = HttpConn::connect(SocketAddr::new(vip, PORT), Duration::from_secs(3))?;
                let who = c.get("/")?.text().trim().to_owned();
                *seen.entry(who).or_insert(0) += 1;
            }
        }
        Ok(seen)
    })?
}

/// What long-lived connections went through.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub connections: usize,
    pub requests: u64,
    /// Requests that failed or were answered by another backend.
    pub failures: Vec<String>,
}

impl Report {
    /// Connections that failed at least once.
    pub fn broken(&self) -> usize {
        self.failures
            .iter()
            .filter_map(|f| f.split(':').next())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }
}

/// Keep-alive connections that send a request each, round after round,
/// from a thread of their own, each checking its answer comes from the
/// backend that served its first request.
pub struct LongLived {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LongLived {
    /// `per_vip` connections to each VIP; returns once all are open.
    pub fn start(t: &Topology, per_vip: usize) -> Result<LongLived> {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (st, rep, ns) = (stop.clone(), report.clone(), t.client().ns().to_owned());
        let thread = std::thread::spawn(move || {
            let _ = in_netns(&ns, move || {
                let opened: Result<Vec<(HttpConn, String)>> = vips()
                    .into_iter()
                    .flat_map(|vip| std::iter::repeat_n(vip, per_vip))
                    .map(|vip| {
                        let mut c =
                            HttpConn::connect(SocketAddr::new(vip, PORT), Duration::from_secs(3))?;
                        let who = c.get("/")?.text();
                        Ok((c, who))
                    })
                    .collect();
                let mut conns = match opened {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(c.len()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                // Bounded even if nobody stops it.
                let deadline = Instant::now() + Duration::from_secs(600);
                while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for (i, (c, who)) in conns.iter_mut().enumerate() {
                        let outcome = match c.get("/") {
                            Ok(r) if r.text() == *who => Ok(()),
                            Ok(r) => Err(format!(
                                "connection {i}: answered by {:?}, not {who:?}",
                                r.text()
                            )),
                            Err(e) => Err(format!("connection {i}: {e:#}")),
                        };
                        if let Ok(mut r) = rep.lock() {
                            r.requests += 1;
                            if let Err(e) = outcome {
                                r.failures.push(e);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        });
        let n = ready_rx
            .recv_timeout(Duration::from_secs(60))
            .context("opening the long-lived connections")?
            .map_err(|e| anyhow::anyhow!("opening the long-lived connections: {e}"))?;
        if let Ok(mut r) = report.lock() {
            r.connections = n;
        }
        Ok(LongLived {
            stop,
            report,
            thread: Some(thread),
        })
    }

    /// Connections that failed at least once (a reset connection fails
    /// every request after).
    pub fn broken(&self) -> usize {
        self.report.lock().map(|r| r.broken()).unwrap_or(0)
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.report.lock().map(|r| r.requests).unwrap_or(0)
    }

    /// Lets every connection make `rounds` more requests in the state the
    /// fleet is in now (at most 20 s).
    pub fn settle(&self, rounds: u64) {
        let connections = self.report.lock().map(|r| r.connections).unwrap_or(0) as u64;
        let want = self.requests() + rounds * connections;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.requests() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the traffic; what it went through.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
