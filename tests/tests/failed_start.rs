//! A start either succeeds or leaves the machine as it was. Each case
//! below passes validation (`lbd --check` accepts it) and then fails at one
//! point of the start; afterwards there is no XDP program on the interface,
//! no pin, no control socket, no instance lock, no state directory, no
//! sysctl backup, and the namespace's sysctls are as they were (every case
//! asks for `[sysctl] apply = true`). When a running data plane was being
//! adopted, it is left exactly as it was: same program, still forwarding.

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_tests::{Topology, addressing, http_get, in_netns, lbd, lbd_path};
use lb_userspace::dataplane::AttachMode;

const PORT: u16 = 80;
const METRICS: &str = "127.0.0.1:9131";

/// The namespaced keys of the LB sysctl profile (the global
/// `net.core.netdev_max_backlog` is not visible in a namespace).
const SYSCTLS: &[&str] = &[
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.conf.all.rp_filter",
];

struct Case<'a> {
    name: &'a str,
    /// `[instance]` lines beyond the preamble's.
    instance: &'a str,
    /// Replaces the state file's path.
    state_file: Option<PathBuf>,
    /// Replaces the control socket's path.
    api_socket: Option<PathBuf>,
    /// Replaces the instance name.
    instance_name: Option<&'a str>,
    conntrack_entries: u32,
    /// Extra backend addresses for the VIP.
    extra_backends: &'a [&'a str],
    /// Runs lbd in a memory cgroup this small (bytes).
    memory_limit: Option<u64>,
    /// What lbd's error must say.
    expect: &'a str,
}

impl Default for Case<'_> {
    fn default() -> Self {
        Case {
            name: "",
            instance: "",
            state_file: None,
            api_socket: None,
            instance_name: None,
            conntrack_entries: 65536,
            extra_backends: &[],
            memory_limit: None,
            expect: "",
        }
    }
}

fn sysctls(t: &Topology) -> Vec<String> {
    SYSCTLS
        .iter()
        .map(|k| t.exec(t.lb().ns(), &["sysctl", "-n", k]).unwrap())
        .collect()
}

/// The program attached to the LB's interface, if any (`prog/xdp id N`).
fn xdp_program(t: &Topology) -> Option<String> {
    let out = t
        .exec(
            t.lb().ns(),
            &["ip", "-d", "link", "show", "dev", t.lb().ifname()],
        )
        .unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(3)
        .find(|w| w[0].starts_with("prog/xdp") && w[1] == "id")
        .map(|w| w[2].to_owned())
}

fn config_text(t: &Topology, dir: &Path, vip: IpAddr, case: &Case, on_exit: &str) -> String {
    let mut pre = lbd::Preamble {
        on_exit,
        conntrack_entries: case.conntrack_entries,
        instance_extra: case.instance,
        ..Default::default()
    }
    .render(t, dir);
    if let Some(state) = &case.state_file {
        pre = pre.replace(
            &format!("state_file = \"{}/state.json\"", dir.display()),
            &format!("state_file = \"{}\"", state.display()),
        );
    }
    if let Some(socket) = &case.api_socket {
        pre = pre.replace(
            &format!("api_socket = \"{}/lbd.sock\"", dir.display()),
            &format!("api_socket = \"{}\"", socket.display()),
        );
    }
    if let Some(name) = case.instance_name {
        pre = pre.replace(
            &format!("name = \"{}\"", t.instance_name()),
            &format!("name = \"{name}\""),
        );
    }
    let extra: String = case
        .extra_backends
        .iter()
        .map(|a| format!("[[vip.backend]]\naddress = \"{a}\"\n"))
        .collect();
    format!(
        "{pre}[sysctl]\napply = true\n\
         [[vip]]\naddress = \"{vip}:{PORT}/tcp\"\nmode = \"ipip\"\n{}{extra}",
        lbd::backend_tables(t.backends()),
    )
}

/// A memory cgroup (v1 or v2) holding whatever is moved into it, removed on
/// drop.
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn new(name: &str, limit: u64) -> MemoryCgroup {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (dir, file) = if v1.is_dir() {
            (v1.join(name), "memory.limit_in_bytes")
        } else {
            (Path::new("/sys/fs/cgroup").join(name), "memory.max")
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), limit.to_string()).unwrap();
        MemoryCgroup(dir)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs `lbd --config` in the LB namespace to its end (it must fail) and
/// returns what it printed on stderr.
fn run_failing(t: &Topology, config: &Path, cgroup: Option<&MemoryCgroup>) -> String {
    let lbd = lbd_path().unwrap();
    let check = Command::new(&lbd)
        .arg("--config")
        .arg(config)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the case must pass validation: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    // The cgroup first, then lbd in the same process: nothing of it runs
    // outside the limit.
    let cgroup_dir = cgroup
        .map(|c| c.0.display().to_string())
        .unwrap_or_default();
    let out = in_netns(t.lb().ns(), || {
        Command::new("timeout")
            .args([
                "60",
                "sh",
                "-c",
                r#"[ -z "$1" ] || echo $$ > "$1/cgroup.procs" || exit 99; exec "$2" --config "$3""#,
                "sh",
            ])
            .arg(&cgroup_dir)
            .arg(&lbd)
            .arg(config)
            .output()
    })
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "lbd must fail: {stderr}");
    assert_ne!(out.status.code(), Some(124), "lbd hung: {stderr}");
    assert_ne!(out.status.code(), Some(99), "joining the cgroup: {stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("\"ready\""),
        "lbd must not report ready"
    );
    stderr
}

#[test]
fn a_failed_start_changes_nothing() {
    let t = Topology::new(2).unwrap();
    let _servers = t.start_servers(PORT, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip = IpAddr::from(addressing::vip_v4(1));
    t.add_vip_on_backends(vip).unwrap();
    let root = std::env::temp_dir().join(format!("{}-failed-start", t.id()));
    std::fs::create_dir_all(&root).unwrap();
    let instance = t.instance_name();
    let pins = Path::new("/sys/fs/bpf").join(&instance);
    let lock = Path::new("/run/lb").join(format!("{instance}.lock"));
    let sysctls_before = sysctls(&t);
    // Cleans up whatever a failing case would have left, and the directory.
    let good = Case::default();
    let root_cfg = root.join("lb.toml");
    std::fs::write(&root_cfg, config_text(&t, &root, vip, &good, "detach")).unwrap();
    let _teardown = lbd::Teardown::new(root_cfg);

    // Someone else's listener on the metrics address.
    let held = t
        .in_ns(t.lb().ns(), || TcpListener::bind(METRICS).unwrap())
        .unwrap();
    let blocker = root.join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    let unreachable = "198.19.200.1";
    let silent = addressing::host_v4(250).to_string();
    let in_use = format!("metrics_listen = \"{METRICS}\"\n");
    let cases = [
        Case {
            name: "metrics address in use",
            instance: &in_use,
            expect: "instance.metrics_listen",
            ..Default::default()
        },
        Case {
            name: "metrics address not on this host",
            instance: "metrics_listen = \"198.18.0.199:9100\"\n",
            expect: "instance.metrics_listen",
            ..Default::default()
        },
        Case {
            name: "state directory cannot be created",
            state_file: Some(blocker.join("state").join("state.json")),
            expect: "instance.state_file",
            ..Default::default()
        },
        Case {
            name: "backend without a route",
            extra_backends: &[unreachable],
            expect: unreachable,
            ..Default::default()
        },
        Case {
            name: "backend that never answers ARP",
            extra_backends: &[&silent],
            expect: &silent,
            ..Default::default()
        },
        Case {
            name: "a regular file at the control socket's path",
            api_socket: Some(blocker.clone()),
            expect: "a regular file, which lbd will not delete",
            ..Default::default()
        },
        Case {
            name: "map creation fails (ENOMEM in a small memory cgroup)",
            conntrack_entries: 1 << 22,
            memory_limit: Some(48 << 20),
            expect: "loading the XDP object",
            ..Default::default()
        },
    ];
    for case in &cases {
        let slug: String = case
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let dir = root.join(slug);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("lb.toml");
        std::fs::write(&cfg, config_text(&t, &dir, vip, case, "detach")).unwrap();
        let cgroup = case
            .memory_limit
            .map(|l| MemoryCgroup::new(&format!("{}-lbd", t.id()), l));
        let stderr = run_failing(&t, &cfg, cgroup.as_ref());
        let name = case.name;
        assert!(stderr.contains(case.expect), "{name}: {stderr}");
        assert_eq!(xdp_program(&t), None, "{name}: an XDP program is attached");
        assert!(!pins.exists(), "{name}: {} left", pins.display());
        assert!(!dir.join("lbd.sock").exists(), "{name}: socket left");
        assert!(!lock.exists(), "{name}: lock left");
        assert!(
            !dir.join("state.json").exists(),
            "{name}: state file written"
        );
        assert!(
            !dir.join(format!("{instance}.sysctl-backup.json")).exists(),
            "{name}: sysctl backup left"
        );
        assert!(!blocker.join("state").exists());
        assert!(
            blocker.is_file(),
            "{name}: the file at the socket's path was touched"
        );
        assert_eq!(sysctls(&t), sysctls_before, "{name}: sysctls changed");
    }

    // Adopting: a running data plane, left by an lbd with on_exit = keep.
    let dir = root.join("adopting");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    std::fs::write(&cfg, config_text(&t, &dir, vip, &good, "keep")).unwrap();
    let (mut running, ready) = lbd::start(&t, &cfg).unwrap();
    assert!(ready.contains("\"adopted\":false"), "{ready}");
    lbd::stop(&mut running).unwrap();
    let program = xdp_program(&t).expect("the kept data plane is attached");
    let state = std::fs::read(dir.join("state.json")).unwrap();
    let target = SocketAddr::new(vip, PORT);
    let get = || {
        t.in_client(|| http_get(target, "/", Duration::from_secs(2)))
            .unwrap()
    };
    get().expect("the kept data plane forwards");
    // The running lbd applied the profile; a failed adoption must keep it.
    let sysctls_running = sysctls(&t);
    for case in [
        Case {
            name: "adopting: metrics address in use",
            instance: &in_use,
            expect: "instance.metrics_listen",
            ..Default::default()
        },
        Case {
            name: "adopting: backend that never answers ARP",
            extra_backends: &[&silent],
            expect: &silent,
            ..Default::default()
        },
    ] {
        std::fs::write(&cfg, config_text(&t, &dir, vip, &case, "detach")).unwrap();
        let stderr = run_failing(&t, &cfg, None);
        let name = case.name;
        assert!(stderr.contains(case.expect), "{name}: {stderr}");
        assert_eq!(
            xdp_program(&t).as_deref(),
            Some(program.as_str()),
            "{name}: the running program was replaced or detached"
        );
        assert!(pins.exists(), "{name}: the running data plane was unpinned");
        assert_eq!(sysctls(&t), sysctls_running, "{name}: sysctls changed");
        assert!(!dir.join("lbd.sock").exists(), "{name}: socket left");
        assert!(!lock.exists(), "{name}: lock left");
        assert_eq!(
            std::fs::read(dir.join("state.json")).unwrap(),
            state,
            "{name}: state file changed"
        );
        get().unwrap_or_else(|e| panic!("{name}: the running data plane stopped: {e:#}"));
    }

    // Another lbd (another instance) configured with the running one's
    // control socket: refused, and the running one stays reachable.
    std::fs::write(&cfg, config_text(&t, &dir, vip, &good, "keep")).unwrap();
    let (mut running, ready) = lbd::start(&t, &cfg).unwrap();
    assert!(ready.contains("\"adopted\":true"), "{ready}");
    let other_dir = root.join("second-instance");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_cfg = other_dir.join("lb.toml");
    let second = Case {
        name: "another lbd's live control socket",
        api_socket: Some(dir.join("lbd.sock")),
        instance_name: Some("lbtsecond"),
        expect: "is in use",
        ..Default::default()
    };
    std::fs::write(
        &other_cfg,
        config_text(&t, &other_dir, vip, &second, "detach"),
    )
    .unwrap();
    let stderr = run_failing(&t, &other_cfg, None);
    assert!(stderr.contains(second.expect), "{stderr}");
    assert!(!Path::new("/sys/fs/bpf/lbtsecond").exists());
    let list = Command::new(lb_tests::lbctl_path().unwrap())
        .arg("--socket")
        .arg(dir.join("lbd.sock"))
        .arg("list")
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "the first lbd is unreachable: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    // The running lbd swapped its own program in when it adopted; the
    // refused one left it attached.
    let adopted_program = xdp_program(&t);
    assert!(adopted_program.is_some() && adopted_program.as_deref() != Some(program.as_str()));
    lbd::stop(&mut running).unwrap();
    drop(held);
}
