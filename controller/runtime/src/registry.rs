//! The agent registry: the controller's side of `kiln.agent.v1` `AgentService.Connect`.
//!
//! It keeps, per node, what the agent last said — GPUs and their health, cached models, replicas and their phase,
//! the worker endpoint — and a channel to send it commands. An agent whose session ends, or that stops sending
//! anything for longer than the grace period, is marked not ready by [`Registry::sweep`] (driven by the caller's
//! clock, so tests and the simulator control time); its replicas are then the control loop's to reschedule.
//! Commands carry ids; [`Registry::command`] waits for the agent's ack of that id. What the control loop must act
//! on (registrations, worker events, GPU health, cache reports) is also queued as [`RegistryEvent`]s, drained with
//! [`Registry::take_events`], and [`Registry::changed`] wakes the loop as soon as one arrives.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use kiln_core::placement::CacheTier as PlacementTier;
use kiln_proto::v1::{
    self, AckStatus, AgentMessage, CommandAck, ControllerMessage, Registered, agent_message,
    agent_service_server::AgentService, controller_message, worker_event::Event,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// One GPU as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuView {
    /// NVML index.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Health.
    pub health: v1::GpuHealth,
}

/// One replica as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    /// Deployment (`namespace/name`).
    pub deployment: String,
    /// Phase.
    pub phase: v1::WorkerPhase,
    /// Requests in flight at the last report.
    pub in_flight: u32,
}

/// A node and its agent.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Whether the agent is connected and heard from within the grace period.
    pub ready: bool,
    /// Whether the GPUs are simulated.
    pub simulated: bool,
    /// GPUs by index.
    pub gpus: Vec<GpuView>,
    /// Replicas by id.
    pub replicas: HashMap<String, ReplicaView>,
    /// Cached models, as the agent last reported them.
    pub cached: Vec<v1::CachedModel>,
    /// Agent, driver and CUDA versions (empty when not reported).
    pub versions: [String; 3],
    /// Where the gateway reaches the node's `WorkerService`.
    pub worker_endpoint: String,
    /// Whether `worker_endpoint` also serves the HTTP/1.1 predict route (`Register.worker_http1`).
    pub worker_http1: bool,
    /// Allocatable CPU, millicores (0: not reported).
    pub cpu_milli: u64,
    /// Host memory, bytes (0: not reported).
    pub host_memory_bytes: u64,
    /// Node labels.
    pub labels: Vec<(String, String)>,
    /// When the agent was last heard from.
    pub last_seen: Instant,
}

impl NodeView {
    /// What the agent last reported in its cache, as the placement engine's hints (through
    /// `kiln_proto::convert`): host-RAM and disk copies, and idle GPU copies as the mask of their GPU. An entry with
    /// no placement counterpart (in the remote store, unspecified, a GPU copy without its index) is no hint.
    pub fn cache_hints(&self) -> Vec<kiln_core::control::Cached> {
        self.cached
            .iter()
            .filter_map(|m| {
                let tier = PlacementTier::try_from(m).ok()?;
                Some(kiln_core::control::Cached { model_uri: m.model_uri.clone(), tier })
            })
            .collect()
    }
}

/// What a GPU's agent last sampled (the agent's 1 Hz `TelemetryBatch`) and the fault that last changed its health:
/// kept for the console, never for decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuLive {
    /// NVML index.
    pub index: u32,
    /// SM utilisation, percent.
    pub sm_util_pct: u32,
    /// Framebuffer memory used, bytes.
    pub memory_used_bytes: u64,
    /// Power draw, milliwatts.
    pub power_mw: u32,
    /// Core temperature, degrees Celsius.
    pub temperature_c: u32,
    /// The Xid of the last health change, 0 if none.
    pub xid: u32,
    /// Why its health last changed (e.g. "Xid 79: GPU has fallen off the bus"); empty if it never did.
    pub reason: String,
}

#[derive(Debug)]
struct Node {
    view: NodeView,
    /// The last sample and health change of each GPU, by index.
    live: HashMap<u32, GpuLive>,
    /// Commands to the agent's current session (`None` once it ended).
    outbox: Option<mpsc::Sender<ControllerMessage>>,
    session: u64,
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<String, Node>,
    pending: HashMap<String, oneshot::Sender<CommandAck>>,
    sessions: u64,
    events: Vec<RegistryEvent>,
}

/// What the control loop must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryEvent {
    /// An agent registered (again): its node and the replicas it reports running.
    Registered {
        /// Node.
        node: String,
        /// Replica ids the agent runs.
        running: Vec<String>,
    },
    /// A replica's lifecycle event.
    Worker {
        /// Node.
        node: String,
        /// The event.
        event: v1::WorkerEvent,
    },
    /// A GPU's health changed.
    GpuHealth {
        /// Node.
        node: String,
        /// GPU index.
        gpu: u32,
        /// New health.
        health: v1::GpuHealth,
    },
    /// A node's cache contents changed.
    Cache {
        /// Node.
        node: String,
    },
    /// A node's session ended (its replicas may still run; it is lost if it does not return within the grace
    /// period).
    Disconnected {
        /// Node.
        node: String,
    },
}

/// Registry settings.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Telemetry interval asked of agents.
    pub telemetry_interval: Duration,
    /// Heartbeat interval asked of agents.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is not ready.
    pub grace: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            telemetry_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(2),
            grace: Duration::from_secs(10),
        }
    }
}

/// Why a command did not complete.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The node is unknown or its agent is not connected.
    #[error("node {0} has no connected agent")]
    NotConnected(String),
    /// No ack within the timeout.
    #[error("node {node} did not acknowledge command {command_id} within {timeout:?}")]
    Timeout {
        /// Node.
        node: String,
        /// Command.
        command_id: String,
        /// Timeout.
        timeout: Duration,
    },
}

impl CommandError {
    /// A short stable label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Self::NotConnected(_) => "not_connected",
            Self::Timeout { .. } => "timeout",
        }
    }

    /// Whether sending the command again may succeed: both are states of the connection, not of the command.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NotConnected(_) | Self::Timeout { .. } => true,
        }
    }
}

/// A monotonic clock, injected: the system's in production, a hand-moved one in tests.
#[derive(Clone)]
pub struct MonotonicClock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl MonotonicClock {
    /// The system's monotonic clock.
    pub fn system() -> Self {
        Self(Arc::new(Instant::now))
    }

    /// A clock reading `now()`.
    pub fn from_fn(now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    fn now(&self) -> Instant {
        (self.0)()
    }
}

impl std::fmt::Debug for MonotonicClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MonotonicClock")
    }
}

/// The registry; cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Registry {
    state: Arc<Mutex<State>>,
    config: RegistryConfig,
    clock: MonotonicClock,
    changed: Arc<Notify>,
}

impl Registry {
    /// An empty registry reading time from `clock`.
    pub fn new(config: RegistryConfig, clock: MonotonicClock) -> Self {
        Self { state: Arc::new(Mutex::new(State::default())), config, clock, changed: Arc::new(Notify::new()) }
    }

    /// Notified (one stored permit) whenever an event is queued.
    pub fn changed(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }

    /// Takes the queued events, oldest first.
    pub fn take_events(&self) -> Vec<RegistryEvent> {
        std::mem::take(&mut self.lock().events)
    }

    fn push(&self, state: &mut State, event: RegistryEvent) {
        state.events.push(event);
        self.changed.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every node.
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut nodes: Vec<NodeView> = self.lock().nodes.values().map(|n| n.view.clone()).collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// One node.
    pub fn node(&self, name: &str) -> Option<NodeView> {
        self.lock().nodes.get(name).map(|n| n.view.clone())
    }

    /// Where the gateway reaches `name`'s `WorkerService` (empty: not reported) and whether it serves the HTTP/1.1
    /// predict route there, without copying the node's view: the request path asks it for every prediction.
    pub fn worker_endpoint(&self, name: &str) -> Option<(String, bool)> {
        self.lock().nodes.get(name).map(|n| (n.view.worker_endpoint.clone(), n.view.worker_http1))
    }

    /// The model of `name`'s first GPU (what a prediction on it is priced by), without copying the node's view.
    pub fn gpu_model(&self, name: &str) -> Option<String> {
        self.lock().nodes.get(name)?.view.gpus.first().map(|g| g.model.clone())
    }

    /// Each node's GPUs as last sampled (by node name, GPUs by index): what the console shows.
    pub fn live(&self) -> HashMap<String, Vec<GpuLive>> {
        self.lock()
            .nodes
            .iter()
            .map(|(name, n)| {
                let mut gpus: Vec<GpuLive> = n.live.values().cloned().collect();
                gpus.sort_by_key(|g| g.index);
                (name.clone(), gpus)
            })
            .collect()
    }

    /// Marks nodes silent for longer than the grace period not ready; returns the names that just became so.
    pub fn sweep(&self) -> Vec<String> {
        let now = self.clock.now();
        let grace = self.config.grace;
        let mut lost = Vec::new();
        for node in self.lock().nodes.values_mut() {
            if node.view.ready && now.saturating_duration_since(node.view.last_seen) > grace {
                node.view.ready = false;
                node.outbox = None;
                lost.push(node.view.name.clone());
            }
        }
        lost.sort();
        lost
    }

    /// Sends `command` to `node`'s agent and waits (at most `timeout`) for its ack.
    pub async fn command(
        &self,
        node: &str,
        command: v1::Command,
        timeout: Duration,
    ) -> Result<CommandAck, CommandError> {
        let id = command.command_id.clone();
        let (tx, rx) = oneshot::channel();
        let outbox = {
            let mut s = self.lock();
            let outbox = s.nodes.get(node).and_then(|n| n.outbox.clone());
            let Some(outbox) = outbox else { return Err(CommandError::NotConnected(node.to_owned())) };
            s.pending.insert(id.clone(), tx);
            outbox
        };
        let message = ControllerMessage { body: Some(controller_message::Body::Command(command)) };
        if outbox.send(message).await.is_err() {
            self.lock().pending.remove(&id);
            return Err(CommandError::NotConnected(node.to_owned()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(ack)) => Ok(ack),
            _ => {
                self.lock().pending.remove(&id);
                Err(CommandError::Timeout { node: node.to_owned(), command_id: id, timeout })
            }
        }
    }

    fn register(&self, register: &v1::Register) -> (u64, mpsc::Receiver<ControllerMessage>) {
        let (tx, rx) = mpsc::channel(64);
        let now = self.clock.now();
        let mut s = self.lock();
        s.sessions += 1;
        let session = s.sessions;
        let view = NodeView {
            name: register.node_name.clone(),
            ready: true,
            simulated: register.simulated,
            gpus: register
                .gpus
                .iter()
                .map(|g| GpuView {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    memory_bytes: g.memory_total_bytes,
                    health: g.health(),
                })
                .collect(),
            replicas: register
                .workers
                .iter()
                .map(|w| {
                    (
                        w.replica_id.clone(),
                        ReplicaView { deployment: w.deployment.clone(), phase: w.phase(), in_flight: w.in_flight },
                    )
                })
                .collect(),
            cached: register.cached_models.clone(),
            versions: [register.agent_version.clone(), register.driver_version.clone(), register.cuda_version.clone()],
            worker_endpoint: register.worker_endpoint.clone(),
            worker_http1: register.worker_http1,
            cpu_milli: register.cpu_milli,
            host_memory_bytes: register.host_memory_bytes,
            labels: {
                let mut labels: Vec<(String, String)> =
                    register.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                labels.sort();
                labels
            },
            last_seen: now,
        };
        let running = register.workers.iter().map(|w| w.replica_id.clone()).collect();
        let live = s.nodes.remove(&register.node_name).map(|n| n.live).unwrap_or_default();
        s.nodes.insert(register.node_name.clone(), Node { view, live, outbox: Some(tx), session });
        self.push(&mut s, RegistryEvent::Registered { node: register.node_name.clone(), running });
        (session, rx)
    }

    /// Applies one message of `node`'s session `session`.
    fn apply(&self, node: &str, session: u64, message: AgentMessage) {
        let now = self.clock.now();
        let mut s = self.lock();
        if let Some(agent_message::Body::Ack(ack)) = &message.body
            && let Some(waiter) = s.pending.remove(&ack.command_id)
        {
            let _ = waiter.send(ack.clone());
        }
        let Some(n) = s.nodes.get_mut(node).filter(|n| n.session == session) else { return };
        n.view.last_seen = now;
        n.view.ready = true;
        let event = match &message.body {
            Some(agent_message::Body::GpuHealth(h)) => {
                Some(RegistryEvent::GpuHealth { node: node.to_owned(), gpu: h.gpu_index, health: h.health() })
            }
            Some(agent_message::Body::WorkerEvent(e)) => {
                Some(RegistryEvent::Worker { node: node.to_owned(), event: e.clone() })
            }
            Some(agent_message::Body::Cache(_)) => Some(RegistryEvent::Cache { node: node.to_owned() }),
            _ => None,
        };
        match message.body {
            Some(agent_message::Body::GpuHealth(h)) => {
                if let Some(g) = n.view.gpus.iter_mut().find(|g| g.index == h.gpu_index) {
                    g.health = h.health();
                }
                let live =
                    n.live.entry(h.gpu_index).or_insert_with(|| GpuLive { index: h.gpu_index, ..GpuLive::default() });
                live.xid = h.xid;
                live.reason = h.reason;
            }
            Some(agent_message::Body::Telemetry(batch)) => {
                for sample in batch.samples {
                    let live = n
                        .live
                        .entry(sample.gpu_index)
                        .or_insert_with(|| GpuLive { index: sample.gpu_index, ..GpuLive::default() });
                    live.sm_util_pct = sample.sm_util_pct;
                    live.memory_used_bytes = sample.memory_used_bytes;
                    live.power_mw = sample.power_mw;
                    live.temperature_c = sample.temperature_c;
                }
            }
            Some(agent_message::Body::WorkerEvent(e)) => match e.event {
                Some(Event::Loading(_)) => {
                    n.view.replicas.entry(e.replica_id).or_insert(ReplicaView {
                        deployment: String::new(),
                        phase: v1::WorkerPhase::Loading,
                        in_flight: 0,
                    });
                }
                Some(Event::Ready(_)) => {
                    let r = n.view.replicas.entry(e.replica_id).or_insert(ReplicaView {
                        deployment: String::new(),
                        phase: v1::WorkerPhase::Ready,
                        in_flight: 0,
                    });
                    r.phase = v1::WorkerPhase::Ready;
                }
                Some(Event::Failed(_) | Event::Exited(_)) => {
                    n.view.replicas.remove(&e.replica_id);
                }
                None => {}
            },
            Some(agent_message::Body::Heartbeat(h)) => {
                for load in h.workers {
                    if let Some(r) = n.view.replicas.get_mut(&load.replica_id) {
                        r.in_flight = load.in_flight;
                    }
                }
            }
            Some(agent_message::Body::Cache(report)) => {
                n.view.cached = report.models;
            }
            _ => {}
        }
        if let Some(event) = event {
            self.push(&mut s, event);
        }
    }

    fn disconnected(&self, node: &str, session: u64) {
        let mut s = self.lock();
        if let Some(n) = s.nodes.get_mut(node).filter(|n| n.session == session) {
            n.outbox = None;
            self.push(&mut s, RegistryEvent::Disconnected { node: node.to_owned() });
        }
    }
}

/// The `AgentService` over a [`Registry`].
#[derive(Debug, Clone)]
pub struct AgentServer(pub Registry);

type Outbound = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentServer {
    type ConnectStream = Outbound;

    async fn connect(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Some(agent_message::Body::Register(register)) = first.body else {
            return Err(Status::failed_precondition("the first message must be Register"));
        };
        if register.node_name.is_empty() {
            return Err(Status::invalid_argument("Register.node_name is empty"));
        }
        let registry = self.0.clone();
        let (session, rx) = registry.register(&register);
        tracing::info!(node = %register.node_name, gpus = register.gpus.len(), "agent registered");
        let config = registry.config;
        let registered = ControllerMessage {
            body: Some(controller_message::Body::Registered(Registered {
                telemetry_interval_ms: u32::try_from(config.telemetry_interval.as_millis()).unwrap_or(u32::MAX),
                heartbeat_interval_ms: u32::try_from(config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
                orphaned_replica_ids: Vec::new(),
            })),
        };
        let outbox = registry.lock().nodes.get(&register.node_name).and_then(|n| n.outbox.clone());
        if let Some(outbox) = outbox {
            let _ = outbox.send(registered).await;
        }
        let node = register.node_name.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                registry.apply(&node, session, message);
            }
            tracing::warn!(node = %node, "agent session ended");
            registry.disconnected(&node, session);
        });
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok))))
    }
}

/// Whether `ack` means the command took effect (now or as events follow).
pub fn succeeded(ack: &CommandAck) -> bool {
    matches!(ack.status(), AckStatus::Accepted | AckStatus::Done | AckStatus::AlreadyDone)
}
