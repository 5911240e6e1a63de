//! The data-plane helpers around the LB that tests and the demo need.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use aya::Ebpf;
use lb_userspace::dataplane::{self, AttachMode, MapSizes};

use crate::{
    Topology,
    backend_role::{BackendLbd, BackendVips, Options},
    in_netns,
};

/// What must keep running while a test runs: `lbd` in the backend role on
/// every backend, and the native-mode helpers on the bridge. Dropping it
/// stops the backends' lbds, which undo what they did (`on_exit =
/// "detach"`), and hands VIP changes back to the topology.
pub struct Fabric {
    backends: Vec<BackendLbd>,
    _peers: Vec<Ebpf>,
    vips: Arc<Mutex<BackendVips>>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.vips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .served_by
            .clear();
    }
}

impl Fabric {
    /// The backends' lbds, in the topology's order.
    pub fn backends(&self) -> &[BackendLbd] {
        &self.backends
    }
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

/// Makes the topology carry balanced traffic in `mode`: `lbd` in the
/// backend role on every backend (decapsulating with XDP in `mode`, the
/// topology's VIPs on `lo`, the DSR sysctls; our test kernels have no ipip
/// module), ready before this returns, and for native mode the recipe that
/// works on veth (XDP on every LB's bridge port, no TX checksum offload on
/// the client). A fleet's router forwards without touching L4 checksums, so
/// the client stays the one place to turn that off.
///
/// VIPs given to [`Topology::add_vip_on_backends`] before or after this go
/// to the backends' lbds (the file rewritten, then a reload).
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
    let registry = t.backend_vips();
    let mut vips = registry.lock().unwrap_or_else(|e| e.into_inner());
    let options = Options {
        xdp_mode: mode.to_string(),
        ..Options::default()
    };
    // Started together, then waited for: they load in parallel.
    let mut backends = t
        .backends()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let name = format!("{}b{i}", t.instance_name());
            let files = BackendLbd::files(t, b, &name, options.clone());
            BackendLbd::spawn(t, files, &vips.vips)
        })
        .collect::<Result<Vec<_>>>()?;
    for b in &mut backends {
        b.wait_ready()?;
    }
    vips.served_by = backends.iter().map(|b| b.files.clone()).collect();
    drop(vips);
    Ok(Fabric {
        backends,
        _peers: peers,
        vips: registry,
    })
}

/// A veth delivers XDP_TX frames only to a peer in XDP mode.
fn pass_on_bridge_port(t: &Topology, port: &str) -> Result<Ebpf> {
    let name = port.to_owned();
    in_netns(t.fabric_ns(), move || -> Result<Ebpf> {
        let mut e = dataplane::load_balancer_with(&small())?;
        dataplane::attach_program(&mut e, dataplane::PASS_PROGRAM, &name, AttachMode::Native)
            .context("the pass program on a bridge port")?;
        Ok(e)
    })?
}
