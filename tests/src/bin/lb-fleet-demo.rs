//! `cargo xtask demo --fleet`: three LB nodes behind a router that spreads
//! flows over them (ECMP on the 5-tuple), each announcing the VIPs over BGP
//! (BIRD) from lbd's announce table. New connections spread over the nodes;
//! long-lived connections keep working while a node is drained and another
//! is killed, because every node picks the same backend for a flow.
//! Everything is torn down at the end or on Ctrl-C; `--keep` leaves it
//! running for exploration.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_tests::{
    demo,
    fleet::{self, Fleet, LongLived},
};

const NODES: usize = 3;
const BACKENDS: usize = 3;
const PER_VIP: usize = 50;

/// Stops the demo between steps on Ctrl-C (everything is torn down as the
/// values drop).
fn check_stop() -> Result<()> {
    if demo::stopped() {
        bail!("interrupted");
    }
    Ok(())
}

/// The router's multipath route to each VIP, as `ip route` shows it.
fn router_view(f: &Fleet) -> Result<()> {
    for vip in fleet::vips() {
        let fam = if vip.is_ipv6() { "-6" } else { "-4" };
        let out = f.t.exec(
            f.t.router().ns(),
            &["ip", fam, "route", "show", &vip.to_string()],
        )?;
        for line in out.lines() {
            println!("   router: {line}");
        }
    }
    Ok(())
}

fn pause(load: &LongLived, secs: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        check_stop()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "   {} requests so far on the long-lived connections",
        load.requests()
    );
    Ok(())
}

fn run(keep: bool) -> Result<()> {
    println!(
        "== Building a fleet: router (BIRD, ECMP), {NODES} LB nodes (lbd + BIRD), {BACKENDS} backends"
    );
    let mut f = Fleet::start(NODES, BACKENDS)?;
    println!("   every node announces both VIPs; the router installs one route over all of them:");
    router_view(&f)?;
    check_stop()?;

    println!("== 150 new connections per VIP from the client");
    let before = f.forwarded()?;
    let served = fleet::spread(&f.t, 150)?;
    let after = f.forwarded()?;
    for i in 0..NODES {
        println!("   node {i} forwarded {} packets", after[i] - before[i]);
    }
    for (backend, n) in &served {
        println!("   {backend} served {n}");
    }
    check_stop()?;

    println!(
        "== {} long-lived connections, each asking every 20 ms",
        2 * PER_VIP
    );
    let load = LongLived::start(&f.t, PER_VIP)?;
    pause(&load, 2)?;

    println!("== lbctl node drain on node 1: it withdraws, its flows move to the others");
    let t0 = Instant::now();
    f.lbctl(1, &["node", "drain"])?;
    let took = f.wait_announced_by_since(&[0, 2], t0)?;
    println!("   the router moved node 1's flows after {took:?}");
    router_view(&f)?;
    print!("{}", f.lbctl(1, &["node", "status"])?);
    pause(&load, 2)?;
    f.lbctl(1, &["node", "undrain"])?;
    f.wait_announced_by(&[0, 1, 2])?;
    println!("   node 1 undrained and announcing again");
    pause(&load, 2)?;

    println!("== Node 2 killed (lbd and BIRD, SIGKILL)");
    let t0 = Instant::now();
    f.kill(2)?;
    let took = f.wait_announced_by_since(&[0, 1], t0)?;
    println!("   the router moved node 2's flows after {took:?}");
    router_view(&f)?;
    pause(&load, 2)?;
    f.bring_up(2)?;
    f.wait_announced_by(&[0, 1, 2])?;
    println!("   node 2 back (lbd adopted its pinned data plane)");
    pause(&load, 2)?;

    let report = load.finish();
    println!(
        "== {} connections, {} requests, {} failed",
        report.connections,
        report.requests,
        report.failures.len()
    );
    for e in report.failures.iter().take(5) {
        println!("   {e}");
    }
    if keep {
        println!("== --keep: everything stays up until Ctrl-C. Try, as root:");
        println!(
            "   ip netns exec {} ip route show 198.18.100.1",
            f.t.router().ns()
        );
        println!("   birdc -s <the router's socket, see ps> show route");
        while !demo::stopped() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("== Tearing down");
    if !report.failures.is_empty() {
        bail!("{} requests failed", report.failures.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    demo::main("fleet demo", run)
}
