//! `[graphite]`: where and how often metrics are pushed.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, GraphiteConfig, Source, duration_field};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGraphite {
    address: Spanned<String>,
    #[serde(default)]
    prefix: Option<Spanned<String>>,
    #[serde(default)]
    interval: Option<Spanned<String>>,
    #[serde(default)]
    max_buffered_lines: Option<Spanned<u32>>,
    #[serde(default)]
    spool_max_bytes: Option<Spanned<u64>>,
}

/// 64 MiB holds about three hours of 100 VIPs with 20 backends each,
/// pushed every 10 s (their lines compress about tenfold), and is small
/// next to any state directory.
const DEFAULT_SPOOL_MAX_BYTES: u64 = 64 << 20;

/// Below a few pages the segments (an eighth of the bound each) would be
/// little more than gzip headers.
const MIN_SPOOL_MAX_BYTES: u64 = 4096;

/// 1 TiB: anything larger is a typo, not a plan.
const MAX_SPOOL_MAX_BYTES: u64 = 1 << 40;

pub(super) fn graphite(src: &Source, g: RawGraphite) -> Result<GraphiteConfig, ConfigError> {
    let address = g.address.get_ref().parse::<SocketAddr>().map_err(|_| {
        src.err(
            g.address.span(),
            "graphite.address",
            "expected ADDRESS:PORT of carbon's line receiver, e.g. 127.0.0.1:2003",
        )
    })?;
    let prefix = match &g.prefix {
        None => "lb".to_owned(),
        Some(p) => prefix(src, p)?,
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
    Ok(GraphiteConfig {
        address,
        prefix,
        interval,
        max_buffered_lines,
        spool_max_bytes: spool_max_bytes(src, &g.spool_max_bytes)?,
    })
}

/// 0 turns the spool off (what overflows memory is dropped, as before).
fn spool_max_bytes(src: &Source, v: &Option<Spanned<u64>>) -> Result<u64, ConfigError> {
    match v {
        None => Ok(DEFAULT_SPOOL_MAX_BYTES),
        Some(n) if *n.get_ref() == 0 => Ok(0),
        Some(n) if (MIN_SPOOL_MAX_BYTES..=MAX_SPOOL_MAX_BYTES).contains(n.get_ref()) => {
            Ok(*n.get_ref())
        }
        Some(n) => Err(src.err(
            n.span(),
            "graphite.spool_max_bytes",
            format!("must be 0 (no spool) or {MIN_SPOOL_MAX_BYTES}..={MAX_SPOOL_MAX_BYTES}"),
        )),
    }
}

/// Goes in front of every metric path, so a '.' at either end would give
/// every path an empty component.
fn prefix(src: &Source, p: &Spanned<String>) -> Result<String, ConfigError> {
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
    Ok(v.clone())
}
