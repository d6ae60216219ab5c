//! Process replicas through the agent's worker manager: an external model server (the agent's own
//! `echo-server`) is launched with the assigned GPUs, answers predictions through the proxy, is stopped with
//! SIGTERM; one that exits during startup or later is reported, and the other replicas keep serving.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{sync::Arc, time::Duration};

use kiln_agent::{cache::WeightCache, workers::Workers};
use kiln_proto::v1::{self, AckStatus, model_source::Runtime, worker_event::Event};
use tokio::sync::broadcast;

fn start(replica: &str, command: &[&str]) -> v1::StartWorker {
    v1::StartWorker {
        replica_id: replica.into(),
        deployment: "ns/llm".into(),
        gpu_indexes: vec![0, 1],
        gpu_uuids: vec!["GPU-aaa".into(), "GPU-bbb".into()],
        max_concurrency: 4,
        model: Some(v1::ModelSource {
            uri: "file:///models/llm".into(),
            runtime: Some(Runtime::Process(v1::ProcessRuntime {
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                readiness_path: "/health".into(),
                startup_timeout_ms: 10_000,
                termination_grace_ms: 2_000,
                ..Default::default()
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn event_for(
    events: &mut broadcast::Receiver<v1::WorkerEvent>,
    replica: &str,
    done: fn(&Event) -> bool,
) -> Event {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.replica_id == replica && e.event.as_ref().is_some_and(done) {
                return e.event.unwrap();
            }
        }
    })
    .await
    .expect("the event within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_replicas_start_answer_stop_and_failures_are_reported() {
    let dir = std::env::temp_dir().join(format!("kiln-process-test-{}", std::process::id()));
    let cache = Arc::new(WeightCache::open(&dir, 1 << 20, 1 << 20).unwrap());
    let workers = Workers::new(cache, None, vec![80 << 30; 2]);
    let mut events = workers.subscribe();
    let agent = env!("CARGO_BIN_EXE_kiln-agent");

    assert_eq!(workers.start("c1", start("good", &[agent, "echo-server"])).0, AckStatus::Accepted);
    let Event::Ready(ready) = event_for(&mut events, "good", |e| matches!(e, Event::Ready(_) | Event::Failed(_))).await
    else {
        panic!("the echo server did not start")
    };
    assert_eq!(ready.max_concurrency, 4);
    let (out, _) = workers.predict("good", br#"{"input": {"prompt": "hi"}}"#).await.unwrap();
    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["output"]["prompt"], "hi");
    assert_eq!(out["gpus"], "GPU-aaa,GPU-bbb", "CUDA_VISIBLE_DEVICES carries the assigned GPUs");
    let err = workers.predict("good", b"not json").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "the server's 400 reaches the caller");

    // A server that exits during startup: a clear failure, with its output.
    workers.start("c2", start("crash", &["sh", "-c", "echo cannot load weights >&2; exit 7"]));
    let Event::Failed(f) = event_for(&mut events, "crash", |e| matches!(e, Event::Ready(_) | Event::Failed(_))).await
    else {
        panic!("a crashing server cannot be ready")
    };
    assert_eq!(f.reason, "ProcessExited");
    assert!(f.message.contains("exit status: 7") && f.message.contains("cannot load weights"), "{}", f.message);

    // A server that dies after it was ready: reported as an unrequested exit; the replica is gone.
    workers.start("c3", start("flaky", &[agent, "echo-server", "--exit-after", "1s"]));
    event_for(&mut events, "flaky", |e| matches!(e, Event::Ready(_))).await;
    let Event::Exited(x) = event_for(&mut events, "flaky", |e| matches!(e, Event::Exited(_))).await else {
        unreachable!()
    };
    assert!(!x.requested && x.exit_code == 1, "{x:?}");
    assert_eq!(workers.predict("flaky", b"{}").await.unwrap_err().code(), tonic::Code::Unavailable);

    // The first replica kept serving; a requested stop ends it with SIGTERM.
    assert!(workers.predict("good", br#"{"input": 1}"#).await.is_ok());
    let stop = v1::StopWorker { replica_id: "good".into(), grace_period_ms: 100, keep_weights_resident: false };
    assert_eq!(workers.stop(&stop).await.0, AckStatus::Done);
    let Event::Exited(x) = event_for(&mut events, "good", |e| matches!(e, Event::Exited(_))).await else {
        unreachable!()
    };
    assert!(x.requested && x.signal == 15, "{x:?}");
    assert!(workers.running().is_empty());
    std::fs::remove_dir_all(&dir).ok();
}
