//! End-to-end: `lbd` attaches the XDP program on the LB's interface, the
//! client sends real UDP and TCP traffic to the LB host, and the program's
//! counters must agree with an nftables ingress counter on the same interface
//! (that hook sees exactly what XDP passed) and with what was sent.
//!
//! Stray ARP/neighbour-discovery packets can arrive at any moment, so the
//! nftables readings are bracketed by two XDP readings each: at the start
//! (`x0a`, reset nft, `x0b`) and at the end (`x1a`, read nft, `x1b`); every
//! nft delta must lie in `[x1a - x0b, x1b - x0a]`.

use std::{net::SocketAddr, process::Command, time::Duration};

use lb_tests::{HttpConn, Spawned, Topology, lbd_path, udp_echo};
use serde_json::Value;

const UDP_PORT: u16 = 5353;
const HTTP_PORT: u16 = 8080;
const UDP_PER_FAMILY: u64 = 40;
const HTTP_REQUESTS: u64 = 20;

fn nft_counters(t: &Topology) -> (u64, u64, u64) {
    let out = t
        .exec(t.lb().ns(), &["nft", "-j", "list", "counters"])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut got = (0, 0, 0);
    for item in v["nftables"].as_array().unwrap() {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let packets = c["packets"].as_u64().unwrap();
        match c["name"].as_str().unwrap() {
            "udp_in" => got.0 = packets,
            "tcp_in" => got.1 = packets,
            "all_in" => got.2 = packets,
            _ => {}
        }
    }
    got
}

/// Asks lbd for its counters (SIGUSR1) and returns them.
fn snapshot(lbd: &mut Spawned) -> Value {
    // SAFETY: plain kill(2) on a child we own.
    assert_eq!(unsafe { libc::kill(lbd.pid() as i32, libc::SIGUSR1) }, 0);
    let line = lbd
        .wait_for_line(
            |l| l.contains("\"event\":\"counters\""),
            Duration::from_secs(10),
        )
        .unwrap();
    serde_json::from_str::<Value>(&line).unwrap()["counters"].clone()
}

fn get(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} missing in {v}"))
}

fn run(mode: &str) {
    let t = Topology::new(1).unwrap();
    let lb = t.lb();
    let ruleset = format!(
        "table netdev lbtest {{
           counter udp_in {{}}
           counter tcp_in {{}}
           counter all_in {{}}
           chain ingress {{
             type filter hook ingress device {dev} priority 0;
             counter name all_in
             meta l4proto udp counter name udp_in
             meta l4proto tcp counter name tcp_in
           }}
         }}",
        dev = lb.ifname()
    );
    let rules = std::env::temp_dir().join(format!("{}-{mode}.nft", t.id()));
    std::fs::write(&rules, ruleset).unwrap();
    t.exec(lb.ns(), &["nft", "-f", rules.to_str().unwrap()])
        .unwrap();
    std::fs::remove_file(&rules).ok();

    let mut server = t
        .start_server(
            lb.ns(),
            "lb-host",
            &[SocketAddr::new(lb.ipv4().into(), HTTP_PORT)],
            &[
                SocketAddr::new(lb.ipv4().into(), UDP_PORT),
                SocketAddr::new(lb.ipv6().into(), UDP_PORT),
            ],
        )
        .unwrap();
    let mut cmd = Command::new(lbd_path().unwrap());
    cmd.args(["--interface", lb.ifname(), "--xdp-mode", mode]);
    let mut lbd = t.spawn(lb.ns(), &mut cmd).unwrap();
    let attached = lbd
        .wait_for_line(|l| l.contains("\"attached\""), Duration::from_secs(20))
        .unwrap();
    assert!(
        attached.contains(&format!("\"mode\":\"{mode}\"")),
        "{attached}"
    );

    let x0a = snapshot(&mut lbd);
    t.exec(lb.ns(), &["nft", "reset", "counters"]).unwrap();
    let x0b = snapshot(&mut lbd);

    let (lb4, lb6) = (lb.ipv4(), lb.ipv6());
    t.in_client(move || {
        for i in 0..UDP_PER_FAMILY {
            let payload = format!("ping {i}");
            for dst in [
                SocketAddr::new(lb4.into(), UDP_PORT),
                SocketAddr::new(lb6.into(), UDP_PORT),
            ] {
                let reply = udp_echo(dst, payload.as_bytes(), Duration::from_secs(2)).unwrap();
                assert!(reply.ends_with(payload.as_bytes()));
            }
        }
        let mut conn = HttpConn::connect(
            SocketAddr::new(lb4.into(), HTTP_PORT),
            Duration::from_secs(5),
        )
        .unwrap();
        for _ in 0..HTTP_REQUESTS {
            assert_eq!(conn.get("/").unwrap().text(), "lb-host\n");
        }
    })
    .unwrap();
    let _ = server.stop();
    // Let the connection's last segments land.
    std::thread::sleep(Duration::from_millis(300));

    let x1a = snapshot(&mut lbd);
    let (nft_udp, nft_tcp, nft_all) = nft_counters(&t);
    let x1b = snapshot(&mut lbd);
    let low = get(&x1a, "verdict_pass") - get(&x0b, "verdict_pass");
    let high = get(&x1b, "verdict_pass") - get(&x0a, "verdict_pass");
    assert!(
        (low..=high).contains(&nft_all),
        "verdict_pass: nftables saw {nft_all}, XDP counted between {low} and {high}"
    );
    // No VIP is configured, so the VIP-address filter refuses every IP
    // packet after one read of its destination: counted as such, never
    // parsed further. Neighbour discovery is IP too, hence at least.
    let refused = get(&x1b, "parse_not_vip_address") - get(&x0a, "parse_not_vip_address");
    assert!(
        refused >= nft_udp + nft_tcp,
        "parse_not_vip_address {refused}, nftables saw {nft_udp} UDP and {nft_tcp} TCP"
    );
    // At least what the client sent: its UDP, one segment per request and
    // the handshake.
    assert!(
        refused >= 2 * UDP_PER_FAMILY + HTTP_REQUESTS + 2,
        "{refused}"
    );
    for parsed in ["parse_udp", "parse_tcp"] {
        assert_eq!(get(&x1b, parsed) - get(&x0a, parsed), 0, "{parsed}");
    }
    // Nothing is for a VIP (none is configured), so everything passed, and
    // every packet has exactly one parse outcome.
    let outcomes: u64 = x1b
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("parse_"))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert_eq!(outcomes, get(&x1b, "verdict_pass"), "{x1b}");
    for verdict in [
        "verdict_drop",
        "verdict_tx",
        "verdict_redirect",
        "verdict_aborted",
    ] {
        assert_eq!(get(&x1b, verdict), 0, "{x1b}");
    }

    // SAFETY: plain kill(2) on a child we own.
    assert_eq!(unsafe { libc::kill(lbd.pid() as i32, libc::SIGTERM) }, 0);
    let last = lbd
        .wait_for_line(|l| l.contains("final_counters"), Duration::from_secs(20))
        .unwrap();
    let fin = serde_json::from_str::<Value>(&last).unwrap()["counters"].clone();
    assert!(get(&fin, "verdict_pass") >= get(&x1b, "verdict_pass"));
    assert!(lbd.stop().is_some_and(|s| s.success()), "lbd exits cleanly");
    // Detached: the interface carries no XDP program any more.
    let link = t
        .exec(lb.ns(), &["ip", "-d", "link", "show", lb.ifname()])
        .unwrap();
    assert!(!link.contains("prog/xdp"), "{link}");
}

#[test]
fn counters_match_traffic_generic_xdp() {
    run("generic");
}

#[test]
fn counters_match_traffic_native_xdp() {
    run("native");
}
