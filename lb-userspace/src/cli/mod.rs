//! `lbctl`'s work: checking arguments, building typed requests, reading
//! typed answers and rendering them. The binary only parses arguments,
//! calls one function here and turns the outcome into an exit code.
//!
//! # Exit codes
//!
//! One policy for every subcommand, so that a script can tell "fix the
//! command", "lbd said no" and "try again when lbd is up" apart:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | refused by lbd (any non-2xx answer: unknown VIP, duplicate backend, weight out of range, ...), or a local operation that failed (writing sysctls, the terminal for `top`, a 2xx answer this lbctl cannot read) |
//! | 2 | usage: arguments that clap or the checks here refuse, before anything is sent; or lbd unreachable: no socket, connection refused, no answer |
//! | 3 | applied to the data plane, not saved: lbd could not write its state file (disk full?); the change is live but a restart would lose it |
//!
//! [`CliError::exit_code`] is the policy; every subcommand returns a
//! [`CliError`].

pub mod backend_role;
pub mod render;
pub mod stats;
pub mod sysctl;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

pub use crate::api::{BackendRemoved, DebugSwitched, TeardownStarted, VipRemoved};
use crate::{
    api::{
        BackendRequest, BackendStatus, DebugRequest, DiffRequest, ErrorBody, ExplainRequest,
        VipRequest, VipStatus,
        client::{ClientError, call},
    },
    config::VipSpec,
    controller::parse_check,
    diff::ConfigDiff,
    metrics::VipTraffic,
};

/// Everything a subcommand can end with, other than success.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Arguments that cannot work; nothing was sent.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Unreachable(#[from] ClientError),
    /// lbd answered, with a non-2xx status.
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl CliError {
    /// The exit-code policy (see the module documentation).
    pub const fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Unreachable(_) => 2,
            CliError::Refused {
                status: crate::api::handler::NOT_SAVED,
                ..
            } => 3,
            CliError::Refused { .. } | CliError::Failed(_) => 1,
        }
    }
}

/// A client of one lbd, printing for people or, with `json`, lbd's answers
/// as they come (scripts read those).
pub struct Lbctl {
    socket: PathBuf,
    json: bool,
    /// Fleet mode: changes only if the fleet is still at this revision.
    if_revision: Option<i64>,
}

impl Lbctl {
    pub fn new(socket: impl Into<PathBuf>, json: bool) -> Self {
        Lbctl {
            socket: socket.into(),
            json,
            if_revision: None,
        }
    }

    /// Fleet mode: every change made by this client is refused unless the
    /// fleet's desired state is still at `revision` (`--if-revision`).
    pub fn if_revision(mut self, revision: Option<i64>) -> Self {
        self.if_revision = revision;
        self
    }

    /// A balancer's VIPs and backends, or a backend's side of things: the
    /// answer says which role lbd runs.
    pub fn list(&self) -> Result<(), CliError> {
        self.run_either(
            "GET",
            "/v1/vips",
            None,
            |v: &Vec<VipStatus>| render::vips(v),
            backend_role::status,
        )
    }

    /// `lbctl reload`: lbd reads its configuration file again and applies
    /// the difference.
    pub fn reload(&self) -> Result<(), CliError> {
        self.run_either(
            "POST",
            "/v1/reload",
            None,
            |d: &ConfigDiff| render::config_diff(d, "applied"),
            backend_role::reloaded,
        )
    }

    /// `lbctl diff FILE`: what a reload to FILE would change; nothing is
    /// applied.
    pub fn diff(&self, file: &Path) -> Result<(), CliError> {
        let body = file_request(file)?;
        self.run("POST", "/v1/diff", Some(body), |d: &ConfigDiff| {
            render::config_diff(d, "would change")
        })
    }

    fn backend_request(
        &self,
        vip: &str,
        backend: &str,
        weight: Option<u32>,
    ) -> Result<Value, CliError> {
        check_vip(vip)?;
        check_backend(backend)?;
        to_body(&BackendRequest {
            vip: vip.to_owned(),
            backend: backend.to_owned(),
            weight,
            over: None,
            if_revision: self.if_revision,
        })
    }

    /// `lbctl fleet status`: every live node, its applied revision and ring
    /// fingerprints, and the nodes that disagree.
    pub fn fleet_status(&self) -> Result<(), CliError> {
        self.run("GET", "/v1/fleet", None, render::fleet_status)
    }

    /// `lbctl fleet export`: the fleet's desired state as `[[vip]]`
    /// sections of a configuration file.
    pub fn fleet_export(&self) -> Result<(), CliError> {
        self.run("GET", "/v1/fleet/export", None, |v: &Value| {
            v["toml"].as_str().unwrap_or_default().to_owned()
        })
    }

    /// `lbctl fleet import FILE`: FILE's VIPs become the fleet's desired
    /// state.
    pub fn fleet_import(&self, file: &Path) -> Result<(), CliError> {
        let body = file_request(file)?;
        self.run("POST", "/v1/fleet/import", Some(body), |v: &Value| {
            format!(
                "imported: the fleet's desired state is at revision {}\n",
                v["imported"]
            )
        })
    }

    pub fn add_backend(&self, vip: &str, backend: &str, weight: u32) -> Result<(), CliError> {
        let body = self.backend_request(vip, backend, Some(weight))?;
        self.run("POST", "/v1/backends/add", Some(body), render::vip_answer)
    }

    pub fn remove_backend(&self, vip: &str, backend: &str) -> Result<(), CliError> {
        let body = self.backend_request(vip, backend, None)?;
        self.run(
            "POST",
            "/v1/backends/remove",
            Some(body),
            render::backend_removed,
        )
    }

    /// Drains (`drained`) or undrains `backend`.
    pub fn drain(&self, vip: &str, backend: &str, drained: bool) -> Result<(), CliError> {
        let body = self.backend_request(vip, backend, None)?;
        let path = if drained {
            "/v1/backends/drain"
        } else {
            "/v1/backends/undrain"
        };
        self.run("POST", path, Some(body), |b: &BackendStatus| {
            render::backend_change(vip, b)
        })
    }

    /// `over`: a duration like `60s`, to move the weight in steps.
    pub fn set_weight(
        &self,
        vip: &str,
        backend: &str,
        weight: u32,
        over: Option<&str>,
    ) -> Result<(), CliError> {
        check_vip(vip)?;
        check_backend(backend)?;
        if let Some(o) = over {
            crate::config::parse_duration(o)
                .map_err(|e| CliError::Usage(format!("--over: {e}")))?;
        }
        let body = to_body(&BackendRequest {
            vip: vip.to_owned(),
            backend: backend.to_owned(),
            weight: Some(weight),
            over: over.map(str::to_owned),
            if_revision: self.if_revision,
        })?;
        self.run("POST", "/v1/backends/weight", Some(body), |b| {
            render::backend_change(vip, b)
        })
    }

    /// Where `client`'s flow goes, for a packet mid-stream or, with `syn`,
    /// for a new connection.
    pub fn explain(&self, vip: &str, client: &str, syn: bool) -> Result<(), CliError> {
        check_vip(vip)?;
        check_client(client)?;
        let body = to_body(&ExplainRequest {
            vip: vip.to_owned(),
            client: client.to_owned(),
            syn,
        })?;
        self.run("POST", "/v1/explain", Some(body), render::explanation)
    }

    /// Rates over `interval` seconds (two samples) and totals.
    pub fn stats(&self, interval: f64) -> Result<(), CliError> {
        let pause = stats::interval(interval)?;
        let before = self.traffic()?;
        std::thread::sleep(pause);
        let after = self.traffic()?;
        let rows = stats::vip_rates(&before, &after, pause.as_secs_f64());
        if self.json {
            println!("{}", serde_json::to_string(&rows).map_err(unexpected)?);
        } else {
            print!("{}", render::stats(&rows));
        }
        Ok(())
    }

    pub fn counters(&self) -> Result<(), CliError> {
        self.run("GET", "/v1/counters", None, render::counters)
    }

    pub fn top(&self) -> Result<(), CliError> {
        // Taken before the terminal is, so that an absent lbd gets its own
        // exit code and a message on a normal screen.
        let first = self.traffic()?;
        crate::top::run(first, || self.traffic().map_err(anyhow::Error::from))?;
        Ok(())
    }

    pub fn vip_add(&self, vip: &str, mode: &str, check: &str) -> Result<(), CliError> {
        check_vip(vip)?;
        if !matches!(mode, "ipip" | "gue" | "l2dsr") {
            return Err(CliError::Usage(format!(
                "mode {mode:?}: expected ipip, gue or l2dsr"
            )));
        }
        parse_check(check).map_err(CliError::Usage)?;
        let body = to_body(&VipRequest {
            vip: vip.to_owned(),
            mode: Some(mode.to_owned()),
            check: Some(check.to_owned()),
            if_revision: self.if_revision,
        })?;
        self.run("POST", "/v1/vips/add", Some(body), render::vip_answer)
    }

    pub fn vip_remove(&self, vip: &str) -> Result<(), CliError> {
        check_vip(vip)?;
        let body = to_body(&VipRequest {
            vip: vip.to_owned(),
            mode: None,
            check: None,
            if_revision: self.if_revision,
        })?;
        self.run("POST", "/v1/vips/remove", Some(body), render::vip_removed)
    }

    pub fn teardown(&self) -> Result<(), CliError> {
        self.run("POST", "/v1/teardown", None, render::teardown)
    }

    /// `lbctl node status|drain|undrain`.
    pub fn node(&self, action: NodeAction) -> Result<(), CliError> {
        let (method, path) = match action {
            NodeAction::Status => ("GET", "/v1/node"),
            NodeAction::Drain => ("POST", "/v1/node/drain"),
            NodeAction::Undrain => ("POST", "/v1/node/undrain"),
        };
        self.run(method, path, None, render::node)
    }

    pub fn debug(&self, enabled: bool) -> Result<(), CliError> {
        let body = to_body(&DebugRequest { enabled })?;
        self.run("POST", "/v1/debug", Some(body), render::debug)
    }

    fn traffic(&self) -> Result<Vec<VipTraffic>, CliError> {
        decode(self.exchange("GET", "/v1/stats", None)?)
    }

    /// One request, its answer printed: raw with `--json`, else rendered
    /// from the typed answer `A`.
    fn run<A: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        render: impl FnOnce(&A) -> String,
    ) -> Result<(), CliError> {
        let answer = self.exchange(method, path, body)?;
        if self.json {
            println!("{answer}");
        } else {
            print!("{}", render(&decode(answer)?));
        }
        Ok(())
    }

    /// [`Lbctl::run`] for a request both roles answer, each its own way:
    /// `balancer` renders a balancer's answer, `backend` a backend's.
    fn run_either<A: DeserializeOwned, B: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        balancer: impl FnOnce(&A) -> String,
        backend: impl FnOnce(&B) -> String,
    ) -> Result<(), CliError> {
        let answer = self.exchange(method, path, body)?;
        if self.json {
            println!("{answer}");
        } else if crate::backend_role::status::is_backend(&answer) {
            print!("{}", backend(&decode(answer)?));
        } else {
            print!("{}", balancer(&decode(answer)?));
        }
        Ok(())
    }

    /// Returns a 2xx answer's body; any other status is a refusal.
    fn exchange(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        let (status, answer) = call(&self.socket, method, path, body.as_ref())?;
        if (200..300).contains(&status) {
            return Ok(answer);
        }
        // Scripts get the error body too, as lbd sent it.
        if self.json {
            println!("{answer}");
        }
        Err(refusal(status, answer))
    }
}

/// What `lbctl node` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAction {
    Status,
    Drain,
    Undrain,
}

fn refusal(status: u16, answer: Value) -> CliError {
    let message = match serde_json::from_value::<ErrorBody>(answer.clone()) {
        Ok(e) => e.error,
        Err(_) => format!("lbd refused without an error message: {answer}"),
    };
    CliError::Refused { status, message }
}

fn decode<A: DeserializeOwned>(answer: Value) -> Result<A, CliError> {
    serde_json::from_value(answer).map_err(|e| {
        CliError::Failed(anyhow::Error::new(e).context(
            "lbd's answer is not what this lbctl expects (are lbd and lbctl the same version?)",
        ))
    })
}

fn to_body(request: &impl Serialize) -> Result<Value, CliError> {
    serde_json::to_value(request).map_err(unexpected)
}

fn unexpected(e: serde_json::Error) -> CliError {
    CliError::Failed(anyhow::Error::new(e).context("encoding JSON"))
}

/// The checks lbd would make, so that bad arguments are usage errors and
/// nothing is sent; the messages are the configuration's and the API's.
fn check_vip(vip: &str) -> Result<(), CliError> {
    vip.parse::<VipSpec>()
        .map(drop)
        .map_err(|e| CliError::Usage(e.to_string()))
}

fn check_backend(backend: &str) -> Result<(), CliError> {
    backend.parse::<IpAddr>().map(drop).map_err(|_| {
        CliError::Usage(format!(
            "backend {backend:?} is not an IP address (expected e.g. 198.18.0.20 or fd00:198:18::20)"
        ))
    })
}

fn check_client(client: &str) -> Result<(), CliError> {
    client.parse::<SocketAddr>().map(drop).map_err(|_| {
        CliError::Usage(format!(
            "client {client:?} is not ADDRESS:PORT (e.g. 198.18.0.10:40000 or [fd00::10]:40000)"
        ))
    })
}

/// A request naming a configuration file for lbd to read: its absolute
/// path (lbd's working directory is not ours).
fn file_request(file: &Path) -> Result<Value, CliError> {
    let abs = std::path::absolute(file)
        .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    if !abs.is_file() {
        return Err(CliError::Usage(format!(
            "{}: not a readable file",
            file.display()
        )));
    }
    to_body(&DiffRequest {
        file: abs.display().to_string(),
    })
}

#[cfg(test)]
mod tests;
