//! BIRD 2 in a fleet ([`Topology::fleet`]): LB nodes announce their VIPs to
//! the router over eBGP, and the router installs one multipath route per
//! VIP.
//!
//! The configurations are the shipped ones (`scripts/bird-lb.conf`,
//! `scripts/bird-router.conf`), read at test time and specialised by
//! rewriting their `define` lines (and the router's list of peers), so the
//! files operators get are the files the tests run.
//!
//! A VIP is announced the way lbd does it: a host route on `lo` in
//! [`VIP_TABLE`], which the LB node's BIRD learns and exports.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{self, Read},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Host, Spawned, Topology, addressing as plan, cmd};

/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// Every LB node's AS: one for the whole fleet, as the nodes are
/// interchangeable and the router's peer template names a single AS.
pub const LB_AS: u32 = 65001;
/// The kernel table lbd announces VIPs in.
pub const VIP_TABLE: u32 = 100;

/// How long BIRD may take to open its control socket (it takes ~20 ms).
pub const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for one `birdc` command.
pub const BIRDC_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the waits look again.
const POLL: Duration = Duration::from_millis(1);
/// How often [`ip_quick`] looks whether `ip` is done.
const IP_POLL: Duration = Duration::from_micros(200);

/// Numbers the scratch directories: a BIRD restarted on the same host must
/// not share one with its predecessor, whose drop would delete it.
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// Where the router's config lists its peers; the lines in between are
/// replaced with one pair of sessions per LB node.
const PEERS_BEGIN: &str = "# BEGIN LB NODES";
const PEERS_END: &str = "# END LB NODES";

/// The shipped configuration file `name` (`bird-lb.conf`, `bird-router.conf`).
pub fn shipped_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

fn read_shipped(name: &str) -> Result<String> {
    let path = shipped_config(name);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The shipped LB node configuration for `node`, peering with `router`.
pub fn lb_config(node: &Host, router: &Host) -> Result<String> {
    let conf = read_shipped("bird-lb.conf")?;
    set_defines(
        &conf,
        &[
            ("LOCAL_ID", node.ipv4().to_string()),
            ("LOCAL_AS", LB_AS.to_string()),
            ("ROUTER_AS", ROUTER_AS.to_string()),
            ("ROUTER4", router.ipv4().to_string()),
            ("ROUTER6", router.ipv6().to_string()),
            ("VIP_TABLE", VIP_TABLE.to_string()),
        ],
    )
    .context("specialising bird-lb.conf")
}

/// The shipped router configuration for `router`, with one IPv4 and one
/// IPv6 session to each of `peers`, BFD on them or not, and the plan's VIP
/// ranges as what peers may announce.
pub fn router_config(router: &Host, peers: &[Host], bfd: bool) -> Result<String> {
    let conf = read_shipped("bird-router.conf")?;
    let conf = set_defines(
        &conf,
        &[
            ("ROUTER_ID", router.ipv4().to_string()),
            ("LOCAL_AS", ROUTER_AS.to_string()),
            ("LB_AS", LB_AS.to_string()),
            ("PEER_BFD", u8::from(bfd).to_string()),
            (
                "VIPS4",
                format!(
                    "[ {}/{}{{32,32}} ]",
                    plan::VIP_NET_V4,
                    plan::VIP_PREFIX_LEN_V4
                ),
            ),
            (
                "VIPS6",
                format!(
                    "[ {}/{}{{128,128}} ]",
                    plan::VIP_NET_V6,
                    plan::VIP_PREFIX_LEN_V6
                ),
            ),
        ],
    )
    .context("specialising bird-router.conf")?;
    let sessions: String = peers.iter().map(peer_sessions).collect();
    replace_section(&conf, PEERS_BEGIN, PEERS_END, &sessions)
        .context("writing the peers into bird-router.conf")
}

fn peer_sessions(peer: &Host) -> String {
    let name = peer.name();
    format!(
        "protocol bgp {name}_4 from lb_node4 {{ neighbor {} as LB_AS; }}\n\
         protocol bgp {name}_6 from lb_node6 {{ neighbor {} as LB_AS; }}\n",
        peer.ipv4(),
        peer.ipv6()
    )
}

/// `conf` with the value of each `define NAME = value;` line named in
/// `values` replaced (the rest of the line, a comment say, stays). Fails
/// when a name has no such line or has several, so a define renamed in a
/// shipped file breaks the tests instead of being silently ignored.
pub fn set_defines(conf: &str, values: &[(&str, String)]) -> Result<String> {
    let mut seen = vec![false; values.len()];
    let mut out = String::with_capacity(conf.len());
    for line in conf.split_inclusive('\n') {
        let hit = define_name(line).and_then(|n| values.iter().position(|(v, _)| *v == n));
        let Some(i) = hit else {
            out.push_str(line);
            continue;
        };
        let (name, value) = &values[i];
        if std::mem::replace(&mut seen[i], true) {
            bail!("`define {name}` appears more than once");
        }
        out.push_str(&with_value(line, value).with_context(|| format!("`define {name}`"))?);
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        bail!("no `define {} = ...;` line to set", values[i].0);
    }
    Ok(out)
}

/// The name a `define` line defines.
fn define_name(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("define")?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let (name, _) = rest.split_once('=')?;
    Some(name.trim())
}

/// A `define` line with its value (between `=` and `;`) replaced.
fn with_value(line: &str, value: &str) -> Result<String> {
    let eq = line.find('=').context("no `=`")?;
    let semi = line[eq..]
        .find(';')
        .map(|i| eq + i)
        .context("no `;` on the line (multi-line values cannot be set)")?;
    Ok(format!("{} {value}{}", &line[..=eq], &line[semi..]))
}

/// `conf` with the lines strictly between the line containing `begin` and
/// the next one containing `end` replaced by `body`.
pub fn replace_section(conf: &str, begin: &str, end: &str, body: &str) -> Result<String> {
    let start = conf
        .find(begin)
        .with_context(|| format!("no {begin:?} marker"))?;
    let after_begin = conf[start..]
        .find('\n')
        .map(|i| start + i + 1)
        .with_context(|| format!("nothing after {begin:?}"))?;
    let stop = conf[after_begin..]
        .find(end)
        .map(|i| after_begin + i)
        .with_context(|| format!("no {end:?} marker after {begin:?}"))?;
    // Keep the end marker's indentation with it.
    let stop = conf[..stop].rfind('\n').map_or(stop, |i| i + 1);
    Ok(format!("{}{body}{}", &conf[..after_begin], &conf[stop..]))
}

/// Runs `birdc -s socket args...` and returns its output.
pub fn birdc(socket: &Path, args: &[&str], timeout: Duration) -> Result<String> {
    cmd::run(
        Command::new("birdc").arg("-s").arg(socket).args(args),
        timeout,
    )
}

/// A scratch directory removed on drop.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A BIRD daemon in one host's namespace, with its configuration, control
/// socket and stderr in a scratch directory. It is stopped (SIGTERM) when
/// dropped, or with the topology that started it, whichever comes first.
#[derive(Debug)]
pub struct Bird {
    label: String,
    socket: PathBuf,
    stderr: PathBuf,
    // Stopped before the directory holding its socket goes.
    process: Spawned,
    _dir: Scratch,
}

impl Bird {
    /// Starts `bird` with configuration `config` in `host`'s namespace and
    /// waits until its control socket answers.
    pub fn start(t: &Topology, host: &Host, config: &str) -> Result<Bird> {
        let label = format!("bird in {}", host.name());
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{}-bird{n}-{}", t.id(), host.name()));
        // Only a dead run with our pid can have left it.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = Scratch(dir);
        let conf = dir.0.join("bird.conf");
        fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let socket = dir.0.join("bird.ctl");
        let stderr = dir.0.join("bird.stderr");
        let mut cmd = Command::new("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(dir.0.join("bird.pid"))
            .stderr(File::create(&stderr).context("creating bird's stderr file")?);
        let process = t.spawn(host.ns(), &mut cmd)?;
        let bird = Bird {
            label,
            socket,
            stderr,
            process,
            _dir: dir,
        };
        bird.wait_ready(START_TIMEOUT)?;
        Ok(bird)
    }

    /// [`Bird::start`] on `t`'s router with [`router_config`] (peers: all
    /// LB nodes).
    pub fn start_router(t: &Topology, bfd: bool) -> Result<Bird> {
        let config = router_config(t.router(), t.lbs(), bfd)?;
        Bird::start(t, t.router(), &config)
    }

    /// [`Bird::start`] on `t`'s LB node `i` with [`lb_config`].
    pub fn start_lb(t: &Topology, i: usize) -> Result<Bird> {
        let config = lb_config(t.lb_node(i), t.router())?;
        Bird::start(t, t.lb_node(i), &config)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.process.is_running() {
                bail!("{} exited: {}", self.label, self.stderr_text());
            }
            if self.socket.exists() && self.birdc(&["show", "status"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no control socket within {timeout:?}; stderr: {}",
                    self.label,
                    self.stderr_text()
                );
            }
            thread::sleep(POLL);
        }
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Its control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Runs a `birdc` command against it (`&["show", "route"]`).
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.socket, args, BIRDC_TIMEOUT).with_context(|| self.label.clone())
    }

    /// Its BGP sessions: protocol name and whether it is established.
    pub fn bgp_sessions(&self) -> Result<Vec<(String, bool)>> {
        Ok(parse_bgp_sessions(&self.birdc(&["show", "protocols"])?))
    }

    /// Waits until it has BGP sessions and all are established; returns how
    /// long that took.
    pub fn wait_established(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let sessions = self.bgp_sessions()?;
            if !sessions.is_empty() && sessions.iter().all(|(_, up)| *up) {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{}: BGP not established within {timeout:?}:\n{}",
                    self.label,
                    self.birdc(&["show", "protocols", "all"])
                        .unwrap_or_else(|e| format!("{e:#}"))
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until at least `count` of its BFD sessions are up; returns how
    /// long that took. A BFD session that never came up cannot go down, so
    /// a silent peer would then only be caught by the BGP hold time.
    pub fn wait_bfd_up(&self, count: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let out = self.birdc(&["show", "bfd", "sessions"])?;
            if parse_bfd_up(&out) >= count {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{}: fewer than {count} BFD sessions up within {timeout:?}:\n{out}",
                    self.label
                );
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILL, the way a crashed node goes: no BGP notification. Its peers
    /// still learn at once, from the kernel closing its TCP connections;
    /// a node that goes silent instead is for BFD or the hold time to find.
    ///
    /// Returns without reaping it (that happens on drop), so that timing
    /// what follows does not include a wait for the exit.
    pub fn kill(&mut self) -> Result<()> {
        if !self.process.is_running() {
            bail!("{} is not running", self.label);
        }
        let pid = libc::pid_t::try_from(self.process.pid()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the child was
        // alive just now and only we reap it, so the pid is still ours.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("killing {}", self.label));
        }
        Ok(())
    }

    /// SIGTERM: BIRD says goodbye to its peers (a BGP cease notification).
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// The BGP lines of `birdc show protocols`: name and whether established.
pub fn parse_bgp_sessions(show_protocols: &str) -> Vec<(String, bool)> {
    show_protocols
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let name = cols.next()?;
            (cols.next()? == "BGP").then(|| (name.to_owned(), line.contains("Established")))
        })
        .collect()
}

/// How many sessions `birdc show bfd sessions` lists as up.
pub fn parse_bfd_up(show_bfd: &str) -> usize {
    show_bfd
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("Up"))
        .count()
}

/// The host route for `vip` (`/32` or `/128`).
fn host_route(vip: IpAddr) -> String {
    format!("{vip}/{}", plan::host_prefix_len(vip))
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() { "-6" } else { "-4" }
}

/// Announces `vip` from `node` as lbd does: a host route on `lo` in
/// [`VIP_TABLE`], for the node's BIRD to learn.
pub fn add_vip_route(node: &Host, vip: IpAddr) -> Result<()> {
    vip_route(node, vip, "add")
}

/// Withdraws what [`add_vip_route`] announced.
pub fn delete_vip_route(node: &Host, vip: IpAddr) -> Result<()> {
    vip_route(node, vip, "del")
}

fn vip_route(node: &Host, vip: IpAddr, verb: &str) -> Result<()> {
    let table = VIP_TABLE.to_string();
    let route = host_route(vip);
    ip_quick(
        node.ns(),
        &[
            family(vip),
            "route",
            verb,
            &route,
            "dev",
            "lo",
            "table",
            &table,
            "proto",
            "static",
        ],
    )
    .with_context(|| format!("{verb} VIP route {route} on {}", node.name()))
    .map(drop)
}

/// `ip -n ns args...`'s stdout, like [`crate::netns::ip`] but without its 10 ms
/// polling for the exit, which would blur the times measured here (an `ip`
/// run takes about 2 ms). Only for commands with little output: it is read
/// after the exit, so it must fit in the pipe.
fn ip_quick(ns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.arg("-n").arg(ns).args(args);
    let line = cmd::display(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let deadline = Instant::now() + cmd::DEFAULT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // Kill errors only mean it exited in the meantime.
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {:?}", cmd::DEFAULT_TIMEOUT);
        }
        thread::sleep(IP_POLL);
    };
    let stdout = read_all(child.stdout.take());
    if !status.success() {
        let stderr = read_all(child.stderr.take());
        bail!("`{line}` failed ({status}): {}", stderr.trim());
    }
    Ok(stdout)
}

fn read_all(pipe: Option<impl Read>) -> String {
    let mut text = String::new();
    if let Some(mut p) = pipe {
        // A read error leaves what was read, which is all there is to say.
        let _ = p.read_to_string(&mut text);
    }
    text
}

/// A prefix and the next hops it should be routed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: String,
    pub via: BTreeSet<IpAddr>,
}

impl Route {
    /// The host route to `vip` through `hosts` (their address of `vip`'s
    /// family); no hosts: no route at all.
    pub fn to_vip<'a>(vip: IpAddr, hosts: impl IntoIterator<Item = &'a Host>) -> Route {
        Route {
            prefix: host_route(vip),
            via: hosts.into_iter().map(|h| h.ip(vip.is_ipv6())).collect(),
        }
    }
}

/// The next hops of every route the router's main table has for exactly
/// `prefix` (`198.18.100.1/32`); empty when there is none.
pub fn router_nexthops(t: &Topology, prefix: &str) -> Result<BTreeSet<IpAddr>> {
    nexthops(t.router().ns(), prefix)
}

fn nexthops(ns: &str, prefix: &str) -> Result<BTreeSet<IpAddr>> {
    let (addr, _) = prefix
        .split_once('/')
        .with_context(|| format!("{prefix:?} is not address/length"))?;
    let addr: IpAddr = addr
        .parse()
        .with_context(|| format!("bad address in {prefix:?}"))?;
    let out = ip_quick(ns, &[family(addr), "-j", "route", "show", prefix])?;
    parse_nexthops(&out).with_context(|| format!("routes to {prefix} in {ns}"))
}

/// The gateways in `ip -j route show` output: of each route's `nexthops`
/// for a multipath route, else of the route itself.
pub fn parse_nexthops(json: &str) -> Result<BTreeSet<IpAddr>> {
    let mut hops = BTreeSet::new();
    if json.trim().is_empty() {
        return Ok(hops);
    }
    let routes: Value =
        serde_json::from_str(json).with_context(|| format!("`ip -j route` gave {json:?}"))?;
    let routes = routes
        .as_array()
        .with_context(|| format!("`ip -j route` gave no list: {json}"))?;
    for route in routes {
        match route.get("nexthops").and_then(Value::as_array) {
            Some(nhs) => {
                for nh in nhs {
                    hops.extend(gateway(nh)?);
                }
            }
            None => hops.extend(gateway(route)?),
        }
    }
    Ok(hops)
}

/// The gateway of a route or next hop: `gateway`, or `via.host` for a next
/// hop of the other family; `None` for a route through a device only.
fn gateway(v: &Value) -> Result<Option<IpAddr>> {
    let text = v.get("gateway").and_then(Value::as_str).or_else(|| {
        v.get("via")
            .and_then(|via| via.get("host"))
            .and_then(Value::as_str)
    });
    text.map(|t| t.parse().with_context(|| format!("bad gateway {t:?}")))
        .transpose()
}

/// Waits until the router routes every one of `want` exactly through its
/// next hops, and returns for each how long after `since` that was first
/// seen. Each prefix is dumped every few milliseconds (an `ip` run per
/// prefix and a [`POLL`]), so a time is late by at most that. Fails after
/// `timeout` (from `since`), with what the router had then.
pub fn wait_routes(
    t: &Topology,
    want: &[Route],
    since: Instant,
    timeout: Duration,
) -> Result<Vec<Duration>> {
    let ns = t.router().ns();
    let mut took: Vec<Option<Duration>> = vec![None; want.len()];
    let mut seen = vec![BTreeSet::new(); want.len()];
    loop {
        for ((route, took), seen) in want.iter().zip(&mut took).zip(&mut seen) {
            if took.is_none() {
                *seen = nexthops(ns, &route.prefix)?;
                if *seen == route.via {
                    *took = Some(since.elapsed());
                }
            }
        }
        if took.iter().all(Option::is_some) {
            return Ok(took.into_iter().flatten().collect());
        }
        if since.elapsed() >= timeout {
            let pending: Vec<String> = want
                .iter()
                .zip(&took)
                .zip(&seen)
                .filter(|((_, took), _)| took.is_none())
                .map(|((r, _), seen)| format!("{}: want {:?}, have {seen:?}", r.prefix, r.via))
                .collect();
            bail!(
                "router routes not as expected within {timeout:?}: {}",
                pending.join("; ")
            );
        }
        thread::sleep(POLL);
    }
}

/// [`wait_routes`] for one prefix, timed from now.
pub fn wait_nexthops(
    t: &Topology,
    prefix: &str,
    expected: &BTreeSet<IpAddr>,
    timeout: Duration,
) -> Result<Duration> {
    let want = [Route {
        prefix: prefix.to_owned(),
        via: expected.clone(),
    }];
    let took = wait_routes(t, &want, Instant::now(), timeout)?;
    took.first()
        .copied()
        .context("wait_routes returned no time")
}
