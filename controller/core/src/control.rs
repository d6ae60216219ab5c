//! The control loop's decisions, without I/O: which replicas to start where, which to stop, and which replica
//! takes the next request. The controller runtime feeds it what it hears (deployments from manifests or the
//! API server, agents registering and going silent, replicas becoming ready or exiting, requests arriving and
//! finishing) and carries out the [`Action`]s it returns. `kiln simulate serving` (the `kiln-sim` crate) drives
//! this same state on a virtual clock, so its figures are this code's decisions.
//!
//! Time is seconds on the caller's monotonic clock (`f64`), as in [`crate::autoscale`].
//!
//! How many replicas a deployment gets:
//! - the [`Scaler`] (stable and panic windows over in-flight plus waiting requests), bounded by min/max;
//! - requests waiting because no ready replica has a free slot are a definite signal: the deployment gets at least
//!   enough replicas to take them all (`ceil(demand / max_concurrency)`), at once — this is scale-from-zero, and
//!   scale-out under a burst, without waiting for the averages;
//! - scale to zero is the keep-alive's decision: once nothing is in flight or waiting, the last replicas stay until
//!   the [`KeepAlive`] plan's `unload_after` (a fixed timer, or the adaptive policy's cost-based choice, capped by
//!   the deployment's `keepAlive.duration`), then all stop; when the plan pre-warms (a deployment whose requests
//!   come back at a regular interval), one replica is started again a load time before the predicted arrival and
//!   kept until the end of the predicted window. Adaptive deployments pool their idle times in a fleet-wide
//!   [`FleetPrior`] (by cost class and typical idle time), which a deployment with little history plans under,
//!   shrunk toward its own idle times as they accumulate. Above zero, the scaler decides, stopping idle replicas only; while
//!   nothing is in flight or waiting it only scales down (its averages lag behind a demand that is gone).
//!
//! Where: the placement engine, with the deployment's other replicas as the spread hint and the nodes that cache
//! its weights as the cache hint. A node that goes silent is unschedulable and its replicas are gone; the next
//! reconcile places replacements elsewhere. A GPU marked unhealthy takes no new work and its replicas are stopped
//! and replaced.
//!
//! Start failures (kubelet's CrashLoopBackOff is the model): a replica that fails to load, or exits before it has
//! served for [`BACKOFF_RESET_S`], puts its deployment in backoff — no new start before `retry_at`, which doubles
//! from [`BACKOFF_INITIAL_S`] to [`BACKOFF_MAX_S`] with ±10% jitter per consecutive failure. A failure the agent
//! calls not retryable (invalid weights, an unsupported runtime) waits [`NON_RETRYABLE_RETRY_S`] instead: it stops
//! until the spec changes, the runtime sees the model file change ([`Control::retry_now`]), or an hourly probe.
//! While a deployment is in backoff with no replica ready or starting, [`Control::failing`] says why, and the
//! runtime fails the requests waiting for it at once instead of holding them. A replica becoming ready clears the
//! failure (the deployment is no longer degraded); the backoff length resets once a replica has been ready for
//! [`BACKOFF_RESET_S`].

use std::collections::{BTreeMap, HashMap};

/// First wait after a failed start, seconds.
pub const BACKOFF_INITIAL_S: f64 = 10.0;
/// Longest wait between failed starts, seconds.
pub const BACKOFF_MAX_S: f64 = 300.0;
/// A replica ready this long resets the backoff, seconds.
pub const BACKOFF_RESET_S: f64 = 600.0;
/// Wait after a failure the agent says no retry can fix, seconds (an hourly probe).
pub const NON_RETRYABLE_RETRY_S: f64 = 3600.0;

pub use held::HeldSpan;
pub use rentals::{RentalStep, RentalView, RestoredRental};

use crate::{
    autoscale::{
        Scaler, ScalingConfig,
        coldstart::{ColdStartModel, Tier},
        keepalive::{Costs, FleetPrior, KeepAlive, Plan, Policy as KeepAlivePolicy},
    },
    billing::ServerlessPhase,
    placement::{
        CacheHint, CacheTier, Cluster, ClusterError, GpuDemand, Hints, MAX_GPUS_PER_NODE, MILLI_PER_GPU, ModelSet,
        NodeId, NodeSpec, Placement, PlacementEngine, Policy, Request, Unplaceable, Workload,
    },
    rental::RentalConfig,
    rng::Rng,
};

/// Errors of the control loop's inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A node reports more GPUs than a node may have.
    #[error("too many GPUs")]
    TooManyGpus {
        /// GPUs reported.
        count: usize,
    },
    /// The placement engine cannot take the node.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Result of the control loop's fallible inputs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a deployment's replica cannot be placed now. `Display` is the message status conditions and events show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unschedulable {
    /// Nodes that could hold it lack room now; `shortfall` says which resource binds on how many nodes.
    #[error("no schedulable node has room for a replica ({needs}): {shortfall}")]
    NoRoom {
        /// What one replica needs, in words.
        needs: String,
        /// Which resource keeps it off each node, summed over the fleet.
        shortfall: Shortfall,
    },
    /// No node has registered.
    #[error("no GPU node has registered yet; a replica needs {needs}")]
    NoNodes {
        /// What one replica needs, in words.
        needs: String,
    },
    /// No node of the cluster could ever hold it (too large, or no node of an allowed GPU model).
    #[error("no node could ever hold a replica ({needs}): {why}")]
    Impossible {
        /// What one replica needs, in words.
        needs: String,
        /// The placement engine's reason.
        why: String,
    },
    /// The deployment runs only on a rental's GPUs (`spec.gpu.rental`), and they cannot take a replica now.
    #[error("a replica ({needs}) runs only on the GPUs of rental {rental}: {why}")]
    Rental {
        /// What one replica needs, in words.
        needs: String,
        /// The rental (`namespace/name`).
        rental: String,
        /// Why not now: the rental is not Active, or its GPUs have no room.
        why: String,
    },
}

impl Unschedulable {
    /// The resource that binds, when nodes lack room.
    pub fn binding(&self) -> Option<Resource> {
        match self {
            Unschedulable::NoRoom { shortfall, .. } => shortfall.binding(),
            _ => None,
        }
    }
}

/// A resource that keeps a replica off a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Free GPU (a share or whole GPUs).
    Gpu,
    /// Free CPU.
    Cpu,
    /// Free host memory.
    Memory,
    /// The node's GPU model, or its GPU memory.
    GpuModel,
    /// The node is cordoned or disconnected.
    Schedulable,
}

/// Which resource keeps a request off each node, summed over the fleet. `Display`: "2 node(s) lack free CPU (most
/// free: 0.5 CPU of the 1 CPU needed); 1 node(s) cordoned or disconnected".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shortfall {
    /// Nodes known.
    pub nodes: u32,
    /// Nodes without the free GPU the request needs.
    pub gpu: u32,
    /// Most free milli-GPU on one GPU of a node that could hold the request.
    pub most_free_gpu_milli: u16,
    /// Nodes without the free CPU.
    pub cpu: u32,
    /// Most free CPU on one node, millicores.
    pub most_free_cpu_milli: u32,
    /// CPU the request needs, millicores.
    pub cpu_needed_milli: u32,
    /// Nodes without the free host memory.
    pub memory: u32,
    /// Most free host memory on one node, MiB.
    pub most_free_memory_mib: u32,
    /// Host memory the request needs, MiB.
    pub memory_needed_mib: u32,
    /// Nodes of another GPU model or with too little GPU memory.
    pub model: u32,
    /// Nodes cordoned or disconnected.
    pub unschedulable: u32,
}

impl Shortfall {
    /// The first resource (GPU, CPU, host memory, GPU model, schedulability) that keeps the request off a node.
    pub fn binding(&self) -> Option<Resource> {
        [
            (self.gpu, Resource::Gpu),
            (self.cpu, Resource::Cpu),
            (self.memory, Resource::Memory),
            (self.model, Resource::GpuModel),
            (self.unschedulable, Resource::Schedulable),
        ]
        .into_iter()
        .find(|(n, _)| *n > 0)
        .map(|(_, r)| r)
    }
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.gpu > 0 {
            parts.push(format!(
                "{} node(s) lack free GPU (most free on one GPU: {:.2} GPU)",
                self.gpu,
                f64::from(self.most_free_gpu_milli) / 1000.0
            ));
        }
        if self.cpu > 0 {
            parts.push(format!(
                "{} node(s) lack free CPU (most free: {} of the {} needed)",
                self.cpu,
                cpus(self.most_free_cpu_milli),
                cpus(self.cpu_needed_milli)
            ));
        }
        if self.memory > 0 {
            parts.push(format!(
                "{} node(s) lack free host memory (most free: {} MiB of the {} MiB needed)",
                self.memory, self.most_free_memory_mib, self.memory_needed_mib
            ));
        }
        if self.model > 0 {
            parts.push(format!("{} node(s) have another GPU model or too little GPU memory", self.model));
        }
        if self.unschedulable > 0 {
            parts.push(format!("{} node(s) cordoned or disconnected", self.unschedulable));
        }
        if parts.is_empty() {
            parts.push(format!("{} node(s) known", self.nodes));
        }
        f.write_str(&parts.join("; "))
    }
}

/// What the controller needs to know of one deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentSpec {
    /// CPU (millicores) and host memory (MiB) of one replica.
    pub cpu_milli: u32,
    /// Host memory of one replica, MiB.
    pub memory_mib: u32,
    /// GPUs of one replica (`Memory` for a model that fits in part of a GPU).
    pub gpu: GpuDemand,
    /// GPU models allowed (empty: any).
    pub gpu_models: Vec<String>,
    /// Scaling bounds and windows.
    pub scaling: ScalingConfig,
    /// Keep-alive policy of idle replicas.
    pub keep_alive: KeepAlivePolicy,
    /// Longest an idle replica is kept, seconds (`INFINITY`: no cap).
    pub keep_alive_cap_s: f64,
    /// Where the weights come from (matched against the nodes' cache reports).
    pub model_uri: String,
    /// Size of the weights, bytes (for the cold-start model).
    pub weights_bytes: u64,
    /// Requests one replica serves at once.
    pub max_concurrency: u32,
    /// The rental (`namespace/name`) whose GPUs alone its replicas run on; `None`: the serverless pool.
    pub rental: Option<String>,
}

/// A node as its agent reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Allocatable CPU, millicores.
    pub cpu_milli: u32,
    /// Allocatable host memory, MiB.
    pub memory_mib: u32,
    /// GPU model (all GPUs of a node are one model).
    pub gpu_model: String,
    /// Memory of each GPU, MiB.
    pub gpu_memory_mib: u32,
    /// Health of each GPU, by index.
    pub gpu_healthy: Vec<bool>,
    /// Node labels.
    pub labels: Vec<(String, String)>,
}

/// Where a node caches a model's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    /// The model's URI.
    pub model_uri: String,
    /// The tier.
    pub tier: CacheTier,
}

/// Why a replica is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The autoscaler wants fewer replicas.
    ScaledDown,
    /// Idle past the keep-alive: the deployment scales to zero.
    KeepAliveExpired,
    /// The deployment was deleted.
    Deleted,
    /// A replica the controller does not know of (left from before a restart or a lost command).
    Orphan,
    /// Its GPU became unhealthy.
    GpuUnhealthy,
    /// The gateway could not reach it.
    Unreachable,
    /// Its GPU was taken for a rental (fenced before the rental's start).
    Fenced,
    /// It ran on a rented GPU lent to the serverless pool, and the rental's owner needs the GPU back.
    Reclaimed,
    /// It ran on a rental's GPUs and the rental ended (expired or cancelled) or gave the GPU back.
    RentalEnded,
}

/// Why a replica failed to start (or exited before it had served a while), as its agent said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailure {
    /// Machine-readable cause in UpperCamelCase (`ModelNotFound`, `InvalidWeights`, `CudaError`, `Exited`, ...).
    pub reason: String,
    /// What a person needs to know.
    pub message: String,
    /// Whether starting again may succeed without a change to the spec or the model.
    pub retryable: bool,
}

/// A deployment's start failures: the last one, how many in a row, and when a start may be tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureState {
    /// The last failure.
    pub last: StartFailure,
    /// Consecutive failed starts.
    pub consecutive: u32,
    /// No start before this time (seconds on the control loop's clock).
    pub retry_at: f64,
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a replica.
    Start {
        /// Replica id (unique).
        replica: String,
        /// Deployment key (`namespace/name`).
        deployment: String,
        /// Node name.
        node: String,
        /// GPU indexes on the node.
        gpus: Vec<u32>,
        /// Milli-GPU taken on each of those GPUs.
        milli_per_gpu: u16,
        /// The weights' best tier on that node, if cached there.
        cached: Option<CacheTier>,
    },
    /// Stop a replica.
    Stop {
        /// Replica id.
        replica: String,
        /// Deployment key.
        deployment: String,
        /// Node name.
        node: String,
        /// Why.
        reason: StopReason,
    },
}

/// A replica's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Start sent, not ready yet.
    Starting,
    /// Serving.
    Ready,
}

/// One replica as the controller tracks it.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Deployment key.
    pub deployment: String,
    /// Node name.
    pub node: String,
    /// GPU indexes.
    pub gpus: Vec<u32>,
    /// Phase.
    pub phase: Phase,
    /// Requests routed to it and not finished.
    pub in_flight: u32,
    /// When the start was decided.
    pub started_at: f64,
    /// The rental whose GPUs it runs on, for a deployment pinned to one.
    pub rental: Option<String>,
    /// What it holds its GPU for now (metered), and since when.
    held: ServerlessPhase,
    held_since: f64,
    node_id: NodeId,
    request: Request,
    placement: Placement,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To this replica on this node.
    Replica {
        /// Replica id.
        replica: String,
        /// Node name.
        node: String,
    },
    /// No ready replica has a free slot: hold the request (a replica is being started or will be).
    Wait,
    /// No such deployment.
    Unknown,
}

/// A deployment's state for status, events and the gateway.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeploymentStatus {
    /// Replicas wanted.
    pub desired: u32,
    /// Replicas starting.
    pub starting: u32,
    /// Replicas ready.
    pub ready: u32,
    /// Requests in flight on replicas.
    pub in_flight: u32,
    /// Requests waiting for a slot.
    pub waiting: u32,
    /// Why the last placement failed, while replicas are missing.
    pub unschedulable: Option<Unschedulable>,
    /// Start failures, while the deployment has not had a replica ready since the last one.
    pub failure: Option<FailureState>,
}

/// Prices the adaptive keep-alive weighs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    /// A GPU-hour, dollars.
    pub gpu_usd_per_hour: f64,
    /// One second of a request waiting on a cold start, dollars.
    pub wait_usd_per_s: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Self { gpu_usd_per_hour: 2.5, wait_usd_per_s: 0.5 }
    }
}

/// A deployment's replica count must change: from `current` to `want`, stopping with `stop_reason`.
#[derive(Debug, Clone, Copy)]
struct Change {
    current: u32,
    want: u32,
    stop_reason: StopReason,
}

#[derive(Debug)]
struct Deployment {
    spec: DeploymentSpec,
    scaler: Scaler,
    keep: KeepAlive,
    /// Requests in flight on replicas, and waiting for one.
    in_flight: u32,
    waiting: u32,
    /// Since when nothing is in flight or waiting, and the keep-alive plan made then.
    idle: Option<(f64, Plan)>,
    desired: u32,
    /// Replicas placed (starting or ready).
    replicas: u32,
    unschedulable: Option<Unschedulable>,
    /// The last start failure; cleared when a replica becomes ready.
    failure: Option<StartFailure>,
    /// Consecutive failed starts (the backoff's exponent); reset after a replica has been ready a while.
    consecutive_failures: u32,
    /// No start before this time.
    retry_at: f64,
    /// Since when a replica has been ready while `consecutive_failures > 0`.
    healthy_since: Option<f64>,
}

impl Deployment {
    fn demand(&self) -> u32 {
        self.in_flight + self.waiting
    }
}

/// The controller's decision state.
#[derive(Debug)]
pub struct Control {
    engine: PlacementEngine,
    nodes: HashMap<String, NodeId>,
    /// Nodes an operator cordoned (`GpuNode.spec.unschedulable`): connected, but no new work.
    cordoned: std::collections::HashSet<String>,
    connected: std::collections::HashSet<String>,
    cached: HashMap<NodeId, Vec<Cached>>,
    deployments: BTreeMap<String, Deployment>,
    /// The deployments' idle times pooled by cost class and typical idle time: the keep-alive's prior for deployments
    /// with little history.
    fleet_prior: FleetPrior,
    /// A deployment was removed since the last reconcile: its replicas are to be stopped.
    removed: bool,
    replicas: BTreeMap<String, Replica>,
    cold: ColdStartModel,
    prices: Prices,
    /// Mean life of an idle copy in GPU memory, seconds, as the keep-alive weighs it.
    copy_lifetime_s: f64,
    next_replica: u64,
    /// Jitter of the start backoff.
    rng: Rng,
    /// The latest time any input carried: what inputs without a time (a replica gone, a node lost) are stamped with.
    clock: f64,
    /// GPUs each node's agent reports unhealthy (bitmask): the truth, whatever the engine is told about GPUs set
    /// aside for rentals.
    unhealthy: HashMap<NodeId, u16>,
    /// Rentals by key (`namespace/name`).
    rentals: BTreeMap<String, rentals::Slot>,
    /// GPUs set aside for a rental: (node, GPU index) -> rental key.
    held_by: BTreeMap<(NodeId, u32), String>,
    rental_config: RentalConfig,
    /// Wall-clock seconds minus the loop's clock, as of the last rental step.
    wall_offset: f64,
    /// Spans of GPU holding closed since the last [`Control::take_held`] (kept only with metering on).
    spans: Vec<HeldSpan>,
    metering: bool,
}

impl Control {
    /// An empty control state placing with `policy`.
    pub fn new(policy: Policy, cold: ColdStartModel, prices: Prices) -> Self {
        let cluster = Cluster::new(&[]).unwrap_or_else(|_| unreachable!("an empty cluster is valid"));
        Self {
            engine: PlacementEngine::new(cluster, policy, Workload::default(), 0x6b69_6c6e),
            nodes: HashMap::new(),
            cordoned: std::collections::HashSet::new(),
            connected: std::collections::HashSet::new(),
            cached: HashMap::new(),
            deployments: BTreeMap::new(),
            fleet_prior: FleetPrior::new(),
            removed: false,
            replicas: BTreeMap::new(),
            cold,
            prices,
            copy_lifetime_s: 0.0,
            next_replica: 0,
            rng: Rng::new(0x6b69_6c6e_6661_696c),
            clock: f64::NEG_INFINITY,
            unhealthy: HashMap::new(),
            rentals: BTreeMap::new(),
            held_by: BTreeMap::new(),
            rental_config: RentalConfig::default(),
            wall_offset: 0.0,
            spans: Vec::new(),
            metering: false,
        }
    }

    /// Adds or updates a deployment. Its replicas keep running; their count follows the new bounds from the next
    /// reconcile.
    pub fn upsert_deployment(&mut self, key: &str, spec: DeploymentSpec, now: f64) {
        self.tick(now);
        match self.deployments.get_mut(key) {
            Some(d) if d.spec == spec => {}
            Some(d) => {
                if d.spec.scaling != spec.scaling {
                    d.scaler = Scaler::new(spec.scaling, now);
                }
                if d.spec.keep_alive != spec.keep_alive {
                    d.keep.leave(&mut self.fleet_prior);
                    d.keep = KeepAlive::new(spec.keep_alive);
                }
                // A new spec is a new chance: what failed before may start now.
                d.failure = None;
                d.consecutive_failures = 0;
                d.retry_at = f64::NEG_INFINITY;
                d.healthy_since = None;
                d.spec = spec;
                self.refresh_workload();
            }
            None => {
                let replicas = self.replicas.values().filter(|r| r.deployment == key).count() as u32;
                let deployment = Deployment {
                    scaler: Scaler::new(spec.scaling, now),
                    keep: KeepAlive::new(spec.keep_alive),
                    spec,
                    in_flight: 0,
                    waiting: 0,
                    idle: None,
                    desired: 0,
                    replicas,
                    unschedulable: None,
                    failure: None,
                    consecutive_failures: 0,
                    retry_at: f64::NEG_INFINITY,
                    healthy_since: None,
                };
                self.deployments.insert(key.to_owned(), deployment);
                self.refresh_workload();
            }
        }
    }

    /// Removes a deployment; its replicas stop at the next reconcile.
    pub fn remove_deployment(&mut self, key: &str) {
        if let Some(mut d) = self.deployments.remove(key) {
            d.keep.leave(&mut self.fleet_prior);
            self.removed = true;
            self.refresh_workload();
        }
    }

    /// Deployment keys.
    pub fn deployments(&self) -> impl Iterator<Item = &str> {
        self.deployments.keys().map(String::as_str)
    }

    /// The fragmentation measure assumes the deployments' replica shapes, equally popular.
    fn refresh_workload(&mut self) {
        let requests: Vec<Request> = self.deployments.values().map(|d| self.request_for(&d.spec)).collect();
        self.engine.set_workload(Workload::from_requests(&requests));
    }

    fn request_for(&self, spec: &DeploymentSpec) -> Request {
        let mut request = Request::new(spec.cpu_milli, spec.memory_mib, spec.gpu);
        if !spec.gpu_models.is_empty() {
            let cluster = self.engine.cluster();
            // Models no node has yet get no id: a set of none places nowhere, which is the truth.
            request.models = ModelSet::of(spec.gpu_models.iter().filter_map(|m| cluster.model_id(m)));
        }
        request
    }

    /// An agent registered (or re-registered): the node takes work. `running`: the replica ids its agent reports.
    /// Returns stops for replicas the controller does not know; replicas the controller placed there that the
    /// agent does not report are gone (their slots are freed, and replacements placed at the next reconcile).
    pub fn node_up(&mut self, info: &NodeInfo, running: &[String]) -> Result<Vec<Action>> {
        let id = match self.nodes.get(&info.name) {
            Some(&id) => id,
            None => {
                let spec = NodeSpec {
                    name: info.name.clone(),
                    cpu_milli: info.cpu_milli,
                    memory_mib: info.memory_mib,
                    gpu_count: u8::try_from(info.gpu_healthy.len())
                        .map_err(|_| Error::TooManyGpus { count: info.gpu_healthy.len() })?,
                    gpu_model: info.gpu_model.clone(),
                    gpu_memory_mib: info.gpu_memory_mib,
                    labels: info.labels.clone(),
                };
                let id = self.engine.add_node(&spec)?;
                self.nodes.insert(info.name.clone(), id);
                // A new GPU model may make a deployment's model list resolvable.
                self.refresh_workload();
                id
            }
        };
        self.connected.insert(info.name.clone());
        self.engine.set_schedulable(id, !self.cordoned.contains(&info.name));
        let mask = info.gpu_healthy.iter().enumerate().filter(|(_, h)| !**h).fold(0u16, |m, (g, _)| m | (1 << g));
        self.unhealthy.insert(id, mask);
        for gpu in 0..info.gpu_healthy.len() {
            self.sync_gpu(id, gpu as u32);
        }
        let lost: Vec<String> = self
            .replicas
            .iter()
            .filter(|(r, rep)| rep.node == info.name && !running.contains(r))
            .map(|(r, _)| r.clone())
            .collect();
        for r in lost {
            self.replica_gone(&r);
        }
        Ok(running
            .iter()
            .filter(|r| !self.replicas.contains_key(*r))
            .map(|r| Action::Stop {
                replica: r.clone(),
                deployment: String::new(),
                node: info.name.clone(),
                reason: StopReason::Orphan,
            })
            .collect())
    }

    /// A node's agent disconnected: no new work there until it registers again; its replicas are kept (they may
    /// still run, and the agent reports them when it returns).
    pub fn node_down(&mut self, name: &str) {
        self.connected.remove(name);
        if let Some(&id) = self.nodes.get(name) {
            self.engine.set_schedulable(id, false);
        }
    }

    /// A node's agent went silent: no new work, and its replicas are gone. Returns their ids.
    pub fn node_lost(&mut self, name: &str) -> Vec<String> {
        self.connected.remove(name);
        let Some(&id) = self.nodes.get(name) else { return Vec::new() };
        self.engine.set_schedulable(id, false);
        let gone: Vec<String> = self.replicas.iter().filter(|(_, r)| r.node == name).map(|(k, _)| k.clone()).collect();
        for r in &gone {
            self.replica_gone(r);
        }
        gone
    }

    /// Cordons or uncordons a node: a cordoned node takes no new replicas and keeps those it runs.
    pub fn set_cordoned(&mut self, node: &str, cordoned: bool) {
        let changed = if cordoned { self.cordoned.insert(node.to_owned()) } else { self.cordoned.remove(node) };
        if changed
            && self.connected.contains(node)
            && let Some(&id) = self.nodes.get(node)
        {
            self.engine.set_schedulable(id, !cordoned);
        }
    }

    /// A GPU's health changed. Replicas on an unhealthy GPU are stopped and replaced at the next reconcile.
    pub fn gpu_health(&mut self, node: &str, gpu: u32, healthy: bool) {
        if let Some(&id) = self.nodes.get(node)
            && gpu < 16
        {
            let mask = self.unhealthy.entry(id).or_default();
            if healthy {
                *mask &= !(1 << gpu);
            } else {
                *mask |= 1 << gpu;
            }
            self.sync_gpu(id, gpu);
        }
    }

    /// Tells the placement engine whether general work may use a GPU: healthy, and not set aside for a rental
    /// (unless the rental lends it).
    fn sync_gpu(&mut self, node: NodeId, gpu: u32) {
        let healthy = self.unhealthy.get(&node).is_none_or(|m| m & (1 << gpu) == 0);
        let blocked = self.held_by.get(&(node, gpu)).is_some_and(|k| self.rentals.get(k).is_none_or(|s| !s.lent));
        self.engine.set_gpu_healthy(node, gpu as usize, healthy && !blocked);
    }

    /// The GPU model of a node.
    fn node_model(&self, node: NodeId) -> &str {
        let cluster = self.engine.cluster();
        cluster.models()[usize::from(cluster.node_type(cluster.node(node).type_id).model)].as_str()
    }

    /// Whether the agent reports a GPU healthy.
    fn gpu_is_healthy(&self, node: NodeId, gpu: u32) -> bool {
        self.unhealthy.get(&node).is_none_or(|m| m & (1 << gpu) == 0)
    }

    /// Moves the clock forward to `now` (never back).
    fn tick(&mut self, now: f64) {
        if now > self.clock {
            self.clock = now;
        }
    }

    /// What a node caches now (replaces what it reported before). Idle copies in GPU memory (`CacheTier::Gpu`) of
    /// a deployment's model also tell the placement engine how much of each GPU's free memory they hold (a replica's
    /// share on that node's GPUs): free for placement, but overwriting them is weighed.
    pub fn set_cached(&mut self, node: &str, cached: Vec<Cached>) {
        let Some(&id) = self.nodes.get(node) else { return };
        let cluster = self.engine.cluster();
        let t = cluster.node_type(cluster.node(id).type_id);
        let (gpus, gpu_memory_mib) = (usize::from(t.gpu_count), t.gpu_memory_mib);
        let mut milli = [0u32; MAX_GPUS_PER_NODE];
        for c in &cached {
            let CacheTier::Gpu(mask) = c.tier else { continue };
            let per_gpu = self
                .deployments
                .values()
                .find(|d| d.spec.model_uri == c.model_uri)
                .and_then(|d| d.spec.gpu.resolve(gpu_memory_mib))
                .map_or(0, |g| match g {
                    GpuDemand::Share(m) => u32::from(m),
                    GpuDemand::Whole(_) => u32::from(MILLI_PER_GPU),
                    _ => 0,
                });
            for (g, m) in milli.iter_mut().enumerate().take(gpus) {
                if mask & (1 << g) != 0 {
                    *m += per_gpu;
                }
            }
        }
        for (g, m) in milli.iter().enumerate().take(gpus) {
            self.engine.set_cached(id, g, (*m).min(u32::from(MILLI_PER_GPU)) as u16);
        }
        self.cached.insert(id, cached);
    }

    /// The mean time an idle copy of weights survives in GPU memory before other work overwrites it, seconds, as
    /// the caller measured it: the keep-alive weighs restarts from such copies (warm hits) against cold starts with
    /// it. Until it is set, every restart counts as a cold start (0).
    pub fn set_idle_copy_lifetime(&mut self, seconds: f64) {
        self.copy_lifetime_s = seconds.max(0.0);
    }

    /// A replica is ready to serve. Returns its deployment, or `None` if it is not known (stopped meanwhile).
    pub fn replica_ready(&mut self, replica: &str, now: f64) -> Option<&str> {
        self.tick(now);
        self.hold(replica, now, ServerlessPhase::IdleWarm);
        let r = self.replicas.get_mut(replica)?;
        r.phase = Phase::Ready;
        if let Some(d) = self.deployments.get_mut(&r.deployment) {
            d.failure = None;
        }
        Some(r.deployment.as_str())
    }

    /// A replica failed to start (or exited on its own before it had served [`BACKOFF_RESET_S`]): its slot is
    /// freed and its deployment waits before the next start. Returns the replica, `None` if it is not known
    /// (stopped meanwhile: then nothing is counted).
    pub fn replica_failed(&mut self, replica: &str, failure: StartFailure, now: f64) -> Option<Replica> {
        self.tick(now);
        let r = self.replica_gone(replica)?;
        let Some(d) = self.deployments.get_mut(&r.deployment) else { return Some(r) };
        d.consecutive_failures = d.consecutive_failures.saturating_add(1);
        d.healthy_since = None;
        let delay = if failure.retryable {
            let doublings = d.consecutive_failures.saturating_sub(1).min(16);
            let base = (BACKOFF_INITIAL_S * f64::from(1u32 << doublings)).min(BACKOFF_MAX_S);
            // ±10%, so that deployments failing together do not retry in lockstep.
            base * (0.9 + 0.2 * self.rng.unit())
        } else {
            NON_RETRYABLE_RETRY_S
        };
        d.retry_at = now + delay;
        d.failure = Some(failure);
        Some(r)
    }

    /// A replica exited on its own. One that had served for [`BACKOFF_RESET_S`] since its start is simply replaced;
    /// one that exits sooner counts as a failed start (a crash loop backs off like one). Returns the replica and
    /// whether it counted as a failed start; `None` if it is not known.
    pub fn replica_exited(&mut self, replica: &str, failure: StartFailure, now: f64) -> Option<(Replica, bool)> {
        self.tick(now);
        let r = self.replicas.get(replica)?;
        let served_long = r.phase == Phase::Ready && now - r.started_at >= BACKOFF_RESET_S;
        if served_long {
            self.replica_gone(replica).map(|r| (r, false))
        } else {
            self.replica_failed(replica, failure, now).map(|r| (r, true))
        }
    }

    /// Allows a start now for a deployment in backoff (the runtime saw its model file change).
    pub fn retry_now(&mut self, deployment: &str, now: f64) {
        if let Some(d) = self.deployments.get_mut(deployment)
            && d.retry_at > now
        {
            d.retry_at = now;
        }
    }

    /// Why requests for `deployment` cannot be served now: it is in start backoff and no replica of it is ready or
    /// starting. `None` when a request should wait (or be routed) as usual.
    pub fn failing(&self, deployment: &str, now: f64) -> Option<&StartFailure> {
        let d = self.deployments.get(deployment)?;
        let failure = d.failure.as_ref()?;
        if now >= d.retry_at || self.replicas.values().any(|r| r.deployment == deployment) {
            return None;
        }
        Some(failure)
    }

    /// Deployments with a start failure on record (for the runtime to watch their model files).
    pub fn failed_deployments(&self) -> impl Iterator<Item = (&str, &DeploymentSpec, &StartFailure)> {
        self.deployments.iter().filter_map(|(k, d)| d.failure.as_ref().map(|f| (k.as_str(), &d.spec, f)))
    }

    /// A replica failed to start or exited: its slot is freed. Requests routed to it are still counted until
    /// [`Control::finish`].
    pub fn replica_gone(&mut self, replica: &str) -> Option<Replica> {
        let now = self.clock;
        self.close_span(replica, now);
        let r = self.replicas.remove(replica)?;
        self.engine.release(&r.request, &r.placement);
        if let Some(d) = self.deployments.get_mut(&r.deployment) {
            d.replicas = d.replicas.saturating_sub(1);
        }
        Some(r)
    }

    /// A replica by id.
    pub fn replica(&self, replica: &str) -> Option<&Replica> {
        self.replicas.get(replica)
    }

    /// Every replica.
    pub fn replicas(&self) -> impl Iterator<Item = (&str, &Replica)> {
        self.replicas.iter().map(|(k, r)| (k.as_str(), r))
    }

    /// A request arrived for `deployment`: it waits until [`Control::route`] gives it a replica.
    pub fn arrive(&mut self, deployment: &str, now: f64) -> bool {
        self.tick(now);
        let Some(d) = self.deployments.get_mut(deployment) else { return false };
        if d.demand() == 0
            && let Some((since, _)) = d.idle.take()
        {
            d.keep.record_idle(now - since, &mut self.fleet_prior);
        }
        d.waiting += 1;
        d.scaler.observe(now, f64::from(d.demand()));
        true
    }

    /// Routes one waiting request of `deployment` to the least-loaded ready replica with a free slot.
    pub fn route(&mut self, deployment: &str, now: f64) -> Route {
        self.tick(now);
        let Some(d) = self.deployments.get_mut(deployment) else { return Route::Unknown };
        let max = d.spec.max_concurrency.max(1);
        let best = self
            .replicas
            .iter_mut()
            .filter(|(_, r)| r.deployment == deployment && r.phase == Phase::Ready && r.in_flight < max)
            .min_by_key(|(_, r)| r.in_flight);
        let Some((id, r)) = best else { return Route::Wait };
        r.in_flight += 1;
        d.waiting = d.waiting.saturating_sub(1);
        d.in_flight += 1;
        let (id, node) = (id.clone(), r.node.clone());
        self.hold(&id, now, ServerlessPhase::Busy);
        Route::Replica { replica: id, node }
    }

    /// A routed request finished (or failed) on `replica`.
    pub fn finish(&mut self, deployment: &str, replica: &str, now: f64) {
        self.tick(now);
        if let Some(r) = self.replicas.get_mut(replica) {
            r.in_flight = r.in_flight.saturating_sub(1);
            if r.in_flight == 0 && r.phase == Phase::Ready {
                self.hold(replica, now, ServerlessPhase::IdleWarm);
            }
        }
        if let Some(d) = self.deployments.get_mut(deployment) {
            d.in_flight = d.in_flight.saturating_sub(1);
            self.settle(deployment, now);
        }
    }

    /// A waiting request gave up (timed out or was refused) before it was routed.
    pub fn abandon(&mut self, deployment: &str, now: f64) {
        self.tick(now);
        if let Some(d) = self.deployments.get_mut(deployment) {
            d.waiting = d.waiting.saturating_sub(1);
            self.settle(deployment, now);
        }
    }

    /// Records the new concurrency; when the deployment becomes idle, makes the keep-alive plan.
    fn settle(&mut self, deployment: &str, now: f64) {
        let Some(d) = self.deployments.get_mut(deployment) else { return };
        d.scaler.observe(now, f64::from(d.demand()));
        if d.demand() == 0 && d.idle.is_none() {
            let share = gpu_share(d.spec.gpu, self.engine.cluster());
            let costs =
                Costs { copy_lifetime_s: self.copy_lifetime_s, ..costs(&d.spec, share, &self.cold, &self.prices) };
            // On a rental's GPUs that are not lent, idle time until the rental ends is paid for already.
            let paid = d
                .spec
                .rental
                .as_ref()
                .and_then(|k| self.rentals.get(k))
                .filter(|s| !s.rental.spec.lend_when_idle)
                .and_then(|s| s.rental.state.end_ms)
                .map(|end| (end as f64 / 1000.0 - self.wall_offset - now).max(0.0));
            let mut plan = d.keep.plan(&costs, paid, &mut self.fleet_prior);
            plan.unload_after = plan.unload_after.min(d.spec.keep_alive_cap_s.max(paid.unwrap_or(0.0)));
            d.idle = Some((now, plan));
        }
    }

    /// The decisions due at `now`: replicas to start (placed) and to stop.
    pub fn reconcile(&mut self, now: f64) -> Vec<Action> {
        self.tick(now);
        let mut actions = Vec::new();
        // Replicas of deleted deployments (only a removal makes one), on unhealthy GPUs, and on GPUs of a rental
        // they may not use.
        let removed = std::mem::take(&mut self.removed);
        let doomed: Vec<(String, StopReason)> = self
            .replicas
            .iter()
            .filter_map(|(id, r)| {
                if removed && !self.deployments.contains_key(&r.deployment) {
                    return Some((id.clone(), StopReason::Deleted));
                }
                let unhealthy = self.unhealthy.get(&r.node_id).copied().unwrap_or(0);
                if r.placement.gpus & unhealthy != 0 {
                    return Some((id.clone(), StopReason::GpuUnhealthy));
                }
                self.rental_conflict(r).map(|reason| (id.clone(), reason))
            })
            .collect();
        for (id, reason) in doomed {
            if let Some(r) = self.replica_gone(&id) {
                actions.push(Action::Stop { replica: id, deployment: r.deployment, node: r.node, reason });
            }
        }
        // Decide every deployment's count first (no decision depends on another deployment's), then place and stop
        // in key order.
        for (key, change) in self.decide(now) {
            self.carry_out(&key, change, now, &mut actions);
        }
        actions
    }

    /// How many replicas each deployment wants now; the deployments whose count must change, in key order.
    fn decide(&mut self, now: f64) -> Vec<(String, Change)> {
        let mut changes = Vec::new();
        for (key, d) in &mut self.deployments {
            let current = d.replicas;
            let config = *d.scaler.config();
            let max = config.max_replicas.max(config.min_replicas);
            let mut want = d.scaler.desired(now, current);
            if d.waiting > 0 {
                // Requests no replica can take now: enough replicas for all of them, at once.
                want = want.max(d.demand().div_ceil(d.spec.max_concurrency.max(1))).min(max);
            }
            let mut stop_reason = StopReason::ScaledDown;
            if d.demand() == 0 {
                let idle = d.idle.map(|(since, plan)| {
                    let idle_for = now - since;
                    // A pre-warm starts a load early enough to be ready at the predicted arrival.
                    let load_s = self.cold.expected(d.spec.weights_bytes, Tier::HostRam);
                    let prewarm = plan.prewarm.is_some_and(|(ready_at, until)| {
                        idle_for >= (ready_at - load_s).max(plan.unload_after) && idle_for < until
                    });
                    (prewarm, idle_for >= plan.unload_after)
                });
                match idle {
                    // A pre-warm: one replica (the averages may still want more; nothing would use them).
                    Some((true, _)) => want = want.min(current).max(1).max(config.min_replicas),
                    Some((false, true)) => {
                        want = config.min_replicas;
                        stop_reason = StopReason::KeepAliveExpired;
                    }
                    // Idle, within the keep-alive: keep what runs (at least one), never scale to zero yet, and start
                    // nothing: the averages lag behind a demand that is gone, and a start would serve no one (the
                    // next request scales up at once).
                    _ => want = want.min(current).max(current.min(1)).max(config.min_replicas),
                }
            }
            d.desired = want;
            if d.consecutive_failures > 0 {
                let ready = self.replicas.values().any(|r| r.deployment == *key && r.phase == Phase::Ready);
                match (ready, d.healthy_since) {
                    (false, _) => d.healthy_since = None,
                    (true, None) => d.healthy_since = Some(now),
                    (true, Some(since)) if now - since >= BACKOFF_RESET_S => {
                        d.consecutive_failures = 0;
                        d.healthy_since = None;
                    }
                    (true, Some(_)) => {}
                }
            }
            if want > current && now < d.retry_at {
                // In start backoff: no new start yet (what runs keeps running).
                continue;
            }
            if want > current {
                changes.push((key.clone(), Change { current, want, stop_reason }));
            } else {
                d.unschedulable = None;
                if want < current {
                    changes.push((key.clone(), Change { current, want, stop_reason }));
                }
            }
        }
        changes
    }

    /// Starts or stops replicas of `key` to go from `change.current` to `change.want`.
    fn carry_out(&mut self, key: &str, change: Change, now: f64, actions: &mut Vec<Action>) {
        let Change { current, want, stop_reason } = change;
        let Some(d) = self.deployments.get(key) else { return };
        if want > current {
            let spec = d.spec.clone();
            let request = self.request_for(&spec);
            for _ in current..want {
                match self.start(key, &spec, &request, now) {
                    Ok(action) => actions.push(action),
                    Err(reason) => {
                        if let Some(d) = self.deployments.get_mut(key) {
                            d.unschedulable = Some(reason);
                        }
                        return;
                    }
                }
            }
            if let Some(d) = self.deployments.get_mut(key) {
                d.unschedulable = None;
            }
        } else if want < current {
            // Idle replicas only, starting ones first (they serve no one yet), then the newest.
            let mut idle: Vec<(&String, &Replica)> =
                self.replicas.iter().filter(|(_, r)| r.deployment == key && r.in_flight == 0).collect();
            idle.sort_by(|a, b| {
                (a.1.phase == Phase::Ready)
                    .cmp(&(b.1.phase == Phase::Ready))
                    .then(b.1.started_at.total_cmp(&a.1.started_at))
            });
            let chosen: Vec<String> =
                idle.into_iter().take((current - want) as usize).map(|(id, _)| id.clone()).collect();
            for id in chosen {
                if let Some(r) = self.replica_gone(&id) {
                    actions.push(Action::Stop {
                        replica: id,
                        deployment: r.deployment,
                        node: r.node,
                        reason: stop_reason,
                    });
                }
            }
        }
    }

    fn start(
        &mut self,
        key: &str,
        spec: &DeploymentSpec,
        request: &Request,
        now: f64,
    ) -> Result<Action, Unschedulable> {
        let colocated: Vec<NodeId> =
            self.replicas.values().filter(|r| r.deployment == key).map(|r| r.node_id).collect();
        let cached: Vec<CacheHint> = self
            .cached
            .iter()
            .flat_map(|(&node, entries)| {
                entries.iter().filter(|c| c.model_uri == spec.model_uri).map(move |c| CacheHint { node, tier: c.tier })
            })
            .collect();
        let placed = match &spec.rental {
            Some(rental) => self.place_on_rental(rental, spec, request),
            None => {
                self.engine.place_with(request, &Hints { cached: &cached, colocated: &colocated }).map_err(
                    |e| match e {
                        Unplaceable::NoFit => {
                            Unschedulable::NoRoom { needs: describe(spec), shortfall: self.shortfall(request) }
                        }
                        Unplaceable::Impossible(_) if self.nodes.is_empty() => {
                            Unschedulable::NoNodes { needs: describe(spec) }
                        }
                        Unplaceable::Impossible(why) => Unschedulable::Impossible { needs: describe(spec), why },
                    },
                )
            }
        };
        let placement = placed?;
        let node = self.engine.cluster().name(placement.node).to_owned();
        let gpus: Vec<u32> = placement.gpu_indexes().map(|g| g as u32).collect();
        let hit = cached.iter().filter(|h| h.node == placement.node).map(|h| h.tier).min_by_key(|t| match t {
            CacheTier::Gpu(_) => 0,
            CacheTier::HostRam => 1,
            CacheTier::Disk => 2,
        });
        self.next_replica += 1;
        let replica = format!("{}-{:x}", key.replace('/', "."), self.next_replica);
        if let Some(d) = self.deployments.get_mut(key) {
            d.replicas += 1;
        }
        self.replicas.insert(
            replica.clone(),
            Replica {
                deployment: key.to_owned(),
                node: node.clone(),
                gpus: gpus.clone(),
                phase: Phase::Starting,
                in_flight: 0,
                started_at: now,
                rental: spec.rental.clone(),
                held: ServerlessPhase::Loading,
                held_since: now,
                node_id: placement.node,
                request: *request,
                placement,
            },
        );
        Ok(Action::Start {
            replica,
            deployment: key.to_owned(),
            node,
            gpus,
            milli_per_gpu: placement.milli_per_gpu,
            cached: hit,
        })
    }

    /// The keep-alive's current decision for a deployment: `None` while it has requests in flight or waiting (or
    /// is unknown); else since when it has been idle and the plan made then (unload after `unload_after` idle
    /// seconds, a pre-warm at `prewarm`), with the policy that made it.
    pub fn keep_alive(&self, deployment: &str) -> Option<(KeepAlivePolicy, f64, Plan)> {
        let d = self.deployments.get(deployment)?;
        d.idle.map(|(since, plan)| (d.spec.keep_alive, since, plan))
    }

    /// Whether an operator cordoned `node`.
    pub fn is_cordoned(&self, node: &str) -> bool {
        self.cordoned.contains(node)
    }

    /// A deployment's spec, as last upserted.
    pub fn spec(&self, deployment: &str) -> Option<&DeploymentSpec> {
        self.deployments.get(deployment).map(|d| &d.spec)
    }

    /// A deployment's state.
    pub fn status(&self, deployment: &str) -> Option<DeploymentStatus> {
        let d = self.deployments.get(deployment)?;
        let mut status = DeploymentStatus {
            desired: d.desired,
            in_flight: d.in_flight,
            waiting: d.waiting,
            unschedulable: d.unschedulable.clone(),
            failure: d.failure.clone().map(|last| FailureState {
                last,
                consecutive: d.consecutive_failures,
                retry_at: d.retry_at,
            }),
            ..DeploymentStatus::default()
        };
        for r in self.replicas.values().filter(|r| r.deployment == deployment) {
            match r.phase {
                Phase::Starting => status.starting += 1,
                Phase::Ready => status.ready += 1,
            }
        }
        Some(status)
    }

    /// Why the last placement of a replica of `deployment` failed, while replicas are missing (what
    /// [`DeploymentStatus::unschedulable`] says, without counting replicas).
    pub fn unschedulable(&self, deployment: &str) -> Option<&Unschedulable> {
        self.deployments.get(deployment)?.unschedulable.as_ref()
    }

    /// Whether `deployment` has a ready replica with a free slot.
    pub fn has_free_slot(&self, deployment: &str) -> bool {
        let Some(d) = self.deployments.get(deployment) else { return false };
        let max = d.spec.max_concurrency.max(1);
        self.replicas.values().any(|r| r.deployment == deployment && r.phase == Phase::Ready && r.in_flight < max)
    }

    /// GPU allocation of the fleet, milli-GPU: (allocated, capacity).
    pub fn gpu_milli(&self) -> (u64, u64) {
        let c = self.engine.cluster();
        (c.gpu_allocated_milli(), c.gpu_capacity_milli())
    }
}

impl Control {
    /// Which resource keeps `request` off each node, summed over the fleet: "2 node(s) lack free CPU (most free:
    /// 0.5 of the 1 CPU needed), 1 is cordoned or disconnected".
    fn shortfall(&self, request: &Request) -> Shortfall {
        let cluster = self.engine.cluster();
        let mut out = Shortfall {
            nodes: cluster.len() as u32,
            cpu_needed_milli: request.cpu_milli,
            memory_needed_mib: request.memory_mib,
            ..Shortfall::default()
        };
        for id in 0..cluster.len() as NodeId {
            if !self.engine.is_schedulable(id) {
                out.unschedulable += 1;
                continue;
            }
            let node = cluster.node(id);
            let t = cluster.node_type(node.type_id);
            let demand = request.gpu.resolve(t.gpu_memory_mib);
            let wants_gpu = !matches!(demand, Some(GpuDemand::None));
            if demand.is_none() || (wants_gpu && !request.models.contains(t.model)) {
                out.model += 1;
                continue;
            }
            let usable: Vec<u16> = (0..usize::from(t.gpu_count)).map(|i| node.usable(i)).collect();
            let gpu_ok = match demand {
                Some(GpuDemand::Share(m)) => usable.iter().any(|&f| f >= m),
                Some(GpuDemand::Whole(k)) => usable.iter().filter(|&&f| f == 1000).count() >= usize::from(k),
                _ => true,
            };
            out.most_free_gpu_milli = out.most_free_gpu_milli.max(usable.iter().copied().max().unwrap_or(0));
            out.most_free_cpu_milli = out.most_free_cpu_milli.max(node.cpu_free);
            out.most_free_memory_mib = out.most_free_memory_mib.max(node.mem_free);
            out.gpu += u32::from(!gpu_ok);
            out.cpu += u32::from(node.cpu_free < request.cpu_milli);
            out.memory += u32::from(node.mem_free < request.memory_mib);
        }
        out
    }
}

fn cpus(milli: u32) -> String {
    format!("{} CPU", f64::from(milli) / 1000.0)
}

fn describe(spec: &DeploymentSpec) -> String {
    let gpu = match spec.gpu {
        GpuDemand::None => "no GPU".to_owned(),
        GpuDemand::Share(m) => format!("{m} milli-GPU"),
        GpuDemand::Whole(k) => format!("{k} whole GPU(s)"),
        GpuDemand::Memory(mib) => format!("{mib} MiB of GPU memory"),
    };
    let gpu = if spec.gpu_models.is_empty() { gpu } else { format!("{gpu} on {}", spec.gpu_models.join(" or ")) };
    format!("{gpu}, {} and {} MiB of host memory", cpus(spec.cpu_milli), spec.memory_mib)
}

/// The GPUs (fractional for a share) one replica with demand `gpu` holds: a `Memory` demand resolved on the largest
/// GPUs of `cluster` (80 GiB when no node is known).
fn gpu_share(gpu: GpuDemand, cluster: &Cluster) -> f64 {
    let largest = (0..cluster.len() as NodeId)
        .map(|id| cluster.node_type(cluster.node(id).type_id).gpu_memory_mib)
        .max()
        .unwrap_or(80 * 1024);
    match gpu.resolve(largest) {
        Some(GpuDemand::Share(m)) => f64::from(m) / f64::from(MILLI_PER_GPU),
        Some(GpuDemand::Whole(k)) => f64::from(k),
        _ => 0.0,
    }
}

/// The keep-alive's costs for one replica of `spec` holding `gpus` GPUs: its GPU share idle, against a load from
/// host RAM.
fn costs(spec: &DeploymentSpec, gpus: f64, cold: &ColdStartModel, prices: &Prices) -> Costs {
    Costs::for_replica(
        gpus,
        cold.expected(spec.weights_bytes, Tier::HostRam),
        cold.expected(spec.weights_bytes, Tier::Gpu),
        prices.gpu_usd_per_hour / 3600.0,
        prices.wait_usd_per_s,
    )
}

mod held;
#[cfg(test)]
mod rental_tests;
mod rentals;
#[cfg(test)]
mod tests;
