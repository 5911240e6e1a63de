//! The fleet's desired state: one JSON document in etcd, the same for every
//! node (VIPs, modes, health checks, backends, weights, drains, the hash
//! seed and ring size). Pure: converted from and to the configuration's
//! types, changed by the same operations as the control API, and checked by
//! the configuration's own backend rules before it is written.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    config::{
        BackendConfig, CheckKind, Config, EncapSources, ForwardMode, HealthCheck, MAX_WEIGHT,
        VipConfig, VipSpec, check_backend,
    },
    controller::{AdminError, parse_check},
    membership::FlapDamping,
};

/// The drained backends, by VIP and address.
pub type Drained = BTreeSet<(VipSpec, IpAddr)>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub hash_seed: u32,
    pub ring_size: u32,
    pub vips: Vec<DesiredVip>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredVip {
    pub address: VipSpec,
    pub mode: ForwardMode,
    pub check: CheckDef,
    #[serde(default)]
    pub slowstart_ms: u64,
    #[serde(default)]
    pub min_healthy_permille: u32,
    #[serde(default)]
    pub min_healthy_backends: Option<u32>,
    pub backends: Vec<DesiredBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBackend {
    pub address: IpAddr,
    pub weight: u32,
    #[serde(default)]
    pub drained: bool,
    #[serde(default)]
    pub slowstart_ms: Option<u64>,
}

/// A health check as stored: every field explicit, durations in ms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDef {
    /// `none`, `tcp`, `http` or `udp`.
    pub kind: String,
    #[serde(default)]
    pub port: Option<u16>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub fastinter_ms: u64,
    pub downinter_ms: u64,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub expect_status: Option<u16>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub payload: Option<String>,
    #[serde(default)]
    pub expect: Option<String>,
    pub flap_limit: u32,
    pub flap_window_ms: u64,
    pub flap_hold_ms: u64,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl From<&HealthCheck> for CheckDef {
    fn from(c: &HealthCheck) -> Self {
        let mut def = CheckDef {
            kind: String::new(),
            port: c.port,
            interval_ms: ms(c.interval),
            timeout_ms: ms(c.timeout),
            rise: c.rise,
            fall: c.fall,
            fastinter_ms: ms(c.fastinter),
            downinter_ms: ms(c.downinter),
            path: None,
            expect_status: None,
            host: None,
            payload: None,
            expect: None,
            flap_limit: c.flap.limit,
            flap_window_ms: ms(c.flap.window),
            flap_hold_ms: ms(c.flap.hold),
        };
        def.kind = match &c.kind {
            CheckKind::None => "none".into(),
            CheckKind::Tcp => "tcp".into(),
            CheckKind::Http {
                path,
                expect_status,
                host,
            } => {
                def.path = Some(path.clone());
                def.expect_status = Some(*expect_status);
                def.host = host.clone();
                "http".into()
            }
            CheckKind::Udp { payload, expect } => {
                def.payload = Some(String::from_utf8_lossy(payload).into_owned());
                def.expect = Some(String::from_utf8_lossy(expect).into_owned());
                "udp".into()
            }
        };
        def
    }
}

impl CheckDef {
    /// The check this stands for; a document another program wrote may
    /// say anything, so it is checked like a configuration file.
    pub fn check(&self) -> Result<HealthCheck, String> {
        let d = Duration::from_millis;
        if self.interval_ms == 0 || self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "check: interval {} ms and timeout {} ms (both above 0, timeout at most the interval)",
                self.interval_ms, self.timeout_ms
            ));
        }
        if !(1..=100).contains(&self.rise) || !(1..=100).contains(&self.fall) {
            return Err("check: rise and fall must be 1..=100".into());
        }
        let kind = match self.kind.as_str() {
            "none" => CheckKind::None,
            "tcp" => CheckKind::Tcp,
            "http" => {
                let path = self.path.clone().unwrap_or_else(|| "/".into());
                if !path.starts_with('/') || path.contains(char::is_whitespace) {
                    return Err(format!("check: http path {path:?}"));
                }
                CheckKind::Http {
                    path,
                    expect_status: self.expect_status.unwrap_or(200),
                    host: self.host.clone(),
                }
            }
            "udp" => CheckKind::Udp {
                payload: self.payload.clone().unwrap_or_default().into_bytes(),
                expect: self.expect.clone().unwrap_or_default().into_bytes(),
            },
            other => return Err(format!("check: kind {other:?} (none, tcp, http, udp)")),
        };
        let hold = d(self.flap_hold_ms.max(1));
        Ok(HealthCheck {
            kind,
            port: self.port,
            interval: d(self.interval_ms),
            timeout: d(self.timeout_ms),
            rise: self.rise,
            fall: self.fall,
            fastinter: d(self.fastinter_ms.max(1)),
            downinter: d(self.downinter_ms.max(1)),
            flap: FlapDamping {
                limit: self.flap_limit.max(1),
                window: d(self.flap_window_ms.max(1)),
                hold,
                max_hold: FlapDamping::default().max_hold.max(hold),
            },
        })
    }
}

/// One change, as the control API makes it.
#[derive(Clone, Debug)]
pub enum Change {
    AddBackend {
        vip: VipSpec,
        addr: IpAddr,
        weight: u32,
    },
    RemoveBackend {
        vip: VipSpec,
        addr: IpAddr,
    },
    Drain {
        vip: VipSpec,
        addr: IpAddr,
        drained: bool,
    },
    Weight {
        vip: VipSpec,
        addr: IpAddr,
        weight: u32,
    },
    AddVip {
        vip: VipSpec,
        mode: ForwardMode,
        check: String,
    },
    RemoveVip {
        vip: VipSpec,
    },
}

impl Desired {
    /// The desired state a configuration file describes (no drains).
    pub fn from_config(c: &Config) -> Desired {
        Desired {
            hash_seed: c.hash_seed,
            ring_size: c.sizes.ring_size,
            vips: c
                .vips
                .iter()
                .map(|v| DesiredVip {
                    address: v.spec,
                    mode: v.mode,
                    check: CheckDef::from(&v.health_check),
                    slowstart_ms: ms(v.slowstart),
                    min_healthy_permille: v.min_healthy_permille,
                    min_healthy_backends: v.min_healthy_backends,
                    backends: v
                        .backends
                        .iter()
                        .map(|b| DesiredBackend {
                            address: b.addr,
                            weight: b.weight,
                            drained: false,
                            slowstart_ms: b.slowstart.map(ms),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The VIPs as the controller takes them, and the drained backends.
    pub fn vip_configs(&self) -> Result<(Vec<VipConfig>, Drained), String> {
        let mut drained = BTreeSet::new();
        let mut vips = Vec::new();
        for v in &self.vips {
            let check = v
                .check
                .check()
                .map_err(|e| format!("VIP {}: {e}", v.address))?;
            let mut c = VipConfig::new(v.address, v.mode, check);
            c.slowstart = Duration::from_millis(v.slowstart_ms);
            c.min_healthy_permille = v.min_healthy_permille.min(1000);
            c.min_healthy_backends = v.min_healthy_backends;
            c.backends = v
                .backends
                .iter()
                .map(|b| {
                    if b.drained {
                        drained.insert((v.address, b.address));
                    }
                    BackendConfig {
                        addr: b.address,
                        weight: b.weight,
                        slowstart: b.slowstart_ms.map(Duration::from_millis),
                    }
                })
                .collect();
            vips.push(c);
        }
        Ok((vips, drained))
    }

    /// Checks the whole document by the configuration's rules: VIPs once,
    /// backends once per VIP and each acceptable for its VIP and mode,
    /// checks well formed, within the map sizes.
    pub fn validate(
        &self,
        encap: EncapSources,
        max_vips: u32,
        max_backends: u32,
    ) -> Result<(), String> {
        if self.vips.len() > max_vips as usize {
            return Err(format!(
                "{} VIPs, dataplane.max_vips is {max_vips}",
                self.vips.len()
            ));
        }
        let total: usize = self.vips.iter().map(|v| v.backends.len()).sum();
        if total >= max_backends as usize {
            return Err(format!(
                "{total} backends, dataplane.max_backends is {max_backends} (id 0 is reserved)"
            ));
        }
        let mut seen = BTreeSet::new();
        for v in &self.vips {
            if !seen.insert(v.address) {
                return Err(format!("VIP {} is listed twice", v.address));
            }
            v.check
                .check()
                .map_err(|e| format!("VIP {}: {e}", v.address))?;
            let mut addrs = BTreeSet::new();
            for b in &v.backends {
                check_backend(&v.address, v.mode, b.address, b.weight, encap, &addrs)
                    .map_err(|e| e.to_string())?;
                addrs.insert(b.address);
            }
        }
        Ok(())
    }

    /// The `[[vip]]` sections of a configuration file saying the same
    /// (`lbctl fleet export`); drains, which a file cannot hold, as
    /// comments.
    pub fn to_toml(&self, revision: i64) -> String {
        use std::fmt::Write;
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut out = format!(
            "# The fleet's desired state at revision {revision}; it was built with\n\
             # [dataplane] hash_seed = {} and ring_size = {}.\n",
            self.hash_seed, self.ring_size
        );
        for v in &self.vips {
            let _ = write!(
                out,
                "\n[[vip]]\naddress = {}\nmode = {}\n",
                q(&v.address.to_string()),
                q(&v.mode.to_string())
            );
            if v.slowstart_ms > 0 {
                let _ = writeln!(out, "slowstart = \"{}ms\"", v.slowstart_ms);
            }
            if v.min_healthy_permille > 0 {
                let _ = writeln!(
                    out,
                    "min_healthy = {}",
                    f64::from(v.min_healthy_permille) / 1000.0
                );
            }
            if let Some(n) = v.min_healthy_backends {
                let _ = writeln!(out, "min_healthy_backends = {n}");
            }
            let c = &v.check;
            let _ = write!(
                out,
                "[vip.health_check]\ntype = {}\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {}\nfall = {}\n\
                 fastinter = \"{}ms\"\ndowninter = \"{}ms\"\nflap_limit = {}\nflap_window = \"{}ms\"\nflap_hold = \"{}ms\"\n",
                q(&c.kind),
                c.interval_ms,
                c.timeout_ms,
                c.rise,
                c.fall,
                c.fastinter_ms,
                c.downinter_ms,
                c.flap_limit,
                c.flap_window_ms,
                c.flap_hold_ms
            );
            if let Some(p) = c.port {
                let _ = writeln!(out, "port = {p}");
            }
            for (name, value) in [
                ("path", &c.path),
                ("host", &c.host),
                ("payload", &c.payload),
                ("expect", &c.expect),
            ] {
                if let Some(value) = value {
                    let _ = writeln!(out, "{name} = {}", q(value));
                }
            }
            if let Some(st) = c.expect_status {
                let _ = writeln!(out, "expect_status = {st}");
            }
            for b in &v.backends {
                let _ = write!(
                    out,
                    "[[vip.backend]]\naddress = {}\nweight = {}\n",
                    q(&b.address.to_string()),
                    b.weight
                );
                if let Some(ms) = b.slowstart_ms {
                    let _ = writeln!(out, "slowstart = \"{ms}ms\"");
                }
                if b.drained {
                    out.push_str("# drained in the fleet (lbctl drain)\n");
                }
            }
        }
        out
    }

    fn vip_mut(&mut self, vip: &VipSpec) -> Result<&mut DesiredVip, AdminError> {
        self.vips
            .iter_mut()
            .find(|v| v.address == *vip)
            .ok_or_else(|| AdminError::UnknownVip(vip.to_string()))
    }

    fn backend_mut(v: &mut DesiredVip, addr: IpAddr) -> Result<&mut DesiredBackend, AdminError> {
        let vip = v.address.to_string();
        v.backends
            .iter_mut()
            .find(|b| b.address == addr)
            .ok_or(AdminError::UnknownBackend { vip, backend: addr })
    }

    /// Applies one change, by the rules the control API applies on a
    /// single node.
    pub fn apply(&mut self, change: &Change, encap: EncapSources) -> Result<(), AdminError> {
        match change {
            Change::AddBackend { vip, addr, weight } => {
                let v = self.vip_mut(vip)?;
                let existing: BTreeSet<IpAddr> = v.backends.iter().map(|b| b.address).collect();
                check_backend(vip, v.mode, *addr, *weight, encap, &existing)
                    .map_err(AdminError::from)?;
                v.backends.push(DesiredBackend {
                    address: *addr,
                    weight: *weight,
                    drained: false,
                    slowstart_ms: None,
                });
            }
            Change::RemoveBackend { vip, addr } => {
                let v = self.vip_mut(vip)?;
                Self::backend_mut(v, *addr)?;
                v.backends.retain(|b| b.address != *addr);
            }
            Change::Drain { vip, addr, drained } => {
                Self::backend_mut(self.vip_mut(vip)?, *addr)?.drained = *drained;
            }
            Change::Weight { vip, addr, weight } => {
                if *weight > MAX_WEIGHT {
                    return Err(AdminError::Weight(*weight));
                }
                Self::backend_mut(self.vip_mut(vip)?, *addr)?.weight = *weight;
            }
            Change::AddVip { vip, mode, check } => {
                if self.vips.iter().any(|v| v.address == *vip) {
                    return Err(AdminError::Invalid(format!("VIP {vip} already exists")));
                }
                let check = parse_check(check).map_err(AdminError::Invalid)?;
                self.vips.push(DesiredVip {
                    address: *vip,
                    mode: *mode,
                    check: CheckDef::from(&check),
                    slowstart_ms: 0,
                    min_healthy_permille: 0,
                    min_healthy_backends: None,
                    backends: Vec::new(),
                });
            }
            Change::RemoveVip { vip } => {
                self.vip_mut(vip)?;
                self.vips.retain(|v| v.address != *vip);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[instance]\nname = \"lb0\"\ninterface = \"eth0\"\n\
        [dataplane]\nencap_source_v4 = \"198.18.0.2\"\nhash_seed = 7\n\
        [[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\nslowstart = \"5s\"\nmin_healthy = 0.5\n\
        [vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"500ms\"\ntimeout = \"200ms\"\nflap_hold = \"3s\"\n\
        [[vip.backend]]\naddress = \"198.18.0.20\"\n\
        [[vip.backend]]\naddress = \"198.18.0.21\"\nweight = 50\nslowstart = \"1s\"\n\
        [[vip]]\naddress = \"198.18.100.2:53/udp\"\nmode = \"l2dsr\"\n\
        [vip.health_check]\ntype = \"udp\"\npayload = \"ping\"\nexpect = \"pong\"\n\
        [[vip.backend]]\naddress = \"198.18.0.22\"\n";

    fn encap() -> EncapSources {
        EncapSources {
            v4: Some("198.18.0.2".parse().unwrap()),
            v6: None,
        }
    }

    #[test]
    fn a_configuration_round_trips_through_the_document() {
        let c = Config::parse("lb.toml", FILE).unwrap();
        let d = Desired::from_config(&c);
        let json = serde_json::to_string(&d).unwrap();
        let back: Desired = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        let (vips, drained) = back.vip_configs().unwrap();
        assert_eq!(vips, c.vips, "every setting survives");
        assert!(drained.is_empty());
        assert_eq!(
            (d.hash_seed, d.ring_size),
            (7, lb_common::maglev::DEFAULT_RING_SIZE)
        );
        d.validate(encap(), 64, 4096).unwrap();
    }

    #[test]
    fn an_export_reads_back_as_the_same_state() {
        let c = Config::parse("lb.toml", FILE).unwrap();
        let d = Desired::from_config(&c);
        let head = FILE.split("[[vip]]").next().unwrap();
        let text = format!("{head}{}", d.to_toml(42));
        assert!(text.contains("revision 42"), "{text}");
        let back = Config::parse("export.toml", &text).unwrap();
        assert_eq!(Desired::from_config(&back), d, "{text}");
    }

    #[test]
    fn changes_follow_the_control_apis_rules() {
        let c = Config::parse("lb.toml", FILE).unwrap();
        let mut d = Desired::from_config(&c);
        let vip: VipSpec = "198.18.100.1:80/tcp".parse().unwrap();
        let b = |s: &str| s.parse::<IpAddr>().unwrap();
        let add = |addr, weight| Change::AddBackend { vip, addr, weight };
        d.apply(&add(b("198.18.0.23"), 100), encap()).unwrap();
        assert!(matches!(
            d.apply(&add(b("198.18.0.23"), 100), encap()),
            Err(AdminError::DuplicateBackend { .. })
        ));
        assert!(matches!(
            d.apply(&add(b("198.18.0.24"), 70000), encap()),
            Err(AdminError::Weight(70000))
        ));
        assert!(matches!(
            d.apply(&add(b("fd00::24"), 1), encap()),
            Err(AdminError::Invalid(_))
        ));
        d.apply(
            &Change::Drain {
                vip,
                addr: b("198.18.0.20"),
                drained: true,
            },
            encap(),
        )
        .unwrap();
        let (_, drained) = d.vip_configs().unwrap();
        assert!(drained.contains(&(vip, b("198.18.0.20"))));
        let other: VipSpec = "198.18.100.9:80/tcp".parse().unwrap();
        assert!(matches!(
            d.apply(&Change::RemoveVip { vip: other }, encap()),
            Err(AdminError::UnknownVip(_))
        ));
        d.apply(
            &Change::AddVip {
                vip: other,
                mode: ForwardMode::Ipip,
                check: "tcp".into(),
            },
            encap(),
        )
        .unwrap();
        d.apply(
            &Change::RemoveBackend {
                vip,
                addr: b("198.18.0.21"),
            },
            encap(),
        )
        .unwrap();
        d.validate(encap(), 64, 4096).unwrap();
        assert_eq!(d.vips.len(), 3);
        assert_eq!(d.vips[0].backends.len(), 2);
    }

    #[test]
    fn a_document_breaking_the_rules_is_refused() {
        let c = Config::parse("lb.toml", FILE).unwrap();
        let mut d = Desired::from_config(&c);
        let twin = d.vips[0].backends[0].clone();
        d.vips[0].backends.push(twin);
        assert!(d.validate(encap(), 64, 4096).unwrap_err().contains("twice"));
        let mut d = Desired::from_config(&c);
        d.vips[0].check.timeout_ms = 0;
        assert!(d.validate(encap(), 64, 4096).is_err());
        let d = Desired::from_config(&c);
        assert!(
            d.validate(encap(), 1, 4096)
                .unwrap_err()
                .contains("max_vips")
        );
    }
}
