//! Three replicas on raft-engine directories, in one process: replication, restart from disk, a replica that was
//! down catching up from a snapshot, and compaction keeping the log bounded.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::Path;

use kiln_core::billing::{Quantity, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;
use kiln_ledger::loopback::LoopbackGroup;
use kiln_ledger::{Command, EngineStore, Event, Node, NodeConfig, Outcome};

fn open(dir: &Path, id: u64) -> Node<EngineStore> {
    open_with(dir, id, false)
}

/// Replica `id` in `dir`, building its snapshots off the loop when `background`.
fn open_with(dir: &Path, id: u64, background: bool) -> Node<EngineStore> {
    let store = EngineStore::open(&dir.join(format!("r{id}")), &[1, 2, 3]).unwrap();
    let cfg =
        NodeConfig { snapshot_every: 20, compact_margin: 5, background_snapshots: background, ..NodeConfig::new(id) };
    Node::open(cfg, store, &slog::Logger::root(slog::Discard, slog::o!())).unwrap()
}

fn batch(seq: u64) -> Command {
    let records = (0..5)
        .map(|i| {
            let start = (seq as i64 * 5 + i) * 60_000;
            UsageRecord::new(
                "meter",
                "ns",
                Subject::Deployment("d".into()),
                UsageKind::Serverless(ServerlessPhase::Busy),
                "H100",
                Quantity::MicroGpuSeconds(1_000),
                Money::from_nanos(10),
                start,
                start + 60_000,
            )
        })
        .collect();
    Command::Append { source: "meter".into(), seq, records }
}

/// Proposes at the leader and pumps until the answer comes; returns the outcome.
fn append(group: &mut LoopbackGroup<EngineStore>, seq: u64) -> Outcome {
    let leader = group.leader().expect("a leader");
    let id = group.nodes.get_mut(&leader).unwrap().propose(&batch(seq));
    for _ in 0..10 {
        group.pump(100).unwrap();
        let found = group
            .events
            .iter()
            .position(|(r, e)| *r == leader && matches!(e, Event::Proposal { id: p, .. } if *p == id));
        if let Some(pos) = found {
            let (_, Event::Proposal { result, .. }) = group.events.remove(pos) else { unreachable!() };
            return result.expect("applied");
        }
    }
    panic!("no answer for batch {seq}");
}

#[test]
fn replicate_restart_and_catch_up_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = LoopbackGroup::new((1..=3).map(|id| open(dir.path(), id)));
    group.elect(100).unwrap();
    for seq in 1..=10 {
        assert!(matches!(append(&mut group, seq), Outcome::Appended { .. }));
    }
    // Take a follower down for a while; the group goes on and compacts past it.
    let leader = group.leader().unwrap();
    let down = (1..=3).find(|id| *id != leader).unwrap();
    drop(group.nodes.remove(&down));
    for seq in 11..=60 {
        assert!(matches!(append(&mut group, seq), Outcome::Appended { .. }));
    }
    let st = group.nodes[&leader].status();
    assert!(st.snapshot_index >= 40 && st.log.0 > 30, "the leader snapshotted and compacted: {st:?}");

    // It comes back from its directory and catches up from a snapshot.
    group.nodes.insert(down, open(dir.path(), down));
    for _ in 0..50 {
        group.tick();
        group.pump(100).unwrap();
    }
    let back = group.nodes[&down].status();
    assert!(back.snapshots_installed >= 1, "caught up from a snapshot: {back:?}");
    assert_eq!(back.applied, group.nodes[&leader].status().applied);
    assert_eq!(group.nodes[&down].state().snapshot(), group.nodes[&leader].state().snapshot());
    assert_eq!(group.nodes[&down].state().len(), 300);

    // A resend after all this is a duplicate; then everyone restarts from disk and agrees.
    let Outcome::Appended { results, .. } = append(&mut group, 7) else { panic!("appended") };
    assert!(results.iter().all(|r| *r == kiln_core::billing::Appended::Duplicate));
    let applied = group.nodes[&leader].status().applied;
    drop(group);
    let mut group = LoopbackGroup::new((1..=3).map(|id| open(dir.path(), id)));
    group.elect(100).unwrap();
    group.pump(100).unwrap();
    let states: Vec<Vec<u8>> = group.nodes.values().map(|n| n.state().snapshot()).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "identical after restart");
    for n in group.nodes.values() {
        assert!(n.status().applied >= applied, "nothing applied was lost: {:?}", n.status());
        assert_eq!(n.state().len(), 300);
    }
}

#[test]
fn log_stays_bounded_under_sustained_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = LoopbackGroup::new((1..=3).map(|id| open(dir.path(), id)));
    group.elect(100).unwrap();
    for seq in 1..=150 {
        append(&mut group, seq);
    }
    for n in group.nodes.values() {
        let st = n.status();
        assert!(st.log.1 - st.log.0 < 40, "at most snapshot_every + margin entries kept: {st:?}");
        assert_eq!(n.state().len(), 750);
    }
}

/// Snapshots built off the loop: the state goes on applying while a job is out, one job at a time, the job's
/// snapshot is exactly the state at its index, finishing it compacts the log and leaves one snapshot file, a
/// replayed (stale) result is refused, and a restart reads the state back from the file.
#[test]
fn snapshots_built_off_the_loop_are_exact_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let background = |id: u64| open_with(dir.path(), id, true);
    let mut group = LoopbackGroup::new((1..=3).map(background));
    group.elect(100).unwrap();
    let mut seq = 0;
    while group.nodes.values().any(|n| n.state().applied_index() < 20) {
        seq += 1;
        append(&mut group, seq);
    }
    let mut jobs: Vec<(u64, kiln_ledger::SnapshotJob, Vec<u8>)> = Vec::new();
    for (id, n) in group.nodes.iter_mut() {
        let job = n.take_snapshot_job().expect("a snapshot is due after 20 entries");
        assert!(n.take_snapshot_job().is_none(), "one job at a time");
        let expected = n.state().snapshot();
        jobs.push((*id, job, expected));
    }
    // The state goes on applying; no new job while one is out, and the log is not compacted yet.
    for _ in 0..30 {
        seq += 1;
        append(&mut group, seq);
    }
    for (id, n) in group.nodes.iter_mut() {
        assert!(n.take_snapshot_job().is_none(), "replica {id}: a job is still out");
        assert_eq!(n.status().log.0, 1, "replica {id}: nothing compacted before the job finishes");
    }
    for (id, job, expected) in jobs {
        let snap = job.build().unwrap();
        assert_eq!(&snap.data[..], &expected[..], "replica {id}: the job encodes the state frozen at its index");
        let n = group.nodes.get_mut(&id).unwrap();
        assert!(n.finish_snapshot(snap.clone()).unwrap());
        assert!(!n.finish_snapshot(snap).unwrap(), "a result at or below the stored snapshot is refused");
        let st = n.status();
        assert_eq!(st.snapshot_index, job.index());
        assert_eq!(st.log.0, job.index() + 1 - 5, "compacted up to the margin");
        let files: Vec<_> = std::fs::read_dir(dir.path().join(format!("r{id}/snapshots"))).unwrap().collect();
        assert_eq!(files.len(), 1, "replica {id}: one snapshot file");
    }
    // The next threshold makes a new job.
    for _ in 0..25 {
        seq += 1;
        append(&mut group, seq);
    }
    assert!(group.nodes.values_mut().all(|n| n.take_snapshot_job().is_some()));
    let before: Vec<Vec<u8>> = group.nodes.values().map(|n| n.state().snapshot()).collect();
    drop(group);
    let group = LoopbackGroup::new((1..=3).map(background));
    for (n, before) in group.nodes.values().zip(before) {
        let restored = n.state().applied_index();
        assert!(restored >= 20 && n.status().snapshot_index == restored, "restored from the snapshot file");
        assert!(before.len() > n.state().snapshot().len(), "entries after the snapshot come back from the log");
    }
}

/// A snapshot build that failed (a full disk) is counted, and no new job is made until another `snapshot_every`
/// entries are applied: the node does not spin on a disk that cannot take it.
#[test]
fn a_failed_snapshot_build_is_counted_and_retried_later() {
    let dir = tempfile::tempdir().unwrap();
    let background = |id: u64| open_with(dir.path(), id, true);
    let mut group = LoopbackGroup::new((1..=3).map(background));
    let leader = group.elect(100).unwrap();
    let mut seq = 0;
    while group.nodes[&leader].state().applied_index() < 20 {
        seq += 1;
        append(&mut group, seq);
    }
    let node = group.nodes.get_mut(&leader).unwrap();
    let job = node.take_snapshot_job().expect("due");
    node.snapshot_failed(job.index());
    assert_eq!(node.status().snapshots_failed, 1);
    assert_eq!(node.status().snapshot_index, 0, "nothing stored");
    let failed_at = job.index();
    while group.nodes[&leader].state().applied_index() < failed_at + 19 {
        seq += 1;
        append(&mut group, seq);
        assert!(group.nodes.get_mut(&leader).unwrap().take_snapshot_job().is_none(), "no retry before 20 more entries");
    }
    while group.nodes[&leader].state().applied_index() < failed_at + 20 {
        seq += 1;
        append(&mut group, seq);
    }
    let node = group.nodes.get_mut(&leader).unwrap();
    let job = node.take_snapshot_job().expect("retried after another 20 entries");
    assert!(node.finish_snapshot(job.build().unwrap()).unwrap());
    assert_eq!(node.status().snapshots_failed, 1);
}
