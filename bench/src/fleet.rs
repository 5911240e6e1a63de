//! The fleet: how fast the router follows a node leaving or a VIP losing
//! its last healthy backend, and what long-lived connections went through
//! meanwhile. Three LB nodes (lbd and BIRD) behind a BIRD router doing ECMP
//! on the 5-tuple, as in `tests/tests/fleet.rs`; each time is from the
//! action to the first dump of the router's routes that shows the change
//! (dumped every few milliseconds).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lb_tests::fleet::{self, Fleet, LongLived};

const NODES: usize = 3;
const BACKENDS: usize = 3;
const REPEATS: usize = 3;
const PER_VIP: usize = 50;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// min / median / max of `v` in ms.
fn spread(mut v: Vec<Duration>) -> String {
    v.sort();
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(a), Some(m), Some(z)) => format!("{:.0} / {:.0} / {:.0}", ms(*a), ms(*m), ms(*z)),
        _ => "-".into(),
    }
}

/// Drain, kill and link cut of one node, `REPEATS` times each, under
/// long-lived connections; returns the rows and the connections' report.
/// An event's name and the router's times to follow it.
type Row = (String, Vec<Duration>);

fn node_events(f: &mut Fleet) -> Result<(Vec<Row>, fleet::Report)> {
    let all: Vec<usize> = (0..NODES).collect();
    let others = [0, 2];
    let load = LongLived::start(&f.t, PER_VIP)?;
    let (mut drain, mut undrain, mut kill, mut back, mut cut) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        f.lbctl(1, &["node", "drain"])?;
        drain.push(f.wait_announced_by_since(&others, t0)?);
        let t0 = Instant::now();
        f.lbctl(1, &["node", "undrain"])?;
        undrain.push(f.wait_announced_by_since(&all, t0)?);
        let t0 = Instant::now();
        f.kill(1)?;
        kill.push(f.wait_announced_by_since(&others, t0)?);
        let t0 = Instant::now();
        f.bring_up(1)?;
        back.push(f.wait_announced_by_since(&all, t0)?);
        let t0 = Instant::now();
        f.link_down(1)?;
        cut.push(f.wait_announced_by_since(&others, t0)?);
        f.link_up(1)?;
        f.wait_announced_by(&all)?;
    }
    let rows = vec![
        ("`lbctl node drain` -> withdrawn".to_owned(), drain),
        ("`lbctl node undrain` -> announced".to_owned(), undrain),
        (
            "node killed (lbd and BIRD, SIGKILL) -> withdrawn".to_owned(),
            kill,
        ),
        (
            "node restarted (BIRD and lbd) -> announced".to_owned(),
            back,
        ),
        (
            "link cut (silent node), BFD 100 ms x 3 -> withdrawn".to_owned(),
            cut,
        ),
    ];
    Ok((rows, load.finish()))
}

/// A silent node without BFD: the BGP hold time (3 s) finds it.
fn cut_without_bfd() -> Result<Vec<Duration>> {
    let f = Fleet::start_full(NODES, BACKENDS, |_| fleet::SEED, false)?;
    let mut out = Vec::new();
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        f.link_down(1)?;
        out.push(f.wait_announced_by_since(&[0, 2], t0)?);
        f.link_up(1)?;
        f.wait_announced_by(&[0, 1, 2])?;
    }
    Ok(out)
}

/// Every backend's server stopped: each node's checks fail, each withdraws,
/// until the router routes the VIP nowhere.
fn last_backend(f: &mut Fleet) -> Result<Vec<Duration>> {
    let vip = fleet::vips()[0];
    let mut out = Vec::new();
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        f.stop_servers();
        let deadline = t0 + Duration::from_secs(10);
        loop {
            if f.router_nexthops(vip)?.is_empty() {
                out.push(t0.elapsed());
                break;
            }
            if Instant::now() > deadline {
                bail!("the router still routes {vip} 10 s after its backends died");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        f.start_servers()?;
        f.wait_announced_by(&[0, 1, 2])?;
    }
    Ok(out)
}

pub fn run() -> Result<String> {
    let mut f = Fleet::start(NODES, BACKENDS)?;
    let (mut rows, report) = node_events(&mut f)?;
    rows.push((
        format!(
            "every backend's server stopped (checks every {} ms, fall {}) -> withdrawn by every node",
            fleet::CHECK_INTERVAL_MS,
            fleet::CHECK_FALL
        ),
        last_backend(&mut f)?,
    ));
    drop(f);
    rows.push((
        "link cut (silent node), no BFD (hold 3 s) -> withdrawn".to_owned(),
        cut_without_bfd()?,
    ));
    let mut md = format!(
        "Three LB nodes (lbd + BIRD) behind a BIRD router doing ECMP on the 5-tuple; each node announces both VIPs from lbd's announce table. Times from the action to the router's routes showing it, {REPEATS} times each (min / median / max, ms):\n\n| event | router follows (ms) |\n|---|---:|\n"
    );
    for (name, times) in rows {
        md.push_str(&format!("| {name} | {} |\n", spread(times)));
    }
    md.push_str(&format!(
        "\nThrough the drains, kills, restarts and link cuts above ({REPEATS} rounds on one node), {} long-lived connections (IPv4 and IPv6, each asking every 20 ms) made {} requests: {} failed or reached another backend.\n",
        report.connections,
        report.requests,
        report.failures.len()
    ));
    Ok(md)
}
