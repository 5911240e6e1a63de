//! Established connections survive a spoofed SYN flood with ring changes
//! during it. The flood (random sources and ports, as `hping3 --flood
//! --rand-source`) sends far more new flows than the connection table has
//! slots, and two ring changes move a share of every backend's flows; a
//! long-lived connection whose entry the flood displaced would follow the
//! new ring to another backend and be reset. The second-chance window is
//! cut to nothing, so only the table protects them. Afterwards the flood's
//! entries expire within seconds: the table is free again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    HttpConn,
    flood::{self, FloodedNode, KeepAlive},
};

const METRICS: &str = "127.0.0.1:9133";
const CONNECTIONS: usize = 24;
/// 4,096 slots: the flood sends hundreds of times as many new flows.
const TABLE: u32 = 4096;

#[test]
fn established_connections_survive_a_spoofed_syn_flood_and_ring_changes() {
    let node = FloodedNode::start("flood", TABLE, "10ms", METRICS).unwrap();
    let t = &node.t;
    let sample = |name: &str, labels: &str| node.sample(name, labels).unwrap();

    // Long-lived connections, each asking every 100 ms.
    let target = node.target();
    let keep = KeepAlive::start(t, target, CONNECTIONS, Duration::from_millis(100)).unwrap();

    // The flood, and two ring changes during it.
    let flood_stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let (client_host, target, stop) =
            (t.client().clone(), node.flood_target(), flood_stop.clone());
        std::thread::spawn(move || {
            flood::syn_flood(
                &client_host,
                &target,
                Duration::from_secs(6),
                0,
                stop,
                0x5eed,
            )
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    node.change_ring(0).unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    node.change_ring(1).unwrap();
    let flooded = flooder.join().unwrap().unwrap();
    flood_stop.store(true, Ordering::SeqCst);
    let embryonic_after_flood = sample("lb_conntrack_embryonic_entries", "");
    std::thread::sleep(Duration::from_millis(500));
    let tally = keep.finish().unwrap();

    let new_flows = sample("lb_xdp_packets_total", "reason=\"lb_new_flow\"");
    eprintln!(
        "flood: {} SYNs in {:.1} s ({:.0}/s), {new_flows} new flows counted; \
         {} requests on {CONNECTIONS} connections, {} broken; {embryonic_after_flood} \
         embryonic entries at its end",
        flooded.sent,
        flooded.elapsed.as_secs_f64(),
        flooded.rate(),
        tally.requests,
        tally.broken.len()
    );
    assert!(
        flooded.sent > 20 * TABLE as u64,
        "the flood must be many times the table: {} SYNs",
        flooded.sent
    );
    assert!(
        new_flows > 10 * TABLE as u64,
        "the flood must reach the data plane: {new_flows} new flows"
    );
    assert!(
        tally.broken.is_empty(),
        "{} of {CONNECTIONS} connections broken by the flood: {:?}",
        tally.broken.len(),
        tally.broken
    );
    assert_eq!(
        sample("lb_xdp_packets_total", "reason=\"lb_conntrack_full\""),
        0,
        "a flood never fills the table with established flows"
    );

    // Seconds after the flood its entries are free; the table is usable.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let embryonic = sample("lb_conntrack_embryonic_entries", "");
        if embryonic == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{embryonic} embryonic entries 30 s after the flood"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let fresh = t
        .in_client(|| -> anyhow::Result<usize> {
            let mut ok = 0;
            for _ in 0..20 {
                let mut c = HttpConn::connect(target, Duration::from_secs(2))?;
                c.get("/")?;
                ok += 1;
            }
            Ok(ok)
        })
        .unwrap()
        .unwrap();
    assert_eq!(fresh, 20, "new connections after the flood");
    node.stop().unwrap();
}
