//! Three replicas on raft-engine directories, in one process: replication, restart from disk, a replica that was
//! down catching up from a snapshot, and compaction keeping the log bounded.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::Path;

use kiln_core::billing::{Quantity, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;
use kiln_ledger::loopback::LoopbackGroup;
use kiln_ledger::{Command, EngineStore, Event, Node, NodeConfig, Outcome};

fn open(dir: &Path, id: u64) -> Node<EngineStore> {
    let store = EngineStore::open(&dir.join(format!("r{id}")), &[1, 2, 3]).unwrap();
    let cfg = NodeConfig { snapshot_every: 20, compact_margin: 5, ..NodeConfig::new(id) };
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
