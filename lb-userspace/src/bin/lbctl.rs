//! lbctl: the operator's client for a running lbd.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    api::client::call,
    config::VipSpec,
    metrics::VipTraffic,
    sysctl::{Role, Sysctls},
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(version, about = "Control a running lbd")]
struct Cli {
    /// lbd's control socket.
    #[arg(long, global = true, default_value = "/run/lb/lb0.sock")]
    socket: PathBuf,
    /// Print the raw JSON answer.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// VIPs and their backends with state, health and weight.
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
    /// Change BACKEND's weight in VIP's ring.
    SetWeight {
        vip: String,
        backend: String,
        weight: u32,
    },
    /// Which backend CLIENT (ADDRESS:PORT) reaches through VIP, and why.
    Explain { vip: String, client: String },
    /// Traffic per VIP and backend: rates over --interval seconds and totals.
    Stats {
        /// Seconds between the two samples the rates come from.
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
    /// Detach and unpin the data plane, and stop lbd.
    Teardown,
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
enum VipAction {
    /// Add VIP (e.g. 198.18.100.3:80/tcp) with no backends yet.
    Add {
        vip: String,
        /// ipip or l2dsr.
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
    },
    /// Record the current values, then write the recommended ones.
    Apply {
        #[arg(long, value_enum, default_value = "lb")]
        role: Role,
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

fn default_backup(role: Role) -> PathBuf {
    PathBuf::from(match role {
        Role::Lb => "/var/lib/lb/sysctl-lb.backup.json",
        Role::Backend => "/var/lib/lb/sysctl-backend.backup.json",
    })
}

fn sysctl(action: &SysctlAction, json_out: bool) -> Result<()> {
    let s = Sysctls::new("/proc/sys");
    let rows = match action {
        SysctlAction::Show { role } => s.show(*role),
        SysctlAction::Apply { role, backup } => s.apply(
            *role,
            &backup.clone().unwrap_or_else(|| default_backup(*role)),
        )?,
        SysctlAction::Restore { role, backup } => {
            let restored = s.restore(&backup.clone().unwrap_or_else(|| default_backup(*role)))?;
            if json_out {
                println!("{}", json!({ "restored": restored }));
            } else {
                for (k, v) in restored {
                    println!("{k} = {v}");
                }
            }
            return Ok(());
        }
    };
    if json_out {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!("{:<36} {:<16} {:<16} why", "key", "current", "recommended");
    for r in rows {
        let current = r.current.unwrap_or_else(|| "(absent)".into());
        let mark = if r.ok { " " } else { "*" };
        println!(
            "{mark}{:<35} {:<16} {:<16} {}",
            r.key, current, r.recommended, r.why
        );
    }
    Ok(())
}

/// Checks arguments before anything is sent, with the same messages as the
/// configuration and the API.
fn check_vip(vip: &str) -> Result<()> {
    vip.parse::<VipSpec>()?;
    Ok(())
}

fn check_backend(b: &str) -> Result<()> {
    if b.parse::<std::net::IpAddr>().is_err() {
        bail!("backend {b:?} is not an IP address (expected e.g. 198.18.0.20 or fd00:198:18::20)");
    }
    Ok(())
}

fn request(cmd: &Cmd) -> Result<(&'static str, &'static str, Option<Value>)> {
    Ok(match cmd {
        Cmd::List => ("GET", "/v1/vips", None),
        Cmd::Counters => ("GET", "/v1/counters", None),
        Cmd::Stats { .. } => ("GET", "/v1/stats", None),
        Cmd::AddBackend {
            vip,
            backend,
            weight,
        }
        | Cmd::SetWeight {
            vip,
            backend,
            weight,
        } => {
            check_vip(vip)?;
            check_backend(backend)?;
            let path = match cmd {
                Cmd::AddBackend { .. } => "/v1/backends/add",
                _ => "/v1/backends/weight",
            };
            (
                "POST",
                path,
                Some(json!({"vip": vip, "backend": backend, "weight": weight})),
            )
        }
        Cmd::RemoveBackend { vip, backend }
        | Cmd::Drain { vip, backend }
        | Cmd::Undrain { vip, backend } => {
            check_vip(vip)?;
            check_backend(backend)?;
            let path = match cmd {
                Cmd::RemoveBackend { .. } => "/v1/backends/remove",
                Cmd::Drain { .. } => "/v1/backends/drain",
                _ => "/v1/backends/undrain",
            };
            ("POST", path, Some(json!({"vip": vip, "backend": backend})))
        }
        Cmd::Sysctl { .. } => bail!("sysctl runs locally"),
        Cmd::Teardown => ("POST", "/v1/teardown", None),
        Cmd::Debug { state } => ("POST", "/v1/debug", Some(json!({"enabled": state == "on"}))),
        Cmd::Top => bail!("top runs its own loop"),
        Cmd::Vip {
            action: VipAction::List,
        } => ("GET", "/v1/vips", None),
        Cmd::Vip {
            action: VipAction::Add { vip, mode, check },
        } => {
            check_vip(vip)?;
            if !matches!(mode.as_str(), "ipip" | "l2dsr") {
                bail!("mode {mode:?}: expected ipip or l2dsr");
            }
            (
                "POST",
                "/v1/vips/add",
                Some(json!({"vip": vip, "mode": mode, "check": check})),
            )
        }
        Cmd::Vip {
            action: VipAction::Remove { vip },
        } => {
            check_vip(vip)?;
            ("POST", "/v1/vips/remove", Some(json!({"vip": vip})))
        }
        Cmd::Explain { vip, client } => {
            check_vip(vip)?;
            if client.parse::<std::net::SocketAddr>().is_err() {
                bail!(
                    "client {client:?} is not ADDRESS:PORT (e.g. 198.18.0.10:40000 or [fd00::10]:40000)"
                );
            }
            (
                "POST",
                "/v1/explain",
                Some(json!({"vip": vip, "client": client})),
            )
        }
    })
}

fn print_human(cmd: &Cmd, v: &Value) {
    match cmd {
        Cmd::List
        | Cmd::Vip {
            action: VipAction::List,
        } => {
            for vip in v.as_array().into_iter().flatten() {
                println!(
                    "{} ({})",
                    vip["vip"].as_str().unwrap_or("?"),
                    vip["mode"].as_str().unwrap_or("?")
                );
                for b in vip["backends"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<40} {:<9} health={:<5} weight={}",
                        b["address"].as_str().unwrap_or("?"),
                        b["state"].as_str().unwrap_or("?"),
                        b["health"].as_str().unwrap_or("?"),
                        b["weight"]
                    );
                }
            }
        }
        Cmd::Explain { .. } => {
            let backend = v["backend"].as_str().unwrap_or("none");
            println!(
                "{} -> {backend}: {}",
                v["client"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("")
            );
        }
        Cmd::Counters => {
            for (k, n) in v.as_object().into_iter().flatten() {
                println!("{k:<32} {n}");
            }
        }
        _ => println!("ok"),
    }
}

/// Two samples `interval` apart: rates and totals.
fn stats(socket: &std::path::Path, interval: f64, json_out: bool) -> Result<()> {
    if !(interval > 0.0 && interval <= 3600.0) {
        bail!("--interval must be between 0 and 3600 seconds");
    }
    let sample = || -> Result<Vec<VipTraffic>> {
        let (status, v) = call(socket, "GET", "/v1/stats", None)?;
        if status != 200 {
            bail!("{}", v["error"].as_str().unwrap_or("request failed"));
        }
        Ok(serde_json::from_value(v)?)
    };
    let a = sample()?;
    std::thread::sleep(std::time::Duration::from_secs_f64(interval));
    let b = sample()?;
    let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / interval;
    let mut rows = Vec::new();
    for v in &b {
        let before = a.iter().find(|p| p.vip == v.vip);
        let (p0, b0, n0) = before.map_or((v.packets, v.bytes, v.new_flows), |p| {
            (p.packets, p.bytes, p.new_flows)
        });
        rows.push(json!({
            "vip": v.vip, "pps": rate(p0, v.packets), "bps": 8.0 * rate(b0, v.bytes), "new_flows_per_s": rate(n0, v.new_flows),
            "packets": v.packets, "bytes": v.bytes, "new_flows": v.new_flows,
            "backends": v.backends.iter().map(|bk| {
                let prev = before.and_then(|p| p.backends.iter().find(|x| x.backend == bk.backend));
                let (p0, b0, n0) = prev.map_or((bk.packets, bk.bytes, bk.new_flows), |x| (x.packets, x.bytes, x.new_flows));
                json!({
                    "backend": bk.backend, "state": bk.state, "weight": bk.weight,
                    "pps": rate(p0, bk.packets), "bps": 8.0 * rate(b0, bk.bytes), "new_flows_per_s": rate(n0, bk.new_flows),
                    "packets": bk.packets, "bytes": bk.bytes, "new_flows": bk.new_flows,
                })
            }).collect::<Vec<_>>(),
        }));
    }
    if json_out {
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<44} {:>10} {:>12} {:>10} {:>14} {:>16}",
        "vip / backend", "pps", "bps", "flows/s", "packets", "bytes"
    );
    for r in &rows {
        println!(
            "{:<44} {:>10.1} {:>12.0} {:>10.1} {:>14} {:>16}",
            r["vip"].as_str().unwrap_or("?"),
            r["pps"].as_f64().unwrap_or(0.0),
            r["bps"].as_f64().unwrap_or(0.0),
            r["new_flows_per_s"].as_f64().unwrap_or(0.0),
            r["packets"],
            r["bytes"]
        );
        for b in r["backends"].as_array().into_iter().flatten() {
            println!(
                "  {:<32} {:<9} {:>10.1} {:>12.0} {:>10.1} {:>14} {:>16}",
                b["backend"].as_str().unwrap_or("?"),
                b["state"].as_str().unwrap_or("?"),
                b["pps"].as_f64().unwrap_or(0.0),
                b["bps"].as_f64().unwrap_or(0.0),
                b["new_flows_per_s"].as_f64().unwrap_or(0.0),
                b["packets"],
                b["bytes"]
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Top = &cli.cmd {
        return match lb_userspace::top::run(&cli.socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbctl: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Cmd::Stats { interval } = &cli.cmd {
        return match stats(&cli.socket, *interval, cli.json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbctl: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Cmd::Sysctl { action } = &cli.cmd {
        return match sysctl(action, cli.json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbctl: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = request(&cli.cmd)
        .and_then(|(method, path, body)| call(&cli.socket, method, path, body.as_ref()));
    match result {
        Ok((200, v)) => {
            if cli.json {
                println!("{v}");
            } else {
                print_human(&cli.cmd, &v);
            }
            ExitCode::SUCCESS
        }
        Ok((status, v)) => {
            if cli.json {
                println!("{v}");
            }
            eprintln!(
                "lbctl: {} (HTTP {status})",
                v["error"].as_str().unwrap_or("request failed")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
