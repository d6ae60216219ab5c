//! The generated protocol code works end to end: a controller-side `AgentService` on loopback, an agent-side
//! client opening the `Connect` stream, registering, and receiving a command; plus the wire encoding of commands.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use kiln_proto::{
    testing::StubController,
    v1::{
        self, AgentMessage, Command, Register, Registered, StartWorker, agent_message,
        agent_service_client::AgentServiceClient, command, controller_message,
    },
};
use prost::Message;
use tokio_stream::StreamExt;

/// Answers `Register` with `Registered`, then sends one `StartWorker` per GPU the agent reported and ends.
fn controller() -> StubController {
    let registered =
        Registered { telemetry_interval_ms: 1000, heartbeat_interval_ms: 5000, orphaned_replica_ids: vec![] };
    StubController::new(registered)
        .commands(|register, _| {
            register
                .gpus
                .iter()
                .map(|gpu| Command {
                    command_id: format!("cmd-{}", gpu.index),
                    deadline: None,
                    action: Some(command::Action::StartWorker(StartWorker {
                        replica_id: format!("{}-r{}", register.node_name, gpu.index),
                        gpu_indexes: vec![gpu.index],
                        gpu_uuids: vec![gpu.uuid.clone()],
                        ..Default::default()
                    })),
                })
                .collect()
        })
        .end_after_commands()
}

fn register(node: &str, gpus: u32) -> AgentMessage {
    AgentMessage {
        seq: 1,
        body: Some(agent_message::Body::Register(Register {
            node_name: node.to_owned(),
            agent_version: "0.1.0".to_owned(),
            simulated: true,
            gpus: (0..gpus)
                .map(|i| v1::Gpu {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    model: "NVIDIA H100 80GB HBM3".to_owned(),
                    memory_total_bytes: 80 << 30,
                    health: v1::GpuHealth::Healthy.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
    }
}

/// Serves the controller on an ephemeral loopback port; returns a connected client and the server task.
async fn serve_on_loopback()
-> (AgentServiceClient<tonic::transport::Channel>, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let (addr, server) = controller().serve_on_loopback().await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    (AgentServiceClient::new(channel), server)
}

#[tokio::test]
async fn agent_registers_and_receives_commands_over_connect() {
    let (mut client, server) = serve_on_loopback().await;
    let outbound = tokio_stream::iter(vec![register("node-a", 2)]);
    let mut inbound = client.connect(outbound).await.unwrap().into_inner();

    let mut received = Vec::new();
    while let Some(message) = inbound.next().await {
        received.push(message.unwrap().body.unwrap());
    }
    assert_eq!(received.len(), 3, "Registered then one StartWorker per GPU: {received:?}");
    assert!(matches!(&received[0], controller_message::Body::Registered(r) if r.telemetry_interval_ms == 1000));
    let ids: Vec<(String, String)> = received[1..]
        .iter()
        .map(|body| match body {
            controller_message::Body::Command(Command {
                command_id,
                action: Some(command::Action::StartWorker(start)),
                ..
            }) => (command_id.clone(), start.replica_id.clone()),
            other => panic!("expected StartWorker, got {other:?}"),
        })
        .collect();
    assert_eq!(ids, [("cmd-0".into(), "node-a-r0".into()), ("cmd-1".into(), "node-a-r1".into())]);
    server.abort();
}

#[tokio::test]
async fn a_stream_that_does_not_start_with_register_is_refused() {
    let (mut client, server) = serve_on_loopback().await;
    let heartbeat = AgentMessage { seq: 1, body: Some(agent_message::Body::Heartbeat(v1::Heartbeat::default())) };
    let status = client.connect(tokio_stream::iter(vec![heartbeat])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    server.abort();
}

#[test]
fn commands_survive_the_wire_with_their_idempotency_key() {
    let command = Command {
        command_id: "7b0c1c9e-2f4d-4e0b-9a55-0d8e8f6f2a10".to_owned(),
        deadline: Some(prost_types::Timestamp { seconds: 1_790_000_000, nanos: 0 }),
        action: Some(command::Action::EvictModel(v1::EvictModel {
            model_uri: "s3://models/llama".to_owned(),
            tier: v1::CacheTier::Gpu.into(),
            gpu_index: Some(3),
        })),
    };
    let bytes = command.encode_to_vec();
    let decoded = Command::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded, command);
    // An explicit GPU index of 0 is distinguishable from "every GPU" (field presence).
    let all_gpus = v1::EvictModel { gpu_index: None, ..Default::default() };
    let gpu_zero = v1::EvictModel { gpu_index: Some(0), ..Default::default() };
    assert_ne!(all_gpus.encode_to_vec(), gpu_zero.encode_to_vec());
}
