//! Self-test of the topology harness (root only): wiring, servers, clients,
//! and cleanup on drop, on panic and after a killed run.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use lb_tests::{
    HttpConn, NS_PREFIX, Topology, addressing, cleanup_stale, http_get, in_netns, netns, udp_echo,
};

const HTTP: u16 = 8080;
const UDP: u16 = 9090;
const T: Duration = Duration::from_secs(5);

use lb_tests::{netns::assert_gone, process::pid_alive};

#[test]
fn two_backends_reachable_and_cleaned_up() {
    let topo = Topology::new(2).unwrap();
    let names = topo.namespaces();
    assert_eq!(names.len(), 5, "{names:?}");

    // Addressing and accessors.
    assert_eq!(topo.client().ipv4().to_string(), "198.18.0.10");
    assert_eq!(topo.lb().ipv6().to_string(), "fd00:198:18::2");
    let b0 = topo.backend(0).clone();
    assert_eq!(b0.ipv4().to_string(), "198.18.0.20");
    assert_eq!(b0.ipv6().to_string(), "fd00:198:18::20");
    assert_eq!(b0.ifname(), "eth0");
    for h in topo.hosts() {
        assert!(h.peer_ifname().len() <= 15);
        assert_ne!(h.mac(), [0; 6]);
        let shown = topo
            .exec(h.ns(), &["ip", "-br", "link", "show", "eth0"])
            .unwrap();
        assert!(shown.contains(&h.mac_string()), "{shown}");
        // The peer is a port of the bridge in the fabric namespace.
        let port = topo
            .exec(
                topo.fabric_ns(),
                &["ip", "-d", "link", "show", h.peer_ifname()],
            )
            .unwrap();
        assert!(
            port.contains(&format!("master {}", topo.bridge())),
            "{port}"
        );
        assert!(port.contains("mtu 1500"), "{port}");
    }
    let routes = topo
        .exec(topo.client().ns(), &["ip", "-6", "route"])
        .unwrap();
    assert!(
        routes.contains("fd00:198:18:100::/64 via fd00:198:18::2"),
        "{routes}"
    );

    let mut servers = topo.start_servers(HTTP, UDP).unwrap();
    let pids: Vec<u32> = servers.iter().map(|s| s.pid()).collect();

    topo.in_client(|| {
        for v6 in [false, true] {
            for (i, b) in topo.backends().iter().enumerate() {
                let addr = SocketAddr::new(b.ip(v6), HTTP);
                assert_eq!(http_get(addr, "/", T).unwrap(), format!("backend{i}\n"));
                let echo = udp_echo(SocketAddr::new(b.ip(v6), UDP), b"hello", T).unwrap();
                assert_eq!(echo, format!("backend{i}:hello").as_bytes());
            }
            let addr = SocketAddr::new(b0.ip(v6), HTTP);
            assert_eq!(http_get(addr, "/health", T).unwrap(), "ok");
            // Keep-alive: several requests over one connection.
            let mut conn = HttpConn::connect(addr, T).unwrap();
            for _ in 0..3 {
                assert_eq!(conn.get("/").unwrap().text(), "backend0\n");
            }
            assert!(conn.is_open());
        }
        let stats = http_get(SocketAddr::new(b0.ip(false), HTTP), "/stats", T).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(stats["http_requests"], 8);
        assert_eq!(stats["udp_datagrams"], 2);
    })
    .unwrap();

    // Stopping one server through its handle works while the topology lives.
    assert!(servers[1].is_running());
    servers[1].stop();
    assert!(!servers[1].is_running());

    drop(topo);
    assert_gone(&names);
    // The topology stopped the server still held by `servers`.
    assert!(!servers[0].is_running());
    assert!(!pid_alive(pids[0]));
    drop(servers);
}

/// Routing a VIP straight to a backend (what the LB's l2dsr mode does with
/// MAC rewriting) must reach the servers bound to the wildcard address, and
/// replies must come from the VIP: TCP does that by itself, UDP needs the
/// server's pktinfo handling, which this checks through the client's
/// connected socket.
#[test]
fn backend_answers_from_vip() {
    let topo = Topology::new(1).unwrap();
    let names = topo.namespaces();
    let b0 = topo.backend(0);
    let vips: [IpAddr; 2] = [addressing::vip_v4(7).into(), addressing::vip_v6(7).into()];
    for vip in vips {
        topo.add_vip_on_backends(vip).unwrap();
        // Idempotent.
        topo.add_vip_on_backends(vip).unwrap();
        let (family, via) = if vip.is_ipv6() {
            ("-6", b0.ip(true))
        } else {
            ("-4", b0.ip(false))
        };
        let host = format!("{vip}/{}", addressing::host_prefix_len(vip));
        topo.exec(
            topo.client().ns(),
            &["ip", family, "route", "add", &host, "via", &via.to_string()],
        )
        .unwrap();
    }
    let sysctl = topo
        .exec(b0.ns(), &["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"])
        .unwrap();
    assert_eq!(sysctl.trim(), "1");
    let _servers = topo.start_servers(HTTP, UDP).unwrap();
    topo.in_client(|| {
        for vip in vips {
            assert_eq!(
                http_get(SocketAddr::new(vip, HTTP), "/", T).unwrap(),
                "backend0\n"
            );
            let echo = udp_echo(SocketAddr::new(vip, UDP), b"x", T).unwrap();
            assert_eq!(echo, b"backend0:x");
        }
    })
    .unwrap();
    drop(topo);
    assert_gone(&names);
}

#[test]
fn cleanup_after_panic() {
    let mut names = Vec::new();
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new(1).unwrap();
        names = topo.namespaces();
        let servers = topo.start_servers(HTTP, UDP).unwrap();
        pid = servers[0].pid();
        // A panic inside a namespace thread reaches the test too.
        topo.in_client(|| panic!("boom inside the client namespace"))
            .unwrap();
        unreachable!("in_client must pass the panic on");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 4);
    assert_gone(&names);
    assert!(pid != 0 && !pid_alive(pid), "server {pid} still running");
}

#[test]
fn in_netns_sees_only_that_namespace() {
    let topo = Topology::new(0).unwrap();
    let lb = topo.lb().clone();
    // setns switches the thread's network namespace only (hence
    // thread-self: /proc/net follows the main thread).
    let (links, addr_ok) = in_netns(lb.ns(), || {
        let links = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        let sock = std::net::UdpSocket::bind((lb.ipv4(), 0));
        (links, sock.is_ok())
    })
    .unwrap();
    assert!(links.contains("eth0:"), "{links}");
    assert!(addr_ok, "cannot bind the LB's address inside its namespace");
    assert!(std::net::UdpSocket::bind((lb.ipv4(), 0)).is_err());
    assert!(in_netns("lbt-no-such-namespace", || ()).is_err());
    // exec failures carry the command line.
    let err = topo.exec(lb.ns(), &["false"]).unwrap_err().to_string();
    assert!(err.contains("false"), "{err}");
}

#[test]
fn cleanup_stale_removes_dead_runs_only() {
    // A pid that certainly belonged to a process that is gone by now.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("{NS_PREFIX}{dead}x0-stale");
    netns::create(&stale).unwrap();
    // A live run (ours) must survive.
    let topo = Topology::new(0).unwrap();
    cleanup_stale(NS_PREFIX).unwrap();
    if pid_alive(dead) {
        // The pid was reused at once; nothing to assert but clean up.
        netns::delete(&stale);
        return;
    }
    // Checked in the list rather than in what cleanup_stale returned: a
    // test running in parallel may have swept it first.
    let left = netns::list().unwrap();
    assert!(!left.contains(&stale));
    for ns in topo.namespaces() {
        assert!(left.contains(&ns), "{ns} of a live run was removed");
    }
}
