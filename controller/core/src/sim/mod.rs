//! Simulation: traces replayed through the real placement engine and autoscaler on a virtual clock.

pub mod arrivals;
pub mod serving;
pub mod traces;
