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
    /// Neighbour entries this lbd made managed (one record per entry;
    /// each says whether lbd created it or only flagged it).
    #[serde(default)]
    pub managed_neighbors: BTreeSet<Managed>,
}

impl State {
    /// Records a neighbour entry lbd made managed. An entry already
    /// recorded keeps its record: whether it was there before lbd is
    /// known from the first time. False: nothing changed.
    pub fn record_managed(&mut self, m: Managed) -> bool {
        if self.managed_neighbors.iter().any(|n| n.key() == m.key()) {
            return false;
        }
        self.managed_neighbors.insert(m)
    }

    /// Forgets the record of a neighbour entry (lbd is done with it).
    pub fn forget_managed(&mut self, key: (u32, IpAddr)) -> bool {
        let before = self.managed_neighbors.len();
        self.managed_neighbors.retain(|n| n.key() != key);
        self.managed_neighbors.len() != before
    }

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
            created: true,
        });
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), s);
        assert!(!tmp_path(&path).exists());
        std::fs::write(&path, b"{").unwrap();
        let e = format!("{:#}", State::load(&path).unwrap_err());
        assert!(e.contains("corrupt"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One record per neighbour entry, the first one's kept; a record
    /// from an older lbd (no `created`) is one that was there before.
    #[test]
    fn one_record_per_neighbour_and_old_records_were_there_before() {
        let via: IpAddr = "198.18.0.1".parse().unwrap();
        let mut s = State::default();
        let pre = Managed {
            ifindex: 2,
            via,
            created: false,
        };
        assert!(s.record_managed(pre));
        assert!(!s.record_managed(Managed {
            created: true,
            ..pre
        }));
        assert_eq!(s.managed_neighbors.iter().collect::<Vec<_>>(), [&pre]);
        assert!(s.forget_managed((2, via)));
        assert!(!s.forget_managed((2, via)));
        let old: State =
            serde_json::from_str(r#"{"managed_neighbors": [{"ifindex": 2, "via": "198.18.0.1"}]}"#)
                .unwrap();
        assert_eq!(old.managed_neighbors.first(), Some(&pre));
    }
}
