//! What the XDP data plane and the controller must agree on, written once.
//!
//! Everything here is `no_std` and free of kernel specifics so that it runs in
//! host unit tests unchanged; the eBPF crate only supplies packet access
//! ([`packet::PacketBytes`]) and map glue.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

#[cfg(feature = "bench")]
pub mod benchframe;
pub mod conntrack;
pub mod csum;
pub mod decap;
pub mod encap;
pub mod flowcache;
pub mod hash;
pub mod icmp;
pub mod layout;
pub mod maglev;
pub mod manifest;
pub mod maps;
pub mod packet;
pub mod parse;
pub mod policy;
pub mod ring;
pub mod stats;
#[cfg(any(test, feature = "testkit"))]
pub mod testframe;
pub mod vipfilter;
pub mod viptable;
pub mod wire;
