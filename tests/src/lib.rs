//! End-to-end test harness for the load balancer (docs/ARCHITECTURE.md, Testing).
//!
//! - [`Topology`]: client, LB and backend network namespaces on one bridge,
//!   torn down on drop, even when a test panics.
//! - [`in_netns`], [`Topology::exec`], [`Topology::spawn`]: running code,
//!   commands and daemons inside those namespaces.
//! - `lb-testserver` ([`testserver`]) and its launcher: real HTTP and UDP
//!   servers in the backends that answer with their own name.
//! - [`client`]: bounded HTTP and UDP clients to drive traffic.
//! - [`lbd`]: the real controller's configuration preamble, start and stop.
//! - [`backend_role`]: `lbd` in the backend role on the backends, which
//!   [`fabric::prepare`] starts on every backend.
//!
//! Everything here needs root except the pure helpers and the test server.

pub mod addressing;
pub mod backend_role;
pub mod bird;
pub mod client;
pub mod cmd;
pub mod demo;
pub mod etcd;
pub mod fabric;
pub mod fleet;
pub mod flood;
pub mod http;
pub mod launcher;
pub mod lbd;
pub mod netns;
pub mod process;
pub mod scrape;
pub mod testserver;
pub mod topology;

pub use bird::Bird;
pub use client::{HttpConn, Response, http_get, split_echo, udp_echo, udp_echo_from};
pub use launcher::{lbctl, lbctl_output, lbctl_path, lbd_path, testserver_path};
pub use netns::{NS_PREFIX, cleanup_stale, in_netns};
pub use process::{Spawned, spawn_in_netns};
pub use topology::{Host, Topology};
