//! `[vip.health_check]`: how a VIP's backends are checked.

use std::{ops::Range, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{CheckKind, ConfigError, HealthCheck, Source, duration_field};
use crate::membership::FlapDamping;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    port: Option<Spanned<u32>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    fastinter: Option<Spanned<String>>,
    downinter: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<u32>>,
    host: Option<Spanned<String>>,
    payload: Option<Spanned<String>>,
    expect: Option<String>,
    flap_limit: Option<Spanned<u32>>,
    flap_window: Option<Spanned<String>>,
    flap_hold: Option<Spanned<String>>,
}

/// The check at `field` (`vip[0].health_check`); none without the section.
pub(super) fn health_check(
    src: &Source,
    raw: Option<Spanned<RawCheck>>,
    field: &str,
) -> Result<HealthCheck, ConfigError> {
    let Some(raw) = raw else {
        return Ok(HealthCheck::with_defaults(CheckKind::None));
    };
    let span = raw.span();
    let r = raw.into_inner();
    let f = |name: &str| format!("{field}.{name}");
    let interval = duration_field(src, &r.interval, &f("interval"), Duration::from_secs(2))?;
    let timeout = duration_field(src, &r.timeout, &f("timeout"), Duration::from_secs(1))?;
    if timeout > interval {
        let s = r.timeout.as_ref().map_or(span.clone(), |t| t.span());
        return Err(src.err(s, f("timeout"), "must not exceed the interval"));
    }
    let count = |v: &Option<Spanned<u32>>, name: &str, d: u32| -> Result<u32, ConfigError> {
        match v {
            None => Ok(d),
            Some(n) if (1..=100).contains(n.get_ref()) => Ok(*n.get_ref()),
            Some(n) => Err(src.err(n.span(), f(name), "must be 1..=100")),
        }
    };
    let rise = count(&r.rise, "rise", 2)?;
    let fall = count(&r.fall, "fall", 3)?;
    let fastinter = duration_field(src, &r.fastinter, &f("fastinter"), interval)?;
    let downinter = duration_field(src, &r.downinter, &f("downinter"), interval)?;
    let port = match &r.port {
        None => None,
        Some(p) if (1..=65535).contains(p.get_ref()) => Some(*p.get_ref() as u16),
        Some(p) => return Err(src.err(p.span(), f("port"), "must be 1..=65535")),
    };
    let flap = flap_damping(src, &r, field)?;
    Ok(HealthCheck {
        flap,
        kind: kind(src, &r, span, field)?,
        port,
        interval,
        timeout,
        rise,
        fall,
        fastinter,
        downinter,
    })
}

/// `flap_limit` changes within `flap_window` hold a backend down for
/// `flap_hold` (doubling while it keeps flapping, up to 10 minutes, or the
/// hold itself if that is longer).
fn flap_damping(src: &Source, r: &RawCheck, field: &str) -> Result<FlapDamping, ConfigError> {
    let f = |name: &str| format!("{field}.{name}");
    let d = FlapDamping::default();
    let limit = match &r.flap_limit {
        None => d.limit,
        Some(n) if (1..=1000).contains(n.get_ref()) => *n.get_ref(),
        Some(n) => return Err(src.err(n.span(), f("flap_limit"), "must be 1..=1000")),
    };
    let window = duration_field(src, &r.flap_window, &f("flap_window"), d.window)?;
    let hold = duration_field(src, &r.flap_hold, &f("flap_hold"), d.hold)?;
    Ok(FlapDamping {
        limit,
        window,
        hold,
        max_hold: d.max_hold.max(hold),
    })
}

/// `type` and the fields that only one type has; `span` is the section's,
/// for a field that is missing.
fn kind(
    src: &Source,
    r: &RawCheck,
    span: Range<usize>,
    field: &str,
) -> Result<CheckKind, ConfigError> {
    let f = |name: &str| format!("{field}.{name}");
    match r.kind.get_ref().as_str() {
        "none" => Ok(CheckKind::None),
        "tcp" => Ok(CheckKind::Tcp),
        "http" => {
            let path = r
                .path
                .as_ref()
                .map_or("/".to_owned(), |p| p.get_ref().clone());
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                let s = r.path.as_ref().map_or(span, |p| p.span());
                return Err(src.err(s, f("path"), "must start with / and contain no spaces"));
            }
            let expect_status = match &r.expect_status {
                None => 200,
                Some(s) if (100..=599).contains(s.get_ref()) => *s.get_ref() as u16,
                Some(s) => {
                    return Err(src.err(
                        s.span(),
                        f("expect_status"),
                        "must be an HTTP status, 100..=599",
                    ));
                }
            };
            let host = match &r.host {
                // A host is sent in the check's Host header: a CR or LF
                // would end the header and let the file inject others.
                Some(h)
                    if h.get_ref().is_empty()
                        || !h.get_ref().chars().all(|c| c.is_ascii_graphic()) =>
                {
                    return Err(src.err(
                        h.span(),
                        f("host"),
                        "a host name or address: printable ASCII, no spaces or line breaks",
                    ));
                }
                h => h.as_ref().map(|h| h.get_ref().clone()),
            };
            Ok(CheckKind::Http {
                path,
                expect_status,
                host,
            })
        }
        "udp" => {
            let Some(payload) = &r.payload else {
                return Err(src.err(span, f("payload"), "a udp check needs a payload to send"));
            };
            if payload.get_ref().is_empty() {
                return Err(src.err(payload.span(), f("payload"), "must not be empty"));
            }
            Ok(CheckKind::Udp {
                payload: payload.get_ref().as_bytes().to_vec(),
                expect: r.expect.clone().unwrap_or_default().into_bytes(),
            })
        }
        other => Err(src.err(
            r.kind.span(),
            f("type"),
            format!("{other:?}: expected tcp, http, udp or none"),
        )),
    }
}
