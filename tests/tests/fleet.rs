//! A fleet of three LB nodes behind a router doing ECMP on the 5-tuple,
//! each announcing the VIPs over BGP (BIRD) from lbd's announce table.
//! New connections spread over the nodes and the backends; long-lived
//! connections keep working, on their backends, while one node is drained,
//! one is killed, one has its link cut, and each comes back; and a node whose
//! health checks see every backend down withdraws while the others keep
//! announcing.

use std::time::{Duration, Instant};

use lb_tests::fleet::{self, Fleet, LongLived};

const NODES: usize = 3;
const BACKENDS: usize = 3;
/// Long-lived connections per VIP (two VIPs: IPv4 and IPv6).
const PER_VIP: usize = 60;

#[test]
fn connections_survive_nodes_leaving_and_joining() {
    let mut f = Fleet::start(NODES, BACKENDS).unwrap();
    let all: Vec<usize> = (0..NODES).collect();

    // New connections spread over every node and every backend.
    let before = f.forwarded().unwrap();
    let served = fleet::spread(&f.t, 150).unwrap();
    let after = f.forwarded().unwrap();
    assert_eq!(served.len(), BACKENDS, "every backend serves: {served:?}");
    for i in 0..NODES {
        assert!(
            after[i] > before[i] + 30,
            "node {i} forwarded {} packets of 300 connections: {before:?} -> {after:?}",
            after[i] - before[i]
        );
    }

    let load = LongLived::start(&f.t, PER_VIP).unwrap();
    load.settle(3);

    // Drained: the router moves its flows to the others, which have no
    // entry for them and pick the same backends from the same rings.
    let t0 = Instant::now();
    f.lbctl(1, &["node", "drain"]).unwrap();
    let took = f.wait_announced_by_since(&[0, 2], t0).unwrap();
    eprintln!("drain: the router moved node 1's flows after {took:?}");
    load.settle(5);
    f.lbctl(1, &["node", "undrain"]).unwrap();
    f.wait_announced_by(&all).unwrap();
    load.settle(5);

    // Killed (lbd and BIRD): its sessions close, the router moves at once.
    let t0 = Instant::now();
    f.kill(2).unwrap();
    let took = f.wait_announced_by_since(&[0, 1], t0).unwrap();
    eprintln!("kill: the router moved node 2's flows after {took:?}");
    load.settle(5);
    f.bring_up(2).unwrap();
    f.wait_announced_by(&all).unwrap();
    load.settle(5);

    // Link cut: the node goes silent, BFD finds it; its flows' packets are
    // lost until then, and TCP retransmits them.
    let t0 = Instant::now();
    f.link_down(0).unwrap();
    let took = f.wait_announced_by_since(&[1, 2], t0).unwrap();
    eprintln!("link cut: the router moved node 0's flows after {took:?}");
    load.settle(5);
    f.link_up(0).unwrap();
    f.wait_announced_by(&all).unwrap();
    load.settle(5);

    let report = load.finish();
    eprintln!(
        "{} connections, {} requests, {} failed",
        report.connections,
        report.requests,
        report.failures.len()
    );
    assert_eq!(report.connections, 2 * PER_VIP);
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed: {:#?}",
        report.failures.len(),
        report.requests,
        &report.failures[..report.failures.len().min(10)]
    );
}

#[test]
fn a_node_that_sees_no_healthy_backend_withdraws_alone() {
    let mut f = Fleet::start(NODES, BACKENDS).unwrap();
    let t0 = Instant::now();
    f.block_checks(1, true).unwrap();
    let took = f.wait_announced_by_since(&[0, 2], t0).unwrap();
    eprintln!("node 1's checks blocked: withdrawn after {took:?}");
    let status = f.lbctl(1, &["node", "status"]).unwrap();
    assert!(
        status.contains("withdrawn: 0 healthy backends, 1 needed"),
        "{status}"
    );
    for i in [0, 2] {
        let status = f.lbctl(i, &["node", "status"]).unwrap();
        assert!(
            !status.contains("withdrawn") && status.contains("announced (route installed)"),
            "node {i}: {status}"
        );
    }
    // The other nodes serve everything meanwhile.
    let served = fleet::spread(&f.t, 30).unwrap();
    assert_eq!(served.values().sum::<usize>(), 60, "{served:?}");
    f.block_checks(1, false).unwrap();
    f.wait_for_line(
        1,
        |l| l.contains("\"event\":\"backend\"") && l.contains("\"up\""),
        Duration::from_secs(5),
    )
    .unwrap();
    f.wait_announced_by(&[0, 1, 2]).unwrap();
}

/// The control: one node with another `hash_seed` builds other rings, and
/// connections the router moves onto it reach other backends and break.
/// What the test above shows holding is identical rings at work, not luck.
#[test]
fn a_node_with_other_rings_breaks_moved_connections() {
    let f =
        Fleet::start_with_seeds(NODES, BACKENDS, |i| if i == 2 { 8 } else { fleet::SEED }).unwrap();
    let load = LongLived::start(&f.t, PER_VIP).unwrap();
    load.settle(3);
    f.lbctl(1, &["node", "drain"]).unwrap();
    f.wait_announced_by(&[0, 2]).unwrap();
    load.settle(5);
    let report = load.finish();
    eprintln!(
        "other rings on node 2: {} of {} requests failed",
        report.failures.len(),
        report.requests
    );
    assert!(
        !report.failures.is_empty(),
        "flows moved onto a node with other rings must break"
    );
}
