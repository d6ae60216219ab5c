//! Keep-alive: what happens to a deployment's last replica once it is idle.
//!
//! A [`Plan`] is decided when the replica becomes idle, in seconds from that moment: unload after
//! `unload_after`, and optionally warm a replica up again so that it is ready at `prewarm.0` and stays until
//! `prewarm.1`, if no request came in between.
//!
//! # `adaptive`
//! Each deployment keeps a histogram of its idle times (from the moment it had nothing in flight to the next
//! arrival; log-spaced buckets 12% apart from 0.5 s to 48 h, older samples fading with a factor per sample) — the
//! hybrid-histogram idea of "Serverless in the Wild" (Shahrad et al., USENIX ATC'20). Unlike that policy, which
//! takes fixed percentiles of the histogram, Kiln chooses the plan of least *expected cost* under it:
//!
//! - keep warm for `T`: `idle_cost x E[min(I, T)] + cold_penalty x P(I > T)`;
//! - unload at once, pre-warm to be ready at `P` and keep until `K`:
//!   `idle_cost x E[(min(I, K) - P)+] + load_cost x P(I > P - load) + cold_penalty x (P(I <= P) + P(I > K))`,
//!
//! over every bucket edge for `T`, `P` and `K` (O(buckets²) with prefix sums, recomputed only every few samples
//! or when the costs change). The costs come from the caller and make the trade-off explicit: `idle_cost` is
//! what the idle GPU share costs per second, `cold_penalty` what one cold start costs (the user's wait plus the
//! GPU time of the load), so a small model stays warm for hours while a 2-GPU model is released within minutes.
//! With too little history (fewer than `min_samples` idle times) the plan is the ski-rental break-even timer
//! `T = cold_penalty / idle_cost`, which never costs more than twice the best choice in hindsight.
//!
//! On a GPU whose hour is already paid (an hourly rental), keeping warm until the hour boundary costs nothing:
//! `paid_for` extends `unload_after` to it.

/// What to do with an idle replica, in seconds from when it became idle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Unload (scale to zero) this long after becoming idle; `f64::INFINITY` keeps it.
    pub unload_after: f64,
    /// Pre-warm: be ready again at `.0` and stay until `.1`, if no request came before.
    pub prewarm: Option<(f64, f64)>,
}

impl Plan {
    /// Keep warm for `seconds`, no pre-warm.
    pub fn keep(seconds: f64) -> Self {
        Self { unload_after: seconds.max(0.0), prewarm: None }
    }
}

/// The costs a plan weighs, in one currency (dollars in the simulator).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// Holding the replica's GPU share idle, per second.
    pub idle_per_s: f64,
    /// One cold start: the wait it imposes on a request plus the GPU time of the load.
    pub cold_penalty: f64,
    /// The GPU time of one load on its own (what a pre-warm spends).
    pub load_cost: f64,
    /// Expected load time, seconds (a pre-warm starts this early).
    pub load_s: f64,
    /// One warm hit: a restart from the idle copy left in GPU memory.
    pub warm_penalty: f64,
    /// Mean time an idle copy survives in GPU memory before other work overwrites it, seconds
    /// (`f64::INFINITY`: never; 0: copies are not kept, so every restart is a cold start).
    pub copy_lifetime_s: f64,
}

impl Costs {
    /// The costs of one replica holding `gpus` GPUs (fractional for a share), whose load from host RAM takes `load_s`
    /// and whose restart from an idle copy in GPU memory takes `warm_s`, at `gpu_usd_per_s` per GPU and
    /// `wait_usd_per_s` per second a request waits. Idle copies count as not kept (`copy_lifetime_s` 0: every restart
    /// a cold start) unless the caller knows better.
    pub fn for_replica(gpus: f64, load_s: f64, warm_s: f64, gpu_usd_per_s: f64, wait_usd_per_s: f64) -> Self {
        let gpu_per_s = gpus * gpu_usd_per_s;
        Self {
            idle_per_s: gpu_per_s,
            cold_penalty: load_s * (wait_usd_per_s + gpu_per_s),
            load_cost: load_s * gpu_per_s,
            load_s,
            warm_penalty: warm_s * (wait_usd_per_s + gpu_per_s),
            copy_lifetime_s: 0.0,
        }
    }
}

/// Settings of the `adaptive` policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// Idle times needed before the histogram is trusted.
    pub min_samples: u32,
    /// Weight kept by the existing samples each time one is added (forgetting).
    pub decay: f64,
    /// Samples between recomputations of the plan (when the costs have not changed).
    pub recompute_every: u32,
    /// Longest keep-alive the break-even fallback may choose, seconds.
    pub max_fallback_s: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self { min_samples: 4, decay: 0.97, recompute_every: 4, max_fallback_s: 3600.0 }
    }
}

/// Errors parsing a keep-alive policy or a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Neither `fixed:<duration>` nor `adaptive`.
    #[error("unknown keep-alive policy {0:?}; expected fixed:<duration> or adaptive")]
    UnknownPolicy(String),
    /// `fixed:` with a bad duration.
    #[error("keep-alive {spec:?}: {source}")]
    Fixed {
        /// The policy as given.
        spec: String,
        /// What is wrong with its duration.
        #[source]
        source: Box<ParseError>,
    },
    /// The number of a duration does not parse.
    #[error("{0:?} is not a duration like 90s, 10m or 1h")]
    NotADuration(String),
    /// A duration's unit is not one of ms, s, m, h, d.
    #[error("{input:?}: unknown unit {unit:?} (ms, s, m, h, d)")]
    UnknownUnit {
        /// The duration as given.
        input: String,
        /// Its unit.
        unit: String,
    },
    /// A negative or non-finite duration.
    #[error("{0:?} must be a non-negative duration")]
    Negative(String),
}

/// A keep-alive policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Unload after a fixed idle time, seconds.
    Fixed(f64),
    /// Learn each deployment's idle times and minimise expected cost.
    Adaptive(AdaptiveConfig),
}

impl Policy {
    /// Parses `fixed:<duration>` (`90s`, `10m`, `1h`, `600`) or `adaptive`.
    pub fn parse(spec: &str) -> Result<Self, ParseError> {
        if spec == "adaptive" {
            return Ok(Policy::Adaptive(AdaptiveConfig::default()));
        }
        let Some(duration) = spec.strip_prefix("fixed:") else {
            return Err(ParseError::UnknownPolicy(spec.to_owned()));
        };
        parse_duration(duration)
            .map(Policy::Fixed)
            .map_err(|e| ParseError::Fixed { spec: spec.to_owned(), source: Box::new(e) })
    }
}

/// Parses `90`, `90s`, `10m`, `1h`, `1.5h` into seconds.
pub fn parse_duration(s: &str) -> Result<f64, ParseError> {
    let (number, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number.parse().map_err(|_| ParseError::NotADuration(s.to_owned()))?;
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(ParseError::UnknownUnit { input: s.to_owned(), unit: unit.to_owned() }),
    };
    if !(value.is_finite() && value >= 0.0) {
        return Err(ParseError::Negative(s.to_owned()));
    }
    Ok(value * scale)
}

/// Most bucket edges (the histogram has 113).
const MAX_EDGES: usize = 128;

/// Bucket edges of the idle-time histogram, seconds: 0, then 0.5 s x 2^(k/6) (12% apart) up to 48 h.
fn edges() -> &'static [f64] {
    static EDGES: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    EDGES.get_or_init(|| {
        let mut e = vec![0.0];
        let mut k = 0;
        loop {
            let v = 0.5 * 2f64.powf(f64::from(k) / 6.0);
            e.push(v);
            if v >= 48.0 * 3600.0 {
                break;
            }
            debug_assert!(e.len() < MAX_EDGES);
            k += 1;
        }
        e
    })
}

/// Shortest time a pre-warm plan leaves the deployment unloaded: shorter gaps save too little to be worth
/// releasing the GPU and loading again (and the model ignores what the churn costs the fleet).
const MIN_UNLOADED_S: f64 = 60.0;

/// A fading histogram of idle times.
#[derive(Debug, Clone)]
pub struct IdleHistogram {
    /// Weight per bucket: bucket `b` holds `[edges[b], edges[b + 1])`, the last one everything beyond.
    weights: Vec<f64>,
    samples: u32,
    decay: f64,
    /// Weight of the next sample (see [`IdleHistogram::record`]).
    unit: f64,
}

impl IdleHistogram {
    /// An empty histogram whose samples fade by `decay` per new sample.
    pub fn new(decay: f64) -> Self {
        Self { weights: vec![0.0; edges().len()], samples: 0, decay, unit: 1.0 }
    }

    /// Adds an idle time, seconds. Fading is lazy: instead of scaling every bucket down, a new sample weighs
    /// `1 / decay^n` (renormalised before it could overflow), so a sample costs O(1).
    pub fn record(&mut self, idle_s: f64) {
        let e = edges();
        let b = e.partition_point(|&edge| edge <= idle_s.max(0.0)).saturating_sub(1);
        if self.decay < 1.0 {
            self.unit /= self.decay;
            if self.unit > 1e100 {
                for w in &mut self.weights {
                    *w /= self.unit;
                }
                self.unit = 1.0;
            }
        }
        self.weights[b] += self.unit;
        self.samples += 1;
    }

    /// Samples recorded.
    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// The least-expected-cost plan under this histogram.
    pub fn best_plan(&self, costs: &Costs) -> Plan {
        let e = edges();
        let n = e.len();
        let total: f64 = self.weights.iter().sum();
        if total <= 0.0 {
            return Plan::keep(0.0);
        }
        // mass_before[k] = P(I < e[k]); mean_before[k] = E[I; I < e[k]] (bucket midpoints);
        // lost_before[k] = E[1 - exp(-I / lifetime); I < e[k]]: the chance that a copy left at idle start is evicted
        // by the arrival, for arrivals before e[k].
        let lifetime = costs.copy_lifetime_s.max(1e-9);
        let mut mid = [0.0; MAX_EDGES];
        let mut p = [0.0; MAX_EDGES];
        let mut mass_before = [0.0; MAX_EDGES + 1];
        let mut mean_before = [0.0; MAX_EDGES + 1];
        let mut lost_before = [0.0; MAX_EDGES + 1];
        for b in 0..n {
            mid[b] = if b + 1 < n { 0.5 * (e[b] + e[b + 1]) } else { 2.0 * e[b] };
            p[b] = self.weights[b] / total;
            mass_before[b + 1] = mass_before[b] + p[b];
            mean_before[b + 1] = mean_before[b] + p[b] * mid[b];
            lost_before[b + 1] = lost_before[b] + p[b] * (1.0 - (-mid[b] / lifetime).exp());
        }
        let beyond = |k: usize| (1.0 - mass_before[k]).max(0.0);
        let min_with = |k: usize| mean_before[k] + e[k] * beyond(k);
        // kept_after[k] = E[exp(-(I - e[k]) / lifetime); I >= e[k]]: for arrivals after a replica unloaded at e[k],
        // the chance its copy is still in GPU memory. Built from the top bucket down: O(buckets).
        let mut kept_after = [0.0; MAX_EDGES + 1];
        for k in (0..n).rev() {
            let step = if k + 1 < n { (-(e[k + 1] - e[k]) / lifetime).exp() } else { 0.0 };
            kept_after[k] = p[k] * (-(mid[k] - e[k]).max(0.0) / lifetime).exp() + step * kept_after[k + 1];
        }
        // What a restart costs the arrivals after an unload at e[k] (or before a pre-warm ready at e[j]): a cold
        // start if the copy was evicted by then, a warm hit if not.
        let extra = (costs.cold_penalty - costs.warm_penalty).max(0.0);
        let after = |k: usize| costs.warm_penalty * beyond(k) + extra * (beyond(k) - kept_after[k]).max(0.0);
        let before = |j: usize| costs.warm_penalty * mass_before[j] + extra * lost_before[j];
        // f(k): the cost of being warm until e[k], counted from idle start; a keep-alive plan costs f(k), a pre-warm
        // plan warm over [e[j], e[k]] costs f(k) - idle x E[min(I, e[j])] plus its load and the misses before e[j].
        let mut f = [0.0; MAX_EDGES];
        for (k, fk) in f.iter_mut().enumerate().take(n) {
            *fk = costs.idle_per_s * min_with(k) + after(k);
        }
        // best_after[j] = the k > j with the least f(k).
        let mut best_after = [n - 1; MAX_EDGES];
        for j in (0..n.saturating_sub(1)).rev() {
            let next = j + 1;
            best_after[j] = if j + 2 < n && f[best_after[j + 1]] < f[next] - 1e-15 { best_after[j + 1] } else { next };
        }
        let mut best = Plan::keep(0.0);
        let mut best_cost = f64::INFINITY;
        for (k, &edge) in e.iter().enumerate() {
            if f[k] < best_cost - 1e-12 {
                best_cost = f[k];
                best = Plan::keep(edge);
            }
        }
        for j in 1..n.saturating_sub(1) {
            // Loading starts `load_s` before the ready time: it happens if nothing arrived by then.
            let start = e[j] - costs.load_s;
            if start < MIN_UNLOADED_S {
                continue;
            }
            let started = beyond(e.partition_point(|&edge| edge <= start).saturating_sub(1));
            let k = best_after[j];
            let cost = f[k] - costs.idle_per_s * min_with(j) + costs.load_cost * started + before(j);
            if cost < best_cost - 1e-12 {
                best_cost = cost;
                best = Plan { unload_after: 0.0, prewarm: Some((e[j], e[k])) };
            }
        }
        best
    }
}

/// One deployment's keep-alive state.
#[derive(Debug, Clone)]
pub struct KeepAlive {
    policy: Policy,
    histogram: IdleHistogram,
    cached: Option<(Costs, u32, Plan)>,
}

impl KeepAlive {
    /// A deployment with no history.
    pub fn new(policy: Policy) -> Self {
        let decay = match policy {
            Policy::Adaptive(c) => c.decay,
            Policy::Fixed(_) => 1.0,
        };
        Self { policy, histogram: IdleHistogram::new(decay), cached: None }
    }

    /// Records an idle time: a request arrived `idle_s` after the deployment last had nothing in flight.
    pub fn record_idle(&mut self, idle_s: f64) {
        if matches!(self.policy, Policy::Adaptive(_)) {
            self.histogram.record(idle_s);
        }
    }

    /// The histogram of idle times.
    pub fn histogram(&self) -> &IdleHistogram {
        &self.histogram
    }

    /// The plan for a replica that just became idle. `paid_for`: seconds until the end of an hour already paid
    /// for the replica's GPU, if it is rented by the hour.
    pub fn plan(&mut self, costs: &Costs, paid_for: Option<f64>) -> Plan {
        let mut plan = match self.policy {
            Policy::Fixed(t) => Plan::keep(t),
            Policy::Adaptive(config) => {
                if self.histogram.samples() < config.min_samples {
                    let break_even = if costs.idle_per_s > 0.0 {
                        costs.cold_penalty / costs.idle_per_s
                    } else {
                        config.max_fallback_s
                    };
                    Plan::keep(break_even.min(config.max_fallback_s))
                } else {
                    let fresh = match &self.cached {
                        Some((c, at, plan))
                            if close(c, costs) && self.histogram.samples() < at + config.recompute_every =>
                        {
                            Some(*plan)
                        }
                        _ => None,
                    };
                    fresh.unwrap_or_else(|| {
                        let plan = self.histogram.best_plan(costs);
                        self.cached = Some((*costs, self.histogram.samples(), plan));
                        plan
                    })
                }
            }
        };
        if let (Policy::Adaptive(_), Some(paid)) = (self.policy, paid_for) {
            plan.unload_after = plan.unload_after.max(paid);
        }
        plan
    }
}

fn close(a: &Costs, b: &Costs) -> bool {
    let near = |x: f64, y: f64| (x - y).abs() <= 0.1 * x.abs().max(y.abs());
    near(a.idle_per_s, b.idle_per_s)
        && near(a.cold_penalty, b.cold_penalty)
        && near(a.load_s, b.load_s)
        && (near(a.copy_lifetime_s, b.copy_lifetime_s) || a.copy_lifetime_s == b.copy_lifetime_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-GPU replica: $6/h idle, a 20 s cold start worth $0.05 per second of waiting.
    fn big() -> Costs {
        let idle = 6.0 / 3600.0;
        Costs {
            idle_per_s: idle,
            cold_penalty: 20.0 * (0.05 + idle),
            load_cost: 20.0 * idle,
            load_s: 20.0,
            warm_penalty: 0.0,
            copy_lifetime_s: 0.0,
        }
    }

    fn adaptive() -> KeepAlive {
        KeepAlive::new(Policy::Adaptive(AdaptiveConfig::default()))
    }

    #[test]
    fn a_periodic_client_is_prewarmed_instead_of_kept_warm() {
        let mut k = adaptive();
        for i in 0..30 {
            k.record_idle(1800.0 + f64::from(i % 5) * 4.0);
        }
        let plan = k.plan(&big(), None);
        let (ready, until) = plan.prewarm.expect("a pre-warm for a client that comes back every 30 minutes");
        assert_eq!(plan.unload_after, 0.0);
        assert!(ready <= 1800.0 && ready > 1500.0, "{plan:?}");
        assert!(until > 1816.0 && until < 2500.0, "{plan:?}");
    }

    #[test]
    fn a_one_off_burst_does_not_keep_a_gpu_warm_for_hours() {
        let mut k = adaptive();
        // A burst: requests a fraction of a second apart, then nothing.
        for _ in 0..12 {
            k.record_idle(0.2);
        }
        let plan = k.plan(&big(), None);
        assert!(plan.unload_after < 60.0 && plan.prewarm.is_none(), "{plan:?}");
        // With no history at all, the break-even timer: cold penalty / idle cost.
        let plan = adaptive().plan(&big(), None);
        assert!((plan.unload_after - big().cold_penalty / big().idle_per_s).abs() < 1e-6);
        assert!(plan.unload_after < 3600.0);
    }

    #[test]
    fn cheap_replicas_stay_warm_longer_than_expensive_ones() {
        let mut small = adaptive();
        let mut large = adaptive();
        // Idle times spread from 10 s to 3 h.
        for i in 0..40 {
            let gap = 10.0 * 1.2f64.powi(i);
            small.record_idle(gap.min(3.0 * 3600.0));
            large.record_idle(gap.min(3.0 * 3600.0));
        }
        let idle = 3.0 / 3600.0 * 0.0125; // a 1 GB share of an 80 GB GPU
        let cheap =
            Costs { idle_per_s: idle, cold_penalty: 2.2 * (0.05 + idle), load_cost: 2.2 * idle, load_s: 2.2, ..big() };
        let s = small.plan(&cheap, None);
        let l = large.plan(&big(), None);
        assert!(s.prewarm.is_none() && s.unload_after > 10.0 * l.unload_after.max(60.0), "small {s:?}, large {l:?}");
    }

    #[test]
    fn an_hour_already_paid_is_kept_warm_to_its_end() {
        let mut k = adaptive();
        for _ in 0..10 {
            k.record_idle(0.2);
        }
        assert!(k.plan(&big(), None).unload_after < 60.0);
        assert_eq!(k.plan(&big(), Some(1500.0)).unload_after, 1500.0);
        // Fixed timers are plain timers.
        assert_eq!(KeepAlive::new(Policy::Fixed(90.0)).plan(&big(), Some(1500.0)).unload_after, 90.0);
    }

    #[test]
    fn policies_and_durations_parse() {
        assert_eq!(Policy::parse("fixed:600s"), Ok(Policy::Fixed(600.0)));
        assert_eq!(Policy::parse("fixed:10m"), Ok(Policy::Fixed(600.0)));
        assert_eq!(Policy::parse("fixed:1.5h"), Ok(Policy::Fixed(5400.0)));
        assert_eq!(Policy::parse("fixed:90"), Ok(Policy::Fixed(90.0)));
        assert!(matches!(Policy::parse("adaptive"), Ok(Policy::Adaptive(_))));
        assert_eq!(
            Policy::parse("fixed:ten").unwrap_err().to_string(),
            r#"keep-alive "fixed:ten": "ten" is not a duration like 90s, 10m or 1h"#
        );
        assert!(Policy::parse("fixed:10y").unwrap_err().to_string().contains("unknown unit"));
        assert_eq!(
            Policy::parse("lru").unwrap_err(),
            ParseError::UnknownPolicy("lru".into()),
            "expected fixed:<duration> or adaptive"
        );
        assert_eq!(parse_duration("-1s"), Err(ParseError::Negative("-1s".into())));
    }
}
