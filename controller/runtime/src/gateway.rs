//! The gateway's predictions API, in the shapes of Replicate's HTTP API, over a [`Backend`] that runs predictions
//! (the control loop: pick a ready replica, or hold the request while one starts).
//!
//! - `POST /v1/deployments/{namespace}/{name}/predictions` with `{"input": {...}}`: with `Prefer: wait` (or
//!   `wait=N` seconds, at most 60) answers when done (200), otherwise 201 with the prediction to poll.
//! - `GET /v1/predictions/{id}`, `POST /v1/predictions/{id}/cancel`.
//! - A prediction has `id`, `model` (`namespace/name`), `version`, `status` (`starting`, `processing`,
//!   `succeeded`, `failed`, `canceled`), `input`, `output`, `error`, `logs`, `created_at`/`started_at`/
//!   `completed_at`, `urls` (`get`, `cancel`, and `stream` when asked for) and `metrics` (`predict_time`, `queue_time`, `cold_start`
//!   and `cold_start_time`).
//! - Auth: `Authorization: Bearer <key>`; a key belongs to one namespace and never reaches another's deployments
//!   (401 without a valid key, 403 for another namespace). Unknown deployment: 404 naming it. Malformed body: 400
//!   saying what is wrong. Too many requests held for a cold start: 429 with `Retry-After`; held past the deadline:
//!   the prediction fails with a message saying the deployment was still cold-starting (504 when waited on).
//! - `"webhook"` (with `"webhook_events_filter"`: `start`, `output`, `logs`, `completed`) POSTs the prediction to
//!   a URL, retried with backoff and signed with a secret per namespace ([`crate::webhook`]; a namespace's key at `GET /v1/webhooks/default/secret`); `"stream": true` adds `urls.stream`, server-sent events
//!   (`output`, or `error`, then `done`; outputs come whole, so there is one `output` event).
//!
//! Finished predictions stay readable for an hour (at most the newest 100,000). With a [`Persister`] each prediction
//! is written to the store on every transition (created, started, finished, expired) and [`Gateway::restore`] reads
//! them back after a restart: finished ones are served as before, one that was running is finished as failed
//! ([`RESTART_ERROR`]) and its `completed` webhook sent.
//!
//! Shutdown ([`Gateway::drain`]): new predictions get 503 with `Retry-After`; those under way get the grace period
//! to finish; what is left then fails ([`SHUTDOWN_ERROR`]: 503 with `Retry-After` for a client waiting on it, the
//! `completed` webhook for the others). Canceling marks the prediction
//! canceled and drops its result; it does not stop work already sent to a replica. The gateway's metrics are
//! recorded by its backend (the control plane).

use std::{
    collections::HashMap,
    future::Future,
    hash::{BuildHasher, Hasher},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use crate::store::{Persister, PredictionRecord};

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
}

#[derive(Debug, Clone)]
struct Prediction {
    id: String,
    model: String,
    version: String,
    status: &'static str,
    input: Value,
    output: Value,
    error: Option<String>,
    created_at: SystemTime,
    started_at: Option<SystemTime>,
    completed_at: Option<SystemTime>,
    metrics: Value,
    done: Arc<Notify>,
    /// Webhook URL and the events it wants.
    webhook: Option<(String, Vec<String>)>,
    stream: bool,
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

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

impl Prediction {
    fn json(&self, base: &str) -> Value {
        let url = format!("{base}/v1/predictions/{}", self.id);
        let mut value = json!({
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "status": self.status,
            "input": self.input,
            "output": self.output,
            "error": self.error,
            "logs": "",
            "created_at": rfc3339(self.created_at),
            "started_at": self.started_at.map(rfc3339),
            "completed_at": self.completed_at.map(rfc3339),
            "urls": if self.stream {
                json!({ "get": url, "cancel": format!("{url}/cancel"), "stream": format!("{url}/stream") })
            } else {
                json!({ "get": url, "cancel": format!("{url}/cancel") })
            },
            "metrics": self.metrics,
        });
        if let Some(n) = self.dropped.0 {
            value["input_dropped"] =
                json!(format!("the input ({n} bytes) was over the {} kept", kib(crate::store::INPUT_LIMIT)));
        }
        if let Some(n) = self.dropped.1 {
            value["output_dropped"] = json!(format!(
                "the output ({n} bytes) was over the {} kept across restarts",
                kib(crate::store::OUTPUT_LIMIT)
            ));
        }
        value
    }

    fn finished(&self) -> bool {
        matches!(self.status, "succeeded" | "failed" | "canceled")
    }

    /// The stored form.
    fn record(&self) -> PredictionRecord {
        let (webhook, webhook_events_filter) = match &self.webhook {
            Some((url, events)) => (Some(url.clone()), events.clone()),
            None => (None, Vec::new()),
        };
        PredictionRecord {
            id: self.id.clone(),
            model: self.model.clone(),
            version: self.version.clone(),
            status: self.status.to_owned(),
            input: self.input.clone(),
            input_dropped_bytes: self.dropped.0,
            output: self.output.clone(),
            output_dropped_bytes: self.dropped.1,
            error: self.error.clone(),
            logs: String::new(),
            metrics: self.metrics.clone(),
            created_at: self.created_at,
            started_at: self.started_at,
            completed_at: self.completed_at,
            webhook,
            webhook_events_filter,
            stream: self.stream,
        }
    }

    /// A prediction from its stored form.
    fn from_record(r: PredictionRecord) -> Self {
        let status = match r.status.as_str() {
            "starting" => "starting",
            "processing" => "processing",
            "succeeded" => "succeeded",
            "canceled" => "canceled",
            _ => "failed",
        };
        Self {
            id: r.id,
            model: r.model,
            version: r.version,
            status,
            input: r.input,
            output: r.output,
            error: r.error,
            created_at: r.created_at,
            started_at: r.started_at,
            completed_at: r.completed_at,
            metrics: r.metrics,
            done: Arc::new(Notify::new()),
            webhook: r.webhook.map(|url| (url, r.webhook_events_filter)),
            stream: r.stream,
            dropped: (r.input_dropped_bytes, r.output_dropped_bytes),
            kept_bytes: 0,
        }
    }
}

fn kib(bytes: usize) -> String {
    format!("{} KiB", bytes / 1024)
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
#[derive(Debug, Default)]
struct Store {
    map: HashMap<String, Prediction>,
    finished: std::collections::VecDeque<(SystemTime, String)>,
    /// Bytes kept by finished predictions.
    retained: usize,
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
    drain: Drain,
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

    fn persist_record(&self, record: Option<PredictionRecord>) {
        if let (Some(persister), Some(r)) = (&self.persister, record) {
            persister.put(r);
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
            if p.finished() {
                let at = p.completed_at.unwrap_or(p.created_at);
                if now.duration_since(at).unwrap_or_default() >= RETENTION {
                    expired.push(p.id);
                } else {
                    finished.push((at, p));
                }
            } else {
                p.status = "failed";
                p.error = Some(RESTART_ERROR.to_owned());
                p.completed_at = Some(now);
                p.metrics = json!({ "controller_restarted": true });
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
                store.map.insert(id.clone(), p);
                store.finish_at(&id, at);
            }
            for p in &interrupted {
                store.map.insert(p.id.clone(), p.clone());
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
                    p.status = "failed";
                    p.error = Some(SHUTDOWN_ERROR.to_owned());
                    p.completed_at = Some(now);
                    p.metrics = json!({ "shutdown": true, "retry_after": SHUTDOWN_RETRY_AFTER_S });
                    p.done.notify_waiters();
                    p.clone()
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
            .route("/v1/predictions/{id}", get(fetch::<B>))
            .route("/v1/predictions/{id}/cancel", post(cancel::<B>))
            .route("/v1/predictions/{id}/stream", get(stream::<B>))
            .route("/v1/webhooks/default/secret", get(webhook_secret::<B>))
            .with_state(Arc::clone(self))
    }

    /// Sends `p` to its webhook if it asked for `event` (`completed` also stands for `output`: outputs are not
    /// streamed through webhooks).
    fn notify_webhook(&self, p: &Prediction, event: &str) {
        let Some((url, events)) = &p.webhook else { return };
        let wanted = events.iter().any(|e| e == event || (event == "completed" && e == "output"));
        if wanted {
            let namespace = p.model.split_once('/').map_or(p.model.as_str(), |(ns, _)| ns);
            self.webhooks.send(url.clone(), format!("{}-{event}", p.id), &p.json(&self.base_url), namespace);
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

fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({ "title": status.canonical_reason(), "status": status.as_u16(), "detail": detail.into() })))
        .into_response()
}

/// 503 with `Retry-After`: the gateway is shutting down.
fn shutting_down(detail: impl Into<String>) -> Response {
    let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, detail);
    response.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from(SHUTDOWN_RETRY_AFTER_S));
    response
}

fn new_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let mut x = h.finish();
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut id = String::with_capacity(26);
    for i in 0..26 {
        if i == 13 {
            let mut h2 = std::collections::hash_map::RandomState::new().build_hasher();
            h2.write_u64(x);
            x = h2.finish();
        }
        id.push(ALPHABET[(x & 31) as usize] as char);
        x >>= 5;
    }
    id
}

/// The webhook of a create request: its URL and events (`start`, `output`, `logs`, `completed`; all by default).
fn parse_webhook(body: &Value) -> Result<Option<(String, Vec<String>)>, String> {
    let url = match body.get("webhook") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(u)) => u.clone(),
        Some(other) => return Err(format!("\"webhook\" must be a URL string, not {other}")),
    };
    crate::webhook::check_url(&url).map_err(|e| e.to_string())?;
    const EVENTS: [&str; 4] = ["start", "output", "logs", "completed"];
    let events = match body.get("webhook_events_filter") {
        None | Some(Value::Null) => EVENTS.iter().map(|e| (*e).to_owned()).collect(),
        Some(Value::Array(list)) => {
            let mut events = Vec::new();
            for e in list {
                match e.as_str().filter(|e| EVENTS.contains(e)) {
                    Some(e) => events.push(e.to_owned()),
                    None => {
                        return Err(format!("webhook_events_filter: {e} is not one of start, output, logs, completed"));
                    }
                }
            }
            events
        }
        Some(other) => return Err(format!("\"webhook_events_filter\" must be a list, not {other}")),
    };
    Ok(Some((url, events)))
}

/// Parses `Prefer: wait` / `wait=N` into how long to wait (at most 60 s).
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    let prefer = headers.get("prefer")?.to_str().ok()?;
    prefer.split(',').map(str::trim).find_map(|p| match p.strip_prefix("wait") {
        Some("") => Some(Duration::from_secs(60)),
        Some(rest) => {
            rest.strip_prefix('=').and_then(|n| n.trim().parse::<u64>().ok()).map(|n| Duration::from_secs(n.min(60)))
        }
        None => None,
    })
}

async fn create<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(caller) = gw.namespace_of(&headers) else {
        return problem(StatusCode::UNAUTHORIZED, "missing or unknown API key (Authorization: Bearer <key>)");
    };
    if caller != namespace {
        return problem(StatusCode::FORBIDDEN, format!("this API key does not give access to namespace {namespace}"));
    }
    // Counted before the check, so a drain that begins now either sees this prediction or refuses it.
    let in_flight = InFlight::new(&gw.drain.in_flight);
    if gw.is_draining() {
        return shutting_down("the gateway is shutting down and takes no new predictions; retry");
    }
    // Admission before anything is parsed or stored: the permit counts this prediction until it finishes.
    let permit = match gw.limits.admit(&namespace, body.len() as u64, std::time::Instant::now()) {
        Ok(p) => p,
        Err(refusal) => {
            let mut response = problem(StatusCode::TOO_MANY_REQUESTS, refusal.to_string());
            if let Ok(v) = refusal.retry_after_s().to_string().parse() {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return response;
        }
    };
    let model = format!("{namespace}/{name}");
    let Some(version) = gw.backend.version(&model) else {
        return problem(StatusCode::NOT_FOUND, format!("deployment {model} not found"));
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")),
    };
    let Some(input) = body.get("input").filter(|i| i.is_object()).cloned() else {
        return problem(StatusCode::BAD_REQUEST, "the body needs an \"input\" object, e.g. {\"input\": {...}}");
    };
    let webhook = match parse_webhook(&body) {
        Ok(w) => w,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    // Where the webhook's name points now (it is checked again at each delivery).
    if let Some((url, _)) = &webhook
        && let Err(e) = gw.webhooks.destinations().check(url).await
    {
        return problem(StatusCode::BAD_REQUEST, e.to_string());
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return problem(StatusCode::BAD_REQUEST, format!("\"stream\" must be true or false, not {other}"));
        }
    };
    let id = new_id();
    let done = Arc::new(Notify::new());
    let prediction = Prediction {
        id: id.clone(),
        model: model.clone(),
        version,
        status: "starting",
        input: input.clone(),
        output: Value::Null,
        error: None,
        created_at: SystemTime::now(),
        started_at: None,
        completed_at: None,
        metrics: json!({}),
        done: Arc::clone(&done),
        webhook,
        stream,
        dropped: (None, None),
        kept_bytes: 0,
    };
    gw.persist(&prediction);
    let expired = {
        let mut predictions = gw.lock();
        let expired = predictions.expire();
        predictions.map.insert(id.clone(), prediction);
        expired
    };
    gw.persist_expired(expired);
    let wait = prefer_wait(&headers);
    let runner = Arc::clone(&gw);
    let task_id = id.clone();
    let notified = done.notified();
    tokio::spawn(async move {
        let _permit = permit;
        let _in_flight = in_flight;
        // Copies only for the store and a webhook, used outside the lock.
        let persisted = runner.persister.is_some();
        let started = runner.lock().map.get_mut(&task_id).map(|p| {
            p.status = "processing";
            p.started_at = Some(SystemTime::now());
            (persisted.then(|| p.record()), p.webhook.is_some().then(|| p.clone()))
        });
        if let Some((record, webhook)) = started {
            runner.persist_record(record);
            if let Some(p) = webhook {
                runner.notify_webhook(&p, "start");
            }
        }
        let result = runner.backend.predict(&model, input, runner.hold).await;
        let mut store = runner.lock();
        let Some(p) = store.map.get_mut(&task_id) else { return };
        if p.finished() {
            // Canceled, or cut off by a shutdown.
            return;
        }
        p.completed_at = Some(SystemTime::now());
        match result {
            Ok(o) => {
                p.status = "succeeded";
                p.output = o.output;
                p.metrics = json!({
                    "predict_time": o.predict_time,
                    "queue_time": o.queue_time,
                    "cold_start": o.cold_start.is_some(),
                    "cold_start_time": o.cold_start,
                });
            }
            Err(e) => {
                p.status = "failed";
                p.error = Some(e.to_string());
                p.metrics = json!({ "overloaded": matches!(e, PredictError::Overloaded { .. }) });
                if let PredictError::Overloaded { retry_after_s, .. } = e {
                    p.metrics["retry_after"] = json!(retry_after_s);
                }
                if matches!(e, PredictError::ColdStartTimeout { .. }) {
                    p.metrics["cold_start_timeout"] = json!(true);
                }
            }
        }
        p.done.notify_waiters();
        let (record, webhook) = (persisted.then(|| p.record()), p.webhook.is_some().then(|| p.clone()));
        store.finish(&task_id);
        drop(store);
        runner.persist_record(record);
        if let Some(p) = webhook {
            runner.notify_webhook(&p, "completed");
        }
    });
    let Some(wait) = wait else {
        let p = gw.lock().map.get(&id).cloned();
        return match p {
            Some(p) => (StatusCode::CREATED, Json(p.json(&gw.base_url))).into_response(),
            None => problem(StatusCode::INTERNAL_SERVER_ERROR, "prediction lost"),
        };
    };
    let finished = gw.lock().map.get(&id).is_some_and(Prediction::finished);
    if !finished {
        let _ = tokio::time::timeout(wait, notified).await;
    }
    let Some(p) = gw.lock().map.get(&id).cloned() else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "prediction lost");
    };
    if p.status == "failed" && p.metrics.get("overloaded") == Some(&json!(true)) {
        let retry = p.metrics.get("retry_after").and_then(Value::as_u64).unwrap_or(1);
        let mut response = problem(StatusCode::TOO_MANY_REQUESTS, p.error.clone().unwrap_or_default());
        if let Ok(v) = retry.to_string().parse() {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    if p.status == "failed" && p.metrics.get("shutdown") == Some(&json!(true)) {
        return shutting_down(format!("prediction {id}: {SHUTDOWN_ERROR}"));
    }
    if p.status == "failed" && p.metrics.get("cold_start_timeout") == Some(&json!(true)) {
        return (StatusCode::GATEWAY_TIMEOUT, Json(p.json(&gw.base_url))).into_response();
    }
    let status = if p.finished() { StatusCode::OK } else { StatusCode::CREATED };
    (status, Json(p.json(&gw.base_url))).into_response()
}

async fn fetch<B: Backend>(State(gw): State<Arc<Gateway<B>>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(caller) = gw.namespace_of(&headers) else {
        return problem(StatusCode::UNAUTHORIZED, "missing or unknown API key (Authorization: Bearer <key>)");
    };
    match gw.lock().map.get(&id) {
        Some(p) if p.model.split('/').next() == Some(caller.as_str()) => Json(p.json(&gw.base_url)).into_response(),
        _ => problem(StatusCode::NOT_FOUND, format!("prediction {id} not found")),
    }
}

/// `GET /v1/webhooks/default/secret`: the key the caller's namespace's webhooks are signed with (its own only).
async fn webhook_secret<B: Backend>(State(gw): State<Arc<Gateway<B>>>, headers: HeaderMap) -> Response {
    let Some(namespace) = gw.namespace_of(&headers) else {
        return problem(StatusCode::UNAUTHORIZED, "missing or unknown API key (Authorization: Bearer <key>)");
    };
    match &gw.webhooks.secret {
        Some(secret) => Json(json!({ "key": secret.for_namespace(&namespace).as_str() })).into_response(),
        None => problem(StatusCode::NOT_FOUND, "webhooks are not signed by this gateway (no signing secret is set)"),
    }
}

/// `GET /v1/predictions/{id}/stream`: server-sent events, as Replicate's: `output` with the output (as JSON text),
/// or `error`, then `done`. Outputs are produced whole, so there is one `output` event.
async fn stream<B: Backend>(State(gw): State<Arc<Gateway<B>>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    use axum::response::sse::{Event, Sse};
    let Some(caller) = gw.namespace_of(&headers) else {
        return problem(StatusCode::UNAUTHORIZED, "missing or unknown API key (Authorization: Bearer <key>)");
    };
    let done = match gw.lock().map.get(&id) {
        Some(p) if p.model.split('/').next() == Some(caller.as_str()) => Arc::clone(&p.done),
        _ => return problem(StatusCode::NOT_FOUND, format!("prediction {id} not found")),
    };
    let notified = done.notified();
    let finished = gw.lock().map.get(&id).is_some_and(Prediction::finished);
    if !finished {
        notified.await;
    }
    let p = gw.lock().map.get(&id).cloned();
    let mut events = Vec::new();
    match p {
        Some(p) if p.status == "succeeded" => events.push(Event::default().event("output").data(p.output.to_string())),
        Some(p) => events.push(Event::default().event("error").data(p.error.unwrap_or_else(|| p.status.to_owned()))),
        None => events.push(Event::default().event("error").data("the prediction expired")),
    }
    events.push(Event::default().event("done").data("{}"));
    Sse::new(tokio_stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>))).into_response()
}

async fn cancel<B: Backend>(State(gw): State<Arc<Gateway<B>>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(caller) = gw.namespace_of(&headers) else {
        return problem(StatusCode::UNAUTHORIZED, "missing or unknown API key (Authorization: Bearer <key>)");
    };
    let mut store = gw.lock();
    match store.map.get_mut(&id) {
        Some(p) if p.model.split('/').next() == Some(caller.as_str()) => {
            let canceled = !p.finished();
            if canceled {
                p.status = "canceled";
                p.completed_at = Some(SystemTime::now());
                p.done.notify_waiters();
            }
            let response = Json(p.json(&gw.base_url)).into_response();
            let record = (canceled && gw.persister.is_some()).then(|| p.record());
            if canceled {
                store.finish(&id);
            }
            drop(store);
            gw.persist_record(record);
            response
        }
        _ => problem(StatusCode::NOT_FOUND, format!("prediction {id} not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_764_072_000, 123_456_000);
        assert_eq!(rfc3339(t), "2025-11-25T12:00:00.123456Z");
    }

    #[test]
    fn prefer_wait_parses_with_and_without_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(prefer_wait(&h), None);
        h.insert("prefer", "wait".parse().unwrap());
        assert_eq!(prefer_wait(&h), Some(Duration::from_secs(60)));
        h.insert("prefer", "respond-async, wait=5".parse().unwrap());
        assert_eq!(prefer_wait(&h), Some(Duration::from_secs(5)));
        h.insert("prefer", "wait=600".parse().unwrap());
        assert_eq!(prefer_wait(&h), Some(Duration::from_secs(60)));
    }

    #[test]
    fn ids_look_like_replicate_ids_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 26);
        assert!(a.bytes().all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
        assert_ne!(a, b);
    }

    /// Puts a succeeded prediction with `input` and `output` in `store`, finished now.
    fn finished(store: &mut Store, id: &str, input: Value, output: Value) {
        let p = Prediction {
            id: id.to_owned(),
            model: "ns/m".into(),
            version: String::new(),
            status: "succeeded",
            input,
            output,
            error: None,
            created_at: SystemTime::now(),
            started_at: None,
            completed_at: None,
            metrics: Value::Null,
            done: Arc::new(Notify::new()),
            webhook: None,
            stream: false,
            dropped: (None, None),
            kept_bytes: 0,
        };
        store.map.insert(id.to_owned(), p);
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
        assert!(p.json("http://x")["input_dropped"].is_string(), "the response says so");
        assert_eq!(store.retained, 10 * (4 + 1000), "null input + the 1000-byte output, each");
        store.expire_within(100, 5_000);
        assert_eq!(store.map.len(), 4, "the oldest go until the kept bytes fit");
        assert!(store.map.contains_key("p9") && !store.map.contains_key("p5"));
        assert_eq!(store.retained, 4 * 1004);
    }
}
