//! This node in fleet mode, as lbd's main loop drives it: the desired state
//! it has applied, changes it wrote and waits to apply, updates from the
//! watch (applied one at a time, in revision order) and its report.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::{Conflict, Desired, FleetStatus, NodeReport, Store, Update, desired::Drained};
use crate::{
    api::{
        handler::{self, SideEffects},
        server::ApiCall,
    },
    config::{Config, FleetConfig, VipConfig},
    controller::Controller,
    fleet::Change,
    neigh::NextHop,
};

/// A request and its answer.
pub type Answered = (ApiCall, (u16, Value));

/// What reaches the main loop from fleet tasks.
pub enum FleetMsg {
    /// A change of the desired state, from the watch.
    Update(Update),
    /// An update whose new backends' next hops were resolved.
    Resolved {
        revision: i64,
        desired: Box<Desired>,
        hops: Vec<(IpAddr, Result<NextHop>)>,
    },
    /// A change written (or refused) in etcd.
    Written {
        call: ApiCall,
        change: Option<Change>,
        result: Result<Result<i64, Conflict>>,
    },
    /// `lbctl fleet status`, read from etcd.
    Status {
        call: ApiCall,
        result: Result<FleetStatus>,
    },
    /// Every live node's report (or why they could not be read).
    Views(Result<Vec<NodeReport>>),
}

/// How often the nodes' reports are read for the health agreement: a
/// health change reaches every ring within about this (plus a check).
const VIEWS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The fleet's desired state at start: read from etcd, or seeded there from
/// `config` when the cluster has none yet. `config`'s VIPs become the
/// fleet's; returns the store, the state, its revision and its drains.
pub async fn start(config: &mut Config) -> Result<Option<(Store, Desired, i64, Drained)>> {
    let Some(fc) = config.fleet.clone() else {
        return Ok(None);
    };
    let store = Store::connect(&fc).await?;
    let (desired, revision) = match store.desired().await? {
        Some(found) => found,
        None => {
            let seed = Desired::from_config(config);
            match store.write(&seed, 0).await? {
                Ok(revision) => {
                    tracing::info!(cluster = %fc.cluster, revision, "fleet: seeded the desired state from this node's configuration");
                    (seed, revision)
                }
                // Another node seeded it first: take theirs.
                Err(_) => store
                    .desired()
                    .await?
                    .ok_or_else(|| anyhow!("fleet: the desired state vanished while seeding"))?,
            }
        }
    };
    check(config, &desired).map_err(|e| anyhow!("fleet: the desired state in etcd: {e}"))?;
    let (vips, drained) = desired.vip_configs().map_err(anyhow::Error::msg)?;
    config.vips = vips;
    tracing::info!(cluster = %fc.cluster, node = %fc.node, revision, vips = config.vips.len(), "fleet: desired state read");
    Ok(Some((store, desired, revision, drained)))
}

/// A desired state this node can apply: valid by the configuration's rules
/// and built with this node's hash seed and ring size (another would give
/// it other rings than its peers).
fn check(config: &Config, d: &Desired) -> Result<()> {
    d.validate(
        config.encap_sources(),
        config.sizes.max_vips,
        config.sizes.max_backends,
    )
    .map_err(anyhow::Error::msg)?;
    if d.hash_seed != config.hash_seed || d.ring_size != config.sizes.ring_size {
        bail!(
            "it is built with hash_seed {} and ring_size {}, this node's [dataplane] says {} and {}: \
             every node of a fleet needs the same",
            d.hash_seed,
            d.ring_size,
            config.hash_seed,
            config.sizes.ring_size
        );
    }
    Ok(())
}

/// Fleet mode's part of the main loop.
pub struct FleetNode {
    store: Store,
    cluster: String,
    pub applied: i64,
    desired: Desired,
    report: watch::Sender<NodeReport>,
    tx: mpsc::Sender<FleetMsg>,
    /// Changes written at a revision this node has not applied yet.
    pending: Vec<(i64, ApiCall, Option<Change>)>,
    /// An update is being resolved; the newest later one waits here.
    busy: bool,
    queued: Option<Update>,
    /// When the nodes' reports were last read: etcd away longer than the
    /// lease, this node falls back to its own checks.
    views_read: std::time::Instant,
    lease: std::time::Duration,
}

impl FleetNode {
    /// Starts following the desired state after `revision` and reporting
    /// this node; returns the node and the channel its messages come on.
    pub fn run(
        cfg: &FleetConfig,
        store: Store,
        desired: Desired,
        revision: i64,
        ctl: &Controller,
    ) -> (FleetNode, mpsc::Receiver<FleetMsg>) {
        let (tx, rx) = mpsc::channel(64);
        let (report, report_rx) = watch::channel(node_report(&cfg.node, revision, ctl));
        store.report(cfg.lease, report_rx);
        let (updates_tx, mut updates_rx) = mpsc::channel(16);
        store.follow(revision + 1, updates_tx);
        let forward = tx.clone();
        tokio::spawn(async move {
            while let Some(u) = updates_rx.recv().await {
                if forward.send(FleetMsg::Update(u)).await.is_err() {
                    return;
                }
            }
        });
        let (views_store, views_tx) = (store.clone(), tx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VIEWS_INTERVAL);
            loop {
                tick.tick().await;
                let views = views_store.reports().await;
                if views_tx.send(FleetMsg::Views(views)).await.is_err() {
                    return;
                }
            }
        });
        let node = FleetNode {
            store,
            cluster: cfg.cluster.clone(),
            applied: revision,
            desired,
            report,
            tx,
            pending: Vec::new(),
            busy: false,
            queued: None,
            views_read: std::time::Instant::now(),
            lease: cfg.lease,
        };
        (node, rx)
    }

    /// Refreshes this node's report (its applied revision and rings).
    pub fn report(&self, ctl: &Controller) {
        let now = node_report(&self.store.node, self.applied, ctl);
        self.report.send_if_modified(|r| {
            if *r == now {
                return false;
            }
            *r = now;
            true
        });
    }

    /// A change asked for through the control API: checked against the
    /// state this node applied, then written to etcd guarded by its
    /// revision. The answer comes once this node has applied it.
    /// `if_revision`: the caller's view (`lbctl --if-revision`); a change
    /// made against another revision than this node's is refused here.
    pub fn change(
        &mut self,
        ctl: &Controller,
        call: ApiCall,
        change: Change,
        if_revision: Option<i64>,
    ) -> Option<Answered> {
        if let Some(expected) = if_revision
            && expected != self.applied
        {
            let why = if expected < self.applied {
                Conflict {
                    expected,
                    now: self.applied,
                }
                .to_string()
            } else {
                format!(
                    "this node has applied revision {}, not yet {expected}: retry in a moment",
                    self.applied
                )
            };
            return Some((call, handler::err(409, why)));
        }
        let mut next = self.desired.clone();
        if let Err(e) = next.apply(&change, ctl.config().encap_sources()) {
            return Some((call, handler::admin(e)));
        }
        self.write(ctl, call, next, Some(change))
    }

    /// `lbctl fleet import FILE`: the file's VIPs as the fleet's desired
    /// state (no drains), guarded like any change.
    pub fn import(&mut self, ctl: &Controller, call: ApiCall, file: &Config) -> Option<Answered> {
        let next = Desired::from_config(file);
        self.write(ctl, call, next, None)
    }

    fn write(
        &mut self,
        ctl: &Controller,
        call: ApiCall,
        next: Desired,
        change: Option<Change>,
    ) -> Option<Answered> {
        if let Err(e) = check(ctl.config(), &next) {
            return Some((
                call,
                handler::err(400, format!("{e:#}; nothing was changed")),
            ));
        }
        let (store, tx, expected) = (self.store.clone(), self.tx.clone(), self.applied);
        tokio::spawn(async move {
            let result = store.write(&next, expected).await;
            let _ = tx
                .send(FleetMsg::Written {
                    call,
                    change,
                    result,
                })
                .await;
        });
        None
    }

    /// A write came back: answered now if this node already applied its
    /// revision (or it was refused), else when it does.
    pub fn written(
        &mut self,
        ctl: &Controller,
        call: ApiCall,
        change: Option<Change>,
        result: Result<Result<i64, Conflict>>,
    ) -> Option<Answered> {
        match result {
            Ok(Ok(revision)) if revision <= self.applied => {
                let answer = answer(ctl, change.as_ref(), self.applied);
                Some((call, answer))
            }
            Ok(Ok(revision)) => {
                self.pending.push((revision, call, change));
                None
            }
            Ok(Err(conflict)) => Some((call, handler::err(409, conflict.to_string()))),
            Err(e) => Some((
                call,
                handler::err(
                    503,
                    format!(
                        "etcd did not take the change ({e:#}): fleet changes are refused until it \
                         answers; this node keeps forwarding with the state of revision {}",
                        self.applied
                    ),
                ),
            )),
        }
    }

    /// The nodes' reports came (or not): each backend takes the health the
    /// fleet agrees on ([`super::agree`]); with etcd away longer than the
    /// lease, this node decides from its own checks until it is back.
    /// Returns the changes applied, for the log.
    pub fn views(
        &mut self,
        ctl: &mut Controller,
        views: Result<Vec<NodeReport>>,
    ) -> Vec<crate::controller::HealthApplied> {
        let now = std::time::Instant::now();
        let reports = match views {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => return Vec::new(),
            Err(e) => {
                if ctl.agreeing_on_health() && now.duration_since(self.views_read) > self.lease {
                    tracing::warn!(error = %format!("{e:#}"), "fleet: etcd away longer than the lease: health from this node's own checks until it is back");
                    crate::daemon::event(json!({"event": "fleet_health", "agreed": false}));
                    return ctl.agree_on_health(false, now);
                }
                return Vec::new();
            }
        };
        self.views_read = now;
        if !ctl.agreeing_on_health() {
            tracing::info!("fleet: health agreed by the fleet again");
            crate::daemon::event(json!({"event": "fleet_health", "agreed": true}));
            ctl.agree_on_health(true, now);
        }
        let mut out = Vec::new();
        for (vip, addr, was) in ctl.agreed_views() {
            let agreed = super::agree(&reports, &vip.to_string(), addr, was);
            if agreed == was {
                continue;
            }
            match ctl.set_agreed_health(&vip, addr, agreed, now) {
                Ok(Some(a)) => out.push(a),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "fleet: applying agreed health")
                }
            }
        }
        if !out.is_empty() {
            self.report(ctl);
        }
        out
    }

    /// `lbctl fleet status`, read in a task of its own.
    pub fn status(&self, call: ApiCall) {
        let (store, tx, cluster) = (self.store.clone(), self.tx.clone(), self.cluster.clone());
        tokio::spawn(async move {
            let result = store.status(&cluster).await;
            let _ = tx.send(FleetMsg::Status { call, result }).await;
        });
    }

    /// `lbctl fleet export`.
    pub fn export(&self) -> (u16, Value) {
        handler::ok(json!({
            "revision": self.applied,
            "toml": self.desired.to_toml(self.applied),
        }))
    }

    /// An update from the watch: resolved now, or after the one in
    /// flight (only the newest waiting one: each is the whole state).
    pub fn update(&mut self, ctl: &Controller, resolver: &crate::neigh::Resolver, u: Update) {
        if u.revision <= self.applied {
            return;
        }
        if self.busy {
            self.queued = Some(u);
            return;
        }
        let desired = match u.desired {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(revision = u.revision, error = %e, "fleet: an unusable desired state; keeping the one applied");
                return;
            }
        };
        let vips = match check(ctl.config(), &desired)
            .and_then(|()| desired.vip_configs().map_err(anyhow::Error::msg))
        {
            Ok((vips, _)) => vips,
            Err(e) => {
                tracing::error!(revision = u.revision, error = %format!("{e:#}"), "fleet: a desired state this node cannot apply; keeping the one applied");
                crate::daemon::event(
                    json!({"event": "fleet", "revision": u.revision, "ok": false, "error": format!("{e:#}")}),
                );
                return;
            }
        };
        let addrs = ctl.desired_needs(&vips);
        self.busy = true;
        let (resolver, tx, revision) = (resolver.clone(), self.tx.clone(), u.revision);
        tokio::spawn(async move {
            let hops = if addrs.is_empty() {
                Vec::new()
            } else {
                resolver
                    .resolve_many(&addrs, crate::controller::RESOLVE_TIMEOUT)
                    .await
            };
            let _ = tx
                .send(FleetMsg::Resolved {
                    revision,
                    desired: Box::new(desired),
                    hops,
                })
                .await;
        });
    }

    /// Applies a resolved update; returns the checks to start and stop, and
    /// the waiting changes it answers.
    pub fn apply(
        &mut self,
        ctl: &mut Controller,
        resolver: &crate::neigh::Resolver,
        revision: i64,
        desired: Desired,
        hops: Vec<(IpAddr, Result<NextHop>)>,
    ) -> (SideEffects, Vec<Answered>) {
        self.busy = false;
        let mut fx = SideEffects::default();
        let hops: BTreeMap<_, _> = hops.into_iter().collect();
        let applied = desired
            .vip_configs()
            .map_err(crate::controller::AdminError::Invalid)
            .and_then(|(vips, drained): (Vec<VipConfig>, Drained)| {
                ctl.apply_desired(vips, &drained, &hops)
            });
        match applied {
            Ok(r) => {
                fx.start_checks = r.start_checks;
                fx.stop_checks = r.stop_checks;
                self.applied = revision;
                self.desired = desired;
                if let Err(e) = ctl.persist() {
                    tracing::error!(error = %format!("{e:#}"), "fleet: saving the state file");
                }
                tracing::info!(
                    revision,
                    changes = r.diff.changes,
                    "fleet: desired state applied"
                );
                crate::daemon::event(
                    json!({"event": "fleet", "revision": revision, "ok": true, "changes": r.diff.changes}),
                );
            }
            Err(e) => {
                tracing::error!(revision, error = %e, "fleet: applying the desired state failed; keeping the one applied");
                crate::daemon::event(
                    json!({"event": "fleet", "revision": revision, "ok": false, "error": e.to_string()}),
                );
            }
        }
        self.report(ctl);
        let applied = self.applied;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(rev, _, _)| *rev <= applied);
        self.pending = waiting;
        let answers = done
            .into_iter()
            .map(|(_, call, change)| (call, answer(ctl, change.as_ref(), applied)))
            .collect();
        if let Some(next) = self.queued.take() {
            self.update(ctl, resolver, next);
        }
        (fx, answers)
    }
}

/// What a change answers once applied here (an import: its revision).
fn answer(ctl: &Controller, change: Option<&Change>, applied: i64) -> (u16, Value) {
    match change {
        Some(c) => handler::fleet_answer(ctl, c),
        None => handler::ok(json!({"imported": applied})),
    }
}

fn node_report(node: &str, applied: i64, ctl: &Controller) -> NodeReport {
    let mut up = BTreeMap::new();
    let mut down = BTreeMap::new();
    for (vip, (u, d)) in ctl.local_views() {
        up.insert(vip.clone(), u);
        down.insert(vip, d);
    }
    NodeReport {
        node: node.to_owned(),
        applied_revision: applied,
        fingerprints: ctl
            .list()
            .into_iter()
            .map(|v| (v.vip, v.ring_fingerprint))
            .collect(),
        up,
        down,
    }
}
