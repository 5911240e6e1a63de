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
    /// Flows neither closed (FIN/RST) nor expired (UDP); entries are never
    /// deleted, only reused, so dead TCP flows whose end this node did not
    /// see count until they are.
    pub entries: u64,
    pub slots: u64,
}

/// Counts the connection table of the data plane pinned in `dir` from its
/// bucket heads, mapped read-only and scanned in memory (4 bytes per slot:
/// a few milliseconds per million), not read with a syscall per bucket.
pub fn conntrack_entries(dir: &std::path::Path) -> Result<TableCount> {
    use std::os::fd::{AsFd, AsRawFd};

    use aya::maps::{Array, Map};
    use lb_common::{
        conntrack::{BucketHead, WAYS, live, ticks, udp_timeout_ticks},
        maps::LbConfig,
    };
    let open = |name: &str| {
        let path = dir.join(name);
        MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    let config: Array<MapData, LbConfig> = Array::try_from(Map::Array(open("CONFIG")?))?;
    let udp_timeout =
        udp_timeout_ticks(config.get(&0, 0).context("reading CONFIG")?.udp_timeout_ns);
    let heads = open("CONNTRACK_HEADS")?;
    let info = heads.info().context("CONNTRACK_HEADS: map info")?;
    let head_size = std::mem::size_of::<BucketHead>();
    if info.value_size() as usize != head_size {
        anyhow::bail!(
            "CONNTRACK_HEADS holds {}-byte values, not {head_size}",
            info.value_size()
        );
    }
    let buckets = info.max_entries() as usize;
    let len = buckets * head_size;
    // The data plane's clock is CLOCK_MONOTONIC (coarse), in ticks.
    let now = {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ticks(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    };
    // SAFETY: a read-only shared mapping of the map's value area, which is
    // `len` bytes (`BPF_F_MMAPABLE`); unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            heads.fd().as_fd().as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mapping CONNTRACK_HEADS");
    }
    let words = base.cast::<u32>();
    let count = (0..buckets * WAYS as usize)
        // SAFETY: in bounds; volatile because the data plane writes heads
        // concurrently (each word is one aligned store).
        .filter(|&i| {
            live(
                unsafe { std::ptr::read_volatile(words.add(i)) },
                now,
                udp_timeout,
            )
        })
        .count();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(base, len) };
    Ok(TableCount {
        entries: count as u64,
        slots: (buckets * WAYS as usize) as u64,
    })
}
