//! Starting `lb-testserver` from tests: finding the binary, building its
//! command line, waiting until it listens.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::process::Spawned;

/// Environment variable that overrides where `lb-testserver` is.
pub const TESTSERVER_ENV: &str = "LB_TESTSERVER";

/// How long a server may take to bind and say so.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The `lb-testserver` binary: `$LB_TESTSERVER`, or else next to the running
/// test executable.
pub fn testserver_path() -> Result<PathBuf> {
    workspace_binary("lb-testserver", TESTSERVER_ENV, "lb-tests")
}

/// Environment variable that overrides where `lbd` is.
pub const LBD_ENV: &str = "LB_LBD";

/// The `lbd` binary: `$LB_LBD`, or else next to the running test executable.
pub fn lbd_path() -> Result<PathBuf> {
    workspace_binary("lbd", LBD_ENV, "lb-userspace")
}

/// Environment variable that overrides where `lbctl` is.
pub const LBCTL_ENV: &str = "LB_LBCTL";

/// The `lbctl` binary: `$LB_LBCTL`, or else next to the running test executable.
pub fn lbctl_path() -> Result<PathBuf> {
    workspace_binary("lbctl", LBCTL_ENV, "lb-userspace")
}

/// `lbctl --socket SOCKET ARGS`: its exit code (-1 if killed), stdout and
/// stderr.
pub fn lbctl_output(socket: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(lbctl_path()?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .with_context(|| format!("running lbctl {args:?}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `lbctl --socket SOCKET ARGS`, which must succeed: its stdout.
pub fn lbctl(socket: &Path, args: &[&str]) -> Result<String> {
    let (code, out, err) = lbctl_output(socket, args)?;
    if code != 0 {
        bail!("lbctl {args:?} exited with {code}: {err}");
    }
    Ok(out)
}

/// A binary of this workspace: `$env`, or else next to the running test
/// executable (tests run from `target/<profile>/deps/`, binaries live in
/// `target/<profile>/`). `CARGO_BIN_EXE_*` would be simpler but only exists
/// for integration tests of the binary's own crate.
fn workspace_binary(name: &str, env: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("${env} is {}, which is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: run `cargo build -p {package} --bins` first (same profile as the \
             tests), or set ${env}",
            path.display()
        );
    }
    Ok(path)
}

/// The command that runs a test server called `name` on these addresses.
pub fn testserver_command(name: &str, http: &[SocketAddr], udp: &[SocketAddr]) -> Result<Command> {
    let mut cmd = Command::new(testserver_path()?);
    cmd.args(["--name", name]);
    for a in http {
        cmd.arg("--http").arg(a.to_string());
    }
    for a in udp {
        cmd.arg("--udp").arg(a.to_string());
    }
    Ok(cmd)
}

/// Waits for a test server's `listening` line and returns it, parsed.
pub fn wait_listening(server: &mut Spawned, timeout: Duration) -> Result<serde_json::Value> {
    let line = server.wait_for_line(
        |l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["event"] == "listening"),
        timeout,
    )?;
    serde_json::from_str(&line).with_context(|| format!("bad listening line {line:?}"))
}
