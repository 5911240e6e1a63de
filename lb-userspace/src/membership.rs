//! Who is in a VIP's ring, and with what weight. Pure: the controller feeds
//! it health, drains, weights and the time, and writes what it returns.
//!
//! - A backend is a member once its checks pass: never before its first
//!   passing check ([`Health::Unchecked`]), not while down, not while flap
//!   damping holds it down.
//! - Panic mode: when fewer than `min_healthy` of a VIP's candidates (not
//!   drained, weight above 0, checked at least once) are members, every
//!   candidate is kept in the ring. Concentrating a whole VIP's load on the
//!   few survivors of a cascade finishes them off; failing open spreads it
//!   over everyone, and only the requests that reach a dead backend fail.
//! - Slow start: a backend that becomes a member (added, recovered,
//!   undrained, released from a flap hold) ramps from a small weight to
//!   its own over `slowstart`, in steps, so a cold cache or a JIT warming
//!   up is not handed its full share at once.
//! - Weight ramps (`lbctl set-weight --over`): the weight moves from where
//!   it was to the new one in steps.
//!
//! Steps are at least a second apart ([`MIN_STEP`]): each step republishes
//! the ring.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::{api::BackendState, health::Health};

/// The shortest time between two steps of a ramp (each step republishes
/// the VIP's ring).
pub const MIN_STEP: Duration = Duration::from_secs(1);
/// Steps in a ramp, when it is long enough for them to be [`MIN_STEP`]
/// apart.
pub const RAMP_STEPS: u32 = 20;

/// Flap damping: more than `limit` health changes within `window` hold the
/// backend down for `hold`. A hold is extended, doubled, when the backend
/// flapped as much again while held; the next hold within `max_hold` of the
/// last one ending starts doubled too; holds never exceed `max_hold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlapDamping {
    pub limit: u32,
    pub window: Duration,
    pub hold: Duration,
    pub max_hold: Duration,
}

impl Default for FlapDamping {
    /// Four changes a minute are a backend restarting twice; a fifth is a
    /// flap. The first hold is 30 s, the longest 10 min.
    fn default() -> Self {
        FlapDamping {
            limit: 4,
            window: Duration::from_secs(60),
            hold: Duration::from_secs(30),
            max_hold: Duration::from_secs(600),
        }
    }
}

/// A backend's health changes, and the hold they earned.
#[derive(Clone, Debug, Default)]
pub struct FlapRecord {
    changes: VecDeque<Instant>,
    held_until: Option<Instant>,
    /// The next hold's length; 0: `hold`.
    next_hold: Duration,
    last_release: Option<Instant>,
    /// Health changes since lbd started (for `lb_backend_flaps_total`).
    pub total: u64,
}

/// What a health change or the passing of time did to a flap hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlapEvent {
    Held(Duration),
    Released,
}

impl FlapRecord {
    pub fn held(&self) -> bool {
        self.held_until.is_some()
    }

    /// When the hold ends, if there is one.
    pub fn held_until(&self) -> Option<Instant> {
        self.held_until
    }

    /// Records a health change at `now`; returns the hold it started.
    pub fn change(&mut self, now: Instant, d: &FlapDamping) -> Option<FlapEvent> {
        self.total += 1;
        self.changes.push_back(now);
        self.prune(now, d);
        if self.held() || (self.changes.len() as u32) <= d.limit {
            return None;
        }
        Some(self.hold(now, d))
    }

    /// Ends a hold that has run out, or extends it (doubled) if the backend
    /// flapped more than `limit` times within `window` while held (the
    /// changes that started the hold do not count again).
    pub fn tick(&mut self, now: Instant, d: &FlapDamping) -> Option<FlapEvent> {
        let until = self.held_until?;
        if now < until {
            return None;
        }
        self.prune(now, d);
        if (self.changes.len() as u32) > d.limit {
            return Some(self.hold(now, d));
        }
        self.held_until = None;
        self.last_release = Some(now);
        Some(FlapEvent::Released)
    }

    fn prune(&mut self, now: Instant, d: &FlapDamping) {
        while self
            .changes
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > d.window)
        {
            self.changes.pop_front();
        }
    }

    fn hold(&mut self, now: Instant, d: &FlapDamping) -> FlapEvent {
        let quiet_since_release = self
            .last_release
            .is_none_or(|r| now.saturating_duration_since(r) > d.max_hold);
        let hold = if self.next_hold.is_zero() || (!self.held() && quiet_since_release) {
            d.hold
        } else {
            self.next_hold
        }
        .min(d.max_hold);
        self.next_hold = (hold * 2).min(d.max_hold);
        self.held_until = Some(now + hold);
        // What earned this hold is paid for: only changes from now on can
        // extend it.
        self.changes.clear();
        FlapEvent::Held(hold)
    }
}

/// `set-weight --over`: the weight moves from `from` to the backend's
/// configured weight over `over`, from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightRamp {
    pub from: u32,
    pub start: Instant,
    pub over: Duration,
}

/// Where a ramp towards `weight` is at `now`.
pub fn ramped(weight: u32, ramp: Option<WeightRamp>, now: Instant) -> u32 {
    match ramp {
        None => weight,
        Some(r) => {
            let t = stepped(now.saturating_duration_since(r.start), r.over);
            let (from, to) = (f64::from(r.from), f64::from(weight));
            (from + (to - from) * t).round() as u32
        }
    }
}

/// One backend, as the ring sees it.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub health: Health,
    pub drained: bool,
    /// The configured weight (a ramp's target).
    pub weight: u32,
    pub flap_held: bool,
    /// Since when the backend is a member, if it became one after lbd
    /// started (a backend up at the first publication has no slow start:
    /// everyone starting together is no start at all).
    pub member_since: Option<Instant>,
    pub slowstart: Duration,
    pub ramp: Option<WeightRamp>,
}

/// What a VIP's ring is made of now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipPlan {
    pub panic: bool,
    /// Per backend, in order: the state the data plane gets and the weight
    /// in the ring (0: not in it).
    pub backends: Vec<(BackendState, u32)>,
}

/// The fraction `t` of the way through a ramp of length `over`, in
/// whole steps: at most [`RAMP_STEPS`] steps, at least [`MIN_STEP`] apart.
fn stepped(elapsed: Duration, over: Duration) -> f64 {
    if over.is_zero() || elapsed >= over {
        return 1.0;
    }
    let step = (over / RAMP_STEPS).max(MIN_STEP);
    let steps_done = (elapsed.as_nanos() / step.as_nanos()) as f64;
    let steps_total = over.as_nanos().div_ceil(step.as_nanos()) as f64;
    (steps_done / steps_total).min(1.0)
}

impl Member {
    /// A backend with this health and weight, nothing else going on: not
    /// drained, not held, no slow start or ramp.
    pub fn steady(health: Health, weight: u32) -> Member {
        Member {
            health,
            drained: false,
            weight,
            flap_held: false,
            member_since: None,
            slowstart: Duration::ZERO,
            ramp: None,
        }
    }

    /// Checks pass and no flap hold: it belongs in the ring.
    pub fn healthy(&self) -> bool {
        self.health == Health::Up && !self.flap_held
    }

    /// It would be in the ring if healthy: not drained, weight above 0, and
    /// checked at least once (a backend nobody has checked is not kept in
    /// the ring even in panic).
    fn candidate(&self) -> bool {
        !self.drained && self.weight > 0 && self.health != Health::Unchecked
    }

    /// The weight before slow start: the configured one, or where its ramp
    /// is now.
    pub fn base_weight(&self, now: Instant) -> u32 {
        ramped(self.weight, self.ramp, now)
    }

    /// The weight in the ring while it is a member: its base weight, scaled
    /// by slow start, never below 1 (a member gets some traffic).
    fn member_weight(&self, now: Instant) -> u32 {
        let base = self.base_weight(now);
        let Some(since) = self.member_since else {
            return base;
        };
        let t = stepped(now.saturating_duration_since(since), self.slowstart);
        if t >= 1.0 {
            return base;
        }
        // The first step is the ramp's first fraction, not nothing.
        let t = t.max(1.0 / f64::from(RAMP_STEPS));
        ((f64::from(base) * t).round() as u32).max(1)
    }

    /// Whether a ramp or slow start still has steps to take at `now`.
    pub fn ramping(&self, now: Instant) -> bool {
        let ramp = self
            .ramp
            .is_some_and(|r| now.saturating_duration_since(r.start) < r.over);
        let slow = self
            .member_since
            .is_some_and(|s| now.saturating_duration_since(s) < self.slowstart);
        ramp || slow
    }
}

/// `min_healthy` as a fraction 0..=1 in thousandths; 0 turns panic mode
/// off.
pub fn in_panic(members: &[Member], min_healthy_permille: u32) -> bool {
    if min_healthy_permille == 0 {
        return false;
    }
    let candidates = members.iter().filter(|m| m.candidate()).count() as u64;
    let healthy = members
        .iter()
        .filter(|m| m.candidate() && m.healthy())
        .count() as u64;
    candidates > 0 && healthy * 1000 < u64::from(min_healthy_permille) * candidates
}

/// The VIP's ring now: each backend's data-plane state and ring weight.
pub fn plan(members: &[Member], min_healthy_permille: u32, now: Instant) -> VipPlan {
    let panic = in_panic(members, min_healthy_permille);
    let backends = members
        .iter()
        .map(|m| {
            if m.drained || m.base_weight(now) == 0 {
                (BackendState::Draining, 0)
            } else if m.healthy() {
                (BackendState::Up, m.member_weight(now))
            } else if panic && m.candidate() {
                // Kept as it was before it failed: full weight, no ramp.
                (BackendState::Up, m.base_weight(now))
            } else {
                (BackendState::Down, 0)
            }
        })
        .collect();
    VipPlan { panic, backends }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(weight: u32) -> Member {
        Member::steady(Health::Up, weight)
    }

    fn down(weight: u32) -> Member {
        Member::steady(Health::Down, weight)
    }

    fn weights(p: &VipPlan) -> Vec<u32> {
        p.backends.iter().map(|b| b.1).collect()
    }

    #[test]
    fn only_healthy_backends_are_members() {
        let now = Instant::now();
        let unchecked = Member {
            health: Health::Unchecked,
            ..up(100)
        };
        let held = Member {
            flap_held: true,
            ..up(100)
        };
        let drained = Member {
            drained: true,
            ..up(100)
        };
        let p = plan(
            &[up(100), down(100), unchecked, held, drained, up(0)],
            0,
            now,
        );
        assert!(!p.panic);
        assert_eq!(
            p.backends,
            vec![
                (BackendState::Up, 100),
                (BackendState::Down, 0),
                (BackendState::Down, 0),
                (BackendState::Down, 0),
                (BackendState::Draining, 0),
                (BackendState::Draining, 0),
            ]
        );
    }

    #[test]
    fn panic_keeps_every_checked_candidate_below_the_threshold() {
        let now = Instant::now();
        // 1 of 4 healthy, threshold 0.5: panic, all four in the ring.
        let four = [up(100), down(100), down(50), down(100)];
        let p = plan(&four, 500, now);
        assert!(p.panic);
        assert_eq!(weights(&p), vec![100, 100, 50, 100]);
        assert!(p.backends.iter().all(|b| b.0 == BackendState::Up));
        // 2 of 4 is not below one half.
        let two = [up(100), up(100), down(100), down(100)];
        assert!(!plan(&two, 500, now).panic);
        assert_eq!(weights(&plan(&two, 500, now)), vec![100, 100, 0, 0]);
        // Off by default.
        assert!(!plan(&four, 0, now).panic);
        // Drained, zero-weight and never-checked backends neither count
        // nor join.
        let unchecked = Member {
            health: Health::Unchecked,
            ..up(100)
        };
        let drained = Member {
            drained: true,
            ..down(100)
        };
        let p = plan(&[up(100), down(100), unchecked, drained], 600, now);
        assert!(p.panic, "1 of 2 candidates is below 0.6");
        assert_eq!(weights(&p), vec![100, 100, 0, 0]);
        // Every backend down: panic keeps them all (fail open).
        let p = plan(&[down(10), down(10)], 500, now);
        assert!(p.panic);
        assert_eq!(weights(&p), vec![10, 10]);
        // No candidate at all: nothing to panic about.
        assert!(!plan(&[unchecked], 500, now).panic);
    }

    #[test]
    fn slow_start_ramps_in_steps_to_the_full_weight() {
        let t0 = Instant::now();
        let m = Member {
            member_since: Some(t0),
            slowstart: Duration::from_secs(30),
            ..up(100)
        };
        let at = |s: f64| plan(&[m], 0, t0 + Duration::from_secs_f64(s)).backends[0].1;
        assert_eq!(at(0.0), 5, "the first step is a twentieth, not nothing");
        // Steps of 1.5 s (30 s / 20).
        assert_eq!(at(1.4), 5);
        assert_eq!(at(1.5), 5);
        assert_eq!(at(3.0), 10);
        assert_eq!(at(15.0), 50);
        assert_eq!(at(29.9), 95);
        assert_eq!(at(30.0), 100);
        let mut last = 0;
        for s in 0..=31 {
            let w = at(f64::from(s));
            assert!(w >= last, "never goes back");
            last = w;
        }
        assert!(m.ramping(t0 + Duration::from_secs(29)));
        assert!(!m.ramping(t0 + Duration::from_secs(30)));
        // A short slow start steps once a second, not faster.
        let short = Member {
            slowstart: Duration::from_secs(4),
            ..m
        };
        let w = |s: f64| plan(&[short], 0, t0 + Duration::from_secs_f64(s)).backends[0].1;
        assert_eq!(
            [w(0.0), w(0.9), w(1.0), w(2.0), w(3.0), w(4.0)],
            [5, 5, 25, 50, 75, 100]
        );
        // A weight-1 backend still gets a slot's worth.
        let tiny = Member { weight: 1, ..m };
        assert_eq!(plan(&[tiny], 0, t0).backends[0].1, 1);
    }

    #[test]
    fn weight_ramps_both_ways_and_reach_their_target() {
        let t0 = Instant::now();
        let over = Duration::from_secs(60);
        let canary = Member {
            ramp: Some(WeightRamp {
                from: 0,
                start: t0,
                over,
            }),
            ..up(200)
        };
        let bleed = Member {
            ramp: Some(WeightRamp {
                from: 100,
                start: t0,
                over,
            }),
            ..up(0)
        };
        let at = |s: u64| plan(&[canary, bleed], 0, t0 + Duration::from_secs(s));
        // Weight 0 at the start of a canary is not a member yet.
        assert_eq!(at(0).backends[0], (BackendState::Draining, 0));
        assert_eq!(at(0).backends[1], (BackendState::Up, 100));
        assert_eq!(weights(&at(30)), vec![100, 50]);
        assert_eq!(weights(&at(59)), vec![190, 5]);
        assert_eq!(at(60).backends[0], (BackendState::Up, 200));
        assert_eq!(at(60).backends[1], (BackendState::Draining, 0));
    }

    #[test]
    fn flapping_holds_the_backend_down_longer_each_time() {
        let d = FlapDamping {
            limit: 4,
            window: Duration::from_secs(10),
            hold: Duration::from_secs(30),
            max_hold: Duration::from_secs(100),
        };
        let t0 = Instant::now();
        let s = |n: f64| t0 + Duration::from_secs_f64(n);
        let mut r = FlapRecord::default();
        for i in 0..4 {
            assert_eq!(r.change(s(f64::from(i) * 0.3), &d), None);
        }
        assert_eq!(
            r.change(s(1.2), &d),
            Some(FlapEvent::Held(Duration::from_secs(30)))
        );
        assert!(r.held());
        assert_eq!(r.total, 5);
        // Changes while held are counted but do not stack holds.
        assert_eq!(r.change(s(2.0), &d), None);
        assert_eq!(r.tick(s(20.0), &d), None, "still held");
        // Quiet for the window before the hold ends: released.
        assert_eq!(r.tick(s(31.2), &d), Some(FlapEvent::Released));
        assert!(!r.held());
        // Flapping again soon after: a doubled hold.
        for i in 0..5 {
            r.change(s(40.0 + f64::from(i) * 0.3), &d);
        }
        assert_eq!(r.held_until(), Some(s(41.2) + Duration::from_secs(60)));
        // Still flapping when it ends: held again, doubled, capped.
        for i in 0..5 {
            r.change(s(95.0 + f64::from(i)), &d);
        }
        assert_eq!(
            r.tick(s(101.2), &d),
            Some(FlapEvent::Held(Duration::from_secs(100)))
        );
        // Released, then quiet for longer than the longest hold: back to
        // the first hold's length.
        assert_eq!(r.tick(s(201.2), &d), Some(FlapEvent::Released));
        for i in 0..5 {
            r.change(s(400.0 + f64::from(i) * 0.3), &d);
        }
        assert_eq!(r.held_until(), Some(s(401.2) + Duration::from_secs(30)));
    }

    #[test]
    fn a_backend_quiet_while_held_is_released_when_the_hold_ends() {
        // The defaults: the window (60 s) outlasts the hold (30 s), and the
        // changes that started the hold must not extend it.
        let d = FlapDamping::default();
        let t0 = Instant::now();
        let mut r = FlapRecord::default();
        for i in 0..5u64 {
            r.change(t0 + Duration::from_millis(i * 300), &d);
        }
        let held_at = t0 + Duration::from_millis(1200);
        assert_eq!(r.held_until(), Some(held_at + d.hold));
        assert_eq!(r.tick(held_at + d.hold, &d), Some(FlapEvent::Released));
    }

    #[test]
    fn a_few_changes_spread_out_are_not_a_flap() {
        let d = FlapDamping::default();
        let t0 = Instant::now();
        let mut r = FlapRecord::default();
        for i in 0..20u64 {
            assert_eq!(r.change(t0 + Duration::from_secs(i * 20), &d), None);
        }
        assert!(!r.held());
    }
}
