//! The real `lbd` in the backend role inside a topology's backend
//! namespaces: its configuration file, start (until it reports ready),
//! changes to the VIPs it serves (the file rewritten, then a reload, as an
//! operator does) and teardown however the holder ends. The control socket,
//! state file and sysctl backup live in a directory of the test's own.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use lb_userspace::{api::client, backend_role::status::BackendRoleStatus};

use crate::{Host, Spawned, Topology, launcher::lbd_path, lbd::Teardown};

/// How long a backend lbd may take to load, attach and say so.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What may differ between backend lbds; the rest follows the topology.
#[derive(Debug, Clone)]
pub struct Options {
    /// `native`, `generic` or `auto`.
    pub xdp_mode: String,
    /// `detach` (tests leave nothing behind) or `keep` (restart tests).
    pub on_exit: String,
    /// `[sysctl] apply`.
    pub sysctl_apply: bool,
    /// `instance.metrics_listen`, inside the backend's namespace.
    pub metrics_listen: Option<String>,
    /// `decap.gue_port`; `None`: the default.
    pub gue_port: Option<u16>,
    /// `decap.second_hops`; `None`: not set (the interface's prefixes).
    pub second_hops: Option<Vec<String>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            xdp_mode: "generic".into(),
            on_exit: "detach".into(),
            sysctl_apply: true,
            metrics_listen: None,
            gue_port: None,
            second_hops: None,
        }
    }
}

/// One backend lbd's files: enough to write its configuration again with
/// other VIPs and have it reload.
#[derive(Debug, Clone)]
pub struct RoleFiles {
    pub name: String,
    pub ns: String,
    pub interface: String,
    pub dir: PathBuf,
    pub options: Options,
}

impl RoleFiles {
    pub fn config(&self) -> PathBuf {
        self.dir.join("backend.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("lbd.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Where lbd keeps the sysctl originals.
    pub fn sysctl_backup(&self) -> PathBuf {
        self.dir.join(format!("{}.sysctl-backup.json", self.name))
    }

    /// The configuration file for these VIPs.
    pub fn render(&self, vips: &[IpAddr]) -> String {
        let o = &self.options;
        let list: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
        let mut text = format!(
            "role = \"backend\"\n[instance]\nname = \"{name}\"\ninterface = \"{dev}\"\n\
             xdp_mode = \"{mode}\"\non_exit = \"{on_exit}\"\napi_socket = \"{socket}\"\n\
             state_file = \"{state}\"\n",
            name = self.name,
            dev = self.interface,
            mode = o.xdp_mode,
            on_exit = o.on_exit,
            socket = self.socket().display(),
            state = self.state_file().display(),
        );
        if let Some(m) = &o.metrics_listen {
            text.push_str(&format!("metrics_listen = \"{m}\"\n"));
        }
        text.push_str("[decap]\n");
        if let Some(p) = o.gue_port {
            text.push_str(&format!("gue_port = {p}\n"));
        }
        if let Some(list) = &o.second_hops {
            let list: Vec<String> = list.iter().map(|p| format!("\"{p}\"")).collect();
            text.push_str(&format!("second_hops = [{}]\n", list.join(", ")));
        }
        text.push_str(&format!(
            "vips = [{}]\n[sysctl]\napply = {}\n",
            list.join(", "),
            o.sysctl_apply
        ));
        text
    }

    /// Writes the configuration for `vips`.
    pub fn write(&self, vips: &[IpAddr]) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::write(self.config(), self.render(vips))
            .with_context(|| format!("writing {}", self.config().display()))
    }

    /// Serves exactly `vips` from now on: the file rewritten, then
    /// `POST /v1/reload` (what `lbctl reload` sends).
    pub fn serve(&self, vips: &[IpAddr]) -> Result<()> {
        self.write(vips)?;
        let (status, answer) = client::call(&self.socket(), "POST", "/v1/reload", None)
            .with_context(|| format!("reloading {}", self.name))?;
        if status != 200 {
            bail!("{}: reload refused ({status}): {answer}", self.name);
        }
        Ok(())
    }

    /// `GET /v1/vips`: what `lbctl list` shows.
    pub fn status(&self) -> Result<BackendRoleStatus> {
        let (status, answer) = client::call(&self.socket(), "GET", "/v1/vips", None)
            .with_context(|| format!("asking {} for its status", self.name))?;
        if status != 200 {
            bail!("{}: status refused ({status}): {answer}", self.name);
        }
        serde_json::from_value(answer).with_context(|| format!("{}: status", self.name))
    }
}

/// A running backend lbd. Dropping it stops lbd (with `on_exit = "detach"`
/// it undoes everything), then runs `lbd --teardown` in its namespace and
/// removes its directory, however the test ended.
pub struct BackendLbd {
    // Stopped first, then torn down.
    pub lbd: Spawned,
    pub files: RoleFiles,
    _teardown: Teardown,
}

impl BackendLbd {
    /// The files of backend `host` as instance `name`, in a directory of
    /// this topology's.
    pub fn files(t: &Topology, host: &Host, name: &str, options: Options) -> RoleFiles {
        RoleFiles {
            name: name.to_owned(),
            ns: host.ns().to_owned(),
            interface: host.ifname().to_owned(),
            dir: std::env::temp_dir().join(format!("{}-{name}", t.id())),
            options,
        }
    }

    /// Writes the configuration and starts lbd in the backend's namespace;
    /// [`BackendLbd::wait_ready`] waits for it.
    pub fn spawn(t: &Topology, files: RoleFiles, vips: &[IpAddr]) -> Result<BackendLbd> {
        files.write(vips)?;
        let teardown = Teardown::in_netns(files.config(), &files.ns);
        let mut cmd = Command::new(lbd_path()?);
        cmd.arg("--config").arg(files.config());
        let lbd = t.spawn(&files.ns, &mut cmd)?;
        Ok(BackendLbd {
            lbd,
            files,
            _teardown: teardown,
        })
    }

    /// lbd's `ready` line.
    pub fn wait_ready(&mut self) -> Result<String> {
        self.lbd
            .wait_for_line(|l| l.contains("\"ready\""), READY_TIMEOUT)
            .with_context(|| format!("backend lbd {}", self.files.name))
    }

    /// [`BackendLbd::spawn`] and [`BackendLbd::wait_ready`].
    pub fn start(t: &Topology, files: RoleFiles, vips: &[IpAddr]) -> Result<(BackendLbd, String)> {
        let mut b = BackendLbd::spawn(t, files, vips)?;
        let ready = b.wait_ready()?;
        Ok((b, ready))
    }

    /// SIGTERM, then lbd's `final_counters` line and its exit status;
    /// with `on_exit = "keep"` decapsulation goes on without it.
    pub fn stop(&mut self) -> Result<(String, Option<std::process::ExitStatus>)> {
        crate::lbd::stop(&mut self.lbd)
    }

    /// Starts lbd again with the same file (after [`BackendLbd::stop`]),
    /// until ready: its `ready` line.
    pub fn start_again(&mut self, t: &Topology) -> Result<String> {
        let mut cmd = Command::new(lbd_path()?);
        cmd.arg("--config").arg(self.files.config());
        self.lbd = t.spawn(&self.files.ns, &mut cmd)?;
        self.wait_ready()
    }

    pub fn socket(&self) -> PathBuf {
        self.files.socket()
    }

    pub fn config(&self) -> PathBuf {
        self.files.config()
    }

    pub fn dir(&self) -> &Path {
        &self.files.dir
    }
}

/// The VIPs a topology's backends serve, and the backend lbds that serve
/// them once [`crate::fabric::prepare`] started them (before that, and
/// without a fabric, the topology puts them on `lo` itself).
#[derive(Debug, Default)]
pub struct BackendVips {
    pub vips: Vec<IpAddr>,
    pub served_by: Vec<RoleFiles>,
}
