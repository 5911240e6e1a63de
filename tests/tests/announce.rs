//! Announcing on one node, without a routing daemon: lbd keeps a route per
//! VIP in its announce table while the node should receive that VIP's
//! traffic, and deletes it when it should not (no healthy backend, node
//! drained, data plane detached). A hitless restart keeps the routes; a
//! teardown and a failed start withdraw them.

use std::{path::Path, process::Command, time::Duration};

use lb_tests::{Spawned, Topology, addressing, in_netns, lbd, lbd_path};
use lb_userspace::api::NodeStatus;

const TABLE: u32 = 4100;
const INTERVAL_MS: u64 = 200;

/// The host routes in the announce table of the LB's namespace.
fn announced(t: &Topology) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let text = t
            .exec(
                t.lb().ns(),
                &["ip", family, "route", "show", "table", &TABLE.to_string()],
            )
            .unwrap_or_default();
        out.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned),
        );
    }
    out.sort();
    out
}

/// Waits until the table holds exactly `want` (routes are written by a task
/// of lbd's, a moment after the change).
fn wait_for(t: &Topology, want: &[&str], what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let have = announced(t);
        if have == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: table {TABLE} holds {have:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lbctl(socket: &Path, args: &[&str]) -> String {
    lb_tests::lbctl(socket, args).unwrap()
}

fn config(t: &Topology, dir: &Path, extra_instance: &str) -> String {
    let v4 = addressing::vip_v4(1);
    let v6 = addressing::vip_v6(1);
    let check = format!(
        "[vip.health_check]\ntype = \"tcp\"\nport = 80\ninterval = \"{INTERVAL_MS}ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2\n"
    );
    let b4 = lbd::backend_tables(t.backends());
    let b6: String = t
        .backends()
        .iter()
        .map(|b| format!("[[vip.backend]]\naddress = \"{}\"\n", b.ipv6()))
        .collect();
    format!(
        "{pre}encap_source_v6 = \"{lb6}\"\n\
         [announce]\ntable = {TABLE}\n\
         [[vip]]\naddress = \"{v4}:80/tcp\"\nmode = \"ipip\"\n{check}{b4}\
         [[vip]]\naddress = \"[{v6}]:80/tcp\"\nmode = \"ipip\"\n{check}{b6}",
        pre = lbd::Preamble {
            on_exit: "keep",
            instance_extra: extra_instance,
            ..Default::default()
        }
        .render(t, dir),
        lb6 = t.lb().ipv6(),
    )
}

fn start(t: &Topology, cfg: &Path) -> Spawned {
    lbd::start(t, cfg).unwrap().0
}

#[test]
fn routes_follow_health_drain_restart_and_teardown() {
    let t = Topology::new(1).unwrap();
    let mut servers = t.start_servers(80, 53).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-announce", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    std::fs::write(&cfg, config(&t, &dir, "")).unwrap();
    let _teardown = lbd::Teardown::in_netns(cfg.clone(), t.lb().ns());
    let socket = dir.join("lbd.sock");
    let both = ["198.18.100.1", "fd00:198:18:100::1"];

    let mut lbd_proc = start(&t, &cfg);
    wait_for(&t, &both, "healthy, attached, not drained");
    let status: NodeStatus =
        serde_json::from_str(&lbctl(&socket, &["node", "status", "--json"])).unwrap();
    assert!(
        !status.drained
            && status
                .vips
                .iter()
                .all(|v| v.decision.announce && v.route_installed),
        "{status:?}"
    );

    lbctl(&socket, &["node", "drain"]);
    wait_for(&t, &[], "node drained");
    let human = lbctl(&socket, &["node", "status"]);
    assert!(
        human.contains("DRAINED") && human.contains("withdrawn: the node is drained"),
        "{human}"
    );
    lbctl(&socket, &["node", "undrain"]);
    wait_for(&t, &both, "undrained");

    // The only backend fails its checks: nothing to send the VIPs to.
    servers[0].stop();
    wait_for(&t, &[], "no healthy backend");
    let human = lbctl(&socket, &["node", "status"]);
    assert!(
        human.contains("withdrawn: 0 healthy backends, 1 needed"),
        "{human}"
    );
    let mut servers = t.start_servers(80, 53).unwrap();
    wait_for(&t, &both, "the backend recovered");

    // A hitless restart keeps the routes: no announcement churn.
    lbd::stop(&mut lbd_proc).unwrap();
    assert_eq!(announced(&t), both, "kept across the restart");
    let mut lbd_proc = start(&t, &cfg);
    wait_for(&t, &both, "adopted");

    // Drained, then restarted: still drained.
    lbctl(&socket, &["node", "drain"]);
    wait_for(&t, &[], "drained before the restart");
    lbd::stop(&mut lbd_proc).unwrap();
    let mut lbd_proc = start(&t, &cfg);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        announced(&t),
        Vec::<String>::new(),
        "a drain survives a restart"
    );
    lbctl(&socket, &["node", "undrain"]);
    wait_for(&t, &both, "undrained after the restart");

    // lbctl teardown withdraws before it detaches.
    lbctl(&socket, &["teardown"]);
    lbd_proc
        .wait_for_line(|l| l.contains("final_counters"), Duration::from_secs(10))
        .unwrap();
    wait_for(&t, &[], "torn down");
    servers.iter_mut().for_each(|s| {
        s.stop();
    });
}

/// A start that fails after the routes could have been written (here: the
/// metrics address is taken) leaves none behind, and `lbd --teardown`
/// removes routes a kept data plane left.
#[test]
fn a_failed_start_and_a_teardown_withdraw() {
    let t = Topology::new(1).unwrap();
    let _servers = t.start_servers(80, 53).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-announce-fail", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    std::fs::write(&cfg, config(&t, &dir, "")).unwrap();
    let _teardown = lbd::Teardown::in_netns(cfg.clone(), t.lb().ns());
    let both = ["198.18.100.1", "fd00:198:18:100::1"];
    let mut lbd_proc = start(&t, &cfg);
    wait_for(&t, &both, "started");
    lbd::stop(&mut lbd_proc).unwrap();
    assert_eq!(announced(&t), both, "kept (on_exit = keep)");

    // The next start fails: something else holds the metrics port.
    let taken = "127.0.0.1:9109";
    let holder = in_netns(t.lb().ns(), || std::net::TcpListener::bind(taken).unwrap()).unwrap();
    std::fs::write(
        &cfg,
        config(&t, &dir, &format!("metrics_listen = \"{taken}\"\n")),
    )
    .unwrap();
    let lbd_bin = lbd_path().unwrap();
    let out = in_netns(t.lb().ns(), || {
        Command::new(&lbd_bin)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    })
    .unwrap();
    assert!(!out.status.success(), "the start fails");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(taken),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        announced(&t),
        Vec::<String>::new(),
        "a failed start withdraws"
    );
    drop(holder);

    // Routes a kept data plane left are removed by --teardown too.
    std::fs::write(&cfg, config(&t, &dir, "")).unwrap();
    let mut lbd_proc = start(&t, &cfg);
    wait_for(&t, &both, "started again");
    lbd::stop(&mut lbd_proc).unwrap();
    let out = in_netns(t.lb().ns(), || {
        Command::new(&lbd_bin)
            .arg("--config")
            .arg(&cfg)
            .arg("--teardown")
            .output()
            .unwrap()
    })
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(announced(&t), Vec::<String>::new(), "--teardown withdraws");
}
