//! `[announce]`: the kernel routing table lbd puts a route in for every VIP
//! this node should receive traffic for. A routing daemon (BIRD, FRR, ...)
//! learns that table and announces the routes to the node's routers; lbd
//! itself speaks no routing protocol.

use serde::Deserialize;
use toml::Spanned;

use super::{AnnounceConfig, ConfigError, Source};

/// The table the README and `scripts/bird-lb.conf` use.
pub const DEFAULT_TABLE: u32 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    #[serde(default)]
    table: Option<Spanned<u32>>,
    #[serde(default)]
    device: Option<Spanned<String>>,
    #[serde(default)]
    min_healthy_backends: Option<Spanned<u32>>,
}

pub(super) fn announce(src: &Source, raw: RawAnnounce) -> Result<AnnounceConfig, ConfigError> {
    let table = match &raw.table {
        None => DEFAULT_TABLE,
        // 0 is no table; 253-255 are the kernel's default, main and local
        // tables, whose routes are not lbd's to add and remove.
        Some(t) if *t.get_ref() == 0 || (253..=255).contains(t.get_ref()) => {
            return Err(src.err(
                t.span(),
                "announce.table",
                "must be a table of its own: not 0, 253 (default), 254 (main) or 255 (local)",
            ));
        }
        Some(t) => *t.get_ref(),
    };
    let device = match &raw.device {
        None => "lo".to_owned(),
        Some(d) if d.get_ref().is_empty() || d.get_ref().len() > 15 => {
            return Err(src.err(
                d.span(),
                "announce.device",
                "an interface name of 1 to 15 characters",
            ));
        }
        Some(d) => d.get_ref().clone(),
    };
    let min_healthy_backends = raw.min_healthy_backends.map_or(1, |m| *m.get_ref());
    Ok(AnnounceConfig {
        table,
        device,
        min_healthy_backends,
    })
}
