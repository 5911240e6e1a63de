//! Announcing VIPs: a route per VIP address in a dedicated kernel routing
//! table (`[announce] table`, `VIP/32` or `VIP/128 dev lo proto static`)
//! while this node should receive that VIP's traffic. A routing daemon on
//! the node (BIRD's kernel protocol with `learn`, FRR, ...) picks the table
//! up and announces it to the routers, which spread flows over every node
//! announcing a VIP (ECMP). Withdrawing is deleting the route.
//!
//! Whether a VIP is announced ([`plan`]) is decided here, purely; the
//! routes are written by a task of their own ([`spawn`]), so the main loop
//! only ever hands it the set it wants.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{api::VipStatus, config::AnnounceConfig};

/// Why a VIP is or is not announced by this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Reason {
    /// Announced: attached, enough healthy backends, node not drained.
    Announced,
    /// Fewer healthy backends than the VIP needs.
    NoHealthyBackends { healthy: u32, needed: u32 },
    /// The node is drained (`lbctl node drain`).
    NodeDrained,
    /// The data plane is not attached (starting, or being torn down).
    Detached,
}

/// One VIP's announcement decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnouncement {
    pub vip: String,
    /// The address whose route carries the VIP (several VIPs, one per port
    /// or protocol, can share one).
    pub address: IpAddr,
    pub announce: bool,
    #[serde(flatten)]
    pub reason: Reason,
}

/// The decision for every VIP: announced when the data plane is attached,
/// the node is not drained and the VIP has at least its minimum of healthy
/// backends (up: checks pass, not drained, weight above 0). An address is
/// announced when any of its VIPs is: the route cannot tell ports apart.
pub fn plan(
    vips: &[VipStatus],
    min_healthy: &BTreeMap<String, u32>,
    node_drained: bool,
    attached: bool,
) -> Vec<VipAnnouncement> {
    vips.iter()
        .map(|v| {
            let address = v
                .vip
                .parse::<crate::config::VipSpec>()
                .map(|s| s.addr)
                .unwrap_or(IpAddr::from([0, 0, 0, 0]));
            // Passing checks, not ring membership: in panic mode a node whose
            // backends all fail (perhaps only from here) must still
            // withdraw, so the fleet's other nodes take the traffic.
            let healthy = v.backends.iter().filter(|b| b.healthy()).count() as u32;
            let needed = min_healthy.get(&v.vip).copied().unwrap_or(1);
            let reason = if !attached {
                Reason::Detached
            } else if node_drained {
                Reason::NodeDrained
            } else if healthy < needed || healthy == 0 && needed == 0 && v.backends.is_empty() {
                Reason::NoHealthyBackends { healthy, needed }
            } else {
                Reason::Announced
            };
            VipAnnouncement {
                vip: v.vip.clone(),
                address,
                announce: reason == Reason::Announced,
                reason,
            }
        })
        .collect()
}

/// The addresses to have routes for.
pub fn addresses(plan: &[VipAnnouncement]) -> BTreeSet<IpAddr> {
    plan.iter()
        .filter(|a| a.announce)
        .map(|a| a.address)
        .collect()
}

/// The routes in the announce table, over rtnetlink.
#[derive(Clone)]
pub struct Routes {
    handle: Handle,
    table: u32,
    ifindex: u32,
}

impl Routes {
    /// Opens a netlink connection (inside a tokio runtime) and resolves the
    /// routes' device, which must exist.
    pub async fn new(cfg: &AnnounceConfig) -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        let mut links = handle.link().get().match_name(cfg.device.clone()).execute();
        let ifindex = match links.try_next().await {
            Ok(Some(l)) => l.header.index,
            _ => bail!("announce.device {:?} does not exist", cfg.device),
        };
        Ok(Routes {
            handle,
            table: cfg.table,
            ifindex,
        })
    }

    fn table_of(m: &RouteMessage) -> u32 {
        m.attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(m.header.table as u32)
    }

    /// Every host route in the table (whoever added it: the table is
    /// lbd's own).
    pub async fn installed(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = self.handle.route().get(RouteMessage::default());
            req.message_mut().header.address_family = family;
            let mut dump = req.execute();
            while let Some(m) = dump.try_next().await.context("dumping routes")? {
                if Self::table_of(&m) != self.table {
                    continue;
                }
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d))
                            if m.header.destination_prefix_length == 32 =>
                        {
                            out.insert(IpAddr::V4(*d));
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(d))
                            if m.header.destination_prefix_length == 128 =>
                        {
                            out.insert(IpAddr::V6(*d));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }

    fn message(&self, addr: IpAddr) -> Result<RouteMessage> {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, len)
            .context("building a route")?
            .output_interface(self.ifindex)
            .table_id(self.table)
            .protocol(RouteProtocol::Static)
            .scope(RouteScope::Link)
            .build())
    }

    pub async fn add(&self, addr: IpAddr) -> Result<()> {
        self.handle
            .route()
            .add(self.message(addr)?)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the route to {addr} in table {}", self.table))
    }

    pub async fn delete(&self, addr: IpAddr) -> Result<()> {
        self.handle
            .route()
            .del(self.message(addr)?)
            .execute()
            .await
            .with_context(|| format!("deleting the route to {addr} in table {}", self.table))
    }

    /// Makes the table hold exactly `want`; returns (added, removed).
    pub async fn sync(&self, want: &BTreeSet<IpAddr>) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
        let have = self.installed().await?;
        let added: Vec<IpAddr> = want.difference(&have).copied().collect();
        let removed: Vec<IpAddr> = have.difference(want).copied().collect();
        for a in &added {
            self.add(*a).await?;
        }
        for a in &removed {
            self.delete(*a).await?;
        }
        Ok((added, removed))
    }
}

/// What the announcer task last did, for `lbctl node status` and metrics.
#[derive(Clone, Debug, Default)]
pub struct Installed {
    /// The addresses whose routes are in the table.
    pub routes: BTreeSet<IpAddr>,
    /// The last failure to write them, if the last attempt failed.
    pub error: Option<String>,
}

pub type Shared = Arc<Mutex<Installed>>;

/// Runs the announcer: every new wanted set is written to the table, and
/// the outcome recorded in the returned state. Routes that cannot be
/// written are retried with the next change, or after a few seconds.
pub fn spawn(routes: Routes, mut want: watch::Receiver<BTreeSet<IpAddr>>) -> Shared {
    let state: Shared = Arc::default();
    let out = state.clone();
    tokio::spawn(async move {
        loop {
            let wanted = want.borrow_and_update().clone();
            let result = routes.sync(&wanted).await;
            let installed = routes.installed().await.unwrap_or_default();
            let failed = match result {
                Ok((added, removed)) => {
                    for a in added {
                        tracing::info!(vip = %a, table = routes.table, "VIP announced (route added)");
                    }
                    for a in removed {
                        tracing::info!(vip = %a, table = routes.table, "VIP withdrawn (route deleted)");
                    }
                    None
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "writing announce routes failed");
                    Some(format!("{e:#}"))
                }
            };
            let retry = failed.is_some();
            if let Ok(mut s) = out.lock() {
                *s = Installed {
                    routes: installed,
                    error: failed,
                };
            }
            if retry {
                // A change wakes us sooner.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(3), want.changed()).await;
            } else if want.changed().await.is_err() {
                return;
            }
        }
    });
    state
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        api::{BackendState, BackendStatus},
        health::Health,
    };

    fn vip(name: &str, states: &[BackendState]) -> VipStatus {
        VipStatus {
            panic: false,
            ring_fingerprint: String::new(),
            vip: name.into(),
            id: 0,
            mode: "ipip".into(),
            ring_flips: 0,
            backends: states
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut b =
                        BackendStatus::new(IpAddr::from([198, 18, 0, 20 + i as u8]), 1, 100);
                    b.state = *s;
                    b.health = if *s == BackendState::Down {
                        Health::Down
                    } else {
                        Health::Up
                    };
                    b
                })
                .collect(),
        }
    }

    use BackendState::{Down, Draining, Up};

    /// One row per rule: the VIP's backends, its minimum, the node's state,
    /// the expected reason.
    #[test]
    fn rows() {
        /// Description, the VIP's backends, its minimum, node drained,
        /// attached, the reason expected.
        type Row<'a> = (&'a str, &'a [BackendState], u32, bool, bool, Reason);
        let rows: &[Row] = &[
            ("healthy", &[Up, Up], 1, false, true, Reason::Announced),
            (
                "all down",
                &[Down, Down],
                1,
                false,
                true,
                Reason::NoHealthyBackends {
                    healthy: 0,
                    needed: 1,
                },
            ),
            (
                "draining backends are not healthy ones",
                &[Draining, Down],
                1,
                false,
                true,
                Reason::NoHealthyBackends {
                    healthy: 0,
                    needed: 1,
                },
            ),
            (
                "below a minimum of 2",
                &[Up, Down],
                2,
                false,
                true,
                Reason::NoHealthyBackends {
                    healthy: 1,
                    needed: 2,
                },
            ),
            (
                "at a minimum of 2",
                &[Up, Up, Down],
                2,
                false,
                true,
                Reason::Announced,
            ),
            ("node drained", &[Up], 1, true, true, Reason::NodeDrained),
            ("detached", &[Up], 1, false, false, Reason::Detached),
            (
                "detached wins over drained",
                &[Up],
                1,
                true,
                false,
                Reason::Detached,
            ),
            (
                "a minimum of 0 announces a VIP whose backends are down",
                &[Down],
                0,
                false,
                true,
                Reason::Announced,
            ),
            (
                "a VIP with no backends at all is never announced",
                &[],
                0,
                false,
                true,
                Reason::NoHealthyBackends {
                    healthy: 0,
                    needed: 0,
                },
            ),
        ];
        for (name, backends, min, drained, attached, want) in rows {
            let v = [vip("198.18.100.1:80/tcp", backends)];
            let mins = BTreeMap::from([("198.18.100.1:80/tcp".to_owned(), *min)]);
            let p = plan(&v, &mins, *drained, *attached);
            assert_eq!(p[0].reason, *want, "{name}");
            assert_eq!(p[0].announce, *want == Reason::Announced, "{name}");
        }
    }

    /// Two VIPs on one address: announced while either qualifies.
    #[test]
    fn an_address_is_announced_while_any_of_its_vips_is() {
        let v = [
            vip("198.18.100.1:80/tcp", &[Down]),
            vip("198.18.100.1:443/tcp", &[Up]),
            vip("198.18.100.2:80/tcp", &[Down]),
        ];
        let p = plan(&v, &BTreeMap::new(), false, true);
        assert_eq!(
            addresses(&p),
            BTreeSet::from([IpAddr::from([198, 18, 100, 1])])
        );
    }
}
