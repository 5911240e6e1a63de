//! lbd: the load balancer's controller. Loads and attaches the XDP program,
//! programs it from the configuration, keeps it in step with health checks.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::Parser;
use lb_userspace::{
    api,
    config::Config,
    controller::Controller,
    dataplane::{self, AttachMode},
    health, instance_lock, stats,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

/// How often the connection table is counted for `lb_conntrack_entries`: a
/// scan of the mapped table costs tens of milliseconds per million slots, on
/// a blocking thread.
const CONNTRACK_COUNT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(version, about = "XDP L4 load balancer daemon")]
struct Args {
    /// Configuration file (TOML); see the README's configuration reference.
    #[arg(long, short = 'c', conflicts_with_all = ["interface"])]
    config: Option<PathBuf>,
    /// Only validate the configuration and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// Remove the instance's pinned data plane (detaches the program) and exit.
    #[arg(long, requires = "config")]
    teardown: bool,
    /// Without a configuration: attach to this interface and only count.
    #[arg(long, short = 'i', required_unless_present = "config")]
    interface: Option<String>,
    /// With --interface: native (driver), generic (skb) or auto.
    #[arg(long, default_value = "auto")]
    xdp_mode: AttachMode,
}

fn event(v: serde_json::Value) {
    println!("{v}");
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
        // Validation errors are for a person: file:line:col: field: why.
        let config = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("lbd: {e}");
                return ExitCode::from(2);
            }
        };
        if args.check {
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
            let dir = lb_userspace::pinning::pin_dir(&config.name);
            return report(lb_userspace::pinning::teardown(&dir).map(|removed| {
                println!(
                    "{}: {}",
                    dir.display(),
                    if removed { "removed" } else { "nothing pinned" }
                );
            }));
        }
        let result = run_config(config);
        drop(lock);
        return report(result);
    }
    let interface = args.interface.clone().unwrap_or_default();
    report(run_bare(interface, args.xdp_mode))
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_config(config: Config) -> Result<()> {
    runtime()?.block_on(async move {
        // Handlers first: whoever reads the ready line may signal at once.
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
        if config.sysctl_apply {
            // The LB profile; originals are recorded once, for
            // `lbctl sysctl restore --backup` (see the README).
            let backup = PathBuf::from(format!("/var/lib/lb/{}.sysctl-backup.json", config.name));
            match lb_userspace::sysctl::Sysctls::new("/proc/sys").apply(lb_userspace::sysctl::Role::Lb, &backup) {
                Ok(rows) => tracing::info!(changed = rows.iter().filter(|r| r.ok).count(), backup = %backup.display(), "sysctl profile applied"),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "sysctl profile only partly applied"),
            }
        }
        let listener = api::server::bind(&config.api_socket)?;
        let socket = config.api_socket.clone();
        let mut ctl = Controller::start(config).await?;
        lb_userspace::debuglog::spawn(&mut ctl.ebpf)?;
        let (api_tx, mut api_rx) = mpsc::channel(64);
        tokio::spawn(api::server::serve(listener, api_tx));
        // Neighbours change (a backend replaced, a router failed over):
        // netlink tells us; look again at most once a second, and every
        // 10 s regardless, in case an event was lost.
        let dirty = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        lb_userspace::neigh::watch(dirty.clone())?;
        let mut refresh = tokio::time::interval(std::time::Duration::from_secs(1));
        refresh.tick().await;
        let mut ticks = 0u32;
        let (tx, mut rx) = mpsc::channel(256);
        let check_stats = health::CheckStats::default();
        let (scrape_tx, mut scrape_rx) = mpsc::channel::<tokio::sync::oneshot::Sender<String>>(16);
        if let Some(addr) = ctl.config().metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding instance.metrics_listen {addr}"))?;
            tokio::spawn(api::server::serve_metrics(listener, scrape_tx));
        }
        let graphite = ctl.config().graphite.clone().map(|g| {
            let interval = tokio::time::interval(g.interval);
            (lb_userspace::graphite::Pusher::spawn(g.clone()), g.prefix, interval)
        });
        let (mut graphite_pusher, mut graphite_tick) = match graphite {
            Some((p, prefix, i)) => (Some((p, prefix)), Some(i)),
            None => (None, None),
        };
        // The connection table is counted in the background, on a blocking
        // thread, not per scrape: scanning a few million slots takes tens of
        // milliseconds, too long for the main loop.
        let conntrack_count: std::sync::Arc<std::sync::Mutex<Option<lb_userspace::stats::TableCount>>> = Default::default();
        {
            let (count, path) = (conntrack_count.clone(), ctl.pin_dir().to_path_buf());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(CONNTRACK_COUNT_INTERVAL);
                loop {
                    tick.tick().await;
                    let p = path.clone();
                    match tokio::task::spawn_blocking(move || lb_userspace::stats::conntrack_entries(&p)).await {
                        Ok(Ok(n)) => {
                            if let Ok(mut c) = count.lock() {
                                *c = Some(n);
                            }
                        }
                        Ok(Err(e)) => tracing::warn!("counting the connection table: {e:#}"),
                        Err(e) => tracing::warn!("counting the connection table: {e}"),
                    }
                }
            });
        }
        let mut checks: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
        for t in ctl.health_targets() {
            checks.insert(t.id, tokio::spawn(health::run(t.id, t.token, t.addr, t.check, tx.clone(), check_stats.clone(), t.initial)));
        }
        event(serde_json::json!({
            "event": "ready",
            "interface": ctl.config().interface,
            "adopted": ctl.adopted,
            "api_socket": socket,
        }));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr1.recv() => print_counters(&ctl.ebpf, "counters")?,
                Some(reply) = scrape_rx.recv() => {
                    let checks = check_stats.lock().map(|c| c.clone()).unwrap_or_default();
                    let n = conntrack_count.lock().ok().and_then(|c| *c);
                    let text = lb_userspace::metrics::render(&ctl.list(), &ctl.ebpf, &checks, n)
                        .unwrap_or_else(|e| format!("# lbd could not read its maps: {e:#}\n"));
                    let _ = reply.send(text);
                }
                _ = async {
                    match graphite_tick.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((pusher, prefix)) = graphite_pusher.as_mut()
                        && let Ok(snap) = lb_userspace::metrics::snapshot(&ctl.list(), &ctl.ebpf)
                    {
                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                        pusher.offer(lb_userspace::graphite::lines(prefix, &snap, now));
                    }
                }
                _ = refresh.tick() => {
                    ticks = ticks.wrapping_add(1);
                    let due = dirty.swap(false, std::sync::atomic::Ordering::Relaxed) || ticks.is_multiple_of(10);
                    if due && let Err(e) = ctl.refresh_next_hops().await {
                        tracing::error!(error = %format!("{e:#}"), "refreshing next hops failed");
                    }
                }
                Some(call) = api_rx.recv() => {
                    let (answer, fx) = api::handler::handle(&mut ctl, &call.request).await;
                    for id in &fx.stop_checks {
                        if let Some(h) = checks.remove(id) {
                            h.abort();
                        }
                    }
                    if let Some(t) = fx.start_check {
                        checks.insert(t.id, tokio::spawn(health::run(t.id, t.token, t.addr, t.check, tx.clone(), check_stats.clone(), t.initial)));
                    }
                    if answer.0 == 200 && call.request.method == "POST" {
                        event(serde_json::json!({"event": "admin", "path": call.request.path, "result": answer.1}));
                    }
                    let _ = call.reply.send(answer);
                    if fx.teardown {
                        ctl.detach_on_exit();
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), call.written).await;
                        break;
                    }
                }
                Some(ev) = rx.recv() => {
                    match ctl.on_health(&ev) {
                        Ok(Some((vip, status))) => {
                            tracing::warn!(%vip, backend = %status.address, health = ?ev.health, reason = %ev.reason, "backend health changed");
                            event(serde_json::json!({
                                "event": "backend",
                                "vip": vip,
                                "backend": status.address,
                                "health": ev.health,
                                "state": status.state,
                                "reason": ev.reason,
                            }));
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "applying a health change failed"),
                    }
                }
            }
        }
        for h in checks.into_values() {
            h.abort();
        }
        print_counters(&ctl.ebpf, "final_counters")?;
        let _ = std::fs::remove_file(&ctl.config().api_socket);
        ctl.shutdown()
    })
}

fn run_bare(interface: String, mode: AttachMode) -> Result<()> {
    runtime()?.block_on(async move {
        // Handlers first: whoever reads the line below may signal at once.
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
        let mut ebpf = dataplane::load_balancer()?;
        let attached = dataplane::attach(&mut ebpf, &interface, mode)?;
        // A line on stdout that supervisors and tests can wait for.
        event(serde_json::json!({"event": "attached", "interface": attached.interface, "mode": attached.mode.to_string()}));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr1.recv() => print_counters(&ebpf, "counters")?,
            }
        }
        attached.detach(&mut ebpf)?;
        print_counters(&ebpf, "final_counters")
    })
}

fn print_counters(ebpf: &aya::Ebpf, name: &str) -> Result<()> {
    let counters = stats::global_counters(ebpf)?;
    event(serde_json::json!({"event": name, "counters": counters}));
    Ok(())
}
