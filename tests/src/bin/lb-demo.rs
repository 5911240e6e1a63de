//! `cargo xtask demo`: the balancer doing its job, in network namespaces on
//! this machine. Three HTTP backends behind one VIP, real client traffic,
//! then a backend dies, one is drained, lbd restarts under load, the dead
//! backend comes back through its slow start, and a configuration change is
//! previewed and reloaded.
//! Everything is torn down at the end or on Ctrl-C; `--keep` leaves it
//! running for exploration.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    HttpConn, Spawned, Topology, addressing, demo, fabric, in_netns, lbctl_path, lbd_path,
};
use lb_userspace::dataplane::AttachMode;

const PORT: u16 = 80;
const INTERVAL_MS: u64 = 500;
const FALL: u64 = 2;
const TIMEOUT_MS: u64 = 300;

/// One request of the load generator: when, and who answered (None: failed).
struct Sample {
    at: Instant,
    backend: Option<String>,
}

struct Load {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    /// New connections, one GET each, every 10 ms, from the client namespace.
    fn start(client_ns: &str, vip: IpAddr) -> Load {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, ns) = (samples.clone(), stop.clone(), client_ns.to_owned());
        let thread = std::thread::spawn(move || {
            let _ = in_netns(&ns, move || {
                // Bounded even if nobody stops it: at most 30 minutes.
                let deadline = Instant::now() + Duration::from_secs(1800);
                while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let backend =
                        HttpConn::connect(SocketAddr::new(vip, PORT), Duration::from_secs(1))
                            .and_then(|mut c| c.get("/"))
                            .ok()
                            .map(|r| r.text().trim().to_owned());
                    if let Ok(mut v) = s.lock() {
                        v.push(Sample {
                            at: Instant::now(),
                            backend,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        });
        Load {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Per backend and failures, for samples in `[from, to)`.
    fn tally(&self, from: Instant, to: Instant) -> (BTreeMap<String, usize>, usize) {
        let mut per = BTreeMap::new();
        let mut failed = 0;
        if let Ok(v) = self.samples.lock() {
            for s in v.iter().filter(|s| s.at >= from && s.at < to) {
                match &s.backend {
                    Some(b) => *per.entry(b.clone()).or_insert(0) += 1,
                    None => failed += 1,
                }
            }
        }
        (per, failed)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn line(per: &BTreeMap<String, usize>, failed: usize) -> String {
    let mut s = String::new();
    for b in ["backend0", "backend1", "backend2"] {
        s.push_str(&format!("{b} {:>4}   ", per.get(b).copied().unwrap_or(0)));
    }
    s.push_str(&format!("failed {failed}"));
    s
}

/// Prints a line per second of what the load generator saw.
fn watch(load: &Load, seconds: u64) -> Result<(BTreeMap<String, usize>, usize)> {
    let start = Instant::now();
    let mut total = BTreeMap::new();
    let mut failed_total = 0;
    for i in 0..seconds {
        if demo::stopped() {
            bail!("interrupted");
        }
        let from = start + Duration::from_secs(i);
        std::thread::sleep(
            (from + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
        );
        let (per, failed) = load.tally(from, from + Duration::from_secs(1));
        println!("    +{}s  {}", i + 1, line(&per, failed));
        for (k, v) in per {
            *total.entry(k).or_insert(0) += v;
        }
        failed_total += failed;
    }
    Ok((total, failed_total))
}

fn lbctl(socket: &Path, args: &[&str]) -> Result<String> {
    lb_tests::lbctl(socket, args)
}

fn start_lbd(t: &Topology, config: &Path) -> Result<Spawned> {
    let mut cmd = Command::new(lbd_path()?);
    cmd.arg("--config").arg(config);
    let mut lbd = t.spawn(t.lb().ns(), &mut cmd)?;
    lbd.wait_for_line(|l| l.contains("\"ready\""), Duration::from_secs(30))?;
    Ok(lbd)
}

fn stop_lbd(mut lbd: Spawned) -> Result<()> {
    // SAFETY: plain kill(2) on a child we own.
    unsafe { libc::kill(lbd.pid() as i32, libc::SIGTERM) };
    lbd.wait_for_line(|l| l.contains("final_counters"), Duration::from_secs(10))?;
    lbd.stop();
    Ok(())
}

fn scrape(t: &Topology) -> Result<String> {
    in_netns(t.lb().ns(), || -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9100")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    })?
}

fn run(keep: bool) -> Result<()> {
    let started = Instant::now();
    println!("== Topology: client, lb and 3 backends in network namespaces, one bridge");
    let t = Topology::new(3)?;
    let mut servers = t.start_servers(PORT, 53)?;
    let fabric = fabric::prepare(&t, AttachMode::Generic)?;
    let vip: IpAddr = addressing::vip_v4(1).into();
    t.add_vip_on_backends(vip)?;
    println!(
        "   VIP {vip}:{PORT} (ipip to the backends, where lbd in the backend role decapsulates with XDP; they answer the client directly)"
    );

    let dir = PathBuf::from(format!("/tmp/{}-demo", t.id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("lb.toml");
    let socket = dir.join("lbd.sock");
    let template = include_str!("../../../lb-userspace/config/demo.toml");
    let backends = lb_tests::lbd::backend_tables(t.backends());
    let render = |backends: &str| {
        template
            .replace("@NAME@", &t.instance_name())
            .replace("@INTERFACE@", t.lb().ifname())
            .replace("@DIR@", &dir.display().to_string())
            .replace("@LB@", &t.lb().ipv4().to_string())
            .replace("@VIP@", &vip.to_string())
            .replace("@BACKENDS@", backends)
    };
    std::fs::write(&config, render(&backends))?;
    // lbd keeps its data plane on exit (hitless restart): unpin it however
    // the demo ends.
    let _unpin = lb_tests::lbd::Teardown::new(config.clone());

    let lbd = start_lbd(&t, &config)?;
    println!(
        "== lbd is up ({}); client traffic: a new connection and request every 10 ms",
        config.display()
    );
    let load = Load::start(t.client().ns(), vip);
    let (per, failed) = watch(&load, 4)?;
    println!("   steady state: {}", line(&per, failed));

    println!(
        "== Killing backend1's server (health check: every {INTERVAL_MS} ms, down after {FALL} failures)"
    );
    let killed = Instant::now();
    servers[1].stop();
    let mut lbd = lbd;
    lbd.wait_for_line(
        |l| l.contains("\"backend\"") && l.contains("\"down\""),
        Duration::from_secs(10),
    )
    .context("lbd did not mark backend1 down")?;
    let detected = killed.elapsed();
    let bound = Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS);
    watch(&load, 3)?;
    let (_, window_failures) = load.tally(killed, killed + detected);
    let (after, after_failures) = load.tally(
        killed + detected + Duration::from_millis(50),
        Instant::now(),
    );
    println!(
        "   backend1 out of the ring after {} ms (detection bound {} ms); failed requests: {window_failures} inside that window, {after_failures} after it",
        detected.as_millis(),
        bound.as_millis()
    );
    println!("   since then: {}", line(&after, after_failures));

    println!("== Draining backend2: open connections stay, new ones go elsewhere");
    let vip_s = format!("{vip}:{PORT}/tcp");
    let mut persistent = in_netns(t.client().ns(), move || {
        (0..80)
            .filter_map(|_| {
                let mut c =
                    HttpConn::connect(SocketAddr::new(vip, PORT), Duration::from_secs(1)).ok()?;
                (c.get("/").ok()?.text().trim() == "backend2").then_some(c)
            })
            .take(3)
            .collect::<Vec<_>>()
    })?;
    lbctl(
        &socket,
        &["drain", &vip_s, &t.backend(2).ipv4().to_string()],
    )?;
    let drained_at = Instant::now();
    watch(&load, 3)?;
    let (after_drain, _) = load.tally(drained_at + Duration::from_millis(50), Instant::now());
    let answers: Vec<String> = in_netns(t.client().ns(), move || {
        persistent
            .iter_mut()
            .map(|c| {
                c.get("/")
                    .map(|r| r.text().trim().to_owned())
                    .unwrap_or_else(|e| format!("error: {e}"))
            })
            .collect()
    })?;
    println!(
        "   new connections to backend2 since the drain: {}; its {} open connections still answer: {:?}",
        after_drain.get("backend2").copied().unwrap_or(0),
        answers.len(),
        answers
    );

    println!("== Restarting lbd under load (the pinned data plane keeps forwarding meanwhile)");
    let restart = Instant::now();
    stop_lbd(lbd)?;
    let mut lbd = start_lbd(&t, &config)?;
    let restarted = restart.elapsed();
    watch(&load, 3)?;
    let (_, restart_failures) = load.tally(restart, Instant::now());
    println!(
        "   lbd was away {} ms; failed requests across the restart: {restart_failures}",
        restarted.as_millis()
    );

    println!(
        "== backend1's server is back: after 2 passing checks it ramps up over its 6 s slow start"
    );
    let any = IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED);
    let b1 = t.backend(1);
    servers[1] = t.start_server(
        b1.ns(),
        b1.name(),
        &[SocketAddr::new(any, PORT)],
        &[SocketAddr::new(any, 53)],
    )?;
    lbd.wait_for_line(
        |l| l.contains("\"backend\"") && l.contains("\"up\""),
        Duration::from_secs(10),
    )
    .context("lbd did not mark backend1 up")?;
    watch(&load, 7)?;

    println!("== Preview, then reload: the file now gives backend0 weight 300");
    let heavier = backends.replacen(
        &format!("address = \"{}\"\n", t.backend(0).ipv4()),
        &format!("address = \"{}\"\nweight = 300\n", t.backend(0).ipv4()),
        1,
    );
    let next = dir.join("next.toml");
    std::fs::write(&next, render(&heavier))?;
    let preview = lbctl(&socket, &["diff", &next.display().to_string()])?;
    println!("   $ lbctl diff {}", next.display());
    println!("   {}", preview.trim_end().replace('\n', "\n   "));
    std::fs::copy(&next, &config)?;
    let reload = Instant::now();
    let applied = lbctl(&socket, &["reload"])?;
    println!("   $ lbctl reload");
    println!("   {}", applied.trim_end().replace('\n', "\n   "));
    watch(&load, 3)?;
    let (_, reload_failures) = load.tally(reload, Instant::now());
    println!("   failed requests across the reload: {reload_failures}");

    let metrics = scrape(&t)?;
    println!("== Metrics: inside the lb namespace, http://127.0.0.1:9100/metrics, for example:");
    for l in metrics.lines().filter(|l| {
        l.starts_with("lb_backend_packets_total")
            || l.starts_with("lb_backend_state") && l.ends_with(" 1")
    }) {
        println!("   {l}");
    }
    println!(
        "   {}",
        lbctl(&socket, &["list"])?.trim_end().replace('\n', "\n   ")
    );
    drop(load);

    if keep {
        println!("== --keep: everything stays up until Ctrl-C. Try:");
        println!(
            "   {} --socket {} list | stats | top | explain {vip_s} 198.18.0.10:40000",
            lbctl_path()?.display(),
            socket.display()
        );
        println!(
            "   ip netns exec {} curl -s 127.0.0.1:9100/metrics | grep ^lb_vip",
            t.lb().ns()
        );
        println!("   ip netns exec {} curl -s http://{vip}/", t.client().ns());
        if let Some(b) = fabric.backends().first() {
            println!(
                "   {} --socket {} list     (backend0's lbd, in the backend role)",
                lbctl_path()?.display(),
                b.socket().display()
            );
        }
        println!("   namespaces: {}", t.namespaces().join(" "));
        while !demo::stopped() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "== Tearing down (lbctl teardown, then the namespaces); the demo took {} s",
        started.elapsed().as_secs()
    );
    lbctl(&socket, &["teardown"]).ok();
    let mut lbd = lbd;
    let _ = lbd.wait_for_line(|l| l.contains("final_counters"), Duration::from_secs(10));
    if after_failures > 0 {
        bail!("requests failed after the detection window: {after_failures}");
    }
    if restart_failures > 0 {
        bail!("requests failed across the lbd restart: {restart_failures}");
    }
    if reload_failures > 0 {
        bail!("requests failed across the reload: {reload_failures}");
    }
    Ok(())
}

fn main() -> ExitCode {
    demo::main("demo", run)
}
