//! Controller library: everything `lbd` and `lbctl` do, behind thin binaries.

pub mod config;
pub mod dataplane;
pub mod programming;
pub mod stats;
