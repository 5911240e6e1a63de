//! lbctl: the operator's client for a running lbd. Arguments, dispatch and
//! the exit code; the work is in `lb_userspace::cli`, whose documentation
//! states the exit-code policy (0 done, 1 refused or failed, 2 usage or lbd
//! unreachable).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{
    cli::{CliError, Lbctl, NodeAction, sysctl::Sysctl},
    sysctl::Role,
};

#[derive(Parser)]
#[command(
    version,
    about = "Control a running lbd",
    after_help = "Exit codes: 0 done, 1 refused by lbd (or a local operation failed), \
                  2 bad arguments or lbd unreachable."
)]
struct Cli {
    /// lbd's control socket.
    #[arg(long, global = true, default_value = "/run/lb/lb0.sock")]
    socket: PathBuf,
    /// Print the raw JSON answer.
    #[arg(long, global = true)]
    json: bool,
    /// Fleet mode: make the change only if the fleet's desired state is
    /// still at this revision (see `lbctl fleet status`); refused otherwise.
    #[arg(long, global = true, value_name = "REVISION")]
    if_revision: Option<i64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// VIPs and their backends with state, health and weight; against a
    /// backend (lbd in the backend role): its VIPs with what was
    /// decapsulated, drops by reason, second hops and sysctls.
    List,
    /// Add BACKEND (an IP address) to VIP (e.g. 198.18.100.1:80/tcp).
    AddBackend {
        vip: String,
        backend: String,
        /// 0..=65535; 0 drains.
        #[arg(long, default_value_t = 100)]
        weight: u32,
    },
    /// Remove BACKEND from VIP; its flows move to the other backends.
    RemoveBackend { vip: String, backend: String },
    /// Take BACKEND out of VIP's ring; its established flows stay.
    Drain { vip: String, backend: String },
    /// Put a drained BACKEND back into VIP's ring.
    Undrain { vip: String, backend: String },
    /// Change BACKEND's weight in VIP's ring (0..=65535; 0 drains).
    SetWeight {
        vip: String,
        backend: String,
        weight: u32,
        /// Move there in steps over this long (e.g. 60s, 10m): canary a new
        /// backend up, or bleed one off. Any other change to the backend
        /// stops the ramp where it is.
        #[arg(long)]
        over: Option<String>,
    },
    /// Read lbd's configuration file again and apply what changed (VIPs,
    /// backends, weights, modes, checks; on a backend its VIPs and GUE
    /// port), without a restart; a bad file changes nothing. Same as SIGHUP.
    Reload,
    /// What reloading FILE would change, per VIP, with the share of ring
    /// slots that would move; nothing is applied.
    Diff { file: PathBuf },
    /// Which backend CLIENT (ADDRESS:PORT) reaches through VIP, and why.
    Explain {
        vip: String,
        client: String,
        /// Ask about a new connection (a SYN) instead of a packet mid-stream.
        #[arg(long)]
        syn: bool,
    },
    /// Traffic per VIP and backend: rates over --interval seconds and totals.
    Stats {
        /// Seconds between the two samples the rates come from (more than 0,
        /// at most 3600).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Global data-plane counters (every verdict and reason).
    Counters,
    /// Live view of traffic per VIP and backend; q quits, p/b/f/n sort.
    Top,
    /// Add, remove or list VIPs.
    Vip {
        #[command(subcommand)]
        action: VipAction,
    },
    /// Detach and unpin the data plane, and stop lbd. A backend also
    /// removes the VIPs it put on lo and restores the sysctls.
    Teardown,
    /// This node in its fleet: drain or undrain it (withdraw or announce
    /// every VIP), or show what it announces and why.
    Node {
        #[command(subcommand)]
        action: NodeCmd,
    },
    /// Fleet mode (lbd with [fleet]): the desired state in etcd.
    Fleet {
        #[command(subcommand)]
        action: FleetCmd,
    },
    /// Data-plane debug events (new flows, drops) on lbd's stdout: on or off.
    Debug {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Kernel settings: current, recommended and why; apply; restore.
    /// Works on this host's network namespace directly (no lbd needed).
    Sysctl {
        #[command(subcommand)]
        action: SysctlAction,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Drained or not, the announce table, each VIP's announcement and why.
    Status,
    /// Withdraw every VIP (for maintenance); the data plane keeps
    /// forwarding whatever still arrives.
    Drain,
    /// Announce the VIPs again.
    Undrain,
}

#[derive(Subcommand)]
enum FleetCmd {
    /// Every live node: the revision it applied and its rings'
    /// fingerprints; nodes that disagree are flagged.
    Status,
    /// The fleet's desired state as [[vip]] sections of a configuration file.
    Export,
    /// FILE's VIPs and backends become the fleet's desired state (drains
    /// are cleared); every node applies them.
    Import { file: PathBuf },
}

#[derive(Subcommand)]
enum VipAction {
    /// Add VIP (e.g. 198.18.100.3:80/tcp) with no backends yet.
    Add {
        vip: String,
        /// ipip, gue or l2dsr.
        #[arg(long)]
        mode: String,
        /// none, tcp or http:/PATH.
        #[arg(long, default_value = "tcp")]
        check: String,
    },
    /// Remove VIP: its traffic goes to the kernel again.
    Remove { vip: String },
    /// VIPs and their backends (same as `lbctl list`).
    List,
}

#[derive(Subcommand)]
enum SysctlAction {
    /// Current against recommended values, with the reason for each.
    Show {
        #[arg(long, value_enum, default_value = "lb")]
        role: Role,
        /// The interface traffic arrives on: a backend's own rp_filter
        /// counts too (what lbd's backend role applies).
        #[arg(long)]
        interface: Option<String>,
    },
    /// Record the current values, then write the recommended ones.
    Apply {
        #[arg(long, value_enum, default_value = "lb")]
        role: Role,
        /// As for `show`.
        #[arg(long)]
        interface: Option<String>,
        /// Where the originals are recorded.
        #[arg(long)]
        backup: Option<PathBuf>,
    },
    /// Put back what `apply` recorded.
    Restore {
        #[arg(long, value_enum, default_value = "lb")]
        role: Role,
        #[arg(long)]
        backup: Option<PathBuf>,
    },
}

fn dispatch(cli: Cli) -> Result<(), CliError> {
    let lbd = Lbctl::new(cli.socket, cli.json).if_revision(cli.if_revision);
    match cli.cmd {
        Cmd::List
        | Cmd::Vip {
            action: VipAction::List,
        } => lbd.list(),
        Cmd::AddBackend {
            vip,
            backend,
            weight,
        } => lbd.add_backend(&vip, &backend, weight),
        Cmd::RemoveBackend { vip, backend } => lbd.remove_backend(&vip, &backend),
        Cmd::Drain { vip, backend } => lbd.drain(&vip, &backend, true),
        Cmd::Undrain { vip, backend } => lbd.drain(&vip, &backend, false),
        Cmd::SetWeight {
            vip,
            backend,
            weight,
            over,
        } => lbd.set_weight(&vip, &backend, weight, over.as_deref()),
        Cmd::Explain { vip, client, syn } => lbd.explain(&vip, &client, syn),
        Cmd::Reload => lbd.reload(),
        Cmd::Diff { file } => lbd.diff(&file),
        Cmd::Stats { interval } => lbd.stats(interval),
        Cmd::Counters => lbd.counters(),
        Cmd::Top => lbd.top(),
        Cmd::Vip {
            action: VipAction::Add { vip, mode, check },
        } => lbd.vip_add(&vip, &mode, &check),
        Cmd::Vip {
            action: VipAction::Remove { vip },
        } => lbd.vip_remove(&vip),
        Cmd::Teardown => lbd.teardown(),
        Cmd::Debug { state } => lbd.debug(state == "on"),
        Cmd::Node { action } => lbd.node(match action {
            NodeCmd::Status => NodeAction::Status,
            NodeCmd::Drain => NodeAction::Drain,
            NodeCmd::Undrain => NodeAction::Undrain,
        }),
        Cmd::Fleet { action } => match action {
            FleetCmd::Status => lbd.fleet_status(),
            FleetCmd::Export => lbd.fleet_export(),
            FleetCmd::Import { file } => lbd.fleet_import(&file),
        },
        Cmd::Sysctl { action } => sysctl(action, cli.json),
    }
}

fn sysctl(action: SysctlAction, json: bool) -> Result<(), CliError> {
    let host = Sysctl::host(json);
    match action {
        SysctlAction::Show { role, interface } => host.show(role, interface.as_deref()),
        SysctlAction::Apply {
            role,
            interface,
            backup,
        } => host.apply(role, interface.as_deref(), backup.as_deref()),
        SysctlAction::Restore { role, backup } => host.restore(role, backup.as_deref()),
    }
}

/// clap exits 2 on its own for arguments it refuses; everything else ends
/// here, with the code `CliError::exit_code` gives.
fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            eprintln!("lbctl: {:#}", anyhow::Error::from(e));
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn explain_takes_syn() {
        let cli = Cli::try_parse_from([
            "lbctl",
            "explain",
            "198.18.100.1:80/tcp",
            "198.18.0.10:40000",
            "--syn",
        ])
        .unwrap();
        assert!(matches!(cli.cmd, Cmd::Explain { syn: true, .. }));
    }

    #[test]
    fn clap_refusals_exit_2_like_ours() {
        for args in [
            &["lbctl", "frobnicate"][..],
            &["lbctl", "debug", "maybe"],
            &[
                "lbctl",
                "set-weight",
                "198.18.100.1:80/tcp",
                "198.18.0.20",
                "x",
            ],
        ] {
            let e = Cli::try_parse_from(args).err().unwrap();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
