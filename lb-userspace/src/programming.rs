//! Writing desired state into the data plane's maps.
//!
//! Rings have two generations per VIP: a new table is written into the idle
//! generation, then one `VIPS` update flips the VIP to it, so the data plane
//! never sees a half-written ring, and the old generation stays readable for
//! the second chance.

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use lb_common::{
    maps::{BackendInfo, LbConfig, VipInfo, VipKey},
    ring::ring_index,
};

fn array<'a, T: aya::Pod>(ebpf: &'a mut Ebpf, name: &str) -> Result<Array<&'a mut MapData, T>> {
    Array::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("map {name} missing"))?,
    )
    .with_context(|| format!("map {name} has an unexpected type"))
}

fn vips(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, VipKey, VipInfo>> {
    HashMap::try_from(ebpf.map_mut("VIPS").context("map VIPS missing")?)
        .context("map VIPS has an unexpected type")
}

pub fn set_config(ebpf: &mut Ebpf, cfg: &LbConfig) -> Result<()> {
    array::<LbConfig>(ebpf, "CONFIG")?
        .set(0, cfg, 0)
        .context("writing CONFIG")
}

pub fn set_backend(ebpf: &mut Ebpf, id: u32, b: &BackendInfo) -> Result<()> {
    if id == 0 {
        bail!("backend id 0 is reserved for 'no backend'");
    }
    array::<BackendInfo>(ebpf, "BACKENDS")?
        .set(id, b, 0)
        .with_context(|| format!("writing BACKENDS[{id}]"))
}

pub fn set_vip(ebpf: &mut Ebpf, key: &VipKey, info: &VipInfo) -> Result<()> {
    vips(ebpf)?
        .insert(key, info, 0)
        .with_context(|| format!("writing VIPS entry for vip id {}", info.vip_id))
}

pub fn remove_vip(ebpf: &mut Ebpf, key: &VipKey) -> Result<()> {
    vips(ebpf)?.remove(key).context("removing VIPS entry")
}

pub fn get_vip(ebpf: &mut Ebpf, key: &VipKey) -> Result<Option<VipInfo>> {
    match vips(ebpf)?.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading VIPS"),
    }
}

/// Writes `table` (length = ring size) into generation `generation` of `vip_id`.
pub fn write_ring(ebpf: &mut Ebpf, vip_id: u32, generation: u8, table: &[u32]) -> Result<()> {
    let m = u32::try_from(table.len()).context("ring too large")?;
    let mut rings = array::<u32>(ebpf, "RINGS")?;
    if ring_index(vip_id, generation, m, m - 1) >= rings.len() {
        bail!(
            "RINGS holds {} slots, too few for vip id {vip_id} with ring size {m}",
            rings.len()
        );
    }
    for (slot, id) in table.iter().enumerate() {
        rings
            .set(ring_index(vip_id, generation, m, slot as u32), id, 0)
            .with_context(|| format!("writing RINGS slot {slot} of vip id {vip_id}"))?;
    }
    Ok(())
}

/// Writes `table` into the idle generation and flips the VIP to it.
/// Returns the generation now live.
pub fn publish_ring(ebpf: &mut Ebpf, key: &VipKey, table: &[u32]) -> Result<u8> {
    let mut info =
        get_vip(ebpf, key)?.context("publishing a ring for a VIP that is not in VIPS")?;
    let idle = info.ring_gen ^ 1;
    write_ring(ebpf, info.vip_id, idle, table)?;
    info.ring_gen = idle;
    set_vip(ebpf, key, &info)?;
    Ok(idle)
}
