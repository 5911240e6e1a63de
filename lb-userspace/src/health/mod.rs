//! Active health checks: one task per backend, results to the controller.

pub mod probe;
pub mod state;

use std::{net::SocketAddr, time::Duration};

use tokio::sync::mpsc;

use crate::config::HealthCheck;
pub use state::{Health, HealthState};

/// A state change of the backend with id `id`.
#[derive(Clone, Debug)]
pub struct HealthEvent {
    pub id: u32,
    /// The checked backend instance (ids are reused).
    pub token: u64,
    pub health: Health,
    pub reason: String,
    pub latency: Duration,
}

/// Every check's outcome, for the metrics: per backend id.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckRecord {
    pub last_latency: Duration,
    pub ok_total: u64,
    pub fail_total: u64,
}

pub type CheckStats = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u32, CheckRecord>>>;

/// Checks `addr` forever, sending an event on every state change and
/// recording every result in `stats`. Stops when the receiver is gone.
pub async fn run(
    id: u32,
    token: u64,
    addr: SocketAddr,
    check: HealthCheck,
    events: mpsc::Sender<HealthEvent>,
    stats: CheckStats,
    initial: Health,
) {
    let mut state = HealthState::starting(check.rise, check.fall, initial);
    loop {
        let started = tokio::time::Instant::now();
        let result = probe::probe(&check.kind, addr, check.timeout).await;
        let latency = started.elapsed();
        if let Ok(mut all) = stats.lock() {
            let r = all.entry(id).or_default();
            r.last_latency = latency;
            if result.is_ok() {
                r.ok_total += 1;
            } else {
                r.fail_total += 1;
            }
        }
        if let Some(health) = state.observe(result.is_ok()) {
            let reason = match &result {
                Ok(()) => format!("{} checks passed", check.rise),
                Err(e) => format!("{} checks failed, last: {e}", check.fall),
            };
            let event = HealthEvent {
                id,
                token,
                health,
                reason,
                latency,
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
        let wait = state
            .next_interval(&check)
            .saturating_sub(started.elapsed());
        tokio::time::sleep(wait).await;
    }
}

/// One check of every target at once, each bounded by its own timeout:
/// the states a fresh start publishes its first rings with, so no backend
/// gets traffic before a check has passed. Returns, per target, whether
/// its check passed (`CheckKind::None` passes without a probe).
pub async fn first_round<K: Send + 'static>(
    targets: Vec<(K, SocketAddr, HealthCheck)>,
) -> Vec<(K, bool)> {
    let mut set = tokio::task::JoinSet::new();
    for (key, addr, check) in targets {
        set.spawn(async move {
            let ok = probe::probe(&check.kind, addr, check.timeout).await.is_ok();
            (key, ok)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        // A probe task cannot panic short of a bug; its backend then stays
        // unchecked and its checker decides.
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}
