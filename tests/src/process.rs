//! Long-running processes inside a namespace (servers, lbd), stopped on drop.

use std::{
    io::{self, BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, MutexGuard, Weak, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, netns};

/// How long a process gets to exit after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// The child, shared between its [`Spawned`] and the [`Children`] of the
/// topology that started it, so whichever goes first stops it and the other
/// finds `None` (and never signals a pid that may have been reused).
type Slot = Arc<Mutex<Option<Child>>>;

fn lock(slot: &Mutex<Option<Child>>) -> MutexGuard<'_, Option<Child>> {
    // A panic while holding the lock leaves the Option intact; stopping the
    // child matters more than the poison flag.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGTERM, then SIGKILL after [`TERM_GRACE`]; reaps the child.
fn terminate(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions, and the child is
        // not reaped yet (try_wait said so), so the pid is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if let Ok(Some(status)) = cmd::wait_deadline(child, TERM_GRACE) {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// A process started in a namespace; SIGTERMed (then SIGKILLed after 2 s)
/// and reaped when dropped.
pub struct Spawned {
    slot: Slot,
    pid: u32,
    label: String,
    stdout: Option<ChildStdout>,
    lines: Option<mpsc::Receiver<String>>,
}

impl Spawned {
    /// The process id (the program itself, not an `ip netns exec` wrapper).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdout (always piped), unless already taken or being read by
    /// [`Spawned::wait_for_line`].
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.stdout.take()
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        match lock(&self.slot).as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops it now (as on drop) and returns its exit status, if it could
    /// be reaped (`None` also when the topology already stopped it).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        lock(&self.slot).take().and_then(|mut c| terminate(&mut c))
    }

    /// Reads stdout lines until one satisfies `pred`, and returns it; fails
    /// when the process closes stdout first or `timeout` passes. Lines read
    /// on the way are dropped (they appear in the error message).
    ///
    /// The first call hands stdout to a thread that keeps draining it until
    /// the process exits, so the process never blocks on (or dies of) a full
    /// or closed pipe.
    pub fn wait_for_line(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        if self.lines.is_none() {
            let Some(stdout) = self.stdout.take() else {
                bail!("{}: stdout was taken", self.label);
            };
            self.lines = Some(line_reader(stdout));
        }
        let Some(lines) = self.lines.as_ref() else {
            bail!("{}: no stdout", self.label);
        };
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "{} (pid {}): no expected line on stdout within {timeout:?}; got {seen:?}",
                    self.label,
                    self.pid
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = lock(&self.slot)
                        .as_mut()
                        .and_then(|c| cmd::wait_deadline(c, Duration::from_secs(1)).ok())
                        .flatten();
                    bail!(
                        "{} (pid {}) closed stdout (exit status {status:?}) before the \
                         expected line; got {seen:?}",
                        self.label,
                        self.pid
                    )
                }
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawned")
            .field("pid", &self.pid)
            .field("label", &self.label)
            .finish()
    }
}

fn line_reader(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Once nobody listens, keep reading anyway so the child's
            // writes never fail.
            let _ = tx.send(line);
        }
    });
    rx
}

/// Processes started by one topology, stopped when it goes away even if
/// the test still holds (or leaked) their [`Spawned`].
#[derive(Default)]
pub struct Children(Mutex<Vec<Weak<Mutex<Option<Child>>>>>);

impl Children {
    fn register(&self, slot: &Slot) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(slot));
    }

    /// Stops every registered process that is still running.
    pub fn stop_all(&self) {
        let list = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in list.iter().filter_map(Weak::upgrade) {
            if let Some(mut child) = lock(&slot).take() {
                terminate(&mut child);
            }
        }
    }
}

/// Whether a process with this pid exists (a zombie counts).
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts `cmd` inside network namespace `ns`, with stdin from /dev/null and
/// stdout piped (see [`Spawned::wait_for_line`]); stderr is left as `cmd`
/// has it, so by default it shows in the test output.
///
/// Only the network namespace is switched (in the child, between fork and
/// exec) rather than going through `ip netns exec`, which would remount /sys
/// and hide /sys/fs/bpf from lbd. `cmd` keeps the namespace open and should
/// not be reused after the test's namespaces are gone.
pub fn spawn_in_netns(ns: &str, cmd: &mut Command) -> Result<Spawned> {
    let label = format!("`{}` in {ns}", cmd::display(cmd));
    let file = netns::open(ns)?;
    // SAFETY: the closure only calls setns, which is async-signal-safe, and
    // touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {label}"))?;
    let pid = child.id();
    let stdout = child.stdout.take();
    Ok(Spawned {
        slot: Arc::new(Mutex::new(Some(child))),
        pid,
        label,
        stdout,
        lines: None,
    })
}

/// [`spawn_in_netns`], also registering the process with `children`.
pub fn spawn_registered(children: &Children, ns: &str, cmd: &mut Command) -> Result<Spawned> {
    let spawned = spawn_in_netns(ns, cmd)?;
    children.register(&spawned.slot);
    Ok(spawned)
}
