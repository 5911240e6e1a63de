//! Kernel tuning for the balancer and for its DSR backends: what we
//! recommend and why, `apply` (recording the originals first), `restore`.
//! Keys the running kernel lacks are reported, never fatal.

use std::{
    borrow::Cow,
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

#[derive(Clone, Debug)]
pub struct Setting {
    /// Dotted, or with `/` separators when a part holds a dot (a VLAN
    /// interface such as `eth0.100`), as sysctl(8) writes it.
    pub key: Cow<'static, str>,
    pub value: &'static str,
    pub why: &'static str,
}

const LB: &[Setting] = &[
    Setting {
        key: Cow::Borrowed("net.core.netdev_max_backlog"),
        value: "250000",
        why: "packets the program passes to the stack (health-check replies, non-VIP traffic) arrive in NIC-rate bursts",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.tcp_max_syn_backlog"),
        value: "65536",
        why: "the control API and metrics listeners must not drop connections during SYN bursts",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.tcp_max_tw_buckets"),
        value: "262144",
        why: "health checks open and close many connections; TIME_WAIT must not overflow",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.ip_local_port_range"),
        value: "10000\t65000",
        why: "health checks to many backends need source ports",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.conf.all.rp_filter"),
        value: "2",
        why: "loose reverse-path filtering: strict mode drops asymmetric (DSR) and tunnelled traffic",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.tcp_tw_recycle"),
        value: "0",
        why: "breaks clients behind NAT; removed in Linux 4.12, reported when absent",
    },
];

const BACKEND: &[Setting] = &[
    Setting {
        key: Cow::Borrowed("net.ipv4.conf.all.arp_ignore"),
        value: "1",
        why: "the VIP sits on lo: answer ARP only for addresses of the asking interface, or backends steal the VIP",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.conf.all.arp_announce"),
        value: "2",
        why: "never use the VIP as the source of ARP requests",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.conf.all.rp_filter"),
        value: "0",
        why: "decapsulated packets arrive for the VIP on an interface that does not route to the client",
    },
    Setting {
        key: Cow::Borrowed("net.ipv4.conf.default.rp_filter"),
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

/// The profile for a host whose traffic arrives on `interface`: a backend
/// also needs that interface's `rp_filter` at 0, because the kernel uses the
/// larger of `all` and the interface's value. (The balancer's loose `all`
/// already wins over any interface value but 0, which is looser still.)
pub fn profile_for(role: Role, interface: Option<&str>) -> Vec<Setting> {
    let mut settings = profile(role).to_vec();
    if let (Role::Backend, Some(dev)) = (role, interface) {
        let key = if dev.contains('.') {
            format!("net/ipv4/conf/{dev}/rp_filter")
        } else {
            format!("net.ipv4.conf.{dev}.rp_filter")
        };
        settings.push(Setting {
            key: Cow::Owned(key),
            value: "0",
            why: "decapsulated packets arrive here; the kernel filters with the larger of `all` and this value",
        });
    }
    settings
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
        if key.contains('/') {
            self.root.join(key)
        } else {
            self.root.join(key.replace('.', "/"))
        }
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
        self.show_settings(profile(role))
    }

    /// [`Sysctls::show`] for any list of settings ([`profile_for`]).
    pub fn show_settings(&self, settings: &[Setting]) -> Vec<Row> {
        settings
            .iter()
            .map(|s| {
                let current = self.read(&s.key);
                Row {
                    key: s.key.to_string(),
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
        self.apply_settings(profile(role), backup)
    }

    /// [`Sysctls::apply`] for any list of settings ([`profile_for`]).
    pub fn apply_settings(&self, settings: &[Setting], backup: &Path) -> Result<Vec<Row>> {
        let mut originals: BTreeMap<String, String> = match std::fs::read_to_string(backup) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("backup {} is corrupt", backup.display()))?,
            Err(_) => BTreeMap::new(),
        };
        for s in settings {
            if let Some(v) = self.read(&s.key) {
                originals.entry(s.key.to_string()).or_insert(v);
            }
        }
        if let Some(dir) = backup.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(backup, serde_json::to_vec_pretty(&originals)?)
            .with_context(|| format!("writing {}", backup.display()))?;
        let mut failed = Vec::new();
        for s in settings {
            if self.read(&s.key).is_some()
                && let Err(e) = self.write(&s.key, s.value)
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
        Ok(self.show_settings(settings))
    }

    /// The profile's keys as they are now (keys this kernel lacks left
    /// out), for putting them back after a failed start.
    pub fn snapshot(&self, role: Role) -> BTreeMap<String, String> {
        self.snapshot_settings(profile(role))
    }

    /// [`Sysctls::snapshot`] for any list of settings ([`profile_for`]).
    pub fn snapshot_settings(&self, settings: &[Setting]) -> BTreeMap<String, String> {
        settings
            .iter()
            .filter_map(|s| self.read(&s.key).map(|v| (s.key.to_string(), v)))
            .collect()
    }

    /// Whether this kernel (still) has `key`: an interface's keys go with
    /// the interface.
    pub fn exists(&self, key: &str) -> bool {
        self.path(key).exists()
    }

    /// Writes every value back; every key is tried, the first error is
    /// returned. Keys this kernel no longer has (an interface renamed or
    /// removed since) are skipped: there is nothing left to put back.
    pub fn write_all(&self, values: &BTreeMap<String, String>) -> Result<()> {
        let mut first = None;
        for (k, v) in values {
            if !self.exists(k) {
                continue;
            }
            if let Err(e) = self.write(k, v) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes back what `apply` recorded and removes the backup; see
    /// [`Sysctls::restore_report`] (keys that are gone are skipped).
    pub fn restore(&self, backup: &Path) -> Result<BTreeMap<String, String>> {
        let r = self.restore_report(backup)?;
        for key in &r.skipped {
            tracing::warn!(key = %key, "sysctl not restored: this kernel no longer has it (its interface was renamed or removed?)");
        }
        Ok(r.restored)
    }

    /// Writes back what `apply` recorded. A key whose file no longer
    /// exists (its interface was renamed or removed) is skipped and
    /// reported; every other key is written, and the backup is removed
    /// once all of them were. A key that exists but cannot be written is
    /// an error, after the others were written: the backup stays, for
    /// another try.
    pub fn restore_report(&self, backup: &Path) -> Result<Restored> {
        let text = std::fs::read_to_string(backup)
            .with_context(|| format!("no backup at {} (nothing was applied?)", backup.display()))?;
        let originals: BTreeMap<String, String> = serde_json::from_str(&text)
            .with_context(|| format!("backup {} is corrupt", backup.display()))?;
        let mut out = Restored::default();
        let mut failed = Vec::new();
        for (k, v) in originals {
            if !self.exists(&k) {
                out.skipped.push(k);
                continue;
            }
            match self.write(&k, &v) {
                Ok(()) => {
                    out.restored.insert(k, v);
                }
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if !failed.is_empty() {
            bail!(
                "some settings could not be written back (the originals stay in {}): {}",
                backup.display(),
                failed.join("; ")
            );
        }
        std::fs::remove_file(backup).with_context(|| format!("removing {}", backup.display()))?;
        Ok(out)
    }
}

/// What [`Sysctls::restore_report`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Keys written back, with their original values.
    pub restored: BTreeMap<String, String>,
    /// Keys in the backup this kernel no longer has: not restored.
    pub skipped: Vec<String>,
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

    /// The interface's own rp_filter is part of a backend's profile, and an
    /// interface name with a dot (a VLAN) still names one file.
    #[test]
    fn a_backend_profile_covers_its_interface() {
        let dir = std::env::temp_dir().join(format!("lb-sysctl-iface-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let proc = dir.join("proc");
        for key in [
            "net/ipv4/conf/all/arp_ignore",
            "net/ipv4/conf/eth0/rp_filter",
            "net/ipv4/conf/eth0.100/rp_filter",
        ] {
            let p = proc.join(key);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "1\n").unwrap();
        }
        let s = Sysctls::new(&proc);
        assert_eq!(profile_for(Role::Lb, Some("eth0")).len(), LB.len());
        for (dev, file) in [("eth0", "eth0"), ("eth0.100", "eth0.100")] {
            let settings = profile_for(Role::Backend, Some(dev));
            let own = settings.last().unwrap();
            assert_eq!(settings.len(), BACKEND.len() + 1);
            let backup = dir.join(format!("{dev}.json"));
            let rows = s.apply_settings(&settings, &backup).unwrap();
            let row = rows.iter().find(|r| r.key == own.key).unwrap();
            assert!(row.ok, "{row:?}");
            let path = proc.join(format!("net/ipv4/conf/{file}/rp_filter"));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "0");
            s.restore(&backup).unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "1");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An interface renamed or removed since `apply` took its rp_filter
    /// with it: restore writes every other key back, reports that one as
    /// skipped, and removes the backup; a key that exists but cannot be
    /// written keeps the backup for another try.
    #[test]
    fn restore_skips_keys_that_are_gone_and_restores_the_rest() {
        let dir = std::env::temp_dir().join(format!("lb-sysctl-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let proc = dir.join("proc");
        for key in [
            "net/ipv4/conf/all/arp_ignore",
            "net/ipv4/conf/all/arp_announce",
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
            "net/ipv4/conf/eth0/rp_filter",
        ] {
            let p = proc.join(key);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "1\n").unwrap();
        }
        let s = Sysctls::new(&proc);
        let settings = profile_for(Role::Backend, Some("eth0"));
        let backup = dir.join("backup.json");
        s.apply_settings(&settings, &backup).unwrap();
        // eth0 goes away, and with it its directory.
        std::fs::remove_dir_all(proc.join("net/ipv4/conf/eth0")).unwrap();
        let r = s.restore_report(&backup).unwrap();
        assert_eq!(r.skipped, vec!["net.ipv4.conf.eth0.rp_filter".to_owned()]);
        assert_eq!(r.restored.len(), 4, "{r:?}");
        for key in [
            "net/ipv4/conf/all/arp_ignore",
            "net/ipv4/conf/all/arp_announce",
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
        ] {
            assert_eq!(
                std::fs::read_to_string(proc.join(key)).unwrap(),
                "1",
                "{key}"
            );
        }
        assert!(!backup.exists(), "the backup goes once the rest is back");
        assert!(
            !proc.join("net/ipv4/conf/eth0").exists(),
            "nothing is created for a key that is gone"
        );
        // write_all (a failed start's undo) skips it the same way.
        let mut values = BTreeMap::new();
        values.insert("net.ipv4.conf.eth0.rp_filter".to_owned(), "1".to_owned());
        values.insert("net.ipv4.conf.all.rp_filter".to_owned(), "2".to_owned());
        s.write_all(&values).unwrap();
        assert_eq!(
            std::fs::read_to_string(proc.join("net/ipv4/conf/all/rp_filter")).unwrap(),
            "2"
        );
        assert!(!proc.join("net/ipv4/conf/eth0").exists());
        // A key that is there but cannot be written: the others are still
        // written, the error names it, the backup stays.
        s.apply_settings(&settings[..4], &backup).unwrap();
        let blocked = proc.join("net/ipv4/conf/all/arp_announce");
        std::fs::remove_file(&blocked).unwrap();
        std::fs::create_dir(&blocked).unwrap();
        let e = format!("{:#}", s.restore_report(&backup).unwrap_err());
        assert!(e.contains("arp_announce") && e.contains("stay in"), "{e}");
        assert!(backup.exists());
        assert_eq!(
            std::fs::read_to_string(proc.join("net/ipv4/conf/all/arp_ignore")).unwrap(),
            "1"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
