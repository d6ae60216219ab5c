//! Loopback benchmark: three replicas on raft-engine directories in one process, batched appends, commit latency.
//!
//! `cargo run -p kiln-ledger --release --example ledger_bench -- [dir]` (default dir: `target/ledger-bench`, on
//! the build disk; a tmpfs would make fsync free). One thread drives all three replicas, so each round's synced
//! writes (leader and followers) happen one after another: figures are a floor for a deployment where each replica
//! writes on its own disk in parallel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_core::billing::{Quantity, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;
use kiln_ledger::loopback::LoopbackGroup;
use kiln_ledger::{Command, EngineStore, Event, Node, NodeConfig, Outcome};

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

struct Run {
    records: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Keeps `in_flight` batches proposed at the leader until all are acknowledged.
fn run(group: &mut LoopbackGroup<EngineStore>, cmds: Vec<Command>, in_flight: usize) -> Run {
    let leader = group.leader().expect("leader");
    let records: usize =
        cmds.iter().map(|c| if let Command::Append { records, .. } = c { records.len() } else { 0 }).sum();
    let mut queue = cmds.into_iter();
    let mut waiting: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut latencies = Vec::new();
    let start = Instant::now();
    loop {
        while waiting.len() < in_flight {
            let Some(cmd) = queue.next() else { break };
            let id = group.nodes.get_mut(&leader).expect("leader").propose(&cmd);
            waiting.insert(id, Instant::now());
        }
        if waiting.is_empty() {
            break;
        }
        group.pump(1).expect("pump");
        for (replica, event) in std::mem::take(&mut group.events) {
            if let (true, Event::Proposal { id, result }) = (replica == leader, event) {
                assert!(matches!(result, Ok(Outcome::Appended { .. })), "batch {id}: {result:?}");
                if let Some(t) = waiting.remove(&id) {
                    latencies.push(t.elapsed());
                }
            }
        }
    }
    Run { records, elapsed: start.elapsed(), latencies }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut r: Run) {
    r.latencies.sort();
    println!(
        "{name}: {} records in {:.2?} = {:.0} records/s; commit latency p50 {:.2?}, p99 {:.2?}, max {:.2?} ({} batches)",
        r.records,
        r.elapsed,
        r.records as f64 / r.elapsed.as_secs_f64(),
        percentile(&r.latencies, 0.5),
        percentile(&r.latencies, 0.99),
        r.latencies.last().copied().unwrap_or_default(),
        r.latencies.len()
    );
}

fn main() {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/ledger-bench"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut group = LoopbackGroup::new((1..=3).map(|id| open(&dir, id)));
    group.elect(100).expect("elect");
    group.pump(100).expect("settle");
    report("throughput (batches of 500, 8 in flight)", run(&mut group, batches("bench-a", 200, 500), 8));
    report("latency (batches of 50, 1 in flight)", run(&mut group, batches("bench-b", 300, 50), 1));
    let st = group.nodes[&group.leader().expect("leader")].status();
    println!(
        "leader: applied {}, log {}..={}, snapshots made {}, raft-engine bytes {}",
        st.applied,
        st.log.0,
        st.log.1,
        st.snapshots_made,
        group.nodes[&st.id].store().used_size()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
