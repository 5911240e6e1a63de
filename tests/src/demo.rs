//! What the two demos (`lb-demo`, `lb-fleet-demo`) share: Ctrl-C stops
//! them between steps (everything is torn down as the values drop), and one
//! exit-code policy.

use std::{
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Whether SIGINT or SIGTERM arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Runs `run(keep)` (`keep`: `--keep` was given) with SIGINT and SIGTERM
/// setting [`stopped`]; an error is printed after `name` and exits 1.
pub fn main(name: &str, run: impl FnOnce(bool) -> anyhow::Result<()>) -> ExitCode {
    let keep = std::env::args().any(|a| a == "--keep");
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match run(keep) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
