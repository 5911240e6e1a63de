//! Changes made through the control API: backends added, removed, drained
//! and reweighted, VIPs added and removed. Each is checked first, then
//! applied to the maps (the VIP's ring republished), and reported to the
//! caller with the HTTP status the control API answers with.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::maps::{self as wire, BackendInfo};

use super::{Controller, HealthTarget, VipRuntime, persist::SavedVip};
use crate::{
    api::BackendStatus,
    config::{
        BackendRule, CheckKind, ForwardMode, HealthCheck, MAX_SLOWSTART, MAX_WEIGHT, VipConfig,
        VipSpec, check_backend,
    },
    membership::WeightRamp,
    neigh::NextHop,
    programming,
};

/// Admin errors, each with the HTTP status the control API answers with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no VIP {0} is configured")]
    UnknownVip(String),
    #[error("{backend} is not a backend of {vip}")]
    UnknownBackend { vip: String, backend: IpAddr },
    #[error("{backend} is already a backend of {vip}")]
    DuplicateBackend { vip: String, backend: IpAddr },
    #[error("weight {0} is out of range (0..={MAX_WEIGHT}; 0 drains)")]
    Weight(u32),
    #[error("{0}")]
    Invalid(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

/// A backend refused by the backend rules, as the control API says it.
impl From<BackendRule> for AdminError {
    fn from(rule: BackendRule) -> Self {
        match rule {
            BackendRule::ListedTwice { vip, addr } => AdminError::DuplicateBackend {
                vip: vip.to_string(),
                backend: addr,
            },
            BackendRule::Weight { weight } => AdminError::Weight(weight),
            other => AdminError::Invalid(other.to_string()),
        }
    }
}

impl AdminError {
    pub fn http_status(&self) -> u16 {
        match self {
            AdminError::UnknownVip(_) | AdminError::UnknownBackend { .. } => 404,
            AdminError::DuplicateBackend { .. } => 409,
            AdminError::Weight(_) | AdminError::Invalid(_) => 400,
            AdminError::Internal(_) => 500,
        }
    }
}

/// Health check from the `lbctl vip add --check` syntax: `none`, `tcp`,
/// `http:/path` (default timings: 2 s interval, 1 s timeout, rise 2, fall 3).
pub fn parse_check(s: &str) -> Result<HealthCheck, String> {
    let kind = match s {
        "none" => CheckKind::None,
        "tcp" => CheckKind::Tcp,
        _ => match s.strip_prefix("http:") {
            Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                CheckKind::Http {
                    path: path.to_owned(),
                    expect_status: 200,
                    host: None,
                }
            }
            _ => {
                return Err(format!(
                    "health check {s:?}: expected none, tcp or http:/PATH"
                ));
            }
        },
    };
    Ok(HealthCheck::with_defaults(kind))
}

/// A backend to add once its next hop is known: [`Controller::prepare_backend`]
/// made it, [`Controller::commit_backend`] takes it with the next hop that
/// was resolved off the main loop.
#[derive(Clone, Copy, Debug)]
pub struct NewBackend {
    pub vip: VipSpec,
    pub addr: IpAddr,
    pub weight: u32,
}

impl Controller {
    /// Checks a backend to add against the backend rules (the ones the
    /// configuration file is checked with) and the VIP's backends; nothing
    /// changes yet: its next hop is resolved next, off the main loop.
    pub fn prepare_backend(
        &self,
        vip: &VipSpec,
        addr: IpAddr,
        weight: u32,
    ) -> Result<NewBackend, AdminError> {
        let v = self.vip_index(vip)?;
        let existing: BTreeSet<IpAddr> = self.vips[v]
            .backends
            .iter()
            .map(|b| b.status.address)
            .collect();
        let mode = self.vips[v].config.mode;
        check_backend(
            vip,
            mode,
            addr,
            weight,
            self.config.encap_sources(),
            &existing,
        )
        .map_err(AdminError::from)?;
        Ok(NewBackend {
            vip: *vip,
            addr,
            weight,
        })
    }

    /// Adds a checked backend with its resolved next hop; returns its health
    /// check to start, if the VIP has one. Checked again: the VIP may have
    /// changed while the next hop was resolved.
    pub fn commit_backend(
        &mut self,
        new: NewBackend,
        hop: anyhow::Result<NextHop>,
    ) -> Result<Option<HealthTarget>, AdminError> {
        let NewBackend { vip, addr, weight } =
            self.prepare_backend(&new.vip, new.addr, new.weight)?;
        let hop = hop.map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
        self.check_interface(addr, &hop)
            .map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
        let v = self.vip_index(&vip)?;
        let id = self.alloc_id()?;
        let now = Instant::now();
        let checked = self.vips[v].config.health_check.kind != CheckKind::None;
        let rt = self.added_backend(checked, addr, id, weight, hop, now);
        self.vips[v].backends.push(rt);
        let b = self.vips[v].backends.len() - 1;
        let programmed = self
            .fresh_slot(id)
            .and_then(|()| self.write_backend(v, b))
            .and_then(|()| self.refresh_vip(v, now).map(drop));
        if let Err(e) = programmed {
            self.vips[v].backends.pop();
            self.used_ids.remove(&id);
            return Err(e.into());
        }
        Ok(self.targets_of(v).into_iter().find(|t| t.id == id))
    }

    /// Removes a backend: out of the ring, and its flows re-picked. Returns
    /// its id (to stop its health check).
    pub fn remove_backend(&mut self, vip: &VipSpec, addr: IpAddr) -> Result<u32, AdminError> {
        let v = self.vip_index(vip)?;
        let b = self.backend_index(v, addr)?;
        let removed = self.vips[v].backends.remove(b);
        self.refresh_vip(v, Instant::now())?;
        // After the ring no longer names it: flows still pointing at the id
        // see an unused backend and are re-picked.
        self.free_slot(removed.status.id)?;
        Ok(removed.status.id)
    }

    pub fn set_drain(
        &mut self,
        vip: &VipSpec,
        addr: IpAddr,
        drained: bool,
    ) -> Result<BackendStatus, AdminError> {
        let v = self.vip_index(vip)?;
        let b = self.backend_index(v, addr)?;
        let now = Instant::now();
        let rt = &mut self.vips[v].backends[b];
        rt.cancel_ramp(now);
        if rt.status.drained && !drained {
            // Back in: slow start, as for a recovered backend.
            rt.member_since = Some(now);
        }
        rt.status.drained = drained;
        self.refresh_vip(v, now)?;
        Ok(self.vips[v].backends[b].status.clone())
    }

    /// Sets a backend's weight: at once, or `over` a period in steps (from
    /// where its weight is now), a ramp any other change to the backend
    /// cancels where it stands.
    pub fn set_weight(
        &mut self,
        vip: &VipSpec,
        addr: IpAddr,
        weight: u32,
        over: Option<Duration>,
    ) -> Result<BackendStatus, AdminError> {
        if weight > MAX_WEIGHT {
            return Err(AdminError::Weight(weight));
        }
        if let Some(d) = over
            && (d.is_zero() || d > MAX_SLOWSTART)
        {
            return Err(AdminError::Invalid(format!(
                "--over {d:?}: expected more than 0 and at most 60m"
            )));
        }
        let v = self.vip_index(vip)?;
        let b = self.backend_index(v, addr)?;
        let now = Instant::now();
        let rt = &mut self.vips[v].backends[b];
        rt.cancel_ramp(now);
        if rt.status.weight == 0 && weight > 0 && over.is_none() {
            // Back in from weight 0 at once: slow start, as for an undrain.
            rt.member_since = Some(now);
        }
        rt.ramp = over.map(|over| WeightRamp {
            from: rt.status.weight,
            start: now,
            over,
        });
        rt.status.weight = weight;
        self.refresh_vip(v, now)?;
        Ok(self.vips[v].backends[b].status.clone())
    }

    /// Adds a VIP with no backends yet.
    pub fn add_vip(
        &mut self,
        spec: VipSpec,
        mode: ForwardMode,
        check: &str,
    ) -> Result<(), AdminError> {
        if self.vips.iter().any(|v| v.config.spec == spec) {
            return Err(AdminError::Invalid(format!("VIP {spec} already exists")));
        }
        let health_check = parse_check(check).map_err(AdminError::Invalid)?;
        let vip_id = self.free_vip_id().ok_or_else(|| {
            AdminError::Invalid(format!(
                "all {} VIP slots are in use (dataplane.max_vips)",
                self.config.sizes.max_vips
            ))
        })?;
        let empty = vec![0; self.config.sizes.ring_size as usize];
        self.install_vip(&spec, vip_id, mode, &empty)?;
        self.vips.push(VipRuntime::new(
            VipConfig::new(spec, mode, health_check),
            vip_id,
            Vec::new(),
        ));
        self.published(self.vips.len() - 1, &empty);
        let name = spec.to_string();
        self.overlay.removed_vips.remove(&name);
        self.overlay.added_vips.insert(
            name,
            SavedVip {
                mode,
                check: check.to_owned(),
            },
        );
        Ok(())
    }

    /// Removes a VIP: its traffic goes to the kernel again, its backends'
    /// slots are freed. Returns their ids (to stop their health checks).
    pub fn remove_vip(&mut self, spec: &VipSpec) -> Result<Vec<u32>, AdminError> {
        let ids = self.drop_vip(spec)?;
        let name = spec.to_string();
        if self.overlay.added_vips.remove(&name).is_none() {
            self.overlay.removed_vips.insert(name);
        }
        Ok(ids)
    }

    /// Takes a VIP out of the data plane and frees its backends' slots;
    /// returns their ids.
    pub(super) fn drop_vip(&mut self, spec: &VipSpec) -> Result<Vec<u32>, AdminError> {
        let v = self.vip_index(spec)?;
        programming::remove_vip(&mut self.ebpf, &spec.key())?;
        let rt = self.vips.remove(v);
        let mut ids = Vec::new();
        for b in rt.backends {
            self.free_slot(b.status.id)?;
            ids.push(b.status.id);
        }
        Ok(ids)
    }

    /// Turns the data plane's debug events on or off (one CONFIG update).
    pub fn set_debug(&mut self, on: bool) -> Result<(), AdminError> {
        let mut cfg = programming::config(&self.ebpf)?;
        if on {
            cfg.flags |= wire::CONFIG_FLAG_DEBUG;
        } else {
            cfg.flags &= !wire::CONFIG_FLAG_DEBUG;
        }
        programming::set_config(&mut self.ebpf, &cfg)?;
        Ok(())
    }

    /// Marks a backend slot unused in the data plane and frees its id.
    pub(super) fn free_slot(&mut self, id: u32) -> anyhow::Result<()> {
        let info = BackendInfo {
            state: wire::BackendState::Unused.wire(),
            ..Default::default()
        };
        programming::set_backend(&mut self.ebpf, id, &info)?;
        self.used_ids.remove(&id);
        Ok(())
    }

    /// Applies next hops resolved off the main loop: a backend whose next hop
    /// moved (a backend replaced, a gateway failed over) is rewritten; one
    /// that could not be resolved, or is now routed through another
    /// interface, keeps its last working one. Returns how many changed.
    pub fn apply_next_hops(&mut self, hops: &[(IpAddr, anyhow::Result<NextHop>)]) -> usize {
        let mut changed = 0;
        // One pass over the backends, each looking its address up: with a
        // thousand backends in each of ten VIPs, not ten million compares
        // per refresh.
        let hops: std::collections::HashMap<IpAddr, &NextHop> = hops
            .iter()
            .filter_map(|(addr, hop)| Some((*addr, hop.as_ref().ok()?)))
            .collect();
        for v in 0..self.vips.len() {
            for b in 0..self.vips[v].backends.len() {
                let addr = self.vips[v].backends[b].status.address;
                let Some(&hop) = hops.get(&addr) else {
                    continue;
                };
                if self.vips[v].backends[b].hop == *hop {
                    continue;
                }
                if let Err(e) = self.check_interface(addr, hop) {
                    tracing::warn!(backend = %addr, error = %format!("{e:#}"), "keeping the backend's last next hop");
                    continue;
                }
                tracing::info!(backend = %addr, mac = ?hop.mac, "next hop changed");
                let old = std::mem::replace(&mut self.vips[v].backends[b].hop, *hop);
                if let Err(e) = self.write_backend(v, b) {
                    self.vips[v].backends[b].hop = old;
                    tracing::error!(backend = %addr, error = %format!("{e:#}"), "updating the next hop failed");
                    continue;
                }
                changed += 1;
            }
        }
        changed
    }
}
