//! Graphite push into a real carbon-cache (Debian graphite-carbon), read
//! back from its whisper files; then carbon goes away and comes back: lbd
//! keeps answering, its memory stays bounded, and pushing resumes. An
//! outage longer than the memory buffer holds loses no interval (the rest
//! waits in the spool, replayed with its timestamps, also by the next lbd),
//! and a spool at its bound drops its oldest lines first.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Spawned, Topology, addressing, fabric::Fabric, lbd, split_echo, udp_echo_from};
use lb_userspace::dataplane::AttachMode;

const METRICS: &str = "127.0.0.1:9136";
const CARBON_PORT: u16 = 22003;

/// Lines in one push per VIP: its own 3 and 5 for each of its 2 backends.
const LINES_PER_VIP: u32 = 3 + 2 * 5;

fn carbon_config(dir: &Path) -> PathBuf {
    let data = dir.join("carbon");
    std::fs::create_dir_all(&data).unwrap();
    let conf = dir.join("carbon.conf");
    std::fs::write(
        &conf,
        format!(
            "[cache]\nSTORAGE_DIR = {d}/\nLOCAL_DATA_DIR = {d}/whisper/\nWHITELISTS_DIR = {d}/lists/\nLOG_DIR = {d}/log/\n\
             PID_DIR = {d}/\nENABLE_LOGROTATION = False\nUSER =\nMAX_CACHE_SIZE = inf\nMAX_UPDATES_PER_SECOND = 10000\n\
             MAX_CREATES_PER_MINUTE = inf\nLINE_RECEIVER_INTERFACE = 127.0.0.1\nLINE_RECEIVER_PORT = {CARBON_PORT}\n\
             ENABLE_UDP_LISTENER = False\nPICKLE_RECEIVER_INTERFACE = 127.0.0.1\nPICKLE_RECEIVER_PORT = 22004\n\
             CACHE_QUERY_INTERFACE = 127.0.0.1\nCACHE_QUERY_PORT = 22002\nENABLE_TAGS = False\nLOG_UPDATES = False\n",
            d = data.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("storage-schemas.conf"),
        "[default]\npattern = .*\nretentions = 1s:1h\n",
    )
    .unwrap();
    conf
}

/// carbon-cache in the LB's namespace (lbd pushes to its loopback).
fn start_carbon(t: &Topology, conf: &Path) -> Spawned {
    let mut cmd = Command::new("carbon-cache");
    cmd.arg(format!("--config={}", conf.display()))
        .args(["--debug", "start"]);
    let c = t
        .spawn(t.lb().ns(), &mut cmd)
        .expect("carbon-cache (Debian graphite-carbon; cargo xtask setup installs it)");
    // Ready when it accepts on the line receiver.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let up = lb_tests::in_netns(t.lb().ns(), || {
            std::net::TcpStream::connect(("127.0.0.1", CARBON_PORT)).is_ok()
        })
        .unwrap();
        if up {
            return c;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("carbon-cache did not start listening");
}

/// Whisper's points for `metric` (a dotted path) in the last ten minutes,
/// by second; `None` where it has no value.
fn whisper_points(dir: &Path, metric: &str) -> BTreeMap<u64, Option<f64>> {
    let file = dir
        .join("carbon/whisper")
        .join(metric.replace('.', "/") + ".wsp");
    let Ok(out) = Command::new("whisper-fetch")
        .args(["--from", &format!("{}", now() - 600)])
        .arg(&file)
        .output()
    else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ts = f.next()?.parse().ok()?;
            Some((ts, f.next()?.parse::<f64>().ok()))
        })
        .collect()
}

/// The newest value whisper holds for `metric`.
fn whisper_last(dir: &Path, metric: &str) -> Option<f64> {
    whisper_points(dir, metric)
        .into_values()
        .flatten()
        .next_back()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn wait_for(dir: &Path, metric: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    while Instant::now() < deadline {
        last = whisper_last(dir, metric);
        if last == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{metric}: whisper has {last:?}, expected {want}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn send(t: &Topology, vip: IpAddr, from_port: u16, n: u16) -> BTreeMap<String, u64> {
    t.in_client(move || {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let r = udp_echo_from(
                from_port + i,
                SocketAddr::new(vip, 53),
                b"graphite",
                Duration::from_secs(2),
            )
            .unwrap();
            *seen
                .entry(split_echo(&r).unwrap().0.to_owned())
                .or_insert(0u64) += 1;
        }
        seen
    })
    .unwrap()
}

/// A topology with carbon, and lbd pushing to it every second; traffic goes
/// to the first VIP. Fields drop in order: lbd and carbon before the
/// topology.
struct Lab {
    lbd: Spawned,
    carbon: Option<Spawned>,
    _fabric: Fabric,
    _servers: Vec<Spawned>,
    dir: PathBuf,
    config: PathBuf,
    carbon_conf: PathBuf,
    vip: IpAddr,
    t: Topology,
}

impl Lab {
    /// `graphite` is the rest of lbd's `[graphite]` table; the VIPs after
    /// the first (at most 4 in all) only add lines.
    fn start(name: &str, graphite: &str, vips: u8) -> Lab {
        let t = Topology::new(2).unwrap();
        let servers = t.start_servers(80, 53).unwrap();
        let fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
        let vip: IpAddr = addressing::vip_v4(1).into();
        t.add_vip_on_backends(vip).unwrap();
        let dir = std::env::temp_dir().join(format!("{}-{name}", t.id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let carbon_conf = carbon_config(&dir);
        let carbon = start_carbon(&t, &carbon_conf);

        let config = dir.join("lb.toml");
        let backends = lb_tests::lbd::backend_tables(t.backends());
        let tables: String = (1..=vips)
            .map(|i| {
                format!(
                    "[[vip]]\naddress = \"{}:53/udp\"\nmode = \"ipip\"\n\
                     [vip.health_check]\ntype = \"tcp\"\nport = 80\ninterval = \"500ms\"\ntimeout = \"300ms\"\n{backends}",
                    addressing::vip_v4(i)
                )
            })
            .collect();
        std::fs::write(
            &config,
            format!(
                "{pre}\
                 [graphite]\naddress = \"127.0.0.1:{CARBON_PORT}\"\nprefix = \"lbtest\"\ninterval = \"1s\"\n{graphite}{tables}",
                pre = lbd::Preamble {
                    instance_extra: &format!("metrics_listen = \"{METRICS}\"\n"),
                    ..Default::default()
                }
                .render(&t, &dir),
            ),
        )
        .unwrap();
        let (lbd, _) = lbd::start(&t, &config).unwrap();
        Lab {
            lbd,
            carbon: Some(carbon),
            _fabric: fabric,
            _servers: servers,
            dir,
            config,
            carbon_conf,
            vip,
            t,
        }
    }

    fn vip_path(&self) -> String {
        format!(
            "lbtest.{}",
            lb_userspace::graphite::component(&format!("{}:53/udp", self.vip))
        )
    }

    /// The metric the outage tests read: it is pushed every interval.
    fn packets(&self) -> String {
        format!("{}.all.packets", self.vip_path())
    }

    /// One of lbd's metrics now.
    fn metric(&self, name: &str) -> u64 {
        let text = lb_tests::scrape::scrape(&self.t, METRICS).unwrap();
        lb_tests::scrape::sample(&text, name, "").unwrap_or_else(|| panic!("{name} not exported"))
    }

    fn spool(&self) -> PathBuf {
        lb_userspace::graphite::spool_dir(&self.dir.join("state.json"))
    }

    /// Stops carbon; returns the second it was gone by.
    fn stop_carbon(&mut self) -> u64 {
        if let Some(mut c) = self.carbon.take() {
            c.stop();
        }
        now()
    }

    /// Returns the second before carbon started.
    fn start_carbon(&mut self) -> u64 {
        let before = now();
        self.carbon = Some(start_carbon(&self.t, &self.carbon_conf));
        before
    }

    fn finish(mut self) {
        lbd::stop(&mut self.lbd).unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The spool's size on disk and its oldest segment. Newest segments are
/// read first: lbd removes an old segment before it writes more into a new
/// one, so a sum taken while it works never holds both.
fn spool_on_disk(spool: &Path) -> (u64, Option<String>) {
    let Ok(entries) = std::fs::read_dir(spool) else {
        return (0, None);
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    let bytes = names
        .iter()
        .filter_map(|n| std::fs::metadata(spool.join(n)).ok())
        .map(|m| m.len())
        .sum();
    (bytes, names.pop())
}

/// What the spool looked like while carbon was away.
#[derive(Debug, Default)]
struct Watched {
    largest: u64,
    /// Oldest segments seen, in order: more than one means segments were
    /// dropped at the bound (a replay needs carbon).
    oldest: Vec<String>,
}

impl Watched {
    fn look(&mut self, spool: &Path) {
        let (bytes, oldest) = spool_on_disk(spool);
        self.largest = self.largest.max(bytes);
        if let Some(o) = oldest
            && self.oldest.last() != Some(&o)
        {
            self.oldest.push(o);
        }
    }

    /// Watches for `d`.
    fn watch(&mut self, spool: &Path, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.look(spool);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Seconds of `from..=until` whisper has no value for.
fn holes(points: &BTreeMap<u64, Option<f64>>, from: u64, until: u64) -> Vec<u64> {
    (from..=until)
        .filter(|s| points.get(s).copied().flatten().is_none())
        .collect()
}

/// lbd stamps a push with the second it is made in, one interval apart on a
/// monotonic clock. If that phase sits within a millisecond or two of a
/// second boundary, jitter skips a second now and then whether carbon is up
/// or not; only then are single skipped seconds accepted.
fn assert_no_hole(points: &BTreeMap<u64, Option<f64>>, up: (u64, u64), window: (u64, u64)) {
    let phase = holes(points, up.0, up.1);
    let missing = holes(points, window.0, window.1);
    let isolated = missing.windows(2).all(|w| w[1] > w[0] + 1);
    assert!(
        missing.is_empty() || (!phase.is_empty() && isolated),
        "no value for {missing:?} in {window:?} (with carbon up: {phase:?}); points: {:?}",
        points
            .range(up.0.min(window.0)..=window.1)
            .collect::<Vec<_>>()
    );
}

/// Waits until whisper has a value for every second of `window` (or gives
/// up and returns what it has): carbon writes points some time after it
/// takes them.
fn wait_complete(lab: &Lab, window: (u64, u64)) -> BTreeMap<u64, Option<f64>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let points = whisper_points(&lab.dir, &lab.packets());
        if holes(&points, window.0, window.1).is_empty() || Instant::now() > deadline {
            return points;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_gone(spool: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while spool.exists() {
        assert!(
            Instant::now() < deadline,
            "{} still there after the replay",
            spool.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pushes_land_in_carbon_and_survive_its_outage() {
    let mut lab = Lab::start("graphite", "max_buffered_lines = 500\n", 1);
    let (t, dir, vip) = (&lab.t, lab.dir.clone(), lab.vip);

    let seen = send(t, vip, 20000, 50);
    let vip_path = lab.vip_path();
    wait_for(&dir, &format!("{vip_path}.all.packets"), 50.0);
    for (i, b) in t.backends().iter().enumerate() {
        let n = seen.get(&format!("backend{i}")).copied().unwrap_or(0) as f64;
        let b_path = format!(
            "{vip_path}.{}",
            lb_userspace::graphite::component(&b.ipv4().to_string())
        );
        wait_for(&dir, &format!("{b_path}.packets"), n);
        wait_for(&dir, &format!("{b_path}.up"), 1.0);
    }

    // Carbon goes away for a while.
    lab.stop_carbon();
    let rss_before = rss_kib(lab.lbd.pid());
    let socket = dir.join("lbd.sock");
    for _ in 0..8 {
        let started = Instant::now();
        let (code, _, _) = lb_tests::lbctl_output(&socket, &["list"]).unwrap();
        assert!(code == 0, "lbd keeps answering while carbon is away");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "and does not stall: {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let rss_after = rss_kib(lab.lbd.pid());
    assert!(
        rss_after < rss_before + 4096,
        "memory stays bounded: {rss_before} -> {rss_after} KiB"
    );

    // Carbon is back: pushing resumes with the new totals.
    lab.start_carbon();
    send(&lab.t, vip, 21000, 30);
    wait_for(&dir, &format!("{vip_path}.all.packets"), 80.0);
    lab.finish();
}

/// Memory holds two pushes; carbon is away for fourteen. Every second of
/// the outage reaches whisper once carbon is back, with the value it had
/// then (the counter steps mid-outage), and the spool is gone afterwards.
#[test]
fn an_outage_longer_than_memory_loses_no_interval() {
    const BOUND: u64 = 1 << 20;
    let mut lab = Lab::start(
        "graphite-outage",
        &format!(
            "max_buffered_lines = {}\nspool_max_bytes = {BOUND}\n",
            2 * LINES_PER_VIP
        ),
        1,
    );
    let spool = lab.spool();
    send(&lab.t, lab.vip, 20000, 50);
    wait_for(&lab.dir, &lab.packets(), 50.0);
    let up_from = now();
    std::thread::sleep(Duration::from_secs(6));

    let stopped = lab.stop_carbon();
    let mut watched = Watched::default();
    watched.watch(&spool, Duration::from_secs(7));
    let step_from = now();
    send(&lab.t, lab.vip, 21000, 20);
    let step_until = now();
    watched.watch(&spool, Duration::from_secs(7));
    let restarted = lab.start_carbon();

    let outage = (stopped + 1, restarted - 1);
    let points = wait_complete(&lab, outage);
    // Carbon may lose what it took just before it stopped; lbd cannot know.
    assert_no_hole(&points, (up_from, stopped - 2), outage);
    for (&s, v) in points.range(outage.0..=outage.1) {
        if s < step_from {
            assert_eq!(*v, Some(50.0), "at {s}, before the step");
        }
        if s > step_until {
            assert_eq!(*v, Some(70.0), "at {s}, after the step");
        }
    }
    assert!(watched.largest > 0, "the outage went to the spool");
    assert!(
        watched.largest <= BOUND,
        "spool within its bound: {watched:?}"
    );
    assert_eq!(watched.oldest.len(), 1, "nothing dropped: {watched:?}");
    wait_gone(&spool);
    lab.finish();
}

/// lbd restarts while carbon is away: what it spooled, and what it held in
/// memory when told to stop, is replayed by the next lbd.
#[test]
fn the_spool_outlives_lbd() {
    let mut lab = Lab::start(
        "graphite-restart",
        &format!("max_buffered_lines = {}\n", 2 * LINES_PER_VIP),
        1,
    );
    let spool = lab.spool();
    wait_for(&lab.dir, &lab.packets(), 0.0);
    let up_from = now();
    std::thread::sleep(Duration::from_secs(5));

    let stopped = lab.stop_carbon();
    std::thread::sleep(Duration::from_secs(6));
    let lbd_stopping = now();
    lbd::stop(&mut lab.lbd).unwrap();
    assert!(spool.exists(), "lbd left its spool");
    let (lbd, _) = lbd::start(&lab.t, &lab.config).unwrap();
    lab.lbd = lbd;
    let lbd_ready = now();
    std::thread::sleep(Duration::from_secs(5));
    let restarted = lab.start_carbon();
    // The new lbd pushes in a phase of its own: seen with carbon up.
    std::thread::sleep(Duration::from_secs(5));
    let settled = now();

    let before = (stopped + 1, lbd_stopping - 1);
    let after = (lbd_ready + 1, restarted - 1);
    let points = wait_complete(&lab, (before.0, settled - 1));
    assert_no_hole(&points, (up_from, stopped - 2), before);
    assert_no_hole(&points, (restarted + 1, settled - 1), after);
    wait_gone(&spool);
    lab.finish();
}

/// A spool of 4 KiB (the least there is) fills in a dozen pushes of four
/// VIPs; carbon stays away past that. The spool never passes its bound,
/// drops its oldest segments (not the newest), and what is left replays
/// without a gap up to the restart.
#[test]
fn a_spool_at_its_bound_drops_its_oldest() {
    const BOUND: u64 = 4096;
    let mut lab = Lab::start(
        "graphite-bound",
        &format!(
            "max_buffered_lines = {}\nspool_max_bytes = {BOUND}\n",
            4 * LINES_PER_VIP
        ),
        4,
    );
    let spool = lab.spool();
    wait_for(&lab.dir, &lab.packets(), 0.0);
    let up_from = now();
    std::thread::sleep(Duration::from_secs(5));

    let stopped = lab.stop_carbon();
    let mut watched = Watched::default();
    let deadline = Instant::now() + Duration::from_secs(90);
    while watched.oldest.len() < 3 {
        assert!(Instant::now() < deadline, "no segment dropped: {watched:?}");
        watched.watch(&spool, Duration::from_millis(200));
    }
    // What /metrics says of it meanwhile.
    assert!(lab.metric("lb_graphite_dropped_lines_total") > 0);
    assert!(lab.metric("lb_graphite_spooled_lines") > 0);
    assert!((1..=BOUND).contains(&lab.metric("lb_graphite_spool_bytes")));
    let restarted = lab.start_carbon();

    assert!(
        watched.largest <= BOUND,
        "spool within its bound: {watched:?}"
    );
    let outage = (stopped + 1, restarted - 1);
    wait_gone(&spool);
    assert_eq!(lab.metric("lb_graphite_spooled_lines"), 0);
    let points = wait_complete(&lab, (outage.1, outage.1));
    let missing = holes(&points, outage.0, outage.1);
    assert!(
        missing.first() == Some(&outage.0),
        "the oldest went first: {missing:?} in {outage:?}"
    );
    let first_kept = (outage.0..=outage.1)
        .find(|s| !missing.contains(s))
        .expect("the newest were kept");
    assert_no_hole(&points, (up_from, stopped - 2), (first_kept, outage.1));
    assert!(
        outage.1 - first_kept >= 3,
        "more than memory's one push kept: from {first_kept} in {outage:?}"
    );
    lab.finish();
}
