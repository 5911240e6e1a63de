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
    /// `"auto"` or a prime; checked in [`ring_size`].
    ring_size: Option<Spanned<toml::Value>>,
    max_backends_per_vip: Option<Spanned<u32>>,
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
    let mut sizes = MapSizes {
        max_vips: get(&dp.max_vips, defaults.max_vips),
        max_backends: get(&dp.max_backends, defaults.max_backends),
        ring_size: 0,
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
    sizes.ring_size = ring_size(src, dp, sizes.max_backends)?;
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

/// `ring_size`: `"auto"` (the default) sizes every VIP's ring for
/// `max_backends_per_vip` backends, 100 slots each (the smallest prime at
/// least that, [`maglev::auto_ring_size`]); a VIP cannot hold more than
/// `max_backends - 1` backends, so a smaller `max_backends` caps it. An
/// integer is a fixed size, a prime. Either way the size depends on the
/// configuration alone: backends coming and going never resize a ring.
fn ring_size(src: &Source, dp: &RawDataplane, max_backends: u32) -> Result<u32, ConfigError> {
    const FIELD: &str = "dataplane.ring_size";
    let per_vip = match &dp.max_backends_per_vip {
        None => maglev::DEFAULT_MAX_BACKENDS_PER_VIP,
        Some(v) if (1..=maglev::MAX_AUTO_BACKENDS).contains(v.get_ref()) => *v.get_ref(),
        Some(v) => {
            return Err(src.err(
                v.span(),
                "dataplane.max_backends_per_vip",
                format!(
                    "must be 1..={}: an automatic ring holds {} slots per backend, \
                     at most {} slots",
                    maglev::MAX_AUTO_BACKENDS,
                    maglev::SLOTS_PER_BACKEND,
                    maglev::MAX_RING_SIZE
                ),
            ));
        }
    };
    let Some(raw) = &dp.ring_size else {
        return Ok(maglev::auto_ring_size(per_vip.min(max_backends - 1)));
    };
    let span = raw.span();
    let expected = |what: String| {
        src.err(
            span.clone(),
            FIELD,
            format!(
                "expected \"auto\" or a prime number of slots such as {}, not {what}",
                maglev::CLASSIC_RING_SIZE
            ),
        )
    };
    let m = match raw.get_ref() {
        toml::Value::String(s) if s == "auto" => {
            return Ok(maglev::auto_ring_size(per_vip.min(max_backends - 1)));
        }
        toml::Value::String(s) => return Err(expected(format!("{s:?}"))),
        // Out of u32's range: clamped to a value that gets the same error.
        toml::Value::Integer(i) => (*i).clamp(0, i64::from(u32::MAX)) as u32,
        other => return Err(expected(format!("{} {other}", other.type_str()))),
    };
    maglev::check_ring_size(m).map_err(|e| src.err(span, FIELD, e.to_string()))?;
    Ok(m)
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
