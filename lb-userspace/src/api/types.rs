//! What the control API answers with, shared by lbd (which serialises it)
//! and lbctl and the tests (which read it back typed).

use std::net::{IpAddr, SocketAddr};

use lb_common::maps as wire;
use serde::{Deserialize, Serialize};

use crate::health::Health;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Draining,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub health: Health,
    pub drained: bool,
    pub state: BackendState,
    /// The weight in the ring now: 0 when out of it, below `weight` during
    /// slow start or a weight ramp, `weight` otherwise (and in panic mode
    /// for a backend kept in the ring although its checks fail).
    #[serde(default)]
    pub effective_weight: u32,
    /// Held down by flap damping: its health changed too often.
    #[serde(default)]
    pub flap_held: bool,
    /// Health changes since lbd started.
    #[serde(default)]
    pub health_changes: u64,
}

/// The data plane's byte for a state is `lb_common::maps::BackendState`;
/// this is the one place the two meet.
impl From<BackendState> for wire::BackendState {
    fn from(s: BackendState) -> Self {
        match s {
            BackendState::Up => wire::BackendState::Up,
            BackendState::Down => wire::BackendState::Down,
            BackendState::Draining => wire::BackendState::Draining,
        }
    }
}

impl BackendStatus {
    pub fn new(address: IpAddr, id: u32, weight: u32) -> Self {
        let mut s = BackendStatus {
            address,
            id,
            weight,
            health: Health::Up,
            drained: false,
            state: BackendState::Up,
            effective_weight: 0,
            flap_held: false,
            health_changes: 0,
        };
        s.refresh_state();
        s
    }

    /// Whether the backend's health checks pass: `lb_backend_up` on
    /// /metrics and `up` in Graphite, whether it is drained or not (its
    /// state says that).
    pub fn up(&self) -> bool {
        self.health == Health::Up
    }

    /// In service and passing its checks: not drained, not held by flap
    /// damping. What `lb_vip_healthy_backends` and the announcement count
    /// (in panic mode the ring also keeps backends that are not).
    pub fn healthy(&self) -> bool {
        self.up() && !self.flap_held && self.state != BackendState::Draining
    }

    /// The state the data plane gets, from health, drain and weight alone
    /// (the controller also weighs panic mode and flap damping: see
    /// `membership`).
    pub fn refresh_state(&mut self) {
        self.state = if self.health != Health::Up {
            BackendState::Down
        } else if self.drained || self.weight == 0 {
            BackendState::Draining
        } else {
            BackendState::Up
        };
        self.effective_weight = if self.state == BackendState::Up {
            self.weight
        } else {
            0
        };
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: String,
    /// Index into `RINGS` and `STATS_VIP`.
    pub id: u32,
    pub mode: String,
    /// Ring changes published since this lbd started.
    pub ring_flips: u64,
    /// Panic mode: fewer healthy backends than `min_healthy`, so every
    /// checked, non-drained backend is kept in the ring.
    #[serde(default)]
    pub panic: bool,
    /// The live ring's fingerprint (16 hex digits over each slot's backend
    /// address): nodes of a fleet with the same fingerprint send every flow
    /// of the VIP to the same backend.
    #[serde(default)]
    pub ring_fingerprint: String,
    pub backends: Vec<BackendStatus>,
}

/// What the data plane would do with a packet of a client's flow now, and
/// why (`lbctl explain`): the per-packet policy run over the live maps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub vip: String,
    pub client: SocketAddr,
    /// The packet asked about: `syn` (a new connection), `ack` (a TCP
    /// packet mid-stream) or `udp`.
    pub packet: String,
    /// `forward`, `drop` or `pass`.
    pub verdict: String,
    pub backend: Option<IpAddr>,
    /// The backend's `BACKENDS` slot.
    pub backend_id: Option<u32>,
    /// The backend's state in the data plane (`up`, `down`, `draining`,
    /// `unused`).
    pub backend_state: Option<String>,
    /// How the backend was found: `flow_cache`, `conntrack`,
    /// `second_chance`, `ring_syn`, `ring_no_entry`, `ring_repick`,
    /// `ring_udp_expired`.
    pub via: Option<String>,
    /// For people.
    pub reason: String,
}

/// `POST /v1/backends/remove`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendRemoved {
    pub removed: IpAddr,
    pub vip: String,
}

/// `POST /v1/vips/remove`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipRemoved {
    pub removed: String,
}

/// `POST /v1/debug`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DebugSwitched {
    pub debug: bool,
}

/// `POST /v1/teardown`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TeardownStarted {
    pub teardown: String,
}

/// `GET /v1/node`: this node as a member of a fleet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `lbctl node drain`: no VIP announced, forwarding unchanged.
    pub drained: bool,
    /// Where announced VIPs' routes go; `None`: lbd announces nothing.
    pub announce: Option<AnnounceTarget>,
    pub hash_seed: u32,
    pub ring_size: u32,
    /// Set when this lbd adopted a data plane built with other rings
    /// (accepted with `--accept-ring-change`): what changed.
    pub ring_change: Option<String>,
    pub vips: Vec<VipNodeStatus>,
    /// The last failure to write the announce routes, if the last attempt
    /// failed.
    pub routes_error: Option<String>,
    /// Changes applied to the data plane whose state file could not be
    /// written, since lbd started.
    #[serde(default)]
    pub state_save_failures: u64,
    /// Set while the last save failed: a restart would lose changes.
    #[serde(default)]
    pub state_save_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceTarget {
    pub table: u32,
    pub device: String,
}

/// One VIP: whether this node should announce it, why, and whether its
/// route is in the table now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipNodeStatus {
    #[serde(flatten)]
    pub decision: crate::announce::VipAnnouncement,
    /// Its address's route is in the announce table.
    pub route_installed: bool,
}
