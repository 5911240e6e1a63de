//! Fleet mode: three LB nodes behind the ECMP router share their desired
//! state through etcd (one member, in the router's namespace). A change
//! made with lbctl on one node reaches every node, whose rings then agree
//! (identical fingerprints); concurrent changes against one revision are
//! refused, not lost; with etcd down the fleet keeps forwarding and changes
//! are refused, and once it is back changes apply everywhere again.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{HttpConn, etcd::Etcd, fleet::Fleet};
use lb_userspace::{api::VipStatus, fleet::FleetStatus};

const N: usize = 3;

fn vip_name() -> String {
    format!("{}:80/tcp", lb_tests::fleet::vips()[0])
}

fn vip_of(fleet: &Fleet, node: usize) -> VipStatus {
    let list: Vec<VipStatus> =
        serde_json::from_str(&fleet.lbctl(node, &["list", "--json"]).unwrap()).unwrap();
    list.into_iter().find(|v| v.vip == vip_name()).unwrap()
}

/// Waits until every node passes `f`; returns how long it took.
fn until_all(fleet: &Fleet, what: &str, f: impl Fn(&VipStatus) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let views: Vec<VipStatus> = (0..N).map(|i| vip_of(fleet, i)).collect();
        let same = views
            .windows(2)
            .all(|w| w[0].ring_fingerprint == w[1].ring_fingerprint);
        if same && views.iter().all(&f) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: not on every node with one ring: {:?}",
            views
                .iter()
                .map(|v| (&v.ring_fingerprint, v.backends.len()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(fleet: &Fleet, node: usize) -> FleetStatus {
    serde_json::from_str(&fleet.lbctl(node, &["fleet", "status", "--json"]).unwrap()).unwrap()
}

/// A change through lbctl on `node`, which must be accepted.
fn change(fleet: &Fleet, node: usize, args: &[&str]) {
    let (code, err) = try_lbctl(fleet, node, args);
    assert_eq!(code, 0, "lbctl {args:?} on node {node}: {err}");
}

/// `lbctl --socket node ARGS`: exit code and stderr.
fn try_lbctl(fleet: &Fleet, node: usize, args: &[&str]) -> (i32, String) {
    let (code, _, err) = lb_tests::lbctl_output(&fleet.socket(node), args).unwrap();
    (code, err)
}

/// Three nodes in fleet mode behind the router, with `backends` backends
/// and an etcd cluster of `members` members in the router's namespace.
fn fleet_in_etcd(backends: usize, members: usize) -> (Fleet, Etcd) {
    let mut fleet = Fleet::prepare(N, backends, true).unwrap();
    let router = fleet.t.router().clone();
    let etcd = Etcd::start_cluster(&fleet.t, router.ns(), router.ipv4().into(), members).unwrap();
    let (endpoints, cluster) = (etcd.endpoints(), fleet.t.id().to_owned());
    fleet
        .add_nodes(N, |_| lb_tests::fleet::SEED, |i| {
            format!(
                "[fleet]\nendpoints = [{endpoints}]\ncluster = \"{cluster}\"\nnode = \"node{i}\"\nlease = \"3s\"\n"
            )
        })
        .unwrap();
    (fleet, etcd)
}

#[test]
fn a_change_on_one_node_reaches_every_node_and_their_rings_agree() {
    let (fleet, mut etcd) = fleet_in_etcd(3, 1);
    let vip = vip_name();
    let b2 = fleet.t.backend(2).ipv4().to_string();

    // Seeded by the first node; every node reports in, with one ring.
    let s = status(&fleet, 2);
    assert_eq!(s.nodes.len(), N, "{s:?}");
    assert!(s.disagreeing.is_empty(), "{s:?}");
    until_all(&fleet, "start", |v| v.backends.len() == 3);

    // A backend removed on node 0, added back on node 1.
    fleet.lbctl(0, &["remove-backend", &vip, &b2]).unwrap();
    let removed = until_all(&fleet, "removal", |v| v.backends.len() == 2);
    let started = Instant::now();
    fleet.lbctl(1, &["add-backend", &vip, &b2]).unwrap();
    until_all(&fleet, "addition", |v| {
        v.backends
            .iter()
            .any(|b| b.address.to_string() == b2 && b.effective_weight > 0)
    });
    // From the command to every node forwarding to it with one ring.
    let added = started.elapsed();
    eprintln!(
        "fleet: a removal on node 0 was on every node with identical rings after {removed:?}, \
         an addition on node 1 (including its first check) after {added:?}"
    );
    assert!(added < Duration::from_secs(1), "{added:?}");
    // The new backend serves through whichever node the router picks.
    let target = SocketAddr::new(lb_tests::fleet::vips()[0], 80);
    let name = fleet.t.backend(2).name().to_owned();
    let hits = fleet
        .t
        .in_client(move || {
            (0..60)
                .filter(|_| {
                    HttpConn::connect(target, Duration::from_secs(2))
                        .and_then(|mut c| c.get("/"))
                        .is_ok_and(|r| r.text().trim() == name)
                })
                .count()
        })
        .unwrap();
    assert!(hits > 0, "no new connection reached the added backend");

    // A backend down from one node only (its checks blocked there): the
    // fleet's rule keeps it in on every node, rings identical. Down from
    // two of three: out everywhere, the third node included.
    fleet.block_checks(0, true).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    until_all(&fleet, "one node's view", |v| {
        v.backends.iter().all(|b| b.effective_weight > 0)
    });
    fleet.block_checks(1, true).unwrap();
    let out = until_all(&fleet, "two nodes' view", |v| {
        v.backends.iter().all(|b| b.effective_weight == 0)
    });
    fleet.block_checks(0, false).unwrap();
    fleet.block_checks(1, false).unwrap();
    let back = until_all(&fleet, "checks pass again", |v| {
        v.backends.iter().all(|b| b.effective_weight > 0)
    });
    eprintln!(
        "fleet: backends seen down by 2 of 3 nodes left every ring within {out:?}, came back within {back:?}"
    );

    // Two changes at once against the same revision: one applies.
    let revision = status(&fleet, 0).revision.to_string();
    let b0 = fleet.t.backend(0).ipv4().to_string();
    let b1 = fleet.t.backend(1).ipv4().to_string();
    let first = try_lbctl(
        &fleet,
        0,
        &["--if-revision", &revision, "set-weight", &vip, &b0, "200"],
    );
    let second = try_lbctl(
        &fleet,
        2,
        &["--if-revision", &revision, "set-weight", &vip, &b1, "300"],
    );
    assert_eq!(first.0, 0, "{}", first.1);
    assert_eq!(second.0, 1, "{}", second.1);
    assert!(second.1.contains("changed"), "{}", second.1);
    until_all(&fleet, "the first change", |v| {
        v.backends.iter().any(|b| b.weight == 200) && v.backends.iter().all(|b| b.weight != 300)
    });

    // etcd down: forwarding goes on, changes are refused.
    etcd.kill(0);
    let (code, err) = try_lbctl(&fleet, 1, &["set-weight", &vip, &b1, "150"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("etcd"), "{err}");
    let ok = fleet
        .t
        .in_client(move || {
            (0..30)
                .filter(|_| {
                    HttpConn::connect(target, Duration::from_secs(2))
                        .and_then(|mut c| c.get("/"))
                        .is_ok()
                })
                .count()
        })
        .unwrap();
    assert_eq!(ok, 30, "forwarding while etcd is down");
    // The documented choice while etcd is away longer than the lease: each
    // node decides health from its own checks (a dead backend must leave
    // the rings; nodes may disagree meanwhile).
    std::thread::sleep(Duration::from_secs(4));
    fleet.block_checks(0, true).unwrap();
    let started = Instant::now();
    while vip_of(&fleet, 0)
        .backends
        .iter()
        .any(|b| b.effective_weight > 0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "node 0 alone did not act on its checks"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        vip_of(&fleet, 1)
            .backends
            .iter()
            .all(|b| b.effective_weight > 0),
        "node 1's checks still pass"
    );
    fleet.block_checks(0, false).unwrap();
    // Back: a change applies on every node.
    etcd.resume(&fleet.t, 0).unwrap();
    let started = Instant::now();
    loop {
        let (code, err) = try_lbctl(&fleet, 1, &["set-weight", &vip, &b1, "150"]);
        if code == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "etcd back, but changes are still refused: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    until_all(&fleet, "a change after etcd came back", |v| {
        v.backends.iter().any(|b| b.weight == 150)
    });
    let addr: IpAddr = b1.parse().unwrap();
    assert!(
        vip_of(&fleet, 2)
            .backends
            .iter()
            .any(|b| b.address == addr && b.weight == 150)
    );

    // Export from one node, edit, import on another: every node applies it.
    let exported = fleet.lbctl(0, &["fleet", "export"]).unwrap();
    assert!(exported.contains("weight = 150"), "{exported}");
    let file = std::env::temp_dir().join(format!("{}-import.toml", fleet.t.id()));
    // The nodes' ring size is automatic, so from their `max_backends` (16:
    // rings of 1,511 slots): an import must resolve to the same one.
    let head = "[instance]\nname = \"import\"\ninterface = \"eth0\"\n[dataplane]\n\
                hash_seed = 7\nmax_backends = 16\n";
    let encap = format!(
        "encap_source_v4 = \"{}\"\nencap_source_v6 = \"{}\"\n",
        fleet.t.lb_node(0).ipv4(),
        fleet.t.lb_node(0).ipv6()
    );
    std::fs::write(
        &file,
        format!(
            "{head}{encap}{}",
            exported.replace("weight = 150", "weight = 120")
        ),
    )
    .unwrap();
    let out = fleet
        .lbctl(2, &["fleet", "import", file.to_str().unwrap()])
        .unwrap();
    assert!(out.contains("imported"), "{out}");
    until_all(&fleet, "an imported state", |v| {
        v.backends
            .iter()
            .any(|b| b.address == addr && b.weight == 120)
    });
    let shown = fleet.lbctl(1, &["fleet", "status"]).unwrap();
    assert!(
        shown.contains("every node has applied the current revision"),
        "{shown}"
    );
    let _ = std::fs::remove_file(&file);
}

/// The fleet's promise under change: while long-lived connections run,
/// nodes are drained, killed and brought back and backends are added and
/// removed through lbctl on different nodes, no request fails on a
/// connection whose backend stays; and losing one of three etcd members
/// changes nothing.
#[test]
fn connections_survive_changes_from_any_node_and_an_etcd_member_lost() {
    let (mut fleet, mut etcd) = fleet_in_etcd(4, 3);
    let vip = vip_name();
    let b3 = fleet.t.backend(3).ipv4().to_string();
    // Backend 3 out before the connections open: none of them is on it, so
    // adding and removing it later must break none.
    fleet.lbctl(2, &["remove-backend", &vip, &b3]).unwrap();
    until_all(&fleet, "backend 3 out", |v| v.backends.len() == 3);
    let load = lb_tests::fleet::LongLived::start(&fleet.t, 40).unwrap();
    load.settle(3);

    // One etcd member of three lost: changes still apply everywhere.
    etcd.kill(0);
    change(&fleet, 1, &["add-backend", &vip, &b3]);
    until_all(&fleet, "backend 3 added", |v| {
        v.backends.iter().all(|b| b.effective_weight > 0) && v.backends.len() == 4
    });
    load.settle(3);
    // Nodes move flows within the second-chance window of that change.
    fleet.lbctl(0, &["node", "drain"]).unwrap();
    fleet.wait_announced_by(&[1, 2]).unwrap();
    load.settle(3);
    fleet.lbctl(0, &["node", "undrain"]).unwrap();
    fleet.wait_announced_by(&[0, 1, 2]).unwrap();
    load.settle(3);
    fleet.kill(2).unwrap();
    fleet.wait_announced_by(&[0, 1]).unwrap();
    load.settle(3);
    fleet.bring_up(2).unwrap();
    fleet.wait_announced_by(&[0, 1, 2]).unwrap();
    load.settle(3);
    // Removed again from another node; flows move once more.
    change(&fleet, 2, &["remove-backend", &vip, &b3]);
    until_all(&fleet, "backend 3 removed", |v| v.backends.len() == 3);
    load.settle(3);
    fleet.kill(1).unwrap();
    fleet.wait_announced_by(&[0, 2]).unwrap();
    load.settle(3);
    fleet.bring_up(1).unwrap();
    fleet.wait_announced_by(&[0, 1, 2]).unwrap();
    load.settle(3);
    let report = load.finish();
    eprintln!(
        "fleet under change: {} connections, {} requests, {} failed (one etcd member of three lost)",
        report.connections,
        report.requests,
        report.failures.len()
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed: {:#?}",
        report.failures.len(),
        report.requests,
        &report.failures[..report.failures.len().min(10)]
    );
    assert!(report.requests > 1000, "{}", report.requests);
}
