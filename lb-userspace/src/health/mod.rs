//! Active health checks: one task per backend, results to the controller.
//!
//! At scale (thousands of backends checked every second) what a check
//! costs is mostly the kernel's: a TCP check ends with a reset on a socket
//! that is kept for the next check (see [`tcp`]), the checkers are spread
//! over their interval ([`first_delay`]) instead of all connecting in the
//! same millisecond, and those due within the same hundredth of it wake
//! together ([`wake_grid`]).
//! Only state changes reach the controller (and so the rings); every
//! result goes to the statistics only.

pub mod probe;
pub mod state;
pub mod tcp;

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

/// What every checker of a process shares: where state changes go, where
/// every result is counted, and the sockets TCP checks reuse.
#[derive(Clone, Debug)]
pub struct Checkers {
    pub events: mpsc::Sender<HealthEvent>,
    pub stats: CheckStats,
    pub sockets: std::sync::Arc<tcp::CheckSockets>,
}

/// Checks `addr` forever, sending an event on every state change and
/// recording every result in `stats`. Stops when the receiver is gone.
pub async fn run(
    id: u32,
    token: u64,
    addr: SocketAddr,
    check: HealthCheck,
    initial: Health,
    shared: Checkers,
) {
    let Checkers {
        events,
        stats,
        sockets,
    } = shared;
    let mut state = HealthState::starting(check.rise, check.fall, initial);
    let first = state.next_interval(&check);
    // When each check is due, unrounded: one interval after the previous
    // was due, so the rounding up to the grid delays each check but never
    // adds up from one to the next.
    let mut due = tokio::time::Instant::now() + first_delay(id, initial, first);
    tokio::time::sleep_until(on_grid(due, wake_grid(first))).await;
    loop {
        let started = tokio::time::Instant::now();
        let result = probe::probe(&check.kind, addr, check.timeout, &sockets).await;
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
        let interval = state.next_interval(&check);
        // A check that overran its interval is followed at once, not by a
        // burst of the ones it missed.
        due = (due + interval).max(tokio::time::Instant::now());
        tokio::time::sleep_until(on_grid(due, wake_grid(interval))).await;
    }
}

/// How finely the checkers' wake-ups are rounded: a hundredth of the
/// interval to the next check (`interval`, `fastinter` or `downinter`),
/// between 1 and 10 ms. Checkers due within the same step wake
/// together, in one return from the poller, instead of one wake-up (a
/// switch into the process, on a virtual machine an exit from idle too) per
/// check; a check runs up to 1% of its interval later than it would have.
fn wake_grid(interval: Duration) -> Duration {
    (interval / 100).clamp(Duration::from_millis(1), Duration::from_millis(10))
}

/// The first point of the grid (steps of `grid` from one instant shared by
/// every checker of the process) at or after `at`.
fn on_grid(at: tokio::time::Instant, grid: Duration) -> tokio::time::Instant {
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
    let since = at.saturating_duration_since(origin).as_nanos();
    let step = grid.as_nanos().max(1);
    let steps = since.div_ceil(step);
    let offset = u64::try_from(steps * step).unwrap_or(u64::MAX);
    origin + Duration::from_nanos(offset)
}

/// How long a checker waits before its first check. A backend whose health
/// is known already (the first round just checked it, or an adopted data
/// plane had it) waits a share of one interval that its id decides, so
/// that the checkers of a thousand backends, started together, do not
/// all connect in the same millisecond of every interval (as HAProxy
/// spreads its servers' checks). One not checked yet is checked at once.
pub fn first_delay(id: u32, initial: Health, interval: Duration) -> Duration {
    if initial == Health::Unchecked {
        return Duration::ZERO;
    }
    interval.mul_f64(spread(id))
}

/// A fraction of [0, 1) for `id`: the golden-ratio (Weyl) sequence, so
/// consecutive ids, as backends are given, land far apart and any run of
/// them covers the interval evenly.
fn spread(id: u32) -> f64 {
    let x = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The soft open-files limit (1,024 if it cannot be read).
pub(crate) fn open_files_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    }
}

/// Most first-round checks in flight at once: every one holds a socket, and
/// ten thousand SYNs in the same instant overflow a listener's backlog
/// (the backend then looks down for a retransmission's second).
const FIRST_ROUND_IN_FLIGHT: usize = 1024;

/// Checks the first round may have in flight: [`FIRST_ROUND_IN_FLIGHT`],
/// or fewer when the open-files limit leaves less room (a quarter of it
/// stays for everything else lbd opens).
fn first_round_in_flight() -> usize {
    let soft = open_files_limit();
    (soft / 4 * 3).clamp(16, FIRST_ROUND_IN_FLIGHT)
}

/// One check of every target, each bounded by its own timeout, up to
/// [`first_round_in_flight`] at a time: the states a fresh start publishes
/// its first rings with, so no backend gets traffic before a check has
/// passed. Returns, per target, whether its check passed
/// (`CheckKind::None` passes without a probe).
pub async fn first_round<K: Send + 'static>(
    targets: Vec<(K, SocketAddr, HealthCheck)>,
) -> Vec<(K, bool)> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(first_round_in_flight()));
    let sockets = tcp::CheckSockets::new();
    let mut set = tokio::task::JoinSet::new();
    for (key, addr, check) in targets {
        let slots = slots.clone();
        let sockets = sockets.clone();
        set.spawn(async move {
            // Never closed: a permit always comes.
            let _slot = slots.acquire_owned().await;
            let ok = probe::probe(&check.kind, addr, check.timeout, &sockets)
                .await
                .is_ok();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_backends_spread_their_first_check_over_the_interval() {
        let second = Duration::from_secs(1);
        assert_eq!(first_delay(7, Health::Unchecked, second), Duration::ZERO);
        // A thousand consecutive ids: every tenth of the interval gets
        // about a hundred first checks.
        let mut tenths = [0u32; 10];
        for id in 1..=1000 {
            let d = first_delay(id, Health::Up, second);
            assert!(d < second, "{d:?}");
            assert_eq!(d, first_delay(id, Health::Down, second), "by id alone");
            tenths[(d.as_secs_f64() * 10.0) as usize] += 1;
        }
        for (i, n) in tenths.iter().enumerate() {
            assert!((90..=110).contains(n), "tenth {i}: {n} checks");
        }
    }

    #[test]
    fn wake_ups_are_rounded_up_to_a_shared_grid() {
        assert_eq!(wake_grid(Duration::from_secs(1)), Duration::from_millis(10));
        assert_eq!(
            wake_grid(Duration::from_millis(200)),
            Duration::from_millis(2)
        );
        assert_eq!(
            wake_grid(Duration::from_millis(50)),
            Duration::from_millis(1)
        );
        assert_eq!(
            wake_grid(Duration::from_secs(60)),
            Duration::from_millis(10)
        );
        let grid = Duration::from_millis(10);
        let base = tokio::time::Instant::now();
        let mut wakes = std::collections::BTreeSet::new();
        for id in 1..=1000 {
            let at = base + first_delay(id, Health::Up, Duration::from_secs(1));
            let woken = on_grid(at, grid);
            assert!(woken >= at, "never early");
            assert!(woken - at < grid, "at most one step late");
            assert_eq!(on_grid(woken, grid), woken, "a grid point stays put");
            wakes.insert(woken);
        }
        // A thousand checkers spread over a second wake at no more than a
        // hundred and one instants (the grid's points in that second).
        assert!(wakes.len() <= 101, "{} distinct wake-ups", wakes.len());
        assert!(wakes.len() >= 90, "still spread: {}", wakes.len());
    }

    #[tokio::test]
    async fn the_first_round_checks_more_targets_than_it_keeps_in_flight() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { while l.accept().await.is_ok() {} });
        let check = HealthCheck {
            kind: crate::config::CheckKind::Tcp,
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            rise: 1,
            fall: 1,
            fastinter: Duration::from_secs(1),
            downinter: Duration::from_secs(1),
            flap: Default::default(),
        };
        let n = first_round_in_flight() + 10;
        let targets = (0..n).map(|i| (i, addr, check.clone())).collect();
        let mut out = first_round(targets).await;
        out.sort();
        assert_eq!(out.len(), n);
        assert!(out.iter().enumerate().all(|(i, r)| *r == (i, true)));
    }
}
