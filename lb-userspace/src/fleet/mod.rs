//! Fleet mode: the fleet's desired state in etcd, one document every node
//! applies in revision order, and each node's report under a lease.
//!
//! Keys, under `/xdplb/<cluster>/`:
//! - `desired`: the [`Desired`] document (JSON). Every change is a
//!   transaction guarded by the document's revision the change was made
//!   against: a concurrent change is refused, never lost.
//! - `nodes/<node>`: a [`NodeReport`] (the revision the node has applied
//!   and each VIP's ring fingerprint), under the node's lease: a node that
//!   stops renewing disappears from `lbctl fleet status`.

pub mod desired;
pub mod node;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use desired::{Change, Desired};

use crate::config::FleetConfig;

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    /// The desired state's revision this node has applied.
    pub applied_revision: i64,
    /// Per VIP, its live ring's fingerprint.
    pub fingerprints: BTreeMap<String, String>,
    /// Per VIP, the backends this node's own checks see up, and down
    /// (neither: not checked yet): its vote in the fleet's agreement.
    #[serde(default)]
    pub up: BTreeMap<String, Vec<std::net::IpAddr>>,
    #[serde(default)]
    pub down: BTreeMap<String, Vec<std::net::IpAddr>>,
}

/// The fleet's rule for a backend's health: up when more than half of the
/// live nodes' checks see it up, down when more than half see it down,
/// otherwise as it was (a split or an absent vote changes nothing). Every
/// node computes it from the same reports, so every node builds the same
/// ring; a node whose checks alone fail (its own path to the backend) does
/// not take the backend out of the fleet.
pub fn agree(
    reports: &[NodeReport],
    vip: &str,
    addr: std::net::IpAddr,
    previous: crate::health::Health,
) -> crate::health::Health {
    use crate::health::Health;
    let votes = |side: &BTreeMap<String, Vec<std::net::IpAddr>>| -> usize {
        usize::from(side.get(vip).is_some_and(|l| l.contains(&addr)))
    };
    let live = reports.len();
    let up: usize = reports.iter().map(|r| votes(&r.up)).sum();
    let down: usize = reports.iter().map(|r| votes(&r.down)).sum();
    if up * 2 > live {
        Health::Up
    } else if down * 2 > live {
        Health::Down
    } else {
        previous
    }
}

/// `lbctl fleet status`: every live node, and whether their rings agree.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetStatus {
    pub cluster: String,
    /// The desired state's current revision in etcd.
    pub revision: i64,
    pub nodes: Vec<NodeReport>,
    /// Nodes whose fingerprint for some VIP differs from the most common
    /// one, or that have not applied the current revision.
    pub disagreeing: Vec<String>,
}

impl FleetStatus {
    /// Flags every node behind the current revision or with a fingerprint
    /// that differs from the majority's for that VIP.
    pub fn new(cluster: String, revision: i64, nodes: Vec<NodeReport>) -> FleetStatus {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for n in &nodes {
            for (vip, fp) in &n.fingerprints {
                *counts.entry((vip, fp)).or_default() += 1;
            }
        }
        let mut majority: BTreeMap<&str, (&str, usize)> = BTreeMap::new();
        for ((vip, fp), n) in &counts {
            let best = majority.entry(vip).or_insert((fp, 0));
            if *n > best.1 {
                *best = (fp, *n);
            }
        }
        let disagreeing = nodes
            .iter()
            .filter(|n| {
                n.applied_revision != revision
                    || majority.iter().any(|(vip, (fp, _))| {
                        n.fingerprints.get(*vip).map(String::as_str) != Some(*fp)
                    })
            })
            .map(|n| n.node.clone())
            .collect();
        FleetStatus {
            cluster,
            revision,
            nodes,
            disagreeing,
        }
    }
}

/// A change refused because the desired state moved on since the revision
/// it was made against.
#[derive(Debug, thiserror::Error)]
#[error(
    "the fleet's desired state changed (this change was made against revision {expected}, it is now at {now}): \
     nothing was changed; look again (lbctl list) and retry"
)]
pub struct Conflict {
    pub expected: i64,
    pub now: i64,
}

/// This node's connections to one cluster's etcd: one client per endpoint,
/// made when first needed; a request that fails on one endpoint is tried
/// on the next, so losing a member of the etcd cluster changes nothing.
#[derive(Clone)]
pub struct Store {
    endpoints: Arc<Vec<String>>,
    clients: Arc<Mutex<Vec<Option<Client>>>>,
    /// The endpoint that answered last.
    preferred: Arc<AtomicUsize>,
    prefix: String,
    pub node: String,
    timeout: Duration,
}

/// An update of the desired state from the watch: the document and its
/// revision, or why it could not be read.
pub struct Update {
    pub revision: i64,
    pub desired: Result<Desired, String>,
}

impl Store {
    /// A store for `cfg`'s cluster; connects to the first endpoint that
    /// answers.
    pub async fn connect(cfg: &FleetConfig) -> Result<Store> {
        let store = Store {
            endpoints: Arc::new(cfg.endpoints.clone()),
            clients: Arc::new(Mutex::new(vec![None; cfg.endpoints.len()])),
            preferred: Arc::new(AtomicUsize::new(0)),
            prefix: format!("/xdplb/{}/", cfg.cluster),
            node: cfg.node.clone(),
            timeout: cfg.timeout,
        };
        store
            .on_any(
                "connecting",
                |mut c| async move { c.status().await.map(drop) },
            )
            .await
            .with_context(|| {
                format!("fleet: connecting to etcd at {}", cfg.endpoints.join(", "))
            })?;
        Ok(store)
    }

    /// The client of the preferred endpoint, connected if need be.
    async fn client(&self) -> Result<Client> {
        let i = self.preferred.load(Ordering::Relaxed) % self.endpoints.len();
        let cached = self
            .clients
            .lock()
            .map_err(|_| anyhow!("etcd clients poisoned"))?[i]
            .clone();
        if let Some(c) = cached {
            return Ok(c);
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(1), self.timeout);
        let endpoint = self.endpoints[i].clone();
        let c = tokio::time::timeout(
            self.timeout,
            Client::connect([endpoint.clone()], Some(opts)),
        )
        .await
        .map_err(|_| anyhow!("{endpoint}: no answer within {:?}", self.timeout))?
        .with_context(|| format!("connecting to {endpoint}"))?;
        if let Ok(mut all) = self.clients.lock() {
            all[i] = Some(c.clone());
        }
        Ok(c)
    }

    /// The next endpoint is preferred from now on.
    fn rotate(&self) {
        self.preferred.fetch_add(1, Ordering::Relaxed);
    }

    /// `f` on the preferred endpoint, then on each other one until one
    /// answers.
    async fn on_any<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = anyhow!("etcd: {what}: no endpoint");
        for _ in 0..self.endpoints.len() {
            let attempt = match self.client().await {
                Ok(c) => self.bounded(what, f(c)).await,
                Err(e) => Err(e.context(format!("etcd: {what}"))),
            };
            match attempt {
                Ok(v) => return Ok(v),
                Err(e) => {
                    last = e;
                    self.rotate();
                }
            }
        }
        Err(last)
    }

    fn desired_key(&self) -> String {
        format!("{}desired", self.prefix)
    }

    fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.with_context(|| format!("etcd: {what}")),
            Err(_) => bail!("etcd: {what}: no answer within {:?}", self.timeout),
        }
    }

    /// The desired state and the revision it was last changed at; `None`
    /// before anyone seeded it.
    pub async fn desired(&self) -> Result<Option<(Desired, i64)>> {
        let key = self.desired_key();
        let r = self
            .on_any("reading the desired state", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let Some(kv) = r.kvs().first() else {
            return Ok(None);
        };
        let d = serde_json::from_slice(kv.value()).with_context(|| {
            format!(
                "etcd: {} is not a desired-state document",
                self.desired_key()
            )
        })?;
        Ok(Some((d, kv.mod_revision())))
    }

    /// Writes `d` if the desired state is still at `expected` (0: absent).
    /// Returns the new revision.
    pub async fn write(&self, d: &Desired, expected: i64) -> Result<Result<i64, Conflict>> {
        let key = self.desired_key();
        let body = serde_json::to_vec(d).context("encoding the desired state")?;
        let guard = if expected == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, expected)
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(key.clone(), body, None)])
            .or_else([TxnOp::get(key, None)]);
        let r = self
            .on_any("writing the desired state", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = r.header().map_or(0, |h| h.revision());
        if r.succeeded() {
            return Ok(Ok(revision));
        }
        let now = r
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                _ => None,
            })
            .unwrap_or(0);
        Ok(Err(Conflict { expected, now }))
    }

    /// Follows the desired state from revision `from` on, forever: every
    /// change is sent in revision order; a broken watch is opened again
    /// from the revision after the last one sent, so nothing is skipped.
    pub fn follow(&self, mut from: i64, tx: mpsc::Sender<Update>) {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                match store.watch_once(from, &tx).await {
                    Ok(last) => from = last + 1,
                    Err((last, e)) => {
                        from = last + 1;
                        store.rotate();
                        tracing::warn!(error = %format!("{e:#}"), "fleet: watching the desired state; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
    }

    /// One watch until it breaks; returns the last revision sent.
    async fn watch_once(
        &self,
        from: i64,
        tx: &mpsc::Sender<Update>,
    ) -> Result<i64, (i64, anyhow::Error)> {
        let mut last = from - 1;
        let mut c = self.client().await.map_err(|e| (last, e))?;
        let opts = WatchOptions::new().with_start_revision(from);
        let mut stream = c
            .watch(self.desired_key(), Some(opts))
            .await
            .map_err(|e| (last, e.into()))?;
        while let Some(resp) = stream.message().await.map_err(|e| (last, e.into()))? {
            if resp.canceled() {
                return Err((last, anyhow!("watch cancelled: {}", resp.cancel_reason())));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                last = kv.mod_revision();
                let desired = match ev.event_type() {
                    EventType::Put => serde_json::from_slice(kv.value())
                        .map_err(|e| format!("not a desired-state document: {e}")),
                    EventType::Delete => Err("the desired state was deleted".to_owned()),
                };
                if tx
                    .send(Update {
                        revision: last,
                        desired,
                    })
                    .await
                    .is_err()
                {
                    return Ok(last);
                }
            }
        }
        Err((last, anyhow!("the watch ended")))
    }

    /// Keeps this node's report under a lease, renewed in the background;
    /// the latest report is written on every change and whenever the lease
    /// had to be granted again (etcd away longer than the lease).
    pub fn report(&self, lease: Duration, mut rx: tokio::sync::watch::Receiver<NodeReport>) {
        let store = self.clone();
        tokio::spawn(async move {
            let ttl = lease.as_secs().max(2) as i64;
            loop {
                if let Err(e) = store.report_under_lease(ttl, &mut rx).await {
                    store.rotate();
                    tracing::warn!(error = %format!("{e:#}"), "fleet: reporting this node; retrying");
                }
                if rx.has_changed().is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    async fn report_under_lease(
        &self,
        ttl: i64,
        rx: &mut tokio::sync::watch::Receiver<NodeReport>,
    ) -> Result<()> {
        let mut c = self.client().await?;
        let lease = self
            .bounded("granting a lease", c.lease_grant(ttl, None))
            .await?;
        let id = lease.id();
        let (mut keeper, mut acks) = self
            .bounded("keeping the lease alive", c.lease_keep_alive(id))
            .await?;
        let key = format!("{}{}", self.nodes_prefix(), self.node);
        let mut tick = tokio::time::interval(Duration::from_secs((ttl as u64 / 3).max(1)));
        loop {
            let report = rx.borrow_and_update().clone();
            let body = serde_json::to_vec(&report)?;
            self.bounded(
                "writing this node's report",
                c.put(key.clone(), body, Some(PutOptions::new().with_lease(id))),
            )
            .await?;
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        break;
                    }
                    _ = tick.tick() => {
                        self.bounded("renewing the lease", keeper.keep_alive()).await?;
                        let ack = tokio::time::timeout(self.timeout, acks.message()).await;
                        match ack {
                            Ok(Ok(Some(a))) if a.ttl() > 0 => {}
                            _ => bail!("the lease expired or etcd did not answer"),
                        }
                    }
                }
            }
        }
    }

    /// Every live node's report.
    pub async fn reports(&self) -> Result<Vec<NodeReport>> {
        let prefix = self.nodes_prefix();
        let r = self
            .on_any("reading the node reports", |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect())
    }

    /// Every live node's report, and the desired state's revision.
    pub async fn status(&self, cluster: &str) -> Result<FleetStatus> {
        let nodes = self.reports().await?;
        let revision = self.desired().await?.map_or(0, |(_, rev)| rev);
        Ok(FleetStatus::new(cluster.to_owned(), revision, nodes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, rev: i64, fp: &str) -> NodeReport {
        NodeReport {
            node: node.into(),
            applied_revision: rev,
            fingerprints: BTreeMap::from([("198.18.100.1:80/tcp".to_owned(), fp.to_owned())]),
            up: BTreeMap::new(),
            down: BTreeMap::new(),
        }
    }

    #[test]
    fn a_backend_leaves_when_most_live_nodes_see_it_down() {
        use crate::health::Health;
        let vip = "198.18.100.1:80/tcp";
        let b: std::net::IpAddr = "198.18.0.20".parse().unwrap();
        let vote = |node: &str, up: bool| {
            let mut r = report(node, 1, "aa");
            let side = if up { &mut r.up } else { &mut r.down };
            side.insert(vip.to_owned(), vec![b]);
            r
        };
        let one_down = [vote("a", true), vote("b", true), vote("c", false)];
        assert_eq!(
            agree(&one_down, vip, b, Health::Up),
            Health::Up,
            "one node's view"
        );
        let two_down = [vote("a", true), vote("b", false), vote("c", false)];
        assert_eq!(agree(&two_down, vip, b, Health::Up), Health::Down);
        // A split (one node not voting yet) keeps what was agreed.
        let split = [vote("a", true), vote("b", false), report("c", 1, "aa")];
        assert_eq!(agree(&split, vip, b, Health::Down), Health::Down);
        assert_eq!(agree(&split, vip, b, Health::Up), Health::Up);
        // A new backend enters once most nodes' checks passed.
        let fresh = [vote("a", true), vote("b", true), report("c", 1, "aa")];
        assert_eq!(agree(&fresh, vip, b, Health::Unchecked), Health::Up);
        // A single node decides alone.
        assert_eq!(agree(&[vote("a", false)], vip, b, Health::Up), Health::Down);
    }

    #[test]
    fn status_flags_a_node_behind_or_with_another_ring() {
        let s = FleetStatus::new(
            "c".into(),
            9,
            vec![
                report("a", 9, "aa"),
                report("b", 9, "aa"),
                report("c", 9, "bb"),
            ],
        );
        assert_eq!(s.disagreeing, vec!["c"]);
        let s = FleetStatus::new(
            "c".into(),
            9,
            vec![report("a", 9, "aa"), report("b", 8, "aa")],
        );
        assert_eq!(s.disagreeing, vec!["b"], "behind the current revision");
        let s = FleetStatus::new(
            "c".into(),
            9,
            vec![report("a", 9, "aa"), report("b", 9, "aa")],
        );
        assert!(s.disagreeing.is_empty());
    }
}
