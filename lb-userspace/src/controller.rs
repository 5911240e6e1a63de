//! The desired state (configuration + health + admin actions) turned into
//! map contents, and kept there as it changes.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{
        BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, BackendInfo, LbConfig, MODE_IPIP, MODE_L2DSR,
    },
};
use serde::Serialize;

use crate::{
    config::{Config, ForwardMode, VipConfig, vip::addr16},
    dataplane::{self, Attached},
    health::{Health, HealthEvent},
    neigh::{NextHop, Resolver},
    programming,
};

/// How long next-hop resolution may take per backend at startup.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Draining,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub address: std::net::IpAddr,
    pub id: u32,
    pub weight: u32,
    pub health: Health,
    pub drained: bool,
    pub state: BackendState,
}

impl BackendStatus {
    fn refresh_state(&mut self) {
        self.state = if self.health == Health::Down {
            BackendState::Down
        } else if self.drained || self.weight == 0 {
            BackendState::Draining
        } else {
            BackendState::Up
        };
    }
}

struct VipRuntime {
    config: VipConfig,
    vip_id: u32,
    backends: Vec<(BackendStatus, NextHop)>,
}

pub struct Controller {
    pub ebpf: Ebpf,
    pub attached: Option<Attached>,
    config: Config,
    vips: Vec<VipRuntime>,
}

impl Controller {
    /// Loads and attaches the data plane and programs the whole
    /// configuration; nothing is attached if any step fails.
    pub async fn start(config: Config) -> Result<Controller> {
        let resolver = Resolver::new()?;
        let ifindex = resolver
            .ifindex(&config.interface)
            .await
            .with_context(|| format!("instance.interface {:?}", config.interface))?;
        // Resolve every next hop before touching the kernel: a backend we
        // cannot reach is a configuration error, reported up front.
        let mut vips = Vec::new();
        let mut next_id = 1u32;
        for (i, v) in config.vips.iter().enumerate() {
            let mut backends = Vec::new();
            for b in &v.backends {
                let hop = resolver
                    .resolve(b.addr, RESOLVE_TIMEOUT)
                    .await
                    .with_context(|| format!("vip {} backend {}", v.spec, b.addr))?;
                let mut status = BackendStatus {
                    address: b.addr,
                    id: next_id,
                    weight: b.weight,
                    health: Health::Up,
                    drained: false,
                    state: BackendState::Up,
                };
                status.refresh_state();
                next_id += 1;
                backends.push((status, hop));
            }
            vips.push(VipRuntime {
                config: v.clone(),
                vip_id: i as u32,
                backends,
            });
        }
        let mtu: u32 = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", config.interface))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);

        let mut ebpf = dataplane::load_balancer_with(&config.sizes)?;
        let v4 = config
            .encap_source_v4
            .map(|a| a.octets())
            .unwrap_or_default();
        let v6 = config
            .encap_source_v6
            .map(|a| a.octets())
            .unwrap_or_default();
        programming::set_config(
            &mut ebpf,
            &LbConfig {
                encap_src_v4: v4,
                encap_src_v6: v6,
                hash_seed: config.hash_seed,
                ring_size: config.sizes.ring_size,
                udp_timeout_ns: config.udp_timeout.as_nanos() as u64,
                max_frame_len: if mtu == 0 { 0 } else { mtu + 14 },
                ..Default::default()
            },
        )?;
        let mut ctl = Controller {
            ebpf,
            attached: None,
            config,
            vips,
        };
        for v in 0..ctl.vips.len() {
            for b in 0..ctl.vips[v].backends.len() {
                ctl.write_backend(v, b, ifindex)?;
            }
            let table = ctl.ring(v)?;
            let key = ctl.vips[v].config.spec.key();
            let mode = match ctl.vips[v].config.mode {
                ForwardMode::Ipip => MODE_IPIP,
                ForwardMode::L2dsr => MODE_L2DSR,
            };
            programming::install_vip(&mut ctl.ebpf, &key, ctl.vips[v].vip_id, mode, &table)?;
        }
        let attached =
            dataplane::attach(&mut ctl.ebpf, &ctl.config.interface, ctl.config.xdp_mode)?;
        ctl.attached = Some(attached);
        Ok(ctl)
    }

    fn write_backend(&mut self, v: usize, b: usize, attached_ifindex: u32) -> Result<()> {
        let (status, hop) = &self.vips[v].backends[b];
        let (addr, family) = addr16(status.address);
        let state = match status.state {
            BackendState::Up => BACKEND_UP,
            BackendState::Down => BACKEND_DOWN,
            BackendState::Draining => BACKEND_DRAINING,
        };
        if hop.ifindex != attached_ifindex {
            bail!(
                "backend {} is reached through interface {}, not {}: forwarding to another \
                 interface is not supported yet",
                status.address,
                hop.ifindex,
                self.config.interface
            );
        }
        let info = BackendInfo {
            addr,
            family,
            state,
            next_hop_mac: hop.mac,
            src_mac: hop.src_mac,
            _pad: [0; 2],
            ifindex: hop.ifindex,
        };
        programming::set_backend(&mut self.ebpf, status.id, &info)
    }

    /// The VIP's Maglev table: backends that are up, by weight.
    fn ring(&self, v: usize) -> Result<Vec<u32>> {
        let members: Vec<MaglevBackend> = self.vips[v]
            .backends
            .iter()
            .filter(|(s, _)| s.state == BackendState::Up)
            .map(|(s, _)| MaglevBackend {
                id: s.id,
                identity: addr16(s.address).0,
                weight: s.weight,
            })
            .collect();
        maglev::build(&members, self.config.sizes.ring_size, self.config.hash_seed)
            .with_context(|| format!("building the ring of {}", self.vips[v].config.spec))
    }

    /// Applies a health change: backend state, then the VIP's ring (only this
    /// VIP's), written to the idle generation and flipped.
    pub fn on_health(&mut self, ev: &HealthEvent) -> Result<()> {
        let ifindex = self.vips[ev.vip].backends[ev.backend].1.ifindex;
        {
            let status = &mut self.vips[ev.vip].backends[ev.backend].0;
            status.health = ev.health;
            status.refresh_state();
        }
        self.write_backend(ev.vip, ev.backend, ifindex)?;
        let table = self.ring(ev.vip)?;
        let key = self.vips[ev.vip].config.spec.key();
        programming::publish_ring(
            &mut self.ebpf,
            &key,
            &table,
            self.config.second_chance_window,
        )?;
        Ok(())
    }

    /// What the health checker should check: (vip, backend, address, check).
    pub fn health_targets(&self) -> Vec<(usize, usize, SocketAddr, crate::config::HealthCheck)> {
        let mut out = Vec::new();
        for (v, rt) in self.vips.iter().enumerate() {
            if rt.config.health_check.kind == crate::config::CheckKind::None {
                continue;
            }
            let port = rt.config.health_check.port.unwrap_or(rt.config.spec.port);
            for (b, (s, _)) in rt.backends.iter().enumerate() {
                out.push((
                    v,
                    b,
                    SocketAddr::new(s.address, port),
                    rt.config.health_check.clone(),
                ));
            }
        }
        out
    }

    pub fn backend(&self, v: usize, b: usize) -> &BackendStatus {
        &self.vips[v].backends[b].0
    }

    pub fn vip_name(&self, v: usize) -> String {
        self.vips[v].config.spec.to_string()
    }

    /// Detaches the program (maps go with the process).
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(a) = self.attached.take() {
            a.detach(&mut self.ebpf)?;
        }
        Ok(())
    }
}
