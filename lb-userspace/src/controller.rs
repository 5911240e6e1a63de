//! The desired state (configuration + health + admin actions) turned into
//! map contents, and kept there as it changes.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::Ebpf;
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{self as wire, BackendInfo, FlowKey, LbConfig, Mode},
};
use serde::{Deserialize, Serialize};

use crate::{
    api::{BackendState, BackendStatus, Explanation, VipStatus},
    config::{
        BackendConfig, CheckKind, Config, ForwardMode, HealthCheck, MAX_WEIGHT, OnExit, VipConfig,
        VipSpec, vip::addr16,
    },
    health::{Health, HealthEvent},
    neigh::{NextHop, Resolver},
    pinning::{self, Pinned},
    programming,
};

/// How long next-hop resolution may take per backend.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

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

/// What survives a restart on top of the configuration file: each VIP's
/// backend list as changed at runtime.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SavedState {
    pub vips: std::collections::BTreeMap<String, Vec<SavedBackend>>,
    /// VIPs added at runtime (not in the configuration file).
    #[serde(default)]
    pub added_vips: std::collections::BTreeMap<String, SavedVip>,
    /// Configured VIPs removed at runtime.
    #[serde(default)]
    pub removed_vips: std::collections::BTreeSet<String>,
    /// Each VIP's backends as the configuration file had them when this was
    /// saved: if the file says otherwise now, the operator edited it, and the
    /// file wins over the runtime changes for that VIP.
    #[serde(default)]
    pub configured: std::collections::BTreeMap<String, Vec<(IpAddr, u32)>>,
    /// VIP ids (`RINGS`/`STATS_VIP` slots), kept so an adopted data plane's
    /// rings stay with their VIPs.
    #[serde(default)]
    pub vip_ids: std::collections::BTreeMap<String, u32>,
}

/// A runtime-added VIP's definition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVip {
    pub mode: ForwardMode,
    /// `none`, `tcp` or `http:PATH`, with default timings.
    pub check: String,
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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedBackend {
    pub address: IpAddr,
    pub weight: u32,
    pub drained: bool,
    /// The `BACKENDS` slot: kept across restarts because adopted connection
    /// table entries name backends by it.
    #[serde(default)]
    pub id: Option<u32>,
}

struct BackendRt {
    status: BackendStatus,
    hop: NextHop,
    /// Unique per backend instance: a health event from the checker of a
    /// removed backend whose id was reused must not touch the new one.
    token: u64,
}

struct VipRuntime {
    config: VipConfig,
    vip_id: u32,
    backends: Vec<BackendRt>,
    ring_flips: u64,
}

pub struct Controller {
    pub ebpf: Ebpf,
    configured_backends: std::collections::BTreeMap<String, Vec<(IpAddr, u32)>>,
    added_vips: std::collections::BTreeMap<String, SavedVip>,
    removed_vips: std::collections::BTreeSet<String>,
    /// Whether a running data plane was adopted (hitless restart).
    pub adopted: bool,
    pin_dir: PathBuf,
    config: Config,
    resolver: Resolver,
    ifindex: u32,
    vips: Vec<VipRuntime>,
    used_ids: std::collections::BTreeSet<u32>,
    next_token: u64,
}

/// Reads the state file; a missing file is an empty state.
pub fn load_state(path: &PathBuf) -> Result<SavedState> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("state file {} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SavedState::default()),
        Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
    }
}

impl Controller {
    /// Loads and attaches the data plane and programs the whole
    /// configuration (with the state file's runtime changes on top); nothing
    /// is attached if any step fails.
    pub async fn start(mut config: Config) -> Result<Controller> {
        let saved = load_state(&config.state_file)?;
        config
            .vips
            .retain(|v| !saved.removed_vips.contains(&v.spec.to_string()));
        for (spec, def) in &saved.added_vips {
            let spec: VipSpec = spec
                .parse()
                .with_context(|| format!("state file: VIP {spec:?}"))?;
            let health_check =
                parse_check(&def.check).map_err(|e| anyhow::anyhow!("state file: {e}"))?;
            config.vips.push(VipConfig {
                spec,
                mode: def.mode,
                health_check,
                backends: Vec::new(),
            });
        }
        let added: std::collections::BTreeMap<String, SavedVip> = saved.added_vips.clone();
        let removed = saved.removed_vips.clone();
        // What the file says, before runtime changes are laid over it.
        let configured: std::collections::BTreeMap<String, Vec<(IpAddr, u32)>> = config
            .vips
            .iter()
            .map(|v| {
                (
                    v.spec.to_string(),
                    v.backends.iter().map(|b| (b.addr, b.weight)).collect(),
                )
            })
            .collect();
        for v in &mut config.vips {
            let name = v.spec.to_string();
            if let Some(old) = saved.configured.get(&name)
                && configured.get(&name) != Some(old)
            {
                tracing::warn!(vip = %name, "backends edited in the configuration file: it overrides runtime changes");
                continue;
            }
            if let Some(list) = saved.vips.get(&name) {
                v.backends = list
                    .iter()
                    .map(|b| BackendConfig {
                        addr: b.address,
                        weight: b.weight,
                    })
                    .collect();
            }
        }
        let resolver = Resolver::new()?;
        let ifindex = resolver
            .ifindex(&config.interface)
            .await
            .with_context(|| format!("instance.interface {:?}", config.interface))?;
        let pin_dir = pinning::pin_dir(&config.name);
        let Pinned {
            mut ebpf, adopted, ..
        } = pinning::load(&pin_dir, &config.sizes)?;
        let mtu: u32 = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", config.interface))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        programming::set_config(
            &mut ebpf,
            &LbConfig {
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
                max_frame_len: if mtu == 0 { 0 } else { mtu + 14 },
                ..Default::default()
            },
        )?;
        let mut ctl = Controller {
            ebpf,
            added_vips: added,
            removed_vips: removed,
            configured_backends: configured,
            adopted,
            pin_dir,
            config,
            resolver,
            ifindex,
            vips: Vec::new(),
            used_ids: Default::default(),
            next_token: 0,
        };
        // Saved ids first, so adopted connection-table entries keep naming
        // the same backends.
        for list in saved.vips.values() {
            ctl.used_ids.extend(list.iter().filter_map(|b| b.id));
        }
        // Saved VIP ids first (an adopted data plane's rings are theirs),
        // then the lowest free ids for the rest.
        let mut vip_ids: Vec<u32> = Vec::new();
        for v in &ctl.config.vips {
            let saved_id = saved.vip_ids.get(&v.spec.to_string()).copied();
            vip_ids.push(match saved_id {
                Some(id) if id < ctl.config.sizes.max_vips && !vip_ids.contains(&id) => id,
                _ => u32::MAX,
            });
        }
        for i in 0..vip_ids.len() {
            if vip_ids[i] == u32::MAX {
                let free = (0..ctl.config.sizes.max_vips)
                    .find(|id| !vip_ids.contains(id))
                    .context("more VIPs than dataplane.max_vips")?;
                vip_ids[i] = free;
            }
        }
        for (i, v) in ctl.config.vips.clone().into_iter().enumerate() {
            let mut backends = Vec::new();
            for b in &v.backends {
                // A backend we cannot reach is a configuration error,
                // reported before anything is attached.
                let hop = ctl
                    .resolver
                    .resolve(b.addr, RESOLVE_TIMEOUT)
                    .await
                    .with_context(|| format!("vip {} backend {}", v.spec, b.addr))?;
                let prior = saved
                    .vips
                    .get(&v.spec.to_string())
                    .and_then(|l| l.iter().find(|s| s.address == b.addr));
                let id = match prior.and_then(|p| p.id) {
                    Some(id) => id,
                    None => ctl.alloc_id()?,
                };
                let mut status = BackendStatus::new(b.addr, id, b.weight);
                if let Some(p) = prior {
                    status.drained = p.drained;
                }
                // Adopting a running data plane: a backend it had down stays
                // down until its checks pass, rather than coming back for a
                // fall x interval while the checks catch up.
                if ctl.adopted
                    && let Ok(live) = programming::backend(&mut ctl.ebpf, id)
                    && live.state() == wire::BackendState::Down
                    && live.addr == addr16(b.addr).0
                {
                    status.health = Health::Down;
                }
                status.refresh_state();
                ctl.next_token += 1;
                backends.push(BackendRt {
                    status,
                    hop,
                    token: ctl.next_token,
                });
            }
            ctl.vips.push(VipRuntime {
                config: v,
                vip_id: vip_ids[i],
                backends,
                ring_flips: 0,
            });
        }
        for v in 0..ctl.vips.len() {
            for b in 0..ctl.vips[v].backends.len() {
                ctl.write_backend(v, b)?;
            }
            let table = ctl.ring(v)?;
            let key = ctl.vips[v].config.spec.key();
            let mode = Mode::from(ctl.vips[v].config.mode);
            let vip_id = ctl.vips[v].vip_id;
            match programming::get_vip(&mut ctl.ebpf, &key)? {
                // Adopted and unchanged: a ring update like any other, so
                // traffic never sees an empty ring.
                Some(live) if live.vip_id == vip_id && live.mode() == mode => {
                    let window = ctl.config.second_chance_window;
                    programming::publish_ring(&mut ctl.ebpf, vip_id, &table, window)?;
                }
                _ => programming::install_vip(&mut ctl.ebpf, &key, vip_id, mode, &table)?,
            }
        }
        // VIPs the running data plane still serves but the configuration
        // no longer has.
        let wanted: Vec<_> = ctl.vips.iter().map(|v| v.config.spec.key()).collect();
        for (key, _) in programming::list_vips(&mut ctl.ebpf)? {
            if !wanted.contains(&key) {
                programming::remove_vip(&mut ctl.ebpf, &key)?;
            }
        }
        let (iface, mode) = (ctl.config.interface.clone(), ctl.config.xdp_mode);
        pinning::attach(&mut ctl.ebpf, &ctl.pin_dir, ctl.adopted, &iface, mode)?;
        // Records the backend ids the connection table now refers to.
        ctl.persist()?;
        Ok(ctl)
    }

    /// The lowest free `BACKENDS` slot (0 means "no backend").
    fn alloc_id(&mut self) -> Result<u32> {
        let max = self.config.sizes.max_backends;
        let id = (1..max)
            .find(|i| !self.used_ids.contains(i))
            .with_context(|| {
                format!(
                    "all {} backend slots are in use (dataplane.max_backends)",
                    max - 1
                )
            })?;
        self.used_ids.insert(id);
        Ok(id)
    }

    fn write_backend(&mut self, v: usize, b: usize) -> Result<()> {
        let BackendRt { status, hop, .. } = &self.vips[v].backends[b];
        if hop.ifindex != self.ifindex {
            anyhow::bail!(
                "backend {} is reached through interface {}, not {}: forwarding to another \
                 interface is not supported yet",
                status.address,
                hop.ifindex,
                self.config.interface
            );
        }
        let (addr, family) = addr16(status.address);
        let info = BackendInfo {
            addr,
            family: family.wire(),
            state: wire::BackendState::from(status.state).wire(),
            next_hop_mac: hop.mac,
            src_mac: hop.src_mac,
            _pad: [0; 2],
            ifindex: hop.ifindex,
            vip_id: self.vips[v].vip_id,
        };
        let id = status.id;
        programming::set_backend(&mut self.ebpf, id, &info)
    }

    /// The VIP's Maglev table: backends that are up, by weight.
    fn ring(&self, v: usize) -> Result<Vec<u32>> {
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
    fn republish(&mut self, v: usize) -> Result<()> {
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
    pub fn on_health(&mut self, ev: &HealthEvent) -> Result<Option<(String, BackendStatus)>> {
        let Some((v, b)) = self.find(ev.id) else {
            // The backend was removed while its last check ran.
            return Ok(None);
        };
        if self.vips[v].backends[b].token != ev.token {
            // From the checker of a removed backend whose id was reused.
            return Ok(None);
        }
        let status = &mut self.vips[v].backends[b].status;
        status.health = ev.health;
        status.refresh_state();
        let status = status.clone();
        let out = (self.vips[v].config.spec.to_string(), status);
        self.write_backend(v, b)?;
        self.republish(v)?;
        Ok(Some(out))
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
                initial: b.status.health,
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
                mode: v.config.mode.to_string(),
                backends: v.backends.iter().map(|b| b.status.clone()).collect(),
            })
            .collect()
    }

    /// Adds a backend; returns its health check to start, if the VIP has one.
    pub async fn add_backend(
        &mut self,
        vip: &VipSpec,
        addr: IpAddr,
        weight: u32,
    ) -> Result<Option<HealthTarget>, AdminError> {
        let v = self.vip_index(vip)?;
        if weight > MAX_WEIGHT {
            return Err(AdminError::Weight(weight));
        }
        if self.vips[v]
            .backends
            .iter()
            .any(|b| b.status.address == addr)
        {
            return Err(AdminError::DuplicateBackend {
                vip: vip.to_string(),
                backend: addr,
            });
        }
        if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
            return Err(AdminError::Invalid(format!(
                "{addr} must be a unicast, non-loopback address"
            )));
        }
        match (self.vips[v].config.mode, vip.is_ipv6(), addr.is_ipv6()) {
            (ForwardMode::Ipip, false, true) => {
                return Err(AdminError::Invalid(
                    "an IPv4 VIP cannot be tunnelled to an IPv6 backend (4in6 is not supported)"
                        .into(),
                ));
            }
            (ForwardMode::L2dsr, a, b) if a != b => {
                return Err(AdminError::Invalid(
                    "l2dsr backends must be of the VIP's address family".into(),
                ));
            }
            (ForwardMode::Ipip, _, true) if self.config.encap_source_v6.is_none() => {
                return Err(AdminError::Invalid(
                    "ipip to an IPv6 backend needs dataplane.encap_source_v6".into(),
                ));
            }
            (ForwardMode::Ipip, _, false) if self.config.encap_source_v4.is_none() => {
                return Err(AdminError::Invalid(
                    "ipip to an IPv4 backend needs dataplane.encap_source_v4".into(),
                ));
            }
            _ => {}
        }
        let hop = self
            .resolver
            .resolve(addr, RESOLVE_TIMEOUT)
            .await
            .map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
        let id = self.alloc_id()?;
        self.next_token += 1;
        let token = self.next_token;
        self.vips[v].backends.push(BackendRt {
            token,
            status: BackendStatus::new(addr, id, weight),
            hop,
        });
        let b = self.vips[v].backends.len() - 1;
        if let Err(e) = self.write_backend(v, b).and_then(|()| self.republish(v)) {
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
        self.republish(v)?;
        // After the ring no longer names it: flows still pointing at the id
        // see an unused backend and are re-picked.
        let info = BackendInfo {
            state: wire::BackendState::Unused.wire(),
            ..Default::default()
        };
        programming::set_backend(&mut self.ebpf, removed.status.id, &info)?;
        self.used_ids.remove(&removed.status.id);
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
        self.vips[v].backends[b].status.drained = drained;
        self.vips[v].backends[b].status.refresh_state();
        self.write_backend(v, b)?;
        self.republish(v)?;
        Ok(self.vips[v].backends[b].status.clone())
    }

    pub fn set_weight(
        &mut self,
        vip: &VipSpec,
        addr: IpAddr,
        weight: u32,
    ) -> Result<BackendStatus, AdminError> {
        if weight > MAX_WEIGHT {
            return Err(AdminError::Weight(weight));
        }
        let v = self.vip_index(vip)?;
        let b = self.backend_index(v, addr)?;
        self.vips[v].backends[b].status.weight = weight;
        self.vips[v].backends[b].status.refresh_state();
        self.write_backend(v, b)?;
        self.republish(v)?;
        Ok(self.vips[v].backends[b].status.clone())
    }

    /// What the data plane would do now with a packet of `client`'s flow to
    /// `vip` (a SYN when `syn`), and why: `lb_common::policy::decide` over a
    /// read-only snapshot of the live maps, the rules the data plane runs.
    pub fn explain(
        &self,
        vip: &VipSpec,
        client: SocketAddr,
        syn: bool,
    ) -> Result<Explanation, AdminError> {
        use lb_common::{
            policy::{Kind, Verdict},
            wire::tcp::{TCP_ACK, TCP_SYN},
        };
        self.vip_index(vip)?;
        if client.is_ipv6() != vip.is_ipv6() {
            return Err(AdminError::Invalid(format!(
                "client {client} and VIP {vip} are of different address families"
            )));
        }
        let (src, family) = addr16(client.ip());
        let key = FlowKey {
            src,
            dst: addr16(vip.addr).0,
            src_port: client.port(),
            dst_port: vip.port,
            proto: vip.proto.number(),
            family: family.wire(),
            _pad: [0; 2],
        };
        let (kind, packet) = match vip.proto {
            crate::config::vip::Proto::Udp => (Kind::Udp, "udp"),
            crate::config::vip::Proto::Tcp if syn => (Kind::Tcp { flags: TCP_SYN }, "syn"),
            crate::config::vip::Proto::Tcp => (Kind::Tcp { flags: TCP_ACK }, "ack"),
        };
        let snapshot = crate::snapshot::Snapshot::new(&self.ebpf, key)?;
        let d = snapshot.decide(kind)?;
        let via = d.via.map(|v| v.label().to_owned());
        let mut out = Explanation {
            vip: vip.to_string(),
            client,
            packet: packet.into(),
            verdict: String::new(),
            backend: None,
            backend_id: None,
            backend_state: None,
            via,
            reason: String::new(),
        };
        match d.verdict {
            Verdict::Forward(f) => {
                let b = f.backend;
                out.verdict = "forward".into();
                out.backend = Some(crate::config::vip::ip_of(&b.addr, b.family()));
                out.backend_id = Some(f.backend_id);
                out.backend_state = Some(b.state().label().into());
                let how = d.via.map(|v| v.describe()).unwrap_or_default();
                out.reason = match snapshot.cache_cpu() {
                    Some(cpu) => format!("{how} (CPU {cpu})"),
                    None => how.to_owned(),
                };
            }
            Verdict::Drop(c) => {
                out.verdict = "drop".into();
                out.reason = match c {
                    lb_common::stats::Counter::LbNoBackend => {
                        "no backend: the VIP's ring is empty (no backend is up)".into()
                    }
                    other => format!("dropped ({})", other.name()),
                };
            }
            Verdict::Pass(c) => {
                out.verdict = "pass".into();
                out.reason = format!("passed to the kernel ({})", c.name());
            }
        }
        Ok(out)
    }

    /// Writes the runtime changes to the state file (atomically: temp file,
    /// then rename), so a restart keeps them.
    pub fn persist(&self) -> Result<()> {
        let state = SavedState {
            added_vips: self.added_vips.clone(),
            removed_vips: self.removed_vips.clone(),
            configured: self.configured_backends.clone(),
            vip_ids: self
                .vips
                .iter()
                .map(|v| (v.config.spec.to_string(), v.vip_id))
                .collect(),
            vips: self
                .vips
                .iter()
                .map(|v| {
                    let list = v
                        .backends
                        .iter()
                        .map(|b| SavedBackend {
                            address: b.status.address,
                            weight: b.status.weight,
                            drained: b.status.drained,
                            id: Some(b.status.id),
                        })
                        .collect();
                    (v.config.spec.to_string(), list)
                })
                .collect(),
        };
        let path = &self.config.state_file;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&serde_json::to_vec_pretty(&state)?)?;
            // On disk before it replaces the old state: a crash must leave
            // one whole file or the other.
            f.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
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
        let used: Vec<u32> = self.vips.iter().map(|v| v.vip_id).collect();
        let vip_id = (0..self.config.sizes.max_vips)
            .find(|i| !used.contains(i))
            .ok_or_else(|| {
                AdminError::Invalid(format!(
                    "all {} VIP slots are in use (dataplane.max_vips)",
                    self.config.sizes.max_vips
                ))
            })?;
        let empty = vec![0; self.config.sizes.ring_size as usize];
        programming::install_vip(&mut self.ebpf, &spec.key(), vip_id, mode.into(), &empty)?;
        self.vips.push(VipRuntime {
            config: VipConfig {
                spec,
                mode,
                health_check,
                backends: Vec::new(),
            },
            vip_id,
            backends: Vec::new(),
            ring_flips: 0,
        });
        let name = spec.to_string();
        self.removed_vips.remove(&name);
        self.added_vips.insert(
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
        let v = self.vip_index(spec)?;
        programming::remove_vip(&mut self.ebpf, &spec.key())?;
        let rt = self.vips.remove(v);
        let mut ids = Vec::new();
        for b in rt.backends {
            let info = BackendInfo {
                state: wire::BackendState::Unused.wire(),
                ..Default::default()
            };
            programming::set_backend(&mut self.ebpf, b.status.id, &info)?;
            self.used_ids.remove(&b.status.id);
            ids.push(b.status.id);
        }
        let name = spec.to_string();
        if self.added_vips.remove(&name).is_none() {
            self.removed_vips.insert(name);
        }
        Ok(ids)
    }

    /// Re-resolves every backend's next hop (neighbours change: a backend
    /// replaced, a gateway failed over) and rewrites the ones that moved.
    pub async fn refresh_next_hops(&mut self) -> Result<usize> {
        let mut changed = 0;
        for v in 0..self.vips.len() {
            for b in 0..self.vips[v].backends.len() {
                let addr = self.vips[v].backends[b].status.address;
                // Short: this runs on the main loop, and an unreachable
                // backend must not hold up everything else.
                let Ok(hop) = self
                    .resolver
                    .resolve(addr, Duration::from_millis(100))
                    .await
                else {
                    continue;
                };
                if hop == self.vips[v].backends[b].hop {
                    continue;
                }
                if hop.ifindex != self.ifindex {
                    // Keep the old, working next hop rather than one this
                    // data plane cannot send to.
                    tracing::warn!(backend = %addr, ifindex = hop.ifindex, "backend now routed through another interface; keeping its last next hop");
                    continue;
                }
                tracing::info!(backend = %addr, mac = ?hop.mac, "next hop changed");
                let old = std::mem::replace(&mut self.vips[v].backends[b].hop, hop);
                if let Err(e) = self.write_backend(v, b) {
                    self.vips[v].backends[b].hop = old;
                    tracing::error!(backend = %addr, error = %format!("{e:#}"), "updating the next hop failed");
                    continue;
                }
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Where the data plane's maps are pinned (for counting the connection
    /// table off the main loop).
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// Turns the data plane's debug events on or off (one CONFIG update).
    pub fn set_debug(&mut self, on: bool) -> Result<(), AdminError> {
        let mut cfg = programming::config(&self.ebpf)?;
        if on {
            cfg.flags |= lb_common::maps::CONFIG_FLAG_DEBUG;
        } else {
            cfg.flags &= !lb_common::maps::CONFIG_FLAG_DEBUG;
        }
        programming::set_config(&mut self.ebpf, &cfg)?;
        Ok(())
    }

    /// From now on, exiting detaches and unpins everything.
    pub fn detach_on_exit(&mut self) {
        self.config.on_exit = OnExit::Detach;
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
