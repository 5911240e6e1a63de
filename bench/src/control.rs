//! Control-plane costs: Maglev builds, ring publication, disruption, and
//! map memory.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{LbConfig, Mode, VipKey},
};
use lb_userspace::{
    dataplane::{self, MapSizes},
    programming,
};

use crate::summary::{changed_fraction, median, range};

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

pub struct ControlResult {
    /// (backends, fastest build ms at M = 65,537)
    pub builds: Vec<(u32, f64)>,
    /// (backends, fraction of slots moved by removing one at the automatic
    /// size for that many backends, ideal 1/N)
    pub disruption: Vec<(u32, f64, f64)>,
    pub markdown: String,
}

/// Build time (ms) of `b` into `m` slots over 21 builds: (fastest, median).
/// The fastest is the figure reported, as in section 1: on a shared machine
/// other tenants only ever add time; the median shows how much they did.
fn build_ms(b: &[MaglevBackend], m: u32) -> (f64, f64) {
    let times: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            let _ = std::hint::black_box(maglev::build(b, m, 0));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let fastest = times.iter().copied().fold(f64::INFINITY, f64::min);
    (fastest, median(times))
}

/// Removals each disruption figure averages: which backend leaves changes
/// the figure by up to a tenth, so one removal is not the figure.
const REMOVALS: usize = 10;

/// Slots that change when one backend leaves, as fractions of the table,
/// over [`REMOVALS`] removals spread over the backends.
#[derive(Clone, Copy, Debug)]
struct Moved {
    mean: f64,
    min: f64,
    max: f64,
}

impl Moved {
    fn over(
        b: &[MaglevBackend],
        build: impl Fn(&[MaglevBackend]) -> Result<Vec<u32>>,
    ) -> Result<Self> {
        let full = build(b)?;
        let picks = REMOVALS.min(b.len());
        let mut all = Vec::with_capacity(picks);
        for k in 0..picks {
            let mut less = b.to_vec();
            less.remove(k * b.len() / picks);
            all.push(changed_fraction(&full, &build(&less)?));
        }
        let (min, max) = range(&all);
        Ok(Moved {
            mean: all.iter().sum::<f64>() / all.len() as f64,
            min,
            max,
        })
    }

    /// "mean (min-max)" in multiples of the ideal 1/n.
    fn times_ideal(&self, n: u32) -> String {
        let n = f64::from(n);
        format!(
            "{:.2} ({:.2}-{:.2})",
            self.mean * n,
            self.min * n,
            self.max * n
        )
    }
}

/// Slots moved by Maglev, building `b` into `m` slots.
fn moved(b: &[MaglevBackend], m: u32) -> Result<Moved> {
    Moved::over(b, |x| Ok(maglev::build(x, m, 0)?))
}

/// Not the product's builder: another fill with the same permutations and
/// Maglev's balance (every backend `floor(m/N)` or `ceil(m/N)` slots, the
/// extra ones to the backends whose hash is lowest), kept to measure whether
/// a different fill order would move fewer slots. Every backend still short
/// of its quota steps one position of its permutation per round (Maglev
/// steps to its next free slot) and takes the slot if it is free. Equal
/// weights only.
fn quota_fill(b: &[MaglevBackend], m: u32) -> Vec<u32> {
    let mut sorted: Vec<&MaglevBackend> = b.iter().collect();
    sorted.sort_by_key(|x| x.identity);
    let n = sorted.len() as u32;
    let mut quota = vec![m / n; sorted.len()];
    let mut by_hash: Vec<(u32, usize)> = sorted
        .iter()
        .enumerate()
        .map(|(i, x)| {
            (
                lb_common::hash::maglev_offset_skip(&x.identity, u32::MAX, 0x5eed).0,
                i,
            )
        })
        .collect();
    by_hash.sort_unstable();
    for &(_, i) in by_hash.iter().take((m % n) as usize) {
        quota[i] += 1;
    }
    let mut walk: Vec<(u32, u32)> = sorted
        .iter()
        .map(|x| lb_common::hash::maglev_offset_skip(&x.identity, m, 0))
        .collect();
    let mut table = vec![0u32; m as usize];
    let mut active: Vec<usize> = (0..sorted.len()).collect();
    while !active.is_empty() {
        active.retain(|&i| {
            let (p, skip) = walk[i];
            walk[i].0 = (p + skip) % m;
            if table[p as usize] == 0 {
                table[p as usize] = sorted[i].id;
                quota[i] -= 1;
            }
            quota[i] > 0
        });
    }
    table
}

/// Slots moved with [`quota_fill`].
fn quota_fill_moved(b: &[MaglevBackend], m: u32) -> Result<Moved> {
    Moved::over(b, |x| Ok(quota_fill(x, m)))
}

/// Not the product's builder either: rendezvous (highest random weight)
/// hashing per slot, every backend capped at `ceil(m / N x (1 + slack))`
/// slots (`None`: no cap). Each slot goes to the backend that scores it
/// highest among those with room; a backend over its cap gives up its
/// lowest-scoring slot, which goes on to its next choice (slot-proposing
/// deferred acceptance: the same table as handing out all slot and backend
/// pairs in descending score order). Uncapped it moves exactly the removed
/// backend's slots, at the price of a binomial balance; the cap buys the
/// balance back with moves. Kept to measure that trade-off, the one any
/// fill faces (section 4). Equal weights only.
fn capped_rendezvous(b: &[MaglevBackend], m: u32, slack: Option<f64>) -> Vec<u32> {
    use std::{cmp::Reverse, collections::BinaryHeap};
    let n = b.len();
    let cap = slack.map_or(usize::MAX, |e| rendezvous_cap(m, n, e));
    let seeds: Vec<u64> = b.iter().map(|x| seed(&x.identity)).collect();
    let score = |slot: u32, i: usize| rendezvous_score(seeds[i], slot);
    let mut held: Vec<BinaryHeap<Reverse<(u64, u32)>>> = vec![BinaryHeap::new(); n];
    // A slot's next choice is the best backend scoring it below this.
    let mut below = vec![u64::MAX; m as usize];
    let mut free: Vec<u32> = (0..m).rev().collect();
    while let Some(slot) = free.pop() {
        let bound = below[slot as usize];
        let mut best: Option<(u64, usize)> = None;
        for i in 0..n {
            let sc = score(slot, i);
            if sc < bound && best.is_none_or(|(top, _)| sc > top) {
                best = Some((sc, i));
            }
        }
        let Some((sc, i)) = best else {
            unreachable!("the caps add up to at least {m} slots");
        };
        below[slot as usize] = sc;
        held[i].push(Reverse((sc, slot)));
        if held[i].len() > cap
            && let Some(Reverse((_, out))) = held[i].pop()
        {
            free.push(out);
        }
    }
    let mut table = vec![0u32; m as usize];
    for (i, slots) in held.iter().enumerate() {
        for Reverse((_, slot)) in slots {
            table[*slot as usize] = b[i].id;
        }
    }
    table
}

/// The most slots one of `n` backends may hold in [`capped_rendezvous`].
fn rendezvous_cap(m: u32, n: usize, slack: f64) -> usize {
    (f64::from(m) / n as f64 * (1.0 + slack)).ceil() as usize
}

/// A backend's rendezvous seed, from its identity.
fn seed(identity: &[u8; 16]) -> u64 {
    let (head, tail) = identity.split_at(8);
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("eight of sixteen bytes"));
    splitmix(word(head) ^ word(tail).rotate_left(29))
}

/// A backend's score for a slot: the slot goes to the highest.
fn rendezvous_score(seed: u64, slot: u32) -> u64 {
    splitmix(seed ^ u64::from(slot).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// SplitMix64's finaliser.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The most slots any backend holds, over the mean share `m / N`.
fn largest_share(table: &[u32], n: u32) -> f64 {
    let counts = maglev::slot_counts(table);
    let most = counts.values().copied().max().unwrap_or(0);
    most as f64 * f64::from(n) / table.len() as f64
}

/// One row of the balance-against-disruption table.
struct TradeOff {
    fill: String,
    /// One build, ms.
    build_ms: f64,
    largest_share: f64,
    moved: Moved,
}

/// The balance, build time and disruption of the fills above at `m` slots
/// for `n` backends.
fn trade_off(n: u32, m: u32) -> Result<Vec<TradeOff>> {
    let b = backends(n);
    let timed = |build: &dyn Fn() -> Result<Vec<u32>>| -> Result<(f64, Vec<u32>)> {
        let t = Instant::now();
        let table = build()?;
        Ok((t.elapsed().as_secs_f64() * 1e3, table))
    };
    let (build_ms, table) = timed(&|| Ok(maglev::build(&b, m, 0)?))?;
    let mut rows = vec![TradeOff {
        fill: "Maglev (lbd)".to_owned(),
        build_ms,
        largest_share: largest_share(&table, n),
        moved: moved(&b, m)?,
    }];
    for slack in [Some(0.0), Some(0.05), Some(0.1), Some(0.25), None] {
        let fill = match slack {
            Some(e) => format!("rendezvous, cap {:.2} x mean", 1.0 + e),
            None => "rendezvous, no cap".to_owned(),
        };
        let (build_ms, table) = timed(&|| Ok(capped_rendezvous(&b, m, slack)))?;
        rows.push(TradeOff {
            fill,
            build_ms,
            largest_share: largest_share(&table, n),
            moved: Moved::over(&b, |x| Ok(capped_rendezvous(x, m, slack)))?,
        });
    }
    Ok(rows)
}

/// `RINGS` bytes one VIP takes: two generations of ceil(m / 16) 64-byte
/// elements.
fn ring_bytes_per_vip(m: u32) -> u64 {
    64 * u64::from(lb_common::ring::chunks_per_vip(m))
}

/// A data plane with one VIP of `n` backends installed, rings of `m` slots.
fn loaded(m: u32, n: u32) -> Result<(aya::Ebpf, Vec<MaglevBackend>)> {
    let mut ebpf = dataplane::load_balancer_with(&MapSizes {
        max_vips: 2,
        max_backends: n + 100,
        ring_size: m,
        conntrack_entries: 1024,
        flow_cache_slots: 1,
    })?;
    programming::set_config(
        &mut ebpf,
        &LbConfig {
            ring_size: m,
            ..Default::default()
        },
    )?;
    let key = VipKey {
        addr: [1; 16],
        port: 80,
        proto: 6,
        family: 6,
    };
    let b = backends(n);
    let table = maglev::build(&b, m, 0)?;
    programming::install_vip(&mut ebpf, &key, 0, Mode::Ipip, &table)?;
    Ok((ebpf, b))
}

/// Median time (ms) to write a ring of `m` slots for `n` backends into the
/// idle generation and flip the VIP to it.
fn publish_ms(m: u32, n: u32) -> Result<f64> {
    let (mut ebpf, b) = loaded(m, n)?;
    let table = maglev::build(&b, m, 0)?;
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            programming::publish_ring(&mut ebpf, 0, &table, Duration::from_secs(60))
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()
        .context("publishing rings")?;
    Ok(median(times))
}

/// A health change to the new ring being live, in process, as
/// `Controller::refresh_vip` does it: the backend leaves the members, the
/// ring is rebuilt without it and published (idle generation written, then
/// the `RING_STATE` flip). (build ms, publish ms, total ms), medians.
fn health_to_live(m: u32, n: u32) -> Result<(f64, f64, f64)> {
    let (mut ebpf, mut b) = loaded(m, n)?;
    let (mut build, mut publish, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..7 {
        // Alternately down and back up, so that every round changes the ring.
        let i = (round / 2 * 97) % n as usize;
        b[i].weight = if b[i].weight == 0 { 100 } else { 0 };
        let t0 = Instant::now();
        let table = maglev::build(&b, m, 0)?;
        let t1 = Instant::now();
        programming::publish_ring(&mut ebpf, 0, &table, Duration::from_secs(60))?;
        let t2 = Instant::now();
        build.push((t1 - t0).as_secs_f64() * 1e3);
        publish.push((t2 - t1).as_secs_f64() * 1e3);
        total.push((t2 - t0).as_secs_f64() * 1e3);
    }
    Ok((median(build), median(publish), median(total)))
}

pub fn run() -> Result<ControlResult> {
    let mut builds = Vec::new();
    let mut build_medians = Vec::new();
    let mut classic_moved = Vec::new();
    let mut disruption = Vec::new();
    let mut auto_rows = Vec::new();
    let mut default_size_moved = Vec::new();
    for n in [10u32, 100, 1000] {
        let b = backends(n);
        let (fastest, typical) = build_ms(&b, M);
        builds.push((n, fastest));
        build_medians.push(typical);
        classic_moved.push(moved(&b, M)?);
        let auto = maglev::auto_ring_size(n);
        let d = moved(&b, auto)?;
        disruption.push((n, d.mean, 1.0 / n as f64));
        auto_rows.push((n, auto, build_ms(&b, auto).0, d));
        default_size_moved.push((n, moved(&b, maglev::DEFAULT_RING_SIZE)?));
    }
    let auto_1000 = maglev::auto_ring_size(1000);
    let publish_classic = publish_ms(M, 100)?;
    let publish_auto = publish_ms(auto_1000, 1000)?;
    let (h_build, h_publish, h_total) = health_to_live(auto_1000, 1000)?;
    let by_max_vips = publish_by_max_vips()?;
    let mut md = String::from(
        "Build times: the fastest of 21 builds (their median in brackets). Slots moved: the mean over 10 removals, each of a different backend; where shown as multiples of the ideal, the range of the 10 in brackets.\n\n| backends | Maglev build, M = 65537 (ms) | slots moved when one is removed | ideal (1/N) |\n|---:|---:|---:|---:|\n",
    );
    for (((n, ms), median), (moved, (_, _, ideal))) in builds
        .iter()
        .zip(&build_medians)
        .zip(classic_moved.iter().zip(&disruption))
    {
        md.push_str(&format!(
            "| {n} | {ms:.2} ({median:.2}) | {:.3}% | {:.3}% |\n",
            moved.mean * 100.0,
            ideal * 100.0
        ));
    }
    md.push_str(
        "\nAt the automatic ring size (`ring_size = \"auto\"`, the default: the smallest prime at least 100 times the backends a VIP may hold, `max_backends_per_vip`), for a capacity of exactly N backends; Maglev's tables are unchanged (the same backends and size give the same table as before):\n\n| backends (= capacity) | ring size | Maglev build (ms) | slots moved when one is removed | x ideal | ideal (1/N) | `RINGS` memory per VIP |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, m, ms, d) in &auto_rows {
        md.push_str(&format!(
            "| {n} | {m} | {ms:.2} | {:.3}% | {} | {:.3}% | {} |\n",
            d.mean * 100.0,
            d.times_ideal(*n),
            100.0 / *n as f64,
            mib(ring_bytes_per_vip(*m))
        ));
    }
    md.push_str(
        "\nWhether another fill order would do better at the automatic sizes above: the same permutations and the same balance (floor or ceil of M/N slots each), but every backend short of its quota steps one position per round instead of to its next free slot (`quota_fill` in `bench/src/control.rs`, not the product's builder):\n\n| backends | ring size | slots moved, Maglev (x ideal) | slots moved, quota fill (x ideal) |\n|---:|---:|---:|---:|\n",
    );
    for (n, m, _, d) in &auto_rows {
        let q = quota_fill_moved(&backends(*n), *m)?;
        md.push_str(&format!(
            "| {n} | {m} | {} | {} |\n",
            d.times_ideal(*n),
            q.times_ideal(*n)
        ));
    }
    md.push_str(
        "\nBalance against disruption, at the automatic sizes: rendezvous hashing per slot moves only the removed backend's slots but shares them out binomially; capping every backend's share buys the balance back with moves (`capped_rendezvous` in `bench/src/control.rs`, not the product's builder). Build: one build (rendezvous scores every slot for every backend). Largest share: the most slots one backend holds over the mean M/N (Maglev's floor-or-ceil balance is 1.01 at 100 slots per backend).\n\n| backends | ring size | fill | build (ms) | largest share (x mean) | slots moved (x ideal) |\n|---:|---:|---|---:|---:|---:|\n",
    );
    for n in [100u32, 1000] {
        let m = maglev::auto_ring_size(n);
        for row in trade_off(n, m)? {
            md.push_str(&format!(
                "| {n} | {m} | {} | {:.2} | {:.2} | {} |\n",
                row.fill,
                row.build_ms,
                row.largest_share,
                row.moved.times_ideal(n)
            ));
        }
    }
    md.push_str(&format!(
        "\nAt the default size ({} slots: `ring_size = \"auto\"` with the default capacity of {} backends per VIP), N backends present:\n\n| backends | slots moved when one is removed | x ideal | ideal (1/N) |\n|---:|---:|---:|---:|\n",
        maglev::DEFAULT_RING_SIZE,
        maglev::DEFAULT_MAX_BACKENDS_PER_VIP
    ));
    for (n, d) in &default_size_moved {
        md.push_str(&format!(
            "| {n} | {:.3}% | {} | {:.3}% |\n",
            d.mean * 100.0,
            d.times_ideal(*n),
            100.0 / *n as f64
        ));
    }
    let largest = moved(&backends(1000), maglev::MAX_RING_SIZE)?;
    md.push_str(&format!(
        "\nAt the largest ring lbd accepts ({} slots, 1,000 slots per backend at N = 1,000; `RINGS` {} per VIP), 1,000 backends present: {:.3}% moved, {} x ideal.\n",
        maglev::MAX_RING_SIZE,
        mib(ring_bytes_per_vip(maglev::MAX_RING_SIZE)),
        largest.mean * 100.0,
        largest.times_ideal(1000)
    ));
    md.push_str(&format!(
        "\nWriting one ring into the idle generation and flipping the VIP to it (stores through a shared mapping of the generation's part of `RINGS`, then one release store to its `RING_STATE` word): {publish_classic:.1} ms for 65537 slots, {publish_auto:.1} ms for {auto_1000} slots (the automatic size for 1,000 backends).\n"
    ));
    md.push_str(&format!(
        "\nA health change to the new ring being live, in process, 1,000 backends, {auto_1000} slots (what `Controller::refresh_vip` does once the checker's event arrives: rebuild without the backend, write the idle generation, flip `RING_STATE`): {h_total:.1} ms, of which the build {h_build:.1} ms and the publication {h_publish:.1} ms (median of 7). The check's own detection time (fall x interval, below) comes on top.\n"
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

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
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
    md.push_str("\nmemlock as the kernel accounts it (/proc/self/fdinfo), kernel overhead included; the per-CPU flow cache and counters scale with the CPU count. Sized at twice the concurrent flows (the README's advice, so that new flows rarely displace live ones), the table costs twice the bytes per slot per flow. The default ring size is automatic: 100,003 slots (`max_backends_per_vip` = 1,000).\n");
    md.push_str(
        "\n`RINGS` memory per VIP by ring size (two generations; memlock of a 4-VIP map divided by 4), and for the default 64 VIPs (`max_vips`; every VIP has the instance's ring size):\n\n| ring size | backends at 100 slots each | `RINGS` per VIP | x 64 VIPs |\n|---:|---:|---:|---:|\n",
    );
    for m in [
        maglev::auto_ring_size(10),
        maglev::auto_ring_size(100),
        M,
        maglev::auto_ring_size(1000),
        maglev::auto_ring_size(4095),
        maglev::MAX_RING_SIZE,
    ] {
        let sizes = MapSizes {
            max_vips: 4,
            max_backends: 16,
            ring_size: m,
            conntrack_entries: 1024,
            flow_cache_slots: 1,
        };
        let ebpf = dataplane::load_balancer_with(&sizes)?;
        let rings: u64 = map_memlock()?
            .iter()
            .filter(|(n, _, max)| n == "RINGS" && *max == sizes.ring_entries().unwrap_or(0))
            .map(|m| m.1)
            .sum();
        drop(ebpf);
        md.push_str(&format!(
            "| {m} | {} | {} | {} |\n",
            m / maglev::SLOTS_PER_BACKEND,
            mib(rings / 4),
            mib(rings / 4 * 64)
        ));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uncapped, rendezvous moves exactly the removed backend's slots;
    /// capped, no backend holds more than its cap and every slot is filled.
    #[test]
    fn capped_rendezvous_keeps_its_cap_and_uncapped_its_slots() {
        let (n, m) = (50u32, 5003u32);
        let b = backends(n);
        let full = capped_rendezvous(&b, m, None);
        let mut less = b.clone();
        let gone = less.remove(7).id;
        let after = capped_rendezvous(&less, m, None);
        for (x, y) in full.iter().zip(&after) {
            assert!(x == y || *x == gone, "slot moved from {x} to {y}");
        }
        for slack in [0.0, 0.1] {
            let t = capped_rendezvous(&b, m, Some(slack));
            let counts = maglev::slot_counts(&t);
            assert!(!counts.contains_key(&0), "every slot filled");
            let cap = rendezvous_cap(m, n as usize, slack);
            assert!(counts.values().all(|&c| c <= cap), "{counts:?}");
        }
    }

    /// The deferred acceptance is the greedy table it claims to be: every
    /// slot and backend pair in descending score order, each taken if the
    /// slot is free and the backend under its cap.
    #[test]
    fn capped_rendezvous_is_the_greedy_table() {
        for (n, m, slack) in [(7u32, 101u32, 0.0), (7, 101, 0.1), (30, 307, 0.05)] {
            let b = backends(n);
            let cap = rendezvous_cap(m, b.len(), slack);
            let mut pairs: Vec<(u64, u32, usize)> = (0..m)
                .flat_map(|s| {
                    b.iter()
                        .enumerate()
                        .map(move |(i, x)| (rendezvous_score(seed(&x.identity), s), s, i))
                })
                .collect();
            pairs.sort_unstable_by(|x, y| y.cmp(x));
            let mut greedy = vec![0u32; m as usize];
            let mut held = vec![0usize; b.len()];
            for (_, s, i) in pairs {
                if greedy[s as usize] == 0 && held[i] < cap {
                    greedy[s as usize] = b[i].id;
                    held[i] += 1;
                }
            }
            assert_eq!(capped_rendezvous(&b, m, Some(slack)), greedy, "n {n} m {m}");
        }
    }

    /// The comparison fill keeps Maglev's balance, so that only its
    /// disruption differs.
    #[test]
    fn quota_fill_balances_like_maglev() {
        for (n, m) in [(3u32, 13u32), (10, 1009), (100, 10007)] {
            let counts = maglev::slot_counts(&quota_fill(&backends(n), m));
            assert!(!counts.contains_key(&0), "every slot filled");
            assert_eq!(counts.len(), n as usize);
            assert!(
                counts
                    .values()
                    .all(|&c| c == (m / n) as usize || c == m.div_ceil(n) as usize),
                "{counts:?}"
            );
        }
    }
}
