//! Streaming predictions through the gateway over a backend whose model produces tokens one at a time, each held
//! until the test lets it go: the event stream sends each `output` as it is produced (the first before the last
//! exists), `GET` shows the output so far while `processing`, a stream opened later replays the outputs, a failure
//! after some outputs ends with `error`, a prediction not created with `stream: true` sends its output once unless
//! its model streams.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{sync::Arc, time::Duration};

use kiln_controller::gateway::{Backend, Gateway, Outcome, OutputSink, PredictError};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::Semaphore,
};

/// `demo/tokens` produces `input.n` tokens `t0`, `t1`, ..., each when the semaphore gives a permit; with
/// `input.fail` it fails after them.
struct Tokens {
    permits: Arc<Semaphore>,
}

impl Tokens {
    async fn run(&self, input: &Value, mut outputs: Option<OutputSink>) -> Result<Outcome, PredictError> {
        let n = input["n"].as_u64().unwrap();
        let mut all = Vec::new();
        for i in 0..n {
            self.permits.acquire().await.unwrap().forget();
            let token = json!(format!("t{i}"));
            if let Some(outputs) = outputs.as_mut() {
                outputs(token.clone());
            }
            all.push(token);
        }
        if input["fail"] == true {
            return Err(PredictError::Failed("the model ran out of memory".into()));
        }
        Ok(Outcome { output: Value::Array(all), predict_time: 0.1, queue_time: 0.0, cold_start: None, gpu: None })
    }
}

impl Backend for Tokens {
    fn version(&self, deployment: &str) -> Option<String> {
        ["demo/tokens", "demo/live"].contains(&deployment).then(|| "v1".to_owned())
    }

    /// `demo/live` streams every prediction, asked or not (as a process model server's are).
    fn streams(&self, deployment: &str) -> bool {
        deployment == "demo/live"
    }

    async fn predict(&self, _: &str, input: Value, _: Duration) -> Result<Outcome, PredictError> {
        self.run(&input, None).await
    }

    async fn predict_streaming(
        &self,
        _: &str,
        input: Value,
        _: Duration,
        outputs: OutputSink,
    ) -> Result<Outcome, PredictError> {
        self.run(&input, Some(outputs)).await
    }
}

async fn serve() -> (String, Arc<Semaphore>) {
    let permits = Arc::new(Semaphore::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let gateway = Gateway::new(
        Tokens { permits: Arc::clone(&permits) },
        [("key-demo".to_owned(), "demo".to_owned())],
        &format!("http://{addr}"),
    );
    let router = gateway.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (addr, permits)
}

async fn request(addr: &str, method: &str, path: &str, body: &str) -> Value {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer key-demo\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// An open event stream, read one event at a time: `(event, data, id)`.
struct Events(BufReader<TcpStream>);

impl Events {
    async fn open(addr: &str, id: &str) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET /v1/predictions/{id}/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer key-demo\r\n\
             Accept: text/event-stream\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        loop {
            line.clear();
            reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                return Self(reader);
            }
        }
    }

    /// The next event (the body is chunked: size lines and chunk ends are skipped).
    async fn next(&mut self) -> (String, String, String) {
        let (mut event, mut data, mut id) = (String::new(), String::new(), String::new());
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(5), self.0.read_line(&mut line)).await;
            assert!(read.expect("an event within 5 s").unwrap() > 0, "the stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(v) = line.strip_prefix("event: ") {
                event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = v.to_owned();
            } else if line.is_empty() && !event.is_empty() {
                return (event, data, id);
            }
        }
    }
}

fn ev(event: &str, data: &str, id: u32) -> (String, String, String) {
    (event.to_owned(), data.to_owned(), id.to_string())
}

#[tokio::test]
async fn a_streaming_prediction_sends_each_output_as_it_is_produced() {
    let (addr, permits) = serve().await;
    let created =
        request(&addr, "POST", "/v1/models/demo/tokens/predictions", r#"{"input":{"n":3},"stream":true}"#).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let mut events = Events::open(&addr, &id).await;

    permits.add_permits(1);
    assert_eq!(events.next().await, ev("output", "t0", 0), "the first token, while the others do not exist yet");
    let so_far = request(&addr, "GET", &format!("/v1/predictions/{id}"), "").await;
    assert_eq!((so_far["status"].as_str(), &so_far["output"]), (Some("processing"), &json!(["t0"])));
    permits.add_permits(1);
    assert_eq!(events.next().await, ev("output", "t1", 1));
    permits.add_permits(1);
    assert_eq!(events.next().await, ev("output", "t2", 2));
    assert_eq!(events.next().await, ev("done", "{}", 3));

    let done = request(&addr, "GET", &format!("/v1/predictions/{id}"), "").await;
    assert_eq!((done["status"].as_str(), &done["output"]), (Some("succeeded"), &json!(["t0", "t1", "t2"])));
    // Opened after it finished: every output again, then done.
    let mut late = Events::open(&addr, &id).await;
    for (i, t) in ["t0", "t1", "t2"].iter().enumerate() {
        assert_eq!(late.next().await, ev("output", t, i as u32));
    }
    assert_eq!(late.next().await, ev("done", "{}", 3));
}

#[tokio::test]
async fn a_streaming_failure_ends_with_error_and_only_a_model_that_streams_streams_unasked() {
    let (addr, permits) = serve().await;
    let created =
        request(&addr, "POST", "/v1/models/demo/tokens/predictions", r#"{"input":{"n":1,"fail":true},"stream":true}"#)
            .await;
    let mut events = Events::open(&addr, created["id"].as_str().unwrap()).await;
    permits.add_permits(1);
    assert_eq!(events.next().await, ev("output", "t0", 0));
    assert_eq!(events.next().await, ev("error", "the model ran out of memory", 1));
    assert_eq!(events.next().await, ev("done", "{}", 2));

    // Without `stream: true` the backend's plain `predict` runs it and the stream sends the output whole.
    let created = request(&addr, "POST", "/v1/models/demo/tokens/predictions", r#"{"input":{"n":2}}"#).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let mut events = Events::open(&addr, &id).await;
    permits.add_permits(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let running = request(&addr, "GET", &format!("/v1/predictions/{id}"), "").await;
    assert_eq!(running["output"], Value::Null, "no partial output without stream: true");
    permits.add_permits(1);
    assert_eq!(events.next().await, ev("output", r#"["t0","t1"]"#, 0));
    assert_eq!(events.next().await, ev("done", "{}", 1));

    // A model that streams streams without being asked (Replicate's JavaScript client does not ask).
    let created = request(&addr, "POST", "/v1/models/demo/live/predictions", r#"{"input":{"n":2}}"#).await;
    let mut events = Events::open(&addr, created["id"].as_str().unwrap()).await;
    permits.add_permits(1);
    assert_eq!(events.next().await, ev("output", "t0", 0));
    permits.add_permits(1);
    assert_eq!(events.next().await, ev("output", "t1", 1));
    assert_eq!(events.next().await, ev("done", "{}", 2));
}
