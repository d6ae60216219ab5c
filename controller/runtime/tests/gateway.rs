//! The predictions API over a fake backend whose one deployment starts cold: sync and async predictions,
//! cold-start metrics, auth, 404/400, a full hold queue (429) and a cold start past the deadline (504).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::Duration,
};

use kiln_controller::gateway::{Backend, Gateway, HoldQueue, Outcome, PredictError};
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

async fn serve(hold: Duration, capacity: usize, cold: Duration) -> String {
    let fake = Fake { queue: Arc::new(HoldQueue::new(capacity)), cold };
    let keys = [("key-demo".to_owned(), "demo".to_owned()), ("key-other".to_owned(), "other".to_owned())];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut gateway = Gateway::new(fake, keys, &format!("http://{addr}"));
    Arc::get_mut(&mut gateway).unwrap().hold = hold;
    let router = gateway.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
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
