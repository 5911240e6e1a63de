//! Data-plane cost per packet, per path.

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use lb_common::{
    benchframe::{BENCH_FRAME_MAX, BenchFrame},
    maglev::{self, MaglevBackend},
    maps::{BackendInfo, BackendState, Family, LbConfig, Mode, VipKey},
    parse::IPPROTO_TCP,
    testframe::{self, FrameSpec, L4},
    wire::tcp::{TCP_ACK, TCP_SYN},
};
use lb_userspace::{
    dataplane::{self, MapSizes},
    programming,
};

const RING: u32 = 65537;
/// A connection table that fits this machine's caches (1 MiB), beside the
/// configured one: the difference in the new-flow rows is memory latency.
const SMALL_TABLE: u32 = 16384;
const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;

struct Path {
    name: &'static str,
    frame: Vec<u8>,
    /// Offset of the 4 bytes the wrapper varies per run (new-flow paths).
    vary: Option<u32>,
    /// Runs behind the restoring wrapper (it rewrites the frame).
    wrapped: bool,
    expect: u32,
    /// The program timed: the balancer, or the bench's floor (then no other
    /// balancer runs the path).
    program: &'static str,
}

impl Path {
    /// Whether the other (pinned) balancers run this path too: only the
    /// balancer's own paths, not the floor's.
    fn compared(&self) -> bool {
        self.program == dataplane::BALANCER_PROGRAM
    }
}

/// The bench's floor program (`lb-ebpf/src/bench.rs`).
const FLOOR_PROGRAM: &str = "bench_floor";
/// Its row: the same established IPv4 packet as the balancer's ipip row.
const FLOOR_ROW: &str = "floor: parse, flow-cache lookup, ipip (no VIP filter, policy or counters)";
/// The floor with the VIP-address filter and the counters.
const FLOOR_COUNTED_PROGRAM: &str = "bench_floor_counted";
const FLOOR_COUNTED_ROW: &str = "floor + VIP filter + counters";

/// Another XDP balancer, loaded and configured by its own tools and pinned on
/// bpffs, timed on the same frames beside ours.
#[derive(Clone, Debug)]
pub struct Pinned {
    name: String,
    path: std::path::PathBuf,
}

pub fn parse_pinned(arg: &str) -> Result<Pinned, String> {
    match arg.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(Pinned {
            name: name.to_owned(),
            path: path.into(),
        }),
        _ => Err(format!(
            "expected NAME=/sys/fs/bpf/PATH (a pinned XDP program), got {arg:?}"
        )),
    }
}

fn v16(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0; 16];
    o[..4].copy_from_slice(&a);
    o
}

/// A frame padded to a multiple of 8 bytes: 64 bytes for IPv4 TCP (the
/// minimum Ethernet frame less FCS... rounded), 80 for IPv6.
fn frame(mut spec: FrameSpec, flags: u8, pad_to: usize) -> Vec<u8> {
    if let L4::Tcp { flags: f, .. } = &mut spec.l4 {
        *f = flags;
    }
    let bare = testframe::build(&FrameSpec {
        payload: Vec::new(),
        ..spec.clone()
    })
    .len();
    spec.payload = vec![0x5a; pad_to.saturating_sub(bare)];
    let f = testframe::build(&spec);
    assert_eq!(f.len(), pad_to);
    f
}

fn setup(conntrack_entries: u32) -> Result<Ebpf> {
    let mut ebpf = dataplane::load_balancer_with(&MapSizes {
        max_vips: 8,
        max_backends: 64,
        ring_size: RING,
        conntrack_entries,
        ..Default::default()
    })?;
    for name in [
        dataplane::MAC_SWAP_PROGRAM,
        dataplane::PASS_PROGRAM,
        "bench_restore",
        FLOOR_PROGRAM,
        FLOOR_COUNTED_PROGRAM,
    ] {
        dataplane::program_mut(&mut ebpf, name)?
            .load()
            .with_context(|| format!("verifying {name}"))?;
    }
    programming::set_config(
        &mut ebpf,
        &LbConfig {
            encap_src_v4: [198, 18, 0, 2],
            encap_src_v6: testframe::v6(2),
            hash_seed: 7,
            ring_size: RING,
            flags: 0,
            udp_timeout_ns: 30_000_000_000,
            gue_port: lb_common::wire::gue::GUE_DEFAULT_PORT,
            ..Default::default()
        },
    )?;
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for i in 0..10u32 {
        let b4 = BackendInfo {
            addr: v16([198, 18, 0, 20 + i as u8]),
            family: Family::V4.wire(),
            state: BackendState::Up.wire(),
            next_hop_mac: [2, 0, 0, 0, 0, 0x20 + i as u8],
            src_mac: testframe::LB_MAC,
            _pad: [0; 2],
            ifindex: 0,
            vip_id: lb_common::maps::BACKEND_ANY_VIP,
        };
        programming::set_backend(&mut ebpf, 1 + i, &b4)?;
        v4.push(MaglevBackend {
            id: 1 + i,
            identity: b4.addr,
            weight: 1,
        });
        let b6 = BackendInfo {
            addr: testframe::v6(0x20 + i as u16),
            family: Family::V6.wire(),
            ..b4
        };
        programming::set_backend(&mut ebpf, 21 + i, &b6)?;
        v6.push(MaglevBackend {
            id: 21 + i,
            identity: b6.addr,
            weight: 1,
        });
    }
    let t4 = maglev::build(&v4, RING, 7)?;
    let t6 = maglev::build(&v6, RING, 7)?;
    let vips = [
        (v16([198, 18, 100, 1]), Family::V4.wire(), Mode::Ipip, &t4),
        (testframe::v6_vip(1), Family::V6.wire(), Mode::Ipip, &t6),
        (v16([198, 18, 100, 2]), Family::V4.wire(), Mode::L2dsr, &t4),
        (v16([198, 18, 100, 3]), Family::V4.wire(), Mode::Gue, &t4),
        (testframe::v6_vip(3), Family::V6.wire(), Mode::Gue, &t6),
        (v16([198, 18, 100, 4]), Family::V4.wire(), Mode::Gue, &t4),
    ];
    for (id, (addr, family, mode, table)) in vips.into_iter().enumerate() {
        let key = VipKey {
            addr,
            port: 80,
            proto: IPPROTO_TCP,
            family,
        };
        programming::install_vip(&mut ebpf, &key, id as u32, mode, table)?;
    }
    // VIP 5 after a ring change (every backend shifted by one), its
    // second-chance window open: a mid-stream packet without an entry goes
    // to the new ring's backend naming the old one's as its second hop.
    let shifted: Vec<u32> = t4
        .iter()
        .map(|&id| if id == 10 { 1 } else { id + 1 })
        .collect();
    programming::publish_ring(&mut ebpf, 5, &shifted, std::time::Duration::from_secs(3600))?;
    Ok(ebpf)
}

fn set_target(ebpf: &mut Ebpf, program: &str) -> Result<()> {
    let fd = dataplane::program_mut(ebpf, program)?.fd()?.try_clone()?;
    set_target_fd(ebpf, &fd)
}

fn set_target_fd(ebpf: &mut Ebpf, fd: &ProgramFd) -> Result<()> {
    let mut jump: ProgramArray<_> =
        ProgramArray::try_from(ebpf.map_mut("BENCH_TARGET").context("BENCH_TARGET")?)?;
    jump.set(0, fd, 0)?;
    Ok(())
}

fn set_frame(ebpf: &mut Ebpf, frame: &[u8], vary: Option<u32>) -> Result<()> {
    if frame.len() > BENCH_FRAME_MAX || !frame.len().is_multiple_of(8) {
        bail!("bench frame must be a multiple of 8 bytes up to {BENCH_FRAME_MAX}");
    }
    let mut bytes = [0u8; BENCH_FRAME_MAX];
    bytes[..frame.len()].copy_from_slice(frame);
    let f = BenchFrame {
        len: frame.len() as u32,
        vary_offset: vary.unwrap_or(0),
        bytes,
    };
    let mut m: Array<_, BenchFrame> =
        Array::try_from(ebpf.map_mut("BENCH_FRAME").context("BENCH_FRAME")?)?;
    m.set(0, f, 0)?;
    Ok(())
}

/// The verdict and average ns per run of `prog` on `frame`, `repeat` times.
fn time_prog(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut out = vec![0u8; frame.len() + 128];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

fn time(ebpf: &mut Ebpf, program: &str, frame: &[u8], repeat: u32, expect: u32) -> Result<f64> {
    let (verdict, ns) = time_prog(dataplane::program_mut(ebpf, program)?, frame, repeat)?;
    if verdict != expect {
        bail!("{program}: verdict {verdict} where {expect} was expected");
    }
    Ok(ns)
}

/// A pinned balancer on one path, behind the wrapper when the path is
/// wrapped (its cost is the one measured for ours); `None` when it answers
/// with another verdict (it does not serve that VIP or mode).
fn time_pinned(ebpf: &mut Ebpf, other: &Xdp, p: &Path, repeat: u32) -> Result<Option<f64>> {
    let (verdict, ns) = if p.wrapped {
        set_frame(ebpf, &p.frame, p.vary)?;
        set_target_fd(ebpf, other.fd()?)?;
        time_prog(
            dataplane::program_mut(ebpf, "bench_restore")?,
            &p.frame,
            repeat,
        )?
    } else {
        time_prog(other, &p.frame, repeat)?
    };
    Ok((verdict == p.expect).then_some(ns))
}

/// A path behind the restoring wrapper: the wrapper alone (its target the
/// pass program), then with the balancer.
fn time_wrapped(ebpf: &mut Ebpf, p: &Path, repeat: u32) -> Result<(f64, f64)> {
    set_frame(ebpf, &p.frame, p.vary)?;
    set_target(ebpf, dataplane::PASS_PROGRAM)?;
    let overhead = time(ebpf, "bench_restore", &p.frame, repeat, XDP_PASS)?;
    set_target(ebpf, p.program)?;
    let result = time(ebpf, "bench_restore", &p.frame, repeat, p.expect)?;
    Ok((overhead, result))
}

/// How the interleaved rounds of one measurement become its figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stat {
    /// The fastest round: on a shared machine other tenants only ever add
    /// time, so the minimum is the steadiest estimate of the program's own
    /// cost (on the 2-vCPU VM these were taken on, medians of the same
    /// build moved by 30% between runs, minimums by 2-3 ns).
    Min,
    Median,
}

impl Stat {
    fn of(self, v: Vec<f64>) -> f64 {
        match self {
            Stat::Min => v.iter().copied().fold(f64::INFINITY, f64::min),
            Stat::Median => crate::summary::median(v),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Stat::Min => "fastest",
            Stat::Median => "median",
        }
    }
}

/// Per path: name and ns/packet; the first row is the trivial forwarder.
pub struct XdpResult {
    pub rows: Vec<(String, f64)>,
    pub markdown: String,
}

pub fn run(
    repeat: u32,
    rounds: usize,
    stat: Stat,
    conntrack_entries: u32,
    only: Option<&str>,
    pinned: &[Pinned],
) -> Result<XdpResult> {
    let others: Vec<Xdp> = pinned
        .iter()
        .map(|o| {
            Xdp::from_pin(&o.path, XdpAttachType::Interface).with_context(|| {
                format!(
                    "{}: opening the pinned program {}",
                    o.name,
                    o.path.display()
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut ebpf = setup(conntrack_entries)?;
    let mut small = setup(SMALL_TABLE)?;
    let v4 = FrameSpec::v4_tcp([198, 18, 0, 10], [198, 18, 100, 1], 40000, 80);
    // The trivial forwarder swaps the MACs of the established IPv4 frame.
    let trivial_frame = frame(v4.clone(), TCP_ACK, 64);
    let v6 = FrameSpec::v6_tcp(testframe::v6(0x10), testframe::v6_vip(1), 40000, 80);
    let l2 = FrameSpec::v4_tcp([198, 18, 0, 10], [198, 18, 100, 2], 40000, 80);
    let gue4 = FrameSpec::v4_tcp([198, 18, 0, 10], [198, 18, 100, 3], 40000, 80);
    let gue6 = FrameSpec::v6_tcp(testframe::v6(0x10), testframe::v6_vip(3), 40000, 80);
    let hop4 = FrameSpec::v4_tcp([198, 18, 0, 10], [198, 18, 100, 4], 40000, 80);
    let other = FrameSpec::v4_tcp([198, 18, 0, 10], [198, 18, 0, 2], 40000, 22);
    // Source address offsets: IPv4 14+12, IPv6 14+8 (+12 for its last 4 bytes).
    let paths = [
        Path {
            name: "not a VIP (XDP_PASS)",
            frame: frame(other.clone(), TCP_ACK, 64),
            vary: None,
            wrapped: false,
            expect: XDP_PASS,
            program: dataplane::BALANCER_PROGRAM,
        },
        // A SYN's ring slot is hashed before its VIP lookup (see
        // `policy::decide`), after the VIP-address filter: a SYN to the
        // host itself should cost what any of its packets does.
        Path {
            name: "not a VIP, SYN (XDP_PASS)",
            frame: frame(other, TCP_SYN, 64),
            vary: None,
            wrapped: false,
            expect: XDP_PASS,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv4 ipip, established",
            frame: frame(v4.clone(), TCP_ACK, 64),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        // The same packet through the least a balancer does with it, and
        // through that plus what ours adds for operators.
        Path {
            name: FLOOR_ROW,
            frame: frame(v4.clone(), TCP_ACK, 64),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: FLOOR_PROGRAM,
        },
        Path {
            name: FLOOR_COUNTED_ROW,
            frame: frame(v4.clone(), TCP_ACK, 64),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: FLOOR_COUNTED_PROGRAM,
        },
        Path {
            name: "IPv4 ipip, new flow + conntrack insert",
            frame: frame(v4, TCP_SYN, 64),
            vary: Some(26),
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv6 ipip, established",
            frame: frame(v6.clone(), TCP_ACK, 80),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv6 ipip, new flow + conntrack insert",
            frame: frame(v6, TCP_SYN, 80),
            vary: Some(34),
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv4 gue, established",
            frame: frame(gue4.clone(), TCP_ACK, 64),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv4 gue, new flow + conntrack insert",
            frame: frame(gue4, TCP_SYN, 64),
            vary: Some(26),
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv6 gue, established",
            frame: frame(gue6, TCP_ACK, 80),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        // Nothing is recorded for a second-hop packet: every packet of such
        // a flow takes this path while the window is open.
        Path {
            name: "IPv4 gue, second hop (no entry, after a ring change)",
            frame: frame(hop4, TCP_ACK, 64),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv4 l2dsr, established",
            frame: frame(l2.clone(), TCP_ACK, 64),
            vary: None,
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
        Path {
            name: "IPv4 l2dsr, new flow + conntrack insert",
            frame: frame(l2, TCP_SYN, 64),
            vary: Some(26),
            wrapped: true,
            expect: XDP_TX,
            program: dataplane::BALANCER_PROGRAM,
        },
    ];
    let paths: Vec<Path> = paths
        .into_iter()
        .filter(|p| only.is_none_or(|o| p.name.contains(o)))
        .collect();
    let mut trivial = Vec::new();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut overhead: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut results_small: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut overhead_small: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    // Per other balancer, per path; a path it does not serve stays empty.
    let mut results_other: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); paths.len()]; others.len()];
    // Interleave everything so drift on this shared machine hits all alike.
    for _ in 0..rounds {
        trivial.push(time(
            &mut ebpf,
            dataplane::MAC_SWAP_PROGRAM,
            &trivial_frame,
            repeat,
            XDP_TX,
        )?);
        for (i, p) in paths.iter().enumerate() {
            if p.wrapped {
                let (o, r) = time_wrapped(&mut ebpf, p, repeat)?;
                overhead[i].push(o);
                results[i].push(r);
            } else {
                results[i].push(time(&mut ebpf, p.program, &p.frame, repeat, p.expect)?);
            }
            if p.vary.is_some() {
                let (o, r) = time_wrapped(&mut small, p, repeat)?;
                overhead_small[i].push(o);
                results_small[i].push(r);
            }
            for (o, other) in others.iter().enumerate() {
                if !p.compared() {
                    continue;
                }
                if let Some(ns) = time_pinned(&mut ebpf, other, p, repeat)? {
                    results_other[o][i].push(ns);
                }
            }
        }
    }
    let base = stat.of(trivial);
    let mut md = format!(
        "XDP data-plane cost per packet (BPF_PROG_TEST_RUN, repeat {repeat}, {} of {rounds} interleaved rounds, {conntrack_entries}-entry connection table)\n\n| path | ns/packet | x trivial |\n|---|---:|---:|\n| trivial: swap MACs, XDP_TX | {base:.1} | 1.00 |\n",
        stat.label()
    );
    let mut rows = vec![("trivial: swap MACs, XDP_TX".to_owned(), base)];
    for (i, p) in paths.iter().enumerate() {
        let ns = if p.wrapped {
            stat.of(results[i].clone()) - stat.of(overhead[i].clone())
        } else {
            stat.of(results[i].clone())
        };
        md.push_str(&format!("| {} | {ns:.1} | {:.2} |\n", p.name, ns / base));
        rows.push((p.name.to_owned(), ns));
    }
    for (i, p) in paths.iter().enumerate() {
        if results_small[i].is_empty() {
            continue;
        }
        let ns = stat.of(results_small[i].clone()) - stat.of(overhead_small[i].clone());
        let name = format!("{}, {SMALL_TABLE}-slot table (in cache)", p.name);
        md.push_str(&format!("| {name} | {ns:.1} | {:.2} |\n", ns / base));
        rows.push((name, ns));
    }
    let mut unserved = Vec::new();
    for (o, other) in pinned.iter().enumerate() {
        let mut served = 0;
        for (i, p) in paths.iter().enumerate() {
            if !p.compared() {
                continue;
            }
            if results_other[o][i].len() != rounds {
                unserved.push(format!("{}: {}", other.name, p.name));
                continue;
            }
            served += 1;
            let mut ns = stat.of(results_other[o][i].clone());
            if p.wrapped {
                ns -= stat.of(overhead[i].clone());
            }
            let name = format!("{}: {}", other.name, p.name);
            md.push_str(&format!("| {name} | {ns:.1} | {:.2} |\n", ns / base));
            rows.push((name, ns));
        }
        let balancer_paths = paths.iter().filter(|p| p.compared()).count();
        if served == 0 && balancer_paths > 0 {
            bail!(
                "{}: answered none of the bench's paths with the expected verdict; does it serve 198.18.100.1:80 and fd00:198:18:100::1 port 80 (TCP)?",
                other.name
            );
        }
    }
    if !unserved.is_empty() {
        md.push_str(&format!(
            "\nNot shown (another verdict in at least one round): {}\n",
            unserved.join("; ")
        ));
    }
    let w: Vec<String> = paths
        .iter()
        .enumerate()
        .filter(|(_, p)| p.wrapped)
        .map(|(i, p)| format!("{}: {:.1}", p.name, stat.of(overhead[i].clone())))
        .collect();
    md.push_str(&format!(
        "\nThe restoring wrapper's own cost, subtracted above (ns): {}\n",
        w.join("; ")
    ));
    println!("\n{md}");
    Ok(XdpResult { rows, markdown: md })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_balancer_is_named_and_located() {
        let p = parse_pinned("katran=/sys/fs/bpf/katran/prog").unwrap();
        assert_eq!(p.name, "katran");
        assert_eq!(p.path, std::path::Path::new("/sys/fs/bpf/katran/prog"));
        for bad in ["katran", "=/sys/fs/bpf/x", "katran=", ""] {
            let e = parse_pinned(bad).unwrap_err();
            assert!(e.contains("NAME=/sys/fs/bpf/PATH"), "{bad}: {e}");
        }
    }
}
