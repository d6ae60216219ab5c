//! Fuzzing of the agent's command handling with proptest: arbitrary bytes decoded as a `kiln.agent.v1.Command`
//! (prost), encoded commands with bytes flipped, and structured commands with hostile fields, each handed to the
//! real [`NodeCommands`] (simulated GPUs, a weight cache in a temp dir, real workers; a `process` runtime's command
//! is replaced by a path that does not exist, so nothing is executed).
//!
//! Properties: decoding never panics; handling never panics, neither in the handler nor in the tasks it spawns
//! (a panic hook counts every panic in the process); a command without an action, a start on GPUs this node does
//! not have, a prefetch of a source this agent cannot fetch get a REJECTED or FAILED ack that says why.
//!
//! CI runs a bounded number of cases per target (128). Run longer locally:
//! `KILN_FUZZ_CASES=20000 cargo test --release -p kiln-agent --test fuzz_commands`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    path::PathBuf,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use kiln_agent::{
    cache::WeightCache, commands::NodeCommands, gpu::sim::SimulatedGpus, model::example_model, session::CommandHandler,
    telemetry::Telemetry, workers::Workers,
};
use kiln_proto::v1::{self, AckStatus, Command, command::Action, model_source::Runtime};
use proptest::{prelude::*, test_runner::TestRunner};
use prost::Message;

/// Cases per property: `KILN_FUZZ_CASES` or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig { cases: cases(128), failure_persistence: None, ..ProptestConfig::default() })
}

/// Panics anywhere in this process (spawned tasks included), counted by a hook installed once.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: LazyLock<()> = LazyLock::new(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
    LazyLock::force(&HOOK);
}

/// One agent: two simulated H100s, a 64 MiB cache, workers; and a valid model file.
struct Node {
    commands: NodeCommands,
    uuids: Vec<String>,
    model_uri: String,
    dir: PathBuf,
}

fn node(name: &str) -> Node {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-commands-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("mlp.safetensors");
    std::fs::write(&model, example_model(7, &[3, 4, 2])).unwrap();
    let mut gpus = SimulatedGpus::new("node-a", "h100-80gb:2").unwrap();
    let sim = gpus.handle();
    let telemetry = Telemetry::new("node-a", &gpus);
    telemetry.tick(&mut gpus, true);
    let uuids = telemetry.read().gpus.iter().map(|g| g.info.uuid.clone()).collect();
    let cache = Arc::new(WeightCache::open(&dir.join("cache"), 64 << 20, 64 << 20).unwrap());
    let workers = Workers::new(Arc::clone(&cache), Some(sim), vec![80 << 30; 2]);
    Node {
        commands: NodeCommands { cache, telemetry, workers },
        uuids,
        model_uri: format!("file://{}", model.display()),
        dir,
    }
}

/// Makes a command safe to run: a process runtime's executable becomes a path that does not exist.
fn defuse(command: &mut Command) {
    if let Some(Action::StartWorker(start)) = &mut command.action
        && let Some(Runtime::Process(p)) = start.model.as_mut().and_then(|m| m.runtime.as_mut())
        && !p.command.is_empty()
    {
        p.command = vec!["/nonexistent/kiln-fuzz-no-such-binary".into()];
        p.startup_timeout_ms = p.startup_timeout_ms.min(200);
        p.termination_grace_ms = p.termination_grace_ms.min(100);
    }
}

/// Handles `command` and checks the ack's class where the command alone decides it; returns the ack's status.
async fn check(node: &Node, mut command: Command) -> AckStatus {
    defuse(&mut command);
    let expected = expected_refusal(node, &command);
    let panics_before = PANICS.load(Ordering::SeqCst);
    let (status, message) = tokio::time::timeout(Duration::from_secs(10), node.commands.handle(command.clone()))
        .await
        .unwrap_or_else(|_| panic!("a command took over 10 s: {command:?}"));
    if matches!(status, AckStatus::Rejected | AckStatus::Failed) {
        assert!(!message.is_empty(), "a refusal says why: {command:?}");
    }
    if let Some(why) = expected {
        assert!(
            matches!(status, AckStatus::Rejected | AckStatus::Failed),
            "{why}, yet {status:?} {message}: {command:?}"
        );
    }
    // Give the tasks a start spawned a moment to run into whatever they run into.
    if matches!(command.action, Some(Action::StartWorker(_))) && status == AckStatus::Accepted {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), panics_before, "a panic while handling {command:?}");
    status
}

/// Why `command` must be refused, when that follows from the command alone.
fn expected_refusal(node: &Node, command: &Command) -> Option<&'static str> {
    match &command.action {
        None => Some("no action"),
        Some(Action::PrefetchModel(p)) if !p.model_uri.starts_with("file://") && p.digest.is_empty() => {
            Some("not a file:// source")
        }
        Some(Action::StartWorker(s)) => {
            let known = s.gpu_indexes.len() == s.gpu_uuids.len()
                && s.gpu_indexes.iter().zip(&s.gpu_uuids).all(|(i, u)| node.uuids.get(*i as usize) == Some(u));
            (!known).then_some("GPUs this node does not have")
        }
        _ => None,
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9/-]{1,12}", "\\PC{0,24}"]
}

fn uri(model_uri: String) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(model_uri),
        1 => Just("file:///nonexistent/m.safetensors".to_owned()),
        1 => Just("file:///etc/hostname".to_owned()),
        1 => Just("file:///".to_owned()),
        1 => Just("file://".to_owned()),
        1 => Just("file:///dev/zero".to_owned()),
        1 => Just("file:///dev/urandom".to_owned()),
        1 => Just("s3://bucket/m.safetensors".to_owned()),
        1 => "\\PC{0,24}",
    ]
}

fn command(node: &Node) -> impl Strategy<Value = Command> + use<> {
    let uuids = node.uuids.clone();
    let gpus = prop_oneof![
        3 => (0u32..2).prop_map(move |i| (vec![i], vec![uuids[i as usize].clone()])),
        1 => (prop::collection::vec(any::<u32>(), 0..3), prop::collection::vec(text(), 0..3)),
    ];
    let tier = prop_oneof![0i32..5, any::<i32>()];
    let replica = prop_oneof![(0u8..6).prop_map(|i| format!("r{i}")), text()];
    let runtime = prop_oneof![
        Just(None),
        any::<u32>().prop_map(|copy_streams| Some(Runtime::Native(v1::NativeRuntime { copy_streams }))),
        (prop::collection::vec(text(), 0..2), any::<u32>(), any::<u32>()).prop_map(|(command, port, timeout)| {
            Some(Runtime::Process(v1::ProcessRuntime {
                command,
                port,
                startup_timeout_ms: timeout,
                ..Default::default()
            }))
        }),
    ];
    let source = (uri(node.model_uri.clone()), any::<u64>(), text(), runtime)
        .prop_map(|(uri, size_bytes, digest, runtime)| v1::ModelSource { uri, size_bytes, digest, runtime });
    let start = (replica.clone(), text(), any::<i64>(), prop::option::of(source), gpus, any::<u64>(), any::<u32>())
        .prop_map(|(replica_id, deployment, generation, model, (gpu_indexes, gpu_uuids), gpu_memory_bytes, max_c)| {
            Action::StartWorker(v1::StartWorker {
                replica_id,
                deployment,
                generation,
                model,
                gpu_indexes,
                gpu_uuids,
                gpu_memory_bytes,
                max_concurrency: max_c,
            })
        });
    let stop = (replica, 0u32..50, any::<bool>()).prop_map(|(replica_id, grace_period_ms, keep_weights_resident)| {
        Action::StopWorker(v1::StopWorker { replica_id, grace_period_ms, keep_weights_resident })
    });
    let prefetch = (uri(node.model_uri.clone()), text(), tier.clone()).prop_map(|(model_uri, digest, target_tier)| {
        Action::PrefetchModel(v1::PrefetchModel { model_uri, digest, target_tier, ..Default::default() })
    });
    let evict = (uri(node.model_uri.clone()), tier, prop::option::of(any::<u32>()))
        .prop_map(|(model_uri, tier, gpu_index)| Action::EvictModel(v1::EvictModel { model_uri, tier, gpu_index }));
    let action = prop_oneof![
        Just(None),
        start.prop_map(Some),
        stop.prop_map(Some),
        prefetch.prop_map(Some),
        evict.prop_map(Some)
    ];
    (text(), action).prop_map(|(command_id, action)| Command { command_id, deadline: None, action })
}

#[test]
fn arbitrary_bytes_decode_and_are_handled() {
    count_panics();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = node("bytes");
    let mut runner = runner();
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..256), |bytes| {
            if let Ok(command) = Command::decode(bytes.as_slice()) {
                rt.block_on(check(&node, command));
            }
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(&node.dir).ok();
}

#[test]
fn structured_commands_are_handled() {
    count_panics();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = node("structured");
    let mut runner = runner();
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    runner
        .run(&command(&node), |command| {
            seen.borrow_mut().insert(rt.block_on(check(&node, command)) as i32);
            Ok(())
        })
        .unwrap();
    // The cases reach both sides: starts accepted, commands refused.
    let seen = seen.into_inner();
    assert!(seen.contains(&(AckStatus::Accepted as i32)) && seen.contains(&(AckStatus::Rejected as i32)), "{seen:?}");
    std::fs::remove_dir_all(&node.dir).ok();
}

#[test]
fn encoded_commands_with_flipped_bytes_are_handled() {
    count_panics();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = node("flipped");
    let mut runner = runner();
    let strategy = (command(&node), prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), any::<usize>());
    runner
        .run(&strategy, |(command, flips, cut)| {
            let mut bytes = command.encode_to_vec();
            if !bytes.is_empty() {
                let len = bytes.len();
                for (at, x) in flips {
                    bytes[at % len] ^= x;
                }
                bytes.truncate(cut % (len + 1));
            }
            if let Ok(command) = Command::decode(bytes.as_slice()) {
                rt.block_on(check(&node, command));
            }
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(&node.dir).ok();
}

/// Found while writing this target (`structured_commands_are_handled` sends these URIs and would time out on it):
/// a model URI naming a device (`file:///dev/zero`) was read to the
/// end — forever, growing a buffer until the agent ran out of memory. A tenant's `ModelDeployment` chooses the URI.
/// Now anything but a regular file is refused, and no more than the cache could hold is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_as_model_source_fails_fast() {
    let node = node("dev-zero");
    for uri in ["file:///dev/zero", "file:///dev/urandom", "file:///"] {
        let prefetch = Command {
            command_id: "c1".into(),
            deadline: None,
            action: Some(Action::PrefetchModel(v1::PrefetchModel { model_uri: uri.into(), ..Default::default() })),
        };
        let (status, message) =
            tokio::time::timeout(Duration::from_secs(5), node.commands.handle(prefetch)).await.expect("fails fast");
        assert_eq!(status, AckStatus::Failed, "{uri}: {message}");
        assert!(message.contains(uri), "{message}");
    }
    std::fs::remove_dir_all(&node.dir).ok();
}
