//! The data-plane helpers around the LB that tests and the demo need.

use crate::{Topology, in_netns};
use anyhow::Result;
use aya::Ebpf;
use lb_userspace::dataplane::{self, AttachMode, MapSizes};

/// Programs that must stay loaded while a test runs.
pub struct Fabric {
    _decaps: Vec<Ebpf>,
    _peers: Vec<Ebpf>,
}

/// Tiny maps: these loads only need the object's helper programs.
fn small() -> MapSizes {
    MapSizes {
        max_vips: 1,
        max_backends: 2,
        ring_size: 7,
        conntrack_entries: 16,
        flow_cache_slots: 1,
    }
}

/// Makes the topology carry balanced traffic in `mode`: the `decap` program
/// on every backend (our test kernels have no ipip module), and for native
/// mode the recipe that works on veth (XDP on every LB's bridge port, no TX
/// checksum offload on the client). A fleet's router forwards without
/// touching L4 checksums, so the client stays the one place to turn that off.
pub fn prepare(t: &Topology, mode: AttachMode) -> Result<Fabric> {
    let peers = if mode == AttachMode::Native {
        t.disable_tx_checksum_offload(t.client().ns())?;
        t.lbs()
            .iter()
            .map(|lb| pass_on_bridge_port(t, lb.peer_ifname()))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let decaps = t
        .backends()
        .iter()
        .map(|b| {
            let dev = b.ifname().to_owned();
            in_netns(b.ns(), move || -> Result<Ebpf> {
                let mut e = dataplane::load_balancer_with(&small())?;
                dataplane::attach_program(&mut e, dataplane::DECAP_PROGRAM, &dev, mode)?;
                Ok(e)
            })?
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Fabric {
        _decaps: decaps,
        _peers: peers,
    })
}

/// A veth delivers XDP_TX frames only to a peer in XDP mode.
fn pass_on_bridge_port(t: &Topology, port: &str) -> Result<Ebpf> {
    let name = port.to_owned();
    in_netns(t.fabric_ns(), move || -> Result<Ebpf> {
        let mut e = dataplane::load_balancer_with(&small())?;
        dataplane::attach_program(&mut e, dataplane::PASS_PROGRAM, &name, AttachMode::Native)?;
        Ok(e)
    })?
}
