//! Starting and stopping replicas: the start command's checks and bookkeeping, process workers launched and
//! watched until they exit, and stops that wait out in-flight requests and may leave the weights resident.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use kiln_proto::v1::{self, model_source::Runtime, worker_event::Event};

use super::{Replica, Resident, Workers};
use crate::process::{ProcessError, ProcessSpec, ProcessWorker};

/// Where and how a start failed.
pub(super) struct Failure {
    pub(super) phase: v1::LoadPhase,
    pub(super) reason: &'static str,
    pub(super) retryable: bool,
    pub(super) began: Instant,
}

pub(super) fn failed(
    phase: v1::LoadPhase,
    reason: &str,
    message: String,
    retryable: bool,
    timings: v1::LoadTimings,
) -> Event {
    Event::Failed(v1::WorkerFailed {
        phase: phase as i32,
        reason: reason.to_owned(),
        message,
        retryable,
        timings: Some(timings),
    })
}

impl Workers {
    /// Starts a replica (the load runs in the background and ends in a `WorkerReady` or `WorkerFailed` event).
    pub fn start(self: &Arc<Self>, command_id: &str, start: v1::StartWorker) -> (v1::AckStatus, String) {
        let source = start.model.clone().unwrap_or_default();
        if let Some(Runtime::Process(p)) = &source.runtime {
            if p.command.is_empty() {
                return (v1::AckStatus::Rejected, "the process runtime needs a command".into());
            }
            if u16::try_from(p.port).is_err() {
                return (v1::AckStatus::Rejected, format!("the process runtime's port {} is above 65535", p.port));
            }
        }
        {
            let mut replicas = self.write();
            if replicas.contains_key(&start.replica_id) {
                return (v1::AckStatus::AlreadyDone, format!("replica {} already runs here", start.replica_id));
            }
            replicas.insert(
                start.replica_id.clone(),
                Replica {
                    uri: source.uri.clone(),
                    digest: source.digest.clone(),
                    deployment: start.deployment.clone(),
                    command_id: command_id.to_owned(),
                    gpu_indexes: start.gpu_indexes.clone(),
                    max_concurrency: start.max_concurrency.max(1),
                    model: None,
                    gpu: None,
                    process: None,
                    in_flight: Arc::new(AtomicU32::new(0)),
                    completed: Arc::new(AtomicU64::new(0)),
                    memory_bytes: 0,
                },
            );
        }
        let workers = Arc::clone(self);
        let command_id = command_id.to_owned();
        match source.runtime.clone() {
            Some(Runtime::Process(p)) => {
                tokio::spawn(async move { workers.launch(command_id, start, source, p).await });
            }
            _ => {
                tokio::spawn(async move { workers.load(command_id, start, source).await });
            }
        }
        (v1::AckStatus::Accepted, "loading".into())
    }

    async fn launch(
        self: Arc<Self>,
        command_id: String,
        start: v1::StartWorker,
        source: v1::ModelSource,
        p: v1::ProcessRuntime,
    ) {
        let id = start.replica_id.clone();
        let began = Instant::now();
        self.emit(
            &id,
            &command_id,
            Event::Loading(v1::WorkerLoading { phase: v1::LoadPhase::Init as i32, ..Default::default() }),
        );
        // `start` refused a port above 65535.
        let port = match u16::try_from(p.port).unwrap_or(0) {
            0 => std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0),
            port => port,
        };
        let or = |ms: u32, default_s: u64| {
            if ms == 0 { Duration::from_secs(default_s) } else { Duration::from_millis(u64::from(ms)) }
        };
        let spec = ProcessSpec {
            command: p.command.iter().chain(&p.args).cloned().collect(),
            env: p.env.into_iter().collect(),
            port,
            readiness_path: if p.readiness_path.is_empty() { "/health".into() } else { p.readiness_path },
            startup_timeout: or(p.startup_timeout_ms, 600),
            termination_grace: or(p.termination_grace_ms, 30),
            gpu_uuids: start.gpu_uuids.clone(),
            model_uri: source.uri.clone(),
        };
        let ms = |d: Duration| d.as_millis() as u64;
        match ProcessWorker::start(&spec).await {
            Ok(worker) => {
                let worker = Arc::new(worker);
                let registered = {
                    let mut replicas = self.write();
                    replicas.get_mut(&id).map(|r| {
                        r.process = Some(Arc::clone(&worker));
                        r.max_concurrency
                    })
                };
                let Some(max_concurrency) = registered else {
                    // Stopped while starting.
                    worker.stop().await;
                    return;
                };
                let timings = v1::LoadTimings {
                    init_ms: ms(began.elapsed()),
                    total_ms: ms(began.elapsed()),
                    ..Default::default()
                };
                let ready = v1::WorkerReady {
                    timings: Some(timings),
                    source_tier: v1::CacheTier::Unspecified as i32,
                    gpu_memory_bytes: start.gpu_memory_bytes,
                    max_concurrency,
                };
                self.emit(&id, &command_id, Event::Ready(ready));
                self.watch(id, command_id, worker).await;
            }
            Err(e) => {
                self.write().remove(&id);
                let timings = v1::LoadTimings {
                    init_ms: ms(began.elapsed()),
                    total_ms: ms(began.elapsed()),
                    ..Default::default()
                };
                let retryable = !matches!(e, ProcessError::Spawn { .. } | ProcessError::NoCommand);
                self.emit(&id, &command_id, failed(v1::LoadPhase::Init, e.reason(), e.to_string(), retryable, timings));
            }
        }
    }

    /// Reports a model server that exits on its own, and forgets its replica.
    async fn watch(&self, id: String, command_id: String, worker: Arc<ProcessWorker>) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let still_ours =
                self.read().get(&id).and_then(|r| r.process.as_ref().map(|p| Arc::ptr_eq(p, &worker))) == Some(true);
            if !still_ours {
                return; // stopped on request: `stop` reports it
            }
            if let Some(status) = worker.exited().await {
                self.write().remove(&id);
                let tail = worker.tail();
                let exited = v1::WorkerExited {
                    exit_code: status.code().unwrap_or(0),
                    signal: std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
                    requested: false,
                    message: format!("the model server exited ({status}); last output: {tail}"),
                    weights_resident: false,
                };
                self.emit(&id, &command_id, Event::Exited(exited));
                return;
            }
        }
    }
    /// Stops a replica after its in-flight requests finish (at most `grace_period_ms`).
    pub async fn stop(&self, stop: &v1::StopWorker) -> (v1::AckStatus, String) {
        let Some(replica) = self.write().remove(&stop.replica_id) else {
            return (v1::AckStatus::AlreadyDone, format!("no replica {} on this node", stop.replica_id));
        };
        let deadline = Instant::now() + Duration::from_millis(u64::from(stop.grace_period_ms));
        while replica.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cut = replica.in_flight.load(Ordering::Acquire);
        self.sync_sim();
        let mut message =
            if cut > 0 { format!("{cut} requests cut off after the grace period") } else { String::new() };
        let mut exited = v1::WorkerExited { requested: true, ..Default::default() };
        if stop.keep_weights_resident
            && (replica.model.is_some() || replica.gpu.is_some())
            && let Some(&gpu) = replica.gpu_indexes.first()
        {
            self.residents().push(Resident {
                uri: replica.uri.clone(),
                digest: replica.digest.clone(),
                gpu,
                model: replica.model.clone(),
                cuda: replica.gpu.clone(),
                bytes: replica.memory_bytes,
                since: SystemTime::now(),
            });
            exited.weights_resident = true;
            self.sync_sim();
        } else if replica.model.is_some() || replica.gpu.is_some() {
            self.demote(&replica.uri, &replica.digest);
        }
        if let Some(worker) = &replica.process
            && let Some(status) = worker.stop().await
        {
            exited.exit_code = status.code().unwrap_or(0);
            exited.signal = std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0);
            if message.is_empty() {
                message = format!("the model server stopped ({status})");
            }
        }
        exited.message = message;
        self.emit(&stop.replica_id, &replica.command_id, Event::Exited(exited));
        (v1::AckStatus::Done, "stopped".into())
    }
}
