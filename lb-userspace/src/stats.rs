//! Reading the per-CPU counters; userspace sums the CPUs.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use lb_common::stats::Counter;

pub const STATS_GLOBAL: &str = "STATS_GLOBAL";

/// Sum over CPUs of every global counter, by name.
pub fn global_counters(ebpf: &Ebpf) -> Result<BTreeMap<&'static str, u64>> {
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
        ebpf.map(STATS_GLOBAL)
            .with_context(|| format!("map {STATS_GLOBAL} missing"))?,
    )?;
    let mut out = BTreeMap::new();
    for c in Counter::ALL {
        let per_cpu = map
            .get(&c.index(), 0)
            .with_context(|| format!("reading {STATS_GLOBAL}[{}]", c.name()))?;
        out.insert(c.name(), per_cpu.iter().sum());
    }
    Ok(out)
}

/// The connection table's occupancy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableCount {
    /// Slots holding a complete entry (closed and expired ones included,
    /// until reused).
    pub entries: u64,
    pub slots: u64,
}

/// Counts the connection table of the data plane pinned in `dir`. The table
/// is mapped read-only and scanned in memory (tens of milliseconds per
/// million slots), not read with a syscall per slot.
pub fn conntrack_entries(dir: &std::path::Path) -> Result<TableCount> {
    use std::os::fd::{AsFd, AsRawFd};

    use aya::maps::{Array, Map};
    use lb_common::{
        conntrack::{ConnSlot, in_use},
        maps::LbConfig,
    };
    let open = |name: &str| {
        let path = dir.join(name);
        MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    let config: Array<MapData, LbConfig> = Array::try_from(Map::Array(open("CONFIG")?))?;
    let seed = config.get(&0, 0).context("reading CONFIG")?.conntrack_seed;
    let table = open("CONNTRACK")?;
    let info = table.info().context("CONNTRACK: map info")?;
    let slot_size = std::mem::size_of::<ConnSlot>();
    if info.value_size() as usize != slot_size {
        anyhow::bail!(
            "CONNTRACK holds {}-byte values, not {slot_size}",
            info.value_size()
        );
    }
    let slots = info.max_entries() as usize;
    let len = slots * slot_size;
    // SAFETY: a read-only shared mapping of the map's value area, which is
    // `len` bytes (`BPF_F_MMAPABLE`); unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            table.fd().as_fd().as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mapping CONNTRACK");
    }
    let slot_ptr = base.cast::<ConnSlot>();
    let count = (0..slots)
        // SAFETY: in bounds; volatile because the data plane writes slots
        // concurrently (a torn copy fails its seal and is not counted).
        .filter(|&i| in_use(&unsafe { std::ptr::read_volatile(slot_ptr.add(i)) }, seed))
        .count();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(base, len) };
    Ok(TableCount {
        entries: count as u64,
        slots: slots as u64,
    })
}
