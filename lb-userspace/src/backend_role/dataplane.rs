//! The decapsulator's data plane: the object's `decap` program and its four
//! maps, pinned under `/sys/fs/bpf/<instance>/decap-<layout>/` with the XDP
//! link, so that a restarted lbd adopts them (counters kept, the program
//! swapped into the running link) and traffic never stops decapsulating.
//! `<layout>` is a fingerprint of the maps' keys, values and counters: an
//! lbd that would misread the pinned maps looks elsewhere and refuses to
//! start next to them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, MapData, MapType, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
};
use lb_common::{
    decap::{DecapConfig, DecapCounter, DecapHop, DecapTraffic, DecapVipKey, NeighKey},
    layout::{Field, Layout},
};

use crate::{
    dataplane::{self, AttachMode, BALANCER_OBJECT, DECAP_PROGRAM, MapSizes},
    neigh::NextHop,
    pinning,
};

pub const DECAP_VIPS: &str = "DECAP_VIPS";
pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
pub const DECAP_STATS: &str = "DECAP_STATS";
pub const DECAP_HOPS: &str = "DECAP_HOPS";
pub const DECAP_NEIGH: &str = "DECAP_NEIGH";

/// Every map `decap` uses, all pinned.
pub const MAPS: [&str; 5] = [
    DECAP_VIPS,
    DECAP_CONFIG,
    DECAP_STATS,
    DECAP_HOPS,
    DECAP_NEIGH,
];

/// The kind of each of [`MAPS`] the object declares: part of the layout
/// (a pinned map of another kind is never adopted: `DECAP_HOPS` became an
/// LRU hash, whose kernel evicts the least recently used second hops), and
/// checked against the kernel's maps at load.
const MAP_TYPES: [(&str, MapType); 5] = [
    (DECAP_VIPS, MapType::PerCpuHash),
    (DECAP_CONFIG, MapType::Array),
    (DECAP_STATS, MapType::PerCpuArray),
    (DECAP_HOPS, MapType::LruHash),
    (DECAP_NEIGH, MapType::LruHash),
];

const LINK: &str = "link";
const LAYOUT_PREFIX: &str = "decap-";

/// The object also holds the balancer's maps, which the kernel creates with
/// it; `decap` never touches them, so they are made as small as allowed.
fn unused_balancer_maps() -> MapSizes {
    MapSizes {
        max_vips: 1,
        max_backends: 2,
        ring_size: 7,
        conntrack_entries: 16,
        flow_cache_slots: 1,
    }
}

/// FNV-1a over the names and layouts both sides must agree on.
struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn str(&mut self, s: &str) {
        self.num(s.len() as u64);
        self.bytes(s.as_bytes());
    }
    fn num(&mut self, n: u64) {
        self.bytes(&n.to_le_bytes());
    }
    fn layout<T: Layout>(&mut self) {
        self.str(T::NAME);
        self.num(T::SIZE as u64);
        self.fields(T::FIELDS);
    }
    fn fields(&mut self, fields: &[Field]) {
        self.num(fields.len() as u64);
        for f in fields {
            self.str(f.name);
            self.num(f.offset as u64);
            self.num(f.size as u64);
        }
    }
}

/// This build's decapsulator layout, as the pin directory's name.
pub fn layout() -> String {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for m in MAPS {
        h.str(m);
    }
    for (m, kind) in MAP_TYPES {
        h.str(m);
        h.num(kind as u64);
    }
    h.layout::<DecapVipKey>();
    h.layout::<DecapTraffic>();
    h.layout::<DecapConfig>();
    h.layout::<NeighKey>();
    h.layout::<DecapHop>();
    for c in DecapCounter::ALL {
        h.str(c.name());
        h.num(u64::from(c.index()));
    }
    format!("{LAYOUT_PREFIX}{:016x}", h.0)
}

pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{instance}/{}", layout()))
}

/// Whether a data plane is attached from `dir` (a start adopts it).
pub fn is_attached(dir: &Path) -> bool {
    dir.join(LINK).exists()
}

/// Decapsulator pin directories of the same instance for other layouts.
fn other_layouts(dir: &Path) -> Vec<PathBuf> {
    crate::pinning::sibling_dirs(dir, |n| n.starts_with(LAYOUT_PREFIX))
}

/// The `DECAP_VIPS` key of an address.
pub fn key_of(ip: IpAddr) -> DecapVipKey {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            6
        }
    };
    DecapVipKey::new(addr, family)
}

/// The address of a key; `None` for a family the program never writes.
pub fn addr_of(k: &DecapVipKey) -> Option<IpAddr> {
    match k.family {
        4 => Some(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]).into()),
        6 => Some(Ipv6Addr::from(k.addr).into()),
        _ => None,
    }
}

/// One VIP's traffic, summed over CPUs, by the outer header's family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub ipv4: Outer,
    pub ipv6: Outer,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outer {
    /// Decapsulated and handed to the stack.
    pub packets: u64,
    /// Their frame bytes as received (outer headers included).
    pub bytes: u64,
    /// Sent on to a second hop.
    pub forwarded: u64,
}

/// The loaded decapsulator and its pins.
pub struct Decap {
    ebpf: Ebpf,
    dir: PathBuf,
    /// A running data plane was found and taken over.
    pub adopted: bool,
}

impl Decap {
    /// Loads `decap` against the maps pinned in `dir` (creating and pinning
    /// them on a first start). Nothing is attached yet.
    pub fn load(dir: &Path) -> Result<Decap> {
        if let Some(old) = other_layouts(dir).into_iter().find(|d| is_attached(d)) {
            bail!(
                "a decapsulator of another map layout is attached from {}, and this lbd (layout {}) \
                 cannot adopt its maps; `lbd --teardown` removes it (encapsulated traffic is then \
                 dropped until this lbd starts)",
                old.display(),
                layout()
            );
        }
        let adopted = is_attached(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut loader = EbpfLoader::new();
        dataplane::size_maps(&mut loader, &unused_balancer_maps())?;
        let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(BALANCER_OBJECT)
            .context("loading the XDP object against the pinned decapsulator maps")?;
        for (name, want) in MAP_TYPES {
            let pin = dir.join(name);
            let have = MapData::from_pin(&pin)
                .with_context(|| format!("opening pinned map {}", pin.display()))?
                .info()
                .with_context(|| format!("reading {}", pin.display()))?
                .map_type()
                .ok();
            if have != Some(want) {
                bail!(
                    "{name} is a {have:?} map in the object or its pin in {}, not the {want:?} this \
                     lbd expects: rebuild the object (`cargo xtask build-ebpf`) with this lbd",
                    dir.display()
                );
            }
        }
        dataplane::program_mut(&mut ebpf, DECAP_PROGRAM)?
            .load()
            .context("verifying the decap program")?;
        Ok(Decap {
            ebpf,
            dir: dir.to_owned(),
            adopted,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Attaches `decap`: swapped into the pinned link when adopting, else
    /// through a new link, which is then pinned.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<()> {
        pinning::attach_pinned(
            &mut self.ebpf,
            DECAP_PROGRAM,
            &self.dir.join(LINK),
            self.adopted,
            interface,
            mode,
        )
    }

    /// The kernel's id of this lbd's `decap` program (what the interface
    /// reports once it runs there).
    pub fn program_id(&mut self) -> Result<u32> {
        Ok(dataplane::program_mut(&mut self.ebpf, DECAP_PROGRAM)?
            .info()
            .context("reading the decap program's id")?
            .id())
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

    fn vips_mut(&mut self) -> Result<PerCpuHashMap<&mut MapData, DecapVipKey, DecapTraffic>> {
        PerCpuHashMap::try_from(self.map_mut(DECAP_VIPS)?)
            .with_context(|| format!("{DECAP_VIPS} is not a per-CPU hash of VIP keys"))
    }

    fn vips_map(&self) -> Result<PerCpuHashMap<&MapData, DecapVipKey, DecapTraffic>> {
        PerCpuHashMap::try_from(self.map(DECAP_VIPS)?)
            .with_context(|| format!("{DECAP_VIPS} is not a per-CPU hash of VIP keys"))
    }

    /// GUE's UDP port (0: GUE not accepted).
    pub fn set_gue_port(&mut self, gue_port: u16) -> Result<()> {
        let mut config: Array<_, DecapConfig> = Array::try_from(self.map_mut(DECAP_CONFIG)?)
            .with_context(|| format!("{DECAP_CONFIG} is not an array of DecapConfig"))?;
        config
            .set(
                0,
                DecapConfig {
                    gue_port,
                    ..DecapConfig::default()
                },
                0,
            )
            .with_context(|| format!("writing {DECAP_CONFIG}"))
    }

    /// The GUE port the running program reads.
    pub fn gue_port(&self) -> Result<u16> {
        let config: Array<_, DecapConfig> = Array::try_from(self.map(DECAP_CONFIG)?)
            .with_context(|| format!("{DECAP_CONFIG} is not an array of DecapConfig"))?;
        Ok(config
            .get(&0, 0)
            .with_context(|| format!("reading {DECAP_CONFIG}"))?
            .gue_port)
    }

    /// The VIPs the program serves now.
    pub fn vips(&self) -> Result<BTreeSet<IpAddr>> {
        let map = self.vips_map()?;
        let mut out = BTreeSet::new();
        for k in map.keys() {
            let k = k.with_context(|| format!("listing {DECAP_VIPS}"))?;
            if let Some(ip) = addr_of(&k) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    /// Serves `ip` from now on; a VIP already served keeps its counters
    /// (false: it was served already).
    pub fn add_vip(&mut self, ip: IpAddr) -> Result<bool> {
        let key = key_of(ip);
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| anyhow::Error::new(e).context(what))
            .context("counting the possible CPUs")?;
        let mut map = self.vips_mut()?;
        if map.get(&key, 0).is_ok() {
            return Ok(false);
        }
        let zero = PerCpuValues::try_from(vec![DecapTraffic::default(); cpus])
            .context("building per-CPU zeros")?;
        map.insert(key, zero, 0)
            .with_context(|| format!("adding VIP {ip} to {DECAP_VIPS}"))?;
        Ok(true)
    }

    /// Stops serving `ip`: its encapsulated packets are dropped (counted as
    /// `drop_not_vip`); its counters go (false: it was not served).
    pub fn remove_vip(&mut self, ip: IpAddr) -> Result<bool> {
        let mut map = self.vips_mut()?;
        match map.remove(&key_of(ip)) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing VIP {ip} from {DECAP_VIPS}")),
        }
    }

    /// What arrived for `ip`, summed over CPUs (zero for a VIP not served).
    pub fn traffic(&self, ip: IpAddr) -> Result<Traffic> {
        let map = self.vips_map()?;
        let per_cpu = match map.get(&key_of(ip), 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(Traffic::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {DECAP_VIPS}[{ip}]")),
        };
        let mut t = Traffic::default();
        for v in per_cpu.iter() {
            for (fam, out) in [(0, &mut t.ipv4), (1, &mut t.ipv6)] {
                out.packets += v.packets[fam];
                out.bytes += v.bytes[fam];
                out.forwarded += v.forwarded[fam];
            }
        }
        Ok(t)
    }

    /// Every counter of `DECAP_STATS`, summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(DECAP_STATS)?)
            .with_context(|| format!("{DECAP_STATS} is not a per-CPU array of u64"))?;
        let mut out = BTreeMap::new();
        for c in DecapCounter::ALL {
            let per_cpu = map
                .get(&c.index(), 0)
                .with_context(|| format!("reading {DECAP_STATS}[{}]", c.name()))?;
            out.insert(c.name(), per_cpu.iter().sum());
        }
        Ok(out)
    }

    fn hops_mut(&mut self) -> Result<HashMap<&mut MapData, NeighKey, DecapHop>> {
        HashMap::try_from(self.map_mut(DECAP_HOPS)?)
            .with_context(|| format!("{DECAP_HOPS} is not a hash of addresses to next hops"))
    }

    /// The second hops the program knows how to reach (or knows it
    /// cannot). An entry the LRU evicts while the keys are listed ends the
    /// listing early (the kernel restarts it from the first key); what is
    /// missed is found at the next listing.
    pub fn hops(&mut self) -> Result<BTreeSet<IpAddr>> {
        let map = self.hops_mut()?;
        let mut out = BTreeSet::new();
        for k in map.keys() {
            let k = k.with_context(|| format!("listing {DECAP_HOPS}"))?;
            if let Some(ip) = addr_of(&k)
                && !out.insert(ip)
            {
                break;
            }
        }
        Ok(out)
    }

    /// How many second hops `DECAP_HOPS` holds at most (its LRU evicts the
    /// least recently used past that).
    pub fn hops_capacity(&self) -> Result<usize> {
        let map: HashMap<&MapData, NeighKey, DecapHop> =
            HashMap::try_from(self.map(DECAP_HOPS)?)
                .with_context(|| format!("{DECAP_HOPS} is not a hash of addresses to next hops"))?;
        let info = map
            .map()
            .info()
            .with_context(|| format!("reading {DECAP_HOPS}'s size"))?;
        Ok(info.max_entries() as usize)
    }

    /// How the program reaches second hop `ip`: through `hop`, or (`None`)
    /// not at all, which it counts as `drop_no_route` without asking lbd
    /// again.
    pub fn set_hop(&mut self, ip: IpAddr, hop: Option<&NextHop>) -> Result<()> {
        let value = hop.map_or(DecapHop::default(), |h| DecapHop {
            dmac: h.mac,
            smac: h.src_mac,
            ifindex: h.ifindex,
        });
        self.hops_mut()?
            .insert(key_of(ip), value, 0)
            .with_context(|| format!("writing {DECAP_HOPS}[{ip}]"))
    }

    /// Forgets second hop `ip`: the program queues it again.
    pub fn remove_hop(&mut self, ip: IpAddr) -> Result<()> {
        match self.hops_mut()?.remove(&key_of(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {ip} from {DECAP_HOPS}")),
        }
    }

    fn neigh_mut(&mut self) -> Result<HashMap<&mut MapData, NeighKey, u64>> {
        HashMap::try_from(self.map_mut(DECAP_NEIGH)?)
            .with_context(|| format!("{DECAP_NEIGH} is not a hash of addresses"))
    }

    /// Second hops the program could not send to for want of a neighbour
    /// entry (at most `limit` of them).
    pub fn unresolved(&mut self, limit: usize) -> Result<Vec<IpAddr>> {
        let map = self.neigh_mut()?;
        let mut out = Vec::new();
        for k in map.keys().take(limit) {
            let k = k.with_context(|| format!("listing {DECAP_NEIGH}"))?;
            if let Some(ip) = addr_of(&k) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// Forgets a second hop the kernel was asked to resolve.
    pub fn resolved(&mut self, ip: IpAddr) -> Result<()> {
        let mut map = self.neigh_mut()?;
        match map.remove(&key_of(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {ip} from {DECAP_NEIGH}")),
        }
    }
}

/// Removes every decapsulator pin of the instance, every layout: the link
/// goes (the program detaches once no lbd holds it) and the maps are freed.
/// The instance directory goes too when nothing else (a balancer of the
/// same name) lives there.
pub fn unpin(instance: &str) -> Result<bool> {
    let dir = pin_dir(instance);
    let mut removed = false;
    for d in other_layouts(&dir).into_iter().chain([dir.clone()]) {
        removed |= crate::pinning::teardown_one(&d)?;
    }
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}

/// Undoes a fresh start that failed: this layout's pins. Best effort.
pub fn discard(dir: &Path) {
    match crate::pinning::teardown_one(dir) {
        Ok(true) => tracing::info!(pins = %dir.display(), "failed start: pins removed"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %format!("{e:#}"), "failed start: removing the pins"),
    }
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_both_families() {
        for ip in ["198.18.100.1", "fd00:198:18:100::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let k = key_of(ip);
            assert_eq!(addr_of(&k), Some(ip));
            assert_eq!(k.family, if ip.is_ipv4() { 4 } else { 6 });
        }
        assert_eq!(key_of("198.18.100.1".parse().unwrap()).addr[4..], [0; 12]);
    }

    #[test]
    fn the_layout_names_a_directory_of_its_own() {
        let l = layout();
        assert!(l.starts_with(LAYOUT_PREFIX), "{l}");
        assert_eq!(l.len(), LAYOUT_PREFIX.len() + 16);
        assert_eq!(l, layout(), "stable");
        // Not a name the balancer's pinning takes for one of its layouts,
        // so neither role's teardown removes the other's pins.
        assert_ne!(l, pinning::layout());
    }

    #[test]
    fn another_layout_in_service_is_refused_before_touching_the_kernel() {
        let root = std::env::temp_dir().join(format!("lb-decap-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let old = root.join("decap-0123456789abcdef");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join(LINK), b"").unwrap();
        let dir = root.join(layout());
        let msg = format!("{:#}", Decap::load(&dir).err().expect("refused"));
        assert!(msg.contains("another map layout"), "{msg}");
        assert!(!dir.exists(), "nothing created for the new layout");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
