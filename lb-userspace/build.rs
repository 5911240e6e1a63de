//! Builds the XDP object with the nightly toolchain so that
//! `cargo build -p lb-userspace` on a fresh clone embeds a current object and
//! never fails for lack of one. `cargo xtask setup` installs what this needs.
//!
//! This does what aya-build does with one difference:
//! aya-build fixes the nested build's RUSTFLAGS, and we need two more (the
//! list is `lb-ebpf/rustflags`, shared with `cargo xtask build-ebpf`):
//! - `allows-misaligned-mem-access`. Without it LLVM splits every load and
//!   store of a header field into single bytes (header structs have
//!   alignment 1); x86-64 and arm64 handle misaligned access in hardware and
//!   the verifier permits it on packet memory there.
//! - `--export=lb_entry_slot,lb_find_slot`: the connection-table functions
//!   become global BPF functions, which the verifier checks once on their
//!   own instead of once per path of the balancer that calls them (522,000
//!   instructions verified per load, 1.5 s, instead of about 100,000).

use std::{env, path::PathBuf, process::Command};

fn main() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let workspace = manifest_dir.join("..");
    for dir in ["lb-ebpf", "lb-common/src"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| e.to_string())?;
    let flags_file = workspace.join("lb-ebpf/rustflags");
    let flags = std::fs::read_to_string(&flags_file)
        .map_err(|e| format!("reading {}: {e}", flags_file.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.replace("{arch}", &arch))
        .collect::<Vec<_>>()
        .join("\x1f");
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&workspace)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--quiet",
            "--package",
            "lb-ebpf",
            "--bins",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        // An inherited CARGO_INCREMENTAL=1 overrides the release profile's
        // `codegen-units = 1` for lb-ebpf (Cargo.toml): the crate is cut
        // into other codegen units and the balancer verifies differently or
        // not at all (a stack word LLVM reads misaligned).
        .env("CARGO_INCREMENTAL", "0")
        // The outer cargo's compiler settings are for the host toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e} (run `cargo xtask setup`)"))?;
    if !status.success() {
        return Err(format!(
            "building the XDP object failed ({status}); the eBPF toolchain may be missing: \
             run `cargo xtask setup`, or retry by hand with:\n  {cmd:?}"
        ));
    }
    let built = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&built, out_dir.join("lb-ebpf"))
        .map_err(|e| format!("copying {}: {e}", built.display()))?;
    Ok(())
}
