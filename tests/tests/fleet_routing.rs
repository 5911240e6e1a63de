//! Self-test of the fleet harness (root only, no lbd): a router in front of
//! several LB nodes, VIP routes exchanged over BGP by BIRD with the shipped
//! configurations, ECMP on the router, and how fast the router follows a
//! node that announces, withdraws, crashes or goes silent. The measured times
//! are printed (`--nocapture` shows them).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    Bird, Host, Topology, addressing,
    bird::{self, Route},
    http_get, netns, udp_echo,
};
use lb_userspace::dataplane::AttachMode;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);
const HTTP: u16 = 8080;
const UDP: u16 = 9090;
/// Where the spread check's datagrams go (discard); dropped on arrival.
const SINK_PORT: u16 = 9;
const FLOWS: usize = 64;

fn vip4() -> IpAddr {
    addressing::vip_v4(1).into()
}

fn vip6() -> IpAddr {
    addressing::vip_v6(1).into()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

use lb_tests::{netns::assert_gone, process::pid_alive};

/// Both VIPs routed through `hosts`.
fn both_vips<'a>(hosts: impl IntoIterator<Item = &'a Host> + Clone) -> [Route; 2] {
    [
        Route::to_vip(vip4(), hosts.clone()),
        Route::to_vip(vip6(), hosts),
    ]
}

fn bird_parses(config: &str, what: &str) {
    let path = std::env::temp_dir().join(format!("lbt-{}-{what}.conf", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let out = Command::new("bird").arg("-p").arg("-c").arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let out = out.expect("cannot run bird (apt-get install bird2)");
    assert!(
        out.status.success(),
        "{what} does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_configs_parse() {
    for name in ["bird-lb.conf", "bird-router.conf"] {
        let conf = std::fs::read_to_string(bird::shipped_config(name)).unwrap();
        bird_parses(&conf, name);
    }
}

#[test]
fn define_lines_are_rewritten_strictly() {
    let conf = "define A = 1; # one\n  define B = 2;\ndefine AB = 3;\nx A = 4;\n";
    let out = bird::set_defines(conf, &[("A", "10".into()), ("B", "20".into())]).unwrap();
    assert_eq!(
        out,
        "define A = 10; # one\n  define B = 20;\ndefine AB = 3;\nx A = 4;\n"
    );
    assert!(bird::set_defines(conf, &[("C", "1".into())]).is_err());
    assert!(bird::set_defines("define A = 1;\ndefine A = 2;\n", &[("A", "3".into())]).is_err());
    assert!(bird::set_defines("define A = [\n 1 ];\n", &[("A", "3".into())]).is_err());

    let conf = "a\n# BEGIN\nold\n  # END\nb\n";
    let out = bird::replace_section(conf, "# BEGIN", "# END", "new\n").unwrap();
    assert_eq!(out, "a\n# BEGIN\nnew\n  # END\nb\n");
    assert!(bird::replace_section(conf, "# END", "# BEGIN", "").is_err());
}

#[test]
fn parses_ip_route_json() {
    let multipath = r#"[{"dst":"198.18.100.1","protocol":"bird","metric":32,"flags":[],
        "nexthops":[{"gateway":"198.18.0.2","dev":"eth0","weight":1,"flags":[]},
                    {"gateway":"198.18.0.4","dev":"eth0","weight":1,"flags":[]}]}]"#;
    let got = bird::parse_nexthops(multipath).unwrap();
    let want: BTreeSet<IpAddr> = ["198.18.0.2", "198.18.0.4"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(got, want);
    let single = r#"[{"dst":"fd00:198:18:100::1","gateway":"fd00:198:18::3","dev":"eth0",
        "protocol":"bird","metric":32,"flags":[],"pref":"medium"}]"#;
    let got = bird::parse_nexthops(single).unwrap();
    assert_eq!(got.len(), 1);
    assert!(got.contains(&"fd00:198:18::3".parse::<IpAddr>().unwrap()));
    let via = r#"[{"dst":"198.18.100.1","via":{"family":"inet6","host":"fd00:198:18::2"}}]"#;
    assert_eq!(bird::parse_nexthops(via).unwrap().len(), 1);
    assert!(bird::parse_nexthops("[]").unwrap().is_empty());
    assert!(bird::parse_nexthops("").unwrap().is_empty());
    assert!(
        bird::parse_nexthops(r#"[{"dev":"lo"}]"#)
            .unwrap()
            .is_empty()
    );
    assert!(bird::parse_nexthops("{").is_err());
    assert!(bird::parse_nexthops(r#"[{"gateway":"nope"}]"#).is_err());

    let protocols = "BIRD 2.0.12 ready.\n\
        Name       Proto      Table      State  Since         Info\n\
        device1    Device     ---        up     10:46:02.513  \n\
        lb0_4      BGP        ---        up     10:46:03.700  Established   \n\
        lb0_6      BGP        ---        start  10:46:02.513  Active        Socket: Connection refused\n";
    assert_eq!(
        bird::parse_bgp_sessions(protocols),
        vec![("lb0_4".to_owned(), true), ("lb0_6".to_owned(), false)]
    );
    let bfd = "BIRD 2.0.12 ready.\n\
        bfd1:\n\
        IP address                Interface  State      Since         Interval  Timeout\n\
        198.18.0.2                eth0       Up         06:33:20.756    0.100    0.300\n\
        fd00:198:18::2            eth0       Down       06:33:20.756    1.000    0.000\n";
    assert_eq!(bird::parse_bfd_up(bfd), 1);
}

#[test]
fn fleet_rejects_bad_sizes() {
    assert!(Topology::fleet(0, 1).is_err());
    assert!(Topology::fleet(addressing::MAX_LBS + 1, 0).is_err());
    assert!(Topology::fleet(1, addressing::MAX_BACKENDS + 1).is_err());
}

/// Addressing, wiring, the router's sysctls, and traffic from the client to
/// a backend and back, both through the router; all gone after drop.
#[test]
fn fleet_wiring_and_cleanup() {
    let t = Topology::fleet(2, 1).unwrap();
    let names = t.namespaces();
    assert_eq!(names.len(), 6, "{names:?}");

    let router = t.router();
    let client = t.client();
    assert_eq!(router.ipv4().to_string(), "198.18.0.1");
    assert_eq!(router.ipv6().to_string(), "fd00:198:18::1");
    assert_eq!(client.ipv4().to_string(), "198.18.1.10");
    assert_eq!(client.ipv6().to_string(), "fd00:198:18:1::10");
    assert_eq!(t.lbs().len(), 2);
    assert_eq!(t.lb(), t.lb_node(0));
    assert_eq!(t.lb_node(1).ipv4().to_string(), "198.18.0.3");
    assert_eq!(t.lb_node(1).name(), "lb1");
    assert_eq!(t.backend(0).ipv6().to_string(), "fd00:198:18::20");
    assert_eq!(t.hosts().count(), 5);

    // The client hangs off the router, everything else off the bridge.
    assert_eq!(client.peer_ns(), router.ns());
    assert_eq!(client.peer_ifname(), "eth1");
    let shown = t
        .exec(router.ns(), &["ip", "-br", "addr", "show", "eth1"])
        .unwrap();
    assert!(
        shown.contains("198.18.1.1/24") && shown.contains("fd00:198:18:1::1/64"),
        "{shown}"
    );
    for h in t.hosts().filter(|h| h.name() != "client") {
        assert_eq!(h.peer_ns(), t.fabric_ns());
        let port = t
            .exec(
                t.fabric_ns(),
                &["ip", "-d", "link", "show", h.peer_ifname()],
            )
            .unwrap();
        assert!(port.contains(&format!("master {}", t.bridge())), "{port}");
    }

    let sysctl = |ns: &str, key: &str| t.exec(ns, &["sysctl", "-n", key]).unwrap();
    assert_eq!(
        sysctl(router.ns(), "net.ipv4.fib_multipath_hash_policy").trim(),
        "3"
    );
    assert_eq!(
        sysctl(router.ns(), "net.ipv6.fib_multipath_hash_fields").trim(),
        "55"
    );
    assert_eq!(
        sysctl(router.ns(), "net.ipv6.conf.all.forwarding").trim(),
        "1"
    );
    assert_eq!(
        sysctl(router.ns(), "net.ipv4.conf.eth0.rp_filter").trim(),
        "0"
    );
    assert_eq!(
        sysctl(t.lb().ns(), "net.ipv6.conf.all.keep_addr_on_down").trim(),
        "1"
    );
    let routes = t.exec(t.backend(0).ns(), &["ip", "-6", "route"]).unwrap();
    assert!(routes.contains("default via fd00:198:18::1"), "{routes}");
    let lo = t
        .exec(t.lb_node(1).ns(), &["ip", "-br", "link", "show", "lo"])
        .unwrap();
    assert!(lo.contains("UNKNOWN") || lo.contains("UP"), "{lo}");

    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let mut servers = t.start_servers(HTTP, UDP).unwrap();
    let pid = servers[0].pid();
    let b0 = t.backend(0).clone();
    t.in_client(|| {
        for v6 in [false, true] {
            let addr = SocketAddr::new(b0.ip(v6), HTTP);
            assert_eq!(http_get(addr, "/", T).unwrap(), "backend0\n");
            let echo = udp_echo(SocketAddr::new(b0.ip(v6), UDP), b"hi", T).unwrap();
            assert_eq!(echo, b"backend0:hi");
        }
    })
    .unwrap();

    drop(t);
    assert_gone(&names);
    assert!(!servers[0].is_running() && !pid_alive(pid));
    servers.clear();
}

/// An nftables counter per family on every LB node for datagrams to the
/// VIPs' sink port, dropped there (no lbd: nobody would answer).
fn count_vip_datagrams(t: &Topology) {
    let rules = format!(
        "table inet fleet_spread {{
           counter v4 {{}}
           counter v6 {{}}
           chain pre {{
             type filter hook prerouting priority -300;
             ip daddr {} udp dport {SINK_PORT} counter name v4 drop
             ip6 daddr {} udp dport {SINK_PORT} counter name v6 drop
           }}
         }}",
        vip4(),
        vip6()
    );
    let path = std::env::temp_dir().join(format!("{}-spread.nft", t.id()));
    std::fs::write(&path, rules).unwrap();
    for lb in t.lbs() {
        t.exec(lb.ns(), &["nft", "-f", path.to_str().unwrap()])
            .unwrap();
    }
    let _ = std::fs::remove_file(&path);
}

/// (v4, v6) datagrams node `lb` counted.
fn vip_datagrams(t: &Topology, lb: &Host) -> (u64, u64) {
    let out = t.exec(lb.ns(), &["nft", "-j", "list", "counters"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut got = (0, 0);
    for c in v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("counter"))
    {
        let packets = c["packets"].as_u64().unwrap();
        match c["name"].as_str().unwrap() {
            "v4" => got.0 = packets,
            "v6" => got.1 = packets,
            _ => {}
        }
    }
    got
}

/// Sends one datagram from each of `FLOWS` client sockets (so `FLOWS`
/// source ports) to `vip`'s sink port.
fn send_flows(t: &Topology, vip: IpAddr) {
    let client = t.client().clone();
    t.in_client(|| {
        for _ in 0..FLOWS {
            let sock = UdpSocket::bind(SocketAddr::new(client.ip(vip.is_ipv6()), 0)).unwrap();
            sock.send_to(b"x", SocketAddr::new(vip, SINK_PORT)).unwrap();
        }
    })
    .unwrap();
}

fn totals(per_node: &[(u64, u64)]) -> (u64, u64) {
    per_node
        .iter()
        .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
}

/// The router spreads flows to a VIP over every node that announces it.
fn assert_flows_spread(t: &Topology) {
    count_vip_datagrams(t);
    send_flows(t, vip4());
    send_flows(t, vip6());
    let all = (FLOWS as u64, FLOWS as u64);
    let deadline = Instant::now() + T;
    let per_node = loop {
        let per_node: Vec<(u64, u64)> = t.lbs().iter().map(|lb| vip_datagrams(t, lb)).collect();
        if totals(&per_node) == all || Instant::now() >= deadline {
            break per_node;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("{FLOWS} flows per family over the nodes (v4, v6): {per_node:?}");
    assert_eq!(totals(&per_node), all, "{per_node:?}");
    // Three nodes, 64 flows per family: an empty node by chance has odds of
    // about 3e-11.
    assert!(
        per_node.iter().all(|&(v4, v6)| v4 > 0 && v6 > 0),
        "a node got no flows: {per_node:?}"
    );
}

/// The router's `show protocols` line for session `name`: its state and, once
/// down, why.
fn session_info(router: &Bird, name: &str) -> String {
    let out = router.birdc(&["show", "protocols", name]).unwrap();
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no session {name}: {out}"))
        .to_owned()
}

/// Takes `lb`'s link down: the node goes silent without closing anything.
fn silence(lb: &Host) {
    netns::ip(lb.ns(), &["link", "set", lb.ifname(), "down"]).unwrap();
}

#[test]
fn bgp_ecmp_follows_vip_routes() {
    let t = Topology::fleet(3, 1).unwrap();
    let names = t.namespaces();
    let [lb0, lb1, lb2] = [t.lb_node(0), t.lb_node(1), t.lb_node(2)];

    let start = Instant::now();
    let router = Bird::start_router(&t, true).unwrap();
    let mut lbs: Vec<Bird> = (0..3).map(|i| Bird::start_lb(&t, i).unwrap()).collect();
    let started = start.elapsed();
    router.wait_established(T).unwrap();
    for b in &lbs {
        b.wait_established(T).unwrap();
    }
    let established = start.elapsed();
    router.wait_bfd_up(6, T).unwrap();
    let bfd_up = start.elapsed();
    eprintln!(
        "4 BIRDs started in {}; all 6 BGP sessions established {} and their BFD \
         sessions up {} after the first start",
        ms(started),
        ms(established),
        ms(bfd_up)
    );
    let pids: Vec<u32> = lbs.iter().map(Bird::pid).chain([router.pid()]).collect();
    let sockets: Vec<_> = lbs
        .iter()
        .chain([&router])
        .map(|b| b.socket().to_owned())
        .collect();

    // A subnet in the VIP table must stay on the node: only host routes go.
    let stray = format!("{}/28", addressing::vip_v4(0));
    let table = bird::VIP_TABLE.to_string();
    netns::ip(
        lb0.ns(),
        &[
            "route", "add", &stray, "dev", "lo", "table", &table, "proto", "static",
        ],
    )
    .unwrap();

    let at = Instant::now();
    for lb in t.lbs() {
        bird::add_vip_route(lb, vip4()).unwrap();
        bird::add_vip_route(lb, vip6()).unwrap();
    }
    let added = at.elapsed();
    let took = bird::wait_routes(&t, &both_vips(t.lbs()), at, T).unwrap();
    eprintln!(
        "announce (VIP routes added on 3 nodes, which took {}) -> 3 next hops: v4 {}, v6 {}",
        ms(added),
        ms(took[0]),
        ms(took[1])
    );
    let exported = lbs[0]
        .birdc(&["show", "route", "export", "router4"])
        .unwrap();
    assert!(exported.contains(&format!("{}/32", vip4())), "{exported}");
    assert!(!exported.contains(&stray), "{exported}");
    assert!(bird::router_nexthops(&t, &stray).unwrap().is_empty());
    // Nothing from the router reaches a node's kernel.
    let learned = t
        .exec(
            lb0.ns(),
            &["ip", "route", "show", "table", "all", "proto", "bird"],
        )
        .unwrap();
    assert!(learned.trim().is_empty(), "{learned}");

    assert_flows_spread(&t);

    let at = Instant::now();
    bird::delete_vip_route(lb1, vip4()).unwrap();
    bird::delete_vip_route(lb1, vip6()).unwrap();
    let took = bird::wait_routes(&t, &both_vips([lb0, lb2]), at, T).unwrap();
    eprintln!(
        "withdraw (VIP routes deleted on 1 node) -> 2 next hops: v4 {}, v6 {}",
        ms(took[0]),
        ms(took[1])
    );

    let at = Instant::now();
    lbs[2].kill().unwrap();
    let took = bird::wait_routes(&t, &both_vips([lb0]), at, T).unwrap();
    eprintln!(
        "crash (SIGKILL of a node's BIRD; its TCP sessions close) -> 1 next hop: v4 {}, v6 {}",
        ms(took[0]),
        ms(took[1])
    );
    assert!(took.iter().all(|d| *d < Duration::from_secs(1)), "{took:?}");
    // The kernel closing the dead BIRD's connections told the router, not
    // BFD: a FIN, or a RST if a message was still unread.
    let why = session_info(&router, "lb2_4");
    assert!(
        why.contains("Connection closed") || why.contains("Connection reset"),
        "{why}"
    );

    let at = Instant::now();
    silence(lb0);
    let took = bird::wait_routes(&t, &both_vips([]), at, T).unwrap();
    eprintln!(
        "silence (a node's link down; BFD 100 ms x 3) -> no route: v4 {}, v6 {}",
        ms(took[0]),
        ms(took[1])
    );
    assert!(took.iter().all(|d| *d < Duration::from_secs(1)), "{took:?}");
    for name in ["lb0_4", "lb0_6"] {
        let why = session_info(&router, name);
        assert!(why.contains("BFD session down"), "{why}");
    }

    drop(lbs);
    drop(router);
    drop(t);
    assert_gone(&names);
    for pid in pids {
        assert!(!pid_alive(pid), "bird {pid} still running");
    }
    for s in sockets {
        assert!(!s.parent().unwrap().exists(), "{} left behind", s.display());
    }
}

/// Without BFD only the BGP hold time (3 s, which BIRD shortens at random by
/// up to a quarter) notices a silent node: the figure BFD is there to beat.
/// BIRD flushes the node's routes only once it has handed its NOTIFICATION
/// to the dead peer's socket, which took up to 0.6 s more in our runs.
#[test]
fn silent_node_without_bfd_waits_for_hold_time() {
    let t = Topology::fleet(2, 0).unwrap();
    let router = Bird::start_router(&t, false).unwrap();
    let lbs: Vec<Bird> = (0..2).map(|i| Bird::start_lb(&t, i).unwrap()).collect();
    router.wait_established(T).unwrap();
    for lb in t.lbs() {
        bird::add_vip_route(lb, vip4()).unwrap();
    }
    let all = [Route::to_vip(vip4(), t.lbs())];
    bird::wait_routes(&t, &all, Instant::now(), T).unwrap();

    let at = Instant::now();
    silence(t.lb_node(1));
    let left = [Route::to_vip(vip4(), [t.lb_node(0)])];
    let took = bird::wait_routes(&t, &left, at, T).unwrap();
    eprintln!(
        "silence without BFD (hold time 3 s, keepalive 1 s) -> 1 next hop: {}",
        ms(took[0])
    );
    assert!(
        took[0] > Duration::from_secs(1),
        "{took:?}: faster than the hold time?"
    );
    let why = session_info(&router, "lb1_4");
    assert!(why.contains("Hold timer expired"), "{why}");
    drop(lbs);
}
