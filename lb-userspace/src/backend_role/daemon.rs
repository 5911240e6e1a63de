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
//! follows route and neighbour changes afterwards; only addresses inside
//! `decap.second_hops` are resolved, and what lbd knows is bounded and
//! ages out (the rules are in [`super::hops`]). Netlink work runs in tasks
//! of its own; results come back as messages.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{
    config::{BackendConfig, Prefix},
    dataplane::{self, Decap},
    hops::{Hop, Hops, Results, Write},
    host::{Host, LO, Presence},
    metrics,
    reload::{self, Plan},
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
    daemon::{Signals, event},
    neigh::{self, Lookup, Managed, Resolver, Unmanaged},
    sysctl::{self, Role, Sysctls},
};

/// How often `DECAP_NEIGH` is read: a second hop without a neighbour entry
/// drops its packets until the kernel has resolved it.
const NEIGH_POLL: Duration = Duration::from_millis(100);

/// At most this many second hops per poll.
const NEIGH_BATCH: usize = 64;

/// How long a request waits for the kernel to resolve new second hops: a
/// neighbour on the segment answers within a round trip, and until then
/// their packets are dropped. The kernel is asked again after 20 ms, then
/// twice as long each time.
const NEIGH_WAIT: Duration = Duration::from_millis(500);
const NEIGH_FIRST_LOOK: Duration = Duration::from_millis(20);

/// Known second hops are looked up again when netlink reports a change (at
/// most once per tick), and every this many ticks regardless; `DECAP_HOPS`
/// is read then too (evicted second hops are forgotten).
const HOP_TICK: Duration = Duration::from_secs(1);
const HOP_REFRESH_TICKS: u32 = 10;

/// A neighbour entry lbd failed to release is tried again after this long.
const RELEASE_RETRY: Duration = Duration::from_secs(60);

/// Runs lbd in the backend role until a signal or `lbctl teardown`.
pub fn run(config: BackendConfig) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_async(config))
}

enum HopMsg {
    /// Second hops looked up (and, those that needed it, made managed).
    Looked(Results, Vec<Managed>),
    /// Neighbour entries lbd no longer needs, released (or why not).
    Released(Vec<(Managed, Result<Unmanaged>)>),
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
    /// A release task is in flight.
    releasing: bool,
    /// Neighbour entries whose release failed, and when.
    release_failed: HashMap<(u32, IpAddr), Instant>,
    /// Second-hop log lines left out so far, as last reported.
    suppressed: u64,
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
    let metrics_listener = api::server::bind_metrics(config.metrics_listen).await?;
    let host = Host::new()?;
    let resolver = Resolver::new()?;
    let ifindex = host
        .ifindex(&config.interface)
        .await
        .context("instance.interface")?;
    let lo = host.ifindex(LO).await?;
    let allowed = second_hops(&host, ifindex, &config).await?;
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

    // Then the host: sysctls, the VIPs on lo.
    undo.sysctls = apply_sysctls(&config);
    let added = put_on_lo(&host, lo, &config.vips, &mut state, &config.state_file).await;
    undo.lo = Some((
        host.clone(),
        lo,
        added.as_ref().map_or(Vec::new(), Clone::clone),
    ));
    added?;

    // Then the data plane. A fresh one's maps are this start's own: they
    // are filled before the program is attached. A running one is first
    // swapped to this lbd's program (same maps), and its maps change only
    // once nothing else can fail: a failed start leaves it serving what it
    // served, and the lo addresses it needs stay.
    let mut decap = Decap::load(&dir)?;
    if !decap.adopted {
        undo.pins = Some(dir.clone());
        serve(&mut decap, &config).await?;
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
    let capacity = decap.hops_capacity()?;
    let dirty = Arc::new(AtomicBool::new(true));
    neigh::watch(dirty.clone())?;
    state.interface = Some(config.interface.clone());
    state
        .save(&config.state_file)
        .context("instance.state_file")?;
    if decap.adopted {
        // The last step that can fail; it undoes itself if it does.
        serve(&mut decap, &config).await?;
    }

    // Nothing fails from here on. VIPs a previous lbd put on lo that are
    // no longer configured: the data plane no longer serves them.
    let stale: Vec<IpAddr> = state
        .lo_added
        .iter()
        .filter(|v| !config.vips.contains(v))
        .copied()
        .collect();
    if !take_off_lo(&host, lo, &stale, &mut state).await.is_empty()
        && let Err(e) = state.save(&config.state_file)
    {
        tracing::error!(error = %format!("{e:#}"), "saving the state file");
    }
    log_second_hops(&config, &allowed);
    let (api_tx, api) = mpsc::channel(64);
    tokio::spawn(api::server::serve(listener, api_tx));
    let (scrape_tx, scrapes) = mpsc::channel::<oneshot::Sender<String>>(16);
    if let Some(listener) = metrics_listener {
        tokio::spawn(api::server::serve_metrics(listener, scrape_tx));
    }
    let (hops_tx, hops_rx) = mpsc::channel(16);
    let mut d = Daemon {
        config,
        decap,
        host,
        resolver,
        lo,
        ifindex,
        state,
        program_id,
        hops: Hops::new(allowed, capacity),
        hops_tx,
        releasing: false,
        release_failed: HashMap::new(),
        suppressed: 0,
    };
    // The second hops an earlier lbd wrote, known from the start (looked
    // up at the first tick, which comes at once).
    d.sync_hops();
    let inbox = Inbox {
        api,
        scrapes,
        hops: hops_rx,
        dirty,
    };
    Ok((d, inbox))
}

/// Where second hops may be: `decap.second_hops`, or the prefixes of the
/// interface's own addresses.
async fn second_hops(host: &Host, ifindex: u32, config: &BackendConfig) -> Result<Vec<Prefix>> {
    match &config.second_hops {
        Some(list) => Ok(list.clone()),
        None => host.connected_prefixes(ifindex).await.with_context(|| {
            format!(
                "reading the prefixes of {} (decap.second_hops is not set: they are its default)",
                config.interface
            )
        }),
    }
}

fn log_second_hops(config: &BackendConfig, allowed: &[Prefix]) {
    let list = allowed
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let from = if config.second_hops.is_some() {
        "decap.second_hops"
    } else {
        "the prefixes of instance.interface (decap.second_hops not set)"
    };
    if allowed.is_empty() {
        tracing::warn!(
            from,
            "no second hop will be resolved: GUE packets naming one are dropped (drop_no_route)"
        );
    } else {
        tracing::info!(prefixes = %list, from, "second hops are resolved within these prefixes only");
    }
}

/// Has the maps serve `config`: its VIPs (others no longer) and its GUE
/// port. All or nothing (it undoes its own steps on a failure).
async fn serve(decap: &mut Decap, config: &BackendConfig) -> Result<()> {
    let serving = decap.vips()?;
    let plan = Plan {
        added: config.vips.clone(),
        removed: serving
            .iter()
            .filter(|v| !config.vips.contains(v))
            .copied()
            .collect(),
        gue_port: match decap.gue_port()? {
            p if p == config.gue_port => None,
            p => Some([p, config.gue_port]),
        },
    };
    reload::apply(&mut MapsOnly(decap), &plan)
        .await
        .map_err(|e| anyhow::anyhow!("configuring the decapsulator's maps: {e}"))
}

/// The maps alone, for [`serve`]: `lo` is taken care of apart.
struct MapsOnly<'a>(&'a mut Decap);

impl reload::Target for MapsOnly<'_> {
    async fn put_on_lo(&mut self, _: &[IpAddr]) -> Result<Vec<IpAddr>> {
        Ok(Vec::new())
    }

    async fn take_off_lo(&mut self, _: &[IpAddr]) {}

    fn add_vip(&mut self, vip: IpAddr) -> Result<bool> {
        self.0.add_vip(vip)
    }

    fn remove_vip(&mut self, vip: IpAddr) -> Result<bool> {
        self.0.remove_vip(vip)
    }

    fn set_gue_port(&mut self, port: u16) -> Result<()> {
        self.0.set_gue_port(port)
    }
}

/// The host and the maps, for a reload.
struct Live<'a> {
    host: &'a Host,
    lo: u32,
    state: &'a mut State,
    state_file: &'a Path,
    decap: &'a mut Decap,
}

impl reload::Target for Live<'_> {
    async fn put_on_lo(&mut self, vips: &[IpAddr]) -> Result<Vec<IpAddr>> {
        put_on_lo(self.host, self.lo, vips, self.state, self.state_file).await
    }

    async fn take_off_lo(&mut self, vips: &[IpAddr]) {
        if !take_off_lo(self.host, self.lo, vips, self.state)
            .await
            .is_empty()
            && let Err(e) = self.state.save(self.state_file)
        {
            tracing::error!(error = %format!("{e:#}"), "saving the state file");
        }
    }

    fn add_vip(&mut self, vip: IpAddr) -> Result<bool> {
        self.decap.add_vip(vip)
    }

    fn remove_vip(&mut self, vip: IpAddr) -> Result<bool> {
        self.decap.remove_vip(vip)
    }

    fn set_gue_port(&mut self, port: u16) -> Result<()> {
        self.decap.set_gue_port(port)
    }
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
/// knows to remove). Returns the addresses added; on an error, none stay
/// added.
async fn put_on_lo(
    host: &Host,
    lo: u32,
    vips: &[IpAddr],
    state: &mut State,
    state_file: &Path,
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
    let recorded: Vec<IpAddr> = missing
        .iter()
        .filter(|v| state.lo_added.insert(**v))
        .copied()
        .collect();
    if let Err(e) = state.save(state_file) {
        for v in &recorded {
            state.lo_added.remove(v);
        }
        return Err(e);
    }
    let mut added = Vec::new();
    let mut failed = None;
    let mut theirs = false;
    for vip in missing {
        match host.add_to_lo(lo, vip).await {
            Ok(true) => {
                tracing::info!(%vip, "VIP added to lo");
                added.push(vip);
            }
            Ok(false) => {
                // Someone else's after all (added since we looked).
                state.lo_added.remove(&vip);
                theirs = true;
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let saved = match failed {
        Some(e) => Err(e),
        None if !theirs => return Ok(added),
        None => state.save(state_file),
    };
    if let Err(e) = saved {
        for v in &added {
            let _ = host.remove_from_lo(lo, *v).await;
        }
        for v in &recorded {
            state.lo_added.remove(v);
        }
        let _ = state.save(state_file);
        return Err(e);
    }
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

    /// The configuration file read again: VIPs added and removed, the GUE
    /// port and `decap.second_hops` applied; anything else differing is
    /// refused, and a bad file, or a change that fails, changes nothing.
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

    /// Everything is worked out before anything changes; the changes are
    /// then made all or none ([`reload::apply`]), and only then is the new
    /// configuration taken.
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
        let allowed = second_hops(&self.host, self.ifindex, &new)
            .await
            .map_err(|e| format!("{e:#}; nothing was changed"))?;
        let plan = Plan::between(&self.config, &new);
        let mut live = Live {
            host: &self.host,
            lo: self.lo,
            state: &mut self.state,
            state_file: &self.config.state_file,
            decap: &mut self.decap,
        };
        reload::apply(&mut live, &plan).await?;
        let hops_changed = allowed != self.hops.allowed();
        self.config = new;
        if hops_changed {
            log_second_hops(&self.config, &allowed);
            self.hops.set_allowed(allowed);
            self.sync_hops();
        }
        Ok(Reloaded {
            role: ROLE.into(),
            added: plan.added,
            removed: plan.removed,
            gue_port: plan.gue_port,
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
                hops: self.hops.iter().map(|(a, h)| hop_status(*a, h)).collect(),
                managed: self.state.managed_neighbors.iter().copied().collect(),
                requests: self.hops.requests,
                failures: self.hops.failures,
                allowed: self
                    .hops
                    .allowed()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
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

    /// Second hops the data plane found no next hop for: those inside
    /// `decap.second_hops` are asked about (in a task: netlink round
    /// trips) unless they are backing off; the others are written
    /// unreachable.
    fn poll_unresolved(&mut self) {
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
        let p = self.hops.poll(&pending, !self.hops.asking, Instant::now());
        self.write(p.writes);
        for ip in pending.iter().filter(|ip| !p.deferred.contains(ip)) {
            if let Err(e) = self.decap.resolved(*ip) {
                tracing::warn!(error = %format!("{e:#}"), "clearing DECAP_NEIGH");
            }
        }
        for ip in p.refused {
            tracing::warn!(
                second_hop = %ip,
                "a GUE packet named a second hop outside decap.second_hops: lbd does not resolve it, \
                 its packets are dropped (drop_no_route)"
            );
        }
        if p.ask.is_empty() {
            return;
        }
        self.hops.asking = true;
        let ask = p.ask;
        let (resolver, tx) = (self.resolver.clone(), self.hops_tx.clone());
        let seq = self.hops.seq_counter();
        tokio::spawn(async move {
            let (managed, manage_errors) = manage_all(&resolver, &ask).await;
            let lookups = lookup_until_resolved(&resolver, &ask).await;
            let results = Results {
                seq: Hops::next_seq(&seq),
                asked: true,
                addrs: ask,
                lookups: lookups.map_err(|e| format!("{e:#}")),
                manage_errors,
            };
            let _ = tx.send(HopMsg::Looked(results, managed)).await;
        });
    }

    /// `DECAP_HOPS` read and reconciled with what lbd knows (see
    /// [`Hops::sync`]); neighbours no second hop needs any more released.
    fn sync_hops(&mut self) {
        match self.decap.hops() {
            Ok(present) => {
                let writes = self.hops.sync(&present, Instant::now());
                self.write(writes);
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "reading DECAP_HOPS"),
        }
        let suppressed = self.hops.suppressed();
        if suppressed > self.suppressed {
            tracing::warn!(
                left_out = suppressed - self.suppressed,
                "second-hop warnings left out: too many addresses within a minute"
            );
            self.suppressed = suppressed;
        }
        self.release_unreferenced();
    }

    /// Looks every known second hop up again (routes and neighbours move),
    /// in a task; unresolved ones are made managed if they were not.
    fn refresh_hops(&mut self) {
        if self.hops.refreshing {
            return;
        }
        self.sync_hops();
        let addrs = self.hops.to_refresh();
        if addrs.is_empty() {
            return;
        }
        self.hops.refreshing = true;
        let (resolver, tx) = (self.resolver.clone(), self.hops_tx.clone());
        let seq = self.hops.seq_counter();
        tokio::spawn(async move {
            let lookups = resolver.lookup_many(&addrs).await;
            let seq = Hops::next_seq(&seq);
            let unresolved: Vec<IpAddr> = match &lookups {
                Ok(l) => addrs
                    .iter()
                    .zip(l)
                    .filter(|(_, l)| matches!(l, Lookup::Unresolved { .. }))
                    .map(|(a, _)| *a)
                    .collect(),
                Err(_) => Vec::new(),
            };
            let (managed, manage_errors) = manage_all(&resolver, &unresolved).await;
            let results = Results {
                seq,
                asked: false,
                addrs,
                lookups: lookups.map_err(|e| format!("{e:#}")),
                manage_errors,
            };
            let _ = tx.send(HopMsg::Looked(results, managed)).await;
        });
    }

    fn on_hops(&mut self, msg: HopMsg) {
        match msg {
            HopMsg::Looked(results, managed) => {
                if results.asked {
                    self.hops.asking = false;
                } else {
                    self.hops.refreshing = false;
                }
                let mut changed = false;
                for m in managed {
                    tracing::info!(via = %m.via, ifindex = m.ifindex, created = m.created, "the kernel keeps this next hop resolved from now on (managed neighbour)");
                    changed |= self.state.record_managed(m);
                }
                if changed && let Err(e) = self.state.save(&self.config.state_file) {
                    tracing::error!(error = %format!("{e:#}"), "saving the state file");
                }
                let applied = self.hops.apply(results, Instant::now());
                if applied.stale > 0 {
                    tracing::debug!(
                        stale = applied.stale,
                        "second-hop lookups older than what lbd had: ignored"
                    );
                }
                self.write(applied.writes);
                for (ip, why) in applied.failed {
                    tracing::warn!(second_hop = %ip, error = %why, "packets for this second hop are dropped");
                }
                self.release_unreferenced();
            }
            HopMsg::Released(done) => {
                self.releasing = false;
                let now = Instant::now();
                let mut changed = false;
                for (m, r) in done {
                    match r {
                        Ok(how) => {
                            tracing::info!(via = %m.via, ifindex = m.ifindex, ?how, "no second hop goes through this neighbour any more: released");
                            self.release_failed.remove(&m.key());
                            changed |= self.state.forget_managed(m.key());
                        }
                        Err(e) => {
                            tracing::warn!(via = %m.via, ifindex = m.ifindex, error = %format!("{e:#}"), "releasing a managed neighbour (tried again in a minute, and at teardown)");
                            self.release_failed.insert(m.key(), now);
                        }
                    }
                }
                if changed && let Err(e) = self.state.save(&self.config.state_file) {
                    tracing::error!(error = %format!("{e:#}"), "saving the state file");
                }
                self.release_unreferenced();
            }
        }
    }

    /// Releases, in a task, the managed neighbours no known second hop
    /// goes through: deleted if lbd created them, else their managed flag
    /// cleared. One batch at a time.
    fn release_unreferenced(&mut self) {
        if self.releasing {
            return;
        }
        let now = Instant::now();
        self.release_failed
            .retain(|_, t| now.duration_since(*t) < RELEASE_RETRY);
        let batch: Vec<Managed> = self
            .hops
            .unreferenced(&self.state.managed_neighbors)
            .into_iter()
            .filter(|m| !self.release_failed.contains_key(&m.key()))
            .collect();
        if batch.is_empty() {
            return;
        }
        self.releasing = true;
        let (resolver, tx) = (self.resolver.clone(), self.hops_tx.clone());
        tokio::spawn(async move {
            let mut done = Vec::with_capacity(batch.len());
            for m in batch {
                let r = resolver.unmanage(&m).await;
                done.push((m, r));
            }
            let _ = tx.send(HopMsg::Released(done)).await;
        });
    }

    /// Makes the changes to `DECAP_HOPS`; an address whose write failed is
    /// forgotten (and found again).
    fn write(&mut self, writes: Vec<Write>) {
        for w in writes {
            let (ip, r) = match &w {
                Write::Set(ip, h) => {
                    tracing::info!(second_hop = %ip, via = %h.via, ifindex = h.ifindex, "second hop reachable");
                    (*ip, self.decap.set_hop(*ip, Some(h)))
                }
                Write::Unreachable(ip) => (*ip, self.decap.set_hop(*ip, None)),
                Write::Remove(ip) => (*ip, self.decap.remove_hop(*ip)),
            };
            if let Err(e) = r {
                tracing::error!(second_hop = %ip, error = %format!("{e:#}"), "writing DECAP_HOPS");
                self.hops.write_failed(ip);
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

/// Makes the next hop of each of `addrs` a managed neighbour: the entries
/// made managed, and why it failed for an address.
async fn manage_all(
    resolver: &Resolver,
    addrs: &[IpAddr],
) -> (Vec<Managed>, std::collections::BTreeMap<IpAddr, String>) {
    let mut managed = Vec::new();
    let mut errors = std::collections::BTreeMap::new();
    let mut done: BTreeSet<(u32, IpAddr)> = BTreeSet::new();
    for ip in addrs {
        match resolver.manage(*ip).await {
            Ok(Some(m)) => {
                if done.insert(m.key()) {
                    managed.push(m);
                }
            }
            Ok(None) => {}
            Err(e) => {
                errors.insert(*ip, format!("{e:#}"));
            }
        }
    }
    (managed, errors)
}

/// What the kernel knows of `addrs`' next hops once they are resolved, or
/// after [`NEIGH_WAIT`]: looked at again after 20 ms, then twice as long
/// each time, only those still unresolved.
async fn lookup_until_resolved(resolver: &Resolver, addrs: &[IpAddr]) -> Result<Vec<Lookup>> {
    let deadline = tokio::time::Instant::now() + NEIGH_WAIT;
    let mut lookups = resolver.lookup_many(addrs).await?;
    let mut wait = NEIGH_FIRST_LOOK;
    loop {
        let waiting: Vec<usize> = (0..lookups.len())
            .filter(|i| matches!(lookups[*i], Lookup::Unresolved { .. }))
            .collect();
        let now = tokio::time::Instant::now();
        if waiting.is_empty() || now >= deadline {
            return Ok(lookups);
        }
        tokio::time::sleep(wait.min(deadline - now)).await;
        wait *= 2;
        let again: Vec<IpAddr> = waiting.iter().map(|i| addrs[*i]).collect();
        for (i, l) in waiting.into_iter().zip(resolver.lookup_many(&again).await?) {
            lookups[i] = l;
        }
    }
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
        Hop::Refused => {
            s.state = HopState::Refused;
            s.why = Some("outside decap.second_hops: lbd does not resolve it".into());
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
