//! Control-plane costs: Maglev builds, ring publication, disruption, and
//! map memory.

use std::time::Instant;

use anyhow::{Context, Result};
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{LbConfig, Mode, VipKey},
};
use lb_userspace::{
    dataplane::{self, MapSizes},
    programming,
};

const M: u32 = 65537;

fn backends(n: u32) -> Vec<MaglevBackend> {
    (1..=n)
        .map(|i| {
            let mut identity = [0u8; 16];
            identity[..4].copy_from_slice(&(0xc612_0000u32 + i).to_be_bytes());
            MaglevBackend {
                id: i,
                identity,
                weight: 100,
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub struct ControlResult {
    /// (backends, build ms)
    pub builds: Vec<(u32, f64)>,
    /// (backends, fraction of slots moved by removing one, ideal 1/N)
    pub disruption: Vec<(u32, f64, f64)>,
    pub markdown: String,
}

pub fn run() -> Result<ControlResult> {
    let mut builds = Vec::new();
    let mut disruption = Vec::new();
    for n in [10u32, 100, 1000] {
        let b = backends(n);
        let times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = maglev::build(&b, M, 0);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        builds.push((n, median(times)));
        let full = maglev::build(&b, M, 0)?;
        let less = maglev::build(&b[1..], M, 0)?;
        let moved = full.iter().zip(&less).filter(|(a, b)| a != b).count() as f64 / M as f64;
        disruption.push((n, moved, 1.0 / n as f64));
    }
    // Writing a ring into the idle generation and flipping, M = 65537.
    let mut ebpf = dataplane::load_balancer_with(&MapSizes {
        max_vips: 2,
        max_backends: 1100,
        ring_size: M,
        conntrack_entries: 1024,
        flow_cache_slots: 1,
    })?;
    programming::set_config(
        &mut ebpf,
        &LbConfig {
            ring_size: M,
            ..Default::default()
        },
    )?;
    let key = VipKey {
        addr: [1; 16],
        port: 80,
        proto: 6,
        family: 6,
    };
    let table = maglev::build(&backends(100), M, 0)?;
    programming::install_vip(&mut ebpf, &key, 0, Mode::Ipip, &table)?;
    let times: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            programming::publish_ring(&mut ebpf, 0, &table, std::time::Duration::from_secs(60))
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()
        .context("publishing rings")?;
    let publish_ms = median(times);
    let by_max_vips = publish_by_max_vips()?;
    let mut md = String::from(
        "| backends | Maglev build, M = 65537 (ms) | slots moved when one is removed | ideal (1/N) |\n|---:|---:|---:|---:|\n",
    );
    for ((n, ms), (_, moved, ideal)) in builds.iter().zip(&disruption) {
        md.push_str(&format!(
            "| {n} | {ms:.2} | {:.3}% | {:.3}% |\n",
            moved * 100.0,
            ideal * 100.0
        ));
    }
    md.push_str(&format!(
        "\nWriting one ring (65537 slots) into the idle generation and flipping the VIP to it: {publish_ms:.1} ms (one map update per 16 slots).\n"
    ));
    md.push_str(
        "\nPublishing one VIP's ring touches only that VIP's ring and its `RING_STATE` word, so its cost does not grow with the VIP table (8 VIPs configured, ring of 13 slots, median of 21):\n\n| `max_vips` | publication (µs) |\n|---:|---:|\n",
    );
    for (max_vips, us) in &by_max_vips {
        md.push_str(&format!("| {max_vips} | {us:.0} |\n"));
    }
    Ok(ControlResult {
        builds,
        disruption,
        markdown: md,
    })
}

/// One VIP's ring publication, with VIP tables sized for `max_vips` (8 VIPs
/// configured): (max_vips, median µs).
fn publish_by_max_vips() -> Result<Vec<(u32, f64)>> {
    const SMALL: u32 = 13;
    let mut out = Vec::new();
    for max_vips in [16, 256, 4096] {
        let mut ebpf = dataplane::load_balancer_with(&MapSizes {
            max_vips,
            max_backends: 16,
            ring_size: SMALL,
            conntrack_entries: 1024,
            flow_cache_slots: 1,
        })?;
        programming::set_config(
            &mut ebpf,
            &LbConfig {
                ring_size: SMALL,
                ..Default::default()
            },
        )?;
        let table = vec![1; SMALL as usize];
        for id in 0..8u32 {
            let key = VipKey {
                addr: [id as u8 + 1; 16],
                port: 80,
                proto: 6,
                family: 6,
            };
            programming::install_vip(&mut ebpf, &key, id, Mode::Ipip, &table)?;
        }
        let times: Vec<f64> = (0..21)
            .map(|_| {
                let t = Instant::now();
                programming::publish_ring(&mut ebpf, 3, &table, std::time::Duration::from_secs(60))
                    .map(|_| t.elapsed().as_secs_f64() * 1e6)
            })
            .collect::<Result<_>>()
            .context("publishing rings")?;
        out.push((max_vips, median(times)));
    }
    Ok(out)
}

/// memlock of every map this process holds, by name, from /proc/self/fdinfo.
fn map_memlock() -> Result<Vec<(String, u64, u32)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fdinfo")?.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
        };
        let (Some(memlock), Some(id), Some(max)) =
            (field("memlock:"), field("map_id:"), field("max_entries:"))
        else {
            continue;
        };
        let id: u32 = id.parse().unwrap_or(0);
        let name = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("map {id}"));
        out.push((name, memlock.parse().unwrap_or(0), max.parse().unwrap_or(0)));
    }
    Ok(out)
}

pub fn memory() -> Result<String> {
    let mut md = String::from(
        "| configuration | connection-table slots | CONNTRACK + CONNTRACK_HEADS memlock | bytes per slot (one flow) | all maps |\n|---|---:|---:|---:|---:|\n",
    );
    for (label, sizes) in [
        ("default", MapSizes::default()),
        (
            "4M flows",
            MapSizes {
                conntrack_entries: 1 << 22,
                ..MapSizes::default()
            },
        ),
    ] {
        let ebpf = dataplane::load_balancer_with(&sizes)?;
        let maps = map_memlock()?;
        // The slots and their bucket heads.
        let slots = sizes.conntrack_slots();
        let ct: u64 = maps
            .iter()
            .filter(|(n, _, max)| {
                (n == "CONNTRACK" && *max == slots)
                    || (n == "CONNTRACK_HEADS" && *max == slots / lb_common::conntrack::WAYS)
            })
            .map(|m| m.1)
            .sum();
        // Only this load's maps: the process holds no other program now.
        let total: u64 = maps.iter().map(|m| m.1).sum();
        md.push_str(&format!(
            "| {label} | {} | {:.1} MiB | {:.0} | {:.1} MiB |\n",
            slots,
            ct as f64 / (1 << 20) as f64,
            ct as f64 / slots as f64,
            total as f64 / (1 << 20) as f64
        ));
        drop(ebpf);
    }
    md.push_str("\nmemlock as the kernel accounts it (/proc/self/fdinfo), kernel overhead included; the per-CPU flow cache and counters scale with the CPU count. Sized at twice the concurrent flows (the README's advice, so that new flows rarely displace live ones), the table costs twice the bytes per slot per flow.\n");
    Ok(md)
}
