//! The state file: what survives a restart on top of the configuration
//! file (runtime changes made through the control API), and how the two
//! are merged at start.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{Controller, admin::parse_check};
use crate::config::{BackendConfig, Config, ForwardMode, VipConfig, VipSpec};

/// What survives a restart on top of the configuration file: each VIP's
/// backend list as changed at runtime.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SavedState {
    pub vips: BTreeMap<String, Vec<SavedBackend>>,
    /// VIPs added at runtime (not in the configuration file).
    #[serde(default)]
    pub added_vips: BTreeMap<String, SavedVip>,
    /// Configured VIPs removed at runtime.
    #[serde(default)]
    pub removed_vips: BTreeSet<String>,
    /// Each VIP's backends as the configuration file had them when this was
    /// saved: if the file says otherwise now, the operator edited it, and the
    /// file wins over the runtime changes for that VIP.
    #[serde(default)]
    pub configured: BTreeMap<String, Vec<(IpAddr, u32)>>,
    /// VIP ids (`RINGS`/`STATS_VIP` slots), kept so an adopted data plane's
    /// rings stay with their VIPs.
    #[serde(default)]
    pub vip_ids: BTreeMap<String, u32>,
    /// `lbctl node drain`: the node announces no VIP, across restarts (an
    /// operator drains for maintenance, and an upgrade restarts lbd).
    #[serde(default)]
    pub node_drained: bool,
}

/// A runtime-added VIP's definition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVip {
    pub mode: ForwardMode,
    /// `none`, `tcp` or `http:PATH`, with default timings.
    pub check: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedBackend {
    pub address: IpAddr,
    pub weight: u32,
    pub drained: bool,
    /// The `BACKENDS` slot: kept across restarts because adopted connection
    /// table entries name backends by it.
    #[serde(default)]
    pub id: Option<u32>,
}

/// The runtime changes the controller keeps on top of the file, besides
/// each VIP's backends.
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    pub added_vips: BTreeMap<String, SavedVip>,
    pub removed_vips: BTreeSet<String>,
    /// Each VIP's backends as the file has them now.
    pub configured: BTreeMap<String, Vec<(IpAddr, u32)>>,
    pub node_drained: bool,
    /// VIPs whose backends were edited in the file since the state was
    /// saved: the file's list replaced the runtime one.
    pub overridden: Vec<String>,
}

/// Reads the state file; a missing file is an empty state.
pub fn load(path: &Path) -> Result<SavedState> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("state file {} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SavedState::default()),
        Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
    }
}

/// Lays the saved runtime changes over the configuration: VIPs removed and
/// added at runtime, and each VIP's backends as changed at runtime, unless
/// the operator has edited that VIP's backends in the file since (the file
/// wins then).
pub fn merge(config: &mut Config, saved: &SavedState) -> Result<Overlay> {
    config
        .vips
        .retain(|v| !saved.removed_vips.contains(&v.spec.to_string()));
    for (spec, def) in &saved.added_vips {
        let spec: VipSpec = spec
            .parse()
            .with_context(|| format!("state file: VIP {spec:?}"))?;
        let health_check =
            parse_check(&def.check).map_err(|e| anyhow::anyhow!("state file: {e}"))?;
        config
            .vips
            .push(VipConfig::new(spec, def.mode, health_check));
    }
    // What the file says, before runtime changes are laid over it.
    let configured = configured_lists(config);
    let mut overridden = Vec::new();
    for v in &mut config.vips {
        let name = v.spec.to_string();
        if let Some(old) = saved.configured.get(&name)
            && configured.get(&name) != Some(old)
        {
            overridden.push(name);
            continue;
        }
        if let Some(list) = saved.vips.get(&name) {
            // A backend the file also lists keeps the file's own settings.
            v.backends = list
                .iter()
                .map(|b| BackendConfig {
                    weight: b.weight,
                    ..v.backends
                        .iter()
                        .find(|f| f.addr == b.address)
                        .cloned()
                        .unwrap_or_else(|| BackendConfig::new(b.address, b.weight))
                })
                .collect();
        }
    }
    Ok(Overlay {
        added_vips: saved.added_vips.clone(),
        removed_vips: saved.removed_vips.clone(),
        configured,
        node_drained: saved.node_drained,
        overridden,
    })
}

/// Checks, before a start changes anything, that the state file can be
/// written: its directory is created if missing (returned, outermost first,
/// so a failed start can remove what it created) and a scratch file is
/// written there and removed.
pub fn probe(path: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut created = Vec::new();
    if let Some(dir) = path.parent() {
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        for d in missing.iter().rev() {
            if let Err(e) = std::fs::create_dir(d) {
                remove_dirs(&created);
                return Err(e).with_context(|| {
                    format!(
                        "instance.state_file {}: creating {}",
                        path.display(),
                        d.display()
                    )
                });
            }
            created.push(d.to_path_buf());
        }
    }
    let scratch = path.with_extension("probe");
    let written = std::fs::write(&scratch, b"").and_then(|_| std::fs::remove_file(&scratch));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&scratch);
        remove_dirs(&created);
        return Err(e).with_context(|| {
            format!(
                "instance.state_file {}: cannot write in its directory",
                path.display()
            )
        });
    }
    Ok(created)
}

/// Removes directories [`probe`] created, innermost first (only if empty).
pub fn remove_dirs(created: &[std::path::PathBuf]) {
    for d in created.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// The state file as fleet mode reads it: the fleet's desired state
/// (`config`'s VIPs and `drained`) stands for the runtime changes, with
/// the ids the file recorded (an adopted data plane's rings and
/// connection-table entries name them) and the node's own drain.
pub fn for_fleet(
    config: &Config,
    saved: SavedState,
    drained: &crate::fleet::desired::Drained,
) -> SavedState {
    let vips = config
        .vips
        .iter()
        .map(|v| {
            let name = v.spec.to_string();
            let prior = saved.vips.get(&name);
            let list = v
                .backends
                .iter()
                .map(|b| SavedBackend {
                    address: b.addr,
                    weight: b.weight,
                    drained: drained.contains(&(v.spec, b.addr)),
                    id: prior
                        .and_then(|l| l.iter().find(|s| s.address == b.addr))
                        .and_then(|s| s.id),
                })
                .collect();
            (name, list)
        })
        .collect();
    let configured = configured_lists(config);
    SavedState {
        vips,
        added_vips: BTreeMap::new(),
        removed_vips: BTreeSet::new(),
        configured,
        vip_ids: saved.vip_ids,
        node_drained: saved.node_drained,
    }
}

/// Each VIP's backends (address and weight) as `config` has them.
fn configured_lists(config: &Config) -> BTreeMap<String, Vec<(IpAddr, u32)>> {
    config
        .vips
        .iter()
        .map(|v| {
            (
                v.spec.to_string(),
                v.backends.iter().map(|b| (b.addr, b.weight)).collect(),
            )
        })
        .collect()
}

/// Says which VIPs took the file's backends over runtime changes (at a
/// start or a reload; a preview says it in its answer instead).
pub fn log_overridden(overlay: &Overlay) {
    for vip in &overlay.overridden {
        tracing::warn!(%vip, "backends edited in the configuration file: it overrides runtime changes");
    }
}

impl Controller {
    /// The state to save: the overlay and every VIP's backends as they are.
    pub(super) fn saved_state(&self) -> SavedState {
        SavedState {
            added_vips: self.overlay.added_vips.clone(),
            removed_vips: self.overlay.removed_vips.clone(),
            configured: self.overlay.configured.clone(),
            node_drained: self.overlay.node_drained,
            vip_ids: self
                .vips
                .iter()
                .map(|v| (v.config.spec.to_string(), v.vip_id))
                .collect(),
            vips: self
                .vips
                .iter()
                .map(|v| {
                    let list = v
                        .backends
                        .iter()
                        .map(|b| SavedBackend {
                            address: b.status.address,
                            weight: b.status.weight,
                            drained: b.status.drained,
                            id: Some(b.status.id),
                        })
                        .collect();
                    (v.config.spec.to_string(), list)
                })
                .collect(),
        }
    }

    /// Writes the runtime changes to the state file (atomically: temp file,
    /// then rename), so a restart keeps them. The file is the operator's
    /// (mode 0600). A failure is counted and remembered for `lbctl node
    /// status`, and leaves no temporary file behind.
    pub fn persist(&self) -> Result<()> {
        let saved = write_state(&self.config.state_file, &self.saved_state());
        let mut record = self
            .save_record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &saved {
            Ok(()) => record.last_error = None,
            Err(e) => {
                record.failures += 1;
                record.last_error = Some(format!("{e:#}"));
            }
        }
        saved
    }
}

/// How saving the state file has gone since lbd started.
#[derive(Clone, Debug, Default)]
pub struct SaveRecord {
    pub failures: u64,
    /// Set while the last save failed: the data plane holds changes the
    /// file does not.
    pub last_error: Option<String>,
}

fn write_state(path: &Path, state: &SavedState) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let named = |what: &str| format!("state file {}: {what}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| named(&format!("creating {}", dir.display())))?;
    }
    let body = serde_json::to_vec_pretty(state).with_context(|| named("encoding"))?;
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // `mode` only applies to a file it creates.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        f.write_all(&body)?;
        // On disk before it replaces the old state: a crash must leave one
        // whole file or the other.
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| named(&format!("writing through {}", tmp.display())));
    }
    Ok(())
}
