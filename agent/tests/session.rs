//! The agent's controller session against a controller on loopback: registration, telemetry, a health event
//! sent at once, idempotent commands, and re-registration after the controller restarts.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use kiln_agent::{
    gpu::sim::SimulatedGpus,
    session::{self, Backoff, CommandHandler, SessionConfig},
    telemetry::Telemetry,
};
use kiln_proto::{
    testing::StubController,
    v1::{AckStatus, Command, EvictModel, Registered, agent_message, command},
};
use tokio::sync::{mpsc, watch};

struct Recorder(Mutex<Vec<String>>);

impl CommandHandler for Recorder {
    async fn handle(&self, command: Command) -> (AckStatus, String) {
        self.0.lock().unwrap().push(command.command_id);
        (AckStatus::Done, "evicted".into())
    }
}

fn evict(id: &str, deadline: Option<SystemTime>) -> Command {
    Command {
        command_id: id.into(),
        deadline: deadline.map(kiln_proto::convert::timestamp),
        action: Some(command::Action::EvictModel(EvictModel { model_uri: "file:///m".into(), ..Default::default() })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_streams_telemetry_sends_health_at_once_dedupes_commands_and_reconnects() {
    let past = SystemTime::now() - Duration::from_secs(60);
    // The first connection's commands, then the later ones'; every agent message comes to `seen`.
    let first = vec![evict("c1", None), evict("c1", None), evict("c2", Some(past))];
    let later = vec![evict("c1", None)];
    let registered = Registered { telemetry_interval_ms: 50, heartbeat_interval_ms: 100, orphaned_replica_ids: vec![] };
    let (controller, mut seen) = StubController::new(registered)
        .commands(move |_, connection| if connection == 0 { first.clone() } else { later.clone() })
        .inbox();
    let (addr, _server) = controller.clone().serve_on_loopback().await.unwrap();

    let mut gpus = SimulatedGpus::new("node-a", "h100-80gb:4").unwrap();
    let handle = gpus.handle();
    let telemetry = Telemetry::new("node-a", &gpus);
    telemetry.tick(&mut gpus, true);
    let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
    let config = SessionConfig {
        controller: format!("http://{addr}"),
        agent_version: "test".into(),
        worker_endpoint: "127.0.0.1:7443".into(),
        backoff: Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(200) },
        register_timeout: Duration::from_secs(5),
    };
    let (stop_agent, agent_stop) = watch::channel(false);
    let (notes_tx, mut notes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(n) = notes.recv().await {
            eprintln!("agent: {n}");
        }
    });
    let agent = tokio::spawn(session::run(config, telemetry.clone(), recorder.clone(), agent_stop, Some(notes_tx)));

    let first = seen.next(|b| matches!(b, agent_message::Body::Register(_))).await.unwrap();
    assert_eq!(first.seq, 1, "Register comes first");
    let Some(agent_message::Body::Register(r)) = first.body else { unreachable!() };
    assert_eq!((r.node_name.as_str(), r.gpus.len()), ("node-a", 4));
    seen.next(|b| matches!(b, agent_message::Body::Telemetry(t) if t.samples.len() == 4)).await.unwrap();
    seen.next(|b| matches!(b, agent_message::Body::Heartbeat(_))).await.unwrap();

    // Acks: c1 done once, then ALREADY_DONE; c2 past its deadline is rejected and never handled.
    let mut acks = Vec::new();
    while acks.len() < 3 {
        let m = seen.next(|b| matches!(b, agent_message::Body::Ack(_))).await.unwrap();
        let Some(agent_message::Body::Ack(a)) = m.body else { unreachable!() };
        acks.push((a.command_id, a.status));
    }
    // Commands run concurrently, so acks come in any order.
    acks.sort();
    let mut want = vec![
        ("c1".to_owned(), AckStatus::Done as i32),
        ("c1".to_owned(), AckStatus::AlreadyDone as i32),
        ("c2".to_owned(), AckStatus::Rejected as i32),
    ];
    want.sort();
    assert_eq!(acks, want);
    assert_eq!(*recorder.0.lock().unwrap(), vec!["c1".to_owned()]);

    // A critical Xid reaches the controller as an event, not with the next registration.
    handle.inject_xid(2, 79).unwrap();
    telemetry.tick(&mut gpus, false);
    let m = seen.next(|b| matches!(b, agent_message::Body::GpuHealth(_))).await.unwrap();
    let Some(agent_message::Body::GpuHealth(h)) = m.body else { unreachable!() };
    assert_eq!((h.gpu_index, h.xid), (2, 79));

    // The controller breaks the stream (as a restart does): the agent registers again, GPU 2 unhealthy, and a
    // command it handled before is not handled again.
    controller.break_streams();
    seen.clear_backlog();
    let m = seen.next(|b| matches!(b, agent_message::Body::Register(_))).await.unwrap();
    assert_eq!(m.seq, 1, "a new stream counts from 1");
    let Some(agent_message::Body::Register(r)) = m.body else { unreachable!() };
    assert_eq!(r.gpus[2].health, kiln_proto::v1::GpuHealth::Unhealthy as i32);
    let m = seen.next(|b| matches!(b, agent_message::Body::Ack(_))).await.unwrap();
    let Some(agent_message::Body::Ack(a)) = m.body else { unreachable!() };
    assert_eq!(a.status, AckStatus::AlreadyDone as i32);
    assert_eq!(recorder.0.lock().unwrap().len(), 1);

    stop_agent.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent).await.unwrap().unwrap();
}
