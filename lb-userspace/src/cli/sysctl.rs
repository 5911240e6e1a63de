//! `lbctl sysctl`: works on this host's network namespace directly, so it
//! needs no lbd (it is run before lbd starts, and on backends).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{CliError, render, unexpected};
use crate::sysctl::{Role, Sysctls, profile_for};

/// Where `apply` records the originals unless told otherwise.
pub fn default_backup(role: Role) -> PathBuf {
    PathBuf::from(match role {
        Role::Lb => "/var/lib/lb/sysctl-lb.backup.json",
        Role::Backend => "/var/lib/lb/sysctl-backend.backup.json",
    })
}

/// `restore --json`.
#[derive(Serialize)]
struct Restored<'a> {
    restored: &'a BTreeMap<String, String>,
}

pub struct Sysctl {
    sysctls: Sysctls,
    json: bool,
}

impl Sysctl {
    /// This host's settings (`/proc/sys`).
    pub fn host(json: bool) -> Self {
        Self::at(Sysctls::new("/proc/sys"), json)
    }

    pub fn at(sysctls: Sysctls, json: bool) -> Self {
        Sysctl { sysctls, json }
    }

    /// `interface`: the one traffic arrives on, whose own keys count too
    /// (a backend's `rp_filter`).
    pub fn show(&self, role: Role, interface: Option<&str>) -> Result<(), CliError> {
        let settings = profile_for(role, check_interface(interface)?);
        self.print_rows(&self.sysctls.show_settings(&settings))
    }

    pub fn apply(
        &self,
        role: Role,
        interface: Option<&str>,
        backup: Option<&Path>,
    ) -> Result<(), CliError> {
        let settings = profile_for(role, check_interface(interface)?);
        let backup = backup.map_or_else(|| default_backup(role), Path::to_owned);
        let rows = self.sysctls.apply_settings(&settings, &backup)?;
        self.print_rows(&rows)
    }

    pub fn restore(&self, role: Role, backup: Option<&Path>) -> Result<(), CliError> {
        let backup = backup.map_or_else(|| default_backup(role), Path::to_owned);
        let restored = self.sysctls.restore(&backup)?;
        if self.json {
            let out = serde_json::to_string(&Restored {
                restored: &restored,
            })
            .map_err(unexpected)?;
            println!("{out}");
        } else {
            print!("{}", render::sysctl_restored(&restored));
        }
        Ok(())
    }

    fn print_rows(&self, rows: &[crate::sysctl::Row]) -> Result<(), CliError> {
        if self.json {
            println!("{}", serde_json::to_string(rows).map_err(unexpected)?);
        } else {
            print!("{}", render::sysctl_rows(rows));
        }
        Ok(())
    }
}

/// An interface name, which becomes part of a path under /proc/sys.
fn check_interface(interface: Option<&str>) -> Result<Option<&str>, CliError> {
    match interface {
        Some(i)
            if i.is_empty()
                || i.len() > 15
                || i.contains('/')
                || i.contains(char::is_whitespace)
                || i == "."
                || i == ".." =>
        {
            Err(CliError::Usage(format!(
                "--interface {i:?}: expected an interface name of 1 to 15 characters"
            )))
        }
        other => Ok(other),
    }
}
