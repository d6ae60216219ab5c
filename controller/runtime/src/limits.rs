//! Per-tenant admission limits of the gateway: a token bucket of prediction creations per second and a cap on the
//! predictions a tenant has unfinished at once, per namespace (every key of a namespace shares them). A refusal is
//! a 429 with `Retry-After`, before anything is parsed or stored, so one tenant cannot flood the gateway's memory or
//! the fleet's hold queues at everyone else's expense. Time is passed in, so the arithmetic is tested without sleeping.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

/// The limits every namespace gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    /// Predictions created per second, sustained.
    pub rate_per_s: f64,
    /// Predictions created at once after a quiet spell (the bucket's size).
    pub burst: f64,
    /// Predictions unfinished at once (held, running, or waiting for a webhook-less async result).
    pub max_in_flight: u32,
    /// Bytes of request bodies of unfinished predictions (their inputs stay in memory until they finish).
    pub max_in_flight_bytes: u64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self { rate_per_s: 200.0, burst: 400.0, max_in_flight: 1000, max_in_flight_bytes: 256 << 20 }
    }
}

/// Why a creation is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Over the rate: retry after this many seconds.
    #[error(
        "this namespace creates predictions faster than its limit of {rate} per second; retry after {retry_after_s} s"
    )]
    Rate {
        /// The limit, per second.
        rate: u32,
        /// Seconds until a token is back.
        retry_after_s: u64,
    },
    /// Too many unfinished predictions.
    #[error("this namespace has {limit} predictions unfinished, its limit; retry when some have finished")]
    Concurrency {
        /// The limit.
        limit: u32,
    },
    /// Unfinished predictions' inputs take too much memory.
    #[error(
        "this namespace's unfinished predictions hold {held} bytes of input; the limit is {limit}; retry when some have finished"
    )]
    Bytes {
        /// Held now.
        held: u64,
        /// The limit.
        limit: u64,
    },
}

impl Refusal {
    /// The `Retry-After` seconds to send.
    pub fn retry_after_s(&self) -> u64 {
        match self {
            Self::Rate { retry_after_s, .. } => *retry_after_s,
            Self::Concurrency { .. } | Self::Bytes { .. } => 1,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    in_flight: u32,
    bytes: u64,
}

/// The limits' state, per namespace.
#[derive(Debug, Clone)]
pub struct TenantLimits {
    config: LimitConfig,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

/// One admitted prediction: counts as unfinished until dropped.
#[derive(Debug)]
pub struct Permit {
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
    namespace: String,
    bytes: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = buckets.get_mut(&self.namespace) {
            b.in_flight = b.in_flight.saturating_sub(1);
            b.bytes = b.bytes.saturating_sub(self.bytes);
        }
    }
}

impl TenantLimits {
    /// Limits of `config` for every namespace.
    pub fn new(config: LimitConfig) -> Self {
        Self { config, buckets: Arc::default() }
    }

    /// The limits.
    pub fn config(&self) -> LimitConfig {
        self.config
    }

    /// Admits one prediction of `namespace` whose request body is `bytes` long at `now`, or says why not.
    pub fn admit(&self, namespace: &str, bytes: u64, now: Instant) -> Result<Permit, Refusal> {
        let c = self.config;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(namespace.to_owned()).or_insert_with(|| Bucket {
            tokens: c.burst,
            last: now,
            in_flight: 0,
            bytes: 0,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * c.rate_per_s).min(c.burst);
        b.last = now;
        if b.in_flight >= c.max_in_flight {
            return Err(Refusal::Concurrency { limit: c.max_in_flight });
        }
        if b.bytes > 0 && b.bytes.saturating_add(bytes) > c.max_in_flight_bytes {
            return Err(Refusal::Bytes { held: b.bytes, limit: c.max_in_flight_bytes });
        }
        if b.tokens < 1.0 {
            let wait = if c.rate_per_s > 0.0 { (1.0 - b.tokens) / c.rate_per_s } else { 60.0 };
            return Err(Refusal::Rate {
                rate: c.rate_per_s.round() as u32,
                retry_after_s: wait.ceil().max(1.0) as u64,
            });
        }
        b.tokens -= 1.0;
        b.in_flight += 1;
        b.bytes = b.bytes.saturating_add(bytes);
        Ok(Permit { buckets: Arc::clone(&self.buckets), namespace: namespace.to_owned(), bytes })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_per_namespace() {
        let limits = TenantLimits::new(LimitConfig {
            rate_per_s: 10.0,
            burst: 5.0,
            max_in_flight: 100,
            max_in_flight_bytes: 1 << 20,
        });
        let t0 = Instant::now();
        let permits: Vec<Permit> = (0..5).map(|_| limits.admit("a", 10, t0).unwrap()).collect();
        let refused = limits.admit("a", 10, t0).unwrap_err();
        assert_eq!(refused, Refusal::Rate { rate: 10, retry_after_s: 1 });
        assert!(limits.admit("b", 10, t0).is_ok(), "another namespace has its own bucket");
        assert!(limits.admit("a", 10, t0 + Duration::from_millis(100)).is_ok(), "one token back after 100 ms");
        assert!(limits.admit("a", 10, t0 + Duration::from_millis(100)).is_err());
        drop(permits);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            (0..6).filter(|_| limits.admit("a", 10, later).is_ok()).count(),
            5,
            "refilled to the burst, no more"
        );
    }

    #[test]
    fn unfinished_predictions_are_capped_until_permits_are_dropped() {
        let limits = TenantLimits::new(LimitConfig {
            rate_per_s: 1000.0,
            burst: 1000.0,
            max_in_flight: 3,
            max_in_flight_bytes: 1 << 20,
        });
        let t = Instant::now();
        let mut held: Vec<Permit> = (0..3).map(|_| limits.admit("a", 10, t).unwrap()).collect();
        let refused = limits.admit("a", 10, t).unwrap_err();
        assert_eq!(refused, Refusal::Concurrency { limit: 3 });
        assert_eq!(refused.retry_after_s(), 1);
        held.pop();
        assert!(limits.admit("a", 10, t).is_ok(), "a finished prediction frees a place");
    }

    #[test]
    fn input_bytes_held_by_unfinished_predictions_are_capped() {
        let limits = TenantLimits::new(LimitConfig {
            rate_per_s: 1000.0,
            burst: 1000.0,
            max_in_flight: 100,
            max_in_flight_bytes: 4 << 20,
        });
        let t = Instant::now();
        let mut held: Vec<Permit> = (0..2).map(|_| limits.admit("a", 2 << 20, t).unwrap()).collect();
        assert_eq!(limits.admit("a", 1, t).unwrap_err(), Refusal::Bytes { held: 4 << 20, limit: 4 << 20 });
        assert!(limits.admit("b", 2 << 20, t).is_ok(), "per namespace");
        held.pop();
        assert!(limits.admit("a", 2 << 20, t).is_ok(), "freed when a prediction finishes");
        drop(held);
        let alone = TenantLimits::new(LimitConfig { max_in_flight_bytes: 1, ..LimitConfig::default() });
        assert!(alone.admit("a", 10, t).is_ok(), "one request is always admitted: the body limit bounds it");
    }
}
