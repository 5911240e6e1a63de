//! The controller: the desired state (configuration, state file, health,
//! admin changes) turned into map contents, and kept there as it changes.
//!
//! - `persist`: the state file, and how it is laid over the configuration;
//! - `kernel`: writing backends, rings and VIPs into the maps;
//! - `admin`: changes through the control API;
//! - `explain`: the per-packet policy over a snapshot of the live maps.
//!
//! Starting is two steps: [`Controller::plan`] validates and finds ids and
//! next hops without changing anything; [`Controller::apply`] loads, programs
//! and attaches, and unpins a fresh data plane again when it fails.

mod admin;
mod explain;
mod kernel;
mod node;
pub mod persist;
mod reload;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::Ebpf;
use lb_common::maps::{self as wire, LbConfig};

pub use self::{
    admin::{AdminError, NewBackend, parse_check},
    kernel::ring_fingerprint,
    persist::{SavedBackend, SavedState, SavedVip},
    reload::{Reloaded, offline_diff},
};
use crate::{
    api::{BackendState, BackendStatus, VipStatus},
    config::{CheckKind, Config, HealthCheck, OnExit, VipConfig, VipSpec, vip::addr16},
    health::{self, Health, HealthEvent},
    membership::{self, FlapEvent, FlapRecord, Member, WeightRamp},
    neigh::{NextHop, Resolver},
    pinning::{self, Pinned},
    programming,
};

/// How long next-hop resolution may take at start and for a backend added
/// at runtime.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A health change as applied: the backend as it is now, and the flap hold
/// the change started.
pub struct HealthApplied {
    pub vip: String,
    pub status: BackendStatus,
    pub flap_hold: Option<Duration>,
}

/// A health check to run: backend id, address and parameters.
#[derive(Clone, Debug)]
pub struct HealthTarget {
    pub id: u32,
    pub addr: SocketAddr,
    pub check: HealthCheck,
    /// Where the checker starts (down for a backend adopted as down).
    pub initial: Health,
    /// Echoed in its events (see `BackendRt::token`).
    pub token: u64,
}

struct BackendRt {
    status: BackendStatus,
    hop: NextHop,
    /// Unique per backend instance: a health event from the checker of a
    /// removed backend whose id was reused must not touch the new one.
    token: u64,
    /// When it last became a member of the ring after lbd started (slow
    /// start runs from here).
    member_since: Option<Instant>,
    ramp: Option<WeightRamp>,
    flaps: FlapRecord,
    /// What this node's own checks say. On a single node (and in a fleet
    /// that lost etcd) it is `status.health`; in a fleet, `status.health`
    /// is the health the fleet agreed on.
    local: Health,
}

impl BackendRt {
    fn new(status: BackendStatus, hop: NextHop, token: u64) -> Self {
        BackendRt {
            local: status.health,
            status,
            hop,
            token,
            member_since: None,
            ramp: None,
            flaps: FlapRecord::default(),
        }
    }

    fn member(&self, vip: &VipConfig) -> Member {
        self.member_with(vip.slowstart_of(self.status.address))
    }

    fn member_with(&self, slowstart: std::time::Duration) -> Member {
        Member {
            health: self.status.health,
            drained: self.status.drained,
            weight: self.status.weight,
            flap_held: self.flaps.held(),
            member_since: self.member_since,
            slowstart,
            ramp: self.ramp,
        }
    }

    /// Every backend's membership: one pass over the VIP's configured
    /// backends for their slow-start settings (asked per backend, it was a
    /// scan each, quadratic in a VIP's backends on every refresh tick).
    fn members(backends: &[BackendRt], vip: &VipConfig) -> Vec<Member> {
        let own: std::collections::HashMap<std::net::IpAddr, std::time::Duration> = vip
            .backends
            .iter()
            .filter_map(|b| Some((b.addr, b.slowstart?)))
            .collect();
        backends
            .iter()
            .map(|b| {
                let slowstart = own.get(&b.status.address).copied();
                b.member_with(slowstart.unwrap_or(vip.slowstart))
            })
            .collect()
    }

    /// Stops a weight ramp where it is now: any other change to the backend
    /// cancels it.
    fn cancel_ramp(&mut self, now: Instant) {
        if let Some(r) = self.ramp.take() {
            self.status.weight = membership::ramped(self.status.weight, Some(r), now);
        }
    }
}

struct VipRuntime {
    config: VipConfig,
    vip_id: u32,
    backends: Vec<BackendRt>,
    ring_flips: u64,
    panic: bool,
    /// The ring last published: (backend id, weight) of each member.
    published: Option<Vec<(u32, u32)>>,
    /// The live ring's fingerprint (`kernel::ring_fingerprint`).
    fingerprint: u64,
}

impl VipRuntime {
    fn new(config: VipConfig, vip_id: u32, backends: Vec<BackendRt>) -> Self {
        VipRuntime {
            config,
            vip_id,
            backends,
            ring_flips: 0,
            panic: false,
            published: None,
            fingerprint: 0,
        }
    }
}

pub struct Controller {
    pub ebpf: Ebpf,
    /// Runtime changes to VIPs, kept for the state file.
    overlay: persist::Overlay,
    /// Whether a running data plane was adopted (hitless restart).
    pub adopted: bool,
    pin_dir: PathBuf,
    config: Config,
    ifindex: u32,
    vips: Vec<VipRuntime>,
    used_ids: BTreeSet<u32>,
    last_token: u64,
    /// The data plane is attached and this lbd answers for it; false from
    /// a teardown's start, so every VIP is withdrawn before the program
    /// detaches.
    attached: bool,
    /// How this lbd's rings differ from the data plane it adopted (another
    /// hash seed or ring size, accepted with `--accept-ring-change`).
    ring_change: Option<String>,
    /// Saving the state file: failures, and the last error while it lasts.
    save_record: std::sync::Mutex<persist::SaveRecord>,
    /// Fleet mode: VIPs and backends change through etcd, not the file.
    fleet_mode: bool,
    /// Fleet mode with etcd answering: health is what the fleet agreed on,
    /// not this node's own checks.
    agreed_health: bool,
}

/// Ids for every VIP and backend: saved ones first (an adopted data
/// plane's rings and connection-table entries name them), then the lowest
/// free ones.
struct Ids {
    vips: Vec<u32>,
    /// Per VIP, per backend.
    backends: Vec<Vec<u32>>,
    used: BTreeSet<u32>,
    /// Backend ids given out now, not taken from the state file.
    fresh: Vec<u32>,
}

fn plan_ids(config: &Config, saved: &SavedState) -> Result<Ids> {
    let max_vips = config.sizes.max_vips;
    let mut vips: Vec<Option<u32>> = Vec::new();
    for v in &config.vips {
        let id = saved.vip_ids.get(&v.spec.to_string()).copied();
        vips.push(id.filter(|id| *id < max_vips && !vips.contains(&Some(*id))));
    }
    let mut taken: BTreeSet<u32> = vips.iter().flatten().copied().collect();
    let mut vip_ids = Vec::new();
    for id in vips {
        vip_ids.push(match id {
            Some(id) => id,
            None => {
                let free = (0..max_vips)
                    .find(|i| !taken.contains(i))
                    .context("more VIPs than dataplane.max_vips")?;
                taken.insert(free);
                free
            }
        });
    }
    let mut used: BTreeSet<u32> = saved.vips.values().flatten().filter_map(|b| b.id).collect();
    let mut fresh = Vec::new();
    let mut backends = Vec::new();
    // Ids are given lowest first and `used` only grows here, so the next
    // free one is never below the last one given: a thousand backends
    // cost a thousand steps, not half a million.
    let mut next_free = 1;
    for v in &config.vips {
        let prior: std::collections::HashMap<IpAddr, u32> = saved
            .vips
            .get(&v.spec.to_string())
            .into_iter()
            .flatten()
            .rev()
            .filter_map(|s| Some((s.address, s.id?)))
            .collect();
        let mut ids = Vec::new();
        for b in &v.backends {
            ids.push(match prior.get(&b.addr) {
                Some(id) => *id,
                None => {
                    let id = free_id_from(&used, config.sizes.max_backends, next_free)?;
                    next_free = id + 1;
                    used.insert(id);
                    fresh.push(id);
                    id
                }
            });
        }
        backends.push(ids);
    }
    Ok(Ids {
        vips: vip_ids,
        backends,
        used,
        fresh,
    })
}

/// The lowest free `BACKENDS` slot (0 means "no backend").
fn free_id(used: &BTreeSet<u32>, max: u32) -> Result<u32> {
    free_id_from(used, max, 1)
}

/// The lowest free `BACKENDS` slot from `from` on.
fn free_id_from(used: &BTreeSet<u32>, max: u32, from: u32) -> Result<u32> {
    (from.max(1)..max)
        .find(|i| !used.contains(i))
        .with_context(|| {
            format!(
                "all {} backend slots are in use (dataplane.max_backends)",
                max.saturating_sub(1)
            )
        })
}

/// Every configured backend's next hop, resolved together; the first one
/// that cannot be is a configuration error, reported before anything is
/// attached.
async fn resolve_all(resolver: &Resolver, config: &Config) -> Result<BTreeMap<IpAddr, NextHop>> {
    let addrs: BTreeSet<IpAddr> = config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.addr))
        .collect();
    let addrs: Vec<IpAddr> = addrs.into_iter().collect();
    let started = Instant::now();
    let mut hops = BTreeMap::new();
    for (addr, hop) in resolver.resolve_many(&addrs, RESOLVE_TIMEOUT).await {
        let hop = hop.with_context(|| {
            let vip = config
                .vips
                .iter()
                .find(|v| v.backends.iter().any(|b| b.addr == addr))
                .map(|v| v.spec.to_string())
                .unwrap_or_default();
            format!("vip {vip} backend {addr}")
        })?;
        hops.insert(addr, hop);
    }
    let distinct: BTreeSet<(u32, IpAddr)> = hops.values().map(|h| (h.ifindex, h.via)).collect();
    tracing::info!(
        backends = hops.len(),
        next_hops = distinct.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "next hops resolved"
    );
    Ok(hops)
}

/// The largest frame the interface sends: its MTU and the Ethernet header.
pub fn max_frame_len(mtu: u32) -> u32 {
    mtu.saturating_add(14)
}

fn lb_config(config: &Config, mtu: u32) -> LbConfig {
    LbConfig {
        encap_src_v4: config
            .encap_source_v4
            .map(|a| a.octets())
            .unwrap_or_default(),
        encap_src_v6: config
            .encap_source_v6
            .map(|a| a.octets())
            .unwrap_or_default(),
        hash_seed: config.hash_seed,
        ring_size: config.sizes.ring_size,
        udp_timeout_ns: config.udp_timeout.as_nanos() as u64,
        tcp_idle_timeout_ns: config.tcp_idle_timeout.as_nanos() as u64,
        max_frame_len: max_frame_len(mtu),
        gue_port: config.gue_port,
        ..Default::default()
    }
}

/// Everything a start needs to know, found without changing anything: the
/// merged configuration, the interface, ids and next hops. A start that
/// cannot be planned has not touched the kernel.
pub struct Plan {
    config: Config,
    saved: SavedState,
    overlay: persist::Overlay,
    ifindex: u32,
    mtu: u32,
    ids: Ids,
    hops: BTreeMap<IpAddr, NextHop>,
    /// The first round of checks: each backend's health before its VIP's
    /// ring is first published (unless an adopted data plane knows it).
    first_round: BTreeMap<(VipSpec, IpAddr), Health>,
}

/// Checks every backend once, together, before anything is published.
async fn first_round(config: &Config) -> BTreeMap<(VipSpec, IpAddr), Health> {
    let started = Instant::now();
    let targets: Vec<_> = config
        .vips
        .iter()
        .flat_map(|v| {
            let port = v.health_check.port.unwrap_or(v.spec.port);
            v.backends.iter().map(move |b| {
                (
                    (v.spec, b.addr),
                    SocketAddr::new(b.addr, port),
                    v.health_check.clone(),
                )
            })
        })
        .collect();
    let total = targets.len();
    let results = health::first_round(targets).await;
    let passed = results.iter().filter(|r| r.1).count();
    tracing::info!(
        passed,
        total,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "first round of health checks"
    );
    results
        .into_iter()
        .map(|(k, ok)| (k, if ok { Health::Up } else { Health::Down }))
        .collect()
}

impl Plan {
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl Controller {
    /// Validates and plans a start: the state file laid over the
    /// configuration, the interface and its MTU, ids, every backend's next
    /// hop. Nothing on the system changes.
    /// `fleet`: the drained backends of the fleet's desired state, whose
    /// VIPs `config` carries: the state file then only keeps ids (and the
    /// node's own drain), the desired state replaces runtime changes.
    pub async fn plan(
        mut config: Config,
        resolver: &Resolver,
        fleet: Option<&crate::fleet::desired::Drained>,
    ) -> Result<Plan> {
        let mut saved = persist::load(&config.state_file)?;
        if let Some(drained) = fleet {
            saved = persist::for_fleet(&config, saved, drained);
        }
        let overlay = persist::merge(&mut config, &saved)?;
        persist::log_overridden(&overlay);
        let ifindex = resolver
            .ifindex(&config.interface)
            .await
            .with_context(|| format!("instance.interface {:?}", config.interface))?;
        let mtu = resolver
            .mtu(ifindex)
            .await
            .with_context(|| format!("instance.interface {:?}", config.interface))?;
        let ids = plan_ids(&config, &saved)?;
        let hops = resolve_all(resolver, &config).await?;
        // An adopted data plane already knows its backends' states (and a
        // backend it does not know starts unchecked): no round to wait for.
        let first_round = if pinning::is_attached(&pinning::pin_dir(&config.name)) {
            BTreeMap::new()
        } else {
            first_round(&config).await
        };
        Ok(Plan {
            config,
            saved,
            overlay,
            ifindex,
            mtu,
            ids,
            hops,
            first_round,
        })
    }

    /// Loads (or adopts) the data plane and programs the plan into it, then
    /// attaches. A fresh data plane that fails on the way is unpinned again
    /// (the maps created so far included); an adopted one keeps running
    /// under its old program, since the swap is the last step that can fail
    /// before the state file is written.
    pub fn apply(plan: Plan) -> Result<Controller> {
        let pin_dir = pinning::pin_dir(&plan.config.name);
        let fresh = !pinning::is_attached(&pin_dir);
        let applied = Self::apply_to(plan, pin_dir.clone());
        if applied.is_err() && fresh {
            pinning::discard(&pin_dir);
        }
        applied
    }

    fn apply_to(plan: Plan, pin_dir: PathBuf) -> Result<Controller> {
        let Plan {
            config,
            saved,
            overlay,
            ifindex,
            mtu,
            ids,
            hops,
            first_round,
        } = plan;
        let Pinned { ebpf, adopted, .. } = pinning::load(&pin_dir, &config.sizes)?;
        let ring_change = if adopted {
            node::ring_change(&ebpf, &config)?
        } else {
            None
        };
        let mut ctl = Controller {
            ebpf,
            overlay,
            adopted,
            pin_dir,
            config,
            ifindex,
            vips: Vec::new(),
            used_ids: ids.used.clone(),
            last_token: 0,
            attached: false,
            ring_change,
            save_record: Default::default(),
            fleet_mode: false,
            agreed_health: false,
        };
        // Everything that can fail without writing a map comes first.
        ctl.build_runtime(&saved, &ids, &hops, &first_round)?;
        programming::set_config(&mut ctl.ebpf, &lb_config(&ctl.config, mtu))?;
        for id in &ids.fresh {
            ctl.fresh_slot(*id)?;
        }
        ctl.program_all()?;
        let (iface, mode) = (ctl.config.interface.clone(), ctl.config.xdp_mode);
        pinning::attach(&mut ctl.ebpf, &ctl.pin_dir, ctl.adopted, &iface, mode)?;
        ctl.attached = true;
        // Records the backend ids the connection table now refers to.
        ctl.persist()?;
        Ok(ctl)
    }

    /// Every VIP and backend with its id, next hop and state: drains from
    /// the state file; health from the running data plane when adopting
    /// (a backend it had down stays down until its checks pass, one it had
    /// in service stays in), otherwise from the first round of checks.
    fn build_runtime(
        &mut self,
        saved: &SavedState,
        ids: &Ids,
        hops: &BTreeMap<IpAddr, NextHop>,
        first_round: &BTreeMap<(VipSpec, IpAddr), Health>,
    ) -> Result<()> {
        for (i, v) in self.config.vips.clone().into_iter().enumerate() {
            let prior = saved.vips.get(&v.spec.to_string());
            let mut backends = Vec::new();
            for (j, b) in v.backends.iter().enumerate() {
                let id = ids.backends[i][j];
                let mut status = BackendStatus::new(b.addr, id, b.weight);
                status.drained = prior
                    .and_then(|l| l.iter().find(|s| s.address == b.addr))
                    .is_some_and(|s| s.drained);
                let live = if self.adopted {
                    programming::backend(&mut self.ebpf, id)
                        .ok()
                        .filter(|live| live.addr == addr16(b.addr).0)
                        .map(|live| live.state())
                } else {
                    None
                };
                // A draining backend's health is not in the data plane (nor
                // is a failing one kept in by panic mode, which reads as up
                // until its checks fail again): its first check decides.
                status.health = match live {
                    _ if v.health_check.kind == CheckKind::None => Health::Up,
                    Some(wire::BackendState::Down) => Health::Down,
                    Some(wire::BackendState::Up) => Health::Up,
                    Some(wire::BackendState::Draining) => Health::Unchecked,
                    _ => first_round
                        .get(&(v.spec, b.addr))
                        .copied()
                        .unwrap_or(Health::Unchecked),
                };
                status.refresh_state();
                let hop = *hops
                    .get(&b.addr)
                    .with_context(|| format!("no next hop for backend {}", b.addr))?;
                let token = self.next_token();
                backends.push(BackendRt::new(status, hop, token));
            }
            self.vips.push(VipRuntime::new(v, ids.vips[i], backends));
        }
        Ok(())
    }

    fn next_token(&mut self) -> u64 {
        self.last_token += 1;
        self.last_token
    }

    /// A backend added after start (by the API, a reload or the fleet), in
    /// slot `id`: in the ring after its first passing check, or at once
    /// (slow start permitting) for a VIP that is not checked (`!checked`).
    fn added_backend(
        &mut self,
        checked: bool,
        addr: IpAddr,
        id: u32,
        weight: u32,
        hop: NextHop,
        now: Instant,
    ) -> BackendRt {
        let mut status = BackendStatus::new(addr, id, weight);
        if checked {
            status.health = Health::Unchecked;
            status.refresh_state();
        }
        let token = self.next_token();
        let mut rt = BackendRt::new(status, hop, token);
        if rt.status.health == Health::Up {
            rt.member_since = Some(now);
        }
        rt
    }

    /// The lowest `RINGS`/`STATS_VIP` slot no VIP uses.
    fn free_vip_id(&self) -> Option<u32> {
        let used: Vec<u32> = self.vips.iter().map(|v| v.vip_id).collect();
        (0..self.config.sizes.max_vips).find(|i| !used.contains(i))
    }

    /// The lowest free `BACKENDS` slot, now taken.
    fn alloc_id(&mut self) -> Result<u32> {
        let id = free_id(&self.used_ids, self.config.sizes.max_backends)?;
        self.used_ids.insert(id);
        Ok(id)
    }

    fn find(&self, id: u32) -> Option<(usize, usize)> {
        self.vips.iter().enumerate().find_map(|(v, rt)| {
            rt.backends
                .iter()
                .position(|b| b.status.id == id)
                .map(|b| (v, b))
        })
    }

    fn vip_index(&self, vip: &VipSpec) -> Result<usize, AdminError> {
        self.vips
            .iter()
            .position(|v| v.config.spec == *vip)
            .ok_or_else(|| AdminError::UnknownVip(vip.to_string()))
    }

    fn backend_index(&self, v: usize, addr: IpAddr) -> Result<usize, AdminError> {
        self.vips[v]
            .backends
            .iter()
            .position(|b| b.status.address == addr)
            .ok_or_else(|| AdminError::UnknownBackend {
                vip: self.vips[v].config.spec.to_string(),
                backend: addr,
            })
    }

    /// Applies a health change: backend state, then only that VIP's ring.
    /// A change counts towards flap damping (a first result does not: it is
    /// news, not a change); returns the hold it started, if any.
    pub fn on_health(&mut self, ev: &HealthEvent, now: Instant) -> Result<Option<HealthApplied>> {
        let Some((v, b)) = self.find(ev.id) else {
            // The backend was removed while its last check ran.
            return Ok(None);
        };
        if self.vips[v].backends[b].token != ev.token {
            // From the checker of a removed backend whose id was reused.
            return Ok(None);
        }
        let rt = &mut self.vips[v].backends[b];
        if rt.local == ev.health {
            // From a checker restarted with the state it reports.
            return Ok(None);
        }
        rt.local = ev.health;
        if self.agreed_health {
            // The fleet decides; this node's view goes into its report.
            return Ok(Some(HealthApplied {
                vip: self.vips[v].config.spec.to_string(),
                status: self.vips[v].backends[b].status.clone(),
                flap_hold: None,
            }));
        }
        self.apply_health(v, b, ev.health, now)
    }

    /// Fleet mode: the health the fleet agreed on for a backend.
    pub fn set_agreed_health(
        &mut self,
        vip: &VipSpec,
        addr: IpAddr,
        health: Health,
        now: Instant,
    ) -> Result<Option<HealthApplied>> {
        let Ok(v) = self.vip_index(vip) else {
            return Ok(None);
        };
        let Ok(b) = self.backend_index(v, addr) else {
            return Ok(None);
        };
        self.apply_health(v, b, health, now)
    }

    /// Fleet mode: decide health from the fleet's agreement (`true`) or,
    /// when etcd has been away longer than the lease, from this node's own
    /// checks (`false`: every backend takes its local state at once).
    pub fn agree_on_health(&mut self, agreed: bool, now: Instant) -> Vec<HealthApplied> {
        self.agreed_health = agreed;
        let mut out = Vec::new();
        if agreed {
            return out;
        }
        for v in 0..self.vips.len() {
            for b in 0..self.vips[v].backends.len() {
                let local = self.vips[v].backends[b].local;
                match self.apply_health(v, b, local, now) {
                    Ok(Some(a)) => out.push(a),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "applying local health"),
                }
            }
        }
        out
    }

    pub fn agreeing_on_health(&self) -> bool {
        self.agreed_health
    }

    /// Each VIP's backends this node's checks see up and down (unchecked
    /// ones in neither), for its fleet report.
    pub fn local_views(&self) -> BTreeMap<String, (Vec<IpAddr>, Vec<IpAddr>)> {
        self.vips
            .iter()
            .map(|v| {
                let pick = |h: Health| {
                    v.backends
                        .iter()
                        .filter(|b| b.local == h)
                        .map(|b| b.status.address)
                        .collect()
                };
                (
                    v.config.spec.to_string(),
                    (pick(Health::Up), pick(Health::Down)),
                )
            })
            .collect()
    }

    /// The agreed health of every backend, for the fleet's agreement.
    pub fn agreed_views(&self) -> Vec<(VipSpec, IpAddr, Health)> {
        self.vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(move |b| (v.config.spec, b.status.address, b.status.health))
            })
            .collect()
    }

    /// A backend's health changes: counted towards flap damping (a first
    /// result is news, not a change), then its VIP's ring.
    fn apply_health(
        &mut self,
        v: usize,
        b: usize,
        health: Health,
        now: Instant,
    ) -> Result<Option<HealthApplied>> {
        let damping = self.vips[v].config.health_check.flap;
        let rt = &mut self.vips[v].backends[b];
        let was = rt.status.health;
        if was == health {
            return Ok(None);
        }
        let ev_health = health;
        rt.status.health = health;
        let mut hold = None;
        if was != Health::Unchecked {
            rt.status.health_changes += 1;
            if let Some(FlapEvent::Held(d)) = rt.flaps.change(now, &damping) {
                hold = Some(d);
            }
        }
        rt.status.flap_held = rt.flaps.held();
        if ev_health == Health::Up && rt.status.state != BackendState::Up {
            rt.member_since = Some(now);
        }
        self.refresh_vip(v, now)?;
        Ok(Some(HealthApplied {
            vip: self.vips[v].config.spec.to_string(),
            status: self.vips[v].backends[b].status.clone(),
            flap_hold: hold,
        }))
    }

    /// What passes with time: slow starts and weight ramps step, flap holds
    /// end. Republishes only the rings that changed; returns the holds that
    /// ended or were extended, for the log.
    pub fn tick(&mut self, now: Instant) -> Vec<(String, IpAddr, FlapEvent)> {
        let mut events = Vec::new();
        for v in 0..self.vips.len() {
            let damping = self.vips[v].config.health_check.flap;
            let spec = self.vips[v].config.spec.to_string();
            for rt in &mut self.vips[v].backends {
                if let Some(ev) = rt.flaps.tick(now, &damping) {
                    if ev == FlapEvent::Released
                        && rt.status.health == Health::Up
                        && rt.status.state != BackendState::Up
                    {
                        rt.member_since = Some(now);
                    }
                    rt.status.flap_held = rt.flaps.held();
                    events.push((spec.clone(), rt.status.address, ev));
                }
                if rt
                    .ramp
                    .is_some_and(|r| now.saturating_duration_since(r.start) >= r.over)
                {
                    rt.ramp = None;
                }
            }
            if let Err(e) = self.refresh_vip(v, now) {
                tracing::error!(vip = %spec, error = %format!("{e:#}"), "republishing a ring");
            }
        }
        events
    }

    /// Every health check to run.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        (0..self.vips.len())
            .flat_map(|v| self.targets_of(v))
            .collect()
    }

    fn targets_of(&self, v: usize) -> Vec<HealthTarget> {
        let rt = &self.vips[v];
        if rt.config.health_check.kind == CheckKind::None {
            return Vec::new();
        }
        let port = rt.config.health_check.port.unwrap_or(rt.config.spec.port);
        rt.backends
            .iter()
            .map(|b| HealthTarget {
                id: b.status.id,
                addr: SocketAddr::new(b.status.address, port),
                check: rt.config.health_check.clone(),
                initial: b.local,
                token: b.token,
            })
            .collect()
    }

    pub fn list(&self) -> Vec<VipStatus> {
        self.vips
            .iter()
            .map(|v| VipStatus {
                vip: v.config.spec.to_string(),
                id: v.vip_id,
                ring_flips: v.ring_flips,
                panic: v.panic,
                ring_fingerprint: format!("{:016x}", v.fingerprint),
                mode: v.config.mode.to_string(),
                backends: v.backends.iter().map(|b| b.status.clone()).collect(),
            })
            .collect()
    }

    /// The attached interface's index (for following its MTU).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Follows the interface's MTU: frames that would not fit are dropped
    /// and counted rather than sent into the driver. Returns whether it
    /// changed.
    pub fn set_mtu(&mut self, mtu: u32) -> Result<bool> {
        let mut cfg = programming::config(&self.ebpf)?;
        let want = max_frame_len(mtu);
        if cfg.max_frame_len == want {
            return Ok(false);
        }
        tracing::info!(mtu, "interface MTU changed");
        cfg.max_frame_len = want;
        programming::set_config(&mut self.ebpf, &cfg)?;
        Ok(true)
    }

    /// Every backend address (for refreshing next hops).
    pub fn backend_addresses(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.status.address))
            .collect();
        set.into_iter().collect()
    }

    /// Where the data plane's maps are pinned (for counting the connection
    /// table off the main loop).
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// From now on, exiting detaches and unpins everything; no VIP is
    /// announced any more.
    pub fn detach_on_exit(&mut self) {
        self.config.on_exit = OnExit::Detach;
        self.attached = false;
    }

    /// Whether exiting detaches the data plane (its VIPs must be withdrawn
    /// first).
    pub fn detaches_on_exit(&self) -> bool {
        self.config.on_exit == OnExit::Detach
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Ends this lbd. `on_exit = "keep"`: the pinned program and maps keep
    /// forwarding until the next lbd adopts them. `"detach"`: everything is
    /// unpinned and the program detaches.
    pub fn shutdown(self) -> Result<()> {
        match self.config.on_exit {
            OnExit::Keep => {
                tracing::info!(pins = %self.pin_dir.display(), "exiting; the data plane keeps running");
            }
            OnExit::Detach => {
                pinning::teardown(&self.pin_dir)?;
                tracing::info!("data plane detached and unpinned");
            }
        }
        Ok(())
    }
}
