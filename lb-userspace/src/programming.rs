//! Writing desired state into the data plane's maps.
//!
//! Rings have two generations per VIP: a new table is written into the idle
//! generation, then one store to the VIP's `RING_STATE` word points it
//! there, so the data plane never sees a half-written ring, and the old
//! generation stays readable for the second chance. The VIP table itself is
//! double-buffered (see `lb_common::viptable`): its idle generation is
//! written whole, then `VIP_TABLE_GEN` flips.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use aya::{Ebpf, maps::MapData};
use lb_common::{
    maps::{BackendInfo, LbConfig, Mode, RingState, VipInfo, VipKey},
    ring::{RingChunk, chunks_per_ring, chunks_per_vip, ring_pos},
    vipfilter, viptable,
};

use crate::mapped::MappedValues;
use crate::maps::{
    BACKENDS, CONFIG, CONNTRACK, CONNTRACK_HEADS, FLOW_CACHE, RING_STATE, RINGS, VIP_FILTER,
    VIP_TABLE, VIP_TABLE_GEN,
};

/// Slots per generation of `VIP_TABLE`, from the map's size.
pub fn vip_slots(ebpf: &mut Ebpf) -> Result<u32> {
    Ok(VIP_TABLE.array(ebpf)?.len() / 2)
}

/// `VIP_TABLE_GEN` counts table changes; its low bit is the live generation.
fn vip_epoch(ebpf: &mut Ebpf) -> Result<u32> {
    VIP_TABLE_GEN
        .array(ebpf)?
        .get(&0, 0)
        .context("reading VIP_TABLE_GEN")
}

fn live_generation(ebpf: &mut Ebpf) -> Result<u32> {
    Ok(vip_epoch(ebpf)? & 1)
}

/// The live generation of the VIP table.
fn live_table(ebpf: &mut Ebpf) -> Result<Vec<viptable::VipSlot>> {
    let slots = vip_slots(ebpf)?;
    let base = live_generation(ebpf)? * slots;
    let table = VIP_TABLE.array(ebpf)?;
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
    // The filter admits the new set before the table names it, and drops
    // the old set only once the table no longer does (see
    // `lb_common::vipfilter`).
    // Every word changes in one atomic operation: the data plane reads
    // them meanwhile.
    let wanted = vipfilter::build(vips.iter().map(|(k, _)| &k.addr));
    let filter = mapped_filter(ebpf)?;
    let words = filter.u64s()?;
    for (word, &want) in words.iter().zip(&wanted) {
        if want != 0 {
            word.fetch_or(want, Ordering::Release);
        }
    }
    {
        let mut table = VIP_TABLE.array_mut(ebpf)?;
        for (i, slot) in built.iter().enumerate() {
            table
                .set(idle * slots + i as u32, slot, 0)
                .context("writing VIP_TABLE")?;
        }
    }
    // Also retires every flow-cache entry made under the old table.
    VIP_TABLE_GEN
        .array_mut(ebpf)?
        .set(0, next_epoch, 0)
        .context("flipping VIP_TABLE_GEN")?;
    for (word, &want) in words.iter().zip(&wanted) {
        if word.load(Ordering::Relaxed) != want {
            word.store(want, Ordering::Release);
        }
    }
    Ok(())
}

/// The filter's words, mapped (`VIP_FILTER` is `BPF_F_MMAPABLE`): reading
/// all 1,024 took as many system calls on every VIP-table change.
fn mapped_filter(ebpf: &Ebpf) -> Result<MappedValues> {
    MappedValues::map(
        VIP_FILTER.data(ebpf)?,
        0,
        vipfilter::FILTER_WORDS as usize * std::mem::size_of::<u64>(),
        true,
        "VIP_FILTER",
    )
}

/// Writes the configuration. `vip_slots`, `flow_cache_slots` and the
/// connection table's bucket mask always come from the maps themselves; the
/// table's seed is the one
/// already in `CONFIG` (an adopted table's entries depend on it), or a fresh
/// random one on first start.
pub fn set_config(ebpf: &mut Ebpf, cfg: &LbConfig) -> Result<()> {
    let slots = CONNTRACK.array(ebpf)?.len();
    let ways = lb_common::conntrack::WAYS;
    if !slots.is_power_of_two() || slots < ways {
        bail!("CONNTRACK has {slots} slots: not a power of two of at least {ways}");
    }
    let heads = CONNTRACK_HEADS.array(ebpf)?.len();
    if heads != slots / ways {
        bail!("CONNTRACK_HEADS has {heads} heads for {slots} slots, not one per {ways}");
    }
    let current = config(ebpf)?;
    let conntrack_seed = match current.conntrack_seed {
        0 => random_seed()?,
        seed => seed,
    };
    let flow_cache_slots = FLOW_CACHE.per_cpu(ebpf)?.len();
    let cfg = LbConfig {
        vip_slots: vip_slots(ebpf)?,
        flow_cache_slots,
        conntrack_bucket_mask: slots / ways - 1,
        conntrack_seed,
        ..*cfg
    };
    CONFIG
        .array_mut(ebpf)?
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

pub fn set_backend(ebpf: &mut Ebpf, id: u32, b: &BackendInfo) -> Result<()> {
    if id == 0 {
        bail!("backend id 0 is reserved for 'no backend'");
    }
    BACKENDS
        .array_mut(ebpf)?
        .set(id, b, 0)
        .with_context(|| format!("writing BACKENDS[{id}]"))
}

pub fn backend(ebpf: &mut Ebpf, id: u32) -> Result<BackendInfo> {
    BACKENDS
        .array(ebpf)?
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
pub fn config(ebpf: &Ebpf) -> Result<LbConfig> {
    CONFIG.array(ebpf)?.get(&0, 0).context("reading CONFIG")
}

/// The ring size the data plane was configured with.
pub fn configured_ring_size(ebpf: &mut Ebpf) -> Result<u32> {
    let cfg = config(ebpf)?;
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
    let slots = ring_generation(
        RINGS.data(ebpf)?,
        rings_len(ebpf)?,
        vip_id,
        generation,
        m,
        true,
    )?;
    let words = slots.u32s()?;
    // `publish_ring` first closes the second chance that reads this
    // generation (a release store of `RING_STATE`); a release store does
    // not keep later stores from being seen before it, so this fence does:
    // no CPU sees the generation change while it may still serve from it.
    std::sync::atomic::fence(Ordering::SeqCst);
    // Relaxed stores: the flip that makes a generation live is a release
    // store (`store_ring_state`), which orders these before it.
    for (word, &id) in words.iter().zip(table.iter().chain(std::iter::repeat(&0))) {
        word.store(id, Ordering::Relaxed);
    }
    Ok(())
}

fn rings_len(ebpf: &Ebpf) -> Result<u32> {
    Ok(RINGS.array(ebpf)?.len())
}

/// One generation of one VIP's ring, mapped: its whole elements, so the
/// last one's unused lanes too (they stay 0). One mapping and plain stores
/// instead of a map update per element: 100,003 slots are 6,251 updates.
fn ring_generation(
    rings: &MapData,
    rings_len: u32,
    vip_id: u32,
    generation: u8,
    m: u32,
    writable: bool,
) -> Result<MappedValues> {
    check_ring_bounds(rings_len, vip_id, m)?;
    let (first, _) = ring_pos(vip_id, generation, m, 0);
    let element = std::mem::size_of::<RingChunk>();
    MappedValues::map(
        rings,
        first as usize * element,
        chunks_per_ring(m) as usize * element,
        writable,
        "RINGS",
    )
}

/// Adds (or re-adds) a VIP: generation 0 gets `table`, generation 1 is
/// cleared so a reused vip id cannot second-chance flows to a previous
/// owner's backends, its ring state names generation 0 with no second
/// chance, and only then does the VIP appear in the VIP table.
pub fn install_vip(
    ebpf: &mut Ebpf,
    key: &VipKey,
    vip_id: u32,
    mode: Mode,
    table: &[u32],
) -> Result<()> {
    write_ring(ebpf, vip_id, 1, &vec![0; table.len()])?;
    write_ring(ebpf, vip_id, 0, table)?;
    store_ring_state(ebpf, vip_id, RingState::new(0, 0))?;
    set_vip(ebpf, key, &VipInfo::new(vip_id, mode))
}

/// `CLOCK_MONOTONIC` in ns, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_MONOTONIC_COARSE` in ns, the clock `bpf_ktime_get_coarse_ns`
/// reads.
pub fn monotonic_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; both clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A VIP's ring state as the data plane reads it.
pub fn ring_state(ebpf: &Ebpf, vip_id: u32) -> Result<RingState> {
    RING_STATE
        .array(ebpf)?
        .get(&vip_id, 0)
        .with_context(|| format!("reading RING_STATE[{vip_id}]"))
}

/// Stores VIP `vip_id`'s ring state in one aligned 8-byte store through a
/// shared mapping of `RING_STATE`: a map update copies the value with the
/// kernel's `memcpy`, which a CPU reading it meanwhile could see half done
/// (the new generation with the old deadline, say).
pub fn store_ring_state(ebpf: &Ebpf, vip_id: u32, state: RingState) -> Result<()> {
    let entries = RING_STATE.array(ebpf)?.len();
    if vip_id >= entries {
        bail!("vip id {vip_id} is past RING_STATE's {entries} entries (raise max_vips)");
    }
    // Only the page holding the word is mapped, so a store costs the same
    // whatever `max_vips` is.
    let size = std::mem::size_of::<RingState>();
    let word = MappedValues::map(
        RING_STATE.data(ebpf)?,
        vip_id as usize * size,
        size,
        true,
        "RING_STATE",
    )?;
    // The data plane reads the word concurrently, which an atomic store is
    // for; release, so the ring written before is seen before the flip.
    word.u64s()?[0].store(state.word, Ordering::Release);
    Ok(())
}

/// The table VIP `vip_id` is served by now (its live generation), read
/// from the pinned maps in `dir`: what is live, not what lbd believes.
pub fn live_ring(dir: &std::path::Path, vip_id: u32) -> Result<Vec<u32>> {
    let m = CONFIG
        .pinned(dir)?
        .get(&0, 0)
        .context("reading CONFIG")?
        .ring_size;
    if m == 0 {
        bail!("CONFIG is not written yet");
    }
    let generation = RING_STATE
        .pinned(dir)?
        .get(&vip_id, 0)
        .with_context(|| format!("reading RING_STATE[{vip_id}]"))?
        .live_generation();
    let rings = RINGS.pinned_data(dir)?;
    let len = rings.info().context("RINGS")?.max_entries();
    let slots = ring_generation(&rings, len, vip_id, generation, m, false)?;
    Ok(slots.load_u32s()?.take(m as usize).collect())
}

/// Writes `table` into the idle generation and flips the VIP to it; the old
/// table then serves second chances for `second_chance`. Touches only this
/// VIP's ring and ring state: no other VIP, and no flow cache, notices.
/// Returns the generation now live.
///
/// Order matters: the idle generation is what second chance reads, so it is
/// switched off before that generation is rewritten, and the flip (one
/// store) turns it back on over the table just replaced.
pub fn publish_ring(
    ebpf: &mut Ebpf,
    vip_id: u32,
    table: &[u32],
    second_chance: std::time::Duration,
) -> Result<u8> {
    let live = ring_state(ebpf, vip_id)?.live_generation();
    store_ring_state(ebpf, vip_id, RingState::new(live, 0))?;
    let idle = live ^ 1;
    write_ring(ebpf, vip_id, idle, table)?;
    let until = monotonic_ns().saturating_add(second_chance.as_nanos() as u64);
    store_ring_state(ebpf, vip_id, RingState::new(idle, until))?;
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
