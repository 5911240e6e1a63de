//! Time from a backend's failure to its removal from the ring: the backend's
//! HTTP server is killed, and lbd's `down` event (logged after the VIP's new
//! ring is published) is timed. The kill lands at evenly spread phases of
//! the check schedule, one fresh topology per kill.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{Topology, addressing, fabric, lbd};
use lb_userspace::dataplane::AttachMode;

const PORT: u16 = 80;
const KILLS: usize = 3;

/// (interval, timeout, fall)
const SETTINGS: [(u64, u64, u32); 2] = [(1000, 500, 3), (200, 100, 2)];

fn once(interval_ms: u64, timeout_ms: u64, fall: u32, phase: u64) -> Result<Duration> {
    let t = Topology::new(2)?;
    let mut servers = t.start_servers(PORT, 53)?;
    let _fabric = fabric::prepare(&t, AttachMode::Generic)?;
    let vip: IpAddr = addressing::vip_v4(1).into();
    t.add_vip_on_backends(vip)?;
    let dir = std::env::temp_dir().join(format!("{}-failover", t.id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "{}[[vip]]\naddress = \"{vip}:{PORT}/tcp\"\nmode = \"l2dsr\"\n\
             [vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"{interval_ms}ms\"\n\
             timeout = \"{timeout_ms}ms\"\nrise = 2\nfall = {fall}\n{}",
            lbd::Preamble::default().render(&t, &dir),
            lbd::backend_tables(t.backends()),
        ),
    )?;
    let (mut lbd, _) = lbd::start(&t, &config)?;
    // Let the checks settle into their schedule, then kill at this sample's
    // phase of it: the schedule starts with lbd, so a fixed delay would hit
    // the same phase every time.
    std::thread::sleep(Duration::from_millis(
        3 * interval_ms + phase * interval_ms / KILLS as u64,
    ));
    let dead = t.backend(0).ipv4().to_string();
    let killed = Instant::now();
    servers[0].stop();
    let line = lbd
        .wait_for_line(
            |l| l.contains("\"down\"") && l.contains(&dead),
            Duration::from_millis(interval_ms * (u64::from(fall) + 2) + timeout_ms)
                + Duration::from_secs(5),
        )
        .context("the killed backend was never marked down")?;
    let took = killed.elapsed();
    anyhow::ensure!(line.contains("backend"), "unexpected event: {line}");
    let _ = lbd::stop(&mut lbd);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(took)
}

/// Markdown lines for the control-plane section.
pub fn run() -> Result<String> {
    let mut md = format!(
        "Time from a backend's failure (its HTTP server killed) to its removal from the ring (lbd's `down` event, logged once the VIP's new ring is published), {KILLS} kills per setting spread evenly over one check interval, each in a fresh topology:\n\n\
         | health check | fall x interval | min (ms) | median (ms) | max (ms) |\n|---|---:|---:|---:|---:|\n"
    );
    for (interval, timeout, fall) in SETTINGS {
        let mut v: Vec<f64> = (0..KILLS as u64)
            .map(|phase| once(interval, timeout, fall, phase).map(|d| d.as_secs_f64() * 1e3))
            .collect::<Result<_>>()?;
        v.sort_by(f64::total_cmp);
        md.push_str(&format!(
            "| http, interval {interval} ms, timeout {timeout} ms, fall {fall} | {} ms | {:.0} | {:.0} | {:.0} |\n",
            u64::from(fall) * interval,
            v[0],
            crate::summary::median(v.clone()),
            v[v.len() - 1]
        ));
    }
    Ok(md)
}
