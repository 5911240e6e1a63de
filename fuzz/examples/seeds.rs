//! Writes the seed corpora under `fuzz/seeds/<target>/`:
//! `cargo run --release --example seeds` in `fuzz/`.
//!
//! Seeds give libFuzzer a start on inputs it would take long to find by
//! mutation alone: real frames for the parser and the ICMP quote, the
//! shipped configuration files and small variants of them, control API
//! bodies and request lines, and for the policy the random inputs that first
//! reached each verdict, lookup path and table write the harness can tell
//! apart (so a short run in `cargo xtask test` exercises every rule).

use std::{fs, path::Path};

use lb_common::{
    maps::Family,
    testframe::{self, FrameSpec, L4},
};
use lb_fuzz::policy;
use lb_userspace::config::Config;

const V4_CLIENT: [u8; 4] = [198, 18, 0, 10];
const V4_VIP: [u8; 4] = [198, 18, 100, 1];
const V4_ROUTER: [u8; 4] = [198, 18, 1, 1];

fn v6(net: u8, host: u8) -> [u8; 16] {
    policy::host(Family::V6, net, host)
}

fn frames() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |name: &str, f: Vec<u8>| out.push((name.to_owned(), f));
    let syn = |mut s: FrameSpec| {
        if let L4::Tcp { flags, .. } = &mut s.l4 {
            *flags = 0x02;
        }
        s
    };
    add(
        "v4_tcp_syn",
        testframe::build(&syn(FrameSpec::v4_tcp(V4_CLIENT, V4_VIP, 40_000, 80))),
    );
    add(
        "v4_tcp_ack",
        testframe::build(&FrameSpec::v4_tcp(V4_CLIENT, V4_VIP, 40_000, 80)),
    );
    add(
        "v4_udp",
        testframe::build(&FrameSpec::v4_udp(V4_CLIENT, V4_VIP, 40_000, 53)),
    );
    add(
        "v6_tcp_syn",
        testframe::build(&syn(FrameSpec::v6_tcp(v6(0, 10), v6(100, 1), 40_000, 80))),
    );
    add(
        "v6_udp",
        testframe::build(&FrameSpec::v6_udp(v6(0, 10), v6(100, 1), 40_000, 53)),
    );
    let mut vlan = FrameSpec::v4_tcp(V4_CLIENT, V4_VIP, 40_000, 80);
    vlan.vlan = Some(100);
    add("v4_vlan_tcp", testframe::build(&vlan));
    let mut options = FrameSpec::v4_udp(V4_CLIENT, V4_VIP, 40_000, 53);
    options.ipv4_options = 8;
    add("v4_options_udp", testframe::build(&options));
    let mut ttl0 = FrameSpec::v4_tcp(V4_CLIENT, V4_VIP, 40_000, 80);
    ttl0.ttl = 0;
    add("v4_ttl0", testframe::build(&ttl0));
    let mut gre = FrameSpec::v4_tcp(V4_CLIENT, V4_VIP, 0, 0);
    gre.l4 = L4::Raw {
        proto: 47,
        payload_len: 16,
    };
    add("v4_other_l4", testframe::build(&gre));
    let mut hop_by_hop = FrameSpec::v6_tcp(v6(0, 10), v6(100, 1), 0, 0);
    hop_by_hop.l4 = L4::Raw {
        proto: 0,
        payload_len: 8,
    };
    add("v6_extension_header", testframe::build(&hop_by_hop));
    let mut fragment = testframe::build(&FrameSpec::v4_udp(V4_CLIENT, V4_VIP, 40_000, 53));
    fragment[14 + 6] = 0x20; // More Fragments
    add("v4_fragment", fragment);
    let full = testframe::build(&FrameSpec::v4_tcp(V4_CLIENT, V4_VIP, 40_000, 80));
    add("v4_tcp_cut", testframe::truncate_datagram(&full, 12));

    // Routers' too-big errors about the VIP's replies.
    let reply4 = testframe::build(&FrameSpec::v4_tcp(V4_VIP, V4_CLIENT, 80, 40_000));
    add(
        "v4_icmp_too_big",
        testframe::icmp_too_big(&reply4, V4_ROUTER, V4_VIP, 1400),
    );
    let reply4_udp = testframe::build(&FrameSpec::v4_udp(V4_VIP, V4_CLIENT, 53, 40_000));
    add(
        "v4_icmp_too_big_udp",
        testframe::icmp_too_big(&reply4_udp, V4_ROUTER, V4_VIP, 1400),
    );
    let reply6 = testframe::build(&FrameSpec::v6_tcp(v6(100, 1), v6(0, 10), 80, 40_000));
    add(
        "v6_icmp_too_big",
        testframe::icmp6_too_big(&reply6, v6(1, 1), v6(100, 1), 1280),
    );
    out
}

/// The shipped configurations and variants that reach the other sections
/// and value forms.
fn configs(repo: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in ["example.toml", "demo.toml"] {
        let path = repo.join("lb-userspace/config").join(name);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The demo's words between at-signs, as the demo fills them in.
        let text = text
            .replace("@NAME@", "demo")
            .replace("@INTERFACE@", "veth-lb")
            .replace("@DIR@", "/run/lb")
            .replace("@VIP@", "198.18.100.1")
            .replace("@LB@", "198.18.0.2")
            .replace(
                "@BACKENDS@",
                "[[vip.backend]]\naddress = \"198.18.0.20\"\n[[vip.backend]]\naddress = \"198.18.0.21\"\nweight = 50\n",
            );
        out.push((name.replace(".toml", ""), text.into_bytes()));
    }
    let minimal = r#"[instance]
name = "lb0"
interface = "eth0"

[[vip]]
address = "198.18.100.1:80/tcp"
mode = "l2dsr"
[[vip.backend]]
address = "198.18.0.20"
"#;
    out.push(("minimal".into(), minimal.into()));
    let fleet = r#"[instance]
name = "lb1"
interface = "veth0"
xdp_mode = "generic"
on_exit = "detach"
api_socket = "/run/lb/lb1.sock"
state_file = "/var/lib/lb/lb1.json"
metrics_listen = "[::1]:9100"

[dataplane]
max_vips = 2
max_backends = 8
ring_size = 13
conntrack_entries = 4096
flow_cache_slots = 64
hash_seed = 7
udp_timeout = "5s"
tcp_idle_timeout = "10m"
second_chance_window = "500ms"
encap_source_v4 = "198.18.0.2"

[announce]
table = 100
device = "lo"
min_healthy_backends = 2

[graphite]
address = "127.0.0.1:2003"
prefix = "lb.lb1"
interval = "10s"
spool_max_bytes = 4096

[sysctl]
apply = true

[[vip]]
address = "198.18.100.2:0/udp"
mode = "l2dsr"
min_healthy_backends = 1
[vip.health_check]
type = "tcp"
port = 22
interval = "1s"
timeout = "1s"
rise = 1
fall = 1
[[vip.backend]]
address = "198.18.0.30"
weight = 0
[[vip.backend]]
address = "198.18.0.31"
weight = 65535
"#;
    out.push(("fleet".into(), fleet.into()));
    // Refused on purpose: the error paths need seeds too.
    out.push((
        "bad_field".into(),
        minimal.replace("mode = \"l2dsr\"", "mode = \"nat\"").into(),
    ));
    out.push((
        "bad_address".into(),
        minimal.replace("198.18.0.20", "224.0.0.1").into(),
    ));
    for (name, text) in &out {
        let text = String::from_utf8_lossy(text);
        let loaded = Config::parse(name, &text);
        assert_eq!(
            loaded.is_err(),
            name.starts_with("bad_"),
            "{name}: {loaded:?}"
        );
    }
    out
}

fn api() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |name: &str, s: &str| out.push((name.to_owned(), s.as_bytes().to_vec()));
    add("vip_v4", "198.18.100.1:80/tcp");
    add("vip_v6", "[fd00:198:18:100::1]:53/udp");
    add("vip_any_port", "198.18.100.1:0/udp");
    add("check_http", "http:/health");
    add("check_tcp", "tcp");
    add(
        "backend_add",
        r#"{"vip":"198.18.100.1:80/tcp","backend":"198.18.0.20","weight":100}"#,
    );
    add(
        "backend_v6",
        r#"{"vip":"[fd00:198:18:100::1]:53/udp","backend":"fd00:198:18::20"}"#,
    );
    add(
        "vip_add",
        r#"{"vip":"198.18.100.1:80/tcp","mode":"ipip","check":"http:/health"}"#,
    );
    add(
        "explain",
        r#"{"vip":"198.18.100.1:80/tcp","client":"198.18.0.10:40000","syn":true}"#,
    );
    add("debug", r#"{"enabled":true}"#);
    add(
        "request_backend_add",
        r#"POST /v1/backends/add {"vip":"198.18.100.1:80/tcp","backend":"198.18.0.20"}"#,
    );
    add("request_vips", "GET /v1/vips?verbose ");
    add("request_node_drain", "POST /v1/node/drain ");
    out
}

/// Raw bytes on the control socket: requests lbctl sends, and the framing
/// tricks a smuggler tries.
fn http() -> Vec<(String, Vec<u8>)> {
    let body = r#"{"vip":"198.18.100.1:80/tcp","backend":"198.18.0.20"}"#;
    let post = |extra: &str, b: &str| {
        format!(
            "POST /v1/backends/add HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\n{extra}\r\n{b}"
        )
    };
    let seeds = [
        (
            "get_vips",
            "GET /v1/vips HTTP/1.1\r\nHost: lbd\r\n\r\n".to_owned(),
        ),
        ("get_query", "GET /v1/node?x=1 HTTP/1.0\r\n\r\n".to_owned()),
        (
            "post_length",
            post(&format!("Content-Length: {}\r\n", body.len()), body),
        ),
        (
            "post_chunked",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()),
            ),
        ),
        (
            "pipelined",
            format!(
                "{}GET /v1/teardown HTTP/1.1\r\n\r\n",
                post(&format!("Content-Length: {}\r\n", body.len()), body)
            ),
        ),
        (
            "length_and_chunked",
            post(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    body.len()
                ),
                "0\r\n\r\nPOST /v1/teardown HTTP/1.1\r\n\r\n",
            ),
        ),
        (
            "two_lengths",
            post("Content-Length: 5\r\nContent-Length: 50\r\n", body),
        ),
        ("over_cap", post("Content-Length: 99999999\r\n", "")),
        ("bare_lf", "GET /v1/vips HTTP/1.1\nHost: lbd\n\n".to_owned()),
    ];
    seeds
        .into_iter()
        .map(|(name, s)| (name.to_owned(), s.into_bytes()))
        .collect()
}

/// Random inputs, each kept when it reaches something no earlier one did.
fn policy_runs() -> Vec<(String, Vec<u8>)> {
    let mut seen = policy::Reached::new();
    let mut out = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*: deterministic, so the seeds only change with the harness.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..200_000 {
        let len = 64 + (next() % 448) as usize;
        let input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let reached = policy::run(&input);
        if reached.iter().any(|r| !seen.contains(r)) {
            let new: Vec<_> = reached.difference(&seen).cloned().collect();
            let name = new[0].replace(' ', "_");
            seen.extend(reached);
            out.push((format!("{:03}_{name}", out.len()), input));
        }
    }
    eprintln!("policy: {} seeds reach {} outcomes", out.len(), seen.len());
    for r in &seen {
        eprintln!("  {r}");
    }
    out
}

fn write(dir: &Path, seeds: Vec<(String, Vec<u8>)>) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for (name, bytes) in seeds {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

fn main() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = fuzz.join("seeds");
    let frames = frames();
    write(&seeds.join("parse"), frames.clone());
    write(&seeds.join("icmp"), frames);
    write(
        &seeds.join("config"),
        configs(fuzz.parent().expect("fuzz/ is in the repository")),
    );
    write(&seeds.join("api"), api());
    write(&seeds.join("http"), http());
    write(&seeds.join("policy"), policy_runs());
}
