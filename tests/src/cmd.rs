//! Running external commands (`ip`, `sysctl`, `ethtool`) with a deadline.
//!
//! A hung helper must fail the test instead of hanging CI, so every command
//! gets a timeout, and its output is read on side threads so a chatty command
//! cannot block on a full pipe while we wait for it.

use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Deadline for the short configuration commands the harness runs.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a waiting loop looks at the child again.
const POLL: Duration = Duration::from_millis(10);

/// Once the child exited, how long to wait for its pipes to close; a
/// grandchild that inherited them (a daemon started by a script) would
/// otherwise keep us waiting forever.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// The command line as a human would type it, for error messages.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion within `timeout` and returns its stdout.
///
/// Fails with the command line, exit status and stderr when the command
/// cannot start, exits non-zero or runs past `timeout` (it is killed then).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let line = display(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = match wait_deadline(&mut child, timeout)
        .with_context(|| format!("waiting for `{line}`"))?
    {
        Some(status) => status,
        None => {
            // Kill errors only mean it exited in the meantime.
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {timeout:?}; killed it");
        }
    };
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    if !status.success() {
        bail!("`{line}` failed ({status}): {}", stderr.trim());
    }
    Ok(stdout)
}

/// Waits for `child` to exit, at most `timeout`; `None` when it is still
/// running then.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error just ends the capture; what we got is still useful.
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

fn collect(rx: mpsc::Receiver<Vec<u8>>) -> String {
    rx.recv_timeout(PIPE_GRACE)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_stdout() {
        let out = run(Command::new("echo").arg("hi"), DEFAULT_TIMEOUT).unwrap();
        assert_eq!(out, "hi\n");
    }

    #[test]
    fn failure_names_command_and_stderr() {
        let err = run(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            DEFAULT_TIMEOUT,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sh -c 'echo oops >&2; exit 3'"), "{err}");
        assert!(err.contains("oops"), "{err}");
    }

    #[test]
    fn timeout_kills() {
        let start = Instant::now();
        let err = run(Command::new("sleep").arg("10"), Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
