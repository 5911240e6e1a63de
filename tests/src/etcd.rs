//! etcd for fleet-mode tests: a cluster of one or three members in a
//! namespace of the topology (the router's: every LB node reaches it), on
//! one address and a port pair each, their data in directories of their
//! own; killed and started again on the same data, as an outage does.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Spawned, Topology, in_netns};

/// Member `i` listens for clients on this port plus 10 x i, for peers on
/// the next one.
pub const CLIENT_PORT: u16 = 2379;

struct Member {
    name: String,
    process: Option<Spawned>,
}

pub struct Etcd {
    ns: String,
    addr: IpAddr,
    dir: PathBuf,
    members: Vec<Member>,
}

impl Etcd {
    /// Starts a one-member cluster in `ns` on `addr` and waits until it
    /// answers.
    pub fn start(t: &Topology, ns: &str, addr: IpAddr) -> Result<Etcd> {
        Etcd::start_cluster(t, ns, addr, 1)
    }

    /// Starts a cluster of `n` members and waits until every one listens.
    pub fn start_cluster(t: &Topology, ns: &str, addr: IpAddr, n: usize) -> Result<Etcd> {
        let dir = std::env::temp_dir().join(format!("{}-etcd", t.id()));
        std::fs::create_dir_all(&dir)?;
        let mut etcd = Etcd {
            ns: ns.to_owned(),
            addr,
            dir,
            members: (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    process: None,
                })
                .collect(),
        };
        for i in 0..n {
            etcd.spawn(t, i)?;
        }
        for i in 0..n {
            etcd.wait_listening(i)?;
        }
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    fn client(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.addr, CLIENT_PORT + 10 * i as u16)
    }

    fn peer_url(&self, i: usize) -> String {
        format!(
            "http://{}",
            SocketAddr::new(self.addr, CLIENT_PORT + 10 * i as u16 + 1)
        )
    }

    /// The client URLs, for `[fleet] endpoints` (a TOML array's items).
    pub fn endpoints(&self) -> String {
        (0..self.members.len())
            .map(|i| format!("\"http://{}\"", self.client(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn spawn(&mut self, t: &Topology, i: usize) -> Result<()> {
        let cluster = (0..self.members.len())
            .map(|k| format!("{}={}", self.members[k].name, self.peer_url(k)))
            .collect::<Vec<_>>()
            .join(",");
        let client = format!("http://{}", self.client(i));
        let peer = self.peer_url(i);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &self.members[i].name, "--data-dir"])
            .arg(self.dir.join(&self.members[i].name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--log-level", "warn", "--logger", "zap"]);
        self.members[i].process = Some(t.spawn(&self.ns, &mut cmd).context("starting etcd")?);
        Ok(())
    }

    fn wait_listening(&self, i: usize) -> Result<()> {
        let target = self.client(i);
        let started = Instant::now();
        loop {
            let up = in_netns(&self.ns, move || {
                TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("etcd member {i} did not listen on {target} within 15 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the cluster has a leader and answers on every member.
    fn wait_healthy(&self) -> Result<()> {
        let endpoints = (0..self.members.len())
            .map(|i| format!("http://{}", self.client(i)))
            .collect::<Vec<_>>()
            .join(",");
        let started = Instant::now();
        loop {
            let healthy = crate::cmd::run(
                Command::new("ip")
                    .args(["netns", "exec", &self.ns, "etcdctl", "endpoint", "health"])
                    .arg(format!("--endpoints={endpoints}"))
                    .env("ETCDCTL_API", "3"),
                Duration::from_secs(5),
            )
            .is_ok();
            if healthy {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("etcd ({endpoints}) not healthy within 20 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts member `i` again on its data (after [`Etcd::kill`]).
    pub fn resume(&mut self, t: &Topology, i: usize) -> Result<()> {
        self.spawn(t, i)?;
        self.wait_listening(i)
    }

    /// SIGKILL to member `i`: an outage.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            if let Ok(pid) = libc::pid_t::try_from(p.pid()) {
                // SAFETY: kill(2) on a child we own and have not reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            p.stop();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
