//! The backend role's configuration file: the same `[instance]` table as a
//! balancer's (so one set of words for both), `role = "backend"` at the top,
//! and a `[decap]` table naming the VIPs this host serves.
//!
//! ```toml
//! role = "backend"
//! [instance]
//! name = "web1"
//! interface = "eth0"
//! [decap]
//! vips = ["198.18.100.1", "fd00:198:18:100::1"]
//! second_hops = ["198.18.0.0/24", "fd00:198:18::/64"]
//! ```
//!
//! `decap.second_hops` lists the prefixes (`ADDRESS/LENGTH`; a bare
//! address is a /32 or /128) a GUE packet's second hop must fall in for
//! lbd to resolve it: only for those does it ask the kernel for a next hop
//! and make a managed neighbour entry. Any other second hop is written to
//! `DECAP_HOPS` as unreachable (the data plane drops its packets as
//! `drop_no_route` and stops asking) and logged at most once a minute per
//! address. Without the field, the list is the prefixes of
//! `instance.interface`'s own addresses (both families; IPv6 link-local
//! `fe80::/10` left out), read when lbd starts and again at each reload;
//! `second_hops = []` resolves none. A reload applies a changed list.
//!
//! Errors read like the balancer's: `file:line:col: field: why`, and a file
//! with any error changes nothing.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    config::{
        ConfigError, OnExit, Source,
        instance::{RawInstance, instance},
    },
    dataplane::AttachMode,
};

/// What a configuration file configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No `role` line: the balancer (`crate::config::Config`).
    Balancer,
    /// `role = "backend"`: [`BackendConfig`].
    Backend,
}

/// `DECAP_VIPS` holds at most this many VIPs (its size in the object).
pub const MAX_VIPS: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// The file this was read from (reloads read it again).
    pub file: PathBuf,
    pub name: String,
    /// Where `decap` is attached: the interface encapsulated traffic
    /// arrives on.
    pub interface: String,
    pub xdp_mode: AttachMode,
    pub api_socket: PathBuf,
    /// Which `lo` addresses and neighbour entries this lbd added (only
    /// those are removed at teardown); the sysctl originals sit beside it.
    pub state_file: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub on_exit: OnExit,
    /// UDP destination port of GUE; 0: GUE is not accepted (UDP to any port
    /// reaches the kernel untouched).
    pub gue_port: u16,
    /// The VIPs served, in the file's order, without duplicates.
    pub vips: Vec<IpAddr>,
    /// Where second hops may be: `None`, the prefixes connected to
    /// `interface` (read from the kernel at start and at each reload).
    pub second_hops: Option<Vec<Prefix>>,
    pub sysctl_apply: bool,
}

/// An address prefix, `198.18.0.0/24` or `fd00:198:18::/64`: its host
/// bits are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// The prefix of length `len` that holds `addr` (host bits cleared);
    /// `None` for a length longer than the family's.
    pub fn of(addr: IpAddr, len: u8) -> Option<Prefix> {
        let addr = match addr {
            IpAddr::V4(a) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return None,
        };
        Some(Prefix { addr, len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && Prefix::of(ip, self.len) == Some(*self)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    /// `ADDRESS/LENGTH` with the host bits zero, or a bare address (its
    /// host prefix).
    fn from_str(s: &str) -> Result<Prefix, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{s:?} is not a prefix (write 198.18.0.0/24 or fd00:198:18::/64)")
        })?;
        if let IpAddr::V6(a) = addr
            && let Some(v4) = a.to_ipv4_mapped()
        {
            return Err(format!(
                "{addr} is an IPv4-mapped address: write it as {v4}"
            ));
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: the length must be 0 to {max}")),
            },
        };
        let p = Prefix::of(addr, len).expect("length checked");
        if p.addr != addr {
            return Err(format!(
                "{s:?} has host bits set: the prefix is {p} (or write the address alone for one host)"
            ));
        }
        Ok(p)
    }
}

impl BackendConfig {
    pub fn load(path: &Path) -> Result<BackendConfig, ConfigError> {
        let text = read(path)?;
        BackendConfig::parse(&path.display().to_string(), &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<BackendConfig, ConfigError> {
        let src = Source {
            file: file.to_owned(),
            text,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| src.toml(&e))?;
        if raw.role.get_ref() != "backend" {
            return Err(src.err(raw.role.span(), "role", ROLE_VALUES));
        }
        let mut config = validate(&src, raw)?;
        config.file = PathBuf::from(file);
        Ok(config)
    }

    /// Where the sysctl originals are recorded when `[sysctl] apply` is
    /// on: beside the state file, as the balancer does.
    pub fn sysctl_backup(&self) -> PathBuf {
        self.state_file
            .with_file_name(format!("{}.sysctl-backup.json", self.name))
    }

    /// Settings a reload cannot change (they shape the sockets, the
    /// attachment or what a teardown must undo), by their names in the
    /// file, that differ between `self` and `other`.
    pub fn restart_only_changes(&self, other: &BackendConfig) -> Vec<&'static str> {
        [
            (self.name != other.name, "instance.name"),
            (self.interface != other.interface, "instance.interface"),
            (self.xdp_mode != other.xdp_mode, "instance.xdp_mode"),
            (self.api_socket != other.api_socket, "instance.api_socket"),
            (self.state_file != other.state_file, "instance.state_file"),
            (
                self.metrics_listen != other.metrics_listen,
                "instance.metrics_listen",
            ),
            (self.on_exit != other.on_exit, "instance.on_exit"),
            (self.sysctl_apply != other.sysctl_apply, "sysctl.apply"),
            // decap.second_hops reloads.
        ]
        .into_iter()
        .filter_map(|(differ, name)| differ.then_some(name))
        .collect()
    }
}

const ROLE_VALUES: &str = "expected \"backend\" (a balancer's file has no role line)";

/// Which role the file at `path` configures, from its `role` line. A file
/// that is not even TOML is the balancer's to report (the message is the
/// same either way).
pub fn role_of(path: &Path) -> Result<Role, ConfigError> {
    let text = read(path)?;
    let src = Source {
        file: path.display().to_string(),
        text: &text,
    };
    role_in(&src)
}

fn role_in(src: &Source) -> Result<Role, ConfigError> {
    #[derive(Deserialize)]
    struct Peek {
        role: Option<Spanned<toml::Value>>,
    }
    let Ok(peek) = toml::from_str::<Peek>(src.text) else {
        return Ok(Role::Balancer);
    };
    match peek.role {
        None => Ok(Role::Balancer),
        Some(r) if r.get_ref().as_str() == Some("backend") => Ok(Role::Backend),
        Some(r) => Err(src.err(r.span(), "role", ROLE_VALUES)),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    role: Spanned<String>,
    instance: RawInstance,
    #[serde(default)]
    decap: Option<RawDecap>,
    #[serde(default)]
    sysctl: Option<RawSysctl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecap {
    #[serde(default)]
    gue_port: Option<u16>,
    #[serde(default)]
    vips: Vec<Spanned<String>>,
    #[serde(default)]
    second_hops: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSysctl {
    #[serde(default)]
    apply: bool,
}

fn validate(src: &Source, raw: RawFile) -> Result<BackendConfig, ConfigError> {
    let inst = instance(src, raw.instance)?;
    let decap = raw.decap.unwrap_or(RawDecap {
        gue_port: None,
        vips: Vec::new(),
        second_hops: None,
    });
    let vips = vips(src, &decap.vips)?;
    let second_hops = match &decap.second_hops {
        None => None,
        Some(list) => Some(prefixes(src, list)?),
    };
    Ok(BackendConfig {
        file: PathBuf::new(),
        api_socket: inst.api_socket,
        state_file: inst.state_file,
        name: inst.name,
        interface: inst.interface,
        xdp_mode: inst.xdp_mode,
        metrics_listen: inst.metrics_listen,
        on_exit: inst.on_exit,
        gue_port: decap
            .gue_port
            .unwrap_or(lb_common::wire::gue::GUE_DEFAULT_PORT),
        vips,
        second_hops,
        sysctl_apply: raw.sysctl.unwrap_or_default().apply,
    })
}

/// Each VIP: an address lbd can put on `lo` as a host route and that the
/// decapsulator can match, listed once.
fn vips(src: &Source, raw: &[Spanned<String>]) -> Result<Vec<IpAddr>, ConfigError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, v) in raw.iter().enumerate() {
        let field = format!("decap.vips[{i}]");
        let at = |msg: String| src.err(v.span(), &field, msg);
        let text = v.get_ref();
        let addr: IpAddr = text.parse().map_err(|_| {
            at(format!(
                "{text:?} is not an IP address (write 198.18.100.1 or fd00:198:18:100::1, \
                 without a prefix length: lbd adds it to lo as /32 or /128)"
            ))
        })?;
        let unusable = match addr {
            IpAddr::V4(a) => {
                a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast()
            }
            IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast(),
        };
        if unusable {
            return Err(at(format!(
                "{addr} is not a unicast address a service can answer from"
            )));
        }
        if let IpAddr::V6(a) = addr
            && let Some(v4) = a.to_ipv4_mapped()
        {
            return Err(at(format!(
                "{addr} is an IPv4-mapped address: write it as {v4}"
            )));
        }
        if !seen.insert(addr) {
            return Err(at(format!("{addr} is listed twice")));
        }
        if out.len() == MAX_VIPS {
            return Err(at(format!(
                "more than {MAX_VIPS} VIPs (the decapsulator's table holds {MAX_VIPS})"
            )));
        }
        out.push(addr);
    }
    Ok(out)
}

/// `decap.second_hops`: each a prefix, listed once.
fn prefixes(src: &Source, raw: &[Spanned<String>]) -> Result<Vec<Prefix>, ConfigError> {
    let mut out: Vec<Prefix> = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let field = format!("decap.second_hops[{i}]");
        let prefix: Prefix = p
            .get_ref()
            .parse()
            .map_err(|e: String| src.err(p.span(), &field, e))?;
        if out.contains(&prefix) {
            return Err(src.err(p.span(), &field, format!("{prefix} is listed twice")));
        }
        out.push(prefix);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
