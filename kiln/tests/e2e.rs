//! End to end on loopback, with the real binary: a controller (`kiln up --no-agent`, manifest-directory mode) and
//! two agents (`kiln agent`, two simulated H100s each) as separate processes, checked through the public HTTP API
//! and metrics only.
//!
//! (These live in the `kiln` package, not in `e2e/`, because cargo hands a test the path of its own package's
//! binaries only; `e2e/` keeps the tests against a real cluster.)

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{Proc, http, spawn_kiln};
use serde_json::Value;

fn spawn(args: &[&str], marker: &str) -> (Proc, String) {
    spawn_kiln(args, None, marker)
}

struct Cluster {
    dir: PathBuf,
    controller: Proc,
    agents: Vec<Option<Proc>>,
    http: String,
}

const SLOW: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: slow
  namespace: e2e
spec:
  model:
    uri: file://MODEL
    runtime: native
  gpu:
    count: 1
    memoryPerGpu: 1Gi
  scaling:
    minReplicas: 0
    maxReplicas: 3
    targetConcurrency: 1
    keepAlive:
      policy: fixed
      duration: 3s
"#;

const HUGE: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: huge
  namespace: e2e
spec:
  model:
    uri: file://MODEL
    runtime: native
  gpu:
    count: 8
    memoryPerGpu: 80Gi
"#;

const KEYS: &str = "- namespace: e2e\n  key: e2e-key-0123456789abcdef\n- namespace: other\n  key: other-key-0123456789abcdef\n\
                    - namespace: \"*\"\n  key: operator-key-0123456789abcdef\n";
const AUTH: &str = "Bearer e2e-key-0123456789abcdef";
const OPERATOR: &str = "Bearer operator-key-0123456789abcdef";

impl Cluster {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        // A model slow enough on a CPU that concurrent requests overlap: 64 -> 1024 -> 1024 -> 64.
        let model = dir.join("slow.safetensors");
        std::fs::write(&model, kiln_agent::model::example_model(3, &[64, 1024, 1024, 64])).unwrap();
        let manifest = |text: &str| text.replace("MODEL", model.to_str().unwrap());
        std::fs::write(dir.join("manifests/slow.yaml"), manifest(SLOW)).unwrap();
        std::fs::write(dir.join("manifests/huge.yaml"), manifest(HUGE)).unwrap();
        std::fs::write(dir.join("keys.yaml"), KEYS).unwrap();
        let d = |p: &str| dir.join(p).to_str().unwrap().to_owned();
        let (controller, text) = spawn(
            &[
                "up",
                "--no-agent",
                "--manifests",
                &d("manifests"),
                "--state-dir",
                &d("state"),
                "--api-keys",
                &d("keys.yaml"),
                "--listen",
                "127.0.0.1:0",
                "--agent-listen",
                "127.0.0.1:0",
                "--agent-grace",
                "3s",
                // Long enough that a burst on a busy 2-core machine is not cut off; the tests that wait for the hold
                // to run out allow for it.
                "--hold",
                "15s",
                "--hold-capacity",
                "8",
            ],
            "agents connect to",
        );
        let grab = |prefix: &str| {
            let at = text.find(prefix).unwrap_or_else(|| panic!("{prefix:?} in {text}")) + prefix.len();
            text[at..].split_whitespace().next().unwrap().trim_start_matches("http://").to_owned()
        };
        let http = grab("predictions API");
        let agent_addr = grab("agents connect to");
        let mut agents = Vec::new();
        for node in ["node-a", "node-b"] {
            let (agent, _) = spawn(
                &[
                    "agent",
                    "--controller",
                    &format!("http://{agent_addr}"),
                    "--node-name",
                    node,
                    "--simulate-gpus",
                    "h100-80gb:2",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--admin-addr",
                    "127.0.0.1:0",
                    "--worker-addr",
                    "127.0.0.1:0",
                    "--cache-dir",
                    &d(node),
                ],
                "workers:",
            );
            agents.push(Some(agent));
        }
        let cluster = Cluster { dir, controller, agents, http };
        cluster.wait_for("both nodes ready and the deployments loaded", |s| {
            s["nodes"].as_array().is_some_and(|n| n.iter().filter(|n| n["ready"] == true).count() == 2)
                && s["deployments"].as_array().is_some_and(|d| d.len() == 2)
        });
        cluster
    }

    fn state(&self) -> Value {
        let (status, _, body) = http(&self.http, "GET", "/kiln/v1/deployments", &[("Authorization", OPERATOR)], "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn deployment(&self, name: &str) -> Value {
        let s = self.state();
        s["deployments"].as_array().unwrap().iter().find(|d| d["name"] == name).cloned().unwrap_or(Value::Null)
    }

    fn wait_for(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.state();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; last state: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn predict(&self, name: &str, auth: &str, body: &str, wait: bool) -> (u16, String, Value) {
        let mut headers = vec![("Authorization", auth), ("Content-Type", "application/json")];
        if wait {
            headers.push(("Prefer", "wait"));
        }
        let (status, head, body) =
            http(&self.http, "POST", &format!("/v1/deployments/{name}/predictions"), &headers, body);
        (status, head, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    fn metrics(&self) -> String {
        http(&self.http, "GET", "/metrics", &[("Authorization", OPERATOR)], "").2
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        let _ = self.controller.0.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A batch of 16 rows of 64 inputs.
fn batch() -> String {
    let row: Vec<String> = (0..64).map(|i| format!("{:.2}", (i as f64) / 64.0 - 0.5)).collect();
    let rows: Vec<String> = (0..16).map(|_| format!("[{}]", row.join(","))).collect();
    format!("{{\"input\": {{\"x\": [{}]}}}}", rows.join(","))
}

fn nodes_of(d: &Value) -> Vec<String> {
    let mut nodes: Vec<String> =
        d["placements"].as_array().unwrap().iter().map(|p| p["node"].as_str().unwrap().to_owned()).collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

#[test]
fn scale_from_zero_burst_scale_out_back_to_zero_and_rescheduling_after_an_agent_dies() {
    let mut c = Cluster::start("lifecycle");
    let body = batch();

    // minReplicas 0: nothing runs.
    let d = c.deployment("e2e/slow");
    assert_eq!((d["replicas"]["desired"].as_u64(), d["replicas"]["ready"].as_u64()), (Some(0), Some(0)), "{d}");

    // The first request cold-starts a replica and succeeds; the next is warm.
    let (status, _, p) = c.predict("e2e/slow", AUTH, &body, true);
    assert_eq!(status, 200, "{p}");
    assert_eq!((p["status"].as_str(), p["metrics"]["cold_start"].as_bool()), (Some("succeeded"), Some(true)), "{p}");
    assert_eq!(p["output"].as_array().unwrap().len(), 16);
    assert!(p["metrics"]["cold_start_time"].as_f64().unwrap() > 0.0);
    let (status, _, p) = c.predict("e2e/slow", AUTH, &body, true);
    assert_eq!((status, p["metrics"]["cold_start"].as_bool()), (200, Some(false)), "{p}");

    // A burst of six concurrent clients (one request per replica at a time) scales out, within maxReplicas 3,
    // spread over both nodes; every request succeeds.
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (http_addr, body) = (c.http.clone(), body.clone());
            std::thread::spawn(move || {
                (0..4)
                    .map(|_| {
                        let headers = [("Authorization", AUTH), ("Prefer", "wait")];
                        http(&http_addr, "POST", "/v1/deployments/e2e/slow/predictions", &headers, &body).0
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let statuses: Vec<u16> = clients.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let d = c.deployment("e2e/slow");
    let replicas = d["placements"].as_array().unwrap().len();
    assert!((2..=3).contains(&replicas), "scaled out within the maximum: {d:#}");
    assert_eq!(nodes_of(&d), ["node-a", "node-b"], "spread over both nodes: {d:#}");
    let metrics = c.metrics();
    assert!(
        metrics.contains("kiln_gateway_requests_total{deployment=\"e2e/slow\",outcome=\"succeeded\"} 26"),
        "{metrics}"
    );

    // Idle past the 3 s keep-alive: back to zero.
    c.wait_for("e2e/slow back at zero", |s| {
        s["deployments"].as_array().unwrap().iter().any(|d| {
            d["name"] == "e2e/slow" && d["replicas"]["ready"] == 0 && d["placements"].as_array().unwrap().is_empty()
        })
    });
    let metrics = c.metrics();
    assert!(metrics.contains("kiln_gpu_allocated_ratio 0.0"), "{metrics}");

    // Cold start again, then kill the agent holding the replica: the next requests still succeed, on the other node.
    let (status, _, p) = c.predict("e2e/slow", AUTH, &body, true);
    assert_eq!((status, p["metrics"]["cold_start"].as_bool()), (200, Some(true)), "{p}");
    let d = c.deployment("e2e/slow");
    let victim = nodes_of(&d).pop().unwrap();
    let index = if victim == "node-a" { 0 } else { 1 };
    c.agents[index] = None;
    for _ in 0..3 {
        let (status, _, p) = c.predict("e2e/slow", AUTH, &body, true);
        assert_eq!((status, p["status"].as_str()), (200, Some("succeeded")), "{p}");
    }
    // After the grace period the node is not ready and no replica is placed there; requests are served on the other.
    c.wait_for("the dead agent's node not ready and none of its replicas left", |s| {
        let lost = s["nodes"].as_array().unwrap().iter().any(|n| n["name"] == victim.as_str() && n["ready"] == false);
        let d = s["deployments"].as_array().unwrap().iter().find(|d| d["name"] == "e2e/slow").unwrap();
        lost && !nodes_of(d).contains(&victim)
    });
    let (status, _, p) = c.predict("e2e/slow", AUTH, &body, true);
    assert_eq!((status, p["status"].as_str()), (200, Some("succeeded")), "{p}");
    let survivor = if victim == "node-a" { "node-b" } else { "node-a" };
    assert_eq!(nodes_of(&c.deployment("e2e/slow")), [survivor]);
}

#[test]
fn full_queues_bad_keys_and_invalid_manifests_get_clear_answers() {
    let c = Cluster::start("errors");
    let body = batch();

    // The fleet's state is an operator's: no key, 401; a tenant's key lists its own namespace only, no nodes; the
    // metrics need an operator key.
    assert_eq!(http(&c.http, "GET", "/kiln/v1/deployments", &[], "").0, 401);
    let (status, _, listing) =
        http(&c.http, "GET", "/kiln/v1/deployments", &[("Authorization", "Bearer other-key-0123456789abcdef")], "");
    let other: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(status, 200, "{listing}");
    assert_eq!(
        (other["deployments"].as_array().unwrap().len(), other["nodes"].as_array().unwrap().len()),
        (0, 0),
        "{other}"
    );
    let (_, _, listing) = http(&c.http, "GET", "/kiln/v1/deployments", &[("Authorization", AUTH)], "");
    let mine: Value = serde_json::from_str(&listing).unwrap();
    assert!(mine["deployments"].as_array().unwrap().iter().all(|d| d["name"].as_str().unwrap().starts_with("e2e/")));
    assert_eq!(mine["deployments"].as_array().unwrap().len(), 2, "{mine}");
    assert_eq!(http(&c.http, "GET", "/metrics", &[], "").0, 401);
    assert_eq!(http(&c.http, "GET", "/metrics", &[("Authorization", AUTH)], "").0, 403);
    assert!(c.metrics().contains("kiln_nodes"));

    // Unknown or missing key: 401; another namespace's key: 403; unknown deployment: 404 naming it; bad body: 400.
    let (status, _, p) = c.predict("e2e/slow", "Bearer wrong-key-0000000000000", &body, true);
    assert_eq!(status, 401, "{p}");
    let (status, _, p) = c.predict("e2e/slow", "Bearer other-key-0123456789abcdef", &body, true);
    assert_eq!(status, 403, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("e2e"), "{p}");
    let (status, _, p) = c.predict("e2e/nope", AUTH, &body, true);
    assert_eq!(status, 404);
    assert!(p["detail"].as_str().unwrap().contains("e2e/nope"), "{p}");
    let (status, _, p) = c.predict("e2e/slow", AUTH, "{\"input\": [1, 2", true);
    assert_eq!(status, 400);
    assert!(p["detail"].as_str().unwrap().contains("not JSON"), "{p}");

    // A deployment no node can hold (8 GPUs; the nodes have 2): it says why, requests are held up to the queue's
    // capacity (8), the next gets 429 with Retry-After, and held ones fail after the hold deadline.
    let d = c.deployment("e2e/huge");
    assert_eq!(d["replicas"]["ready"], 0);
    for _ in 0..8 {
        let (status, _, p) = c.predict("e2e/huge", AUTH, &body, false);
        assert_eq!(status, 201, "{p}");
    }
    c.wait_for("eight held", |s| {
        s["deployments"].as_array().unwrap().iter().any(|d| d["name"] == "e2e/huge" && d["waiting"] == 8)
    });
    let d = c.deployment("e2e/huge");
    assert!(d["unschedulable"].as_str().unwrap().contains("8 whole GPU(s)"), "{d}");
    let (status, head, p) = c.predict("e2e/huge", AUTH, &body, true);
    assert_eq!(status, 429, "{p}");
    assert!(head.to_lowercase().contains("retry-after: "), "{head}");
    c.wait_for("the held requests to time out", |s| {
        s["deployments"].as_array().unwrap().iter().any(|d| d["name"] == "e2e/huge" && d["waiting"] == 0)
    });
    let (status, _, p) = c.predict("e2e/huge", AUTH, &body, true);
    assert_eq!(status, 504, "{p}");
    assert!(p["error"].as_str().unwrap().contains("still cold-starting"), "{p}");

    // An invalid manifest is reported with its file and the apiserver's message; the other deployments still serve.
    std::fs::write(
        c.dir.join("manifests/broken.yaml"),
        SLOW.replace("name: slow", "name: broken").replace("maxReplicas: 3", "maxReplicas: -1"),
    )
    .unwrap();
    let s = c.wait_for("the broken manifest reported", |s| !s["invalid"].as_array().unwrap().is_empty());
    let invalid = &s["invalid"][0];
    assert!(invalid["file"].as_str().unwrap().ends_with("broken.yaml"), "{invalid}");
    assert!(invalid["error"].as_str().unwrap().contains("maxReplicas"), "{invalid}");
    let (status, _, p) = c.predict("e2e/slow", AUTH, &body, true);
    assert_eq!((status, p["status"].as_str()), (200, Some("succeeded")), "{p}");
}

#[test]
fn a_deployment_whose_model_is_missing_fails_fast_backs_off_and_recovers_when_the_file_appears() {
    let c = Cluster::start("failing");
    let body = batch();
    let model = c.dir.join("late.safetensors");
    std::fs::write(
        c.dir.join("manifests/missing.yaml"),
        SLOW.replace("name: slow", "name: missing").replace("MODEL", model.to_str().unwrap()),
    )
    .unwrap();
    c.wait_for("the deployment loaded", |s| {
        s["deployments"].as_array().unwrap().iter().any(|d| d["name"] == "e2e/missing")
    });

    // The request that starts the first replica gets the load error, not a hold timeout (the hold is 15 s).
    let began = Instant::now();
    let (status, _, p) = c.predict("e2e/missing", AUTH, &body, true);
    let took = began.elapsed();
    eprintln!("the first request failed after {took:?}");
    assert_eq!((status, p["status"].as_str()), (200, Some("failed")), "{p}");
    let error = p["error"].as_str().unwrap();
    assert!(error.contains("ModelNotFound") && error.contains("late.safetensors"), "{error}");
    assert!(took < Duration::from_secs(4), "failed fast, not after the hold: {took:?}");
    let d = c.deployment("e2e/missing");
    assert_eq!(d["degraded"]["reason"], "ModelNotFound", "{d:#}");
    assert!(d["degraded"]["nextStartInSeconds"].as_f64().unwrap() > 0.0, "{d:#}");

    // Clients keep asking for 12 s: each is answered at once, and the backoff (10 s, then 20 s) allows at most
    // three starts, not thousands.
    let until = Instant::now() + Duration::from_secs(12);
    let mut answered = 0;
    while Instant::now() < until {
        let began = Instant::now();
        let (status, _, p) = c.predict("e2e/missing", AUTH, &body, true);
        assert_eq!((status, p["status"].as_str()), (200, Some("failed")), "{p}");
        assert!(began.elapsed() < Duration::from_secs(4), "{:?}", began.elapsed());
        answered += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(answered >= 20, "{answered}");
    let metrics = c.metrics();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("kiln_failed_starts_total{deployment=\"e2e/missing\",reason=\"ModelNotFound\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let failed: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((1..=3).contains(&failed), "{line}");

    // The file appears: the controller sees it and retries at once; the deployment serves, no restart needed.
    std::fs::write(&model, kiln_agent::model::example_model(3, &[64, 1024, 1024, 64])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, p) = c.predict("e2e/missing", AUTH, &body, true);
        if p["status"] == "succeeded" {
            assert_eq!(status, 200);
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {p}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let d = c.deployment("e2e/missing");
    assert!(d["degraded"].is_null(), "{d:#}");
}

const WHOLE: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: whole
  namespace: e2e
spec:
  model:
    uri: file://MODEL
    runtime: native
  gpu:
    count: 1
    memoryPerGpu: 60Gi
  scaling:
    minReplicas: 2
    maxReplicas: 2
"#;

const RENTAL: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: GpuRental
metadata:
  name: train
  namespace: e2e
spec:
  gpuModel: NVIDIA H100 80GB HBM3
  count: 2
  endTime: END
---
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: mine
  namespace: e2e
spec:
  model:
    uri: file://MODEL
    runtime: native
  gpu:
    count: 1
    memoryPerGpu: 1Gi
    rental: train
"#;

#[test]
fn a_rental_takes_gpus_serverless_work_used_a_pinned_deployment_serves_on_them_and_they_come_back_at_the_end() {
    let c = Cluster::start("rental");
    let model = c.dir.join("slow.safetensors");
    let manifest = |text: &str| text.replace("MODEL", model.to_str().unwrap());
    let placed = |d: &Value| -> Vec<(String, u64)> {
        d["placements"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| {
                p["gpus"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| (p["node"].as_str().unwrap().to_owned(), g.as_u64().unwrap()))
            })
            .collect()
    };
    // Two serverless replicas of three quarters of a GPU each, spread over the two nodes (one GPU of each).
    std::fs::write(c.dir.join("manifests/whole.yaml"), manifest(WHOLE)).unwrap();
    let s = c.wait_for("two whole-GPU replicas", |s| {
        s["deployments"].as_array().unwrap().iter().any(|d| d["name"] == "e2e/whole" && d["replicas"]["ready"] == 2)
    });
    let whole = s["deployments"].as_array().unwrap().iter().find(|d| d["name"] == "e2e/whole").unwrap().clone();
    let before = placed(&whole);
    assert_eq!(nodes_of(&whole), ["node-a", "node-b"], "spread: {whole:#}");

    // A rental of 2 GPUs ending in 40 s: two GPUs of one node, so one of the serverless replicas must move.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    std::fs::write(
        c.dir.join("manifests/rental.yaml"),
        manifest(RENTAL).replace("END", &jiff::Timestamp::from_second(now as i64 + 40).unwrap().to_string()),
    )
    .unwrap();
    let rentals = |auth: &str| -> Value {
        let (status, _, body) = http(&c.http, "GET", "/kiln/v1/rentals", &[("Authorization", auth)], "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let rental = loop {
        let r = rentals(AUTH)["rentals"][0].clone();
        if r["phase"] == "Active" {
            break r;
        }
        assert!(Instant::now() < deadline, "the rental never became Active: {r:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let rented: Vec<(String, u64)> = rental["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["node"].as_str().unwrap().to_owned(), g["index"].as_u64().unwrap()))
        .collect();
    assert_eq!(rented.len(), 2, "{rental:#}");
    assert_eq!(rented[0].0, rented[1].0, "one node when the GPUs fit on one: {rental:#}");
    assert!(
        rental["gpus"].as_array().unwrap().iter().all(|g| g["uuid"].as_str().is_some_and(|u| u.starts_with("GPU-")))
    );
    assert!(
        before.iter().any(|g| rented.contains(g)),
        "the rental took a GPU a serverless replica held: {before:?} {rented:?}"
    );
    // The serverless deployment keeps its two replicas, none on the rented GPUs: the one there moved.
    c.wait_for("the serverless replica moved off the rented GPUs", |s| {
        s["deployments"].as_array().unwrap().iter().any(|d| {
            d["name"] == "e2e/whole" && d["replicas"]["ready"] == 2 && placed(d).iter().all(|g| !rented.contains(g))
        })
    });
    // Another tenant sees no rental; the owner's pinned deployment serves on the rented GPUs.
    assert_eq!(rentals("Bearer other-key-0123456789abcdef")["rentals"].as_array().unwrap().len(), 0);
    let (status, _, p) = c.predict("e2e/mine", AUTH, &batch(), true);
    assert_eq!((status, p["status"].as_str()), (200, Some("succeeded")), "{p}");
    let mine = c.deployment("e2e/mine");
    assert!(!placed(&mine).is_empty() && placed(&mine).iter().all(|g| rented.contains(g)), "{mine:#} {rented:?}");
    // `kiln get` lists it.
    let get = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["get", "--server", &c.http, "--key", OPERATOR.trim_start_matches("Bearer ")])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&get.stdout);
    let row = table.lines().find(|l| l.starts_with("e2e/train")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().take(4).collect::<Vec<_>>(), ["e2e/train", "Active", "2", "2"], "{table}");

    // At the end: Expired, the pinned replica stopped, the GPUs back in the pool.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let r = rentals(AUTH)["rentals"][0].clone();
        if r["phase"] == "Expired" {
            break r;
        }
        assert!(Instant::now() < deadline, "the rental never expired: {r:#}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(ended["gpus"].as_array().unwrap().len(), 0, "{ended:#}");
    assert_eq!(ended["billed_gpu_hours"], 2, "2 GPUs × 1 started hour: {ended:#}");
    c.wait_for("the pinned replica stopped", |s| {
        s["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "e2e/mine" && d["placements"] == serde_json::json!([]))
    });
    // The bill: the rental's 2 GPU-hours, as usage and as the statement, which add up.
    let (status, _, usage) = http(&c.http, "GET", "/v1/usage?group_by=rental", &[("Authorization", AUTH)], "");
    assert_eq!(status, 200, "{usage}");
    let usage: Value = serde_json::from_str(&usage).unwrap();
    let train = usage["groups"].as_array().unwrap().iter().find(|g| g["key"] == "train").cloned();
    assert_eq!(train.as_ref().map(|t| t["gpu_hours"].clone()), Some(serde_json::json!(2)), "{usage:#}");
    let (status, _, statement) = http(&c.http, "GET", "/v1/usage/statement", &[("Authorization", AUTH)], "");
    assert_eq!(status, 200, "{statement}");
    let statement: Value = serde_json::from_str(&statement).unwrap();
    assert_eq!(statement["total"], usage["total"]["amount"], "{statement:#} {usage:#}");
    // Another tenant cannot read this namespace's usage.
    let (status, _, _) =
        http(&c.http, "GET", "/v1/usage?namespace=e2e", &[("Authorization", "Bearer other-key-0123456789abcdef")], "");
    assert_eq!(status, 403);
    // The records went through the one-replica raft ledger on disk: it leads, has applied what it committed, and
    // holds at least the rental's record. Its state is an operator's to read, and a metric.
    let (status, _, ledger) = http(&c.http, "GET", "/kiln/v1/ledger", &[("Authorization", OPERATOR)], "");
    assert_eq!(status, 200, "{ledger}");
    let ledger: Value = serde_json::from_str(&ledger).unwrap();
    assert_eq!((ledger["kind"].as_str(), ledger["leader"].as_u64()), (Some("raft"), Some(1)), "{ledger:#}");
    assert_eq!(ledger["appliedIndex"], ledger["commitIndex"], "{ledger:#}");
    assert!(ledger["records"].as_u64().unwrap() >= 1, "{ledger:#}");
    assert_eq!(http(&c.http, "GET", "/kiln/v1/ledger", &[("Authorization", AUTH)], "").0, 403);
    assert!(c.metrics().contains("kiln_ledger_status{field=\"records\"}"), "{}", c.metrics());
}
