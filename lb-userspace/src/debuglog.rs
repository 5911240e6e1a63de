//! Data-plane debug events (aya-log): read from the program's ring buffer
//! and printed as JSON lines on stdout, next to lbd's other events. The
//! program only emits them while `CONFIG_FLAG_DEBUG` is set
//! (`lbctl debug on|off`).

use anyhow::{Context, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

/// Prints each record as `{"event":"dataplane","level":..,"message":..}`.
pub struct JsonLines;

impl log::Log for JsonLines {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        println!(
            "{}",
            serde_json::json!({
                "event": "dataplane",
                "level": record.level().as_str().to_lowercase(),
                "message": record.args().to_string(),
            })
        );
    }

    fn flush(&self) {}
}

/// Takes the program's log buffer and prints what arrives, for as long as
/// the runtime lives. Must be called after the program was loaded.
pub fn spawn(ebpf: &mut Ebpf) -> Result<()> {
    let logger = EbpfLogger::init_with_logger(ebpf, JsonLines)
        .context("opening the data plane's log buffer")?;
    // SAFETY: the logger owns the ring buffer's fd and neither closes nor
    // replaces it while the AsyncFd holds it.
    let mut fd =
        unsafe { AsyncFd::register(logger) }.context("watching the data plane's log buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
