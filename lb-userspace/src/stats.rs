//! Reading the per-CPU counters; userspace sums the CPUs.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::Ebpf;
use lb_common::{maps::Traffic, stats::Counter};

use crate::maps::{CONFIG, CONNTRACK_HEADS, MapRef, STATS_GLOBAL, kind};

/// Sum over CPUs of every global counter, by name.
pub fn global_counters(ebpf: &Ebpf) -> Result<BTreeMap<&'static str, u64>> {
    let map = STATS_GLOBAL.per_cpu(ebpf)?;
    let mut out = BTreeMap::new();
    for c in Counter::ALL {
        let per_cpu = map
            .get(&c.index(), 0)
            .with_context(|| format!("reading {}[{}]", STATS_GLOBAL.name, c.name()))?;
        out.insert(c.name(), per_cpu.iter().sum());
    }
    Ok(out)
}

/// The connection table's occupancy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableCount {
    /// Flows neither closed (FIN/RST) nor expired (UDP timeout, TCP idle
    /// timeout, embryonic timeout): embryonic and established.
    pub entries: u64,
    /// Of those, embryonic: one packet seen, a handshake in progress or a
    /// spoofed packet. Most of the table during a flood, free again seconds
    /// after it.
    pub embryonic: u64,
    pub slots: u64,
}

/// Counts the connection table of the data plane pinned in `dir` from its
/// bucket heads, mapped read-only and scanned in memory (4 bytes per slot:
/// a few milliseconds per million), not read with a syscall per bucket.
pub fn conntrack_entries(dir: &std::path::Path) -> Result<TableCount> {
    use lb_common::conntrack::{BucketHead, Timeouts, WAYS, WayState, ticks, way_state};
    let config = CONFIG.pinned(dir)?;
    let config = config.get(&0, 0).context("reading CONFIG")?;
    let timeouts = Timeouts::of(config.udp_timeout_ns, config.tcp_idle_timeout_ns);
    let heads = CONNTRACK_HEADS.pinned_data(dir)?;
    let info = heads.info().context("CONNTRACK_HEADS: map info")?;
    let head_size = std::mem::size_of::<BucketHead>();
    if info.value_size() as usize != head_size {
        anyhow::bail!(
            "CONNTRACK_HEADS holds {}-byte values, not {head_size}",
            info.value_size()
        );
    }
    let buckets = info.max_entries() as usize;
    // The data plane's clock is CLOCK_MONOTONIC (coarse), in ticks.
    let now = ticks(crate::programming::monotonic_coarse_ns());
    let mapped =
        crate::mapped::MappedValues::map(&heads, 0, buckets * head_size, false, "CONNTRACK_HEADS")?;
    let (mut entries, mut embryonic) = (0, 0);
    // Relaxed loads: the data plane writes heads concurrently, each word in
    // one aligned store.
    for word in mapped.load_u32s()?.take(buckets * WAYS as usize) {
        match way_state(word, now, timeouts) {
            WayState::Free => {}
            WayState::Embryonic => {
                entries += 1;
                embryonic += 1;
            }
            WayState::Established => entries += 1,
        }
    }
    Ok(TableCount {
        entries,
        embryonic,
        slots: (buckets * WAYS as usize) as u64,
    })
}

/// One id's traffic summed over CPUs, from `STATS_VIP` or `STATS_BACKEND`.
pub fn traffic(ebpf: &Ebpf, map: &MapRef<kind::PerCpuArray, Traffic>, id: u32) -> Result<Traffic> {
    let per_cpu = map
        .per_cpu(ebpf)?
        .get(&id, 0)
        .with_context(|| format!("reading {}[{id}]", map.name))?;
    Ok(sum(per_cpu.iter()))
}

fn sum<'a>(per_cpu: impl Iterator<Item = &'a Traffic>) -> Traffic {
    per_cpu.fold(Traffic::default(), |a, t| Traffic {
        packets: a.packets + t.packets,
        bytes: a.bytes + t.bytes,
        new_flows: a.new_flows + t.new_flows,
    })
}

/// Zeroes one id's traffic on every CPU: a backend or VIP id that is
/// reused must not start with its previous owner's counts.
pub fn reset_traffic(
    ebpf: &mut Ebpf,
    map: &MapRef<kind::PerCpuArray, Traffic>,
    id: u32,
) -> Result<()> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting CPUs")?;
    let zeros = aya::maps::PerCpuValues::try_from(vec![Traffic::default(); cpus])
        .context("building per-CPU zeros")?;
    map.per_cpu_mut(ebpf)?
        .set(id, zeros, 0)
        .with_context(|| format!("zeroing {}[{id}]", map.name))
}
