//! `cargo xtask demo` runs the `lb-demo` binary: it must succeed and show
//! what it promises (traffic on every backend, a failover with no failures
//! after detection, a drain, a restart with zero failures, a slow start, a
//! preview and a reload with zero failures).

use std::process::Command;

use lb_tests::lbd_path;

/// The number the demo prints after `backend` on one of its lines
/// (`backend0   87   backend1    3 ...`).
fn count(line: &str, backend: &str) -> usize {
    line.split(backend)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count for {backend} in {line:?}"))
}

#[test]
fn the_demo_shows_failover_drain_and_restart() {
    let demo = lbd_path().unwrap().with_file_name("lb-demo");
    let out = Command::new(&demo)
        .output()
        .expect("lb-demo (cargo build -p lb-tests --bins)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steady = text
        .lines()
        .find(|l| l.contains("steady state:"))
        .expect("steady state line");
    for b in ["backend0", "backend1", "backend2"] {
        assert!(count(steady, b) > 0, "{b} got traffic: {steady}");
    }
    assert!(text.contains("0 after it"), "{text}");
    assert!(
        text.contains("new connections to backend2 since the drain: 0"),
        "{text}"
    );
    assert!(
        text.contains("failed requests across the restart: 0"),
        "{text}"
    );
    assert!(text.contains("http://127.0.0.1:9100/metrics"), "{text}");
    assert!(text.contains("% of ring slots move"), "{text}");
    assert!(
        text.contains("failed requests across the reload: 0"),
        "{text}"
    );
    // backend1 ramps up: fewer new connections in its first second back
    // than in its last.
    let ramp: Vec<usize> = text
        .split("ramps up over its 6 s slow start")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take(7)
        .map(|l| count(l, "backend1"))
        .collect();
    assert!(ramp[0] < ramp[6], "slow start: {ramp:?}");
}

/// `cargo xtask demo --fleet` runs `lb-fleet-demo`: it must succeed and
/// show the spread over nodes, the router's view and zero failures.
#[test]
fn the_fleet_demo_shows_spread_drain_kill_and_no_failures() {
    let demo = lbd_path().unwrap().with_file_name("lb-fleet-demo");
    let out = Command::new(&demo)
        .output()
        .expect("lb-fleet-demo (cargo build -p lb-tests --bins)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fleet demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in 0..3 {
        assert!(text.contains(&format!("node {node} forwarded ")), "{text}");
    }
    assert!(text.contains("router: 198.18.100.1 proto bird"), "{text}");
    assert!(
        text.contains("the router moved node 1's flows after"),
        "{text}"
    );
    assert!(
        text.contains("the router moved node 2's flows after"),
        "{text}"
    );
    assert!(
        text.contains("100 connections, ") && text.contains(" 0 failed"),
        "{text}"
    );
}
