//! Fuzzing of the predictions request parser with proptest, through the real router (`Gateway::router`, driven
//! with `tower::ServiceExt::oneshot`, no sockets) over a fake backend that echoes at once: arbitrary bodies (bytes,
//! deep nesting, JSON of every shape around `input`, `stream`, `webhook`, `webhook_events_filter`), arbitrary
//! `Authorization`, `Prefer` and `Content-Type` headers, and arbitrary path segments. Webhook destinations are all
//! denied, so nothing is delivered.
//!
//! Properties: no panic; never a 5xx; with the right key and deployment, a create answers 400 exactly when the body
//! is malformed (not JSON, no `input` object, a webhook, a non-boolean `stream`), with a `detail` saying why, and
//! 200/201 otherwise; other callers get 401/403/404 with a `detail`.
//!
//! CI runs a bounded number of cases per target (256). Run longer locally:
//! `KILN_FUZZ_CASES=100000 cargo test --release -p kiln-controller --test fuzz_gateway`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kiln_controller::{
    gateway::{Backend, Gateway, Outcome, PredictError},
    webhook::{Destinations, Webhooks},
};
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Cases per property: `KILN_FUZZ_CASES` or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() })
}

/// `demo/echo` echoes its input at once.
struct Echo;

impl Backend for Echo {
    fn version(&self, deployment: &str) -> Option<String> {
        (deployment == "demo/echo").then(|| "v1".to_owned())
    }

    async fn predict(&self, _: &str, input: Value, _: Duration) -> Result<Outcome, PredictError> {
        Ok(Outcome {
            output: json!({ "echo": input }),
            predict_time: 0.0,
            queue_time: 0.0,
            cold_start: None,
            gpu: None,
        })
    }
}

fn router() -> Router {
    let keys = [("key-demo".to_owned(), "demo".to_owned()), ("key-other".to_owned(), "other".to_owned())];
    let mut gateway = Gateway::new(Echo, keys, "http://gateway.test");
    let g = Arc::get_mut(&mut gateway).unwrap();
    let deny_all = Destinations { allow: vec![], deny: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()] };
    g.webhooks = Webhooks::with_destinations(Duration::from_millis(1), 1, deny_all);
    // The parsing is under test, not the admission limits (which come before it): out of the way.
    g.limits = kiln_controller::limits::TenantLimits::new(kiln_controller::limits::LimitConfig {
        rate_per_s: 1e12,
        burst: 1e12,
        max_in_flight: u32::MAX,
        max_in_flight_bytes: u64::MAX,
    });
    gateway.router()
}

/// One request: path segments, headers (raw bytes, dropped when not a valid header value), body.
#[derive(Debug, Clone)]
struct Call {
    namespace: String,
    name: String,
    authorization: Option<Vec<u8>>,
    prefer: Option<Vec<u8>>,
    content_type: Option<Vec<u8>>,
    body: Vec<u8>,
}

/// What a body must get from a create with the right key on an existing deployment.
fn malformed(body: &[u8]) -> Option<&'static str> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return Some("not JSON") };
    if !v.get("input").is_some_and(Value::is_object) {
        return Some("no input object");
    }
    if v.get("webhook").is_some_and(|w| !w.is_null()) {
        return Some("a webhook (every destination is denied here)");
    }
    if v.get("stream").is_some_and(|s| !s.is_null() && !s.is_boolean()) {
        return Some("a stream that is not a boolean");
    }
    None
}

async fn send(router: &Router, method: Method, path: &str, call: &Call) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in
        [("authorization", &call.authorization), ("prefer", &call.prefer), ("content-type", &call.content_type)]
    {
        if let Some(v) = value.as_ref().and_then(|v| http::HeaderValue::from_bytes(v).ok()) {
            request = request.header(name, v);
        }
    }
    let request = request.body(Body::from(call.body.clone())).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), router.clone().oneshot(request))
        .await
        .unwrap_or_else(|_| panic!("no answer in 10 s: {call:?}"))
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Percent-encodes a path segment (every byte that is not unreserved).
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn check(router: &Router, call: &Call) -> StatusCode {
    let path = format!("/v1/deployments/{}/{}/predictions", segment(&call.namespace), segment(&call.name));
    let (status, body) = send(router, Method::POST, &path, call).await;
    assert!(!status.is_server_error(), "{status} for {call:?}: {body}");
    // As the gateway reads a key: `Bearer `, then the key, surrounding blanks ignored.
    let authorized = call
        .authorization
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| k.trim() == "key-demo");
    let exists = call.namespace == "demo" && call.name == "echo";
    if status.is_client_error() && status != StatusCode::PAYLOAD_TOO_LARGE {
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "{status} without a detail for {call:?}: {body}");
    }
    if authorized && exists {
        match malformed(&call.body) {
            Some(why) => assert_eq!(status, StatusCode::BAD_REQUEST, "{why}, yet {status} for {call:?}: {body}"),
            None => {
                assert!(matches!(status, StatusCode::OK | StatusCode::CREATED), "{status} for {call:?}: {body}");
                assert_eq!(body["model"], "demo/echo");
                // The prediction is there to read, with its input.
                let id = body["id"].as_str().unwrap();
                let get = Call { body: vec![], ..call.clone() };
                let (status, read) = send(router, Method::GET, &format!("/v1/predictions/{id}"), &get).await;
                assert_eq!(status, StatusCode::OK, "{read}");
                // An input over the kept limit is let go once the prediction has finished, and the answer says so.
                let large = body["input"].to_string().len() > kiln_controller::store::INPUT_LIMIT;
                if large && read["input"].is_null() {
                    assert!(read["input_dropped"].is_string(), "{read}");
                } else {
                    assert_eq!(read["input"], body["input"]);
                }
            }
        }
    } else if !authorized {
        assert!(matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "{status} for {call:?}: {body}");
    }
    let created = status;
    // Reading and cancelling an arbitrary id: 401 or 404, never more.
    for (method, suffix) in [(Method::GET, ""), (Method::POST, "/cancel")] {
        let path = format!("/v1/predictions/{}{suffix}", segment(&call.name));
        let (status, body) = send(router, method, &path, call).await;
        assert!(
            matches!(status, StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND | StatusCode::OK),
            "{status} for {path}: {body}"
        );
    }
    created
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A create body: an object with or without each field, each of any shape.
fn structured_body() -> impl Strategy<Value = Vec<u8>> {
    let input = prop_oneof![
        3 => prop::collection::btree_map("[a-z]{0,6}", json_value(), 0..4)
            .prop_map(|m| Some(Value::Object(m.into_iter().collect()))),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ];
    let webhook = prop_oneof![
        4 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => prop_oneof![
            Just("http://127.0.0.1:9999/admin/gpus/3/reset"),
            Just("http://169.254.169.254/latest/meta-data"),
            Just("https://[::1]/x"),
            Just("http://10.0.0.1/"),
            Just("https://203.0.113.9/hook"),
            Just("file:///etc/passwd"),
            Just("gopher://127.0.0.1:70/"),
            Just("http://"),
            Just("not a url"),
        ].prop_map(|u| Some(json!(u))),
        1 => json_value().prop_map(Some),
    ];
    let filter = prop_oneof![
        Just(None),
        Just(Some(json!(["start", "completed"]))),
        Just(Some(json!(["bogus"]))),
        json_value().prop_map(Some),
    ];
    let stream = prop_oneof![Just(None), any::<bool>().prop_map(|b| Some(json!(b))), json_value().prop_map(Some)];
    let extra = prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..3);
    (input, webhook, filter, stream, extra).prop_map(|(input, webhook, filter, stream, extra)| {
        let mut body: serde_json::Map<String, Value> = extra.into_iter().collect();
        for (key, value) in
            [("input", input), ("webhook", webhook), ("webhook_events_filter", filter), ("stream", stream)]
        {
            if let Some(v) = value {
                body.insert(key.into(), v);
            }
        }
        Value::Object(body).to_string().into_bytes()
    })
}

/// Bodies no JSON parser should take: arbitrary bytes, deep nesting, long strings, broken JSON.
fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (1usize..100_000)
            .prop_map(|depth| format!("{{\"input\": {}1{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes()),
        (1usize..100_000)
            .prop_map(|depth| format!("{{\"input\": {}{}}}", "{\"a\":".repeat(depth), "}".repeat(depth)).into_bytes()),
        (0usize..200_000).prop_map(|n| format!("{{\"input\": {{\"s\": \"{}\"}}}}", "x".repeat(n)).into_bytes()),
        Just(b"{\"input\": {\"x\": 1e400}}".to_vec()),
        Just(b"{\"input\": {\"x\": NaN}}".to_vec()),
        Just(b"{\"input\": {}, \"input\": 3}".to_vec()),
        Just(b"{\"input\": {\"\\ud800\": 1}}".to_vec()),
        Just(b"\xef\xbb\xbf{\"input\": {}}".to_vec()),
        "\\PC{0,64}".prop_map(String::into_bytes),
    ]
}

fn header() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        Just(Some(b"Bearer key-demo".to_vec())),
        Just(Some(b"Bearer key-other".to_vec())),
        Just(Some(b"Bearer  key-demo ".to_vec())),
        Just(Some(b"wait".to_vec())),
        Just(Some(b"wait=0".to_vec())),
        Just(Some(b"wait=18446744073709551616".to_vec())),
        Just(Some(b"respond-async, wait=1".to_vec())),
        Just(Some(b"application/json".to_vec())),
        prop::collection::vec(any::<u8>(), 0..32).prop_map(Some),
        "[ -~]{0,24}".prop_map(|s| Some(s.into_bytes())),
    ]
}

fn call(body: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Call> {
    let auth = prop_oneof![3 => Just(Some(b"Bearer key-demo".to_vec())), 1 => header()];
    let segment = prop_oneof![4 => Just(None), 1 => "\\PC{1,12}".prop_map(Some)];
    (segment.clone(), segment, auth, header(), header(), body).prop_map(
        |(namespace, name, authorization, prefer, content_type, body)| Call {
            namespace: namespace.unwrap_or_else(|| "demo".into()),
            name: name.unwrap_or_else(|| "echo".into()),
            authorization,
            prefer,
            content_type,
            body,
        },
    )
}

/// Runs the cases; returns how many creates got each status (so a test can tell the cases reached the parser).
fn run(strategy: impl Strategy<Value = Call>) -> std::collections::BTreeMap<u16, usize> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let router = router();
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::new());
    runner()
        .run(&strategy, |call| {
            let status = rt.block_on(check(&router, &call));
            *seen.borrow_mut().entry(status.as_u16()).or_insert(0) += 1;
            Ok(())
        })
        .unwrap();
    seen.into_inner()
}

#[test]
fn structured_bodies_get_the_right_answer() {
    let seen = run(call(structured_body()));
    assert!(seen.contains_key(&201) && seen.contains_key(&400), "cases that reach the parser: {seen:?}");
}

#[test]
fn hostile_bodies_get_a_400_never_a_5xx() {
    let seen = run(call(hostile_body()));
    assert!(seen.contains_key(&400), "cases that reach the parser: {seen:?}");
}

/// Nesting far past serde_json's recursion limit (128) is a 400 that says so, not a stack overflow.
#[test]
fn deep_nesting_is_a_400() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let router = router();
    let depth = 500_000; // 1 MB: under the 2 MB body limit
    let body = format!("{{\"input\": {}{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
    let call = Call {
        namespace: "demo".into(),
        name: "echo".into(),
        authorization: Some(b"Bearer key-demo".to_vec()),
        prefer: None,
        content_type: None,
        body,
    };
    let (status, body) = rt.block_on(send(&router, Method::POST, "/v1/deployments/demo/echo/predictions", &call));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["detail"].as_str().unwrap().contains("recursion limit"), "{body}");
}
