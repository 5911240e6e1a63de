//! Safe changes, end to end with real lbd, real checks and real traffic:
//! no traffic to a backend before its first passing check, reload without
//! restart (only the difference applied, under load), a preview whose
//! predicted share of moved ring slots is the share that moves, slow
//! start, panic mode, flap damping and gradual weight changes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{HttpConn, Spawned, Topology, addressing, in_netns, lbd, scrape};
use lb_userspace::{api::VipStatus, dataplane::AttachMode, diff::ConfigDiff};

const PORT: u16 = 80;

/// A topology with test servers on every backend, the fabric, and a
/// directory for lbd's files.
struct Lab {
    t: Topology,
    servers: Vec<Spawned>,
    _fabric: lb_tests::fabric::Fabric,
    dir: PathBuf,
    config: PathBuf,
}

impl Lab {
    fn new(backends: usize, name: &str) -> Lab {
        let t = Topology::new(backends).unwrap();
        let servers = t.start_servers(PORT, 53).unwrap();
        let fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
        for n in 1..=2 {
            t.add_vip_on_backends(addressing::vip_v4(n).into()).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("{}-{name}", t.id()));
        std::fs::create_dir_all(&dir).unwrap();
        Lab {
            config: dir.join("lb.toml"),
            t,
            servers,
            _fabric: fabric,
            dir,
        }
    }

    fn preamble(&self, instance_extra: &str) -> String {
        lbd::Preamble {
            instance_extra,
            ..Default::default()
        }
        .render(&self.t, &self.dir)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("lbd.sock")
    }

    fn write(&self, path: &Path, vips: &str) {
        std::fs::write(path, format!("{}{vips}", self.preamble(METRICS))).unwrap();
    }

    fn start(&self, vips: &str) -> Spawned {
        self.write(&self.config, vips);
        lbd::start(&self.t, &self.config).unwrap().0
    }

    fn list(&self) -> Vec<VipStatus> {
        let out = lb_tests::lbctl(&self.socket(), &["list", "--json"]).unwrap();
        serde_json::from_str(&out).unwrap()
    }

    fn vip(&self, n: u8) -> VipStatus {
        let name = format!("{}:{PORT}/tcp", addressing::vip_v4(n));
        self.list()
            .into_iter()
            .find(|v| v.vip == name)
            .unwrap_or_else(|| panic!("no VIP {name}"))
    }

    fn backend(&self, i: usize) -> IpAddr {
        self.t.backend(i).ipv4().into()
    }

    fn name(&self, i: usize) -> String {
        self.t.backend(i).name().to_owned()
    }

    /// Which backend each of `n` new connections to VIP `vip` reaches.
    fn spread(&self, vip: u8, n: usize) -> BTreeMap<String, usize> {
        let target = SocketAddr::new(addressing::vip_v4(vip).into(), PORT);
        self.t
            .in_client(move || {
                let mut seen = BTreeMap::new();
                for _ in 0..n {
                    let who = HttpConn::connect(target, Duration::from_secs(3))
                        .and_then(|mut c| c.get("/"))
                        .map_or_else(|e| format!("failed: {e:#}"), |r| r.text().trim().to_owned());
                    *seen.entry(who).or_insert(0) += 1;
                }
                seen
            })
            .unwrap()
    }

    fn scrape(&self) -> String {
        scrape::scrape(&self.t, METRICS_ADDR).unwrap()
    }

    /// Restarts backend `i`'s test server (HTTP and UDP echo on every
    /// address).
    fn restart_server(&mut self, i: usize) {
        let any = IpAddr::from(Ipv4Addr::UNSPECIFIED);
        let b = self.t.backend(i);
        self.servers[i] = self
            .t
            .start_server(
                b.ns(),
                b.name(),
                &[SocketAddr::new(any, PORT)],
                &[SocketAddr::new(any, 53)],
            )
            .unwrap();
    }
}

const METRICS_ADDR: &str = "127.0.0.1:9464";
const METRICS: &str = "metrics_listen = \"127.0.0.1:9464\"\n";

fn vip_table(n: u8, extra: &str, check: &str, backends: &str) -> String {
    format!(
        "[[vip]]\naddress = \"{}:{PORT}/tcp\"\nmode = \"ipip\"\n{extra}{check}{backends}",
        addressing::vip_v4(n)
    )
}

const TCP_CHECK: &str = "[vip.health_check]\ntype = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1\n";

fn backends(lab: &Lab, list: &[(usize, u32)]) -> String {
    list.iter()
        .map(|(i, w)| {
            format!(
                "[[vip.backend]]\naddress = \"{}\"\nweight = {w}\n",
                lab.backend(*i)
            )
        })
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// Before: a backend down at a fresh start got traffic until its checks
/// failed (7 of 100 requests failed in the first 1.5 s). Now the first
/// round of checks runs before the first ring is published.
#[test]
fn a_fresh_start_sends_nothing_to_a_backend_that_is_down() {
    let mut lab = Lab::new(3, "fresh");
    lab.servers[2].stop();
    let vip = vip_table(
        1,
        "",
        "[vip.health_check]\ntype = \"tcp\"\ninterval = \"2s\"\ntimeout = \"300ms\"\n",
        &backends(&lab, &[(0, 100), (1, 100), (2, 100)]),
    );
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let _lbd = lab.start(&vip);
    // At once after ready, for 1.5 s: every new connection must succeed.
    let target = SocketAddr::new(addressing::vip_v4(1).into(), PORT);
    let (ok, failed) = lab
        .t
        .in_client(move || {
            let started = Instant::now();
            let (mut ok, mut failed) = (0, Vec::new());
            while started.elapsed() < Duration::from_millis(1500) {
                match HttpConn::connect(target, Duration::from_secs(1)).and_then(|mut c| c.get("/"))
                {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            (ok, failed)
        })
        .unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok >= 100, "only {ok} requests in 1.5 s");
    let v = lab.vip(1);
    let b2 = v
        .backends
        .iter()
        .find(|b| b.address == lab.backend(2))
        .unwrap();
    assert_eq!(format!("{:?}", b2.health), "Down");
    eprintln!("fresh start with one backend down: {ok} requests in 1.5 s, none failed");
}

#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    /// Failures per backend the connection was on (`new` for a new one).
    failed: BTreeMap<String, Vec<String>>,
}

/// Requests until told to stop: persistent connections (each on the
/// backend it first reached) and a new connection per round.
fn load(t: &Topology, vip: u8, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Tally> {
    let ns = t.client().ns().to_owned();
    let target = SocketAddr::new(addressing::vip_v4(vip).into(), PORT);
    std::thread::spawn(move || {
        in_netns(&ns, move || {
            let mut tally = Tally::default();
            let mut persistent: Vec<(HttpConn, String)> = (0..12)
                .map(|_| {
                    let mut c = HttpConn::connect(target, Duration::from_secs(2)).unwrap();
                    let who = c.get("/").unwrap().text().trim().to_owned();
                    (c, who)
                })
                .collect();
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 4000 {
                rounds += 1;
                for (c, who) in persistent.iter_mut() {
                    match c.get("/") {
                        Ok(r) if r.text().trim() == who => tally.ok += 1,
                        Ok(r) => tally
                            .failed
                            .entry(who.clone())
                            .or_default()
                            .push(format!("moved to {}", r.text())),
                        Err(e) => tally
                            .failed
                            .entry(who.clone())
                            .or_default()
                            .push(format!("{e:#}")),
                    }
                }
                match HttpConn::connect(target, Duration::from_secs(2)).and_then(|mut c| c.get("/"))
                {
                    Ok(_) => tally.ok += 1,
                    Err(e) => tally
                        .failed
                        .entry("new".into())
                        .or_default()
                        .push(format!("{e:#}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            tally
        })
        .unwrap()
    })
}

/// A reload adds a VIP, removes a backend and changes a weight under load:
/// no request fails on a connection to a backend that stays, no new
/// connection fails, an unchanged VIP's ring is not republished. A bad
/// file and a change only a restart applies are refused and change
/// nothing; SIGHUP reloads like `lbctl reload`.
#[test]
fn reload_applies_only_the_difference_under_load() {
    let lab = Lab::new(4, "reload");
    let socket = lab.socket();
    let vip1 = |list: &[(usize, u32)]| vip_table(1, "", TCP_CHECK, &backends(&lab, list));
    let vip3 = "[[vip]]\naddress = \"198.18.100.2:53/udp\"\nmode = \"ipip\"\n".to_owned()
        + &backends(&lab, &[(0, 100), (1, 100)]);
    let before = vip1(&[(0, 100), (1, 100), (2, 100), (3, 100)]) + &vip3;
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let mut lbd = lab.start(&before);
    let flips = |name: &str| {
        lab.list()
            .into_iter()
            .find(|v| v.vip == name)
            .map(|v| v.ring_flips)
    };
    let udp_flips = flips("198.18.100.2:53/udp").unwrap();
    let vip1_flips = lab.vip(1).ring_flips;

    let stop = Arc::new(AtomicBool::new(false));
    let client = load(&lab.t, 1, stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    // Refused, and nothing changes: a bad line, and a setting only a
    // restart applies.
    let listed = serde_json::to_string(&lab.list()).unwrap();
    let bad = before.replace("weight = 100", "weight = 70000");
    lab.write(&lab.config, &bad);
    let (code, _, err) = lb_tests::lbctl_output(&socket, &["reload"]).unwrap();
    assert_eq!(code, 1, "{err}");
    let path = lab.config.display().to_string();
    assert!(
        err.contains(&format!("{path}:"))
            && err.contains("weight")
            && err.contains("nothing was changed"),
        "{err}"
    );
    let text = std::fs::read_to_string(&lab.config)
        .unwrap()
        .replace("[dataplane]\n", "[dataplane]\nhash_seed = 99\n");
    std::fs::write(&lab.config, text.replace("weight = 70000", "weight = 100")).unwrap();
    let (code, _, err) = lb_tests::lbctl_output(&socket, &["reload"]).unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("dataplane.hash_seed") && err.contains("restart"),
        "{err}"
    );
    assert_eq!(serde_json::to_string(&lab.list()).unwrap(), listed);

    // The change: VIP 2 added, backend 3 removed, backend 1 reweighted.
    let vip2 = vip_table(2, "", "", &backends(&lab, &[(0, 100), (1, 100)]));
    let after = vip1(&[(0, 100), (1, 300), (2, 100)]) + &vip3 + &vip2;
    let preview = lab.dir.join("next.toml");
    lab.write(&preview, &after);
    let shown = lb_tests::lbctl(&socket, &["diff", preview.to_str().unwrap()]).unwrap();
    assert!(
        shown.contains(&format!("  - {}", lab.backend(3))),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("  ~ {} weight 100 -> 300", lab.backend(1))),
        "{shown}"
    );
    assert!(
        shown.contains("198.18.100.2:80/tcp: added, 2 backends"),
        "{shown}"
    );
    assert!(shown.contains("198.18.100.2:53/udp: unchanged"), "{shown}");
    assert!(shown.contains("2 of 3 VIPs would change"), "{shown}");
    assert_eq!(
        serde_json::to_string(&lab.list()).unwrap(),
        listed,
        "a preview changes nothing"
    );
    lab.write(&lab.config, &after);
    let applied: ConfigDiff =
        serde_json::from_str(&lb_tests::lbctl(&socket, &["reload", "--json"]).unwrap()).unwrap();
    assert_eq!(applied.changes, 2, "{applied:?}");
    lbd.wait_for_line(
        |l| l.contains("\"event\":\"reload\"") && l.contains("\"ok\":true"),
        Duration::from_secs(5),
    )
    .unwrap();

    let v1 = lab.vip(1);
    assert_eq!(v1.backends.len(), 3);
    assert_eq!(
        v1.ring_flips,
        vip1_flips + 1,
        "one republication for the whole change"
    );
    assert_eq!(
        flips("198.18.100.2:53/udp"),
        Some(udp_flips),
        "unchanged VIP untouched"
    );
    // VIP 2 serves once its backends are in (no check: at once).
    let spread = lab.spread(2, 20);
    assert!(
        spread.keys().all(|k| !k.starts_with("failed")),
        "{spread:?}"
    );

    // SIGHUP reloads too: the weight back to 100.
    lab.write(
        &lab.config,
        &(vip1(&[(0, 100), (1, 100), (2, 100)]) + &vip3 + &vip2),
    );
    // SAFETY: plain kill(2) on our child.
    assert_eq!(unsafe { libc::kill(lbd.pid() as i32, libc::SIGHUP) }, 0);
    wait_until("SIGHUP applied", Duration::from_secs(5), || {
        lab.vip(1).backends.iter().all(|b| b.weight == 100)
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let tally = client.join().unwrap();
    let removed = lab.name(3);
    let bad: Vec<_> = tally
        .failed
        .iter()
        .filter(|(who, _)| **who != removed)
        .collect();
    assert!(
        bad.is_empty(),
        "failures on connections that should not break: {bad:?}"
    );
    assert!(tally.ok > 200, "{tally:?}");
    eprintln!(
        "reload under load: {} requests ok, {} failed on the removed backend's connections only",
        tally.ok,
        tally.failed.get(&removed).map_or(0, Vec::len)
    );
}

/// The ring as the data plane serves it, by backend address; checks that
/// the fingerprint lbd reports is the live ring's.
fn live_ring(lab: &Lab, vip: &VipStatus) -> Vec<Option<IpAddr>> {
    let dir = lb_userspace::pinning::pin_dir(&lab.t.instance_name());
    let ids: BTreeMap<u32, IpAddr> = vip.backends.iter().map(|b| (b.id, b.address)).collect();
    let table = lb_userspace::programming::live_ring(&dir, vip.id).unwrap();
    assert_eq!(
        vip.ring_fingerprint,
        format!(
            "{:016x}",
            lb_userspace::controller::ring_fingerprint(&table, &ids)
        ),
        "the reported fingerprint is the live ring's"
    );
    table.into_iter().map(|id| ids.get(&id).copied()).collect()
}

/// `lbctl diff` and `lbd --check --diff` predict the share of ring slots a
/// change moves; after `lbctl reload` (and the added backend's first
/// passing check) exactly that share has moved in the live ring.
#[test]
fn the_preview_predicts_the_share_that_moves() {
    let lab = Lab::new(4, "diff");
    let before = vip_table(
        1,
        "",
        TCP_CHECK,
        &backends(&lab, &[(0, 100), (1, 100), (2, 100)]),
    );
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let _lbd = lab.start(&before);
    let ring_before = live_ring(&lab, &lab.vip(1));
    assert!(ring_before.iter().all(Option::is_some));
    let fingerprint_before = lab.vip(1).ring_fingerprint;

    let after = vip_table(
        1,
        "",
        TCP_CHECK,
        &backends(&lab, &[(1, 200), (2, 100), (3, 100)]),
    );
    let next = lab.dir.join("next.toml");
    lab.write(&next, &after);
    let online: ConfigDiff = serde_json::from_str(
        &lb_tests::lbctl(&lab.socket(), &["diff", next.to_str().unwrap(), "--json"]).unwrap(),
    )
    .unwrap();
    let predicted = online.vips[0].slots_moved.unwrap();
    // Without asking lbd: the state file and the pinned maps.
    let lbd_bin = lb_tests::lbd_path().unwrap();
    let offline = lab
        .t
        .in_ns(lab.t.lb().ns(), || {
            std::process::Command::new(&lbd_bin)
                .args([
                    "--config",
                    lab.config.to_str().unwrap(),
                    "--check",
                    "--diff",
                ])
                .arg(&next)
                .arg("--json")
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    let offline: ConfigDiff = serde_json::from_slice(&offline.stdout).unwrap();
    assert_eq!(
        offline.vips[0].slots_moved,
        Some(predicted),
        "offline and online agree"
    );

    lab.write(&lab.config, &after);
    lb_tests::lbctl(&lab.socket(), &["reload"]).unwrap();
    let b3 = lab.backend(3);
    wait_until(
        "the added backend's first check",
        Duration::from_secs(5),
        || {
            lab.vip(1)
                .backends
                .iter()
                .any(|b| b.address == b3 && b.effective_weight == 100)
        },
    );
    let ring_after = live_ring(&lab, &lab.vip(1));
    assert_ne!(lab.vip(1).ring_fingerprint, fingerprint_before);
    let moved = ring_before
        .iter()
        .zip(&ring_after)
        .filter(|(a, b)| a != b)
        .count() as f64
        / ring_before.len() as f64;
    eprintln!("predicted {predicted:.6} of ring slots to move, {moved:.6} moved");
    assert!(predicted > 0.3, "{predicted}");
    assert_eq!(moved, predicted);
}

/// A recovered backend's share of new connections grows over its slow
/// start instead of jumping to its full share.
#[test]
fn slow_start_ramps_a_recovered_backend() {
    let mut lab = Lab::new(3, "slowstart");
    let vip = vip_table(
        1,
        "slowstart = \"8s\"\n",
        TCP_CHECK,
        &backends(&lab, &[(0, 100), (1, 100), (2, 100)]),
    );
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let _lbd = lab.start(&vip);
    assert!(
        lab.vip(1)
            .backends
            .iter()
            .all(|b| b.effective_weight == 100),
        "no slow start at a start"
    );
    lab.servers[2].stop();
    let b2 = lab.backend(2);
    wait_until("backend 2 down", Duration::from_secs(5), || {
        lab.vip(1)
            .backends
            .iter()
            .any(|b| b.address == b2 && b.effective_weight == 0)
    });
    lab.restart_server(2);
    wait_until("backend 2 back", Duration::from_secs(5), || {
        lab.vip(1)
            .backends
            .iter()
            .any(|b| b.address == b2 && b.effective_weight > 0)
    });
    let started = Instant::now();
    let name = lab.name(2);
    let share = |lab: &Lab| {
        let s = lab.spread(1, 150);
        *s.get(&name).unwrap_or(&0) as f64 / 150.0
    };
    let early = share(&lab);
    let early_weight = lab.vip(1).backends[2].effective_weight;
    let mut weights = vec![early_weight];
    while started.elapsed() < Duration::from_secs(9) {
        std::thread::sleep(Duration::from_millis(500));
        weights.push(lab.vip(1).backends[2].effective_weight);
    }
    let metrics = lab.scrape();
    let late = share(&lab);
    eprintln!(
        "slow start: share {early:.3} in the first second, {late:.3} after; weights {weights:?}"
    );
    assert!(weights.windows(2).all(|w| w[0] <= w[1]), "{weights:?}");
    assert!(early_weight < 30, "{weights:?}");
    assert_eq!(weights.last(), Some(&100));
    assert!(early < 0.15, "early share {early}");
    assert!(late > 0.2, "late share {late}");
    let label = format!(
        "vip=\"{}:{PORT}/tcp\",backend=\"{b2}\"",
        addressing::vip_v4(1)
    );
    assert_eq!(
        scrape::sample(&metrics, "lb_backend_effective_weight", &label),
        Some(100)
    );
}

/// Four backends whose health endpoints fail on three while their service
/// answers: below `min_healthy` the ring keeps all four (fail open) and
/// requests keep succeeding; panic mode ends when enough recover.
#[test]
fn panic_mode_keeps_every_backend_when_too_few_are_healthy() {
    let lab = Lab::new(4, "panic");
    let any = IpAddr::from(Ipv4Addr::UNSPECIFIED);
    // Health endpoints on port 8080: only backend 0 has one.
    let health = |i: usize| {
        let b = lab.t.backend(i);
        lab.t
            .start_server(
                b.ns(),
                &format!("health{i}"),
                &[SocketAddr::new(any, 8080)],
                &[],
            )
            .unwrap()
    };
    let _h0 = health(0);
    let check = "[vip.health_check]\ntype = \"http\"\npath = \"/health\"\nport = 8080\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1\n";
    let vip = vip_table(
        1,
        "min_healthy = 0.5\n",
        check,
        &backends(&lab, &[(0, 100), (1, 100), (2, 100), (3, 100)]),
    );
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let mut lbd = lab.start(&vip);
    // The first round of checks found one of four healthy: in panic from
    // the first publication.
    let v = lab.vip(1);
    assert!(v.panic);
    assert!(
        v.backends.iter().all(|b| b.effective_weight == 100),
        "{v:?}"
    );
    let spread = lab.spread(1, 100);
    assert!(
        spread.keys().all(|k| !k.starts_with("failed")),
        "{spread:?}"
    );
    assert_eq!(spread.len(), 4, "all four serve: {spread:?}");
    let label = format!("vip=\"{}:{PORT}/tcp\"", addressing::vip_v4(1));
    let metrics = lab.scrape();
    assert_eq!(scrape::sample(&metrics, "lb_vip_panic", &label), Some(1));
    assert_eq!(
        scrape::sample(&metrics, "lb_vip_healthy_backends", &label),
        Some(1)
    );

    // Two more recover: 3 of 4 is enough; backend 3 leaves the ring.
    let _h1 = health(1);
    let _h2 = health(2);
    lbd.wait_for_line(
        |l| l.contains("\"event\":\"panic\"") && l.contains("\"panic\":false"),
        Duration::from_secs(5),
    )
    .unwrap();
    wait_until("backend 3 out", Duration::from_secs(5), || {
        lab.vip(1).backends[3].effective_weight == 0
    });
    let spread = lab.spread(1, 60);
    assert!(!spread.contains_key(&lab.name(3)), "{spread:?}");
    assert_eq!(
        scrape::sample(&lab.scrape(), "lb_vip_panic", &label),
        Some(0)
    );
}

/// A check target that flips every 300 ms: the backend is held out of the
/// ring, counted and reported, and comes back once it is steady.
#[test]
fn a_flapping_backend_is_held_down() {
    let lab = Lab::new(2, "flap");
    let check = "[vip.health_check]\ntype = \"tcp\"\nport = 8081\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 1\nfall = 1\nflap_limit = 4\nflap_window = \"3s\"\nflap_hold = \"2s\"\n";
    let any = IpAddr::from(Ipv4Addr::UNSPECIFIED);
    // Backend 0's check target is steady; backend 1's flips.
    let steady = {
        let b = lab.t.backend(0);
        lab.t
            .start_server(b.ns(), "steady", &[SocketAddr::new(any, 8081)], &[])
            .unwrap()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (ns, stop) = (lab.t.backend(1).ns().to_owned(), stop.clone());
        std::thread::spawn(move || {
            in_netns(&ns, move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                    let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8081)).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    drop(l);
                    std::thread::sleep(Duration::from_millis(300));
                }
                // Steady from here on.
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8081)).unwrap()
            })
            .unwrap()
        })
    };
    let vip = vip_table(1, "", check, &backends(&lab, &[(0, 100), (1, 100)]));
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let mut lbd = lab.start(&vip);
    lbd.wait_for_line(
        |l| l.contains("\"event\":\"flap\"") && l.contains("\"held\":true"),
        Duration::from_secs(10),
    )
    .unwrap();
    let b1 = lab.backend(1);
    let label = format!(
        "vip=\"{}:{PORT}/tcp\",backend=\"{b1}\"",
        addressing::vip_v4(1)
    );
    // Held: out of the ring even while its check passes.
    for _ in 0..10 {
        let v = lab.vip(1);
        let b = v.backends.iter().find(|b| b.address == b1).unwrap();
        assert!(b.flap_held && b.effective_weight == 0, "{b:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = lab.scrape();
    assert_eq!(
        scrape::sample(&metrics, "lb_backend_flap_held", &label),
        Some(1)
    );
    assert!(scrape::sample(&metrics, "lb_backend_flaps_total", &label).unwrap() >= 5);
    assert!(!lab.spread(1, 30).contains_key(&lab.name(1)));
    // Steady again: released once the window has no flaps left.
    stop.store(true, Ordering::Relaxed);
    let _listener = flipper.join().unwrap();
    let took = wait_until("released", Duration::from_secs(20), || {
        let v = lab.vip(1);
        let b = v.backends.iter().find(|b| b.address == b1).unwrap();
        !b.flap_held && b.effective_weight == 100
    });
    eprintln!("flapping backend released {took:?} after it became steady");
    drop(steady);
}

/// `set-weight --over` moves the weight in steps; another change to the
/// backend stops the ramp where it stands.
#[test]
fn a_weight_moves_gradually_and_a_drain_stops_the_ramp() {
    let lab = Lab::new(2, "ramp");
    let vip = vip_table(1, "", TCP_CHECK, &backends(&lab, &[(0, 100), (1, 100)]));
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let _lbd = lab.start(&vip);
    let (vip_s, b1) = (
        format!("{}:{PORT}/tcp", addressing::vip_v4(1)),
        lab.backend(1).to_string(),
    );
    let socket = lab.socket();
    let (code, _, err) = lb_tests::lbctl_output(
        &socket,
        &["set-weight", &vip_s, &b1, "300", "--over", "soon"],
    )
    .unwrap();
    assert_eq!(code, 2, "{err}");
    lb_tests::lbctl(&socket, &["set-weight", &vip_s, &b1, "300", "--over", "4s"]).unwrap();
    let mut seen = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(5000) {
        let b = lab.vip(1).backends[1].clone();
        assert_eq!(b.weight, 300, "the target is the configured weight");
        seen.push(b.effective_weight);
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("ramp 100 -> 300 over 4 s: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(seen.iter().any(|w| *w > 100 && *w < 300), "{seen:?}");
    assert_eq!(seen.last(), Some(&300));
    // Back down over 10 s, interrupted by a drain after about 3 s.
    lb_tests::lbctl(
        &socket,
        &["set-weight", &vip_s, &b1, "100", "--over", "10s"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(3200));
    lb_tests::lbctl(&socket, &["drain", &vip_s, &b1]).unwrap();
    let b = lab.vip(1).backends[1].clone();
    assert!(
        b.weight > 100 && b.weight < 300,
        "frozen where the ramp stood: {b:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lab.vip(1).backends[1].weight, b.weight, "the ramp stopped");
}

/// Runtime changes and the file, at a reload as at a start: an unchanged
/// file keeps what `lbctl` changed; a VIP whose backends were edited in the
/// file takes the file's (drains stay); a restart then agrees with the
/// reload.
#[test]
fn a_reload_keeps_runtime_changes_unless_the_file_was_edited() {
    let lab = Lab::new(3, "precedence");
    let socket = lab.socket();
    let file = |list: &[(usize, u32)]| vip_table(1, "", TCP_CHECK, &backends(&lab, list));
    let _teardown = lbd::Teardown::new(lab.config.clone());
    let mut lbd = lab.start(&file(&[(0, 100), (1, 100)]));
    let vip_s = format!("{}:{PORT}/tcp", addressing::vip_v4(1));
    let (b1, b2) = (lab.backend(1).to_string(), lab.backend(2).to_string());
    lb_tests::lbctl(&socket, &["add-backend", &vip_s, &b2]).unwrap();
    lb_tests::lbctl(&socket, &["drain", &vip_s, &b1]).unwrap();
    let shape = |lab: &Lab| -> Vec<(IpAddr, u32, bool)> {
        lab.vip(1)
            .backends
            .iter()
            .map(|b| (b.address, b.weight, b.drained))
            .collect()
    };
    let runtime = shape(&lab);
    assert_eq!(runtime.len(), 3);

    let out = lb_tests::lbctl(&socket, &["reload"]).unwrap();
    assert!(out.contains("0 of 1 VIPs applied"), "{out}");
    assert_eq!(
        shape(&lab),
        runtime,
        "an unchanged file keeps runtime changes"
    );

    lab.write(&lab.config, &file(&[(0, 100), (1, 50)]));
    let out = lb_tests::lbctl(&socket, &["reload"]).unwrap();
    assert!(out.contains(&format!("  - {b2}")), "{out}");
    let reloaded = shape(&lab);
    assert_eq!(
        reloaded,
        vec![(lab.backend(0), 100, false), (lab.backend(1), 50, true)],
        "the edited file wins for that VIP; the drain stays"
    );
    let (_, status) = lbd::stop(&mut lbd).unwrap();
    assert!(status.is_some_and(|s| s.success()));
    let _lbd = lbd::start(&lab.t, &lab.config).unwrap().0;
    assert_eq!(shape(&lab), reloaded, "a restart agrees with the reload");
}
