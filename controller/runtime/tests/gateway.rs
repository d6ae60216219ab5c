//! The predictions API over a fake backend whose one deployment starts cold: sync and async predictions,
//! cold-start metrics, auth, 404/400, a full hold queue (429) and a cold start past the deadline (504); a
//! shutdown's drain; predictions and webhooks across a restart (through a store); the rest of Replicate's API
//! (models, listings with pagination, hardware, account, what is not supported).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::Duration,
};

use kiln_controller::{
    control::HoldQueue,
    gateway::{
        Backend, Catalog, DeploymentInfo, Gateway, GpuUse, Outcome, PAGE_SIZE, PredictError, RESTART_ERROR, Restored,
        SHUTDOWN_ERROR,
    },
    limits::{LimitConfig, TenantLimits},
    prediction::{FailureKind, PredictionStatus::Failed},
    store::{MemoryStore, Persister, PredictionRecord, PredictionStore},
    webhook::{Destinations, Secret, Webhooks},
};
use serde_json::{Value, json};

/// `demo/echo` echoes its input; its replica becomes ready `cold` after the first request.
struct Fake {
    queue: Arc<HoldQueue>,
    cold: Duration,
}

impl Backend for Fake {
    fn version(&self, deployment: &str) -> Option<String> {
        (deployment == "demo/echo").then(|| "v1".to_owned())
    }

    async fn predict(&self, deployment: &str, input: Value, hold: Duration) -> Result<Outcome, PredictError> {
        let was_cold = !self.queue.is_ready();
        if was_cold {
            let (queue, cold) = (Arc::clone(&self.queue), self.cold);
            tokio::spawn(async move {
                tokio::time::sleep(cold).await;
                queue.set_ready(true);
            });
        }
        match self.queue.wait(hold).await {
            Ok(waited) => Ok(Outcome {
                output: json!({ "echo": input }),
                predict_time: 0.001,
                queue_time: waited.as_secs_f64(),
                cold_start: was_cold.then_some(waited.as_secs_f64()),
                gpu: None,
            }),
            Err(None) => Err(PredictError::Overloaded { deployment: deployment.into(), retry_after_s: 2 }),
            Err(Some(waited)) => {
                Err(PredictError::ColdStartTimeout { deployment: deployment.into(), waited_s: waited.as_secs() })
            }
        }
    }
}

fn http(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    prefer: Option<&str>,
    body: &str,
) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(p) = prefer {
        head.push_str(&format!("Prefer: {p}\r\n"));
    }
    write!(s, "{head}\r\n{body}").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), serde_json::from_str(body).unwrap_or(Value::Null))
}

const MASTER: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX";

async fn serve(hold: Duration, capacity: usize, cold: Duration) -> String {
    serve_gateway(hold, capacity, cold, None, Vec::new()).await.0
}

/// A gateway writing to `persister` (if any) after restoring `records`.
async fn serve_gateway(
    hold: Duration,
    capacity: usize,
    cold: Duration,
    persister: Option<Persister>,
    records: Vec<PredictionRecord>,
) -> (String, Arc<Gateway<Fake>>, Restored) {
    let fake = Fake { queue: Arc::new(HoldQueue::new(capacity)), cold };
    let keys = [("key-demo".to_owned(), "demo".to_owned()), ("key-other".to_owned(), "other".to_owned())];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut gateway = Gateway::new(fake, keys, &format!("http://{addr}"));
    let g = Arc::get_mut(&mut gateway).unwrap();
    g.hold = hold;
    // The tests' receivers listen on 127.0.0.1: allowed as an operator would allow an internal receiver.
    let destinations = Destinations { allow: vec!["127.0.0.1/32".parse().unwrap()], deny: vec![] };
    g.webhooks = Webhooks::with_destinations(Duration::from_millis(20), 4, destinations);
    g.webhooks.secret = Some(Secret::parse(MASTER).unwrap());
    g.persister = persister;
    let restored = gateway.restore(records);
    let router = gateway.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (addr, gateway, restored)
}

/// A webhook receiver answering 200: its URL and what it got.
async fn receiver() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let received: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let log = Arc::clone(&received);
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let log = Arc::clone(&log);
            async move {
                log.lock().unwrap().push(serde_json::from_str(&body).unwrap());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });
    (url, received)
}

async fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn post(addr: &str, prefer: Option<&'static str>, body: String) -> (u16, String, Value) {
    let a = addr.to_owned();
    tokio::task::spawn_blocking(move || {
        http(&a, "POST", "/v1/deployments/demo/echo/predictions", Some("key-demo"), prefer, &body)
    })
    .await
    .unwrap()
}

async fn get(addr: &str, id: &str) -> (u16, String, Value) {
    let (a, path) = (addr.to_owned(), format!("/v1/predictions/{id}"));
    tokio::task::spawn_blocking(move || http(&a, "GET", &path, Some("key-demo"), None, "")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_predictions_under_way_finish_and_refuses_new_ones() {
    // Two clients held for a 400 ms cold start when the drain begins, with a grace long enough for it.
    let (addr, gateway, _) = serve_gateway(Duration::from_secs(5), 8, Duration::from_millis(400), None, vec![]).await;
    let held: Vec<_> = (0..2)
        .map(|i| {
            let addr = addr.clone();
            tokio::spawn(async move { post(&addr, Some("wait"), format!(r#"{{"input": {{"x": {i}}}}}"#)).await })
        })
        .collect();
    wait_until("two predictions under way", || gateway.in_flight() == 2).await;
    let drain = tokio::spawn({
        let gateway = Arc::clone(&gateway);
        async move { gateway.drain(Duration::from_secs(5)).await }
    });
    wait_until("the drain to begin", || gateway.is_draining()).await;
    let (status, head, refused) = post(&addr, Some("wait"), r#"{"input": {"x": 9}}"#.into()).await;
    assert_eq!(status, 503, "{refused}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 5"), "{head}");
    assert!(refused["detail"].as_str().unwrap().contains("shutting down"), "{refused}");
    for (i, h) in held.into_iter().enumerate() {
        let (status, _, p) = h.await.unwrap();
        assert_eq!((status, p["status"].as_str()), (200, Some("succeeded")), "{p}");
        assert_eq!(p["output"]["echo"]["x"], i);
    }
    assert_eq!(drain.await.unwrap(), 0, "nothing was cut off");
    assert_eq!(gateway.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_runs_out_a_waiting_client_gets_503_and_a_webhook_gets_completed() {
    let (hook, received) = receiver().await;
    // A cold start that never ends within the test.
    let (addr, gateway, _) = serve_gateway(Duration::from_secs(60), 8, Duration::from_secs(60), None, vec![]).await;
    let waiting = tokio::spawn({
        let addr = addr.clone();
        async move { post(&addr, Some("wait"), r#"{"input": {"x": 1}}"#.into()).await }
    });
    let body = format!(r#"{{"input": {{"x": 2}}, "webhook": "{hook}", "webhook_events_filter": ["completed"]}}"#);
    let (status, _, async_p) = post(&addr, None, body).await;
    assert_eq!(status, 201, "{async_p}");
    wait_until("two predictions under way", || gateway.in_flight() == 2).await;
    let started = std::time::Instant::now();
    assert_eq!(gateway.drain(Duration::from_millis(300)).await, 2, "both cut off");
    assert!(started.elapsed() < Duration::from_secs(2), "the grace bounds the drain: {:?}", started.elapsed());
    let (status, head, p) = waiting.await.unwrap();
    assert_eq!(status, 503, "{p}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 5"), "{head}");
    assert!(p["detail"].as_str().unwrap().contains(SHUTDOWN_ERROR), "{p}");
    let id = async_p["id"].as_str().unwrap().to_owned();
    wait_until("the completed webhook", || !received.lock().unwrap().is_empty()).await;
    let got = received.lock().unwrap()[0].clone();
    assert_eq!((got["id"].as_str(), got["status"].as_str()), (Some(id.as_str()), Some("failed")), "{got}");
    assert_eq!(got["error"], SHUTDOWN_ERROR);
    let (status, _, p) = get(&addr, &id).await;
    assert_eq!((status, p["status"].as_str()), (200, Some("failed")), "still readable while draining: {p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_survive_a_restart_and_the_interrupted_one_fails_with_its_webhook() {
    let store = Arc::new(MemoryStore::default());
    let dyn_store = || Arc::clone(&store) as Arc<dyn PredictionStore>;
    let (hook, received) = receiver().await;

    // Before: a finished prediction (with an input over the store's limit), and one still running (a cold start
    // that does not end) with a webhook for `completed` only.
    let persister = Persister::spawn(dyn_store()).unwrap();
    let (addr, _, _) =
        serve_gateway(Duration::from_secs(5), 8, Duration::from_millis(10), Some(persister.clone()), vec![]).await;
    let (status, _, done) = post(&addr, Some("wait"), r#"{"input": {"x": 7}}"#.into()).await;
    assert_eq!(status, 200, "{done}");
    let big = "z".repeat(70 * 1024);
    let (status, _, big_p) = post(&addr, Some("wait"), format!(r#"{{"input": {{"text": "{big}"}}}}"#)).await;
    assert_eq!(status, 200);
    let (addr_cold, _, _) =
        serve_gateway(Duration::from_secs(60), 8, Duration::from_secs(60), Some(persister.clone()), vec![]).await;
    let body = format!(r#"{{"input": {{"x": 8}}, "webhook": "{hook}", "webhook_events_filter": ["completed"]}}"#);
    let (status, _, running) = post(&addr_cold, None, body).await;
    assert_eq!(status, 201);
    persister.flush().await.unwrap();
    // And one that finished two hours ago: past its retention.
    let mut old = PredictionRecord::decode(
        &serde_json::to_vec(&json!({
            "id": "old", "model": "demo/echo", "version": "v1", "status": "succeeded", "input": {}, "output": 1,
            "error": null, "metrics": {}, "created_at": { "secs_since_epoch": 1, "nanos_since_epoch": 0 },
            "started_at": null, "completed_at": null
        }))
        .unwrap(),
    )
    .unwrap();
    old.completed_at = Some(std::time::SystemTime::now() - Duration::from_secs(7200));
    store.write(&kiln_controller::store::Batch { predictions: vec![old], ..Default::default() }).unwrap();
    assert!(received.lock().unwrap().is_empty(), "no webhook yet: it is still running");

    // The restart: a new gateway on the same store.
    let persister = Persister::spawn(dyn_store()).unwrap();
    let records = store.load().unwrap().predictions;
    assert_eq!(records.len(), 4);
    let (addr, _, restored) =
        serve_gateway(Duration::from_secs(5), 8, Duration::from_millis(10), Some(persister.clone()), records).await;
    assert_eq!(restored, Restored { finished: 2, interrupted: 1, expired: 1 });

    let urls_apart = |mut p: Value| {
        p.as_object_mut().unwrap().remove("urls");
        p
    };
    let (status, _, again) = get(&addr, done["id"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(urls_apart(again), urls_apart(done), "the same prediction as before the restart");
    let (_, _, big_again) = get(&addr, big_p["id"].as_str().unwrap()).await;
    assert_eq!((&big_again["input"], &big_again["output"]), (&Value::Null, &big_p["output"]), "input over the limit");
    assert!(big_again["input_dropped"].as_str().unwrap().contains("64 KiB"), "{}", big_again["input_dropped"]);
    assert_eq!(get(&addr, "old").await.0, 404, "expired");

    let id = running["id"].as_str().unwrap();
    let (_, _, failed) = get(&addr, id).await;
    assert_eq!((failed["status"].as_str(), failed["error"].as_str()), (Some("failed"), Some(RESTART_ERROR)));
    assert!(failed["completed_at"].is_string(), "{failed}");
    wait_until("the completed webhook", || !received.lock().unwrap().is_empty()).await;
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0]["id"].as_str(), got[0]["error"].as_str()), (Some(id), Some(RESTART_ERROR)));

    // The store now says so too, and has forgotten the expired one.
    persister.flush().await.unwrap();
    let stored = store.load().unwrap().predictions;
    assert_eq!(stored.len(), 3);
    let r = stored.iter().find(|r| r.id == id).unwrap();
    assert_eq!((r.status, r.failure, r.error.as_deref()), (Failed, Some(FailureKind::Restarted), Some(RESTART_ERROR)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_wait_through_a_cold_start_and_errors_say_why() {
    let addr = serve(Duration::from_secs(5), 8, Duration::from_millis(200)).await;
    let a = addr.clone();
    let (status, _, p) = tokio::task::spawn_blocking(move || {
        http(
            &a,
            "POST",
            "/v1/deployments/demo/echo/predictions",
            Some("key-demo"),
            Some("wait"),
            r#"{"input": {"x": 1}}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["status"], "succeeded");
    assert_eq!(p["model"], "demo/echo");
    assert_eq!(p["version"], "v1");
    assert_eq!(p["output"]["echo"]["x"], 1);
    assert_eq!(p["metrics"]["cold_start"], true);
    assert!(p["metrics"]["cold_start_time"].as_f64().unwrap() >= 0.15, "{p}");
    assert!(p["created_at"].as_str().unwrap().ends_with('Z'));
    let get_url = p["urls"]["get"].as_str().unwrap().to_owned();
    assert!(get_url.ends_with(&format!("/v1/predictions/{}", p["id"].as_str().unwrap())));

    // Warm now; async: 201, then poll.
    let a = addr.clone();
    let (status, _, p) = tokio::task::spawn_blocking(move || {
        http(&a, "POST", "/v1/deployments/demo/echo/predictions", Some("key-demo"), None, r#"{"input": {"x": 2}}"#)
    })
    .await
    .unwrap();
    assert_eq!(status, 201);
    let id = p["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = addr.clone();
    let path = format!("/v1/predictions/{id}");
    let (status, _, p) =
        tokio::task::spawn_blocking(move || http(&a, "GET", &path, Some("key-demo"), None, "")).await.unwrap();
    assert_eq!((status, p["status"].as_str().unwrap()), (200, "succeeded"));
    assert_eq!(p["metrics"]["cold_start"], false);

    // Auth, unknown deployment, bad body.
    let a = addr.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let path = "/v1/deployments/demo/echo/predictions";
        vec![
            http(&a, "POST", path, None, None, r#"{"input": {}}"#),
            http(&a, "POST", path, Some("wrong"), None, r#"{"input": {}}"#),
            http(&a, "POST", path, Some("key-other"), None, r#"{"input": {}}"#),
            http(&a, "POST", "/v1/deployments/demo/missing/predictions", Some("key-demo"), None, r#"{"input": {}}"#),
            http(&a, "POST", path, Some("key-demo"), None, "{not json"),
            http(&a, "POST", path, Some("key-demo"), None, r#"{"inputs": {}}"#),
            http(&a, "GET", &format!("/v1/predictions/{id}"), Some("key-other"), None, ""),
        ]
    })
    .await
    .unwrap();
    let statuses: Vec<u16> = checks.iter().map(|c| c.0).collect();
    assert_eq!(statuses, vec![401, 401, 403, 404, 400, 400, 404]);
    assert!(checks[3].2["detail"].as_str().unwrap().contains("demo/missing"));
    assert!(checks[5].2["detail"].as_str().unwrap().contains("\"input\" object"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hold_queue_answers_429_and_a_slow_cold_start_504() {
    // Capacity 1, a cold start longer than the hold: the first request times out (504), a concurrent one is 429.
    let addr = serve(Duration::from_millis(300), 1, Duration::from_secs(30)).await;
    let (a, b) = (addr.clone(), addr.clone());
    let first = tokio::task::spawn_blocking(move || {
        http(&a, "POST", "/v1/deployments/demo/echo/predictions", Some("key-demo"), Some("wait=5"), r#"{"input": {}}"#)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = tokio::task::spawn_blocking(move || {
        http(&b, "POST", "/v1/deployments/demo/echo/predictions", Some("key-demo"), Some("wait=5"), r#"{"input": {}}"#)
    });
    let (s2, head2, p2) = second.await.unwrap();
    assert_eq!(s2, 429, "{p2}");
    assert!(head2.to_ascii_lowercase().contains("retry-after: 2"), "{head2}");
    let (s1, _, p1) = first.await.unwrap();
    assert_eq!(s1, 504, "{p1}");
    assert_eq!(p1["status"], "failed");
    assert!(p1["error"].as_str().unwrap().contains("still cold-starting"), "{p1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_retried_until_delivered_and_streams_end_with_done() {
    // A receiver that fails the first delivery.
    type Delivery = (u16, String, Value, String, String);
    let received: Arc<std::sync::Mutex<Vec<Delivery>>> = Arc::default();
    let log = Arc::clone(&received);
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let log = Arc::clone(&log);
            async move {
                let mut log = log.lock().unwrap();
                let status = if log.is_empty() { 500 } else { 200 };
                let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let signed = format!("{}.{}", header("webhook-timestamp"), header("webhook-signature"));
                log.push((status, header("webhook-id"), serde_json::from_str(&body).unwrap(), signed, body));
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });

    let addr = serve(Duration::from_secs(5), 8, Duration::from_millis(10)).await;
    let a = addr.clone();
    let body = format!(
        r#"{{"input": {{"x": 3}}, "webhook": "http://{hook_addr}/hook", "webhook_events_filter": ["completed"], "stream": true}}"#
    );
    let (status, _, p) = tokio::task::spawn_blocking(move || {
        http(&a, "POST", "/v1/deployments/demo/echo/predictions", Some("key-demo"), Some("wait"), &body)
    })
    .await
    .unwrap();
    assert_eq!((status, p["status"].as_str()), (200, Some("succeeded")), "{p}");
    let stream_url = p["urls"]["stream"].as_str().unwrap().to_owned();
    let id = p["id"].as_str().unwrap().to_owned();

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while received.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "one failed delivery, one retry, no more: {got:?}");
    assert_eq!((got[0].0, got[1].0), (500, 200));
    assert_eq!(got[0].1, got[1].1, "the same webhook-id on the retry");
    assert_eq!((got[1].2["id"].as_str(), got[1].2["status"].as_str()), (Some(id.as_str()), Some("succeeded")));
    assert_eq!(got[1].2["output"]["echo"]["x"], 3);

    // Signed with the namespace's own secret, which only that namespace's key can read.
    let a = addr.clone();
    let secrets = tokio::task::spawn_blocking(move || {
        ["key-demo", "key-other"].map(|k| http(&a, "GET", "/v1/webhooks/default/secret", Some(k), None, "").2)
    })
    .await
    .unwrap();
    let demo = secrets[0]["key"].as_str().unwrap();
    let other = secrets[1]["key"].as_str().unwrap();
    assert_ne!(demo, other, "one secret per namespace");
    let (timestamp, signature) = got[1].3.split_once('.').unwrap();
    let timestamp: i64 = timestamp.parse().unwrap();
    let sign = |secret: &str| Secret::parse(secret).unwrap().sign(&got[1].1, timestamp, got[1].4.as_bytes());
    assert_eq!(sign(demo), signature, "demo's secret validates demo's delivery");
    assert_ne!(sign(other), signature, "another tenant's secret does not");
    assert_ne!(sign(MASTER), signature, "nor does the master");

    // The stream of a finished prediction: its output, then done; opened with the key, or with the URL's
    // capability token alone (as Replicate's stream URLs are), never with a wrong token.
    let path = stream_url.trim_start_matches(&format!("http://{addr}")).to_owned();
    assert!(path.starts_with(&format!("/v1/predictions/{id}/stream?token=")), "{stream_url}");
    let bare = path.split('?').next().unwrap().to_owned();
    let forged = format!("{}0", &path[..path.len() - 1]);
    let forged = if forged == path { format!("{}1", &path[..path.len() - 1]) } else { forged };
    let a = addr.clone();
    let [with_key, with_token, bare_no_key, forged_no_key] = tokio::task::spawn_blocking(move || {
        [(path.clone(), true), (path, false), (bare, false), (forged, false)].map(|(path, key)| {
            let mut s = TcpStream::connect(&a).unwrap();
            let auth = if key { "Authorization: Bearer key-demo\r\n" } else { "" };
            write!(s, "GET {path} HTTP/1.1\r\nHost: {a}\r\n{auth}Connection: close\r\n\r\n").unwrap();
            let mut response = String::new();
            s.read_to_string(&mut response).unwrap();
            response
        })
    })
    .await
    .unwrap();
    for raw in [&with_key, &with_token] {
        assert!(raw.contains("text/event-stream"), "{raw}");
        let output = raw.find("event: output\ndata: {\"echo\":{\"x\":3}}\nid: 0\n").expect("an output event");
        let done = raw.find("event: done\ndata: {}\nid: 1\n").expect("a done event");
        assert!(output < done, "{raw}");
    }
    for raw in [&bare_no_key, &forged_no_key] {
        assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    }

    // Malformed webhook settings are refused before anything runs.
    let a = addr.clone();
    let bad = tokio::task::spawn_blocking(move || {
        let path = "/v1/deployments/demo/echo/predictions";
        vec![
            http(&a, "POST", path, Some("key-demo"), None, r#"{"input": {}, "webhook": "ftp://x/y"}"#),
            http(
                &a,
                "POST",
                path,
                Some("key-demo"),
                None,
                r#"{"input": {}, "webhook": "http://h/", "webhook_events_filter": ["bogus"]}"#,
            ),
            http(&a, "POST", path, Some("key-demo"), None, r#"{"input": {}, "stream": "yes"}"#),
        ]
    })
    .await
    .unwrap();
    assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), [400, 400, 400]);
    assert!(bad[1].2["detail"].as_str().unwrap().contains("bogus"), "{:?}", bad[1].2);

    // Webhooks that would reach the node's admin port, cloud metadata or private addresses: 400, saying why.
    let a = addr.clone();
    let ssrf = tokio::task::spawn_blocking(move || {
        let path = "/v1/deployments/demo/echo/predictions";
        [
            "http://127.0.0.2:9401/admin/gpus/3/reset",
            "http://[::1]:9401/admin/gpus/3/reset",
            "http://169.254.169.254/latest/meta-data/iam/",
            "http://10.96.0.1/",
            "http://[::ffff:192.168.0.1]/",
        ]
        .map(|hook| {
            let body = format!(r#"{{"input": {{}}, "webhook": "{hook}"}}"#);
            http(&a, "POST", path, Some("key-demo"), Some("wait"), &body)
        })
    })
    .await
    .unwrap();
    for (status, _, p) in &ssrf {
        assert_eq!(*status, 400, "{p}");
        assert!(p["detail"].as_str().unwrap().contains("refused"), "{p}");
    }
    assert!(ssrf[2].2["detail"].as_str().unwrap().contains("link-local"), "{:?}", ssrf[2].2);
}

/// A namespace over its creation rate gets 429 with Retry-After before anything runs; another namespace does not
/// notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_over_its_rate_gets_429_with_retry_after() {
    let fake = Fake { queue: Arc::new(HoldQueue::new(8)), cold: Duration::ZERO };
    let keys = [("key-demo".to_owned(), "demo".to_owned()), ("key-other".to_owned(), "other".to_owned())];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut gateway = Gateway::new(fake, keys, &format!("http://{addr}"));
    Arc::get_mut(&mut gateway).unwrap().limits =
        TenantLimits::new(LimitConfig { rate_per_s: 0.5, burst: 3.0, max_in_flight: 100, ..LimitConfig::default() });
    let router = gateway.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers: Vec<(u16, String)> = (0..4)
            .map(|_| {
                let (status, head, _) = http(
                    &addr,
                    "POST",
                    "/v1/deployments/demo/echo/predictions",
                    Some("key-demo"),
                    None,
                    r#"{"input": {"x": 1}}"#,
                );
                (status, head)
            })
            .collect();
        let (status, head, _) =
            http(&addr, "POST", "/v1/deployments/other/echo/predictions", Some("key-other"), None, r#"{"input": {}}"#);
        answers.push((status, head));
        answers
    })
    .await
    .unwrap();
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    // The other namespace is not held back by demo's limit (404: the fake backend has no deployment there).
    assert_eq!(statuses, [201, 201, 201, 429, 404], "{answers:?}");
    assert!(answers[3].1.to_lowercase().contains("retry-after: 2"), "{}", answers[3].1);
}

/// `demo/echo` and, to show tenants apart, `other/m`, on H100s.
#[derive(Debug)]
struct FakeCatalog;

impl Catalog for FakeCatalog {
    fn deployments(&self) -> Vec<DeploymentInfo> {
        let info = |key: &str, run_count| DeploymentInfo {
            key: key.to_owned(),
            version: "v1".into(),
            release: 3,
            released_at: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_072_000),
            gpu_model: Some("NVIDIA H100 80GB HBM3".into()),
            min_instances: 0,
            max_instances: 2,
            run_count,
        };
        vec![info("other/m", 0), info("demo/echo", 7)]
    }
    fn gpu_models(&self) -> Vec<String> {
        vec!["NVIDIA H100 80GB HBM3".into(), "NVIDIA H200".into(), "NVIDIA H100 80GB HBM3".into()]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_of_replicates_api_models_listings_hardware_account_and_what_is_not_supported() {
    let fake = Fake { queue: Arc::new(HoldQueue::new(8)), cold: Duration::ZERO };
    let keys = [
        ("key-demo".to_owned(), "demo".to_owned()),
        ("key-other".to_owned(), "other".to_owned()),
        ("key-op".to_owned(), "*".to_owned()),
    ];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut gateway = Gateway::new(fake, keys, &format!("http://{addr}"));
    Arc::get_mut(&mut gateway).unwrap().catalog = Arc::new(FakeCatalog);
    let router = gateway.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let call = |method: &'static str, path: String, key: Option<&'static str>, prefer, body: &'static str| {
        let a = addr.clone();
        tokio::task::spawn_blocking(move || http(&a, method, &path, key, prefer, body))
    };

    // A model is a deployment: its predictions endpoint runs it, as the deployments' does.
    let (status, _, p) = call(
        "POST",
        "/v1/models/demo/echo/predictions".into(),
        Some("key-demo"),
        Some("wait"),
        r#"{"input": {"x": 1}}"#,
    )
    .await
    .unwrap();
    assert_eq!((status, &p["status"], &p["output"]["echo"]["x"]), (200, &json!("succeeded"), &json!(1)), "{p}");
    let (status, _, _) =
        call("POST", "/v1/models/demo/echo/predictions".into(), Some("key-other"), None, r#"{"input": {}}"#)
            .await
            .unwrap();
    assert_eq!(status, 403, "a tenant runs its own namespace's only");
    let (status, _, model) = call("GET", "/v1/models/demo/echo".into(), Some("key-demo"), None, "").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        (&model["owner"], &model["name"], &model["run_count"], &model["visibility"], &model["latest_version"]),
        (&json!("demo"), &json!("echo"), &json!(7), &json!("private"), &Value::Null)
    );
    assert_eq!(call("GET", "/v1/models/demo/nope".into(), Some("key-demo"), None, "").await.unwrap().0, 404);
    assert_eq!(call("GET", "/v1/models/other/m".into(), Some("key-demo"), None, "").await.unwrap().0, 403);

    // More predictions than one page: newest first, each once, forward with `next` and back with `previous`.
    for i in 0..PAGE_SIZE + 20 {
        let body: &'static str = Box::leak(format!(r#"{{"input": {{"i": {i}}}}}"#).into_boxed_str());
        let (status, _, _) =
            call("POST", "/v1/deployments/demo/echo/predictions".into(), Some("key-demo"), None, body).await.unwrap();
        assert_eq!(status, 201);
    }
    let (status, _, first) = call("GET", "/v1/predictions".into(), Some("key-demo"), None, "").await.unwrap();
    assert_eq!(status, 200, "{first}");
    let results = first["results"].as_array().unwrap();
    assert_eq!((results.len(), &first["previous"]), (PAGE_SIZE, &Value::Null));
    let created: Vec<&str> = results.iter().map(|p| p["created_at"].as_str().unwrap()).collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first");
    assert_eq!(results[0]["input"]["i"], PAGE_SIZE + 19, "the newest first");
    let next = first["next"].as_str().unwrap().strip_prefix(&format!("http://{addr}")).unwrap().to_owned();
    let (_, _, second) = call("GET", next, Some("key-demo"), None, "").await.unwrap();
    let rest = second["results"].as_array().unwrap();
    assert_eq!((rest.len(), &second["next"]), (21, &Value::Null), "20 more and the model-run one");
    let mut ids: Vec<&str> = results.iter().chain(rest).map(|p| p["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), PAGE_SIZE + 21, "each once");
    let previous = second["previous"].as_str().unwrap().strip_prefix(&format!("http://{addr}")).unwrap().to_owned();
    let (_, _, back) = call("GET", previous, Some("key-demo"), None, "").await.unwrap();
    assert_eq!(back["results"], first["results"]);
    let (_, _, theirs) = call("GET", "/v1/predictions".into(), Some("key-other"), None, "").await.unwrap();
    assert_eq!(theirs, json!({ "previous": null, "next": null, "results": [] }), "a tenant sees its own");
    let (_, _, all) = call("GET", "/v1/predictions".into(), Some("key-op"), None, "").await.unwrap();
    assert_eq!(all["results"].as_array().unwrap().len(), PAGE_SIZE, "an operator sees all");
    let (status, _, bad) = call("GET", "/v1/predictions?cursor=zz".into(), Some("key-demo"), None, "").await.unwrap();
    assert_eq!(status, 400, "{bad}");
    assert_eq!(call("GET", "/v1/predictions".into(), None, None, "").await.unwrap().0, 401);

    // Deployments in Replicate's shape.
    let (status, _, d) = call("GET", "/v1/deployments/demo/echo".into(), Some("key-demo"), None, "").await.unwrap();
    assert_eq!(status, 200);
    let release = json!({
        "number": 3, "model": "demo/echo", "version": "v1", "created_at": "2025-11-25T12:00:00.000000Z",
        "created_by": { "type": "organization", "username": "demo", "name": "demo", "github_url": null },
        "configuration": { "hardware": "gpu-h100-80gb-hbm3", "min_instances": 0, "max_instances": 2 }
    });
    assert_eq!(d, json!({ "owner": "demo", "name": "echo", "current_release": release }));
    let (_, _, list) = call("GET", "/v1/deployments".into(), Some("key-demo"), None, "").await.unwrap();
    assert_eq!(list, json!({ "previous": null, "next": null, "results": [d] }));
    let (_, _, list) = call("GET", "/v1/deployments".into(), Some("key-op"), None, "").await.unwrap();
    let names: Vec<&str> = list["results"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["echo", "m"], "every namespace, by owner/name");
    assert_eq!(call("GET", "/v1/deployments/other/m".into(), Some("key-demo"), None, "").await.unwrap().0, 403);

    // Hardware and account.
    let (_, _, hardware) = call("GET", "/v1/hardware".into(), Some("key-demo"), None, "").await.unwrap();
    assert_eq!(
        hardware,
        json!([
            { "name": "NVIDIA H100 80GB HBM3", "sku": "gpu-h100-80gb-hbm3" },
            { "name": "NVIDIA H200", "sku": "gpu-h200" }
        ])
    );
    let (_, _, account) = call("GET", "/v1/account".into(), Some("key-other"), None, "").await.unwrap();
    assert_eq!(account, json!({ "type": "organization", "username": "other", "name": "other", "github_url": null }));

    // What is not supported says so.
    for (method, path, what) in [
        ("GET", "/v1/models/demo/echo/versions", "model versions"),
        ("POST", "/v1/predictions", "predictions of a model version"),
        ("POST", "/v1/trainings", "trainings"),
        ("GET", "/v1/files", "the files API"),
        ("GET", "/v1/collections", "collections"),
    ] {
        let (status, _, body) = call(method, path.into(), Some("key-demo"), None, "{}").await.unwrap();
        assert_eq!(status, 501, "{method} {path}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(what), "{body}");
    }
    // A spec source that cannot be changed through the API (here, the fake's) says so.
    let (status, _, body) = call(
        "POST",
        "/v1/deployments".into(),
        Some("key-demo"),
        None,
        r#"{"name": "copy", "model": "demo/echo", "version": "v1", "hardware": "gpu-h200", "min_instances": 0, "max_instances": 1}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 501, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("not supported"), "{body}");
    let (status, _, _) =
        call("PATCH", "/v1/deployments/other/m".into(), Some("key-demo"), None, r#"{"max_instances": 1}"#)
            .await
            .unwrap();
    assert_eq!(status, 403, "another namespace's");
    let (status, _, body) =
        call("POST", "/v1/deployments".into(), Some("key-op"), None, r#"{"name": "x", "model": "demo/echo"}"#)
            .await
            .unwrap();
    assert_eq!(status, 403, "an operator key belongs to no namespace: {body}");
    let (status, _, body) =
        call("POST", "/v1/deployments".into(), Some("key-demo"), None, r#"{"model": "demo/echo"}"#).await.unwrap();
    assert_eq!((status, &body["detail"]), (400, &json!("name is required")));
    let (status, _, body) = call("GET", "/v1/nothing".into(), Some("key-demo"), None, "").await.unwrap();
    assert_eq!((status, &body["detail"]), (404, &json!("GET /v1/nothing is not an endpoint of this API")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canceled_prediction_stays_canceled_whenever_its_run_begins_or_ends() {
    // A cold start longer than the 20 posts and cancels can take on a loaded machine: every run is still held when
    // its prediction is canceled (after the cold start, runs answer at once and could finish before the cancel).
    let addr = serve(Duration::from_secs(10), 64, Duration::from_secs(3)).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let (status, _, p) = post(&addr, None, format!(r#"{{"input": {{"i": {i}}}}}"#)).await;
        assert_eq!(status, 201);
        let id = p["id"].as_str().unwrap().to_owned();
        let (a, path) = (addr.clone(), format!("/v1/predictions/{id}/cancel"));
        let (status, _, canceled) =
            tokio::task::spawn_blocking(move || http(&a, "POST", &path, Some("key-demo"), None, "")).await.unwrap();
        assert_eq!((status, &canceled["status"]), (200, &json!("canceled")), "{canceled}");
        ids.push(id);
    }
    // Past the cold start: the runs that began have ended, and none of them changed a canceled prediction.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for id in ids {
        let (_, _, p) = get(&addr, &id).await;
        assert_eq!((&p["status"], &p["output"]), (&json!("canceled"), &Value::Null), "{p}");
    }
}

/// A GET with an optional `Accept`: status and body text.
fn get_text(addr: &str, path: &str, key: Option<&str>, accept: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(a) = accept {
        head.push_str(&format!("Accept: {a}\r\n"));
    }
    write!(s, "{head}\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_owned())
}

/// Runs on a quarter of an H100 for 1.5 s, as a control plane that started the replica would say.
struct Priced;

impl Backend for Priced {
    fn version(&self, deployment: &str) -> Option<String> {
        (deployment == "demo/echo").then(|| "v1".to_owned())
    }

    async fn predict(&self, _: &str, input: Value, _: Duration) -> Result<Outcome, PredictError> {
        Ok(Outcome {
            output: input,
            predict_time: 1.5,
            queue_time: 0.0,
            cold_start: None,
            gpu: Some(GpuUse { gpu_model: "NVIDIA H100 80GB HBM3".into(), share_milli: 250 }),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reads_back_as_json_csv_and_statements_and_a_tenant_reads_only_its_own() {
    use kiln_controller::billing::{Billing, PriceFile};
    use kiln_core::{
        billing::{ReplicaInterval, ServerlessPhase},
        money::Money,
    };
    let prices = PriceFile::parse(
        "currency: USD\ngpus:\n  \"NVIDIA H100 80GB HBM3\":\n    serverlessPerGpuSecond: \"0.001\"\n    \
         rentalPerGpuHour: \"3.60\"\n    lendingShare: \"0.5\"\n",
        "test",
    )
    .unwrap();
    let billing = Arc::new(Billing::in_memory(prices));
    // 2026-11-26T08:00:00Z: demo's deployment busy on half a GPU for 90 s then idle 30 s; other's loading 60 s.
    let t0 = 1_795_680_000.0;
    let span = |ns: &str, dep: &str, share, phase, from: f64, to: f64| ReplicaInterval {
        replica: format!("{dep}-0"),
        deployment: dep.into(),
        namespace: ns.into(),
        gpu_model: "NVIDIA H100 80GB HBM3".into(),
        share_milli: share,
        phase,
        from: t0 + from,
        to: t0 + to,
    };
    billing.observe(&span("demo", "echo", 500, ServerlessPhase::Busy, 0.0, 90.0)).unwrap();
    billing.observe(&span("demo", "echo", 500, ServerlessPhase::IdleWarm, 90.0, 120.0)).unwrap();
    billing.observe(&span("other", "m", 1000, ServerlessPhase::Loading, 0.0, 60.0)).unwrap();
    billing.close(t0 + 120.0).unwrap();

    let keys = [
        ("key-demo".to_owned(), "demo".to_owned()),
        ("key-other".to_owned(), "other".to_owned()),
        ("key-op".to_owned(), "*".to_owned()),
    ];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut gateway = Gateway::new(Priced, keys, &format!("http://{addr}"));
    Arc::get_mut(&mut gateway).unwrap().billing = Some(Arc::clone(&billing));
    let router = gateway.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let call = |path: &str, key: Option<&'static str>, accept: Option<&'static str>| {
        let (a, p) = (addr.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || get_text(&a, &p, key, accept))
    };
    let money = |v: &Value| Money::parse(v.as_str().unwrap()).unwrap();
    let range = "from=2026-11-01&to=2026-11-30";

    // JSON by phase: 0.5 GPU × 90 s × $0.001 = $0.045 busy, 0.5 × 30 s = $0.015 idle-warm.
    let (status, body) = call(&format!("/v1/usage?{range}&group_by=phase"), Some("key-demo"), None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let usage: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((&usage["namespace"], &usage["currency"]), (&json!("demo"), &json!("USD")));
    let groups = usage["groups"].as_array().unwrap();
    assert_eq!(groups.iter().map(|g| g["key"].as_str().unwrap()).collect::<Vec<_>>(), ["busy", "idle-warm"]);
    assert_eq!(
        (money(&groups[0]["amount"]), &groups[0]["gpu_seconds"]),
        (Money::parse("0.045").unwrap(), &json!("45"))
    );
    let sum = Money::sum(groups.iter().map(|g| money(&g["amount"]))).unwrap();
    assert_eq!(money(&usage["total"]["amount"]), sum);
    assert_eq!(sum, Money::parse("0.06").unwrap());

    // CSV: a header, a row per group, the total.
    let (status, csv) =
        call(&format!("/v1/usage?{range}&group_by=deployment"), Some("key-demo"), Some("text/csv")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        [
            "deployment,records,gpu_seconds,gpu_hours,charges,credits,amount,currency",
            "\"echo\",3,60,0,0.06,0.00,0.06,USD",
            "\"TOTAL\",3,60,0,0.06,0.00,0.06,USD",
        ]
    );

    // The statement: its total is the sum of its line items, in JSON and in CSV.
    let (status, body) = call("/v1/usage/statement?month=2026-11", Some("key-demo"), None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let statement: Value = serde_json::from_str(&body).unwrap();
    let items = statement["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{statement}");
    assert_eq!(money(&statement["total"]), Money::sum(items.iter().map(|i| money(&i["amount"]))).unwrap());
    assert_eq!(money(&statement["total"]), sum, "the statement adds up to /v1/usage's total");
    let (_, csv) = call("/v1/usage/statement?month=2026-11", Some("key-demo"), Some("text/csv")).await.unwrap();
    assert_eq!(csv.lines().last().unwrap(), "\"demo\",,total,,,,0.06,USD");
    let (_, october) = call("/v1/usage/statement?month=2026-10", Some("key-demo"), None).await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&october).unwrap()["total"], json!("0.00"));

    // Tenant B cannot read A's usage: asking is a 403 that says nothing of it, and its own shows only its own.
    for path in [format!("/v1/usage?{range}&namespace=demo"), "/v1/usage/statement?namespace=demo&month=2026-11".into()]
    {
        let (status, body) = call(&path, Some("key-other"), None).await.unwrap();
        assert_eq!(status, 403, "{path}: {body}");
        assert!(!body.contains("0.06") && !body.contains("echo"), "{body}");
    }
    let (_, body) = call(&format!("/v1/usage?{range}"), Some("key-other"), None).await.unwrap();
    let theirs: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(theirs["groups"].as_array().unwrap().len(), 1, "{theirs}");
    assert_eq!((&theirs["groups"][0]["key"], &theirs["total"]["amount"]), (&json!("deployment/m"), &json!("0.06")));

    // An operator reads everything, or any one namespace; a statement needs one.
    let (_, body) = call(&format!("/v1/usage?{range}&group_by=namespace"), Some("key-op"), None).await.unwrap();
    let all: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((&all["namespace"], &all["total"]["amount"]), (&Value::Null, &json!("0.12")));
    let (status, _) = call("/v1/usage/statement?namespace=demo&month=2026-11", Some("key-op"), None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(call("/v1/usage/statement?month=2026-11", Some("key-op"), None).await.unwrap().0, 400);

    // Bad requests say what is wrong.
    for (path, says) in [
        ("/v1/usage?group_by=week", "group_by=\\\"week\\\""),
        ("/v1/usage?from=yesterday", "RFC 3339"),
        ("/v1/usage?from=2026-11-02&to=2026-11-01T00:00:00Z", "before from"),
        ("/v1/usage?namespce=demo", "unknown parameter"),
        ("/v1/usage/statement?month=2026-13", "not a month"),
    ] {
        let (status, body) = call(path, Some("key-demo"), None).await.unwrap();
        assert_eq!(status, 400, "{path}");
        assert!(body.contains(says), "{path}: {body}");
    }
    assert_eq!(call("/v1/usage", None, None).await.unwrap().0, 401);

    // A finished prediction shows its GPU share and what its predict_time costs: 0.25 × 1.5 s × $0.001.
    let a = addr.clone();
    let (status, _, p) = tokio::task::spawn_blocking(move || {
        http(&a, "POST", "/v1/deployments/demo/echo/predictions", Some("key-demo"), Some("wait"), r#"{"input": {}}"#)
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{p}");
    assert_eq!((&p["metrics"]["gpu_share"], &p["metrics"]["billed_amount"]), (&json!(0.25), &json!("0.000375")), "{p}");
}
