//! /metrics: after a known number of datagrams through a VIP, every
//! backend's and the VIP's packets, bytes and new flows are exact, and the
//! exposition passes `promtool check metrics`.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use lb_tests::{Topology, addressing, in_netns, lbd, split_echo, udp_echo_from};
use lb_userspace::dataplane::AttachMode;

const DATAGRAMS: u16 = 200;
const PAYLOAD: usize = 100;

fn scrape(t: &Topology) -> String {
    lb_tests::scrape::scrape(t, "127.0.0.1:9100").unwrap()
}

/// The value of the sample whose name and labels are exactly these.
fn value(text: &str, name: &str, labels: &str) -> u64 {
    lb_tests::scrape::sample(text, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in\n{text}"))
}

fn send_one(t: &Topology, vip: IpAddr, port: u16) {
    t.in_client(move || {
        udp_echo_from(
            port,
            SocketAddr::new(vip, 53),
            b"one",
            Duration::from_secs(2),
        )
        .unwrap()
    })
    .unwrap();
}

#[test]
fn counters_are_exact_and_the_exposition_is_valid() {
    let t = Topology::new(2).unwrap();
    let _servers = t.start_servers(80, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip: IpAddr = addressing::vip_v4(1).into();
    t.add_vip_on_backends(vip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-metrics", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    let backends = lb_tests::lbd::backend_tables(t.backends());
    std::fs::write(
        &config,
        format!(
            "{pre}\
             [[vip]]\naddress = \"{vip}:53/udp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"tcp\"\nport = 80\ninterval = \"500ms\"\ntimeout = \"300ms\"\n{backends}",
            pre = lbd::Preamble {
                instance_extra: "metrics_listen = \"127.0.0.1:9100\"\n",
                ..Default::default()
            }
            .render(&t, &dir),
        ),
    )
    .unwrap();
    let (mut lbd, _) = lbd::start(&t, &config).unwrap();

    // Every datagram from its own source port: one packet, one new flow.
    let per_backend: BTreeMap<String, u64> = t
        .in_client(move || {
            let mut seen = BTreeMap::new();
            for i in 0..DATAGRAMS {
                let payload = vec![b'x'; PAYLOAD];
                let reply = udp_echo_from(
                    20000 + i,
                    SocketAddr::new(vip, 53),
                    &payload,
                    Duration::from_secs(2),
                )
                .unwrap();
                let (name, _) = split_echo(&reply).unwrap();
                *seen.entry(name.to_owned()).or_insert(0u64) += 1;
            }
            seen
        })
        .unwrap();
    assert_eq!(per_backend.len(), 2, "{per_backend:?}");

    let text = scrape(&t);
    // Ethernet 14 + IPv4 20 + UDP 8 + payload, as the LB received it.
    let frame = (14 + 20 + 8 + PAYLOAD) as u64;
    let vip_label = format!("vip=\"{vip}:53/udp\"");
    assert_eq!(
        value(&text, "lb_vip_packets_total", &vip_label),
        DATAGRAMS as u64
    );
    assert_eq!(
        value(&text, "lb_vip_bytes_total", &vip_label),
        DATAGRAMS as u64 * frame
    );
    assert_eq!(
        value(&text, "lb_vip_new_flows_total", &vip_label),
        DATAGRAMS as u64
    );
    assert_eq!(value(&text, "lb_vip_healthy_backends", &vip_label), 2);
    for (i, b) in t.backends().iter().enumerate() {
        let n = per_backend[&format!("backend{i}")];
        let labels = format!("{vip_label},backend=\"{}\"", b.ipv4());
        assert_eq!(
            value(&text, "lb_backend_packets_total", &labels),
            n,
            "backend{i}"
        );
        assert_eq!(
            value(&text, "lb_backend_bytes_total", &labels),
            n * frame,
            "backend{i}"
        );
        assert_eq!(
            value(&text, "lb_backend_new_flows_total", &labels),
            n,
            "backend{i}"
        );
        assert_eq!(value(&text, "lb_backend_up", &labels), 1);
    }
    assert!(value(&text, "lb_xdp_verdicts_total", "verdict=\"tx\"") >= DATAGRAMS as u64);

    // The connection table holds one entry per datagram's flow (counted in
    // the background every 5 s), in a table of the configured size.
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    loop {
        let text = scrape(&t);
        if text.contains("lb_conntrack_entries ") {
            let entries = value(&text, "lb_conntrack_entries", "");
            assert!(value(&text, "lb_conntrack_slots", "") >= entries);
            if entries == DATAGRAMS as u64 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lb_conntrack_entries never reached {DATAGRAMS}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // lbctl stats: the same totals, and rates while traffic flows.
    let socket = dir.join("lbd.sock");
    let sender = {
        let client_ns = t.client().ns().to_owned();
        std::thread::spawn(move || {
            in_netns(&client_ns, move || {
                for i in 0..150u16 {
                    let _ = udp_echo_from(
                        30000 + i,
                        SocketAddr::new(vip, 53),
                        b"rate",
                        Duration::from_secs(1),
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .unwrap()
        })
    };
    let out = Command::new(lb_tests::lbctl_path().unwrap())
        .arg("--socket")
        .arg(&socket)
        .args(["stats", "--interval", "1", "--json"])
        .output()
        .unwrap();
    sender.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["vip"], format!("{vip}:53/udp"));
    assert!(row["packets"].as_u64().unwrap() >= DATAGRAMS as u64);
    let pps = row["pps"].as_f64().unwrap();
    assert!(pps > 10.0, "datagrams were flowing: {row}");
    let backend_pps: f64 = row["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["pps"].as_f64().unwrap())
        .sum();
    assert!(
        (backend_pps - pps).abs() < 1e-6,
        "backends add up to the VIP: {row}"
    );

    // lbctl top in a real terminal (tmux): every backend has a row, q quits.
    let session = format!("{}-top", t.id());
    let top_cmd = format!(
        "{} --socket {} top",
        lb_tests::lbctl_path().unwrap().display(),
        socket.display()
    );
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(args)
            .output()
            .expect("tmux (cargo xtask setup installs it)")
    };
    assert!(
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "150",
            "-y",
            "30",
            &top_cmd
        ])
        .status
        .success()
    );
    std::thread::sleep(Duration::from_millis(2500));
    let screen =
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned();
    tmux(&["send-keys", "-t", &session, "q"]);
    let mut ended = false;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        if !tmux(&["has-session", "-t", &session]).status.success() {
            ended = true;
            break;
        }
    }
    tmux(&["kill-session", "-t", &session]);
    assert!(
        screen.contains("lbctl top") && screen.contains(&format!("{vip}:53/udp")),
        "{screen}"
    );
    for b in t.backends() {
        assert!(
            screen.contains(&b.ipv4().to_string()),
            "row for {}: {screen}",
            b.ipv4()
        );
    }
    assert!(ended, "q quits top");

    // Data-plane debug events: off by default, on and off at runtime.
    let lbctl_run = |args: &[&str]| {
        let out = Command::new(lb_tests::lbctl_path().unwrap())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let quiet = lbd.wait_for_line(|l| l.contains("\"dataplane\""), Duration::from_millis(300));
    assert!(quiet.is_err(), "no debug events unless asked: {quiet:?}");
    lbctl_run(&["debug", "on"]);
    send_one(&t, vip, 40000);
    let line = lbd
        .wait_for_line(|l| l.contains("\"dataplane\""), Duration::from_secs(5))
        .unwrap();
    assert!(
        line.contains("new flow") && line.contains("40000"),
        "{line}"
    );
    lbctl_run(&["debug", "off"]);
    send_one(&t, vip, 40001);
    let quiet = lbd.wait_for_line(|l| l.contains("\"dataplane\""), Duration::from_millis(500));
    assert!(quiet.is_err(), "off again: {quiet:?}");

    // The format itself, by Prometheus' own linter.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    lbd::stop(&mut lbd).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
