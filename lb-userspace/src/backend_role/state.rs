//! What this lbd changed on the host that is not in the pinned maps, so that
//! a teardown (by this lbd, the next one, or `lbd --teardown` after a crash)
//! removes exactly that: the `lo` addresses it added (an address that was
//! there before stays) and the neighbour entries it made managed. Written
//! before the change it records, so a crash in between leaves the change
//! recorded, never unrecorded.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::neigh::Managed;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The interface the data plane was attached to: a restart with
    /// another `instance.interface` must not adopt a program running
    /// elsewhere.
    #[serde(default)]
    pub interface: Option<String>,
    /// VIPs this lbd put on `lo`.
    #[serde(default)]
    pub lo_added: BTreeSet<IpAddr>,
    /// Neighbour entries this lbd made managed.
    #[serde(default)]
    pub managed_neighbors: BTreeSet<Managed>,
}

impl State {
    /// The recorded state; none recorded (a first start) is empty.
    pub fn load(path: &Path) -> Result<State> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "state file {} is corrupt; it lists what lbd added to lo: fix or remove it",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Replaces the file whole (a reader never sees half of it).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = tmp_path(path);
        let bytes = serde_json::to_vec_pretty(self).context("encoding the state")?;
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absent_is_empty() {
        let dir = std::env::temp_dir().join(format!("lb-backend-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("web1.state.json");
        assert_eq!(State::load(&path).unwrap(), State::default());
        let mut s = State {
            interface: Some("eth0".into()),
            ..State::default()
        };
        s.lo_added.insert("198.18.100.1".parse().unwrap());
        s.managed_neighbors.insert(Managed {
            ifindex: 2,
            via: "fd00:198:18::21".parse().unwrap(),
        });
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), s);
        assert!(!tmp_path(&path).exists());
        std::fs::write(&path, b"{").unwrap();
        let e = format!("{:#}", State::load(&path).unwrap_err());
        assert!(e.contains("corrupt"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
