//! One lbd per instance. Two controllers with the same instance name would
//! share the pinned maps and the control socket, each rewriting the other's
//! rings and one silently stealing the other's socket; `--teardown` under a
//! running lbd would pull its data plane away. An advisory `flock` on a file
//! named after the instance keeps them apart; the kernel drops it when the
//! holder exits, however it exits, so a crash never leaves a stale lock.
//! A clean exit also removes the file, so /run does not collect one per
//! instance name ever used; whoever locks checks that the file it locked is
//! still the one at the path (an exiting holder may have just unlinked it).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// Under systemd's `RuntimeDirectory=lb` (scripts/lbd.service).
pub const LOCK_DIR: &str = "/run/lb";

pub fn lock_path(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.lock"))
}

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Still locked while unlinking: nobody can hold this inode now.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes the instance's lock without waiting: a second lbd must fail at
/// once and say who holds it, not hang in a unit's start timeout.
pub fn acquire(dir: &Path, instance: &str) -> Result<InstanceLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = lock_path(dir, instance);
    // A few tries: each lost race means a holder just exited.
    for _ in 0..5 {
        if let Some(lock) = try_acquire(&path, instance)? {
            return Ok(lock);
        }
    }
    bail!(
        "could not take the instance lock {}: it keeps being replaced",
        path.display()
    )
}

/// `None` when the locked file was unlinked by its previous holder between
/// our open and our lock.
fn try_acquire(path: &Path, instance: &str) -> Result<Option<InstanceLock>> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening the instance lock {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "instance {instance:?} is already run by lbd{} (lock {}); stop it first, or give this one another [instance] name",
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" pid {holder}")
                },
                path.display()
            );
        }
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    let locked = file
        .metadata()
        .with_context(|| format!("inspecting {}", path.display()))?;
    match std::fs::metadata(path) {
        Ok(now) if now.ino() == locked.ino() && now.dev() == locked.dev() => {}
        _ => return Ok(None),
    }
    // The holder's pid, for the message above; best effort.
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(Some(InstanceLock {
        _file: file,
        path: path.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        let first = acquire(&dir, "edge").expect("first lock");
        // flock locks belong to the open file description: a second open in
        // the same process conflicts just as another process would.
        let err = acquire(&dir, "edge").expect_err("second lock must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("\"edge\" is already run by lbd pid"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        // Another instance is independent.
        let other = acquire(&dir, "other").expect("another instance");
        drop(first);
        let again = acquire(&dir, "edge").expect("free again once dropped");
        assert_eq!(again.path(), lock_path(&dir, "edge"));
        drop((again, other));
        assert!(
            !lock_path(&dir, "edge").exists(),
            "a clean exit removes the file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
