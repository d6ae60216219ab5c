//! A group of replicas in one process with instant, lossless delivery: for tests and benchmarks on real stores.
//!
//! Owns [`LoopbackGroup`]: nodes by id, a pump that runs every node's loop and hands messages across until
//! nothing moves, and the answers the nodes gave. No clock and no faults (the simulator, [`sim`](crate::sim), has
//! those); what it adds is running the real [`EngineStore`](crate::storage::EngineStore) under raft, crash by
//! dropping a node and restart by reopening its directory.

use std::collections::BTreeMap;

use crate::node::{Event, Handled, Node};
use crate::storage::LogStore;
use crate::{LedgerError, Result};

/// Replicas wired to each other in memory.
#[derive(Debug)]
pub struct LoopbackGroup<S: LogStore> {
    /// The live replicas by id; remove one to take it down, insert it again to bring it back.
    pub nodes: BTreeMap<u64, Node<S>>,
    /// Answers, with the id of the replica that gave them, in order.
    pub events: Vec<(u64, Event)>,
}

impl<S: LogStore> LoopbackGroup<S> {
    /// A group of these nodes.
    pub fn new(nodes: impl IntoIterator<Item = Node<S>>) -> Self {
        LoopbackGroup { nodes: nodes.into_iter().map(|n| (n.status().id, n)).collect(), events: Vec::new() }
    }

    /// One tick on every replica.
    pub fn tick(&mut self) {
        for n in self.nodes.values_mut() {
            n.tick();
        }
    }

    /// Runs every replica's loop and delivers messages (to live replicas; others are dropped) until nothing is
    /// ready and nothing is in flight, or `max_rounds` rounds ran. Returns the rounds run.
    pub fn pump(&mut self, max_rounds: usize) -> Result<usize> {
        for round in 0..max_rounds {
            let mut moved = false;
            let mut mail = Vec::new();
            for (id, n) in &mut self.nodes {
                while n.handle_ready()? == Handled::Done {
                    moved = true;
                }
                mail.extend(n.take_messages());
                self.events.extend(n.take_events().into_iter().map(|e| (*id, e)));
            }
            for m in mail {
                moved = true;
                let (from, to, snap) = (m.from, m.to, m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot);
                let delivered = match self.nodes.get_mut(&to) {
                    Some(n) => n.step(m).is_ok(),
                    None => false,
                };
                if snap && let Some(leader) = self.nodes.get_mut(&from) {
                    leader.report_snapshot(to, delivered);
                }
            }
            if !moved {
                return Ok(round);
            }
        }
        Ok(max_rounds)
    }

    /// Ticks and pumps until some replica leads, for at most `max_ticks` ticks.
    pub fn elect(&mut self, max_ticks: usize) -> Result<u64> {
        for _ in 0..max_ticks {
            self.tick();
            self.pump(100)?;
            if let Some(l) = self.leader() {
                return Ok(l);
            }
        }
        Err(LedgerError::Storage("no leader elected".to_string()))
    }

    /// The replica that leads, if one does.
    pub fn leader(&self) -> Option<u64> {
        self.nodes.values().find(|n| n.is_leader()).map(|n| n.status().id)
    }
}
