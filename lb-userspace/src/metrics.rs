//! Prometheus text exposition (format 0.0.4) of the data plane's per-CPU
//! counters (summed over CPUs) and the controller's view (health, weights,
//! ring changes).

use std::{collections::HashMap, fmt::Write};

use anyhow::Result;
use aya::Ebpf;
use lb_common::{maps::Traffic, stats::Counter};

use crate::{
    api::{BackendState, NodeStatus, VipStatus},
    health::CheckRecord,
    maps::{STATS_BACKEND, STATS_VIP},
    stats::{self, traffic},
};

/// Label values escaped as the exposition format requires.
pub(crate) fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Totals per VIP and backend, for `lbctl stats` and `top`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VipTraffic {
    pub vip: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendTraffic>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackendTraffic {
    pub backend: String,
    pub state: BackendState,
    /// [`crate::api::BackendStatus::up`]: what `lb_backend_up` and Graphite's `up` say.
    #[serde(default)]
    pub up: bool,
    pub weight: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub fn snapshot(vips: &[VipStatus], ebpf: &Ebpf) -> Result<Vec<VipTraffic>> {
    vips.iter()
        .map(|v| {
            let t = traffic(ebpf, &STATS_VIP, v.id)?;
            let backends = v
                .backends
                .iter()
                .map(|b| {
                    let bt = traffic(ebpf, &STATS_BACKEND, b.id)?;
                    Ok(BackendTraffic {
                        backend: b.address.to_string(),
                        state: b.state,
                        up: b.up(),
                        weight: b.weight,
                        packets: bt.packets,
                        bytes: bt.bytes,
                        new_flows: bt.new_flows,
                    })
                })
                .collect::<Result<_>>()?;
            Ok(VipTraffic {
                vip: v.vip.clone(),
                packets: t.packets,
                bytes: t.bytes,
                new_flows: t.new_flows,
                backends,
            })
        })
        .collect()
}

/// One exposition being written: `# HELP`/`# TYPE` heads and samples.
pub(crate) struct Family<'a> {
    pub(crate) out: &'a mut String,
}

impl Family<'_> {
    pub(crate) fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
    pub(crate) fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        if l.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", l.join(","));
        }
    }
}

/// The whole exposition: per backend, per VIP, then the data plane's
/// global counters.
pub fn render(
    vips: &[VipStatus],
    ebpf: &Ebpf,
    checks: &HashMap<u32, CheckRecord>,
    conntrack: Option<crate::stats::TableCount>,
    node: &NodeStatus,
    graphite: Option<crate::graphite::PushStats>,
) -> Result<String> {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    backends(&mut f, vips, ebpf, checks)?;
    per_vip(&mut f, vips, ebpf)?;
    announcement(&mut f, node);
    if let Some(g) = graphite {
        pushing(&mut f, &g);
    }
    globals(&mut f, ebpf, conntrack)?;
    Ok(out)
}

/// The Graphite pusher: what it lost for good, and what waits for carbon.
fn pushing(f: &mut Family, g: &crate::graphite::PushStats) {
    for (name, kind, help, value) in [
        (
            "lb_graphite_dropped_lines_total",
            "counter",
            "Graphite lines lost for good: the spool's oldest at its bound, a failed spool write, or memory overflowing without a spool.",
            g.dropped_lines,
        ),
        (
            "lb_graphite_buffered_lines",
            "gauge",
            "Graphite lines waiting for carbon in memory.",
            g.buffered_lines,
        ),
        (
            "lb_graphite_spooled_lines",
            "gauge",
            "Graphite lines waiting for carbon in the spool on disk.",
            g.spooled_lines,
        ),
        (
            "lb_graphite_spool_bytes",
            "gauge",
            "Size of the Graphite spool on disk (bounded by graphite.spool_max_bytes).",
            g.spool_bytes,
        ),
    ] {
        f.head(name, kind, help);
        f.sample(name, &[], value);
    }
}

/// The node in its fleet: drained or not, and (when lbd announces) each
/// VIP's announcement.
fn announcement(f: &mut Family, node: &NodeStatus) {
    f.head(
        "lb_node_drained",
        "gauge",
        "1 while the node is drained (lbctl node drain): it announces no VIP.",
    );
    f.sample("lb_node_drained", &[], u8::from(node.drained));
    f.head(
        "lb_state_save_failures_total",
        "counter",
        "Changes applied to the data plane whose state file could not be written (they would not survive a restart).",
    );
    f.sample(
        "lb_state_save_failures_total",
        &[],
        node.state_save_failures,
    );
    if node.announce.is_none() {
        return;
    }
    f.head(
        "lb_vip_announced",
        "gauge",
        "1 while this node announces the VIP: it should receive its traffic and its route is in the announce table.",
    );
    for v in &node.vips {
        f.sample(
            "lb_vip_announced",
            &[("vip", &v.decision.vip)],
            u8::from(v.decision.announce && v.route_installed),
        );
    }
}

type BackendRow<'a> = (&'a VipStatus, &'a crate::api::BackendStatus, Traffic);

fn backends(
    f: &mut Family,
    vips: &[VipStatus],
    ebpf: &Ebpf,
    checks: &HashMap<u32, CheckRecord>,
) -> Result<()> {
    let mut rows: Vec<BackendRow> = Vec::new();
    for v in vips {
        for b in &v.backends {
            rows.push((v, b, traffic(ebpf, &STATS_BACKEND, b.id)?));
        }
    }
    for (name, help, pick) in [
        (
            "lb_backend_packets_total",
            "Packets forwarded to the backend.",
            0,
        ),
        (
            "lb_backend_bytes_total",
            "Bytes forwarded to the backend, as received at the LB (before encapsulation).",
            1,
        ),
        (
            "lb_backend_new_flows_total",
            "Flows placed on the backend.",
            2,
        ),
    ] {
        f.head(name, "counter", help);
        for (v, b, t) in &rows {
            let value = [t.packets, t.bytes, t.new_flows][pick];
            f.sample(
                name,
                &[("vip", &v.vip), ("backend", &b.address.to_string())],
                value,
            );
        }
    }
    f.head(
        "lb_backend_up",
        "gauge",
        "1 if the backend's health checks pass (whether it is drained or not; see lb_backend_state).",
    );
    for (v, b, _) in &rows {
        f.sample(
            "lb_backend_up",
            &[("vip", &v.vip), ("backend", &b.address.to_string())],
            u8::from(b.up()),
        );
    }
    f.head(
        "lb_backend_weight",
        "gauge",
        "The backend's configured weight (0 drains).",
    );
    for (v, b, _) in &rows {
        f.sample(
            "lb_backend_weight",
            &[("vip", &v.vip), ("backend", &b.address.to_string())],
            b.weight,
        );
    }
    f.head(
        "lb_backend_effective_weight",
        "gauge",
        "The backend's weight in the ring now: 0 out of it, below lb_backend_weight during slow start or a weight ramp.",
    );
    for (v, b, _) in &rows {
        f.sample(
            "lb_backend_effective_weight",
            &[("vip", &v.vip), ("backend", &b.address.to_string())],
            b.effective_weight,
        );
    }
    f.head(
        "lb_backend_flap_held",
        "gauge",
        "1 while flap damping holds the backend out of the ring: its health changed too often.",
    );
    for (v, b, _) in &rows {
        f.sample(
            "lb_backend_flap_held",
            &[("vip", &v.vip), ("backend", &b.address.to_string())],
            u8::from(b.flap_held),
        );
    }
    f.head(
        "lb_backend_flaps_total",
        "counter",
        "Health changes of the backend since lbd started (its first check result is not a change).",
    );
    for (v, b, _) in &rows {
        f.sample(
            "lb_backend_flaps_total",
            &[("vip", &v.vip), ("backend", &b.address.to_string())],
            b.health_changes,
        );
    }
    backend_states(f, &rows);
    health_checks(f, &rows, checks);
    Ok(())
}

fn backend_states(f: &mut Family, rows: &[BackendRow]) {
    f.head(
        "lb_backend_state",
        "gauge",
        "1 for the backend's current state (up, down, draining).",
    );
    for (v, b, _) in rows {
        for (state, name) in [
            (BackendState::Up, "up"),
            (BackendState::Down, "down"),
            (BackendState::Draining, "draining"),
        ] {
            f.sample(
                "lb_backend_state",
                &[
                    ("vip", &v.vip),
                    ("backend", &b.address.to_string()),
                    ("state", name),
                ],
                u8::from(b.state == state),
            );
        }
    }
}

fn health_checks(f: &mut Family, rows: &[BackendRow], checks: &HashMap<u32, CheckRecord>) {
    f.head(
        "lb_backend_health_check_latency_seconds",
        "gauge",
        "Duration of the backend's last health check.",
    );
    for (v, b, _) in rows {
        if let Some(c) = checks.get(&b.id) {
            f.sample(
                "lb_backend_health_check_latency_seconds",
                &[("vip", &v.vip), ("backend", &b.address.to_string())],
                c.last_latency.as_secs_f64(),
            );
        }
    }
    f.head(
        "lb_backend_health_checks_total",
        "counter",
        "Health checks run, by result.",
    );
    for (v, b, _) in rows {
        if let Some(c) = checks.get(&b.id) {
            for (result, n) in [("ok", c.ok_total), ("fail", c.fail_total)] {
                f.sample(
                    "lb_backend_health_checks_total",
                    &[
                        ("vip", &v.vip),
                        ("backend", &b.address.to_string()),
                        ("result", result),
                    ],
                    n,
                );
            }
        }
    }
}

fn per_vip(f: &mut Family, vips: &[VipStatus], ebpf: &Ebpf) -> Result<()> {
    let vip_rows: Vec<(&VipStatus, Traffic)> = vips
        .iter()
        .map(|v| Ok((v, traffic(ebpf, &STATS_VIP, v.id)?)))
        .collect::<Result<_>>()?;
    for (name, help, pick) in [
        (
            "lb_vip_packets_total",
            "Packets to the VIP that were forwarded.",
            0,
        ),
        (
            "lb_vip_bytes_total",
            "Bytes to the VIP that were forwarded, as received at the LB.",
            1,
        ),
        (
            "lb_vip_new_flows_total",
            "Flows to the VIP placed on a backend.",
            2,
        ),
    ] {
        f.head(name, "counter", help);
        for (v, t) in &vip_rows {
            f.sample(
                name,
                &[("vip", &v.vip)],
                [t.packets, t.bytes, t.new_flows][pick],
            );
        }
    }
    f.head(
        "lb_vip_healthy_backends",
        "gauge",
        "Backends of the VIP in service whose checks pass (not drained, not held by flap damping); in panic mode the ring keeps the others too.",
    );
    for v in vips {
        let n = v.backends.iter().filter(|b| b.healthy()).count();
        f.sample("lb_vip_healthy_backends", &[("vip", &v.vip)], n);
    }
    f.head(
        "lb_vip_ring_info",
        "gauge",
        "Always 1; the fingerprint label identifies the VIP's live ring (the same on every node that sends each flow to the same backend).",
    );
    for v in vips {
        f.sample(
            "lb_vip_ring_info",
            &[("vip", &v.vip), ("fingerprint", &v.ring_fingerprint)],
            1,
        );
    }
    f.head(
        "lb_vip_panic",
        "gauge",
        "1 while the VIP is in panic mode: fewer healthy backends than its min_healthy, so every checked, non-drained backend is kept in the ring.",
    );
    for v in vips {
        f.sample("lb_vip_panic", &[("vip", &v.vip)], u8::from(v.panic));
    }
    f.head(
        "lb_vip_ring_changes_total",
        "counter",
        "Ring generations published for the VIP since lbd started.",
    );
    for v in vips {
        f.sample(
            "lb_vip_ring_changes_total",
            &[("vip", &v.vip)],
            v.ring_flips,
        );
    }
    Ok(())
}

fn globals(f: &mut Family, ebpf: &Ebpf, conntrack: Option<crate::stats::TableCount>) -> Result<()> {
    let global = stats::global_counters(ebpf)?;
    f.head(
        "lb_xdp_verdicts_total",
        "counter",
        "Packets by XDP verdict.",
    );
    for c in Counter::ALL.iter().filter(|c| c.is_verdict()) {
        let name = c.name().trim_start_matches("verdict_");
        f.sample(
            "lb_xdp_verdicts_total",
            &[("verdict", name)],
            global.get(c.name()).copied().unwrap_or(0),
        );
    }
    f.head(
        "lb_xdp_packets_total",
        "counter",
        "Packets by parse outcome and balancing reason (see the README).",
    );
    for c in Counter::ALL.iter().filter(|c| !c.is_verdict()) {
        f.sample(
            "lb_xdp_packets_total",
            &[("reason", c.name())],
            global.get(c.name()).copied().unwrap_or(0),
        );
    }
    if let Some(t) = conntrack {
        f.head(
            "lb_conntrack_entries",
            "gauge",
            "Live flows in the connection table: not closed, not expired (counted every few seconds).",
        );
        f.sample("lb_conntrack_entries", &[], t.entries);
        f.head(
            "lb_conntrack_embryonic_entries",
            "gauge",
            "Of the live flows, those seen once (a handshake in progress, or a spoofed packet): most of the table during a flood.",
        );
        f.sample("lb_conntrack_embryonic_entries", &[], t.embryonic);
        f.head(
            "lb_conntrack_slots",
            "gauge",
            "Capacity of the connection table in flows.",
        );
        f.sample("lb_conntrack_slots", &[], t.slots);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(esc("x\ny"), "x\\ny");
    }
}

mod dashboard {
    /// Every `lb_*` metric the shipped Grafana dashboard queries must be one
    /// this exporter writes (a renamed metric would blank a panel silently).
    #[test]
    fn queries_only_exported_metrics() {
        let exported = [
            "lb_backend_packets_total",
            "lb_backend_bytes_total",
            "lb_backend_new_flows_total",
            "lb_backend_up",
            "lb_backend_weight",
            "lb_backend_effective_weight",
            "lb_backend_flap_held",
            "lb_backend_flaps_total",
            "lb_backend_state",
            "lb_backend_health_check_latency_seconds",
            "lb_backend_health_checks_total",
            "lb_vip_packets_total",
            "lb_vip_bytes_total",
            "lb_vip_new_flows_total",
            "lb_vip_healthy_backends",
            "lb_vip_ring_changes_total",
            "lb_vip_panic",
            "lb_vip_ring_info",
            "lb_xdp_verdicts_total",
            "lb_xdp_packets_total",
            "lb_conntrack_entries",
            "lb_conntrack_embryonic_entries",
            "lb_conntrack_slots",
            "lb_graphite_dropped_lines_total",
            "lb_graphite_buffered_lines",
            "lb_graphite_spooled_lines",
            "lb_graphite_spool_bytes",
        ];
        let src = include_str!("metrics.rs");
        for name in exported {
            assert!(
                src.contains(&format!("\"{name}\"")),
                "{name} is not rendered here"
            );
        }
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../grafana/lb-dashboard.json"))
                .expect("dashboard is JSON");
        let mut queried = 0;
        for panel in dash["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("lb_")
                        && !word.starts_with("lb_no_")
                        && !word.contains("_failed")
                        && !word.starts_with("lb_flow_cache_hit")
                        && !word.starts_with("lb_conntrack_hit")
                        && !word.starts_with("lb_encap")
                        && !word.starts_with("lb_frame")
                        && !word.starts_with("lb_unsupported")
                    {
                        assert!(
                            exported.contains(&word),
                            "panel {:?} queries unknown metric {word}",
                            panel["title"]
                        );
                        queried += 1;
                    }
                }
            }
        }
        assert!(
            queried >= 12,
            "the dashboard queries the metrics ({queried})"
        );
    }
}
