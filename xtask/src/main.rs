//! Project automation: `cargo xtask <setup|build-ebpf|test|demo|bench|fuzz>`.

mod fuzz;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and set up the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and tests need (idempotent, fast when done).
    Setup,
    /// Build the eBPF object(s) for bpfel-unknown-none.
    BuildEbpf {
        /// Release profile (the one lbd embeds). Without it the dev profile is
        /// used, still optimised: unoptimised BPF does not pass the verifier.
        #[arg(long)]
        release: bool,
    },
    /// Show the balancer at work in network namespaces on this machine.
    Demo {
        /// Leave everything running for exploration (Ctrl-C tears down).
        #[arg(long)]
        keep: bool,
        /// Three LB nodes behind an ECMP router (BGP with BIRD): flows
        /// spread over the nodes and survive a node drained and killed.
        #[arg(long)]
        fleet: bool,
    },
    /// Benchmarks (not tests), written to bench/RESULTS.md: all eight sections, or `--xdp`, `--rate`, `--service`, `--control`, `--fleet`, `--flood`, `--scale` (1,000 backends checked every second: lbd's time to ready, CPU and memory next to HAProxy's).
    Bench {
        /// Arguments for the benchmark binary (e.g. --xdp, --repeat N, --rounds N).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run all test tiers: lints, host unit, fuzz (each target briefly), kernel (BPF_PROG_TEST_RUN), end-to-end (netns).
    Test {
        /// Run only these tiers (lint, unit, fuzz, kernel, e2e); default all.
        #[arg(long, value_delimiter = ',')]
        tier: Vec<test::Tier>,
    },
    /// Fuzz the packet parser, ICMP quotes, the per-packet policy, the
    /// configuration loader, the control API's request decoding and its
    /// socket (cargo-fuzz, libFuzzer), each for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (parse, icmp, policy, config, api, http); default all.
        targets: Vec<fuzz::Target>,
    },
}

fn main() {
    // Report the failing step and how to retry it, without a backtrace.
    if let Err(e) = dispatch(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf { release } => {
            setup::run()?;
            build_ebpf(release)
        }
        Cmd::Demo { keep, fleet } => {
            setup::run()?;
            build_ebpf(true)?;
            run_step(
                Command::new("cargo").current_dir(workspace_root()).args([
                    "build",
                    "--quiet",
                    "--workspace",
                    "--bins",
                ]),
                "demo: build",
            )?;
            let bin = if fleet { "lb-fleet-demo" } else { "lb-demo" };
            let mut demo = Command::new(workspace_root().join("target/debug").join(bin));
            if keep {
                demo.arg("--keep");
            }
            run_step(&mut demo, "demo")
        }
        Cmd::Bench { args } => {
            setup::run()?;
            // lbd, lb-testserver and the rest, next to lb-bench.
            run_step(
                Command::new("cargo").current_dir(workspace_root()).args([
                    "build",
                    "--release",
                    "--quiet",
                    "--workspace",
                    "--bins",
                ]),
                "bench: build",
            )?;
            run_step(
                Command::new("cargo")
                    .current_dir(workspace_root())
                    .args(["run", "--release", "--quiet", "-p", "lb-bench", "--"])
                    .args(&args),
                "bench",
            )
        }
        Cmd::Test { tier } => {
            setup::run()?;
            test::run(&tier)
        }
        Cmd::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz::run(&targets, seconds)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn build_ebpf(release: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).args([
        "+nightly",
        "build",
        "--package",
        "lb-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    // The flags the object lbd embeds is built with (lb-userspace/build.rs).
    let flags = std::fs::read_to_string(workspace_root().join("lb-ebpf/rustflags"))
        .context("reading lb-ebpf/rustflags")?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.replace("{arch}", std::env::consts::ARCH))
        .collect::<Vec<_>>()
        .join("\x1f");
    // Whole-crate builds only, as lb-userspace/build.rs does: incremental
    // codegen units verify differently, or not at all.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env("CARGO_INCREMENTAL", "0")
        .env_remove("RUSTFLAGS");
    if release {
        cmd.arg("--release");
    } else {
        for c in [
            "profile.dev.opt-level=3",
            "profile.dev.debug-assertions=false",
            "profile.dev.overflow-checks=false",
        ] {
            cmd.args(["--config", c]);
        }
    }
    run_step(&mut cmd, "build-ebpf")?;
    let profile = if release { "release" } else { "debug" };
    let object = workspace_root()
        .join("target/bpfel-unknown-none")
        .join(profile)
        .join("lb-ebpf");
    if !object.exists() {
        bail!(
            "build-ebpf: expected object at {} is missing",
            object.display()
        );
    }
    println!("eBPF object: {}", object.display());
    Ok(())
}

/// Runs `cmd`, failing with the step's name and the exact command to retry.
pub fn run_step(cmd: &mut Command, step: &str) -> Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("{step}: could not start `{line}`"))?;
    if !status.success() {
        bail!("{step} failed ({status}); retry by hand with:\n  {line}");
    }
    Ok(())
}
