//! The driver loop's answers to callers, on in-memory stores: proposals at a follower, a superseded proposal,
//! ReadIndex reads.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use kiln_ledger::loopback::LoopbackGroup;
use kiln_ledger::{Command, Event, MemStore, Node, NodeConfig, Outcome, ProposalError};

fn group() -> LoopbackGroup<MemStore> {
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    LoopbackGroup::new((1..=3).map(|id| {
        let disk = MemStore::new_disk(&[1, 2, 3]);
        let cfg = NodeConfig { fixed_election_timeout: Some(10 + id as usize * 3), ..NodeConfig::new(id) };
        Node::open(cfg, MemStore::open(disk), &logger).unwrap()
    }))
}

fn put(key: &str) -> Command {
    Command::Put { key: key.to_string(), value: b"v".to_vec() }
}

fn answer(group: &LoopbackGroup<MemStore>, replica: u64, wanted: u64) -> Option<Event> {
    group.events.iter().find_map(|(r, e)| match e {
        Event::Proposal { id, .. } | Event::Read { id, .. } if *r == replica && *id == wanted => Some(e.clone()),
        _ => None,
    })
}

#[test]
fn a_follower_refuses_proposals_and_reads_at_once_naming_the_leader() {
    let mut g = group();
    let leader = g.elect(100).unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let node = g.nodes.get_mut(&follower).unwrap();
    let p = node.propose(&put("k"));
    let r = node.read_index();
    let events = node.take_events();
    assert_eq!(
        events,
        vec![
            Event::Proposal { id: p, result: Err(ProposalError::NotLeader { leader: Some(leader) }) },
            Event::Read { id: r, result: Err(ProposalError::NotLeader { leader: Some(leader) }) },
        ]
    );
}

#[test]
fn a_read_index_answer_covers_every_write_acknowledged_before_it() {
    let mut g = group();
    let leader = g.elect(100).unwrap();
    let p = g.nodes.get_mut(&leader).unwrap().propose(&put("a"));
    g.pump(100).unwrap();
    assert_eq!(answer(&g, leader, p), Some(Event::Proposal { id: p, result: Ok(Outcome::Put) }));
    let r = g.nodes.get_mut(&leader).unwrap().read_index();
    g.pump(100).unwrap();
    let Some(Event::Read { result: Ok(index), .. }) = answer(&g, leader, r) else { panic!("read answered") };
    let node = &g.nodes[&leader];
    assert!(index >= 2 && node.state().applied_index() >= index);
    assert_eq!(node.state().value("a"), Some(&b"v"[..]));
}

#[test]
fn an_entry_replaced_by_a_new_leader_is_answered_superseded() {
    let mut g = group();
    let old = g.elect(100).unwrap();
    // The old leader takes a proposal, writes it locally, and is cut off before anyone hears of it.
    let mut cut_off = g.nodes.remove(&old).unwrap();
    let lost = cut_off.propose(&put("lost"));
    cut_off.handle_ready().unwrap();
    drop(cut_off.take_messages());
    // The other two elect a leader and commit another entry at the same index.
    let new = g.elect(200).unwrap();
    assert_ne!(new, old);
    let kept = g.nodes.get_mut(&new).unwrap().propose(&put("kept"));
    g.pump(100).unwrap();
    assert_eq!(answer(&g, new, kept), Some(Event::Proposal { id: kept, result: Ok(Outcome::Put) }));
    // Back in the group, the old leader's entry is overwritten and its caller told so.
    g.nodes.insert(old, cut_off);
    for _ in 0..30 {
        g.tick();
        g.pump(100).unwrap();
    }
    assert_eq!(answer(&g, old, lost), Some(Event::Proposal { id: lost, result: Err(ProposalError::Superseded) }));
    let back = &g.nodes[&old];
    assert_eq!(back.state().value("lost"), None);
    assert_eq!(back.state().value("kept"), Some(&b"v"[..]));
    assert_eq!(back.status().pending_proposals, 0, "nothing left hanging");
}

#[test]
fn a_leader_sends_appends_before_its_own_synced_write() {
    use raft::Storage;
    use raft::eraftpb::MessageType;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let disks: Vec<_> = (1..=3).map(|_| MemStore::new_disk(&[1, 2, 3])).collect();
    let mut g = LoopbackGroup::new((1..=3u64).map(|id| {
        let cfg = NodeConfig { fixed_election_timeout: Some(10 + id as usize * 3), ..NodeConfig::new(id) };
        Node::open(cfg, MemStore::open(disks[id as usize - 1].clone()), &logger).unwrap()
    }));
    let leader = g.elect(100).unwrap();
    g.pump(100).unwrap();
    let disk = disks[leader as usize - 1].clone();
    let node = g.nodes.get_mut(&leader).unwrap();
    let before = MemStore::open(disk.clone()).last_index().unwrap();
    node.propose(&put("x"));
    // Each call of `send`: the message types, and the leader's durable last index at that moment.
    let mut sent: Vec<(Vec<MessageType>, u64)> = Vec::new();
    let mut record = |msgs: Vec<raft::eraftpb::Message>| {
        let durable = MemStore::open(disk.clone()).last_index().unwrap();
        sent.push((msgs.iter().map(|m| m.get_msg_type()).collect(), durable));
    };
    node.handle_ready_sending(&mut record).unwrap();
    assert!(node.take_messages().is_empty(), "everything went through `send`");
    let (first_types, durable_then) = &sent[0];
    assert!(first_types.contains(&MessageType::MsgAppend), "appends go out first: {sent:?}");
    assert_eq!(*durable_then, before, "... before the leader's own write");
    assert_eq!(MemStore::open(disk).last_index().unwrap(), before + 1, "then the entry is durable");
}
