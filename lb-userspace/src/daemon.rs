//! lbd's main loop: one task owns the controller and applies, one at a
//! time and in order, control requests, health events, next-hop changes and
//! scrapes. It never waits on the network: next hops are resolved in tasks
//! of their own (a backend that never answers ARP costs its resolver task
//! seconds, not everyone else), and their results come back as messages.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::json;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Interval,
};

use crate::{
    announce::{self, Routes},
    api::{
        self,
        handler::{Handled, SideEffects},
        server::ApiCall,
    },
    config::Config,
    controller::{Controller, HealthTarget, NewBackend, RESOLVE_TIMEOUT, persist},
    fleet::node::{FleetMsg, FleetNode},
    graphite,
    health::{self, CheckStats, HealthEvent},
    membership::FlapEvent,
    metrics,
    neigh::{self, NextHop, Resolver},
    pinning,
    stats::{self, TableCount},
    sysctl,
};

/// How often the connection table is counted for `lb_conntrack_entries`: a
/// scan of the mapped heads costs milliseconds per million slots, on a
/// blocking thread.
const CONNTRACK_COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Next hops are looked at again when netlink reports a change (at most
/// once a second), and every this many seconds regardless, in case an
/// event was lost.
const NEXT_HOP_REFRESH_TICKS: u32 = 10;

/// How often slow starts, weight ramps and flap holds are looked at: their
/// steps are a second or more apart, and each lands within this of its
/// time.
const STEP_TICK: Duration = Duration::from_millis(200);

/// How long one refresh waits for a neighbour it prompted: short, since the
/// old next hop keeps working meanwhile and the next round tries again.
const REFRESH_TIMEOUT: Duration = Duration::from_millis(100);

/// One line of JSON on stdout per event, for supervisors and tests.
pub fn event(v: serde_json::Value) {
    println!("{v}");
}

/// Prints the data plane's global counters as an event.
pub fn print_counters(ebpf: &aya::Ebpf, name: &str) -> Result<()> {
    let counters = stats::global_counters(ebpf)?;
    event(json!({"event": name, "counters": counters}));
    Ok(())
}

/// What a refresh of the network's view found: every backend's next hop,
/// and the interface's MTU.
struct Refreshed {
    hops: Vec<(IpAddr, Result<NextHop>)>,
    mtu: Result<u32>,
}

/// A backend whose next hop was resolved, with the request that added it.
struct Resolved {
    call: ApiCall,
    new: NewBackend,
    hop: Result<NextHop>,
}

/// A reload whose new backends' next hops were resolved, with the request
/// that asked for it (none for SIGHUP).
struct ReloadResolved {
    call: Option<ApiCall>,
    file: Config,
    hops: Vec<(IpAddr, Result<NextHop>)>,
}

/// The signals either role handles.
pub(crate) struct Signals {
    pub(crate) term: Signal,
    pub(crate) int: Signal,
    pub(crate) usr1: Signal,
    /// Reload the configuration file (as `lbctl reload`).
    pub(crate) hup: Signal,
}

impl Signals {
    /// Installed first: whoever reads the ready line may signal at once.
    pub(crate) fn install() -> Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            usr1: signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

/// Announcing VIPs: the routes, what is wanted of them (the announcer task
/// follows), and what it last wrote.
struct Announce {
    routes: Routes,
    want: watch::Sender<BTreeSet<IpAddr>>,
    installed: announce::Shared,
}

/// Everything the main loop holds besides the controller.
struct Daemon {
    /// Fleet mode: the desired state from etcd.
    fleet: Option<FleetNode>,
    announce: Option<Announce>,
    ctl: Controller,
    resolver: Resolver,
    checks: HashMap<u32, JoinHandle<()>>,
    check_stats: CheckStats,
    check_sockets: Arc<health::tcp::CheckSockets>,
    health_tx: mpsc::Sender<HealthEvent>,
    resolved_tx: mpsc::Sender<Resolved>,
    reload_tx: mpsc::Sender<ReloadResolved>,
    hops_tx: mpsc::Sender<Refreshed>,
    refresh_in_flight: Arc<AtomicBool>,
    conntrack_count: Arc<Mutex<Option<TableCount>>>,
    graphite: Option<(graphite::Pusher, String)>,
}

/// Runs lbd with a configuration until a signal or `lbctl teardown`.
pub fn run(config: Config) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_async(config))
}

/// What a start has changed so far, undone in reverse order when a later
/// step fails: a start either succeeds or leaves the machine as it was.
#[derive(Default)]
struct Undo {
    /// Directories created for the state file.
    created_dirs: Vec<PathBuf>,
    /// The control socket this lbd bound.
    socket: Option<PathBuf>,
    sysctls: Option<SysctlsBefore>,
    /// A fresh data plane's pins (an adopted one is left as it runs).
    pins: Option<PathBuf>,
    /// Announce routes to withdraw: after a failed start nothing supervises
    /// the data plane (a kept one still forwards what reaches it, but no
    /// health check takes a dead backend out), so the node stops attracting
    /// traffic; the fleet's other nodes take its flows on the same rings.
    routes: Option<Routes>,
}

/// Sysctl values before the profile was applied, and whether the backup
/// file is this start's.
struct SysctlsBefore {
    values: BTreeMap<String, String>,
    backup: PathBuf,
    backup_is_new: bool,
}

impl Undo {
    async fn run(self) {
        if let Some(dir) = &self.pins {
            pinning::discard(dir);
        }
        if let Some(r) = &self.routes {
            withdraw(r).await;
        }
        if let Some(before) = self.sysctls {
            match sysctl::Sysctls::new("/proc/sys").write_all(&before.values) {
                Ok(()) => tracing::info!("failed start: sysctls restored"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "failed start: restoring sysctls")
                }
            }
            if before.backup_is_new {
                let _ = std::fs::remove_file(&before.backup);
            }
        }
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
        persist::remove_dirs(&self.created_dirs);
    }
}

/// Where the sysctl originals are recorded: beside the state file (by
/// default /var/lib/lb/<name>.sysctl-backup.json).
pub fn sysctl_backup(config: &Config) -> PathBuf {
    config
        .state_file
        .with_file_name(format!("{}.sysctl-backup.json", config.name))
}

/// Applies the LB sysctl profile, if configured; returns what to restore
/// should the start fail later.
fn apply_sysctls(config: &Config) -> Option<SysctlsBefore> {
    if !config.sysctl_apply {
        return None;
    }
    let sysctls = sysctl::Sysctls::new("/proc/sys");
    let backup = sysctl_backup(config);
    let before = SysctlsBefore {
        values: sysctls.snapshot(sysctl::Role::Lb),
        backup_is_new: !backup.exists(),
        backup: backup.clone(),
    };
    // The originals are recorded once, for `lbctl sysctl restore --backup`.
    match sysctls.apply(sysctl::Role::Lb, &backup) {
        Ok(rows) => {
            tracing::info!(changed = rows.iter().filter(|r| r.ok).count(), backup = %backup.display(), "sysctl profile applied")
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "sysctl profile only partly applied")
        }
    }
    Some(before)
}

/// What reaches the main loop besides signals.
struct Inbox {
    api: mpsc::Receiver<ApiCall>,
    scrapes: mpsc::Receiver<oneshot::Sender<String>>,
    health: mpsc::Receiver<HealthEvent>,
    resolved: mpsc::Receiver<Resolved>,
    reloads: mpsc::Receiver<ReloadResolved>,
    hops: mpsc::Receiver<Refreshed>,
    fleet: Option<mpsc::Receiver<FleetMsg>>,
    graphite: Option<Interval>,
    /// Set by netlink events: next hops may have moved.
    dirty: Arc<AtomicBool>,
}

/// Everything up to the ready line. Every check is made and every socket
/// bound before the first change to the system; then sysctls; then the data
/// plane is loaded, programmed and attached. A failure undoes what was done,
/// in reverse order.
async fn start(config: Config) -> Result<(Daemon, Inbox)> {
    let mut undo = Undo::default();
    match start_with(config, &mut undo).await {
        Ok(started) => Ok(started),
        Err(e) => {
            undo.run().await;
            Err(e)
        }
    }
}

/// Deletes every announce route (best effort: the error is logged).
async fn withdraw(routes: &Routes) {
    match routes.sync(&BTreeSet::new()).await {
        Ok((_, removed)) if !removed.is_empty() => {
            tracing::info!(?removed, "VIPs withdrawn")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %format!("{e:#}"), "withdrawing the VIPs failed"),
    }
}

async fn start_with(config: Config, undo: &mut Undo) -> Result<(Daemon, Inbox)> {
    // Checks and sockets: nothing on the system changes yet.
    let routes = match &config.announce {
        Some(a) => Some(Routes::new(a).await?),
        None => None,
    };
    undo.routes = routes.clone();
    let listener = api::server::bind(&config.api_socket)?;
    undo.socket = Some(config.api_socket.clone());
    let metrics_listener = api::server::bind_metrics(config.metrics_listen).await?;
    undo.created_dirs = persist::probe(&config.state_file)?;
    let resolver = Resolver::new()?;
    let dirty = Arc::new(AtomicBool::new(false));
    neigh::watch(dirty.clone())?;
    let mut config = config;
    let fleet = crate::fleet::node::start(&mut config).await?;
    let plan = Controller::plan(config, &resolver, fleet.as_ref().map(|f| &f.3)).await?;
    // Then sysctls, then the data plane.
    undo.sysctls = apply_sysctls(plan.config());
    let mut ctl = Controller::apply(plan)?;
    if !ctl.adopted {
        undo.pins = Some(ctl.pin_dir().to_path_buf());
    }
    crate::debuglog::spawn(&mut ctl.ebpf)?;
    let (api_tx, api) = mpsc::channel(64);
    tokio::spawn(api::server::serve(listener, api_tx));
    let (scrape_tx, scrapes) = mpsc::channel::<oneshot::Sender<String>>(16);
    if let Some(listener) = metrics_listener {
        tokio::spawn(api::server::serve_metrics(listener, scrape_tx));
    }
    let (health_tx, health) = mpsc::channel(256);
    let (resolved_tx, resolved) = mpsc::channel(64);
    let (reload_tx, reloads) = mpsc::channel(4);
    let (hops_tx, hops) = mpsc::channel(4);
    let graphite_cfg = ctl.config().graphite.clone();
    let graphite = graphite_cfg
        .as_ref()
        .map(|g| tokio::time::interval(g.interval));
    let conntrack_count = count_conntrack_in_background(ctl.pin_dir().to_path_buf());
    let (fleet, fleet_rx) = match (fleet, ctl.config().fleet.clone()) {
        (Some((store, desired, revision, _)), Some(cfg)) => {
            ctl.enter_fleet_mode();
            ctl.agree_on_health(true, std::time::Instant::now());
            let (node, rx) = FleetNode::run(&cfg, store, desired, revision, &ctl);
            (Some(node), Some(rx))
        }
        _ => (None, None),
    };
    let announce = routes.map(|routes| {
        let (want, rx) = watch::channel(BTreeSet::new());
        Announce {
            installed: announce::spawn(routes.clone(), rx),
            routes,
            want,
        }
    });
    let mut d = Daemon {
        fleet,
        announce,
        resolver,
        checks: HashMap::new(),
        check_stats: CheckStats::default(),
        check_sockets: health::tcp::CheckSockets::new(),
        health_tx,
        resolved_tx,
        reload_tx,
        hops_tx,
        refresh_in_flight: Arc::new(AtomicBool::new(false)),
        conntrack_count,
        graphite: graphite_cfg.map(|g| {
            let pusher = graphite::Pusher::spawn_with_spool(g.clone(), &ctl.config().state_file);
            (pusher, g.prefix)
        }),
        ctl,
    };
    for t in d.ctl.health_targets() {
        d.start_check(t);
    }
    d.reannounce();
    let inbox = Inbox {
        api,
        scrapes,
        health,
        resolved,
        reloads,
        hops,
        fleet: fleet_rx,
        graphite,
        dirty,
    };
    Ok((d, inbox))
}

async fn run_async(config: Config) -> Result<()> {
    let mut signals = Signals::install()?;
    let socket = config.api_socket.clone();
    let (mut d, mut inbox) = start(config).await?;
    event(json!({
        "event": "ready",
        "interface": d.ctl.config().interface,
        "adopted": d.ctl.adopted,
        "api_socket": socket,
    }));
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    refresh.tick().await;
    let mut steps = tokio::time::interval(STEP_TICK);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.usr1.recv() => print_counters(&d.ctl.ebpf, "counters")?,
            _ = signals.hup.recv() => d.reload_on_signal(),
            Some(reply) = inbox.scrapes.recv() => {
                let _ = reply.send(d.scrape());
            }
            _ = tick(inbox.graphite.as_mut()) => d.push_graphite(),
            _ = steps.tick() => d.tick(),
            _ = refresh.tick() => {
                ticks = ticks.wrapping_add(1);
                if inbox.dirty.swap(false, Ordering::Relaxed) || ticks.is_multiple_of(NEXT_HOP_REFRESH_TICKS) {
                    d.refresh_next_hops();
                }
            }
            Some(r) = inbox.hops.recv() => d.on_refreshed(r),
            Some(call) = inbox.api.recv() => {
                if d.on_call(call).await {
                    break;
                }
            }
            Some(r) = inbox.resolved.recv() => {
                let (answer, fx) = api::handler::commit_backend(&mut d.ctl, r.new, r.hop);
                if d.answer(r.call, answer, fx).await {
                    break;
                }
            }
            Some(r) = inbox.reloads.recv() => {
                if d.on_reload_resolved(r).await {
                    break;
                }
            }
            Some(ev) = inbox.health.recv() => d.on_health(&ev),
            Some(msg) = recv(inbox.fleet.as_mut()) => {
                if d.on_fleet(msg).await {
                    break;
                }
            }
        }
    }
    for h in d.checks.into_values() {
        h.abort();
    }
    print_counters(&d.ctl.ebpf, "final_counters")?;
    let _ = std::fs::remove_file(&d.ctl.config().api_socket);
    // Keeping the data plane (a hitless restart) keeps its routes too: the
    // fleet sees no change. Detaching withdraws them first.
    if d.ctl.detaches_on_exit()
        && let Some(a) = &d.announce
    {
        withdraw(&a.routes).await;
    }
    d.ctl.shutdown()
}

/// SIGHUP without a configuration file to reload (`lbd --interface`):
/// logged, and never an exit.
pub fn ignore_hangup() {
    tracing::warn!("SIGHUP ignored: lbd runs without a configuration file");
    event(json!({"event": "sighup_ignored"}));
}

/// The next message of an optional channel; never, without one.
async fn recv<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next tick of an optional interval; never, without one.
async fn tick(interval: Option<&mut Interval>) {
    match interval {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Counts the connection table on a blocking thread, every few seconds:
/// scanning a few million slots takes milliseconds, more than the main loop
/// (or every scrape) should spend.
fn count_conntrack_in_background(pin_dir: std::path::PathBuf) -> Arc<Mutex<Option<TableCount>>> {
    let count: Arc<Mutex<Option<TableCount>>> = Arc::default();
    let out = count.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CONNTRACK_COUNT_INTERVAL);
        loop {
            tick.tick().await;
            let p = pin_dir.clone();
            match tokio::task::spawn_blocking(move || stats::conntrack_entries(&p)).await {
                Ok(Ok(n)) => {
                    if let Ok(mut c) = out.lock() {
                        *c = Some(n);
                    }
                }
                Ok(Err(e)) => tracing::warn!("counting the connection table: {e:#}"),
                Err(e) => tracing::warn!("counting the connection table: {e}"),
            }
        }
    });
    count
}

impl Daemon {
    /// Hands the announcer the addresses this node should announce now (it
    /// only wakes when the set changed).
    fn reannounce(&self) {
        if let Some(a) = &self.announce {
            let want = announce::addresses(&self.ctl.announcement());
            a.want.send_if_modified(|w| {
                if *w == want {
                    return false;
                }
                *w = want;
                true
            });
        }
    }

    /// What the announcer last wrote, if lbd announces.
    fn installed(&self) -> Option<announce::Installed> {
        self.announce
            .as_ref()
            .and_then(|a| a.installed.lock().ok().map(|i| i.clone()))
    }

    fn start_check(&mut self, t: HealthTarget) {
        let task = tokio::spawn(health::run(
            t.id,
            t.token,
            t.addr,
            t.check,
            t.initial,
            health::Checkers {
                events: self.health_tx.clone(),
                stats: self.check_stats.clone(),
                sockets: self.check_sockets.clone(),
            },
        ));
        self.checks.insert(t.id, task);
    }

    /// Stops a removed backend's check and forgets its statistics: a backend
    /// given its id later starts from zero.
    fn stop_check(&mut self, id: u32) {
        if let Some(h) = self.checks.remove(&id) {
            h.abort();
        }
        if let Ok(mut s) = self.check_stats.lock() {
            s.remove(&id);
        }
    }

    fn scrape(&self) -> String {
        let checks = self
            .check_stats
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        let n = self.conntrack_count.lock().ok().and_then(|c| *c);
        let node = self.ctl.node_status(self.installed().as_ref());
        let pushed = self.graphite.as_ref().map(|(p, _)| p.stats());
        metrics::render(&self.ctl.list(), &self.ctl.ebpf, &checks, n, &node, pushed)
            .unwrap_or_else(|e| format!("# lbd could not read its maps: {e:#}\n"))
    }

    fn push_graphite(&self) {
        if let Some((pusher, prefix)) = &self.graphite
            && let Ok(snap) = metrics::snapshot(&self.ctl.list(), &self.ctl.ebpf)
        {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            pusher.offer(graphite::lines(prefix, &snap, now));
        }
    }

    /// Re-resolves every backend's next hop in a task of its own (one
    /// neighbour dump for all of them); the result comes back to the loop.
    fn refresh_next_hops(&self) {
        if self.refresh_in_flight.swap(true, Ordering::Relaxed) {
            return;
        }
        let addrs = self.ctl.backend_addresses();
        let ifindex = self.ctl.ifindex();
        let (resolver, tx) = (self.resolver.clone(), self.hops_tx.clone());
        tokio::spawn(async move {
            let hops = resolver.resolve_many(&addrs, REFRESH_TIMEOUT).await;
            let mtu = resolver.mtu(ifindex).await;
            let _ = tx.send(Refreshed { hops, mtu }).await;
        });
    }

    fn on_refreshed(&mut self, r: Refreshed) {
        self.refresh_in_flight.store(false, Ordering::Relaxed);
        let changed = self.ctl.apply_next_hops(&r.hops);
        if changed > 0 {
            tracing::info!(changed, "next hops updated");
        }
        match r.mtu.and_then(|m| self.ctl.set_mtu(m)) {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "following the interface's MTU"),
        }
    }

    /// Handles one control request; true when lbd must exit.
    async fn on_call(&mut self, call: ApiCall) -> bool {
        let installed = self.installed();
        match api::handler::handle(&mut self.ctl, &call.request, installed.as_ref()) {
            Handled::Answer(answer, fx) => self.answer(call, answer, fx).await,
            Handled::Resolve(new) => {
                let (resolver, tx) = (self.resolver.clone(), self.resolved_tx.clone());
                tokio::spawn(async move {
                    let hop = resolver.resolve(new.addr, RESOLVE_TIMEOUT).await;
                    let _ = tx.send(Resolved { call, new, hop }).await;
                });
                false
            }
            Handled::Reload(file, addrs) => {
                self.resolve_for_reload(Some(call), file, addrs);
                false
            }
            handled => self.on_fleet_call(call, handled).await,
        }
    }

    /// The control API's fleet requests (the handler only routes them
    /// here in fleet mode).
    async fn on_fleet_call(&mut self, call: ApiCall, handled: Handled) -> bool {
        let Some(f) = &mut self.fleet else {
            let a = api::handler::err(409, "this lbd is not in fleet mode");
            return self.answer(call, a, SideEffects::default()).await;
        };
        let now = match handled {
            Handled::Fleet(change, if_revision) => f.change(&self.ctl, call, change, if_revision),
            Handled::FleetImport(file) => f.import(&self.ctl, call, &file),
            Handled::FleetStatus => {
                f.status(call);
                None
            }
            Handled::FleetExport => Some((call, f.export())),
            Handled::Answer(..) | Handled::Resolve(_) | Handled::Reload(..) => None,
        };
        match now {
            Some((call, a)) => self.answer(call, a, SideEffects::default()).await,
            None => false,
        }
    }

    /// A message from the fleet's tasks; true when lbd must exit.
    async fn on_fleet(&mut self, msg: FleetMsg) -> bool {
        let Some(f) = &mut self.fleet else {
            return false;
        };
        let mut answers = Vec::new();
        match msg {
            FleetMsg::Update(u) => f.update(&self.ctl, &self.resolver, u),
            FleetMsg::Resolved {
                revision,
                desired,
                hops,
            } => {
                let (fx, done) = f.apply(&mut self.ctl, &self.resolver, revision, *desired, hops);
                self.carry_out(fx);
                self.reannounce();
                answers = done;
            }
            FleetMsg::Written {
                call,
                change,
                result,
            } => answers.extend(f.written(&self.ctl, call, change, result)),
            FleetMsg::Views(views) => {
                for a in f.views(&mut self.ctl, views) {
                    tracing::warn!(vip = %a.vip, backend = %a.status.address, health = ?a.status.health, "backend health agreed by the fleet changed");
                    event(json!({
                        "event": "backend",
                        "vip": a.vip,
                        "backend": a.status.address,
                        "health": a.status.health,
                        "state": a.status.state,
                        "reason": "agreed by the fleet",
                    }));
                }
                self.reannounce();
            }
            FleetMsg::Status { call, result } => answers.push((
                call,
                match result {
                    Ok(s) => api::handler::ok(s),
                    Err(e) => api::handler::err(
                        503,
                        format!("etcd did not answer ({e:#}); this node keeps forwarding"),
                    ),
                },
            )),
        }
        for (call, a) in answers {
            if self.answer(call, a, SideEffects::default()).await {
                return true;
            }
        }
        false
    }

    /// SIGHUP: the configuration file read again and applied, as `lbctl
    /// reload`; a bad file is logged and changes nothing.
    fn reload_on_signal(&mut self) {
        let path = self.ctl.config().file.clone();
        tracing::info!(file = %path.display(), "SIGHUP: reloading the configuration");
        let planned = crate::config::Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|file| {
                let addrs = self.ctl.reload_needs(&file).map_err(|e| e.to_string())?;
                Ok((file, addrs))
            });
        match planned {
            Ok((file, addrs)) => self.resolve_for_reload(None, file, addrs),
            Err(e) => {
                tracing::error!(error = %e, "reload refused; nothing was changed");
                event(json!({"event": "reload", "ok": false, "error": e}));
            }
        }
    }

    /// Resolves a reload's new backends' next hops in a task of its own;
    /// the result comes back to the main loop, which applies the reload.
    fn resolve_for_reload(&self, call: Option<ApiCall>, file: Config, addrs: Vec<IpAddr>) {
        let (resolver, tx) = (self.resolver.clone(), self.reload_tx.clone());
        tokio::spawn(async move {
            let hops = if addrs.is_empty() {
                Vec::new()
            } else {
                resolver.resolve_many(&addrs, RESOLVE_TIMEOUT).await
            };
            let _ = tx.send(ReloadResolved { call, file, hops }).await;
        });
    }

    /// Applies a reload whose next hops are known; true when lbd must exit.
    async fn on_reload_resolved(&mut self, r: ReloadResolved) -> bool {
        let (answer, fx) = api::handler::commit_reload(&mut self.ctl, r.file, r.hops);
        let ok = answer.0 == 200;
        if ok {
            tracing::info!(changes = %answer.1["changes"], "configuration reloaded");
        } else {
            tracing::error!(error = %answer.1["error"], "reload refused");
        }
        event(json!({"event": "reload", "ok": ok, "result": answer.1}));
        match r.call {
            Some(call) => self.answer(call, answer, fx).await,
            None => {
                self.carry_out(fx);
                self.reannounce();
                false
            }
        }
    }

    /// Starts and stops the health checks a change asked for.
    fn carry_out(&mut self, fx: SideEffects) {
        for id in fx.stop_checks {
            self.stop_check(id);
        }
        for t in fx.start_checks {
            self.start_check(t);
        }
    }

    /// Answers a request and carries out its side effects; true when lbd
    /// must exit (after a teardown, once the answer is written).
    async fn answer(
        &mut self,
        call: ApiCall,
        answer: (u16, serde_json::Value),
        fx: SideEffects,
    ) -> bool {
        let teardown = fx.teardown;
        self.carry_out(fx);
        if answer.0 == 200 && call.request.method == "POST" {
            event(json!({"event": "admin", "path": call.request.path, "result": answer.1}));
        }
        self.reannounce();
        let _ = call.reply.send(answer);
        if teardown {
            self.ctl.detach_on_exit();
            let _ = tokio::time::timeout(Duration::from_secs(2), call.written).await;
            return true;
        }
        false
    }

    /// Every [`STEP_TICK`]: ramps step, flap holds end.
    fn tick(&mut self) {
        for (vip, backend, ev) in self.ctl.tick(std::time::Instant::now()) {
            match ev {
                FlapEvent::Released => {
                    tracing::info!(%vip, %backend, "flap hold over: the backend may serve again once its checks pass")
                }
                FlapEvent::Held(d) => {
                    tracing::warn!(%vip, %backend, hold_s = d.as_secs(), "still flapping: held down again, longer")
                }
            }
            event(
                json!({"event": "flap", "vip": vip, "backend": backend, "held": matches!(ev, FlapEvent::Held(_))}),
            );
        }
        self.reannounce();
    }

    fn on_health(&mut self, ev: &HealthEvent) {
        let applied = self.ctl.on_health(ev, std::time::Instant::now());
        self.reannounce();
        if let Some(f) = &self.fleet {
            f.report(&self.ctl);
        }
        match applied {
            Ok(Some(a)) if self.ctl.agreeing_on_health() => {
                tracing::info!(vip = %a.vip, backend = %a.status.address, health = ?ev.health, reason = %ev.reason, "this node's checks changed their view; the fleet decides");
            }
            Ok(Some(a)) => {
                let (vip, status) = (&a.vip, &a.status);
                tracing::warn!(%vip, backend = %status.address, health = ?ev.health, reason = %ev.reason, "backend health changed");
                event(json!({
                    "event": "backend",
                    "vip": vip,
                    "backend": status.address,
                    "health": ev.health,
                    "state": status.state,
                    "reason": ev.reason,
                }));
                if let Some(hold) = a.flap_hold {
                    tracing::warn!(%vip, backend = %status.address, changes = status.health_changes, hold_s = hold.as_secs(), "FLAPPING: health changed too often; held out of the ring");
                    event(
                        json!({"event": "flap", "vip": vip, "backend": status.address, "held": true}),
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "applying a health change failed")
            }
        }
    }
}
