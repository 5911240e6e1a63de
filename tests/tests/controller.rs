//! End-to-end with the real controller: `lbd --config` programs two VIPs
//! (ipip with the decapsulator on the backends, and l2dsr) in front of three
//! HTTP backends, health-checks them, and takes a dead one out.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{HttpConn, Topology, addressing, in_netns, lbd};
use lb_userspace::dataplane::AttachMode;

const PORT: u16 = 80;
const INTERVAL_MS: u64 = 300;
const FALL: u64 = 2;

/// lbd's socket and state go in `dir`.
fn config(t: &Topology, mode: &str, dir: &Path) -> String {
    let backends = lbd::backend_tables(t.backends());
    let check = format!(
        "[vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"{INTERVAL_MS}ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = {FALL}\n"
    );
    format!(
        "{pre}\
         [[vip]]\naddress = \"{v1}:{PORT}/tcp\"\nmode = \"ipip\"\n{check}{backends}\
         [[vip]]\naddress = \"{v2}:{PORT}/tcp\"\nmode = \"l2dsr\"\n{check}{backends}",
        pre = lbd::Preamble {
            xdp_mode: mode,
            ..Default::default()
        }
        .render(t, dir),
        v1 = addressing::vip_v4(1),
        v2 = addressing::vip_v4(2),
    )
}

/// `n` new connections to `vip`, one request each; backend name -> count.
fn spread(t: &Topology, vip: IpAddr, n: usize) -> BTreeMap<String, usize> {
    t.in_client(move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let mut c = HttpConn::connect(SocketAddr::new(vip, PORT), Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connect to {vip}: {e:#}"));
            let body = c
                .get("/")
                .unwrap_or_else(|e| panic!("GET via {vip}: {e:#}"))
                .text();
            *seen.entry(body.trim().to_owned()).or_insert(0) += 1;
        }
        seen
    })
    .unwrap()
}

fn run(mode: AttachMode) {
    let t = Topology::new(3).unwrap();
    let mut servers = t.start_servers(PORT, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, mode).unwrap();
    let vips = [
        IpAddr::from(addressing::vip_v4(1)),
        IpAddr::from(addressing::vip_v4(2)),
    ];
    for v in vips {
        t.add_vip_on_backends(v).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("{}-{mode}", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("lb.toml");
    std::fs::write(&cfg_path, config(&t, &mode.to_string(), &dir)).unwrap();
    let (mut lbd, _) = lbd::start(&t, &cfg_path).unwrap();

    // 300 new connections per VIP spread over all three backends.
    for vip in vips {
        let seen = spread(&t, vip, 300);
        assert_eq!(seen.len(), 3, "{vip}: {seen:?}");
        assert!(
            seen.values().all(|&n| n >= 60),
            "every backend serves at least 20%: {vip}: {seen:?}"
        );
    }

    // Long-lived connections that landed on the survivors keep exchanging
    // requests, from a thread of their own, all through the failover.
    let vip1 = vips[0];
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let client_ns = t.client().ns().to_owned();
    let survivors = std::thread::spawn(move || {
        in_netns(&client_ns, move || {
            let mut keep: Vec<(HttpConn, String)> = (0..12)
                .filter_map(|_| {
                    let mut c =
                        HttpConn::connect(SocketAddr::new(vip1, PORT), Duration::from_secs(3))
                            .ok()?;
                    let who = c.get("/").ok()?.text();
                    (who.trim() != "backend0").then_some((c, who))
                })
                .collect();
            assert!(
                !keep.is_empty(),
                "some connections land on backends 1 and 2"
            );
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut rounds = 0;
            while !stop_flag.load(Ordering::Relaxed) && rounds < 3000 {
                rounds += 1;
                for (c, who) in keep.iter_mut() {
                    match c.get("/") {
                        Ok(r) if r.text() == *who => ok += 1,
                        Ok(r) => failed.push(format!("moved {who:?} -> {:?}", r.text())),
                        Err(e) => failed.push(format!("{e:#}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));

    // Kill backend0's server: both VIPs must mark it down in time.
    let killed = Instant::now();
    servers[0].stop();
    let bound = Duration::from_millis(FALL * INTERVAL_MS) + Duration::from_secs(1);
    let mut down = 0;
    while down < 2 {
        let line = lbd
            .wait_for_line(
                |l| l.contains("\"backend\"") && l.contains("\"down\""),
                bound + Duration::from_secs(2),
            )
            .unwrap();
        assert!(line.contains(&t.backend(0).ipv4().to_string()), "{line}");
        down += 1;
    }
    let took = killed.elapsed();
    assert!(took <= bound, "down after {took:?}, allowed {bound:?}");

    // Every new connection now succeeds, on the survivors.
    for vip in vips {
        let seen = spread(&t, vip, 60);
        assert!(!seen.contains_key("backend0"), "{vip}: {seen:?}");
        assert_eq!(seen.values().sum::<usize>(), 60);
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = survivors.join().unwrap();
    assert!(
        failed.is_empty(),
        "long-lived connections to survivors: {failed:?}"
    );
    assert!(ok > 50, "they kept exchanging data: {ok} answers");

    let (_, status) = lbd::stop(&mut lbd).unwrap();
    assert!(status.is_some_and(|s| s.success()));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn spread_and_failover_generic_xdp() {
    run(AttachMode::Generic);
}

#[test]
fn spread_and_failover_native_xdp() {
    run(AttachMode::Native);
}

/// A backend's MAC changes (hardware replaced, VM moved): once the LB's
/// neighbour entry changes, lbd rewrites the backend's next hop and l2dsr
/// traffic reaches it again, without any command.
#[test]
fn next_hop_change_is_followed() {
    let t = Topology::new(1).unwrap();
    let _servers = t.start_servers(PORT, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip = IpAddr::from(addressing::vip_v4(2));
    t.add_vip_on_backends(vip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-nexthop", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("lb.toml");
    // Only the l2dsr VIP matters here; keep the file as the other tests do.
    std::fs::write(&cfg_path, config(&t, "generic", &dir)).unwrap();
    let (mut lbd, _) = lbd::start(&t, &cfg_path).unwrap();
    assert_eq!(spread(&t, vip, 5).get("backend0"), Some(&5));

    let b = t.backend(0);
    let new_mac = "02:00:c6:12:aa:01";
    t.exec(
        b.ns(),
        &["ip", "link", "set", "dev", b.ifname(), "address", new_mac],
    )
    .unwrap();
    // What a gratuitous ARP from the new hardware would do on the LB.
    t.exec(
        t.lb().ns(),
        &[
            "ip",
            "neigh",
            "replace",
            &b.ipv4().to_string(),
            "lladdr",
            new_mac,
            "dev",
            t.lb().ifname(),
            "nud",
            "reachable",
        ],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let vip_addr = SocketAddr::new(vip, PORT);
    let mut reached = false;
    while Instant::now() < deadline && !reached {
        reached = t
            .in_client(move || {
                HttpConn::connect(vip_addr, Duration::from_millis(500))
                    .and_then(|mut c| c.get("/"))
                    .is_ok_and(|r| r.text().trim() == "backend0")
            })
            .unwrap();
        if !reached {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(reached, "traffic reaches the backend at its new MAC");
    lbd::stop(&mut lbd).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
