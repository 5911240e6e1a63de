//! `cargo xtask bench`: performance numbers, measured side by side in one run.
//!
//! `--xdp`: nanoseconds per packet of each data-plane path, timed by
//! BPF_PROG_TEST_RUN over a large repeat count, next to a trivial program that
//! swaps MACs and returns XDP_TX. Rewriting paths run behind `bench_restore`
//! (see lb-ebpf/src/bench.rs); its own cost, measured with the same frame and
//! a do-nothing target, is subtracted.

mod control;
mod failover;
mod fleet;
mod flood;
mod plot;
mod rate;
mod scale;
mod service;
mod summary;
mod xdp;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Load balancer benchmarks")]
struct Args {
    /// Data-plane cost per packet (BPF_PROG_TEST_RUN).
    #[arg(long)]
    xdp: bool,
    /// End-to-end service load: direct, xdplb, HAProxy, nftables (wrk).
    #[arg(long)]
    service: bool,
    /// Control plane (Maglev builds, ring publication, disruption) and memory.
    #[arg(long)]
    control: bool,
    /// Packet rate through the topology (XDP live frames).
    #[arg(long)]
    rate: bool,
    /// The fleet: how fast the router follows nodes leaving and joining,
    /// and what long-lived connections went through.
    #[arg(long)]
    fleet: bool,
    /// A spoofed SYN flood with ring changes: rate taken in, long-lived
    /// connections kept, the table after it.
    #[arg(long)]
    flood: bool,
    /// Control-plane scale: 1,000 backends checked every second (1 and 10
    /// VIPs), time to ready, CPU and memory, next to HAProxy.
    #[arg(long)]
    scale: bool,
    /// Where the report goes (with its SVG plots beside it).
    #[arg(long, default_value = "bench/RESULTS.md")]
    out: std::path::PathBuf,
    /// Seconds of load per service measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Interleaved rounds of the service measurements.
    #[arg(long, default_value_t = 2)]
    service_rounds: usize,
    /// Repeat count per measurement.
    #[arg(long, default_value_t = 400_000)]
    repeat: u32,
    /// Connection-table entries (the new-flow paths fill and then evict).
    #[arg(long, default_value_t = 1 << 20)]
    conntrack: u32,
    /// Only the paths whose name contains this text (and the trivial baseline).
    #[arg(long)]
    only: Option<String>,
    /// Measurements per path (interleaved).
    #[arg(long, default_value_t = 21)]
    rounds: usize,
    /// Which of a path's rounds is reported: the fastest (`min`, steady on
    /// a shared machine) or the `median`.
    #[arg(long, value_enum, default_value = "min")]
    stat: xdp::Stat,
    /// Also time another XDP balancer, pinned on bpffs, on the same frames
    /// behind the same wrapper, in the same rounds: `NAME=/sys/fs/bpf/PATH`
    /// (repeatable). Its maps must already serve the bench's VIPs
    /// (198.18.100.1:80 and fd00:198:18:100::1 port 80, TCP) with XDP_TX.
    #[arg(long, value_parser = xdp::parse_pinned)]
    compare_pinned: Vec<xdp::Pinned>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "- CPU: {cpu}, {} CPUs\n- {}\n- kernel {}\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        mem.split_whitespace().collect::<Vec<_>>().join(" "),
        kernel.trim()
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let all = !args.xdp
        && !args.service
        && !args.control
        && !args.rate
        && !args.fleet
        && !args.flood
        && !args.scale;
    let dir = args
        .out
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    std::fs::create_dir_all(&dir)?;
    let mut report = format!(
        "# Benchmarks\n\nProduced by `cargo xtask bench` (this run: `{}`), every contender in the same invocation on this machine:\n\n{}\n\nOne section alone: `cargo xtask bench --xdp` (1), `--rate` (2), `--service` (3, `--service-rounds N --seconds S`), `--control` (4 and 5), `--fleet` (6), `--flood` (7), `--scale` (8). Traffic stays inside the benchmark's own namespaces; the whole run takes about 15 minutes here.\n\n",
        std::env::args().collect::<Vec<_>>().join(" "),
        machine()
    );
    if args.xdp || all {
        let r = xdp::run(
            args.repeat,
            args.rounds,
            args.stat,
            args.conntrack,
            args.only.as_deref(),
            &args.compare_pinned,
        )?;
        plot::bars(&dir.join("xdp.svg"), "XDP cost per packet (ns)", &r.rows)?;
        report.push_str(&format!(
            "## 1. Data-plane cost per packet\n\n{}\n![ns per packet](xdp.svg)\n\n",
            r.markdown
        ));
    }
    if args.rate || all {
        let (md, rows) = rate::run()?;
        println!("{md}");
        plot::bars(
            &dir.join("rate.svg"),
            "packets/s delivered to the backends",
            &rows,
        )?;
        report.push_str(&format!(
            "## 2. Packet rate through the topology\n\n{md}\n![packet rate](rate.svg)\n\n"
        ));
    }
    if args.service || all {
        let results = service::run(args.service_rounds, args.seconds)?;
        let table = service::report(&results);
        println!("{table}");
        let rps: Vec<(String, f64)> = results
            .iter()
            .map(|s| (s.contender.name(), service::median_rps(s)))
            .collect();
        plot::bars(
            &dir.join("service-rps.svg"),
            "requests/s (wrk, 16 connections)",
            &rps,
        )?;
        report.push_str(&format!(
            "## 3. End-to-end service load\n\n`wrk -t2 -c16 -d{}s --latency` from the client namespace, {} interleaved rounds (in each, the trivial forwarder and xdplb in {} adjacent pairs per mode, alternating which goes first); medians, and for xdplb against the trivial forwarder the median of the pairs' ratios. Balancer CPU: softirq time above the direct run's for kernel paths (xdplb, nftables), the process's own CPU for HAProxy. Each contender's balancing is checked by the request counts the backends themselves report (last column).\n\n{table}\n![requests per second](service-rps.svg)\n\n",
            args.seconds,
            args.service_rounds,
            service::PAIRS_PER_ROUND
        ));
    }
    if args.control || all {
        let c = control::run()?;
        let pts: Vec<(String, f64)> = c
            .builds
            .iter()
            .map(|(n, ms)| (format!("{n} backends"), *ms))
            .collect();
        plot::bars(
            &dir.join("maglev-build.svg"),
            "Maglev build, M = 65537 (ms)",
            &pts,
        )?;
        let dis: Vec<(String, f64)> = c
            .disruption
            .iter()
            .flat_map(|(n, moved, ideal)| {
                [
                    (format!("N={n} measured"), moved * 100.0),
                    (format!("N={n} ideal"), ideal * 100.0),
                ]
            })
            .collect();
        plot::bars(
            &dir.join("disruption.svg"),
            "slots moved by removing 1 of N (%)",
            &dis,
        )?;
        report.push_str(&format!(
            "## 4. Control plane\n\n{}\n{}\n![Maglev build](maglev-build.svg) ![disruption](disruption.svg)\n\n## 5. Memory\n\n{}\n",
            c.markdown,
            failover::run()?,
            control::memory()?
        ));
    }
    if args.fleet || all {
        let md = fleet::run()?;
        println!("{md}");
        report.push_str(&format!("## 6. The fleet\n\n{md}\n"));
    }
    if args.flood || all {
        let md = flood::run()?;
        println!("{md}");
        report.push_str(&format!("## 7. A spoofed SYN flood\n\n{md}\n"));
    }
    if args.scale || all {
        let md = scale::run()?;
        println!("{md}");
        report.push_str(&format!("## 8. Control-plane scale\n\n{md}\n"));
    }
    std::fs::write(&args.out, &report)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
