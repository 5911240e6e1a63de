//! `lbd` in the backend role, in a backend's namespace: it puts its VIPs on
//! `lo` (leaving an address that was already there alone), applies the DSR
//! sysctls, attaches `decap`, decapsulates ipip, 6in6 and GUE on the default
//! port for its VIPs only (the test server answers the client directly),
//! counts per VIP and family in `lbctl list` and `/metrics`, survives a
//! restart (decapsulating while it is down, counters kept), reloads its
//! VIPs, refuses balancer commands by naming its role, has the kernel
//! resolve the second hops the data plane asks about that
//! `decap.second_hops` allows (and forgets them again), and `lbctl
//! teardown` removes exactly what it added and restores the sysctls.
//!
//! Encapsulated packets are written here (the kernel adds the outer header
//! to what a raw socket sends) from the LB's namespace, with the client as
//! the inner source, so replies prove the decapsulated packet reached the
//! service and left for the client.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    decap::{DecapHop, NeighKey},
    testframe::{self, FrameSpec},
};
use lb_tests::{
    Topology, addressing,
    backend_role::{BackendLbd, Options},
    lbctl_output, lbd_path, scrape,
};
use lb_userspace::backend_role::{
    dataplane::{self, key_of},
    status::{BackendRoleStatus, HopState, OnLo},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const UDP: u16 = 53;
const HTTP: u16 = 80;
const METRICS: &str = "127.0.0.1:9101";
const WAIT: Duration = Duration::from_secs(3);

/// The sysctls the role sets, with values it does not want: a teardown
/// must bring these back exactly.
const BEFORE: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.arp_ignore", "0"),
    ("net.ipv4.conf.all.arp_announce", "0"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.eth0.rp_filter", "1"),
];

fn sysctl(t: &Topology, ns: &str, key: &str) -> String {
    t.exec(ns, &["sysctl", "-n", key])
        .unwrap()
        .trim()
        .to_owned()
}

/// Every address on `lo` in `ns`, as `ADDRESS/PREFIX`.
fn lo_addresses(t: &Topology, ns: &str) -> Vec<String> {
    let out = t
        .exec(ns, &["ip", "-j", "addr", "show", "dev", "lo"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The XDP program id the kernel reports on `eth0` in `ns` (0: none).
fn xdp_program(t: &Topology, ns: &str) -> u64 {
    let out = t
        .exec(ns, &["ip", "-j", "-d", "link", "show", "dev", "eth0"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["xdp"]["prog"]["id"].as_u64().unwrap_or(0)
}

fn status(socket: &Path) -> BackendRoleStatus {
    let (code, out, err) = lbctl_output(socket, &["list", "--json"]).unwrap();
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// An IP datagram (no Ethernet header) with a UDP payload.
fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut spec = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            FrameSpec::v4_udp(s.octets(), d.octets(), src.port(), dst.port())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            FrameSpec::v6_udp(s.octets(), d.octets(), src.port(), dst.port())
        }
        _ => panic!("one family per datagram"),
    };
    spec.payload = payload.to_vec();
    testframe::build(&spec)[14..].to_vec()
}

/// How the LB side wraps a datagram for the backend.
#[derive(Clone, Copy, Debug)]
enum Tunnel {
    /// IPv4 or IPv6 outer header, protocol 4 or 41 after the inner family.
    Ipip,
    /// UDP to the GUE port, a 4-byte GUE header.
    Gue(u16),
}

/// Sends `inner` to backend address `to` from the LB's namespace.
fn send(t: &Topology, to: IpAddr, tunnel: Tunnel, inner: Vec<u8>) {
    let inner_v6 = inner[0] >> 4 == 6;
    t.in_ns(t.lb().ns(), move || {
        let domain = if to.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let proto = if inner_v6 { 41 } else { 4 };
        match tunnel {
            Tunnel::Ipip => {
                let s = Socket::new(domain, Type::RAW, Some(Protocol::from(proto))).unwrap();
                s.send_to(&inner, &SockAddr::from(SocketAddr::new(to, 0)))
                    .unwrap();
            }
            Tunnel::Gue(port) => {
                let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).unwrap();
                let mut payload = vec![0, proto as u8, 0, 0];
                payload.extend_from_slice(&inner);
                s.send_to(&payload, &SockAddr::from(SocketAddr::new(to, port)))
                    .unwrap();
            }
        }
    })
    .unwrap();
}

/// A UDP socket in the client's namespace on `port`, both families.
fn client_socket(t: &Topology, v6: bool, port: u16) -> UdpSocket {
    t.in_client(move || {
        let local: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        let s = UdpSocket::bind(local).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    })
    .unwrap()
}

/// Sends `payload` from the client's address and `port` to `vip` through
/// `tunnel` to backend 0, and returns what the service answered the client.
fn echo(t: &Topology, vip: IpAddr, tunnel: Tunnel, port: u16, payload: &[u8]) -> String {
    let b0 = t.backend(0);
    let v6 = vip.is_ipv6();
    let rx = client_socket(t, v6, port);
    let src = SocketAddr::new(t.client().ip(v6), port);
    let inner = udp_datagram(src, SocketAddr::new(vip, UDP), payload);
    // The outer family: IPv6 for 6in6, else IPv4 (4in4, GUE over IPv4).
    let outer_v6 = v6 && matches!(tunnel, Tunnel::Ipip);
    send(t, b0.ip(outer_v6), tunnel, inner);
    let mut buf = [0u8; 2048];
    let (n, from) = rx
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from {vip} through {tunnel:?}: {e}"));
    assert_eq!(
        from,
        SocketAddr::new(vip, UDP),
        "the answer comes from the VIP"
    );
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn wait_until(what: &str, ok: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(10), ok)
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn backend_role_serves_restarts_reloads_and_tears_down() {
    let t = Topology::new(1).unwrap();
    let _servers = t.start_servers(HTTP, UDP).unwrap();
    let b0 = t.backend(0);
    let ns = b0.ns();
    for (key, value) in BEFORE {
        t.exec(ns, &["sysctl", "-q", "-w", &format!("{key}={value}")])
            .unwrap();
    }
    let vip4: IpAddr = addressing::vip_v4(1).into();
    let vip6: IpAddr = addressing::vip_v6(1).into();
    // Already there: lbd must neither add nor remove it.
    let theirs: IpAddr = addressing::vip_v6(7).into();
    t.exec(
        ns,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{theirs}/128"),
            "dev",
            "lo",
        ],
    )
    .unwrap();
    let name = format!("{}r0", t.instance_name());
    let files = BackendLbd::files(
        &t,
        b0,
        &name,
        Options {
            on_exit: "keep".into(),
            metrics_listen: Some(METRICS.into()),
            ..Options::default()
        },
    );
    let (mut b, ready) = BackendLbd::start(&t, files, &[vip4, vip6, theirs]).unwrap();
    let socket = b.socket();
    assert!(ready.contains("\"adopted\":false"), "{ready}");
    assert!(ready.contains("\"mode\":\"generic\""), "{ready}");
    assert!(ready.contains("\"role\":\"backend\""), "{ready}");

    // The host as the role leaves it.
    let lo = lo_addresses(&t, ns);
    for want in [
        format!("{vip4}/32"),
        format!("{vip6}/128"),
        format!("{theirs}/128"),
    ] {
        assert!(lo.contains(&want), "{want} on lo: {lo:?}");
    }
    for (key, want) in [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
    ] {
        assert_eq!(sysctl(&t, ns, key), want, "{key}");
    }
    let s = status(&socket);
    let xdp = s.xdp.as_ref().expect("decap attached");
    assert!(xdp.ours, "{xdp:?}");
    assert_eq!(xdp.mode, "generic");
    assert_eq!(xdp_program(&t, ns), u64::from(xdp.program_id));
    assert_eq!(s.gue_port, 6080, "GUE on the default port");
    let on_lo: Vec<(IpAddr, OnLo)> = s.vips.iter().map(|v| (v.vip, v.on_lo)).collect();
    assert_eq!(
        on_lo,
        [
            (vip4, OnLo::Added),
            (vip6, OnLo::Added),
            (theirs, OnLo::Present)
        ]
    );
    let (code, text, _) = lbctl_output(&socket, &["list"]).unwrap();
    assert_eq!(code, 0);
    assert!(
        text.starts_with(&format!(
            "{name} (backend role) on eth0: decap attached, generic"
        )),
        "{text}"
    );

    // Traffic: each tunnel reaches the service, which answers the client
    // from the VIP.
    assert_eq!(echo(&t, vip4, Tunnel::Ipip, 40001, b"a"), "backend0:a");
    assert_eq!(echo(&t, vip6, Tunnel::Ipip, 40002, b"b"), "backend0:b");
    assert_eq!(echo(&t, vip4, Tunnel::Gue(6080), 40003, b"c"), "backend0:c");
    assert_eq!(echo(&t, vip6, Tunnel::Gue(6080), 40004, b"d"), "backend0:d");
    // Not a VIP of this backend: dropped and counted.
    let stranger = SocketAddr::new(addressing::vip_v4(99).into(), UDP);
    let src = SocketAddr::new(t.client().ip(false), 40005);
    send(
        &t,
        b0.ip(false),
        Tunnel::Ipip,
        udp_datagram(src, stranger, b"e"),
    );
    let s = status(&socket);
    let traffic = |s: &BackendRoleStatus, vip: IpAddr| {
        let v = s.vips.iter().find(|v| v.vip == vip).unwrap();
        (v.ipv4.packets, v.ipv6.packets)
    };
    assert_eq!(traffic(&s, vip4), (2, 0), "ipip and GUE over IPv4");
    assert_eq!(traffic(&s, vip6), (1, 1), "GUE over IPv4, 6in6");
    wait_until("drop_not_vip", || {
        status(&socket).drops["drop_not_vip"] == 1
    });
    let metrics = scrape::scrape_in(ns, METRICS).unwrap();
    for (name, labels, want) in [
        (
            "lb_decap_packets_total",
            format!("vip=\"{vip4}\",family=\"ipv4\""),
            2,
        ),
        (
            "lb_decap_packets_total",
            format!("vip=\"{vip6}\",family=\"ipv6\""),
            1,
        ),
        (
            "lb_decap_events_total",
            "event=\"drop_not_vip\"".to_owned(),
            1,
        ),
        (
            "lb_decap_events_total",
            "event=\"decapsulated\"".to_owned(),
            4,
        ),
        ("lb_decap_vip_on_lo", format!("vip=\"{theirs}\""), 1),
        ("lb_decap_attached", "interface=\"eth0\"".to_owned(), 1),
    ] {
        assert_eq!(
            scrape::sample(&metrics, name, &labels),
            Some(want),
            "{name}{{{labels}}}:\n{metrics}"
        );
    }
    let bytes = scrape::sample(
        &metrics,
        "lb_decap_bytes_total",
        &format!("vip=\"{vip4}\",family=\"ipv4\""),
    )
    .unwrap();
    assert!(bytes > 2 * 28, "frame bytes counted: {bytes}");

    // Restart: decapsulation goes on while lbd is away; the next one adopts
    // the running program and maps, counters included.
    let (_, exit) = b.stop().unwrap();
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}");
    assert!(dataplane::is_attached(&dataplane::pin_dir(&name)));
    assert!(lo_addresses(&t, ns).contains(&format!("{vip4}/32")));
    assert_eq!(echo(&t, vip4, Tunnel::Ipip, 40006, b"f"), "backend0:f");
    let ready = b.start_again(&t).unwrap();
    assert!(ready.contains("\"adopted\":true"), "{ready}");
    let s = status(&socket);
    assert!(s.adopted);
    assert!(s.xdp.as_ref().is_some_and(|x| x.ours), "{:?}", s.xdp);
    assert_eq!(
        traffic(&s, vip4),
        (3, 0),
        "counters kept across the restart"
    );
    assert_eq!(s.drops["drop_not_vip"], 1);

    // Balancer commands name the role.
    let (code, _, err) = lbctl_output(
        &socket,
        &["add-backend", "198.18.100.1:80/tcp", "198.18.0.21"],
    )
    .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("runs the backend role") && err.contains("`lbctl add-backend`"),
        "{err}"
    );

    // Reload: one VIP in, one out; a bad file changes nothing.
    let vip4b: IpAddr = addressing::vip_v4(2).into();
    std::fs::write(
        b.config(),
        b.files
            .render(&[vip4, vip4b, theirs])
            .replace("vips", "vip"),
    )
    .unwrap();
    let (code, _, err) = lbctl_output(&socket, &["reload"]).unwrap();
    assert_eq!(code, 1, "a bad file is refused");
    assert!(
        err.contains("backend.toml:") && err.contains("nothing was changed"),
        "{err}"
    );
    b.files.write(&[vip4, vip4b, theirs]).unwrap();
    let (code, out, err) = lbctl_output(&socket, &["reload"]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("+ {vip4b}\n- {vip6}\n"));
    let lo = lo_addresses(&t, ns);
    assert!(lo.contains(&format!("{vip4b}/32")), "{lo:?}");
    assert!(!lo.contains(&format!("{vip6}/128")), "{lo:?}");
    assert_eq!(echo(&t, vip4b, Tunnel::Ipip, 40007, b"g"), "backend0:g");

    // Teardown: everything lbd added goes, nothing else; sysctls back.
    let (code, out, err) = lbctl_output(&socket, &["teardown"]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("decap detached and unpinned"), "{out}");
    assert!(out.contains("5 sysctls restored"), "{out}");
    wait_until("lbd to exit", || !b.lbd.is_running());
    let lo = lo_addresses(&t, ns);
    for gone in [format!("{vip4}/32"), format!("{vip4b}/32")] {
        assert!(!lo.contains(&gone), "{gone} still on lo: {lo:?}");
    }
    assert!(lo.contains(&format!("{theirs}/128")), "{lo:?}");
    for (key, value) in BEFORE {
        assert_eq!(&sysctl(&t, ns, key), value, "{key} restored");
    }
    assert_eq!(xdp_program(&t, ns), 0, "decap detached");
    assert!(!Path::new(&format!("/sys/fs/bpf/{name}")).exists());
    assert!(!b.files.state_file().exists());
    assert!(!b.files.sysctl_backup().exists());
}

/// Second hops: an address inside `decap.second_hops` that the data plane
/// queues in `DECAP_NEIGH` gets a managed neighbour entry and its next hop
/// in `DECAP_HOPS`; one without a route is written as unreachable, and so
/// is one outside the list, which gets no neighbour entry at all. A second
/// hop the map's LRU evicts is forgotten and the neighbour lbd created for
/// it deleted; a reload narrowing the list refuses what falls outside.
/// `lbd --teardown`, after lbd has gone, undoes everything from the state
/// file: the neighbour entry lbd created is deleted, the one that was
/// there before keeps existing, without the managed flag.
#[test]
fn second_hops_are_resolved_by_the_kernel() {
    let t = Topology::new(3).unwrap();
    let (b0, b1, b2) = (t.backend(0), t.backend(1), t.backend(2));
    let ns = b0.ns();
    let reachable4: IpAddr = b1.ipv4().into();
    let reachable6: IpAddr = b1.ipv6().into();
    let other: IpAddr = b2.ipv4().into();
    // On the segment, but not listed: nobody may make lbd solicit it.
    let stranger: IpAddr = Ipv4Addr::new(198, 18, 0, 99).into();
    // Listed, but routed nowhere in the backend's namespace.
    let nowhere: IpAddr = Ipv4Addr::new(198, 19, 5, 5).into();
    let neigh = |a: IpAddr| {
        t.exec(
            ns,
            &["ip", "-d", "neigh", "show", &a.to_string(), "dev", "eth0"],
        )
        .unwrap()
    };
    // backend1's IPv4 entry was there before lbd; the others were not.
    t.exec(
        ns,
        &[
            "ip",
            "neigh",
            "replace",
            &reachable4.to_string(),
            "lladdr",
            &b1.mac_string(),
            "dev",
            "eth0",
            "nud",
            "stale",
        ],
    )
    .unwrap();
    for a in [reachable6, other, stranger] {
        let _ = t.exec(ns, &["ip", "neigh", "del", &a.to_string(), "dev", "eth0"]);
    }
    let name = format!("{}r0", t.instance_name());
    let listed = |also: &[&str]| -> Vec<String> {
        let mut l = vec![
            reachable4.to_string(),
            format!("{other}/32"),
            "fd00:198:18::/64".to_owned(),
        ];
        l.extend(also.iter().map(|s| (*s).to_owned()));
        l
    };
    let files = BackendLbd::files(
        &t,
        b0,
        &name,
        Options {
            on_exit: "keep".into(),
            second_hops: Some(listed(&["198.19.5.0/24"])),
            ..Options::default()
        },
    );
    let vip: IpAddr = addressing::vip_v4(1).into();
    let (mut b, _) = BackendLbd::start(&t, files, &[vip]).unwrap();
    let dir = dataplane::pin_dir(&name);
    let mut queue: HashMap<MapData, NeighKey, u64> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(dir.join(dataplane::DECAP_NEIGH)).unwrap(),
    ))
    .unwrap();
    let mut hops: HashMap<MapData, NeighKey, DecapHop> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(dir.join(dataplane::DECAP_HOPS)).unwrap(),
    ))
    .unwrap();
    // What the data plane does when it finds no next hop.
    let all = [reachable4, reachable6, other, stranger, nowhere];
    for a in all {
        queue.insert(key_of(a), 1, 0).unwrap();
    }
    wait_until("every second hop handled", || {
        [reachable4, reachable6, other]
            .iter()
            .all(|a| hops.get(&key_of(*a), 0).is_ok_and(|h| h.ifindex != 0))
            && hops.get(&key_of(stranger), 0).is_ok()
            && hops.get(&key_of(nowhere), 0).is_ok()
            && queue.keys().next().is_none()
    });
    for (a, host) in [(reachable4, b1), (reachable6, b1), (other, b2)] {
        let hop = hops.get(&key_of(a), 0).unwrap();
        assert_eq!(hop.dmac, host.mac(), "{a}'s MAC");
        assert_eq!(hop.smac, b0.mac(), "from backend0's eth0");
        assert!(neigh(a).contains("managed"), "{a}: {}", neigh(a));
    }
    for a in [stranger, nowhere] {
        assert_eq!(
            hops.get(&key_of(a), 0).unwrap().ifindex,
            0,
            "{a} unreachable"
        );
    }
    assert_eq!(
        neigh(stranger).trim(),
        "",
        "nothing solicited for {stranger}"
    );
    let s = status(&b.socket());
    let states: Vec<(IpAddr, HopState)> = s
        .second_hops
        .hops
        .iter()
        .map(|h| (h.addr, h.state))
        .collect();
    assert_eq!(
        states,
        [
            (reachable4, HopState::Resolved),
            (other, HopState::Resolved),
            (stranger, HopState::Refused),
            (nowhere, HopState::NoRoute),
            (reachable6, HopState::Resolved),
        ]
    );
    assert_eq!((s.second_hops.requests, s.second_hops.failures), (5, 2));
    assert_eq!(
        s.second_hops.allowed,
        [
            "198.18.0.21/32",
            "198.18.0.22/32",
            "fd00:198:18::/64",
            "198.19.5.0/24"
        ]
    );
    let created: Vec<(IpAddr, bool)> = s
        .second_hops
        .managed
        .iter()
        .map(|m| (m.via, m.created))
        .collect();
    assert_eq!(
        created,
        [(reachable4, false), (other, true), (reachable6, true)],
        "backend1's IPv4 entry was there before"
    );

    // The LRU evicts backend1's IPv6 address: lbd forgets it and deletes
    // the neighbour entry it made for it.
    hops.remove(&key_of(reachable6)).unwrap();
    wait_for(
        "the evicted second hop's neighbour released",
        Duration::from_secs(20),
        || {
            let s = status(&b.socket());
            s.second_hops.managed.len() == 2
                && s.second_hops.hops.iter().all(|h| h.addr != reachable6)
        },
    );
    assert!(
        !neigh(reachable6).contains("managed"),
        "{}",
        neigh(reachable6)
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.files.state_file()).unwrap()).unwrap();
    assert_eq!(
        state["managed_neighbors"].as_array().map(Vec::len),
        Some(2),
        "the state file follows: {state}"
    );

    // A reload narrowing the list: what falls outside is refused.
    b.files.options.second_hops = Some(listed(&[]));
    b.files.serve(&[vip]).unwrap();
    let s = status(&b.socket());
    let refused = s
        .second_hops
        .hops
        .iter()
        .find(|h| h.addr == nowhere)
        .unwrap();
    assert_eq!(refused.state, HopState::Refused);
    assert_eq!(hops.get(&key_of(nowhere), 0).unwrap().ifindex, 0);
    assert_eq!(s.second_hops.allowed.len(), 3);

    drop((queue, hops));
    b.stop().unwrap();
    let (lbd, config) = (lbd_path().unwrap(), b.config());
    let out = t
        .in_ns(ns, move || {
            Command::new(lbd)
                .arg("--config")
                .arg(config)
                .arg("--teardown")
                .output()
                .unwrap()
        })
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in [
        "decap detached and unpinned",
        "removed from lo: 198.18.100.1",
        "1 managed neighbour entries removed",
        "1 neighbour entries there before lbd kept (managed flag cleared)",
        "5 sysctls restored",
    ] {
        assert!(said.contains(part), "{part}: {said}");
    }
    assert!(!dir.exists());
    assert_eq!(xdp_program(&t, ns), 0);
    assert!(!lo_addresses(&t, ns).contains(&format!("{vip}/32")));
    assert!(!neigh(other).contains("managed"), "{}", neigh(other));
    let before = neigh(reachable4);
    assert!(
        before.contains(&b1.mac_string()) && !before.contains("managed"),
        "backend1's entry stays, unmanaged: {before}"
    );
}

/// `lbd --check` validates a backend file without touching anything, and
/// names the file, line and field of a mistake.
#[test]
fn check_validates_a_backend_file() {
    let dir = std::env::temp_dir().join(format!("lbt-backend-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("backend.toml");
    let good = "role = \"backend\"\n[instance]\nname = \"web1\"\ninterface = \"eth0\"\n\
                [decap]\nvips = [\"198.18.100.1\"]\n";
    std::fs::write(&file, good).unwrap();
    let out = Command::new(lbd_path().unwrap())
        .arg("--config")
        .arg(&file)
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (backend role, 1 VIPs)"));
    std::fs::write(&file, good.replace("198.18.100.1", "198.18.100.1/32")).unwrap();
    let out = Command::new(lbd_path().unwrap())
        .arg("--config")
        .arg(&file)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:6:9: decap.vips[0]:", file.display())),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
