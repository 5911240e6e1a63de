//! `GET /metrics` of the backend role (Prometheus text format 0.0.4): per
//! VIP and outer family what was decapsulated and sent on, every data-plane
//! event by name, and lbd's own view (attached, VIPs on `lo`, neighbours).

use super::status::{BackendRoleStatus, HopState, OnLo};
use crate::metrics::Family;

/// The whole exposition, from the same status `lbctl list` shows, plus the
/// data plane's counters.
pub fn render(s: &BackendRoleStatus, counters: &std::collections::BTreeMap<&str, u64>) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    type Pick = fn(&super::status::Outer) -> u64;
    let traffic: [(&str, &str, Pick); 3] = [
        (
            "lb_decap_packets_total",
            "packets decapsulated for the VIP and handed to the stack, by outer family",
            |o| o.packets,
        ),
        (
            "lb_decap_bytes_total",
            "frame bytes as received (outer headers included) of those packets",
            |o| o.bytes,
        ),
        (
            "lb_decap_forwarded_total",
            "packets for the VIP sent on to the second hop they named, by outer family",
            |o| o.forwarded,
        ),
    ];
    for (name, help, pick) in traffic {
        f.head(name, "counter", help);
        for v in &s.vips {
            let vip = v.vip.to_string();
            f.sample(name, &[("vip", &vip), ("family", "ipv4")], pick(&v.ipv4));
            f.sample(name, &[("vip", &vip), ("family", "ipv6")], pick(&v.ipv6));
        }
    }
    f.head(
        "lb_decap_vip_on_lo",
        "gauge",
        "1 while the VIP is a local address (on lo), so decapsulated packets are delivered",
    );
    for v in &s.vips {
        let local = u8::from(v.on_lo != OnLo::Missing);
        f.sample("lb_decap_vip_on_lo", &[("vip", &v.vip.to_string())], local);
    }
    f.head(
        "lb_decap_events_total",
        "counter",
        "every packet the decapsulator saw, by what it did (drop_* are drops, by reason)",
    );
    for (event, n) in counters {
        f.sample("lb_decap_events_total", &[("event", event)], n);
    }
    f.head(
        "lb_decap_attached",
        "gauge",
        "1 while this lbd's decap program runs on the interface",
    );
    let ours = s.xdp.as_ref().is_some_and(|x| x.ours);
    f.sample(
        "lb_decap_attached",
        &[("interface", &s.interface)],
        u8::from(ours),
    );
    let hops = &s.second_hops;
    f.head(
        "lb_decap_second_hops",
        "gauge",
        "second hops the data plane asked about, by state: resolved (sent to), unresolved (dropped as drop_no_neighbor until the kernel resolves it), no_route (dropped as drop_no_route), refused (outside decap.second_hops, dropped as drop_no_route)",
    );
    for state in HopState::ALL {
        let n = hops.hops.iter().filter(|h| h.state == state).count();
        f.sample("lb_decap_second_hops", &[("state", state.label())], n);
    }
    f.head(
        "lb_decap_second_hop_requests_total",
        "counter",
        "second hops the data plane found no next hop for, which lbd had the kernel resolve",
    );
    f.sample("lb_decap_second_hop_requests_total", &[], hops.requests);
    f.head(
        "lb_decap_second_hop_failures_total",
        "counter",
        "of those, the ones without a route or outside decap.second_hops (or that netlink refused)",
    );
    f.sample("lb_decap_second_hop_failures_total", &[], hops.failures);
    f.head(
        "lb_decap_managed_neighbors",
        "gauge",
        "neighbour entries lbd had the kernel keep resolved (managed); released when no second hop needs them, and at teardown",
    );
    f.sample("lb_decap_managed_neighbors", &[], hops.managed.len());
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend_role::status::{
        DecapVipStatus, Outer, SecondHop, SecondHops, SysctlStatus, XdpStatus,
    };

    #[test]
    fn every_vip_has_both_families_and_every_event_its_line() {
        let s = BackendRoleStatus {
            role: "backend".into(),
            instance: "web1".into(),
            interface: "eth0".into(),
            xdp: Some(XdpStatus {
                mode: "native".into(),
                program_id: 7,
                ours: true,
            }),
            adopted: false,
            gue_port: 6080,
            vips: vec![DecapVipStatus {
                vip: "fd00:198:18:100::1".parse().unwrap(),
                on_lo: OnLo::Added,
                ipv4: Outer {
                    packets: 3,
                    bytes: 300,
                    forwarded: 1,
                },
                ipv6: Outer::default(),
            }],
            drops: BTreeMap::new(),
            second_hops: SecondHops {
                hops: vec![SecondHop {
                    addr: "198.18.0.21".parse().unwrap(),
                    state: HopState::NoRoute,
                    via: None,
                    ifindex: None,
                    mac: None,
                    why: Some("no route".into()),
                }],
                ..SecondHops::default()
            },
            sysctl: SysctlStatus {
                applied: false,
                backup: None,
                rows: Vec::new(),
            },
        };
        let counters: BTreeMap<&str, u64> = lb_common::decap::DecapCounter::ALL
            .iter()
            .map(|c| (c.name(), 2))
            .collect();
        let text = render(&s, &counters);
        for line in [
            "lb_decap_packets_total{vip=\"fd00:198:18:100::1\",family=\"ipv4\"} 3",
            "lb_decap_bytes_total{vip=\"fd00:198:18:100::1\",family=\"ipv4\"} 300",
            "lb_decap_forwarded_total{vip=\"fd00:198:18:100::1\",family=\"ipv4\"} 1",
            "lb_decap_packets_total{vip=\"fd00:198:18:100::1\",family=\"ipv6\"} 0",
            "lb_decap_vip_on_lo{vip=\"fd00:198:18:100::1\"} 1",
            "lb_decap_events_total{event=\"drop_not_vip\"} 2",
            "lb_decap_attached{interface=\"eth0\"} 1",
            "lb_decap_managed_neighbors 0",
            "lb_decap_second_hops{state=\"no_route\"} 1",
            "lb_decap_second_hops{state=\"resolved\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("lb_decap_events_total{"))
                .count(),
            lb_common::decap::DecapCounter::ALL.len()
        );
    }
}
