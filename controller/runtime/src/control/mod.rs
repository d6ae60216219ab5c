//! The control loop at run time: served specs in, agent commands out, and the gateway's
//! [`Backend`](crate::gateway::Backend).
//!
//! [`ControlPlane`] owns the pure decision state ([`kiln_core::control::Control`]) and drives it:
//! - [`ControlPlane::apply`], [`ControlPlane::upsert`], [`ControlPlane::withdraw`] and [`ControlPlane::remove`]
//!   take the deployments of a spec source, already translated into [`ServedSpec`]s at the spec port
//!   ([`crate::spec`]): the control plane knows nothing of manifests or of the Kubernetes API;
//! - [`ControlPlane::run`] is the loop: it wakes on a registry event (an agent registered, a replica became ready
//!   or exited, a GPU's health changed), on a request that found no free replica, or every `tick`; it feeds the
//!   events to the core, marks silent agents lost, reconciles, and sends the resulting `StartWorker` /
//!   `StopWorker` commands through the registry (`commands`);
//! - as the gateway's `Backend` (`routing`) it routes each request to the least-loaded ready replica with a
//!   free slot, over the node's `WorkerService`; with none, it holds the request in the deployment's bounded
//!   [`HoldQueue`] and wakes the loop at once, so a request at zero replicas reaches the agent as a `StartWorker`
//!   without waiting for a tick;
//! - it produces what the status of a deployment shows (`view`: [`DeploymentView`], [`ReplicaView`]).
//!
//! Start failures: the agent's `WorkerFailed` (and an early `WorkerExited`, or a refused `StartWorker`) go to the
//! core as [`StartFailure`]s, which puts the deployment in backoff; while it is in backoff with nothing ready or
//! starting, held requests are woken and fail with the load error ([`crate::gateway::PredictError::SetupFailed`]),
//! and new ones fail at once. When the model is a `file://` path the controller can see, a change of that file
//! (appearing, or new contents) ends the backoff at once, so fixing the file recovers the deployment without
//! touching the spec.
//!
//! # Locking
//!
//! Everything the loop and the request path share — the core, the served specs with their hold queues, the
//! replicas starting, the last cold starts, the counters and the worker clients — is one `State` behind one
//! `std::sync::Mutex`, taken through `ControlPlane::state`. One lock rather than one task owning the state: the
//! request path asks the core synchronously several times per prediction (arrive, route, finish), and a round trip
//! through a task's channel would cost more than the short critical sections it replaces; none of them does I/O.
//! The rules:
//! - the lock is never held across an `.await` (clippy's `await_holding_lock` checks it) nor while a file is read
//!   (model files are stat'ed with it released, [`ControlPlane::step`]);
//! - while it is held, only leaf locks may be taken: the registry's (it never calls back into the control plane),
//!   a [`HoldQueue`]'s count, the metrics' families and the store's queue (a channel send). Nothing that holds one
//!   of those takes the state lock;
//! - commands go out on tasks of their own, which take the lock again only to record a failed start.

mod commands;
mod http1;
mod rentals;
mod routing;
mod view;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard, atomic::AtomicU64},
    time::{Duration, Instant},
};

use kiln_core::{
    autoscale::coldstart::ColdStartModel,
    billing::{BillingError, ReplicaInterval, meter::LentInterval},
    control::{Action, Control, DeploymentStatus, HeldSpan, NodeInfo, Phase, Prices, StartFailure},
    placement::Policy,
};
use kiln_proto::{
    convert,
    v1::{self, worker_event::Event},
};
use tokio::sync::{Notify, watch};

pub(crate) use self::rentals::wall_now;
use self::routing::WorkerClients;
pub use self::{
    http1::WorkerHttp,
    rentals::{AssignedGpuView, RentalStatusView, ServedRental, lifecycle_from_json, lifecycle_to_json, phase_name},
    routing::{Held, HoldQueue, HoldState},
    view::{ColdStartRecord, DeploymentView, KeepAliveView, ReplicaView},
};
use crate::{
    billing::{Billing, CLOSE_LAG_S},
    metrics::{DeploymentGauges, Metrics, StateSnapshot},
    registry::{Registry, RegistryEvent},
    spec::ServedSpec,
    store::{Counters, Persister},
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
    /// How long a serverless replica on a lent rented GPU gets to finish when the owner takes the GPU back.
    pub reclaim_notice: Duration,
    /// How long after start-up every node is expected to have registered: until then a Pending rental waits
    /// instead of failing for a GPU model the fleet may still report.
    pub rental_settle: Duration,
    /// Rental lifecycle settings (fence lead, expiry warning, stop grace, longest rental).
    pub rentals: kiln_core::rental::RentalConfig,
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
            reclaim_notice: Duration::from_secs(30),
            rental_settle: Duration::from_secs(15),
            rentals: kiln_core::rental::RentalConfig::default(),
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

/// The state the loop and the request path share, behind the control plane's one lock (see the module docs).
#[derive(Debug)]
struct State {
    /// The decisions.
    core: Control,
    /// The served deployments by key.
    served: BTreeMap<String, Served>,
    /// Replicas started and not yet ready, by id.
    starting: HashMap<String, Starting>,
    /// The newest cold start of each deployment (for its status).
    last_cold_start: HashMap<String, ColdStartRecord>,
    /// Each deployment's counters.
    counters: HashMap<String, Counters>,
    /// Where counters are written when they change (set once, before serving).
    persister: Option<Persister>,
    /// The nodes' `WorkerService` clients.
    clients: WorkerClients,
    /// Rental lifecycle events not yet taken by a status writer (bounded).
    rental_events: Vec<(String, kiln_core::rental::RentalEvent)>,
    /// Each rental's bill as last appended: (GPU-hours billed, credit spans, phase).
    rental_billed: HashMap<String, (i64, usize, kiln_core::rental::RentalPhase)>,
    /// Forgotten rentals whose last bill could not be appended: offered again every pass.
    rental_unbilled: Vec<kiln_core::rental::Rental>,
    /// The last error appending each rental's bill (logged once until it changes or succeeds).
    rental_bill_errors: HashMap<String, String>,
    /// Milli-GPU held by each replica this process started (from its `Start` action), for per-prediction figures.
    shares: HashMap<String, u32>,
}

impl State {
    /// Changes a deployment's counters and queues them for the store.
    fn count(&mut self, key: &str, f: impl FnOnce(&mut Counters)) {
        let c = self.counters.entry(key.to_owned()).or_default();
        f(c);
        if let Some(p) = &self.persister {
            p.counters(key.to_owned(), Some(c.clone()));
        }
    }

    /// The replicas, as shown.
    fn replicas(&self) -> impl Iterator<Item = ReplicaView> + '_ {
        self.core.replicas().map(|(id, r)| ReplicaView {
            id: id.to_owned(),
            deployment: r.deployment.clone(),
            node: r.node.clone(),
            gpus: r.gpus.clone(),
            ready: r.phase == Phase::Ready,
        })
    }

    /// Each deployment's hold queue is "ready" while a ready replica has a free slot, and "failed" while its
    /// starts fail and nothing is ready or starting.
    fn refresh_holds(&self, now: f64) {
        for (key, s) in &self.served {
            let state = if self.core.has_free_slot(key) {
                HoldState::Ready
            } else if self.core.failing(key, now).is_some() {
                HoldState::Failed
            } else {
                HoldState::Waiting
            };
            s.hold.set_state(state);
        }
    }
}

/// The control plane.
#[derive(Debug)]
pub struct ControlPlane {
    state: Mutex<State>,
    registry: Registry,
    wake: Notify,
    origin: Instant,
    config: ControlConfig,
    /// Command ids handed out.
    commands: AtomicU64,
    metrics: Metrics,
    /// Where GPU holding is metered (set once, before serving; unset: billing off).
    billing: std::sync::OnceLock<Arc<Billing>>,
    /// Seconds since the Unix epoch at `origin`: the loop's clock to the ledger's.
    origin_epoch: f64,
}

/// What the meter takes of a span of GPU holding (times through `epoch`, the loop's clock to the Unix epoch's):
/// the serverless interval billed to the deployment's namespace — none for a replica pinned to a rental, whose
/// hours are paid — and, for a replica on a GPU lent by a rental, the interval credited to the rental's owner.
fn metered(span: &HeldSpan, epoch: impl Fn(f64) -> f64) -> (Option<ReplicaInterval>, Option<LentInterval>) {
    let (namespace, deployment) = span.deployment.split_once('/').unwrap_or(("", span.deployment.as_str()));
    let (from, to) = (epoch(span.from), epoch(span.to));
    let serverless = span.rental.is_none().then(|| ReplicaInterval {
        replica: span.replica.clone(),
        deployment: deployment.to_owned(),
        namespace: namespace.to_owned(),
        gpu_model: span.gpu_model.clone(),
        share_milli: span.share_milli,
        phase: span.phase,
        from,
        to,
    });
    let lent = span.lent_from.as_deref().map(|key| {
        let (owner, rental) = key.split_once('/').unwrap_or(("", key));
        LentInterval {
            namespace: owner.to_owned(),
            rental: rental.to_owned(),
            gpu_model: span.gpu_model.clone(),
            share_milli: span.share_milli,
            from,
            to,
        }
    });
    (serverless, lent)
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

impl ControlPlane {
    /// A control plane commanding agents through `registry`.
    pub fn new(registry: Registry, config: ControlConfig) -> Arc<Self> {
        let state = State {
            core: Control::new(config.policy, config.cold.clone(), config.prices),
            served: BTreeMap::new(),
            starting: HashMap::new(),
            last_cold_start: HashMap::new(),
            counters: HashMap::new(),
            persister: None,
            clients: WorkerClients::default(),
            rental_events: Vec::new(),
            rental_billed: HashMap::new(),
            rental_unbilled: Vec::new(),
            rental_bill_errors: HashMap::new(),
            shares: HashMap::new(),
        };
        let mut state = state;
        state.core.set_rental_config(config.rentals);
        // Every pass takes the spans (`step`), billing on or off.
        state.core.set_metering(true);
        Arc::new(Self {
            state: Mutex::new(state),
            registry,
            wake: Notify::new(),
            origin: Instant::now(),
            origin_epoch: rentals::wall_now(),
            config,
            commands: AtomicU64::new(0),
            metrics: Metrics::new(),
            billing: std::sync::OnceLock::new(),
        })
    }

    /// Meters GPU holding into `billing` from now on (call once, before serving; a second call is ignored).
    pub fn set_billing(&self, billing: Arc<Billing>) {
        let _ = self.billing.set(billing);
    }

    /// How the usage ledger stands: `None` without billing; `Some(None)` for an in-memory ledger.
    pub fn ledger_status(&self) -> Option<Option<kiln_core::billing::LedgerStatus>> {
        self.billing.get().map(|b| b.ledger_status())
    }

    /// Seconds since the Unix epoch of `t` on the loop's clock.
    fn epoch(&self, t: f64) -> f64 {
        self.origin_epoch + t
    }

    /// The billing part of a pass: the fleet's GPU models checked for prices when agents changed, windows that
    /// ended closed into the ledger. Runs without the state lock (the billing service has its own).
    fn meter(&self, now: f64, held: Vec<HeldSpan>, fleet_changed: bool) {
        let Some(billing) = self.billing.get() else { return };
        if fleet_changed {
            let nodes = self.registry.nodes();
            billing.check_models(nodes.iter().flat_map(|n| n.gpus.iter().map(|g| g.model.as_str())));
        }
        let (mut refused, mut first) = (0, None);
        for span in &held {
            let (serverless, lent) = metered(span, |t| self.epoch(t));
            let results =
                serverless.map(|iv| billing.observe(&iv)).into_iter().chain(lent.map(|iv| billing.observe_lent(&iv)));
            for e in results.filter_map(Result::err) {
                refused += 1;
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            tracing::error!(spans = refused, error = %e, "spans of GPU holding refused by the meter; not billed");
        }
        match billing.close(self.epoch(now) - CLOSE_LAG_S) {
            // A missing price is reported by the billing service once; the GPU-time stays in the meter.
            Ok(_) | Err(BillingError::MissingPrice { .. }) => {}
            Err(e) => tracing::error!(error = %e, "usage records could not be appended; they are kept and retried"),
        }
    }

    /// The one lock (see the module docs): never held across an `.await`.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the counters read back from the store (they go on counting from there) and the writer they go to
    /// from now on. Call it once, before serving.
    pub fn restore_counters(&self, counters: impl IntoIterator<Item = (String, Counters)>, persister: Persister) {
        let mut state = self.state();
        state.counters.extend(counters);
        if state.persister.is_none() {
            state.persister = Some(persister);
        }
    }

    /// Seconds on the control loop's clock (the time the core's decisions use).
    pub(crate) fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// The controller's metrics (the reconcilers count their errors there too).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Takes the whole set of a spec source: each of `served` is added or updated; each key of `unservable` (a
    /// deployment the source declares but whose spec cannot be served) is withdrawn; every other deployment is
    /// removed (its replicas stop).
    pub fn apply(&self, served: impl IntoIterator<Item = ServedSpec>, unservable: &[String]) {
        let mut seen: Vec<String> = unservable.to_vec();
        for spec in served {
            seen.push(spec.key.clone());
            self.upsert(spec);
        }
        for key in unservable {
            self.withdraw(key);
        }
        let gone: Vec<String> = self.state().served.keys().filter(|k| !seen.contains(k)).cloned().collect();
        for key in gone {
            self.remove(&key);
        }
    }

    /// Adds or updates one deployment.
    pub fn upsert(&self, spec: ServedSpec) {
        let ServedSpec { key, version, core, source, gpu_memory_bytes } = spec;
        let now = self.now();
        let mut state = self.state();
        let max_concurrency = core.max_concurrency;
        state.core.upsert_deployment(&key, core, now);
        let hold = state
            .served
            .get(&key)
            .map(|s| Arc::clone(&s.hold))
            .unwrap_or_else(|| Arc::new(HoldQueue::new(self.config.hold_capacity)));
        let served = Served { version, source, gpu_memory_bytes, max_concurrency, hold, failed_file: None };
        state.served.insert(key, served);
        drop(state);
        self.wake.notify_one();
    }

    /// Stops serving a deployment whose spec cannot be served (its replicas stop); its counters and last cold
    /// start stay, for when a valid spec comes back.
    pub fn withdraw(&self, key: &str) {
        let mut state = self.state();
        state.core.remove_deployment(key);
        state.served.remove(key);
    }

    /// Removes a deployment: its replicas stop, its counters are deleted.
    pub fn remove(&self, key: &str) {
        let mut state = self.state();
        state.core.remove_deployment(key);
        state.served.remove(key);
        if state.counters.remove(key).is_some()
            && let Some(p) = &state.persister
        {
            p.counters(key.to_owned(), None);
        }
        state.last_cold_start.remove(key);
        drop(state);
        self.wake.notify_one();
    }

    /// What the status of `key` shows, `None` if it is not served.
    pub fn view(&self, key: &str) -> Option<DeploymentView> {
        let state = self.state();
        let status = state.core.status(key)?;
        Some(DeploymentView {
            desired: status.desired,
            loading: status.starting,
            ready: status.ready,
            unschedulable: status.unschedulable.map(|u| u.to_string()),
            failure: status.failure.map(|f| f.last),
            placements: state.replicas().filter(|r| r.deployment == key).collect(),
            last_cold_start: state.last_cold_start.get(key).cloned(),
            counters: state.counters.get(key).cloned().unwrap_or_default(),
        })
    }

    /// A deployment's counters (totals since it was created, across restarts).
    pub fn counters(&self, key: &str) -> Counters {
        self.state().counters.get(key).cloned().unwrap_or_default()
    }

    /// A deployment's state, `None` if unknown.
    pub fn status(&self, deployment: &str) -> Option<DeploymentStatus> {
        self.state().core.status(deployment)
    }

    /// A deployment's spec and version as served, `None` if it is not served.
    pub fn spec(&self, key: &str) -> Option<(kiln_core::control::DeploymentSpec, String)> {
        let state = self.state();
        Some((state.core.spec(key)?.clone(), state.served.get(key)?.version.clone()))
    }

    /// Every deployment's state.
    pub fn statuses(&self) -> Vec<(String, DeploymentStatus)> {
        let state = self.state();
        state.core.deployments().filter_map(|k| state.core.status(k).map(|s| (k.to_owned(), s))).collect()
    }

    /// Every replica.
    pub fn replicas(&self) -> Vec<ReplicaView> {
        self.state().replicas().collect()
    }

    /// GPU allocation, milli-GPU: (allocated, capacity).
    pub fn gpu_milli(&self) -> (u64, u64) {
        self.state().core.gpu_milli()
    }

    /// Cordons or uncordons a node (`GpuNode.spec.unschedulable`).
    pub fn set_cordoned(&self, node: &str, cordoned: bool) {
        self.state().core.set_cordoned(node, cordoned);
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
        let fleet_changed = !events.is_empty();
        let lost = self.registry.sweep();
        let changed_files = self.changed_model_files();
        let now = self.now();
        let mut actions = Vec::new();
        let held;
        let mut to_bill = Vec::new();
        {
            let mut guard = self.state();
            let state = &mut *guard;
            for event in events {
                self.absorb(state, event, now, &mut actions);
            }
            for key in &changed_files {
                state.core.retry_now(key, now);
            }
            for node in lost {
                let gone = state.core.node_lost(&node);
                tracing::warn!(%node, replicas = gone.len(), "agent lost; its replicas will be placed elsewhere");
                for r in gone {
                    state.starting.remove(&r);
                }
            }
            let settled = now >= self.config.rental_settle.as_secs_f64();
            let wall = self.epoch(now);
            let step = state.core.step_rentals(now, wall, settled);
            actions.extend(step.actions);
            state.record_rental_events(step.events);
            if self.billing.get().is_some() {
                to_bill = state.rentals_to_bill(wall, step.forgotten);
            }
            actions.extend(state.core.reconcile(now));
            // Taken every pass, metered or not, so the core does not keep them.
            held = state.core.take_held(now);
            state.refresh_holds(now);
            let decided = Instant::now();
            for action in &actions {
                if let Action::Start { replica, node, gpus, milli_per_gpu, .. } = action {
                    state.starting.insert(replica.clone(), Starting { decided, node: node.clone() });
                    let share = u32::from(*milli_per_gpu) * u32::try_from(gpus.len()).unwrap_or(u32::MAX);
                    state.shares.insert(replica.clone(), share);
                }
            }
            let core = &state.core;
            state.shares.retain(|replica, _| core.replica(replica).is_some());
        }
        for action in actions {
            self.execute(action);
        }
        self.meter(now, held, fleet_changed);
        if let Some(billing) = self.billing.get() {
            let wall = self.epoch(now);
            for rental in &to_bill {
                let key = crate::spec::key(&rental.spec.namespace, &rental.spec.name);
                let result = billing.append_rental(rental, wall);
                let mut state = self.state();
                if let Err(e) = result {
                    // Logged once per distinct error; retried every pass.
                    let message = e.to_string();
                    if state.rental_bill_errors.get(&key) != Some(&message) {
                        tracing::error!(rental = %key, error = %message,
                            "rental usage could not be appended; retried at every pass");
                        state.rental_bill_errors.insert(key.clone(), message);
                    }
                    if state.core.rental(&key).is_some() {
                        state.rental_billed.remove(&key);
                    } else {
                        // Forgotten by the core: this copy is the only one left.
                        state.rental_unbilled.push(rental.clone());
                    }
                } else if state.rental_bill_errors.remove(&key).is_some() {
                    tracing::info!(rental = %key, "rental usage appended after earlier failures");
                }
            }
        }
        self.metrics.scheduling(began.elapsed().as_secs_f64());
    }

    /// The metrics page, with the gauges read now.
    pub fn metrics_text(&self) -> String {
        let mut state = StateSnapshot::default();
        let (statuses, (allocated, capacity)) = {
            let s = self.state();
            let statuses: Vec<(String, DeploymentStatus)> =
                s.core.deployments().filter_map(|k| s.core.status(k).map(|st| (k.to_owned(), st))).collect();
            (statuses, s.core.gpu_milli())
        };
        for (name, s) in statuses {
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
        state.gpu_allocated_ratio = if capacity == 0 { 0.0 } else { allocated as f64 / capacity as f64 };
        state.ledger = self.billing.get().and_then(|b| b.ledger_status());
        self.metrics.set_state(&state);
        self.metrics.render()
    }

    /// The deployments whose model file changed since their last failed start (the files are looked at with no
    /// lock held).
    fn changed_model_files(&self) -> Vec<String> {
        let watched: Vec<(String, std::path::PathBuf, Option<FileStamp>)> = self
            .state()
            .served
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
        if !changed.is_empty() {
            let mut state = self.state();
            for (key, before) in &changed {
                // Unless a new failure recorded the file again meanwhile.
                if let Some(s) = state.served.get_mut(key)
                    && s.failed_file == Some(*before)
                {
                    s.failed_file = None;
                }
            }
        }
        changed.into_iter().map(|(key, _)| key).collect()
    }

    /// Records a failed start: the core's backoff, metrics, counters, and the model file to watch.
    fn start_failed(&self, state: &mut State, replica: &str, failure: StartFailure, now: f64, exited: bool) {
        let reason = failure.reason.clone();
        let gone = if exited {
            state.core.replica_exited(replica, failure, now)
        } else {
            state.core.replica_failed(replica, failure, now).map(|r| (r, true))
        };
        state.starting.remove(replica);
        // An exit after a long time serving is not a failure: the core just replaces it.
        let Some((r, true)) = gone else { return };
        self.metrics.failed_start(&r.deployment, &reason);
        state.count(&r.deployment, |c| c.failed_starts += 1);
        if let Some(s) = state.served.get_mut(&r.deployment) {
            s.failed_file = model_path(&s.source.uri).map(stamp);
        }
    }

    fn absorb(&self, state: &mut State, event: RegistryEvent, now: f64, actions: &mut Vec<Action>) {
        match event {
            RegistryEvent::Registered { node, running } => {
                let Some(view) = self.registry.node(&node) else { return };
                match state.core.node_up(&node_info(&view), &running) {
                    Ok(stops) => actions.extend(stops),
                    Err(e) => tracing::error!(%node, error = %e, "node not usable"),
                }
                state.core.set_cached(&node, view.cache_hints());
            }
            RegistryEvent::Disconnected { node } => {
                tracing::warn!(%node, "agent disconnected; no new work there until it returns");
                state.core.node_down(&node);
            }
            RegistryEvent::Cache { node } => {
                if let Some(view) = self.registry.node(&node) {
                    state.core.set_cached(&node, view.cache_hints());
                }
            }
            RegistryEvent::GpuHealth { node, gpu, health } => {
                state.core.gpu_health(&node, gpu, health != v1::GpuHealth::Unhealthy);
            }
            RegistryEvent::Worker { node, event } => match event.event {
                Some(Event::Ready(ready)) => {
                    if let Some(deployment) = state.core.replica_ready(&event.replica_id, now).map(str::to_owned)
                        && let Some(s) = state.starting.remove(&event.replica_id)
                    {
                        let t = ready.timings.unwrap_or_default();
                        let source =
                            convert::optional_tier("WorkerReady.source_tier", ready.source_tier).ok().flatten();
                        let record = ColdStartRecord {
                            deployment,
                            replica: event.replica_id.clone(),
                            node: s.node,
                            seconds: s.decided.elapsed().as_secs_f64(),
                            phases_ms: [t.fetch_ms, t.read_ms, t.host_to_device_ms, t.init_ms],
                            source,
                            finished_at: std::time::SystemTime::now(),
                        };
                        state.count(&record.deployment, |c| c.cold_starts += 1);
                        tracing::info!(replica = %record.replica, node = %record.node,
                            seconds = record.seconds, "replica ready");
                        let source = record.source.map_or("unspecified", convert::tier_name);
                        self.metrics.cold_start(&record.deployment, source, record.seconds, record.phases_ms);
                        state.last_cold_start.insert(record.deployment.clone(), record);
                    }
                }
                Some(Event::Failed(f)) => {
                    tracing::warn!(%node, replica = %event.replica_id, reason = %f.reason, message = %f.message,
                        retryable = f.retryable, "replica failed to start");
                    let failure = StartFailure { reason: f.reason, message: f.message, retryable: f.retryable };
                    self.start_failed(state, &event.replica_id, failure, now, false);
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
                    if state.core.replica(&event.replica_id).is_some() {
                        tracing::warn!(%node, replica = %event.replica_id, %message, "replica exited on its own");
                    }
                    let failure = StartFailure { reason: "Exited".into(), message, retryable: true };
                    self.start_failed(state, &event.replica_id, failure, now, true);
                }
                Some(Event::Loading(_)) | None => {}
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::{MonotonicClock, RegistryConfig};

    /// A one-GPU deployment `key` of a 1 Gi model, scaling 0..=1 (also the console's tests' fixture).
    pub(crate) fn spec(key: &str) -> ServedSpec {
        let md: kiln_k8s_api::model_deployment::ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": { "name": "m" },
            "spec": {
                "model": { "uri": "file:///models/m.safetensors" },
                "gpu": { "count": 1, "memoryPerGpu": "1Gi" },
                "scaling": { "minReplicas": 0, "maxReplicas": 1 }
            }
        }))
        .unwrap();
        crate::spec::translate(key.into(), "1".into(), &md.spec).unwrap()
    }

    /// A spec source's whole set: served specs are added, an unservable one is withdrawn but keeps its counters
    /// (they go on when it is fixed), a missing one is removed with its counters.
    #[test]
    fn apply_serves_withdraws_and_removes() {
        let control = ControlPlane::new(
            Registry::new(RegistryConfig::default(), MonotonicClock::system()),
            ControlConfig::default(),
        );
        control.apply([spec("a/x"), spec("b/y")], &[]);
        for key in ["a/x", "b/y"] {
            control.state().count(key, |c| c.requests += 3);
        }
        assert!(control.view("a/x").is_some() && control.view("b/y").is_some());
        control.apply([], &["a/x".to_owned()]);
        assert!(control.view("a/x").is_none() && control.view("b/y").is_none());
        assert_eq!(control.counters("a/x").requests, 3, "withdrawn: counters kept");
        assert_eq!(control.counters("b/y").requests, 0, "removed: counters gone");
        control.apply([spec("a/x")], &[]);
        assert_eq!(control.view("a/x").unwrap().counters.requests, 3);
    }

    #[test]
    fn held_spans_are_metered_by_namespace_with_rentals_paid_and_lenders_credited() {
        use kiln_core::billing::ServerlessPhase;
        let span = HeldSpan {
            replica: "r1".into(),
            deployment: "team-a/llm".into(),
            node: "n1".into(),
            gpu_model: "NVIDIA H100 80GB HBM3".into(),
            share_milli: 500,
            phase: ServerlessPhase::Busy,
            from: 10.0,
            to: 12.5,
            rental: None,
            lent_from: None,
        };
        let epoch = |t: f64| 1_000_000.0 + t;
        let (serverless, lent) = metered(&span, epoch);
        let iv = serverless.unwrap();
        assert_eq!((iv.namespace.as_str(), iv.deployment.as_str()), ("team-a", "llm"));
        assert_eq!((iv.from, iv.to, iv.share_milli), (1_000_010.0, 1_000_012.5, 500));
        assert!(lent.is_none());
        // Pinned to a rental: the hours are paid, nothing metered per second.
        let pinned = HeldSpan { rental: Some("team-a/r".into()), ..span.clone() };
        assert_eq!(metered(&pinned, epoch), (None, None));
        // On a GPU lent by team-b's rental: the borrower pays, the owner is credited.
        let borrowed = HeldSpan { lent_from: Some("team-b/block".into()), ..span };
        let (serverless, lent) = metered(&borrowed, epoch);
        assert_eq!(serverless.unwrap().namespace, "team-a");
        let lent = lent.unwrap();
        assert_eq!((lent.namespace.as_str(), lent.rental.as_str(), lent.share_milli), ("team-b", "block", 500));
    }
}
