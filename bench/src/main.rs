//! `cargo xtask bench`: performance numbers, measured side by side in one run.
//!
//! `--xdp`: nanoseconds per packet of each data-plane path, timed by
//! BPF_PROG_TEST_RUN over a large repeat count, next to a trivial program that
//! swaps MACs and returns XDP_TX. Rewriting paths run behind `bench_restore`
//! (see lb-ebpf/src/bench.rs); its own cost, measured with the same frame and
//! a do-nothing target, is subtracted.

mod service;
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
    /// Seconds of load per service measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Interleaved rounds of the service measurements.
    #[arg(long, default_value_t = 2)]
    service_rounds: usize,
    /// Repeat count per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Connection-table entries (the new-flow paths fill and then evict).
    #[arg(long, default_value_t = 1 << 20)]
    conntrack: u32,
    /// Only the paths whose name contains this text (and the trivial baseline).
    #[arg(long)]
    only: Option<String>,
    /// Measurements per path (interleaved); the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // No section flag means all of them.
    let all = !args.xdp && !args.service;
    if args.xdp || all {
        xdp::run(
            args.repeat,
            args.rounds,
            args.conntrack,
            args.only.as_deref(),
        )?;
    }
    if args.service || all {
        let results = service::run(args.service_rounds, args.seconds)?;
        println!("{}", service::report(&results));
    }
    Ok(())
}
