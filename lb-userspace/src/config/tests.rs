use super::*;
use std::collections::BTreeSet;

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
    assert_eq!(c.sizes.ring_size, 100_003);
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
    assert_eq!(c.vips[0].slowstart, Duration::from_secs(30));
    assert_eq!(c.vips[0].min_healthy_permille, 500);
    assert_eq!(
        c.vips[0].backends[1].slowstart,
        Some(Duration::from_secs(120))
    );
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

/// `ring_size = "auto"` (the default) sizes rings for `max_backends_per_vip`
/// backends, 100 slots each, capped by what `max_backends` can hold.
#[test]
fn automatic_ring_size() {
    let size = |dataplane: &str| {
        Config::parse("lb.toml", &format!("{MINIMAL}[dataplane]\n{dataplane}"))
            .unwrap()
            .sizes
            .ring_size
    };
    assert_eq!(size(""), 100_003);
    assert_eq!(size("ring_size = \"auto\"\n"), 100_003);
    assert_eq!(size("max_backends_per_vip = 10\n"), 1009);
    assert_eq!(
        size("ring_size = \"auto\"\nmax_backends_per_vip = 10000\nmax_backends = 20000\n"),
        1_000_003
    );
    // A VIP holds at most max_backends - 1 backends.
    assert_eq!(size("max_backends = 101\n"), 10007);
    assert_eq!(size("max_backends = 16\n"), 1511);
    // A fixed size ignores the capacity.
    assert_eq!(
        size("ring_size = 65537\nmax_backends_per_vip = 10\n"),
        65537
    );
    assert_eq!(size("ring_size = 13\n"), 13);
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
    // Overflow and wrap-around are refused, not panicked on or accepted.
    for huge in [
        "999999999999999999m",
        "99999999999999999999s",
        "18446744074s",
        "86401s",
        "1441m",
    ] {
        let e = parse_duration(huge).expect_err(huge);
        assert!(e.contains("1-day maximum"), "{huge}: {e}");
    }
    assert_eq!(parse_duration("86400s"), Ok(MAX_DURATION));
    assert_eq!(parse_duration("1440m"), Ok(MAX_DURATION));
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

/// Every message the loader gives, in full (file, line, column, field and
/// text): splitting the validation by section must not change any of them.
/// Long because it is one table, a row per message, read down in one go.
#[test]
fn messages_in_full() {
    let ipip = "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n";
    let ipip6 = "[[vip]]\naddress = \"[fd00:198:18:100::1]:80/tcp\"\nmode = \"ipip\"\n";
    let l2dsr = "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"l2dsr\"\n";
    let l2dsr6 = "[[vip]]\naddress = \"[fd00:198:18:100::1]:80/tcp\"\nmode = \"l2dsr\"\n";
    let hc = format!("{ipip}[vip.health_check]\n");
    let be = |vip: &str, rest: &str| with_vip(&format!("{vip}{rest}"));
    let graphite = format!("{MINIMAL}[graphite]\naddress = \"127.0.0.1:2003\"\n");
    let cases: Vec<(String, &str)> = vec![
        (
            "[instance]\nname = \"lb0\"\n".into(),
            "lb.toml:1:1: missing field `interface`",
        ),
        (
            "[instance]\nname = \"\"\ninterface = \"eth0\"\n".into(),
            "lb.toml:2:8: instance.name: 1 to 32 letters, digits, '-' or '_' (it names the pin directory)",
        ),
        (
            "[instance]\nname = \"lb0\"\ninterface = \"eth 0\"\n".into(),
            "lb.toml:3:13: instance.interface: an interface name of 1 to 15 characters",
        ),
        (
            format!("{MINIMAL}xdp_mode = \"turbo\"\n"),
            "lb.toml:4:12: instance.xdp_mode: unknown XDP mode \"turbo\": expected native, generic or auto",
        ),
        (
            format!("{MINIMAL}metrics_listen = \"localhost\"\n"),
            "lb.toml:4:18: instance.metrics_listen: expected ADDRESS:PORT, e.g. 127.0.0.1:9100",
        ),
        (
            format!("{MINIMAL}[dataplane]\nflow_cache_slots = 3\n"),
            "lb.toml:5:20: dataplane.flow_cache_slots: must be a power of two up to 4194304 (per CPU)",
        ),
        (
            format!("{MINIMAL}[dataplane]\nring_size = 65536\n"),
            "lb.toml:5:13: dataplane.ring_size: ring size 65536 is not prime; use a prime such as 65537",
        ),
        (
            format!("{MINIMAL}[dataplane]\nring_size = 1\n"),
            "lb.toml:5:13: dataplane.ring_size: ring size 1 is too small; the minimum is 2 and the default is \"auto\"",
        ),
        (
            format!("{MINIMAL}[dataplane]\nring_size = \"big\"\n"),
            "lb.toml:5:13: dataplane.ring_size: expected \"auto\" or a prime number of slots such as 65537, not \"big\"",
        ),
        (
            format!("{MINIMAL}[dataplane]\nring_size = 65537.0\n"),
            "lb.toml:5:13: dataplane.ring_size: expected \"auto\" or a prime number of slots such as 65537, not float 65537.0",
        ),
        (
            format!("{MINIMAL}[dataplane]\nring_size = -7\n"),
            "lb.toml:5:13: dataplane.ring_size: ring size 0 is too small; the minimum is 2 and the default is \"auto\"",
        ),
        (
            format!("{MINIMAL}[dataplane]\nmax_backends_per_vip = 10001\n"),
            "lb.toml:5:24: dataplane.max_backends_per_vip: must be 1..=10000: an automatic ring holds 100 slots per backend, at most 1000003 slots",
        ),
        (
            format!("{MINIMAL}[dataplane]\nmax_vips = 4097\n"),
            "lb.toml:5:12: dataplane.max_vips: must be 1..=4096",
        ),
        (
            format!("{MINIMAL}[dataplane]\nmax_backends = 1\n"),
            "lb.toml:5:16: dataplane.max_backends: must be 2..=1048576 (id 0 is reserved)",
        ),
        (
            format!("{MINIMAL}[dataplane]\nconntrack_entries = 0\n"),
            "lb.toml:5:21: dataplane.conntrack_entries: must be 1..=67108864",
        ),
        (
            format!("{MINIMAL}[dataplane]\nudp_timeout = \"0s\"\n"),
            "lb.toml:5:15: dataplane.udp_timeout: must be greater than zero",
        ),
        (
            format!("{MINIMAL}[dataplane]\nudp_timeout = \"30\"\n"),
            "lb.toml:5:15: dataplane.udp_timeout: \"30\" has no unit (use ms, s or m)",
        ),
        (
            format!("{MINIMAL}[dataplane]\nsecond_chance_window = \"2h\"\n"),
            "lb.toml:5:24: dataplane.second_chance_window: \"2h\": unknown unit \"h\" (use ms, s or m)",
        ),
        (
            format!("{MINIMAL}[dataplane]\nencap_source_v4 = \"fd00::1\"\n"),
            "lb.toml:5:19: dataplane.encap_source_v4: expected an IPv4 address",
        ),
        (
            format!("{MINIMAL}[dataplane]\nencap_source_v6 = \"198.18.0.2\"\n"),
            "lb.toml:5:19: dataplane.encap_source_v6: expected an IPv6 address",
        ),
        (
            format!("{MINIMAL}[graphite]\naddress = \"carbon\"\n"),
            "lb.toml:5:11: graphite.address: expected ADDRESS:PORT of carbon's line receiver, e.g. 127.0.0.1:2003",
        ),
        (
            format!("{graphite}prefix = \".lb\"\n"),
            "lb.toml:6:10: graphite.prefix: letters, digits, '.', '_' or '-', not starting or ending with '.'",
        ),
        (
            format!("{graphite}interval = \"0ms\"\n"),
            "lb.toml:6:12: graphite.interval: must be greater than zero",
        ),
        (
            format!("{graphite}max_buffered_lines = 10000001\n"),
            "lb.toml:6:22: graphite.max_buffered_lines: must be 1..=10000000",
        ),
        (
            format!("{MINIMAL}[dataplane]\nmax_vips = 1\n{ipip}{l2dsr6}"),
            "lb.toml:9:1: vip: 2 VIPs configured, dataplane.max_vips is 1",
        ),
        (
            with_vip("[[vip]]\naddress = \"198.18.100.1:80\"\nmode = \"ipip\"\n"),
            "lb.toml:7:11: vip[0].address: \"198.18.100.1:80\" is not a VIP: no /tcp or /udp (expected ADDRESS:PORT/PROTO, e.g. 198.18.100.1:80/tcp or [fd00:198:18:100::1]:53/udp)",
        ),
        (
            with_vip(&format!("{ipip}{ipip}")),
            "lb.toml:10:11: vip[1].address: 198.18.100.1:80/tcp is configured twice",
        ),
        (
            with_vip(&format!("{hc}type = \"icmp\"\n")),
            "lb.toml:10:8: vip[0].health_check.type: \"icmp\": expected tcp, http, udp or none",
        ),
        (
            with_vip(&format!("{hc}type = \"tcp\"\ntimeout = \"3s\"\n")),
            "lb.toml:11:11: vip[0].health_check.timeout: must not exceed the interval",
        ),
        (
            with_vip(&format!("{hc}type = \"tcp\"\nfall = 101\n")),
            "lb.toml:11:8: vip[0].health_check.fall: must be 1..=100",
        ),
        (
            with_vip(&format!("{hc}type = \"tcp\"\nfastinter = \"0s\"\n")),
            "lb.toml:11:13: vip[0].health_check.fastinter: must be greater than zero",
        ),
        (
            with_vip(&format!("{hc}type = \"tcp\"\ndowninter = \"1x\"\n")),
            "lb.toml:11:13: vip[0].health_check.downinter: \"1x\": unknown unit \"x\" (use ms, s or m)",
        ),
        (
            with_vip(&format!("{hc}type = \"tcp\"\nport = 65536\n")),
            "lb.toml:11:8: vip[0].health_check.port: must be 1..=65535",
        ),
        (
            with_vip(&format!("{hc}type = \"http\"\npath = \"/a b\"\n")),
            "lb.toml:11:8: vip[0].health_check.path: must start with / and contain no spaces",
        ),
        (
            with_vip(&format!("{hc}type = \"http\"\nexpect_status = 600\n")),
            "lb.toml:11:17: vip[0].health_check.expect_status: must be an HTTP status, 100..=599",
        ),
        (
            with_vip(&format!("{hc}type = \"udp\"\n")),
            "lb.toml:9:1: vip[0].health_check.payload: a udp check needs a payload to send",
        ),
        (
            with_vip(&format!("{hc}type = \"udp\"\npayload = \"\"\n")),
            "lb.toml:11:11: vip[0].health_check.payload: must not be empty",
        ),
        (
            be(ipip, "[[vip.backend]]\naddress = \"backend-1\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: \"backend-1\" is not an IP address",
        ),
        (
            be(ipip, "[[vip.backend]]\naddress = \"127.0.0.1\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: 127.0.0.1 must be a unicast, non-loopback address",
        ),
        (
            be(ipip, "[[vip.backend]]\naddress = \"0.0.0.0\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: 0.0.0.0 must be a unicast, non-loopback address",
        ),
        (
            be(ipip, "[[vip.backend]]\naddress = \"224.0.0.1\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: 224.0.0.1 must be a unicast, non-loopback address",
        ),
        (
            be(ipip6, "[[vip.backend]]\naddress = \"::1\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: ::1 must be a unicast, non-loopback address",
        ),
        (
            be(ipip, "[[vip.backend]]\naddress = \"255.255.255.255\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: 255.255.255.255 must be a unicast, non-loopback address",
        ),
        (
            with_vip("[[vip]]\naddress = \"255.255.255.255:80/tcp\"\nmode = \"ipip\"\n"),
            "lb.toml:7:11: vip[0].address: \"255.255.255.255:80/tcp\" is not a VIP: the address must be a unicast address (expected ADDRESS:PORT/PROTO, e.g. 198.18.100.1:80/tcp or [fd00:198:18:100::1]:53/udp)",
        ),
        (
            be(
                ipip,
                "[[vip.backend]]\naddress = \"198.18.0.20\"\n[[vip.backend]]\naddress = \"198.18.0.20\"\nweight = 70000\n",
            ),
            "lb.toml:12:11: vip[0].backend[1].address: backend 198.18.0.20 is listed twice for 198.18.100.1:80/tcp",
        ),
        (
            be(ipip, "[[vip.backend]]\naddress = \"fd00:198:18::20\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: an IPv4 VIP cannot be tunnelled to an IPv6 backend (4in6 is not supported)",
        ),
        (
            be(l2dsr, "[[vip.backend]]\naddress = \"fd00:198:18::20\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: l2dsr backends must be of the VIP's address family",
        ),
        (
            be(l2dsr6, "[[vip.backend]]\naddress = \"198.18.0.20\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: l2dsr backends must be of the VIP's address family",
        ),
        (
            format!("{MINIMAL}{ipip}[[vip.backend]]\naddress = \"198.18.0.20\"\n"),
            "lb.toml:8:11: vip[0].backend[0].address: ipip to an IPv4 backend needs dataplane.encap_source_v4",
        ),
        (
            be(ipip6, "[[vip.backend]]\naddress = \"fd00:198:18::20\"\n"),
            "lb.toml:10:11: vip[0].backend[0].address: ipip to an IPv6 backend needs dataplane.encap_source_v6",
        ),
        (
            be(
                ipip,
                "[[vip.backend]]\naddress = \"198.18.0.20\"\nweight = 65536\n",
            ),
            "lb.toml:11:10: vip[0].backend[0].weight: 65536 is out of range (0..=65535; 0 drains)",
        ),
        (
            format!(
                "{MINIMAL}[dataplane]\nencap_source_v4 = \"198.18.0.2\"\nmax_backends = 2\n{ipip}[[vip.backend]]\naddress = \"198.18.0.20\"\n[[vip.backend]]\naddress = \"198.18.0.21\"\n"
            ),
            "lb.toml:7:1: vip[0].backend: 2 backends in all, dataplane.max_backends is 2 (id 0 is reserved)",
        ),
    ];
    for (text, want) in &cases {
        assert_eq!(&err(text).to_string(), want, "for\n{text}");
    }
}

#[test]
fn vips_and_backends_are_unicast() {
    for (vip, why) in [
        ("127.0.0.1:80/tcp", "must not be a loopback address"),
        ("[::1]:53/udp", "must not be a loopback address"),
        ("255.255.255.255:80/tcp", "must be a unicast address"),
        ("224.0.0.1:80/tcp", "must be a unicast address"),
        ("[ff02::1]:80/tcp", "must be a unicast address"),
        ("[::]:80/tcp", "must be a unicast address"),
    ] {
        rejects(
            &with_vip(&format!("[[vip]]\naddress = \"{vip}\"\nmode = \"l2dsr\"\n")),
            7,
            "vip[0].address",
            why,
        );
    }
    assert_eq!(
        err(&with_vip(
            "[[vip]]\naddress = \"127.0.0.1:80/tcp\"\nmode = \"ipip\"\n"
        ))
        .to_string(),
        "lb.toml:7:11: vip[0].address: \"127.0.0.1:80/tcp\" is not a VIP: the address must not be a loopback address (expected ADDRESS:PORT/PROTO, e.g. 198.18.100.1:80/tcp or [fd00:198:18:100::1]:53/udp)"
    );
    let vip = "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n";
    for backend in ["255.255.255.255", "127.0.0.2", "239.1.2.3"] {
        rejects(
            &with_vip(&format!("{vip}[[vip.backend]]\naddress = \"{backend}\"\n")),
            10,
            "vip[0].backend[0].address",
            &format!("{backend} must be a unicast, non-loopback address"),
        );
    }
}

fn spec(s: &str) -> VipSpec {
    s.parse().expect("a valid VIP")
}

const V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 2);

/// Long because it is one table, a row per rule and per way round it.
#[test]
fn backend_rules_one_by_one() {
    let both = EncapSources {
        v4: Some(V4),
        v6: Some(V6),
    };
    let none = EncapSources::default();
    let vip4 = spec("198.18.100.1:80/tcp");
    let vip6 = spec("[fd00:198:18:100::1]:80/tcp");
    let b4: IpAddr = "198.18.0.20".parse().expect("an address");
    let b6: IpAddr = "fd00:198:18::20".parse().expect("an address");
    let empty = BTreeSet::new();
    let has_b4 = BTreeSet::from([b4]);
    use BackendRule::*;
    use ForwardMode::{Ipip, L2dsr};
    /// VIP, mode, backend, weight, encap sources, existing backends, verdict.
    type Case<'a> = (
        &'a VipSpec,
        ForwardMode,
        IpAddr,
        u32,
        EncapSources,
        &'a BTreeSet<IpAddr>,
        Result<(), BackendRule>,
    );
    let cases: [Case; 14] = [
        (&vip4, Ipip, b4, 100, both, &empty, Ok(())),
        (&vip6, Ipip, b4, 100, both, &empty, Ok(())),
        (&vip6, Ipip, b6, 0, both, &empty, Ok(())),
        (&vip4, L2dsr, b4, MAX_WEIGHT, none, &empty, Ok(())),
        (
            &vip4,
            Ipip,
            IpAddr::V4(Ipv4Addr::BROADCAST),
            100,
            both,
            &empty,
            Err(NotUnicast {
                addr: IpAddr::V4(Ipv4Addr::BROADCAST),
            }),
        ),
        (
            &vip6,
            L2dsr,
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            100,
            both,
            &empty,
            Err(NotUnicast {
                addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            }),
        ),
        (
            &vip4,
            Ipip,
            b4,
            100,
            both,
            &has_b4,
            Err(ListedTwice {
                vip: vip4,
                addr: b4,
            }),
        ),
        // Listed twice is about the address, which is checked first.
        (
            &vip4,
            Ipip,
            b4,
            MAX_WEIGHT + 1,
            both,
            &has_b4,
            Err(ListedTwice {
                vip: vip4,
                addr: b4,
            }),
        ),
        (&vip4, Ipip, b6, 100, both, &empty, Err(FourInSix)),
        (&vip4, L2dsr, b6, 100, both, &empty, Err(L2dsrFamily)),
        (&vip6, L2dsr, b4, 100, both, &empty, Err(L2dsrFamily)),
        (&vip6, Ipip, b4, 100, none, &empty, Err(NoEncapSourceV4)),
        (&vip6, Ipip, b6, 100, none, &empty, Err(NoEncapSourceV6)),
        (
            &vip4,
            L2dsr,
            b4,
            MAX_WEIGHT + 1,
            none,
            &empty,
            Err(Weight {
                weight: MAX_WEIGHT + 1,
            }),
        ),
    ];
    for (vip, mode, addr, weight, encap, existing, want) in cases {
        assert_eq!(
            check_backend(vip, mode, addr, weight, encap, existing),
            want,
            "{vip} {mode} {addr} weight {weight}"
        );
    }
}

#[test]
fn backend_rules_read_on_their_own_and_name_their_field() {
    let vip = spec("198.18.100.1:80/tcp");
    let addr: IpAddr = "198.18.0.20".parse().expect("an address");
    for (rule, field, text) in [
        (
            BackendRule::NotUnicast {
                addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
            BackendField::Address,
            "127.0.0.1 must be a unicast, non-loopback address",
        ),
        (
            BackendRule::ListedTwice { vip, addr },
            BackendField::Address,
            "backend 198.18.0.20 is listed twice for 198.18.100.1:80/tcp",
        ),
        (
            BackendRule::NoEncapSourceV6,
            BackendField::Address,
            "ipip to an IPv6 backend needs dataplane.encap_source_v6",
        ),
        (
            BackendRule::Weight { weight: 70_000 },
            BackendField::Weight,
            "70000 is out of range (0..=65535; 0 drains)",
        ),
    ] {
        assert_eq!(rule.to_string(), text);
        assert_eq!(rule.field(), field, "{rule}");
    }
    assert_eq!(BackendField::Address.name(), "address");
    assert_eq!(BackendField::Weight.name(), "weight");
}

#[test]
fn config_gives_its_encap_sources() {
    let c = Config::parse("example.toml", GOOD).expect("the example is valid");
    assert_eq!(
        c.encap_sources(),
        EncapSources {
            v4: Some(V4),
            v6: Some(V6),
        }
    );
    let c = Config::parse("lb.toml", MINIMAL).expect("the minimal config is valid");
    assert_eq!(c.encap_sources(), EncapSources::default());
}

#[test]
fn announce_defaults_and_limits() {
    let c = Config::parse("lb.toml", MINIMAL).unwrap();
    assert_eq!(c.announce, None, "no [announce]: nothing announced");
    let c = Config::parse("lb.toml", &format!("{MINIMAL}[announce]\n")).unwrap();
    assert_eq!(
        c.announce,
        Some(AnnounceConfig {
            table: DEFAULT_ANNOUNCE_TABLE,
            device: "lo".into(),
            min_healthy_backends: 1,
        })
    );
    let c = Config::parse(
        "lb.toml",
        &with_vip(
            "[announce]\ntable = 4242\nmin_healthy_backends = 2\n\
             [[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\nmin_healthy_backends = 3\n",
        ),
    )
    .unwrap();
    let a = c.announce.unwrap();
    assert_eq!((a.table, a.min_healthy_backends), (4242, 2));
    assert_eq!(c.vips[0].min_healthy_backends, Some(3));
    for table in [0, 253, 254, 255] {
        rejects(
            &format!("{MINIMAL}[announce]\ntable = {table}\n"),
            5,
            "announce.table",
            "a table of its own",
        );
    }
    rejects(
        &format!("{MINIMAL}[announce]\ndevice = \"\"\n"),
        5,
        "announce.device",
        "1 to 15 characters",
    );
    rejects(
        &format!("{MINIMAL}[announce]\nrouter = \"x\"\n"),
        5,
        "",
        "unknown field",
    );
}

#[test]
fn a_check_host_cannot_inject_headers() {
    for host in ["a\\r\\nX-Evil: 1", "a\\nb", "a b", ""] {
        rejects(
            &with_vip(&format!(
                "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n\
                 [vip.health_check]\ntype = \"http\"\npath = \"/h\"\nhost = \"{host}\"\n"
            )),
            12,
            "vip[0].health_check.host",
            "no spaces or line breaks",
        );
    }
}

#[test]
fn graphite_spool_bound() {
    let graphite = format!("{MINIMAL}[graphite]\naddress = \"127.0.0.1:2003\"\n");
    let bound = |extra: &str| {
        Config::parse("lb.toml", &format!("{graphite}{extra}"))
            .unwrap()
            .graphite
            .unwrap()
            .spool_max_bytes
    };
    assert_eq!(bound(""), 64 << 20);
    assert_eq!(bound("spool_max_bytes = 0\n"), 0, "0 turns the spool off");
    assert_eq!(bound("spool_max_bytes = 4096\n"), 4096);
    assert_eq!(bound("spool_max_bytes = 1099511627776\n"), 1 << 40);
    for bad in ["1", "4095", "1099511627777"] {
        let e = err(&format!("{graphite}spool_max_bytes = {bad}\n"));
        assert_eq!(
            e.to_string(),
            "lb.toml:6:19: graphite.spool_max_bytes: must be 0 (no spool) or 4096..=1099511627776",
            "{bad}"
        );
    }
    rejects(&format!("{graphite}spool_max_bytes = -1\n"), 6, "", "-1");
}

#[test]
fn tcp_idle_timeout_has_a_default_and_bounds() {
    let idle = |extra: &str| {
        Config::parse("lb.toml", &format!("{MINIMAL}[dataplane]\n{extra}"))
            .unwrap()
            .tcp_idle_timeout
    };
    assert_eq!(idle(""), Duration::from_secs(3600));
    assert_eq!(
        idle("tcp_idle_timeout = \"10m\"\n"),
        Duration::from_secs(600)
    );
    assert_eq!(
        idle("tcp_idle_timeout = \"1440m\"\n"),
        Duration::from_secs(86_400)
    );
    let e = err(&format!(
        "{MINIMAL}[dataplane]\ntcp_idle_timeout = \"30s\"\n"
    ));
    assert!(
        e.to_string()
            .contains("dataplane.tcp_idle_timeout: must be at least 1m"),
        "{e}"
    );
    let e = err(&format!(
        "{MINIMAL}[dataplane]\ntcp_idle_timeout = \"1441m\"\n"
    ));
    assert!(e.to_string().contains("dataplane.tcp_idle_timeout"), "{e}");
}

#[test]
fn safe_change_settings_parse_with_defaults_and_limits() {
    let text = with_vip(
        "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\nslowstart = \"30s\"\nmin_healthy = 0.5\n\
         [vip.health_check]\ntype = \"tcp\"\nflap_limit = 6\nflap_window = \"20s\"\nflap_hold = \"5s\"\n\
         [[vip.backend]]\naddress = \"198.18.0.20\"\n\
         [[vip.backend]]\naddress = \"198.18.0.21\"\nslowstart = \"0s\"\n",
    );
    let c = Config::parse("lb.toml", &text).unwrap();
    let v = &c.vips[0];
    assert_eq!(v.slowstart, Duration::from_secs(30));
    assert_eq!(v.min_healthy_permille, 500);
    assert_eq!(v.health_check.flap.limit, 6);
    assert_eq!(v.health_check.flap.window, Duration::from_secs(20));
    assert_eq!(v.health_check.flap.hold, Duration::from_secs(5));
    assert_eq!(v.slowstart_of(v.backends[0].addr), Duration::from_secs(30));
    assert_eq!(
        v.slowstart_of(v.backends[1].addr),
        Duration::ZERO,
        "per backend"
    );
    // Defaults: no slow start, no panic mode, flap damping on.
    let plain = Config::parse(
        "lb.toml",
        &with_vip("[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n"),
    )
    .unwrap();
    assert_eq!(plain.vips[0].slowstart, Duration::ZERO);
    assert_eq!(plain.vips[0].min_healthy_permille, 0);
    assert_eq!(plain.vips[0].health_check.flap, FlapDamping::default());

    let vip = |extra: &str| {
        with_vip(&format!(
            "[[vip]]\naddress = \"198.18.100.1:80/tcp\"\nmode = \"ipip\"\n{extra}"
        ))
    };
    rejects(
        &vip("min_healthy = 1.5\n"),
        9,
        "vip[0].min_healthy",
        "fraction 0.0..=1.0",
    );
    rejects(
        &vip("slowstart = \"61m\"\n"),
        9,
        "vip[0].slowstart",
        "at most 60m",
    );
    rejects(&vip("slowstart = \"soon\"\n"), 9, "vip[0].slowstart", "");
    rejects(
        &vip("[vip.health_check]\ntype = \"tcp\"\nflap_limit = 0\n"),
        11,
        "vip[0].health_check.flap_limit",
        "1..=1000",
    );
    rejects(
        &vip("[[vip.backend]]\naddress = \"198.18.0.20\"\nslowstart = \"1x\"\n"),
        11,
        "vip[0].backend[0].slowstart",
        "unknown unit",
    );
}

#[test]
fn a_reload_names_the_settings_only_a_restart_applies() {
    let a = Config::parse("lb.toml", GOOD).unwrap();
    let mut b = a.clone();
    assert!(a.restart_only_changes(&b).is_empty());
    b.vips.pop();
    assert!(a.restart_only_changes(&b).is_empty(), "VIPs reload");
    b.hash_seed += 1;
    b.interface = "eth9".into();
    assert_eq!(
        a.restart_only_changes(&b),
        vec!["instance.interface", "dataplane.hash_seed"]
    );
}
