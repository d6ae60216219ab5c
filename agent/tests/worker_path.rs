//! The whole worker path in one process: a controller on loopback sends `StartWorker` for a native model over the
//! agent's session; the agent loads it from a `file://` URI through its weight cache, reports `WorkerReady`, and a
//! gateway-side client gets predictions from the agent's `WorkerService` over gRPC. And the worker port's serving
//! (`node::serve_worker`) keeps no cap on the HTTP/2 streams of one connection.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{sync::Arc, time::Duration};

use kiln_agent::{
    cache::{WeightCache, digest_of},
    commands::NodeCommands,
    gpu::sim::SimulatedGpus,
    model::example_model,
    session::{self, Backoff, SessionConfig},
    telemetry::Telemetry,
    workers::{WorkerApi, Workers},
};
use kiln_proto::{
    testing::StubController,
    v1::{
        self, Registered, agent_message, command, model_source::Runtime, worker_event::Event,
        worker_service_client::WorkerServiceClient,
    },
};
use tokio::sync::watch;

/// Registers the agent, then asks it to start one replica on the GPU it reported first.
fn controller(model_uri: String, digest: String) -> StubController {
    let registered = Registered { telemetry_interval_ms: 200, heartbeat_interval_ms: 200, ..Default::default() };
    StubController::new(registered).commands(move |register, _| {
        let gpu = &register.gpus[0];
        let start = v1::StartWorker {
            replica_id: "mlp-0".into(),
            deployment: "demo/mlp".into(),
            generation: 1,
            model: Some(v1::ModelSource {
                uri: model_uri.clone(),
                digest: digest.clone(),
                runtime: Some(Runtime::Native(v1::NativeRuntime::default())),
                ..Default::default()
            }),
            gpu_indexes: vec![gpu.index],
            gpu_uuids: vec![gpu.uuid.clone()],
            gpu_memory_bytes: 1 << 20,
            max_concurrency: 8,
        };
        vec![v1::Command {
            command_id: "start-1".into(),
            deadline: None,
            action: Some(command::Action::StartWorker(start)),
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_starts_a_native_replica_and_the_gateway_gets_predictions() {
    let dir = std::env::temp_dir().join(format!("kiln-worker-path-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = example_model(11, &[3, 16, 2]);
    let model = dir.join("mlp.safetensors");
    std::fs::write(&model, &bytes).unwrap();

    // The controller.
    let (controller, mut seen) = controller(format!("file://{}", model.display()), digest_of(&bytes)).inbox();
    let (controller_addr, _server) = controller.serve_on_loopback().await.unwrap();

    // The agent: simulated GPUs, cache, workers, WorkerService, session.
    let mut gpus = SimulatedGpus::new("node-a", "h100-80gb:2").unwrap();
    let sim = gpus.handle();
    let telemetry = Telemetry::new("node-a", &gpus);
    telemetry.tick(&mut gpus, true);
    let cache = Arc::new(WeightCache::open(&dir.join("cache"), 1 << 30, 1 << 30).unwrap());
    let workers = Workers::new(Arc::clone(&cache), Some(sim.clone()), vec![80 << 30; 2]);
    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_addr = worker_listener.local_addr().unwrap();
    tokio::spawn(kiln_agent::node::serve_worker(worker_listener, WorkerApi(Arc::clone(&workers)).router()));
    let commands = Arc::new(NodeCommands { cache, telemetry: telemetry.clone(), workers });
    let config = SessionConfig {
        controller: format!("http://{controller_addr}"),
        agent_version: "test".into(),
        worker_endpoint: worker_addr.to_string(),
        backoff: Backoff::default(),
        register_timeout: Duration::from_secs(5),
    };
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(session::run(config, telemetry.clone(), commands, stop_rx, None));

    // The agent accepts the command and reports the replica ready, loaded from the remote URI into its cache.
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        let mut accepted = false;
        loop {
            match seen.recv().await.unwrap().body {
                Some(agent_message::Body::Ack(a)) if a.command_id == "start-1" => {
                    assert_eq!(a.status, v1::AckStatus::Accepted as i32, "{}", a.message);
                    accepted = true;
                }
                Some(agent_message::Body::WorkerEvent(e)) => {
                    if let Some(Event::Ready(r)) = e.event {
                        assert_eq!(e.command_id, "start-1");
                        break (accepted, r);
                    }
                    if let Some(Event::Failed(f)) = e.event {
                        panic!("the replica failed: {f:?}");
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(ready.0, "an ACCEPTED ack came before the ready event");
    assert_eq!(ready.1.source_tier, v1::CacheTier::Remote as i32);
    assert_eq!(ready.1.max_concurrency, 8);

    // The gateway's path.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{worker_addr}")).unwrap().connect().await.unwrap();
    let mut client = WorkerServiceClient::new(channel);
    let answer = client
        .predict(v1::PredictRequest {
            prediction_id: "p1".into(),
            replica_id: "mlp-0".into(),
            input: br#"{"input": [[0.1, 0.2, 0.3], [1, 2, 3]]}"#.to_vec(),
            content_type: "application/json".into(),
            metadata: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let out: serde_json::Value = serde_json::from_slice(&answer.output).unwrap();
    assert_eq!(out["output"].as_array().unwrap().len(), 2);
    assert_eq!(answer.prediction_id, "p1");
    let missing =
        client.predict(v1::PredictRequest { replica_id: "nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unavailable);
    // The simulated GPU shows the replica's memory.
    telemetry.tick(&mut gpus, true);
    assert!(telemetry.read().gpus[0].sample.memory_used_bytes.unwrap() > 0);
    std::fs::remove_dir_all(&dir).ok();
}

/// A worker that answers `Predict` only once `barrier` has as many predictions waiting as it was made for.
struct AllAtOnce(Arc<tokio::sync::Barrier>);

type NoChunks =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::PredictChunk, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::worker_service_server::WorkerService for AllAtOnce {
    async fn predict(
        &self,
        request: tonic::Request<v1::PredictRequest>,
    ) -> Result<tonic::Response<v1::PredictResponse>, tonic::Status> {
        self.0.wait().await;
        let prediction_id = request.into_inner().prediction_id;
        Ok(tonic::Response::new(v1::PredictResponse { prediction_id, ..Default::default() }))
    }

    type PredictStreamStream = NoChunks;

    async fn predict_stream(
        &self,
        _request: tonic::Request<v1::PredictRequest>,
    ) -> Result<tonic::Response<NoChunks>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

/// The gateway sends every gRPC prediction to a node over one HTTP/2 connection, so the worker port must not cap the
/// streams open at once: hyper's default of 200 would hold the 201st prediction until one of the others ended. Here
/// no prediction ends until 260 are in the worker together, which they only can be on an uncapped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_connection_carries_more_than_200_predictions_at_once() {
    const AT_ONCE: usize = 260;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let worker = AllAtOnce(Arc::new(tokio::sync::Barrier::new(AT_ONCE)));
    let router =
        tonic::service::Routes::new(v1::worker_service_server::WorkerServiceServer::new(worker)).into_axum_router();
    tokio::spawn(kiln_agent::node::serve_worker(listener, router));
    // One channel is one connection.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..AT_ONCE {
        let mut client = WorkerServiceClient::new(channel.clone());
        calls.spawn(async move {
            let request = v1::PredictRequest { prediction_id: format!("p{i}"), ..Default::default() };
            (i, client.predict(request).await)
        });
    }
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        let mut answered = 0;
        while let Some(joined) = calls.join_next().await {
            let (i, answer) = joined.unwrap();
            assert_eq!(answer.unwrap().into_inner().prediction_id, format!("p{i}"));
            answered += 1;
        }
        answered
    })
    .await
    .expect("the predictions were not all in the worker at once: the connection caps its streams");
    assert_eq!(answered, AT_ONCE);
}
