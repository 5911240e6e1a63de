//! What a configuration change would do, before it is done: per VIP, the
//! backends added, removed and reweighted, mode, check and setting changes,
//! and the share of ring slots that would move to another backend, from
//! the real Maglev builder over the real current state. Pure: `lbctl diff`
//! (through a running lbd) and `lbd --check --diff` (without one) both
//! feed it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::maglev::{self, MaglevBackend};
use serde::{Deserialize, Serialize};

use crate::{
    config::{CheckKind, HealthCheck, VipConfig, vip::addr16},
    health::Health,
    membership::{self, Member},
};

/// One backend as it is now.
#[derive(Clone, Copy, Debug)]
pub struct CurrentBackend {
    pub addr: IpAddr,
    pub member: Member,
    /// Its weight in the ring now (0: not in it).
    pub effective_weight: u32,
}

/// One VIP as it is now: its settings and its backends.
#[derive(Clone, Debug)]
pub struct CurrentVip {
    pub config: VipConfig,
    pub backends: Vec<CurrentBackend>,
}

impl CurrentVip {
    /// `config`'s backends as `members` (in its order), each with the
    /// weight the ring gives it at `now`.
    pub fn planned(config: &VipConfig, members: Vec<Member>, now: Instant) -> CurrentVip {
        let plan = membership::plan(&members, config.min_healthy_permille, now);
        CurrentVip {
            config: config.clone(),
            backends: config
                .backends
                .iter()
                .zip(members)
                .zip(plan.backends)
                .map(|((b, member), (_, w))| CurrentBackend {
                    addr: b.addr,
                    member,
                    effective_weight: w,
                })
                .collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipChange {
    Added,
    Removed,
    Changed,
    Unchanged,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reweight {
    pub backend: IpAddr,
    pub from: u32,
    pub to: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipDiff {
    pub vip: String,
    pub change: VipChange,
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    pub reweighted: Vec<Reweight>,
    /// `[from, to]`.
    pub mode: Option<[String; 2]>,
    pub health_check: Option<[String; 2]>,
    /// Other settings, as `name: from -> to`.
    pub settings: Vec<String>,
    /// The share of ring slots (0..=1) whose backend changes once the
    /// change has settled: added backends in after passing their first
    /// check, slow starts and ramps done. `None` for a VIP added or removed.
    pub slots_moved: Option<f64>,
}

/// A whole change: every VIP in either state, and whether anything changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigDiff {
    pub vips: Vec<VipDiff>,
    pub changes: usize,
}

/// A health check as one line, for showing what changed.
pub fn describe_check(c: &HealthCheck) -> String {
    let kind = match &c.kind {
        CheckKind::None => return "none".into(),
        CheckKind::Tcp => "tcp".to_owned(),
        CheckKind::Http {
            path,
            expect_status,
            host,
        } => format!(
            "http GET {path} expecting {expect_status}{}",
            host.as_ref()
                .map_or(String::new(), |h| format!(" host {h}"))
        ),
        CheckKind::Udp { payload, expect } => format!(
            "udp {:?} expecting {:?}",
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(expect)
        ),
    };
    let port = c.port.map_or(String::new(), |p| format!(" port {p}"));
    format!(
        "{kind}{port} every {:?} timeout {:?} rise {} fall {} fastinter {:?} downinter {:?} flap {}/{:?} hold {:?}",
        c.interval,
        c.timeout,
        c.rise,
        c.fall,
        c.fastinter,
        c.downinter,
        c.flap.limit,
        c.flap.window,
        c.flap.hold
    )
}

fn fraction(permille: u32) -> String {
    format!("{}", f64::from(permille) / 1000.0)
}

/// The settings besides backends, mode and check that differ.
fn settings(old: &VipConfig, new: &VipConfig) -> Vec<String> {
    let mut out = Vec::new();
    if old.slowstart != new.slowstart {
        out.push(format!(
            "slowstart: {:?} -> {:?}",
            old.slowstart, new.slowstart
        ));
    }
    if old.min_healthy_permille != new.min_healthy_permille {
        out.push(format!(
            "min_healthy: {} -> {}",
            fraction(old.min_healthy_permille),
            fraction(new.min_healthy_permille)
        ));
    }
    if old.min_healthy_backends != new.min_healthy_backends {
        out.push(format!(
            "min_healthy_backends: {:?} -> {:?}",
            old.min_healthy_backends, new.min_healthy_backends
        ));
    }
    for b in &new.backends {
        if let Some(o) = old.backends.iter().find(|o| o.addr == b.addr)
            && o.slowstart != b.slowstart
        {
            let show = |d: Option<Duration>| d.map_or("the VIP's".to_owned(), |d| format!("{d:?}"));
            out.push(format!(
                "backend {} slowstart: {} -> {}",
                b.addr,
                show(o.slowstart),
                show(b.slowstart)
            ));
        }
    }
    out
}

/// Builds a ring from (address, weight) pairs with slot labels shared
/// through `labels`, so two rings compare slot by slot by backend.
fn ring(
    members: &[(IpAddr, u32)],
    labels: &BTreeMap<IpAddr, u32>,
    size: u32,
    seed: u32,
) -> Result<Vec<u32>, maglev::MaglevError> {
    let backends: Vec<MaglevBackend> = members
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(addr, weight)| MaglevBackend {
            id: labels[addr],
            identity: addr16(*addr).0,
            weight: *weight,
        })
        .collect();
    maglev::build(&backends, size, seed)
}

/// The share of slots whose backend differs between the VIP's ring now
/// and its ring under `new` once settled: backends kept keep their
/// health, drain and flap hold; added ones count as passing their checks.
pub fn slots_moved(
    current: &CurrentVip,
    new: &VipConfig,
    size: u32,
    seed: u32,
    now: Instant,
) -> Result<f64, maglev::MaglevError> {
    let before: Vec<(IpAddr, u32)> = current
        .backends
        .iter()
        .map(|b| (b.addr, b.effective_weight))
        .collect();
    let members: Vec<Member> = new
        .backends
        .iter()
        .map(|b| {
            let kept = current.backends.iter().find(|c| c.addr == b.addr);
            let base = kept.map_or(Member::steady(Health::Up, b.weight), |c| c.member);
            Member {
                weight: b.weight,
                member_since: None,
                ramp: None,
                ..base
            }
        })
        .collect();
    let plan = membership::plan(&members, new.min_healthy_permille, now);
    let after: Vec<(IpAddr, u32)> = new
        .backends
        .iter()
        .zip(plan.backends)
        .map(|(b, (_, w))| (b.addr, w))
        .collect();
    let addrs: BTreeSet<IpAddr> = before.iter().chain(&after).map(|b| b.0).collect();
    let labels: BTreeMap<IpAddr, u32> = addrs.into_iter().zip(1..).collect();
    let old = ring(&before, &labels, size, seed)?;
    let new = ring(&after, &labels, size, seed)?;
    let moved = old.iter().zip(&new).filter(|(a, b)| a != b).count();
    Ok(moved as f64 / f64::from(size))
}

/// Every VIP's difference between `current` and `new` (both in their
/// order: changed and removed VIPs as now, then added ones).
pub fn diff(
    current: &[CurrentVip],
    new: &[VipConfig],
    size: u32,
    seed: u32,
    now: Instant,
) -> Result<ConfigDiff, String> {
    let mut vips = Vec::new();
    for cur in current {
        let spec = cur.config.spec;
        let Some(next) = new.iter().find(|v| v.spec == spec) else {
            vips.push(VipDiff {
                vip: spec.to_string(),
                change: VipChange::Removed,
                added: Vec::new(),
                removed: cur.backends.iter().map(|b| b.addr).collect(),
                reweighted: Vec::new(),
                mode: None,
                health_check: None,
                settings: Vec::new(),
                slots_moved: None,
            });
            continue;
        };
        let now_addrs: BTreeSet<IpAddr> = cur.backends.iter().map(|b| b.addr).collect();
        let next_addrs: BTreeSet<IpAddr> = next.backends.iter().map(|b| b.addr).collect();
        let reweighted: Vec<Reweight> = next
            .backends
            .iter()
            .filter_map(|b| {
                let c = cur.backends.iter().find(|c| c.addr == b.addr)?;
                (c.member.weight != b.weight).then_some(Reweight {
                    backend: b.addr,
                    from: c.member.weight,
                    to: b.weight,
                })
            })
            .collect();
        let mode = (cur.config.mode != next.mode)
            .then(|| [cur.config.mode.to_string(), next.mode.to_string()]);
        let health_check = (cur.config.health_check != next.health_check).then(|| {
            [
                describe_check(&cur.config.health_check),
                describe_check(&next.health_check),
            ]
        });
        let mut d = VipDiff {
            vip: spec.to_string(),
            change: VipChange::Unchanged,
            added: next
                .backends
                .iter()
                .map(|b| b.addr)
                .filter(|a| !now_addrs.contains(a))
                .collect(),
            removed: cur
                .backends
                .iter()
                .map(|b| b.addr)
                .filter(|a| !next_addrs.contains(a))
                .collect(),
            reweighted,
            mode,
            health_check,
            settings: settings(&cur.config, next),
            slots_moved: Some(
                slots_moved(cur, next, size, seed, now)
                    .map_err(|e| format!("VIP {spec}: building its ring: {e}"))?,
            ),
        };
        let changed = !d.added.is_empty()
            || !d.removed.is_empty()
            || !d.reweighted.is_empty()
            || d.mode.is_some()
            || d.health_check.is_some()
            || !d.settings.is_empty();
        if changed {
            d.change = VipChange::Changed;
        }
        vips.push(d);
    }
    for next in new {
        if current.iter().any(|c| c.config.spec == next.spec) {
            continue;
        }
        vips.push(VipDiff {
            vip: next.spec.to_string(),
            change: VipChange::Added,
            added: next.backends.iter().map(|b| b.addr).collect(),
            removed: Vec::new(),
            reweighted: Vec::new(),
            mode: None,
            health_check: None,
            settings: Vec::new(),
            slots_moved: None,
        });
    }
    let changes = vips
        .iter()
        .filter(|v| v.change != VipChange::Unchanged)
        .count();
    Ok(ConfigDiff { vips, changes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, ForwardMode};

    const M: u32 = 65_537;

    fn addr(i: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, 20 + i])
    }

    fn vip(weights: &[(u8, u32)]) -> VipConfig {
        let mut v = VipConfig::new(
            "198.18.100.1:80/tcp".parse().unwrap(),
            ForwardMode::Ipip,
            HealthCheck::with_defaults(CheckKind::Tcp),
        );
        v.backends = weights
            .iter()
            .map(|(i, w)| BackendConfig::new(addr(*i), *w))
            .collect();
        v
    }

    fn current(config: &VipConfig, health: &[Health]) -> CurrentVip {
        let members = config
            .backends
            .iter()
            .zip(health)
            .map(|(b, h)| Member::steady(*h, b.weight))
            .collect();
        CurrentVip::planned(config, members, Instant::now())
    }

    #[test]
    fn nothing_changed_moves_nothing() {
        let v = vip(&[(0, 100), (1, 100), (2, 100)]);
        let cur = current(&v, &[Health::Up; 3]);
        let d = diff(&[cur], &[v], M, 7, Instant::now()).unwrap();
        assert_eq!(d.changes, 0);
        assert_eq!(d.vips[0].change, VipChange::Unchanged);
        assert_eq!(d.vips[0].slots_moved, Some(0.0));
    }

    #[test]
    fn removing_one_of_four_moves_about_a_quarter() {
        let v = vip(&[(0, 100), (1, 100), (2, 100), (3, 100)]);
        let cur = current(&v, &[Health::Up; 4]);
        let next = vip(&[(0, 100), (1, 100), (2, 100)]);
        let d = diff(&[cur], &[next], M, 7, Instant::now()).unwrap();
        let moved = d.vips[0].slots_moved.unwrap();
        assert!((0.24..0.30).contains(&moved), "{moved}");
        assert_eq!(d.vips[0].removed, vec![addr(3)]);
        assert_eq!(d.vips[0].change, VipChange::Changed);
    }

    #[test]
    fn a_down_backend_removed_moves_nothing_and_a_reweight_moves_some() {
        let v = vip(&[(0, 100), (1, 100), (2, 100)]);
        let cur = current(&v, &[Health::Up, Health::Up, Health::Down]);
        let d = diff(
            std::slice::from_ref(&cur),
            &[vip(&[(0, 100), (1, 100)])],
            M,
            7,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(d.vips[0].slots_moved, Some(0.0), "it had no slots");
        let d = diff(
            &[cur],
            &[vip(&[(0, 100), (1, 300), (2, 100)])],
            M,
            7,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(
            d.vips[0].reweighted,
            vec![Reweight {
                backend: addr(1),
                from: 100,
                to: 300
            }]
        );
        let moved = d.vips[0].slots_moved.unwrap();
        assert!((0.2..0.35).contains(&moved), "{moved}");
    }

    #[test]
    fn vips_added_and_removed_and_settings_are_listed() {
        let a = vip(&[(0, 100)]);
        let mut b = vip(&[(1, 100)]);
        b.spec = "198.18.100.2:80/tcp".parse().unwrap();
        let mut a2 = a.clone();
        a2.slowstart = Duration::from_secs(30);
        a2.min_healthy_permille = 500;
        a2.health_check = HealthCheck::with_defaults(CheckKind::None);
        a2.mode = ForwardMode::L2dsr;
        let cur = current(&a, &[Health::Up]);
        let d = diff(&[cur], &[a2, b], M, 7, Instant::now()).unwrap();
        assert_eq!(d.changes, 2);
        assert_eq!(
            d.vips[0].settings,
            vec!["slowstart: 0ns -> 30s", "min_healthy: 0 -> 0.5"]
        );
        assert_eq!(
            d.vips[0].mode,
            Some(["ipip".to_owned(), "l2dsr".to_owned()])
        );
        assert_eq!(d.vips[0].health_check.as_ref().unwrap()[1], "none");
        assert_eq!(d.vips[1].change, VipChange::Added);
        assert_eq!(d.vips[1].slots_moved, None);
        let d = diff(&[current(&a, &[Health::Up])], &[], M, 7, Instant::now()).unwrap();
        assert_eq!(d.vips[0].change, VipChange::Removed);
    }
}
