//! Model replicas hosted by this agent, and the `WorkerService` the gateway calls them through.
//!
//! Runtimes: `native` — a dense safetensors model ([`crate::model`]) found in the weight cache (fetched into it on
//! a miss) and read from the cached file in chunks straight into the model's buffers, on the CPU; where the CUDA
//! libraries are present and the replica has a GPU, streamed from the file through pinned buffers onto its first
//! GPU instead ([`crate::cuda`], no CPU copy of the model) — and `process` ([`crate::process`]): an external model
//! server the agent launches, waits on, proxies to and stops. A start is timed as consecutive phases that add up
//! to its total (fetch: the cache lookup or the fetch from the source; read: the file's header and, on the CPU,
//! its chunks; host-to-device: the conversion on the CPU or the pipeline to the GPU; init: CUDA setup and the
//! first forward pass), and reports the tier its weights really came from (GPU idle copy, host RAM, disk cache,
//! or the source). Lifecycle changes go to the controller as worker events. Each replica has a concurrency limit
//! (`RESOURCE_EXHAUSTED` beyond it) and an in-flight count. A replica whose weights are missing or invalid, whose
//! GPU cannot be used (no driver, a stub library, out of memory: not retryable), or whose server exits, fails with
//! an event saying why; the other replicas keep serving.
//!
//! This module holds the replica table and its bookkeeping (events, idle resident copies, loads reported to the
//! controller and to simulated GPUs); `lifecycle` starts and stops replicas (and launches and watches process
//! workers), `native` loads native models and runs their predictions, `service` is the request path
//! ([`Workers::predict`], [`WorkerApi`]).

mod lifecycle;
mod native;
mod service;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use kiln_proto::{
    convert,
    v1::{self, worker_event::Event},
};
use tokio::sync::broadcast;

pub use service::WorkerApi;

use crate::{cache::WeightCache, gpu::sim::SimHandle, model::DenseModel, process::ProcessWorker};

/// Weights left in (simulated or real) GPU memory by a replica stopped with `keep_weights_resident`: a later start
/// of the same model on the same GPU reuses them (a warm start) unless the memory was needed first.
#[derive(Debug)]
struct Resident {
    uri: String,
    /// The spec's digest of the weights (empty: none given).
    digest: String,
    gpu: u32,
    /// The CPU model (the CPU path), or `None` where the weights live only on the GPU (`cuda`).
    model: Option<Arc<DenseModel>>,
    cuda: Option<Arc<crate::cuda::CudaModel>>,
    bytes: u64,
    since: SystemTime,
}

#[derive(Debug)]
struct Replica {
    uri: String,
    /// The spec's digest of the weights (empty: none given).
    digest: String,
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

/// An idle copy of a model's weights left in GPU memory, as reported to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidentCopy {
    /// The model's URI.
    pub uri: String,
    /// The GPU holding it.
    pub gpu: u32,
    /// Bytes it holds.
    pub bytes: u64,
    /// Since when it is idle.
    pub since: SystemTime,
}

/// One replica's state, for metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReplicaMetrics {
    /// Replica id.
    pub replica: String,
    /// `namespace/name` of its deployment.
    pub deployment: String,
    /// Whether it serves.
    pub ready: bool,
    /// Requests being served.
    pub in_flight: u32,
    /// Requests completed.
    pub completed: u64,
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

    /// Idle resident copies (for cache reports).
    pub fn resident_copies(&self) -> Vec<ResidentCopy> {
        self.residents()
            .iter()
            .map(|r| ResidentCopy { uri: r.uri.clone(), gpu: r.gpu, bytes: r.bytes, since: r.since })
            .collect()
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
                    self.demote(&gone.uri, &gone.digest);
                }
            }
        }
    }

    /// Keeps the weights of `uri` in the cache's host-RAM tier, in the background, as they leave this node's GPUs
    /// (an idle copy evicted to make room, a replica stopped without keeping its weights): the model's next start
    /// then reads memory (pinned where CUDA runs, so copied at the bus's speed) instead of the disk cache. Only
    /// weights the disk cache holds, loaded without hashing; the host tier's LRU decides what stays.
    fn demote(&self, uri: &str, digest: &str) {
        if self.cache.capacities().0 == 0 {
            return;
        }
        let (cache, uri, digest) = (Arc::clone(&self.cache), uri.to_owned(), digest.to_owned());
        let job = move || match cache.hold_in_host(&uri, (!digest.is_empty()).then_some(digest.as_str())) {
            Ok(Some(entry)) => tracing::debug!(uri, bytes = entry.size, "weights kept in host RAM"),
            Ok(None) => {}
            Err(e) => tracing::debug!(uri, "weights not kept in host RAM: {e}"),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(job)),
            Err(_) => drop(std::thread::spawn(job)),
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
    fn fail(
        &self,
        id: &str,
        command_id: &str,
        failure: lifecycle::Failure,
        message: String,
        mut timings: v1::LoadTimings,
    ) {
        timings.total_ms = timings.total_ms.max(failure.began.elapsed().as_millis() as u64);
        self.write().remove(id);
        let (phase, reason, retryable) = (failure.phase, failure.reason, failure.retryable);
        self.emit(id, command_id, lifecycle::failed(phase, reason, message, retryable, timings));
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
                phase: if r.model.is_some() || r.gpu.is_some() || r.process.is_some() {
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

    /// Every replica's state, by replica id (for metrics).
    pub fn metrics(&self) -> Vec<ReplicaMetrics> {
        let mut out: Vec<_> = self
            .read()
            .iter()
            .map(|(id, r)| ReplicaMetrics {
                replica: id.clone(),
                deployment: r.deployment.clone(),
                ready: r.model.is_some() || r.gpu.is_some() || r.process.is_some(),
                in_flight: r.in_flight.load(Ordering::Relaxed),
                completed: r.completed.load(Ordering::Relaxed),
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
}
