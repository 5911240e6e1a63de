//! The controller's state written into the data plane's maps: backend
//! slots, rings (built by Maglev from the backends that are up), VIPs.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{self as wire, BackendInfo, Mode},
};

use super::Controller;
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

    /// The VIP's Maglev table: backends that are up, by weight.
    pub(super) fn ring(&self, v: usize) -> Result<Vec<u32>> {
        let members: Vec<MaglevBackend> = self.vips[v]
            .backends
            .iter()
            .filter(|b| b.status.state == BackendState::Up)
            .map(|b| MaglevBackend {
                id: b.status.id,
                identity: addr16(b.status.address).0,
                weight: b.status.weight,
            })
            .collect();
        maglev::build(&members, self.config.sizes.ring_size, self.config.hash_seed)
            .with_context(|| format!("building the ring of {}", self.vips[v].config.spec))
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
        Ok(())
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
        for v in 0..self.vips.len() {
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
