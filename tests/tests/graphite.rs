//! Graphite push into a real carbon-cache (Debian graphite-carbon), read
//! back from its whisper files; then carbon goes away and comes back: lbd
//! keeps answering, its memory stays bounded, and pushing resumes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{Spawned, Topology, addressing, lbctl_path, lbd, split_echo, udp_echo_from};
use lb_userspace::dataplane::AttachMode;

const CARBON_PORT: u16 = 22003;

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

/// The newest value whisper holds for `metric` (a dotted path).
fn whisper_last(dir: &Path, metric: &str) -> Option<f64> {
    let file = dir
        .join("carbon/whisper")
        .join(metric.replace('.', "/") + ".wsp");
    let out = Command::new("whisper-fetch")
        .args(["--from", &format!("{}", now() - 600)])
        .arg(&file)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
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

#[test]
fn pushes_land_in_carbon_and_survive_its_outage() {
    let t = Topology::new(2).unwrap();
    let _servers = t.start_servers(80, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip: IpAddr = addressing::vip_v4(1).into();
    t.add_vip_on_backends(vip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-graphite", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = carbon_config(&dir);
    let mut carbon = start_carbon(&t, &conf);

    let config = dir.join("lb.toml");
    let backends = lb_tests::lbd::backend_tables(t.backends());
    std::fs::write(
        &config,
        format!(
            "{pre}\
             [graphite]\naddress = \"127.0.0.1:{CARBON_PORT}\"\nprefix = \"lbtest\"\ninterval = \"1s\"\nmax_buffered_lines = 500\n\
             [[vip]]\naddress = \"{vip}:53/udp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"tcp\"\nport = 80\ninterval = \"500ms\"\ntimeout = \"300ms\"\n{backends}",
            pre = lbd::Preamble::default().render(&t, &dir),
        ),
    )
    .unwrap();
    let (mut lbd, _) = lbd::start(&t, &config).unwrap();

    let seen = send(&t, vip, 20000, 50);
    let vip_path = format!(
        "lbtest.{}",
        lb_userspace::graphite::component(&format!("{vip}:53/udp"))
    );
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
    carbon.stop();
    let rss_before = rss_kib(lbd.pid());
    let socket = dir.join("lbd.sock");
    for _ in 0..8 {
        let started = Instant::now();
        let out = Command::new(lbctl_path().unwrap())
            .arg("--socket")
            .arg(&socket)
            .arg("list")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lbd keeps answering while carbon is away"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "and does not stall: {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let rss_after = rss_kib(lbd.pid());
    assert!(
        rss_after < rss_before + 4096,
        "memory stays bounded: {rss_before} -> {rss_after} KiB"
    );

    // Carbon is back: pushing resumes with the new totals.
    let _carbon = start_carbon(&t, &conf);
    send(&t, vip, 21000, 30);
    wait_for(&dir, &format!("{vip_path}.all.packets"), 80.0);

    lbd::stop(&mut lbd).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
