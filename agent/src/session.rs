//! The agent's `kiln.agent.v1` session with the controller: one `AgentService.Connect` stream for the agent's
//! life. It registers first (inventory, health, workers still running), then sends telemetry and heartbeats at
//! the intervals the controller asks for, health changes at once, and answers commands.
//!
//! When the stream breaks (controller restart, network partition) the agent reconnects with exponential backoff
//! and full jitter and registers again. Commands are idempotent by `command_id`: a command seen before is answered
//! `ALREADY_DONE` and not carried out again, and a command past its deadline is `REJECTED` (a stale command from
//! before a partition must not act).

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use kiln_core::rng::Rng;
use kiln_proto::{
    convert,
    v1::{
        self, AckStatus, AgentMessage, Command, CommandAck, agent_message, agent_service_client::AgentServiceClient,
        controller_message,
    },
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{register, telemetry::Telemetry};

/// What the session needs to know.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Controller address, e.g. `http://10.0.0.5:7070`.
    pub controller: String,
    /// This agent's version.
    pub agent_version: String,
    /// Where the gateway reaches this agent's `WorkerService`.
    pub worker_endpoint: String,
    /// Reconnection backoff.
    pub backoff: Backoff,
    /// How long to wait for `Registered` after `Register`.
    pub register_timeout: Duration,
}

/// Exponential backoff with full jitter: the n-th wait is uniform in `[0, min(max, initial x 2^n)]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// First ceiling.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The wait before attempt `attempt` (0-based), given a uniform `unit` in [0, 1).
    pub fn wait(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.initial.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
        Duration::from_secs_f64(ceiling.min(self.max.as_secs_f64()) * unit.clamp(0.0, 1.0))
    }
}

/// Carries out controller commands (worker starts and stops, cache prefetches and evictions).
pub trait CommandHandler: Send + Sync + 'static {
    /// Handles one new command (never called twice for one id) and says how it went.
    fn handle(&self, command: Command) -> impl Future<Output = (AckStatus, String)> + Send;

    /// What the node's weight cache holds, sent after registration and after every prefetch, eviction or stop.
    fn cache_report(&self) -> Option<v1::CacheReport> {
        None
    }

    /// The replicas still running, listed in every registration so the controller can adopt them.
    fn running_workers(&self) -> Vec<v1::RunningWorker> {
        Vec::new()
    }

    /// Requests in flight and completed per replica, sent with every heartbeat.
    fn worker_loads(&self) -> Vec<v1::WorkerLoad> {
        Vec::new()
    }

    /// Worker lifecycle events, forwarded to the controller as they happen.
    fn worker_events(&self) -> Option<tokio::sync::broadcast::Receiver<v1::WorkerEvent>> {
        None
    }
}

/// Remembers the outcome of recent commands by id (bounded), so that a resent command is not acted on twice.
#[derive(Debug, Default)]
pub struct CommandLog {
    seen: HashMap<String, AckStatus>,
    order: VecDeque<String>,
}

/// Command ids remembered.
const COMMAND_LOG_LIMIT: usize = 4096;

impl CommandLog {
    /// The outcome of `id`, if it was seen.
    pub fn get(&self, id: &str) -> Option<AckStatus> {
        self.seen.get(id).copied()
    }

    /// Replaces the recorded outcome of `id` (recording it if new).
    pub fn update(&mut self, id: &str, status: AckStatus) {
        match self.seen.get_mut(id) {
            Some(s) => *s = status,
            None => self.record(id, status),
        }
    }

    /// Records the outcome of `id`.
    pub fn record(&mut self, id: &str, status: AckStatus) {
        if self.seen.insert(id.to_owned(), status).is_none() {
            self.order.push_back(id.to_owned());
            if self.order.len() > COMMAND_LOG_LIMIT
                && let Some(old) = self.order.pop_front()
            {
                self.seen.remove(&old);
            }
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Could not reach the controller.
    #[error("cannot reach the controller at {controller}: {source}")]
    Connect {
        /// Address.
        controller: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The controller refused or broke the stream.
    #[error("the controller ended the session: {0}")]
    Status(#[from] tonic::Status),
    /// The controller did not answer the registration in time.
    #[error("no Registered from the controller within {0:?}")]
    RegisterTimeout(Duration),
    /// The stream closed.
    #[error("the controller closed the stream")]
    Closed,
    /// An invalid controller address.
    #[error("invalid controller address {0:?}")]
    Address(String),
}

/// Runs sessions until `shutdown` turns true, reconnecting with backoff. `events` receives a line per session
/// start and end, for logs and tests.
pub async fn run<H: CommandHandler>(
    config: SessionConfig,
    telemetry: Telemetry,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedSender<String>>,
) {
    let log = Arc::new(tokio::sync::Mutex::new(CommandLog::default()));
    let mut attempt = 0u32;
    // Jitter differs between agents (time and process id), so that a fleet does not reconnect in lockstep.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut jitter = Rng::new(now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32));
    loop {
        if *shutdown.borrow() {
            return;
        }
        let note = |line: String| {
            if let Some(tx) = &events {
                let _ = tx.send(line);
            }
        };
        let result = tokio::select! {
            r = session(&config, &telemetry, &handler, &log, &note, &mut attempt) => r,
            _ = shutdown.changed() => return,
        };
        match result {
            Ok(()) => note("session ended".into()),
            Err(e) => {
                tracing::warn!("controller session: {e}");
                note(format!("session error: {e}"));
            }
        }
        let wait = config.backoff.wait(attempt, jitter.unit());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn session<H: CommandHandler>(
    config: &SessionConfig,
    telemetry: &Telemetry,
    handler: &Arc<H>,
    log: &Arc<tokio::sync::Mutex<CommandLog>>,
    note: &impl Fn(String),
    attempt: &mut u32,
) -> Result<(), SessionError> {
    let endpoint = tonic::transport::Endpoint::from_shared(config.controller.clone())
        .map_err(|_| SessionError::Address(config.controller.clone()))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| SessionError::Connect { controller: config.controller.clone(), source })?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(256);
    let outbox = Outbox { tx, seq: Arc::new(AtomicU64::new(0)) };
    let send = |body: agent_message::Body| outbox.send(body);
    let mut health = telemetry.subscribe();
    let mut worker_events = handler.worker_events();
    let mut registration = register::registration(&telemetry.read(), &config.agent_version, &config.worker_endpoint);
    registration.workers = handler.running_workers();
    send(agent_message::Body::Register(registration)).await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    let registered = match tokio::time::timeout(config.register_timeout, inbound.message()).await {
        Err(_) => return Err(SessionError::RegisterTimeout(config.register_timeout)),
        Ok(message) => match message?.and_then(|m| m.body) {
            Some(controller_message::Body::Registered(r)) => r,
            Some(_) => return Err(SessionError::Status(tonic::Status::failed_precondition("expected Registered"))),
            None => return Err(SessionError::Closed),
        },
    };
    *attempt = 0;
    note(format!("registered with {}", config.controller));
    if let Some(report) = handler.cache_report() {
        send(agent_message::Body::Cache(report)).await?;
    }
    let interval = |ms: u32, default: u64| Duration::from_millis(if ms == 0 { default } else { u64::from(ms) });
    let mut telemetry_tick = tokio::time::interval(interval(registered.telemetry_interval_ms, 1000));
    let mut heartbeat_tick = tokio::time::interval(interval(registered.heartbeat_interval_ms, 5000));
    loop {
        tokio::select! {
            _ = telemetry_tick.tick() => {
                let batch = register::telemetry(&telemetry.read(), SystemTime::now());
                send(agent_message::Body::Telemetry(batch)).await?;
            }
            _ = heartbeat_tick.tick() => {
                let beat =
                    v1::Heartbeat { time: Some(convert::timestamp(SystemTime::now())), workers: handler.worker_loads() };
                send(agent_message::Body::Heartbeat(beat)).await?;
            }
            change = health.recv() => match change {
                Ok(change) => send(agent_message::Body::GpuHealth(register::health_event(&change))).await?,
                // Missed changes are in the next registration and telemetry; keep going.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err(SessionError::Closed),
            },
            event = next_worker_event(&mut worker_events) => match event {
                Some(event) => send(agent_message::Body::WorkerEvent(event)).await?,
                None => worker_events = None,
            },
            message = inbound.message() => match message?.and_then(|m| m.body) {
                Some(controller_message::Body::Command(command)) => {
                    // Commands run beside the session, so a long prefetch does not hold up heartbeats.
                    let (outbox, handler, log) = (outbox.clone(), Arc::clone(handler), Arc::clone(log));
                    tokio::spawn(async move {
                    let handler = &handler;
                    let send = |body: agent_message::Body| outbox.send(body);
                    let touches_cache = matches!(
                        command.action,
                        Some(
                            v1::command::Action::PrefetchModel(_)
                                | v1::command::Action::EvictModel(_)
                                | v1::command::Action::StopWorker(_)
                        )
                    );
                    let ack = answer(command, handler, &log).await;
                    let _ = send(agent_message::Body::Ack(ack)).await;
                    if touches_cache && let Some(report) = handler.cache_report() {
                        let _ = send(agent_message::Body::Cache(report)).await;
                    }
                    });
                }
                Some(controller_message::Body::Registered(_)) => {}
                None => return Ok(()),
            },
        }
    }
}

/// The session's outgoing messages, numbered in the order they are queued.
#[derive(Debug, Clone)]
struct Outbox {
    tx: mpsc::Sender<AgentMessage>,
    seq: Arc<AtomicU64>,
}

impl Outbox {
    async fn send(&self, body: agent_message::Body) -> Result<(), SessionError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.tx.send(AgentMessage { seq, body: Some(body) }).await.map_err(|_| SessionError::Closed)
    }
}

/// The next worker event, or `None` once the source is gone; pending forever without a source.
async fn next_worker_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<v1::WorkerEvent>>,
) -> Option<v1::WorkerEvent> {
    let Some(rx) = events else { return std::future::pending().await };
    loop {
        match rx.recv().await {
            Ok(event) => return Some(event),
            // Events missed under load are summarised by the next registration; keep going.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// The ack for `command`: `ALREADY_DONE` for an id seen before, `REJECTED` past its deadline, otherwise what the
/// handler says.
async fn answer<H: CommandHandler>(
    command: Command,
    handler: &Arc<H>,
    log: &Arc<tokio::sync::Mutex<CommandLog>>,
) -> CommandAck {
    let id = command.command_id.clone();
    let ack =
        |status: AckStatus, message: String| CommandAck { command_id: id.clone(), status: status as i32, message };
    if id.is_empty() {
        return ack(AckStatus::Rejected, "a command needs a command_id".into());
    }
    {
        // Check and claim the id at once: a resent command arriving while the first runs is not run twice.
        let mut log = log.lock().await;
        if log.get(&id).is_some() {
            return ack(AckStatus::AlreadyDone, "command id already handled".into());
        }
        log.record(&id, AckStatus::Accepted);
    }
    if let Some(deadline) = &command.deadline
        && SystemTime::now() > convert::system_time(deadline)
    {
        log.lock().await.record(&id, AckStatus::Rejected);
        return ack(AckStatus::Rejected, "deadline passed before the agent received the command".into());
    }
    let (status, message) = handler.handle(command).await;
    log.lock().await.update(&id, status);
    ack(status, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_with_full_jitter() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };
        assert_eq!(b.wait(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.wait(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.wait(10, 1.0), Duration::from_secs(2));
        assert_eq!(b.wait(10, 0.25), Duration::from_millis(500));
        assert_eq!(b.wait(5, 0.0), Duration::ZERO);
    }

    #[test]
    fn the_command_log_is_bounded() {
        let mut log = CommandLog::default();
        for i in 0..COMMAND_LOG_LIMIT + 10 {
            log.record(&format!("c{i}"), AckStatus::Done);
        }
        assert_eq!(log.get("c0"), None, "the oldest ids are forgotten");
        assert_eq!(log.get(&format!("c{}", COMMAND_LOG_LIMIT + 9)), Some(AckStatus::Done));
        assert_eq!(log.seen.len(), COMMAND_LOG_LIMIT);
    }
}
