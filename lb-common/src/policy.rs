//! The per-packet decision, written once: which backend a packet goes to,
//! why, and what the data plane writes down afterwards.
//!
//! [`decide`] reads the maps and the clocks through [`Maps`] and changes
//! nothing; [`apply`] performs the writes a forwarded packet calls for
//! through [`MapsMut`]. The XDP program implements the traits over its BPF
//! maps and only parses, executes the decision and rewrites the frame. The
//! host implements them over vectors (the fixture tables in
//! `policy::tests`, the kernel parity test) and over a read-only snapshot
//! of the pinned maps (`lbctl explain`). All three therefore answer alike.
//!
//! The rules, in the order a packet meets them:
//! 1. A packet that is not TCP, UDP, or an ICMP too-big error quoting a TCP
//!    or UDP flow is passed to the kernel ([`classify`]).
//! 2. No VIP for its destination (the exact port, then port 0): passed.
//! 3. An established TCP packet (not SYN, FIN or RST) this CPU's flow cache
//!    holds, cached under the current VIP table, whose backend still keeps
//!    flows (up or draining) and serves the VIP: that backend. One hit in
//!    [`REFRESH_EVERY`] takes the full path so the connection table keeps
//!    seeing the flow as recently used.
//! 4. A SYN follows the live ring whatever an old entry says (a client
//!    reusing a port lands on the current backends), and is recorded,
//!    embryonic (see `conntrack`: so are the new flows of rules 5-7).
//! 5. A connection-table entry whose backend keeps flows and serves the VIP:
//!    that backend; the entry is refreshed and established (FIN/RST mark it
//!    closing), and
//!    this CPU's cache filled unless it is closing. A UDP entry idle past
//!    the timeout is a new flow instead; an entry whose backend is down or
//!    gone is re-picked from the live ring.
//! 6. A mid-stream TCP packet without an entry (another node placed it, or
//!    its entry was displaced) takes the previous ring generation while the
//!    VIP's second-chance window is open and that backend keeps flows: the
//!    second chance. In `gue` mode, when the live ring names another
//!    backend of the same family, the packet goes to that one instead and
//!    names the previous one as its second hop (the backend keeps it if a
//!    local socket holds the flow, otherwise sends it on), with or without
//!    the window, as long as the previous generation is intact; nothing is
//!    recorded, so every packet of the flow asks again. Otherwise the live
//!    ring.
//! 7. The live ring's backend (whatever its state: the ring is republished
//!    when a backend goes down); an empty slot drops the packet.
//! 8. ICMP errors follow rules 2, 5-7 but never create, refresh or cache
//!    state.

use crate::{
    conntrack::{self, Found, Placement, Probe, Table, Timeouts},
    flowcache::{CachedFlow, REFRESH_EVERY, slot_of},
    icmp::too_big_quote,
    maps::{BackendInfo, Family, FlowKey, LbConfig, Mode, RingState},
    packet::PacketBytes,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed},
    ring::{RING_CHUNK, RingChunk, flow_slot, ring_pos},
    stats::Counter,
    viptable::{self, VipSlot},
    wire::tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// What the decision reads: the maps and the clocks. Lookups return
/// references (in the data plane, into map values: copying a backend would
/// cost stack the verifier caps at 512 bytes).
///
/// The decision also counts, through [`Maps::count`], and bumps a flow-cache
/// entry's hit count in place ([`CacheSlot::hit`]): both are per-CPU
/// statistics rather than state the rules read back, and done where the
/// decision is made they cost the fast path nothing extra (counting from the
/// returned decision, and looking the cache slot up again to count the hit,
/// cost an established packet about 10 ns, measured side by side).
pub trait Maps {
    type Table: Table + ?Sized;
    fn table(&self) -> &Self::Table;
    fn vip_slot(&self, idx: u32) -> Option<&VipSlot>;
    fn ring_state(&self, vip_id: u32) -> Option<&RingState>;
    fn ring_chunk(&self, element: u32) -> Option<&RingChunk>;
    fn backend(&self, id: u32) -> Option<&BackendInfo>;
    /// One of this CPU's flow-cache slots, as the decision uses it.
    type Cache<'a>: CacheSlot
    where
        Self: 'a;
    /// This CPU's flow-cache slot `idx` (already masked).
    fn cache(&self, idx: u32) -> Option<Self::Cache<'_>>;
    /// Counts one event in this CPU's global counters (a snapshot for
    /// `lbctl explain` counts nothing).
    fn count(&self, counter: Counter);
    /// The coarse clock in connection-table ticks
    /// ([`conntrack::TICK_SHIFT`]).
    fn now_ticks(&self) -> u32;
    /// `CLOCK_MONOTONIC` in ns (second-chance deadlines).
    fn now_ns(&self) -> u64;

    /// `key`'s connection-table entry. The data plane overrides this with a
    /// global BPF function (verified once, not once per calling path).
    #[inline(always)]
    fn find(&self, key: &FlowKey, probe: &Probe) -> Option<Found> {
        conntrack::find(self.table(), key, probe)
    }
}

/// A flow-cache slot: its contents, and its hit count written in place.
pub trait CacheSlot {
    fn flow(&self) -> &CachedFlow;
    /// Stores the slot's new hit count.
    fn hit(&self, hits: u32);
}

/// What executing a decision writes.
pub trait MapsMut: Maps {
    fn table_mut(&mut self) -> &mut Self::Table;
    fn cache_mut(&mut self, idx: u32) -> Option<&mut CachedFlow>;

    /// Where a new flow's entry goes ([`conntrack::own_or_place`]); the data
    /// plane overrides this with a global BPF function.
    #[inline(always)]
    fn entry_slot(
        &mut self,
        key: &FlowKey,
        probe: &Probe,
        now: u32,
        timeouts: Timeouts,
        find_first: bool,
    ) -> Option<(Placement, bool)> {
        conntrack::own_or_place(self.table(), key, probe, now, timeouts, find_first)
    }
}

/// What kind of packet a flow key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp {
        flags: u8,
    },
    Udp,
    /// An ICMP fragmentation-needed / packet-too-big error; the key is the
    /// quoted client -> VIP flow.
    IcmpTooBig,
}

impl Kind {
    #[inline(always)]
    const fn syn(self) -> bool {
        matches!(self, Kind::Tcp { flags } if flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
    }

    /// The client's FIN or RST: its entry is marked closing.
    #[inline(always)]
    const fn closing(self) -> bool {
        matches!(self, Kind::Tcp { flags } if flags & (TCP_FIN | TCP_RST) != 0)
    }

    /// False for packets that must neither create nor refresh state.
    #[inline(always)]
    const fn stateful(self) -> bool {
        !matches!(self, Kind::IcmpTooBig)
    }
}

/// Whether the data plane has been programmed (a ring size written). Until
/// then every packet goes to the kernel, counted as such, before anything
/// else is looked at.
#[inline(always)]
pub const fn configured(cfg: &LbConfig) -> bool {
    cfg.ring_size != 0
}

/// The flow a parsed packet belongs to and its kind; `None`: not one the
/// balancer handles (rule 1).
#[inline(always)]
pub fn classify<P: PacketBytes + ?Sized>(pkt: &P, parsed: &Parsed) -> Option<(FlowKey, Kind)> {
    match parsed.proto {
        IPPROTO_TCP => Some((
            parsed.flow_key(),
            Kind::Tcp {
                flags: parsed.tcp_flags,
            },
        )),
        IPPROTO_UDP => Some((parsed.flow_key(), Kind::Udp)),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let q = too_big_quote(pkt, parsed)?;
            let key = FlowKey {
                src: q.client,
                dst: q.vip,
                src_port: q.client_port,
                dst_port: q.vip_port,
                proto: q.proto,
                family: Family::of(parsed.is_ipv6).wire(),
                _pad: [0; 2],
            };
            Some((key, Kind::IcmpTooBig))
        }
        _ => None,
    }
}

/// How the backend was found (or, for a drop, looked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// This CPU's flow cache (rule 3).
    FlowCache,
    /// The connection table (rule 5).
    ConnTable,
    /// The previous ring generation, for a mid-stream packet without an
    /// entry (rule 6).
    SecondChance,
    /// The live ring, naming the previous ring's backend as the second hop
    /// (rule 6, `gue` mode).
    SecondHop,
    /// The live ring, for a SYN (rule 4).
    RingSyn,
    /// The live ring, for a packet without an entry (rules 6, 7).
    RingNoEntry,
    /// The live ring, because the entry's backend no longer keeps flows.
    RingRepick,
    /// The live ring, because the UDP entry had expired.
    RingUdpExpired,
}

impl Via {
    /// The counters this way of finding a backend increments.
    #[inline(always)]
    pub const fn counters(self) -> (Counter, Option<Counter>) {
        match self {
            Via::FlowCache => (Counter::LbConntrackHit, Some(Counter::LbFlowCacheHit)),
            Via::ConnTable => (Counter::LbConntrackHit, None),
            Via::SecondChance => (Counter::LbConntrackMiss, Some(Counter::LbSecondChanceHit)),
            Via::SecondHop => (Counter::LbConntrackMiss, Some(Counter::LbSecondHop)),
            Via::RingSyn | Via::RingNoEntry => (Counter::LbConntrackMiss, None),
            Via::RingRepick => (Counter::LbRepickDown, None),
            Via::RingUdpExpired => (Counter::LbUdpExpired, None),
        }
    }

    /// For people (`lbctl explain`).
    pub const fn describe(self) -> &'static str {
        match self {
            Via::FlowCache => "established flow, from this CPU's flow cache",
            Via::ConnTable => "established flow, from its connection-table entry",
            Via::SecondChance => {
                "no connection-table entry: the previous ring (second chance after a ring change)"
            }
            Via::SecondHop => {
                "no connection-table entry: the live ring, with the previous ring's backend as the second hop (it takes the packet if the first holds no socket for the flow)"
            }
            Via::RingSyn => "new connection (SYN): the live ring",
            Via::RingNoEntry => "no connection-table entry: the live ring",
            Via::RingRepick => {
                "its connection-table entry names a backend that is down or gone: re-picked from the live ring"
            }
            Via::RingUdpExpired => "its UDP entry expired: a new flow on the live ring",
        }
    }

    /// A short label (`--json`, metrics-like use).
    pub const fn label(self) -> &'static str {
        match self {
            Via::FlowCache => "flow_cache",
            Via::ConnTable => "conntrack",
            Via::SecondChance => "second_chance",
            Via::SecondHop => "second_hop",
            Via::RingSyn => "ring_syn",
            Via::RingNoEntry => "ring_no_entry",
            Via::RingRepick => "ring_repick",
            Via::RingUdpExpired => "ring_udp_expired",
        }
    }
}

/// What a new flow's record knows of its connection-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Its slot: an expired UDP flow, a re-pick after its backend went down.
    At(u32),
    /// Looked up, and it has none.
    Absent,
    /// Not looked up: a SYN, which follows the ring whatever an old entry
    /// says (its own slot, if any, is found when it is recorded).
    Unknown,
}

/// What a forwarded packet leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// Nothing (an ICMP error about a flow).
    Nothing,
    /// A flow-cache hit (its hit count was stored when it was decided).
    CacheHit,
    /// A connection-table hit: refresh entry `idx` (marking it closing on
    /// the client's FIN or RST) and fill this CPU's cache unless it is
    /// closing.
    Refresh { idx: u32, closing: bool },
    /// A new flow: record its entry. Carries the flow's table hash, from
    /// which its probe is rebuilt ([`Probe::of_hash`]).
    Record {
        hash: u64,
        entry: Entry,
        closing: bool,
    },
}

/// Send the packet to a backend.
#[derive(Clone, Copy, Debug)]
pub struct Forward<'a> {
    pub backend_id: u32,
    pub backend: &'a BackendInfo,
    /// `gue` mode: the backend the first passes the packet on to when no
    /// local socket holds its flow.
    pub second_hop: Option<&'a BackendInfo>,
    pub plan: Plan,
}

/// What [`apply`] needs of a forwarded packet's decision (no references
/// into the maps, so the maps can be written while it is held).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub backend_id: u32,
    pub vip_id: u32,
    /// [`Mode`] as a byte.
    pub mode: u8,
    /// Ticks when the packet arrived (0 on a flow-cache hit, which reads no
    /// clock).
    pub now: u32,
    pub update: Update,
}

impl Plan {
    #[inline(always)]
    pub const fn mode(&self) -> Mode {
        Mode::from_wire(self.mode)
    }

    /// Counted as a new flow in the traffic statistics.
    #[inline(always)]
    pub const fn new_flow(&self) -> bool {
        matches!(self.update, Update::Record { .. })
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Verdict<'a> {
    Forward(Forward<'a>),
    /// To the kernel, with the counter that says why.
    Pass(Counter),
    /// Dropped, with the counter that says why.
    Drop(Counter),
}

/// A packet's decision: the verdict and how it was reached.
#[derive(Clone, Copy, Debug)]
pub struct Decision<'a> {
    pub verdict: Verdict<'a>,
    /// `None` when no VIP matched (or nothing was configured).
    pub via: Option<Via>,
    /// An ICMP error about a VIP flow (counted as such).
    pub icmp: bool,
}

impl<'a> Decision<'a> {
    #[inline(always)]
    const fn pass(reason: Counter) -> Self {
        Decision {
            verdict: Verdict::Pass(reason),
            via: None,
            icmp: false,
        }
    }

    /// Counts what the decision itself counts (verdict counters and what
    /// [`apply`] counts aside) and hands it back. Called at every place a
    /// decision is made, where `self` is known, so the data plane counts
    /// constants rather than dispatching on the decision.
    #[inline(always)]
    fn counted<M: Maps + ?Sized>(self, maps: &M) -> Self {
        self.count(|c| maps.count(c));
        self
    }

    /// Calls `count` with every counter the decision increments (verdict
    /// counters and what [`apply`] counts aside).
    #[inline(always)]
    pub fn count(&self, mut count: impl FnMut(Counter)) {
        if let Some(v) = self.via {
            let (a, b) = v.counters();
            count(a);
            if let Some(b) = b {
                count(b);
            }
        }
        if self.icmp {
            count(Counter::LbIcmpTooBig);
        }
        match self.verdict {
            Verdict::Forward(_) => {}
            Verdict::Pass(c) | Verdict::Drop(c) => count(c),
        }
    }
}

/// The VIP for a flow's destination in the live generation of the VIP
/// table: the exact port first, then port 0 (every port of the address and
/// protocol).
#[inline(always)]
pub fn lookup_vip<'a, M: Maps + ?Sized>(
    maps: &'a M,
    key: &FlowKey,
    epoch: u32,
    cfg: &LbConfig,
) -> Option<&'a VipSlot> {
    let base = (epoch & 1) * cfg.vip_slots;
    let mask = cfg.vip_slots.wrapping_sub(1);
    let idx = viptable::find(
        &key.dst,
        key.dst_port,
        key.proto,
        key.family,
        |i| maps.vip_slot(base + i),
        mask,
    )?;
    maps.vip_slot(base + idx)
}

/// This CPU's cache slot index for `key`, if the cache has slots.
#[inline(always)]
fn cache_index(key: &FlowKey, cfg: &LbConfig) -> Option<u32> {
    if cfg.flow_cache_slots == 0 {
        None
    } else {
        Some(slot_of(key) & (cfg.flow_cache_slots - 1))
    }
}

/// Rule 3: an established TCP flow this CPU's cache holds.
#[inline(always)]
fn cached<'a, M: Maps + ?Sized>(
    maps: &'a M,
    key: &FlowKey,
    epoch: u32,
    cfg: &LbConfig,
) -> Option<Decision<'a>> {
    let slot = maps.cache(cache_index(key, cfg)?)?;
    let c = slot.flow();
    if c.backend_id == 0 || c.vip_epoch != epoch || !conntrack::same_flow(&c.key, key) {
        return None;
    }
    let b = maps.backend(c.backend_id)?;
    if !b.keeps_flows_of(c.vip_id) {
        return None;
    }
    // Every REFRESH_EVERY-th hit takes the full path, so the table keeps
    // seeing the flow as recently used (and the cache entry is filled
    // again, its count back to 0).
    let hits = c.hits.wrapping_add(1);
    slot.hit(hits);
    if hits % REFRESH_EVERY == 0 {
        return None;
    }
    let d = Decision {
        verdict: Verdict::Forward(Forward {
            backend_id: c.backend_id,
            backend: b,
            second_hop: None,
            plan: Plan {
                backend_id: c.backend_id,
                vip_id: c.vip_id,
                mode: c.mode,
                now: 0,
                update: Update::CacheHit,
            },
        }),
        via: Some(Via::FlowCache),
        icmp: false,
    };
    Some(d.counted(maps))
}

/// Slot `slot` of generation `generation` of the VIP's ring: the backend id
/// (0: empty) and the backend.
#[inline(always)]
fn ring_pick<'a, M: Maps + ?Sized>(
    maps: &'a M,
    vip_id: u32,
    generation: u8,
    slot: u32,
    cfg: &LbConfig,
) -> Option<(u32, &'a BackendInfo)> {
    let (element, lane) = ring_pos(vip_id, generation, cfg.ring_size, slot);
    let id = maps.ring_chunk(element)?.ids[(lane % RING_CHUNK) as usize];
    if id == 0 {
        return None;
    }
    Some((id, maps.backend(id)?))
}

/// What the rules after the VIP lookup know of the packet.
struct Ctx {
    vip_id: u32,
    /// [`Mode`] as a byte.
    mode: u8,
    now: u32,
    closing: bool,
    /// False for an ICMP error about a flow: it neither creates nor
    /// refreshes state.
    stateful: bool,
}

impl Ctx {
    #[inline(always)]
    fn forward<'a>(
        &self,
        backend_id: u32,
        backend: &'a BackendInfo,
        via: Via,
        update: Update,
    ) -> Decision<'a> {
        let update = if self.stateful {
            update
        } else {
            Update::Nothing
        };
        Decision {
            verdict: Verdict::Forward(Forward {
                backend_id,
                backend,
                second_hop: None,
                plan: Plan {
                    backend_id,
                    vip_id: self.vip_id,
                    mode: self.mode,
                    now: self.now,
                    update,
                },
            }),
            via: Some(via),
            icmp: !self.stateful,
        }
    }

    /// To `backend`, naming `second_hop`; nothing recorded (recording the
    /// first would send the flow's next packets there without a second hop).
    #[inline(always)]
    fn forward_second_hop<'a>(
        &self,
        backend_id: u32,
        backend: &'a BackendInfo,
        second_hop: &'a BackendInfo,
    ) -> Decision<'a> {
        let mut d = self.forward(backend_id, backend, Via::SecondHop, Update::Nothing);
        if let Verdict::Forward(f) = &mut d.verdict {
            f.second_hop = Some(second_hop);
        }
        d
    }

    #[inline(always)]
    fn no_backend<'a>(&self, via: Via) -> Decision<'a> {
        Decision {
            verdict: Verdict::Drop(Counter::LbNoBackend),
            via: Some(via),
            icmp: !self.stateful,
        }
    }
}

/// Decides what happens to one packet of flow `key`. `epoch` is
/// `VIP_TABLE_GEN` (its bit 0 the live VIP-table generation).
#[inline(always)]
pub fn decide<'a, M: Maps + ?Sized>(
    maps: &'a M,
    cfg: &LbConfig,
    epoch: u32,
    key: &FlowKey,
    kind: Kind,
) -> Decision<'a> {
    if !configured(cfg) {
        return Decision::pass(Counter::LbNotConfigured).counted(maps);
    }
    let (syn, closing, stateful) = (kind.syn(), kind.closing(), kind.stateful());
    if stateful
        && key.proto == IPPROTO_TCP
        && !syn
        && !closing
        && let Some(d) = cached(maps, key, epoch, cfg)
    {
        return d;
    }
    // A SYN's ring slot, hashed before the VIP lookup although a SYN to a
    // VIP's address on a port it does not serve wastes it: the hash is a
    // long dependent chain (Murmur3: nine rounds, a tail and a finaliser),
    // and started here the CPU runs it beside the VIP and connection-table
    // hashes instead of after them. A new flow gains 5-10 ns (`cargo xtask
    // bench`). A SYN to any other address never gets here: the data plane's
    // VIP-address filter hands it to the kernel first.
    let syn_slot = if syn {
        Some(flow_slot(key, cfg.hash_seed, cfg.ring_size))
    } else {
        None
    };
    let Some(vip) = lookup_vip(maps, key, epoch, cfg) else {
        return Decision::pass(Counter::LbNotVip).counted(maps);
    };
    let cx = Ctx {
        vip_id: vip.info.vip_id,
        mode: vip.info.mode,
        now: maps.now_ticks(),
        closing,
        stateful,
    };
    let probe = conntrack::probe(key, cfg.conntrack_seed, cfg.conntrack_bucket_mask);
    // Rule 4: a SYN is not looked up; rule 5 otherwise.
    let (via, entry) = if syn {
        (Via::RingSyn, Entry::Unknown)
    } else {
        match from_table(maps, &cx, key, &probe, cfg) {
            Ok(d) => return d,
            Err(miss) => miss,
        }
    };
    let slot = match syn_slot {
        Some(s) => s,
        None => flow_slot(key, cfg.hash_seed, cfg.ring_size),
    };
    let update = Update::Record {
        hash: probe.hash,
        entry,
        closing,
    };
    from_ring(maps, &cx, key.proto, via, slot, update, cfg)
}

/// Rule 5: the flow's connection-table entry, if its backend keeps flows
/// and serves the VIP; otherwise why the ring decides, and what is known of
/// the entry for recording the new one.
#[inline(always)]
fn from_table<'a, M: Maps + ?Sized>(
    maps: &'a M,
    cx: &Ctx,
    key: &FlowKey,
    probe: &Probe,
    cfg: &LbConfig,
) -> Result<Decision<'a>, (Via, Entry)> {
    let Some(found) = maps.find(key, probe) else {
        return Err((Via::RingNoEntry, Entry::Absent));
    };
    // The backend comes from `found`, checked against the seal; the slot
    // itself may have been reused by another CPU since (then its other
    // fields belong to another flow, which only affects expiry, never
    // where this packet goes).
    let udp_timeout = conntrack::udp_timeout_ticks(cfg.udp_timeout_ns);
    let expired = maps
        .table()
        .slot(found.idx)
        .is_some_and(|s| s.expired(cx.now, udp_timeout));
    if cx.stateful && expired {
        return Err((Via::RingUdpExpired, Entry::At(found.idx)));
    }
    match maps.backend(found.backend_id) {
        Some(b) if b.keeps_flows_of(cx.vip_id) => {
            let refresh = Update::Refresh {
                idx: found.idx,
                closing: cx.closing,
            };
            Ok(cx
                .forward(found.backend_id, b, Via::ConnTable, refresh)
                .counted(maps))
        }
        _ => Err((Via::RingRepick, Entry::At(found.idx))),
    }
}

/// Rules 6 and 7: the ring. A mid-stream TCP packet we have no entry for
/// belongs to a flow another node (or an evicted entry) placed, on the
/// ring before the last change or after it. In `gue` mode the backend
/// tells: the live ring's backend gets it, naming the previous ring's as
/// the second hop, for as long as the previous generation is intact (no
/// deadline: nothing is recorded, so a flow from before the change relies
/// on the second hop for its whole life on this node). Otherwise keep it
/// on the previous ring's backend while that backend lives, for a bounded
/// time after the change (afterwards flows placed on the new ring are the
/// likelier owners). Otherwise the live ring; an empty slot drops the
/// packet.
#[inline(always)]
fn from_ring<'a, M: Maps + ?Sized>(
    maps: &'a M,
    cx: &Ctx,
    proto: u8,
    via: Via,
    slot: u32,
    record: Update,
    cfg: &LbConfig,
) -> Decision<'a> {
    let Some(ring) = maps.ring_state(cx.vip_id) else {
        return cx.no_backend(via).counted(maps);
    };
    let live = ring.live_generation();
    if matches!(via, Via::RingNoEntry)
        && proto == IPPROTO_TCP
        && ring.previous_intact()
        && let Some((old_id, old)) = ring_pick(maps, cx.vip_id, live ^ 1, slot, cfg)
        && old.keeps_flows_of(cx.vip_id)
    {
        if cx.mode == Mode::Gue.wire()
            && cx.stateful
            && let Some((id, b)) = ring_pick(maps, cx.vip_id, live, slot, cfg)
            && id != old_id
            && b.family == old.family
        {
            return cx.forward_second_hop(id, b, old).counted(maps);
        }
        if ring.second_chance_open(maps.now_ns()) {
            return cx
                .forward(old_id, old, Via::SecondChance, record)
                .counted(maps);
        }
    }
    match ring_pick(maps, cx.vip_id, live, slot, cfg) {
        Some((id, b)) => cx.forward(id, b, via, record).counted(maps),
        None => cx.no_backend(via).counted(maps),
    }
}

/// Fills this CPU's cache slot for `key` (TCP only: UDP needs the table's
/// timestamps).
#[inline(always)]
fn cache_fill<M: MapsMut + ?Sized>(
    maps: &mut M,
    key: &FlowKey,
    plan: &Plan,
    epoch: u32,
    cfg: &LbConfig,
) {
    if key.proto != IPPROTO_UDP
        && let Some(slot) = cache_index(key, cfg)
        && let Some(c) = maps.cache_mut(slot)
    {
        c.key = *key;
        c.backend_id = plan.backend_id;
        c.hits = 0;
        c.vip_epoch = epoch;
        c.vip_id = plan.vip_id;
        c.mode = plan.mode;
    }
}

/// Performs the writes of a packet that was forwarded (a packet that was
/// not leaves nothing behind).
#[inline(always)]
pub fn apply<M: MapsMut + ?Sized>(
    maps: &mut M,
    cfg: &LbConfig,
    epoch: u32,
    key: &FlowKey,
    plan: &Plan,
) {
    match plan.update {
        Update::Nothing => {}
        Update::CacheHit => {}
        Update::Refresh { idx, closing } => {
            // A closing flow's last packets take this path, so its entry
            // stays the one that ends it. A refresh is never a SYN (rule 4):
            // the flow is established.
            if conntrack::touch(maps.table_mut(), idx, plan.now, closing, true) == Some(false) {
                cache_fill(maps, key, plan, epoch, cfg);
            }
        }
        Update::Record {
            hash,
            entry,
            closing,
        } => {
            let probe = Probe::of_hash(hash, key.proto, cfg.conntrack_bucket_mask);
            record(maps, cfg, epoch, key, plan, &probe, entry, closing);
        }
    }
}

/// Records a new flow's entry, in its own slot if it has one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn record<M: MapsMut + ?Sized>(
    maps: &mut M,
    cfg: &LbConfig,
    epoch: u32,
    key: &FlowKey,
    plan: &Plan,
    probe: &Probe,
    entry: Entry,
    closing: bool,
) {
    let placed = match entry {
        Entry::At(idx) => Some((
            Placement::Way {
                idx,
                evicts_live: false,
            },
            true,
        )),
        Entry::Absent | Entry::Unknown => maps.entry_slot(
            key,
            probe,
            plan.now,
            Timeouts::of(cfg.udp_timeout_ns, cfg.tcp_idle_timeout_ns),
            matches!(entry, Entry::Unknown),
        ),
    };
    let own = placed.is_some_and(|(_, own)| own);
    let written = match placed {
        Some((Placement::Way { idx, evicts_live }, _)) => {
            let table = maps.table_mut();
            conntrack::fill(table, idx, key, probe, plan.backend_id, plan.now).and_then(|()| {
                if closing {
                    conntrack::touch(table, idx, plan.now, true, false)?;
                }
                Some(evicts_live)
            })
        }
        Some((Placement::Full, _)) => {
            maps.count(Counter::LbConntrackFull);
            Some(false)
        }
        None => None,
    };
    match written {
        Some(true) => maps.count(Counter::LbConntrackEvicted),
        Some(false) => {}
        None => maps.count(Counter::LbConntrackInsertFailed),
    }
    // A flow that had an entry (a SYN reusing a port, a re-pick) may be in
    // this CPU's cache with its old backend: replace it, or the next packet
    // would go there. Other new flows leave the cache to their next packet:
    // a new flow's cache slot is a cold line (two dependent misses in a
    // per-CPU array), and many flows never send a second packet.
    if own && !closing {
        cache_fill(maps, key, plan, epoch, cfg);
    }
    maps.count(Counter::LbNewFlow);
}

#[cfg(any(test, feature = "testkit"))]
pub mod model;

#[cfg(test)]
mod tests;
