//! The request path: a prediction taken by a replica within its concurrency limit, run natively or proxied to a
//! process worker, and the `WorkerService` over it.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use kiln_proto::v1;
use tonic::{Request, Response, Status};

use super::{Workers, native};
use crate::{model::DenseModel, process::ProcessWorker};

impl Workers {
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
            let backend = match (&r.model, &r.gpu, &r.process) {
                (_, Some(gpu), _) => Backend::Cuda(Arc::clone(gpu)),
                (Some(model), None, _) => Backend::Native(Arc::clone(model)),
                (None, None, Some(process)) => Backend::Process(Arc::clone(process)),
                (None, None, None) => return Err(Status::unavailable(format!("replica {replica_id} is loading"))),
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
            Backend::Native(model) => native::run(model, input).await,
            Backend::Cuda(model) => native::run_cuda(model, input).await,
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
