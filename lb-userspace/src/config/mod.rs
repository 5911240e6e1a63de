//! `lbd` configuration: TOML, validated whole before anything is applied.
//!
//! Every error names the file, the line and the field, e.g.
//! `/etc/lb/lb.toml:14:10: vip[1].backend[0].weight: 70000 is out of range (0..=65535; 0 drains)`.

pub mod vip;

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::maglev;
use serde::Deserialize;
use toml::Spanned;

use crate::dataplane::{AttachMode, MapSizes};
pub use vip::{Proto, VipSpec};

/// Largest backend weight; 0 drains.
pub const MAX_WEIGHT: u32 = 65_535;
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
}

/// The data plane's byte for a mode is `lb_common::maps::Mode`; this is the
/// one place the two meet.
impl From<ForwardMode> for lb_common::maps::Mode {
    fn from(m: ForwardMode) -> Self {
        match m {
            ForwardMode::Ipip => lb_common::maps::Mode::Ipip,
            ForwardMode::L2dsr => lb_common::maps::Mode::L2dsr,
        }
    }
}

impl From<lb_common::maps::Mode> for ForwardMode {
    fn from(m: lb_common::maps::Mode) -> Self {
        match m {
            lb_common::maps::Mode::Ipip => ForwardMode::Ipip,
            lb_common::maps::Mode::L2dsr => ForwardMode::L2dsr,
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
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: IpAddr,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    pub spec: VipSpec,
    pub mode: ForwardMode,
    pub health_check: HealthCheck,
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
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
    /// How long after a ring change the previous ring serves second chances.
    pub second_chance_window: Duration,
    pub encap_source_v4: Option<Ipv4Addr>,
    pub encap_source_v6: Option<Ipv6Addr>,
    pub sysctl_apply: bool,
    pub graphite: Option<GraphiteConfig>,
    pub vips: Vec<VipConfig>,
}

/// Graphite plaintext push: `<prefix>.<vip>.<backend>.<metric> <value> <ts>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphiteConfig {
    pub address: SocketAddr,
    pub prefix: String,
    pub interval: Duration,
    /// Lines kept while carbon is unreachable; the oldest go first.
    pub max_buffered_lines: usize,
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    instance: Spanned<RawInstance>,
    #[serde(default)]
    dataplane: Option<Spanned<RawDataplane>>,
    #[serde(default)]
    sysctl: Option<RawSysctl>,
    #[serde(default)]
    graphite: Option<Spanned<RawGraphite>>,
    #[serde(default)]
    vip: Vec<Spanned<RawVip>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Spanned<String>,
    interface: Spanned<String>,
    #[serde(default)]
    xdp_mode: Option<Spanned<String>>,
    #[serde(default)]
    api_socket: Option<PathBuf>,
    #[serde(default)]
    state_file: Option<PathBuf>,
    #[serde(default)]
    metrics_listen: Option<Spanned<String>>,
    #[serde(default)]
    on_exit: OnExit,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    max_vips: Option<Spanned<u32>>,
    max_backends: Option<Spanned<u32>>,
    ring_size: Option<Spanned<u32>>,
    conntrack_entries: Option<Spanned<u32>>,
    flow_cache_slots: Option<Spanned<u32>>,
    hash_seed: Option<u32>,
    udp_timeout: Option<Spanned<String>>,
    second_chance_window: Option<Spanned<String>>,
    encap_source_v4: Option<Spanned<String>>,
    encap_source_v6: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraphite {
    address: Spanned<String>,
    #[serde(default)]
    prefix: Option<Spanned<String>>,
    #[serde(default)]
    interval: Option<Spanned<String>>,
    #[serde(default)]
    max_buffered_lines: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSysctl {
    #[serde(default)]
    apply: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: Spanned<String>,
    mode: ForwardMode,
    #[serde(default)]
    health_check: Option<Spanned<RawCheck>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    port: Option<Spanned<u32>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    fastinter: Option<Spanned<String>>,
    downinter: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<u32>>,
    host: Option<String>,
    payload: Option<Spanned<String>>,
    expect: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    #[serde(default)]
    weight: Option<Spanned<u32>>,
}

/// Where in the text, for error messages.
struct Source<'a> {
    file: String,
    text: &'a str,
}

impl Source<'_> {
    fn err(
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

/// "2s", "500ms", "1m": durations as operators write them.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s or m)"))?;
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    }
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
        validate(&src, raw)
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
    let inst = raw.instance.into_inner();
    let name = inst.name.get_ref();
    if name.is_empty()
        || name.len() > 32
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(src.err(
            inst.name.span(),
            "instance.name",
            "1 to 32 letters, digits, '-' or '_' (it names the pin directory)",
        ));
    }
    let iface = inst.interface.get_ref();
    if iface.is_empty()
        || iface.len() > 15
        || iface.contains('/')
        || iface.contains(char::is_whitespace)
    {
        return Err(src.err(
            inst.interface.span(),
            "instance.interface",
            "an interface name of 1 to 15 characters",
        ));
    }
    let xdp_mode = match &inst.xdp_mode {
        None => AttachMode::Auto,
        Some(m) => m
            .get_ref()
            .parse()
            .map_err(|e: anyhow::Error| src.err(m.span(), "instance.xdp_mode", e.to_string()))?,
    };
    let metrics_listen = match &inst.metrics_listen {
        None => None,
        Some(m) => Some(m.get_ref().parse::<SocketAddr>().map_err(|_| {
            src.err(
                m.span(),
                "instance.metrics_listen",
                "expected ADDRESS:PORT, e.g. 127.0.0.1:9100",
            )
        })?),
    };

    let dp_span = raw.dataplane.as_ref().map_or(0..0, |d| d.span());
    let dp = raw.dataplane.map(Spanned::into_inner).unwrap_or_default();
    let defaults = MapSizes::default();
    let get = |v: &Option<Spanned<u32>>, d: u32| v.as_ref().map_or(d, |s| *s.get_ref());
    let span_of = |v: &Option<Spanned<u32>>| v.as_ref().map_or(dp_span.clone(), |s| s.span());
    let sizes = MapSizes {
        max_vips: get(&dp.max_vips, defaults.max_vips),
        max_backends: get(&dp.max_backends, defaults.max_backends),
        ring_size: get(&dp.ring_size, defaults.ring_size),
        conntrack_entries: get(&dp.conntrack_entries, defaults.conntrack_entries),
        flow_cache_slots: get(&dp.flow_cache_slots, defaults.flow_cache_slots),
    };
    if !sizes.flow_cache_slots.is_power_of_two() || sizes.flow_cache_slots > 1 << 22 {
        return Err(src.err(
            span_of(&dp.flow_cache_slots),
            "dataplane.flow_cache_slots",
            "must be a power of two up to 4194304 (per CPU)",
        ));
    }
    maglev::check_ring_size(sizes.ring_size)
        .map_err(|e| src.err(span_of(&dp.ring_size), "dataplane.ring_size", e.to_string()))?;
    if sizes.max_vips == 0 || sizes.max_vips > 4096 {
        return Err(src.err(
            span_of(&dp.max_vips),
            "dataplane.max_vips",
            "must be 1..=4096",
        ));
    }
    if sizes.max_backends < 2 || sizes.max_backends > 1 << 20 {
        return Err(src.err(
            span_of(&dp.max_backends),
            "dataplane.max_backends",
            "must be 2..=1048576 (id 0 is reserved)",
        ));
    }
    if sizes.conntrack_entries == 0 || sizes.conntrack_entries > MAX_CONNTRACK {
        return Err(src.err(
            span_of(&dp.conntrack_entries),
            "dataplane.conntrack_entries",
            format!("must be 1..={MAX_CONNTRACK}"),
        ));
    }
    if sizes.ring_entries().is_err() {
        return Err(src.err(
            span_of(&dp.max_vips),
            "dataplane.max_vips",
            format!(
                "{} VIPs x 2 x ring size {} does not fit a BPF array (2^32 entries)",
                sizes.max_vips, sizes.ring_size
            ),
        ));
    }
    let udp_timeout = duration_field(
        src,
        &dp.udp_timeout,
        "dataplane.udp_timeout",
        Duration::from_secs(30),
    )?;
    let second_chance_window = duration_field(
        src,
        &dp.second_chance_window,
        "dataplane.second_chance_window",
        Duration::from_secs(120),
    )?;
    let encap_source_v4 = match &dp.encap_source_v4 {
        None => None,
        Some(s) => Some(s.get_ref().parse::<Ipv4Addr>().map_err(|_| {
            src.err(
                s.span(),
                "dataplane.encap_source_v4",
                "expected an IPv4 address",
            )
        })?),
    };
    let encap_source_v6 = match &dp.encap_source_v6 {
        None => None,
        Some(s) => Some(s.get_ref().parse::<Ipv6Addr>().map_err(|_| {
            src.err(
                s.span(),
                "dataplane.encap_source_v6",
                "expected an IPv6 address",
            )
        })?),
    };

    let graphite = match raw.graphite {
        None => None,
        Some(g) => {
            let g = g.into_inner();
            let address = g.address.get_ref().parse::<SocketAddr>().map_err(|_| {
                src.err(
                    g.address.span(),
                    "graphite.address",
                    "expected ADDRESS:PORT of carbon's line receiver, e.g. 127.0.0.1:2003",
                )
            })?;
            let prefix = match &g.prefix {
                None => "lb".to_owned(),
                Some(p) => {
                    let v = p.get_ref();
                    if v.is_empty()
                        || v.starts_with('.')
                        || v.ends_with('.')
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                    {
                        return Err(src.err(
                            p.span(),
                            "graphite.prefix",
                            "letters, digits, '.', '_' or '-', not starting or ending with '.'",
                        ));
                    }
                    v.clone()
                }
            };
            let interval = duration_field(
                src,
                &g.interval,
                "graphite.interval",
                Duration::from_secs(10),
            )?;
            let max_buffered_lines = match &g.max_buffered_lines {
                None => 100_000,
                Some(n) if (1..=10_000_000).contains(n.get_ref()) => *n.get_ref() as usize,
                Some(n) => {
                    return Err(src.err(
                        n.span(),
                        "graphite.max_buffered_lines",
                        "must be 1..=10000000",
                    ));
                }
            };
            Some(GraphiteConfig {
                address,
                prefix,
                interval,
                max_buffered_lines,
            })
        }
    };
    if raw.vip.len() > sizes.max_vips as usize {
        return Err(src.err(
            raw.vip[sizes.max_vips as usize].span(),
            "vip",
            format!(
                "{} VIPs configured, dataplane.max_vips is {}",
                raw.vip.len(),
                sizes.max_vips
            ),
        ));
    }
    let mut seen_vips = BTreeSet::new();
    let mut vips = Vec::new();
    let mut backend_total = 0usize;
    for (i, rv) in raw.vip.into_iter().enumerate() {
        let vip_span = rv.span();
        let rv = rv.into_inner();
        let f = |name: &str| format!("vip[{i}].{name}");
        let spec: VipSpec = rv
            .address
            .get_ref()
            .parse()
            .map_err(|e: vip::VipSpecError| {
                src.err(rv.address.span(), f("address"), e.to_string())
            })?;
        if !seen_vips.insert(spec) {
            return Err(src.err(
                rv.address.span(),
                f("address"),
                format!("{spec} is configured twice"),
            ));
        }
        let health_check = check(src, rv.health_check, &f("health_check"))?;
        let mut seen = BTreeSet::new();
        let mut backends = Vec::new();
        for (j, rb) in rv.backend.into_iter().enumerate() {
            let bf = |name: &str| format!("vip[{i}].backend[{j}].{name}");
            let rb = rb.into_inner();
            let addr: IpAddr = rb.address.get_ref().parse().map_err(|_| {
                src.err(
                    rb.address.span(),
                    bf("address"),
                    format!("{:?} is not an IP address", rb.address.get_ref()),
                )
            })?;
            if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
                return Err(src.err(
                    rb.address.span(),
                    bf("address"),
                    "must be a unicast, non-loopback address",
                ));
            }
            if !seen.insert(addr) {
                return Err(src.err(
                    rb.address.span(),
                    bf("address"),
                    format!("backend {addr} is listed twice for {spec}"),
                ));
            }
            match (rv.mode, spec.is_ipv6(), addr.is_ipv6()) {
                (ForwardMode::Ipip, false, true) => {
                    return Err(src.err(rb.address.span(), bf("address"), "an IPv4 VIP cannot be tunnelled to an IPv6 backend (4in6 is not supported)"));
                }
                (ForwardMode::L2dsr, v, b) if v != b => {
                    return Err(src.err(
                        rb.address.span(),
                        bf("address"),
                        "l2dsr backends must be of the VIP's address family",
                    ));
                }
                _ => {}
            }
            if rv.mode == ForwardMode::Ipip {
                if addr.is_ipv4() && encap_source_v4.is_none() {
                    return Err(src.err(
                        rb.address.span(),
                        bf("address"),
                        "ipip to an IPv4 backend needs dataplane.encap_source_v4",
                    ));
                }
                if addr.is_ipv6() && encap_source_v6.is_none() {
                    return Err(src.err(
                        rb.address.span(),
                        bf("address"),
                        "ipip to an IPv6 backend needs dataplane.encap_source_v6",
                    ));
                }
            }
            let weight = match &rb.weight {
                None => 100,
                Some(w) if *w.get_ref() > MAX_WEIGHT => {
                    return Err(src.err(
                        w.span(),
                        bf("weight"),
                        format!(
                            "{} is out of range (0..={MAX_WEIGHT}; 0 drains)",
                            w.get_ref()
                        ),
                    ));
                }
                Some(w) => *w.get_ref(),
            };
            backends.push(BackendConfig { addr, weight });
        }
        backend_total += backends.len();
        if backend_total >= sizes.max_backends as usize {
            return Err(src.err(vip_span, f("backend"), format!("{backend_total} backends in all, dataplane.max_backends is {} (id 0 is reserved)", sizes.max_backends)));
        }
        vips.push(VipConfig {
            spec,
            mode: rv.mode,
            health_check,
            backends,
        });
    }

    Ok(Config {
        name: name.clone(),
        interface: iface.clone(),
        xdp_mode,
        api_socket: inst
            .api_socket
            .unwrap_or_else(|| PathBuf::from(format!("/run/lb/{name}.sock"))),
        state_file: inst
            .state_file
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/lb/{name}.state.json"))),
        metrics_listen,
        on_exit: inst.on_exit,
        sizes,
        hash_seed: dp.hash_seed.unwrap_or(0),
        udp_timeout,
        second_chance_window,
        encap_source_v4,
        encap_source_v6,
        sysctl_apply: raw.sysctl.unwrap_or_default().apply,
        graphite,
        vips,
    })
}

fn check(
    src: &Source,
    raw: Option<Spanned<RawCheck>>,
    field: &str,
) -> Result<HealthCheck, ConfigError> {
    let Some(raw) = raw else {
        return Ok(HealthCheck::with_defaults(CheckKind::None));
    };
    let span = raw.span();
    let r = raw.into_inner();
    let f = |name: &str| format!("{field}.{name}");
    let interval = duration_field(src, &r.interval, &f("interval"), Duration::from_secs(2))?;
    let timeout = duration_field(src, &r.timeout, &f("timeout"), Duration::from_secs(1))?;
    if timeout > interval {
        let s = r.timeout.as_ref().map_or(span.clone(), |t| t.span());
        return Err(src.err(s, f("timeout"), "must not exceed the interval"));
    }
    let count = |v: &Option<Spanned<u32>>, name: &str, d: u32| -> Result<u32, ConfigError> {
        match v {
            None => Ok(d),
            Some(n) if (1..=100).contains(n.get_ref()) => Ok(*n.get_ref()),
            Some(n) => Err(src.err(n.span(), f(name), "must be 1..=100")),
        }
    };
    let rise = count(&r.rise, "rise", 2)?;
    let fall = count(&r.fall, "fall", 3)?;
    let fastinter = duration_field(src, &r.fastinter, &f("fastinter"), interval)?;
    let downinter = duration_field(src, &r.downinter, &f("downinter"), interval)?;
    let port = match &r.port {
        None => None,
        Some(p) if (1..=65535).contains(p.get_ref()) => Some(*p.get_ref() as u16),
        Some(p) => return Err(src.err(p.span(), f("port"), "must be 1..=65535")),
    };
    let kind = match r.kind.get_ref().as_str() {
        "none" => CheckKind::None,
        "tcp" => CheckKind::Tcp,
        "http" => {
            let path = r
                .path
                .as_ref()
                .map_or("/".to_owned(), |p| p.get_ref().clone());
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                let s = r.path.as_ref().map_or(span.clone(), |p| p.span());
                return Err(src.err(s, f("path"), "must start with / and contain no spaces"));
            }
            let expect_status = match &r.expect_status {
                None => 200,
                Some(s) if (100..=599).contains(s.get_ref()) => *s.get_ref() as u16,
                Some(s) => {
                    return Err(src.err(
                        s.span(),
                        f("expect_status"),
                        "must be an HTTP status, 100..=599",
                    ));
                }
            };
            CheckKind::Http {
                path,
                expect_status,
                host: r.host.clone(),
            }
        }
        "udp" => {
            let Some(payload) = &r.payload else {
                return Err(src.err(span, f("payload"), "a udp check needs a payload to send"));
            };
            if payload.get_ref().is_empty() {
                return Err(src.err(payload.span(), f("payload"), "must not be empty"));
            }
            CheckKind::Udp {
                payload: payload.get_ref().as_bytes().to_vec(),
                expect: r.expect.clone().unwrap_or_default().into_bytes(),
            }
        }
        other => {
            return Err(src.err(
                r.kind.span(),
                f("type"),
                format!("{other:?}: expected tcp, http, udp or none"),
            ));
        }
    };
    Ok(HealthCheck {
        kind,
        port,
        interval,
        timeout,
        rise,
        fall,
        fastinter,
        downinter,
    })
}

#[cfg(test)]
mod tests;
