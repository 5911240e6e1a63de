//! The MTU comes from the LB's own namespace. The harness starts lbd with
//! `setns`, which leaves /sys describing the root namespace; lbd reads the
//! MTU over netlink instead. A datagram whose encapsulated frame is one
//! byte over the limit is dropped and counted (`lb_frame_too_big`), and in
//! no backend's counters; one that fits goes through; and a change of the
//! MTU is followed.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{Topology, addressing, lbd, scrape, udp_echo_from};
use lb_userspace::dataplane::AttachMode;

const METRICS: &str = "127.0.0.1:9103";
const MTU: u32 = 1400;

/// A UDP payload whose datagram, encapsulated in IPv4 (20 bytes) behind an
/// Ethernet header, is a frame of `frame` bytes.
fn payload_for_frame(frame: u32) -> usize {
    (frame - 14 - 20 - 20 - 8) as usize
}

#[test]
fn frames_over_the_namespaces_mtu_are_dropped_and_counted() {
    let t = Topology::new(1).unwrap();
    let _servers = t.start_servers(80, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip = IpAddr::from(addressing::vip_v4(1));
    t.add_vip_on_backends(vip).unwrap();
    let lb = t.lb();
    t.exec(
        lb.ns(),
        &[
            "ip",
            "link",
            "set",
            "dev",
            lb.ifname(),
            "mtu",
            &MTU.to_string(),
        ],
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("{}-mtu", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}[[vip]]\naddress = \"{vip}:53/udp\"\nmode = \"ipip\"\n{}",
            lbd::Preamble {
                instance_extra: &format!("metrics_listen = \"{METRICS}\"\n"),
                ..Default::default()
            }
            .render(&t, &dir),
            lbd::backend_tables(t.backends()),
        ),
    )
    .unwrap();
    let _teardown = lbd::Teardown::new(cfg.clone());
    let (mut lbd_proc, _) = lbd::start(&t, &cfg).unwrap();
    let backend = t.backend(0).ipv4().to_string();
    let counts = || {
        let text = scrape::scrape(&t, METRICS).unwrap();
        (
            scrape::sample(&text, "lb_xdp_packets_total", "reason=\"lb_frame_too_big\"").unwrap(),
            scrape::sample(
                &text,
                "lb_backend_packets_total",
                &format!("vip=\"{vip}:53/udp\",backend=\"{backend}\""),
            )
            .unwrap(),
        )
    };
    let send = |port: u16, frame: u32| {
        let payload = vec![0x5a; payload_for_frame(frame)];
        t.in_client(move || {
            udp_echo_from(
                port,
                SocketAddr::new(vip, 53),
                &payload,
                Duration::from_millis(500),
            )
            .is_ok()
        })
        .unwrap()
    };

    // Exactly at the limit: through.
    assert!(
        send(31_000, MTU + 14),
        "a frame of MTU + 14 bytes goes through"
    );
    assert_eq!(counts(), (0, 1));
    // One byte over: dropped, counted, in no backend's traffic.
    assert!(!send(31_001, MTU + 15), "one byte over the MTU is dropped");
    assert_eq!(counts(), (1, 1));

    // The MTU grows: lbd follows it.
    t.exec(
        lb.ns(),
        &["ip", "link", "set", "dev", lb.ifname(), "mtu", "1500"],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut port = 31_100;
    while !send(port, MTU + 15) {
        assert!(
            Instant::now() < deadline,
            "the larger MTU was not followed within 15 s"
        );
        port += 1;
    }
    lbd::stop(&mut lbd_proc).unwrap();
}
