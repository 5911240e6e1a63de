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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    #[serde(default)]
    weight: Option<Spanned<u32>>,
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
    Ok(VipConfig {
        spec,
        mode: rv.mode,
        health_check,
        backends,
        min_healthy_backends: rv.min_healthy_backends,
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
        backends.push(BackendConfig { addr, weight });
    }
    Ok(backends)
}
