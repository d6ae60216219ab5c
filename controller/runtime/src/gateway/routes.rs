//! The predictions API's handlers: create (admission, parsing, the run, waiting), read, cancel, stream, and the
//! namespace's webhook secret; and the parsing of what a create request asks for (its webhook, `Prefer: wait`).

use std::{
    future::Future,
    hash::{BuildHasher, Hasher},
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{Backend, Gateway, InFlight, Outcome, Prediction, SHUTDOWN_ERROR, SHUTDOWN_RETRY_AFTER_S};
use crate::{
    prediction::{FailureKind, PredictionStatus, RunMetrics},
    webhook::WebhookError,
};

/// Why a create request's body is refused (a 400 with this as its `detail`).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// `webhook` is not a string.
    #[error("\"webhook\" must be a URL string, not {0}")]
    WebhookNotUrl(Value),
    /// The webhook URL is not an http(s) URL with a host.
    #[error(transparent)]
    WebhookUrl(#[from] WebhookError),
    /// `webhook_events_filter` names an event that is not one of the four.
    #[error("webhook_events_filter: {0} is not one of start, output, logs, completed")]
    UnknownEvent(Value),
    /// `webhook_events_filter` is not a list.
    #[error("\"webhook_events_filter\" must be a list, not {0}")]
    EventsNotList(Value),
}

/// The webhook a create request asked for: where to POST the prediction, and for which events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSubscription {
    /// The URL.
    pub url: String,
    /// Events to deliver: `start`, `output`, `logs`, `completed` (all by default).
    pub events: Vec<String>,
}

impl WebhookSubscription {
    /// The events there are.
    pub const EVENTS: [&str; 4] = ["start", "output", "logs", "completed"];

    /// The webhook of a create request's body (`webhook`, `webhook_events_filter`), `None` without one. The URL's
    /// syntax is checked here; where it points, by [`crate::webhook::Destinations::check`].
    pub fn from_body(body: &Value) -> Result<Option<Self>, RequestError> {
        let url = match body.get("webhook") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(u)) => u.clone(),
            Some(other) => return Err(RequestError::WebhookNotUrl(other.clone())),
        };
        crate::webhook::check_url(&url)?;
        let events = match body.get("webhook_events_filter") {
            None | Some(Value::Null) => Self::EVENTS.iter().map(|e| (*e).to_owned()).collect(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|e| match e.as_str().filter(|e| Self::EVENTS.contains(e)) {
                    Some(e) => Ok(e.to_owned()),
                    None => Err(RequestError::UnknownEvent(e.clone())),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(RequestError::EventsNotList(other.clone())),
        };
        Ok(Some(Self { url, events }))
    }

    /// Whether it wants `event` (`completed` also stands for `output`: outputs are not streamed through webhooks).
    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event || (event == "completed" && e == "output"))
    }
}

/// An error answer: `{"title", "status", "detail"}` with `status`.
pub(super) fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({ "title": status.canonical_reason(), "status": status.as_u16(), "detail": detail.into() })))
        .into_response()
}

/// 503 with `Retry-After`: the gateway is shutting down.
fn shutting_down(detail: impl Into<String>) -> Response {
    let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, detail);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(SHUTDOWN_RETRY_AFTER_S));
    response
}

/// A new prediction id: 26 characters of base32 (lowercase and 2-7), as Replicate's look. The first 10 are the
/// creation time in milliseconds (50 bits) written with the same 32 characters in byte order, the other 16 random
/// (80 bits): ids made one after another sort next to each other, so the store's B-tree (keyed by id) takes a
/// burst of new predictions into a few adjacent pages instead of dirtying a page per prediction in each commit.
fn new_id() -> String {
    const SORTED: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    // 50 bits of milliseconds last until the year 37,000.
    let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    let random = |seed: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(seed);
        h.finish()
    };
    // Each `RandomState` has keys of its own (random per thread, then incremented), so two draws differ.
    let (a, b) = (random(now.subsec_nanos().into()), random(ms));
    let mut id = String::with_capacity(26);
    for i in (0..10).rev() {
        id.push(SORTED[((ms >> (5 * i)) & 31) as usize] as char);
    }
    for i in 0..16 {
        let bits = if i < 12 { a >> (5 * i) } else { b >> (5 * (i - 12)) };
        id.push(SORTED[(bits & 31) as usize] as char);
    }
    id
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

/// `POST /v1/deployments/{namespace}/{name}/predictions`: admits, parses and stores the prediction, and either runs
/// it on a task of its own and answers at once (201) or, with `Prefer: wait`, runs it on this request's task and
/// answers when it finishes (200, or 429, 503 or 504 by its [`FailureKind`]) or the wait ends (201; the run goes on,
/// [`Detach`]).
pub(super) async fn create<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(caller) = gw.namespace_of(&headers) else {
        return gw.unauthorized();
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
    let mut body = body;
    // Taken out of the body, not copied (what is read of the body later is its other fields).
    let Some(input) = body.as_object_mut().and_then(|o| o.remove("input")).filter(Value::is_object) else {
        return problem(StatusCode::BAD_REQUEST, "the body needs an \"input\" object, e.g. {\"input\": {...}}");
    };
    let webhook = match WebhookSubscription::from_body(&body) {
        Ok(w) => w,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Where the webhook's name points now (it is checked again at each delivery).
    if let Some(w) = &webhook
        && let Err(e) = gw.webhooks.destinations().check(&w.url).await
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
    let prediction = Prediction {
        webhook,
        stream,
        stream_token: gw.webhooks.secret.as_ref().map(|s| s.stream_token(&id)),
        partials: (stream || gw.backend.streams(&model)).then(|| Arc::new(tokio::sync::watch::channel(0).0)),
        ..Prediction::new(id.clone(), model.clone(), version, input.clone())
    };
    let done = Arc::clone(&prediction.done);
    let streaming = prediction.partials.is_some();
    let expired = {
        let mut predictions = gw.lock();
        let expired = predictions.expire();
        predictions.map.insert(id.clone(), Box::new(prediction));
        expired
    };
    gw.persist_expired(expired);
    gw.persist_latest(&id);
    let wait = prefer_wait(&headers);
    let notified = done.notified();
    let run = run(Arc::clone(&gw), id.clone(), model, input, streaming, permit, in_flight);
    // Responses are encoded from the stored prediction under its lock (encoding is synchronous), not from a copy.
    let Some(wait) = wait else {
        tokio::spawn(run);
        let store = gw.lock();
        return match store.map.get(&id) {
            Some(p) => (StatusCode::CREATED, Json(p.response(&gw.base_url))).into_response(),
            None => problem(StatusCode::INTERNAL_SERVER_ERROR, "prediction lost"),
        };
    };
    // Waited on: the run is polled here, on the request's own task, rather than spawned and waited for (a task
    // and a wake-up less per prediction). A cancel or a shutdown's cut-off ends the wait at once, as does its end;
    // what is left of the run then goes on a task of its own, as it does when the client hangs up (`Detach`).
    {
        let mut run = Detach(Some(Box::pin(run)));
        tokio::select! {
            () = &mut run => {}
            () = notified => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    let store = gw.lock();
    let Some(p) = store.map.get(&id) else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "prediction lost");
    };
    // A failure the client should hear about as an HTTP status: its kind says which.
    let status = match p.failure {
        Some(FailureKind::Overloaded { retry_after_s }) => {
            let mut response = problem(StatusCode::TOO_MANY_REQUESTS, p.error.clone().unwrap_or_default());
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            return response;
        }
        Some(FailureKind::Shutdown { .. }) => return shutting_down(format!("prediction {id}: {SHUTDOWN_ERROR}")),
        Some(FailureKind::ColdStartTimeout) => StatusCode::GATEWAY_TIMEOUT,
        _ if p.finished() => StatusCode::OK,
        _ => StatusCode::CREATED,
    };
    (status, Json(p.response(&gw.base_url))).into_response()
}

/// Runs prediction `id` (stored as `starting`) on the backend and stores what came of it, holding its admission
/// `permit` and its place among the predictions `in_flight` until then. One canceled (or cut off by a shutdown)
/// before it began is not run; one canceled while it ran keeps its canceled state.
async fn run<B: Backend>(
    gw: Arc<Gateway<B>>,
    id: String,
    model: String,
    input: Value,
    streaming: bool,
    permit: crate::limits::Permit,
    in_flight: InFlight,
) {
    let _held = (permit, in_flight);
    // One canceled (or cut off by a shutdown) before its run began stays so, and is not run. A copy only for a
    // webhook, used outside the lock; the store reads the prediction itself when it commits.
    let started = gw.lock().map.get_mut(&id).filter(|p| !p.finished()).map(|p| {
        p.status = PredictionStatus::Processing;
        p.started_at = Some(SystemTime::now());
        p.webhook.is_some().then(|| p.clone())
    });
    let Some(webhook) = started else { return };
    gw.persist_latest(&id);
    if let Some(p) = webhook {
        gw.notify_webhook(&p, "start");
    }
    let result = if streaming {
        let outputs = super::stream::output_sink(Arc::clone(&gw), id.clone());
        gw.backend.predict_streaming(&model, input, gw.hold, outputs).await
    } else {
        gw.backend.predict(&model, input, gw.hold).await
    };
    // Priced outside the prediction lock (the billing service has its own).
    let billed = match (&result, &gw.billing) {
        (Ok(Outcome { gpu: Some(g), predict_time, .. }), Some(billing)) => {
            billing.prediction_amount(&g.gpu_model, g.share_milli, *predict_time).ok()
        }
        _ => None,
    };
    let mut store = gw.lock();
    let Some(p) = store.map.get_mut(&id) else { return };
    if p.finished() {
        // Canceled, or cut off by a shutdown.
        return;
    }
    let now = SystemTime::now();
    match result {
        Ok(o) => {
            p.status = PredictionStatus::Succeeded;
            p.completed_at = Some(now);
            p.output = o.output;
            p.run = Some(RunMetrics {
                predict_time: o.predict_time,
                queue_time: o.queue_time,
                cold_start: o.cold_start.is_some(),
                cold_start_time: o.cold_start,
                gpu_share: o.gpu.as_ref().map(|g| f64::from(g.share_milli) / 1000.0),
                billed_amount: billed,
            });
        }
        Err(e) => p.fail(e.kind(), e.to_string(), now),
    }
    p.done.notify_waiters();
    let webhook = p.webhook.is_some().then(|| p.clone());
    store.finish(&id);
    drop(store);
    gw.persist_latest(&id);
    if let Some(p) = webhook {
        gw.notify_webhook(&p, "completed");
    }
}

/// A prediction's run, polled by the request that waits on it. If it is dropped before the run is done (the client
/// hung up, the wait ended, or the prediction was canceled), the rest of the run goes on a task of its own, so a
/// prediction once admitted always finishes and is stored.
struct Detach(Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Future for Detach {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if let Some(run) = self.0.as_mut() {
            std::task::ready!(run.as_mut().poll(cx));
            self.0 = None;
        }
        std::task::Poll::Ready(())
    }
}

impl Drop for Detach {
    fn drop(&mut self) {
        // Outside a runtime (the runtime itself is being dropped) there is nothing left to run it on.
        if let (Some(run), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(run);
        }
    }
}

/// `GET /v1/predictions/{id}`: the prediction, to a key of its namespace.
pub(super) async fn fetch<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(caller) = gw.namespace_of(&headers) else {
        return gw.unauthorized();
    };
    match gw.lock().map.get(&id) {
        Some(p) if p.model.split('/').next() == Some(caller.as_str()) => Json(p.response(&gw.base_url)).into_response(),
        _ => problem(StatusCode::NOT_FOUND, format!("prediction {id} not found")),
    }
}

/// `GET /v1/webhooks/default/secret`: the key the caller's namespace's webhooks are signed with (its own only).
pub(super) async fn webhook_secret<B: Backend>(State(gw): State<Arc<Gateway<B>>>, headers: HeaderMap) -> Response {
    let Some(namespace) = gw.namespace_of(&headers) else {
        return gw.unauthorized();
    };
    match &gw.webhooks.secret {
        Some(secret) => Json(json!({ "key": secret.for_namespace(&namespace).as_str() })).into_response(),
        None => problem(StatusCode::NOT_FOUND, "webhooks are not signed by this gateway (no signing secret is set)"),
    }
}

/// `POST /v1/predictions/{id}/cancel`: marks it canceled unless it has finished; answers with the prediction.
pub(super) async fn cancel<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(caller) = gw.namespace_of(&headers) else {
        return gw.unauthorized();
    };
    let mut store = gw.lock();
    match store.map.get_mut(&id) {
        Some(p) if p.model.split('/').next() == Some(caller.as_str()) => {
            let canceled = !p.finished();
            if canceled {
                p.status = PredictionStatus::Canceled;
                p.completed_at = Some(SystemTime::now());
                p.done.notify_waiters();
            }
            let response = Json(p.response(&gw.base_url)).into_response();
            if canceled {
                store.finish(&id);
            }
            drop(store);
            if canceled {
                gw.persist_latest(&id);
            }
            response
        }
        _ => problem(StatusCode::NOT_FOUND, format!("prediction {id} not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let many: std::collections::HashSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(many.len(), 10_000, "ids made in the same millisecond differ");
    }

    #[tokio::test]
    async fn a_run_dropped_before_it_is_done_goes_on_by_itself() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (finished, ran) = tokio::sync::oneshot::channel();
        let mut run = Detach(Some(Box::pin(async move {
            let _ = wait.await;
            let _ = finished.send(());
        })));
        // Polled while it waits, then dropped, as when the waiting client hangs up.
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut run).await.is_err());
        drop(run);
        go.send(()).expect("the rest of the run is alive on a task of its own");
        tokio::time::timeout(Duration::from_secs(5), ran).await.expect("the rest ran").unwrap();
        // One that finished while polled leaves nothing behind.
        let mut done = Detach(Some(Box::pin(async {})));
        (&mut done).await;
        assert!(done.0.is_none());
    }

    #[test]
    fn ids_sort_in_the_order_they_were_made() {
        let first = new_id();
        std::thread::sleep(Duration::from_millis(3));
        let second = new_id();
        assert!(first < second, "{first} then {second}");
        assert_ne!(first[..10], second[..10], "the time part moved");
    }

    #[test]
    fn webhooks_are_parsed_into_a_subscription_or_refused_saying_why() {
        let parse = |body: Value| WebhookSubscription::from_body(&body);
        assert_eq!(parse(json!({ "input": {} })).unwrap(), None);
        assert_eq!(parse(json!({ "webhook": null })).unwrap(), None);
        let all = parse(json!({ "webhook": "https://example.com/h" })).unwrap().unwrap();
        assert_eq!((all.url.as_str(), all.events.len()), ("https://example.com/h", 4));
        let done = json!({ "webhook": "https://example.com/h", "webhook_events_filter": ["output"] });
        let done = parse(done).unwrap().unwrap();
        assert!(done.wants("completed") && !done.wants("start"), "output is delivered with completed");

        let refused = [
            (json!({ "webhook": 7 }), "\"webhook\" must be a URL string, not 7"),
            (json!({ "webhook": "ftp://x/y" }), "webhook \"ftp://x/y\" must be an http:// or https:// URL with a host"),
            (
                json!({ "webhook": "http://h/", "webhook_events_filter": ["bogus"] }),
                "webhook_events_filter: \"bogus\" is not one of start, output, logs, completed",
            ),
            (
                json!({ "webhook": "http://h/", "webhook_events_filter": "start" }),
                "\"webhook_events_filter\" must be a list, not \"start\"",
            ),
        ];
        for (body, detail) in refused {
            assert_eq!(parse(body).unwrap_err().to_string(), detail);
        }
        assert!(matches!(parse(json!({ "webhook": "nope" })), Err(RequestError::WebhookUrl(_))));
    }
}
