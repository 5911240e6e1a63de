//! lbd's main loop in the backend role: one task owns the data plane and
//! applies, in order, control requests, reloads, scrapes and second hops.
//!
//! Second hops: a GUE packet may name another backend to send it on to
//! when no local socket holds its flow. The program cannot look next hops
//! up itself (the kernel's FIB helper refuses on an interface that does not
//! forward, and a backend must not forward), so it reads them from
//! `DECAP_HOPS`, which lbd writes, and queues an address it finds no entry
//! for in `DECAP_NEIGH`. lbd has the kernel resolve such an address and
//! keep it resolved (a managed neighbour entry), writes its next hop, and
//! follows route and neighbour changes afterwards. Netlink work runs in
//! tasks of its own; results come back as messages.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, oneshot},
};

use super::{
    config::BackendConfig,
    dataplane::{self, Decap},
    host::{Host, LO, Presence},
    metrics,
    state::State,
    status::{
        BackendRoleStatus, DecapVipStatus, HopState, OnLo, ROLE, Reloaded, SecondHop, SecondHops,
        SysctlStatus, TornDown, XdpStatus,
    },
    teardown,
};
use crate::{
    api::{self, handler::err, server::ApiCall},
    config::OnExit,
    daemon::event,
    neigh::{self, Lookup, Managed, NextHop, Resolver},
    sysctl::{self, Role, Sysctls},
};

/// How often `DECAP_NEIGH` is read: a second hop without a neighbour entry
/// drops its packets until the kernel has resolved it.
const NEIGH_POLL: Duration = Duration::from_millis(100);

/// A second hop the kernel was just asked about is not asked again for this
/// long (the data plane reports it on every packet until resolved).
const NEIGH_HOLD_OFF: Duration = Duration::from_secs(1);

/// At most this many second hops per poll.
const NEIGH_BATCH: usize = 64;

/// How long a request waits for the kernel to resolve new second hops: a
/// neighbour on the segment answers within a round trip, and until then
/// their packets are dropped.
const NEIGH_WAIT: Duration = Duration::from_millis(500);

/// A failure to reach one second hop is logged at most this often.
const NEIGH_WARN_EVERY: Duration = Duration::from_secs(60);

/// Known second hops are looked up again when netlink reports a change (at
/// most once per tick), and every this many ticks regardless.
const HOP_TICK: Duration = Duration::from_secs(1);
const HOP_REFRESH_TICKS: u32 = 10;

/// Runs lbd in the backend role until a signal or `lbctl teardown`.
pub fn run(config: BackendConfig) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_async(config))
}

struct Signals {
    term: Signal,
    int: Signal,
    usr1: Signal,
    hup: Signal,
}

impl Signals {
    /// Installed first: whoever reads the ready line may signal at once.
    fn install() -> Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            usr1: signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

/// What lbd last wrote to `DECAP_HOPS` for a second hop.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hop {
    Resolved(NextHop),
    /// Nothing written: the program queues it again.
    Unresolved(Option<(u32, IpAddr)>),
    /// Written as unreachable.
    NoRoute(String),
}

impl Hop {
    fn of(l: Lookup) -> Hop {
        match l {
            Lookup::Resolved(h) => Hop::Resolved(h),
            Lookup::Unresolved { ifindex, via } => Hop::Unresolved(Some((ifindex, via))),
            Lookup::NoRoute(why) => Hop::NoRoute(why),
        }
    }
}

/// Second hops the data plane asked about.
#[derive(Default)]
struct Hops {
    known: BTreeMap<IpAddr, Hop>,
    requests: u64,
    failures: u64,
    asking: bool,
    refreshing: bool,
    /// When each address was last asked about.
    asked: HashMap<IpAddr, Instant>,
    /// When a failure for each address was last logged.
    warned: HashMap<IpAddr, Instant>,
}

enum HopMsg {
    /// New second hops: each one's managed entry (or why not) and what the
    /// kernel knew of it after a short wait.
    Asked(Vec<(IpAddr, Result<Option<Managed>>)>, Result<Vec<Lookup>>),
    /// Known second hops looked up again.
    Refreshed(
        Vec<IpAddr>,
        Vec<(IpAddr, Result<Option<Managed>>)>,
        Result<Vec<Lookup>>,
    ),
}

struct Daemon {
    config: BackendConfig,
    decap: Decap,
    host: Host,
    resolver: Resolver,
    lo: u32,
    ifindex: u32,
    state: State,
    program_id: u32,
    hops: Hops,
    hops_tx: mpsc::Sender<HopMsg>,
}

struct Inbox {
    api: mpsc::Receiver<ApiCall>,
    scrapes: mpsc::Receiver<oneshot::Sender<String>>,
    hops: mpsc::Receiver<HopMsg>,
    /// Set by netlink events: next hops may have moved.
    dirty: Arc<AtomicBool>,
}

/// Sysctl values before the profile was applied, and whether the backup
/// file is this start's.
struct SysctlsBefore {
    values: std::collections::BTreeMap<String, String>,
    backup: PathBuf,
    backup_is_new: bool,
}

/// What a start has changed so far, undone in reverse order when a later
/// step fails: a start either succeeds or leaves the host as it was.
#[derive(Default)]
struct Undo {
    socket: Option<PathBuf>,
    /// The state file and what it held before (`None`: it did not exist).
    state: Option<(PathBuf, Option<Vec<u8>>)>,
    sysctls: Option<SysctlsBefore>,
    /// Addresses this start put on `lo`.
    lo: Option<(Host, u32, Vec<IpAddr>)>,
    /// A fresh data plane's pins (an adopted one keeps running).
    pins: Option<PathBuf>,
}

impl Undo {
    async fn run(self) {
        if let Some(dir) = &self.pins {
            dataplane::discard(dir);
        }
        if let Some((host, lo, added)) = &self.lo {
            for vip in added {
                if let Err(e) = host.remove_from_lo(*lo, *vip).await {
                    tracing::error!(error = %format!("{e:#}"), "failed start: removing a VIP from lo");
                }
            }
        }
        if let Some(before) = self.sysctls {
            match Sysctls::new("/proc/sys").write_all(&before.values) {
                Ok(()) => tracing::info!("failed start: sysctls restored"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "failed start: restoring sysctls")
                }
            }
            if before.backup_is_new {
                let _ = std::fs::remove_file(&before.backup);
            }
        }
        if let Some((path, before)) = &self.state {
            let _ = match before {
                Some(bytes) => std::fs::write(path, bytes),
                None => std::fs::remove_file(path),
            };
        }
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn run_async(config: BackendConfig) -> Result<()> {
    let mut signals = Signals::install()?;
    let mut undo = Undo::default();
    let (mut d, mut inbox) = match start(config, &mut undo).await {
        Ok(started) => started,
        Err(e) => {
            undo.run().await;
            return Err(e);
        }
    };
    let xdp = d.host.xdp(d.ifindex).await.ok().flatten();
    event(json!({
        "event": "ready",
        "role": ROLE,
        "instance": d.config.name,
        "interface": d.config.interface,
        "mode": xdp.map(|x| x.mode),
        "adopted": d.decap.adopted,
        "api_socket": d.config.api_socket,
        "vips": d.config.vips,
    }));
    let mut poll = tokio::time::interval(NEIGH_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut refresh = tokio::time::interval(HOP_TICK);
    let mut ticks = 0u32;
    let teardown_call = loop {
        tokio::select! {
            _ = signals.term.recv() => break None,
            _ = signals.int.recv() => break None,
            _ = signals.usr1.recv() => d.print_counters("counters"),
            _ = signals.hup.recv() => {
                tracing::info!(file = %d.config.file.display(), "SIGHUP: reloading the configuration");
                let _ = d.reload().await;
            }
            Some(reply) = inbox.scrapes.recv() => {
                let _ = reply.send(d.scrape().await);
            }
            Some(call) = inbox.api.recv() => {
                if let Some(call) = d.on_call(call).await {
                    break Some(call);
                }
            }
            _ = poll.tick() => d.poll_unresolved(),
            _ = refresh.tick() => {
                ticks = ticks.wrapping_add(1);
                if inbox.dirty.swap(false, Ordering::Relaxed) || ticks.is_multiple_of(HOP_REFRESH_TICKS) {
                    d.refresh_hops();
                }
            }
            Some(msg) = inbox.hops.recv() => d.on_hops(msg),
        }
    };
    d.print_counters("final_counters");
    let socket = d.config.api_socket.clone();
    let result = match teardown_call {
        Some(call) => {
            let done = d.teardown().await;
            event(json!({"event": "admin", "path": call.request.path, "result": &done}));
            let mut body = json!(done);
            let status = if done.errors.is_empty() {
                200
            } else {
                // lbctl shows a refusal's `error`.
                body["error"] = json!(done.teardown);
                500
            };
            let _ = call.reply.send((status, body));
            let _ = tokio::time::timeout(Duration::from_secs(2), call.written).await;
            Ok(())
        }
        None if d.config.on_exit == OnExit::Detach => {
            let done = d.teardown().await;
            tracing::info!(summary = %done.teardown, "on_exit = \"detach\": everything undone");
            if done.errors.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("teardown: {}", done.errors.join("; ")))
            }
        }
        None => {
            tracing::info!(pins = %d.decap.dir().display(), "exiting; decapsulation keeps running for the next lbd");
            d.state
                .save(&d.config.state_file)
                .context("saving the state file")
        }
    };
    let _ = std::fs::remove_file(&socket);
    result
}

async fn start(config: BackendConfig, undo: &mut Undo) -> Result<(Daemon, Inbox)> {
    // Checks and sockets first: nothing on the host changes yet.
    let listener = api::server::bind(&config.api_socket)?;
    undo.socket = Some(config.api_socket.clone());
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding instance.metrics_listen {addr}"))?,
        ),
        None => None,
    };
    let host = Host::new()?;
    let resolver = Resolver::new()?;
    let ifindex = host
        .ifindex(&config.interface)
        .await
        .context("instance.interface")?;
    let lo = host.ifindex(LO).await?;
    let mut state = State::load(&config.state_file)?;
    let dir = dataplane::pin_dir(&config.name);
    if let Some(was) = &state.interface
        && *was != config.interface
        && dataplane::is_attached(&dir)
    {
        bail!(
            "the running decapsulator of instance {} is attached to {was}, not to instance.interface \
             {}: run `lbd --teardown` with the file it was started with, or set the interface back",
            config.name,
            config.interface
        );
    }
    // Written now, unchanged, to find out early whether it can be.
    undo.state = Some((
        config.state_file.clone(),
        std::fs::read(&config.state_file).ok(),
    ));
    state
        .save(&config.state_file)
        .context("instance.state_file")?;

    // Then the host: sysctls, the VIPs on lo, then the data plane.
    undo.sysctls = apply_sysctls(&config);
    let added = put_on_lo(&host, lo, &config.vips, &mut state, &config).await;
    undo.lo = Some((
        host.clone(),
        lo,
        added.as_ref().map_or(Vec::new(), Clone::clone),
    ));
    added?;

    let mut decap = Decap::load(&dir)?;
    if !decap.adopted {
        undo.pins = Some(dir.clone());
    }
    decap.set_gue_port(config.gue_port)?;
    let serving = decap.vips()?;
    for vip in &config.vips {
        decap.add_vip(*vip)?;
    }
    for gone in serving.iter().filter(|v| !config.vips.contains(v)) {
        decap.remove_vip(*gone)?;
    }
    decap.attach(&config.interface, config.xdp_mode)?;
    let program_id = decap.program_id()?;
    match host.xdp(ifindex).await? {
        Some(x) if x.program_id == program_id => {
            tracing::info!(interface = %config.interface, mode = x.mode, adopted = decap.adopted, "decap attached");
        }
        other => bail!(
            "{} runs {} after attaching, not this lbd's decap (program {program_id})",
            config.interface,
            other.map_or_else(
                || "no XDP program".to_owned(),
                |x| format!("XDP program {}", x.program_id)
            )
        ),
    }
    // VIPs a previous lbd put on lo that are no longer configured: the
    // data plane no longer serves them.
    let stale: Vec<IpAddr> = state
        .lo_added
        .iter()
        .filter(|v| !config.vips.contains(v))
        .copied()
        .collect();
    take_off_lo(&host, lo, &stale, &mut state).await;
    state.interface = Some(config.interface.clone());
    state
        .save(&config.state_file)
        .context("instance.state_file")?;

    let (api_tx, api) = mpsc::channel(64);
    tokio::spawn(api::server::serve(listener, api_tx));
    let (scrape_tx, scrapes) = mpsc::channel::<oneshot::Sender<String>>(16);
    if let Some(listener) = metrics_listener {
        tokio::spawn(api::server::serve_metrics(listener, scrape_tx));
    }
    let (hops_tx, hops_rx) = mpsc::channel(4);
    // Second hops an earlier lbd resolved: looked up again at the first tick.
    let mut hops = Hops::default();
    for ip in decap.hops()? {
        hops.known.insert(ip, Hop::Unresolved(None));
    }
    let dirty = Arc::new(AtomicBool::new(!hops.known.is_empty()));
    neigh::watch(dirty.clone())?;
    let d = Daemon {
        config,
        decap,
        host,
        resolver,
        lo,
        ifindex,
        state,
        program_id,
        hops,
        hops_tx,
    };
    let inbox = Inbox {
        api,
        scrapes,
        hops: hops_rx,
        dirty,
    };
    Ok((d, inbox))
}

/// Applies the backend sysctl profile (this interface's `rp_filter`
/// included), if configured; returns what to restore should the start fail
/// later.
fn apply_sysctls(config: &BackendConfig) -> Option<SysctlsBefore> {
    if !config.sysctl_apply {
        return None;
    }
    let sysctls = Sysctls::new("/proc/sys");
    let settings = sysctl::profile_for(Role::Backend, Some(&config.interface));
    let backup = config.sysctl_backup();
    let before = SysctlsBefore {
        values: sysctls.snapshot_settings(&settings),
        backup_is_new: !backup.exists(),
        backup: backup.clone(),
    };
    // The originals are recorded once: a restart keeps the first ones.
    match sysctls.apply_settings(&settings, &backup) {
        Ok(rows) => tracing::info!(
            settings = rows.len(),
            backup = %backup.display(),
            "backend sysctl profile applied"
        ),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "backend sysctl profile only partly applied")
        }
    }
    Some(before)
}

/// Puts on `lo` each VIP that is not a local address yet, recording it in
/// the state file first (so that a crash cannot leave an address nobody
/// knows to remove). Returns the addresses added.
async fn put_on_lo(
    host: &Host,
    lo: u32,
    vips: &[IpAddr],
    state: &mut State,
    config: &BackendConfig,
) -> Result<Vec<IpAddr>> {
    let presence = host.presence(lo, vips).await?;
    let mut missing = Vec::new();
    for (vip, p) in vips.iter().zip(presence) {
        match p {
            Presence::Absent => missing.push(*vip),
            Presence::OnLo => {}
            Presence::Elsewhere if !state.lo_added.contains(vip) => tracing::warn!(
                %vip,
                "the VIP is already a local address on another interface or prefix; lbd leaves it \
                 there (an interface holding it answers ARP for it: only lo should)"
            ),
            Presence::Elsewhere => {}
        }
    }
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    state.lo_added.extend(missing.iter().copied());
    state.save(&config.state_file)?;
    let mut added = Vec::new();
    for vip in missing {
        match host.add_to_lo(lo, vip).await {
            Ok(true) => {
                tracing::info!(%vip, "VIP added to lo");
                added.push(vip);
            }
            Ok(false) => {
                // Someone else's after all (added since we looked).
                state.lo_added.remove(&vip);
            }
            Err(e) => {
                for v in &added {
                    let _ = host.remove_from_lo(lo, *v).await;
                    state.lo_added.remove(v);
                }
                state.lo_added.remove(&vip);
                let _ = state.save(&config.state_file);
                return Err(e);
            }
        }
    }
    state.save(&config.state_file)?;
    Ok(added)
}

/// Removes from `lo` those of `vips` this lbd (or an earlier one) added;
/// others are left alone. Failures are logged: the address stays recorded,
/// for the next try or the teardown.
async fn take_off_lo(host: &Host, lo: u32, vips: &[IpAddr], state: &mut State) -> Vec<IpAddr> {
    let mut removed = Vec::new();
    let ours: Vec<IpAddr> = vips
        .iter()
        .filter(|v| state.lo_added.contains(v))
        .copied()
        .collect();
    for vip in &ours {
        match host.remove_from_lo(lo, *vip).await {
            Ok(_) => {
                state.lo_added.remove(vip);
                tracing::info!(%vip, "VIP removed from lo");
                removed.push(*vip);
            }
            Err(e) => tracing::error!(%vip, error = %format!("{e:#}"), "removing a VIP from lo"),
        }
    }
    removed
}

/// The control API paths only a balancer serves, with the command that
/// sends each, for the refusal's message.
const BALANCER_ONLY: &[(&str, &str)] = &[
    ("/v1/backends/add", "add-backend"),
    ("/v1/backends/remove", "remove-backend"),
    ("/v1/backends/drain", "drain"),
    ("/v1/backends/undrain", "undrain"),
    ("/v1/backends/weight", "set-weight"),
    ("/v1/vips/add", "vip add"),
    ("/v1/vips/remove", "vip remove"),
    ("/v1/stats", "stats"),
    ("/v1/explain", "explain"),
    ("/v1/diff", "diff"),
    ("/v1/debug", "debug"),
    ("/v1/node", "node status"),
    ("/v1/node/drain", "node drain"),
    ("/v1/node/undrain", "node undrain"),
    ("/v1/fleet", "fleet status"),
    ("/v1/fleet/export", "fleet export"),
    ("/v1/fleet/import", "fleet import"),
];

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Status,
    Counters,
    Reload,
    Teardown,
    /// Answered as is.
    Refused(u16, String),
}

fn route(method: &str, path: &str, instance: &str, file: &str) -> Route {
    match (method, path) {
        ("GET", "/v1/vips") => Route::Status,
        ("GET", "/v1/counters") => Route::Counters,
        ("POST", "/v1/reload") => Route::Reload,
        ("POST", "/v1/teardown") => Route::Teardown,
        (_, "/v1/vips" | "/v1/counters" | "/v1/reload" | "/v1/teardown") => {
            Route::Refused(405, format!("{method} is not allowed on {path}"))
        }
        _ => match BALANCER_ONLY.iter().find(|(p, _)| *p == path) {
            Some((_, command)) => Route::Refused(
                409,
                format!(
                    "lbd {instance} runs the backend role: `lbctl {command}` is a balancer command. \
                     A backend answers `lbctl list`, `counters`, `reload` and `teardown`; its VIPs \
                     are `[decap] vips` in {file}"
                ),
            ),
            None => Route::Refused(404, format!("no such endpoint: {path}")),
        },
    }
}

impl Daemon {
    fn print_counters(&self, name: &str) {
        match self.decap.counters() {
            Ok(c) => event(json!({"event": name, "role": ROLE, "counters": c})),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "reading the counters"),
        }
    }

    /// Answers one request; hands back a teardown's request, which is
    /// answered once the teardown is done.
    async fn on_call(&mut self, call: ApiCall) -> Option<ApiCall> {
        let file = self.config.file.display().to_string();
        let r = &call.request;
        let answer = match route(&r.method, &r.path, &self.config.name, &file) {
            Route::Teardown => return Some(call),
            Route::Status => match self.status().await {
                Ok(s) => (200, json!(s)),
                Err(e) => err(500, format!("{e:#}")),
            },
            Route::Counters => match self.decap.counters() {
                Ok(c) => (200, json!(c)),
                Err(e) => err(500, format!("{e:#}")),
            },
            Route::Reload => match self.reload().await {
                Ok(r) => (200, json!(r)),
                Err(e) => err(400, e),
            },
            Route::Refused(status, msg) => err(status, msg),
        };
        if answer.0 == 200 && r.method == "POST" {
            event(json!({"event": "admin", "path": r.path, "result": answer.1}));
        }
        let _ = call.reply.send(answer);
        None
    }

    /// The configuration file read again: VIPs added and removed and the
    /// GUE port applied; anything else differing is refused, and a bad file
    /// changes nothing.
    async fn reload(&mut self) -> Result<Reloaded, String> {
        let result = self.try_reload().await;
        match &result {
            Ok(r) => {
                tracing::info!(added = ?r.added, removed = ?r.removed, "configuration reloaded");
                event(json!({"event": "reload", "ok": true, "result": r}));
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused");
                event(json!({"event": "reload", "ok": false, "error": e}));
            }
        }
        result
    }

    async fn try_reload(&mut self) -> Result<Reloaded, String> {
        let new = BackendConfig::load(&self.config.file)
            .map_err(|e| format!("{e}; nothing was changed"))?;
        let restart = self.config.restart_only_changes(&new);
        if !restart.is_empty() {
            return Err(format!(
                "{} only change with a restart; nothing was changed",
                restart.join(", ")
            ));
        }
        let old: BTreeSet<IpAddr> = self.config.vips.iter().copied().collect();
        let added: Vec<IpAddr> = new
            .vips
            .iter()
            .filter(|v| !old.contains(v))
            .copied()
            .collect();
        let removed: Vec<IpAddr> = self
            .config
            .vips
            .iter()
            .filter(|v| !new.vips.contains(v))
            .copied()
            .collect();
        let e = |e: anyhow::Error| format!("{e:#}");
        // A VIP is local before packets for it are decapsulated, and stops
        // being decapsulated before it stops being local.
        put_on_lo(&self.host, self.lo, &added, &mut self.state, &self.config)
            .await
            .map_err(e)?;
        for vip in &added {
            self.decap.add_vip(*vip).map_err(e)?;
        }
        let gue_port =
            (new.gue_port != self.config.gue_port).then_some([self.config.gue_port, new.gue_port]);
        if gue_port.is_some() {
            self.decap.set_gue_port(new.gue_port).map_err(e)?;
        }
        for vip in &removed {
            self.decap.remove_vip(*vip).map_err(e)?;
        }
        take_off_lo(&self.host, self.lo, &removed, &mut self.state).await;
        let saved = self.state.save(&self.config.state_file);
        self.config = new;
        saved.map_err(e)?;
        Ok(Reloaded {
            role: ROLE.into(),
            added,
            removed,
            gue_port,
        })
    }

    async fn status(&mut self) -> Result<BackendRoleStatus> {
        let presence = self.host.presence(self.lo, &self.config.vips).await?;
        let xdp = self.host.xdp(self.ifindex).await?;
        let counters = self.decap.counters()?;
        let mut vips = Vec::with_capacity(self.config.vips.len());
        for (vip, p) in self.config.vips.iter().zip(presence) {
            let t = self.decap.traffic(*vip)?;
            let on_lo = match p {
                Presence::Absent => OnLo::Missing,
                _ if self.state.lo_added.contains(vip) => OnLo::Added,
                _ => OnLo::Present,
            };
            vips.push(DecapVipStatus {
                vip: *vip,
                on_lo,
                ipv4: t.ipv4,
                ipv6: t.ipv6,
            });
        }
        let settings = sysctl::profile_for(Role::Backend, Some(&self.config.interface));
        Ok(BackendRoleStatus {
            role: ROLE.into(),
            instance: self.config.name.clone(),
            interface: self.config.interface.clone(),
            xdp: xdp.map(|x| XdpStatus {
                mode: x.mode.into(),
                program_id: x.program_id,
                ours: x.program_id == self.program_id,
            }),
            adopted: self.decap.adopted,
            gue_port: self.decap.gue_port()?,
            vips,
            drops: counters
                .iter()
                .filter(|(name, _)| name.starts_with("drop_"))
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            second_hops: SecondHops {
                hops: self
                    .hops
                    .known
                    .iter()
                    .map(|(a, h)| hop_status(*a, h))
                    .collect(),
                managed: self.state.managed_neighbors.iter().copied().collect(),
                requests: self.hops.requests,
                failures: self.hops.failures,
            },
            sysctl: SysctlStatus {
                applied: self.config.sysctl_apply,
                backup: self
                    .config
                    .sysctl_apply
                    .then(|| self.config.sysctl_backup()),
                rows: Sysctls::new("/proc/sys").show_settings(&settings),
            },
        })
    }

    async fn scrape(&mut self) -> String {
        let counters = match self.decap.counters() {
            Ok(c) => c,
            Err(e) => return format!("# lbd could not read its maps: {e:#}\n"),
        };
        match self.status().await {
            Ok(s) => metrics::render(&s, &counters),
            Err(e) => format!("# lbd could not read its state: {e:#}\n"),
        }
    }

    /// Second hops the data plane found no next hop for: the kernel is
    /// asked to resolve them (in a task: netlink round trips), unless they
    /// were asked about just now.
    fn poll_unresolved(&mut self) {
        if self.hops.asking {
            return;
        }
        let pending = match self.decap.unresolved(NEIGH_BATCH) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading DECAP_NEIGH");
                return;
            }
        };
        if pending.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut ask = Vec::new();
        for ip in pending {
            match self.hops.asked.get(&ip) {
                Some(t) if now.duration_since(*t) < NEIGH_HOLD_OFF => {
                    let _ = self.decap.resolved(ip);
                }
                _ => {
                    self.hops.asked.insert(ip, now);
                    ask.push(ip);
                }
            }
        }
        if ask.is_empty() {
            return;
        }
        self.hops.asking = true;
        let (resolver, tx) = (self.resolver.clone(), self.hops_tx.clone());
        tokio::spawn(async move {
            let managed = manage_all(&resolver, &ask).await;
            let deadline = tokio::time::Instant::now() + NEIGH_WAIT;
            let lookups = loop {
                let l = resolver.lookup_many(&ask).await;
                let waiting =
                    matches!(&l, Ok(l) if l.iter().any(|h| matches!(h, Lookup::Unresolved { .. })));
                if !waiting || tokio::time::Instant::now() >= deadline {
                    break l;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let _ = tx.send(HopMsg::Asked(managed, lookups)).await;
        });
    }

    /// Looks every known second hop up again (routes and neighbours move),
    /// in a task; unresolved ones are made managed if they were not.
    fn refresh_hops(&mut self) {
        if self.hops.refreshing || self.hops.known.is_empty() {
            return;
        }
        self.hops.refreshing = true;
        let addrs: Vec<IpAddr> = self.hops.known.keys().copied().collect();
        let (resolver, tx) = (self.resolver.clone(), self.hops_tx.clone());
        tokio::spawn(async move {
            let lookups = resolver.lookup_many(&addrs).await;
            let unresolved: Vec<IpAddr> = match &lookups {
                Ok(l) => addrs
                    .iter()
                    .zip(l)
                    .filter(|(_, l)| matches!(l, Lookup::Unresolved { .. }))
                    .map(|(a, _)| *a)
                    .collect(),
                Err(_) => Vec::new(),
            };
            let managed = manage_all(&resolver, &unresolved).await;
            let _ = tx.send(HopMsg::Refreshed(addrs, managed, lookups)).await;
        });
    }

    fn on_hops(&mut self, msg: HopMsg) {
        let (addrs, managed, lookups, asked) = match msg {
            HopMsg::Asked(managed, lookups) => {
                self.hops.asking = false;
                let addrs = managed.iter().map(|(a, _)| *a).collect();
                (addrs, managed, lookups, true)
            }
            HopMsg::Refreshed(addrs, managed, lookups) => {
                self.hops.refreshing = false;
                (addrs, managed, lookups, false)
            }
        };
        let now = Instant::now();
        let mut changed = false;
        let mut failed: BTreeMap<IpAddr, String> = BTreeMap::new();
        for (ip, m) in managed {
            match m {
                Ok(Some(m)) => {
                    tracing::info!(second_hop = %ip, via = %m.via, ifindex = m.ifindex, "the kernel keeps this next hop resolved from now on (managed neighbour)");
                    changed |= self.state.managed_neighbors.insert(m);
                }
                Ok(None) => {}
                Err(e) => {
                    failed.insert(ip, format!("{e:#}"));
                }
            }
        }
        match lookups {
            Ok(lookups) => {
                for (ip, l) in addrs.iter().zip(lookups) {
                    let hop = Hop::of(l);
                    if let Hop::NoRoute(why) = &hop {
                        failed.entry(*ip).or_insert_with(|| why.clone());
                    }
                    self.write_hop(*ip, hop);
                }
            }
            Err(e) => {
                for ip in &addrs {
                    failed
                        .entry(*ip)
                        .or_insert_with(|| format!("looking the next hop up: {e:#}"));
                }
            }
        }
        if asked {
            self.hops.requests += addrs.len() as u64;
            self.hops.failures += failed.len() as u64;
            for ip in &addrs {
                if let Err(e) = self.decap.resolved(*ip) {
                    tracing::warn!(error = %format!("{e:#}"), "clearing DECAP_NEIGH");
                }
            }
        }
        for (ip, why) in failed {
            let quiet = self
                .hops
                .warned
                .get(&ip)
                .is_some_and(|t| now.duration_since(*t) < NEIGH_WARN_EVERY);
            if !quiet {
                self.hops.warned.insert(ip, now);
                tracing::warn!(second_hop = %ip, error = %why, "packets for this second hop are dropped");
            }
        }
        self.hops
            .asked
            .retain(|_, t| now.duration_since(*t) < NEIGH_HOLD_OFF * 10);
        self.hops
            .warned
            .retain(|_, t| now.duration_since(*t) < NEIGH_WARN_EVERY);
        if changed && let Err(e) = self.state.save(&self.config.state_file) {
            tracing::error!(error = %format!("{e:#}"), "saving the state file");
        }
    }

    /// Writes what the data plane needs to know of second hop `ip` when it
    /// changed. A hop that was resolved and is not now keeps its entry:
    /// its MAC is most likely still right, and the kernel is resolving it
    /// again.
    fn write_hop(&mut self, ip: IpAddr, hop: Hop) {
        let written = match (hop_write(self.hops.known.get(&ip), &hop), &hop) {
            (HopWrite::Nothing, _) => return,
            (HopWrite::Set, Hop::Resolved(h)) => {
                tracing::info!(second_hop = %ip, via = %h.via, ifindex = h.ifindex, "second hop reachable");
                self.decap.set_hop(ip, Some(h))
            }
            (HopWrite::Set, _) => self.decap.set_hop(ip, None),
            (HopWrite::Remove, _) => self.decap.remove_hop(ip),
            (HopWrite::Record, _) => Ok(()),
        };
        match written {
            Ok(()) => {
                self.hops.known.insert(ip, hop);
            }
            Err(e) => {
                tracing::error!(second_hop = %ip, error = %format!("{e:#}"), "writing DECAP_HOPS")
            }
        }
    }

    /// Everything undone; this lbd's own hold on the program goes first,
    /// so that unpinning its link detaches it.
    async fn teardown(self) -> TornDown {
        let Daemon {
            config,
            decap,
            host,
            resolver,
            state,
            ifindex,
            program_id,
            ..
        } = self;
        drop(decap);
        let mut done = teardown::run(&config, &host, &resolver, state).await;
        if let Ok(Some(x)) = host.xdp(ifindex).await
            && x.program_id == program_id
        {
            done.errors
                .push(format!("decap still runs on {}", config.interface));
        }
        done
    }
}

/// What a second hop's new lookup asks of `DECAP_HOPS`.
#[derive(Debug, PartialEq, Eq)]
enum HopWrite {
    /// Nothing changed, or a resolved hop is being resolved again: its
    /// entry stays (the MAC is most likely still right meanwhile).
    Nothing,
    /// Write the new next hop (or, for no route, an unreachable entry).
    Set,
    /// Remove the entry: routed again but not resolved yet, the program
    /// queues it again rather than counting it unroutable.
    Remove,
    /// Nothing to write; remember the new state.
    Record,
}

fn hop_write(old: Option<&Hop>, new: &Hop) -> HopWrite {
    match (old, new) {
        (Some(o), n) if o == n => HopWrite::Nothing,
        (_, Hop::Resolved(_) | Hop::NoRoute(_)) => HopWrite::Set,
        (Some(Hop::Resolved(_)), Hop::Unresolved(_)) => HopWrite::Nothing,
        (Some(Hop::NoRoute(_)), Hop::Unresolved(_)) => HopWrite::Remove,
        (_, Hop::Unresolved(_)) => HopWrite::Record,
    }
}

/// Makes the next hop of each of `addrs` a managed neighbour.
async fn manage_all(
    resolver: &Resolver,
    addrs: &[IpAddr],
) -> Vec<(IpAddr, Result<Option<Managed>>)> {
    let mut out = Vec::with_capacity(addrs.len());
    for ip in addrs {
        out.push((*ip, resolver.manage(*ip).await));
    }
    out
}

fn hop_status(addr: IpAddr, h: &Hop) -> SecondHop {
    let mut s = SecondHop {
        addr,
        state: HopState::Unresolved,
        via: None,
        ifindex: None,
        mac: None,
        why: None,
    };
    match h {
        Hop::Resolved(n) => {
            s.state = HopState::Resolved;
            s.via = Some(n.via);
            s.ifindex = Some(n.ifindex);
            s.mac = Some(
                n.mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            );
        }
        Hop::Unresolved(at) => {
            s.ifindex = at.map(|(i, _)| i);
            s.via = at.map(|(_, v)| v);
        }
        Hop::NoRoute(why) => {
            s.state = HopState::NoRoute;
            s.why = Some(why.clone());
        }
    }
    s
}

/// What a refusal looks like to the tests here.
#[cfg(test)]
fn refused(r: Route) -> (u16, String) {
    match r {
        Route::Refused(s, m) => (s, m),
        other => panic!("not refused: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn the_backend_routes() {
        let r = |m, p| route(m, p, "web1", "/etc/lb/backend.toml");
        assert_eq!(r("GET", "/v1/vips"), Route::Status);
        assert_eq!(r("GET", "/v1/counters"), Route::Counters);
        assert_eq!(r("POST", "/v1/reload"), Route::Reload);
        assert_eq!(r("POST", "/v1/teardown"), Route::Teardown);
        assert_eq!(refused(r("POST", "/v1/vips")).0, 405);
        assert_eq!(refused(r("GET", "/v1/teardown")).0, 405);
        assert_eq!(refused(r("GET", "/v1/nothing")).0, 404);
    }

    #[test]
    fn balancer_commands_are_refused_naming_the_role_and_the_command() {
        for (path, command) in BALANCER_ONLY {
            let (status, msg) = refused(route("POST", path, "web1", "/etc/lb/backend.toml"));
            assert_eq!(status, 409, "{path}");
            assert!(msg.contains("lbd web1 runs the backend role"), "{msg}");
            assert!(msg.contains(&format!("`lbctl {command}`")), "{msg}");
            assert!(msg.contains("/etc/lb/backend.toml"), "{msg}");
        }
    }

    #[test]
    fn what_a_second_hop_lookup_writes() {
        let hop = |mac: u8| {
            Hop::Resolved(NextHop {
                ifindex: 2,
                src_mac: [2, 0, 0, 0, 0, 1],
                mac: [2, 0, 0, 0, 0, mac],
                via: "198.18.0.21".parse().unwrap(),
            })
        };
        let unresolved = Hop::Unresolved(Some((2, "198.18.0.21".parse().unwrap())));
        let nowhere = Hop::NoRoute("no route".into());
        let rows = [
            ("new and resolved", None, hop(1), HopWrite::Set),
            ("new without a route", None, nowhere.clone(), HopWrite::Set),
            ("new, resolving", None, unresolved.clone(), HopWrite::Record),
            ("unchanged", Some(hop(1)), hop(1), HopWrite::Nothing),
            ("MAC moved", Some(hop(1)), hop(2), HopWrite::Set),
            (
                "resolved, resolving again",
                Some(hop(1)),
                unresolved.clone(),
                HopWrite::Nothing,
            ),
            ("route gone", Some(hop(1)), nowhere.clone(), HopWrite::Set),
            (
                "route back, resolving",
                Some(nowhere.clone()),
                unresolved.clone(),
                HopWrite::Remove,
            ),
            ("route back, resolved", Some(nowhere), hop(1), HopWrite::Set),
            (
                "adopted, resolving",
                Some(Hop::Unresolved(None)),
                unresolved,
                HopWrite::Record,
            ),
        ];
        for (what, old, new, want) in rows {
            assert_eq!(hop_write(old.as_ref(), &new), want, "{what}");
        }
    }

    #[test]
    fn the_answers_say_backend() {
        let v: Value = json!(Reloaded {
            role: ROLE.into(),
            added: Vec::new(),
            removed: Vec::new(),
            gue_port: None,
        });
        assert!(super::super::status::is_backend(&v));
        assert!(!super::super::status::is_backend(&json!([])));
    }
}
