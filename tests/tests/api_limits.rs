//! lbd's listeners under floods and oversize requests: 300 idle connections
//! to `/metrics` and 300 to the control socket (the oldest are closed to
//! make room) delay neither a scrape nor `lbctl list` past 1 s; idle
//! connections are closed at the 10 s read deadline; a head over 16 KiB
//! gets 431 and a body over 64 KiB 413, from either listener, and lbd
//! serves on. `/metrics?x=1` answers like `/metrics`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{HttpConn, Topology, addressing, in_netns, lbd, scrape};
use lb_userspace::api::client::call;

const METRICS: &str = "127.0.0.1:9103";
const FLOOD: usize = 300;
const PROMPT: Duration = Duration::from_secs(1);
/// lbd's read deadline (api::server::READ_DEADLINE).
const READ_DEADLINE: Duration = Duration::from_secs(10);

fn metrics_addr() -> SocketAddr {
    METRICS.parse().unwrap()
}

/// Sends `raw` and reads the answer to its end (lbd closes after one).
fn exchange(mut s: impl Read + Write, raw: &[u8]) -> String {
    // lbd may refuse (and close) before reading all of an oversize
    // request; its answer is what matters.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"))
}

/// A request whose head is over lbd's 16 KiB cap.
fn big_head(target: &str) -> Vec<u8> {
    let mut raw = format!("GET {target} HTTP/1.1\r\nHost: lb\r\n").into_bytes();
    while raw.len() <= 17 * 1024 {
        raw.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    raw
}

/// A request whose body is over lbd's 64 KiB cap.
fn big_body(target: &str) -> Vec<u8> {
    let n = 64 * 1024 + 1;
    let mut raw = format!(
        "POST {target} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n"
    )
    .into_bytes();
    raw.resize(raw.len() + n, b' ');
    raw
}

fn control(socket: &Path, raw: &[u8]) -> String {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    exchange(s, raw)
}

fn metrics_raw(t: &Topology, raw: Vec<u8>) -> String {
    in_netns(t.lb().ns(), move || {
        let s = TcpStream::connect(METRICS).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        exchange(s, &raw)
    })
    .unwrap()
}

/// Waits for lbd to close `s` (whose read timeout is `limit`); returns
/// when it did.
fn closed_by_lbd(mut s: impl Read, limit: Duration) -> Instant {
    match s.read(&mut [0; 64]) {
        Ok(0) => Instant::now(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Instant::now(),
        Ok(n) => panic!("lbd sent {n} bytes on an idle connection"),
        Err(e) => panic!("idle connection not closed within {limit:?}: {e}"),
    }
}

#[test]
fn floods_and_oversize_requests_do_not_stall_lbd() {
    let t = Topology::new(1).unwrap();
    let vip = addressing::vip_v4(1);
    let dir = std::env::temp_dir().join(format!("{}-api-limits", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "{pre}[[vip]]\naddress = \"{vip}:80/tcp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"none\"\n{backends}",
            pre = lbd::Preamble {
                instance_extra: &format!("metrics_listen = \"{METRICS}\"\n"),
                ..Default::default()
            }
            .render(&t, &dir),
            backends = lbd::backend_tables(t.backends()),
        ),
    )
    .unwrap();
    let _teardown = lbd::Teardown::new(config.clone());
    let (mut lbd_proc, _) = lbd::start(&t, &config).unwrap();
    let socket = dir.join("lbd.sock");

    // The floods: connections that never send a byte.
    let idle_tcp: Vec<TcpStream> = in_netns(t.lb().ns(), || {
        (0..FLOOD)
            .map(|_| TcpStream::connect(METRICS))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .unwrap()
    .unwrap();
    let idle_unix: Vec<UnixStream> = (0..FLOOD)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let flooded = Instant::now();

    let started = Instant::now();
    let text = scrape::scrape(&t, METRICS).unwrap();
    let scrape_took = started.elapsed();
    assert!(text.contains("lb_vip_packets_total"), "{text}");

    let started = Instant::now();
    let (code, vips) = call(&socket, "GET", "/v1/vips", None).unwrap();
    let call_took = started.elapsed();
    assert_eq!(code, 200, "{vips}");
    assert_eq!(vips.as_array().map(Vec::len), Some(1), "{vips}");

    let started = Instant::now();
    let (code, out, err) = lb_tests::lbctl_output(&socket, &["list"]).unwrap();
    let lbctl_took = started.elapsed();
    assert!(code == 0, "{err}");
    assert!(out.contains(&vip.to_string()), "{out}");
    println!(
        "with {FLOOD} idle connections on each listener: scrape {scrape_took:?}, \
         GET /v1/vips {call_took:?}, lbctl list {lbctl_took:?}"
    );
    for (what, took) in [
        ("scrape", scrape_took),
        ("GET /v1/vips", call_took),
        ("lbctl list", lbctl_took),
    ] {
        assert!(
            took < PROMPT,
            "{what} took {took:?} with {FLOOD} idle connections"
        );
    }
    // The oldest of the flood made room: lbd closed them at once.
    let soon = Duration::from_secs(2);
    idle_tcp[0].set_read_timeout(Some(soon)).unwrap();
    assert!(closed_by_lbd(&idle_tcp[0], soon) < flooded + soon);
    idle_unix[0].set_read_timeout(Some(soon)).unwrap();
    assert!(closed_by_lbd(&idle_unix[0], soon) < flooded + soon);

    // A scraper's parameters do not change the answer.
    let resp = in_netns(t.lb().ns(), || {
        HttpConn::connect(metrics_addr(), Duration::from_secs(5))
            .and_then(|mut c| c.request("GET", "/metrics?x=1", false))
    })
    .unwrap()
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        resp.headers
    );
    assert!(resp.text().contains("lb_vip_packets_total"));

    // Oversize requests: hyper refuses the head (431, no body); lbd the
    // body (413, with why). The control socket answers in JSON.
    let answers = [
        ("control head", control(&socket, &big_head("/v1/vips")), 431),
        (
            "control body",
            control(&socket, &big_body("/v1/vips/add")),
            413,
        ),
        ("metrics head", metrics_raw(&t, big_head("/metrics")), 431),
        ("metrics body", metrics_raw(&t, big_body("/metrics")), 413),
    ];
    for (what, answer, want) in &answers {
        assert_eq!(status(answer), *want, "{what}: {answer}");
        println!(
            "{what}: {}",
            answer.lines().next().unwrap_or_default().trim()
        );
    }
    assert!(
        answers[1].1.contains("is over the 65536-byte limit"),
        "{}",
        answers[1].1
    );
    // And lbd serves on.
    assert_eq!(call(&socket, "GET", "/v1/vips", None).unwrap().0, 200);
    assert!(
        scrape::scrape(&t, METRICS)
            .unwrap()
            .contains("lb_vip_packets_total")
    );

    // The newest of each flood was never evicted: the read deadline closes
    // it, counted from when lbd accepted it (after `flooded`).
    let limit = READ_DEADLINE + Duration::from_secs(5);
    let last_tcp = idle_tcp.last().unwrap();
    last_tcp.set_read_timeout(Some(limit)).unwrap();
    let tcp_closed = closed_by_lbd(last_tcp, limit).duration_since(flooded);
    let last_unix = idle_unix.last().unwrap();
    last_unix.set_read_timeout(Some(limit)).unwrap();
    let unix_closed = closed_by_lbd(last_unix, limit).duration_since(flooded);
    println!(
        "the newest idle connection closed after {tcp_closed:?} (metrics), {unix_closed:?} (control)"
    );
    for closed in [tcp_closed, unix_closed] {
        assert!(
            closed > READ_DEADLINE - Duration::from_secs(1)
                && closed < READ_DEADLINE + Duration::from_secs(2),
            "{closed:?}"
        );
    }

    let (_, status) = lbd::stop(&mut lbd_proc).unwrap();
    assert!(status.is_some_and(|s| s.success()));
}
