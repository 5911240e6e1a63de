//! The policy's fixture table: one row per rule or combination of rules,
//! each a description, the state of the maps (`given`), one packet, the
//! decision expected, and what the maps hold after it was applied. One
//! runner ([`run`]) plays every row once per address family.
//!
//! The same convention (rows of description, given, input, expected; one
//! runner) is used by the kernel fixtures in `lb-userspace/tests`.

extern crate std;
use std::{format, string::String, vec::Vec};

use super::{
    Decision, Kind, Update, Verdict, Via, apply, decide,
    model::{Model, ModelSizes},
};
use crate::{
    conntrack::{self, Placement, TICK_SHIFT, Timeouts, WayState},
    flowcache::{CachedFlow, REFRESH_EVERY, slot_of},
    maps::{
        BackendInfo, BackendState, Family, FlowKey, LbConfig, Mode, RingState, VipInfo, VipKey,
    },
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    stats::Counter,
    wire::tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const RING: u32 = 13;
const NOW_TICKS: u32 = 10_000_000;
const NOW_NS: u64 = 1 << 42;
const UDP_TIMEOUT_S: u64 = 30;
const SECOND: u32 = (1_000_000_000u64 >> TICK_SHIFT) as u32;

/// Which VIP a packet is for.
#[derive(Clone, Copy, Debug)]
enum Dst {
    /// `.1:80/tcp`, ipip.
    Tcp80,
    /// `.1:53/udp`, ipip.
    Udp53,
    /// `.2`, every TCP port (a port-0 VIP), l2dsr; the packet goes to `port`.
    AnyPort(u16),
    /// `.1`, a TCP port no VIP has.
    WrongPort,
    /// An address that is no VIP.
    NotVip,
}

/// The packet of a row.
#[derive(Clone, Copy, Debug)]
enum Pkt {
    Syn(Dst),
    SynAck(Dst),
    Ack(Dst),
    Fin(Dst),
    Rst(Dst),
    Udp(Dst),
    /// An ICMP too-big error quoting the row's flow (TCP or UDP by `Dst`).
    TooBig(Dst),
}

impl Pkt {
    fn dst(self) -> Dst {
        match self {
            Pkt::Syn(d)
            | Pkt::SynAck(d)
            | Pkt::Ack(d)
            | Pkt::Fin(d)
            | Pkt::Rst(d)
            | Pkt::Udp(d)
            | Pkt::TooBig(d) => d,
        }
    }

    fn kind(self) -> Kind {
        match self {
            Pkt::Syn(_) => Kind::Tcp { flags: TCP_SYN },
            Pkt::SynAck(_) => Kind::Tcp {
                flags: TCP_SYN | TCP_ACK,
            },
            Pkt::Ack(_) => Kind::Tcp { flags: TCP_ACK },
            Pkt::Fin(_) => Kind::Tcp {
                flags: TCP_FIN | TCP_ACK,
            },
            Pkt::Rst(_) => Kind::Tcp { flags: TCP_RST },
            Pkt::Udp(_) => Kind::Udp,
            Pkt::TooBig(_) => Kind::IcmpTooBig,
        }
    }
}

/// Second-chance window of the row's VIP.
#[derive(Clone, Copy, Debug)]
enum Window {
    Open,
    Closed,
    Expired,
}

/// The maps' state before the packet; what is not given is the default:
/// backends 1-4 up serving every VIP, every VIP's live ring all backend 1,
/// the previous generation empty, no second chance, no entries.
#[derive(Clone, Copy, Debug)]
enum Given {
    /// Nothing programmed yet.
    Unconfigured,
    Backend(u32, BackendState),
    /// The backend slot now belongs to another VIP.
    BackendOfOtherVip(u32),
    /// The row's VIP's live ring: every slot this backend (0: empty).
    Live(u32),
    /// The previous generation: every slot this backend.
    Previous(u32),
    Window(Window),
    /// A connection-table entry for the row's flow, seen `age` seconds ago.
    Entry {
        backend: u32,
        age: u32,
    },
    /// The entry is marked closing (the client's FIN or RST was seen).
    EntryClosing,
    /// An entry whose last packet is a moment ahead of this CPU's clock
    /// (another CPU's).
    EntryAhead(u32),
    /// This CPU's flow cache holds the row's flow for this backend.
    Cached(u32),
    /// ... with this many hits so far.
    CachedHits(u32, u32),
    /// ... made before the VIP table last changed.
    CachedStale(u32),
    /// The flow's cache slot holds another flow.
    CacheCollision(u32),
    /// A port-0 VIP on `.1` besides the exact ones, its ring all this
    /// backend.
    AnyPortOnTcpVip(u32),
    /// Both of the flow's buckets full of other clients' embryonic flows.
    BucketsFull,
    /// ... of other clients' established flows.
    BucketsFullEstablished,
    /// An embryonic entry for the row's flow (one packet seen, just now).
    EntryEmbryonic(u32),
    /// The row's VIP forwards in `gue` mode.
    Gue,
    /// The backend's address is IPv6 (the others' are IPv4).
    BackendV6(u32),
}

/// What [`apply`] should leave behind, checked after it ran.
#[derive(Clone, Copy, Debug)]
enum After {
    Entry(u32),
    NoEntry,
    EntryClosing,
    EntryOpen,
    /// The entry's last-seen time was not refreshed.
    EntryUntouched,
    /// The entry's class (see `conntrack`).
    Embryonic,
    Established,
    Cached(u32),
    NotCached,
    CacheHits(u32),
    Count(Counter, u64),
}

/// The writes the decision plans, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upd {
    Nothing,
    CacheHit,
    Refresh,
    RefreshClosing,
    Record,
    RecordClosing,
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Forward(u32, Via, Upd),
    /// To the first backend naming the second as its second hop, nothing
    /// recorded.
    SecondHop(u32, u32),
    Pass(Counter),
    Drop(Option<Via>),
}

struct Row {
    name: &'static str,
    given: &'static [Given],
    packet: Pkt,
    expect: Expect,
    after: &'static [After],
}

use After as A;
use Dst::*;
use Expect::{Drop, Forward as Fwd, Pass};
use Given as G;
use Pkt::*;
use Upd as U;

const ROWS: &[Row] = &[
    // Rule 1-2: what is not for a VIP goes to the kernel.
    Row {
        name: "TCP to an address that is no VIP",
        given: &[],
        packet: Syn(NotVip),
        expect: Pass(Counter::LbNotVip),
        after: &[A::NoEntry],
    },
    Row {
        name: "TCP to a VIP address on a port it does not serve",
        given: &[],
        packet: Ack(WrongPort),
        expect: Pass(Counter::LbNotVip),
        after: &[A::NoEntry],
    },
    Row {
        name: "an ICMP error quoting a flow to no VIP",
        given: &[],
        packet: TooBig(NotVip),
        expect: Pass(Counter::LbNotVip),
        after: &[],
    },
    Row {
        name: "nothing programmed yet: every packet to the kernel",
        given: &[G::Unconfigured],
        packet: Syn(Tcp80),
        expect: Pass(Counter::LbNotConfigured),
        after: &[A::NoEntry],
    },
    Row {
        name: "a port-0 VIP takes every port",
        given: &[],
        packet: Syn(AnyPort(22)),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "the exact port wins over a port-0 VIP on the same address",
        given: &[G::AnyPortOnTcpVip(3)],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "a port the exact VIPs lack falls to the port-0 VIP",
        given: &[G::AnyPortOnTcpVip(3)],
        packet: Syn(WrongPort),
        expect: Fwd(3, Via::RingSyn, U::Record),
        after: &[A::Entry(3)],
    },
    // Rule 3: the flow cache.
    Row {
        name: "an established flow in this CPU's cache",
        given: &[G::Entry { backend: 2, age: 0 }, G::Cached(2)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::FlowCache, U::CacheHit),
        after: &[A::CacheHits(1)],
    },
    Row {
        name: "the cache serves a flow on a draining backend",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Cached(2),
            G::Backend(2, BackendState::Draining),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::FlowCache, U::CacheHit),
        after: &[],
    },
    Row {
        name: "a cached flow whose backend went down is re-picked from the table's view",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Cached(2),
            G::Backend(2, BackendState::Down),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingRepick, U::Record),
        after: &[A::Entry(1), A::Cached(1)],
    },
    Row {
        name: "a cached flow whose backend slot was reused for another VIP is not served from the cache",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Cached(2),
            G::BackendOfOtherVip(2),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingRepick, U::Record),
        after: &[A::Entry(1), A::Cached(1)],
    },
    Row {
        name: "a cache entry made before the VIP table changed is not used",
        given: &[G::Entry { backend: 2, age: 0 }, G::CachedStale(2)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Cached(2), A::CacheHits(0)],
    },
    Row {
        name: "every 32nd hit takes the full path and refreshes the table",
        given: &[
            G::Entry { backend: 2, age: 3 },
            G::CachedHits(2, REFRESH_EVERY - 1),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::CacheHits(0)],
    },
    Row {
        name: "another flow in the flow's cache slot: the table answers",
        given: &[G::Entry { backend: 2, age: 0 }, G::CacheCollision(3)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Cached(2)],
    },
    Row {
        name: "a FIN bypasses the cache to mark the entry closing",
        given: &[G::Entry { backend: 2, age: 0 }, G::Cached(2)],
        packet: Fin(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::RefreshClosing),
        after: &[A::EntryClosing, A::Entry(2)],
    },
    Row {
        name: "an RST bypasses the cache to mark the entry closing",
        given: &[G::Entry { backend: 2, age: 0 }, G::Cached(2)],
        packet: Rst(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::RefreshClosing),
        after: &[A::EntryClosing],
    },
    Row {
        name: "a SYN reusing a cached flow's port follows the live ring and replaces the cache entry",
        given: &[G::Entry { backend: 2, age: 0 }, G::Cached(2)],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1), A::Cached(1)],
    },
    Row {
        name: "an ICMP error about a cached flow is not served from the cache",
        given: &[G::Entry { backend: 2, age: 5 }, G::Cached(2)],
        packet: TooBig(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Nothing),
        after: &[A::EntryUntouched, A::CacheHits(0)],
    },
    // Rule 4: a SYN follows the live ring.
    Row {
        name: "a SYN: the live ring, recorded, not cached",
        given: &[],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[
            A::Entry(1),
            A::EntryOpen,
            A::NotCached,
            A::Count(Counter::LbNewFlow, 1),
        ],
    },
    Row {
        name: "a SYN on a port whose old connection's entry names another backend",
        given: &[G::Entry { backend: 2, age: 1 }],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1), A::Cached(1)],
    },
    Row {
        name: "a SYN to a VIP whose ring is empty is dropped",
        given: &[G::Live(0)],
        packet: Syn(Tcp80),
        expect: Drop(Some(Via::RingSyn)),
        after: &[A::NoEntry],
    },
    Row {
        name: "a SYN takes no second chance",
        given: &[G::Previous(2), G::Window(Window::Open)],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "a SYN-ACK is not a SYN: mid-stream rules",
        given: &[G::Previous(2), G::Window(Window::Open)],
        packet: SynAck(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Record),
        after: &[A::Entry(2)],
    },
    Row {
        name: "a SYN to a down backend still named by the live ring goes there",
        given: &[G::Live(3), G::Backend(3, BackendState::Down)],
        packet: Syn(Tcp80),
        expect: Fwd(3, Via::RingSyn, U::Record),
        after: &[A::Entry(3)],
    },
    Row {
        name: "a SYN on a closing entry's port starts afresh",
        given: &[G::Entry { backend: 2, age: 0 }, G::EntryClosing],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1), A::EntryOpen],
    },
    Row {
        name: "a new flow whose buckets are full displaces the stalest embryonic flow, counted",
        given: &[G::BucketsFull],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[
            A::Entry(1),
            A::Embryonic,
            A::Count(Counter::LbConntrackEvicted, 1),
        ],
    },
    Row {
        name: "a new flow whose buckets hold only established flows is not recorded, counted",
        given: &[G::BucketsFullEstablished],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[
            A::NoEntry,
            A::Count(Counter::LbConntrackFull, 1),
            A::Count(Counter::LbConntrackEvicted, 0),
        ],
    },
    Row {
        name: "... and neither is its next packet: it follows the ring",
        given: &[G::BucketsFullEstablished, G::Live(3)],
        packet: Ack(Tcp80),
        expect: Fwd(3, Via::RingNoEntry, U::Record),
        after: &[A::NoEntry, A::Count(Counter::LbConntrackFull, 1)],
    },
    Row {
        name: "a SYN's entry is embryonic",
        given: &[],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1), A::Embryonic],
    },
    Row {
        name: "the next packet that is not a SYN establishes it",
        given: &[G::EntryEmbryonic(2)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Entry(2), A::Established],
    },
    Row {
        name: "a retransmitted SYN starts afresh, embryonic",
        given: &[G::EntryEmbryonic(2)],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1), A::Embryonic],
    },
    Row {
        name: "a mid-stream packet without an entry is recorded embryonic",
        given: &[],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1), A::Embryonic],
    },
    Row {
        name: "a UDP flow's first datagram is recorded embryonic",
        given: &[],
        packet: Udp(Udp53),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1), A::Embryonic],
    },
    Row {
        name: "its second datagram establishes it",
        given: &[G::EntryEmbryonic(2)],
        packet: Udp(Udp53),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Entry(2), A::Established],
    },
    // Rule 5: the connection table.
    Row {
        name: "an established flow: its entry, refreshed, and cached",
        given: &[G::Entry { backend: 2, age: 3 }],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Entry(2), A::Cached(2)],
    },
    Row {
        name: "an established flow stays on its backend whatever the ring says",
        given: &[G::Entry { backend: 4, age: 0 }, G::Live(2)],
        packet: Ack(Tcp80),
        expect: Fwd(4, Via::ConnTable, U::Refresh),
        after: &[A::Entry(4)],
    },
    Row {
        name: "a draining backend keeps its flows",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Backend(2, BackendState::Draining),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Cached(2)],
    },
    Row {
        name: "a down backend's flow is re-picked from the live ring",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Backend(2, BackendState::Down),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingRepick, U::Record),
        after: &[A::Entry(1), A::Cached(1)],
    },
    Row {
        name: "a removed backend's flow is re-picked",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Backend(2, BackendState::Unused),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingRepick, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "an entry naming a slot reused for another VIP's backend is re-picked",
        given: &[G::Entry { backend: 2, age: 0 }, G::BackendOfOtherVip(2)],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingRepick, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "a re-pick with an empty ring drops the packet",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Backend(2, BackendState::Down),
            G::Live(0),
        ],
        packet: Ack(Tcp80),
        expect: Drop(Some(Via::RingRepick)),
        after: &[A::Entry(2)],
    },
    Row {
        name: "a re-pick does not take the second chance",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Backend(2, BackendState::Down),
            G::Previous(3),
            G::Window(Window::Open),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingRepick, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "a closing entry still steers the flow's last packets, uncached",
        given: &[G::Entry { backend: 2, age: 0 }, G::EntryClosing],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::EntryClosing, A::NotCached],
    },
    Row {
        name: "the client's FIN marks the entry closing",
        given: &[G::Entry { backend: 3, age: 0 }],
        packet: Fin(Tcp80),
        expect: Fwd(3, Via::ConnTable, U::RefreshClosing),
        after: &[A::EntryClosing, A::NotCached],
    },
    Row {
        name: "the client's RST marks the entry closing",
        given: &[G::Entry { backend: 3, age: 0 }],
        packet: Rst(Tcp80),
        expect: Fwd(3, Via::ConnTable, U::RefreshClosing),
        after: &[A::EntryClosing],
    },
    Row {
        name: "a TCP entry idle for an hour still holds (TCP entries do not expire by time)",
        given: &[G::Entry {
            backend: 2,
            age: 3600,
        }],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Entry(2)],
    },
    Row {
        name: "UDP: a fresh entry holds, and UDP is never cached",
        given: &[G::Entry { backend: 2, age: 1 }],
        packet: Udp(Udp53),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Entry(2), A::NotCached],
    },
    Row {
        name: "UDP: an entry idle just under the timeout holds",
        given: &[G::Entry {
            backend: 2,
            age: UDP_TIMEOUT_S as u32 - 1,
        }],
        packet: Udp(Udp53),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Entry(2)],
    },
    Row {
        name: "UDP: an entry idle past the timeout is a new flow on the live ring",
        given: &[G::Entry {
            backend: 2,
            age: UDP_TIMEOUT_S as u32 + 1,
        }],
        packet: Udp(Udp53),
        expect: Fwd(1, Via::RingUdpExpired, U::Record),
        after: &[A::Entry(1), A::NotCached],
    },
    Row {
        name: "UDP: an expired entry and an empty ring drop the datagram",
        given: &[
            G::Entry {
                backend: 2,
                age: UDP_TIMEOUT_S as u32 + 1,
            },
            G::Live(0),
        ],
        packet: Udp(Udp53),
        expect: Drop(Some(Via::RingUdpExpired)),
        after: &[],
    },
    Row {
        name: "UDP: an entry another CPU refreshed a moment ahead of this clock is not idle",
        given: &[G::EntryAhead(2)],
        packet: Udp(Udp53),
        expect: Fwd(2, Via::ConnTable, U::Refresh),
        after: &[A::Entry(2)],
    },
    Row {
        name: "UDP: a first datagram is a new flow",
        given: &[],
        packet: Udp(Udp53),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1), A::NotCached],
    },
    Row {
        name: "UDP: a down backend's flow is re-picked",
        given: &[
            G::Entry { backend: 2, age: 1 },
            G::Backend(2, BackendState::Down),
        ],
        packet: Udp(Udp53),
        expect: Fwd(1, Via::RingRepick, U::Record),
        after: &[A::Entry(1)],
    },
    // Rule 6 in gue mode: the second hop.
    Row {
        name: "gue: mid-stream without an entry, the rings differ: the live ring's backend, the previous one's as second hop, nothing recorded",
        given: &[G::Gue, G::Previous(2), G::Window(Window::Open)],
        packet: Ack(Tcp80),
        expect: Expect::SecondHop(1, 2),
        after: &[A::NoEntry, A::NotCached, A::Count(Counter::LbSecondHop, 1)],
    },
    Row {
        name: "gue: a FIN without an entry asks the same way",
        given: &[G::Gue, G::Previous(2), G::Window(Window::Open)],
        packet: Fin(Tcp80),
        expect: Expect::SecondHop(1, 2),
        after: &[A::NoEntry],
    },
    Row {
        name: "gue: second hop to a draining backend",
        given: &[
            G::Gue,
            G::Previous(2),
            G::Window(Window::Open),
            G::Backend(2, BackendState::Draining),
        ],
        packet: Ack(Tcp80),
        expect: Expect::SecondHop(1, 2),
        after: &[A::NoEntry],
    },
    Row {
        name: "gue: the rings agree: the plain second chance",
        given: &[G::Gue, G::Previous(1), G::Window(Window::Open)],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::SecondChance, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "gue: the previous ring's backend is down: the live ring",
        given: &[
            G::Gue,
            G::Previous(2),
            G::Window(Window::Open),
            G::Backend(2, BackendState::Down),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "gue: backends of different families: the plain second chance",
        given: &[
            G::Gue,
            G::Previous(2),
            G::Window(Window::Open),
            G::BackendV6(2),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Record),
        after: &[A::Entry(2)],
    },
    Row {
        name: "gue: the live ring's slot is empty: the plain second chance",
        given: &[G::Gue, G::Live(0), G::Previous(2), G::Window(Window::Open)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Record),
        after: &[A::Entry(2)],
    },
    Row {
        name: "gue: a SYN never carries a second hop",
        given: &[G::Gue, G::Previous(2), G::Window(Window::Open)],
        packet: Syn(Tcp80),
        expect: Fwd(1, Via::RingSyn, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "gue: an ICMP error takes the plain second chance",
        given: &[G::Gue, G::Previous(2), G::Window(Window::Open)],
        packet: TooBig(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Nothing),
        after: &[A::NoEntry],
    },
    Row {
        name: "gue: window expired: the second hop still (no deadline, the backend tells)",
        given: &[G::Gue, G::Previous(2), G::Window(Window::Expired)],
        packet: Ack(Tcp80),
        expect: Expect::SecondHop(1, 2),
        after: &[A::NoEntry],
    },
    Row {
        name: "gue: no previous ring (never changed, or being rewritten): the live ring alone",
        given: &[G::Gue, G::Previous(2), G::Window(Window::Closed)],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "gue: an entry keeps its backend, no second hop",
        given: &[
            G::Gue,
            G::Previous(2),
            G::Window(Window::Open),
            G::Entry { backend: 3, age: 1 },
        ],
        packet: Ack(Tcp80),
        expect: Fwd(3, Via::ConnTable, U::Refresh),
        after: &[A::Entry(3)],
    },
    // Rule 6: the second chance.
    Row {
        name: "mid-stream without an entry, window open: the previous ring",
        given: &[G::Previous(2), G::Window(Window::Open)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Record),
        after: &[A::Entry(2), A::NotCached],
    },
    Row {
        name: "second chance to a draining backend",
        given: &[
            G::Previous(2),
            G::Window(Window::Open),
            G::Backend(2, BackendState::Draining),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Record),
        after: &[A::Entry(2)],
    },
    Row {
        name: "no second chance to a down backend: the live ring",
        given: &[
            G::Previous(2),
            G::Window(Window::Open),
            G::Backend(2, BackendState::Down),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "no second chance to a slot reused for another VIP",
        given: &[
            G::Previous(2),
            G::Window(Window::Open),
            G::BackendOfOtherVip(2),
        ],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "no second chance while the window is closed (a ring being written)",
        given: &[G::Previous(2), G::Window(Window::Closed)],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "no second chance once the window has passed",
        given: &[G::Previous(2), G::Window(Window::Expired)],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "no second chance from an empty previous slot",
        given: &[G::Previous(0), G::Window(Window::Open)],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "UDP takes no second chance",
        given: &[G::Previous(2), G::Window(Window::Open)],
        packet: Udp(Udp53),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1)],
    },
    Row {
        name: "a FIN without an entry takes the second chance and is recorded closing",
        given: &[G::Previous(2), G::Window(Window::Open)],
        packet: Fin(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::RecordClosing),
        after: &[A::Entry(2), A::EntryClosing, A::NotCached],
    },
    Row {
        name: "an RST without an entry takes the second chance and is recorded closing",
        given: &[G::Previous(3), G::Window(Window::Open)],
        packet: Rst(Tcp80),
        expect: Fwd(3, Via::SecondChance, U::RecordClosing),
        after: &[A::Entry(3), A::EntryClosing],
    },
    Row {
        name: "second chance while the live ring is empty",
        given: &[G::Previous(2), G::Window(Window::Open), G::Live(0)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Record),
        after: &[A::Entry(2)],
    },
    Row {
        name: "second chance refused and the live ring empty: dropped",
        given: &[
            G::Previous(2),
            G::Window(Window::Open),
            G::Backend(2, BackendState::Down),
            G::Live(0),
        ],
        packet: Ack(Tcp80),
        expect: Drop(Some(Via::RingNoEntry)),
        after: &[A::NoEntry],
    },
    Row {
        name: "second chance on a port-0 VIP",
        given: &[G::Previous(4), G::Window(Window::Open)],
        packet: Ack(AnyPort(8443)),
        expect: Fwd(4, Via::SecondChance, U::Record),
        after: &[A::Entry(4)],
    },
    // Rule 7: the live ring.
    Row {
        name: "mid-stream without an entry and no window: the live ring, recorded",
        given: &[],
        packet: Ack(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Record),
        after: &[A::Entry(1), A::NotCached, A::Count(Counter::LbNewFlow, 1)],
    },
    Row {
        name: "the live ring names a down backend (not yet republished): it is used",
        given: &[G::Live(2), G::Backend(2, BackendState::Down)],
        packet: Ack(Tcp80),
        expect: Fwd(2, Via::RingNoEntry, U::Record),
        after: &[A::Entry(2)],
    },
    Row {
        name: "an empty live ring drops mid-stream packets",
        given: &[G::Live(0)],
        packet: Ack(Tcp80),
        expect: Drop(Some(Via::RingNoEntry)),
        after: &[A::NoEntry],
    },
    // Rule 8: ICMP errors about a flow.
    Row {
        name: "ICMP too-big about an established flow goes to its backend, touching nothing",
        given: &[G::Entry { backend: 3, age: 2 }],
        packet: TooBig(Tcp80),
        expect: Fwd(3, Via::ConnTable, U::Nothing),
        after: &[A::EntryUntouched, A::NotCached],
    },
    Row {
        name: "ICMP too-big about a flow without an entry: the live ring, nothing recorded",
        given: &[],
        packet: TooBig(Tcp80),
        expect: Fwd(1, Via::RingNoEntry, U::Nothing),
        after: &[A::NoEntry, A::Count(Counter::LbNewFlow, 0)],
    },
    Row {
        name: "ICMP too-big about a flow without an entry, window open: the second chance",
        given: &[G::Previous(2), G::Window(Window::Open)],
        packet: TooBig(Tcp80),
        expect: Fwd(2, Via::SecondChance, U::Nothing),
        after: &[A::NoEntry],
    },
    Row {
        name: "ICMP too-big about a UDP flow whose entry expired still follows the entry",
        given: &[G::Entry {
            backend: 2,
            age: UDP_TIMEOUT_S as u32 + 60,
        }],
        packet: TooBig(Udp53),
        expect: Fwd(2, Via::ConnTable, U::Nothing),
        after: &[A::EntryUntouched],
    },
    Row {
        name: "ICMP too-big about a flow whose backend is down: re-picked, nothing recorded",
        given: &[
            G::Entry { backend: 2, age: 0 },
            G::Backend(2, BackendState::Down),
        ],
        packet: TooBig(Tcp80),
        expect: Fwd(1, Via::RingRepick, U::Nothing),
        after: &[A::Entry(2)],
    },
    Row {
        name: "ICMP too-big about a flow of a VIP with no backend: dropped",
        given: &[G::Live(0)],
        packet: TooBig(Tcp80),
        expect: Drop(Some(Via::RingNoEntry)),
        after: &[],
    },
];

fn vip_addr(family: Family, n: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    match family {
        Family::V4 => a[..4].copy_from_slice(&[198, 18, 100, n]),
        Family::V6 => {
            a[..8].copy_from_slice(&[0xfd, 0, 1, 0x98, 0, 0x18, 1, 0]);
            a[15] = n;
        }
    }
    a
}

fn client(family: Family) -> [u8; 16] {
    let mut a = [0u8; 16];
    match family {
        Family::V4 => a[..4].copy_from_slice(&[198, 18, 0, 10]),
        Family::V6 => {
            a[..8].copy_from_slice(&[0xfd, 0, 1, 0x98, 0, 0x18, 0, 0]);
            a[15] = 0x10;
        }
    }
    a
}

/// VIP ids: per family, `.1:80/tcp`, `.1:53/udp`, `.2:0/tcp`, `.1:0/tcp`.
fn vip_id(family: Family, n: u32) -> u32 {
    n + if family == Family::V6 { 4 } else { 0 }
}

fn vip_key(family: Family, addr: u8, port: u16, proto: u8) -> VipKey {
    VipKey {
        addr: vip_addr(family, addr),
        port,
        proto,
        family: family.wire(),
    }
}

/// The model every row starts from.
fn base() -> Model {
    let mut m = Model::new(
        ModelSizes {
            max_vips: 8,
            max_backends: 8,
            ring_size: RING,
            conntrack_buckets: 16,
            flow_cache_slots: 64,
        },
        LbConfig {
            hash_seed: 0x5eed,
            udp_timeout_ns: UDP_TIMEOUT_S * 1_000_000_000,
            tcp_idle_timeout_ns: 3_600_000_000_000,
            conntrack_seed: 0x0123_4567_89ab_cdef,
            ..LbConfig::default()
        },
    );
    m.now_ticks = NOW_TICKS;
    m.now_ns = NOW_NS;
    for id in 1..=4 {
        m.backends[id as usize] = BackendInfo {
            state: BackendState::Up.wire(),
            vip_id: crate::maps::BACKEND_ANY_VIP,
            ..BackendInfo::default()
        };
    }
    let mut vips = Vec::new();
    for family in [Family::V4, Family::V6] {
        vips.push((
            vip_key(family, 1, 80, IPPROTO_TCP),
            VipInfo::new(vip_id(family, 0), Mode::Ipip),
        ));
        vips.push((
            vip_key(family, 1, 53, IPPROTO_UDP),
            VipInfo::new(vip_id(family, 1), Mode::Ipip),
        ));
        vips.push((
            vip_key(family, 2, 0, IPPROTO_TCP),
            VipInfo::new(vip_id(family, 2), Mode::L2dsr),
        ));
        for n in 0..3 {
            m.write_ring(vip_id(family, n), 0, &[1; RING as usize]);
        }
    }
    m.set_vips(&vips).unwrap();
    m
}

fn flow(family: Family, dst: Dst) -> FlowKey {
    let (addr, port, proto) = match dst {
        Tcp80 => (1, 80, IPPROTO_TCP),
        Udp53 => (1, 53, IPPROTO_UDP),
        AnyPort(p) => (2, p, IPPROTO_TCP),
        WrongPort => (1, 81, IPPROTO_TCP),
        NotVip => (9, 80, IPPROTO_TCP),
    };
    FlowKey {
        src: client(family),
        dst: vip_addr(family, addr),
        src_port: 40_000,
        dst_port: port,
        proto,
        family: family.wire(),
        _pad: [0; 2],
    }
}

/// The VIP id the row's flow belongs to.
fn row_vip(family: Family, dst: Dst) -> u32 {
    match dst {
        Udp53 => vip_id(family, 1),
        AnyPort(_) => vip_id(family, 2),
        WrongPort => vip_id(family, 3),
        _ => vip_id(family, 0),
    }
}

fn entry(m: &Model, key: &FlowKey) -> Option<conntrack::ConnSlot> {
    let p = conntrack::probe(key, m.config.conntrack_seed, m.config.conntrack_bucket_mask);
    let f = conntrack::find(&m.table, key, &p)?;
    Some(m.table.slots[f.idx as usize])
}

fn cache_slot(m: &Model, key: &FlowKey) -> usize {
    (slot_of(key) & (m.config.flow_cache_slots - 1)) as usize
}

/// An entry for `key`, established unless `embryonic`.
fn set_entry(m: &mut Model, key: &FlowKey, backend: u32, now: u32, embryonic: bool) {
    let p = conntrack::probe(key, m.config.conntrack_seed, m.config.conntrack_bucket_mask);
    let t = Timeouts::of(m.config.udp_timeout_ns, m.config.tcp_idle_timeout_ns);
    let Some((Placement::Way { idx, .. }, _)) =
        conntrack::own_or_place(&m.table, key, &p, now, t, true)
    else {
        panic!("no way for the row's entry");
    };
    conntrack::fill(&mut m.table, idx, key, &p, backend, now).unwrap();
    if !embryonic {
        conntrack::touch(&mut m.table, idx, now, false, true).unwrap();
    }
}

/// The state of `key`'s entry's head word now.
fn entry_state(m: &Model, key: &FlowKey) -> Option<WayState> {
    let p = conntrack::probe(key, m.config.conntrack_seed, m.config.conntrack_bucket_mask);
    let f = conntrack::find(&m.table, key, &p)?;
    let word =
        m.table.heads[(f.idx / conntrack::WAYS) as usize].ways[(f.idx % conntrack::WAYS) as usize];
    let t = Timeouts::of(m.config.udp_timeout_ns, m.config.tcp_idle_timeout_ns);
    Some(conntrack::way_state(word, NOW_TICKS, t))
}

fn cache(m: &mut Model, key: &FlowKey, backend: u32, vip: u32, hits: u32, epoch: u32) {
    let slot = cache_slot(m, key);
    m.cache[slot].set(CachedFlow {
        key: *key,
        backend_id: backend,
        hits,
        vip_epoch: epoch,
        vip_id: vip,
        mode: Mode::Ipip.wire(),
        _pad: [0; 7],
    });
}

fn given(m: &mut Model, family: Family, dst: Dst, g: Given) {
    let key = flow(family, dst);
    let vip = row_vip(family, dst);
    match g {
        G::Unconfigured => m.config.ring_size = 0,
        G::Backend(id, state) => m.backends[id as usize].state = state.wire(),
        G::BackendOfOtherVip(id) => m.backends[id as usize].vip_id = 7,
        G::Live(b) => m.write_ring(
            vip,
            m.ring_states[vip as usize].live_generation(),
            &[b; RING as usize],
        ),
        G::Previous(b) => m.write_ring(
            vip,
            m.ring_states[vip as usize].live_generation() ^ 1,
            &[b; RING as usize],
        ),
        G::Window(w) => {
            let until = match w {
                Window::Open => NOW_NS + 60_000_000_000,
                Window::Closed => 0,
                Window::Expired => NOW_NS - 1_000_000_000,
            };
            let live = m.ring_states[vip as usize].live_generation();
            m.ring_states[vip as usize] = RingState::new(live, until);
        }
        G::Entry { backend, age } => set_entry(m, &key, backend, NOW_TICKS - age * SECOND, false),
        G::EntryEmbryonic(backend) => set_entry(m, &key, backend, NOW_TICKS, true),
        G::EntryClosing => {
            let p = conntrack::probe(
                &key,
                m.config.conntrack_seed,
                m.config.conntrack_bucket_mask,
            );
            let f = conntrack::find(&m.table, &key, &p).expect("an entry to close");
            conntrack::touch(&mut m.table, f.idx, NOW_TICKS, true, true).unwrap();
        }
        G::EntryAhead(backend) => set_entry(m, &key, backend, NOW_TICKS + 2, false),
        G::Cached(b) => cache(m, &key, b, vip, 0, m.epoch),
        G::CachedHits(b, hits) => cache(m, &key, b, vip, hits, m.epoch),
        G::CachedStale(b) => cache(m, &key, b, vip, 0, m.epoch.wrapping_sub(2)),
        G::CacheCollision(b) => {
            let slot = cache_slot(m, &key);
            let mut other = key;
            other.src_port ^= 1;
            m.cache[slot].set(CachedFlow {
                key: other,
                backend_id: b,
                vip_epoch: m.epoch,
                vip_id: vip,
                ..CachedFlow::default()
            });
        }
        G::Gue => {
            let vips: Vec<(VipKey, VipInfo)> = m
                .vip_table
                .iter()
                .skip(((m.epoch & 1) * m.config.vip_slots) as usize)
                .take(m.config.vip_slots as usize)
                .filter(|s| s.key.family != 0)
                .map(|s| {
                    let mode = if s.info.vip_id == vip {
                        Mode::Gue
                    } else {
                        s.info.mode()
                    };
                    (s.key, VipInfo::new(s.info.vip_id, mode))
                })
                .collect();
            m.set_vips(&vips).unwrap();
        }
        G::BackendV6(id) => m.backends[id as usize].family = Family::V6.wire(),
        G::AnyPortOnTcpVip(b) => {
            let mut vips: Vec<(VipKey, VipInfo)> = m
                .vip_table
                .iter()
                .skip(((m.epoch & 1) * m.config.vip_slots) as usize)
                .take(m.config.vip_slots as usize)
                .filter(|s| s.key.family != 0)
                .map(|s| (s.key, s.info))
                .collect();
            let id = vip_id(family, 3);
            vips.push((
                vip_key(family, 1, 0, IPPROTO_TCP),
                VipInfo::new(id, Mode::Ipip),
            ));
            m.write_ring(id, 0, &[b; RING as usize]);
            m.set_vips(&vips).unwrap();
        }
        G::BucketsFull | G::BucketsFullEstablished => {
            let established = matches!(g, G::BucketsFullEstablished);
            let t = Timeouts::of(m.config.udp_timeout_ns, m.config.tcp_idle_timeout_ns);
            let p = conntrack::probe(
                &key,
                m.config.conntrack_seed,
                m.config.conntrack_bucket_mask,
            );
            // Other clients' flows until both candidate buckets are full.
            let mut n = 0u32;
            let full = |m: &Model| {
                p.buckets
                    .iter()
                    .all(|&b| m.table.heads[b as usize].ways.iter().all(|&w| w != 0))
            };
            while !full(m) {
                let mut other = key;
                other.src[3] = other.src[3].wrapping_add(1 + (n >> 16) as u8);
                other.src_port = n as u16;
                n += 1;
                let q = conntrack::probe(
                    &other,
                    m.config.conntrack_seed,
                    m.config.conntrack_bucket_mask,
                );
                if q.buckets.iter().any(|b| p.buckets.contains(b))
                    && let Some(Placement::Way {
                        idx,
                        evicts_live: false,
                    }) = conntrack::place(&m.table, &q, NOW_TICKS, t)
                    && p.buckets.contains(&(idx / conntrack::WAYS))
                {
                    conntrack::fill(&mut m.table, idx, &other, &q, 2, NOW_TICKS).unwrap();
                    if established {
                        conntrack::touch(&mut m.table, idx, NOW_TICKS, false, true).unwrap();
                    }
                }
                assert!(n < 1 << 20, "could not fill the buckets");
            }
        }
    }
}

fn update_kind(u: &Update) -> Upd {
    match *u {
        Update::Nothing => U::Nothing,
        Update::CacheHit => U::CacheHit,
        Update::Refresh { closing: false, .. } => U::Refresh,
        Update::Refresh { closing: true, .. } => U::RefreshClosing,
        Update::Record { closing: false, .. } => U::Record,
        Update::Record { closing: true, .. } => U::RecordClosing,
    }
}

fn describe(d: &Decision) -> String {
    match d.verdict {
        Verdict::Forward(f) => format!(
            "forward to {} via {:?}, {:?}",
            f.backend_id,
            d.via,
            update_kind(&f.plan.update)
        ),
        Verdict::Pass(c) => format!("pass ({})", c.name()),
        Verdict::Drop(c) => format!("drop ({}) via {:?}", c.name(), d.via),
    }
}

/// Plays one row in one family; `Err` says what differed.
fn run(row: &Row, family: Family) -> Result<(), String> {
    let mut m = base();
    let dst = row.packet.dst();
    for g in row.given {
        given(&mut m, family, dst, *g);
    }
    let key = flow(family, dst);
    let before = entry(&m, &key);
    let cfg = m.config;
    let epoch = m.epoch;
    let d = decide(&m, &cfg, epoch, &key, row.packet.kind());
    let got = describe(&d);
    let plan = match (row.expect, d.verdict) {
        (Expect::Forward(backend, via, upd), Verdict::Forward(f))
            if f.backend_id == backend
                && d.via == Some(via)
                && update_kind(&f.plan.update) == upd
                && f.plan.vip_id == row_vip(family, dst) =>
        {
            Some(f.plan)
        }
        (Expect::SecondHop(backend, hop), Verdict::Forward(f))
            if f.backend_id == backend
                && d.via == Some(Via::SecondHop)
                && f.plan.update == Update::Nothing
                && f.second_hop
                    .is_some_and(|h| core::ptr::eq(h, &m.backends[hop as usize]))
                && f.plan.vip_id == row_vip(family, dst) =>
        {
            Some(f.plan)
        }
        (Expect::Forward(..), Verdict::Forward(f)) if f.second_hop.is_some() => {
            return Err(format!("decided {got} with a second hop"));
        }
        (Expect::Pass(c), Verdict::Pass(got)) if c == got && d.via.is_none() => None,
        (Expect::Drop(via), Verdict::Drop(Counter::LbNoBackend)) if d.via == via => None,
        (want, _) => return Err(format!("decided {got}, expected {want:?}")),
    };
    let icmp = matches!(row.packet, TooBig(_)) && !matches!(row.expect, Expect::Pass(_));
    if d.icmp != icmp {
        return Err(format!("icmp flag {} (decided {got})", d.icmp));
    }
    if let Some(plan) = plan {
        apply(&mut m, &cfg, epoch, &key, &plan);
    }
    let now_entry = entry(&m, &key);
    let slot = cache_slot(&m, &key);
    let cached = m.cache[slot].get();
    let cached_here = cached.backend_id != 0 && conntrack::same_flow(&cached.key, &key);
    for a in row.after {
        let ok = match *a {
            A::Entry(b) => now_entry.is_some_and(|e| e.backend_id == b),
            A::NoEntry => now_entry.is_none(),
            A::EntryClosing => now_entry.is_some_and(|e| e.flags & conntrack::SLOT_CLOSING != 0),
            A::EntryOpen => now_entry.is_some_and(|e| e.flags & conntrack::SLOT_CLOSING == 0),
            A::EntryUntouched => now_entry.is_some() && now_entry == before,
            A::Embryonic => entry_state(&m, &key) == Some(WayState::Embryonic),
            A::Established => entry_state(&m, &key) == Some(WayState::Established),
            A::Cached(b) => cached_here && cached.backend_id == b && cached.vip_epoch == m.epoch,
            A::NotCached => !cached_here,
            A::CacheHits(h) => cached_here && cached.hits == h,
            A::Count(c, n) => m.counter(c) == n,
        };
        if !ok {
            return Err(format!(
                "after: {a:?} does not hold (entry {:?}, cache {:?})",
                now_entry.map(|e| (e.backend_id, e.flags, e.last_seen)),
                cached_here.then_some((cached.backend_id, cached.hits))
            ));
        }
    }
    Ok(())
}

#[test]
fn every_row_holds_in_both_families() {
    assert!(ROWS.len() >= 60, "{} rows", ROWS.len());
    let mut failures = Vec::new();
    for row in ROWS {
        for family in [Family::V4, Family::V6] {
            if let Err(e) = run(row, family) {
                failures.push(format!("{} [{family}]: {e}", row.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn row_names_are_unique() {
    for (i, a) in ROWS.iter().enumerate() {
        assert!(ROWS[i + 1..].iter().all(|b| b.name != a.name), "{}", a.name);
    }
}

/// A ring publication flips one VIP's generation: another VIP's flows and
/// this CPU's flow cache do not notice.
#[test]
fn a_ring_flip_touches_one_vip_only() {
    let mut m = base();
    let key = flow(Family::V4, Tcp80);
    set_entry(&mut m, &key, 2, NOW_TICKS, false);
    let epoch = m.epoch;
    cache(&mut m, &key, 2, 0, 0, epoch);
    // VIP 1 (the UDP VIP) flips to a new generation.
    m.write_ring(1, 1, &[3; RING as usize]);
    m.ring_states[1] = RingState::new(1, NOW_NS + 1);
    assert_eq!(m.epoch, epoch);
    let cfg = m.config;
    let d = decide(&m, &cfg, m.epoch, &key, Kind::Tcp { flags: TCP_ACK });
    assert_eq!(d.via, Some(Via::FlowCache));
    let udp = flow(Family::V4, Udp53);
    let d = decide(&m, &cfg, m.epoch, &udp, Kind::Udp);
    assert!(matches!(d.verdict, Verdict::Forward(f) if f.backend_id == 3));
}
