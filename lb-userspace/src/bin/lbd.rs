//! lbd: the load balancer's controller. Loads and attaches the XDP program,
//! programs it from the configuration, keeps it in step with health checks.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::Parser;
use lb_userspace::{
    backend_role::{self, BackendConfig, Role},
    config::Config,
    daemon,
    dataplane::{self, AttachMode},
    instance_lock,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(version, about = "XDP L4 load balancer daemon")]
struct Args {
    /// Configuration file (TOML); see the README's configuration reference.
    /// A file with `role = "backend"` runs the backend role (decapsulation
    /// on a host behind the balancer; see the README's "Backend role").
    #[arg(long, short = 'c', conflicts_with_all = ["interface"])]
    config: Option<PathBuf>,
    /// Only validate the configuration and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// With --check: what reloading FILE would change for the lbd running
    /// --config (its state file and pinned data plane), per VIP with the
    /// share of ring slots that move. Nothing is applied.
    #[arg(long, requires = "check", value_name = "FILE")]
    diff: Option<PathBuf>,
    /// With --diff: print JSON for scripts.
    #[arg(long, requires = "diff")]
    json: bool,
    /// Remove the instance's pinned data plane (detaches the program) and its
    /// announce routes, and exit. In the backend role: also the VIPs lbd put
    /// on lo and its managed neighbour entries; the sysctls are restored.
    #[arg(long, requires = "config")]
    teardown: bool,
    /// Adopt a running data plane although this configuration changes its
    /// rings (another hash_seed or ring size): every flow without a
    /// connection-table entry moves. For a whole fleet changing together.
    #[arg(long, requires = "config")]
    accept_ring_change: bool,
    /// Without a configuration: attach to this interface and only count.
    #[arg(long, short = 'i', required_unless_present = "config")]
    interface: Option<String>,
    /// With --interface: native (driver), generic (skb) or auto.
    #[arg(long, default_value = "auto")]
    xdp_mode: AttachMode,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(path) = &args.config {
        match backend_role::role_of(path) {
            Ok(Role::Balancer) => {}
            Ok(Role::Backend) => return backend(path, &args),
            Err(e) => {
                eprintln!("lbd: {e}");
                return ExitCode::from(2);
            }
        }
        // Validation errors are for a person: file:line:col: field: why.
        let mut config = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("lbd: {e}");
                return ExitCode::from(2);
            }
        };
        if args.check {
            if let Some(new) = &args.diff {
                return diff(config, new, args.json);
            }
            println!("{}: ok ({} VIPs)", path.display(), config.vips.len());
            return ExitCode::SUCCESS;
        }
        // Before anything touches pins, the socket or sysctls.
        let lock = match instance_lock::acquire(Path::new(instance_lock::LOCK_DIR), &config.name) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("lbd: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        tracing::debug!(lock = %lock.path().display(), "instance lock held");
        if args.teardown {
            return report(teardown(&config));
        }
        config.accept_ring_change = args.accept_ring_change;
        let result = daemon::run(config);
        drop(lock);
        return report(result);
    }
    let interface = args.interface.clone().unwrap_or_default();
    report(run_bare(interface, args.xdp_mode))
}

/// `lbd --config FILE` where FILE says `role = "backend"`.
fn backend(path: &Path, args: &Args) -> ExitCode {
    let config = match BackendConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lbd: {e}");
            return ExitCode::from(2);
        }
    };
    let balancer_only = [
        (args.diff.is_some(), "--diff"),
        (args.accept_ring_change, "--accept-ring-change"),
    ];
    if let Some((_, flag)) = balancer_only.iter().find(|(given, _)| *given) {
        eprintln!(
            "lbd: {flag} is for a balancer; {} configures the backend role",
            path.display()
        );
        return ExitCode::from(2);
    }
    if args.check {
        println!(
            "{}: ok (backend role, {} VIPs)",
            path.display(),
            config.vips.len()
        );
        return ExitCode::SUCCESS;
    }
    let lock = match instance_lock::acquire(Path::new(instance_lock::LOCK_DIR), &config.name) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::debug!(lock = %lock.path().display(), "instance lock held");
    if args.teardown {
        return match backend_role::teardown::offline(&config) {
            Ok(done) => {
                println!("{}: {}", config.name, done.teardown);
                if done.errors.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => report(Err(e)),
        };
    }
    let result = backend_role::run(config);
    drop(lock);
    report(result)
}

/// `lbd --check --diff NEW`: validates NEW whole, then previews it.
fn diff(current: Config, new: &Path, json: bool) -> ExitCode {
    let new = match Config::load(new) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lbd: {e}");
            return ExitCode::from(2);
        }
    };
    match lb_userspace::controller::offline_diff(current, new) {
        Ok(d) if json => {
            println!("{}", serde_json::to_string(&d).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(d) => {
            print!(
                "{}",
                lb_userspace::cli::render::config_diff(&d, "would change")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lbd --teardown`: the VIPs withdrawn first (no router sends to a node
/// about to stop forwarding), then the data plane unpinned.
fn teardown(config: &Config) -> Result<()> {
    if let Some(a) = &config.announce {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(async {
                let routes = lb_userspace::announce::Routes::new(a).await?;
                let (_, removed) = routes.sync(&Default::default()).await?;
                println!("table {}: {} routes withdrawn", a.table, removed.len());
                anyhow::Ok(())
            })?;
    }
    let dir = lb_userspace::pinning::pin_dir(&config.name);
    let removed = lb_userspace::pinning::teardown(&dir)?;
    println!(
        "{}: {}",
        dir.display(),
        if removed { "removed" } else { "nothing pinned" }
    );
    Ok(())
}

fn report(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_bare(interface: String, mode: AttachMode) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(async move {
            // Handlers first: whoever reads the line below may signal at once.
            let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
            let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
            let mut usr1 =
                signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
            let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
            let mut ebpf = dataplane::load_balancer()?;
            let attached = dataplane::attach(&mut ebpf, &interface, mode)?;
            // A line on stdout that supervisors and tests can wait for.
            daemon::event(serde_json::json!({"event": "attached", "interface": attached.interface, "mode": attached.mode.to_string()}));
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = usr1.recv() => daemon::print_counters(&ebpf, "counters")?,
                    _ = hup.recv() => daemon::ignore_hangup(),
                }
            }
            attached.detach(&mut ebpf)?;
            daemon::print_counters(&ebpf, "final_counters")
        })
}
