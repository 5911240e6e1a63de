//! Control API requests, validated like the configuration, applied by the
//! controller, persisted to the state file.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use serde_json::{Value, json};

use super::{
    BackendRemoved, BackendRequest, DebugRequest, DebugSwitched, DiffRequest, ErrorBody,
    ExplainRequest, TeardownStarted, VipRemoved, VipRequest, http::Request,
};
use crate::{
    announce::Installed,
    config::{Config, DEFAULT_WEIGHT, ForwardMode, VipSpec},
    controller::{AdminError, Controller, HealthTarget, NewBackend},
    fleet::Change,
    neigh::NextHop,
    stats,
};

/// What the main loop must do besides answering.
#[derive(Default)]
pub struct SideEffects {
    /// Stopped first, then the new ones started.
    pub start_checks: Vec<HealthTarget>,
    pub stop_checks: Vec<u32>,
    /// Exit after answering, detaching and unpinning the data plane.
    pub teardown: bool,
}

pub fn ok<T: Serialize>(v: T) -> (u16, Value) {
    (200, serde_json::to_value(v).unwrap_or(Value::Null))
}

pub fn err(status: u16, msg: impl Into<String>) -> (u16, Value) {
    (status, json!(ErrorBody { error: msg.into() }))
}

pub fn admin(e: AdminError) -> (u16, Value) {
    err(e.http_status(), e.to_string())
}

fn parse_vip(s: &str) -> Result<VipSpec, (u16, Value)> {
    s.parse::<VipSpec>().map_err(|e| err(400, e.to_string()))
}

fn parse_backend(s: &str) -> Result<IpAddr, (u16, Value)> {
    s.parse::<IpAddr>().map_err(|_| {
        err(
            400,
            format!(
                "backend {s:?} is not an IP address (expected e.g. 198.18.0.20 or fd00:198:18::20)"
            ),
        )
    })
}

fn body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, (u16, Value)> {
    serde_json::from_slice(&req.body).map_err(|e| err(400, format!("bad request body: {e}")))
}

/// What became of a request. (One per request, moved once: its size does
/// not matter.)
#[allow(clippy::large_enum_variant)]
pub enum Handled {
    /// Answered (and applied, if it changed anything).
    Answer((u16, Value), SideEffects),
    /// A backend to add, checked: its next hop is resolved off the main
    /// loop (it may take seconds of ARP), then [`commit_backend`] adds it.
    Resolve(NewBackend),
    /// A reload whose new backends' next hops are resolved off the main
    /// loop, then [`commit_reload`] applies it.
    Reload(Config, Vec<std::net::IpAddr>),
    /// Fleet mode: a change for etcd (answered once this node applied it),
    /// and the revision it must be made against, if the caller named one.
    Fleet(Change, Option<i64>),
    /// Fleet mode: `lbctl fleet import`, `status`, `export`.
    FleetImport(Box<Config>),
    FleetStatus,
    FleetExport,
}

/// Handles one request; mutating requests are persisted before answering.
/// Never waits on the network.
/// `installed`: the announcer's last state, for `GET /v1/node`.
pub fn handle(ctl: &mut Controller, req: &Request, installed: Option<&Installed>) -> Handled {
    let mut fx = SideEffects::default();
    let answer = match route(ctl, req, &mut fx, installed) {
        Ok(Routed::Answer(a)) => a,
        Ok(Routed::Resolve(new)) => return Handled::Resolve(new),
        Ok(Routed::Fleet(h)) => return *h,
        Ok(Routed::Reload(file)) => {
            return match ctl.reload_needs(&file) {
                Ok(addrs) => Handled::Reload(*file, addrs),
                Err(e) => Handled::Answer(admin(e), fx),
            };
        }
        Err(a) => a,
    };
    let mutating = req.method == "POST"
        && (req.path.starts_with("/v1/backends/")
            || req.path.starts_with("/v1/vips/")
            || req.path.starts_with("/v1/node/"));
    Handled::Answer(persisted(ctl, answer, mutating), fx)
}

/// Adds a backend whose next hop was resolved (or failed to be), and
/// answers its request.
pub fn commit_backend(
    ctl: &mut Controller,
    new: NewBackend,
    hop: anyhow::Result<NextHop>,
) -> ((u16, Value), SideEffects) {
    let mut fx = SideEffects::default();
    let answer = match ctl.commit_backend(new, hop) {
        Ok(check) => {
            fx.start_checks.extend(check);
            ok(ctl
                .list()
                .into_iter()
                .find(|v| v.vip == new.vip.to_string()))
        }
        Err(e) => admin(e),
    };
    (persisted(ctl, answer, true), fx)
}

/// Applies a reload whose new backends' next hops were resolved (or failed
/// to be), and answers with what changed.
pub fn commit_reload(
    ctl: &mut Controller,
    file: Config,
    hops: Vec<(std::net::IpAddr, anyhow::Result<NextHop>)>,
) -> ((u16, Value), SideEffects) {
    let mut fx = SideEffects::default();
    let hops = hops.into_iter().collect();
    let answer = match ctl.apply_reload(file, &hops) {
        Ok(r) => {
            fx.start_checks = r.start_checks;
            fx.stop_checks = r.stop_checks;
            ok(r.diff)
        }
        Err(e) => admin(e),
    };
    (persisted(ctl, answer, true), fx)
}

/// Reads a configuration file for a reload or a preview; an error names
/// the file, line and field.
fn read_config(path: &std::path::Path) -> Result<Config, (u16, Value)> {
    Config::load(path).map_err(|e| err(400, format!("{e}; nothing was changed")))
}

/// The configuration file a request names (`DiffRequest`: an absolute
/// path, since lbd's working directory is not the caller's), read and
/// validated whole.
fn named_config(req: &Request) -> Result<Config, (u16, Value)> {
    let r: DiffRequest = body(req)?;
    let path = std::path::Path::new(&r.file);
    if !path.is_absolute() {
        return Err(err(
            400,
            format!("file {:?} must be an absolute path", r.file),
        ));
    }
    read_config(path)
}

/// The status of a change applied to the data plane that could not be
/// saved (507 Insufficient Storage: the usual cause is a full disk).
pub const NOT_SAVED: u16 = 507;

/// The change is live; if it cannot be saved it would not survive a
/// restart, and the operator must know: a status of its own.
fn persisted(ctl: &Controller, answer: (u16, Value), mutating: bool) -> (u16, Value) {
    if mutating
        && answer.0 == 200
        && let Err(e) = ctl.persist()
    {
        tracing::error!(error = %format!("{e:#}"), "a change is live but not saved");
        return err(
            NOT_SAVED,
            format!("applied to the data plane, not saved: {e:#}"),
        );
    }
    answer
}

enum Routed {
    Answer((u16, Value)),
    Resolve(NewBackend),
    Reload(Box<Config>),
    Fleet(Box<Handled>),
}

/// A fleet change and the revision the caller made it against.
type GuardedChange = (Change, Option<i64>);

/// Fleet mode: the change a mutating backend or VIP request asks for
/// (`None` for any other request).
fn fleet_change(req: &Request) -> Result<Option<GuardedChange>, (u16, Value)> {
    if req.method != "POST" {
        return Ok(None);
    }
    let backend = |req: &Request| -> Result<(VipSpec, IpAddr, BackendRequest), (u16, Value)> {
        let b: BackendRequest = body(req)?;
        Ok((parse_vip(&b.vip)?, parse_backend(&b.backend)?, b))
    };
    let if_revision;
    let change = match req.path.as_str() {
        "/v1/backends/add" => {
            let (vip, addr, b) = backend(req)?;
            if_revision = b.if_revision;
            Change::AddBackend {
                vip,
                addr,
                weight: b.weight.unwrap_or(DEFAULT_WEIGHT),
            }
        }
        "/v1/backends/remove" => {
            let (vip, addr, b) = backend(req)?;
            if_revision = b.if_revision;
            Change::RemoveBackend { vip, addr }
        }
        path @ ("/v1/backends/drain" | "/v1/backends/undrain") => {
            let (vip, addr, b) = backend(req)?;
            if_revision = b.if_revision;
            Change::Drain {
                vip,
                addr,
                drained: path.ends_with("/drain"),
            }
        }
        "/v1/backends/weight" => {
            let (vip, addr, b) = backend(req)?;
            if_revision = b.if_revision;
            if b.over.is_some() {
                return Err(err(
                    400,
                    "fleet mode: --over is not supported yet; set the weight in steps",
                ));
            }
            let Some(weight) = b.weight else {
                return Err(err(400, "weight is required"));
            };
            Change::Weight { vip, addr, weight }
        }
        "/v1/vips/add" => {
            let r: VipRequest = body(req)?;
            let vip = parse_vip(&r.vip)?;
            let mode = parse_mode(r.mode.as_deref())?;
            if_revision = r.if_revision;
            Change::AddVip {
                vip,
                mode,
                check: r.check.unwrap_or_else(|| "tcp".into()),
            }
        }
        "/v1/vips/remove" => {
            let r: VipRequest = body(req)?;
            if_revision = r.if_revision;
            Change::RemoveVip {
                vip: parse_vip(&r.vip)?,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some((change, if_revision)))
}

fn parse_mode(mode: Option<&str>) -> Result<ForwardMode, (u16, Value)> {
    match mode {
        Some("ipip") => Ok(ForwardMode::Ipip),
        Some("l2dsr") => Ok(ForwardMode::L2dsr),
        Some("gue") => Ok(ForwardMode::Gue),
        Some(m) => Err(err(400, format!("mode {m:?}: expected ipip, gue or l2dsr"))),
        None => Err(err(400, "mode is required (ipip, gue or l2dsr)")),
    }
}

/// The answer to a fleet change once this node has applied it: what the
/// same request answers on a single node.
pub fn fleet_answer(ctl: &Controller, change: &Change) -> (u16, Value) {
    let vip_status = |vip: &VipSpec| ok(ctl.list().into_iter().find(|v| v.vip == vip.to_string()));
    let backend_status = |vip: &VipSpec, addr: IpAddr| {
        ctl.list()
            .into_iter()
            .find(|v| v.vip == vip.to_string())
            .and_then(|v| v.backends.into_iter().find(|b| b.address == addr))
            .map_or_else(|| err(404, format!("{addr} is not a backend of {vip}")), ok)
    };
    match change {
        Change::AddBackend { vip, .. } | Change::AddVip { vip, .. } => vip_status(vip),
        Change::RemoveBackend { vip, addr } => ok(BackendRemoved {
            removed: *addr,
            vip: vip.to_string(),
        }),
        Change::Drain { vip, addr, .. } | Change::Weight { vip, addr, .. } => {
            backend_status(vip, *addr)
        }
        Change::RemoveVip { vip } => ok(VipRemoved {
            removed: vip.to_string(),
        }),
    }
}

/// One arm per endpoint: the routing table reads best whole, which is why
/// this function is longer than the others.
fn route(
    ctl: &mut Controller,
    req: &Request,
    fx: &mut SideEffects,
    installed: Option<&Installed>,
) -> Result<Routed, (u16, Value)> {
    if ctl.fleet_mode()
        && let Some((change, if_revision)) = fleet_change(req)?
    {
        return Ok(Routed::Fleet(Box::new(Handled::Fleet(change, if_revision))));
    }
    let answer = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/fleet") | ("GET", "/v1/fleet/export") | ("POST", "/v1/fleet/import")
            if !ctl.fleet_mode() =>
        {
            err(
                409,
                "this lbd is not in fleet mode (no [fleet] section in its configuration)",
            )
        }
        ("GET", "/v1/fleet") => return Ok(Routed::Fleet(Box::new(Handled::FleetStatus))),
        ("GET", "/v1/fleet/export") => return Ok(Routed::Fleet(Box::new(Handled::FleetExport))),
        ("POST", "/v1/fleet/import") => {
            let file = named_config(req)?;
            return Ok(Routed::Fleet(Box::new(Handled::FleetImport(Box::new(
                file,
            )))));
        }
        ("GET", "/v1/vips") => ok(ctl.list()),
        ("GET", "/v1/node") => ok(ctl.node_status(installed)),
        ("POST", path @ ("/v1/node/drain" | "/v1/node/undrain")) => {
            ctl.set_node_drained(path.ends_with("/drain"));
            ok(ctl.node_status(installed))
        }
        ("GET", "/v1/stats") => match crate::metrics::snapshot(&ctl.list(), &ctl.ebpf) {
            Ok(s) => ok(s),
            Err(e) => err(500, format!("{e:#}")),
        },
        ("GET", "/v1/counters") => match stats::global_counters(&ctl.ebpf) {
            Ok(c) => ok(c),
            Err(e) => err(500, format!("{e:#}")),
        },
        ("POST", "/v1/backends/add") => {
            let b: BackendRequest = body(req)?;
            let (vip, addr) = (parse_vip(&b.vip)?, parse_backend(&b.backend)?);
            let new = ctl
                .prepare_backend(&vip, addr, b.weight.unwrap_or(DEFAULT_WEIGHT))
                .map_err(admin)?;
            return Ok(Routed::Resolve(new));
        }
        ("POST", "/v1/backends/remove") => {
            let b: BackendRequest = body(req)?;
            let (vip, addr) = (parse_vip(&b.vip)?, parse_backend(&b.backend)?);
            fx.stop_checks
                .push(ctl.remove_backend(&vip, addr).map_err(admin)?);
            ok(BackendRemoved {
                removed: addr,
                vip: vip.to_string(),
            })
        }
        ("POST", path @ ("/v1/backends/drain" | "/v1/backends/undrain")) => {
            let b: BackendRequest = body(req)?;
            let (vip, addr) = (parse_vip(&b.vip)?, parse_backend(&b.backend)?);
            ok(ctl
                .set_drain(&vip, addr, path.ends_with("/drain"))
                .map_err(admin)?)
        }
        ("POST", "/v1/backends/weight") => {
            let b: BackendRequest = body(req)?;
            let (vip, addr) = (parse_vip(&b.vip)?, parse_backend(&b.backend)?);
            let Some(w) = b.weight else {
                return Err(err(400, "weight is required"));
            };
            let over = match b.over.as_deref() {
                None => None,
                Some(o) => Some(
                    crate::config::parse_duration(o).map_err(|e| err(400, format!("over: {e}")))?,
                ),
            };
            ok(ctl.set_weight(&vip, addr, w, over).map_err(admin)?)
        }
        ("POST", "/v1/vips/add") => {
            let r: VipRequest = body(req)?;
            let vip = parse_vip(&r.vip)?;
            let mode = parse_mode(r.mode.as_deref())?;
            ctl.add_vip(vip, mode, r.check.as_deref().unwrap_or("tcp"))
                .map_err(admin)?;
            ok(ctl.list().into_iter().find(|v| v.vip == vip.to_string()))
        }
        ("POST", "/v1/vips/remove") => {
            let r: VipRequest = body(req)?;
            let vip = parse_vip(&r.vip)?;
            fx.stop_checks = ctl.remove_vip(&vip).map_err(admin)?;
            ok(VipRemoved {
                removed: vip.to_string(),
            })
        }
        ("POST", "/v1/reload") => {
            let file = ctl.config().file.clone();
            return Ok(Routed::Reload(Box::new(read_config(&file)?)));
        }
        ("POST", "/v1/diff") => ok(ctl.preview(named_config(req)?).map_err(admin)?),
        ("POST", "/v1/debug") => {
            let r: DebugRequest = body(req)?;
            ctl.set_debug(r.enabled).map_err(admin)?;
            ok(DebugSwitched { debug: r.enabled })
        }
        ("POST", "/v1/teardown") => {
            fx.teardown = true;
            ok(TeardownStarted {
                teardown: "detaching and exiting".into(),
            })
        }
        ("POST", "/v1/explain") => {
            let e: ExplainRequest = body(req)?;
            let vip = parse_vip(&e.vip)?;
            let client: SocketAddr = e
                .client
                .parse()
                .map_err(|_| err(400, format!("client {:?} is not ADDRESS:PORT (e.g. 198.18.0.10:40000 or [fd00::10]:40000)", e.client)))?;
            ok(ctl.explain(&vip, client, e.syn).map_err(admin)?)
        }
        (
            _,
            "/v1/vips" | "/v1/counters" | "/v1/explain" | "/v1/vips/add" | "/v1/vips/remove"
            | "/v1/teardown" | "/v1/node" | "/v1/node/drain" | "/v1/node/undrain" | "/v1/reload"
            | "/v1/diff",
        )
        | (
            _,
            "/v1/backends/add"
            | "/v1/backends/remove"
            | "/v1/backends/drain"
            | "/v1/backends/undrain"
            | "/v1/backends/weight",
        ) => err(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
        _ => err(404, format!("no such endpoint: {}", req.path)),
    };
    Ok(Routed::Answer(answer))
}
