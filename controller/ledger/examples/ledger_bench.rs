//! Loopback benchmark: three replicas on raft-engine directories in one process, one thread each, messages over
//! channels; batched append throughput and commit latency (propose at the leader to its acknowledgement, i.e.
//! committed by a quorum with synced writes and applied).
//!
//! `cargo run -p kiln-ledger --release --example ledger_bench -- [dir]` (default dir: `target/ledger-bench`, on
//! the build disk; a tmpfs would make fsync free).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_core::billing::{Quantity, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;
use kiln_ledger::loopback::LoopbackGroup;
use kiln_ledger::{Command, EngineStore, Event, Handled, Node, NodeConfig, Outcome};
use raft::eraftpb::Message;

fn open(dir: &Path, id: u64) -> Node<EngineStore> {
    let store = EngineStore::open(&dir.join(format!("r{id}")), &[1, 2, 3]).expect("open store");
    let cfg = NodeConfig { snapshot_every: 2_000, compact_margin: 200, ..NodeConfig::new(id) };
    Node::open(cfg, store, &slog::Logger::root(slog::Discard, slog::o!())).expect("open node")
}

fn batches(source: &str, count: usize, size: usize) -> Vec<Command> {
    (0..count)
        .map(|b| {
            let records = (0..size)
                .map(|i| {
                    let start = ((b * size + i) as i64) * 1_000;
                    UsageRecord::new(
                        source,
                        &format!("ns-{}", i % 7),
                        Subject::Deployment(format!("d-{}", i % 13)),
                        UsageKind::Serverless(ServerlessPhase::Busy),
                        "H100",
                        Quantity::MicroGpuSeconds(1_000_000),
                        Money::from_nanos(2_500_000),
                        start,
                        start + 1_000,
                    )
                })
                .collect();
            Command::Append { source: source.to_string(), seq: b as u64 + 1, records }
        })
        .collect()
}

enum In {
    Raft(Message),
    Propose(Command, Instant),
    Stop,
}

/// One replica's thread: inbound messages and proposals in, messages to peers and acknowledgement latencies out.
fn replica(
    mut node: Node<EngineStore>,
    inbox: Receiver<In>,
    peers: BTreeMap<u64, Sender<In>>,
    acks: Sender<Duration>,
) -> JoinHandle<Node<EngineStore>> {
    std::thread::spawn(move || {
        let mut waiting: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut last_tick = Instant::now();
        let mut send = |msgs: Vec<Message>| {
            for m in msgs {
                if let Some(p) = peers.get(&m.to) {
                    let _ = p.send(In::Raft(m));
                }
            }
        };
        loop {
            let first = match inbox.recv_timeout(Duration::from_millis(10)) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return node,
            };
            for input in first.into_iter().chain(inbox.try_iter()) {
                match input {
                    In::Raft(m) => {
                        let _ = node.step(m);
                    }
                    In::Propose(cmd, at) => {
                        waiting.insert(node.propose(&cmd), at);
                    }
                    In::Stop => return node,
                }
            }
            if last_tick.elapsed() >= Duration::from_millis(100) {
                node.tick();
                last_tick = Instant::now();
            }
            while node.handle_ready_sending(&mut send).expect("ready") == Handled::Done {}
            for event in node.take_events() {
                if let Event::Proposal { id, result } = event {
                    assert!(matches!(result, Ok(Outcome::Appended { .. })), "proposal {id}: {result:?}");
                    if let Some(at) = waiting.remove(&id) {
                        let _ = acks.send(at.elapsed());
                    }
                }
            }
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, records: usize, elapsed: Duration, mut latencies: Vec<Duration>) {
    latencies.sort();
    println!(
        "{name}: {records} records in {elapsed:.2?} = {:.0} records/s; commit latency p50 {:.2?}, p99 {:.2?}, max {:.2?} ({} batches)",
        records as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        latencies.len()
    );
}

fn records_of(cmds: &[Command]) -> usize {
    cmds.iter().map(|c| if let Command::Append { records, .. } = c { records.len() } else { 0 }).sum()
}

fn main() {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/ledger-bench"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut group = LoopbackGroup::new((1..=3).map(|id| open(&dir, id)));
    let leader = group.elect(100).expect("elect");
    group.pump(100).expect("settle");

    type Inboxes = Vec<(u64, Receiver<In>)>;
    let (senders, inboxes): (BTreeMap<u64, Sender<In>>, Inboxes) = (1..=3u64)
        .map(|id| {
            let (tx, rx) = channel();
            ((id, tx), (id, rx))
        })
        .unzip();
    let (ack_tx, acks) = channel();
    let threads: Vec<JoinHandle<Node<EngineStore>>> = inboxes
        .into_iter()
        .map(|(id, rx)| {
            let node = group.nodes.remove(&id).expect("node");
            replica(node, rx, senders.clone(), ack_tx.clone())
        })
        .collect();
    let to_leader = senders[&leader].clone();

    // Closed loop: 8 batches of 500 in flight.
    let cmds = batches("bench-a", 200, 500);
    let (records, total) = (records_of(&cmds), cmds.len());
    let (mut sent, mut latencies) = (0, Vec::new());
    let start = Instant::now();
    let mut queue = cmds.into_iter();
    while latencies.len() < total {
        while sent - latencies.len() < 8 {
            let Some(cmd) = queue.next() else { break };
            to_leader.send(In::Propose(cmd, Instant::now())).expect("leader alive");
            sent += 1;
        }
        latencies.push(acks.recv().expect("ack"));
    }
    report("throughput (batches of 500, 8 in flight)", records, start.elapsed(), latencies);

    // Open loop at 5,000 records/s: a batch of 50 every 10 ms.
    let cmds = batches("bench-b", 500, 50);
    let (records, total) = (records_of(&cmds), cmds.len());
    let start = Instant::now();
    for (i, cmd) in cmds.into_iter().enumerate() {
        let due = start + Duration::from_millis(10 * i as u64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        to_leader.send(In::Propose(cmd, Instant::now())).expect("leader alive");
    }
    let latencies: Vec<Duration> = (0..total).map(|_| acks.recv().expect("ack")).collect();
    report("latency at 5,000 records/s (a batch of 50 every 10 ms)", records, start.elapsed(), latencies);

    for s in senders.values() {
        let _ = s.send(In::Stop);
    }
    for t in threads {
        let node = t.join().expect("replica thread");
        let st = node.status();
        println!(
            "replica {}: applied {}, log {}..={}, snapshots made {}, raft-engine files {} bytes",
            st.id,
            st.applied,
            st.log.0,
            st.log.1,
            st.snapshots_made,
            dir_bytes(&dir.join(format!("r{}", st.id)))
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}
