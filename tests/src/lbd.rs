//! The real `lbd` in a topology's LB namespace: its configuration preamble,
//! start (until it reports ready) and stop (SIGTERM, final counters). The
//! control socket and state file always live in the caller's directory, so
//! no test or benchmark leaves files in /run/lb or /var/lib/lb.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::Result;

use crate::{Host, Spawned, Topology, launcher::lbd_path};

/// The `[instance]` and `[dataplane]` tables every harness lbd shares; the
/// caller appends its `[[vip]]` tables (and any other section).
#[derive(Debug, Clone, Copy)]
pub struct Preamble<'a> {
    /// `native`, `generic` or `auto`.
    pub xdp_mode: &'a str,
    /// `keep` (restart tests) or `detach`.
    pub on_exit: &'a str,
    pub conntrack_entries: u32,
    /// More `[instance]` lines, e.g. `metrics_listen = "..."\n`.
    pub instance_extra: &'a str,
}

impl Default for Preamble<'_> {
    fn default() -> Self {
        Self {
            xdp_mode: "generic",
            on_exit: "detach",
            conntrack_entries: 65536,
            instance_extra: "",
        }
    }
}

impl Preamble<'_> {
    /// For this topology's LB, with socket and state under `dir`.
    pub fn render(&self, t: &Topology, dir: &Path) -> String {
        self.render_for(t.lb(), &t.instance_name(), dir)
    }

    /// For LB host `lb` as instance `name` (the nodes of a fleet share one
    /// bpffs and /run, so each needs a name of its own).
    pub fn render_for(&self, lb: &Host, name: &str, dir: &Path) -> String {
        format!(
            "[instance]\nname = \"{name}\"\ninterface = \"{dev}\"\nxdp_mode = \"{mode}\"\non_exit = \"{on_exit}\"\n\
             api_socket = \"{d}/lbd.sock\"\nstate_file = \"{d}/state.json\"\n{extra}\
             [dataplane]\nmax_vips = 4\nmax_backends = 16\nconntrack_entries = {ct}\nencap_source_v4 = \"{src}\"\n",
            dev = lb.ifname(),
            mode = self.xdp_mode,
            on_exit = self.on_exit,
            d = dir.display(),
            extra = self.instance_extra,
            ct = self.conntrack_entries,
            src = lb.ipv4(),
        )
    }
}

/// One `[[vip.backend]]` per host, by IPv4 address.
pub fn backend_tables(hosts: &[Host]) -> String {
    hosts
        .iter()
        .map(|b| format!("[[vip.backend]]\naddress = \"{}\"\n", b.ipv4()))
        .collect()
}

/// Starts `lbd --config config` in the LB namespace; returns it with its
/// `ready` line.
pub fn start(t: &Topology, config: &Path) -> Result<(Spawned, String)> {
    start_on(t, t.lb(), config)
}

/// [`start`] on LB host `lb` (a node of a fleet).
pub fn start_on(t: &Topology, lb: &Host, config: &Path) -> Result<(Spawned, String)> {
    let mut cmd = Command::new(lbd_path()?);
    cmd.arg("--config").arg(config);
    let mut lbd = t.spawn(lb.ns(), &mut cmd)?;
    let ready = lbd.wait_for_line(|l| l.contains("\"ready\""), Duration::from_secs(30))?;
    Ok((lbd, ready))
}

/// SIGTERM, then lbd's `final_counters` line and its exit status.
pub fn stop(lbd: &mut Spawned) -> Result<(String, Option<ExitStatus>)> {
    // SAFETY: plain kill(2) on a child the caller owns.
    if unsafe { libc::kill(lbd.pid() as i32, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let last = lbd.wait_for_line(|l| l.contains("final_counters"), Duration::from_secs(10))?;
    Ok((last, lbd.stop()))
}

/// Removes the pins of the lbd configured by the file it holds (lbd keeps
/// its data plane on exit, for the hitless restart), and the file's
/// directory, however the holder ends. With a namespace, `lbd --teardown`
/// runs in it, so an `[announce]` table is flushed there, not on the host.
pub struct Teardown {
    config: PathBuf,
    ns: Option<String>,
}

impl Teardown {
    pub fn new(config: PathBuf) -> Self {
        Teardown { config, ns: None }
    }

    pub fn in_netns(config: PathBuf, ns: &str) -> Self {
        Teardown {
            config,
            ns: Some(ns.to_owned()),
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Ok(lbd) = lbd_path() {
            let run = || {
                let _ = Command::new(&lbd)
                    .arg("--config")
                    .arg(&self.config)
                    .arg("--teardown")
                    .output();
            };
            match &self.ns {
                Some(ns) => {
                    let _ = crate::in_netns(ns, run);
                }
                None => run(),
            }
        }
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
