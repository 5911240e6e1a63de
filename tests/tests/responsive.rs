//! lbd's main loop never waits on the network: while ten `add-backend`
//! calls wait for addresses that never answer ARP, `lbctl list` and
//! `/metrics` answer within 200 ms and a health change is still applied at
//! once. And a backend id that is reused starts with zeroed counters.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{Topology, addressing, lbctl_path, lbd, scrape, udp_echo_from};
use lb_userspace::dataplane::AttachMode;

const METRICS: &str = "127.0.0.1:9102";
const UDP_PORT: u16 = 53;
const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;

fn lbctl(socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(lbctl_path().unwrap());
    c.arg("--socket").arg(socket).args(args);
    c
}

fn timed(mut c: Command) -> Duration {
    let t = Instant::now();
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

#[test]
fn the_main_loop_answers_while_next_hops_are_resolved() {
    let t = Topology::new(2).unwrap();
    let mut servers = t.start_servers(80, UDP_PORT).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip_ip = IpAddr::from(addressing::vip_v4(1));
    t.add_vip_on_backends(vip_ip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-responsive", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    let pre = lbd::Preamble {
        instance_extra: &format!("metrics_listen = \"{METRICS}\"\n"),
        ..Default::default()
    };
    std::fs::write(
        &cfg,
        format!(
            "{pre}[[vip]]\naddress = \"{vip_ip}:{UDP_PORT}/udp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"tcp\"\nport = 80\ninterval = \"{INTERVAL_MS}ms\"\n\
             timeout = \"100ms\"\nrise = 1\nfall = {FALL}\n{backends}",
            pre = pre.render(&t, &dir),
            backends = lbd::backend_tables(t.backends()),
        ),
    )
    .unwrap();
    let _teardown = lbd::Teardown::new(cfg.clone());
    let (mut lbd_proc, _) = lbd::start(&t, &cfg).unwrap();
    let socket = dir.join("lbd.sock");
    let vip = format!("{vip_ip}:{UDP_PORT}/udp");

    // Ten backends on the LB's own segment that no host answers ARP for:
    // each add waits seconds for a neighbour entry that never comes.
    let pending: Vec<Child> = (0..10)
        .map(|i| {
            let ghost = addressing::host_v4(200 + i).to_string();
            lbctl(&socket, &["add-backend", &vip, &ghost])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for _ in 0..5 {
        let took = timed(lbctl(&socket, &["list", "--json"]));
        assert!(
            took < Duration::from_millis(200),
            "lbctl list took {took:?}"
        );
        let t0 = Instant::now();
        scrape::scrape(&t, METRICS).unwrap();
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(200), "a scrape took {took:?}");
    }
    // A backend fails meanwhile: its health change is applied as soon as
    // its checks see it (fall x interval), not after the adds time out.
    let killed = Instant::now();
    servers[1].stop();
    let line = lbd_proc
        .wait_for_line(
            |l| l.contains("\"event\":\"backend\"") && l.contains("\"down\""),
            Duration::from_secs(5),
        )
        .unwrap();
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(FALL * INTERVAL_MS + 100 + 200 + 200),
        "health change applied {took:?} after the failure: {line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "all of the above happened while the adds were still pending"
    );
    for mut p in pending {
        let out = p.wait().unwrap();
        assert!(
            !out.success(),
            "a backend that never answers ARP is refused"
        );
    }
    lbd::stop(&mut lbd_proc).unwrap();
}

/// A backend removed and added again gets its old id back, with counters
/// that start at zero.
#[test]
fn a_reused_backend_id_starts_with_zeroed_counters() {
    let t = Topology::new(1).unwrap();
    let _servers = t.start_servers(80, UDP_PORT).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip_ip = IpAddr::from(addressing::vip_v4(1));
    t.add_vip_on_backends(vip_ip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-reuse", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    let pre = lbd::Preamble {
        instance_extra: &format!("metrics_listen = \"{METRICS}\"\n"),
        ..Default::default()
    };
    std::fs::write(
        &cfg,
        format!(
            "{pre}[[vip]]\naddress = \"{vip_ip}:{UDP_PORT}/udp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"none\"\n{backends}",
            pre = pre.render(&t, &dir),
            backends = lbd::backend_tables(t.backends()),
        ),
    )
    .unwrap();
    let _teardown = lbd::Teardown::new(cfg.clone());
    let (mut lbd_proc, _) = lbd::start(&t, &cfg).unwrap();
    let socket = dir.join("lbd.sock");
    let vip = format!("{vip_ip}:{UDP_PORT}/udp");
    let backend = t.backend(0).ipv4().to_string();
    let labels = format!("vip=\"{vip}\",backend=\"{backend}\"");
    let packets = |t: &Topology| {
        scrape::sample(
            &scrape::scrape(t, METRICS).unwrap(),
            "lb_backend_packets_total",
            &labels,
        )
    };
    t.in_client(|| {
        for port in 30_000..30_010 {
            udp_echo_from(
                port,
                SocketAddr::new(vip_ip, UDP_PORT),
                b"x",
                Duration::from_secs(2),
            )
            .unwrap();
        }
    })
    .unwrap();
    assert_eq!(packets(&t), Some(10));
    for args in [
        ["remove-backend", &vip, &backend],
        ["add-backend", &vip, &backend],
    ] {
        let out = lbctl(&socket, &args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        packets(&t),
        Some(0),
        "the re-added backend's counters start at zero"
    );
    lbd::stop(&mut lbd_proc).unwrap();
}
