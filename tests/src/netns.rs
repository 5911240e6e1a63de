//! Named network namespaces (`ip netns`): create, delete, run code inside.
//!
//! Namespaces are named `<prefix><pid>x<k>-<role>` so that leftovers of a
//! killed test run can be told apart from those of a run still going: the
//! pid in the name is the process that created them.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Prefix of every namespace the harness creates.
pub const NS_PREFIX: &str = "lbt";

/// Where `ip netns` keeps the bind mounts that name namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The file that names namespace `ns`.
pub fn path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Opens namespace `ns` for `setns`.
pub fn open(ns: &str) -> Result<File> {
    let p = path(ns);
    File::open(&p).with_context(|| format!("cannot open network namespace {}", p.display()))
}

/// Names of all named network namespaces.
pub fn list() -> Result<Vec<String>> {
    let out = cmd::run(
        Command::new("ip").args(["netns", "list"]),
        cmd::DEFAULT_TIMEOUT,
    )?;
    // Lines look like "name (id: 3)" or just "name".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Creates namespace `ns` with `lo` up.
///
/// A namespace of that name can only be left over from a dead process that
/// had our pid (names carry the pid and a per-process counter), so it is
/// deleted first rather than failing.
/// Fails the test if any of `names` is still a namespace.
pub fn assert_gone(names: &[String]) {
    let left = list().expect("listing namespaces");
    let still: Vec<_> = names.iter().filter(|n| left.contains(n)).collect();
    assert!(still.is_empty(), "namespaces left behind: {still:?}");
}

pub fn create(ns: &str) -> Result<()> {
    if path(ns).exists() {
        delete(ns);
    }
    cmd::run(
        Command::new("ip").args(["netns", "add", ns]),
        cmd::DEFAULT_TIMEOUT,
    )?;
    if let Err(e) = ip(ns, &["link", "set", "lo", "up"]) {
        delete(ns);
        return Err(e);
    }
    Ok(())
}

/// Deletes namespace `ns`, first SIGKILLing every process still in it (a
/// namespace lives on as long as a process holds it, and with it its veths
/// and any XDP program attached to them). Errors are ignored: this runs from
/// `Drop`, where there is nobody to report to and every step is worth trying.
pub fn delete(ns: &str) {
    let me = std::process::id();
    if let Ok(out) = cmd::run(
        Command::new("ip").args(["netns", "pids", ns]),
        cmd::DEFAULT_TIMEOUT,
    ) {
        for pid in out.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            // /proc/<pid>/ns/net is the main thread's namespace, which for us
            // is never a test namespace, but never shoot ourselves anyway.
            if pid == me {
                continue;
            }
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = cmd::run(
        Command::new("ip").args(["netns", "del", ns]),
        cmd::DEFAULT_TIMEOUT,
    );
}

/// Deletes namespaces named `<prefix><pid>x...` whose creating process `pid`
/// no longer exists: what a SIGKILLed test run leaves behind. Returns the
/// names it deleted. Namespaces of live processes (other test runs going on
/// at the same time) and names of any other shape are left alone.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    if prefix.is_empty() {
        bail!("cleanup_stale needs a non-empty prefix");
    }
    let me = std::process::id();
    let mut removed = Vec::new();
    for ns in list()? {
        let Some(pid) = owner_pid(&ns, prefix) else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        delete(&ns);
        removed.push(ns);
    }
    Ok(removed)
}

/// The pid encoded in a harness namespace name, if `ns` is one.
fn owner_pid(ns: &str, prefix: &str) -> Option<u32> {
    let rest = ns.strip_prefix(prefix)?;
    let (pid, _) = rest.split_once('x')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Runs `ip -n <ns> <args>` and returns its stdout.
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    cmd::run(
        Command::new("ip").arg("-n").arg(ns).args(args),
        cmd::DEFAULT_TIMEOUT,
    )
}

/// Runs `ip netns exec <ns> <args>` and returns its stdout; fails with the
/// command line and stderr when it fails or runs past `timeout`.
///
/// Note that `ip netns exec` remounts /sys, which hides /sys/fs/bpf: use
/// [`crate::process::spawn_in_netns`] or [`in_netns`] for BPF work.
pub fn exec_timeout(ns: &str, args: &[&str], timeout: Duration) -> Result<String> {
    if args.is_empty() {
        bail!("exec in {ns}: empty command");
    }
    cmd::run(
        Command::new("ip").args(["netns", "exec", ns]).args(args),
        timeout,
    )
}

/// [`exec_timeout`] with [`cmd::DEFAULT_TIMEOUT`].
pub fn exec(ns: &str, args: &[&str]) -> Result<String> {
    exec_timeout(ns, args, cmd::DEFAULT_TIMEOUT)
}

/// Sets sysctls (`key=value`) inside namespace `ns`.
pub fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    exec(ns, &args).map(drop)
}

/// Runs `f` on a fresh thread that first joins network namespace `ns_name`,
/// and returns what `f` returns; a panic in `f` is passed on to the caller.
///
/// Only the network namespace changes (`setns(CLONE_NEWNET)`), not the mount
/// namespace, so /sys/fs/bpf stays visible. The thread ends with `f`, taking
/// its namespace with it, so the caller's thread is never affected.
pub fn in_netns<T: Send>(ns_name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = open(ns_name)?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns_name}"))
            .spawn_scoped(s, move || -> Result<T> {
                // SAFETY: setns only reads the fd, which `file` keeps open.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("setns into network namespace {ns_name}"));
                }
                drop(file);
                Ok(f())
            })
            .context("cannot spawn a thread")?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_pid() {
        assert_eq!(owner_pid("lbt1234x0-client", "lbt"), Some(1234));
        assert_eq!(owner_pid("lbt1234x12-b3", "lbt"), Some(1234));
        assert_eq!(owner_pid("lbtx0-client", "lbt"), None);
        assert_eq!(owner_pid("lbt12a4x0-client", "lbt"), None);
        assert_eq!(owner_pid("lbt1234-client", "lbt"), None);
        assert_eq!(owner_pid("other1234x0", "lbt"), None);
    }
}
