//! The backend role's file: the example loads, every bad field is named
//! with its line and column, and balancer files are told apart.

use super::*;

const EXAMPLE: &str = include_str!("../../../config/backend.toml");

const MINIMAL: &str = "role = \"backend\"\n[instance]\nname = \"web1\"\ninterface = \"eth0\"\n";

#[test]
fn the_example_loads() {
    let c = BackendConfig::parse("backend.toml", EXAMPLE).expect("the example is valid");
    assert_eq!(c.name, "web1");
    assert_eq!(c.interface, "eth0");
    assert_eq!(c.xdp_mode, AttachMode::Auto);
    assert_eq!(c.api_socket, PathBuf::from("/run/lb/web1.sock"));
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
    assert_eq!(c.on_exit, OnExit::Keep);
    assert_eq!(c.gue_port, 6080);
    assert_eq!(
        c.vips,
        vec![
            "198.18.100.1".parse::<IpAddr>().unwrap(),
            "fd00:198:18:100::1".parse().unwrap()
        ]
    );
    assert!(c.sysctl_apply);
    assert_eq!(c.second_hops, None, "the interface's prefixes");
    let listed = EXAMPLE.replace("# second_hops", "second_hops");
    let c = BackendConfig::parse("backend.toml", &listed).expect("the commented list is valid");
    assert_eq!(
        c.second_hops,
        Some(vec![
            "198.18.0.0/24".parse().unwrap(),
            "fd00:198:18::/64".parse().unwrap()
        ])
    );
    let c = BackendConfig::parse("backend.toml", EXAMPLE).unwrap();
    assert_eq!(
        c.sysctl_backup(),
        PathBuf::from("/var/lib/lb/web1.sysctl-backup.json")
    );
}

#[test]
fn defaults() {
    let c = BackendConfig::parse("b.toml", MINIMAL).unwrap();
    assert_eq!(c.api_socket, PathBuf::from("/run/lb/web1.sock"));
    assert_eq!(c.state_file, PathBuf::from("/var/lib/lb/web1.state.json"));
    assert_eq!(c.gue_port, lb_common::wire::gue::GUE_DEFAULT_PORT);
    assert_eq!(c.metrics_listen, None);
    assert_eq!(c.on_exit, OnExit::Keep);
    assert!(c.vips.is_empty());
    assert!(!c.sysctl_apply);
    assert_eq!(c.second_hops, None);
    let none = format!("{MINIMAL}[decap]\nsecond_hops = []\n");
    assert_eq!(
        BackendConfig::parse("b.toml", &none).unwrap().second_hops,
        Some(Vec::new()),
        "an empty list allows no second hop"
    );
    let off = format!("{MINIMAL}[decap]\ngue_port = 0\n");
    assert_eq!(BackendConfig::parse("b.toml", &off).unwrap().gue_port, 0);
}

/// Each row: what is wrong, the file, and the error's `line:col: field`
/// and a piece of its message.
#[test]
fn every_bad_field_is_named_where_it_is() {
    let head = "role = \"backend\"\n[instance]\n";
    let inst = format!("{head}name = \"web1\"\ninterface = \"eth0\"\n");
    let rows: Vec<(&str, String, &str, &str)> = vec![
        (
            "role of another value",
            "role = \"lb\"\n[instance]\nname = \"a\"\ninterface = \"eth0\"\n".into(),
            "1:8: role",
            "expected \"backend\"",
        ),
        (
            "name too long",
            format!(
                "{head}name = \"{}\"\ninterface = \"eth0\"\n",
                "x".repeat(33)
            ),
            "3:8: instance.name",
            "1 to 32",
        ),
        (
            "name with a slash",
            format!("{head}name = \"a/b\"\ninterface = \"eth0\"\n"),
            "3:8: instance.name",
            "pin directory",
        ),
        (
            "interface too long",
            format!("{head}name = \"a\"\ninterface = \"{}\"\n", "e".repeat(16)),
            "4:13: instance.interface",
            "1 to 15",
        ),
        (
            "xdp mode",
            format!("{inst}xdp_mode = \"fast\"\n"),
            "5:12: instance.xdp_mode",
            "native, generic or auto",
        ),
        (
            "metrics address",
            format!("{inst}metrics_listen = \"localhost\"\n"),
            "5:18: instance.metrics_listen",
            "ADDRESS:PORT",
        ),
        (
            "on_exit",
            format!("{inst}on_exit = \"sometimes\"\n"),
            "5:11: ",
            "unknown variant",
        ),
        (
            "unknown instance field",
            format!("{inst}colour = \"blue\"\n"),
            "5:1: ",
            "unknown field `colour`",
        ),
        (
            "unknown decap field",
            format!("{inst}[decap]\nvip = [\"198.18.100.1\"]\n"),
            "6:1: ",
            "unknown field `vip`",
        ),
        (
            "gue port out of range",
            format!("{inst}[decap]\ngue_port = 70000\n"),
            "6:12: ",
            "",
        ),
        (
            "not an address",
            format!("{inst}[decap]\nvips = [\"198.18.100.1\", \"web\"]\n"),
            "6:25: decap.vips[1]",
            "not an IP address",
        ),
        (
            "a prefix",
            format!("{inst}[decap]\nvips = [\"198.18.100.1/32\"]\n"),
            "6:9: decap.vips[0]",
            "without a prefix length",
        ),
        (
            "twice",
            format!(
                "{inst}[decap]\nvips = [\n  \"fd00:198:18:100::1\",\n  \"FD00:198:18:100::1\",\n]\n"
            ),
            "8:3: decap.vips[1]",
            "listed twice",
        ),
        (
            "loopback",
            format!("{inst}[decap]\nvips = [\"127.0.0.1\"]\n"),
            "6:9: decap.vips[0]",
            "not a unicast address",
        ),
        (
            "multicast",
            format!("{inst}[decap]\nvips = [\"ff02::1\"]\n"),
            "6:9: decap.vips[0]",
            "not a unicast address",
        ),
        (
            "mapped",
            format!("{inst}[decap]\nvips = [\"::ffff:198.18.100.1\"]\n"),
            "6:9: decap.vips[0]",
            "write it as 198.18.100.1",
        ),
        (
            "second hop not a prefix",
            format!("{inst}[decap]\nsecond_hops = [\"198.18.0.0/24\", \"lan\"]\n"),
            "6:33: decap.second_hops[1]",
            "not a prefix",
        ),
        (
            "second hop prefix too long",
            format!("{inst}[decap]\nsecond_hops = [\"198.18.0.0/33\"]\n"),
            "6:16: decap.second_hops[0]",
            "0 to 32",
        ),
        (
            "second hop prefix with host bits",
            format!("{inst}[decap]\nsecond_hops = [\"fd00:198:18::1/64\"]\n"),
            "6:16: decap.second_hops[0]",
            "the prefix is fd00:198:18::/64",
        ),
        (
            "second hop prefix twice",
            format!("{inst}[decap]\nsecond_hops = [\"198.18.0.0/24\", \"198.18.0.0/24\"]\n"),
            "6:33: decap.second_hops[1]",
            "listed twice",
        ),
        (
            "second hop mapped",
            format!("{inst}[decap]\nsecond_hops = [\"::ffff:198.18.0.0/120\"]\n"),
            "6:16: decap.second_hops[0]",
            "IPv4-mapped",
        ),
        (
            "sysctl typo",
            format!("{inst}[sysctl]\napply = \"yes\"\n"),
            "6:9: ",
            "",
        ),
        (
            "no instance",
            "role = \"backend\"\n".into(),
            "1:1: ",
            "missing field `instance`",
        ),
    ];
    for (what, text, at, says) in rows {
        let e = BackendConfig::parse("/etc/lb/backend.toml", &text)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("/etc/lb/backend.toml:{at}")),
            "{what}: {shown}"
        );
        assert!(shown.contains(says), "{what}: {shown}");
        assert!(e.line > 0, "{what}: a line is named");
    }
}

#[test]
fn too_many_vips_are_refused_at_the_first_one_over() {
    let list: Vec<String> = (0..=MAX_VIPS)
        .map(|i| format!("\"198.18.{}.{}\"", 100 + i / 250, 1 + i % 250))
        .collect();
    let text = format!("{MINIMAL}[decap]\nvips = [\n{}\n]\n", list.join(",\n"));
    let e = BackendConfig::parse("b.toml", &text).unwrap_err();
    assert_eq!(e.field, format!("decap.vips[{MAX_VIPS}]"));
    assert_eq!(e.line, 7 + MAX_VIPS);
}

#[test]
fn roles_are_told_apart() {
    let dir = std::env::temp_dir().join(format!("lb-backend-role-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rows = [
        ("backend.toml", MINIMAL, Ok(Role::Backend)),
        (
            "balancer.toml",
            "[instance]\nname = \"lb0\"\ninterface = \"eth0\"\n",
            Ok(Role::Balancer),
        ),
        // Not TOML: the balancer's loader reports it, as before.
        ("broken.toml", "[instance\n", Ok(Role::Balancer)),
        ("other.toml", "role = \"balancer\"\n", Err("1:8: role")),
        ("number.toml", "role = 4\n", Err("1:8: role")),
    ];
    for (name, text, want) in rows {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        match (role_of(&path), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{name}"),
            (Err(e), Err(at)) => {
                let shown = e.to_string();
                assert!(shown.contains(at), "{name}: {shown}");
                assert!(
                    shown.contains("a balancer's file has no role line"),
                    "{shown}"
                );
            }
            (got, want) => panic!("{name}: {got:?}, expected {want:?}"),
        }
    }
    let e = role_of(&dir.join("absent.toml")).unwrap_err();
    assert!(e.message.starts_with("cannot read"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prefixes: what they hold, written either way.
#[test]
fn prefixes_hold_their_addresses_only() {
    let p = |s: &str| s.parse::<Prefix>().unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let lan = p("198.18.0.0/24");
    assert!(lan.contains(ip("198.18.0.21")));
    assert!(!lan.contains(ip("198.18.1.21")));
    assert!(!lan.contains(ip("::ffff:198.18.0.21")), "families apart");
    assert_eq!(lan.to_string(), "198.18.0.0/24");
    let host = p("198.18.0.21");
    assert_eq!(host.to_string(), "198.18.0.21/32");
    assert!(host.contains(ip("198.18.0.21")) && !host.contains(ip("198.18.0.22")));
    assert!(p("0.0.0.0/0").contains(ip("203.0.113.1")));
    assert!(!p("0.0.0.0/0").contains(ip("fd00::1")));
    let v6 = p("fd00:198:18::/64");
    assert!(v6.contains(ip("fd00:198:18::21")));
    assert!(!v6.contains(ip("fd00:198:19::21")));
    assert!(p("::/0").contains(ip("2001:db8::1")));
    assert_eq!(p("fd00::1").to_string(), "fd00::1/128");
    assert_eq!(
        Prefix::of(ip("198.18.0.77"), 24),
        Some(lan),
        "an interface address gives its subnet"
    );
    assert_eq!(Prefix::of(ip("198.18.0.77"), 33), None);
}

#[test]
fn restart_only_settings_are_named() {
    let a = BackendConfig::parse("b.toml", EXAMPLE).unwrap();
    let mut b = a.clone();
    b.vips.pop();
    b.gue_port = 0;
    b.second_hops = Some(Vec::new());
    assert!(
        a.restart_only_changes(&b).is_empty(),
        "VIPs, GUE and second hops reload"
    );
    b.interface = "eth1".into();
    b.sysctl_apply = false;
    assert_eq!(
        a.restart_only_changes(&b),
        vec!["instance.interface", "sysctl.apply"]
    );
}
