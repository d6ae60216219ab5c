//! A one-replica ledger group on disk behind the core's [`Ledger`] trait: the drop-in replacement for
//! `MemoryLedger` (what `kiln up` runs; a multi-replica group needs the transport of a later stage).
//!
//! Owns [`LocalLedger`]: a [`Node`] on an [`EngineStore`] driven synchronously — each append is proposed,
//! written with one synced raft-engine write, committed (a group of one is its own quorum) and applied before it
//! returns, so a returned `Ok` survives `kill -9`. Reads come from the applied state with the core's exact
//! semantics ([`ReadView`]). It must not touch anything but its directory.

use std::path::Path;

use kiln_core::billing::{Appended, BillingError, Ledger, Query, RecordId, UsageRecord};

use crate::node::{Event, Node, NodeConfig, ProposalError};
use crate::state::{Command, LedgerState, Outcome, ReadView};
use crate::storage::{EngineStore, LogStore};
use crate::{LedgerError, Result};

/// The replica id of a one-replica group.
const SELF_ID: u64 = 1;

/// A durable ledger: one raft replica on a raft-engine directory.
#[derive(Debug)]
pub struct LocalLedger {
    node: Node<EngineStore>,
    source: String,
    next_seq: u64,
}

impl LocalLedger {
    /// Opens (or creates) the ledger in `dir`; appends are numbered as batches of `source`, continuing after the
    /// last number that source has in the ledger. `cfg` tunes snapshots (its id is ignored: the replica is 1).
    pub fn open(dir: &Path, source: &str, cfg: Option<NodeConfig>) -> Result<Self> {
        let store = EngineStore::open(dir, &[SELF_ID])?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let cfg = NodeConfig { id: SELF_ID, ..cfg.unwrap_or_else(|| NodeConfig::new(SELF_ID)) };
        let mut node = Node::open(cfg, store, &logger)?;
        node.campaign()?;
        for _ in 0..16 {
            node.handle_ready()?;
            if node.is_leader() && node.state().applied_index() >= node.status().commit {
                break;
            }
        }
        if !node.is_leader() {
            return Err(LedgerError::Storage("a one-replica group did not elect itself".to_string()));
        }
        let next_seq = node.state().sources().get(source).map_or(0, |p| p.last_seq) + 1;
        Ok(LocalLedger { node, source: source.to_string(), next_seq })
    }

    /// The applied state.
    pub fn state(&self) -> &LedgerState {
        self.node.state()
    }

    /// The replica (status, store).
    pub fn node(&self) -> &Node<EngineStore> {
        &self.node
    }

    /// Proposes `cmd` and drives the loop until it is applied.
    pub fn submit(&mut self, cmd: &Command) -> Result<Outcome> {
        let id = self.node.propose(cmd);
        for _ in 0..64 {
            for event in self.node.take_events() {
                if let Event::Proposal { id: got, result } = event
                    && got == id
                {
                    return result.map_err(LedgerError::from);
                }
            }
            self.node.handle_ready()?;
        }
        Err(LedgerError::Proposal(ProposalError::Unknown))
    }

    /// Appends a batch through the log: all or nothing, idempotent by record id.
    pub fn append_batch(&mut self, records: Vec<UsageRecord>) -> Result<Outcome> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.submit(&Command::Append { source: self.source.clone(), seq, records })
    }

    /// Bytes of raft-engine files.
    pub fn disk_usage(&self) -> usize {
        self.node.store().used_size()
    }

    /// Lets raft-engine delete log files compaction made obsolete.
    pub fn purge(&self) -> Result<()> {
        self.node.store().purge()
    }

    /// The stored snapshot's index.
    pub fn snapshot_index(&self) -> u64 {
        self.node.store().stored_snapshot().get_metadata().index
    }
}

fn storage_failure(e: LedgerError) -> BillingError {
    // The core's error has no I/O variant; this is the closest that carries the reason.
    BillingError::InvalidInput(format!("ledger storage failed: {e}"))
}

impl Ledger for LocalLedger {
    fn append(&mut self, record: UsageRecord) -> kiln_core::billing::Result<Appended> {
        let mut results = self.append_all(vec![record])?;
        results.pop().ok_or_else(|| BillingError::InvalidInput("empty answer from the ledger".to_string()))
    }

    fn append_all(&mut self, records: Vec<UsageRecord>) -> kiln_core::billing::Result<Vec<Appended>> {
        match self.append_batch(records).map_err(storage_failure)? {
            Outcome::Appended { results, .. } => Ok(results),
            Outcome::Rejected { error, .. } => Err(error),
            other => Err(BillingError::InvalidInput(format!("unexpected ledger answer {other:?}"))),
        }
    }

    fn get(&self, id: &RecordId) -> kiln_core::billing::Result<Option<UsageRecord>> {
        Ok(self.node.state().record(id).cloned())
    }

    fn query(&self, query: &Query) -> kiln_core::billing::Result<Vec<UsageRecord>> {
        ReadView(self.node.state()).query(query)
    }

    fn status(&self) -> Option<kiln_core::billing::LedgerStatus> {
        let s = self.node.status();
        Some(kiln_core::billing::LedgerStatus {
            replica: s.id,
            term: s.term,
            leader: s.leader,
            commit_index: s.commit,
            applied_index: s.applied,
            log: s.log,
            snapshot_index: s.snapshot_index,
            snapshots: s.snapshots_made + s.snapshots_installed,
            snapshots_failed: s.snapshots_failed,
            records: self.node.state().len() as u64,
            log_bytes: self.disk_usage() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::billing::{GroupBy, MemoryLedger, Quantity, ServerlessPhase, Subject, UsageKind};
    use kiln_core::money::Money;

    fn rec(ns: &str, start_ms: i64, nanos: i128) -> UsageRecord {
        UsageRecord::new(
            "meter",
            ns,
            Subject::Deployment("d".into()),
            UsageKind::Serverless(ServerlessPhase::Busy),
            "H100",
            Quantity::MicroGpuSeconds(10),
            Money::from_nanos(nanos),
            start_ms,
            start_ms + 1,
        )
    }

    #[test]
    fn behaves_like_the_memory_ledger_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut memory = MemoryLedger::new();
        let cfg = NodeConfig { snapshot_every: 7, compact_margin: 2, ..NodeConfig::new(SELF_ID) };
        {
            let mut ledger = LocalLedger::open(dir.path(), "meter", Some(cfg.clone())).unwrap();
            for i in 0..30 {
                let r = rec(if i % 2 == 0 { "a" } else { "b" }, i * 3_600_000, i128::from(i) * 10);
                assert_eq!(ledger.append(r.clone()).unwrap(), memory.append(r.clone()).unwrap());
                assert_eq!(ledger.append(r.clone()).unwrap(), Appended::Duplicate, "a retry counts once");
            }
            let mut conflict = rec("a", 0, 0);
            conflict.amount = Money::from_nanos(5);
            assert!(matches!(ledger.append(conflict), Err(BillingError::Conflict { .. })));
            assert!(ledger.snapshot_index() > 0, "snapshots were taken");
            assert!(ledger.node().status().log.0 > 1, "the log was compacted");
        }
        let ledger = LocalLedger::open(dir.path(), "meter", Some(cfg)).unwrap();
        assert_eq!(ledger.query(&Query::all()).unwrap(), memory.query(&Query::all()).unwrap());
        assert_eq!(
            ledger.sum(&Query::all(), GroupBy::Namespace).unwrap(),
            memory.sum(&Query::all(), GroupBy::Namespace).unwrap()
        );
        assert_eq!(ledger.state().sources()["meter"].last_seq, 61, "30 x 2 appends and the refused one");
        assert_eq!(ledger.next_seq, 62, "numbering continues after a restart");
        assert_eq!(ledger.state().sources()["meter"].missing_count(), 0);
    }
}
