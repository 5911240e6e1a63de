//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/`, each for a bounded
//! time, starting from the seed corpora and the recorded crashes.
//!
//! Every run first replays `fuzz/seeds/<target>/` and
//! `fuzz/regressions/<target>/` (inputs that once crashed a target, kept so
//! the bug stays fixed), then mutates for the given time. New inputs go to
//! a scratch corpus under `fuzz/target/`, which later runs start from; a
//! crash leaves its input under `fuzz/artifacts/<target>/` and fails the run
//! with the command that reproduces it.

use std::{fs, path::PathBuf, process::Command, str::FromStr, time::Instant};

use anyhow::{Context, Result, bail};

use crate::{run_step, workspace_root};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Parse,
    Icmp,
    Policy,
    Config,
    Api,
    Http,
}

pub const ALL: [Target; 6] = [
    Target::Parse,
    Target::Icmp,
    Target::Policy,
    Target::Config,
    Target::Api,
    Target::Http,
];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Parse => "parse",
            Target::Icmp => "icmp",
            Target::Policy => "policy",
            Target::Config => "config",
            Target::Api => "api",
            Target::Http => "http",
        }
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            format!("unknown fuzz target {s:?}: expected parse, icmp, policy, config, api or http")
        })
    }
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root()).args(["+nightly", "fuzz"]);
    c
}

pub fn installed() -> bool {
    cargo_fuzz()
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Builds the targets, then runs each for `seconds`.
pub fn run(targets: &[Target], seconds: u64) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds 0: expected 1 or more seconds per target");
    }
    if !installed() {
        bail!("fuzz: cargo-fuzz is not installed: run `cargo xtask setup`");
    }
    let targets = if targets.is_empty() {
        &ALL[..]
    } else {
        targets
    };
    run_step(
        cargo_fuzz().args(["build", "--release"]),
        "fuzz: build the targets",
    )?;
    for &t in targets {
        run_one(t, seconds)?;
    }
    Ok(())
}

fn run_one(target: Target, seconds: u64) -> Result<()> {
    let name = target.name();
    let dir = fuzz_dir();
    let scratch = dir.join("target/corpus").join(name);
    let log = dir.join("target/logs").join(format!("{name}.log"));
    for d in [&scratch, &dir.join("target/logs")] {
        fs::create_dir_all(d).with_context(|| format!("fuzz: creating {}", d.display()))?;
    }
    let mut corpora = vec![scratch];
    for kept in ["seeds", "regressions"] {
        let d = dir.join(kept).join(name);
        if d.is_dir() {
            corpora.push(d);
        }
    }
    let out =
        fs::File::create(&log).with_context(|| format!("fuzz: creating {}", log.display()))?;
    let err = out.try_clone().context("fuzz: log file")?;
    let started = Instant::now();
    let status = cargo_fuzz()
        .args(["run", "--release", name])
        .args(&corpora)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // libFuzzer's own default is 1200 s per input; a policy step or a
        // config that takes more than this is a bug in itself.
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("fuzz {name}: could not start cargo fuzz"))?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        // From the first report (a panic, a sanitizer or libFuzzer error).
        let lines: Vec<&str> = text.lines().collect();
        let from = lines
            .iter()
            .position(|l| l.contains("panicked at") || l.contains("ERROR: "))
            .unwrap_or(lines.len().saturating_sub(20));
        let tail = &lines[from..lines.len().min(from + 20)];
        let crash = text
            .lines()
            .find_map(|l| l.split("Test unit written to ").nth(1))
            .map(str::trim)
            .unwrap_or("(no input written; see the log)");
        bail!(
            "fuzz {name} failed ({status}) after {:.0} s; its input: {crash}\n\
             log: {}\n{}\n\
             reproduce: cargo +nightly fuzz run --release {name} {crash}\n\
             once fixed, keep the input in fuzz/regressions/{name}/ and add a test",
            started.elapsed().as_secs_f64(),
            log.display(),
            tail.join("\n"),
        );
    }
    eprintln!(
        "fuzz {name}: {} runs in {:.0} s, {} edges covered, no failure",
        final_stat(&text, "stat::number_of_executed_units").unwrap_or("?"),
        started.elapsed().as_secs_f64(),
        coverage(&text).unwrap_or("?"),
    );
    Ok(())
}

fn final_stat<'a>(log: &'a str, key: &str) -> Option<&'a str> {
    log.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_prefix(':'))
        .map(str::trim)
}

/// The `cov:` figure of libFuzzer's last status line.
fn coverage(log: &str) -> Option<&str> {
    log.lines()
        .rev()
        .find_map(|l| l.split(" cov: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_statistics() {
        let log = "#1024\tpulse  cov: 671 ft: 816 corp: 142/2962b\n\
                   #2048\tDONE   cov: 705 ft: 850 corp: 144/3342b\n\
                   stat::number_of_executed_units: 1710184\n\
                   stat::average_exec_per_sec:     28035\n";
        assert_eq!(
            final_stat(log, "stat::number_of_executed_units"),
            Some("1710184")
        );
        assert_eq!(coverage(log), Some("705"));
        assert_eq!(final_stat("", "stat::x"), None);
    }

    #[test]
    fn target_names_round_trip() {
        for t in ALL {
            assert_eq!(t.name().parse::<Target>(), Ok(t));
        }
        let e = "pars".parse::<Target>().unwrap_err();
        assert!(e.contains("expected parse, icmp"), "{e}");
    }
}
