//! The node as a member of a fleet: drained or not, which VIPs it
//! announces and why, and whether its rings match the data plane it
//! adopted.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use aya::Ebpf;

use super::Controller;
use crate::{
    announce::{self, VipAnnouncement},
    api::{AnnounceTarget, NodeStatus, VipNodeStatus},
    config::Config,
    programming,
};

/// When adopting a running data plane: how this lbd's rings would differ
/// from its (another hash seed or ring size: every flow's slot moves, and
/// on a fleet this node would stop agreeing with its peers). Refused unless
/// the operator said `--accept-ring-change`; returns the difference it
/// accepted.
pub(super) fn ring_change(ebpf: &Ebpf, config: &Config) -> Result<Option<String>> {
    let running = programming::config(ebpf)?;
    if running.ring_size == 0 {
        return Ok(None);
    }
    let mut changes = Vec::new();
    if running.hash_seed != config.hash_seed {
        changes.push(format!(
            "hash_seed {} -> {}",
            running.hash_seed, config.hash_seed
        ));
    }
    if running.ring_size != config.sizes.ring_size {
        changes.push(format!(
            "ring_size {} -> {}",
            running.ring_size, config.sizes.ring_size
        ));
    }
    if changes.is_empty() {
        return Ok(None);
    }
    let what = changes.join(", ");
    if !config.accept_ring_change {
        bail!(
            "the running data plane was built with other rings ({what}): every flow would move \
             to another backend, and on a fleet this node would disagree with its peers. Use the \
             same dataplane.hash_seed and ring_size as the rest of the fleet, or restart with \
             `lbd --accept-ring-change` if the whole fleet is changing"
        );
    }
    tracing::warn!(change = %what, "ADOPTED A DATA PLANE WITH OTHER RINGS (--accept-ring-change): established flows without a connection-table entry move, and this node disagrees with peers still on the old rings");
    Ok(Some(what))
}

impl Controller {
    pub fn node_drained(&self) -> bool {
        self.overlay.node_drained
    }

    /// `lbctl node drain` / `undrain`: withdraws (announces again) every
    /// VIP; forwarding is unchanged, so what still arrives is served.
    pub fn set_node_drained(&mut self, drained: bool) {
        self.overlay.node_drained = drained;
    }

    pub fn ring_change(&self) -> Option<&str> {
        self.ring_change.as_deref()
    }

    /// Each VIP's minimum of healthy backends to be announced.
    fn min_healthy(&self) -> BTreeMap<String, u32> {
        let default = self
            .config
            .announce
            .as_ref()
            .map_or(1, |a| a.min_healthy_backends);
        self.vips
            .iter()
            .map(|v| {
                (
                    v.config.spec.to_string(),
                    v.config.min_healthy_backends.unwrap_or(default),
                )
            })
            .collect()
    }

    /// The node's status for `lbctl node status` and `/metrics`;
    /// `installed`: what the announcer last wrote.
    pub fn node_status(&self, installed: Option<&announce::Installed>) -> NodeStatus {
        let routes = installed.map(|i| &i.routes);
        let saves = self
            .save_record
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        NodeStatus {
            drained: self.overlay.node_drained,
            announce: self.config.announce.as_ref().map(|a| AnnounceTarget {
                table: a.table,
                device: a.device.clone(),
            }),
            hash_seed: self.config.hash_seed,
            ring_size: self.config.sizes.ring_size,
            ring_change: self.ring_change.clone(),
            vips: self
                .announcement()
                .into_iter()
                .map(|decision| VipNodeStatus {
                    route_installed: routes.is_some_and(|r| r.contains(&decision.address)),
                    decision,
                })
                .collect(),
            routes_error: installed.and_then(|i| i.error.clone()),
            state_save_failures: saves.failures,
            state_save_error: saves.last_error,
        }
    }

    /// Whether each VIP should be announced by this node now, and why.
    pub fn announcement(&self) -> Vec<VipAnnouncement> {
        announce::plan(
            &self.list(),
            &self.min_healthy(),
            self.overlay.node_drained,
            self.attached,
        )
    }
}
