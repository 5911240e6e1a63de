//! The per-packet policy over the host model: a random but valid map state
//! (what lbd could have written, plus the torn and stale entries the data
//! plane must live with) and a run of packets, each parsed from a real
//! frame, decided and applied, with what can be checked cheaply checked
//! after every step.

use std::collections::BTreeSet;

use lb_common::{
    conntrack::{self, ConnSlot, Placement, Timeouts, ticks},
    flowcache::{CachedFlow, REFRESH_EVERY, slot_of},
    maglev::{self, MaglevBackend},
    maps::{
        BACKEND_ANY_VIP, BackendInfo, BackendState, Family, FlowKey, LbConfig, Mode, RingState,
        VipInfo, VipKey,
    },
    parse::{IPPROTO_TCP, IPPROTO_UDP, parse},
    policy::{
        self, Entry, Kind, Maps, Plan, Update, Verdict, Via,
        model::{Model, ModelSizes},
    },
    ring::flow_slot,
    stats::Counter,
    testframe::{self, FrameSpec, L4},
    wire::tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::Reader;

/// Primes, as the configuration requires; small, so flows share slots.
const RING_SIZES: &[u32] = &[2, 3, 5, 7, 13, 17, 31, 37];
const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;
const DAY: u64 = 86_400 * S;
/// Packets per input: enough for a flow's handshake, data and close.
const MAX_STEPS: usize = 64;

struct Vip {
    key: VipKey,
    id: u32,
    mode: Mode,
}

/// What a run reached (verdicts, ways, writes), for choosing seeds.
pub type Reached = BTreeSet<String>;

fn family(v6: bool) -> Family {
    if v6 { Family::V6 } else { Family::V4 }
}

/// `198.18.<net>.<host>` or `fd00:198:18:<net>::<host>`.
pub fn host(f: Family, net: u8, host: u8) -> [u8; 16] {
    match f {
        Family::V4 => lb_common::parse::v4_in_16([198, 18, net, host]),
        Family::V6 => [0xfd, 0, 1, 0x98, 0, 0x18, 0, net, 0, 0, 0, 0, 0, 0, 0, host],
    }
}

/// A flow from a small pool of clients, VIP addresses and ports, so that
/// packets meet the VIPs, entries and cache slots the state holds.
fn flow(r: &mut Reader) -> FlowKey {
    let f = family(r.bool());
    let src = host(f, 0, 10 + r.below(3) as u8);
    // Hosts 1-3 of net 100 may be VIPs; 9 never is.
    let dst = host(f, 100, r.pick(&[1u8, 2, 3, 9]));
    let src_port = match r.below(3) {
        0 => 40_000,
        1 => 40_001,
        _ => r.u16(),
    };
    let dst_port = match r.below(4) {
        0 => 80,
        1 => 53,
        2 => 22,
        _ => r.u16(),
    };
    FlowKey {
        src,
        dst,
        src_port,
        dst_port,
        proto: if r.bool() { IPPROTO_UDP } else { IPPROTO_TCP },
        family: f.wire(),
        _pad: [0; 2],
    }
}

fn kind(r: &mut Reader, key: &FlowKey) -> Kind {
    if r.below(8) == 0 {
        Kind::IcmpTooBig
    } else if key.proto == IPPROTO_UDP {
        Kind::Udp
    } else {
        let flags = match r.below(7) {
            0 => TCP_SYN,
            1 => TCP_SYN | TCP_ACK,
            2 | 3 => TCP_ACK,
            4 => TCP_FIN | TCP_ACK,
            5 => TCP_RST,
            _ => r.u8(),
        };
        Kind::Tcp { flags }
    }
}

/// The frame the data plane would receive for a packet of `key`: the
/// client's packet, or a router's too-big error quoting the VIP's reply.
fn frame(key: &FlowKey, kind: Kind) -> Vec<u8> {
    let v6 = key.family == Family::V6.wire();
    let ip = |a: &[u8; 16]| if v6 { a.to_vec() } else { a[..4].to_vec() };
    let spec = |src: &[u8; 16], dst: &[u8; 16], sport, dport, flags| FrameSpec {
        src_mac: testframe::CLIENT_MAC,
        dst_mac: testframe::LB_MAC,
        vlan: None,
        src_ip: ip(src),
        dst_ip: ip(dst),
        ttl: 64,
        tos: 0,
        ipv4_options: 0,
        l4: if key.proto == IPPROTO_UDP {
            L4::Udp {
                src_port: sport,
                dst_port: dport,
            }
        } else {
            L4::Tcp {
                src_port: sport,
                dst_port: dport,
                flags,
            }
        },
        payload: b"fuzz".to_vec(),
    };
    match kind {
        Kind::Tcp { flags } => {
            testframe::build(&spec(&key.src, &key.dst, key.src_port, key.dst_port, flags))
        }
        Kind::Udp => testframe::build(&spec(&key.src, &key.dst, key.src_port, key.dst_port, 0)),
        Kind::IcmpTooBig => {
            let reply = testframe::build(&spec(
                &key.dst,
                &key.src,
                key.dst_port,
                key.src_port,
                TCP_ACK,
            ));
            let router = host(family(v6), 1, 1);
            if v6 {
                testframe::icmp6_too_big(&reply, router, key.dst, 1280)
            } else {
                let four = |a: [u8; 16]| [a[0], a[1], a[2], a[3]];
                testframe::icmp_too_big(&reply, four(router), four(key.dst), 1400)
            }
        }
    }
}

/// The harness: a model built from the input's head, then steps until the
/// input runs out. Panics on any broken invariant.
pub fn run(data: &[u8]) -> Reached {
    let mut reached = Reached::new();
    let mut r = Reader::new(data);
    let Some(mut h) = Harness::new(&mut r) else {
        reached.insert("state refused".into());
        return reached;
    };
    for _ in 0..MAX_STEPS {
        if r.is_empty() {
            break;
        }
        match r.below(16) {
            0 => h.raw_apply(&mut r),
            1 => {
                let step = match r.below(4) {
                    0 => MS,
                    1 => S,
                    2 => 31 * S,
                    _ => r.u64(),
                };
                h.set_clock(h.m.now_ns.wrapping_add(step));
            }
            _ => h.packet(&mut r, &mut reached),
        }
    }
    reached
}

struct Harness {
    m: Model,
    vips: Vec<Vip>,
}

impl Harness {
    /// `None` for a VIP set lbd would refuse (the VIP table too crowded).
    fn new(r: &mut Reader) -> Option<Harness> {
        let max_vips = 1 + r.below(8) as u32;
        let max_backends = 2 + r.below(15) as u32;
        let ring_size = r.pick(RING_SIZES);
        let sizes = ModelSizes {
            max_vips,
            max_backends,
            ring_size,
            conntrack_buckets: 1 << r.below(5),
            flow_cache_slots: 1 << r.below(7),
        };
        let config = LbConfig {
            hash_seed: r.u32(),
            conntrack_seed: r.u64(),
            udp_timeout_ns: r.pick(&[MS, 30 * S, DAY]),
            tcp_idle_timeout_ns: r.pick(&[0, 60 * S, 3600 * S, DAY]),
            ..LbConfig::default()
        };
        let mut m = Model::new(sizes, config);
        let mut vips: Vec<Vip> = Vec::new();
        let now_ns = match r.below(3) {
            0 => 1 << 42,
            1 => u64::MAX - 5 * S,
            _ => r.u64(),
        };
        m.now_ns = now_ns;
        m.now_ticks = ticks(now_ns);
        for id in 1..max_backends {
            let f = family(r.bool());
            let state = match r.below(8) {
                0..=3 => BackendState::Up.wire(),
                4 => BackendState::Down.wire(),
                5 => BackendState::Draining.wire(),
                6 => BackendState::Unused.wire(),
                // A byte no version of lbd writes reads as unused.
                _ => r.u8(),
            };
            let vip_id = if r.below(4) != 0 {
                BACKEND_ANY_VIP
            } else {
                r.below(max_vips as usize + 1) as u32
            };
            m.backends[id as usize] = BackendInfo {
                addr: host(f, 0, 20 + id as u8),
                family: f.wire(),
                state,
                vip_id,
                ..BackendInfo::default()
            };
        }
        for i in 0..r.below(max_vips as usize + 1) {
            let f = family(r.bool());
            let key = VipKey {
                addr: host(f, 100, 1 + r.below(3) as u8),
                port: match r.below(4) {
                    0 => 80,
                    1 => 53,
                    2 => 0,
                    _ => r.u16(),
                },
                proto: if r.bool() { IPPROTO_UDP } else { IPPROTO_TCP },
                family: f.wire(),
            };
            let mode = r.pick(&[Mode::L2dsr, Mode::Ipip, Mode::Gue]);
            if vips.iter().all(|v| v.key != key) {
                vips.push(Vip {
                    key,
                    id: i as u32,
                    mode,
                });
            }
        }
        let table: Vec<_> = vips
            .iter()
            .map(|v| (v.key, VipInfo::new(v.id, v.mode)))
            .collect();
        // Earlier sets leave the idle generation holding other VIPs.
        for _ in 0..r.below(3) {
            let keep = r.u8();
            let some: Vec<_> = table
                .iter()
                .enumerate()
                .filter(|(i, _)| keep >> (i % 8) & 1 == 1)
                .map(|(_, v)| *v)
                .collect();
            m.set_vips(&some).ok()?;
        }
        m.set_vips(&table).ok()?;
        for vip_id in 0..max_vips {
            for generation in 0..2 {
                let ring = ring(r, &m, ring_size, max_backends);
                m.write_ring(vip_id, generation, &ring);
            }
            let until = match r.below(4) {
                0 => 0,
                1 => now_ns.saturating_add(60 * S),
                2 => now_ns.saturating_sub(S),
                _ => r.u64(),
            };
            m.ring_states[vip_id as usize] = RingState::new(r.u8(), until);
        }
        let mut h = Harness { m, vips };
        h.entries(r);
        h.cache_entries(r);
        Some(h)
    }

    fn backend_id(&self, r: &mut Reader) -> u32 {
        // One past the map too: a lookup that finds nothing.
        r.below(self.m.backends.len() + 1) as u32
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts::of(
            self.m.config.udp_timeout_ns,
            self.m.config.tcp_idle_timeout_ns,
        )
    }

    fn set_clock(&mut self, now_ns: u64) {
        self.m.now_ns = now_ns;
        self.m.now_ticks = ticks(now_ns);
    }

    /// Connection-table entries of every age and class, some closing; then
    /// a few slots overwritten with another flow's fields or garbage, as a
    /// torn or racing write leaves them.
    fn entries(&mut self, r: &mut Reader) {
        let cfg = self.m.config;
        let second = ticks(S);
        for _ in 0..r.below(12) {
            let key = flow(r);
            let p = conntrack::probe(&key, cfg.conntrack_seed, cfg.conntrack_bucket_mask);
            let age = match r.below(4) {
                0 => 0,
                1 => r.below(16) as u32 * second,
                2 => ticks(cfg.udp_timeout_ns).saturating_add(5 * second),
                _ => r.u32(),
            };
            let at = self.m.now_ticks.wrapping_sub(age);
            let backend = self.backend_id(r);
            let placed =
                conntrack::own_or_place(&self.m.table, &key, &p, at, self.timeouts(), r.bool());
            if let Some((Placement::Way { idx, .. }, _)) = placed {
                conntrack::fill(&mut self.m.table, idx, &key, &p, backend, at).expect("in range");
                let (closing, established) = (r.below(6) == 0, r.bool());
                if closing || established {
                    conntrack::touch(&mut self.m.table, idx, at, closing, established);
                }
            }
        }
        let slots = self.m.table.slots.len();
        for _ in 0..r.below(3) {
            let idx = r.u16() as usize % slots;
            let torn = ConnSlot {
                key: flow(r),
                backend_id: self.backend_id(r),
                last_seen: r.u32(),
                flags: r.u8(),
                seal: r.u32(),
                ..self.m.table.slots[idx]
            };
            self.m.table.slots[idx] = torn;
            if r.bool() {
                self.m.table.heads[idx / conntrack::WAYS as usize].ways
                    [idx % conntrack::WAYS as usize] = r.u32();
            }
        }
    }

    /// Flow-cache entries: current, stale, near a refresh, naming a backend
    /// that is gone or a VIP that is not the flow's.
    fn cache_entries(&mut self, r: &mut Reader) {
        let n = self.m.cache.len() as u32;
        for _ in 0..r.below(8) {
            let key = flow(r);
            let vip_id = match self.vip_of(&key) {
                Some(v) if r.below(8) != 0 => v.id,
                _ => r.below(self.m.ring_states.len() + 1) as u32,
            };
            let entry = CachedFlow {
                key,
                backend_id: self.backend_id(r),
                hits: match r.below(3) {
                    0 => REFRESH_EVERY - 1,
                    1 => r.below(40) as u32,
                    _ => r.u32(),
                },
                vip_epoch: match r.below(4) {
                    0 => r.u32(),
                    1 => self.m.epoch.wrapping_sub(1),
                    _ => self.m.epoch,
                },
                vip_id,
                mode: r.pick(&[
                    Mode::Ipip.wire(),
                    Mode::L2dsr.wire(),
                    Mode::Gue.wire(),
                    0xff,
                ]),
                _pad: [0; 7],
            };
            self.m.cache[(slot_of(&key) & (n - 1)) as usize].set(entry);
        }
    }

    /// The VIP a flow is for, looked up here by a linear scan: the exact
    /// port, then port 0 (the rule `policy::lookup_vip` implements with an
    /// open-addressing table).
    fn vip_of(&self, key: &FlowKey) -> Option<&Vip> {
        let is = |port: u16| {
            move |v: &&Vip| {
                v.key.addr == key.dst
                    && v.key.port == port
                    && v.key.proto == key.proto
                    && v.key.family == key.family
            }
        };
        let vips = self.vips.iter();
        vips.clone()
            .find(is(key.dst_port))
            .or_else(|| vips.clone().find(is(0)))
    }

    /// A plan no decision made (an index past the table, an entry slot of
    /// another flow, a stale hash): `apply` must stay in bounds.
    fn raw_apply(&mut self, r: &mut Reader) {
        let slots = 2 * self.m.table.slots.len() as u32;
        let key = flow(r);
        let update = match r.below(4) {
            0 => Update::Nothing,
            1 => Update::CacheHit,
            2 => Update::Refresh {
                idx: r.u16() as u32 % slots,
                closing: r.bool(),
            },
            _ => Update::Record {
                hash: r.u64(),
                entry: match r.below(3) {
                    0 => Entry::At(r.u16() as u32 % slots),
                    1 => Entry::Absent,
                    _ => Entry::Unknown,
                },
                closing: r.bool(),
            },
        };
        let plan = Plan {
            backend_id: self.backend_id(r),
            vip_id: r.below(self.m.ring_states.len() + 1) as u32,
            mode: r.u8(),
            now: self.m.now_ticks,
            update,
        };
        let (cfg, epoch) = (self.m.config, self.m.epoch);
        policy::apply(&mut self.m, &cfg, epoch, &key, &plan);
    }

    /// One packet: its frame parsed and classified as the XDP program does,
    /// decided, checked, applied, checked.
    fn packet(&mut self, r: &mut Reader, reached: &mut Reached) {
        let key = flow(r);
        let kind = kind(r, &key);
        let f = frame(&key, kind);
        let parsed = parse(f.as_slice()).expect("a built frame parses");
        assert_eq!(
            policy::classify(f.as_slice(), &parsed),
            Some((key, kind)),
            "the frame's flow"
        );

        let (cfg, epoch) = (self.m.config, self.m.epoch);
        let m = &self.m;
        let probe = conntrack::probe(&key, cfg.conntrack_seed, cfg.conntrack_bucket_mask);
        let found = conntrack::find(&m.table, &key, &probe);
        let cache_idx = (slot_of(&key) & (cfg.flow_cache_slots - 1)) as usize;
        let cached = m.cache[cache_idx].get();
        let vip = self.vip_of(&key);
        let counters: Vec<u64> = m.counters.iter().map(|c| c.get()).collect();

        let d = policy::decide(m, &cfg, epoch, &key, kind);

        // What the decision counted is what it says it counts (the data
        // plane counts as it decides; `lbctl explain` reports `count`).
        let mut want = counters;
        d.count(|c| want[c.index() as usize] += 1);
        for &c in Counter::ALL {
            assert_eq!(
                m.counter(c),
                want[c.index() as usize],
                "counter {}",
                c.name()
            );
        }
        let icmp = kind == Kind::IcmpTooBig;
        let stateful = !icmp;
        let syn = matches!(kind, Kind::Tcp { flags } if flags & (TCP_SYN | TCP_ACK) == TCP_SYN);
        let closing = matches!(kind, Kind::Tcp { flags } if flags & (TCP_FIN | TCP_RST) != 0);
        let live_slot = |vip: &Vip, generation: u8| {
            m.ring_slot(
                vip.id,
                generation,
                flow_slot(&key, cfg.hash_seed, cfg.ring_size),
            )
        };
        let live_of = |vip: &Vip| m.ring_states[vip.id as usize].live_generation();
        let plan = match d.verdict {
            Verdict::Pass(c) => {
                reached.insert(format!("pass {}", c.name()));
                assert_eq!(c, Counter::LbNotVip, "the only pass once configured");
                assert!(vip.is_none() && d.via.is_none() && !d.icmp);
                None
            }
            Verdict::Drop(c) => {
                let via = d.via.expect("a drop says how the backend was looked for");
                reached.insert(format!("drop {} {}", c.name(), via.label()));
                assert_eq!(c, Counter::LbNoBackend);
                let vip = vip.expect("a drop is for a VIP");
                let id = live_slot(vip, live_of(vip));
                assert!(id == 0 || m.backend(id).is_none(), "live ring has {id}");
                assert_eq!(d.icmp, icmp);
                None
            }
            Verdict::Forward(fw) => {
                let via = d.via.expect("a forward says how it found the backend");
                let id = fw.backend_id;
                reached.insert(format!(
                    "forward {} {}",
                    via.label(),
                    update_label(&fw.plan.update)
                ));
                let b = m.backends.get(id as usize).expect("a backend that exists");
                assert!(id != 0 && std::ptr::eq(fw.backend, b), "backend {id}");
                assert_eq!(fw.plan.backend_id, id);
                assert_eq!(d.icmp, icmp);
                assert_eq!(
                    fw.plan.update == Update::Nothing,
                    icmp || via == Via::SecondHop,
                    "ICMP errors and second-hop packets write nothing, everything else something"
                );
                assert_eq!(
                    fw.second_hop.is_some(),
                    via == Via::SecondHop,
                    "only a second-hop forward names a second hop"
                );
                if via == Via::FlowCache {
                    assert!(stateful && !syn && !closing && key.proto == IPPROTO_TCP);
                    assert!(conntrack::same_flow(&cached.key, &key));
                    assert_eq!(
                        (id, cached.vip_epoch, fw.plan.vip_id, fw.plan.mode),
                        (cached.backend_id, epoch, cached.vip_id, cached.mode)
                    );
                    assert!(b.keeps_flows_of(cached.vip_id));
                    assert_eq!(fw.plan.update, Update::CacheHit);
                } else {
                    let vip = vip.expect("a forward is for a VIP");
                    assert_eq!((fw.plan.vip_id, fw.plan.mode), (vip.id, vip.mode.wire()));
                    let live = live_of(vip);
                    match via {
                        Via::ConnTable => {
                            let e = found.expect("a table hit has an entry");
                            assert_eq!(e.backend_id, id);
                            assert!(b.keeps_flows_of(vip.id));
                            if stateful {
                                assert_eq!(
                                    fw.plan.update,
                                    Update::Refresh {
                                        idx: e.idx,
                                        closing
                                    }
                                );
                            }
                        }
                        Via::SecondChance => {
                            assert!(found.is_none() && key.proto == IPPROTO_TCP && !syn);
                            assert!(m.ring_states[vip.id as usize].second_chance_open(m.now_ns));
                            assert_eq!(live_slot(vip, live ^ 1), id);
                            assert!(b.keeps_flows_of(vip.id));
                        }
                        Via::SecondHop => {
                            assert!(found.is_none() && key.proto == IPPROTO_TCP && !syn);
                            assert!(stateful && vip.mode == Mode::Gue);
                            assert!(m.ring_states[vip.id as usize].previous_intact());
                            assert_eq!(live_slot(vip, live), id);
                            let hop = fw.second_hop.expect("a second-hop forward names one");
                            let hop_id = live_slot(vip, live ^ 1);
                            assert!(hop_id != id && hop_id != 0);
                            assert!(std::ptr::eq(hop, m.backend(hop_id).expect("it exists")));
                            assert!(hop.keeps_flows_of(vip.id) && hop.family == b.family);
                            assert_eq!(fw.plan.update, Update::Nothing);
                        }
                        Via::RingSyn => {
                            assert!(syn);
                            assert_eq!(live_slot(vip, live), id);
                        }
                        Via::RingNoEntry => {
                            assert!(found.is_none());
                            assert_eq!(live_slot(vip, live), id);
                        }
                        Via::RingRepick => {
                            let e = found.expect("a re-pick had an entry");
                            let old = m.backend(e.backend_id);
                            assert!(!old.is_some_and(|o| o.keeps_flows_of(vip.id)));
                            assert_eq!(live_slot(vip, live), id);
                        }
                        Via::RingUdpExpired => {
                            assert!(found.is_some() && key.proto == IPPROTO_UDP);
                            assert_eq!(live_slot(vip, live), id);
                        }
                        Via::FlowCache => unreachable!(),
                    }
                }
                Some(fw.plan)
            }
        };
        if let Some(plan) = plan {
            self.apply(&key, &plan, reached);
        }
    }

    /// Applies a decision's plan and checks what it left behind.
    fn apply(&mut self, key: &FlowKey, plan: &Plan, reached: &mut Reached) {
        let (cfg, epoch) = (self.m.config, self.m.epoch);
        let table = self.m.table.clone();
        let cache: Vec<CachedFlow> = self.m.cache.iter().map(|c| c.get()).collect();
        let failed = |m: &Model| {
            m.counter(Counter::LbConntrackFull) + m.counter(Counter::LbConntrackInsertFailed)
        };
        let failed_before = failed(&self.m);
        policy::apply(&mut self.m, &cfg, epoch, key, plan);
        let m = &self.m;
        let probe = conntrack::probe(key, cfg.conntrack_seed, cfg.conntrack_bucket_mask);
        let found = conntrack::find(&m.table, key, &probe);
        match plan.update {
            Update::Nothing | Update::CacheHit => {
                assert!(
                    table.heads == m.table.heads && table.slots == m.table.slots,
                    "nothing to write, and the table changed"
                );
                assert!(
                    m.cache.iter().map(|c| c.get()).eq(cache),
                    "nothing to write, and the cache changed"
                );
            }
            Update::Refresh { .. } => {
                let e = found.expect("a refreshed entry is still there");
                assert_eq!(e.backend_id, plan.backend_id);
            }
            Update::Record { .. } => {
                if failed(m) == failed_before {
                    let e = found.expect("a recorded flow has an entry");
                    assert_eq!(e.backend_id, plan.backend_id, "recorded backend");
                } else {
                    reached.insert("record failed".into());
                }
            }
        }
    }
}

fn update_label(u: &Update) -> &'static str {
    match u {
        Update::Nothing => "nothing",
        Update::CacheHit => "cache_hit",
        Update::Refresh { closing: false, .. } => "refresh",
        Update::Refresh { closing: true, .. } => "refresh_closing",
        Update::Record { closing: false, .. } => "record",
        Update::Record { closing: true, .. } => "record_closing",
    }
}

/// One generation of a VIP's ring: empty, one backend, ids at random
/// (some past the backend map), or a real Maglev table.
fn ring(r: &mut Reader, m: &Model, size: u32, max_backends: u32) -> Vec<u32> {
    let any = |r: &mut Reader| r.below(max_backends as usize + 1) as u32;
    match r.below(4) {
        0 => vec![0; size as usize],
        1 => vec![any(r); size as usize],
        2 => (0..size).map(|_| any(r)).collect(),
        _ => {
            let mut backends = Vec::new();
            for id in 1..max_backends {
                if r.bool() {
                    backends.push(MaglevBackend {
                        id,
                        identity: m.backends[id as usize].addr,
                        weight: r.pick(&[0, 1, 100, 65_535]),
                    });
                }
            }
            // More backends than slots: lbd refuses it, the ring stays empty.
            maglev::build(&backends, size, m.config.hash_seed)
                .unwrap_or_else(|_| vec![0; size as usize])
        }
    }
}
