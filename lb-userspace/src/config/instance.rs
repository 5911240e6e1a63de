//! `[instance]`: which lbd this is, the interface it serves and where it
//! keeps its socket and state.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, OnExit, Source};
use crate::dataplane::AttachMode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInstance {
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

pub(crate) struct Instance {
    pub name: String,
    pub interface: String,
    pub xdp_mode: AttachMode,
    pub api_socket: PathBuf,
    pub state_file: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub on_exit: OnExit,
}

/// `[instance]` of either role's file.
pub(crate) fn instance(src: &Source, inst: RawInstance) -> Result<Instance, ConfigError> {
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
        || iface == "."
        || iface == ".."
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
    Ok(Instance {
        api_socket: inst
            .api_socket
            .unwrap_or_else(|| PathBuf::from(format!("/run/lb/{name}.sock"))),
        state_file: inst
            .state_file
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/lb/{name}.state.json"))),
        name: name.clone(),
        interface: iface.clone(),
        xdp_mode,
        metrics_listen,
        on_exit: inst.on_exit,
    })
}
