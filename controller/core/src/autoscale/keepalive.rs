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
//!
//! # A fleet-wide prior
//! A deployment with little history borrows the fleet's: a [`FleetPrior`] pools the idle-time distributions of
//! the deployments of one [`CostClass`] (break-even time `cold_penalty / idle_cost` within a factor of 2: model
//! size and cold-start cost) and of a similar rate (typical idle time, the geometric mean of the histogram, within
//! a factor of 4), each deployment weighing the same whatever its rate (the mean of their normalised histograms: a
//! busy deployment's thousands of short gaps do not drown the others). After `n` idle times of its own, a deployment
//! plans under the blend `w x own + (1 - w) x pool` with `w = n / (n + prior_samples)` (the pool leaving the
//! deployment itself out): the pool first, its own distribution as samples accumulate. The fixed timers
//! [`GUARD_TIMERS_S`] (90 s and 600 s) are candidates beside the bucket edges, so a plan never costs more than the
//! better of them in expected cost under the blend.
//!
//! Before its first idle time nothing says how busy a deployment is, and its class as a whole speaks for its
//! busiest members (they record the most idle times, and the first): the plan is then the ski-rental break-even
//! timer `T = cold_penalty / idle_cost` (never more than twice the best choice in hindsight), between 90 s and
//! `max_fallback_s`. On the ServeGen day (servegen-m-mid, rate 0.0002) planning the first idle time under the
//! class's pool instead cost 1.5-4% more in total (two variants, against run-to-run differences of about 1.5%).
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
    /// Idle times needed before the histogram is trusted on its own (when no pool of the fleet prior applies).
    pub min_samples: u32,
    /// Weight kept by the existing samples each time one is added (forgetting).
    pub decay: f64,
    /// Samples between recomputations of the plan (when the costs have not changed).
    pub recompute_every: u32,
    /// Longest keep-alive the break-even fallback may choose, seconds.
    pub max_fallback_s: f64,
    /// Strength of the fleet prior, in idle times: with `n` of its own, a deployment weighs its own distribution
    /// `n / (n + prior_samples)`.
    pub prior_samples: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self { min_samples: 4, decay: 0.97, recompute_every: 4, max_fallback_s: 3600.0, prior_samples: 8.0 }
    }
}

/// The fixed timers, seconds, an adaptive plan is never worse than in expected cost (they are candidates).
pub const GUARD_TIMERS_S: [f64; 2] = [90.0, 600.0];

/// A deployment's cost class: `floor(log2(break-even seconds))`, where the break-even time is how long an idle
/// replica may stay warm for the price of one cold start. Deployments of a class pool their idle times in a
/// [`FleetPrior`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CostClass(pub i32);

impl CostClass {
    /// The class of a replica with these costs (free replicas: one class past every other).
    pub fn of(costs: &Costs) -> Self {
        if costs.idle_per_s > 0.0 && costs.cold_penalty > 0.0 {
            let break_even = costs.cold_penalty / costs.idle_per_s;
            CostClass(break_even.log2().floor().clamp(-64.0, 64.0) as i32)
        } else {
            CostClass(i32::MAX)
        }
    }
}

/// The fleet's idle times, pooled per [`PoolKey`] (a cost class and a typical idle time): the sum of the
/// deployments' normalised histograms and how many deployments it holds. Deployments join with their first idle
/// time and update their part as they record more ([`KeepAlive::record_idle`]), moving when their typical idle time
/// does; a removed deployment leaves ([`KeepAlive::leave`]).
#[derive(Debug, Clone, Default)]
pub struct FleetPrior {
    pools: std::collections::BTreeMap<PoolKey, Pool>,
}

/// A pool of the prior: deployments of one cost class whose typical idle time (the geometric mean of their
/// histogram) is within the same factor of 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolKey {
    /// The deployments' cost class.
    pub cost: CostClass,
    /// `floor(log4(typical idle seconds))`.
    pub gaps: i32,
}

#[derive(Debug, Clone, Default)]
struct Pool {
    sum: Vec<f64>,
    members: u32,
    /// Parts added (the pool's version, for plan caching).
    records: u64,
}

impl Pool {
    fn add(&mut self, part: &[f64], sign: f64) {
        if self.sum.len() < part.len() {
            self.sum.resize(part.len(), 0.0);
        }
        for (s, p) in self.sum.iter_mut().zip(part) {
            *s += sign * p;
        }
        if sign > 0.0 {
            self.members += 1;
            self.records += 1;
        } else {
            self.members = self.members.saturating_sub(1);
        }
    }

    /// The mean of the members' parts but `own`, and the version; `None` with no other member.
    fn mean_without(&self, own: Option<&[f64]>) -> Option<(Vec<f64>, u64)> {
        if self.members <= u32::from(own.is_some()) {
            return None;
        }
        let mut p: Vec<f64> = match own {
            Some(own) => self.sum.iter().zip(own).map(|(s, o)| (s - o).max(0.0)).collect(),
            None => self.sum.clone(),
        };
        let total: f64 = p.iter().sum();
        if total <= 0.0 {
            return None;
        }
        p.iter_mut().for_each(|x| *x /= total);
        Some((p, self.records))
    }
}

/// A deployment's part of the [`FleetPrior`].
#[derive(Debug, Clone)]
struct Part {
    key: PoolKey,
    weights: Vec<f64>,
}

impl FleetPrior {
    /// An empty prior.
    pub fn new() -> Self {
        Self::default()
    }

    /// Deployments pooled under `key`.
    pub fn members(&self, key: PoolKey) -> u32 {
        self.pools.get(&key).map_or(0, |p| p.members)
    }

    fn add(&mut self, part: &Part, sign: f64) {
        self.pools.entry(part.key).or_default().add(&part.weights, sign);
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

    /// The typical idle time, seconds: the geometric mean of the buckets' midpoints under the (faded) weights;
    /// `None` when empty.
    pub fn typical(&self) -> Option<f64> {
        let e = edges();
        let total: f64 = self.weights.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let n = e.len();
        let log_mean: f64 = (0..n)
            .map(|b| {
                let mid = if b + 1 < n { 0.5 * (e[b] + e[b + 1]) } else { 2.0 * e[b] };
                self.weights[b] / total * mid.max(0.25).ln()
            })
            .sum();
        Some(log_mean.exp())
    }

    /// The histogram as a distribution (summing to 1; all zero when empty).
    pub fn normalized(&self) -> Vec<f64> {
        let total: f64 = self.weights.iter().sum();
        if total <= 0.0 {
            return vec![0.0; self.weights.len()];
        }
        self.weights.iter().map(|w| w / total).collect()
    }

    /// The least-expected-cost plan under this histogram.
    pub fn best_plan(&self, costs: &Costs) -> Plan {
        best_plan(&self.weights, costs)
    }
}

/// The least-expected-cost plan under an idle-time distribution given as weights per bucket of the histogram's
/// edges (normalised here), with the [`GUARD_TIMERS_S`] among the candidates.
pub fn best_plan(weights: &[f64], costs: &Costs) -> Plan {
    let e = edges();
    let n = e.len().min(weights.len());
    let total: f64 = weights.iter().take(n).sum();
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
        p[b] = weights[b] / total;
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
    // The guard timers, exactly (between edges, the bucket holding the timer counts as ending after it when
    // its midpoint does).
    for t in GUARD_TIMERS_S {
        // The buckets whose midpoint is below t count as arrivals before it.
        let k = mid[..n].partition_point(|&m| m < t);
        let cost = costs.idle_per_s * (mean_before[k] + t * beyond(k)) + after(k);
        if cost < best_cost - 1e-12 {
            best_cost = cost;
            best = Plan::keep(t);
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

/// One deployment's keep-alive state.
#[derive(Debug, Clone)]
pub struct KeepAlive {
    policy: Policy,
    histogram: IdleHistogram,
    /// The plan last computed: for these costs, at this many own samples and this version of the class's pool.
    cached: Option<(Costs, u32, u64, Plan)>,
    /// The cost class of the latest plan (the class the deployment's idle times pool in).
    class: Option<CostClass>,
    /// What this deployment adds to the fleet prior.
    part: Option<Part>,
}

impl KeepAlive {
    /// A deployment with no history.
    pub fn new(policy: Policy) -> Self {
        let decay = match policy {
            Policy::Adaptive(c) => c.decay,
            Policy::Fixed(_) => 1.0,
        };
        Self { policy, histogram: IdleHistogram::new(decay), cached: None, class: None, part: None }
    }

    /// Records an idle time: a request arrived `idle_s` after the deployment last had nothing in flight. An adaptive
    /// deployment's histogram takes it, and so does its part of `prior` (in the class of its latest plan).
    pub fn record_idle(&mut self, idle_s: f64, prior: &mut FleetPrior) {
        if matches!(self.policy, Policy::Adaptive(_)) {
            self.histogram.record(idle_s);
            self.share(prior);
        }
    }

    /// Takes this deployment's part out of `prior` (it is removed, or its policy replaced).
    pub fn leave(&mut self, prior: &mut FleetPrior) {
        if let Some(part) = self.part.take() {
            prior.add(&part, -1.0);
        }
    }

    /// The pool this deployment belongs to now: its cost class and typical idle time; `None` before both are known.
    fn pool_key(&self) -> Option<PoolKey> {
        let cost = self.class?;
        let typical = self.histogram.typical()?;
        Some(PoolKey { cost, gaps: (typical.max(1e-3).ln() / 4f64.ln()).floor() as i32 })
    }

    /// Puts the current histogram in `prior`, in its current pool, in place of the previous part.
    fn share(&mut self, prior: &mut FleetPrior) {
        let Some(key) = self.pool_key() else { return };
        self.leave(prior);
        let part = Part { key, weights: self.histogram.normalized() };
        prior.add(&part, 1.0);
        self.part = Some(part);
    }

    /// The histogram of idle times.
    pub fn histogram(&self) -> &IdleHistogram {
        &self.histogram
    }

    /// The plan for a replica that just became idle, under the deployment's idle times shrunk toward its class's in
    /// `prior`. `paid_for`: seconds until the end of an hour already paid for the replica's GPU, if it is rented by
    /// the hour.
    pub fn plan(&mut self, costs: &Costs, paid_for: Option<f64>, prior: &mut FleetPrior) -> Plan {
        let mut plan = match self.policy {
            Policy::Fixed(t) => Plan::keep(t),
            Policy::Adaptive(config) => {
                let class = CostClass::of(costs);
                if self.class != Some(class) {
                    self.class = Some(class);
                    self.share(prior);
                }
                let own = self.histogram.samples();
                // The pool of its class and typical idle time, less its own part. None before its first idle time:
                // nothing tells yet how busy it is (and the class as a whole speaks for its busiest deployments,
                // which record the most).
                let pooled = self.pool_key().and_then(|key| {
                    let part = self.part.as_ref().filter(|p| p.key == key).map(|p| p.weights.as_slice());
                    prior.pools.get(&key).and_then(|pool| pool.mean_without(part))
                });
                let version = pooled.as_ref().map_or(0, |(_, v)| *v);
                let fresh = match &self.cached {
                    Some((c, at, seen, plan))
                        if close(c, costs)
                            && own < at + config.recompute_every
                            && version < seen + u64::from(config.recompute_every) =>
                    {
                        Some(*plan)
                    }
                    _ => None,
                };
                match (fresh, pooled) {
                    (Some(plan), _) => plan,
                    (None, Some((pool, _))) => {
                        // Shrink toward the class: w = n / (n + prior_samples).
                        let n = f64::from(own);
                        let w = n / (n + config.prior_samples.max(0.0));
                        let w = if w.is_finite() { w } else { 1.0 };
                        let own = self.histogram.normalized();
                        let blend: Vec<f64> = own.iter().zip(&pool).map(|(o, p)| w * o + (1.0 - w) * p).collect();
                        let plan = best_plan(&blend, costs);
                        self.cached = Some((*costs, self.histogram.samples(), version, plan));
                        plan
                    }
                    (None, None) if own >= config.min_samples => {
                        let plan = self.histogram.best_plan(costs);
                        self.cached = Some((*costs, own, version, plan));
                        plan
                    }
                    (None, None) => {
                        // Nothing to go by: the break-even timer, between the guard timers.
                        let break_even = if costs.idle_per_s > 0.0 {
                            costs.cold_penalty / costs.idle_per_s
                        } else {
                            config.max_fallback_s
                        };
                        let low = GUARD_TIMERS_S[0].min(config.max_fallback_s);
                        Plan::keep(break_even.clamp(low, config.max_fallback_s.max(low)))
                    }
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
        let mut prior = FleetPrior::new();
        let mut k = adaptive();
        for i in 0..30 {
            k.record_idle(1800.0 + f64::from(i % 5) * 4.0, &mut prior);
        }
        let plan = k.plan(&big(), None, &mut prior);
        let (ready, until) = plan.prewarm.expect("a pre-warm for a client that comes back every 30 minutes");
        assert_eq!(plan.unload_after, 0.0);
        assert!(ready <= 1800.0 && ready > 1500.0, "{plan:?}");
        assert!(until > 1816.0 && until < 2500.0, "{plan:?}");
    }

    #[test]
    fn a_one_off_burst_does_not_keep_a_gpu_warm_for_hours() {
        let mut prior = FleetPrior::new();
        let mut k = adaptive();
        // A burst: requests a fraction of a second apart, then nothing.
        for _ in 0..12 {
            k.record_idle(0.2, &mut prior);
        }
        let plan = k.plan(&big(), None, &mut prior);
        assert!(plan.unload_after < 60.0 && plan.prewarm.is_none(), "{plan:?}");
        // With no history at all, the break-even timer: cold penalty / idle cost.
        let plan = adaptive().plan(&big(), None, &mut prior);
        assert!((plan.unload_after - big().cold_penalty / big().idle_per_s).abs() < 1e-6);
        assert!(plan.unload_after < 3600.0);
    }

    #[test]
    fn cheap_replicas_stay_warm_longer_than_expensive_ones() {
        let mut prior = FleetPrior::new();
        let mut small = adaptive();
        let mut large = adaptive();
        // Idle times spread from 10 s to 3 h.
        for i in 0..40 {
            let gap = 10.0 * 1.2f64.powi(i);
            small.record_idle(gap.min(3.0 * 3600.0), &mut prior);
            large.record_idle(gap.min(3.0 * 3600.0), &mut prior);
        }
        let idle = 3.0 / 3600.0 * 0.0125; // a 1 GB share of an 80 GB GPU
        let cheap =
            Costs { idle_per_s: idle, cold_penalty: 2.2 * (0.05 + idle), load_cost: 2.2 * idle, load_s: 2.2, ..big() };
        let s = small.plan(&cheap, None, &mut prior);
        let l = large.plan(&big(), None, &mut prior);
        assert!(s.prewarm.is_none() && s.unload_after > 10.0 * l.unload_after.max(60.0), "small {s:?}, large {l:?}");
    }

    #[test]
    fn an_hour_already_paid_is_kept_warm_to_its_end() {
        let mut prior = FleetPrior::new();
        let mut k = adaptive();
        for _ in 0..10 {
            k.record_idle(0.2, &mut prior);
        }
        assert!(k.plan(&big(), None, &mut prior).unload_after < 60.0);
        assert_eq!(k.plan(&big(), Some(1500.0), &mut prior).unload_after, 1500.0);
        // Fixed timers are plain timers.
        assert_eq!(KeepAlive::new(Policy::Fixed(90.0)).plan(&big(), Some(1500.0), &mut prior).unload_after, 90.0);
    }

    #[test]
    fn a_deployment_with_little_history_plans_under_its_pool_and_with_many_under_its_own() {
        let mut prior = FleetPrior::new();
        // Three deployments of the class that come back every 30 minutes: the pool says "pre-warm for 1,800 s".
        for _ in 0..3 {
            let mut k = adaptive();
            k.plan(&big(), None, &mut prior);
            for i in 0..30 {
                k.record_idle(1800.0 + f64::from(i % 5) * 4.0, &mut prior);
            }
            let (ready, _) = k.plan(&big(), None, &mut prior).prewarm.expect("a pre-warm");
            assert!(ready > 1500.0 && ready <= 1800.0);
        }
        let break_even = big().cold_penalty / big().idle_per_s;
        // With no idle time of its own, nothing says which pool it belongs to: the break-even timer.
        let mut newcomer = adaptive();
        assert_eq!(newcomer.plan(&big(), None, &mut prior), Plan::keep(break_even));
        // One idle time near theirs: the pool decides (weight 8/9), where alone it would still fall back.
        newcomer.record_idle(1750.0, &mut prior);
        let plan = newcomer.plan(&big(), None, &mut prior);
        let (ready, until) = plan.prewarm.expect("the pool's pre-warm");
        assert!(ready > 1500.0 && ready <= 1800.0 && until > 1800.0, "{plan:?}");
        let mut alone_prior = FleetPrior::new();
        let mut alone = adaptive();
        alone.plan(&big(), None, &mut alone_prior);
        alone.record_idle(1750.0, &mut alone_prior);
        assert_eq!(alone.plan(&big(), None, &mut alone_prior), Plan::keep(break_even));
        // Many idle times of its own, alternating 10 minutes and 90 (the same typical idle time, 30 minutes, so the
        // same pool): its own distribution decides, a pre-warm for the 10-minute gaps.
        for i in 0..400 {
            newcomer.record_idle(if i % 2 == 0 { 600.0 } else { 5400.0 }, &mut prior);
        }
        let key = newcomer.pool_key().expect("a pool");
        assert_eq!(prior.members(key), 4, "the newcomer joined its neighbours' pool");
        let plan = newcomer.plan(&big(), None, &mut prior);
        let own = newcomer.histogram().best_plan(&big());
        assert_eq!(plan, own, "with 400 idle times its own histogram decides");
        assert!(plan.prewarm.is_some_and(|(ready, _)| ready < 700.0), "{plan:?}");
        // A deployment that leaves takes its part with it.
        newcomer.leave(&mut prior);
        assert_eq!(prior.members(key), 3);
    }

    #[test]
    fn a_keep_plan_never_costs_more_than_90_s_or_600_s_under_its_distribution() {
        // Expected cost of keeping warm for t under a histogram, as the model counts it (arrivals at the buckets'
        // midpoints; no idle copies, so every restart is a cold start).
        let e = edges();
        let keep_cost = |p: &[f64], c: &Costs, t: f64| -> f64 {
            (0..e.len())
                .map(|b| {
                    let mid = if b + 1 < e.len() { 0.5 * (e[b] + e[b + 1]) } else { 2.0 * e[b] };
                    let cold = if mid < t { 0.0 } else { c.cold_penalty };
                    p[b] * (c.idle_per_s * mid.min(t) + cold)
                })
                .sum()
        };
        let mut rng = crate::rng::Rng::new(11);
        let mut keeps = 0;
        for case in 0..200 {
            // Idle times log-uniform from 1 s to 3 h around a random centre, costs from a cheap share to two GPUs.
            let centre = 10f64.powf(1.0 + 2.5 * rng.unit());
            let mut h = IdleHistogram::new(1.0);
            for _ in 0..30 {
                h.record(centre * 10f64.powf(2.0 * rng.unit() - 1.0));
            }
            let idle = 10f64.powf(-5.0 + 2.5 * rng.unit());
            let costs = Costs { idle_per_s: idle, cold_penalty: 30.0 * (0.05 + idle), load_cost: 30.0 * idle, ..big() };
            let plan = h.best_plan(&costs);
            if plan.prewarm.is_some() {
                continue;
            }
            keeps += 1;
            let p = h.normalized();
            let chosen = keep_cost(&p, &costs, plan.unload_after);
            for t in GUARD_TIMERS_S {
                assert!(chosen <= keep_cost(&p, &costs, t) + 1e-9, "case {case}: {plan:?} costs more than keep({t})");
            }
        }
        assert!(keeps > 50, "only {keeps} keep plans");
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
