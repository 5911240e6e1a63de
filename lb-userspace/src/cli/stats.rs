//! `lbctl stats`: rates from two `/v1/stats` samples, and totals.

use std::time::Duration;

use serde::Serialize;

use super::CliError;
use crate::{
    api::BackendState,
    metrics::{BackendTraffic, VipTraffic},
};

/// Longer than this, the rates say little about now, and a typo (`3600`
/// meant as milliseconds) would hang the command for hours.
pub const MAX_INTERVAL_SECS: f64 = 3600.0;

/// A VIP's rates over the interval (`--json` prints these).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VipRates {
    pub vip: String,
    #[serde(flatten)]
    pub rates: Rates,
    pub backends: Vec<BackendRates>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRates {
    pub backend: String,
    pub state: BackendState,
    pub weight: u32,
    #[serde(flatten)]
    pub rates: Rates,
}

/// Per second over the interval (bits for `bps`), then the totals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rates {
    pub pps: f64,
    pub bps: f64,
    pub new_flows_per_s: f64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// `--interval` as a pause, or why not.
pub fn interval(secs: f64) -> Result<Duration, CliError> {
    // Written so that NaN is refused too.
    if secs > 0.0 && secs <= MAX_INTERVAL_SECS {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(CliError::Usage(format!(
            "--interval must be greater than 0 and at most {MAX_INTERVAL_SECS} seconds (got {secs})"
        )))
    }
}

/// Counters as (packets, bytes, new flows).
type Totals = (u64, u64, u64);

fn rates(before: Option<Totals>, now: Totals, secs: f64) -> Rates {
    // Without an earlier sample (a VIP or backend added in between), the
    // rate is 0 rather than its whole history over one interval.
    let (p0, b0, f0) = before.unwrap_or(now);
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let (packets, bytes, new_flows) = now;
    Rates {
        pps: per_s(p0, packets),
        bps: 8.0 * per_s(b0, bytes),
        new_flows_per_s: per_s(f0, new_flows),
        packets,
        bytes,
        new_flows,
    }
}

fn vip_totals(v: &VipTraffic) -> Totals {
    (v.packets, v.bytes, v.new_flows)
}

fn backend_totals(b: &BackendTraffic) -> Totals {
    (b.packets, b.bytes, b.new_flows)
}

/// Rates of every VIP and backend in `after`, over `secs` since `before`.
pub fn vip_rates(before: &[VipTraffic], after: &[VipTraffic], secs: f64) -> Vec<VipRates> {
    after
        .iter()
        .map(|v| {
            let prev = before.iter().find(|p| p.vip == v.vip);
            let backends = v
                .backends
                .iter()
                .map(|b| {
                    let prev_b =
                        prev.and_then(|p| p.backends.iter().find(|x| x.backend == b.backend));
                    BackendRates {
                        backend: b.backend.clone(),
                        state: b.state,
                        weight: b.weight,
                        rates: rates(prev_b.map(backend_totals), backend_totals(b), secs),
                    }
                })
                .collect();
            VipRates {
                vip: v.vip.clone(),
                rates: rates(prev.map(vip_totals), vip_totals(v), secs),
                backends,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(vip_packets: u64, backends: &[(&str, u64)]) -> Vec<VipTraffic> {
        vec![VipTraffic {
            vip: "198.18.100.1:80/tcp".into(),
            packets: vip_packets,
            bytes: vip_packets * 100,
            new_flows: vip_packets / 10,
            backends: backends
                .iter()
                .map(|&(b, packets)| BackendTraffic {
                    backend: b.into(),
                    state: BackendState::Up,
                    up: true,
                    weight: 100,
                    packets,
                    bytes: packets * 100,
                    new_flows: packets / 10,
                })
                .collect(),
        }]
    }

    #[test]
    fn rates_over_the_interval_and_zero_for_what_is_new() {
        let before = sample(1000, &[("198.18.0.20", 1000)]);
        let after = sample(3000, &[("198.18.0.20", 2000), ("198.18.0.21", 1000)]);
        let rows = vip_rates(&before, &after, 2.0);
        let r = &rows[0].rates;
        assert_eq!(
            (r.pps, r.bps, r.new_flows_per_s),
            (1000.0, 800_000.0, 100.0)
        );
        assert_eq!((r.packets, r.bytes, r.new_flows), (3000, 300_000, 300));
        let b: Vec<f64> = rows[0].backends.iter().map(|b| b.rates.pps).collect();
        assert_eq!(b, vec![500.0, 0.0], "a new backend has no rate yet");
    }

    #[test]
    fn counters_that_went_backwards_give_zero_not_a_wrap() {
        let rows = vip_rates(&sample(10, &[]), &sample(5, &[]), 1.0);
        assert_eq!(rows[0].rates.pps, 0.0);
    }

    #[test]
    fn json_keeps_the_flat_shape_scripts_read() {
        let rows = vip_rates(
            &sample(0, &[("198.18.0.20", 0)]),
            &sample(10, &[("198.18.0.20", 10)]),
            1.0,
        );
        let v = serde_json::to_value(&rows).unwrap();
        assert_eq!(v[0]["pps"], 10.0);
        assert_eq!(v[0]["backends"][0]["state"], "up");
        assert_eq!(v[0]["backends"][0]["new_flows_per_s"], 1.0);
    }

    #[test]
    fn interval_range_is_the_one_the_message_states() {
        for ok in [0.001, 1.0, MAX_INTERVAL_SECS] {
            assert!(interval(ok).is_ok(), "{ok}");
        }
        for bad in [0.0, -1.0, MAX_INTERVAL_SECS + 0.5, f64::NAN, f64::INFINITY] {
            let e = interval(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(
                e.to_string()
                    .contains("greater than 0 and at most 3600 seconds"),
                "{e}"
            );
        }
        assert!(interval(0.0).unwrap_err().to_string().contains("(got 0)"));
    }
}
