//! Model replicas hosted by this agent, and the `WorkerService` the gateway calls them through.
//!
//! Runtimes: `native` on the CPU — a dense safetensors model ([`crate::model`]) loaded from the weight cache
//! (fetched into it on a miss), timed by phase (fetch, read, convert — the CPU's stand-in for host-to-device —
//! and init) — and `process` ([`crate::process`]): an external model server the agent launches, waits on, proxies
//! to and stops. Lifecycle changes go to the controller as worker events. Each replica has a concurrency limit
//! (`RESOURCE_EXHAUSTED` beyond it) and an in-flight count. A replica whose weights are missing or invalid, or
//! whose server exits, fails with an event saying why; the other replicas keep serving. Where the CUDA libraries
//! are present and the replica has a GPU, the native runtime copies the weights to it and runs there
//! ([`crate::cuda`]); elsewhere it runs on the CPU with the same results.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use kiln_proto::{
    convert,
    v1::{self, model_source::Runtime, worker_event::Event},
};
use serde::Deserialize;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::{
    cache::{CacheError, Tier, WeightCache},
    gpu::sim::SimHandle,
    model::{DenseModel, load_bytes},
    process::{ProcessError, ProcessSpec, ProcessWorker},
};

/// Weights left in (simulated or real) GPU memory by a replica stopped with `keep_weights_resident`: a later start
/// of the same model on the same GPU reuses them (a warm start) unless the memory was needed first.
#[derive(Debug)]
struct Resident {
    uri: String,
    gpu: u32,
    model: Arc<DenseModel>,
    cuda: Option<Arc<crate::cuda::CudaModel>>,
    bytes: u64,
    since: SystemTime,
}

#[derive(Debug)]
struct Replica {
    uri: String,
    deployment: String,
    command_id: String,
    gpu_indexes: Vec<u32>,
    max_concurrency: u32,
    model: Option<Arc<DenseModel>>,
    gpu: Option<Arc<crate::cuda::CudaModel>>,
    process: Option<Arc<ProcessWorker>>,
    in_flight: Arc<AtomicU32>,
    completed: Arc<AtomicU64>,
    memory_bytes: u64,
}

/// The replicas of this node.
#[derive(Debug)]
pub struct Workers {
    replicas: RwLock<HashMap<String, Replica>>,
    resident: std::sync::Mutex<Vec<Resident>>,
    gpu_memory: Vec<u64>,
    events: broadcast::Sender<v1::WorkerEvent>,
    cache: Arc<WeightCache>,
    sim: Option<SimHandle>,
}

/// Where and how a start failed.
struct Failure {
    phase: v1::LoadPhase,
    reason: &'static str,
    retryable: bool,
    began: Instant,
}

fn failed(phase: v1::LoadPhase, reason: &str, message: String, retryable: bool, timings: v1::LoadTimings) -> Event {
    Event::Failed(v1::WorkerFailed {
        phase: phase as i32,
        reason: reason.to_owned(),
        message,
        retryable,
        timings: Some(timings),
    })
}

impl Workers {
    /// No replicas yet; weights come from `cache`; simulated GPUs (if any) see the replicas' memory and load;
    /// `gpu_memory` is each GPU's memory, bytes (idle resident copies are evicted to make room within it).
    pub fn new(cache: Arc<WeightCache>, sim: Option<SimHandle>, gpu_memory: Vec<u64>) -> Arc<Self> {
        Arc::new(Self {
            replicas: RwLock::new(HashMap::new()),
            resident: std::sync::Mutex::new(Vec::new()),
            gpu_memory,
            events: broadcast::channel(1024).0,
            cache,
            sim,
        })
    }

    fn residents(&self) -> std::sync::MutexGuard<'_, Vec<Resident>> {
        self.resident.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Idle resident copies: uri, GPU, bytes, since (for cache reports).
    pub fn resident_copies(&self) -> Vec<(String, u32, u64, SystemTime)> {
        self.residents().iter().map(|r| (r.uri.clone(), r.gpu, r.bytes, r.since)).collect()
    }

    /// Drops resident copies of `uri` (on `gpu` only, when given); returns how many.
    pub fn evict_resident(&self, uri: &str, gpu: Option<u32>) -> usize {
        let mut residents = self.residents();
        let before = residents.len();
        residents.retain(|r| !(r.uri == uri && gpu.is_none_or(|g| g == r.gpu)));
        let gone = before - residents.len();
        drop(residents);
        self.sync_sim();
        gone
    }

    /// Evicts the oldest resident copies on `gpus` until `need` more bytes fit beside what runs there.
    fn make_room(&self, gpus: &[u32], need: u64) {
        for &g in gpus {
            let Some(&total) = self.gpu_memory.get(g as usize) else { continue };
            let running: u64 =
                self.read().values().filter(|r| r.gpu_indexes.contains(&g)).map(|r| r.memory_bytes).sum();
            let mut residents = self.residents();
            loop {
                let held: u64 = residents.iter().filter(|r| r.gpu == g).map(|r| r.bytes).sum();
                if running + held + need <= total || held == 0 {
                    break;
                }
                let oldest =
                    (0..residents.len()).filter(|&i| residents[i].gpu == g).min_by_key(|&i| residents[i].since);
                if let Some(i) = oldest {
                    let gone = residents.swap_remove(i);
                    tracing::info!(gpu = g, uri = %gone.uri, "evicted an idle resident copy to make room");
                }
            }
        }
    }

    /// Worker lifecycle events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<v1::WorkerEvent> {
        self.events.subscribe()
    }

    fn emit(&self, replica_id: &str, command_id: &str, event: Event) {
        let _ = self.events.send(v1::WorkerEvent {
            replica_id: replica_id.to_owned(),
            command_id: command_id.to_owned(),
            time: Some(convert::timestamp(SystemTime::now())),
            event: Some(event),
        });
    }

    /// Forgets a replica whose start failed and says why.
    fn fail(&self, id: &str, command_id: &str, failure: Failure, message: String, mut timings: v1::LoadTimings) {
        timings.total_ms = timings.total_ms.max(failure.began.elapsed().as_millis() as u64);
        self.write().remove(id);
        let (phase, reason, retryable) = (failure.phase, failure.reason, failure.retryable);
        self.emit(id, command_id, failed(phase, reason, message, retryable, timings));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Replica>> {
        self.replicas.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Replica>> {
        self.replicas.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The replicas, for the registration that follows a reconnection.
    pub fn running(&self) -> Vec<v1::RunningWorker> {
        let mut out: Vec<v1::RunningWorker> = self
            .read()
            .iter()
            .map(|(id, r)| v1::RunningWorker {
                replica_id: id.clone(),
                deployment: r.deployment.clone(),
                gpu_indexes: r.gpu_indexes.clone(),
                phase: if r.model.is_some() || r.process.is_some() {
                    v1::WorkerPhase::Ready
                } else {
                    v1::WorkerPhase::Loading
                } as i32,
                in_flight: r.in_flight.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
        out
    }

    /// Per replica: id, deployment, ready, in flight, completed (for metrics).
    pub fn metrics(&self) -> Vec<(String, String, bool, u32, u64)> {
        let mut out: Vec<_> = self
            .read()
            .iter()
            .map(|(id, r)| {
                let ready = r.model.is_some() || r.process.is_some();
                let flight = r.in_flight.load(Ordering::Relaxed);
                (id.clone(), r.deployment.clone(), ready, flight, r.completed.load(Ordering::Relaxed))
            })
            .collect();
        out.sort();
        out
    }

    /// Requests in flight and completed, per replica (for heartbeats).
    pub fn loads(&self) -> Vec<v1::WorkerLoad> {
        let mut out: Vec<v1::WorkerLoad> = self
            .read()
            .iter()
            .map(|(id, r)| v1::WorkerLoad {
                replica_id: id.clone(),
                in_flight: r.in_flight.load(Ordering::Relaxed),
                completed: r.completed.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
        out
    }

    /// Starts a replica (the load runs in the background and ends in a `WorkerReady` or `WorkerFailed` event).
    pub fn start(self: &Arc<Self>, command_id: &str, start: v1::StartWorker) -> (v1::AckStatus, String) {
        let source = start.model.clone().unwrap_or_default();
        if let Some(Runtime::Process(p)) = &source.runtime
            && p.command.is_empty()
        {
            return (v1::AckStatus::Rejected, "the process runtime needs a command".into());
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
        let port = match p.port {
            0 => std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0),
            port => port as u16,
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

    async fn load(self: Arc<Self>, command_id: String, start: v1::StartWorker, source: v1::ModelSource) {
        let id = start.replica_id.clone();
        let began = Instant::now();
        let mut timings = v1::LoadTimings::default();
        let ms = |d: Duration| d.as_millis() as u64;
        let loading = |phase: v1::LoadPhase| {
            Event::Loading(v1::WorkerLoading { phase: phase as i32, bytes_done: 0, bytes_total: source.size_bytes })
        };
        // An idle copy of the same model on the same GPU: a warm start.
        let warm = start.gpu_indexes.first().and_then(|&g| {
            let mut residents = self.residents();
            let i = residents.iter().position(|r| r.uri == source.uri && r.gpu == g)?;
            Some(residents.swap_remove(i))
        });
        if let Some(copy) = warm {
            timings.total_ms = ms(began.elapsed());
            let max_concurrency = {
                let mut replicas = self.write();
                let Some(r) = replicas.get_mut(&id) else { return };
                r.model = Some(copy.model);
                r.gpu = copy.cuda;
                r.memory_bytes = copy.bytes;
                r.max_concurrency
            };
            self.sync_sim();
            let ready = v1::WorkerReady {
                timings: Some(timings),
                source_tier: v1::CacheTier::from(Tier::Gpu) as i32,
                gpu_memory_bytes: copy.bytes,
                max_concurrency,
            };
            self.emit(&id, &command_id, Event::Ready(ready));
            return;
        }
        self.make_room(&start.gpu_indexes, start.gpu_memory_bytes.max(source.size_bytes));
        // Fetch into the disk cache on a miss, then read (verified) from the fastest tier that has it.
        self.emit(&id, &command_id, loading(v1::LoadPhase::Fetch));
        let cache = Arc::clone(&self.cache);
        let (uri, digest) = (source.uri.clone(), source.digest.clone());
        let fetch_began = Instant::now();
        let fetched = tokio::task::spawn_blocking(move || -> Result<(Tier, Arc<[u8]>, bool), CacheError> {
            let cached = if digest.is_empty() { None } else { cache.read(&digest).transpose()? };
            match cached {
                Some((tier, bytes)) => Ok((tier, bytes, false)),
                None => {
                    let entry = cache.prefetch(&uri, (!digest.is_empty()).then_some(digest.as_str()), Tier::Disk)?;
                    match cache.read(&entry.digest) {
                        Some(r) => r.map(|(tier, bytes)| (tier, bytes, true)),
                        None => Err(CacheError::Unsupported { uri }),
                    }
                }
            }
        })
        .await;
        let (tier, bytes, was_fetched) = match fetched {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                let (reason, retryable) = match &e {
                    CacheError::Io { .. } | CacheError::Unsupported { .. } => ("ModelNotFound", true),
                    CacheError::Corrupt { .. } | CacheError::DigestMismatch { .. } => ("InvalidWeights", false),
                    CacheError::TooLarge { .. } => ("OutOfMemory", false),
                    CacheError::NotACacheTier { .. } => ("Internal", false),
                };
                timings.fetch_ms = ms(fetch_began.elapsed());
                timings.total_ms = ms(began.elapsed());
                self.write().remove(&id);
                self.emit(&id, &command_id, failed(v1::LoadPhase::Fetch, reason, e.to_string(), retryable, timings));
                return;
            }
            Err(e) => {
                let failure = Failure { phase: v1::LoadPhase::Fetch, reason: "Internal", retryable: true, began };
                self.fail(&id, &command_id, failure, format!("load task failed: {e}"), timings);
                return;
            }
        };
        let read = fetch_began.elapsed();
        if was_fetched {
            timings.fetch_ms = ms(read);
        } else {
            timings.read_ms = ms(read);
        }
        // Parse, check and convert the weights (on a GPU: host-to-device).
        self.emit(&id, &command_id, loading(v1::LoadPhase::HostToDevice));
        let convert_began = Instant::now();
        let parsed = tokio::task::spawn_blocking(move || load_bytes(&bytes)).await;
        timings.host_to_device_ms = ms(convert_began.elapsed());
        let model = match parsed {
            Ok(Ok(model)) => Arc::new(model),
            Ok(Err(e)) => {
                let failure =
                    Failure { phase: v1::LoadPhase::HostToDevice, reason: "InvalidWeights", retryable: false, began };
                self.fail(&id, &command_id, failure, e.to_string(), timings);
                return;
            }
            Err(e) => {
                let failure =
                    Failure { phase: v1::LoadPhase::HostToDevice, reason: "Internal", retryable: true, began };
                self.fail(&id, &command_id, failure, format!("load task failed: {e}"), timings);
                return;
            }
        };
        // On real GPUs with CUDA present: copy to the first assigned GPU (pinned staging, several streams).
        let mut gpu = None;
        if self.sim.is_none() && crate::cuda::available() && !start.gpu_indexes.is_empty() {
            let streams = match &source.runtime {
                Some(Runtime::Native(n)) if n.copy_streams > 0 => n.copy_streams as usize,
                _ => 4,
            };
            let (cpu_model, ordinal) = (Arc::clone(&model), start.gpu_indexes[0] as usize);
            let loaded =
                tokio::task::spawn_blocking(move || crate::cuda::CudaModel::load(&cpu_model, ordinal, streams)).await;
            match loaded {
                Ok(Ok((cuda_model, copy))) => {
                    timings.host_to_device_ms = ms(copy);
                    gpu = Some(Arc::new(cuda_model));
                }
                Ok(Err(e)) => {
                    let failure =
                        Failure { phase: v1::LoadPhase::HostToDevice, reason: "CudaError", retryable: true, began };
                    self.fail(&id, &command_id, failure, e.to_string(), timings);
                    return;
                }
                Err(e) => {
                    let failure =
                        Failure { phase: v1::LoadPhase::HostToDevice, reason: "Internal", retryable: true, began };
                    self.fail(&id, &command_id, failure, format!("load task failed: {e}"), timings);
                    return;
                }
            }
        }
        // Warm up: one forward pass proves the model runs.
        let init_began = Instant::now();
        let _ = model.forward_one(&vec![0.0; model.input_dim()]);
        timings.init_ms = ms(init_began.elapsed());
        timings.total_ms = ms(began.elapsed());
        let memory = model.param_bytes() as u64;
        let max_concurrency = {
            let mut replicas = self.write();
            let Some(r) = replicas.get_mut(&id) else { return }; // stopped while loading
            r.model = Some(model);
            r.gpu = gpu;
            r.memory_bytes = memory;
            r.max_concurrency
        };
        self.sync_sim();
        let ready = v1::WorkerReady {
            timings: Some(timings),
            source_tier: v1::CacheTier::from(if was_fetched { Tier::Remote } else { tier }) as i32,
            gpu_memory_bytes: memory,
            max_concurrency,
        };
        self.emit(&id, &command_id, Event::Ready(ready));
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
            && let (Some(model), Some(&gpu)) = (&replica.model, replica.gpu_indexes.first())
        {
            self.residents().push(Resident {
                uri: replica.uri.clone(),
                gpu,
                model: Arc::clone(model),
                cuda: replica.gpu.clone(),
                bytes: replica.memory_bytes,
                since: SystemTime::now(),
            });
            exited.weights_resident = true;
            self.sync_sim();
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

    /// Tells simulated GPUs what the replicas hold and serve.
    fn sync_sim(&self) {
        let Some(sim) = &self.sim else { return };
        let mut per_gpu: HashMap<u32, (u64, u32)> = HashMap::new();
        for r in self.read().values() {
            for &g in &r.gpu_indexes {
                let e = per_gpu.entry(g).or_default();
                e.0 += r.memory_bytes;
                e.1 += r.in_flight.load(Ordering::Relaxed);
            }
        }
        for r in self.residents().iter() {
            per_gpu.entry(r.gpu).or_default().0 += r.bytes;
        }
        for g in 0..sim.len() as u32 {
            let (memory, in_flight) = per_gpu.get(&g).copied().unwrap_or_default();
            let _ = sim.set_load(g, memory, in_flight);
        }
    }

    /// Runs one prediction. For a native replica `input` is JSON, `{"input": [numbers]}` or
    /// `{"input": [[numbers], ...]}`; a process replica gets it as is, on `path` (default `/predictions`).
    pub async fn predict(&self, replica_id: &str, input: &[u8]) -> Result<(Vec<u8>, v1::PredictMetrics), Status> {
        self.predict_with(replica_id, input, "application/json", None).await
    }

    /// [`Workers::predict`] with the content type and, for process replicas, the path to post to.
    pub async fn predict_with(
        &self,
        replica_id: &str,
        input: &[u8],
        content_type: &str,
        path: Option<&str>,
    ) -> Result<(Vec<u8>, v1::PredictMetrics), Status> {
        let queued = Instant::now();
        let (backend, in_flight, completed, max) = {
            let replicas = self.read();
            let r = replicas
                .get(replica_id)
                .ok_or_else(|| Status::unavailable(format!("replica {replica_id} is not on this node")))?;
            let backend = match (&r.model, &r.process) {
                (Some(_), _) if r.gpu.is_some() => Backend::Cuda(Arc::clone(r.gpu.as_ref().expect("checked"))),
                (Some(model), _) => Backend::Native(Arc::clone(model)),
                (None, Some(process)) => Backend::Process(Arc::clone(process)),
                (None, None) => return Err(Status::unavailable(format!("replica {replica_id} is loading"))),
            };
            (backend, Arc::clone(&r.in_flight), Arc::clone(&r.completed), r.max_concurrency)
        };
        let slot = in_flight.fetch_add(1, Ordering::AcqRel);
        if slot >= max {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(format!("replica {replica_id} is at its limit of {max} requests")));
        }
        self.sync_sim();
        let queue_ms = queued.elapsed().as_millis() as u64;
        let started = Instant::now();
        let result = match backend {
            Backend::Native(model) => run(model, input).await,
            Backend::Cuda(model) => run_cuda(model, input).await,
            Backend::Process(worker) => proxy(&worker, path.unwrap_or("/predictions"), input, content_type).await,
        };
        in_flight.fetch_sub(1, Ordering::AcqRel);
        self.sync_sim();
        let output = result?;
        completed.fetch_add(1, Ordering::Relaxed);
        Ok((output, v1::PredictMetrics { queue_ms, predict_ms: started.elapsed().as_millis() as u64 }))
    }
}

enum Backend {
    Native(Arc<DenseModel>),
    Cuda(Arc<crate::cuda::CudaModel>),
    Process(Arc<ProcessWorker>),
}

async fn proxy(worker: &ProcessWorker, path: &str, input: &[u8], content_type: &str) -> Result<Vec<u8>, Status> {
    let (status, body) = worker
        .request(path, input, content_type)
        .await
        .map_err(|e| Status::unavailable(format!("the model server did not answer: {e}")))?;
    match status {
        200..=299 => Ok(body),
        400..=499 => Err(Status::invalid_argument(String::from_utf8_lossy(&body).into_owned())),
        _ => Err(Status::internal(format!("the model server answered {status}: {}", String::from_utf8_lossy(&body)))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Rows {
    One(Vec<f32>),
    Many(Vec<Vec<f32>>),
    /// A named input, as the predictions API sends it: `{"x": rows}`.
    Named {
        x: Box<Rows>,
    },
}

#[derive(Debug, Deserialize)]
struct Input {
    input: Rows,
}

fn parse_rows(input: &[u8]) -> Result<(Vec<Vec<f32>>, bool), Status> {
    let parsed: Input = serde_json::from_slice(input).map_err(|_| {
        Status::invalid_argument(
            "the input must be {\"x\": [numbers]} or {\"x\": [[numbers], ...]} (one row, or a batch of rows)",
        )
    })?;
    let (rows, single) = rows_of(parsed.input);
    // JSON numbers beyond f32 (e.g. 1e39) parse as infinity: an input the model cannot take, said as such.
    if let Some((row, index, value)) = first_non_finite(&rows) {
        let at = if single { format!("input index {index}") } else { format!("input row {row}, index {index}") };
        return Err(Status::invalid_argument(format!(
            "{at} is out of the range of a 32-bit float (it reads as {value}); inputs must be finite numbers"
        )));
    }
    Ok((rows, single))
}

fn rows_of(rows: Rows) -> (Vec<Vec<f32>>, bool) {
    match rows {
        Rows::One(row) => (vec![row], true),
        Rows::Many(rows) => (rows, false),
        Rows::Named { x } => rows_of(*x),
    }
}

/// The answer's JSON. JSON has no NaN or infinity (serde_json writes `null`), and a non-finite value is a failure
/// of the model, not an answer: the prediction fails, naming the first such value, with `INTERNAL` (the gateway
/// reports it as a failed prediction with this message, as it does any other failure of the model).
fn encode(out: &[Vec<f32>], single: bool) -> Result<Vec<u8>, Status> {
    if let Some((row, index, value)) = first_non_finite(out) {
        let at = if single { format!("output index {index}") } else { format!("output row {row}, index {index}") };
        return Err(Status::internal(format!(
            "the model produced a non-finite value ({value}) at {at}: NaN or infinity, e.g. from a numeric overflow"
        )));
    }
    let output = if single { serde_json::json!({ "output": out[0] }) } else { serde_json::json!({ "output": out }) };
    Ok(output.to_string().into_bytes())
}

/// The first NaN or infinite value: (row, index in the row, value).
fn first_non_finite(out: &[Vec<f32>]) -> Option<(usize, usize, f32)> {
    out.iter()
        .enumerate()
        .find_map(|(row, values)| values.iter().position(|v| !v.is_finite()).map(|index| (row, index, values[index])))
}

async fn run_cuda(model: Arc<crate::cuda::CudaModel>, input: &[u8]) -> Result<Vec<u8>, Status> {
    let (rows, single) = parse_rows(input)?;
    let out = tokio::task::spawn_blocking(move || model.forward(&rows))
        .await
        .map_err(|e| Status::internal(format!("the model failed: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    encode(&out, single)
}

async fn run(model: Arc<DenseModel>, input: &[u8]) -> Result<Vec<u8>, Status> {
    let (rows, single) = parse_rows(input)?;
    let out = tokio::task::spawn_blocking(move || model.forward(&rows))
        .await
        .map_err(|e| Status::internal(format!("the model failed: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    encode(&out, single)
}

/// The `WorkerService` of this node.
#[derive(Debug, Clone)]
pub struct WorkerApi(pub Arc<Workers>);

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::PredictChunk, Status>> + Send>>;

#[tonic::async_trait]
impl v1::worker_service_server::WorkerService for WorkerApi {
    async fn predict(&self, request: Request<v1::PredictRequest>) -> Result<Response<v1::PredictResponse>, Status> {
        let r = request.into_inner();
        let content_type = if r.content_type.is_empty() { "application/json" } else { r.content_type.as_str() };
        let path = r.metadata.get("path").map(String::as_str);
        let (output, metrics) = self.0.predict_with(&r.replica_id, &r.input, content_type, path).await?;
        Ok(Response::new(v1::PredictResponse {
            prediction_id: r.prediction_id,
            output,
            content_type: "application/json".into(),
            metrics: Some(metrics),
        }))
    }

    type PredictStreamStream = ChunkStream;

    /// A dense model answers at once: one final chunk.
    async fn predict_stream(&self, request: Request<v1::PredictRequest>) -> Result<Response<ChunkStream>, Status> {
        let r = request.into_inner();
        let (output, metrics) = self.0.predict(&r.replica_id, &r.input).await?;
        let chunk = v1::PredictChunk {
            prediction_id: r.prediction_id,
            index: 0,
            data: output,
            content_type: "application/json".into(),
            r#final: true,
            metrics: Some(metrics),
        };
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(chunk)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cache::digest_of, model::example_model};

    fn setup(name: &str) -> (Arc<Workers>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("kiln-workers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cache = Arc::new(WeightCache::open(&dir.join("cache"), 1 << 30, 1 << 30).unwrap());
        (Workers::new(cache, None, vec![80 << 30; 8]), dir)
    }

    fn start(replica: &str, uri: &str, digest: &str) -> v1::StartWorker {
        v1::StartWorker {
            replica_id: replica.into(),
            deployment: "ns/m".into(),
            model: Some(v1::ModelSource {
                uri: uri.into(),
                digest: digest.into(),
                runtime: Some(Runtime::Native(v1::NativeRuntime::default())),
                ..Default::default()
            }),
            max_concurrency: 2,
            gpu_indexes: vec![0],
            gpu_uuids: vec!["GPU-0".into()],
            ..Default::default()
        }
    }

    async fn until_done(events: &mut broadcast::Receiver<v1::WorkerEvent>, replica: &str) -> Event {
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
            if e.replica_id == replica && matches!(e.event, Some(Event::Ready(_) | Event::Failed(_))) {
                return e.event.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_native_replica_loads_answers_and_a_truncated_one_fails_without_disturbing_it() {
        let (workers, dir) = setup("native");
        let bytes = example_model(7, &[4, 8, 3]);
        let good = dir.join("good.safetensors");
        std::fs::write(&good, &bytes).unwrap();
        let mut events = workers.subscribe();
        let (status, _) = workers.start("c1", start("r1", &format!("file://{}", good.display()), &digest_of(&bytes)));
        assert_eq!(status, v1::AckStatus::Accepted);
        let Event::Ready(ready) = until_done(&mut events, "r1").await else { panic!("r1 failed") };
        assert_eq!(ready.source_tier, v1::CacheTier::Remote as i32, "fetched into the cache on a miss");
        assert_eq!(ready.max_concurrency, 2);
        let (out, _) = workers.predict("r1", br#"{"input": [0.1, 0.2, 0.3, 0.4]}"#).await.unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["output"].as_array().unwrap().len(), 3);
        let err = workers.predict("r1", br#"{"input": [1.0]}"#).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // A truncated file: the start fails with a clear event, r1 keeps serving.
        let bad = dir.join("bad.safetensors");
        std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
        workers.start("c2", start("r2", &format!("file://{}", bad.display()), ""));
        let Event::Failed(f) = until_done(&mut events, "r2").await else { panic!("r2 should fail") };
        assert_eq!(f.reason, "InvalidWeights");
        assert!(!f.retryable);
        assert!(f.message.contains("not a valid safetensors file"), "{}", f.message);
        assert!(workers.predict("r1", br#"{"input": [[0,0,0,0]]}"#).await.is_ok());
        assert_eq!(workers.predict("r2", b"{}").await.unwrap_err().code(), tonic::Code::Unavailable);

        // The same replica twice is not started twice; stopping it is idempotent.
        assert_eq!(workers.start("c3", start("r1", "file:///x", "")).0, v1::AckStatus::AlreadyDone);
        let stop = v1::StopWorker { replica_id: "r1".into(), grace_period_ms: 100, keep_weights_resident: true };
        assert_eq!(workers.stop(&stop).await.0, v1::AckStatus::Done);
        assert_eq!(workers.stop(&stop).await.0, v1::AckStatus::AlreadyDone);
        assert!(workers.running().is_empty());
        assert_eq!(workers.resident_copies().len(), 1, "the weights stayed resident");

        // The same model again on the same GPU: a warm start from the resident copy.
        let uri = format!("file://{}", good.display());
        workers.start("c4", start("r4", &uri, &digest_of(&bytes)));
        let Event::Ready(ready) = until_done(&mut events, "r4").await else { panic!("r4 failed") };
        assert_eq!(ready.source_tier, v1::CacheTier::Gpu as i32);
        assert!(workers.resident_copies().is_empty());
        assert!(workers.predict("r4", br#"{"input": [1, 2, 3, 4]}"#).await.is_ok());
        // Evicting a model's resident copies.
        workers
            .stop(&v1::StopWorker { replica_id: "r4".into(), keep_weights_resident: true, ..Default::default() })
            .await;
        assert_eq!(workers.evict_resident(&uri, Some(0)), 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A model whose weights overflow f32 (3e38 · 1 + 3e38 · 2 = inf):
    /// the prediction fails with INTERNAL naming the output index, instead of succeeding with `null`s; over the
    /// `WorkerService` the gateway gets the same status. An input beyond f32 is the caller's error.
    #[tokio::test]
    async fn non_finite_outputs_fail_the_prediction_and_name_the_index() {
        use crate::model::{Activation, Dtype, write_model};
        use tokio_stream::wrappers::TcpListenerStream;

        let (workers, dir) = setup("overflow");
        // outputs: [x0, 3e38·x0 + 3e38·x1]
        let layers = vec![(vec![1.0, 0.0, 3.0e38, 3.0e38], vec![], 2, 2)];
        let bytes = write_model(&layers, Activation::Identity, Dtype::F32);
        let path = dir.join("overflow.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let mut events = workers.subscribe();
        workers.start("c1", start("r1", &format!("file://{}", path.display()), &digest_of(&bytes)));
        let Event::Ready(_) = until_done(&mut events, "r1").await else { panic!("r1 failed") };

        // In range: an answer.
        let (out, _) = workers.predict("r1", br#"{"input": [1.0, 0.0]}"#).await.unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let values: Vec<f32> = serde_json::from_value(out["output"].clone()).unwrap();
        assert_eq!(values, [1.0, 3.0e38]);
        // Overflow: a failure naming the index.
        let err = workers.predict("r1", br#"{"input": [1.0, 2.0]}"#).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert_eq!(
            err.message(),
            "the model produced a non-finite value (inf) at output index 1: NaN or infinity, e.g. from a numeric overflow"
        );
        // In a batch, the row too; the counter of completed predictions leaves failures out.
        let err = workers.predict("r1", br#"{"input": [[1, 0], [0, -2], [0, 1]]}"#).await.unwrap_err();
        assert!(err.message().contains("(-inf) at output row 1, index 1"), "{}", err.message());
        // An input beyond f32 is invalid input, not a model failure.
        let err = workers.predict("r1", br#"{"input": [1e39, 0]}"#).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("input index 0 is out of the range of a 32-bit float"), "{}", err.message());

        // Over gRPC, as the gateway calls it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(v1::worker_service_server::WorkerServiceServer::new(WorkerApi(Arc::clone(&workers))))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = v1::worker_service_client::WorkerServiceClient::new(channel);
        let request = |input: &[u8]| v1::PredictRequest {
            replica_id: "r1".into(),
            input: input.to_vec(),
            content_type: "application/json".into(),
            ..Default::default()
        };
        let status = client.predict(request(br#"{"input": [1.0, 2.0]}"#)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().contains("non-finite value (inf) at output index 1"), "{}", status.message());
        let ok = client.predict(request(br#"{"input": [1.0, 0.0]}"#)).await.unwrap().into_inner();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&ok.output).unwrap()["output"][0], 1.0);
        std::fs::remove_dir_all(&dir).ok();
    }
}
