//! Controller library: everything `lbd` and `lbctl` do, behind thin binaries.

pub mod announce;
pub mod api;
pub mod backend_role;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod debuglog;
pub mod diff;
pub mod fleet;
pub mod graphite;
pub mod health;
pub mod instance_lock;
mod mapped;
pub mod maps;
pub mod membership;
pub mod metrics;
pub mod neigh;
pub mod pinning;
pub mod programming;
pub mod snapshot;
pub mod stats;
pub mod sysctl;
pub mod top;
