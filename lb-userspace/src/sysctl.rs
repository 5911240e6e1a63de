//! Kernel tuning for the balancer and for its DSR backends: what we
//! recommend and why, `apply` (recording the originals first), `restore`.
//! Keys the running kernel lacks are reported, never fatal.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The load-balancer host.
    Lb,
    /// A backend behind it (VIP on lo, answering clients directly).
    Backend,
}

pub struct Setting {
    pub key: &'static str,
    pub value: &'static str,
    pub why: &'static str,
}

const LB: &[Setting] = &[
    Setting {
        key: "net.core.netdev_max_backlog",
        value: "250000",
        why: "packets the program passes to the stack (health-check replies, non-VIP traffic) arrive in NIC-rate bursts",
    },
    Setting {
        key: "net.ipv4.tcp_max_syn_backlog",
        value: "65536",
        why: "the control API and metrics listeners must not drop connections during SYN bursts",
    },
    Setting {
        key: "net.ipv4.tcp_max_tw_buckets",
        value: "262144",
        why: "health checks open and close many connections; TIME_WAIT must not overflow",
    },
    Setting {
        key: "net.ipv4.ip_local_port_range",
        value: "10000\t65000",
        why: "health checks to many backends need source ports",
    },
    Setting {
        key: "net.ipv4.conf.all.rp_filter",
        value: "2",
        why: "loose reverse-path filtering: strict mode drops asymmetric (DSR) and tunnelled traffic",
    },
    Setting {
        key: "net.ipv4.tcp_tw_recycle",
        value: "0",
        why: "breaks clients behind NAT; removed in Linux 4.12, reported when absent",
    },
];

const BACKEND: &[Setting] = &[
    Setting {
        key: "net.ipv4.conf.all.arp_ignore",
        value: "1",
        why: "the VIP sits on lo: answer ARP only for addresses of the asking interface, or backends steal the VIP",
    },
    Setting {
        key: "net.ipv4.conf.all.arp_announce",
        value: "2",
        why: "never use the VIP as the source of ARP requests",
    },
    Setting {
        key: "net.ipv4.conf.all.rp_filter",
        value: "0",
        why: "decapsulated packets arrive for the VIP on an interface that does not route to the client",
    },
    Setting {
        key: "net.ipv4.conf.default.rp_filter",
        value: "0",
        why: "as above, for interfaces created later",
    },
];

pub fn profile(role: Role) -> &'static [Setting] {
    match role {
        Role::Lb => LB,
        Role::Backend => BACKEND,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Row {
    pub key: String,
    /// `None`: this kernel has no such key.
    pub current: Option<String>,
    pub recommended: String,
    pub ok: bool,
    pub why: String,
}

/// `/proc/sys` (a parameter so tests can use a directory of their own).
pub struct Sysctls {
    root: PathBuf,
}

fn normalise(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Sysctls {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysctls { root: root.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key.replace('.', "/"))
    }

    pub fn read(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.path(key))
            .ok()
            .map(|s| s.trim_end().to_owned())
    }

    fn write(&self, key: &str, value: &str) -> Result<()> {
        std::fs::write(self.path(key), value).with_context(|| format!("writing {key}"))
    }

    pub fn show(&self, role: Role) -> Vec<Row> {
        profile(role)
            .iter()
            .map(|s| {
                let current = self.read(s.key);
                Row {
                    key: s.key.into(),
                    ok: current.as_deref().map(normalise) == Some(normalise(s.value))
                        || current.is_none() && s.key.ends_with("tcp_tw_recycle"),
                    current,
                    recommended: normalise(s.value),
                    why: s.why.into(),
                }
            })
            .collect()
    }

    /// Records the current values in `backup` (once: a second apply keeps
    /// the first originals), then writes the recommendations. Returns what
    /// was changed; missing keys are skipped.
    pub fn apply(&self, role: Role, backup: &Path) -> Result<Vec<Row>> {
        let mut originals: BTreeMap<String, String> = match std::fs::read_to_string(backup) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("backup {} is corrupt", backup.display()))?,
            Err(_) => BTreeMap::new(),
        };
        for s in profile(role) {
            if let Some(v) = self.read(s.key) {
                originals.entry(s.key.to_owned()).or_insert(v);
            }
        }
        if let Some(dir) = backup.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(backup, serde_json::to_vec_pretty(&originals)?)
            .with_context(|| format!("writing {}", backup.display()))?;
        let mut failed = Vec::new();
        for s in profile(role) {
            if self.read(s.key).is_some()
                && let Err(e) = self.write(s.key, s.value)
            {
                failed.push(format!("{e:#}"));
            }
        }
        if !failed.is_empty() {
            bail!(
                "some settings could not be written (originals are in {}): {}",
                backup.display(),
                failed.join("; ")
            );
        }
        Ok(self.show(role))
    }

    /// The profile's keys as they are now (keys this kernel lacks left
    /// out), for putting them back after a failed start.
    pub fn snapshot(&self, role: Role) -> BTreeMap<String, String> {
        profile(role)
            .iter()
            .filter_map(|s| self.read(s.key).map(|v| (s.key.to_owned(), v)))
            .collect()
    }

    /// Writes every value back; every key is tried, the first error is
    /// returned.
    pub fn write_all(&self, values: &BTreeMap<String, String>) -> Result<()> {
        let mut first = None;
        for (k, v) in values {
            if let Err(e) = self.write(k, v) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes back what `apply` recorded and removes the backup.
    pub fn restore(&self, backup: &Path) -> Result<BTreeMap<String, String>> {
        let text = std::fs::read_to_string(backup)
            .with_context(|| format!("no backup at {} (nothing was applied?)", backup.display()))?;
        let originals: BTreeMap<String, String> = serde_json::from_str(&text)
            .with_context(|| format!("backup {} is corrupt", backup.display()))?;
        for (k, v) in &originals {
            self.write(k, v)?;
        }
        std::fs::remove_file(backup).with_context(|| format!("removing {}", backup.display()))?;
        Ok(originals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(dir: &Path) -> Sysctls {
        for (k, v) in [
            ("net.core.netdev_max_backlog", "1000"),
            ("net.ipv4.tcp_max_syn_backlog", "512"),
            ("net.ipv4.tcp_max_tw_buckets", "4096"),
            ("net.ipv4.ip_local_port_range", "32768\t60999"),
            ("net.ipv4.conf.all.rp_filter", "1"),
        ] {
            let p = dir.join(k.replace('.', "/"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{v}\n")).unwrap();
        }
        Sysctls::new(dir)
    }

    #[test]
    fn show_apply_restore_round_trip() {
        let dir = std::env::temp_dir().join(format!("lb-sysctl-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = fake_proc(&dir.join("proc"));
        let backup = dir.join("backup.json");
        let before = s.show(Role::Lb);
        let missing = before
            .iter()
            .find(|r| r.key == "net.ipv4.tcp_tw_recycle")
            .unwrap();
        assert_eq!(missing.current, None, "removed key reported, not fatal");
        assert!(before.iter().any(|r| !r.ok));
        let after = s.apply(Role::Lb, &backup).unwrap();
        assert!(after.iter().all(|r| r.ok), "{after:?}");
        // A second apply must not overwrite the recorded originals.
        s.apply(Role::Lb, &backup).unwrap();
        s.restore(&backup).unwrap();
        let restored = s.show(Role::Lb);
        for (a, b) in before.iter().zip(&restored) {
            assert_eq!(a.current, b.current, "{}", a.key);
        }
        assert!(!backup.exists());
        assert!(
            s.restore(&backup)
                .unwrap_err()
                .to_string()
                .contains("no backup")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
