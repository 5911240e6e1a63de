//! The second hops lbd knows of, without the netlink and map work (the
//! daemon does that and hands the results in), so that every rule here is
//! tested on its own:
//!
//! - Only second hops inside `decap.second_hops` are resolved; any other
//!   is written to `DECAP_HOPS` as unreachable (the data plane drops its
//!   packets as `drop_no_route` and stops asking), and gets no neighbour
//!   entry.
//! - At most `capacity` addresses are known (the size of `DECAP_HOPS`).
//!   One the map no longer holds (its LRU evicted it) is forgotten, as is
//!   one lbd wrote nothing for that the data plane has not asked about for
//!   [`IDLE`]. The neighbour entries lbd manages for forgotten hops are
//!   then released ([`Hops::unreferenced`]).
//! - Every lookup result carries a sequence number taken when its lookup
//!   finished; a result older than the one an address last took is
//!   ignored, so a slow refresh cannot undo a newer resolution.
//! - A second hop the kernel could not resolve is asked about again only
//!   after a back-off that doubles from [`HOLD_OFF`] up to [`MAX_BACKOFF`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::config::Prefix;
use crate::neigh::{Lookup, Managed, NextHop};

/// A second hop asked about is not asked again for this long; each ask
/// that does not resolve it doubles the wait, up to [`MAX_BACKOFF`].
pub const HOLD_OFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A second hop lbd wrote nothing for (its next hop unresolved) is
/// forgotten when the data plane has not asked about it for this long.
pub const IDLE: Duration = Duration::from_secs(600);

/// A failure for one second hop is logged at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// What lbd last learnt of a second hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hop {
    Resolved(NextHop),
    /// Routed, its next hop's MAC not known (yet); `None`: not looked up
    /// yet (adopted from a running data plane).
    Unresolved(Option<(u32, IpAddr)>),
    /// No route: written as unreachable.
    NoRoute(String),
    /// Outside `decap.second_hops`: written as unreachable, never
    /// resolved.
    Refused,
}

impl Hop {
    pub fn of(l: Lookup) -> Hop {
        match l {
            Lookup::Resolved(h) => Hop::Resolved(h),
            Lookup::Unresolved { ifindex, via } => Hop::Unresolved(Some((ifindex, via))),
            Lookup::NoRoute(why) => Hop::NoRoute(why),
        }
    }
}

/// A change to `DECAP_HOPS` the daemon makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Set(IpAddr, NextHop),
    /// An entry with interface 0: the data plane drops the second hop's
    /// packets as `drop_no_route` and does not ask again.
    Unreachable(IpAddr),
    /// No entry: the data plane asks about it again.
    Remove(IpAddr),
}

/// What a second hop's new lookup asks of `DECAP_HOPS`.
#[derive(Debug, PartialEq, Eq)]
pub enum HopWrite {
    /// Nothing changed, or a resolved hop is being resolved again: its
    /// entry stays (the MAC is most likely still right meanwhile).
    Nothing,
    /// Write the new next hop (or, for no route, an unreachable entry).
    Set,
    /// Remove the entry: routed again but not resolved yet, the program
    /// queues it again rather than counting it unroutable.
    Remove,
    /// Nothing to write; remember the new state.
    Record,
}

pub fn hop_write(old: Option<&Hop>, new: &Hop) -> HopWrite {
    match (old, new) {
        (Some(o), n) if o == n => HopWrite::Nothing,
        (_, Hop::Resolved(_) | Hop::NoRoute(_) | Hop::Refused) => HopWrite::Set,
        (Some(Hop::Resolved(_)), Hop::Unresolved(_)) => HopWrite::Nothing,
        (Some(Hop::NoRoute(_) | Hop::Refused), Hop::Unresolved(_)) => HopWrite::Remove,
        (_, Hop::Unresolved(_)) => HopWrite::Record,
    }
}

/// One known second hop.
#[derive(Clone, Debug)]
pub struct Entry {
    pub hop: Hop,
    /// `DECAP_HOPS` holds an entry for it (lbd's, or an earlier lbd's).
    written: bool,
    /// The sequence number of the newest result taken.
    seq: u64,
    /// The neighbour its latest lookup went through: the one it needs.
    via: Option<(u32, IpAddr)>,
    /// A lookup has been taken since it became known (until then the
    /// neighbour an earlier lbd managed for it may still be its own).
    looked_up: bool,
    /// When the data plane last asked about it (or it became known).
    used: Instant,
    /// Asks in a row that did not resolve it.
    misses: u32,
    /// Not asked about again before.
    next_ask: Instant,
}

/// The back-off after `misses` asks in a row that did not resolve a
/// second hop.
pub fn backoff(misses: u32) -> Duration {
    let doublings = misses.saturating_sub(1).min(16);
    (HOLD_OFF * (1u32 << doublings)).min(MAX_BACKOFF)
}

/// What [`Hops::poll`] decided for the addresses the data plane queued.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Poll {
    /// To have the kernel resolve, in a task.
    pub ask: Vec<IpAddr>,
    /// Left queued in `DECAP_NEIGH` (an ask is in flight): the next poll
    /// takes them. Every other address is taken off the queue.
    pub deferred: Vec<IpAddr>,
    pub writes: Vec<Write>,
    /// Refused addresses to log (rate-limited already).
    pub refused: Vec<IpAddr>,
}

/// The lookups of one task, in `addrs`' order.
pub struct Results {
    /// Taken when the lookups finished (see [`Hops::next_seq`]).
    pub seq: u64,
    /// From an ask (the data plane queued them), not a refresh.
    pub asked: bool,
    pub addrs: Vec<IpAddr>,
    pub lookups: Result<Vec<Lookup>, String>,
    /// Why making an address's next hop managed failed.
    pub manage_errors: BTreeMap<IpAddr, String>,
}

/// What [`Hops::apply`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub writes: Vec<Write>,
    /// Second hops whose packets are dropped, and why, to log
    /// (rate-limited already).
    pub failed: Vec<(IpAddr, String)>,
    /// Results ignored: older than what the address had.
    pub stale: usize,
}

/// Keys logged recently; at most `cap` of them are remembered (past that,
/// new ones are not logged, only counted).
struct RateLimit {
    last: HashMap<IpAddr, Instant>,
    cap: usize,
    suppressed: u64,
}

impl RateLimit {
    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if let Some(t) = self.last.get(&ip)
            && now.duration_since(*t) < WARN_EVERY
        {
            return false;
        }
        if self.last.len() >= self.cap && !self.last.contains_key(&ip) {
            self.last.retain(|_, t| now.duration_since(*t) < WARN_EVERY);
            if self.last.len() >= self.cap {
                self.suppressed += 1;
                return false;
            }
        }
        self.last.insert(ip, now);
        true
    }
}

pub struct Hops {
    entries: BTreeMap<IpAddr, Entry>,
    allowed: Vec<Prefix>,
    capacity: usize,
    seq: Arc<AtomicU64>,
    /// Second hops the data plane asked about that lbd acted on (asked
    /// the kernel, or refused).
    pub requests: u64,
    /// Of those, the ones whose packets are dropped: no route, refused,
    /// or netlink failed.
    pub failures: u64,
    /// An ask task is in flight.
    pub asking: bool,
    /// A refresh task is in flight.
    pub refreshing: bool,
    warned: RateLimit,
}

impl Hops {
    /// No second hop known yet; at most `capacity`; only those in
    /// `allowed` resolved.
    pub fn new(allowed: Vec<Prefix>, capacity: usize) -> Hops {
        let capacity = capacity.max(1);
        Hops {
            entries: BTreeMap::new(),
            allowed,
            capacity,
            seq: Arc::new(AtomicU64::new(0)),
            requests: 0,
            failures: 0,
            asking: false,
            refreshing: false,
            warned: RateLimit {
                last: HashMap::new(),
                cap: capacity,
                suppressed: 0,
            },
        }
    }

    pub fn allowed(&self) -> &[Prefix] {
        &self.allowed
    }

    /// A new list: applied to the known second hops at the next
    /// [`Hops::sync`].
    pub fn set_allowed(&mut self, allowed: Vec<Prefix>) {
        self.allowed = allowed;
    }

    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|p| p.contains(ip))
    }

    /// The counter a task takes its results' sequence number from.
    pub fn seq_counter(&self) -> Arc<AtomicU64> {
        self.seq.clone()
    }

    /// A sequence number for results whose lookups just finished.
    pub fn next_seq(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Hop)> {
        self.entries.iter().map(|(a, e)| (a, &e.hop))
    }

    /// Log lines left out since start because too many addresses were
    /// logged within a minute.
    pub fn suppressed(&self) -> u64 {
        self.warned.suppressed
    }

    fn entry(&self, hop: Hop, written: bool, now: Instant, looked_up: bool) -> Entry {
        Entry {
            hop,
            written,
            seq: self.seq.load(Ordering::Relaxed),
            via: None,
            looked_up,
            used: now,
            misses: 0,
            next_ask: now,
        }
    }

    /// Room for one more: the least recently asked-about address lbd
    /// wrote nothing for goes first, else the least recently asked-about
    /// of all (its entry removed).
    fn make_room(&mut self, writes: &mut Vec<Write>) {
        while self.entries.len() >= self.capacity {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| !e.written)
                .min_by_key(|(_, e)| e.used)
                .or_else(|| self.entries.iter().min_by_key(|(_, e)| e.used))
                .map(|(a, e)| (*a, e.written));
            let Some((ip, written)) = victim else { return };
            self.entries.remove(&ip);
            if written {
                writes.push(Write::Remove(ip));
            }
        }
    }

    /// Reconciles the known second hops with the addresses `DECAP_HOPS`
    /// holds now (`present`) and with the allowed list:
    /// - known, written, and no longer in the map (evicted): forgotten;
    /// - known, nothing written, not asked about for [`IDLE`]: forgotten;
    /// - in the map and not known (a running data plane adopted, or an
    ///   entry left by a failed write): known, to be looked up;
    /// - refused and now allowed: forgotten and its entry removed (the
    ///   data plane asks again); known and now outside the list: refused.
    pub fn sync(&mut self, present: &BTreeSet<IpAddr>, now: Instant) -> Vec<Write> {
        let mut writes = Vec::new();
        let allowed = self.allowed.clone();
        let is_allowed = |ip: IpAddr| allowed.iter().any(|p| p.contains(ip));
        self.entries.retain(|ip, e| {
            if e.written && !present.contains(ip) {
                return false;
            }
            if !e.written && now.duration_since(e.used) >= IDLE {
                return false;
            }
            match (&e.hop, is_allowed(*ip)) {
                (Hop::Refused, true) => {
                    writes.push(Write::Remove(*ip));
                    false
                }
                (Hop::Refused, false) => true,
                (_, false) => {
                    writes.push(Write::Unreachable(*ip));
                    e.hop = Hop::Refused;
                    e.written = true;
                    e.via = None;
                    e.looked_up = true;
                    true
                }
                (_, true) => true,
            }
        });
        let removed: BTreeSet<IpAddr> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Remove(ip) => Some(*ip),
                _ => None,
            })
            .collect();
        for ip in present {
            if self.entries.contains_key(ip) || removed.contains(ip) {
                continue;
            }
            self.make_room(&mut writes);
            let e = if is_allowed(*ip) {
                self.entry(Hop::Unresolved(None), true, now, false)
            } else {
                writes.push(Write::Unreachable(*ip));
                self.entry(Hop::Refused, true, now, true)
            };
            self.entries.insert(*ip, e);
        }
        writes
    }

    /// The addresses the data plane queued: each is taken off the queue
    /// (unless deferred) and either asked about (new, or its back-off
    /// over), refused (outside the list), or left for later (back-off).
    /// `can_ask`: no ask is in flight.
    pub fn poll(&mut self, pending: &[IpAddr], can_ask: bool, now: Instant) -> Poll {
        let mut out = Poll::default();
        for &ip in pending {
            let allowed = self.is_allowed(ip);
            let mut ask = false;
            let mut refuse = false;
            match self.entries.get_mut(&ip) {
                Some(e) => {
                    e.used = now;
                    if !allowed || e.hop == Hop::Refused {
                        // Queued again: its unreachable entry was evicted
                        // or not written yet.
                        refuse = true;
                    } else {
                        if e.written {
                            // Queued although lbd wrote it: the LRU evicted
                            // it (or the packet came before the write). What
                            // the next lookup finds is written again.
                            e.written = false;
                            e.hop = Hop::Unresolved(None);
                        }
                        ask = now >= e.next_ask;
                    }
                }
                None if !allowed => refuse = true,
                None => ask = true,
            }
            if refuse {
                self.make_room_for(ip, &mut out.writes);
                let e = self.entry(Hop::Refused, true, now, true);
                let e = self.entries.entry(ip).or_insert(e);
                e.hop = Hop::Refused;
                e.written = true;
                e.via = None;
                out.writes.push(Write::Unreachable(ip));
                self.requests += 1;
                self.failures += 1;
                if self.warned.allow(ip, now) {
                    out.refused.push(ip);
                }
                continue;
            }
            if !ask {
                continue;
            }
            if !can_ask {
                out.deferred.push(ip);
                continue;
            }
            self.make_room_for(ip, &mut out.writes);
            let fresh = self.entry(Hop::Unresolved(None), false, now, true);
            let e = self.entries.entry(ip).or_insert(fresh);
            // Until the answer sets the real back-off.
            e.next_ask = now + HOLD_OFF;
            self.requests += 1;
            out.ask.push(ip);
        }
        out
    }

    fn make_room_for(&mut self, ip: IpAddr, writes: &mut Vec<Write>) {
        if !self.entries.contains_key(&ip) {
            self.make_room(writes);
        }
    }

    /// The second hops a refresh looks up: all but the refused.
    pub fn to_refresh(&self) -> Vec<IpAddr> {
        self.entries
            .iter()
            .filter(|(_, e)| e.hop != Hop::Refused)
            .map(|(a, _)| *a)
            .collect()
    }

    /// Takes a task's lookups: what changed is written, results older than
    /// what an address has are ignored, and an ask that did not resolve
    /// its address backs it off.
    pub fn apply(&mut self, r: Results, now: Instant) -> Applied {
        let mut out = Applied::default();
        let lookups: Vec<Result<Lookup, String>> = match r.lookups {
            Ok(l) => l.into_iter().map(Ok).collect(),
            Err(e) => r
                .addrs
                .iter()
                .map(|_| Err(format!("looking the next hop up: {e}")))
                .collect(),
        };
        for (ip, lookup) in r.addrs.iter().zip(lookups) {
            let Some(e) = self.entries.get_mut(ip) else {
                continue;
            };
            if e.hop == Hop::Refused {
                continue;
            }
            if r.seq <= e.seq {
                out.stale += 1;
                continue;
            }
            e.seq = r.seq;
            let mut why = r.manage_errors.get(ip).cloned();
            let resolved = match lookup {
                Ok(l) => {
                    let hop = Hop::of(l);
                    e.looked_up = true;
                    e.via = match &hop {
                        Hop::Resolved(h) => Some((h.ifindex, h.via)),
                        Hop::Unresolved(at) => *at,
                        Hop::NoRoute(_) | Hop::Refused => None,
                    };
                    if let Hop::NoRoute(w) = &hop {
                        why.get_or_insert_with(|| w.clone());
                    }
                    let resolved = matches!(hop, Hop::Resolved(_));
                    match hop_write(Some(&e.hop), &hop) {
                        HopWrite::Nothing => {}
                        HopWrite::Set => {
                            out.writes.push(match &hop {
                                Hop::Resolved(h) => Write::Set(*ip, *h),
                                _ => Write::Unreachable(*ip),
                            });
                            e.written = true;
                            e.hop = hop;
                        }
                        HopWrite::Remove => {
                            out.writes.push(Write::Remove(*ip));
                            e.written = false;
                            e.hop = hop;
                        }
                        HopWrite::Record => e.hop = hop,
                    }
                    resolved
                }
                Err(w) => {
                    why.get_or_insert(w);
                    false
                }
            };
            if resolved {
                e.misses = 0;
                e.next_ask = now;
            } else if r.asked {
                e.misses = e.misses.saturating_add(1);
                e.next_ask = now + backoff(e.misses);
            }
            if let Some(w) = why {
                if r.asked {
                    self.failures += 1;
                }
                if self.warned.allow(*ip, now) {
                    out.failed.push((*ip, w));
                }
            }
        }
        out
    }

    /// A write to `DECAP_HOPS` failed: the address is forgotten (an entry
    /// left in the map is adopted again at the next sync).
    pub fn write_failed(&mut self, ip: IpAddr) {
        self.entries.remove(&ip);
    }

    /// Of the neighbour entries lbd manages, those no known second hop
    /// goes through any more; none while a second hop adopted from an
    /// earlier lbd has not been looked up (it may need one of them).
    pub fn unreferenced<'a>(&self, managed: impl IntoIterator<Item = &'a Managed>) -> Vec<Managed> {
        if self.entries.values().any(|e| !e.looked_up) {
            return Vec::new();
        }
        let used: BTreeSet<(u32, IpAddr)> = self.entries.values().filter_map(|e| e.via).collect();
        managed
            .into_iter()
            .filter(|m| !used.contains(&m.key()))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests;
