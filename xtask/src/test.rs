//! `cargo xtask test`: lints (rustfmt, clippy, and promtool on the alerting
//! rules in `scripts/alerts.yml` with their unit tests), then the three test
//! tiers, then a check that the tests left nothing behind.

use std::{fs, process::Command, str::FromStr};

use anyhow::{Result, bail};

use crate::{run_step, workspace_root};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Lint,
    Unit,
    Fuzz,
    Kernel,
    E2e,
}

impl FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lint" => Ok(Tier::Lint),
            "unit" => Ok(Tier::Unit),
            "fuzz" => Ok(Tier::Fuzz),
            "kernel" => Ok(Tier::Kernel),
            "e2e" => Ok(Tier::E2e),
            other => Err(format!(
                "unknown tier {other:?}: expected lint, unit, fuzz, kernel or e2e"
            )),
        }
    }
}

const ALL: [Tier; 5] = [Tier::Lint, Tier::Unit, Tier::Fuzz, Tier::Kernel, Tier::E2e];

/// Seconds each fuzz target runs in the test suite: enough to replay the
/// seeds and regressions and mutate a little; `cargo xtask fuzz` goes deeper.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root()).args(args);
    c
}

pub fn run(tiers: &[Tier]) -> Result<()> {
    let tiers = if tiers.is_empty() { &ALL[..] } else { tiers };
    let needs_root = tiers.iter().any(|t| matches!(t, Tier::Kernel | Tier::E2e));
    // SAFETY: geteuid has no preconditions.
    if needs_root && unsafe { libc_geteuid() } != 0 {
        bail!("kernel and e2e tiers load BPF programs and create namespaces: run as root");
    }
    let before = leftovers();
    for tier in tiers {
        eprintln!("== tier {tier:?}");
        match tier {
            Tier::Lint => {
                run_step(
                    &mut cargo(&["fmt", "--all", "--", "--check"]),
                    "lint: cargo fmt",
                )?;
                run_step(
                    &mut cargo(&[
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--",
                        "-D",
                        "warnings",
                    ]),
                    "lint: clippy (host crates)",
                )?;
                run_step(
                    &mut cargo(&[
                        "+nightly",
                        "clippy",
                        "-p",
                        "lb-ebpf",
                        "--target",
                        "bpfel-unknown-none",
                        "-Z",
                        "build-std=core",
                        "--",
                        "-D",
                        "warnings",
                    ]),
                    "lint: clippy (lb-ebpf for bpfel-unknown-none)",
                )?;
                // The fuzz crate is its own workspace.
                let fuzz = workspace_root().join("fuzz/Cargo.toml");
                let fuzz = fuzz.to_string_lossy();
                run_step(
                    &mut cargo(&["fmt", "--manifest-path", &fuzz, "--", "--check"]),
                    "lint: cargo fmt (fuzz)",
                )?;
                run_step(
                    &mut cargo(&[
                        "clippy",
                        "--manifest-path",
                        &fuzz,
                        "--all-targets",
                        "--",
                        "-D",
                        "warnings",
                    ]),
                    "lint: clippy (fuzz)",
                )?;
                // The Prometheus alerting rules and their unit tests.
                let promtool = |args: &[&str]| {
                    let mut c = Command::new("promtool");
                    c.current_dir(workspace_root()).args(args);
                    c
                };
                run_step(
                    &mut promtool(&["check", "rules", "scripts/alerts.yml"]),
                    "lint: promtool check rules",
                )?;
                run_step(
                    &mut promtool(&["test", "rules", "scripts/alerts.test.yml"]),
                    "lint: promtool test rules (alerts)",
                )?;
            }
            Tier::Unit => {
                run_step(
                    &mut cargo(&["test", "--workspace", "--lib", "--bins"]),
                    "unit tests",
                )?;
                // Reads the built XDP object; needs no privileges.
                run_step(
                    &mut cargo(&["test", "-p", "lb-userspace", "--test", "object_hygiene"]),
                    "unit tests: XDP object hygiene",
                )?;
            }
            Tier::Fuzz => crate::fuzz::run(&crate::fuzz::ALL, FUZZ_SECONDS_IN_TEST)?,
            Tier::Kernel => run_step(
                &mut cargo(&["test", "-p", "lb-userspace", "--test", "kernel_*"]),
                "kernel tests",
            )?,
            Tier::E2e => {
                // The harness runs lbd and the test servers as real processes.
                run_step(
                    &mut cargo(&["build", "--workspace", "--bins"]),
                    "e2e: build binaries",
                )?;
                run_step(
                    &mut cargo(&[
                        "test",
                        "-p",
                        "lb-tests",
                        "--tests",
                        "--",
                        "--test-threads=1",
                    ]),
                    "end-to-end tests",
                )?;
            }
        }
    }
    let after = leftovers();
    let new: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    if !new.is_empty() {
        bail!("tests left these behind: {new:?}");
    }
    eprintln!("all requested tiers passed; no namespaces, links or pins left behind");
    Ok(())
}

/// Namespaces, root-namespace links and bpffs pins, to compare before/after.
fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| format!("netns {l}")),
        );
    }
    if let Ok(o) = Command::new("ip").args(["-o", "link"]).output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split(':').nth(1))
                .map(|n| format!("link {}", n.trim())),
        );
    }
    if let Ok(dir) = fs::read_dir("/sys/fs/bpf") {
        out.extend(
            dir.flatten()
                .map(|e| format!("pin {}", e.file_name().to_string_lossy())),
        );
    }
    out
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
