//! A spoofed SYN flood against one node, as measured for the issue that
//! asked for it: `hping3 --flood --rand-source` style (random sources and
//! ports) for 20 s into a 65,536-slot connection table, two ring changes
//! during it, long-lived connections asking throughout. Reported: the rate
//! sent and the rate the data plane took in as new flows, what became of
//! the long-lived connections, what the table went through, how soon after
//! the flood its entries were free, and whether new connections work then.
//! Once with the second chance cut to nothing (only the connection table
//! keeps flows in place), once with the default window.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{
    HttpConn,
    flood::{self, FloodedNode, KeepAlive},
};

const METRICS: &str = "127.0.0.1:9134";
const TABLE: u32 = 65_536;
const CONNECTIONS: usize = 50;
const FLOOD: Duration = Duration::from_secs(20);

struct Row {
    name: &'static str,
    sent: u64,
    sent_rate: f64,
    taken_rate: f64,
    kept: usize,
    requests: usize,
    evicted: u64,
    full: u64,
    embryonic_at_end: u64,
    free_after: Option<Duration>,
    fresh_ok: usize,
}

fn scenario(name: &'static str, window: &str) -> Result<Row> {
    let node = FloodedNode::start("bench-flood", TABLE, window, METRICS)?;
    let t = &node.t;
    let sample = |metric: &str, labels: &str| node.sample(metric, labels);
    let reason = |r: &str| sample("lb_xdp_packets_total", &format!("reason=\"{r}\""));

    let target = node.target();
    let keep = KeepAlive::start(t, target, CONNECTIONS, Duration::from_millis(200))?;
    let (new0, evicted0, full0) = (
        reason("lb_new_flow")?,
        reason("lb_conntrack_evicted")?,
        reason("lb_conntrack_full")?,
    );
    let flooder = {
        let (from, target) = (t.client().clone(), node.flood_target());
        std::thread::spawn(move || {
            let stop = Arc::new(AtomicBool::new(false));
            flood::syn_flood(&from, &target, FLOOD, 0, stop, 0xf100d)
        })
    };
    std::thread::sleep(Duration::from_secs(5));
    node.change_ring(0)?;
    std::thread::sleep(Duration::from_secs(7));
    node.change_ring(1)?;
    let flooded = flooder
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let flood_end = Instant::now();
    let taken = reason("lb_new_flow")? - new0;
    // The table is counted every 5 s: the first count after the flood.
    std::thread::sleep(Duration::from_secs(5));
    let embryonic_at_end = sample("lb_conntrack_embryonic_entries", "")?;
    let tally = keep.finish()?;
    let mut free_after = None;
    while flood_end.elapsed() < Duration::from_secs(60) {
        if sample("lb_conntrack_embryonic_entries", "")? == 0 {
            free_after = Some(flood_end.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let fresh_ok = t.in_client(|| {
        (0..CONNECTIONS)
            .filter(|_| {
                HttpConn::connect(target, Duration::from_secs(2))
                    .and_then(|mut c| c.get("/"))
                    .is_ok()
            })
            .count()
    })?;
    let row = Row {
        name,
        sent: flooded.sent,
        sent_rate: flooded.rate(),
        taken_rate: taken as f64 / flooded.elapsed.as_secs_f64(),
        kept: tally.connections - tally.broken.len(),
        requests: tally.requests,
        evicted: reason("lb_conntrack_evicted")? - evicted0,
        full: reason("lb_conntrack_full")? - full0,
        embryonic_at_end,
        free_after,
        fresh_ok,
    };
    node.stop().context("stopping lbd")?;
    Ok(row)
}

pub fn run() -> Result<String> {
    let rows = [
        scenario("second chance off (10 ms)", "10ms")?,
        scenario("second chance 120 s (default)", "120s")?,
    ];
    let mut md = format!(
        "One node, a {TABLE}-slot connection table, {CONNECTIONS} long-lived HTTP connections asking every 200 ms. \
         From the client, {} s of TCP SYNs from random sources (198.19.0.0/16) and ports, written by one thread \
         with `sendmmsg` on an `AF_PACKET` socket (as fast as it can); the data plane runs in generic XDP. \
         A backend is added 5 s into the flood and another's weight tripled 7 s later: both move a share \
         of every backend's flows on the ring. \"Taken in\" counts the new flows the data plane recorded or \
         turned away (`lb_new_flow`); \"free again\" is when `lb_conntrack_embryonic_entries` (counted every 5 s) \
         read 0 after the flood.\n\n\
         | scenario | SYNs sent | sent /s | taken in /s | long-lived kept | their requests | embryonic displaced | not recorded (all ways established) | embryonic 5 s after | free again after | new connections after |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        FLOOD.as_secs()
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} of {CONNECTIONS} | {} | {} | {} | {} | {} | {} of {CONNECTIONS} |\n",
            r.name,
            r.sent,
            r.sent_rate,
            r.taken_rate,
            r.kept,
            r.requests,
            r.evicted,
            r.full,
            r.embryonic_at_end,
            r.free_after
                .map_or("over 60 s".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
            r.fresh_ok,
        ));
    }
    md.push_str(
        "\nEvery entry is written embryonic and becomes established at the flow's next packet that is not a SYN; \
         a new flow may displace only an embryonic one. A spoofed SYN has no next packet, so the flood only \
         displaces its own entries, and they expire 9-13 s after their last packet. Before entry classes \
         (the same test, `tests/tests/flood.rs`, run against the previous data plane), 5 to 11 of 24 \
         long-lived connections were reset.\n",
    );
    Ok(md)
}
