//! End-to-end service load through the netns topology: the same backends
//! and the same client load (wrk) for every contender, interleaved.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use lb_tests::{Spawned, Topology, addressing, fabric, in_netns, lbd};
use lb_userspace::dataplane::AttachMode;

use crate::summary::{median, range};

const PORT: u16 = 80;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Direct,
    /// The LB's hop without balancing: `fwd_mac` (section 2's trivial
    /// forwarder), every frame rewritten to backend 0 and sent back out.
    Trivial(AttachMode),
    Ours(AttachMode),
    Haproxy,
    Nftables,
}

impl Contender {
    pub fn name(&self) -> String {
        match self {
            Contender::Direct => "direct to one backend (no balancer)".into(),
            Contender::Trivial(m) => format!("trivial XDP forwarder, {m} XDP (to one backend)"),
            Contender::Ours(m) => format!("xdplb, {m} XDP (l2dsr)"),
            Contender::Haproxy => "HAProxy 2.6, TCP mode".into(),
            Contender::Nftables => "nftables DNAT, jhash over 3 backends".into(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Run {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Balancer CPU seconds during the run (softirq delta, or HAProxy's own).
    pub lb_cpu_s: f64,
    pub softirq_s: f64,
    pub generator_cpu_s: f64,
    pub requests: f64,
    pub per_backend: BTreeMap<String, u64>,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// System-wide softirq seconds (all namespaces share the kernel).
fn softirq_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok(f.get(6).copied().unwrap_or(0.0) / clk_tck())
}

fn process_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15; after ") " the first is field 3.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / clk_tck()
}

fn children_cpu_s() -> f64 {
    // SAFETY: a zeroed rusage is valid for getrusage to fill.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    }
}

fn backend_counts(t: &Topology) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (i, b) in t.backends().iter().enumerate() {
        let body = in_netns(b.ns(), move || {
            lb_tests::http_get(
                SocketAddr::new([127, 0, 0, 1].into(), PORT),
                "/stats",
                Duration::from_secs(2),
            )
        })??;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        out.insert(
            format!("backend{i}"),
            v["http_requests"].as_u64().unwrap_or(0),
        );
    }
    Ok(out)
}

/// Parses wrk's --latency report: value in ms.
fn wrk_ms(text: &str, label: &str) -> f64 {
    let Some(line) = text.lines().find(|l| l.trim_start().starts_with(label)) else {
        return f64::NAN;
    };
    let v = line.split_whitespace().nth(1).unwrap_or("");
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

fn quiet(t: &Topology) {
    // Between runs: no TIME_WAIT leftovers, no stale NAT state.
    for ns in t.namespaces() {
        let _ = t.exec(&ns, &["ss", "-K", "state", "time-wait"]);
    }
    let _ = t.exec(t.lb().ns(), &["conntrack", "-F"]);
}

struct Setup {
    target: SocketAddr,
    lb_process: Option<Spawned>,
    /// A forwarder attached by the bench (detached when dropped).
    xdp: Option<aya::Ebpf>,
    dir: PathBuf,
}

fn prepare(t: &Topology, c: Contender, dir: &std::path::Path) -> Result<Setup> {
    let vip: IpAddr = addressing::vip_v4(1).into();
    let lb = t.lb();
    let target = SocketAddr::new(vip, PORT);
    match c {
        Contender::Direct => Ok(Setup {
            target: SocketAddr::new(t.backend(0).ipv4().into(), PORT),
            lb_process: None,
            xdp: None,
            dir: dir.into(),
        }),
        Contender::Trivial(mode) => {
            // It forwards every frame, ARP too: the client's entry for the
            // LB (its route to the VIP) must not need an answer meanwhile.
            client_neigh_of_lb(t, true)?;
            let fwd = crate::rate::attach_forwarder(t, mode);
            if fwd.is_err() {
                client_neigh_of_lb(t, false)?;
            }
            Ok(Setup {
                target,
                lb_process: None,
                xdp: Some(fwd?),
                dir: dir.into(),
            })
        }
        Contender::Ours(mode) => {
            let config = dir.join("lb.toml");
            let mode = mode.to_string();
            std::fs::write(
                &config,
                format!(
                    "{}[[vip]]\naddress = \"{vip}:{PORT}/tcp\"\nmode = \"l2dsr\"\n\
                     [vip.health_check]\ntype = \"tcp\"\ninterval = \"2s\"\n{}",
                    lbd::Preamble {
                        xdp_mode: &mode,
                        conntrack_entries: 262144,
                        ..Default::default()
                    }
                    .render(t, dir),
                    lbd::backend_tables(t.backends()),
                ),
            )?;
            let (p, _) = lbd::start(t, &config)?;
            Ok(Setup {
                target,
                lb_process: Some(p),
                xdp: None,
                dir: dir.into(),
            })
        }
        Contender::Haproxy => {
            t.exec(
                lb.ns(),
                &["ip", "addr", "add", &format!("{vip}/32"), "dev", "lo"],
            )?;
            let servers: String = t
                .backends()
                .iter()
                .enumerate()
                .map(|(i, b)| format!("    server b{i} {}:{PORT}\n", b.ipv4()))
                .collect();
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n    maxconn 4000\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
                     frontend vip\n    bind {vip}:{PORT}\n    default_backend web\nbackend web\n    balance roundrobin\n{servers}"
                ),
            )?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&cfg);
            let p = t
                .spawn(lb.ns(), &mut cmd)
                .context("haproxy (Debian package)")?;
            // Ready when it accepts.
            for _ in 0..50 {
                if in_netns(t.client().ns(), move || {
                    std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200))
                        .is_ok()
                })? {
                    return Ok(Setup {
                        target,
                        lb_process: Some(p),
                        xdp: None,
                        dir: dir.into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            bail!("haproxy did not start")
        }
        Contender::Nftables => {
            let map: Vec<String> = t
                .backends()
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {}", b.ipv4()))
                .collect();
            let rules = format!(
                "table ip lbbench {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  ip daddr {vip} tcp dport {PORT} dnat to jhash ip saddr . tcp sport mod {} map {{ {} }}\n }}\n}}\n",
                map.len(),
                map.join(", ")
            );
            let f = dir.join("nft.rules");
            std::fs::write(&f, rules)?;
            t.exec(lb.ns(), &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            t.exec(lb.ns(), &["nft", "-f", &f.display().to_string()])?;
            // Replies must come back through the LB to be un-NATed.
            for b in t.backends() {
                t.exec(
                    b.ns(),
                    &[
                        "ip",
                        "route",
                        "replace",
                        &format!("{}/32", t.client().ipv4()),
                        "via",
                        &lb.ipv4().to_string(),
                    ],
                )?;
            }
            Ok(Setup {
                target,
                lb_process: None,
                xdp: None,
                dir: dir.into(),
            })
        }
    }
}

/// The client's neighbour entry for the LB: permanent (`pin`), or removed
/// again (ARP resolves it anew for the next contender).
fn client_neigh_of_lb(t: &Topology, pin: bool) -> Result<()> {
    let (c, lb) = (t.client(), t.lb());
    let addr = lb.ipv4().to_string();
    if pin {
        t.exec(
            c.ns(),
            &[
                "ip",
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &lb.mac_string(),
                "dev",
                c.ifname(),
                "nud",
                "permanent",
            ],
        )?;
    } else {
        t.exec(c.ns(), &["ip", "neigh", "del", &addr, "dev", c.ifname()])?;
    }
    Ok(())
}

fn cleanup(t: &Topology, c: Contender, mut s: Setup) {
    let lb = t.lb();
    if let Some(mut p) = s.lb_process.take() {
        // SAFETY: plain kill(2) on a child we own.
        unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
        let _ = p.wait_for_line(|l| l.contains("final_counters"), Duration::from_secs(5));
        p.stop();
    }
    drop(s.xdp.take());
    match c {
        Contender::Trivial(_) => {
            let _ = client_neigh_of_lb(t, false);
        }
        Contender::Haproxy => {
            let _ = t.exec(
                lb.ns(),
                &[
                    "ip",
                    "addr",
                    "del",
                    &format!("{}/32", addressing::vip_v4(1)),
                    "dev",
                    "lo",
                ],
            );
        }
        Contender::Nftables => {
            let _ = t.exec(lb.ns(), &["nft", "delete", "table", "ip", "lbbench"]);
            let _ = t.exec(lb.ns(), &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
            for b in t.backends() {
                let _ = t.exec(
                    b.ns(),
                    &["ip", "route", "del", &format!("{}/32", t.client().ipv4())],
                );
            }
        }
        _ => {}
    }
    let _ = &s.dir;
}

fn measure(t: &Topology, c: Contender, seconds: u64, dir: &std::path::Path) -> Result<Run> {
    quiet(t);
    let s = prepare(t, c, dir)?;
    let before_counts = backend_counts(t)?;
    let soft0 = softirq_s()?;
    let gen0 = children_cpu_s();
    let proc0 = s
        .lb_process
        .as_ref()
        .map(|p| process_cpu_s(p.pid()))
        .unwrap_or(0.0);
    let url = format!("http://{}/", s.target);
    let out = t.exec(
        t.client().ns(),
        &[
            "wrk",
            "-t2",
            "-c16",
            &format!("-d{seconds}s"),
            "--latency",
            &url,
        ],
    );
    let soft1 = softirq_s()?;
    let gen1 = children_cpu_s();
    let proc1 = s
        .lb_process
        .as_ref()
        .map(|p| process_cpu_s(p.pid()))
        .unwrap_or(0.0);
    let after_counts = backend_counts(t)?;
    cleanup(t, c, s);
    let out = out.with_context(|| format!("wrk against {}", c.name()))?;
    let rps: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    let per_backend = after_counts
        .iter()
        .map(|(k, v)| (k.clone(), v - before_counts.get(k).copied().unwrap_or(0)))
        .collect();
    Ok(Run {
        rps,
        p50_ms: wrk_ms(&out, "50%"),
        p99_ms: wrk_ms(&out, "99%"),
        lb_cpu_s: if matches!(c, Contender::Haproxy) {
            proc1 - proc0
        } else {
            0.0
        },
        softirq_s: soft1 - soft0,
        generator_cpu_s: gen1 - gen0,
        requests: rps * seconds as f64,
        per_backend,
    })
}

pub struct Summary {
    pub contender: Contender,
    pub runs: Vec<Run>,
}

/// Adjacent runs of the trivial forwarder and xdplb per mode and round.
pub const PAIRS_PER_ROUND: usize = 5;

/// Runs every contender `rounds` times, interleaved (the trivial forwarder
/// and xdplb [`PAIRS_PER_ROUND`] times each per round, in pairs).
pub fn run(rounds: usize, seconds: u64) -> Result<Vec<Summary>> {
    let t = Topology::new(3)?;
    let _servers = t.start_servers(PORT, 53)?;
    let _fabric = fabric::prepare(&t, AttachMode::Native)?;
    t.add_vip_on_backends(addressing::vip_v4(1).into())?;
    t.exec(
        t.client().ns(),
        &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"],
    )?;
    let dir = std::env::temp_dir().join(format!("{}-bench", t.id()));
    std::fs::create_dir_all(&dir)?;
    // Each xdplb mode right after the trivial forwarder in that mode: the
    // pair the "vs trivial forwarder" column compares.
    let contenders = [
        Contender::Direct,
        Contender::Trivial(AttachMode::Native),
        Contender::Ours(AttachMode::Native),
        Contender::Trivial(AttachMode::Generic),
        Contender::Ours(AttachMode::Generic),
        Contender::Haproxy,
        Contender::Nftables,
    ];
    let mut out: Vec<Summary> = contenders
        .iter()
        .map(|c| Summary {
            contender: *c,
            runs: Vec::new(),
        })
        .collect();
    for round in 0..rounds {
        let mut i = 0;
        while i < contenders.len() {
            let c = contenders[i];
            eprintln!(
                "service load: round {} of {rounds}: {}",
                round + 1,
                c.name()
            );
            // xdplb against the trivial forwarder is the closest comparison
            // here (a few percent) and single runs on this shared machine
            // differ by 10-20%: several adjacent pairs per round, in
            // alternating order so that drift favours neither.
            if let (Contender::Trivial(m), Some(&Contender::Ours(n))) = (c, contenders.get(i + 1))
                && m == n
            {
                for pair in 0..PAIRS_PER_ROUND {
                    let order = if (round * PAIRS_PER_ROUND + pair).is_multiple_of(2) {
                        [i, i + 1]
                    } else {
                        [i + 1, i]
                    };
                    for k in order {
                        let r = measure(&t, contenders[k], seconds, &dir)?;
                        out[k].runs.push(r);
                    }
                }
                i += 2;
                continue;
            }
            let r = measure(&t, c, seconds, &dir)?;
            out[i].runs.push(r);
            i += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// Balancer CPU seconds per request: kernel paths are charged the softirq
/// time above the direct run's (per request); HAProxy its own CPU time.
pub fn cpu_per_request(s: &Summary, direct_softirq_per_req: f64) -> f64 {
    median(
        s.runs
            .iter()
            .map(|r| match s.contender {
                Contender::Direct => 0.0,
                Contender::Haproxy => r.lb_cpu_s / r.requests.max(1.0),
                _ => (r.softirq_s / r.requests.max(1.0) - direct_softirq_per_req).max(0.0),
            })
            .collect(),
    )
}

pub fn report(results: &[Summary]) -> String {
    let direct = results.iter().find(|s| s.contender == Contender::Direct);
    let direct_soft = direct
        .map(|d| {
            median(
                d.runs
                    .iter()
                    .map(|r| r.softirq_s / r.requests.max(1.0))
                    .collect(),
            )
        })
        .unwrap_or(0.0);
    let direct_rps = direct
        .map(|d| median(d.runs.iter().map(|r| r.rps).collect()))
        .unwrap_or(f64::NAN);
    let mut out = String::from(
        "| contender | requests/s | vs direct | vs trivial forwarder | p50 ms | p99 ms | balancer CPU µs/request | requests per balancer CPU-second | load generator CPU % | requests per backend (from the backends) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for s in results {
        let rps = median(s.runs.iter().map(|r| r.rps).collect());
        let cpu = cpu_per_request(s, direct_soft);
        let per_cpu = if cpu > 0.0 {
            format!("{:.0}", 1.0 / cpu)
        } else {
            "-".into()
        };
        let generator = median(
            s.runs
                .iter()
                .map(|r| 100.0 * r.generator_cpu_s / (r.requests / r.rps.max(1.0)))
                .collect(),
        );
        let last = s
            .runs
            .last()
            .map(|r| {
                r.per_backend
                    .values()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
            .unwrap_or_default();
        let vs_trivial = match s.contender {
            Contender::Trivial(_) => "1.00".to_owned(),
            Contender::Ours(m) => match results
                .iter()
                .find(|t| t.contender == Contender::Trivial(m))
            {
                Some(trivial) => {
                    // Each run of xdplb against the trivial forwarder's run
                    // adjacent to it: the median of those ratios, and their
                    // spread, which says how much of it is noise.
                    let paired: Vec<f64> = s
                        .runs
                        .iter()
                        .zip(&trivial.runs)
                        .map(|(o, t)| o.rps / t.rps)
                        .filter(|r| r.is_finite())
                        .collect();
                    let n = paired.len();
                    match range(&paired) {
                        (lo, hi) if n > 1 => format!(
                            "{:.2} (median of {n} adjacent pairs: {lo:.2}-{hi:.2})",
                            median(paired)
                        ),
                        _ => format!("{:.2}", rps / median_rps(trivial)),
                    }
                }
                None => "-".into(),
            },
            _ => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {vs_trivial} | {:.2} | {:.2} | {} | {} | {:.0} | {} |\n",
            s.contender.name(),
            rps,
            rps / direct_rps,
            median(s.runs.iter().map(|r| r.p50_ms).collect()),
            median(s.runs.iter().map(|r| r.p99_ms).collect()),
            if matches!(s.contender, Contender::Direct) {
                "-".into()
            } else {
                format!("{:.1}", cpu * 1e6)
            },
            per_cpu,
            generator,
            last
        ));
    }
    let split: Vec<String> = [AttachMode::Native, AttachMode::Generic]
        .into_iter()
        .filter_map(|m| {
            Some(gap_split(
                m,
                rps_of(results, Contender::Direct)?,
                rps_of(results, Contender::Trivial(m))?,
                rps_of(results, Contender::Ours(m))?,
            ))
        })
        .collect();
    if !split.is_empty() {
        out.push_str(
            "\nThe trivial forwarder is section 2's (`fwd_mac`): at the LB, in the same place and mode as xdplb, it rewrites the MACs of every frame and sends it back out to backend 0, the LB's hop without any balancing (all requests on one backend, like direct). What of xdplb's distance to direct is the hop, measured in this run (requests/s, medians):\n\n",
        );
        for s in split {
            out.push_str(&format!("- {s}\n"));
        }
    }
    out
}

fn rps_of(results: &[Summary], c: Contender) -> Option<f64> {
    results
        .iter()
        .find(|s| s.contender == c)
        .map(median_rps)
        .filter(|r| r.is_finite() && *r > 0.0)
}

/// Splits xdplb's distance to direct into the hop (direct minus the trivial
/// forwarder) and the balancing (the trivial forwarder minus xdplb).
fn gap_split(m: AttachMode, direct: f64, trivial: f64, ours: f64) -> String {
    let mut s = format!(
        "{m} XDP: direct {direct:.0}, trivial forwarder {trivial:.0} ({:.2} of direct), xdplb {ours:.0} ({:.2} of the trivial forwarder). ",
        trivial / direct,
        ours / trivial
    );
    let gap = direct - ours;
    if gap <= 0.0 {
        s.push_str("xdplb served no fewer requests than direct: no distance to split.");
        return s;
    }
    let (hop, balancing) = (direct - trivial, trivial - ours);
    s.push_str(&format!(
        "Of the {gap:.0} requests/s ({:.1}% of direct) xdplb is below direct, the extra hop accounts for {hop:.0} ({:.0}%), the balancing for {balancing:.0} ({:.0}%)",
        100.0 * gap / direct,
        100.0 * hop / gap,
        100.0 * balancing / gap
    ));
    s.push_str(if balancing < 0.0 {
        ": xdplb served more than the trivial forwarder, so the hop alone is more than the whole distance."
    } else {
        "."
    });
    s
}

pub fn median_rps(s: &Summary) -> f64 {
    median(s.runs.iter().map(|r| r.rps).collect())
}
