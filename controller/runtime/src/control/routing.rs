//! The request path: the gateway's [`Backend`] over the control plane. A request goes to the least-loaded ready
//! replica with a free slot, over its node's `WorkerService` (clients cached per endpoint, [`WorkerClients`]); with
//! none free it waits in the deployment's bounded [`HoldQueue`] while the loop is woken to start one. A replica that
//! turns out unreachable is given up and the request routed again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::http2::SendRequest;
use kiln_core::control::{Action, Route, StopReason};
use kiln_proto::v1::{self, worker_service_client::WorkerServiceClient};
use serde_json::Value;
use tokio::sync::watch;

use super::{ControlPlane, http1::WorkerHttp};
use crate::gateway::{Backend, GpuUse, Outcome, OutputSink, PredictError};

/// Requests held for one deployment while it has no ready replica: bounded, woken together when a replica is
/// ready.
#[derive(Debug)]
pub struct HoldQueue {
    capacity: usize,
    held: Mutex<usize>,
    state: watch::Sender<HoldState>,
}

/// What held requests wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// No replica has a free slot yet.
    Waiting,
    /// A ready replica has a free slot: held requests go and get routed.
    Ready,
    /// The deployment's replicas fail to start: held requests go and fail with the reason.
    Failed,
}

/// A place in a [`HoldQueue`], given back on drop.
#[derive(Debug)]
pub struct Held<'a>(&'a HoldQueue);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self.0.held.lock().unwrap_or_else(|p| p.into_inner());
        *held = held.saturating_sub(1);
    }
}

impl HoldQueue {
    /// A queue holding at most `capacity` requests.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, held: Mutex::new(0), state: watch::channel(HoldState::Waiting).0 }
    }

    /// Requests held now.
    pub fn len(&self) -> usize {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a replica is ready.
    pub fn is_ready(&self) -> bool {
        *self.state.borrow() == HoldState::Ready
    }

    /// Sets whether a replica is ready; held requests wake when it becomes true.
    pub fn set_ready(&self, ready: bool) {
        self.set_state(if ready { HoldState::Ready } else { HoldState::Waiting });
    }

    /// Sets what held requests wait for; they wake on anything but [`HoldState::Waiting`].
    pub fn set_state(&self, state: HoldState) {
        self.state.send_if_modified(|s| std::mem::replace(s, state) != state);
    }

    /// Holds one request until a replica is ready, the deployment fails, or `timeout` passes; `Err(None)` when
    /// the queue is full, `Err(Some(waited))` on timeout. The caller asks the control plane which of the first two
    /// it was.
    pub async fn wait(&self, timeout: Duration) -> Result<Duration, Option<Duration>> {
        let started = Instant::now();
        if *self.state.borrow() != HoldState::Waiting {
            return Ok(Duration::ZERO);
        }
        let _place = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if *held >= self.capacity {
                return Err(None);
            }
            *held += 1;
            Held(self)
        };
        let mut rx = self.state.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|s| *s != HoldState::Waiting)).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            _ => Err(Some(started.elapsed())),
        }
    }
}

/// The `WorkerService` client of one worker endpoint.
pub(super) type WorkerClient = WorkerServiceClient<WorkerConnection>;

/// The `WorkerService` clients of the nodes, one per worker endpoint (connections are made lazily, on the first
/// request: making a client does no I/O, so it is made under the control plane's lock).
/// Beside them, the HTTP/1.1 connections of the endpoints whose agents serve that route ([`WorkerHttp`]).
#[derive(Debug, Default)]
pub(super) struct WorkerClients {
    grpc: HashMap<String, WorkerClient>,
    http: HashMap<String, Arc<WorkerHttp>>,
}

/// How a prediction reaches its replica.
enum Hop {
    /// The HTTP/1.1 predict route (whole answers only).
    Http(Arc<WorkerHttp>),
    /// `WorkerService`.
    Grpc(WorkerClient),
}

impl WorkerClients {
    /// The client of `endpoint` (`host:port`, or an `http://` URL), made on first use.
    fn get(&mut self, endpoint: &str) -> Result<WorkerClient, PredictError> {
        if let Some(c) = self.grpc.get(endpoint) {
            return Ok(c.clone());
        }
        let (origin, address) = origin(endpoint)?;
        let client = WorkerServiceClient::with_origin(WorkerConnection::new(address), origin);
        self.grpc.insert(endpoint.to_owned(), client.clone());
        Ok(client)
    }

    /// The HTTP/1.1 connections of `endpoint`, made on first use.
    fn http(&mut self, endpoint: &str) -> Result<Arc<WorkerHttp>, PredictError> {
        if let Some(c) = self.http.get(endpoint) {
            return Ok(Arc::clone(c));
        }
        let (_, address) = origin(endpoint)?;
        let client = Arc::new(WorkerHttp::new(address));
        self.http.insert(endpoint.to_owned(), Arc::clone(&client));
        Ok(client)
    }
}

/// A worker endpoint (`host:port`, or an `http://` URL) as its origin and its `host:port`.
fn origin(endpoint: &str) -> Result<(axum::http::Uri, String), PredictError> {
    let bad = |why: String| PredictError::Failed(format!("bad worker endpoint {endpoint}: {why}"));
    let url = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    let origin: axum::http::Uri = url.parse().map_err(|e: axum::http::uri::InvalidUri| bad(e.to_string()))?;
    if origin.scheme_str() != Some("http") {
        return Err(bad("only http:// (plaintext) is supported".into()));
    }
    let authority = origin.authority().ok_or_else(|| bad("no host".into()))?;
    let address = match authority.port_u16() {
        Some(_) => authority.to_string(),
        None => format!("{}:80", authority.host()),
    };
    Ok((origin, address))
}

/// A worker endpoint's HTTP/2 connection, used by the `WorkerService` client without tonic's `Channel`: a
/// `Channel` queues every request through a buffer task before the connection's task, one more task hop (and
/// often one more thread wake-up) per prediction. This sends on hyper's HTTP/2 connection directly; its streams are
/// multiplexed as a `Channel`'s are. The connection is made on first use and again after it closes; a failed
/// connect is `Unavailable`, as a `Channel`'s is, so the request path gives the replica up and routes again.
#[derive(Debug, Clone)]
pub(super) struct WorkerConnection {
    inner: Arc<ConnectionInner>,
}

#[derive(Debug)]
struct ConnectionInner {
    /// `host:port` to connect to.
    address: String,
    /// The open connection, `None` before the first request and after a failed connect.
    sender: tokio::sync::Mutex<Option<SendRequest<tonic::body::Body>>>,
}

/// How long a connect may take before the request fails as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl WorkerConnection {
    fn new(address: String) -> Self {
        Self { inner: Arc::new(ConnectionInner { address, sender: tokio::sync::Mutex::new(None) }) }
    }

    /// The open connection, connecting if there is none (one connect at a time; the others wait for it).
    async fn sender(&self) -> Result<SendRequest<tonic::body::Body>, tonic::Status> {
        let mut slot = self.inner.sender.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            tonic::Status::unavailable(format!("connecting to the worker at {}: {e}", self.inner.address))
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.inner.address))
            .await
            .map_err(|e| unreachable(&e))?
            .map_err(|e| unreachable(&e))?;
        stream.set_nodelay(true).map_err(|e| unreachable(&e))?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        let address = self.inner.address.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%address, error = %e, "worker connection closed");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

impl tower_service::Service<axum::http::Request<tonic::body::Body>> for WorkerConnection {
    type Response = axum::http::Response<hyper::body::Incoming>;
    type Error = tonic::Status;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), tonic::Status>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut sender = this.sender().await?;
            sender.send_request(request).await.map_err(|e| {
                let message = format!("the worker at {}: {e}", this.inner.address);
                // The connection is gone (the next request connects again): unreachable, as a `Channel` says.
                if e.is_closed() || e.is_canceled() {
                    tonic::Status::unavailable(message)
                } else {
                    tonic::Status::unknown(message)
                }
            })
        })
    }
}

/// The output of a worker's answer: its `output` field when it has one.
fn output_of(bytes: &[u8]) -> Result<Value, PredictError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| PredictError::Failed(format!("the replica answered something that is not JSON: {e}")))?;
    Ok(match value {
        Value::Object(mut o) if o.contains_key("output") => o.remove("output").unwrap_or(Value::Null),
        other => other,
    })
}

/// A prediction over the replica's `PredictStream`: each chunk before the last is one partial output (JSON), given
/// to `outputs` as it arrives; the last chunk is the whole answer, returned as `Predict`'s output is. Once an output
/// was given, a failure is not one the request may be routed again after (that would repeat the outputs).
async fn streamed(
    client: &mut WorkerClient,
    request: v1::PredictRequest,
    outputs: &mut OutputSink,
) -> Result<Vec<u8>, tonic::Status> {
    let mut chunks = client.predict_stream(request).await?.into_inner();
    let mut given = 0usize;
    let after = |given: usize, s: tonic::Status| match s.code() {
        _ if given == 0 => s,
        tonic::Code::InvalidArgument => s,
        _ => tonic::Status::internal(format!("{} (after {given} outputs)", s.message())),
    };
    loop {
        let chunk = match chunks.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                return Err(after(given, tonic::Status::internal("the replica's stream ended without its last chunk")));
            }
            Err(s) => return Err(after(given, s)),
        };
        if chunk.r#final {
            return Ok(chunk.data);
        }
        let output: Value = serde_json::from_slice(&chunk.data)
            .map_err(|e| tonic::Status::internal(format!("the replica streamed an output that is not JSON: {e}")))?;
        outputs(output);
        given += 1;
    }
}

impl Backend for Arc<ControlPlane> {
    fn version(&self, deployment: &str) -> Option<String> {
        self.state().served.get(deployment).map(|s| s.version.clone())
    }

    /// A process model server may stream (Cog's server-sent events); the native runtime answers whole.
    fn streams(&self, deployment: &str) -> bool {
        self.state()
            .served
            .get(deployment)
            .is_some_and(|s| matches!(s.source.runtime, Some(v1::model_source::Runtime::Process(_))))
    }

    async fn predict(&self, deployment: &str, input: Value, hold: Duration) -> Result<Outcome, PredictError> {
        self.observed_prediction(deployment, input, hold, None).await
    }

    /// Runs it over the replica's `PredictStream`, each partial output to `outputs` as the replica sends it.
    async fn predict_streaming(
        &self,
        deployment: &str,
        input: Value,
        hold: Duration,
        mut outputs: OutputSink,
    ) -> Result<Outcome, PredictError> {
        self.observed_prediction(deployment, input, hold, Some(&mut outputs)).await
    }
}

impl ControlPlane {
    /// A prediction run, with its metrics and the deployment's counters recorded.
    async fn observed_prediction(
        self: &Arc<Self>,
        deployment: &str,
        input: Value,
        hold: Duration,
        outputs: Option<&mut OutputSink>,
    ) -> Result<Outcome, PredictError> {
        let arrived = Instant::now();
        let result = self.run_prediction(deployment, input, hold, outputs).await;
        let outcome = match &result {
            Ok(_) => "succeeded",
            Err(PredictError::Invalid(_)) => "invalid",
            Err(PredictError::SetupFailed { .. }) => "setup_failed",
            Err(PredictError::Overloaded { .. }) => "overloaded",
            Err(PredictError::ColdStartTimeout { .. }) => "cold_start_timeout",
            Err(PredictError::Failed(_)) => "failed",
        };
        self.metrics.request(deployment, outcome, arrived.elapsed().as_secs_f64());
        self.state().count(deployment, |c| {
            c.requests += 1;
            if result.is_err() {
                c.failed_requests += 1;
            }
        });
        result
    }

    async fn run_prediction(
        self: &Arc<Self>,
        deployment: &str,
        input: Value,
        hold: Duration,
        mut outputs: Option<&mut OutputSink>,
    ) -> Result<Outcome, PredictError> {
        let arrived = Instant::now();
        let removed = || PredictError::Failed(format!("deployment {deployment} was removed"));
        // `{"input": ...}`, written straight from the input (not through a JSON object holding it).
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(b"{\"input\":");
        serde_json::to_writer(&mut body, &input).map_err(|e| PredictError::Invalid(e.to_string()))?;
        body.push(b'}');
        let queue = {
            let mut state = self.state();
            let Some(queue) = state.served.get(deployment).map(|s| Arc::clone(&s.hold)) else {
                return Err(removed());
            };
            if !state.core.arrive(deployment, self.now()) {
                return Err(removed());
            }
            queue
        };
        let mut cold = false;
        let mut attempts = 0;
        loop {
            let route = {
                let mut state = self.state();
                let core = &mut state.core;
                let now = self.now();
                let route = core.route(deployment, now);
                if route == Route::Wait {
                    if let Some(f) = core.failing(deployment, now) {
                        let error = PredictError::SetupFailed {
                            deployment: deployment.to_owned(),
                            reason: f.reason.clone(),
                            message: f.message.clone(),
                        };
                        core.abandon(deployment, now);
                        return Err(error);
                    }
                    cold |= core.status(deployment).is_some_and(|s| s.ready == 0);
                    queue.set_state(HoldState::Waiting);
                }
                route
            };
            let (replica, node) = match route {
                Route::Replica { replica, node } => (replica, node),
                Route::Unknown => return Err(removed()),
                Route::Wait => {
                    self.wake.notify_one();
                    let left = hold.saturating_sub(arrived.elapsed());
                    match queue.wait(left).await {
                        Ok(_) => continue,
                        Err(full) => {
                            let now = self.now();
                            self.state().core.abandon(deployment, now);
                            return Err(match full {
                                None => {
                                    PredictError::Overloaded { deployment: deployment.to_owned(), retry_after_s: 1 }
                                }
                                Some(waited) => PredictError::ColdStartTimeout {
                                    deployment: deployment.to_owned(),
                                    waited_s: waited.as_secs(),
                                },
                            });
                        }
                    }
                }
            };
            let queue_time = arrived.elapsed().as_secs_f64();
            let hop = match self.hop(&node, outputs.is_none()) {
                Ok(h) => h,
                Err(e) => {
                    self.finish(deployment, &replica);
                    return Err(e);
                }
            };
            let request = || v1::PredictRequest {
                prediction_id: String::new(),
                replica_id: replica.clone(),
                input: body.clone(),
                content_type: "application/json".into(),
                metadata: HashMap::new(),
            };
            let sent = Instant::now();
            let answer = match (hop, outputs.as_deref_mut()) {
                (Hop::Http(http), _) => http.predict(&replica, &body).await,
                (Hop::Grpc(mut client), None) => client.predict(request()).await.map(|r| r.into_inner().output),
                (Hop::Grpc(mut client), Some(outputs)) => streamed(&mut client, request(), outputs).await,
            };
            // The round trip to the replica: the model's time plus one loopback or LAN hop.
            let predict_time = sent.elapsed().as_secs_f64();
            self.finish(deployment, &replica);
            match answer {
                Ok(output) => {
                    return Ok(Outcome {
                        output: output_of(&output)?,
                        predict_time,
                        queue_time,
                        cold_start: cold.then_some(queue_time),
                        gpu: self.gpu_use(&replica, &node),
                    });
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(PredictError::Invalid(s.message().to_owned()));
                }
                // The replica is full (a race with another gateway) or unreachable (its agent died, or it is no
                // longer there): an unreachable one is given up and stopped (a no-op if its node is gone), and the
                // request is routed again, to another replica or held for a replacement.
                Err(s)
                    if attempts < 2
                        && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted) =>
                {
                    attempts += 1;
                    tracing::warn!(%replica, %node, error = %s.message(), "replica unreachable; routing again");
                    if s.code() == tonic::Code::Unavailable {
                        let gone = self.state().core.replica_gone(&replica);
                        if let Some(r) = gone {
                            self.execute(Action::Stop {
                                replica: replica.clone(),
                                deployment: r.deployment,
                                node: r.node,
                                reason: StopReason::Unreachable,
                            });
                        }
                    }
                    let now = self.now();
                    self.state().core.arrive(deployment, now);
                    self.wake.notify_one();
                }
                Err(s) => return Err(PredictError::Failed(format!("replica {replica}: {}", s.message()))),
            }
        }
    }

    /// How to reach `node`'s replicas: over HTTP/1.1 for a prediction answered `whole` when its agent serves that
    /// route, over its `WorkerService` (gRPC) otherwise.
    fn hop(&self, node: &str, whole: bool) -> Result<Hop, PredictError> {
        let (endpoint, http1) = self
            .registry
            .worker_endpoint(node)
            .filter(|(e, _)| !e.is_empty())
            .ok_or_else(|| PredictError::Failed(format!("node {node} has no worker endpoint")))?;
        let mut state = self.state();
        match whole && http1 {
            true => state.clients.http(&endpoint).map(Hop::Http),
            false => state.clients.get(&endpoint).map(Hop::Grpc),
        }
    }

    /// The GPU `replica` on `node` holds: its share as its start decided it, the model its node's agent reports.
    /// `None` for a replica this process did not start (adopted from an agent after a restart): its share is not
    /// known here.
    fn gpu_use(&self, replica: &str, node: &str) -> Option<GpuUse> {
        let share_milli = *self.state().shares.get(replica)?;
        let gpu_model = self.registry.gpu_model(node)?;
        Some(GpuUse { gpu_model, share_milli })
    }

    /// Releases a routed request's slot and wakes a held request if one is now free.
    fn finish(&self, deployment: &str, replica: &str) {
        let now = self.now();
        let mut state = self.state();
        state.core.finish(deployment, replica, now);
        let free = state.core.has_free_slot(deployment);
        if let Some(s) = state.served.get(deployment) {
            s.hold.set_ready(free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hold_queue_is_bounded_times_out_and_wakes_everyone_when_ready() {
        let q = Arc::new(HoldQueue::new(2));
        assert!(matches!(q.wait(Duration::from_millis(20)).await, Err(Some(_))), "nothing ready: a timeout");
        let (a, b) = (Arc::clone(&q), Arc::clone(&q));
        let ha = tokio::spawn(async move { a.wait(Duration::from_secs(5)).await });
        let hb = tokio::spawn(async move { b.wait(Duration::from_secs(5)).await });
        while q.len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(q.wait(Duration::from_secs(1)).await, Err(None), "a third is refused");
        q.set_ready(true);
        assert!(ha.await.unwrap().is_ok() && hb.await.unwrap().is_ok());
        assert!(q.is_empty());
        assert_eq!(q.wait(Duration::from_secs(1)).await, Ok(Duration::ZERO));
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;
    use std::net::SocketAddr;

    /// Answers every prediction with its replica id as the output.
    struct Echo;

    type Chunks = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::PredictChunk, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl v1::worker_service_server::WorkerService for Echo {
        async fn predict(
            &self,
            request: tonic::Request<v1::PredictRequest>,
        ) -> Result<tonic::Response<v1::PredictResponse>, tonic::Status> {
            let r = request.into_inner();
            if r.replica_id == "invalid" {
                return Err(tonic::Status::invalid_argument("bad input"));
            }
            Ok(tonic::Response::new(v1::PredictResponse {
                prediction_id: r.prediction_id,
                output: serde_json::to_vec(&serde_json::json!({ "output": r.replica_id })).unwrap(),
                content_type: "application/json".into(),
                metrics: None,
            }))
        }

        type PredictStreamStream = Chunks;

        /// Streams the replica id's letters, one output each, then the whole list; `broken` breaks off after one
        /// with UNAVAILABLE.
        async fn predict_stream(
            &self,
            request: tonic::Request<v1::PredictRequest>,
        ) -> Result<tonic::Response<Chunks>, tonic::Status> {
            let r = request.into_inner();
            let letters: Vec<String> = r.replica_id.chars().map(String::from).collect();
            let chunk = |index: usize, data: Vec<u8>, last: bool| v1::PredictChunk {
                index: index as u64,
                data,
                r#final: last,
                ..Default::default()
            };
            let mut chunks: Vec<Result<v1::PredictChunk, tonic::Status>> =
                letters.iter().enumerate().map(|(i, l)| Ok(chunk(i, serde_json::to_vec(l).unwrap(), false))).collect();
            if r.replica_id == "broken" {
                chunks.truncate(1);
                chunks.push(Err(tonic::Status::unavailable("the model server went away")));
            } else {
                let whole = serde_json::to_vec(&serde_json::json!({ "output": letters })).unwrap();
                chunks.push(Ok(chunk(letters.len(), whole, true)));
            }
            Ok(tonic::Response::new(Box::pin(tokio_stream::iter(chunks))))
        }
    }

    /// Serves [`Echo`] on `listener` until the returned sender is dropped.
    fn serve(listener: tokio::net::TcpListener) -> tokio::sync::oneshot::Sender<()> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(v1::worker_service_server::WorkerServiceServer::new(Echo))
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                }),
        );
        stop
    }

    fn request(replica: &str) -> v1::PredictRequest {
        v1::PredictRequest { replica_id: replica.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn a_worker_connection_multiplexes_reconnects_and_says_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let mut clients = WorkerClients::default();
        let client = clients.get(&addr.to_string()).unwrap();
        let stop = serve(listener);
        // Concurrent requests share the one connection; each gets its own answer.
        let answers: Vec<_> = (0..8)
            .map(|i| {
                let mut c = client.clone();
                tokio::spawn(async move { c.predict(request(&format!("r{i}"))).await })
            })
            .collect();
        for (i, a) in answers.into_iter().enumerate() {
            assert_eq!(a.await.unwrap().unwrap().into_inner().output, format!(r#"{{"output":"r{i}"}}"#).into_bytes());
        }
        let status = client.clone().predict(request("invalid")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "the worker's status comes through: {status:?}");
        // The worker goes away: unreachable, which the request path routes around.
        drop(stop);
        let mut unreachable = false;
        for _ in 0..100 {
            match client.clone().predict(request("r")).await {
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    unreachable = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert!(unreachable, "requests to a stopped worker fail as unreachable");
        // It comes back on the same address: the next request connects again.
        let stop = serve(tokio::net::TcpListener::bind(addr).await.unwrap());
        let answer = client.clone().predict(request("back")).await.unwrap();
        assert_eq!(answer.into_inner().output, br#"{"output":"back"}"#.to_vec());
        drop(stop);
    }

    /// A streamed prediction gives each partial output as it comes and answers the last chunk; one that breaks off
    /// after an output fails as INTERNAL (not to be routed again, which would repeat the outputs).
    #[tokio::test]
    async fn streamed_outputs_are_given_in_order_and_a_broken_stream_is_not_routed_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let mut client = WorkerClients::default().get(&addr.to_string()).unwrap();
        let _stop = serve(listener);
        let given = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&given);
        let mut outputs: OutputSink = Box::new(move |v| sink.lock().unwrap().push(v));
        let whole = streamed(&mut client, request("abc"), &mut outputs).await.unwrap();
        assert_eq!(output_of(&whole).unwrap(), serde_json::json!(["a", "b", "c"]));
        assert_eq!(*given.lock().unwrap(), [serde_json::json!("a"), serde_json::json!("b"), serde_json::json!("c")]);
        given.lock().unwrap().clear();
        let broken = streamed(&mut client, request("broken"), &mut outputs).await.unwrap_err();
        assert_eq!(broken.code(), tonic::Code::Internal, "{broken:?}");
        assert_eq!(broken.message(), "the model server went away (after 1 outputs)");
        assert_eq!(given.lock().unwrap().len(), 1);
    }

    #[test]
    fn only_plaintext_http_endpoints_are_taken() {
        let mut clients = WorkerClients::default();
        assert!(clients.get("10.0.0.1:7000").is_ok() && clients.get("http://node-a:7000").is_ok());
        let Err(PredictError::Failed(e)) = clients.get("https://node-a:7000") else { panic!("https taken") };
        assert!(e.contains("only http://"), "{e}");
        assert!(clients.get("http://").is_err());
    }
}
