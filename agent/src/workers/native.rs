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
    cache::{CacheError, Tier},
    model::{DenseModel, load_bytes},
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
