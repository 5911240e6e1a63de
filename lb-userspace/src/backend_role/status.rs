//! What the backend role's control API answers with, shared by lbd (which
//! serialises it) and lbctl and the tests (which read it back typed). Every
//! answer carries `"role": "backend"`, which is how lbctl tells it from a
//! balancer's.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub use super::dataplane::Outer;
use crate::neigh::Managed;

/// The value of every answer's `role`.
pub const ROLE: &str = "backend";

/// Whether an answer comes from lbd in the backend role.
pub fn is_backend(answer: &serde_json::Value) -> bool {
    answer.get("role").and_then(|r| r.as_str()) == Some(ROLE)
}

/// `GET /v1/vips` (`lbctl list`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendRoleStatus {
    pub role: String,
    pub instance: String,
    pub interface: String,
    /// What the kernel reports on the interface; `None`: no XDP program.
    pub xdp: Option<XdpStatus>,
    /// This lbd adopted a running decapsulator (a restart).
    pub adopted: bool,
    /// 0: GUE is not accepted.
    pub gue_port: u16,
    pub vips: Vec<DecapVipStatus>,
    /// Every drop counter by reason (`drop_not_vip`, ...), zeros included.
    pub drops: BTreeMap<String, u64>,
    pub second_hops: SecondHops,
    pub sysctl: SysctlStatus,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct XdpStatus {
    /// `native`, `generic`, `offload` or `multiple`.
    pub mode: String,
    pub program_id: u32,
    /// The program on the interface is this lbd's `decap`.
    pub ours: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLo {
    /// lbd put it on `lo` and removes it at teardown.
    Added,
    /// It was local before lbd started; lbd leaves it where it is.
    Present,
    /// Not a local address: decapsulated packets for it are not delivered.
    Missing,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecapVipStatus {
    pub vip: IpAddr,
    pub on_lo: OnLo,
    /// What arrived in an IPv4 outer header (ipip, 6in4, GUE over IPv4).
    pub ipv4: Outer,
    /// What arrived in an IPv6 outer header (6in6, GUE over IPv6).
    pub ipv6: Outer,
}

/// Second hops: where GUE packets the balancer sent here go when no local
/// socket holds their flow. The data plane reaches them through next hops
/// lbd resolves for it (`DECAP_HOPS`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SecondHops {
    pub hops: Vec<SecondHop>,
    /// Neighbour entries lbd had the kernel keep resolved: released when
    /// no known second hop goes through them any more, and at teardown
    /// (deleted if lbd created them, else only unflagged).
    pub managed: Vec<Managed>,
    /// Second hops the data plane asked lbd about.
    pub requests: u64,
    /// Of those, the ones without a route or outside `decap.second_hops`
    /// (their packets are dropped as `drop_no_route`), or that netlink
    /// refused.
    pub failures: u64,
    /// The prefixes second hops are resolved in (`decap.second_hops`, or
    /// the interface's own prefixes).
    #[serde(default)]
    pub allowed: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecondHop {
    pub addr: IpAddr,
    pub state: HopState,
    /// The next hop: the address itself on a shared segment, else its
    /// gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
    /// `aa:bb:cc:dd:ee:ff`, once resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Why there is no route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HopState {
    /// The data plane sends to it.
    Resolved,
    /// Routed, its next hop's MAC not known yet: its packets are dropped
    /// (`drop_no_neighbor`) until the kernel has resolved it.
    Unresolved,
    /// No route: its packets are dropped (`drop_no_route`).
    NoRoute,
    /// Outside `decap.second_hops`: not resolved, its packets are dropped
    /// (`drop_no_route`).
    Refused,
}

impl HopState {
    pub const ALL: [HopState; 4] = [
        HopState::Resolved,
        HopState::Unresolved,
        HopState::NoRoute,
        HopState::Refused,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            HopState::Resolved => "resolved",
            HopState::Unresolved => "unresolved",
            HopState::NoRoute => "no_route",
            HopState::Refused => "refused",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SysctlStatus {
    /// `[sysctl] apply`.
    pub applied: bool,
    /// Where the originals are kept until teardown restores them.
    pub backup: Option<PathBuf>,
    /// The backend profile now (this interface's `rp_filter` included).
    pub rows: Vec<crate::sysctl::Row>,
}

/// `POST /v1/reload`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reloaded {
    pub role: String,
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// `[old, new]` when it changed.
    pub gue_port: Option<[u16; 2]>,
}

/// `POST /v1/teardown`, and what `lbd --teardown` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TornDown {
    pub role: String,
    /// For lbctl's one-line summary (as the balancer's answer has).
    pub teardown: String,
    /// Pins were removed (the program detached).
    pub unpinned: bool,
    /// VIPs lbd had put on `lo`, now removed.
    pub removed_from_lo: Vec<IpAddr>,
    /// VIPs left on `lo` because they were there before lbd.
    pub left_on_lo: Vec<IpAddr>,
    /// Managed neighbour entries lbd had created, deleted.
    pub neighbors_removed: usize,
    /// Entries that were there before lbd flagged them managed: flag
    /// cleared, entry kept.
    #[serde(default)]
    pub neighbors_unflagged: usize,
    /// Sysctls written back to their values before lbd.
    pub sysctls_restored: BTreeMap<String, String>,
    /// Sysctls in the backup this kernel no longer has (an interface
    /// renamed or removed since): not restored.
    #[serde(default)]
    pub sysctls_skipped: Vec<String>,
    /// Steps that failed (the others were still done).
    pub errors: Vec<String>,
}
