//! The control loop at run time: deployments in, agent commands out, and the gateway's [`Backend`].
//!
//! [`ControlPlane`] owns the pure decision state ([`kiln_core::control::Control`]) behind a mutex and drives it:
//! - [`ControlPlane::apply`] takes the deployments of a spec source (manifest directory or API server);
//! - [`ControlPlane::run`] is the loop: it wakes on a registry event (an agent registered, a replica became ready
//!   or exited, a GPU's health changed), on a request that found no free replica, or every `tick`; it feeds the
//!   events to the core, marks silent agents lost, reconciles, and sends the resulting `StartWorker` /
//!   `StopWorker` commands through the registry;
//! - as the gateway's [`Backend`] it routes each request to the least-loaded ready replica with a free slot, over
//!   the node's `WorkerService`; with none, it holds the request in the deployment's bounded [`HoldQueue`] and wakes
//!   the loop at once, so a request at zero replicas reaches the agent as a `StartWorker` without waiting for a
//!   tick.
//!
//! Start failures: the agent's `WorkerFailed` (and an early `WorkerExited`, or a refused `StartWorker`) go to the
//! core as [`StartFailure`]s, which puts the deployment in backoff; while it is in backoff with nothing ready or
//! starting, held requests are woken and fail with the load error ([`PredictError::SetupFailed`]), and new ones fail
//! at once. When the model is a `file://` path the controller can see, a change of that file (appearing, or new
//! contents) ends the backoff at once, so fixing the file recovers the deployment without touching the spec.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use kiln_core::{
    autoscale::{ScalingConfig, coldstart::ColdStartModel, keepalive},
    control::{Action, Cached, Control, DeploymentSpec, DeploymentStatus, NodeInfo, Prices, Route, StartFailure},
    placement::{CacheTier, GpuDemand, Policy},
};
use kiln_k8s_api::{
    model_deployment::{
        DEFAULT_REPLICA_CPU_MILLI, DEFAULT_REPLICA_MEMORY_BYTES, DeploymentCounters, KeepAlivePolicy, Runtime,
    },
    quantity::{parse_bytes, parse_milli},
};
use kiln_proto::v1::{self, command, model_source, worker_event::Event, worker_service_client::WorkerServiceClient};
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;

use crate::{
    gateway::{Backend, HoldQueue, HoldState, Outcome, PredictError},
    manifests::Deployment,
    metrics::{DeploymentGauges, Metrics, StateSnapshot},
    registry::{Registry, RegistryEvent, succeeded},
};

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Placement policy.
    pub policy: Policy,
    /// Requests held per deployment while no replica has a free slot.
    pub hold_capacity: usize,
    /// Reconcile at least this often.
    pub tick: Duration,
    /// How long an agent has to acknowledge a command.
    pub command_timeout: Duration,
    /// Grace period given to a stopping replica.
    pub stop_grace: Duration,
    /// Prices the adaptive keep-alive weighs.
    pub prices: Prices,
    /// Load-time model (the adaptive keep-alive's cold-start estimate).
    pub cold: ColdStartModel,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Kiln,
            hold_capacity: 256,
            tick: Duration::from_millis(500),
            command_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(30),
            prices: Prices::default(),
            cold: ColdStartModel::default(),
        }
    }
}

/// A deployment as the runtime needs it beyond the core's view.
#[derive(Debug, Clone)]
struct Served {
    version: String,
    source: v1::ModelSource,
    gpu_memory_bytes: u64,
    max_concurrency: u32,
    hold: Arc<HoldQueue>,
    /// After a start failure, the model file as the controller saw it then (`Some(None)`: missing), so that a
    /// change ends the backoff; `None` when nothing failed or the file is not visible here.
    failed_file: Option<Option<FileStamp>>,
}

/// What identifies a version of a file without reading it.
type FileStamp = (std::time::SystemTime, u64);

/// The local path of a `file://` model URI.
fn model_path(uri: &str) -> Option<&std::path::Path> {
    uri.strip_prefix("file://").map(std::path::Path::new)
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A replica's start, for cold-start figures.
#[derive(Debug, Clone)]
struct Starting {
    decided: Instant,
    node: String,
}

/// A finished cold start.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdStartRecord {
    /// Deployment.
    pub deployment: String,
    /// Replica.
    pub replica: String,
    /// Node.
    pub node: String,
    /// From the start decision to ready, seconds.
    pub seconds: f64,
    /// The agent's load phases, ms: fetch, read, host-to-device, init.
    pub phases_ms: [u64; 4],
    /// Where the weights came from.
    pub source: String,
    /// When the replica became ready.
    pub finished_at: std::time::SystemTime,
}

/// The control plane.
#[derive(Debug)]
pub struct ControlPlane {
    core: Mutex<Control>,
    served: Mutex<BTreeMap<String, Served>>,
    starting: Mutex<HashMap<String, Starting>>,
    /// The newest cold start of each deployment (for its status).
    last_cold_start: Mutex<HashMap<String, ColdStartRecord>>,
    clients: Mutex<HashMap<String, WorkerServiceClient<Channel>>>,
    registry: Registry,
    wake: Notify,
    origin: Instant,
    config: ControlConfig,
    commands: std::sync::atomic::AtomicU64,
    metrics: Metrics,
    counters: Mutex<HashMap<String, DeploymentCounters>>,
    /// Where counters are written when they change.
    persister: std::sync::OnceLock<crate::store::Persister>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The core's view of a deployment, and the runtime's: the model source as the agent takes it.
fn translate(d: &Deployment) -> Result<(DeploymentSpec, v1::ModelSource, u64), String> {
    let spec = &d.resource.spec;
    let per_gpu = parse_bytes(&spec.gpu.memory_per_gpu.0).map_err(|e| format!("gpu.memoryPerGpu: {e}"))?;
    let gpu = match spec.gpu.count {
        n if n > 1 => GpuDemand::Whole(u8::try_from(n).map_err(|_| format!("gpu.count {n} is too large"))?),
        _ => GpuDemand::Memory(u32::try_from(per_gpu.div_ceil(1 << 20)).unwrap_or(u32::MAX).max(1)),
    };
    let weights_bytes = match &spec.model.size {
        Some(q) => parse_bytes(&q.0).map_err(|e| format!("model.size: {e}"))?,
        None => per_gpu,
    };
    let s = &spec.scaling;
    let seconds = s.keep_alive.duration.map(|d| std::time::Duration::from(d).as_secs_f64());
    let (keep_alive, cap) = match s.keep_alive.policy {
        KeepAlivePolicy::Fixed => {
            let t = seconds.unwrap_or(300.0);
            (keepalive::Policy::Fixed(t), f64::INFINITY)
        }
        KeepAlivePolicy::Adaptive => {
            (keepalive::Policy::Adaptive(keepalive::AdaptiveConfig::default()), seconds.unwrap_or(f64::INFINITY))
        }
    };
    let target = u32::try_from(s.target_concurrency.max(1)).unwrap_or(1);
    let resources = spec.resources.clone().unwrap_or_default();
    let cpu_milli = match &resources.cpu {
        Some(q) => parse_milli(&q.0).map_err(|e| format!("resources.cpu: {e}"))?,
        None => DEFAULT_REPLICA_CPU_MILLI,
    };
    let memory_bytes = match &resources.memory {
        Some(q) => parse_bytes(&q.0).map_err(|e| format!("resources.memory: {e}"))?,
        None => DEFAULT_REPLICA_MEMORY_BYTES,
    };
    let core = DeploymentSpec {
        cpu_milli: u32::try_from(cpu_milli).map_err(|_| format!("resources.cpu {cpu_milli}m is too large"))?.max(1),
        memory_mib: u32::try_from(memory_bytes.div_ceil(1 << 20))
            .map_err(|_| format!("resources.memory {memory_bytes} bytes is too large"))?,
        gpu,
        gpu_models: spec.gpu.models.clone(),
        scaling: ScalingConfig {
            target_concurrency: f64::from(target),
            min_replicas: u32::try_from(s.min_replicas.max(0)).unwrap_or(0),
            max_replicas: u32::try_from(s.max_replicas.max(1)).unwrap_or(1),
            ..ScalingConfig::default()
        },
        keep_alive,
        keep_alive_cap_s: cap,
        model_uri: spec.model.uri.clone(),
        weights_bytes,
        max_concurrency: target,
    };
    let runtime = match (spec.model.runtime, &spec.model.process) {
        (Runtime::Native, _) => model_source::Runtime::Native(v1::NativeRuntime { copy_streams: 4 }),
        (Runtime::Process, Some(p)) => model_source::Runtime::Process(v1::ProcessRuntime {
            command: p.command.clone(),
            args: p.args.clone(),
            env: p.env.iter().map(|e| (e.name.clone(), e.value.clone())).collect(),
            port: u32::try_from(p.port).unwrap_or(0),
            readiness_path: p.readiness_path.clone(),
            startup_timeout_ms: std::time::Duration::from(p.startup_timeout).as_millis() as u32,
            termination_grace_ms: 10_000,
        }),
        (Runtime::Process, None) => return Err("runtime process needs model.process".into()),
    };
    let source = v1::ModelSource {
        uri: spec.model.uri.clone(),
        size_bytes: weights_bytes,
        digest: String::new(),
        runtime: Some(runtime),
    };
    Ok((core, source, per_gpu))
}

fn node_info(n: &crate::registry::NodeView) -> NodeInfo {
    let mib = |b: u64| u32::try_from(b >> 20).unwrap_or(u32::MAX);
    NodeInfo {
        name: n.name.clone(),
        // An agent that does not say gets room for 64 replicas' CPU and memory: GPUs are what is scarce.
        cpu_milli: if n.cpu_milli == 0 { 64_000 } else { u32::try_from(n.cpu_milli).unwrap_or(u32::MAX) },
        memory_mib: if n.host_memory_bytes == 0 { 64 * 1024 } else { mib(n.host_memory_bytes) },
        gpu_model: n.gpus.first().map(|g| g.model.clone()).unwrap_or_default(),
        gpu_memory_mib: n.gpus.first().map_or(0, |g| mib(g.memory_bytes)),
        gpu_healthy: n.gpus.iter().map(|g| g.health != v1::GpuHealth::Unhealthy).collect(),
        labels: n.labels.clone(),
    }
}

fn cached_of(n: &crate::registry::NodeView) -> Vec<Cached> {
    n.cached
        .iter()
        .filter_map(|m| {
            let tier = match m.tier() {
                v1::CacheTier::Gpu => CacheTier::Gpu(m.gpu_index.map_or(0, |g| 1u16.checked_shl(g).unwrap_or(0))),
                v1::CacheTier::Host => CacheTier::HostRam,
                v1::CacheTier::Disk => CacheTier::Disk,
                _ => return None,
            };
            Some(Cached { model_uri: m.model_uri.clone(), tier })
        })
        .collect()
}

impl ControlPlane {
    /// A control plane commanding agents through `registry`.
    pub fn new(registry: Registry, config: ControlConfig) -> Arc<Self> {
        Arc::new(Self {
            core: Mutex::new(Control::new(config.policy, config.cold.clone(), config.prices)),
            served: Mutex::new(BTreeMap::new()),
            starting: Mutex::new(HashMap::new()),
            last_cold_start: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            registry,
            wake: Notify::new(),
            origin: Instant::now(),
            config,
            commands: std::sync::atomic::AtomicU64::new(0),
            metrics: Metrics::new(),
            counters: Mutex::new(HashMap::new()),
            persister: std::sync::OnceLock::new(),
        })
    }

    /// Takes the counters read back from the store (they go on counting from there) and the writer they go to
    /// from now on. Call it once, before serving.
    pub fn restore_counters(
        &self,
        counters: impl IntoIterator<Item = (String, DeploymentCounters)>,
        persister: crate::store::Persister,
    ) {
        lock(&self.counters).extend(counters);
        let _ = self.persister.set(persister);
    }

    /// Seconds on the control loop's clock (the time the core's decisions use).
    pub(crate) fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// Takes the deployments of the spec source: new ones are added, changed ones updated, missing ones removed
    /// (their replicas stop). Returns the deployments that could not be translated, with why.
    pub fn apply<'a>(&self, deployments: impl IntoIterator<Item = &'a Deployment>) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        let mut seen = Vec::new();
        for d in deployments {
            seen.push(d.key());
            if let Err(e) = self.upsert(d) {
                errors.push((d.key(), e));
            }
        }
        let gone: Vec<String> = lock(&self.served).keys().filter(|k| !seen.contains(k)).cloned().collect();
        for key in gone {
            self.remove(&key);
        }
        errors
    }

    /// Adds or updates one deployment; an error says why its spec cannot be served (it is then not served, and
    /// an earlier valid version of it is removed).
    pub fn upsert(&self, d: &Deployment) -> Result<(), String> {
        let key = d.key();
        let translated = translate(d);
        let mut core = lock(&self.core);
        let mut served = lock(&self.served);
        match translated {
            Ok((spec, source, gpu_memory_bytes)) => {
                let max_concurrency = spec.max_concurrency;
                core.upsert_deployment(&key, spec, self.now());
                let hold = served
                    .get(&key)
                    .map(|s| Arc::clone(&s.hold))
                    .unwrap_or_else(|| Arc::new(HoldQueue::new(self.config.hold_capacity)));
                served.insert(
                    key,
                    Served {
                        version: d.version.clone(),
                        source,
                        gpu_memory_bytes,
                        max_concurrency,
                        hold,
                        failed_file: None,
                    },
                );
                drop((core, served));
                self.wake.notify_one();
                Ok(())
            }
            Err(e) => {
                core.remove_deployment(&key);
                served.remove(&key);
                Err(e)
            }
        }
    }

    /// Removes a deployment: its replicas stop.
    pub fn remove(&self, key: &str) {
        lock(&self.core).remove_deployment(key);
        lock(&self.served).remove(key);
        if lock(&self.counters).remove(key).is_some()
            && let Some(p) = self.persister.get()
        {
            p.counters(key.to_owned(), None);
        }
        lock(&self.last_cold_start).remove(key);
        self.wake.notify_one();
    }

    /// What the status of `key` shows, `None` if it is not served.
    pub fn view(&self, key: &str) -> Option<crate::k8s::status::DeploymentView> {
        let status = self.status(key)?;
        let placements = self
            .replicas()
            .into_iter()
            .filter(|r| r.1 == key)
            .map(|(id, _, node, gpus, ready)| (id, node, gpus, ready))
            .collect();
        let counters = lock(&self.counters).get(key).cloned().unwrap_or_default();
        let last_cold_start = lock(&self.last_cold_start)
            .get(key)
            .map(|c| (c.clone(), k8s_openapi::jiff::Timestamp::try_from(c.finished_at).unwrap_or_default()));
        Some(crate::k8s::status::DeploymentView {
            desired: status.desired,
            loading: status.starting,
            ready: status.ready,
            unschedulable: status.unschedulable.map(|u| u.to_string()),
            failure: status.failure.map(|f| (f.last.reason, f.last.message)),
            placements,
            last_cold_start,
            counters,
            invalid: None,
        })
    }

    /// A deployment's counters (totals since it was created, across restarts).
    pub fn counters(&self, key: &str) -> DeploymentCounters {
        lock(&self.counters).get(key).cloned().unwrap_or_default()
    }

    fn count(&self, key: &str, f: impl FnOnce(&mut DeploymentCounters)) {
        let mut counters = lock(&self.counters);
        let c = counters.entry(key.to_owned()).or_default();
        f(c);
        if let Some(p) = self.persister.get() {
            p.counters(key.to_owned(), Some(c.clone()));
        }
    }

    /// A deployment's state, `None` if unknown.
    pub fn status(&self, deployment: &str) -> Option<DeploymentStatus> {
        lock(&self.core).status(deployment)
    }

    /// Every deployment's state.
    pub fn statuses(&self) -> Vec<(String, DeploymentStatus)> {
        let core = lock(&self.core);
        core.deployments().filter_map(|k| core.status(k).map(|s| (k.to_owned(), s))).collect()
    }

    /// Replicas: (id, deployment, node, GPUs, ready).
    pub fn replicas(&self) -> Vec<(String, String, String, Vec<u32>, bool)> {
        lock(&self.core)
            .replicas()
            .map(|(id, r)| {
                (
                    id.to_owned(),
                    r.deployment.clone(),
                    r.node.clone(),
                    r.gpus.clone(),
                    r.phase == kiln_core::control::Phase::Ready,
                )
            })
            .collect()
    }

    /// GPU allocation, milli-GPU: (allocated, capacity).
    pub fn gpu_milli(&self) -> (u64, u64) {
        lock(&self.core).gpu_milli()
    }

    /// Cordons or uncordons a node (`GpuNode.spec.unschedulable`).
    pub fn set_cordoned(&self, node: &str, cordoned: bool) {
        lock(&self.core).set_cordoned(node, cordoned);
        self.wake.notify_one();
    }

    /// Wakes the loop now.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// The loop; returns when `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let changed = self.registry.changed();
        loop {
            self.step();
            tokio::select! {
                () = self.wake.notified() => {}
                () = changed.notified() => {}
                () = tokio::time::sleep(self.config.tick) => {}
                _ = stop.changed() => {
                    if *stop.borrow() { return; }
                }
            }
        }
    }

    /// One pass: events in, silent agents lost, reconcile, commands out.
    pub fn step(self: &Arc<Self>) {
        let began = Instant::now();
        let events = self.registry.take_events();
        let lost = self.registry.sweep();
        let changed_files = self.changed_model_files();
        let now = self.now();
        let mut actions = Vec::new();
        {
            let mut core = lock(&self.core);
            for event in events {
                self.absorb(&mut core, event, now, &mut actions);
            }
            for key in &changed_files {
                core.retry_now(key, now);
            }
            for node in lost {
                let gone = core.node_lost(&node);
                tracing::warn!(%node, replicas = gone.len(), "agent lost; its replicas will be placed elsewhere");
                let mut starting = lock(&self.starting);
                for r in gone {
                    starting.remove(&r);
                }
            }
            actions.extend(core.reconcile(now));
            self.refresh_holds(&core, now);
        }
        let decided = Instant::now();
        for action in actions {
            if let Action::Start { replica, node, .. } = &action {
                lock(&self.starting).insert(replica.clone(), Starting { decided, node: node.clone() });
            }
            self.execute(action);
        }
        self.metrics.scheduling(began.elapsed().as_secs_f64());
    }

    /// The metrics page, with the gauges read now.
    pub fn metrics_text(&self) -> String {
        let mut state = StateSnapshot::default();
        for (name, s) in self.statuses() {
            state.deployments.push(DeploymentGauges {
                name,
                desired: s.desired,
                loading: s.starting,
                ready: s.ready,
                waiting: s.waiting,
                in_flight: s.in_flight,
            });
        }
        let (mut healthy, mut degraded, mut unhealthy, mut lost) = (0, 0, 0, 0);
        for n in self.registry.nodes() {
            if n.ready {
                state.nodes.0 += 1;
            } else {
                state.nodes.1 += 1;
            }
            for g in &n.gpus {
                match (n.ready, g.health) {
                    (false, _) => lost += 1,
                    (true, v1::GpuHealth::Unhealthy) => unhealthy += 1,
                    (true, v1::GpuHealth::Degraded) => degraded += 1,
                    (true, _) => healthy += 1,
                }
            }
        }
        state.gpus = vec![("healthy", healthy), ("degraded", degraded), ("unhealthy", unhealthy), ("lost", lost)];
        let (allocated, capacity) = self.gpu_milli();
        state.gpu_allocated_ratio = if capacity == 0 { 0.0 } else { allocated as f64 / capacity as f64 };
        self.metrics.set_state(&state);
        self.metrics.render()
    }

    /// The deployments whose model file changed since their last failed start (the files are looked at with no
    /// lock held).
    fn changed_model_files(&self) -> Vec<String> {
        let watched: Vec<(String, std::path::PathBuf, Option<FileStamp>)> = lock(&self.served)
            .iter()
            .filter_map(|(key, s)| {
                let before = s.failed_file?;
                Some((key.clone(), model_path(&s.source.uri)?.to_path_buf(), before))
            })
            .collect();
        let changed: Vec<(String, Option<FileStamp>)> = watched
            .into_iter()
            .filter(|(_, path, before)| stamp(path) != *before)
            .map(|(key, path, before)| {
                tracing::info!(deployment = %key, path = %path.display(), "model file changed; retrying now");
                (key, before)
            })
            .collect();
        let mut served = lock(&self.served);
        for (key, before) in &changed {
            // Unless a new failure recorded the file again meanwhile.
            if let Some(s) = served.get_mut(key)
                && s.failed_file == Some(*before)
            {
                s.failed_file = None;
            }
        }
        changed.into_iter().map(|(key, _)| key).collect()
    }

    /// Records a failed start: the core's backoff, metrics, counters, and the model file to watch.
    fn start_failed(&self, core: &mut Control, replica: &str, failure: StartFailure, now: f64, exited: bool) {
        let reason = failure.reason.clone();
        let gone = if exited {
            core.replica_exited(replica, failure, now)
        } else {
            core.replica_failed(replica, failure, now).map(|r| (r, true))
        };
        lock(&self.starting).remove(replica);
        // An exit after a long time serving is not a failure: the core just replaces it.
        let Some((r, true)) = gone else { return };
        self.metrics.failed_start(&r.deployment, &reason);
        self.count(&r.deployment, |c| c.failed_starts += 1);
        if let Some(s) = lock(&self.served).get_mut(&r.deployment) {
            s.failed_file = model_path(&s.source.uri).map(stamp);
        }
    }

    fn absorb(&self, core: &mut Control, event: RegistryEvent, now: f64, actions: &mut Vec<Action>) {
        match event {
            RegistryEvent::Registered { node, running } => {
                let Some(view) = self.registry.node(&node) else { return };
                match core.node_up(&node_info(&view), &running) {
                    Ok(stops) => actions.extend(stops),
                    Err(e) => tracing::error!(%node, error = %e, "node not usable"),
                }
                core.set_cached(&node, cached_of(&view));
            }
            RegistryEvent::Disconnected { node } => {
                tracing::warn!(%node, "agent disconnected; no new work there until it returns");
                core.node_down(&node);
            }
            RegistryEvent::Cache { node } => {
                if let Some(view) = self.registry.node(&node) {
                    core.set_cached(&node, cached_of(&view));
                }
            }
            RegistryEvent::GpuHealth { node, gpu, health } => {
                core.gpu_health(&node, gpu, health != v1::GpuHealth::Unhealthy);
            }
            RegistryEvent::Worker { node, event } => match event.event {
                Some(Event::Ready(ready)) => {
                    if let Some(deployment) = core.replica_ready(&event.replica_id).map(str::to_owned) {
                        let started = lock(&self.starting).remove(&event.replica_id);
                        if let Some(s) = started {
                            let t = ready.timings.unwrap_or_default();
                            let source = v1::CacheTier::try_from(ready.source_tier)
                                .map(|t| t.as_str_name().trim_start_matches("CACHE_TIER_").to_lowercase())
                                .unwrap_or_default();
                            let record = ColdStartRecord {
                                deployment,
                                replica: event.replica_id.clone(),
                                node: s.node,
                                seconds: s.decided.elapsed().as_secs_f64(),
                                phases_ms: [t.fetch_ms, t.read_ms, t.host_to_device_ms, t.init_ms],
                                source,
                                finished_at: std::time::SystemTime::now(),
                            };
                            self.count(&record.deployment, |c| c.cold_starts += 1);
                            tracing::info!(replica = %record.replica, node = %record.node,
                                seconds = record.seconds, "replica ready");
                            self.metrics.cold_start(
                                &record.deployment,
                                &record.source,
                                record.seconds,
                                record.phases_ms,
                            );
                            lock(&self.last_cold_start).insert(record.deployment.clone(), record);
                        }
                    }
                }
                Some(Event::Failed(f)) => {
                    tracing::warn!(%node, replica = %event.replica_id, reason = %f.reason, message = %f.message,
                        retryable = f.retryable, "replica failed to start");
                    let failure = StartFailure { reason: f.reason, message: f.message, retryable: f.retryable };
                    self.start_failed(core, &event.replica_id, failure, now, false);
                }
                Some(Event::Exited(e)) => {
                    let how = match (e.signal, e.exit_code) {
                        (0, code) => format!("exit code {code}"),
                        (signal, _) => format!("signal {signal}"),
                    };
                    let message = if e.message.is_empty() {
                        format!("the replica exited ({how})")
                    } else {
                        format!("the replica exited ({how}): {}", e.message)
                    };
                    if core.replica(&event.replica_id).is_some() {
                        tracing::warn!(%node, replica = %event.replica_id, %message, "replica exited on its own");
                    }
                    let failure = StartFailure { reason: "Exited".into(), message, retryable: true };
                    self.start_failed(core, &event.replica_id, failure, now, true);
                }
                Some(Event::Loading(_)) | None => {}
            },
        }
    }

    /// Each deployment's hold queue is "ready" while a ready replica has a free slot, and "failed" while its
    /// starts fail and nothing is ready or starting.
    fn refresh_holds(&self, core: &Control, now: f64) {
        for (key, s) in lock(&self.served).iter() {
            let state = if core.has_free_slot(key) {
                HoldState::Ready
            } else if core.failing(key, now).is_some() {
                HoldState::Failed
            } else {
                HoldState::Waiting
            };
            s.hold.set_state(state);
        }
    }

    fn execute(self: &Arc<Self>, action: Action) {
        let id = format!("cmd-{}", self.commands.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        let (node, body, replica) = match &action {
            Action::Start { replica, deployment, node, gpus, .. } => {
                let Some(served) = lock(&self.served).get(deployment).cloned() else { return };
                let uuids = self
                    .registry
                    .node(node)
                    .map(|n| {
                        gpus.iter()
                            .filter_map(|g| n.gpus.iter().find(|x| x.index == *g).map(|x| x.uuid.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let start = v1::StartWorker {
                    replica_id: replica.clone(),
                    deployment: deployment.clone(),
                    generation: 0,
                    model: Some(served.source.clone()),
                    gpu_indexes: gpus.clone(),
                    gpu_uuids: uuids,
                    gpu_memory_bytes: served.gpu_memory_bytes,
                    max_concurrency: served.max_concurrency,
                };
                tracing::info!(%replica, %node, ?gpus, "starting replica");
                (node.clone(), command::Action::StartWorker(start), Some(replica.clone()))
            }
            Action::Stop { replica, node, reason, .. } => {
                tracing::info!(%replica, %node, ?reason, "stopping replica");
                let stop = v1::StopWorker {
                    replica_id: replica.clone(),
                    grace_period_ms: self.config.stop_grace.as_millis() as u32,
                    keep_weights_resident: true,
                };
                (node.clone(), command::Action::StopWorker(stop), None)
            }
        };
        let command = v1::Command { command_id: id, deadline: None, action: Some(body) };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let result = this.registry.command(&node, command, this.config.command_timeout).await;
            let failed = match result {
                Ok(ack) if succeeded(&ack) => None,
                Ok(ack) => Some(("StartRefused", format!("the agent refused: {}", ack.message))),
                Err(e) => Some(("AgentUnreachable", e.to_string())),
            };
            if let (Some((reason, message)), Some(replica)) = (failed, replica) {
                tracing::warn!(%replica, %node, %reason, error = %message, "start failed");
                let failure = StartFailure { reason: reason.into(), message, retryable: true };
                let now = this.now();
                this.start_failed(&mut lock(&this.core), &replica, failure, now, false);
                this.wake.notify_one();
            }
        });
    }

    fn client(&self, node: &str) -> Result<WorkerServiceClient<Channel>, PredictError> {
        let endpoint = self
            .registry
            .node(node)
            .map(|n| n.worker_endpoint)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| PredictError::Failed(format!("node {node} has no worker endpoint")))?;
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(&endpoint) {
            return Ok(c.clone());
        }
        let url = if endpoint.contains("://") { endpoint.clone() } else { format!("http://{endpoint}") };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| PredictError::Failed(format!("bad worker endpoint {endpoint}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let client = WorkerServiceClient::new(channel);
        clients.insert(endpoint, client.clone());
        Ok(client)
    }

    /// Releases a routed request's slot and wakes a held request if one is now free.
    fn finish(&self, deployment: &str, replica: &str) {
        let now = self.now();
        let mut core = lock(&self.core);
        core.finish(deployment, replica, now);
        if let Some(s) = lock(&self.served).get(deployment) {
            s.hold.set_ready(core.has_free_slot(deployment));
        }
    }
}

/// The output of a worker's answer: its `output` field when it has one.
fn output_of(bytes: &[u8]) -> Result<Value, PredictError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| PredictError::Failed(format!("the replica answered something that is not JSON: {e}")))?;
    Ok(match value {
        Value::Object(mut o) if o.contains_key("output") => o.remove("output").unwrap_or(Value::Null),
        other => other,
    })
}

impl Backend for Arc<ControlPlane> {
    fn version(&self, deployment: &str) -> Option<String> {
        lock(&self.served).get(deployment).map(|s| s.version.clone())
    }

    async fn predict(&self, deployment: &str, input: Value, hold: Duration) -> Result<Outcome, PredictError> {
        let arrived = Instant::now();
        let result = self.run_prediction(deployment, input, hold).await;
        let outcome = match &result {
            Ok(_) => "succeeded",
            Err(PredictError::Invalid(_)) => "invalid",
            Err(PredictError::SetupFailed { .. }) => "setup_failed",
            Err(PredictError::Overloaded { .. }) => "overloaded",
            Err(PredictError::ColdStartTimeout { .. }) => "cold_start_timeout",
            Err(PredictError::Failed(_)) => "failed",
        };
        self.metrics.request(deployment, outcome, arrived.elapsed().as_secs_f64());
        self.count(deployment, |c| {
            c.requests += 1;
            if result.is_err() {
                c.failed_requests += 1;
            }
        });
        result
    }
}

impl ControlPlane {
    async fn run_prediction(
        self: &Arc<Self>,
        deployment: &str,
        input: Value,
        hold: Duration,
    ) -> Result<Outcome, PredictError> {
        let arrived = Instant::now();
        let Some(queue) = lock(&self.served).get(deployment).map(|s| Arc::clone(&s.hold)) else {
            return Err(PredictError::Failed(format!("deployment {deployment} was removed")));
        };
        if !lock(&self.core).arrive(deployment, self.now()) {
            return Err(PredictError::Failed(format!("deployment {deployment} was removed")));
        }
        let body = serde_json::json!({ "input": input }).to_string().into_bytes();
        let mut cold = false;
        let mut attempts = 0;
        loop {
            let route = {
                let mut core = lock(&self.core);
                let route = core.route(deployment);
                if route == Route::Wait {
                    let now = self.now();
                    if let Some(f) = core.failing(deployment, now) {
                        let error = PredictError::SetupFailed {
                            deployment: deployment.to_owned(),
                            reason: f.reason.clone(),
                            message: f.message.clone(),
                        };
                        core.abandon(deployment, now);
                        return Err(error);
                    }
                    cold |= core.status(deployment).is_some_and(|s| s.ready == 0);
                    queue.set_state(HoldState::Waiting);
                }
                route
            };
            let (replica, node) = match route {
                Route::Replica { replica, node } => (replica, node),
                Route::Unknown => return Err(PredictError::Failed(format!("deployment {deployment} was removed"))),
                Route::Wait => {
                    self.wake.notify_one();
                    let left = hold.saturating_sub(arrived.elapsed());
                    match queue.wait(left).await {
                        Ok(_) => continue,
                        Err(full) => {
                            lock(&self.core).abandon(deployment, self.now());
                            return Err(match full {
                                None => {
                                    PredictError::Overloaded { deployment: deployment.to_owned(), retry_after_s: 1 }
                                }
                                Some(waited) => PredictError::ColdStartTimeout {
                                    deployment: deployment.to_owned(),
                                    waited_s: waited.as_secs(),
                                },
                            });
                        }
                    }
                }
            };
            let queue_time = arrived.elapsed().as_secs_f64();
            let mut client = match self.client(&node) {
                Ok(c) => c,
                Err(e) => {
                    self.finish(deployment, &replica);
                    return Err(e);
                }
            };
            let request = v1::PredictRequest {
                prediction_id: String::new(),
                replica_id: replica.clone(),
                input: body.clone(),
                content_type: "application/json".into(),
                metadata: HashMap::new(),
            };
            let sent = Instant::now();
            let answer = client.predict(request).await;
            // The round trip to the replica: the model's time plus one loopback or LAN hop.
            let predict_time = sent.elapsed().as_secs_f64();
            self.finish(deployment, &replica);
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    return Ok(Outcome {
                        output: output_of(&r.output)?,
                        predict_time,
                        queue_time,
                        cold_start: cold.then_some(queue_time),
                    });
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(PredictError::Invalid(s.message().to_owned()));
                }
                // The replica is full (a race with another gateway) or unreachable (its agent died, or it is no
                // longer there): an unreachable one is given up and stopped (a no-op if its node is gone), and the
                // request is routed again, to another replica or held for a replacement.
                Err(s)
                    if attempts < 2
                        && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted) =>
                {
                    attempts += 1;
                    tracing::warn!(%replica, %node, error = %s.message(), "replica unreachable; routing again");
                    if s.code() == tonic::Code::Unavailable {
                        let gone = lock(&self.core).replica_gone(&replica);
                        if let Some(r) = gone {
                            self.execute(Action::Stop {
                                replica: replica.clone(),
                                deployment: r.deployment,
                                node: r.node,
                                reason: kiln_core::control::StopReason::Unreachable,
                            });
                        }
                    }
                    lock(&self.core).arrive(deployment, self.now());
                    self.wake.notify_one();
                }
                Err(s) => return Err(PredictError::Failed(format!("replica {replica}: {}", s.message()))),
            }
        }
    }
}
