//! Writing desired state into the data plane's maps.
//!
//! Rings have two generations per VIP: a new table is written into the idle
//! generation, then one VIP-table flip points the VIP at it, so the data
//! plane never sees a half-written ring, and the old generation stays
//! readable for the second chance. The VIP table itself is double-buffered
//! the same way (see `lb_common::viptable`).

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use lb_common::{
    maps::{BackendInfo, LbConfig, VipInfo, VipKey},
    ring::{RING_CHUNK, RingChunk, chunks_per_vip, ring_pos},
    viptable::{self, VipSlot},
};

fn array<'a, T: aya::Pod>(ebpf: &'a mut Ebpf, name: &str) -> Result<Array<&'a mut MapData, T>> {
    Array::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("map {name} missing"))?,
    )
    .with_context(|| format!("map {name} has an unexpected type"))
}

/// Slots per generation of `VIP_TABLE`, from the map's size.
pub fn vip_slots(ebpf: &mut Ebpf) -> Result<u32> {
    Ok(array::<VipSlot>(ebpf, "VIP_TABLE")?.len() / 2)
}

/// `VIP_TABLE_GEN` counts table changes; its low bit is the live generation.
fn vip_epoch(ebpf: &mut Ebpf) -> Result<u32> {
    array::<u32>(ebpf, "VIP_TABLE_GEN")?
        .get(&0, 0)
        .context("reading VIP_TABLE_GEN")
}

fn live_generation(ebpf: &mut Ebpf) -> Result<u32> {
    Ok(vip_epoch(ebpf)? & 1)
}

/// The live generation of the VIP table.
fn live_table(ebpf: &mut Ebpf) -> Result<Vec<VipSlot>> {
    let slots = vip_slots(ebpf)?;
    let base = live_generation(ebpf)? * slots;
    let table = array::<VipSlot>(ebpf, "VIP_TABLE")?;
    (0..slots)
        .map(|i| table.get(&(base + i), 0).context("reading VIP_TABLE"))
        .collect()
}

/// Every configured VIP.
pub fn list_vips(ebpf: &mut Ebpf) -> Result<Vec<(VipKey, VipInfo)>> {
    Ok(live_table(ebpf)?
        .into_iter()
        .filter(|s| s.key.family != 0)
        .map(|s| (s.key, s.info))
        .collect())
}

/// Replaces the VIP set: the idle generation is written whole, then one
/// aligned u32 store makes it live.
fn write_vips(ebpf: &mut Ebpf, vips: &[(VipKey, VipInfo)]) -> Result<()> {
    let slots = vip_slots(ebpf)?;
    let built = viptable::build(vips, slots).context("building the VIP table")?;
    let next_epoch = vip_epoch(ebpf)?.wrapping_add(1);
    let idle = next_epoch & 1;
    {
        let mut table = array::<VipSlot>(ebpf, "VIP_TABLE")?;
        for (i, slot) in built.iter().enumerate() {
            table
                .set(idle * slots + i as u32, slot, 0)
                .context("writing VIP_TABLE")?;
        }
    }
    // Also retires every flow-cache entry made under the old table.
    array::<u32>(ebpf, "VIP_TABLE_GEN")?
        .set(0, next_epoch, 0)
        .context("flipping VIP_TABLE_GEN")
}

/// Writes the configuration. `vip_slots`, `flow_cache_slots` and the
/// connection table's bucket mask always come from the maps themselves; the
/// table's seed is the one
/// already in `CONFIG` (an adopted table's entries depend on it), or a fresh
/// random one on first start.
pub fn set_config(ebpf: &mut Ebpf, cfg: &LbConfig) -> Result<()> {
    let slots = array::<lb_common::conntrack::ConnSlot>(ebpf, "CONNTRACK")?.len();
    let ways = lb_common::conntrack::WAYS;
    if !slots.is_power_of_two() || slots < ways {
        bail!("CONNTRACK has {slots} slots: not a power of two of at least {ways}");
    }
    let heads = array::<lb_common::conntrack::BucketHead>(ebpf, "CONNTRACK_HEADS")?.len();
    if heads != slots / ways {
        bail!("CONNTRACK_HEADS has {heads} heads for {slots} slots, not one per {ways}");
    }
    let current = array::<LbConfig>(ebpf, "CONFIG")?
        .get(&0, 0)
        .context("reading CONFIG")?;
    let conntrack_seed = match current.conntrack_seed {
        0 => random_seed()?,
        seed => seed,
    };
    let flow_cache_slots = aya::maps::PerCpuArray::<_, lb_common::flowcache::CachedFlow>::try_from(
        ebpf.map("FLOW_CACHE").context("map FLOW_CACHE missing")?,
    )
    .context("map FLOW_CACHE has an unexpected type")?
    .len();
    let cfg = LbConfig {
        vip_slots: vip_slots(ebpf)?,
        flow_cache_slots,
        conntrack_bucket_mask: slots / ways - 1,
        conntrack_seed,
        ..*cfg
    };
    array::<LbConfig>(ebpf, "CONFIG")?
        .set(0, cfg, 0)
        .context("writing CONFIG")
}

fn random_seed() -> Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the connection table's seed")?;
    // 0 means "not yet drawn".
    Ok(u64::from_ne_bytes(b).max(1))
}

/// Where `key` is in the connection table, as the data plane would find it:
/// the index and contents of its slot, if it has a complete entry.
pub fn conntrack_slot(
    ebpf: &Ebpf,
    key: &lb_common::maps::FlowKey,
) -> Result<Option<(u32, lb_common::conntrack::ConnSlot)>> {
    use std::collections::BTreeMap;

    use lb_common::conntrack::{BucketHead, ConnSlot, Table, WAYS, find, probe};

    /// The two candidate buckets, read at their own offsets.
    #[derive(Default)]
    struct Buckets {
        heads: BTreeMap<u32, BucketHead>,
        slots: BTreeMap<u32, ConnSlot>,
    }
    impl Table for Buckets {
        fn head(&self, bucket: u32) -> Option<&BucketHead> {
            self.heads.get(&bucket)
        }
        fn head_mut(&mut self, bucket: u32) -> Option<&mut BucketHead> {
            self.heads.get_mut(&bucket)
        }
        fn slot(&self, idx: u32) -> Option<&ConnSlot> {
            self.slots.get(&idx)
        }
        fn slot_mut(&mut self, idx: u32) -> Option<&mut ConnSlot> {
            self.slots.get_mut(&idx)
        }
    }

    let map = |name: &str| {
        ebpf.map(name)
            .with_context(|| format!("map {name} missing"))
    };
    let cfg = Array::<_, LbConfig>::try_from(map("CONFIG")?)
        .context("map CONFIG has an unexpected type")?
        .get(&0, 0)
        .context("reading CONFIG")?;
    let heads = Array::<_, BucketHead>::try_from(map("CONNTRACK_HEADS")?)
        .context("map CONNTRACK_HEADS has an unexpected type")?;
    let slots = Array::<_, ConnSlot>::try_from(map("CONNTRACK")?)
        .context("map CONNTRACK has an unexpected type")?;
    let p = probe(key, cfg.conntrack_seed, cfg.conntrack_bucket_mask);
    let mut table = Buckets::default();
    for bucket in p.buckets {
        let head = heads
            .get(&bucket, 0)
            .with_context(|| format!("reading CONNTRACK_HEADS[{bucket}]"))?;
        table.heads.insert(bucket, head);
        for idx in bucket * WAYS..(bucket + 1) * WAYS {
            let slot = slots
                .get(&idx, 0)
                .with_context(|| format!("reading CONNTRACK[{idx}]"))?;
            table.slots.insert(idx, slot);
        }
    }
    Ok(find(&table, key, &p).and_then(|f| Some((f.idx, *table.slot(f.idx)?))))
}

/// The backend of `key`'s connection-table entry, if it has one.
pub fn conntrack_backend(ebpf: &Ebpf, key: &lb_common::maps::FlowKey) -> Result<Option<u32>> {
    Ok(conntrack_slot(ebpf, key)?.map(|(_, s)| s.backend_id))
}

pub fn set_backend(ebpf: &mut Ebpf, id: u32, b: &BackendInfo) -> Result<()> {
    if id == 0 {
        bail!("backend id 0 is reserved for 'no backend'");
    }
    array::<BackendInfo>(ebpf, "BACKENDS")?
        .set(id, b, 0)
        .with_context(|| format!("writing BACKENDS[{id}]"))
}

pub fn backend(ebpf: &mut Ebpf, id: u32) -> Result<BackendInfo> {
    array::<BackendInfo>(ebpf, "BACKENDS")?
        .get(&id, 0)
        .with_context(|| format!("reading BACKENDS[{id}]"))
}

/// Adds or replaces one VIP.
pub fn set_vip(ebpf: &mut Ebpf, key: &VipKey, info: &VipInfo) -> Result<()> {
    let mut vips = list_vips(ebpf)?;
    vips.retain(|(k, _)| k != key);
    vips.push((*key, *info));
    write_vips(ebpf, &vips)
}

pub fn remove_vip(ebpf: &mut Ebpf, key: &VipKey) -> Result<()> {
    let mut vips = list_vips(ebpf)?;
    let before = vips.len();
    vips.retain(|(k, _)| k != key);
    if vips.len() == before {
        bail!("no such VIP");
    }
    write_vips(ebpf, &vips)
}

pub fn get_vip(ebpf: &mut Ebpf, key: &VipKey) -> Result<Option<VipInfo>> {
    Ok(viptable::lookup(&live_table(ebpf)?, key))
}

/// `vip_id`'s two generations, checked against the map: ids past the map
/// would wrap into another VIP's ring.
fn check_ring_bounds(rings_len: u32, vip_id: u32, m: u32) -> Result<()> {
    let end = (vip_id as u64 + 1) * chunks_per_vip(m) as u64;
    if m == 0 || end > rings_len as u64 {
        bail!(
            "RINGS holds {rings_len} elements, too few for vip id {vip_id} with ring size {m} \
             (raise max_vips, or use a lower vip id)"
        );
    }
    Ok(())
}

/// The data plane's configuration as written.
pub fn config(ebpf: &mut Ebpf) -> Result<LbConfig> {
    array::<LbConfig>(ebpf, "CONFIG")?
        .get(&0, 0)
        .context("reading CONFIG")
}

/// The ring size the data plane was configured with.
pub fn configured_ring_size(ebpf: &mut Ebpf) -> Result<u32> {
    let cfg = array::<LbConfig>(ebpf, "CONFIG")?
        .get(&0, 0)
        .context("reading CONFIG")?;
    if cfg.ring_size == 0 {
        bail!("CONFIG is not written yet: set the configuration before rings");
    }
    Ok(cfg.ring_size)
}

/// Writes `table` (length = ring size) into generation `generation` of `vip_id`.
pub fn write_ring(ebpf: &mut Ebpf, vip_id: u32, generation: u8, table: &[u32]) -> Result<()> {
    let m = configured_ring_size(ebpf)?;
    if table.len() != m as usize {
        bail!(
            "ring table has {} slots, the data plane's ring size is {m}",
            table.len()
        );
    }
    let mut rings = array::<RingChunk>(ebpf, "RINGS")?;
    check_ring_bounds(rings.len(), vip_id, m)?;
    for (n, ids) in table.chunks(RING_CHUNK as usize).enumerate() {
        let slot = n as u32 * RING_CHUNK;
        let mut chunk = RingChunk::default();
        chunk.ids[..ids.len()].copy_from_slice(ids);
        let (element, _) = ring_pos(vip_id, generation, m, slot);
        rings
            .set(element, chunk, 0)
            .with_context(|| format!("writing RINGS slots {slot}.. of vip id {vip_id}"))?;
    }
    Ok(())
}

/// Adds (or re-adds) a VIP: generation 0 gets `table`, generation 1 is
/// cleared so a reused vip id cannot second-chance flows to a previous
/// owner's backends, and only then does the VIP appear in `VIPS`.
pub fn install_vip(
    ebpf: &mut Ebpf,
    key: &VipKey,
    vip_id: u32,
    mode: u8,
    table: &[u32],
) -> Result<()> {
    write_ring(ebpf, vip_id, 1, &vec![0; table.len()])?;
    write_ring(ebpf, vip_id, 0, table)?;
    set_vip(ebpf, key, &VipInfo::new(vip_id, mode))
}

/// `CLOCK_MONOTONIC` in ns, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes `table` into the idle generation and flips the VIP to it; the old
/// table then serves second chances for `second_chance` (see DESIGN §3).
/// Returns the generation now live.
///
/// Order matters: the idle generation is what second chance reads, so it is
/// switched off before that generation is rewritten, and the flip (one map
/// update) turns it back on over the table just replaced.
pub fn publish_ring(
    ebpf: &mut Ebpf,
    key: &VipKey,
    table: &[u32],
    second_chance: std::time::Duration,
) -> Result<u8> {
    let mut info =
        get_vip(ebpf, key)?.context("publishing a ring for a VIP that is not configured")?;
    info.second_chance_until_ns = 0;
    set_vip(ebpf, key, &info)?;
    let idle = info.ring_gen ^ 1;
    write_ring(ebpf, info.vip_id, idle, table)?;
    info.ring_gen = idle;
    info.second_chance_until_ns = monotonic_ns().saturating_add(second_chance.as_nanos() as u64);
    set_vip(ebpf, key, &info)?;
    Ok(idle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_bounds_catch_wrapping_ids() {
        let m = 65537;
        let len = 64 * chunks_per_vip(m);
        assert!(check_ring_bounds(len, 63, m).is_ok());
        assert!(check_ring_bounds(len, 64, m).is_err());
        // An id whose elements wrap a u32 to a small index must still fail.
        assert!(check_ring_bounds(len, u32::MAX / chunks_per_vip(m) + 1, m).is_err());
        assert!(check_ring_bounds(len, 0, 0).is_err());
    }
}
