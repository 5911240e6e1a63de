//! Installs what a fresh Debian 12 machine with rustup lacks. Every step
//! checks first and does nothing when its tool is already there, so a second
//! run takes seconds.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::run_step;

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "ethtool",
    "nftables",
    "procps",
    // promtool, which checks our metrics exposition in the tests.
    "prometheus",
    // A real carbon-cache and whisper-fetch for the Graphite push test.
    "graphite-carbon",
    // A real terminal for the lbctl top test.
    "tmux",
    "python3-whisper",
    // BGP between the router and the LB nodes of the fleet tests
    // (scripts/bird-*.conf are written for BIRD 2).
    "bird2",
    // Fleet mode: etcd for the fleet tests, protoc for the etcd client's build.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // For `cargo xtask bench`: the load generator, a contender, NAT state flushing.
    "wrk",
    "haproxy",
    "conntrack",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    nightly_rust_src()?;
    host_components()?;
    apt_packages()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    Ok(())
}

fn output_ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn nightly_rust_src() -> Result<()> {
    if !output_ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        eprintln!("setup: installing the nightly toolchain");
        run_step(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            "setup: nightly toolchain",
        )?;
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("setup: asking nightly rustc for its sysroot")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    if !Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        eprintln!("setup: adding rust-src to nightly");
        run_step(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "setup: nightly rust-src",
        )?;
    }
    Ok(())
}

fn host_components() -> Result<()> {
    for (probe, component) in [("clippy-driver", "clippy"), ("rustfmt", "rustfmt")] {
        if !output_ok(Command::new(probe).arg("--version")) {
            eprintln!("setup: adding {component} to the default toolchain");
            run_step(
                Command::new("rustup").args(["component", "add", component]),
                &format!("setup: {component}"),
            )?;
        }
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run_step(
        Command::new("apt-get").args(["update", "-qq"]),
        "setup: apt-get update",
    )?;
    run_step(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
        "setup: apt-get install",
    )
}

fn bpf_linker() -> Result<()> {
    if output_ok(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM 22 (about a minute)");
    // bpf-linker looks for LLVM under /usr unless told otherwise, where Debian
    // keeps an older default LLVM; point it at version 22.
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run_step(
        Command::new("cargo")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path)
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
        "setup: bpf-linker",
    )?;
    if !output_ok(Command::new("bpf-linker").arg("--version")) {
        bail!("setup: bpf-linker installed but not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// For `cargo xtask fuzz` and the test suite's fuzz tier.
fn cargo_fuzz() -> Result<()> {
    if crate::fuzz::installed() {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz (about a minute)");
    run_step(
        // The version proven here; a newer one may want a newer rustc.
        Command::new("cargo").args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"]),
        "setup: cargo-fuzz",
    )?;
    if !crate::fuzz::installed() {
        bail!("setup: cargo-fuzz installed but not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("setup: reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs on /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf").ok();
    run_step(
        Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
        "setup: mount bpffs",
    )
}
