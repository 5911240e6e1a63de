//! `lbd` configuration: TOML, validated whole before anything is applied.
//!
//! Every error names the file, the line and the field, e.g.
//! `/etc/lb/lb.toml:14:10: vip[1].backend[0].weight: 70000 is out of range (0..=65535; 0 drains)`.
//!
//! One module per section of the file, checked in the file's order:
//! `[instance]`, `[dataplane]`, `[graphite]`, then each `[[vip]]` with its
//! health check and backends. The rules for a backend ([`check_backend`])
//! are the control API's too.

mod announce;
mod backend;
mod dataplane;
mod fleet;
mod graphite;
mod health_check;
pub(crate) mod instance;
pub mod vip;
mod vips;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    dataplane::{AttachMode, MapSizes},
    membership::FlapDamping,
};
pub use announce::DEFAULT_TABLE as DEFAULT_ANNOUNCE_TABLE;
pub use backend::{BackendField, BackendRule, EncapSources, check_backend};
pub use vip::{Proto, VipSpec};
pub use vips::MAX_SLOWSTART;

/// Largest backend weight; 0 drains.
pub const MAX_WEIGHT: u32 = 65_535;
/// The weight of a backend given without one.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Connection-table entries: at most 64 Mi (about 8 GiB of kernel memory).
pub const MAX_CONNTRACK: u32 = 1 << 26;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    Ipip,
    L2dsr,
    Gue,
}

/// The data plane's byte for a mode is `lb_common::maps::Mode`; this is the
/// one place the two meet.
impl From<ForwardMode> for lb_common::maps::Mode {
    fn from(m: ForwardMode) -> Self {
        match m {
            ForwardMode::Ipip => lb_common::maps::Mode::Ipip,
            ForwardMode::L2dsr => lb_common::maps::Mode::L2dsr,
            ForwardMode::Gue => lb_common::maps::Mode::Gue,
        }
    }
}

impl From<lb_common::maps::Mode> for ForwardMode {
    fn from(m: lb_common::maps::Mode) -> Self {
        match m {
            lb_common::maps::Mode::Ipip => ForwardMode::Ipip,
            lb_common::maps::Mode::L2dsr => ForwardMode::L2dsr,
            lb_common::maps::Mode::Gue => ForwardMode::Gue,
        }
    }
}

impl std::fmt::Display for ForwardMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(lb_common::maps::Mode::from(*self).label())
    }
}

/// What `lbd` does with the data plane when it exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Leave program and maps pinned: traffic keeps flowing, a new lbd adopts them.
    #[default]
    Keep,
    /// Detach and unpin everything.
    Detach,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    None,
    Tcp,
    Http {
        path: String,
        expect_status: u16,
        host: Option<String>,
    },
    Udp {
        payload: Vec<u8>,
        expect: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port to check; the service port when unset.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Interval while a state change is in progress (HAProxy semantics).
    pub fastinter: Duration,
    /// Interval while down.
    pub downinter: Duration,
    /// When a backend's health changes too often to be believed.
    pub flap: FlapDamping,
}

impl HealthCheck {
    /// `kind` with the default timings: every 2 s, 1 s timeout, up after 2
    /// good checks, down after 3 bad ones.
    pub fn with_defaults(kind: CheckKind) -> Self {
        HealthCheck {
            kind,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            fastinter: Duration::from_secs(2),
            downinter: Duration::from_secs(2),
            flap: FlapDamping::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: IpAddr,
    pub weight: u32,
    /// This backend's slow start, if not the VIP's.
    pub slowstart: Option<Duration>,
}

impl BackendConfig {
    pub fn new(addr: IpAddr, weight: u32) -> Self {
        BackendConfig {
            addr,
            weight,
            slowstart: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    pub spec: VipSpec,
    pub mode: ForwardMode,
    pub health_check: HealthCheck,
    pub backends: Vec<BackendConfig>,
    /// Healthy backends below which this node stops announcing the VIP;
    /// `None`: `announce.min_healthy_backends`.
    pub min_healthy_backends: Option<u32>,
    /// A backend that becomes a member ramps up to its weight over this
    /// long; zero: at once.
    pub slowstart: Duration,
    /// Panic mode below this fraction of healthy backends, in thousandths;
    /// 0: never.
    pub min_healthy_permille: u32,
}

impl VipConfig {
    /// A VIP with no backends, no slow start and no panic mode.
    pub fn new(spec: VipSpec, mode: ForwardMode, health_check: HealthCheck) -> Self {
        VipConfig {
            spec,
            mode,
            health_check,
            backends: Vec::new(),
            min_healthy_backends: None,
            slowstart: Duration::ZERO,
            min_healthy_permille: 0,
        }
    }

    /// Backend `addr`'s slow start: its own, or the VIP's.
    pub fn slowstart_of(&self, addr: IpAddr) -> Duration {
        self.backends
            .iter()
            .find(|b| b.addr == addr)
            .and_then(|b| b.slowstart)
            .unwrap_or(self.slowstart)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file this was read from (reloads read it again).
    pub file: PathBuf,
    pub name: String,
    pub interface: String,
    pub xdp_mode: AttachMode,
    pub api_socket: PathBuf,
    pub state_file: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub on_exit: OnExit,
    pub sizes: MapSizes,
    pub hash_seed: u32,
    pub udp_timeout: Duration,
    /// An established TCP connection-table entry idle this long is free for
    /// reuse.
    pub tcp_idle_timeout: Duration,
    /// How long after a ring change the previous ring serves second chances.
    pub second_chance_window: Duration,
    /// UDP destination port of `gue` encapsulation.
    pub gue_port: u16,
    pub encap_source_v4: Option<Ipv4Addr>,
    pub encap_source_v6: Option<Ipv6Addr>,
    pub sysctl_apply: bool,
    pub graphite: Option<GraphiteConfig>,
    /// Announcing VIPs through a routing table; `None`: not at all (the
    /// VIPs are routed to this node some other way).
    pub announce: Option<AnnounceConfig>,
    /// Fleet mode: the desired state and agreed health in etcd; `None`: a
    /// single node.
    pub fleet: Option<FleetConfig>,
    pub vips: Vec<VipConfig>,
    /// Accept a restart that changes every ring (another `hash_seed` or
    /// ring size than the running data plane's): `lbd
    /// --accept-ring-change`, never from the file.
    pub accept_ring_change: bool,
}

/// `[announce]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// The kernel routing table announced VIPs go in.
    pub table: u32,
    /// The device of those routes (`lo`: the routes only say "this node").
    pub device: String,
    /// Healthy backends a VIP needs to be announced (per VIP overridable).
    pub min_healthy_backends: u32,
}

/// `[fleet]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// The key prefix: `/xdplb/<cluster>/`.
    pub cluster: String,
    /// This node's name in the fleet.
    pub node: String,
    /// How long one etcd request may take.
    pub timeout: Duration,
    /// The lease this node's registration lives under: a node silent this
    /// long is no longer counted.
    pub lease: Duration,
}

/// Graphite plaintext push: `<prefix>.<vip>.<backend>.<metric> <value> <ts>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphiteConfig {
    pub address: SocketAddr,
    pub prefix: String,
    pub interval: Duration,
    /// Lines kept in memory while carbon is unreachable; the oldest go
    /// first, to the spool.
    pub max_buffered_lines: usize,
    /// Bound of the gzip spool next to the state file that takes what
    /// memory cannot hold (its oldest segment goes first); 0: no spool.
    /// Default 64 MiB.
    pub spool_max_bytes: u64,
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    instance: Spanned<instance::RawInstance>,
    #[serde(default)]
    dataplane: Option<Spanned<dataplane::RawDataplane>>,
    #[serde(default)]
    sysctl: Option<RawSysctl>,
    #[serde(default)]
    graphite: Option<Spanned<graphite::RawGraphite>>,
    #[serde(default)]
    announce: Option<announce::RawAnnounce>,
    #[serde(default)]
    fleet: Option<Spanned<fleet::RawFleet>>,
    #[serde(default)]
    vip: Vec<Spanned<vips::RawVip>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSysctl {
    #[serde(default)]
    apply: bool,
}

/// Where in the text, for error messages (both roles' files).
pub(crate) struct Source<'a> {
    pub(crate) file: String,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    /// toml's own errors (syntax, types, unknown fields): its first line,
    /// at its span.
    pub(crate) fn toml(&self, e: &toml::de::Error) -> ConfigError {
        let msg = e.message().lines().next().unwrap_or("invalid TOML");
        self.err(e.span().unwrap_or(0..0), "", msg)
    }

    pub(crate) fn err(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let upto = &self.text[..span.start.min(self.text.len())];
        let line = upto.matches('\n').count() + 1;
        let column = upto.len() - upto.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError {
            file: self.file.clone(),
            line,
            column,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The longest duration any field takes: longer is a typo, and a bound
/// keeps every duration far from overflowing the nanosecond counts the data
/// plane and the timers use.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// "2s", "500ms", "1m": durations as operators write them, at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s or m)"))?;
    let too_long = || format!("{s:?} is longer than the 1-day maximum (86400s)");
    let n: u64 = match num.parse() {
        Ok(n) => n,
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => return Err(too_long()),
        Err(_) => return Err(format!("{s:?} is not a duration like 2s or 500ms")),
    };
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_long)?),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&path.display().to_string(), &text)
    }

    /// The ipip source addresses, as [`check_backend`] takes them.
    pub fn encap_sources(&self) -> EncapSources {
        EncapSources {
            v4: self.encap_source_v4,
            v6: self.encap_source_v6,
        }
    }

    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let src = Source {
            file: file.to_owned(),
            text,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            // toml's message ends with a rendering of the line; keep its first line.
            let msg = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_owned();
            src.err(span, "", msg)
        })?;
        let mut config = validate(&src, raw)?;
        config.file = PathBuf::from(file);
        Ok(config)
    }

    /// The settings a reload cannot change (they shape the maps, the
    /// sockets or the fleet's rings: a restart applies them) that differ
    /// between `self` and `other`, by their names in the file.
    pub fn restart_only_changes(&self, other: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |differ: bool, name: &'static str| {
            if differ {
                out.push(name);
            }
        };
        check(self.name != other.name, "instance.name");
        check(self.interface != other.interface, "instance.interface");
        check(self.xdp_mode != other.xdp_mode, "instance.xdp_mode");
        check(self.api_socket != other.api_socket, "instance.api_socket");
        check(self.state_file != other.state_file, "instance.state_file");
        check(
            self.metrics_listen != other.metrics_listen,
            "instance.metrics_listen",
        );
        check(self.on_exit != other.on_exit, "instance.on_exit");
        let (a, b) = (&self.sizes, &other.sizes);
        check(a.max_vips != b.max_vips, "dataplane.max_vips");
        check(a.max_backends != b.max_backends, "dataplane.max_backends");
        check(a.ring_size != b.ring_size, "dataplane.ring_size");
        check(
            a.conntrack_entries != b.conntrack_entries,
            "dataplane.conntrack_entries",
        );
        check(
            a.flow_cache_slots != b.flow_cache_slots,
            "dataplane.flow_cache_slots",
        );
        check(self.hash_seed != other.hash_seed, "dataplane.hash_seed");
        check(
            self.udp_timeout != other.udp_timeout,
            "dataplane.udp_timeout",
        );
        check(
            self.tcp_idle_timeout != other.tcp_idle_timeout,
            "dataplane.tcp_idle_timeout",
        );
        check(
            self.second_chance_window != other.second_chance_window,
            "dataplane.second_chance_window",
        );
        check(self.gue_port != other.gue_port, "dataplane.gue_port");
        check(
            self.encap_source_v4 != other.encap_source_v4
                || self.encap_source_v6 != other.encap_source_v6,
            "dataplane.encap_source",
        );
        check(self.sysctl_apply != other.sysctl_apply, "sysctl.apply");
        check(self.graphite != other.graphite, "[graphite]");
        check(self.announce != other.announce, "[announce]");
        check(self.fleet != other.fleet, "[fleet]");
        out
    }
}

fn duration_field(
    src: &Source,
    v: &Option<Spanned<String>>,
    field: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let d = parse_duration(s.get_ref()).map_err(|m| src.err(s.span(), field, m))?;
            if d.is_zero() {
                return Err(src.err(s.span(), field, "must be greater than zero"));
            }
            Ok(d)
        }
    }
}

fn validate(src: &Source, raw: RawConfig) -> Result<Config, ConfigError> {
    let inst = instance::instance(src, raw.instance.into_inner())?;
    let dp = dataplane::dataplane(src, raw.dataplane)?;
    let graphite = match raw.graphite {
        None => None,
        Some(g) => Some(graphite::graphite(src, g.into_inner())?),
    };
    let announce = match raw.announce {
        None => None,
        Some(a) => Some(announce::announce(src, a)?),
    };
    let fleet = match raw.fleet {
        None => None,
        Some(f) => Some(fleet::fleet(src, f)?),
    };
    let vips = vips::vips(src, raw.vip, &dp.sizes, dp.encap)?;
    Ok(Config {
        file: PathBuf::new(),
        name: inst.name,
        interface: inst.interface,
        xdp_mode: inst.xdp_mode,
        api_socket: inst.api_socket,
        state_file: inst.state_file,
        metrics_listen: inst.metrics_listen,
        on_exit: inst.on_exit,
        sizes: dp.sizes,
        hash_seed: dp.hash_seed,
        udp_timeout: dp.udp_timeout,
        tcp_idle_timeout: dp.tcp_idle_timeout,
        second_chance_window: dp.second_chance_window,
        gue_port: dp.gue_port,
        encap_source_v4: dp.encap.v4,
        encap_source_v6: dp.encap.v6,
        sysctl_apply: raw.sysctl.unwrap_or_default().apply,
        graphite,
        announce,
        fleet,
        vips,
        accept_ring_change: false,
    })
}

#[cfg(test)]
mod tests;
