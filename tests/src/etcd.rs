//! etcd for fleet-mode tests: one member in a namespace of the topology
//! (the router's: every LB node reaches it), listening on one address,
//! its data in a directory of its own; killed and started again on the
//! same data, as an outage does.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Spawned, Topology, in_netns};

pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

pub struct Etcd {
    ns: String,
    addr: IpAddr,
    dir: PathBuf,
    process: Option<Spawned>,
}

impl Etcd {
    /// Starts a one-member cluster in `ns` on `addr` and waits until it
    /// answers.
    pub fn start(t: &Topology, ns: &str, addr: IpAddr) -> Result<Etcd> {
        let dir = std::env::temp_dir().join(format!("{}-etcd", t.id()));
        std::fs::create_dir_all(&dir)?;
        let mut etcd = Etcd {
            ns: ns.to_owned(),
            addr,
            dir,
            process: None,
        };
        etcd.resume(t)?;
        Ok(etcd)
    }

    /// The client URL, for `[fleet] endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", SocketAddr::new(self.addr, CLIENT_PORT))
    }

    /// Starts etcd again on its data (after [`Etcd::kill`]).
    pub fn resume(&mut self, t: &Topology) -> Result<()> {
        let peer = format!("http://{}", SocketAddr::new(self.addr, PEER_PORT));
        let client = self.endpoint();
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "m0", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("m0={peer}")])
            .args(["--log-level", "warn", "--logger", "zap"]);
        self.process = Some(t.spawn(&self.ns, &mut cmd).context("starting etcd")?);
        let target = SocketAddr::new(self.addr, CLIENT_PORT);
        let started = Instant::now();
        loop {
            let up = in_netns(&self.ns, move || {
                TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("etcd did not listen on {target} within 15 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: an outage.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
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
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
