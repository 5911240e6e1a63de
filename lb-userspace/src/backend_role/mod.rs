//! `lbd` in the backend role (`role = "backend"` in its file): on a host
//! behind the balancer, it attaches the object's `decap` XDP program to the
//! interface the tunnelled traffic arrives on, tells it which VIPs to
//! decapsulate (`DECAP_VIPS`) and on which UDP port GUE comes
//! (`DECAP_CONFIG`), puts those VIPs on `lo`, applies the direct-server-
//! return sysctls, has the kernel resolve the second hops the program could
//! not reach (`DECAP_NEIGH`) when `decap.second_hops` allows them (see
//! `hops.rs` for the rules), and serves `lbctl` and `/metrics`.
//!
//! Restarts lose nothing: the program, its maps and its link are pinned and
//! adopted like the balancer's. A teardown removes only what lbd added
//! (recorded in the state file) and puts the sysctls back.

pub mod config;
mod daemon;
pub mod dataplane;
mod hops;
pub mod host;
pub mod metrics;
mod reload;
pub mod state;
pub mod status;
pub mod teardown;

pub use config::{BackendConfig, Role, role_of};
pub use daemon::run;
