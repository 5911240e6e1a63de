//! Rise/fall hysteresis with HAProxy's semantics: a backend goes down after
//! `fall` consecutive failed checks and up after `rise` consecutive good
//! ones; while a change is building up checks run at `fastinter`, while down
//! at `downinter`, otherwise at `interval`.

use std::time::Duration;

use crate::config::HealthCheck;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
    /// Not checked yet: a backend enters the ring on its first passing
    /// check, not before.
    Unchecked,
}

#[derive(Clone, Debug)]
pub struct HealthState {
    health: Health,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl HealthState {
    /// Starting up (see [`HealthState::starting`] for any other state).
    pub fn new(rise: u32, fall: u32) -> Self {
        HealthState {
            health: Health::Up,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Starting from a known state (a restart adopting a backend as down).
    pub fn starting(rise: u32, fall: u32, health: Health) -> Self {
        HealthState {
            health,
            ..HealthState::new(rise, fall)
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Feeds one check result; returns the new state when it changed. The
    /// first result decides an unchecked backend's state at once.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        if self.health == Health::Unchecked {
            self.health = if ok { Health::Up } else { Health::Down };
            return Some(self.health);
        }
        let agrees = matches!(
            (self.health, ok),
            (Health::Up, true) | (Health::Down, false)
        );
        if agrees {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = match self.health {
            Health::Up => self.fall,
            Health::Down | Health::Unchecked => self.rise,
        };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.health = match self.health {
            Health::Up => Health::Down,
            Health::Down | Health::Unchecked => Health::Up,
        };
        Some(self.health)
    }

    /// How long to wait before the next check.
    pub fn next_interval(&self, check: &HealthCheck) -> Duration {
        if self.streak > 0 {
            check.fastinter
        } else if self.health == Health::Down {
            check.downinter
        } else {
            check.interval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckKind;

    fn check() -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            fastinter: Duration::from_millis(500),
            downinter: Duration::from_secs(5),
            flap: Default::default(),
        }
    }

    #[test]
    fn falls_after_fall_failures_in_a_row() {
        let mut s = HealthState::new(2, 3);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None, "a success resets the count");
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(Health::Down));
        assert_eq!(s.health(), Health::Down);
    }

    #[test]
    fn rises_after_rise_successes_in_a_row() {
        let mut s = HealthState::new(2, 1);
        assert_eq!(s.observe(false), Some(Health::Down));
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None, "a failure resets the count");
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(Health::Up));
    }

    #[test]
    fn the_first_result_decides_an_unchecked_backend() {
        let mut s = HealthState::starting(2, 3, Health::Unchecked);
        assert_eq!(s.observe(true), Some(Health::Up), "one pass, not rise");
        let mut s = HealthState::starting(2, 3, Health::Unchecked);
        assert_eq!(
            s.observe(false),
            Some(Health::Down),
            "one failure, not fall"
        );
        assert_eq!(s.observe(true), None, "then rise applies");
        assert_eq!(s.observe(true), Some(Health::Up));
    }

    #[test]
    fn intervals_follow_haproxy() {
        let c = check();
        let mut s = HealthState::new(2, 3);
        assert_eq!(s.next_interval(&c), c.interval);
        s.observe(false);
        assert_eq!(s.next_interval(&c), c.fastinter, "transition building up");
        s.observe(false);
        s.observe(false);
        assert_eq!(s.next_interval(&c), c.downinter, "down");
        s.observe(true);
        assert_eq!(s.next_interval(&c), c.fastinter, "coming back");
    }
}
