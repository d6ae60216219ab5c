//! The registry against the real agent (its session, workers and cache, with simulated GPUs): registration,
//! health events, a command and its ack, worker events, and a node lost when its agent goes silent.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kiln_agent::{
    cache::{WeightCache, digest_of},
    commands::NodeCommands,
    gpu::sim::SimulatedGpus,
    model::example_model,
    session::{self, Backoff, SessionConfig},
    telemetry::Telemetry,
    workers::Workers,
};
use kiln_controller::registry::{AgentServer, MonotonicClock, Registry, RegistryConfig, succeeded};
use kiln_core::placement::CacheTier;
use kiln_proto::v1::{self, agent_service_server::AgentServiceServer, command, model_source::Runtime};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_tracks_a_real_agent_and_notices_when_it_goes_silent() {
    // A clock the test moves: real time plus an offset.
    let offset = Arc::new(Mutex::new(Duration::ZERO));
    let skew = Arc::clone(&offset);
    let clock = MonotonicClock::from_fn(move || Instant::now() + *skew.lock().unwrap());
    let config = RegistryConfig {
        telemetry_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(100),
        grace: Duration::from_secs(5),
    };
    let registry = Registry::new(config, clock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(AgentServer(registry.clone())))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // The agent, in-process.
    let dir = std::env::temp_dir().join(format!("kiln-registry-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = example_model(5, &[4, 8, 2]);
    let model = dir.join("m.safetensors");
    std::fs::write(&model, &bytes).unwrap();
    let mut gpus = SimulatedGpus::new("gpu-node-1", "h100-80gb:4").unwrap();
    let sim = gpus.handle();
    let telemetry = Telemetry::new("gpu-node-1", &gpus);
    telemetry.tick(&mut gpus, true);
    let cache = Arc::new(WeightCache::open(&dir.join("cache"), 1 << 30, 1 << 30).unwrap());
    let workers = Workers::new(Arc::clone(&cache), Some(sim.clone()), vec![80 << 30; 4]);
    let commands = Arc::new(NodeCommands { cache, telemetry: telemetry.clone(), workers });
    let agent_config = SessionConfig {
        controller: format!("http://{addr}"),
        agent_version: "test".into(),
        worker_endpoint: "127.0.0.1:7443".into(),
        backoff: Backoff::default(),
        register_timeout: Duration::from_secs(5),
    };
    let (stop_agent, stop_rx) = watch::channel(false);
    let agent = tokio::spawn(session::run(agent_config, telemetry.clone(), commands, stop_rx, None));

    eventually("the node registers", || registry.node("gpu-node-1").is_some_and(|n| n.ready)).await;
    let node = registry.node("gpu-node-1").unwrap();
    assert_eq!(node.gpus.len(), 4);
    assert!(node.simulated);
    assert_eq!(node.gpus[0].model, "NVIDIA H100 80GB HBM3");

    // A GPU falls off the bus: the registry knows at once.
    sim.inject_xid(1, 79).unwrap();
    telemetry.tick(&mut gpus, false);
    eventually("GPU 1 unhealthy", || registry.node("gpu-node-1").unwrap().gpus[1].health == v1::GpuHealth::Unhealthy)
        .await;

    // Starting a replica on the unhealthy GPU is refused; on a healthy one it is accepted and becomes ready.
    let start = |gpu: usize, id: &str| v1::Command {
        command_id: id.into(),
        deadline: None,
        action: Some(command::Action::StartWorker(v1::StartWorker {
            replica_id: format!("r-{id}"),
            deployment: "demo/m".into(),
            model: Some(v1::ModelSource {
                uri: format!("file://{}", model.display()),
                digest: digest_of(&bytes),
                runtime: Some(Runtime::Native(v1::NativeRuntime::default())),
                ..Default::default()
            }),
            gpu_indexes: vec![gpu as u32],
            gpu_uuids: vec![node.gpus[gpu].uuid.clone()],
            max_concurrency: 4,
            ..Default::default()
        })),
    };
    let ack = registry.command("gpu-node-1", start(1, "c1"), Duration::from_secs(5)).await.unwrap();
    assert!(!succeeded(&ack) && ack.message.contains("unhealthy"), "{ack:?}");
    let ack = registry.command("gpu-node-1", start(2, "c2"), Duration::from_secs(5)).await.unwrap();
    assert!(succeeded(&ack), "{ack:?}");
    eventually("replica ready", || {
        registry.node("gpu-node-1").unwrap().replicas.get("r-c2").is_some_and(|r| r.phase == v1::WorkerPhase::Ready)
    })
    .await;
    assert!(registry.command("nowhere", start(0, "c3"), Duration::from_secs(1)).await.is_err());

    // A prefetch into host RAM: the cache report that follows reads as placement hints (host RAM and disk copies).
    let prefetch = v1::Command {
        command_id: "c5".into(),
        deadline: None,
        action: Some(command::Action::PrefetchModel(v1::PrefetchModel {
            model_uri: format!("file://{}", model.display()),
            digest: digest_of(&bytes),
            target_tier: v1::CacheTier::Host as i32,
            ..Default::default()
        })),
    };
    let ack = registry.command("gpu-node-1", prefetch, Duration::from_secs(5)).await.unwrap();
    assert!(succeeded(&ack), "{ack:?}");
    eventually("host RAM and disk hints", || {
        let hints = registry.node("gpu-node-1").unwrap().cache_hints();
        [CacheTier::HostRam, CacheTier::Disk].iter().all(|t| hints.iter().any(|h| h.tier == *t))
    })
    .await;

    // Silence past the grace period: the node is lost (the agent is stopped, and the clock moves on).
    assert!(registry.sweep().is_empty());
    stop_agent.send(true).unwrap();
    agent.await.unwrap();
    *offset.lock().unwrap() = Duration::from_secs(6);
    assert_eq!(registry.sweep(), vec!["gpu-node-1".to_owned()]);
    assert!(!registry.node("gpu-node-1").unwrap().ready);
    assert!(registry.command("gpu-node-1", start(0, "c4"), Duration::from_secs(1)).await.is_err());
    std::fs::remove_dir_all(&dir).ok();
}
