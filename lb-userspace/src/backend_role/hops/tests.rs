//! The second-hop rules without a kernel: what is resolved, refused,
//! backed off, forgotten and released, and which results are too old.

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn segment() -> Vec<Prefix> {
    vec![
        "198.18.0.0/24".parse().unwrap(),
        "fd00:198:18::/64".parse().unwrap(),
    ]
}

fn next_hop(via: &str, mac: u8) -> NextHop {
    NextHop {
        ifindex: 2,
        src_mac: [2, 0, 0, 0, 0, 1],
        mac: [2, 0, 0, 0, 0, mac],
        via: ip(via),
    }
}

fn resolved(via: &str, mac: u8) -> Lookup {
    Lookup::Resolved(next_hop(via, mac))
}

fn unresolved(via: &str) -> Lookup {
    Lookup::Unresolved {
        ifindex: 2,
        via: ip(via),
    }
}

fn results(seq: u64, asked: bool, rows: &[(&str, Lookup)]) -> Results {
    Results {
        seq,
        asked,
        addrs: rows.iter().map(|(a, _)| ip(a)).collect(),
        lookups: Ok(rows.iter().map(|(_, l)| l.clone()).collect()),
        manage_errors: BTreeMap::new(),
    }
}

fn managed(via: &str) -> Managed {
    Managed {
        ifindex: 2,
        via: ip(via),
        created: true,
    }
}

#[test]
fn what_a_second_hop_lookup_writes() {
    let hop = |mac: u8| Hop::Resolved(next_hop("198.18.0.21", mac));
    let unresolved = Hop::Unresolved(Some((2, ip("198.18.0.21"))));
    let nowhere = Hop::NoRoute("no route".into());
    let rows = [
        ("new and resolved", None, hop(1), HopWrite::Set),
        ("new without a route", None, nowhere.clone(), HopWrite::Set),
        ("new, resolving", None, unresolved.clone(), HopWrite::Record),
        ("unchanged", Some(hop(1)), hop(1), HopWrite::Nothing),
        ("MAC moved", Some(hop(1)), hop(2), HopWrite::Set),
        (
            "resolved, resolving again",
            Some(hop(1)),
            unresolved.clone(),
            HopWrite::Nothing,
        ),
        ("route gone", Some(hop(1)), nowhere.clone(), HopWrite::Set),
        (
            "route back, resolving",
            Some(nowhere.clone()),
            unresolved.clone(),
            HopWrite::Remove,
        ),
        ("route back, resolved", Some(nowhere), hop(1), HopWrite::Set),
        (
            "adopted, resolving",
            Some(Hop::Unresolved(None)),
            unresolved.clone(),
            HopWrite::Record,
        ),
        ("refused", Some(hop(1)), Hop::Refused, HopWrite::Set),
        (
            "allowed again",
            Some(Hop::Refused),
            unresolved,
            HopWrite::Remove,
        ),
    ];
    for (what, old, new, want) in rows {
        assert_eq!(hop_write(old.as_ref(), &new), want, "{what}");
    }
}

/// An address outside the list is written unreachable, never asked
/// about, and logged at most once a minute however often it comes back.
#[test]
fn a_second_hop_outside_the_list_is_refused_and_logged_once_a_minute() {
    let t0 = Instant::now();
    let mut h = Hops::new(segment(), 4096);
    let stranger = ip("203.0.113.9");
    let p = h.poll(&[stranger, ip("198.18.0.21")], true, t0);
    assert_eq!(p.ask, vec![ip("198.18.0.21")]);
    assert_eq!(p.writes, vec![Write::Unreachable(stranger)]);
    assert_eq!(p.refused, vec![stranger]);
    assert_eq!(h.to_refresh(), vec![ip("198.18.0.21")], "never looked up");
    // Queued again (its entry was evicted): written again, not logged.
    let p = h.poll(&[stranger], true, t0 + Duration::from_secs(30));
    assert_eq!(p.writes, vec![Write::Unreachable(stranger)]);
    assert!(p.refused.is_empty() && p.ask.is_empty());
    let p = h.poll(&[stranger], true, t0 + Duration::from_secs(61));
    assert_eq!(p.refused, vec![stranger], "a minute later, logged again");
    assert_eq!((h.requests, h.failures), (4, 3));
    assert_eq!(
        h.iter().find(|(a, _)| **a == stranger).map(|(_, h)| h),
        Some(&Hop::Refused)
    );
    // An empty list refuses everything.
    let mut none = Hops::new(Vec::new(), 16);
    let p = none.poll(&[ip("198.18.0.21")], true, t0);
    assert!(p.ask.is_empty());
    assert_eq!(p.writes, vec![Write::Unreachable(ip("198.18.0.21"))]);
}

/// A refresh whose lookups finished before an ask's must not undo the
/// ask's resolution, whichever arrives first.
#[test]
fn an_older_result_never_overwrites_a_newer_one() {
    let t0 = Instant::now();
    let a = ip("198.18.0.21");
    let mut h = Hops::new(segment(), 4096);
    h.poll(&[a], true, t0);
    let counter = h.seq_counter();
    // The refresh's lookups finish first (unresolved), the ask's later
    // (resolved); the ask's answer arrives first.
    let refresh_seq = Hops::next_seq(&counter);
    let ask_seq = Hops::next_seq(&counter);
    let applied = h.apply(
        results(
            ask_seq,
            true,
            &[("198.18.0.21", resolved("198.18.0.21", 1))],
        ),
        t0,
    );
    assert_eq!(
        applied.writes,
        vec![Write::Set(a, next_hop("198.18.0.21", 1))]
    );
    let applied = h.apply(
        results(
            refresh_seq,
            false,
            &[("198.18.0.21", Lookup::NoRoute("no route".into()))],
        ),
        t0,
    );
    assert_eq!(applied.stale, 1);
    assert!(applied.writes.is_empty(), "{applied:?}");
    assert!(matches!(h.iter().next(), Some((_, Hop::Resolved(_)))));
    // A newer refresh is taken.
    let seq = Hops::next_seq(&counter);
    let applied = h.apply(
        results(seq, false, &[("198.18.0.21", resolved("198.18.0.21", 2))]),
        t0,
    );
    assert_eq!(
        applied.writes,
        vec![Write::Set(a, next_hop("198.18.0.21", 2))]
    );
    // A result for an address that became known after its lookups
    // finished is older than the address.
    let before = Hops::next_seq(&counter);
    let b = ip("198.18.0.22");
    h.poll(&[b], true, t0);
    let applied = h.apply(
        results(before, true, &[("198.18.0.22", resolved("198.18.0.22", 3))]),
        t0,
    );
    assert_eq!(applied.stale, 1);
}

/// A second hop the kernel cannot resolve is asked about after 1, 2, 4,
/// ... seconds, never more than a minute apart; resolving it resets that.
#[test]
fn an_unresolvable_second_hop_backs_off_up_to_a_minute() {
    assert_eq!(backoff(1), Duration::from_secs(1));
    assert_eq!(backoff(2), Duration::from_secs(2));
    assert_eq!(backoff(6), Duration::from_secs(32));
    assert_eq!(backoff(7), MAX_BACKOFF);
    assert_eq!(backoff(1000), MAX_BACKOFF);
    let t0 = Instant::now();
    let a = ip("198.18.0.99");
    let mut h = Hops::new(segment(), 4096);
    let counter = h.seq_counter();
    let mut now = t0;
    let mut asked_at = Vec::new();
    // The data plane queues it every 100 ms for ten minutes.
    while now < t0 + Duration::from_secs(600) {
        let p = h.poll(&[a], true, now);
        if !p.ask.is_empty() {
            asked_at.push(now.duration_since(t0).as_secs());
            let seq = Hops::next_seq(&counter);
            h.apply(
                results(seq, true, &[("198.18.0.99", unresolved("198.18.0.99"))]),
                now,
            );
        }
        now += Duration::from_millis(100);
    }
    assert_eq!(
        &asked_at[..8],
        [0, 1, 3, 7, 15, 31, 63, 123],
        "{asked_at:?}"
    );
    let gaps: Vec<u64> = asked_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g <= 60), "{gaps:?}");
    assert!(asked_at.len() < 20, "{asked_at:?}");
    // Resolved by a refresh: the next ask (after an eviction) is at once.
    let seq = Hops::next_seq(&counter);
    h.apply(
        results(seq, false, &[("198.18.0.99", resolved("198.18.0.99", 1))]),
        now,
    );
    let later = now + Duration::from_secs(1);
    let evicted = h.sync(&BTreeSet::new(), later);
    assert!(evicted.is_empty());
    assert!(h.is_empty(), "evicted from the map: forgotten");
    assert_eq!(h.poll(&[a], true, later).ask, vec![a]);
}

/// A second hop the LRU evicted comes back through the queue before lbd
/// reads the map again: it is looked up and written again, not taken for
/// unchanged.
#[test]
fn a_second_hop_queued_again_after_an_eviction_is_written_again() {
    let t0 = Instant::now();
    let a = ip("198.18.0.21");
    let mut h = Hops::new(segment(), 4096);
    let counter = h.seq_counter();
    h.poll(&[a], true, t0);
    let seq = Hops::next_seq(&counter);
    let first = h.apply(
        results(seq, true, &[("198.18.0.21", resolved("198.18.0.21", 1))]),
        t0,
    );
    assert_eq!(first.writes.len(), 1);
    let later = t0 + Duration::from_millis(300);
    assert_eq!(h.poll(&[a], true, later).ask, vec![a]);
    let seq = Hops::next_seq(&counter);
    let again = h.apply(
        results(seq, true, &[("198.18.0.21", resolved("198.18.0.21", 1))]),
        later,
    );
    assert_eq!(again.writes, first.writes);
}

#[test]
fn an_ask_in_flight_defers_new_ones_without_dropping_them() {
    let t0 = Instant::now();
    let mut h = Hops::new(segment(), 4096);
    let p = h.poll(&[ip("198.18.0.21"), ip("203.0.113.1")], false, t0);
    assert_eq!(p.deferred, vec![ip("198.18.0.21")]);
    assert!(p.ask.is_empty());
    assert_eq!(p.writes, vec![Write::Unreachable(ip("203.0.113.1"))]);
    let p = h.poll(&[ip("198.18.0.21")], true, t0);
    assert_eq!(p.ask, vec![ip("198.18.0.21")]);
}

/// At most `capacity` second hops: one lbd wrote nothing for goes first
/// (the least recently asked about), else the least recently asked about
/// of all, its entry removed.
#[test]
fn the_known_second_hops_are_bounded() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let mut h = Hops::new(segment(), 3);
    let counter = h.seq_counter();
    for (i, a) in ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
        .iter()
        .enumerate()
    {
        h.poll(&[ip(a)], true, t0 + s * i as u32);
    }
    // .1 and .3 resolved (written); .2 still resolving.
    let seq = Hops::next_seq(&counter);
    h.apply(
        results(
            seq,
            true,
            &[
                ("198.18.0.1", resolved("198.18.0.1", 1)),
                ("198.18.0.2", unresolved("198.18.0.2")),
                ("198.18.0.3", resolved("198.18.0.3", 3)),
            ],
        ),
        t0 + s * 3,
    );
    let p = h.poll(&[ip("198.18.0.4")], true, t0 + s * 4);
    assert!(p.writes.is_empty(), "{p:?}");
    let known: Vec<IpAddr> = h.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        known,
        [ip("198.18.0.1"), ip("198.18.0.3"), ip("198.18.0.4")]
    );
    // All written now but .4: .4 is the one lbd wrote nothing for.
    let p = h.poll(&[ip("198.18.0.5")], true, t0 + s * 5);
    assert!(p.writes.is_empty());
    assert_eq!(h.len(), 3);
    assert!(h.iter().all(|(a, _)| *a != ip("198.18.0.4")));
    let seq = Hops::next_seq(&counter);
    h.apply(
        results(seq, true, &[("198.18.0.5", resolved("198.18.0.5", 5))]),
        t0 + s * 5,
    );
    // Everything written: the least recently asked about goes, entry too.
    let p = h.poll(&[ip("203.0.113.7")], true, t0 + s * 6);
    assert_eq!(
        p.writes,
        vec![
            Write::Remove(ip("198.18.0.1")),
            Write::Unreachable(ip("203.0.113.7"))
        ]
    );
    assert_eq!(h.len(), 3);
}

/// `DECAP_HOPS` is the truth for what lbd wrote: evicted entries are
/// forgotten, unknown ones adopted; what lbd wrote nothing for ages out
/// when the data plane stops asking; a new list applies to what is known.
#[test]
fn sync_follows_the_map_the_clock_and_the_list() {
    let t0 = Instant::now();
    let mut h = Hops::new(segment(), 4096);
    let counter = h.seq_counter();
    let (a, b, c) = (ip("198.18.0.21"), ip("198.18.0.22"), ip("198.18.0.23"));
    h.poll(&[a, b], true, t0);
    let seq = Hops::next_seq(&counter);
    h.apply(
        results(
            seq,
            true,
            &[
                ("198.18.0.21", resolved("198.18.0.21", 1)),
                ("198.18.0.22", unresolved("198.18.0.22")),
            ],
        ),
        t0,
    );
    // a written and still there, b not written: both kept; c in the map
    // but unknown (an earlier lbd's): adopted, to be looked up.
    let present: BTreeSet<IpAddr> = [a, c].into();
    assert!(h.sync(&present, t0 + Duration::from_secs(5)).is_empty());
    assert_eq!(h.to_refresh(), vec![a, b, c]);
    assert_eq!(
        h.iter().find(|(x, _)| **x == c).unwrap().1,
        &Hop::Unresolved(None)
    );
    // b not asked about for IDLE: gone; a evicted: gone.
    let later = t0 + IDLE;
    let present: BTreeSet<IpAddr> = [c].into();
    assert!(h.sync(&present, later).is_empty());
    assert_eq!(h.to_refresh(), vec![c]);
    // The list shrinks: c is refused (written unreachable) ...
    h.set_allowed(vec!["198.18.0.0/31".parse().unwrap()]);
    assert_eq!(h.sync(&present, later), vec![Write::Unreachable(c)]);
    assert!(h.to_refresh().is_empty());
    // ... and grows again: its entry goes, the data plane asks again.
    h.set_allowed(segment());
    assert_eq!(h.sync(&present, later), vec![Write::Remove(c)]);
    assert!(h.is_empty());
    // An adopted address outside the list is refused at once.
    let present: BTreeSet<IpAddr> = [ip("203.0.113.1")].into();
    assert_eq!(
        h.sync(&present, later),
        vec![Write::Unreachable(ip("203.0.113.1"))]
    );
}

/// The neighbour entries lbd manages are released once no known second
/// hop goes through them (two behind one gateway share it), and none
/// while an adopted second hop has not been looked up.
#[test]
fn neighbours_are_released_when_no_second_hop_needs_them() {
    let t0 = Instant::now();
    let mut h = Hops::new(vec!["0.0.0.0/0".parse().unwrap()], 4096);
    let counter = h.seq_counter();
    let gw = managed("198.18.0.1");
    let direct = managed("198.18.0.21");
    let old = managed("198.18.0.99");
    let all = [gw, direct, old];
    // Adopted from an earlier lbd and not looked up yet: keep everything.
    let present: BTreeSet<IpAddr> = [ip("198.18.0.21")].into();
    h.sync(&present, t0);
    assert!(h.unreferenced(&all).is_empty());
    h.poll(&[ip("203.0.113.5"), ip("203.0.113.6")], true, t0);
    let seq = Hops::next_seq(&counter);
    h.apply(
        results(
            seq,
            false,
            &[
                ("198.18.0.21", resolved("198.18.0.21", 1)),
                ("203.0.113.5", resolved("198.18.0.1", 9)),
                ("203.0.113.6", unresolved("198.18.0.1")),
            ],
        ),
        t0,
    );
    assert_eq!(h.unreferenced(&all), vec![old]);
    // One of the two behind the gateway goes: the gateway stays.
    let present: BTreeSet<IpAddr> = [ip("198.18.0.21")].into();
    h.sync(&present, t0 + IDLE);
    assert_eq!(h.to_refresh(), vec![ip("198.18.0.21")]);
    assert_eq!(h.unreferenced(&all), vec![gw, old]);
    // A route that moves to no route releases its neighbour too.
    let seq = Hops::next_seq(&counter);
    h.apply(
        results(
            seq,
            false,
            &[("198.18.0.21", Lookup::NoRoute("gone".into()))],
        ),
        t0 + IDLE,
    );
    assert_eq!(h.unreferenced(&all), all.to_vec());
}

/// Netlink failing: every address of the task is reported (once a
/// minute), an ask counts as failed and backs off.
#[test]
fn a_failed_lookup_is_reported_and_backs_off() {
    let t0 = Instant::now();
    let a = ip("198.18.0.21");
    let mut h = Hops::new(segment(), 4096);
    h.poll(&[a], true, t0);
    let seq = Hops::next_seq(&h.seq_counter());
    let mut r = results(seq, true, &[]);
    r.addrs = vec![a];
    r.lookups = Err("netlink: busy".into());
    let applied = h.apply(r, t0);
    assert_eq!(applied.failed.len(), 1);
    assert!(applied.failed[0].1.contains("netlink: busy"));
    assert_eq!((h.requests, h.failures), (1, 1));
    assert!(
        h.poll(&[a], true, t0 + Duration::from_millis(500))
            .ask
            .is_empty()
    );
    assert_eq!(h.poll(&[a], true, t0 + HOLD_OFF).ask, vec![a]);
}
