//! lbctl's output for people when the lbd it talks to runs the backend
//! role: the same commands, the backend's side of things.

use std::fmt::Write;

use crate::backend_role::status::{BackendRoleStatus, OnLo, Reloaded};

/// `lbctl list` against a backend: what runs on the interface, each VIP's
/// traffic by outer family, the drops by reason, second hops and sysctls.
pub fn status(s: &BackendRoleStatus) -> String {
    let mut out = format!("{} (backend role) on {}: ", s.instance, s.interface);
    match &s.xdp {
        Some(x) if x.ours => {
            let _ = write!(out, "decap attached, {}, program {}", x.mode, x.program_id);
        }
        Some(x) => {
            let _ = write!(
                out,
                "NOT ATTACHED: {} runs XDP program {}, not this lbd's decap",
                s.interface, x.program_id
            );
        }
        None => out.push_str("NOT ATTACHED: no XDP program on the interface"),
    }
    if s.adopted {
        out.push_str(" (adopted at start)");
    }
    match s.gue_port {
        0 => out.push_str("; GUE off\n"),
        p => {
            let _ = writeln!(out, "; GUE on UDP port {p}");
        }
    }
    if s.vips.is_empty() {
        out.push_str("no VIPs: encapsulated packets are dropped ([decap] vips)\n");
    } else {
        let _ = writeln!(
            out,
            "{:<40} {:<8} {:<6} {:>12} {:>14} {:>10}",
            "VIP", "on lo", "outer", "packets", "bytes", "forwarded"
        );
    }
    for v in &s.vips {
        let on_lo = match v.on_lo {
            OnLo::Added => "added",
            OnLo::Present => "present",
            OnLo::Missing => "MISSING",
        };
        for (i, (family, t)) in [("ipv4", &v.ipv4), ("ipv6", &v.ipv6)].iter().enumerate() {
            let (vip, lo) = if i == 0 {
                (v.vip.to_string(), on_lo)
            } else {
                (String::new(), "")
            };
            let _ = writeln!(
                out,
                "{vip:<40} {lo:<8} {family:<6} {:>12} {:>14} {:>10}",
                t.packets, t.bytes, t.forwarded
            );
        }
    }
    let drops: Vec<String> = s
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if drops.is_empty() {
        out.push_str("drops: none\n");
    } else {
        let _ = writeln!(out, "drops: {}", drops.join(", "));
    }
    let h = &s.second_hops;
    if h.hops.is_empty() {
        out.push_str("second hops: none asked for\n");
    } else {
        let _ = writeln!(
            out,
            "second hops ({} asked for, {} without a route):",
            h.requests, h.failures
        );
    }
    for hop in &h.hops {
        let _ = write!(out, "  {:<38} {}", hop.addr.to_string(), hop.state.label());
        if let (Some(via), Some(mac)) = (hop.via, &hop.mac) {
            let _ = write!(out, " via {via} ({mac})");
        }
        if let Some(why) = &hop.why {
            let _ = write!(out, ": {why}");
        }
        out.push('\n');
    }
    let good = s.sysctl.rows.iter().filter(|r| r.ok).count();
    let _ = write!(
        out,
        "sysctls: {good} of {} as recommended",
        s.sysctl.rows.len()
    );
    match (&s.sysctl.backup, s.sysctl.applied) {
        (Some(b), true) => {
            let _ = writeln!(out, " (applied; originals in {})", b.display());
        }
        _ => out.push_str(" (not applied by lbd: [sysctl] apply = false)\n"),
    }
    out
}

/// `lbctl reload` against a backend.
pub fn reloaded(r: &Reloaded) -> String {
    let mut out = String::new();
    for v in &r.added {
        let _ = writeln!(out, "+ {v}");
    }
    for v in &r.removed {
        let _ = writeln!(out, "- {v}");
    }
    if let Some([from, to]) = r.gue_port {
        let _ = writeln!(out, "~ GUE port {from} -> {to}");
    }
    if out.is_empty() {
        out.push_str("nothing changed\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend_role::status::{
        DecapVipStatus, HopState, Outer, SecondHop, SecondHops, SysctlStatus, XdpStatus,
    };

    fn sample() -> BackendRoleStatus {
        BackendRoleStatus {
            role: "backend".into(),
            instance: "web1".into(),
            interface: "eth0".into(),
            xdp: Some(XdpStatus {
                mode: "generic".into(),
                program_id: 42,
                ours: true,
            }),
            adopted: true,
            gue_port: 6080,
            vips: vec![DecapVipStatus {
                vip: "198.18.100.1".parse().unwrap(),
                on_lo: OnLo::Present,
                ipv4: Outer {
                    packets: 5,
                    bytes: 640,
                    forwarded: 1,
                },
                ipv6: Outer::default(),
            }],
            drops: BTreeMap::from([
                ("drop_not_vip".to_owned(), 3),
                ("drop_no_route".to_owned(), 0),
            ]),
            second_hops: SecondHops {
                hops: vec![SecondHop {
                    addr: "198.18.0.21".parse().unwrap(),
                    state: HopState::Resolved,
                    via: Some("198.18.0.21".parse().unwrap()),
                    ifindex: Some(2),
                    mac: Some("02:00:00:00:00:21".into()),
                    why: None,
                }],
                requests: 1,
                ..SecondHops::default()
            },
            sysctl: SysctlStatus {
                applied: false,
                backup: None,
                rows: Vec::new(),
            },
        }
    }

    #[test]
    fn list_shows_the_backend_side() {
        let text = status(&sample());
        assert!(
            text.starts_with(
                "web1 (backend role) on eth0: decap attached, generic, program 42 (adopted at start); GUE on UDP port 6080\n"
            ),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("198.18.100.1"))
            .unwrap();
        let words: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(words, ["198.18.100.1", "present", "ipv4", "5", "640", "1"]);
        assert!(text.contains("\ndrops: drop_not_vip 3\n"), "{text}");
        assert!(
            text.contains("  198.18.0.21                            resolved via 198.18.0.21 (02:00:00:00:00:21)\n"),
            "{text}"
        );
        let mut off = sample();
        off.xdp = None;
        off.gue_port = 0;
        off.vips[0].on_lo = OnLo::Missing;
        let text = status(&off);
        assert!(text.contains("NOT ATTACHED"), "{text}");
        assert!(text.contains("GUE off"), "{text}");
        assert!(text.contains("MISSING"), "{text}");
    }

    #[test]
    fn reload_lists_the_changes() {
        let r = Reloaded {
            role: "backend".into(),
            added: vec!["198.18.100.2".parse().unwrap()],
            removed: Vec::new(),
            gue_port: Some([6080, 0]),
        };
        assert_eq!(reloaded(&r), "+ 198.18.100.2\n~ GUE port 6080 -> 0\n");
    }
}
