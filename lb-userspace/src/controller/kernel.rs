//! The controller's state written into the data plane's maps: backend
//! slots, rings (built by Maglev from the backends that are up), VIPs.

use std::{net::IpAddr, time::Instant};

use anyhow::{Context, Result, bail};
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{self as wire, BackendInfo, Mode},
};

use super::{BackendRt, Controller};
use crate::membership::{self, Member};
use crate::{
    api::BackendState,
    config::{ForwardMode, VipSpec, vip::addr16},
    maps::STATS_BACKEND,
    neigh::NextHop,
    programming, stats,
};

impl Controller {
    /// A backend whose next hop is on another interface cannot be served:
    /// the data plane sends with XDP_TX, out of the interface the packet
    /// came in on.
    pub(super) fn check_interface(&self, addr: IpAddr, hop: &NextHop) -> Result<()> {
        if hop.ifindex != self.ifindex {
            bail!(
                "backend {addr} is reached through interface {}, not {}: the balancer sends \
                 out of the interface it receives on (XDP_TX)",
                hop.ifindex,
                self.config.interface
            );
        }
        Ok(())
    }

    /// Writes backend `b` of VIP `v` into its `BACKENDS` slot.
    pub(super) fn write_backend(&mut self, v: usize, b: usize) -> Result<()> {
        let rt = &self.vips[v].backends[b];
        self.check_interface(rt.status.address, &rt.hop)?;
        let (addr, family) = addr16(rt.status.address);
        let info = BackendInfo {
            addr,
            family: family.wire(),
            state: wire::BackendState::from(rt.status.state).wire(),
            next_hop_mac: rt.hop.mac,
            src_mac: rt.hop.src_mac,
            _pad: [0; 2],
            ifindex: rt.hop.ifindex,
            vip_id: self.vips[v].vip_id,
        };
        let id = rt.status.id;
        programming::set_backend(&mut self.ebpf, id, &info)
    }

    /// A backend id about to be given to a new backend starts with zeroed
    /// traffic counters: they are the new backend's, not its predecessor's.
    pub(super) fn fresh_slot(&mut self, id: u32) -> Result<()> {
        stats::reset_traffic(&mut self.ebpf, &STATS_BACKEND, id)
    }

    /// The VIP's Maglev table: its members by their weight in the ring now
    /// (see [`Controller::refresh_vip`]).
    pub(super) fn ring(&self, v: usize) -> Result<Vec<u32>> {
        let members: Vec<MaglevBackend> = self.vips[v]
            .backends
            .iter()
            .filter(|b| b.status.effective_weight > 0)
            .map(|b| MaglevBackend {
                id: b.status.id,
                identity: addr16(b.status.address).0,
                weight: b.status.effective_weight,
            })
            .collect();
        maglev::build(&members, self.config.sizes.ring_size, self.config.hash_seed)
            .with_context(|| format!("building the ring of {}", self.vips[v].config.spec))
    }

    /// The members and their weights as [`Controller::ring`] builds from.
    fn ring_members(&self, v: usize) -> Vec<(u32, u32)> {
        self.vips[v]
            .backends
            .iter()
            .filter(|b| b.status.effective_weight > 0)
            .map(|b| (b.status.id, b.status.effective_weight))
            .collect()
    }

    /// Works out the VIP's ring now (health, drains, panic mode, slow
    /// start, ramps: see `membership`) and brings the maps in line: a
    /// backend joining is marked up before the ring names it, one leaving
    /// is marked after the ring stops naming it. The ring is only
    /// republished when its members or weights changed. Returns whether it
    /// was.
    pub(super) fn refresh_vip(&mut self, v: usize, now: Instant) -> Result<bool> {
        let rt = &self.vips[v];
        let members = BackendRt::members(&rt.backends, &rt.config);
        let plan = membership::plan(&members, rt.config.min_healthy_permille, now);
        if plan.panic != rt.panic {
            self.panic_changed(v, plan.panic, &members);
        }
        let mut joining = Vec::new();
        let mut leaving = Vec::new();
        for (b, (state, weight)) in plan.backends.into_iter().enumerate() {
            let status = &mut self.vips[v].backends[b].status;
            status.effective_weight = weight;
            if status.state != state {
                if state == BackendState::Up {
                    joining.push((b, state));
                } else {
                    leaving.push((b, state));
                }
            }
        }
        // A state is recorded only once written, so a failed write is
        // retried by the next refresh rather than forgotten.
        for (b, state) in joining {
            self.write_state(v, b, state)?;
        }
        let members = self.ring_members(v);
        let republish = self.vips[v].published.as_ref() != Some(&members);
        if republish {
            self.republish(v)?;
        }
        for (b, state) in leaving {
            self.write_state(v, b, state)?;
        }
        Ok(republish)
    }

    /// Writes backend `b` with data-plane state `state`; on failure its
    /// recorded state stays what the data plane still has.
    fn write_state(&mut self, v: usize, b: usize, state: BackendState) -> Result<()> {
        let old = std::mem::replace(&mut self.vips[v].backends[b].status.state, state);
        let written = self.write_backend(v, b);
        if written.is_err() {
            self.vips[v].backends[b].status.state = old;
        }
        written
    }

    /// Panic mode entered or left: said loudly, once.
    fn panic_changed(&mut self, v: usize, panic: bool, members: &[Member]) {
        let rt = &mut self.vips[v];
        rt.panic = panic;
        let healthy = members.iter().filter(|m| m.healthy()).count();
        let vip = rt.config.spec.to_string();
        let min_healthy = f64::from(rt.config.min_healthy_permille) / 1000.0;
        if panic {
            tracing::error!(%vip, healthy, backends = members.len(), min_healthy, "PANIC MODE: too few healthy backends; every checked, non-drained backend stays in the ring (fail open) rather than the survivors taking the whole load");
        } else {
            tracing::warn!(%vip, healthy, backends = members.len(), min_healthy, "panic mode over: enough backends are healthy again");
        }
        crate::daemon::event(serde_json::json!({
            "event": "panic", "vip": vip, "panic": panic, "healthy": healthy,
        }));
    }

    /// Rebuilds and publishes one VIP's ring (idle generation, then flip).
    pub(super) fn republish(&mut self, v: usize) -> Result<()> {
        self.vips[v].ring_flips += 1;
        let table = self.ring(v)?;
        programming::publish_ring(
            &mut self.ebpf,
            self.vips[v].vip_id,
            &table,
            self.config.second_chance_window,
        )?;
        self.published(v, &table);
        Ok(())
    }

    /// Records what VIP `v`'s ring now is: its members and weights, and
    /// its fingerprint.
    pub(super) fn published(&mut self, v: usize, table: &[u32]) {
        let addrs: std::collections::BTreeMap<u32, IpAddr> = self.vips[v]
            .backends
            .iter()
            .map(|b| (b.status.id, b.status.address))
            .collect();
        self.vips[v].fingerprint = ring_fingerprint(table, &addrs);
        self.vips[v].published = Some(self.ring_members(v));
    }

    /// Installs a VIP with `table` as its ring, its traffic counters zeroed
    /// (the id may have served another VIP).
    pub(super) fn install_vip(
        &mut self,
        spec: &VipSpec,
        vip_id: u32,
        mode: ForwardMode,
        table: &[u32],
    ) -> Result<()> {
        stats::reset_traffic(&mut self.ebpf, &crate::maps::STATS_VIP, vip_id)?;
        programming::install_vip(&mut self.ebpf, &spec.key(), vip_id, mode.into(), table)
    }

    /// Programs every VIP at start: backends, then rings, then the VIP
    /// table; a VIP the adopted data plane already serves the same way gets
    /// a ring update like any other, so its traffic never sees an empty
    /// ring. VIPs the running data plane has but the configuration no
    /// longer does are removed.
    pub(super) fn program_all(&mut self) -> Result<()> {
        let now = Instant::now();
        for v in 0..self.vips.len() {
            let rt = &self.vips[v];
            let members = BackendRt::members(&rt.backends, &rt.config);
            let plan = membership::plan(&members, rt.config.min_healthy_permille, now);
            if plan.panic {
                self.panic_changed(v, true, &members);
            }
            for (b, (state, weight)) in plan.backends.into_iter().enumerate() {
                let status = &mut self.vips[v].backends[b].status;
                status.state = state;
                status.effective_weight = weight;
            }
            for b in 0..self.vips[v].backends.len() {
                self.write_backend(v, b)?;
            }
            let table = self.ring(v)?;
            let spec = self.vips[v].config.spec;
            let mode = self.vips[v].config.mode;
            let vip_id = self.vips[v].vip_id;
            match programming::get_vip(&mut self.ebpf, &spec.key())? {
                Some(live) if live.vip_id == vip_id && live.mode() == Mode::from(mode) => {
                    let window = self.config.second_chance_window;
                    programming::publish_ring(&mut self.ebpf, vip_id, &table, window)?;
                }
                _ => self.install_vip(&spec, vip_id, mode, &table)?,
            }
            self.published(v, &table);
        }
        let wanted: Vec<_> = self.vips.iter().map(|v| v.config.spec.key()).collect();
        for (key, _) in programming::list_vips(&mut self.ebpf)? {
            if !wanted.contains(&key) {
                programming::remove_vip(&mut self.ebpf, &key)?;
            }
        }
        Ok(())
    }
}

/// A ring's fingerprint: FNV-1a (64 bits) over each slot's backend address
/// in slot order (16 zero bytes for an empty slot). Addresses, not slot
/// ids: two nodes that number their backends differently but send every
/// slot to the same backend have the same fingerprint, and two that differ
/// in one slot do not.
pub fn ring_fingerprint(table: &[u32], addrs: &std::collections::BTreeMap<u32, IpAddr>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in table {
        let bytes = addrs.get(id).map_or([0; 16], |a| addr16(*a).0);
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_fingerprint_follows_addresses_not_ids() {
        let a: IpAddr = "198.18.0.20".parse().unwrap();
        let b: IpAddr = "198.18.0.21".parse().unwrap();
        let one = BTreeMap::from([(1, a), (2, b)]);
        let other_ids = BTreeMap::from([(7, a), (9, b)]);
        let fp = ring_fingerprint(&[1, 2, 1, 0], &one);
        assert_eq!(fp, ring_fingerprint(&[7, 9, 7, 0], &other_ids));
        assert_ne!(
            fp,
            ring_fingerprint(&[1, 2, 2, 0], &one),
            "one slot differs"
        );
        assert_ne!(fp, ring_fingerprint(&[2, 1, 1, 0], &one));
    }
}
