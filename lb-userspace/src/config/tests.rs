use super::*;

const GOOD: &str = include_str!("../../config/example.toml");

fn err(text: &str) -> ConfigError {
    Config::parse("lb.toml", text).expect_err("config should be rejected")
}

/// The error for `text` names `field` on `line`, and says `why`.
fn rejects(text: &str, line: usize, field: &str, why: &str) {
    let e = err(text);
    assert_eq!(e.file, "lb.toml", "{e}");
    assert_eq!(e.line, line, "line of {e}");
    assert_eq!(e.field, field, "field of {e}");
    assert!(e.message.contains(why), "message of {e} should say {why:?}");
    assert!(
        e.to_string().starts_with(&format!("lb.toml:{line}:")),
        "{e}"
    );
}

const MINIMAL: &str = "[instance]\nname = \"lb0\"\ninterface = \"eth0\"\n";

fn with_vip(vip: &str) -> String {
    format!("{MINIMAL}[dataplane]\nencap_source_v4 = \"198.18.0.2\"\n{vip}")
}

#[test]
fn example_config_is_valid() {
    let c = Config::parse("example.toml", GOOD).unwrap();
    assert_eq!(c.name, "lb0");
    assert_eq!(c.xdp_mode, AttachMode::Auto);
    assert_eq!(c.sizes.ring_size, 65537);
    assert_eq!(c.vips.len(), 2);
    assert_eq!(c.vips[0].spec.to_string(), "198.18.100.1:80/tcp");
    assert_eq!(c.vips[0].backends.len(), 2);
    assert!(
        matches!(c.vips[0].health_check.kind, CheckKind::Http { ref path, expect_status: 200, .. } if path == "/health")
    );
    assert_eq!(c.vips[1].health_check.timeout, Duration::from_millis(500));
    assert_eq!(c.vips[1].backends[0].weight, 100, "default weight");
    assert_eq!(c.udp_timeout, Duration::from_secs(30));
    assert_eq!(c.second_chance_window, Duration::from_secs(120));
}

#[test]
fn shipped_minimal_example_is_valid() {
    let c = Config::parse("minimal.toml", include_str!("../../config/minimal.toml")).unwrap();
    assert_eq!(c.vips[0].backends.len(), 2);
    assert_eq!(c.vips[0].mode, ForwardMode::L2dsr);
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse("lb.toml", MINIMAL).unwrap();
    assert_eq!(c.sizes, MapSizes::default());
    assert_eq!(c.api_socket, PathBuf::from("/run/lb/lb0.sock"));
    assert_eq!(c.on_exit, OnExit::Keep);
    assert!(c.vips.is_empty());
}

#[test]
fn truncated_and_malformed_toml() {
    let e = err("[instance]\nname = \"lb0\ninterface = \"eth0\"\n");
    assert_eq!(e.line, 2, "{e}");
    let e = err("[instance\n");
    assert_eq!(e.line, 1, "{e}");
    // Cut inside a quoted string, as a half-written file would be.
    let cut = GOOD.find("198.18.0.21").unwrap() + 5;
    let e = err(&GOOD[..cut]);
    assert_eq!(e.line, GOOD[..cut].lines().count(), "{e}");
}

#[test]
fn unknown_fields_are_errors() {
    let e = err("[instance]\nname = \"lb0\"\ninterface = \"eth0\"\ncolour = \"blue\"\n");
    assert_eq!(e.line, 4, "{e}");
    assert!(e.message.contains("colour"), "{e}");
    let e = err(&with_vip(
        "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\nweigth = 3\n",
    ));
    assert!(e.message.contains("weigth"), "{e}");
}

#[test]
fn missing_sections_and_fields() {
    let e = err("[dataplane]\nring_size = 13\n");
    assert!(e.message.contains("instance"), "{e}");
    let e = err("[instance]\nname = \"lb0\"\n");
    assert!(e.message.contains("interface"), "{e}");
}

#[test]
fn instance_fields() {
    rejects(
        "[instance]\nname = \"lb 0\"\ninterface = \"eth0\"\n",
        2,
        "instance.name",
        "letters",
    );
    rejects(
        "[instance]\nname = \"lb0\"\ninterface = \"an-interface-name-too-long\"\n",
        3,
        "instance.interface",
        "1 to 15",
    );
    rejects(
        &format!("{MINIMAL}xdp_mode = \"turbo\"\n"),
        4,
        "instance.xdp_mode",
        "native, generic or auto",
    );
    rejects(
        &format!("{MINIMAL}metrics_listen = \"localhost\"\n"),
        4,
        "instance.metrics_listen",
        "ADDRESS:PORT",
    );
}

#[test]
fn dataplane_sizes() {
    rejects(
        &format!("{MINIMAL}[dataplane]\nring_size = 65536\n"),
        5,
        "dataplane.ring_size",
        "not prime",
    );
    rejects(
        &format!("{MINIMAL}[dataplane]\nring_size = 2147483647\n"),
        5,
        "dataplane.ring_size",
        "",
    );
    rejects(
        &format!("{MINIMAL}[dataplane]\nconntrack_entries = 0\n"),
        5,
        "dataplane.conntrack_entries",
        "must be",
    );
    rejects(
        &format!("{MINIMAL}[dataplane]\nmax_vips = 0\n"),
        5,
        "dataplane.max_vips",
        "1..=4096",
    );
    rejects(
        &format!("{MINIMAL}[dataplane]\nudp_timeout = \"30 parsecs\"\n"),
        5,
        "dataplane.udp_timeout",
        "unit",
    );
    rejects(
        &format!("{MINIMAL}[dataplane]\nencap_source_v4 = \"fd00::1\"\n"),
        5,
        "dataplane.encap_source_v4",
        "IPv4",
    );
}

#[test]
fn vip_addresses() {
    rejects(
        &with_vip("[[vip]]\naddress = \"198.18.100.1/tcp\"\nmode = \"ipip\"\n"),
        7,
        "vip[0].address",
        "no :PORT",
    );
    rejects(
        &with_vip("[[vip]]\naddress = \"198.18.100.999:80/tcp\"\nmode = \"ipip\"\n"),
        7,
        "vip[0].address",
        "not an IP",
    );
    rejects(
        &with_vip(
            "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"l2dsr\"\n",
        ),
        10,
        "vip[1].address",
        "twice",
    );
    let e = err(&with_vip(
        "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"nat\"\n",
    ));
    assert!(e.message.contains("nat"), "{e}");
}

#[test]
fn backends() {
    let vip = "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n";
    rejects(
        &with_vip(&format!(
            "{vip}[[vip.backend]]\naddress = \"198.18.0.300\"\n"
        )),
        10,
        "vip[0].backend[0].address",
        "not an IP",
    );
    rejects(
        &with_vip(&format!(
            "{vip}[[vip.backend]]\naddress = \"198.18.0.20\"\n[[vip.backend]]\naddress = \"198.18.0.20\"\n"
        )),
        12,
        "vip[0].backend[1].address",
        "listed twice",
    );
    rejects(
        &with_vip(&format!(
            "{vip}[[vip.backend]]\naddress = \"198.18.0.20\"\nweight = 70000\n"
        )),
        11,
        "vip[0].backend[0].weight",
        "out of range",
    );
    rejects(
        &with_vip(&format!(
            "{vip}[[vip.backend]]\naddress = \"fd00:198:18::20\"\n"
        )),
        10,
        "vip[0].backend[0].address",
        "4in6",
    );
    rejects(
        &format!("{MINIMAL}{vip}[[vip.backend]]\naddress = \"198.18.0.20\"\n"),
        8,
        "vip[0].backend[0].address",
        "encap_source_v4",
    );
    rejects(
        &with_vip(&format!("{vip}[[vip.backend]]\naddress = \"127.0.0.1\"\n")),
        10,
        "vip[0].backend[0].address",
        "loopback",
    );
}

#[test]
fn health_checks() {
    let vip = "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n[vip.health_check]\n";
    rejects(
        &with_vip(&format!("{vip}type = \"icmp\"\n")),
        10,
        "vip[0].health_check.type",
        "expected tcp, http, udp or none",
    );
    rejects(
        &with_vip(&format!(
            "{vip}type = \"tcp\"\ninterval = \"1s\"\ntimeout = \"2s\"\n"
        )),
        12,
        "vip[0].health_check.timeout",
        "interval",
    );
    rejects(
        &with_vip(&format!("{vip}type = \"tcp\"\nrise = 0\n")),
        11,
        "vip[0].health_check.rise",
        "1..=100",
    );
    rejects(
        &with_vip(&format!("{vip}type = \"http\"\npath = \"health\"\n")),
        11,
        "vip[0].health_check.path",
        "start with /",
    );
    rejects(
        &with_vip(&format!("{vip}type = \"http\"\nexpect_status = 42\n")),
        11,
        "vip[0].health_check.expect_status",
        "100..=599",
    );
    rejects(
        &with_vip(&format!("{vip}type = \"udp\"\n")),
        9,
        "vip[0].health_check.payload",
        "needs a payload",
    );
    rejects(
        &with_vip(&format!("{vip}type = \"tcp\"\nport = 0\n")),
        11,
        "vip[0].health_check.port",
        "1..=65535",
    );
    rejects(
        &with_vip(&format!("{vip}type = \"tcp\"\ninterval = \"0s\"\n")),
        11,
        "vip[0].health_check.interval",
        "greater than zero",
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    assert!(parse_duration("2").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("2h").is_err());
}

#[test]
fn graphite_section() {
    let c = Config::parse(
        "lb.toml",
        &format!("{MINIMAL}[graphite]\naddress = \"127.0.0.1:2003\"\n"),
    )
    .unwrap();
    let g = c.graphite.unwrap();
    assert_eq!(
        (g.prefix.as_str(), g.interval, g.max_buffered_lines),
        ("lb", Duration::from_secs(10), 100_000)
    );
    rejects(
        &format!("{MINIMAL}[graphite]\naddress = \"carbon\"\n"),
        5,
        "graphite.address",
        "ADDRESS:PORT",
    );
    rejects(
        &format!("{MINIMAL}[graphite]\naddress = \"127.0.0.1:2003\"\nprefix = \"a b\"\n"),
        6,
        "graphite.prefix",
        "letters",
    );
    rejects(
        &format!("{MINIMAL}[graphite]\naddress = \"127.0.0.1:2003\"\nmax_buffered_lines = 0\n"),
        6,
        "graphite.max_buffered_lines",
        "1..=",
    );
}
