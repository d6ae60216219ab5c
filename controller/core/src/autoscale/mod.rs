//! The autoscaler: how many replicas a deployment needs now, and how long an idle replica stays warm.
//!
//! Time is seconds (`f64`) on the caller's clock: the controller passes its monotonic clock, the simulator its
//! virtual one. Nothing here reads a clock.
//!
//! - [`Scaler`]: desired replicas from in-flight concurrency against a per-replica target, averaged over a stable
//!   window (60 s) and a panic window (6 s), as Knative's autoscaler does: scale up at once when the panic window
//!   sees twice the current capacity, scale down only on the stable window. A request arriving at a deployment
//!   with no replica asks for one at once ([`Scaler::desired`] is never 0 while requests are in flight or
//!   waiting): scale-from-zero does not wait for a tick.
//! - [`keepalive`]: what happens to the last idle replica: a fixed timer, or `adaptive`, which learns the
//!   deployment's idle-time distribution and keeps the weights warm only while the expected cold-start penalty
//!   exceeds the cost of the idle GPU share.
//! - [`coldstart`]: how long a load takes, from the weights' size and the tier they come from.

pub mod coldstart;
pub mod keepalive;

/// Scaling parameters of one deployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalingConfig {
    /// In-flight requests one replica should carry on average (Knative's target concurrency).
    pub target_concurrency: f64,
    /// Fewest replicas (0 allows scale-to-zero).
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// Averaging window for scaling down, seconds.
    pub stable_window_s: f64,
    /// Averaging window for bursts, seconds.
    pub panic_window_s: f64,
    /// The panic window triggers when it wants this many times the current replicas.
    pub panic_threshold: f64,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        Self {
            target_concurrency: 8.0,
            min_replicas: 0,
            max_replicas: 8,
            stable_window_s: 60.0,
            panic_window_s: 6.0,
            panic_threshold: 2.0,
        }
    }
}

/// Bucket width of the concurrency averages, seconds.
const BUCKET_S: f64 = 1.0;
/// Buckets kept: the longest stable window supported, in buckets.
const BUCKETS: usize = 600;

/// One deployment's concurrency history and scaling state.
#[derive(Debug, Clone)]
pub struct Scaler {
    config: ScalingConfig,
    /// Time-weighted concurrency per 1 s bucket (concurrency x seconds), a ring indexed by bucket number.
    ring: Vec<f64>,
    /// Bucket number of the newest bucket written.
    head: i64,
    /// Concurrency now and since when.
    level: f64,
    since: f64,
    /// Latest time a non-zero level was credited: every bucket after the one holding it is zero, so a window that
    /// starts after that bucket averages to zero without reading the ring.
    busy_until: f64,
    /// While panicking: until when, and the most replicas wanted during the panic (no scale-down before it ends).
    panic_until: f64,
    panic_peak: u32,
}

impl Scaler {
    /// A scaler with no history; `now` is the current time.
    pub fn new(config: ScalingConfig, now: f64) -> Self {
        let windows = config.stable_window_s.max(config.panic_window_s);
        let buckets = ((windows / BUCKET_S).ceil() as usize + 2).clamp(8, BUCKETS);
        Self {
            config,
            ring: vec![0.0; buckets],
            head: (now / BUCKET_S).floor() as i64,
            level: 0.0,
            since: now,
            busy_until: f64::NEG_INFINITY,
            panic_until: f64::NEG_INFINITY,
            panic_peak: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ScalingConfig {
        &self.config
    }

    /// Records that concurrency (in-flight plus waiting requests) is `concurrency` from `now` on.
    pub fn observe(&mut self, now: f64, concurrency: f64) {
        self.advance(now);
        self.level = concurrency;
    }

    /// Credits the current level up to `now`, bucket by bucket (only the buckets the ring still holds).
    fn advance(&mut self, now: f64) {
        if now <= self.since {
            return;
        }
        let n = self.ring.len() as i64;
        let now_bucket = (now / BUCKET_S).floor() as i64;
        for b in (self.head + 1).max(now_bucket - n + 1)..=now_bucket {
            self.ring[b.rem_euclid(n) as usize] = 0.0;
        }
        self.head = self.head.max(now_bucket);
        if self.level != 0.0 {
            self.busy_until = now;
            let mut t = self.since.max((now_bucket - n + 1) as f64 * BUCKET_S);
            while t < now {
                let b = (t / BUCKET_S).floor() as i64;
                let end = ((b + 1) as f64 * BUCKET_S).min(now);
                self.ring[b.rem_euclid(n) as usize] += self.level * (end - t);
                t = end;
            }
        }
        self.since = now;
    }

    /// Mean concurrency over the last `window` seconds before `now`.
    fn average(&self, now: f64, window: f64) -> f64 {
        let n = self.ring.len() as i64;
        let start = now - window;
        if start >= ((self.busy_until / BUCKET_S).floor() + 1.0) * BUCKET_S {
            return 0.0;
        }
        let mut sum = 0.0;
        let last = (now / BUCKET_S).floor() as i64;
        let first = (start / BUCKET_S).floor() as i64;
        for b in first.max(self.head - n + 1)..=last.min(self.head) {
            let lo = (b as f64 * BUCKET_S).max(start);
            let hi = ((b + 1) as f64 * BUCKET_S).min(now);
            if hi > lo {
                // Buckets are written whole up to `since`; a partly covered bucket contributes pro rata.
                sum += self.ring[b.rem_euclid(n) as usize] * ((hi - lo) / BUCKET_S).min(1.0);
            }
        }
        sum / window
    }

    /// Replicas wanted at `now`, given `current` replicas (ready or starting). Never below 1 while anything is in
    /// flight or waiting, so a request at zero replicas starts one at once; never above `max_replicas`.
    pub fn desired(&mut self, now: f64, current: u32) -> u32 {
        self.advance(now);
        let target = self.config.target_concurrency.max(1e-9);
        let stable = (self.average(now, self.config.stable_window_s) / target).ceil() as u32;
        let panic = (self.average(now, self.config.panic_window_s) / target).ceil() as u32;
        let instant = (self.level / target).ceil() as u32;
        if f64::from(panic) >= self.config.panic_threshold * f64::from(current.max(1)) && panic > current {
            self.panic_until = now + self.config.stable_window_s;
            self.panic_peak = self.panic_peak.max(panic);
        }
        let mut want = stable.max(instant.min(panic.max(1)));
        if now < self.panic_until {
            // In panic mode: scale up on the panic window, never down.
            want = want.max(panic).max(self.panic_peak).max(current);
        } else {
            self.panic_peak = 0;
        }
        if self.level > 0.0 {
            want = want.max(1);
        }
        want.clamp(self.config.min_replicas, self.config.max_replicas.max(self.config.min_replicas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler() -> Scaler {
        Scaler::new(ScalingConfig { target_concurrency: 10.0, max_replicas: 20, ..ScalingConfig::default() }, 0.0)
    }

    #[test]
    fn the_first_request_at_zero_asks_for_a_replica_at_once() {
        let mut s = scaler();
        assert_eq!(s.desired(100.0, 0), 0, "idle deployment stays at zero");
        s.observe(100.0, 1.0);
        assert_eq!(s.desired(100.0, 0), 1, "no averaging delay for the first request");
    }

    #[test]
    fn a_burst_scales_up_fast_and_down_slowly() {
        let mut s = scaler();
        s.observe(0.0, 10.0);
        assert_eq!(s.desired(30.0, 1), 1, "steady at target");
        s.observe(30.0, 60.0);
        // After 3 s of 60 in flight the panic window (6 s) averages 35: 4 replicas.
        assert_eq!(s.desired(33.0, 1), 4);
        assert_eq!(s.desired(36.0, 4), 6);
        // The burst ends: the panic window keeps the peak for a stable window, then the stable window decides.
        s.observe(40.0, 5.0);
        assert_eq!(s.desired(50.0, 6), 6, "no scale-down while panicking");
        let later = s.desired(120.0, 6);
        assert!(later < 6, "{later}");
        assert_eq!(s.desired(200.0, later), 1);
    }

    #[test]
    fn bounds_are_respected() {
        let mut s = Scaler::new(ScalingConfig { min_replicas: 2, max_replicas: 3, ..ScalingConfig::default() }, 0.0);
        assert_eq!(s.desired(10.0, 2), 2);
        s.observe(10.0, 1000.0);
        assert_eq!(s.desired(20.0, 2), 3);
    }

    #[test]
    fn a_window_past_the_last_busy_second_averages_to_zero() {
        let mut s = scaler();
        s.observe(50.0, 20.0);
        s.observe(60.5, 0.0);
        // The busy bucket [60, 61) is inside a window starting at 60.9, and outside one starting at 61.
        s.advance(66.9);
        // The bucket holds 0.5 s at 20; a tenth of it is inside the window (pro rata).
        assert!((s.average(66.9, 6.0) - 20.0 * 0.5 * 0.1 / 6.0).abs() < 1e-9);
        s.advance(67.0);
        assert_eq!(s.average(67.0, 6.0), 0.0);
        assert!(s.average(67.0, 60.0) > 0.0, "the stable window still holds the burst");
    }

    #[test]
    fn averages_are_time_weighted() {
        let mut s = scaler();
        s.observe(0.0, 0.0);
        s.observe(50.0, 20.0);
        // 10 s at 20 over a 60 s window: mean 3.33 -> 1 replica on the stable window.
        s.observe(60.0, 0.0);
        assert!((s.average(60.0, 60.0) - 20.0 * 10.0 / 60.0).abs() < 1e-9);
        assert!((s.average(60.0, 6.0) - 20.0).abs() < 1e-9);
    }
}
