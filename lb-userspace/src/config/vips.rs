//! `[[vip]]`: each VIP with its health check and its backends.

use std::{collections::BTreeSet, net::IpAddr};

use serde::Deserialize;
use toml::Spanned;

use super::{
    BackendConfig, BackendField, ConfigError, DEFAULT_WEIGHT, EncapSources, ForwardMode, Source,
    VipConfig, VipSpec, check_backend,
    health_check::{RawCheck, health_check},
    vip::VipSpecError,
};
use crate::dataplane::MapSizes;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    address: Spanned<String>,
    mode: ForwardMode,
    #[serde(default)]
    health_check: Option<Spanned<RawCheck>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    min_healthy_backends: Option<u32>,
    #[serde(default)]
    slowstart: Option<Spanned<String>>,
    #[serde(default)]
    min_healthy: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    #[serde(default)]
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    slowstart: Option<Spanned<String>>,
}

/// Every VIP, within the map sizes.
pub(super) fn vips(
    src: &Source,
    raw: Vec<Spanned<RawVip>>,
    sizes: &MapSizes,
    encap: EncapSources,
) -> Result<Vec<VipConfig>, ConfigError> {
    if raw.len() > sizes.max_vips as usize {
        return Err(src.err(
            raw[sizes.max_vips as usize].span(),
            "vip",
            format!(
                "{} VIPs configured, dataplane.max_vips is {}",
                raw.len(),
                sizes.max_vips
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut vips = Vec::with_capacity(raw.len());
    let mut backend_total = 0usize;
    for (i, rv) in raw.into_iter().enumerate() {
        let span = rv.span();
        let field = format!("vip[{i}]");
        let v = vip(src, &field, rv.into_inner(), &mut seen, encap)?;
        backend_total += v.backends.len();
        if backend_total >= sizes.max_backends as usize {
            return Err(src.err(
                span,
                format!("{field}.backend"),
                format!(
                    "{backend_total} backends in all, dataplane.max_backends is {} (id 0 is reserved)",
                    sizes.max_backends
                ),
            ));
        }
        vips.push(v);
    }
    Ok(vips)
}

/// The VIP at `field` (`vip[0]`); `seen` are the VIPs before it.
fn vip(
    src: &Source,
    field: &str,
    rv: RawVip,
    seen: &mut BTreeSet<VipSpec>,
    encap: EncapSources,
) -> Result<VipConfig, ConfigError> {
    let f = |name: &str| format!("{field}.{name}");
    let spec: VipSpec = rv
        .address
        .get_ref()
        .parse()
        .map_err(|e: VipSpecError| src.err(rv.address.span(), f("address"), e.to_string()))?;
    if !seen.insert(spec) {
        return Err(src.err(
            rv.address.span(),
            f("address"),
            format!("{spec} is configured twice"),
        ));
    }
    let health_check = health_check(src, rv.health_check, &f("health_check"))?;
    let backends = backends(src, &f("backend"), &spec, rv.mode, rv.backend, encap)?;
    let slowstart = slowstart(src, &rv.slowstart, &f("slowstart"))?.unwrap_or_default();
    let min_healthy_permille = match &rv.min_healthy {
        None => 0,
        Some(m) if (0.0..=1.0).contains(m.get_ref()) => (m.get_ref() * 1000.0).round() as u32,
        Some(m) => {
            return Err(src.err(
                m.span(),
                f("min_healthy"),
                format!(
                    "{} is not a fraction 0.0..=1.0 of the VIP's backends (0 turns panic mode off)",
                    m.get_ref()
                ),
            ));
        }
    };
    Ok(VipConfig {
        spec,
        mode: rv.mode,
        health_check,
        backends,
        min_healthy_backends: rv.min_healthy_backends,
        slowstart,
        min_healthy_permille,
    })
}

/// The backends at `field` (`vip[0].backend`), by the rules the control API
/// applies too ([`check_backend`]).
fn backends(
    src: &Source,
    field: &str,
    spec: &VipSpec,
    mode: ForwardMode,
    raw: Vec<Spanned<RawBackend>>,
    encap: EncapSources,
) -> Result<Vec<BackendConfig>, ConfigError> {
    let mut seen = BTreeSet::new();
    let mut backends = Vec::with_capacity(raw.len());
    for (j, rb) in raw.into_iter().enumerate() {
        let span = rb.span();
        let rb = rb.into_inner();
        let f = |name: &str| format!("{field}[{j}].{name}");
        let addr: IpAddr = rb.address.get_ref().parse().map_err(|_| {
            src.err(
                rb.address.span(),
                f("address"),
                format!("{:?} is not an IP address", rb.address.get_ref()),
            )
        })?;
        let weight = rb.weight.as_ref().map_or(DEFAULT_WEIGHT, |w| *w.get_ref());
        check_backend(spec, mode, addr, weight, encap, &seen).map_err(|rule| {
            let at = match rule.field() {
                BackendField::Address => rb.address.span(),
                // Only a weight written out can be refused; the fallback
                // keeps this total without an unwrap.
                BackendField::Weight => rb.weight.as_ref().map_or(span.clone(), |w| w.span()),
            };
            src.err(at, f(rule.field().name()), rule.to_string())
        })?;
        seen.insert(addr);
        backends.push(BackendConfig {
            addr,
            weight,
            slowstart: slowstart(src, &rb.slowstart, &f("slowstart"))?,
        });
    }
    Ok(backends)
}

/// A slow start: `"0s"` turns it off, at most 1 hour.
fn slowstart(
    src: &Source,
    v: &Option<Spanned<String>>,
    field: &str,
) -> Result<Option<std::time::Duration>, ConfigError> {
    let Some(s) = v else { return Ok(None) };
    let d = super::parse_duration(s.get_ref()).map_err(|m| src.err(s.span(), field, m))?;
    if d > MAX_SLOWSTART {
        return Err(src.err(s.span(), field, "must be at most 60m"));
    }
    Ok(Some(d))
}

/// A ramp longer than an hour is a typo, and keeps the ring changing for
/// that long.
pub const MAX_SLOWSTART: std::time::Duration = std::time::Duration::from_secs(3600);
