//! `[fleet]`: the fleet's desired state and agreed health live in etcd.
//! Without the section lbd is a single node, its file the whole truth.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, FleetConfig, Source, duration_field};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    endpoints: Spanned<Vec<String>>,
    cluster: Spanned<String>,
    node: Spanned<String>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    lease: Option<Spanned<String>>,
}

/// A cluster or node name: it goes into etcd keys.
fn name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

pub(super) fn fleet(src: &Source, raw: Spanned<RawFleet>) -> Result<FleetConfig, ConfigError> {
    let r = raw.into_inner();
    if r.endpoints.get_ref().is_empty() {
        return Err(src.err(
            r.endpoints.span(),
            "fleet.endpoints",
            "at least one etcd endpoint, e.g. [\"http://10.0.0.5:2379\"]",
        ));
    }
    for e in r.endpoints.get_ref() {
        let ok = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .is_some_and(|rest| rest.parse::<std::net::SocketAddr>().is_ok() || rest.contains(':'));
        if !ok {
            return Err(src.err(
                r.endpoints.span(),
                "fleet.endpoints",
                format!("{e:?} is not http://HOST:PORT"),
            ));
        }
    }
    for (v, field) in [(&r.cluster, "fleet.cluster"), (&r.node, "fleet.node")] {
        if !name_ok(v.get_ref()) {
            return Err(src.err(
                v.span(),
                field,
                "1-64 of [A-Za-z0-9._-] (it is part of the etcd keys)",
            ));
        }
    }
    let timeout = duration_field(src, &r.timeout, "fleet.timeout", Duration::from_secs(2))?;
    let lease = duration_field(src, &r.lease, "fleet.lease", Duration::from_secs(5))?;
    if lease < Duration::from_secs(2) {
        let span = r.lease.as_ref().map_or(0..0, |l| l.span());
        return Err(src.err(
            span,
            "fleet.lease",
            "at least 2s (etcd leases count whole seconds)",
        ));
    }
    Ok(FleetConfig {
        endpoints: r.endpoints.into_inner(),
        cluster: r.cluster.into_inner(),
        node: r.node.into_inner(),
        timeout,
        lease,
    })
}
