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

/// Entries in the connection table pinned at `path`, by walking its keys:
/// one syscall per key, so call it from a blocking thread. Bounded, so a
/// table that keeps changing under the walk cannot keep it going.
pub fn conntrack_entries(path: &std::path::Path) -> Result<u64> {
    use aya::maps::{HashMap, Map};
    use lb_common::maps::{ConnEntry, FlowKey};
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let map: HashMap<MapData, FlowKey, ConnEntry> = HashMap::try_from(Map::LruHashMap(data))?;
    Ok(map.keys().take(1 << 27).filter(|k| k.is_ok()).count() as u64)
}
