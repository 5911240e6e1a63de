//! Undoing the backend role: the decapsulator detached and unpinned, the
//! VIPs lbd put on `lo` removed (addresses that were there before stay),
//! the neighbour entries it created deleted (those it only flagged managed
//! keep existing, unflagged), the sysctls written back (keys the kernel no
//! longer has skipped and reported).
//! The same steps for `lbctl teardown`, `on_exit = "detach"` and
//! `lbd --teardown` (which reads what to undo from the state file). Every
//! step is tried even when one fails; failures are reported.

use std::collections::BTreeSet;

use anyhow::{Context, Result};

use super::{
    config::BackendConfig,
    dataplane,
    host::{Host, LO, Presence},
    state::State,
    status::{ROLE, TornDown},
};
use crate::{
    neigh::{Resolver, Unmanaged},
    sysctl::Sysctls,
};

/// `lbd --teardown` with a backend file: in a runtime of its own.
pub fn offline(config: &BackendConfig) -> Result<TornDown> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(async {
            let host = Host::new()?;
            let resolver = Resolver::new()?;
            let mut errors = Vec::new();
            let state = State::load(&config.state_file).unwrap_or_else(|e| {
                // Still detach and restore what can be: only the lo
                // addresses and neighbours cannot be told apart.
                errors.push(format!("{e:#}"));
                State::default()
            });
            let mut done = run(config, &host, &resolver, state).await;
            errors.append(&mut done.errors);
            done.errors = errors;
            Ok(done)
        })
}

/// Undoes everything `state` records. The caller has dropped its own hold
/// on the program (an adopting lbd holds the link open), so that unpinning
/// detaches it.
pub async fn run(
    config: &BackendConfig,
    host: &Host,
    resolver: &Resolver,
    mut state: State,
) -> TornDown {
    let mut t = TornDown {
        role: ROLE.into(),
        ..TornDown::default()
    };
    // Decapsulation stops first: nothing is delivered to a VIP about to go.
    match dataplane::unpin(&config.name) {
        Ok(removed) => t.unpinned = removed,
        Err(e) => t.errors.push(format!("unpinning the decapsulator: {e:#}")),
    }
    match host.ifindex(LO).await {
        Ok(lo) => {
            for vip in state.lo_added.clone() {
                match host.remove_from_lo(lo, vip).await {
                    Ok(removed) => {
                        state.lo_added.remove(&vip);
                        if removed {
                            t.removed_from_lo.push(vip);
                        }
                    }
                    Err(e) => t.errors.push(format!("{e:#}")),
                }
            }
            let others: Vec<_> = config
                .vips
                .iter()
                .copied()
                .filter(|v| !t.removed_from_lo.contains(v) && !state.lo_added.contains(v))
                .collect();
            if let Ok(p) = host.presence(lo, &others).await {
                t.left_on_lo = others
                    .into_iter()
                    .zip(p)
                    .filter(|(_, p)| *p != Presence::Absent)
                    .map(|(v, _)| v)
                    .collect();
            }
        }
        Err(e) => t.errors.push(format!("{e:#}")),
    }
    for n in std::mem::take(&mut state.managed_neighbors) {
        match resolver.unmanage(&n).await {
            Ok(Unmanaged::Deleted) => t.neighbors_removed += 1,
            Ok(Unmanaged::FlagCleared) => t.neighbors_unflagged += 1,
            Ok(Unmanaged::LeftAlone) => {}
            Err(e) => {
                t.errors.push(format!("{e:#}"));
                state.managed_neighbors.insert(n);
            }
        }
    }
    let backup = config.sysctl_backup();
    if backup.exists() {
        match Sysctls::new("/proc/sys").restore_report(&backup) {
            Ok(r) => {
                t.sysctls_restored = r.restored;
                t.sysctls_skipped = r.skipped;
            }
            Err(e) => t.errors.push(format!("restoring sysctls: {e:#}")),
        }
    }
    // What could not be undone stays recorded for the next try.
    let left = !state.lo_added.is_empty() || !state.managed_neighbors.is_empty();
    let kept = if left {
        state.save(&config.state_file)
    } else {
        match std::fs::remove_file(&config.state_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    };
    if let Err(e) = kept {
        t.errors
            .push(format!("{}: {e:#}", config.state_file.display()));
    }
    t.teardown = summary(&t);
    t
}

/// One line for people.
fn summary(t: &TornDown) -> String {
    let mut parts = vec![if t.unpinned {
        "decap detached and unpinned".to_owned()
    } else {
        "nothing was pinned".to_owned()
    }];
    let list = |v: &[std::net::IpAddr]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !t.removed_from_lo.is_empty() {
        parts.push(format!("removed from lo: {}", list(&t.removed_from_lo)));
    }
    if !t.left_on_lo.is_empty() {
        parts.push(format!(
            "left on lo (there before lbd): {}",
            list(&t.left_on_lo)
        ));
    }
    if t.neighbors_removed > 0 {
        parts.push(format!(
            "{} managed neighbour entries removed",
            t.neighbors_removed
        ));
    }
    if t.neighbors_unflagged > 0 {
        parts.push(format!(
            "{} neighbour entries there before lbd kept (managed flag cleared)",
            t.neighbors_unflagged
        ));
    }
    if !t.sysctls_restored.is_empty() {
        parts.push(format!("{} sysctls restored", t.sysctls_restored.len()));
    }
    if !t.sysctls_skipped.is_empty() {
        parts.push(format!(
            "sysctls gone from this kernel, not restored: {}",
            t.sysctls_skipped.join(", ")
        ));
    }
    if !t.errors.is_empty() {
        parts.push(format!("FAILED: {}", t.errors.join("; ")));
    }
    parts.join("; ")
}
