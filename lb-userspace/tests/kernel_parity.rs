//! The kernel program and the host policy agree. Rounds of random map
//! states (VIPs, rings, ring states, backend states, connection-table
//! entries, flow-cache entries), each written into the real maps and into
//! the host model (`lb_common::policy::model`), then random packets
//! (SYN, SYN-ACK, ACK, FIN, RST, UDP, ICMP too-big; to VIPs and not)
//! through both: every packet's verdict, backend and counters must match,
//! and after every round the connection table and the flow cache must hold
//! the same flows.
//!
//! The seed is printed; `LB_PARITY_SEED=<n>` replays a run.

mod kernel;

use std::collections::BTreeMap;

use aya::maps::PerCpuValues;
use kernel::{Harness, XDP_DROP, XDP_PASS, XDP_TX, delta};
use lb_common::{
    conntrack::{self, ticks},
    flowcache::{CachedFlow, slot_of},
    maps::{
        BackendInfo, BackendState, Family, FlowKey, LbConfig, Mode, RingState, VipInfo, VipKey,
    },
    parse::{IPPROTO_TCP, IPPROTO_UDP, parse},
    policy::{
        self, Kind, Verdict,
        model::{Model, ModelSizes},
    },
    ring::RING_CHUNK,
    stats::Counter,
    testframe::{self, FrameSpec, L4},
    wire::tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use lb_userspace::{
    dataplane::MapSizes,
    maps::{
        BACKENDS, CONFIG, CONNTRACK, CONNTRACK_HEADS, FLOW_CACHE, RINGS, VIP_FILTER, VIP_TABLE,
        VIP_TABLE_GEN,
    },
    programming,
};

const ROUNDS: usize = 100;
const PACKETS_PER_ROUND: usize = 110;
const RING: u32 = 13;
const MAX_VIPS: u32 = 8;
const MAX_BACKENDS: u32 = 16;
const CONNTRACK_ENTRIES: u32 = 64;
const CACHE_SLOTS: u32 = 32;
const UDP_TIMEOUT_S: u64 = 30;
const SECOND_TICKS: u32 = (1_000_000_000u64 >> conntrack::TICK_SHIFT) as u32;

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    lb_common::parse::v4_in_16(a)
}

fn addr(family: Family, host: u8, net: u8) -> [u8; 16] {
    match family {
        Family::V4 => v4([198, 18, net, host]),
        Family::V6 => {
            let mut a = [0xfd, 0, 1, 0x98, 0, 0x18, 0, net, 0, 0, 0, 0, 0, 0, 0, host];
            a[7] = net;
            a
        }
    }
}

/// Each backend's MAC ends in its id, so the frame out names the backend
/// whatever the mode. Ids 1-4 are IPv4, 5-8 IPv6.
fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0xc6, 0x12, 0x01, id as u8]
}

/// The VIPs of every round: address, port, protocol (port 0 = every port).
const VIP_SHAPES: &[(u8, u16, u8)] = &[
    (1, 80, IPPROTO_TCP),
    (1, 53, IPPROTO_UDP),
    (2, 0, IPPROTO_TCP),
    (1, 0, IPPROTO_TCP),
];

struct Vip {
    key: VipKey,
    id: u32,
    family: Family,
}

fn vips() -> Vec<Vip> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        for &(host, port, proto) in VIP_SHAPES {
            out.push(Vip {
                key: VipKey {
                    addr: addr(family, host, 100),
                    port,
                    proto,
                    family: family.wire(),
                },
                id: out.len() as u32,
                family,
            });
        }
    }
    out
}

/// Backend ids a flow may name (0: none): an IPv4 flow never an IPv6
/// backend, a tunnel the data plane does not build (its drop is the
/// forwarding stage's, not the policy's).
fn backend_ids(f: &FlowKey) -> &'static [u32] {
    if f.family == Family::V4.wire() {
        &[0, 1, 2, 3, 4]
    } else {
        &[0, 1, 2, 3, 4, 5, 6, 7, 8]
    }
}

/// A random state, built in the model.
fn random_state(rng: &mut Rng, m: &mut Model, vips: &[Vip], flows: &[FlowKey], now_ns: u64) {
    let now = ticks(now_ns);
    for id in 1..MAX_BACKENDS {
        let (family, host) = if id <= 4 {
            (Family::V4, 20 + id as u8)
        } else {
            (Family::V6, 20 + id as u8)
        };
        let state = if id > 8 {
            BackendState::Unused
        } else {
            rng.pick(&[
                BackendState::Up,
                BackendState::Up,
                BackendState::Up,
                BackendState::Down,
                BackendState::Draining,
                BackendState::Unused,
            ])
        };
        let vip_id = if rng.chance(85) {
            lb_common::maps::BACKEND_ANY_VIP
        } else {
            rng.below(MAX_VIPS as u64) as u32
        };
        m.backends[id as usize] = BackendInfo {
            addr: addr(family, host, 0),
            family: family.wire(),
            state: state.wire(),
            next_hop_mac: backend_mac(id),
            src_mac: testframe::LB_MAC,
            _pad: [0; 2],
            ifindex: 0,
            vip_id,
        };
    }
    // Some VIPs present, each with random rings (IPv4 VIPs only over IPv4
    // backends: 4in6 is not a tunnel the data plane builds).
    let mut present: Vec<(VipKey, VipInfo)> = Vec::new();
    for v in vips {
        if rng.chance(85) {
            let mode = if rng.chance(70) {
                Mode::Ipip
            } else {
                Mode::L2dsr
            };
            present.push((v.key, VipInfo::new(v.id, mode)));
        }
    }
    m.set_vips(&present).unwrap();
    for v in vips {
        let ids: &[u32] = match v.family {
            Family::V4 => &[0, 1, 2, 3, 4],
            Family::V6 => &[0, 1, 2, 5, 6, 7, 8],
        };
        for generation in 0..2 {
            let fill = rng.below(3);
            let mut ring = Vec::new();
            for _ in 0..RING {
                ring.push(match fill {
                    0 => 0,
                    _ if rng.chance(15) => 0,
                    _ => rng.pick(&ids[1..]),
                });
            }
            m.write_ring(v.id, generation, &ring);
        }
        let until = match rng.below(3) {
            0 => 0,
            1 => now_ns + 600_000_000_000,
            _ => now_ns.saturating_sub(600_000_000_000).max(2),
        };
        m.ring_states[v.id as usize] = RingState::new(rng.below(2) as u8, until);
    }
    // Entries for some of the flows: fresh, idle a while, or long idle (UDP
    // expired, TCP past the idle timeout); embryonic or established; some
    // closing.
    m.table = lb_common::policy::model::VecTable::new(CONNTRACK_ENTRIES / conntrack::WAYS);
    for f in flows {
        if !rng.chance(45) {
            continue;
        }
        let age = match rng.below(3) {
            0 => 0,
            1 => rng.below(10) as u32 * SECOND_TICKS,
            _ => (UDP_TIMEOUT_S as u32 + 5 + rng.below(60) as u32) * SECOND_TICKS,
        };
        let at = now.wrapping_sub(age);
        let p = conntrack::probe(f, m.config.conntrack_seed, m.config.conntrack_bucket_mask);
        let timeouts =
            conntrack::Timeouts::of(m.config.udp_timeout_ns, m.config.tcp_idle_timeout_ns);
        let Some((conntrack::Placement::Way { idx, .. }, _)) =
            conntrack::own_or_place(&m.table, f, &p, now, timeouts, true)
        else {
            continue;
        };
        let backend = rng.pick(backend_ids(f));
        conntrack::fill(&mut m.table, idx, f, &p, backend, at).unwrap();
        let established = rng.chance(60);
        if established || rng.chance(15) {
            conntrack::touch(&mut m.table, idx, at, rng.chance(15), established).unwrap();
        }
    }
    // Cache entries: current, stale, near a refresh, or of another flow.
    m.cache = vec![std::cell::Cell::new(CachedFlow::default()); CACHE_SLOTS as usize];
    // An entry of the live epoch exists only for an address the live VIP
    // table holds (entries are made after the VIP lookup, and a table change
    // starts a new epoch), which the data plane's VIP-address filter relies
    // on; entries of other addresses get a stale epoch.
    let slots = m.config.vip_slots as usize;
    let live_base = (m.epoch & 1) as usize * slots;
    let live = &m.vip_table[live_base..live_base + slots];
    for f in flows {
        if f.proto != IPPROTO_TCP || !rng.chance(35) {
            continue;
        }
        let slot = (slot_of(f) & (CACHE_SLOTS - 1)) as usize;
        let vip = vips
            .iter()
            .find(|v| v.key.addr == f.dst)
            .map_or(0, |v| v.id);
        m.cache[slot].set(CachedFlow {
            key: *f,
            backend_id: rng.pick(backend_ids(f)),
            hits: if rng.chance(20) {
                31
            } else {
                rng.below(40) as u32
            },
            vip_epoch: if rng.chance(80)
                && live
                    .iter()
                    .any(|s| s.key.family != 0 && s.key.addr == f.dst)
            {
                m.epoch
            } else {
                m.epoch ^ 2
            },
            vip_id: if rng.chance(90) {
                vip
            } else {
                rng.below(MAX_VIPS as u64) as u32
            },
            mode: rng.pick(&[Mode::Ipip, Mode::L2dsr]).wire(),
            _pad: [0; 7],
        });
    }
}

/// The flows of a round: to VIPs (exact ports, port-0 VIPs) and not, both
/// families, TCP and UDP, a few clients and ports.
fn random_flows(rng: &mut Rng) -> Vec<FlowKey> {
    (0..40)
        .map(|_| {
            let family = if rng.chance(50) {
                Family::V4
            } else {
                Family::V6
            };
            let (host, port, proto) = match rng.below(6) {
                0 => (1, 80, IPPROTO_TCP),
                1 => (1, 53, IPPROTO_UDP),
                2 => (2, 22 + rng.below(3) as u16, IPPROTO_TCP),
                3 => (1, 81, IPPROTO_TCP),
                4 => (1, 54, IPPROTO_UDP),
                _ => (9, 80, IPPROTO_TCP),
            };
            FlowKey {
                src: addr(family, 10 + rng.below(3) as u8, 0),
                dst: addr(family, host, 100),
                src_port: 40_000 + rng.below(4) as u16,
                dst_port: port,
                proto,
                family: family.wire(),
                _pad: [0; 2],
            }
        })
        .collect()
}

/// A frame of flow `f`: `Kind` picks the TCP flags, or an ICMP too-big
/// error quoting the flow's reply.
fn frame(f: &FlowKey, kind: Kind) -> Vec<u8> {
    let v6 = f.family == Family::V6.wire();
    let ip = |a: &[u8; 16]| if v6 { a.to_vec() } else { a[..4].to_vec() };
    let l4 = |flags: u8, reply: bool| {
        let (s, d) = if reply {
            (f.dst_port, f.src_port)
        } else {
            (f.src_port, f.dst_port)
        };
        if f.proto == IPPROTO_UDP {
            L4::Udp {
                src_port: s,
                dst_port: d,
            }
        } else {
            L4::Tcp {
                src_port: s,
                dst_port: d,
                flags,
            }
        }
    };
    let spec = |src: &[u8; 16], dst: &[u8; 16], l4| FrameSpec {
        src_ip: ip(src),
        dst_ip: ip(dst),
        l4,
        ..if v6 {
            FrameSpec::v6_tcp([0; 16], [0; 16], 0, 0)
        } else {
            FrameSpec::v4_tcp([0; 4], [0; 4], 0, 0)
        }
    };
    match kind {
        Kind::Tcp { flags } => testframe::build(&spec(&f.src, &f.dst, l4(flags, false))),
        Kind::Udp => testframe::build(&spec(&f.src, &f.dst, l4(0, false))),
        Kind::IcmpTooBig => {
            let reply = testframe::build(&spec(&f.dst, &f.src, l4(TCP_ACK, true)));
            if v6 {
                testframe::icmp6_too_big(&reply, addr(Family::V6, 1, 0), f.dst, 1280)
            } else {
                let d: [u8; 4] = f.dst[..4].try_into().unwrap();
                testframe::icmp_too_big(&reply, [198, 18, 0, 1], d, 1400)
            }
        }
    }
}

fn random_kind(rng: &mut Rng, f: &FlowKey) -> Kind {
    if rng.chance(12) {
        return Kind::IcmpTooBig;
    }
    if f.proto == IPPROTO_UDP {
        return Kind::Udp;
    }
    let flags = rng.pick(&[
        TCP_SYN,
        TCP_SYN | TCP_ACK,
        TCP_ACK,
        TCP_ACK,
        TCP_ACK,
        TCP_ACK,
        TCP_FIN | TCP_ACK,
        TCP_RST,
    ]);
    Kind::Tcp { flags }
}

/// Writes the model's state into the kernel's maps.
fn write_kernel(h: &mut Harness, m: &Model) {
    {
        let mut t = VIP_TABLE.array_mut(&mut h.ebpf).unwrap();
        for (i, s) in m.vip_table.iter().enumerate() {
            t.set(i as u32, *s, 0).unwrap();
        }
    }
    VIP_TABLE_GEN
        .array_mut(&mut h.ebpf)
        .unwrap()
        .set(0, m.epoch, 0)
        .unwrap();
    // What lbd keeps: the filter admits every address either generation
    // names (the model has no filter: its exact lookup decides).
    {
        let addrs = m.vip_table.iter().filter(|s| s.key.family != 0);
        let filter = lb_common::vipfilter::build(addrs.map(|s| &s.key.addr));
        let mut f = VIP_FILTER.array_mut(&mut h.ebpf).unwrap();
        for (i, w) in filter.iter().enumerate() {
            f.set(i as u32, *w, 0).unwrap();
        }
    }
    for (id, s) in m.ring_states.iter().enumerate() {
        programming::store_ring_state(&h.ebpf, id as u32, *s).unwrap();
    }
    {
        let mut r = RINGS.array_mut(&mut h.ebpf).unwrap();
        for (i, c) in m.rings.iter().enumerate() {
            r.set(i as u32, *c, 0).unwrap();
        }
    }
    {
        let mut b = BACKENDS.array_mut(&mut h.ebpf).unwrap();
        for (i, info) in m.backends.iter().enumerate() {
            b.set(i as u32, *info, 0).unwrap();
        }
    }
    {
        let mut t = CONNTRACK.array_mut(&mut h.ebpf).unwrap();
        for (i, s) in m.table.slots.iter().enumerate() {
            t.set(i as u32, *s, 0).unwrap();
        }
    }
    {
        let mut t = CONNTRACK_HEADS.array_mut(&mut h.ebpf).unwrap();
        for (i, s) in m.table.heads.iter().enumerate() {
            t.set(i as u32, *s, 0).unwrap();
        }
    }
    let cpus = aya::util::nr_cpus().unwrap();
    let mut c = FLOW_CACHE.per_cpu_mut(&mut h.ebpf).unwrap();
    for (i, e) in m.cache.iter().enumerate() {
        // The tests run on CPU 0 (see `kernel::Harness`).
        let mut values = vec![CachedFlow::default(); cpus];
        values[0] = e.get();
        c.set(i as u32, PerCpuValues::try_from(values).unwrap(), 0)
            .unwrap();
    }
}

/// The flows the connection table holds, as (key, backend, closing) in
/// slot order, and the cache's (key, backend, hits, epoch, vip, mode):
/// what both sides must agree on (clock stamps aside).
type TableView = Vec<Option<(FlowKey, u32, u8)>>;
type CacheView = Vec<(FlowKey, u32, u32, u32, u32, u8)>;

fn model_view(m: &Model) -> (TableView, CacheView) {
    (
        m.table
            .slots
            .iter()
            .map(|s| (s.key.family != 0).then_some((s.key, s.backend_id, s.flags)))
            .collect(),
        m.cache
            .iter()
            .map(|c| c.get())
            .map(|c| (c.key, c.backend_id, c.hits, c.vip_epoch, c.vip_id, c.mode))
            .collect(),
    )
}

fn kernel_view(h: &Harness) -> (TableView, CacheView) {
    let t = CONNTRACK.array(&h.ebpf).unwrap();
    let table = (0..t.len())
        .map(|i| {
            let s = t.get(&i, 0).unwrap();
            (s.key.family != 0).then_some((s.key, s.backend_id, s.flags))
        })
        .collect();
    let c = FLOW_CACHE.per_cpu(&h.ebpf).unwrap();
    let cache = (0..c.len())
        .map(|i| {
            let e = c.get(&i, 0).unwrap()[0];
            (e.key, e.backend_id, e.hits, e.vip_epoch, e.vip_id, e.mode)
        })
        .collect();
    (table, cache)
}

/// The model's counters for what the policy counts (parse outcomes and
/// verdicts are the program's, outside the policy).
fn model_counts(m: &Model) -> BTreeMap<&'static str, u64> {
    Counter::ALL
        .iter()
        .filter(|c| m.counter(**c) != 0)
        .map(|c| (c.name(), m.counter(*c)))
        .collect()
}

fn policy_part(d: BTreeMap<&'static str, u64>) -> BTreeMap<&'static str, u64> {
    d.into_iter()
        .filter(|(k, _)| !k.starts_with("parse_") && !k.starts_with("verdict_"))
        .collect()
}

#[test]
fn kernel_and_host_policy_agree_on_random_packets_and_states() {
    let seed: u64 = std::env::var("LB_PARITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| programming::monotonic_ns() | 1);
    eprintln!("parity seed {seed} (LB_PARITY_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let mut h = Harness::load_with(&MapSizes {
        max_vips: MAX_VIPS,
        max_backends: MAX_BACKENDS,
        ring_size: RING,
        conntrack_entries: CONNTRACK_ENTRIES,
        flow_cache_slots: CACHE_SLOTS,
    });
    programming::set_config(
        &mut h.ebpf,
        &LbConfig {
            encap_src_v4: [198, 18, 0, 2],
            encap_src_v6: addr(Family::V6, 2, 0),
            hash_seed: 0x5eed,
            ring_size: RING,
            udp_timeout_ns: UDP_TIMEOUT_S * 1_000_000_000,
            // Short enough that some random entries are past it.
            tcp_idle_timeout_ns: 60_000_000_000,
            ..LbConfig::default()
        },
    )
    .unwrap();
    let cfg = CONFIG.array(&h.ebpf).unwrap().get(&0, 0).unwrap();
    assert_eq!(RING_CHUNK, 16);
    let vips = vips();
    let mut compared = 0usize;
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut m = Model::new(
            ModelSizes {
                max_vips: MAX_VIPS,
                max_backends: MAX_BACKENDS,
                ring_size: RING,
                conntrack_buckets: CONNTRACK_ENTRIES / conntrack::WAYS,
                flow_cache_slots: CACHE_SLOTS,
            },
            cfg,
        );
        assert_eq!(m.config, cfg, "the model derives the sizes the kernel has");
        m.epoch = VIP_TABLE_GEN.array(&h.ebpf).unwrap().get(&0, 0).unwrap();
        let flows = random_flows(&mut rng);
        random_state(&mut rng, &mut m, &vips, &flows, programming::monotonic_ns());
        write_kernel(&mut h, &m);
        assert_eq!(
            model_view(&m),
            kernel_view(&h),
            "round {round}: state written"
        );
        for n in 0..PACKETS_PER_ROUND {
            let f = rng.pick(&flows);
            let kind = random_kind(&mut rng, &f);
            let bytes = frame(&f, kind);
            let parsed = parse(&bytes[..]).unwrap();
            let (key, classified) = policy::classify(&bytes[..], &parsed)
                .expect("every generated packet is one the policy classifies");
            assert_eq!(classified, kind);
            let before = h.counters();
            m.reset_counters();
            let t0 = programming::monotonic_coarse_ns();
            m.now_ticks = ticks(t0);
            m.now_ns = programming::monotonic_ns();
            let out = h.run(&bytes);
            let t1 = programming::monotonic_coarse_ns();
            let cfg_now = m.config;
            let d = policy::decide(&m, &cfg_now, m.epoch, &key, kind);
            let ctx = || format!("seed {seed} round {round} packet {n}: {kind:?} {key:?}");
            let label = format!(
                "{}/{}",
                match d.verdict {
                    Verdict::Forward(_) => "forward",
                    Verdict::Pass(_) => "pass",
                    Verdict::Drop(_) => "drop",
                },
                d.via.map_or("-", |v| v.label())
            );
            *kinds.entry(label).or_default() += 1;
            match d.verdict {
                Verdict::Forward(fwd) => {
                    assert_eq!(out.verdict, XDP_TX, "{}: verdict", ctx());
                    assert_eq!(
                        out.frame[..6],
                        backend_mac(fwd.backend_id),
                        "{}: backend (host policy says {})",
                        ctx(),
                        fwd.backend_id
                    );
                }
                Verdict::Pass(_) => assert_eq!(out.verdict, XDP_PASS, "{}: verdict", ctx()),
                Verdict::Drop(_) => assert_eq!(out.verdict, XDP_DROP, "{}: verdict", ctx()),
            }
            let plan = match d.verdict {
                Verdict::Forward(f) => Some(f.plan),
                _ => None,
            };
            if let Some(plan) = plan {
                let epoch = m.epoch;
                policy::apply(&mut m, &cfg_now, epoch, &key, &plan);
            }
            assert_eq!(
                model_counts(&m),
                policy_part(delta(&before, &h.counters())),
                "{}: counters",
                ctx()
            );
            if ticks(t0) != ticks(t1) {
                // The kernel's clock may have read the next tick: take its
                // state rather than compare stamps across the boundary.
                read_back(&h, &mut m);
            }
            compared += 1;
        }
        assert_eq!(
            model_view(&m),
            kernel_view(&h),
            "seed {seed} round {round}: connection table and flow cache after the round"
        );
    }
    eprintln!("{compared} packets compared: {kinds:?}");
    assert!(compared >= 10_000);
    // Every kind of decision was exercised.
    for want in [
        "forward/flow_cache",
        "forward/conntrack",
        "forward/second_chance",
        "forward/ring_syn",
        "forward/ring_no_entry",
        "forward/ring_repick",
        "forward/ring_udp_expired",
        "pass/-",
        "drop/ring_no_entry",
    ] {
        assert!(
            kinds.get(want).is_some_and(|n| *n > 0),
            "no {want} among {kinds:?}"
        );
    }
}

/// Takes the kernel's connection table and cache into the model.
fn read_back(h: &Harness, m: &mut Model) {
    let t = CONNTRACK.array(&h.ebpf).unwrap();
    for (i, s) in m.table.slots.iter_mut().enumerate() {
        *s = t.get(&(i as u32), 0).unwrap();
    }
    let heads = CONNTRACK_HEADS.array(&h.ebpf).unwrap();
    for (i, s) in m.table.heads.iter_mut().enumerate() {
        *s = heads.get(&(i as u32), 0).unwrap();
    }
    let c = FLOW_CACHE.per_cpu(&h.ebpf).unwrap();
    for (i, e) in m.cache.iter().enumerate() {
        e.set(c.get(&(i as u32), 0).unwrap()[0]);
    }
}
