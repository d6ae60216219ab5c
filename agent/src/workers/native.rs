//! The native runtime: a dense safetensors model loaded from the weight cache (fetched into it on a miss, or taken
//! over from an idle copy left in GPU memory), timed by phase, copied to the GPU where CUDA is present; and its
//! predictions, JSON rows in and out.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use kiln_proto::v1::{self, model_source::Runtime, worker_event::Event};
use serde::Deserialize;
use tonic::Status;

use super::{
    Workers,
    lifecycle::{Failure, failed},
};
use crate::{
    cache::{CacheError, Tier, Weights},
    model::{DenseModel, LoadTimings, load_bytes, load_file},
};

impl Workers {
    pub(super) async fn load(self: Arc<Self>, command_id: String, start: v1::StartWorker, source: v1::ModelSource) {
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
            timings.init_ms = timings.total_ms;
            let max_concurrency = {
                let mut replicas = self.write();
                let Some(r) = replicas.get_mut(&id) else { return };
                r.model = copy.model;
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
        // Phases are consecutive intervals of one clock from `began`, each rounded as the running total is, so they
        // add up to `total_ms` exactly: every millisecond of the start is in a named phase.
        let mut phases = Phases::new(began);
        // Fetch: find the weights in the cache (a stat and a cheap check on a hit; on a miss, stream the source
        // into the disk cache, hashing it once).
        self.emit(&id, &command_id, loading(v1::LoadPhase::Fetch));
        let cache = Arc::clone(&self.cache);
        let (uri, digest) = (source.uri.clone(), source.digest.clone());
        let located =
            tokio::task::spawn_blocking(move || cache.locate(&uri, (!digest.is_empty()).then_some(digest.as_str())))
                .await;
        let located = match located {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                let (reason, retryable) = match &e {
                    CacheError::Io { .. } | CacheError::Unsupported { .. } => ("ModelNotFound", true),
                    CacheError::Corrupt { .. } | CacheError::DigestMismatch { .. } => ("InvalidWeights", false),
                    CacheError::TooLarge { .. } => ("OutOfMemory", false),
                    CacheError::NotACacheTier { .. } => ("Internal", false),
                };
                timings.fetch_ms = phases.next();
                timings.total_ms = phases.total();
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
        timings.fetch_ms = phases.next();
        let tier = located.tier;
        self.emit(&id, &command_id, loading(v1::LoadPhase::Read));
        let on_gpu = self.sim.is_none() && crate::cuda::available() && !start.gpu_indexes.is_empty();
        let (model, gpu, memory) = if on_gpu {
            // Real GPU: stream the weights from the file (or host RAM) through pinned buffers to the GPU; no CPU
            // copy of the model is made.
            let streams = match &source.runtime {
                Some(Runtime::Native(n)) if n.copy_streams > 0 => n.copy_streams as usize,
                _ => crate::cuda::DEFAULT_COPY_STREAMS,
            };
            let (weights, ordinal) = (located.weights, start.gpu_indexes[0] as usize);
            let loaded =
                tokio::task::spawn_blocking(move || crate::cuda::CudaModel::load_weights(&weights, ordinal, streams))
                    .await;
            match loaded {
                Ok(Ok((cuda_model, t))) => {
                    timings.read_ms = phases.advance(t.read);
                    timings.init_ms = phases.advance(t.init);
                    timings.host_to_device_ms = phases.next();
                    let memory = cuda_model.device_bytes();
                    (None, Some(Arc::new(cuda_model)), memory)
                }
                Ok(Err(e)) => {
                    let (reason, retryable) = cuda_failure(&e);
                    let failure = Failure { phase: v1::LoadPhase::HostToDevice, reason, retryable, began };
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
        } else {
            // CPU: read the cached file in chunks straight into the model's buffers, converting on the way.
            let weights = located.weights;
            let parsed = tokio::task::spawn_blocking(move || match &weights {
                Weights::File { path, .. } => load_file(path),
                Weights::Host(bytes) => {
                    let started = Instant::now();
                    load_bytes(bytes).map(|m| (m, LoadTimings { convert: started.elapsed(), ..Default::default() }))
                }
            })
            .await;
            match parsed {
                Ok(Ok((model, t))) => {
                    timings.read_ms = phases.advance(t.read + t.parse);
                    timings.host_to_device_ms = phases.next();
                    let memory = model.param_bytes() as u64;
                    (Some(Arc::new(model)), None, memory)
                }
                Ok(Err(e)) => {
                    let failure =
                        Failure { phase: v1::LoadPhase::Read, reason: "InvalidWeights", retryable: false, began };
                    self.fail(&id, &command_id, failure, e.to_string(), timings);
                    return;
                }
                Err(e) => {
                    let failure = Failure { phase: v1::LoadPhase::Read, reason: "Internal", retryable: true, began };
                    self.fail(&id, &command_id, failure, format!("load task failed: {e}"), timings);
                    return;
                }
            }
        };
        // Warm up: one forward pass proves the model runs.
        self.emit(&id, &command_id, loading(v1::LoadPhase::Init));
        let warm_up = match (&model, &gpu) {
            (_, Some(g)) => g.forward(&[vec![0.0; g.input_dim()]]).map(drop).map_err(|e| e.to_string()),
            (Some(m), None) => m.forward_one(&vec![0.0; m.input_dim()]).map(drop).map_err(|e| e.to_string()),
            (None, None) => Ok(()),
        };
        if let Err(e) = warm_up {
            timings.init_ms += phases.next();
            let failure = Failure { phase: v1::LoadPhase::Init, reason: "CudaError", retryable: false, began };
            self.fail(&id, &command_id, failure, format!("the first forward pass failed: {e}"), timings);
            return;
        }
        let max_concurrency = {
            let mut replicas = self.write();
            let Some(r) = replicas.get_mut(&id) else { return }; // stopped while loading
            r.model = model;
            r.gpu = gpu;
            r.memory_bytes = memory;
            r.max_concurrency
        };
        self.sync_sim();
        timings.init_ms += phases.next();
        timings.total_ms = phases.total();
        let ready = v1::WorkerReady {
            timings: Some(timings),
            source_tier: v1::CacheTier::from(tier) as i32,
            gpu_memory_bytes: memory,
            max_concurrency,
        };
        self.emit(&id, &command_id, Event::Ready(ready));
    }
}

/// The reason and retryability of a CUDA failure at start: a missing or stub driver and an out-of-memory GPU do
/// not go away by retrying the same start on the same node (the controller backs off instead of looping).
pub(super) fn cuda_failure(e: &crate::cuda::CudaError) -> (&'static str, bool) {
    match e.kind() {
        crate::cuda::CudaErrorKind::Unavailable => ("CudaUnavailable", false),
        crate::cuda::CudaErrorKind::OutOfMemory => ("OutOfMemory", false),
        crate::cuda::CudaErrorKind::InvalidWeights => ("InvalidWeights", false),
        crate::cuda::CudaErrorKind::Other => ("CudaError", true),
    }
}

/// Consecutive phases of a start on one clock: each phase's milliseconds are the difference of the running total
/// rounded at its end and at its start, so the phases add up to the total exactly.
#[derive(Debug)]
pub(super) struct Phases {
    began: Instant,
    /// The end of the last phase, from `began`.
    at: Duration,
}

impl Phases {
    pub(super) fn new(began: Instant) -> Self {
        Self { began, at: Duration::ZERO }
    }

    fn ms(d: Duration) -> u64 {
        (d.as_micros() as u64 + 500) / 1000
    }

    /// A phase of length `d` ending now-or-earlier: its milliseconds.
    pub(super) fn advance(&mut self, d: Duration) -> u64 {
        let end = (self.at + d).min(self.began.elapsed());
        let ms = Self::ms(end) - Self::ms(self.at);
        self.at = end;
        ms
    }

    /// The phase from the last one's end until now: its milliseconds.
    pub(super) fn next(&mut self) -> u64 {
        let end = self.began.elapsed();
        let ms = Self::ms(end).saturating_sub(Self::ms(self.at));
        self.at = end.max(self.at);
        ms
    }

    /// All phases so far: the sum of what [`Self::advance`] and [`Self::next`] returned.
    pub(super) fn total(&self) -> u64 {
        Self::ms(self.at)
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

pub(super) async fn run_cuda(model: Arc<crate::cuda::CudaModel>, input: &[u8]) -> Result<Vec<u8>, Status> {
    let (rows, single) = parse_rows(input)?;
    let out = tokio::task::spawn_blocking(move || model.forward(&rows))
        .await
        .map_err(|e| Status::internal(format!("the model failed: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    encode(&out, single)
}

pub(super) async fn run(model: Arc<DenseModel>, input: &[u8]) -> Result<Vec<u8>, Status> {
    let (rows, single) = parse_rows(input)?;
    let out = tokio::task::spawn_blocking(move || model.forward(&rows))
        .await
        .map_err(|e| Status::internal(format!("the model failed: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    encode(&out, single)
}
