//! The data-plane helpers around the LB that tests and the demo need.

use crate::{Topology, in_netns};
use anyhow::Result;
use aya::Ebpf;
use lb_userspace::dataplane::{self, AttachMode, MapSizes};

/// Programs that must stay loaded while a test runs.
pub struct Fabric {
    _decaps: Vec<Ebpf>,
    _peer: Option<Ebpf>,
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
/// mode the recipe that works on veth (XDP on the LB's bridge port, no TX
/// checksum offload on the client).
pub fn prepare(t: &Topology, mode: AttachMode) -> Result<Fabric> {
    let peer = if mode == AttachMode::Native {
        t.disable_tx_checksum_offload(t.client().ns())?;
        let name = t.lb().peer_ifname().to_owned();
        Some(in_netns(t.fabric_ns(), move || -> Result<Ebpf> {
            let mut e = dataplane::load_balancer_with(&small())?;
            dataplane::attach_program(&mut e, dataplane::PASS_PROGRAM, &name, AttachMode::Native)?;
            Ok(e)
        })??)
    } else {
        None
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
        _peer: peer,
    })
}
