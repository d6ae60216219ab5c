//! The request path: a prediction taken by a replica within its concurrency limit, run natively or proxied to a
//! process worker, and the `WorkerService` over it.

use std::{
    ops::Deref,
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
        let (backend, slot) = Workers::take_slot(self, replica_id)?;
        let started = Instant::now();
        let output = run(backend, input, content_type, path).await?;
        Ok((output, slot.done(started)))
    }

    /// Runs one prediction whose output is streamed: a process replica is asked for Cog's server-sent events
    /// (`Accept: text/event-stream`) and each `output` event becomes a chunk as the server writes it (its `chunk`,
    /// as JSON), the `completed` event the final chunk (the prediction object, whose `output` is the whole output).
    /// A server that does not stream (406, as Cog answers for a model without `@streaming`, or a JSON answer) and a
    /// native replica answer with one final chunk. The replica's slot is held until the stream ends or is dropped.
    pub async fn predict_stream(
        self: &Arc<Self>,
        replica_id: &str,
        prediction_id: String,
        input: &[u8],
        content_type: &str,
        path: Option<&str>,
    ) -> Result<ChunkStream, Status> {
        let (backend, slot) = Workers::take_slot(Arc::clone(self), replica_id)?;
        let started = Instant::now();
        let once = |output: Vec<u8>, slot: Slot<Arc<Workers>>| -> ChunkStream {
            let chunk = v1::PredictChunk {
                prediction_id: prediction_id.clone(),
                index: 0,
                data: output,
                content_type: "application/json".into(),
                r#final: true,
                metrics: Some(slot.done(started)),
            };
            Box::pin(tokio_stream::once(Ok(chunk)))
        };
        let Backend::Process(worker) = backend else {
            let output = run(backend, input, content_type, path).await?;
            return Ok(once(output, slot));
        };
        let path = path.unwrap_or("/predictions");
        let answer = worker
            .request_events(path, input, content_type)
            .await
            .map_err(|e| Status::unavailable(format!("the model server did not answer: {e}")))?;
        if answer.status == 406 {
            // Not a streaming model: asked again for its JSON answer.
            let output = proxy(&worker, path, input, content_type).await?;
            return Ok(once(output, slot));
        }
        if answer.content_type != "text/event-stream" || !(200..300).contains(&answer.status) {
            let status = answer.status;
            let body = answer
                .read_all()
                .await
                .map_err(|e| Status::unavailable(format!("the model server's answer broke off: {e}")))?;
            return Ok(once(answer_of(status, body)?, slot));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(relay_events(answer, tx, prediction_id, slot, started));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// A slot of `replica_id` within its concurrency limit, with what runs it.
    fn take_slot<W: Deref<Target = Workers>>(this: W, replica_id: &str) -> Result<(Backend, Slot<W>), Status> {
        let queued = Instant::now();
        let (backend, in_flight, completed, max) = {
            let replicas = this.read();
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
        this.sync_sim();
        let queue_ms = queued.elapsed().as_millis() as u64;
        Ok((backend, Slot { workers: this, in_flight, completed, queue_ms, succeeded: false }))
    }
}

/// A request's place within its replica's concurrency limit, given back on drop (the simulated GPUs see the load).
struct Slot<W: Deref<Target = Workers>> {
    workers: W,
    in_flight: Arc<std::sync::atomic::AtomicU32>,
    completed: Arc<std::sync::atomic::AtomicU64>,
    queue_ms: u64,
    succeeded: bool,
}

impl<W: Deref<Target = Workers>> Slot<W> {
    /// The request succeeded: counted as completed; its metrics.
    fn done(mut self, started: Instant) -> v1::PredictMetrics {
        self.succeeded = true;
        v1::PredictMetrics { queue_ms: self.queue_ms, predict_ms: started.elapsed().as_millis() as u64 }
    }
}

impl<W: Deref<Target = Workers>> Drop for Slot<W> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.workers.sync_sim();
        if self.succeeded {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(backend: Backend, input: &[u8], content_type: &str, path: Option<&str>) -> Result<Vec<u8>, Status> {
    match backend {
        Backend::Native(model) => native::run(model, input).await,
        Backend::Cuda(model) => native::run_cuda(model, input).await,
        Backend::Process(worker) => proxy(&worker, path.unwrap_or("/predictions"), input, content_type).await,
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
    answer_of(status, body)
}

/// The model server's answer as the output, or the error its status says.
fn answer_of(status: u16, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    match status {
        200..=299 => Ok(body),
        400..=499 => Err(Status::invalid_argument(String::from_utf8_lossy(&body).into_owned())),
        _ => Err(Status::internal(format!("the model server answered {status}: {}", String::from_utf8_lossy(&body)))),
    }
}

/// Reads Cog's prediction events from the model server as they arrive and sends them on as chunks: each `output`
/// event's `chunk` (as JSON) in order, then the `completed` prediction as the final chunk, or the error it ended
/// with (`failed`: INTERNAL with its `error`; `canceled`: CANCELLED; an `error` event or a stream that ends before
/// `completed`: INTERNAL). Stops, closing the connection to the model server, when the receiver is dropped.
async fn relay_events(
    mut answer: crate::process::ResponseStream,
    tx: tokio::sync::mpsc::Sender<Result<v1::PredictChunk, Status>>,
    prediction_id: String,
    slot: Slot<Arc<Workers>>,
    started: Instant,
) {
    let mut parser = crate::process::EventParser::default();
    let mut index = 0;
    let mut slot = Some(slot);
    let end = loop {
        let piece = match answer.next_bytes().await {
            Ok(Some(piece)) => piece,
            Ok(None) => {
                break Err(Status::internal("the model server's event stream ended before the prediction completed"));
            }
            Err(e) => break Err(Status::internal(format!("the model server's event stream broke off: {e}"))),
        };
        let events = match parser.push(&piece) {
            Ok(events) => events,
            Err(e) => break Err(Status::internal(format!("the model server's event stream is malformed: {e}"))),
        };
        let mut finished = None;
        for event in events {
            match chunk_of(&event, &prediction_id, index) {
                Ok(Some(mut chunk)) => {
                    if chunk.r#final {
                        chunk.metrics = slot.take().map(|s| s.done(started));
                        finished = Some(Ok(chunk));
                        break;
                    }
                    index += 1;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // The caller went away.
                    }
                }
                Ok(None) => {}
                Err(status) => {
                    finished = Some(Err(status));
                    break;
                }
            }
        }
        if let Some(end) = finished {
            break end;
        }
    };
    // The slot is given back (and a success counted) before the caller hears the end.
    drop(slot);
    let _ = tx.send(end).await;
}

/// The chunk a Cog prediction event stands for: `output` (`{"chunk", "index"}`) a partial output, `completed` the
/// final chunk (or the error it reports), `error` an error; `start`, `log`, `metric` and others none.
fn chunk_of(
    event: &crate::process::ServerSentEvent,
    prediction_id: &str,
    index: u64,
) -> Result<Option<v1::PredictChunk>, Status> {
    let malformed =
        |e: serde_json::Error| Status::internal(format!("the model server's {} event is not JSON: {e}", event.event));
    let chunk = |data: Vec<u8>, last: bool| v1::PredictChunk {
        prediction_id: prediction_id.to_owned(),
        index,
        data,
        content_type: "application/json".into(),
        r#final: last,
        metrics: None,
    };
    match event.event.as_str() {
        "output" => {
            let value: serde_json::Value = serde_json::from_str(&event.data).map_err(malformed)?;
            let Some(output) = value.get("chunk") else {
                return Err(Status::internal("the model server's output event has no \"chunk\""));
            };
            Ok(Some(chunk(output.to_string().into_bytes(), false)))
        }
        "completed" => {
            let value: serde_json::Value = serde_json::from_str(&event.data).map_err(malformed)?;
            let error =
                || value.get("error").and_then(serde_json::Value::as_str).unwrap_or("no error given").to_owned();
            match value.get("status").and_then(serde_json::Value::as_str) {
                Some("succeeded") | None => Ok(Some(chunk(event.data.clone().into_bytes(), true))),
                Some("canceled") => Err(Status::cancelled("the model server canceled the prediction")),
                Some(_) => Err(Status::internal(format!("the model failed: {}", error()))),
            }
        }
        "error" => Err(Status::internal(format!("the model server's event stream failed: {}", event.data))),
        _ => Ok(None),
    }
}

/// The `WorkerService` of this node.
#[derive(Debug, Clone)]
pub struct WorkerApi(pub Arc<Workers>);

impl WorkerApi {
    /// What the worker port serves: `WorkerService` over gRPC (HTTP/2) and its `Predict` over plain HTTP/1.1
    /// ([`kiln_proto::worker_http`]), told apart by the HTTP/2 preface when served by
    /// the node (`node::serve_worker`).
    pub fn router(self) -> axum::Router {
        use kiln_proto::worker_http::{MAX_BODY_BYTES, PREDICT_PATH};
        let http = axum::routing::post(predict_http).with_state(Arc::clone(&self.0));
        tonic::service::Routes::new(v1::worker_service_server::WorkerServiceServer::new(self))
            .into_axum_router()
            .route(PREDICT_PATH, http.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES)))
    }
}

/// `POST /v1/predict`: [`Workers::predict_with`] over HTTP/1.1, answered as [`kiln_proto::worker_http`] says.
async fn predict_http(
    axum::extract::State(workers): axum::extract::State<Arc<Workers>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::{http::header::CONTENT_TYPE, response::IntoResponse};
    use kiln_proto::worker_http::{PATH_HEADER, REPLICA_HEADER, STATUS_HEADER, http_status};
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let answer = match header(REPLICA_HEADER) {
        Some(replica) => {
            let content_type = header(CONTENT_TYPE.as_str()).unwrap_or("application/json");
            workers.predict_with(replica, &body, content_type, header(PATH_HEADER)).await
        }
        None => Err(Status::invalid_argument(format!("the request names no replica ({REPLICA_HEADER})"))),
    };
    match answer {
        Ok((output, _)) => ([(CONTENT_TYPE, "application/json")], output).into_response(),
        Err(status) => {
            let code = axum::http::StatusCode::from_u16(http_status(status.code()))
                .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
            let headers = [
                (CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
                (axum::http::HeaderName::from_static(STATUS_HEADER), (status.code() as i32).to_string()),
            ];
            (code, headers, status.message().to_owned()).into_response()
        }
    }
}

/// The chunks of a streamed prediction.
pub type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::PredictChunk, Status>> + Send>>;

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

    /// Partial outputs as the model produces them ([`Workers::predict_stream`]); a dense model answers at once, in
    /// one final chunk.
    async fn predict_stream(&self, request: Request<v1::PredictRequest>) -> Result<Response<ChunkStream>, Status> {
        let r = request.into_inner();
        let content_type = if r.content_type.is_empty() { "application/json" } else { r.content_type.as_str() };
        let path = r.metadata.get("path").map(String::as_str);
        let chunks =
            self.0.predict_stream(&r.replica_id, r.prediction_id.clone(), &r.input, content_type, path).await?;
        Ok(Response::new(chunks))
    }
}
