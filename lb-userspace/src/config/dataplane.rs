//! `[dataplane]`: the sizes of the BPF maps, the timers and the ipip source
//! addresses.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::Range,
    time::Duration,
};

use lb_common::maglev;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, EncapSources, MAX_CONNTRACK, Source, duration_field};
use crate::dataplane::MapSizes;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataplane {
    max_vips: Option<Spanned<u32>>,
    max_backends: Option<Spanned<u32>>,
    ring_size: Option<Spanned<u32>>,
    conntrack_entries: Option<Spanned<u32>>,
    flow_cache_slots: Option<Spanned<u32>>,
    hash_seed: Option<u32>,
    udp_timeout: Option<Spanned<String>>,
    tcp_idle_timeout: Option<Spanned<String>>,
    second_chance_window: Option<Spanned<String>>,
    gue_port: Option<Spanned<u16>>,
    encap_source_v4: Option<Spanned<String>>,
    encap_source_v6: Option<Spanned<String>>,
}

pub(super) struct Dataplane {
    pub sizes: MapSizes,
    pub hash_seed: u32,
    pub udp_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub second_chance_window: Duration,
    pub gue_port: u16,
    pub encap: EncapSources,
}

/// The shortest `tcp_idle_timeout` accepted.
const MIN_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The section, or its defaults when the file has none.
pub(super) fn dataplane(
    src: &Source,
    raw: Option<Spanned<RawDataplane>>,
) -> Result<Dataplane, ConfigError> {
    let span = raw.as_ref().map_or(0..0, |d| d.span());
    let dp = raw.map(Spanned::into_inner).unwrap_or_default();
    let sizes = sizes(src, &dp, span.clone())?;
    let udp_timeout = duration_field(
        src,
        &dp.udp_timeout,
        "dataplane.udp_timeout",
        Duration::from_secs(30),
    )?;
    let tcp_idle_timeout = duration_field(
        src,
        &dp.tcp_idle_timeout,
        "dataplane.tcp_idle_timeout",
        Duration::from_secs(3600),
    )?;
    if tcp_idle_timeout < MIN_TCP_IDLE_TIMEOUT {
        let span = dp
            .tcp_idle_timeout
            .as_ref()
            .map_or(span.clone(), |s| s.span());
        return Err(src.err(
            span,
            "dataplane.tcp_idle_timeout",
            "must be at least 1m: an established connection idle for less is common",
        ));
    }
    let second_chance_window = duration_field(
        src,
        &dp.second_chance_window,
        "dataplane.second_chance_window",
        Duration::from_secs(120),
    )?;
    let gue_port = match &dp.gue_port {
        None => lb_common::wire::gue::GUE_DEFAULT_PORT,
        Some(p) if *p.get_ref() == 0 => {
            return Err(src.err(p.span(), "dataplane.gue_port", "a UDP port, 1 to 65535"));
        }
        Some(p) => *p.get_ref(),
    };
    Ok(Dataplane {
        gue_port,
        sizes,
        hash_seed: dp.hash_seed.unwrap_or(0),
        udp_timeout,
        tcp_idle_timeout,
        second_chance_window,
        encap: encap_sources(src, &dp)?,
    })
}

/// The map sizes. A size left at its default has no line of its own, so an
/// error about it points at `section` (the file's start without one).
fn sizes(src: &Source, dp: &RawDataplane, section: Range<usize>) -> Result<MapSizes, ConfigError> {
    let defaults = MapSizes::default();
    let get = |v: &Option<Spanned<u32>>, d: u32| v.as_ref().map_or(d, |s| *s.get_ref());
    let span_of = |v: &Option<Spanned<u32>>| v.as_ref().map_or(section.clone(), |s| s.span());
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
    Ok(sizes)
}

fn encap_sources(src: &Source, dp: &RawDataplane) -> Result<EncapSources, ConfigError> {
    let v4 = match &dp.encap_source_v4 {
        None => None,
        Some(s) => Some(s.get_ref().parse::<Ipv4Addr>().map_err(|_| {
            src.err(
                s.span(),
                "dataplane.encap_source_v4",
                "expected an IPv4 address",
            )
        })?),
    };
    let v6 = match &dp.encap_source_v6 {
        None => None,
        Some(s) => Some(s.get_ref().parse::<Ipv6Addr>().map_err(|_| {
            src.err(
                s.span(),
                "dataplane.encap_source_v6",
                "expected an IPv6 address",
            )
        })?),
    };
    Ok(EncapSources { v4, v6 })
}
