//! The gateway's predictions API, in the shapes of Replicate's HTTP API, over a [`Backend`] that runs predictions
//! (the control loop: pick a ready replica, or hold the request while one starts).
//!
//! - `POST /v1/deployments/{namespace}/{name}/predictions` with `{"input": {...}}`: with `Prefer: wait` (or
//!   `wait=N` seconds, at most 60) answers when done (200), otherwise 201 with the prediction to poll.
//!   `POST /v1/models/{namespace}/{name}/predictions` is the same (a model is a deployment, its namespace the owner:
//!   `replicate.run("namespace/name", ...)` goes there).
//! - `GET /v1/predictions/{id}`, `POST /v1/predictions/{id}/cancel` (a prediction canceled before its run began is
//!   not run).
//! - The rest of Replicate's API, described through a [`Catalog`] (the deployments and the fleet's GPU models):
//!   `GET /v1/predictions` (newest first, cursor pages of [`PAGE_SIZE`]), `GET /v1/deployments` and
//!   `GET /v1/deployments/{owner}/{name}` (`listing`), `GET /v1/models/{owner}/{name}` (`models`),
//!   `GET /v1/hardware` and `GET /v1/account` (`account`); `POST /v1/deployments`, `PATCH` and `DELETE
//!   /v1/deployments/{owner}/{name}` (`changes`, carried out by the catalog's spec source). The parts of Replicate's
//!   API it does not serve (model versions, trainings, files, collections) answer 501 naming them, any other path a
//!   JSON 404 (`models::fallback`).
//! - A prediction has `id`, `model` (`namespace/name`), `version`, `status` ([`PredictionStatus`]: `starting`,
//!   `processing`, `succeeded`, `failed`, `canceled`), `input`, `output`, `error`, `logs`, `created_at`/
//!   `started_at`/`completed_at`, `urls` (`get`, `cancel`, and `stream` when asked for) and `metrics`
//!   (`predict_time`, `queue_time`, `cold_start` and `cold_start_time`; for a failed one, flags saying why). The
//!   JSON is one serialized struct (`response`).
//! - Auth: `Authorization: Bearer <key>`; a key belongs to one namespace and never reaches another's deployments
//!   (401 without a valid key, 403 for another namespace). Unknown deployment: 404 naming it. Malformed body: 400
//!   saying what is wrong ([`RequestError`]). Too many requests held for a cold start: 429 with `Retry-After`; held
//!   past the deadline: the prediction fails with a message saying the deployment was still cold-starting (504 when
//!   waited on). A failed prediction keeps why ([`FailureKind`], from the backend's [`PredictError`] or the
//!   gateway's shutdown and restart), in memory and in the store; a waiting client's status and `Retry-After` come
//!   from it.
//! - `"webhook"` (with `"webhook_events_filter"`: `start`, `output`, `logs`, `completed`; a
//!   [`WebhookSubscription`]) POSTs the prediction to a URL, retried with backoff and signed with a secret per
//!   namespace ([`crate::webhook`]; a namespace's key at `GET /v1/webhooks/default/secret`). Every prediction has
//!   `urls.stream` (as Replicate's now do): server-sent events (`stream`: an `output` per partial output as the model
//!   produces it for a prediction of a model that streams (a process model server; [`Backend::streams`],
//!   [`Backend::predict_streaming`]), the output so far readable while `processing`; otherwise one `output` with the
//!   whole output; or `error`; then `done`).
//!
//! - Usage (`usage`): `GET /v1/usage` (sums of the metered records by deployment, rental, phase or day) and
//!   `GET /v1/usage/statement` (a tenant's monthly statement), JSON or CSV, from the [`crate::billing::Billing`]
//!   service; a tenant's key reads its namespace's, an operator's any.
//!
//! Finished predictions stay readable for an hour (at most the newest 100,000). With a [`Persister`] each prediction
//! is written to the store on every transition (created, started, finished, expired) and [`Gateway::restore`] reads
//! them back after a restart: finished ones are served as before, one that was running is finished as failed
//! ([`RESTART_ERROR`]) and its `completed` webhook sent.
//!
//! Shutdown ([`Gateway::drain`]): new predictions get 503 with `Retry-After`; those under way get the grace period
//! to finish; what is left then fails ([`SHUTDOWN_ERROR`]: 503 with `Retry-After` for a client waiting on it, the
//! `completed` webhook for the others). Canceling marks the prediction canceled and drops its result; it does not
//! stop work already sent to a replica. The gateway's metrics are recorded by its backend (the control plane). The
//! predictions handlers are in `routes`.

mod account;
mod catalog;
mod changes;
mod listing;
mod models;
mod response;
mod routes;
mod stream;
pub mod ui;
mod usage;

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    http::{HeaderMap, StatusCode, header},
    response::Response,
    routing::{get, post},
};
use serde_json::Value;
use tokio::sync::{Notify, watch};

pub use self::{
    catalog::{Catalog, ChangeError, ChangeKind, DeploymentChange, DeploymentInfo, EmptyCatalog, merge_patch, sku},
    changes::SERVED_WITHIN,
    listing::PAGE_SIZE,
    routes::{RequestError, WebhookSubscription},
};
use self::{
    response::PredictionResponse,
    routes::{cancel, create, fetch, problem, webhook_secret},
    stream::stream,
};
pub use crate::prediction::{FailureKind, PredictionStatus};
use crate::{
    prediction::{Metrics, RunMetrics},
    store::{Persister, PredictionRecord},
};

/// The error of a prediction that was running when the controller process ended.
pub const RESTART_ERROR: &str = "the controller restarted while it ran";
/// The error of a prediction still running when a shutdown's grace period ran out.
pub const SHUTDOWN_ERROR: &str = "the controller shut down before the prediction finished; retry it";
/// `Retry-After` (seconds) of a prediction refused or cut off by a shutdown: about the time a restart or a standby
/// takes to serve.
pub const SHUTDOWN_RETRY_AFTER_S: u64 = 5;

/// What a finished prediction produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Model output.
    pub output: Value,
    /// Time the model spent, seconds.
    pub predict_time: f64,
    /// Time waiting for a replica (including a cold start), seconds.
    pub queue_time: f64,
    /// The cold start this request waited for, seconds, if any.
    pub cold_start: Option<f64>,
    /// The GPU the replica that ran it holds, when the backend knows it: the prediction's `metrics` then show the
    /// share and what its `predict_time` costs at the serverless price.
    pub gpu: Option<GpuUse>,
}

/// The GPU a replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuUse {
    /// GPU model, as NVML names it (what prices are keyed by).
    pub gpu_model: String,
    /// Milli-GPU held: 1..=999 for a share of one GPU, 1000 × k for k whole GPUs.
    pub share_milli: u32,
}

/// Why a prediction did not produce output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PredictError {
    /// Too many requests are already held for this deployment.
    #[error("too many requests are waiting for {deployment} to start; retry after {retry_after_s} s")]
    Overloaded {
        /// Deployment.
        deployment: String,
        /// Seconds.
        retry_after_s: u64,
    },
    /// Held past the deadline while the deployment was still cold-starting.
    #[error("{deployment} was still cold-starting after {waited_s} s")]
    ColdStartTimeout {
        /// Deployment.
        deployment: String,
        /// Seconds waited.
        waited_s: u64,
    },
    /// The deployment's replicas fail to start (Replicate's failed setup): the agent's reason and message.
    #[error("{deployment} could not start a replica ({reason}): {message}")]
    SetupFailed {
        /// Deployment.
        deployment: String,
        /// The agent's machine-readable reason (`ModelNotFound`, `InvalidWeights`, ...).
        reason: String,
        /// The load error.
        message: String,
    },
    /// The model rejected the input.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The model failed.
    #[error("{0}")]
    Failed(String),
}

impl PredictError {
    /// What kind of failure it is, as kept with the prediction.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Overloaded { retry_after_s, .. } => FailureKind::Overloaded { retry_after_s: *retry_after_s },
            Self::ColdStartTimeout { .. } => FailureKind::ColdStartTimeout,
            Self::SetupFailed { .. } => FailureKind::SetupFailed,
            Self::Invalid(_) => FailureKind::Invalid,
            Self::Failed(_) => FailureKind::Failed,
        }
    }

    /// A short machine-readable name: `overloaded`, `cold_start_timeout`, `setup_failed`, `invalid` or `failed`
    /// (the `outcome` label of `kiln_gateway_requests_total`).
    pub fn category(&self) -> &'static str {
        self.kind().category()
    }

    /// Whether the same prediction sent again may succeed without anything else changing
    /// ([`FailureKind::is_retryable`]): yes for an overloaded or still cold-starting deployment.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Runs predictions for the gateway.
pub trait Backend: Send + Sync + 'static {
    /// The deployment's version (its spec generation), `None` if there is no such deployment.
    fn version(&self, deployment: &str) -> Option<String>;
    /// Runs one prediction, holding it at most `hold` for a replica to be ready.
    fn predict(
        &self,
        deployment: &str,
        input: Value,
        hold: Duration,
    ) -> impl Future<Output = Result<Outcome, PredictError>> + Send;

    /// Whether the deployment's model may stream its output (a process model server may; Kiln's native runtime
    /// answers whole): its predictions are run with [`Backend::predict_streaming`] even without `"stream": true`
    /// (Replicate's JavaScript client streams from `urls.stream` without asking for it). No by default.
    fn streams(&self, deployment: &str) -> bool {
        let _ = deployment;
        false
    }

    /// [`Backend::predict`] for a prediction created with `"stream": true` or of a deployment that
    /// [streams](Backend::streams): each partial output the model produces
    /// goes to `outputs` as it arrives (the gateway appends it to the prediction and sends it to its event stream);
    /// the outcome's output is the whole output. By default the output comes whole, once, as `predict`'s.
    fn predict_streaming(
        &self,
        deployment: &str,
        input: Value,
        hold: Duration,
        outputs: OutputSink,
    ) -> impl Future<Output = Result<Outcome, PredictError>> + Send {
        drop(outputs);
        self.predict(deployment, input, hold)
    }
}

/// Where a streaming prediction's partial outputs go, one call per output, in order.
pub type OutputSink = Box<dyn FnMut(Value) + Send>;

/// A prediction the gateway holds: running, or finished and readable until it expires.
#[derive(Debug, Clone)]
struct Prediction {
    id: String,
    model: String,
    version: String,
    status: PredictionStatus,
    input: Value,
    output: Value,
    error: Option<String>,
    /// Why it failed (`status` is `failed`).
    failure: Option<FailureKind>,
    /// Its timings, once it ran.
    run: Option<RunMetrics>,
    created_at: SystemTime,
    started_at: Option<SystemTime>,
    completed_at: Option<SystemTime>,
    done: Arc<Notify>,
    webhook: Option<WebhookSubscription>,
    stream: bool,
    /// The capability in `urls.stream` ([`crate::webhook::Secret::stream_token`]); `None` without a secret.
    stream_token: Option<String>,
    /// For a prediction run streaming (`stream: true`, or a model that streams): how many partial outputs `output` (then a list) holds so far,
    /// watched by its event streams (`stream`). `None` for the others, which cost nothing more.
    partials: Option<Arc<watch::Sender<usize>>>,
    /// Sizes of an input and output that were over the store's limits (restored records, and inputs of finished
    /// predictions).
    dropped: (Option<usize>, Option<usize>),
    /// Bytes of JSON this prediction holds once finished (counted against [`MAX_RETAINED_BYTES`]).
    kept_bytes: usize,
}

/// Bytes `value` takes as JSON, without building the text.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

impl Prediction {
    /// A prediction just created: `starting`.
    fn new(id: String, model: String, version: String, input: Value) -> Self {
        Self {
            id,
            model,
            version,
            status: PredictionStatus::Starting,
            input,
            output: Value::Null,
            error: None,
            failure: None,
            run: None,
            created_at: SystemTime::now(),
            started_at: None,
            completed_at: None,
            done: Arc::new(Notify::new()),
            webhook: None,
            stream: false,
            stream_token: None,
            partials: None,
            dropped: (None, None),
            kept_bytes: 0,
        }
    }

    /// What the API returns for it, with its URLs under `base`.
    fn response<'a>(&'a self, base: &str) -> PredictionResponse<'a> {
        PredictionResponse::new(self, base)
    }

    fn finished(&self) -> bool {
        self.status.is_terminal()
    }

    /// Finishes it as failed at `at`, saying why.
    fn fail(&mut self, failure: FailureKind, error: String, at: SystemTime) {
        self.status = PredictionStatus::Failed;
        self.failure = Some(failure);
        self.error = Some(error);
        self.run = None;
        self.completed_at = Some(at);
    }

    /// The stored form.
    fn record(&self) -> PredictionRecord {
        let (webhook, webhook_events_filter) = match &self.webhook {
            Some(w) => (Some(w.url.clone()), w.events.clone()),
            None => (None, Vec::new()),
        };
        PredictionRecord {
            id: self.id.clone(),
            model: self.model.clone(),
            version: self.version.clone(),
            status: self.status,
            input: self.input.clone(),
            input_dropped_bytes: self.dropped.0,
            output: self.output.clone(),
            output_dropped_bytes: self.dropped.1,
            error: self.error.clone(),
            failure: self.failure,
            logs: String::new(),
            metrics: Metrics::new(self.run, self.failure),
            created_at: self.created_at,
            started_at: self.started_at,
            completed_at: self.completed_at,
            webhook,
            webhook_events_filter,
            stream: self.stream,
        }
    }

    /// A prediction from its stored form (one stored without its failure kind gets the kind its metrics say).
    fn from_record(r: PredictionRecord) -> Self {
        let failure = r.failure();
        Self {
            id: r.id,
            model: r.model,
            version: r.version,
            status: r.status,
            input: r.input,
            output: r.output,
            error: r.error,
            failure,
            run: r.metrics.run,
            created_at: r.created_at,
            started_at: r.started_at,
            completed_at: r.completed_at,
            done: Arc::new(Notify::new()),
            webhook: r.webhook.map(|url| WebhookSubscription { url, events: r.webhook_events_filter }),
            stream: r.stream,
            stream_token: None,
            partials: None,
            dropped: (r.input_dropped_bytes, r.output_dropped_bytes),
            kept_bytes: 0,
        }
    }
}

/// How long a finished prediction stays readable.
const RETENTION: Duration = Duration::from_secs(3600);
/// Most finished predictions kept (the oldest go first past it), so a busy gateway's memory stays bounded.
const MAX_FINISHED: usize = 100_000;
/// Most bytes of inputs and outputs kept for finished predictions, in all (the oldest go first past it). Inputs
/// over the store's [`crate::store::INPUT_LIMIT`] are not kept once the prediction has finished (the response says
/// so), so what a tenant sends does not stay in memory; this bounds the outputs.
const MAX_RETAINED_BYTES: usize = 512 << 20;

/// Predictions by id, and the finished ones in the order they finished (for expiry in O(1) per request).
///
/// The map holds boxes and is made with room for [`MAX_FINISHED`] at once: it is written under the gateway's one
/// lock, and growing a map of inline predictions (about 450 bytes each) meant moving all of them and faulting in
/// the new table while every request waited — a stall of tens of milliseconds each time the count doubled past
/// 14,000, 28,000 and 57,000 (`kiln bench gateway`'s p99.9). A table of boxes is 32 bytes a slot, untouched until
/// used.
#[derive(Debug)]
struct Store {
    map: HashMap<String, Box<Prediction>>,
    finished: std::collections::VecDeque<(SystemTime, String)>,
    /// Bytes kept by finished predictions.
    retained: usize,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            map: HashMap::with_capacity(MAX_FINISHED + 4096),
            finished: std::collections::VecDeque::with_capacity(MAX_FINISHED),
            retained: 0,
        }
    }
}

impl Store {
    fn finish(&mut self, id: &str) {
        self.finish_at(id, SystemTime::now());
    }

    /// Marks `id` finished at `at` (not before the last finished: the queue is in finishing order): a large input
    /// is let go, and what the prediction keeps is counted.
    fn finish_at(&mut self, id: &str, at: SystemTime) {
        if let Some(p) = self.map.get_mut(id) {
            let mut input = json_size(&p.input);
            if input > crate::store::INPUT_LIMIT {
                p.input = Value::Null;
                p.dropped.0 = Some(input);
                input = 4; // `null`
            }
            self.retained -= p.kept_bytes.min(self.retained);
            p.kept_bytes = input + json_size(&p.output);
            self.retained += p.kept_bytes;
        }
        self.finished.push_back((at, id.to_owned()));
    }

    /// Drops finished predictions past the retention or beyond the caps; the ids dropped (none allocates nothing).
    fn expire(&mut self) -> Vec<String> {
        self.expire_within(MAX_FINISHED, MAX_RETAINED_BYTES)
    }

    fn expire_within(&mut self, max_finished: usize, max_bytes: usize) -> Vec<String> {
        let mut expired = Vec::new();
        while let Some((at, _)) = self.finished.front() {
            let old = at.elapsed().unwrap_or_default() >= RETENTION;
            if !old && self.finished.len() <= max_finished && self.retained <= max_bytes {
                break;
            }
            if let Some((_, id)) = self.finished.pop_front() {
                if let Some(p) = self.map.remove(&id) {
                    self.retained -= p.kept_bytes.min(self.retained);
                }
                expired.push(id);
            }
        }
        expired
    }
}

/// How a restart found the stored predictions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Finished predictions readable again.
    pub finished: usize,
    /// Running when the process ended: now failed ([`RESTART_ERROR`]).
    pub interrupted: usize,
    /// Past their retention: removed.
    pub expired: usize,
}

/// The gateway's shutdown state: whether it refuses new predictions, and how many are under way.
#[derive(Debug)]
struct Drain {
    draining: std::sync::atomic::AtomicBool,
    in_flight: Arc<watch::Sender<usize>>,
}

/// One prediction under way, counted until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new(count: &Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The gateway's state.
#[derive(Debug)]
pub struct Gateway<B> {
    backend: B,
    /// API key -> namespace.
    keys: std::sync::RwLock<HashMap<String, String>>,
    predictions: Mutex<Store>,
    /// How long a request may be held for a cold start.
    pub hold: Duration,
    /// Base URL for `urls`.
    pub base_url: String,
    /// Webhook delivery.
    pub webhooks: crate::webhook::Webhooks,
    /// Per-namespace admission limits (rate and unfinished predictions).
    pub limits: crate::limits::TenantLimits,
    /// Where predictions are written on each transition (`None`: kept in memory only).
    pub persister: Option<Persister>,
    /// The deployments and hardware the Replicate-shaped listings describe ([`EmptyCatalog`] unless set).
    pub catalog: Arc<dyn Catalog>,
    /// The billing service `/v1/usage` reads and finished predictions are priced by (`None`: billing off, no
    /// prices configured).
    pub billing: Option<Arc<crate::billing::Billing>>,
    drain: Drain,
}

/// The store's writer reads predictions queued with [`Persister::put_latest`] here, when it commits: one copy per
/// prediction and commit, however often it changed meanwhile.
impl<B: Backend> crate::store::RecordSource for Gateway<B> {
    fn record(&self, id: &str) -> Option<PredictionRecord> {
        self.lock().map.get(id).map(|p| p.record())
    }
}

impl<B: Backend> Gateway<B> {
    /// A gateway over `backend`, accepting `keys` (API key, namespace).
    pub fn new(backend: B, keys: impl IntoIterator<Item = (String, String)>, base_url: &str) -> Arc<Self> {
        Arc::new(Self {
            backend,
            keys: std::sync::RwLock::new(keys.into_iter().collect()),
            predictions: Mutex::new(Store::default()),
            hold: Duration::from_secs(120),
            base_url: base_url.trim_end_matches('/').to_owned(),
            webhooks: crate::webhook::Webhooks::default(),
            limits: crate::limits::TenantLimits::new(crate::limits::LimitConfig::default()),
            persister: None,
            catalog: Arc::new(EmptyCatalog),
            billing: None,
            drain: Drain {
                draining: std::sync::atomic::AtomicBool::new(false),
                in_flight: Arc::new(watch::channel(0).0),
            },
        })
    }

    fn persist(&self, p: &Prediction) {
        if let Some(persister) = &self.persister {
            persister.put(p.record());
        }
    }

    /// Queues prediction `id` to be stored as it is when the store's writer commits ([`Persister::put_latest`]).
    fn persist_latest(self: &Arc<Self>, id: &str) {
        if let Some(persister) = &self.persister {
            persister
                .put_latest(id.to_owned(), Arc::downgrade(self) as std::sync::Weak<dyn crate::store::RecordSource>);
        }
    }

    fn persist_expired(&self, expired: Vec<String>) {
        if let Some(persister) = &self.persister {
            for id in expired {
                persister.remove(id);
            }
        }
    }

    /// Takes the predictions of a store after a restart: finished ones are readable again (and expire on the
    /// usual schedule, counted from when they finished); one that was starting or processing is finished as
    /// failed with [`RESTART_ERROR`], written back, and its `completed` webhook sent. Call it before serving.
    pub fn restore(&self, records: Vec<PredictionRecord>) -> Restored {
        let now = SystemTime::now();
        let mut restored = Restored::default();
        let mut finished = Vec::new();
        let mut interrupted = Vec::new();
        let mut expired = Vec::new();
        for r in records {
            let mut p = Prediction::from_record(r);
            p.stream_token = self.webhooks.secret.as_ref().map(|s| s.stream_token(&p.id));
            if p.finished() {
                let at = p.completed_at.unwrap_or(p.created_at);
                if now.duration_since(at).unwrap_or_default() >= RETENTION {
                    expired.push(p.id);
                } else {
                    finished.push((at, p));
                }
            } else {
                p.fail(FailureKind::Restarted, RESTART_ERROR.to_owned(), now);
                interrupted.push(p);
            }
        }
        finished.sort_by_key(|(at, _)| *at);
        restored.finished = finished.len();
        restored.interrupted = interrupted.len();
        restored.expired = expired.len();
        {
            let mut store = self.lock();
            for (at, p) in finished {
                let id = p.id.clone();
                store.map.insert(id.clone(), Box::new(p));
                store.finish_at(&id, at);
            }
            for p in &interrupted {
                store.map.insert(p.id.clone(), Box::new(p.clone()));
                store.finish_at(&p.id, now);
            }
            let over = store.expire();
            expired.extend(over);
        }
        self.persist_expired(expired);
        for p in &interrupted {
            self.persist(p);
            self.notify_webhook(p, "completed");
        }
        restored
    }

    /// Whether a shutdown has begun (new predictions are refused).
    pub fn is_draining(&self) -> bool {
        self.drain.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Predictions under way.
    pub fn in_flight(&self) -> usize {
        *self.drain.in_flight.borrow()
    }

    /// Shuts the predictions API down: from now on new predictions get 503 with `Retry-After`; those under way
    /// (held for a cold start, or running) get `grace` to finish; the ones left then fail with [`SHUTDOWN_ERROR`]
    /// (a client waiting on one gets 503 with `Retry-After`, a webhook gets `completed`). Returns how many were cut
    /// off. Reading predictions keeps working.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.drain.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut in_flight = self.drain.in_flight.subscribe();
        if tokio::time::timeout(grace, in_flight.wait_for(|n| *n == 0)).await.is_ok() {
            return 0;
        }
        let now = SystemTime::now();
        let cut: Vec<Prediction> = {
            let mut store = self.lock();
            let cut: Vec<Prediction> = store
                .map
                .values_mut()
                .filter(|p| !p.finished())
                .map(|p| {
                    let shutdown = FailureKind::Shutdown { retry_after_s: SHUTDOWN_RETRY_AFTER_S };
                    p.fail(shutdown, SHUTDOWN_ERROR.to_owned(), now);
                    p.done.notify_waiters();
                    Prediction::clone(p)
                })
                .collect();
            for p in &cut {
                store.finish_at(&p.id, now);
            }
            cut
        };
        for p in &cut {
            self.persist(p);
            self.notify_webhook(p, "completed");
        }
        cut.len()
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.predictions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/deployments/{namespace}/{name}/predictions", post(create::<B>))
            .route("/v1/models/{namespace}/{name}/predictions", post(create::<B>))
            .route("/v1/models/{owner}/{name}", get(models::model::<B>).fallback(models::fallback))
            .route(
                "/v1/deployments",
                get(listing::deployments::<B>).post(changes::create::<B>).fallback(models::fallback),
            )
            .route(
                "/v1/deployments/{owner}/{name}",
                get(listing::deployment::<B>)
                    .patch(changes::update::<B>)
                    .delete(changes::delete::<B>)
                    .fallback(models::fallback),
            )
            .route("/v1/predictions", get(listing::predictions::<B>).fallback(models::fallback))
            .route("/v1/hardware", get(account::hardware::<B>))
            .route("/v1/account", get(account::account::<B>))
            .route("/v1/predictions/{id}", get(fetch::<B>))
            .route("/v1/predictions/{id}/cancel", post(cancel::<B>))
            .route("/v1/predictions/{id}/stream", get(stream::<B>))
            .route("/v1/webhooks/default/secret", get(webhook_secret::<B>))
            .route("/v1/usage", get(usage::usage::<B>))
            .route("/v1/usage/statement", get(usage::statement::<B>))
            .fallback(models::fallback)
            .with_state(Arc::clone(self))
    }

    /// Sends `p` to its webhook if it asked for `event` (`completed` also stands for `output`: outputs are not
    /// streamed through webhooks).
    fn notify_webhook(&self, p: &Prediction, event: &str) {
        let Some(webhook) = &p.webhook else { return };
        if webhook.wants(event) {
            let namespace = p.model.split_once('/').map_or(p.model.as_str(), |(ns, _)| ns);
            self.webhooks.send(
                webhook.url.clone(),
                format!("{}-{event}", p.id),
                &p.response(&self.base_url),
                namespace,
            );
        }
    }

    /// Replaces the API keys (key, namespace): the Secrets or the keys file changed.
    pub fn set_keys(&self, keys: impl IntoIterator<Item = (String, String)>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys.into_iter().collect();
    }

    fn namespace_of(&self, headers: &HeaderMap) -> Option<String> {
        let key = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?;
        self.keys.read().unwrap_or_else(|p| p.into_inner()).get(key.trim()).cloned()
    }

    /// Who presents the request's key: a tenant (its namespace) or an operator; `None` without a known key.
    pub fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        self.namespace_of(headers).map(|ns| if ns == OPERATOR { Caller::Operator } else { Caller::Tenant(ns) })
    }
}

/// The namespace an operator key is given (`namespace: "*"` in a keys file; a Secret labelled
/// `kiln.dev/operator-key=true` in Kubernetes). No Kubernetes namespace can be named `*`, so no tenant can hold one.
/// An operator key lists every namespace's deployments and reads `/metrics`; it runs no predictions.
pub const OPERATOR: &str = "*";

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A tenant: the deployments of this namespace.
    Tenant(String),
    /// An operator: the whole fleet's state, no predictions.
    Operator,
}

impl<B: Backend> Gateway<B> {
    /// A 401 saying what is missing.
    pub fn unauthorized(&self) -> Response {
        problem(StatusCode::UNAUTHORIZED, "missing or unknown API key (Authorization: Bearer <key>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Puts a succeeded prediction with `input` and `output` in `store`, finished now.
    fn finished(store: &mut Store, id: &str, input: Value, output: Value) {
        let mut p = Prediction::new(id.to_owned(), "ns/m".into(), String::new(), input);
        p.status = PredictionStatus::Succeeded;
        p.output = output;
        store.map.insert(id.to_owned(), Box::new(p));
        store.finish(id);
    }

    #[test]
    fn finished_predictions_are_kept_up_to_the_cap_oldest_dropped_first() {
        let mut store = Store::default();
        for i in 0..MAX_FINISHED + 5 {
            let id = format!("p{i}");
            finished(&mut store, &id, Value::Null, Value::Null);
        }
        store.expire();
        assert_eq!(store.map.len(), MAX_FINISHED);
        assert!(!store.map.contains_key("p4") && store.map.contains_key("p5"));
    }

    #[test]
    fn large_inputs_are_let_go_once_finished_and_kept_bytes_are_capped() {
        let mut store = Store::default();
        let big = Value::String("x".repeat(crate::store::INPUT_LIMIT + 10));
        for i in 0..10 {
            let id = format!("p{i}");
            finished(&mut store, &id, big.clone(), Value::String("y".repeat(998)));
        }
        let p = &store.map["p0"];
        assert_eq!((&p.input, p.dropped.0), (&Value::Null, Some(crate::store::INPUT_LIMIT + 12)), "input let go");
        let shown = serde_json::to_value(p.response("http://x")).unwrap();
        assert!(shown["input_dropped"].is_string(), "the response says so");
        assert_eq!(store.retained, 10 * (4 + 1000), "null input + the 1000-byte output, each");
        store.expire_within(100, 5_000);
        assert_eq!(store.map.len(), 4, "the oldest go until the kept bytes fit");
        assert!(store.map.contains_key("p9") && !store.map.contains_key("p5"));
        assert_eq!(store.retained, 4 * 1004);
    }
}
