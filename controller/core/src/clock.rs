//! Time as the core sees it: injected, never read from the system inside a decision.
//!
//! The controller passes a [`SystemClock`]; tests and the simulator pass a [`ManualClock`] they advance
//! themselves, so a decision that depends on time is reproducible.

use std::{
    cell::Cell,
    time::{Duration, SystemTime},
};

/// A source of the current time.
pub trait Clock {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to: for tests and the discrete-event simulator.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Cell<SystemTime>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        Self { now: Cell::new(start) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now.set(self.now.get() + by);
    }

    /// Sets the clock to `to`. Time never runs backwards: an earlier `to` leaves the clock where it is.
    pub fn set(&self, to: SystemTime) {
        if to > self.now.get() {
            self.now.set(to);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.now.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_forward_and_only_when_told() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(clock.now(), start + Duration::from_millis(1_500));
        clock.set(start);
        assert_eq!(clock.now(), start + Duration::from_millis(1_500), "set must not move the clock back");
        clock.set(start + Duration::from_secs(10));
        assert_eq!(clock.now(), start + Duration::from_secs(10));
    }
}
