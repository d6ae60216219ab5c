//! The agent's controller session against a controller on loopback: registration, telemetry, a health event
//! sent at once, idempotent commands, and re-registration after the controller restarts.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use kiln_agent::{
    gpu::sim::SimulatedGpus,
    session::{self, Backoff, CommandHandler, SessionConfig},
    telemetry::Telemetry,
};
use kiln_proto::v1::{
    AckStatus, AgentMessage, Command, ControllerMessage, EvictModel, Registered, agent_message,
    agent_service_server::{AgentService, AgentServiceServer},
    command, controller_message,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::{
    Stream, StreamExt,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tonic::{Request, Response, Status, Streaming};

/// Forwards every agent message to the test; after `Registered` sends the first connection's commands (or the
/// later ones' on reconnection), and breaks every open stream when `drop_streams` fires.
#[derive(Clone)]
struct Controller {
    seen: mpsc::UnboundedSender<AgentMessage>,
    first: Vec<Command>,
    later: Vec<Command>,
    connections: Arc<AtomicUsize>,
    drop_streams: broadcast::Sender<()>,
}

#[tonic::async_trait]
impl AgentService for Controller {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                let _ = seen.send(m);
            }
        });
        let commands = if self.connections.fetch_add(1, Ordering::SeqCst) == 0 { &self.first } else { &self.later };
        let mut out = vec![ControllerMessage {
            body: Some(controller_message::Body::Registered(Registered {
                telemetry_interval_ms: 50,
                heartbeat_interval_ms: 100,
                orphaned_replica_ids: vec![],
            })),
        }];
        out.extend(
            commands.iter().cloned().map(|c| ControllerMessage { body: Some(controller_message::Body::Command(c)) }),
        );
        let mut drop_streams = self.drop_streams.subscribe();
        let (broken_tx, broken) = mpsc::channel(1);
        tokio::spawn(async move {
            let _ = drop_streams.recv().await;
            let _ = broken_tx.send(Err(Status::unavailable("controller restarting"))).await;
        });
        let stream = tokio_stream::iter(out.into_iter().map(Ok)).chain(ReceiverStream::new(broken));
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn serve(controller: Controller, listener: tokio::net::TcpListener) {
    tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(controller))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
        .unwrap();
}

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

/// What the controller received, searched in order; messages not yet asked for are kept.
struct Inbox {
    rx: mpsc::UnboundedReceiver<AgentMessage>,
    backlog: Vec<AgentMessage>,
}

impl Inbox {
    async fn next(&mut self, what: impl Fn(&agent_message::Body) -> bool) -> AgentMessage {
        if let Some(i) = self.backlog.iter().position(|m| m.body.as_ref().is_some_and(&what)) {
            return self.backlog.remove(i);
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let m = self.rx.recv().await.unwrap();
                if m.body.as_ref().is_some_and(&what) {
                    return m;
                }
                self.backlog.push(m);
            }
        })
        .await
        .expect("the expected message within 10 s")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_streams_telemetry_sends_health_at_once_dedupes_commands_and_reconnects() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let mut seen = Inbox { rx: seen, backlog: Vec::new() };
    let past = SystemTime::now() - Duration::from_secs(60);
    let controller = Controller {
        seen: seen_tx,
        first: vec![evict("c1", None), evict("c1", None), evict("c2", Some(past))],
        later: vec![evict("c1", None)],
        connections: Arc::new(AtomicUsize::new(0)),
        drop_streams: broadcast::channel(4).0,
    };
    tokio::spawn(serve(controller.clone(), listener));

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

    let first = seen.next(|b| matches!(b, agent_message::Body::Register(_))).await;
    assert_eq!(first.seq, 1, "Register comes first");
    let Some(agent_message::Body::Register(r)) = first.body else { unreachable!() };
    assert_eq!((r.node_name.as_str(), r.gpus.len()), ("node-a", 4));
    seen.next(|b| matches!(b, agent_message::Body::Telemetry(t) if t.samples.len() == 4)).await;
    seen.next(|b| matches!(b, agent_message::Body::Heartbeat(_))).await;

    // Acks: c1 done once, then ALREADY_DONE; c2 past its deadline is rejected and never handled.
    let mut acks = Vec::new();
    while acks.len() < 3 {
        let m = seen.next(|b| matches!(b, agent_message::Body::Ack(_))).await;
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
    let m = seen.next(|b| matches!(b, agent_message::Body::GpuHealth(_))).await;
    let Some(agent_message::Body::GpuHealth(h)) = m.body else { unreachable!() };
    assert_eq!((h.gpu_index, h.xid), (2, 79));

    // The controller breaks the stream (as a restart does): the agent registers again, GPU 2 unhealthy, and a
    // command it handled before is not handled again.
    controller.drop_streams.send(()).unwrap();
    seen.backlog.clear();
    let m = seen.next(|b| matches!(b, agent_message::Body::Register(_))).await;
    assert_eq!(m.seq, 1, "a new stream counts from 1");
    let Some(agent_message::Body::Register(r)) = m.body else { unreachable!() };
    assert_eq!(r.gpus[2].health, kiln_proto::v1::GpuHealth::Unhealthy as i32);
    let m = seen.next(|b| matches!(b, agent_message::Body::Ack(_))).await;
    let Some(agent_message::Body::Ack(a)) = m.body else { unreachable!() };
    assert_eq!(a.status, AckStatus::AlreadyDone as i32);
    assert_eq!(recorder.0.lock().unwrap().len(), 1);

    stop_agent.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent).await.unwrap().unwrap();
}
