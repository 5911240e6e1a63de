//! Reloading the configuration file without a restart, and previewing what
//! a file would change. The file is laid under the runtime changes exactly
//! as at a start (`persist::merge`: a VIP whose backends were edited in the
//! file takes the file's; otherwise runtime changes stand), so a reload and
//! a restart agree. Only the difference is applied: a VIP that does not
//! change is not touched, its ring not republished.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use lb_common::maps::VipInfo;

use super::{AdminError, BackendRt, Controller, HealthTarget, VipRuntime, persist};
use crate::{
    config::{CheckKind, Config, VipConfig, VipSpec},
    diff::{self, ConfigDiff, CurrentBackend, CurrentVip},
    health::Health,
    membership::Member,
    neigh::NextHop,
    programming,
};

/// What a reload did, and the checks the main loop must start and stop.
pub struct Reloaded {
    pub diff: ConfigDiff,
    pub start_checks: Vec<HealthTarget>,
    pub stop_checks: Vec<u32>,
}

fn invalid(e: impl std::fmt::Display) -> AdminError {
    AdminError::Invalid(e.to_string())
}

impl Controller {
    /// Every VIP as it is now, for [`diff::diff`].
    fn current_vips(&self) -> Vec<CurrentVip> {
        self.vips
            .iter()
            .map(|v| CurrentVip {
                config: v.config.clone(),
                backends: v
                    .backends
                    .iter()
                    .map(|b| CurrentBackend {
                        addr: b.status.address,
                        member: b.member(&v.config),
                        effective_weight: b.status.effective_weight,
                    })
                    .collect(),
            })
            .collect()
    }

    /// `file` with this lbd's runtime changes laid over it, as a start
    /// would; refused if it changes a setting only a restart applies.
    fn merge_file(&self, mut file: Config) -> Result<(Config, persist::Overlay), AdminError> {
        let restart = self.config.restart_only_changes(&file);
        if !restart.is_empty() {
            return Err(invalid(format!(
                "{}: {} changed; a reload applies [[vip]] sections only, these need an lbd \
                 restart. Nothing was changed",
                file.file.display(),
                restart.join(", ")
            )));
        }
        let overlay = persist::merge(&mut file, &self.saved_state()).map_err(invalid)?;
        Ok((file, overlay))
    }

    /// What `file` would change, computed on the live state; nothing is
    /// applied.
    pub fn preview(&self, file: Config) -> Result<ConfigDiff, AdminError> {
        let (merged, _) = self.merge_file(file)?;
        self.diff_to(&merged)
    }

    fn diff_to(&self, merged: &Config) -> Result<ConfigDiff, AdminError> {
        diff::diff(
            &self.current_vips(),
            &merged.vips,
            self.config.sizes.ring_size,
            self.config.hash_seed,
            Instant::now(),
        )
        .map_err(invalid)
    }

    /// The backend addresses a reload to `file` adds, whose next hops must
    /// be resolved first (off the main loop).
    pub fn reload_needs(&self, file: &Config) -> Result<Vec<IpAddr>, AdminError> {
        let (merged, _) = self.merge_file(file.clone())?;
        Ok(self.added_backends(&merged).into_iter().collect())
    }

    fn added_backends(&self, merged: &Config) -> BTreeSet<IpAddr> {
        let mut out = BTreeSet::new();
        for v in &merged.vips {
            let now = self.vips.iter().find(|r| r.config.spec == v.spec);
            for b in &v.backends {
                if now.is_none_or(|r| r.backends.iter().all(|x| x.status.address != b.addr)) {
                    out.insert(b.addr);
                }
            }
        }
        out
    }

    /// Applies `file` (merged with the runtime changes): VIPs removed,
    /// changed and added, in that order, each VIP's ring republished only if
    /// it changed. Everything that can be refused (a setting that needs a
    /// restart, a next hop missing or through another interface, too few
    /// free slots) is checked before the first map write.
    pub fn apply_reload(
        &mut self,
        file: Config,
        hops: &BTreeMap<IpAddr, anyhow::Result<NextHop>>,
    ) -> Result<Reloaded, AdminError> {
        if self.fleet_mode {
            return Err(invalid(
                "fleet mode: VIPs and backends live in etcd, not in this file; change them with                  lbctl (on any node) or `lbctl fleet import FILE`. Nothing was changed",
            ));
        }
        let (merged, overlay) = self.merge_file(file)?;
        persist::log_overridden(&overlay);
        let configured = overlay.configured;
        let applied = self.apply_merged(merged, hops)?;
        self.overlay.configured = configured;
        Ok(applied)
    }

    /// Fleet mode: from now on VIPs and backends change only through
    /// [`Controller::apply_desired`].
    pub fn enter_fleet_mode(&mut self) {
        self.fleet_mode = true;
    }

    pub fn fleet_mode(&self) -> bool {
        self.fleet_mode
    }

    /// The backend addresses the fleet's desired `vips` add here (their
    /// next hops are resolved first).
    pub fn desired_needs(&self, vips: &[VipConfig]) -> Vec<IpAddr> {
        let mut merged = self.config.clone();
        merged.vips = vips.to_vec();
        self.added_backends(&merged).into_iter().collect()
    }

    /// Fleet mode: applies the fleet's desired state as a reload applies a
    /// file (only the difference), then its drains.
    pub fn apply_desired(
        &mut self,
        vips: Vec<VipConfig>,
        drained: &crate::fleet::desired::Drained,
        hops: &BTreeMap<IpAddr, anyhow::Result<NextHop>>,
    ) -> Result<Reloaded, AdminError> {
        let mut merged = self.config.clone();
        merged.vips = vips;
        let out = self.apply_merged(merged, hops)?;
        let now = Instant::now();
        for v in 0..self.vips.len() {
            let spec = self.vips[v].config.spec;
            let mut changed = false;
            for b in &mut self.vips[v].backends {
                let want = drained.contains(&(spec, b.status.address));
                if b.status.drained != want {
                    b.cancel_ramp(now);
                    if !want {
                        b.member_since = Some(now);
                    }
                    b.status.drained = want;
                    changed = true;
                }
            }
            if changed {
                self.refresh_vip(v, now)?;
            }
        }
        Ok(out)
    }

    /// Applies an already merged state: VIPs removed, changed and added.
    fn apply_merged(
        &mut self,
        merged: Config,
        hops: &BTreeMap<IpAddr, anyhow::Result<NextHop>>,
    ) -> Result<Reloaded, AdminError> {
        let diff = self.diff_to(&merged)?;
        let added = self.added_backends(&merged);
        for addr in &added {
            match hops.get(addr) {
                Some(Ok(hop)) => self.check_interface(*addr, hop).map_err(invalid)?,
                Some(Err(e)) => {
                    return Err(invalid(format!(
                        "backend {addr}: {e:#}; nothing was changed"
                    )));
                }
                None => {
                    return Err(invalid(format!(
                        "backend {addr}: its next hop was not resolved (the backends changed while                          the reload resolved next hops); nothing was changed, reload again"
                    )));
                }
            }
        }
        let removed_vips: Vec<VipSpec> = self
            .vips
            .iter()
            .map(|v| v.config.spec)
            .filter(|s| merged.vips.iter().all(|v| v.spec != *s))
            .collect();
        let new_backends: usize = merged
            .vips
            .iter()
            .map(|v| {
                let now = self.vips.iter().find(|r| r.config.spec == v.spec);
                v.backends
                    .iter()
                    .filter(|b| {
                        now.is_none_or(|r| r.backends.iter().all(|x| x.status.address != b.addr))
                    })
                    .count()
            })
            .sum();
        let free = (1..self.config.sizes.max_backends)
            .filter(|i| !self.used_ids.contains(i))
            .count();
        // Slots the reload frees are not counted: they are freed only once
        // the rings stop naming them, after the new backends are placed.
        if new_backends > free {
            return Err(invalid(format!(
                "{new_backends} backends to add, {free} backend slots free (dataplane.max_backends)"
            )));
        }
        let vips_after = merged.vips.len();
        if vips_after > self.config.sizes.max_vips as usize {
            return Err(invalid(format!(
                "{vips_after} VIPs, dataplane.max_vips is {}",
                self.config.sizes.max_vips
            )));
        }

        let now = Instant::now();
        let mut out = Reloaded {
            diff,
            start_checks: Vec::new(),
            stop_checks: Vec::new(),
        };
        for spec in removed_vips {
            out.stop_checks.extend(self.drop_vip(&spec)?);
        }
        for next in &merged.vips {
            match self.vip_index(&next.spec) {
                Ok(v) => self.reload_vip(v, next, hops, now, &mut out)?,
                Err(_) => self.add_configured_vip(next, hops, now, &mut out)?,
            }
        }
        self.config.vips = merged.vips;
        Ok(out)
    }

    /// A new backend of VIP `config`: unchecked until its first check
    /// passes, unless the VIP is not checked.
    fn new_backend(
        &mut self,
        config: &VipConfig,
        addr: IpAddr,
        weight: u32,
        hop: NextHop,
        now: Instant,
    ) -> Result<BackendRt, AdminError> {
        let id = self.alloc_id()?;
        self.fresh_slot(id)?;
        let checked = config.health_check.kind != CheckKind::None;
        Ok(self.added_backend(checked, addr, id, weight, hop, now))
    }

    fn hop(
        hops: &BTreeMap<IpAddr, anyhow::Result<NextHop>>,
        addr: IpAddr,
    ) -> Result<NextHop, AdminError> {
        match hops.get(&addr) {
            Some(Ok(h)) => Ok(*h),
            _ => Err(invalid(format!(
                "backend {addr}: its next hop was not resolved"
            ))),
        }
    }

    /// Brings VIP `v` to `next`: backends removed, reweighted and added,
    /// mode, check and settings; republished only if its ring changed.
    fn reload_vip(
        &mut self,
        v: usize,
        next: &VipConfig,
        hops: &BTreeMap<IpAddr, anyhow::Result<NextHop>>,
        now: Instant,
        out: &mut Reloaded,
    ) -> Result<(), AdminError> {
        let old = self.vips[v].config.clone();
        let mut freed = Vec::new();
        self.vips[v].backends.retain(|b| {
            let keep = next.backends.iter().any(|n| n.addr == b.status.address);
            if !keep {
                freed.push(b.status.id);
            }
            keep
        });
        for b in &mut self.vips[v].backends {
            if let Some(n) = next.backends.iter().find(|n| n.addr == b.status.address)
                && n.weight != b.status.weight
            {
                b.cancel_ramp(now);
                b.status.weight = n.weight;
            }
        }
        if old.mode != next.mode {
            let info = VipInfo::new(self.vips[v].vip_id, next.mode.into());
            programming::set_vip(&mut self.ebpf, &next.spec.key(), &info)?;
        }
        self.vips[v].config = next.clone();
        let mut added_ids = Vec::new();
        for n in &next.backends {
            if self.vips[v]
                .backends
                .iter()
                .any(|b| b.status.address == n.addr)
            {
                continue;
            }
            let hop = Self::hop(hops, n.addr)?;
            let rt = self.new_backend(next, n.addr, n.weight, hop, now)?;
            added_ids.push(rt.status.id);
            self.vips[v].backends.push(rt);
            let b = self.vips[v].backends.len() - 1;
            self.write_backend(v, b)?;
        }
        out.stop_checks.extend(&freed);
        if old.health_check != next.health_check && next.health_check.kind == CheckKind::None {
            // Not checked any more: every backend is taken as passing.
            for b in &mut self.vips[v].backends {
                if b.status.health != Health::Up {
                    b.status.health = Health::Up;
                    b.member_since = Some(now);
                }
                b.local = Health::Up;
            }
        }
        self.refresh_vip(v, now)?;
        for id in &freed {
            // After the ring stops naming them.
            self.free_slot(*id)?;
        }
        if old.health_check != next.health_check {
            // Every checker restarts with the new check, from the health
            // it has now.
            out.stop_checks
                .extend(self.vips[v].backends.iter().map(|b| b.status.id));
            out.start_checks.extend(self.targets_of(v));
        } else {
            out.start_checks.extend(
                self.targets_of(v)
                    .into_iter()
                    .filter(|t| added_ids.contains(&t.id)),
            );
        }
        Ok(())
    }

    /// Adds a VIP the file (or the runtime state) has and this lbd does not.
    fn add_configured_vip(
        &mut self,
        next: &VipConfig,
        hops: &BTreeMap<IpAddr, anyhow::Result<NextHop>>,
        now: Instant,
        out: &mut Reloaded,
    ) -> Result<(), AdminError> {
        let vip_id = self.free_vip_id().ok_or_else(|| {
            invalid(format!(
                "VIP {}: all VIP slots are in use (dataplane.max_vips)",
                next.spec
            ))
        })?;
        let empty = vec![0; self.config.sizes.ring_size as usize];
        self.install_vip(&next.spec, vip_id, next.mode, &empty)?;
        self.vips
            .push(VipRuntime::new(next.clone(), vip_id, Vec::new()));
        let v = self.vips.len() - 1;
        self.published(v, &empty);
        for n in &next.backends {
            let hop = Self::hop(hops, n.addr)?;
            let rt = self.new_backend(next, n.addr, n.weight, hop, now)?;
            self.vips[v].backends.push(rt);
            let b = self.vips[v].backends.len() - 1;
            self.write_backend(v, b)?;
        }
        self.refresh_vip(v, now)?;
        out.start_checks.extend(self.targets_of(v));
        Ok(())
    }
}

/// `lbd --check --diff NEW`: what reloading `new` would change for an lbd
/// running `current`, without asking it: the runtime changes come from the
/// state file, each backend's state from the pinned data plane when there
/// is one (otherwise every backend counts as healthy).
pub fn offline_diff(current: Config, mut new: Config) -> anyhow::Result<ConfigDiff> {
    let restart = current.restart_only_changes(&new);
    if !restart.is_empty() {
        anyhow::bail!(
            "{}: {} changed; a reload applies [[vip]] sections only, these need an lbd restart",
            new.file.display(),
            restart.join(", ")
        );
    }
    let saved = persist::load(&current.state_file)?;
    let mut now_config = current.clone();
    persist::merge(&mut now_config, &saved)?;
    persist::merge(&mut new, &saved)?;
    let pins = crate::pinning::pin_dir(&current.name);
    let live = crate::maps::BACKENDS.pinned(&pins).ok();
    let now = Instant::now();
    let current_vips = now_config
        .vips
        .iter()
        .map(|v| {
            let prior = saved.vips.get(&v.spec.to_string());
            let members: Vec<Member> = v
                .backends
                .iter()
                .map(|b| {
                    let saved_b = prior.and_then(|l| l.iter().find(|s| s.address == b.addr));
                    let health = saved_b
                        .and_then(|s| s.id)
                        .and_then(|id| live.as_ref()?.get(&id, 0).ok())
                        .filter(|info| info.addr == crate::config::vip::addr16(b.addr).0)
                        .map_or(Health::Up, |info| {
                            if info.state() == lb_common::maps::BackendState::Down {
                                Health::Down
                            } else {
                                Health::Up
                            }
                        });
                    Member {
                        drained: saved_b.is_some_and(|s| s.drained),
                        ..Member::steady(health, b.weight)
                    }
                })
                .collect();
            CurrentVip::planned(v, members, now)
        })
        .collect::<Vec<_>>();
    diff::diff(
        &current_vips,
        &new.vips,
        current.sizes.ring_size,
        current.hash_seed,
        now,
    )
    .map_err(anyhow::Error::msg)
}
