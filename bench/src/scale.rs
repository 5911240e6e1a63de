//! Control-plane scale: a thousand backends behind one VIP (and the same
//! thousand behind each of ten VIPs), every one checked over TCP every
//! second, for lbd and for HAProxy 2.6 with the same servers and `check
//! inter 1s`: how long until the balancer serves with every backend up,
//! then its CPU and memory while it only checks.
//!
//! The backends are 1,000 addresses on the `lo` of one backend namespace
//! (198.18.16.1 to 198.18.19.250), answered by one listener on
//! 0.0.0.0:80 in this process (HAProxy's checks and lbd's never complete
//! the handshake, so it accepts nothing), and routed from the LB
//! through that namespace's own address: one next hop for all of them, as
//! for backends behind a router. (On-link backends would each need a
//! neighbour entry, and the kernel's default `gc_thresh3` of 1,024
//! entries is shared by every namespace on the machine.)

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener},
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::summary::{median, range};
use anyhow::{Context, Result, bail};
use lb_tests::{Spawned, Topology, addressing, lbd, scrape};

const PORT: u16 = 80;
const BACKENDS: usize = 1000;
/// After every backend is up: settling, then the window CPU is read over.
const SETTLE: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(10);
/// How long a balancer may take to have every backend up.
const UP_WITHIN: Duration = Duration::from_secs(60);
/// lbd's metrics listener, inside the LB namespace.
const METRICS: &str = "127.0.0.1:9100";

/// Backend `i`'s address: 198.18.16.1 onwards, 250 to a /24.
fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 16 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// One balancer's numbers.
struct Row {
    name: String,
    checks_per_s: usize,
    /// lbd: until its `ready` line (the VIPs programmed, every backend
    /// checked once, the program attached).
    ready: Option<Duration>,
    /// Until every backend is up: lbd's `lb_backend_up` all 1, HAProxy's
    /// stats all `UP` with a passed check (`L4OK`).
    all_up: Duration,
    cpu_pct: f64,
    rss_mb: f64,
}

/// Accepts and drops connections on 0.0.0.0:80 inside the backend
/// namespace until dropped (the socket, made in that namespace, keeps
/// belonging to it).
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn start(t: &Topology, ns: &str) -> Result<Listener> {
        let l = t.in_ns(ns, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)))??;
        // Room for a whole round of SYNs at once (std listens with 128).
        // SAFETY: listen(2) again on a listening socket only resizes its
        // backlog.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => drop(s),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => {}
                }
            }
        });
        Ok(Listener {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// utime + stime of `pid`, all its threads, in seconds.
fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15; after ") " the first is field 3.
    match (f.get(11), f.get(12)) {
        (Some(u), Some(s)) => Ok((u + s) / clk_tck()),
        _ => bail!("unexpected /proc/{pid}/stat"),
    }
}

fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// Settles, then `pid`'s CPU (% of one core) over [`WINDOW`] and its RSS.
fn steady(pid: u32) -> Result<(f64, f64)> {
    std::thread::sleep(SETTLE);
    let (c0, t0) = (cpu_s(pid)?, Instant::now());
    std::thread::sleep(WINDOW);
    let (c1, t1) = (cpu_s(pid)?, Instant::now());
    Ok((100.0 * (c1 - c0) / (t1 - t0).as_secs_f64(), rss_mb(pid)?))
}

/// Polls `up` until it says every backend is up.
fn wait_all_up(mut up: impl FnMut() -> Result<bool>, what: &str) -> Result<()> {
    let deadline = Instant::now() + UP_WITHIN;
    loop {
        if up().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not every backend up within {UP_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every check answers from scratch: no neighbour entry left by the
/// contender before.
fn flush_neighbours(t: &Topology) -> Result<()> {
    t.exec(t.lb().ns(), &["ip", "neigh", "flush", "all"])
        .map(drop)
}

fn lbd_config(t: &Topology, dir: &Path, vips: usize) -> String {
    let lb = t.lb();
    let mut c = format!(
        "[instance]\nname = \"{name}\"\ninterface = \"{dev}\"\nxdp_mode = \"native\"\non_exit = \"detach\"\n\
         api_socket = \"{d}/lbd.sock\"\nstate_file = \"{d}/state.json\"\nmetrics_listen = \"{METRICS}\"\n\
         [dataplane]\nmax_vips = 16\nmax_backends = {max}\nconntrack_entries = 65536\nencap_source_v4 = \"{src}\"\n",
        name = t.instance_name(),
        dev = lb.ifname(),
        d = dir.display(),
        max = vips * BACKENDS + 1,
        src = lb.ipv4(),
    );
    for v in 1..=vips {
        c.push_str(&format!(
            "[[vip]]\naddress = \"{}:{PORT}/tcp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"tcp\"\ninterval = \"1s\"\ntimeout = \"1s\"\n",
            addressing::vip_v4(v as u8)
        ));
        for i in 0..BACKENDS {
            c.push_str(&format!(
                "[[vip.backend]]\naddress = \"{}\"\n",
                backend_addr(i)
            ));
        }
    }
    c
}

fn run_lbd(t: &Topology, vips: usize) -> Result<Row> {
    let dir = std::env::temp_dir().join(format!("{}-scale-lbd{vips}", t.id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("lb.toml");
    std::fs::write(&config, lbd_config(t, &dir, vips))?;
    // Removes the pins and the directory however this ends.
    let _teardown = lbd::Teardown::in_netns(config.clone(), t.lb().ns());
    flush_neighbours(t)?;
    let mut cmd = Command::new(lb_tests::lbd_path()?);
    cmd.arg("--config").arg(&config);
    let started = Instant::now();
    let mut p = t.spawn(t.lb().ns(), &mut cmd)?;
    p.wait_for_line(|l| l.contains("\"ready\""), UP_WITHIN)?;
    let ready = started.elapsed();
    let total = vips * BACKENDS;
    wait_all_up(
        || {
            let m = scrape::scrape(t, METRICS)?;
            Ok(m.lines()
                .filter(|l| l.starts_with("lb_backend_up{") && l.ends_with(" 1"))
                .count()
                >= total)
        },
        "lbd",
    )?;
    let all_up = started.elapsed();
    let (cpu_pct, rss_mb) = steady(p.pid())?;
    let _ = lbd::stop(&mut p);
    Ok(Row {
        name: format!(
            "xdplb (lbd), {vips} VIP{} x {BACKENDS}",
            if vips > 1 { "s" } else { "" }
        ),
        checks_per_s: total,
        ready: Some(ready),
        all_up,
        cpu_pct,
        rss_mb,
    })
}

fn haproxy_config(stats: &Path, lb: IpAddr, sections: usize) -> String {
    let mut c = format!(
        "global\n    stats socket {} mode 600 level admin\n    maxconn 4000\n\
         defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n\
         frontend vip\n    bind {lb}:{PORT}\n    default_backend b1\n",
        stats.display()
    );
    for s in 1..=sections {
        c.push_str(&format!("backend b{s}\n    balance roundrobin\n"));
        for i in 0..BACKENDS {
            c.push_str(&format!(
                "    server s{i} {}:{PORT} check inter 1s\n",
                backend_addr(i)
            ));
        }
    }
    c
}

/// `show stat` over HAProxy's stats socket: how many servers are `UP`
/// with a passed layer-4 check.
fn haproxy_up(stats: &Path) -> Result<usize> {
    let mut s = UnixStream::connect(stats)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"show stat\n")?;
    let mut csv = String::new();
    s.read_to_string(&mut csv)?;
    let mut lines = csv.lines();
    let head: Vec<&str> = lines
        .next()
        .context("empty stats")?
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| head.iter().position(|h| *h == name);
    let (Some(sv), Some(st), Some(chk)) = (col("svname"), col("status"), col("check_status"))
    else {
        bail!("unexpected stats header");
    };
    Ok(lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| {
            f.len() > chk.max(st).max(sv)
                && !matches!(f[sv], "FRONTEND" | "BACKEND")
                && f[st] == "UP"
                && f[chk].contains("L4OK")
        })
        .count())
}

fn run_haproxy(t: &Topology, sections: usize) -> Result<Row> {
    let dir: PathBuf = std::env::temp_dir().join(format!("{}-scale-haproxy{sections}", t.id()));
    std::fs::create_dir_all(&dir)?;
    let stats = dir.join("stats.sock");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(&stats, t.lb().ipv4().into(), sections))?;
    flush_neighbours(t)?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let started = Instant::now();
    let mut p: Spawned = t
        .spawn(t.lb().ns(), &mut cmd)
        .context("haproxy (Debian package)")?;
    let total = sections * BACKENDS;
    let up = wait_all_up(|| Ok(haproxy_up(&stats)? >= total), "haproxy");
    let all_up = started.elapsed();
    let measured = up.and_then(|()| steady(p.pid()));
    p.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let (cpu_pct, rss_mb) = measured?;
    Ok(Row {
        name: format!(
            "HAProxy 2.6, {sections} backend section{} x {BACKENDS}",
            if sections > 1 { "s" } else { "" }
        ),
        checks_per_s: total,
        ready: None,
        all_up,
        cpu_pct,
        rss_mb,
    })
}

/// Markdown for the scale section.
pub fn run() -> Result<String> {
    let t = Topology::new(1)?;
    let b = t.backend(0);
    let batch: String = (0..BACKENDS)
        .map(|i| format!("address add {}/32 dev lo\n", backend_addr(i)))
        .collect();
    let file = std::env::temp_dir().join(format!("{}-scale-addrs", t.id()));
    std::fs::write(&file, batch)?;
    let added = t.exec(b.ns(), &["ip", "-batch", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    added.context("adding the backend addresses")?;
    t.exec(
        t.lb().ns(),
        &[
            "ip",
            "route",
            "add",
            "198.18.16.0/22",
            "via",
            &b.ipv4().to_string(),
        ],
    )?;
    let _listener = Listener::start(&t, b.ns())?;
    let mut md = format!(
        "{BACKENDS} backend addresses on one backend namespace (routed from the LB through one next hop), one listener answering them all; every backend checked over TCP every second (lbd: `type = \"tcp\"`, `interval = \"1s\"`; HAProxy: `check inter 1s`, TCP mode). Ready: lbd's `ready` line, from its start (next hops resolved, every backend checked once, rings programmed, program attached). All up: from the start until every backend is up (lbd: `lb_backend_up` 1 for all of them on its metrics; HAProxy: every server `UP` with `L4OK` on its stats socket). CPU: utime + stime of the process (all threads) over {} s, {} s after all were up, in % of one core; RSS from /proc/PID/status. The checking CPU of both drifts by half or more from one run to the next on this shared machine, so each setting runs lbd and HAProxy in {PAIRS} adjacent pairs, alternating which goes first: medians of {PAIRS} runs (CPU: their range in brackets), and lbd's CPU against HAProxy's as the median of the pairs' ratios.\n\n\
         | balancer | checks/s | ready (s) | all up (s) | CPU (% of a core) | lbd / HAProxy CPU | RSS (MB) |\n|---|---:|---:|---:|---:|---:|---:|\n",
        WINDOW.as_secs(),
        SETTLE.as_secs(),
    );
    for vips in [1, 10] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for pair in 0..PAIRS {
            if pair % 2 == 0 {
                ours.push(run_lbd(&t, vips)?);
                theirs.push(run_haproxy(&t, vips)?);
            } else {
                theirs.push(run_haproxy(&t, vips)?);
                ours.push(run_lbd(&t, vips)?);
            }
        }
        let ratios: Vec<f64> = ours
            .iter()
            .zip(&theirs)
            .map(|(o, h)| o.cpu_pct / h.cpu_pct)
            .collect();
        let (lo, hi) = range(&ratios);
        md.push_str(&row_of(
            &ours,
            &format!("{:.2} ({lo:.2}-{hi:.2})", median(ratios.clone())),
        ));
        md.push_str(&row_of(&theirs, "-"));
    }
    Ok(md)
}

/// Adjacent runs of lbd and HAProxy per setting.
const PAIRS: usize = 3;

/// One table row: the medians of `runs` of one balancer and setting.
fn row_of(runs: &[Row], versus: &str) -> String {
    let med = |f: &dyn Fn(&Row) -> f64| median(runs.iter().map(f).collect());
    let cpu: Vec<f64> = runs.iter().map(|r| r.cpu_pct).collect();
    let (lo, hi) = range(&cpu);
    let ready = if runs.iter().all(|r| r.ready.is_some()) {
        format!("{:.2}", med(&|r| r.ready.map_or(0.0, |d| d.as_secs_f64())))
    } else {
        "-".to_owned()
    };
    format!(
        "| {} | {} | {ready} | {:.2} | {:.1} ({lo:.1}-{hi:.1}) | {versus} | {:.0} |\n",
        runs[0].name,
        runs[0].checks_per_s,
        med(&|r| r.all_up.as_secs_f64()),
        median(cpu.clone()),
        med(&|r| r.rss_mb),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_distinct_backend_addresses_in_one_slash_22() {
        let all: std::collections::BTreeSet<_> = (0..BACKENDS).map(backend_addr).collect();
        assert_eq!(all.len(), BACKENDS);
        assert_eq!(backend_addr(0).to_string(), "198.18.16.1");
        assert_eq!(backend_addr(BACKENDS - 1).to_string(), "198.18.19.250");
    }
}
