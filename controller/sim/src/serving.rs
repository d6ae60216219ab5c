//! The serving simulator: a discrete-event simulation on a virtual clock that drives the controller's own control
//! loop ([`Control`]) the way the controller runtime does, with the agents' side simulated — as raft-rs's test
//! harness drives the real `RawNode`. Every decision (which replica serves a request, when replicas start and stop,
//! scale from zero, burst scale-out, keep-alive, pre-warm, placement with spread and cache hints) is `Control`'s;
//! this module keeps the world: the fleet, the weight caches, load and service times, and the accounting.
//!
//! # The loop
//! Events in, actions out, on the runtime's schedule:
//! - an arrival is [`Control::arrive`] then [`Control::route`]; a request routed to no replica waits in its
//!   deployment's queue and wakes the loop at once ([`Control::reconcile`]), as the gateway's hold does;
//! - a finished load is [`Control::replica_ready`]; the waiting requests are routed, then the loop reconciles (a
//!   worker event wakes the runtime's loop);
//! - a finished request is [`Control::finish`]; a waiting request takes the freed slot (no reconcile: the runtime
//!   does not wake on a finish);
//! - the loop also reconciles every `reconcile_every_s` (the runtime's tick, 0.5 s);
//! - `Action::Start` loads a replica on the node and GPUs `Control` chose, `Action::Stop` stops one; each time a
//!   node's caches change, what it caches is reported with [`Control::set_cached`], and the measured lifetime of
//!   idle copies in GPU memory with [`Control::set_idle_copy_lifetime`].
//!
//! # Model
//! - A fleet of identical GPU nodes; one deployment per trace client, with a model of a given size. A replica
//!   holds the GPU share its weights need (`GpuDemand::Memory`: a fraction of one GPU, whole GPUs past one GPU's
//!   memory), 4 CPUs and 32 GiB of host memory.
//! - Service time follows from the model's size: a decode step reads the weights once (`max(10 ms, bytes / (2 TB/s
//!   x GPUs))` per generated token, prefill 100x faster per token, 50 ms overhead); ServeGen clients carry no
//!   token counts, so they use 1,024 prompt and 256 generated tokens.
//! - Loads take [`ColdStartModel`] time from the best tier the chosen node has: an idle copy in those GPUs' memory
//!   (left behind when a ready replica stopped, evicted as soon as the GPU's memory is needed), host RAM (LRU,
//!   `host_cache_bytes` per node), local disk (LRU, `disk_cache_bytes`), else the remote store. A replica stopped
//!   while it loads leaves no copy.
//! - A request is a *cold start* when it arrives while its deployment has no ready replica and waits for a load
//!   from host RAM, disk or the remote store; when a replica coming back from an idle copy still in GPU memory (a
//!   fraction of a second) is loading for it, it is a *warm hit* instead. A start decided while the deployment has
//!   nothing in flight or waiting is a *pre-warm*. GPU-seconds are weighted by the share of a GPU a replica holds:
//!   *busy* while it has requests in flight, *idle-warm* while loaded with none, *loading* while it loads. Idle
//!   copies left in GPU memory cost nothing: scaling to zero releases the GPU for billing.
//! - *Busy* is the time a replica has at least one request in flight, not the sum of service times: a replica
//!   serves up to `max_concurrency` requests side by side in the time of one, so requests that waited together for
//!   a load, or that share one replica rather than two, keep the GPU busy for less time. Busy GPU-seconds therefore
//!   move a little with the keep-alive (which sets how often requests wait together and how many replicas live).
//! - The cost a keep-alive trades off is the GPU bill (all GPU-seconds at `gpu_usd_per_hour`) plus the waiting:
//!   the seconds requests that found no ready replica waited for a load, at `wait_usd_per_s`.

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap, VecDeque},
};

use kiln_core::{
    autoscale::{
        ScalingConfig,
        coldstart::{ColdStartModel, Tier},
        keepalive::{Costs, Policy as KeepAlivePolicy},
    },
    control::{self, Action, Cached, Control, NodeInfo, Prices, Route, StopReason},
    placement::{CacheTier, GpuDemand, MILLI_PER_GPU, NodeSpec, Policy},
    rng::Rng,
};

use crate::{
    arrivals::Arrivals,
    traces::{TraceRequest, Window},
};

pub mod rentals;

pub use rentals::{PlannedRental, RentalLine, RentalOutcome, RentalPlan, RentalPlanError, Revenue};

const GB: f64 = 1e9;
const MIB: u64 = 1024 * 1024;

/// A fleet of identical nodes, e.g. `h100-80gb:8x16` (16 nodes of 8 GPUs with 80 GB each).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    /// GPU model name.
    pub gpu_model: String,
    /// Memory per GPU, bytes.
    pub gpu_memory_bytes: u64,
    /// GPUs per node.
    pub gpus_per_node: u8,
    /// Nodes.
    pub nodes: u32,
}

/// Why a fleet spec does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// Not of the form `<gpu>-<memory>gb:<gpus per node>x<nodes>`.
    #[error("fleet {0:?}: expected <gpu>-<memory>gb:<gpus per node>x<nodes>, e.g. h100-80gb:8x16")]
    Syntax(String),
    /// A zero, or more GPUs per node than a node may have.
    #[error("fleet {0:?}: memory, GPUs per node (1..=16) and nodes must be positive")]
    OutOfRange(String),
}

impl FleetSpec {
    /// Parses `<model>-<N>gb:<gpus per node>x<nodes>`.
    pub fn parse(spec: &str) -> Result<Self, FleetError> {
        let bad = || FleetError::Syntax(spec.to_owned());
        let (model, shape) = spec.split_once(':').ok_or_else(bad)?;
        let (gpus, nodes) = shape.split_once('x').ok_or_else(bad)?;
        let memory = model.rsplit_once('-').and_then(|(_, m)| m.strip_suffix("gb")).ok_or_else(bad)?;
        let memory: u64 = memory.parse().map_err(|_| bad())?;
        let gpus: u8 = gpus.parse().map_err(|_| bad())?;
        let nodes: u32 = nodes.parse().map_err(|_| bad())?;
        if memory == 0 || gpus == 0 || usize::from(gpus) > kiln_core::placement::MAX_GPUS_PER_NODE || nodes == 0 {
            return Err(FleetError::OutOfRange(spec.to_owned()));
        }
        Ok(Self { gpu_model: model.to_owned(), gpu_memory_bytes: memory * 1_000_000_000, gpus_per_node: gpus, nodes })
    }

    /// The nodes (192 cores and 2 TiB of host memory each).
    pub fn nodes(&self) -> Vec<NodeSpec> {
        (0..self.nodes)
            .map(|i| NodeSpec {
                gpu_memory_mib: (self.gpu_memory_bytes / MIB) as u32,
                ..NodeSpec::new(format!("node-{i:03}"), 192_000, 2 * 1024 * 1024, self.gpus_per_node, &self.gpu_model)
            })
            .collect()
    }

    /// Total GPUs.
    pub fn gpus(&self) -> u64 {
        u64::from(self.nodes) * u64::from(self.gpus_per_node)
    }
}

/// Where a deployment's requests come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A ServeGen client: rate windows.
    Windows(Vec<Window>),
    /// An explicit request list (the Azure LLM trace).
    Requests(Vec<TraceRequest>),
}

impl Source {
    /// How long the trace lasts, seconds from its start: the last request, or the end of the last window (windows
    /// are evenly spaced; a single window is taken to last an hour).
    pub fn span_s(&self) -> f64 {
        match self {
            Self::Requests(requests) => requests.iter().map(|r| r.at_s).fold(0.0, f64::max),
            Self::Windows(windows) => match windows.as_slice() {
                [] => 0.0,
                [only] => only.start_s + 3600.0,
                [.., before, last] => last.start_s + (last.start_s - before.start_s).max(0.0),
            },
        }
    }
}

/// One deployment.
#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    /// Name (the trace file).
    pub name: String,
    /// Size of the model's weights, bytes.
    pub weights_bytes: u64,
    /// Its requests.
    pub source: Source,
}

/// Simulation settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Simulated time, days.
    pub days: f64,
    /// Multiplies ServeGen rates; thins explicit request lists (keeps each with this probability, at most 1).
    pub rate_scale: f64,
    /// Seed of arrivals and load times.
    pub seed: u64,
    /// Price of a GPU-hour, dollars.
    pub gpu_usd_per_hour: f64,
    /// What one second of a request waiting on a cold start costs, dollars (the keep-alive trade-off).
    pub wait_usd_per_s: f64,
    /// Load times.
    pub cold: ColdStartModel,
    /// Scaling of every deployment.
    pub scaling: ScalingConfig,
    /// Requests one replica serves at once.
    pub max_concurrency: u32,
    /// Host-RAM weight cache per node, bytes.
    pub host_cache_bytes: u64,
    /// Local-disk weight cache per node, bytes.
    pub disk_cache_bytes: u64,
    /// Placement policy.
    pub placement: Policy,
    /// Interval of the time series, seconds.
    pub sample_every_s: f64,
    /// Leave the weights in GPU memory as an evictable copy when a replica stops (false: every restart loads).
    pub idle_gpu_copies: bool,
    /// How often the control loop reconciles without an event, seconds (the controller runtime's tick).
    pub reconcile_every_s: f64,
    /// Rentals replayed beside the trace, with the prices that bill them ([`rentals`]); `None`: no rentals and no
    /// metering.
    pub rentals: Option<RentalPlan>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            days: 2.0,
            rate_scale: 1.0,
            seed: 42,
            gpu_usd_per_hour: 2.5,
            wait_usd_per_s: 0.5,
            cold: ColdStartModel::default(),
            scaling: ScalingConfig { target_concurrency: 11.0, max_replicas: 8, ..ScalingConfig::default() },
            max_concurrency: 16,
            host_cache_bytes: 1024 * 1024 * MIB,
            disk_cache_bytes: 4_000 * 1_000_000_000,
            placement: Policy::Kiln,
            sample_every_s: 600.0,
            idle_gpu_copies: true,
            reconcile_every_s: 0.5,
            rentals: None,
        }
    }
}

/// Keep-alive for a run: one policy for all, or a fixed timer per deployment (the oracle).
#[derive(Debug, Clone)]
pub enum KeepAliveChoice {
    /// The same policy for every deployment.
    Uniform(KeepAlivePolicy),
    /// A fixed timer per deployment, seconds, in deployment order.
    PerDeployment(Vec<f64>),
}

/// GPU-seconds by what the GPU share was doing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuSeconds {
    /// Requests in flight.
    pub busy: f64,
    /// Loaded, nothing in flight.
    pub idle_warm: f64,
    /// Loading weights.
    pub loading: f64,
}

/// Time series sampled every `sample_every_s`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Sample times, seconds.
    pub t_s: Vec<f64>,
    /// Replicas alive (loading or ready).
    pub replicas: Vec<u32>,
    /// Cold starts since the previous sample.
    pub cold_starts: Vec<u64>,
    /// GPU memory holding weights (live replicas and idle copies), GB.
    pub gpu_memory_gb: Vec<f64>,
}

/// The result of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Requests that arrived.
    pub requests: u64,
    /// Requests that arrived while their deployment had no ready replica and waited for a load from host RAM,
    /// disk or the remote store.
    pub cold_starts: u64,
    /// Requests that arrived while their deployment had no ready replica and waited only for a replica coming
    /// back from an idle copy of its weights in GPU memory (a fraction of a second).
    pub warm_hits: u64,
    /// Loads started because requests were waiting, by the tier they came from (gpu, host_ram, disk, remote).
    pub demand_loads: [u64; 4],
    /// Loads started by a pre-warm.
    pub prewarms: u64,
    /// Times a deployment with requests waiting found the fleet without room for the replica it needed (counted
    /// when it starts; the control loop retries at each reconcile).
    pub unschedulable: u64,
    /// Latency percentiles (queueing + load + service), ms: p50, p95, p99.
    pub latency_ms: [f64; 3],
    /// GPU-seconds, share-weighted.
    pub gpu_seconds: GpuSeconds,
    /// Seconds requests spent waiting for a load: from the arrival of each request that found its deployment with
    /// no ready replica (a cold start or a warm hit) to the start of its service (or the end of the run).
    pub wait_s: f64,
    /// The GPU bill: the GPU-seconds at `gpu_usd_per_hour`, dollars.
    pub gpu_cost_usd: f64,
    /// The waiting: `wait_s` at `wait_usd_per_s`, dollars.
    pub wait_cost_usd: f64,
    /// What the keep-alive trades off: `gpu_cost_usd + wait_cost_usd`, dollars.
    pub total_cost_usd: f64,
    /// Time series.
    pub series: Series,
    /// Idle times each deployment saw (for the oracle), seconds.
    pub idle_gaps: Vec<Vec<f64>>,
    /// Per deployment, in deployment order.
    pub per_deployment: Vec<DeploymentOutcome>,
    /// Events processed (arrivals, loads, completions, ticks, samples).
    pub events: u64,
    /// Mean lifetime of an idle copy in GPU memory before eviction, as measured in the run, seconds.
    pub copy_lifetime_s: f64,
    /// Rentals, revenue and utilisation, when the run had rentals ([`SimConfig::rentals`]).
    pub rentals: Option<RentalOutcome>,
}

/// One deployment's share of an [`Outcome`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeploymentOutcome {
    /// Requests.
    pub requests: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Its replicas' GPU-seconds, share-weighted.
    pub gpu_seconds: GpuSeconds,
    /// Seconds its requests waited for a load (as [`Outcome::wait_s`]).
    pub wait_s: f64,
    /// Its GPU bill, dollars.
    pub gpu_cost_usd: f64,
    /// Its requests' waiting, dollars.
    pub wait_cost_usd: f64,
    /// `gpu_cost_usd + wait_cost_usd`, dollars.
    pub total_cost_usd: f64,
}

impl Outcome {
    /// Cold starts per request.
    pub fn cold_start_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.cold_starts as f64 / self.requests as f64 }
    }
}

/// The GPU share (fraction of GPUs) a model of `bytes` holds on GPUs of `gpu_memory_bytes`.
pub fn gpu_share(bytes: u64, gpu_memory_bytes: u64) -> f64 {
    let mib = (bytes / MIB) as u32;
    match GpuDemand::Memory(mib.max(1)).resolve((gpu_memory_bytes / MIB) as u32) {
        Some(GpuDemand::Share(m)) => f64::from(m) / f64::from(MILLI_PER_GPU),
        Some(GpuDemand::Whole(k)) => f64::from(k),
        _ => 0.0,
    }
}

/// The keep-alive costs of a deployment with `bytes` of weights, as if no idle copy survived in GPU memory.
pub fn keepalive_costs(config: &SimConfig, fleet: &FleetSpec, bytes: u64) -> Costs {
    Costs::for_replica(
        gpu_share(bytes, fleet.gpu_memory_bytes),
        config.cold.expected(bytes, Tier::HostRam),
        config.cold.expected(bytes, Tier::Gpu),
        config.gpu_usd_per_hour / 3600.0,
        config.wait_usd_per_s,
    )
}

/// The fixed timers, seconds, that [`hindsight_oracle`] runs for every deployment, besides [`modelled_timers`].
pub const ORACLE_CANDIDATES_S: [f64; 8] = [0.0, 30.0, 90.0, 180.0, 300.0, 600.0, 1800.0, 3600.0];

/// The best fixed timer per deployment in hindsight, under the objective the keep-alive trades off: each run of
/// `runs` gives every deployment a fixed timer (`timers`, in deployment order) and the outcome it measured; for each
/// deployment, the timer of the run where its [`DeploymentOutcome::total_cost_usd`] was lowest (the first such run
/// on a tie). A deployment no run covers gets 0.
pub fn oracle_timers(runs: &[(Vec<f64>, &Outcome)]) -> Vec<f64> {
    let deployments = runs.iter().map(|(timers, o)| timers.len().min(o.per_deployment.len())).max().unwrap_or(0);
    (0..deployments)
        .map(|i| {
            let mut best = (f64::INFINITY, 0.0);
            for (timers, outcome) in runs {
                if let (Some(&t), Some(d)) = (timers.get(i), outcome.per_deployment.get(i))
                    && d.total_cost_usd < best.0
                {
                    best = (d.total_cost_usd, t);
                }
            }
            best.1
        })
        .collect()
}

/// Rounds of [`hindsight_oracle`] that re-select timers from every run made so far.
pub const ORACLE_ROUNDS: usize = 2;

/// The hindsight oracle: the cheapest assignment of a fixed timer to each deployment it finds, in total cost, with
/// its run. It runs every deployment under each fixed timer of [`ORACLE_CANDIDATES_S`] and under
/// [`modelled_timers`] (fitted to the idle gaps and the idle copies' lifetime the 600 s run saw); then, for
/// [`ORACLE_ROUNDS`] rounds, it runs the per-deployment choice of [`oracle_timers`] over all runs so far. Deployments
/// share the fleet (GPU memory for idle copies, caches, load times), so a combination of per-deployment bests can
/// cost more than its parts did: the oracle returns the cheapest run of all, never costlier than a fixed timer it
/// tried. `progress` sees the fraction of the runs done.
pub fn hindsight_oracle(
    config: &SimConfig,
    fleet: &FleetSpec,
    deployments: &[DeploymentSpec],
    progress: &mut dyn FnMut(f64),
) -> (Vec<f64>, Outcome) {
    let total = (ORACLE_CANDIDATES_S.len() + 1 + ORACLE_ROUNDS) as f64;
    let mut runs: Vec<(Vec<f64>, Outcome)> = Vec::new();
    let mut run = |timers: Vec<f64>, runs: &mut Vec<(Vec<f64>, Outcome)>| {
        let done = runs.len() as f64;
        let choice = KeepAliveChoice::PerDeployment(timers.clone());
        let outcome = simulate(config, fleet, deployments, &choice, &mut |f| progress((done + f) / total));
        runs.push((timers, outcome));
    };
    for t in ORACLE_CANDIDATES_S {
        run(vec![t; deployments.len()], &mut runs);
    }
    let probe =
        runs.iter().find(|(t, _)| t.first() == Some(&600.0)).map(|(_, o)| (o.idle_gaps.clone(), o.copy_lifetime_s));
    if let Some((gaps, lifetime)) = probe {
        let costs: Vec<Costs> = deployments
            .iter()
            .map(|d| Costs { copy_lifetime_s: lifetime, ..keepalive_costs(config, fleet, d.weights_bytes) })
            .collect();
        run(modelled_timers(&gaps, &costs), &mut runs);
    }
    for _ in 0..ORACLE_ROUNDS {
        let timers = oracle_timers(&runs.iter().map(|(t, o)| (t.clone(), o)).collect::<Vec<_>>());
        if runs.iter().any(|(t, _)| *t == timers) {
            break;
        }
        run(timers, &mut runs);
    }
    progress(1.0);
    runs.into_iter().min_by(|a, b| a.1.total_cost_usd.total_cmp(&b.1.total_cost_usd)).unwrap_or_default()
}

/// The fixed timer per deployment that a cost model fitted to idle gaps finds best: for each, over its idle gaps,
/// the timer `T` (from 0 and
/// the log-spaced grid of the keep-alive histogram, 0.5 s to 48 h) that minimises
/// `idle_cost x Σ min(gap, T) + Σ_{gap > T} restart(gap - T)`, where a restart after `u` seconds unloaded costs a
/// warm hit if the idle copy survived (probability `exp(-u / copy_lifetime_s)`) and a cold start otherwise.
pub fn modelled_timers(gaps: &[Vec<f64>], costs: &[Costs]) -> Vec<f64> {
    let mut grid = vec![0.0];
    let mut t = 0.5;
    while t <= 48.0 * 3600.0 {
        grid.push(t);
        t *= 2f64.powf(1.0 / 6.0);
    }
    gaps.iter()
        .zip(costs)
        .map(|(gaps, c)| {
            let lifetime = c.copy_lifetime_s.max(1e-9);
            let extra = (c.cold_penalty - c.warm_penalty).max(0.0);
            let mut best = (f64::INFINITY, 0.0);
            for &t in &grid {
                let cost: f64 = gaps
                    .iter()
                    .map(|&g| {
                        if g <= t {
                            c.idle_per_s * g
                        } else {
                            c.idle_per_s * t + c.warm_penalty + extra * (1.0 - (-(g - t) / lifetime).exp())
                        }
                    })
                    .sum();
                if cost < best.0 - 1e-12 {
                    best = (cost, t);
                }
            }
            best.1
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Arrival {
        dep: u32,
    },
    Ready {
        replica: u32,
        epoch: u32,
    },
    Done {
        replica: u32,
        epoch: u32,
        dep: u32,
        arrived: f64,
    },
    Tick,
    Sample,
    /// A rental of the plan is created (index in [`RentalPlan::rentals`]).
    RentalCreated {
        rental: u32,
    },
    /// A rental of the plan is cancelled.
    RentalCancelled {
        rental: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Event {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Reversed: the heap pops the earliest event (ties in insertion order).
    fn cmp(&self, other: &Self) -> Ordering {
        other.t.total_cmp(&self.t).then(other.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Loading,
    Ready,
    Stopped,
}

/// A replica as its node's agent runs it.
#[derive(Debug, Clone)]
struct Replica {
    /// `Control`'s id.
    id: String,
    dep: u32,
    node: usize,
    /// GPUs it holds (a bitmask of indexes) and the milli-GPU on each.
    gpus_mask: u16,
    milli: u16,
    /// Where its weights came from.
    tier: Tier,
    state: State,
    epoch: u32,
    in_flight: u32,
    share: f64,
    gpus: f64,
    since: f64,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    arrived: f64,
    context: u32,
    generated: u32,
    /// It found its deployment with no ready replica: its wait is a wait for a load.
    for_load: bool,
}

#[derive(Debug)]
struct Dep {
    /// `Control`'s key, also the model's URI in cache reports.
    key: String,
    bytes: u64,
    replicas: Vec<u32>,
    queue: VecDeque<Waiting>,
    in_flight: u32,
    idle_since: Option<f64>,
    arrivals: Option<Arrivals>,
    requests: Vec<TraceRequest>,
    cursor: usize,
    next_tokens: (u32, u32),
    /// Whether `Control` last said it had no room for a replica.
    unschedulable: bool,
    gaps: Vec<f64>,
}

impl Dep {
    fn idle(&self) -> bool {
        self.in_flight == 0 && self.queue.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct IdleCopy {
    dep: u32,
    gpus: u16,
    milli: u16,
    bytes: u64,
    since: f64,
}

/// An LRU set of models with sizes.
#[derive(Debug, Clone, Default)]
struct Lru {
    capacity: u64,
    used: u64,
    /// (deployment, bytes, last use)
    entries: Vec<(u32, u64, f64)>,
}

impl Lru {
    fn contains(&self, dep: u32) -> bool {
        self.entries.iter().any(|e| e.0 == dep)
    }

    fn touch(&mut self, dep: u32, bytes: u64, now: f64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == dep) {
            e.2 = now;
            return;
        }
        if bytes > self.capacity {
            return;
        }
        while self.used + bytes > self.capacity {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.2.total_cmp(&b.1.2))
                .map(|(i, _)| i)
                .expect("used > 0 means entries");
            self.used -= self.entries.swap_remove(oldest).1;
        }
        self.used += bytes;
        self.entries.push((dep, bytes, now));
    }
}

/// Latencies on a log scale, 1% apart, from 0.1 ms.
#[derive(Debug, Clone)]
struct Latencies {
    counts: Vec<u64>,
    total: u64,
}

impl Latencies {
    const STEP: f64 = 1.01;

    fn new() -> Self {
        Self { counts: vec![0; 2400], total: 0 }
    }

    fn record(&mut self, ms: f64) {
        let b = ((ms / 0.1).max(1.0).ln() / Self::STEP.ln()) as usize;
        let last = self.counts.len() - 1;
        self.counts[b.min(last)] += 1;
        self.total += 1;
    }

    fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The bucket's geometric middle.
                return 0.1 * Self::STEP.powf(b as f64 + 0.5);
            }
        }
        0.1 * Self::STEP.powf(self.counts.len() as f64)
    }
}
/// Service time of one request, seconds.
fn service_s(bytes: u64, gpus: f64, context: u32, generated: u32) -> f64 {
    let per_token = (bytes as f64 / (2e12 * gpus.max(1.0))).max(0.010);
    0.05 + f64::from(context) * per_token / 100.0 + f64::from(generated) * per_token
}

const SERVEGEN_CONTEXT: u32 = 1024;
const SERVEGEN_GENERATED: u32 = 256;

/// The simulator state for one run.
struct Sim<'a> {
    config: &'a SimConfig,
    fleet: &'a FleetSpec,
    end_s: f64,
    control: Control,
    node_names: Vec<String>,
    node_ids: HashMap<String, usize>,
    deps: Vec<Dep>,
    replicas: Vec<Replica>,
    by_id: HashMap<String, u32>,
    free_slots: Vec<u32>,
    heap: BinaryHeap<Event>,
    seq: u64,
    rng: Rng,
    /// Milli-GPU held by live replicas, per node and GPU.
    gpu_used: Vec<Vec<u32>>,
    gpu_copies: Vec<Vec<IdleCopy>>,
    host: Vec<Lru>,
    disk: Vec<Lru>,
    latencies: Latencies,
    out: Outcome,
    cold_in_sample: u64,
    /// Idle copies' observed lifetimes: seconds observed, and how many were evicted (the rest were reused).
    copy_seconds: f64,
    copy_evictions: u64,
    /// Rentals and metering, when the plan has them.
    rentals: Option<rentals::RentalSim>,
}

/// Prior for the idle-copy lifetime estimate: one eviction per this many copy-seconds before any is seen.
const COPY_LIFETIME_PRIOR_S: f64 = 3600.0;
/// CPU (millicores) and host memory (MiB) of one replica.
const REPLICA_CPU_MILLI: u32 = 4_000;
const REPLICA_MEMORY_MIB: u32 = 32 * 1024;

/// The control loop's view of deployment `i` of a run.
fn control_spec(config: &SimConfig, key: &str, bytes: u64, keep_alive: KeepAlivePolicy) -> control::DeploymentSpec {
    control::DeploymentSpec {
        cpu_milli: REPLICA_CPU_MILLI,
        memory_mib: REPLICA_MEMORY_MIB,
        gpu: GpuDemand::Memory(((bytes / MIB) as u32).max(1)),
        gpu_models: Vec::new(),
        scaling: config.scaling,
        keep_alive,
        keep_alive_cap_s: f64::INFINITY,
        model_uri: key.to_owned(),
        weights_bytes: bytes,
        max_concurrency: config.max_concurrency,
        rental: None,
    }
}

/// Runs one simulation. `progress` is called with the fraction of simulated time done, about every 1%.
pub fn simulate(
    config: &SimConfig,
    fleet: &FleetSpec,
    deployments: &[DeploymentSpec],
    keep_alive: &KeepAliveChoice,
    progress: &mut dyn FnMut(f64),
) -> Outcome {
    let end_s = config.days * 86_400.0;
    let prices = Prices { gpu_usd_per_hour: config.gpu_usd_per_hour, wait_usd_per_s: config.wait_usd_per_s };
    let mut control = Control::new(config.placement, config.cold.clone(), prices);
    // Spans of GPU holding are taken (and billed) only when rentals are simulated; otherwise none are kept.
    control.set_metering(config.rentals.is_some());
    let nodes = fleet.nodes();
    for n in &nodes {
        let info = NodeInfo {
            name: n.name.clone(),
            cpu_milli: n.cpu_milli,
            memory_mib: n.memory_mib,
            gpu_model: n.gpu_model.clone(),
            gpu_memory_mib: n.gpu_memory_mib,
            gpu_healthy: vec![true; usize::from(n.gpu_count)],
            labels: Vec::new(),
        };
        // A fleet spec is checked by `FleetSpec::parse` (at most 16 GPUs per node): a node is always usable.
        if control.node_up(&info, &[]).is_err() {
            debug_assert!(false, "node {} refused", n.name);
        }
    }
    let node_names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let node_ids = node_names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
    let n = nodes.len();
    let deps = deployments
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let policy = match keep_alive {
                KeepAliveChoice::Uniform(p) => *p,
                KeepAliveChoice::PerDeployment(timers) => KeepAlivePolicy::Fixed(timers.get(i).copied().unwrap_or(0.0)),
            };
            let key = format!("sim/{i:06}");
            control.upsert_deployment(&key, control_spec(config, &key, d.weights_bytes, policy), 0.0);
            let rng = Rng::new(config.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)));
            let (arrivals, requests) = match &d.source {
                Source::Windows(w) => (Some(Arrivals::new(w.clone(), config.rate_scale, end_s, rng)), Vec::new()),
                Source::Requests(r) => {
                    let mut rng = rng;
                    let keep = config.rate_scale.min(1.0);
                    (None, r.iter().filter(|_| rng.unit() < keep).copied().filter(|r| r.at_s < end_s).collect())
                }
            };
            Dep {
                key,
                bytes: d.weights_bytes,
                replicas: Vec::new(),
                queue: VecDeque::new(),
                in_flight: 0,
                idle_since: None,
                arrivals,
                requests,
                cursor: 0,
                next_tokens: (SERVEGEN_CONTEXT, SERVEGEN_GENERATED),
                unschedulable: false,
                gaps: Vec::new(),
            }
        })
        .collect();
    let mut sim = Sim {
        config,
        fleet,
        end_s,
        control,
        node_names,
        node_ids,
        deps,
        replicas: Vec::new(),
        by_id: HashMap::new(),
        free_slots: Vec::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        rng: Rng::new(config.seed.wrapping_add(1)),
        gpu_used: vec![vec![0; usize::from(fleet.gpus_per_node)]; n],
        gpu_copies: vec![Vec::new(); n],
        host: vec![Lru { capacity: config.host_cache_bytes, ..Lru::default() }; n],
        disk: vec![Lru { capacity: config.disk_cache_bytes, ..Lru::default() }; n],
        latencies: Latencies::new(),
        out: Outcome { per_deployment: vec![DeploymentOutcome::default(); deployments.len()], ..Outcome::default() },
        cold_in_sample: 0,
        copy_seconds: 0.0,
        copy_evictions: 0,
        rentals: None,
    };
    if let Some(plan) = &config.rentals {
        sim.rentals = Some(rentals::RentalSim::new(plan, deployments.len()));
        for i in 0..plan.rentals.len() {
            let r = &plan.rentals[i];
            let cancel_at = r.cancel_at_s;
            sim.push(r.created_at_s.max(0.0), Kind::RentalCreated { rental: i as u32 });
            if let Some(t) = cancel_at {
                sim.push(t.max(0.0), Kind::RentalCancelled { rental: i as u32 });
            }
        }
    }
    let lifetime = sim.copy_lifetime();
    sim.control.set_idle_copy_lifetime(lifetime);
    for dep in 0..sim.deps.len() as u32 {
        sim.schedule_next_arrival(dep);
    }
    sim.push(0.0, Kind::Sample);
    sim.push(0.0, Kind::Tick);
    let mut next_report = 0.0;
    while let Some(event) = sim.heap.pop() {
        if event.t > end_s {
            break;
        }
        sim.out.events += 1;
        if event.t >= next_report {
            progress(event.t / end_s);
            next_report = event.t + end_s / 100.0;
        }
        sim.handle(event.t, event.kind);
    }
    sim.finish();
    if sim.rentals.is_some() {
        sim.finish_rentals();
    }
    progress(1.0);
    sim.out
}

impl Sim<'_> {
    fn push(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.heap.push(Event { t, seq: self.seq, kind });
    }

    fn schedule_next_arrival(&mut self, dep: u32) {
        let d = &mut self.deps[dep as usize];
        let next = match &mut d.arrivals {
            Some(a) => a.next(),
            None => d.requests.get(d.cursor).map(|r| {
                d.next_tokens = (r.context_tokens, r.generated_tokens);
                d.cursor += 1;
                r.at_s
            }),
        };
        if let Some(t) = next {
            self.push(t, Kind::Arrival { dep });
        }
    }

    fn handle(&mut self, now: f64, kind: Kind) {
        match kind {
            Kind::Arrival { dep } => self.arrival(now, dep),
            Kind::Ready { replica, epoch } => {
                if self.replicas[replica as usize].epoch == epoch {
                    self.ready(now, replica);
                }
            }
            Kind::Done { replica, epoch, dep, arrived } => self.done(now, replica, epoch, dep, arrived),
            Kind::Tick => {
                if self.rentals.is_some() {
                    self.step_rentals(now);
                }
                self.reconcile(now);
                if self.rentals.is_some() {
                    self.meter_if_due(now);
                }
                let next = now + self.config.reconcile_every_s.max(1e-3);
                if next <= self.end_s {
                    self.push(next, Kind::Tick);
                }
            }
            Kind::Sample => self.sample(now),
            Kind::RentalCreated { rental } => self.rental_created(now, rental),
            Kind::RentalCancelled { rental } => self.rental_cancelled(now, rental),
        }
    }

    /// The control loop's pass: its actions carried out as the agents would.
    fn reconcile(&mut self, now: f64) {
        for action in self.control.reconcile(now) {
            match action {
                Action::Start { replica, deployment, node, gpus, milli_per_gpu, .. } => {
                    self.start_replica(now, replica, &deployment, &node, &gpus, milli_per_gpu);
                }
                Action::Stop { replica, reason, .. } => self.stop(now, &replica, reason),
            }
        }
        for dep in 0..self.deps.len() {
            if self.deps[dep].queue.is_empty() {
                continue;
            }
            let now_unschedulable = self.control.unschedulable(&self.deps[dep].key).is_some();
            if now_unschedulable && !self.deps[dep].unschedulable {
                self.out.unschedulable += 1;
            }
            self.deps[dep].unschedulable = now_unschedulable;
        }
    }

    fn arrival(&mut self, now: f64, dep: u32) {
        self.out.requests += 1;
        self.out.per_deployment[dep as usize].requests += 1;
        let (context, generated) = self.deps[dep as usize].next_tokens;
        self.schedule_next_arrival(dep);
        let d = &mut self.deps[dep as usize];
        if d.idle()
            && let Some(since) = d.idle_since.take()
        {
            d.gaps.push(now - since);
        }
        let ready = d.replicas.iter().any(|&r| self.replicas[r as usize].state == State::Ready);
        let key = d.key.clone();
        self.control.arrive(&key, now);
        let waiting = Waiting { arrived: now, context, generated, for_load: !ready };
        match self.control.route(&key, now) {
            Route::Replica { replica, .. } => {
                let r = self.slot(&replica);
                self.serve(now, r, waiting);
            }
            Route::Wait | Route::Unknown => {
                self.deps[dep as usize].queue.push_back(waiting);
                // The gateway's hold wakes the control loop at once.
                self.reconcile(now);
            }
        }
        if !ready {
            // It waits for a load: a warm hit when a replica is coming back from an idle copy in GPU memory.
            let warm = self.deps[dep as usize].replicas.iter().any(|&r| {
                let r = &self.replicas[r as usize];
                r.state == State::Loading && r.tier == Tier::Gpu
            });
            if warm {
                self.out.warm_hits += 1;
            } else {
                self.out.cold_starts += 1;
                self.out.per_deployment[dep as usize].cold_starts += 1;
                if let Some(r) = &mut self.rentals {
                    r.cold_start(dep);
                }
                self.cold_in_sample += 1;
            }
        }
    }

    /// The slot of the replica `Control` calls `id`.
    fn slot(&self, id: &str) -> u32 {
        match self.by_id.get(id) {
            Some(&slot) => slot,
            None => unreachable!("Control routed to replica {id}, which the simulator never started"),
        }
    }

    fn serve(&mut self, now: f64, replica: u32, w: Waiting) {
        self.account(now, replica);
        if w.for_load {
            let dep = self.replicas[replica as usize].dep;
            self.out.per_deployment[dep as usize].wait_s += now - w.arrived;
        }
        let r = &mut self.replicas[replica as usize];
        r.in_flight += 1;
        let (dep, epoch, gpus) = (r.dep, r.epoch, r.gpus);
        let d = &mut self.deps[dep as usize];
        d.in_flight += 1;
        let t = now + service_s(d.bytes, gpus, w.context, w.generated);
        self.push(t, Kind::Done { replica, epoch, dep, arrived: w.arrived });
    }

    /// Carries out `Action::Start`: the agent loads the weights from the best tier on the node.
    fn start_replica(&mut self, now: f64, id: String, key: &str, node: &str, gpus: &[u32], milli: u16) {
        let (Some(&node), Some(dep)) = (self.node_ids.get(node), self.dep_of(key)) else {
            unreachable!("Control started {id} of {key} on {node}, which the simulator does not know");
        };
        let mask = gpus.iter().fold(0u16, |m, &g| m | (1 << g));
        let bytes = self.deps[dep as usize].bytes;
        // The tier the weights come from on that node.
        let tier = match self.gpu_copies[node].iter().position(|c| c.dep == dep && c.gpus == mask) {
            Some(i) => {
                let copy = self.gpu_copies[node].swap_remove(i);
                self.copy_seconds += now - copy.since;
                Tier::Gpu
            }
            None if self.host[node].contains(dep) => Tier::HostRam,
            None if self.disk[node].contains(dep) => Tier::Disk,
            None => Tier::Remote,
        };
        self.host[node].touch(dep, bytes, now);
        self.disk[node].touch(dep, bytes, now);
        for &g in gpus {
            self.gpu_used[node][g as usize] += u32::from(milli);
        }
        self.evict_copies_for(now, node, mask);
        // Copies reused or evicted: the lifetime the keep-alive weighs follows what the run has seen.
        let lifetime = self.copy_lifetime();
        self.control.set_idle_copy_lifetime(lifetime);
        self.report_cached(node);
        let load_s = self.config.cold.sample(bytes, tier, &mut self.rng);
        if self.deps[dep as usize].idle() {
            self.out.prewarms += 1;
        } else {
            self.out.demand_loads[tier as usize] += 1;
        }
        let share = gpus.len() as f64 * f64::from(milli) / f64::from(MILLI_PER_GPU);
        let replica = Replica {
            id: id.clone(),
            dep,
            node,
            gpus_mask: mask,
            milli,
            tier,
            state: State::Loading,
            epoch: 0,
            in_flight: 0,
            share,
            gpus: gpus.len() as f64,
            since: now,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                let epoch = self.replicas[slot as usize].epoch + 1;
                self.replicas[slot as usize] = Replica { epoch, ..replica };
                slot
            }
            None => {
                self.replicas.push(replica);
                self.replicas.len() as u32 - 1
            }
        };
        self.by_id.insert(id, slot);
        self.deps[dep as usize].replicas.push(slot);
        let epoch = self.replicas[slot as usize].epoch;
        self.push(now + load_s, Kind::Ready { replica: slot, epoch });
    }

    /// The deployment with `Control`'s key `key` (keys are `sim/<index>`).
    fn dep_of(&self, key: &str) -> Option<u32> {
        let i: u32 = key.strip_prefix("sim/")?.parse().ok()?;
        ((i as usize) < self.deps.len()).then_some(i)
    }

    /// Evicts idle GPU copies that no longer fit beside what live replicas hold on the GPUs of `mask`.
    fn evict_copies_for(&mut self, now: f64, node: usize, mask: u16) {
        for g in (0..usize::from(self.fleet.gpus_per_node)).filter(|g| mask & (1 << g) != 0) {
            let used = self.gpu_used[node][g];
            loop {
                let idle: u32 =
                    self.gpu_copies[node].iter().filter(|c| c.gpus & (1 << g) != 0).map(|c| u32::from(c.milli)).sum();
                if used + idle <= u32::from(MILLI_PER_GPU) {
                    break;
                }
                let oldest = self.gpu_copies[node]
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.gpus & (1 << g) != 0)
                    .min_by(|a, b| a.1.since.total_cmp(&b.1.since))
                    .map(|(i, _)| i);
                let Some(oldest) = oldest else { break };
                let copy = self.gpu_copies[node].swap_remove(oldest);
                self.copy_seconds += now - copy.since;
                self.copy_evictions += 1;
            }
        }
    }

    /// The node's agent reports what it caches: idle copies in GPU memory, host RAM and disk.
    fn report_cached(&mut self, node: usize) {
        let mut cached: Vec<Cached> = Vec::new();
        for c in &self.gpu_copies[node] {
            cached.push(Cached { model_uri: self.deps[c.dep as usize].key.clone(), tier: CacheTier::Gpu(c.gpus) });
        }
        for &(dep, _, _) in &self.host[node].entries {
            cached.push(Cached { model_uri: self.deps[dep as usize].key.clone(), tier: CacheTier::HostRam });
        }
        for &(dep, _, _) in &self.disk[node].entries {
            cached.push(Cached { model_uri: self.deps[dep as usize].key.clone(), tier: CacheTier::Disk });
        }
        self.control.set_cached(&self.node_names[node], cached);
    }

    /// Credits a replica's GPU share since its last change to the state it was in.
    fn account(&mut self, now: f64, replica: u32) {
        let r = &mut self.replicas[replica as usize];
        let gpu_s = r.share * (now - r.since);
        let dep = &mut self.out.per_deployment[r.dep as usize].gpu_seconds;
        match r.state {
            State::Loading => dep.loading += gpu_s,
            State::Ready if r.in_flight > 0 => dep.busy += gpu_s,
            State::Ready => dep.idle_warm += gpu_s,
            State::Stopped => {}
        }
        r.since = now;
    }

    fn ready(&mut self, now: f64, replica: u32) {
        self.account(now, replica);
        self.replicas[replica as usize].state = State::Ready;
        let dep = self.replicas[replica as usize].dep;
        if let Some(r) = &mut self.rentals {
            r.replica_ready(dep);
        }
        let id = self.replicas[replica as usize].id.clone();
        self.control.replica_ready(&id, now);
        self.drain_queue(now, dep);
        // The agent's worker event wakes the control loop.
        self.reconcile(now);
    }

    /// Routes waiting requests while `Control` finds a replica with a free slot.
    fn drain_queue(&mut self, now: f64, dep: u32) {
        while !self.deps[dep as usize].queue.is_empty() {
            let Route::Replica { replica, .. } = self.control.route(&self.deps[dep as usize].key, now) else { break };
            let r = self.slot(&replica);
            let Some(w) = self.deps[dep as usize].queue.pop_front() else { break };
            self.serve(now, r, w);
        }
    }

    fn done(&mut self, now: f64, replica: u32, epoch: u32, dep: u32, arrived: f64) {
        self.latencies.record((now - arrived) * 1000.0);
        if self.replicas[replica as usize].epoch != epoch {
            // A replica a rental took away (fenced or reclaimed) finishes what it had in flight in its grace.
            debug_assert!(self.rentals.is_some(), "without rentals a replica with work is never stopped");
            self.deps[dep as usize].in_flight -= 1;
            // `Control` forgot the replica; the deployment's count of requests in flight goes down.
            self.control.finish(&self.deps[dep as usize].key, "", now);
            self.drain_queue(now, dep);
            let d = &mut self.deps[dep as usize];
            if d.idle() {
                d.idle_since = Some(now);
            }
            return;
        }
        self.account(now, replica);
        let dep = self.replicas[replica as usize].dep;
        self.replicas[replica as usize].in_flight -= 1;
        self.deps[dep as usize].in_flight -= 1;
        let id = self.replicas[replica as usize].id.clone();
        self.control.finish(&self.deps[dep as usize].key, &id, now);
        self.drain_queue(now, dep);
        let d = &mut self.deps[dep as usize];
        if d.idle() {
            d.idle_since = Some(now);
        }
    }

    /// Estimated mean lifetime of an idle copy in GPU memory (exponential; evictions over observed copy-seconds,
    /// with a prior of one eviction per [`COPY_LIFETIME_PRIOR_S`]), seconds; 0 when copies are not kept.
    fn copy_lifetime(&self) -> f64 {
        if self.config.idle_gpu_copies {
            (self.copy_seconds + COPY_LIFETIME_PRIOR_S) / (self.copy_evictions + 1) as f64
        } else {
            0.0
        }
    }

    /// Carries out `Action::Stop`: a ready replica leaves its weights in GPU memory as an idle, evictable copy.
    /// A replica a rental takes away (fenced, reclaimed) may have requests in flight: they finish in its grace
    /// ([`Sim::done`]), its GPU share is free at once (as in `Control`'s books), and it leaves no copy behind.
    fn stop(&mut self, now: f64, id: &str, reason: StopReason) {
        let Some(replica) = self.by_id.remove(id) else {
            unreachable!("Control stopped replica {id}, which the simulator never started");
        };
        self.account(now, replica);
        let by_rental = matches!(reason, StopReason::Fenced | StopReason::Reclaimed | StopReason::RentalEnded);
        let r = &mut self.replicas[replica as usize];
        debug_assert!(by_rental || r.in_flight == 0, "Control stops idle replicas only");
        let was_ready = r.state == State::Ready;
        r.state = State::Stopped;
        r.epoch += 1;
        let in_flight = std::mem::take(&mut r.in_flight);
        let (dep, node, mask, milli) = (r.dep, r.node, r.gpus_mask, r.milli);
        for g in (0..usize::from(self.fleet.gpus_per_node)).filter(|g| mask & (1 << g) != 0) {
            self.gpu_used[node][g] -= u32::from(milli);
        }
        if by_rental {
            self.rental_stop(dep, reason, in_flight);
        }
        if self.config.idle_gpu_copies && was_ready && !by_rental {
            let bytes = self.deps[dep as usize].bytes;
            self.gpu_copies[node].push(IdleCopy { dep, gpus: mask, milli, bytes, since: now });
        }
        self.report_cached(node);
        self.deps[dep as usize].replicas.retain(|&x| x != replica);
        self.free_slots.push(replica);
    }

    fn sample(&mut self, now: f64) {
        let alive = self.replicas.iter().filter(|r| r.state != State::Stopped).count() as u32;
        let live_bytes: u64 =
            self.replicas.iter().filter(|r| r.state != State::Stopped).map(|r| self.deps[r.dep as usize].bytes).sum();
        let copy_bytes: u64 = self.gpu_copies.iter().flatten().map(|c| c.bytes).sum();
        let s = &mut self.out.series;
        s.t_s.push(now);
        s.replicas.push(alive);
        s.cold_starts.push(self.cold_in_sample);
        s.gpu_memory_gb.push((live_bytes + copy_bytes) as f64 / GB);
        self.cold_in_sample = 0;
        if now + self.config.sample_every_s <= self.end_s {
            self.push(now + self.config.sample_every_s, Kind::Sample);
        }
    }

    fn finish(&mut self) {
        let end = self.end_s;
        for i in 0..self.replicas.len() as u32 {
            if self.replicas[i as usize].state != State::Stopped {
                self.account(end, i);
            }
        }
        self.out.latency_ms =
            [self.latencies.quantile(0.50), self.latencies.quantile(0.95), self.latencies.quantile(0.99)];
        // Requests still waiting for a load at the end waited until then.
        for (d, out) in self.deps.iter().zip(&mut self.out.per_deployment) {
            out.wait_s += d.queue.iter().filter(|w| w.for_load).map(|w| end - w.arrived).sum::<f64>();
        }
        let (gpu_usd_per_s, wait_usd_per_s) = (self.config.gpu_usd_per_hour / 3600.0, self.config.wait_usd_per_s);
        let (mut g, mut wait_s) = (GpuSeconds::default(), 0.0);
        for d in &mut self.out.per_deployment {
            let s = d.gpu_seconds;
            d.gpu_cost_usd = (s.busy + s.idle_warm + s.loading) * gpu_usd_per_s;
            d.wait_cost_usd = d.wait_s * wait_usd_per_s;
            d.total_cost_usd = d.gpu_cost_usd + d.wait_cost_usd;
            g.busy += s.busy;
            g.idle_warm += s.idle_warm;
            g.loading += s.loading;
            wait_s += d.wait_s;
        }
        self.out.gpu_seconds = g;
        self.out.wait_s = wait_s;
        self.out.gpu_cost_usd = (g.busy + g.idle_warm + g.loading) * gpu_usd_per_s;
        self.out.wait_cost_usd = wait_s * wait_usd_per_s;
        self.out.total_cost_usd = self.out.gpu_cost_usd + self.out.wait_cost_usd;
        self.out.idle_gaps = self.deps.iter_mut().map(|d| std::mem::take(&mut d.gaps)).collect();
        self.out.copy_lifetime_s = self.copy_lifetime();
    }
}

#[cfg(test)]
mod tests;
