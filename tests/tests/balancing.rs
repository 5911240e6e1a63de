//! End-to-end: the balancer on the LB's veth, the decapsulator on every
//! backend's, real HTTP and UDP clients in the client namespace. Requests to
//! the VIPs must reach every backend (ipip 4in4 and 6in6 and GUE in both
//! families, decapsulated by `lbd` in the backend role, and l2dsr), and the
//! answers come straight back from the backends (DSR): the LB only ever sees
//! the client's direction.
//!
//! The maps are programmed here with the library `lbd` uses, standing in for
//! the controller (which has its own tests).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::Ebpf;
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{BackendInfo, BackendState, Family, LbConfig, Mode, VipKey},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};
use lb_tests::{HttpConn, Topology, addressing, in_netns, udp_echo_from};
use lb_userspace::{
    config::vip::addr16,
    dataplane::{self, AttachMode, MapSizes},
    programming, stats,
};

const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const BACKENDS: usize = 3;
const RING: u32 = 65537;
const REQUESTS: usize = 45;

fn ifindex(t: &Topology, ns: &str, dev: &str) -> u32 {
    let out = t
        .exec(ns, &["cat", &format!("/sys/class/net/{dev}/ifindex")])
        .unwrap();
    out.trim().parse().unwrap()
}

struct Lb {
    balancer: Ebpf,
    _fabric: lb_tests::fabric::Fabric,
}

/// Loads and attaches everything in `mode`, and programs four VIPs.
fn deploy(t: &Topology, mode: AttachMode) -> (Lb, Vec<(IpAddr, Mode)>) {
    let lb = t.lb();
    let fabric = lb_tests::fabric::prepare(t, mode).unwrap();
    let lb_if = ifindex(t, lb.ns(), lb.ifname());
    let dev = lb.ifname().to_owned();
    let mut balancer = in_netns(lb.ns(), move || {
        let mut e = dataplane::load_balancer_with(&MapSizes {
            max_vips: 12,
            max_backends: 16,
            ring_size: RING,
            conntrack_entries: 65536,
            ..Default::default()
        })
        .unwrap();
        dataplane::attach(&mut e, &dev, mode).unwrap();
        e
    })
    .unwrap();

    let (src4, _) = addr16(lb.ipv4().into());
    programming::set_config(
        &mut balancer,
        &LbConfig {
            encap_src_v4: [src4[0], src4[1], src4[2], src4[3]],
            encap_src_v6: lb.ipv6().octets(),
            hash_seed: 0x1b,
            ring_size: RING,
            flags: 0,
            udp_timeout_ns: 30_000_000_000,
            gue_port: lb_common::wire::gue::GUE_DEFAULT_PORT,
            ..Default::default()
        },
    )
    .unwrap();
    // Backend ids: 1..=3 by IPv4 address, 11..=13 by IPv6 address.
    let mut v4_ring = Vec::new();
    let mut v6_ring = Vec::new();
    for (i, b) in t.backends().iter().enumerate() {
        for (id, ip, ring) in [
            (1 + i as u32, IpAddr::from(b.ipv4()), &mut v4_ring),
            (11 + i as u32, IpAddr::from(b.ipv6()), &mut v6_ring),
        ] {
            let (addr, family) = addr16(ip);
            let info = BackendInfo {
                addr,
                family: family.wire(),
                state: BackendState::Up.wire(),
                next_hop_mac: b.mac(),
                src_mac: lb.mac(),
                _pad: [0; 2],
                ifindex: lb_if,
                vip_id: lb_common::maps::BACKEND_ANY_VIP,
            };
            programming::set_backend(&mut balancer, id, &info).unwrap();
            ring.push(MaglevBackend {
                id,
                identity: addr,
                weight: 1,
            });
        }
    }
    let table4 = maglev::build(&v4_ring, RING, 0x1b).unwrap();
    let table6 = maglev::build(&v6_ring, RING, 0x1b).unwrap();
    let vips = vec![
        (IpAddr::from(addressing::vip_v4(1)), Mode::Ipip),
        (IpAddr::from(addressing::vip_v4(2)), Mode::L2dsr),
        (IpAddr::from(addressing::vip_v6(1)), Mode::Ipip),
        (IpAddr::from(addressing::vip_v6(2)), Mode::L2dsr),
        (IpAddr::from(addressing::vip_v4(3)), Mode::Gue),
        (IpAddr::from(addressing::vip_v6(3)), Mode::Gue),
    ];
    let mut vip_id = 0;
    for &(vip, fwd) in &vips {
        t.add_vip_on_backends(vip).unwrap();
        let (addr, family) = addr16(vip);
        for (proto, port) in [(IPPROTO_TCP, HTTP_PORT), (IPPROTO_UDP, UDP_PORT)] {
            let key = VipKey {
                addr,
                port,
                proto,
                family: family.wire(),
            };
            let table = if family == Family::V4 {
                &table4
            } else {
                &table6
            };
            programming::install_vip(&mut balancer, &key, vip_id, fwd, table).unwrap();
            vip_id += 1;
        }
    }
    (
        Lb {
            balancer,
            _fabric: fabric,
        },
        vips,
    )
}

/// VIPs `deploy` programs: ipip, l2dsr and gue, each in both families.
const fn vips_served() -> usize {
    6
}

fn run(mode: AttachMode) {
    let t = Topology::new(BACKENDS).unwrap();
    let _servers = t.start_servers(HTTP_PORT, UDP_PORT).unwrap();
    let (lb, vips) = deploy(&t, mode);

    for (vip, fwd) in vips {
        let (http, udp) = t
            .in_client(move || {
                let mut http: BTreeMap<String, usize> = BTreeMap::new();
                let mut udp: BTreeMap<String, usize> = BTreeMap::new();
                for i in 0..REQUESTS {
                    // A new connection each time: a new source port, a new flow.
                    let mut conn =
                        HttpConn::connect(SocketAddr::new(vip, HTTP_PORT), Duration::from_secs(3))
                            .unwrap_or_else(|e| panic!("connect to {vip} (mode {fwd}): {e:#}"));
                    let body = conn.get("/").unwrap().text();
                    *http.entry(body.trim().to_owned()).or_default() += 1;
                    let payload = format!("datagram {i}");
                    let reply = udp_echo_from(
                        30000 + i as u16,
                        SocketAddr::new(vip, UDP_PORT),
                        payload.as_bytes(),
                        Duration::from_secs(3),
                    )
                    .unwrap_or_else(|e| panic!("udp to {vip} (mode {fwd}): {e:#}"));
                    let (name, echoed) = lb_tests::split_echo(&reply).unwrap();
                    assert_eq!(echoed, payload.as_bytes());
                    *udp.entry(name.to_owned()).or_default() += 1;
                }
                (http, udp)
            })
            .unwrap();
        for (what, seen) in [("http", &http), ("udp", &udp)] {
            assert_eq!(
                seen.len(),
                BACKENDS,
                "{what} to {vip} (mode {fwd}) reached {seen:?}"
            );
            assert!(
                seen.values().all(|&n| n >= REQUESTS / 10),
                "{what} to {vip}: {seen:?}"
            );
        }
    }

    let c = stats::global_counters(&lb.balancer).unwrap();
    // Every forwarded packet left through XDP_TX; answers never came back
    // through the LB (DSR), and nothing was dropped.
    let n = vips_served();
    assert!(c["verdict_tx"] >= (n * REQUESTS * 4) as u64, "{c:?}");
    assert_eq!(c["verdict_drop"], 0, "{c:?}");
    assert_eq!(
        c["lb_new_flow"],
        (n * REQUESTS * 2) as u64,
        "one new flow per connection and datagram: {c:?}"
    );
}

#[test]
fn vips_reach_every_backend_generic_xdp() {
    run(AttachMode::Generic);
}

#[test]
fn vips_reach_every_backend_native_xdp() {
    run(AttachMode::Native);
}
