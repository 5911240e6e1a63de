//! lbctl's output for people, from the typed answers. Each function returns
//! whole lines, so they can be tested without a terminal.

use std::{collections::BTreeMap, fmt::Write};

use super::stats::{Rates, VipRates};
use crate::{
    announce::Reason,
    api::{
        BackendRemoved, BackendState, BackendStatus, DebugSwitched, Explanation, NodeStatus,
        TeardownStarted, VipRemoved, VipStatus,
    },
    health::Health,
    sysctl::Row,
};

/// The words the API uses (`--json`), so both outputs read the same.
fn state(s: BackendState) -> &'static str {
    match s {
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Draining => "draining",
    }
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Down => "down",
        Health::Unchecked => "unchecked",
    }
}

/// The weight, and what the ring gives now when that differs (slow start,
/// a ramp) or why the backend is out of it.
fn backend_line(b: &BackendStatus) -> String {
    let mut line = format!(
        "{:<40} {:<9} health={:<9} weight={}",
        b.address.to_string(),
        state(b.state),
        health(b.health),
        b.weight
    );
    if b.state == BackendState::Up && b.effective_weight != b.weight {
        let _ = write!(line, " (now {})", b.effective_weight);
    }
    if b.flap_held {
        line.push_str(" flap-held");
    }
    line
}

/// `lbctl list`: each VIP, then its backends indented.
pub fn vips(vips: &[VipStatus]) -> String {
    let mut out = String::new();
    for v in vips {
        let panic = if v.panic {
            " PANIC: too few healthy backends, all kept in the ring"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{} ({}) ring {}{panic}",
            v.vip, v.mode, v.ring_fingerprint
        );
        for b in &v.backends {
            let _ = writeln!(out, "  {}", backend_line(b));
        }
    }
    out
}

/// `lbctl diff` and `lbctl reload`: per VIP what changes, and the share of
/// ring slots that move; `verb` says whether it is done or would be.
pub fn config_diff(d: &crate::diff::ConfigDiff, verb: &str) -> String {
    use crate::diff::VipChange;
    let mut out = String::new();
    for v in &d.vips {
        match v.change {
            VipChange::Unchanged => {
                let _ = writeln!(out, "{}: unchanged", v.vip);
                continue;
            }
            VipChange::Added => {
                let _ = writeln!(out, "{}: added, {} backends", v.vip, v.added.len());
            }
            VipChange::Removed => {
                let _ = writeln!(out, "{}: removed, its traffic goes to the kernel", v.vip);
            }
            VipChange::Changed => {
                let moved = v.slots_moved.map_or(String::new(), |m| {
                    format!(", {:.2}% of ring slots move", m * 100.0)
                });
                let _ = writeln!(out, "{}: changed{moved}", v.vip);
            }
        }
        if v.change != VipChange::Added {
            for a in &v.added {
                let _ = writeln!(out, "  + {a} (in the ring after its first passing check)");
            }
        }
        if v.change != VipChange::Removed {
            for r in &v.removed {
                let _ = writeln!(out, "  - {r}");
            }
        }
        for w in &v.reweighted {
            let _ = writeln!(out, "  ~ {} weight {} -> {}", w.backend, w.from, w.to);
        }
        if let Some([from, to]) = &v.mode {
            let _ = writeln!(out, "  mode {from} -> {to}");
        }
        if let Some([from, to]) = &v.health_check {
            let _ = writeln!(out, "  health check: {from}\n             -> {to}");
        }
        for s in &v.settings {
            let _ = writeln!(out, "  {s}");
        }
    }
    let _ = writeln!(out, "{} of {} VIPs {verb}", d.changes, d.vips.len());
    out
}

/// `lbctl fleet status`.
pub fn fleet_status(s: &crate::fleet::FleetStatus) -> String {
    let mut out = format!(
        "cluster {}: desired state at revision {}, {} live nodes\n",
        s.cluster,
        s.revision,
        s.nodes.len()
    );
    for n in &s.nodes {
        let flag = if s.disagreeing.contains(&n.node) {
            "  DISAGREES"
        } else {
            ""
        };
        let _ = writeln!(out, "{} applied {}{flag}", n.node, n.applied_revision);
        for (vip, fp) in &n.fingerprints {
            let _ = writeln!(out, "  {vip} ring {fp}");
        }
    }
    if s.disagreeing.is_empty() {
        out.push_str("every node has applied the current revision and builds the same rings\n");
    }
    out
}

/// A VIP as a change left it (`add-backend`, `vip add`).
pub fn vip_answer(v: &Option<VipStatus>) -> String {
    match v {
        Some(v) => vips(std::slice::from_ref(v)),
        // lbd lists the VIP it just changed; nothing to show otherwise.
        None => "ok\n".into(),
    }
}

/// A backend as a change left it (`drain`, `undrain`, `set-weight`).
pub fn backend_change(vip: &str, b: &BackendStatus) -> String {
    format!("{vip}\n  {}\n", backend_line(b))
}

pub fn backend_removed(r: &BackendRemoved) -> String {
    format!("removed {} from {}\n", r.removed, r.vip)
}

pub fn vip_removed(r: &VipRemoved) -> String {
    format!(
        "removed {}: its traffic goes to the kernel again\n",
        r.removed
    )
}

pub fn debug(d: &DebugSwitched) -> String {
    let on = if d.debug { "on" } else { "off" };
    format!("data-plane debug events {on}\n")
}

/// `lbctl node status` (and what drain/undrain answer): the node, then
/// one line per VIP with its announcement and why.
pub fn node(n: &NodeStatus) -> String {
    let mut out = String::new();
    let announce = match &n.announce {
        Some(a) => format!("routes in table {} dev {}", a.table, a.device),
        None => "not announcing ([announce] not configured)".to_owned(),
    };
    let _ = writeln!(
        out,
        "node {}; {announce}; hash_seed {}, ring size {}",
        if n.drained { "DRAINED" } else { "in service" },
        n.hash_seed,
        n.ring_size
    );
    if let Some(c) = &n.ring_change {
        let _ = writeln!(
            out,
            "WARNING: adopted a data plane with other rings ({c}): accepted with --accept-ring-change"
        );
    }
    if let Some(e) = &n.routes_error {
        let _ = writeln!(out, "WARNING: writing the announce routes failed: {e}");
    }
    if let Some(e) = &n.state_save_error {
        let _ = writeln!(
            out,
            "WARNING: changes are live but not saved ({} failed saves): {e}",
            n.state_save_failures
        );
    }
    for v in &n.vips {
        let d = &v.decision;
        let why = match d.reason {
            Reason::Announced => "announced".to_owned(),
            Reason::NoHealthyBackends { healthy, needed } => {
                format!("withdrawn: {healthy} healthy backends, {needed} needed")
            }
            Reason::NodeDrained => "withdrawn: the node is drained".to_owned(),
            Reason::Detached => "withdrawn: the data plane is detached".to_owned(),
        };
        let route = match (n.announce.is_some(), v.route_installed) {
            (false, _) => "",
            (true, true) => " (route installed)",
            (true, false) => " (no route)",
        };
        let _ = writeln!(out, "  {:<40} {why}{route}", d.vip);
    }
    out
}

pub fn teardown(t: &TeardownStarted) -> String {
    format!("lbd: {}\n", t.teardown)
}

pub fn counters(c: &BTreeMap<String, u64>) -> String {
    c.iter().map(|(k, n)| format!("{k:<32} {n}\n")).collect()
}

/// `CLIENT -> BACKEND (backend ID, STATE) via VIA: REASON`, or for a packet
/// that is not forwarded, `CLIENT -> VIP: dropped: REASON`.
pub fn explanation(e: &Explanation) -> String {
    let Some(backend) = e.backend.filter(|_| e.verdict == "forward") else {
        let did = match e.verdict.as_str() {
            "drop" => "dropped",
            "pass" => "passed to the kernel",
            other => other,
        };
        // Some of lbd's reasons already start with what was done.
        let why = if e.reason.starts_with(did) {
            e.reason.clone()
        } else {
            format!("{did}: {}", e.reason)
        };
        return format!("{} -> {}: {why}\n", e.client, e.vip);
    };
    let mut out = format!("{} -> {backend}", e.client);
    match (e.backend_id, &e.backend_state) {
        (Some(id), Some(s)) => {
            let _ = write!(out, " (backend {id}, {s})");
        }
        (Some(id), None) => {
            let _ = write!(out, " (backend {id})");
        }
        _ => {}
    }
    if let Some(via) = &e.via {
        let _ = write!(out, " via {via}");
    }
    let _ = writeln!(out, ": {}", e.reason);
    out
}

fn rates_columns(r: &Rates) -> String {
    format!(
        "{:>10.1} {:>12.0} {:>10.1} {:>14} {:>16}",
        r.pps, r.bps, r.new_flows_per_s, r.packets, r.bytes
    )
}

/// `lbctl stats`: a VIP per line, its backends indented below it.
pub fn stats(rows: &[VipRates]) -> String {
    let mut out = format!(
        "{:<44} {:>10} {:>12} {:>10} {:>14} {:>16}\n",
        "vip / backend", "pps", "bps", "flows/s", "packets", "bytes"
    );
    for v in rows {
        let _ = writeln!(out, "{:<44} {}", v.vip, rates_columns(&v.rates));
        for b in &v.backends {
            let _ = writeln!(
                out,
                "  {:<32} {:<9} {}",
                b.backend,
                state(b.state),
                rates_columns(&b.rates)
            );
        }
    }
    out
}

/// `lbctl sysctl show` and `apply`: a `*` marks a value that differs from
/// the recommendation.
pub fn sysctl_rows(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<36} {:<16} {:<16} why\n",
        "key", "current", "recommended"
    );
    for r in rows {
        let current = r.current.as_deref().unwrap_or("(absent)");
        let mark = if r.ok { " " } else { "*" };
        let _ = writeln!(
            out,
            "{mark}{:<35} {:<16} {:<16} {}",
            r.key, current, r.recommended, r.why
        );
    }
    out
}

/// `lbctl sysctl restore`: what was written back.
pub fn sysctl_restored(restored: &BTreeMap<String, String>) -> String {
    restored
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explained(verdict: &str, via: Option<&str>, reason: &str) -> Explanation {
        let forward = verdict == "forward";
        Explanation {
            vip: "198.18.100.1:80/tcp".into(),
            client: "198.18.0.10:40000".parse().unwrap(),
            packet: "ack".into(),
            verdict: verdict.into(),
            backend: forward.then(|| "198.18.0.21".parse().unwrap()),
            backend_id: forward.then_some(3),
            backend_state: forward.then(|| "up".into()),
            via: via.map(Into::into),
            reason: reason.into(),
        }
    }

    #[test]
    fn explain_names_backend_slot_state_and_path() {
        let e = explained(
            "forward",
            Some("conntrack"),
            "established flow, from its connection-table entry",
        );
        assert_eq!(
            explanation(&e),
            "198.18.0.10:40000 -> 198.18.0.21 (backend 3, up) via conntrack: \
             established flow, from its connection-table entry\n"
        );
    }

    #[test]
    fn explain_says_what_happens_when_nothing_is_forwarded() {
        let e = explained(
            "drop",
            Some("ring_no_entry"),
            "no backend: the VIP's ring is empty (no backend is up)",
        );
        assert_eq!(
            explanation(&e),
            "198.18.0.10:40000 -> 198.18.100.1:80/tcp: dropped: no backend: \
             the VIP's ring is empty (no backend is up)\n"
        );
        let e = explained("drop", None, "dropped (lb_something)");
        assert!(
            explanation(&e).ends_with(": dropped (lb_something)\n"),
            "{}",
            explanation(&e)
        );
        let e = explained("pass", None, "passed to the kernel (verdict_pass)");
        assert!(
            explanation(&e).ends_with("/tcp: passed to the kernel (verdict_pass)\n"),
            "{}",
            explanation(&e)
        );
    }

    #[test]
    fn list_shows_each_backend_under_its_vip() {
        let mut drained = BackendStatus::new("198.18.0.21".parse().unwrap(), 2, 100);
        drained.drained = true;
        drained.refresh_state();
        let v = VipStatus {
            vip: "198.18.100.1:80/tcp".into(),
            id: 0,
            mode: "ipip".into(),
            ring_flips: 3,
            panic: false,
            ring_fingerprint: "00000000000000aa".into(),
            backends: vec![
                BackendStatus::new("198.18.0.20".parse().unwrap(), 1, 100),
                drained,
            ],
        };
        let text = vips(std::slice::from_ref(&v));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "198.18.100.1:80/tcp (ipip) ring 00000000000000aa");
        assert!(
            lines[1].starts_with("  198.18.0.20 ") && lines[1].ends_with("weight=100"),
            "{text}"
        );
        assert!(lines[2].contains(" draining  health=up "), "{text}");
        let mut v = v;
        v.panic = true;
        v.backends[0].effective_weight = 25;
        v.backends[1].flap_held = true;
        let text = vips(&[v]);
        assert!(
            text.lines()
                .next()
                .unwrap()
                .ends_with("PANIC: too few healthy backends, all kept in the ring"),
            "{text}"
        );
        assert!(text.contains("weight=100 (now 25)\n"), "{text}");
        assert!(text.contains(" flap-held\n"), "{text}");
    }

    #[test]
    fn counters_one_per_line_in_name_order() {
        let c = BTreeMap::from([
            ("verdict_tx".to_owned(), 7),
            ("lb_no_backend".to_owned(), 0),
        ]);
        assert_eq!(
            counters(&c),
            format!("{:<32} 0\n{:<32} 7\n", "lb_no_backend", "verdict_tx")
        );
    }
}
