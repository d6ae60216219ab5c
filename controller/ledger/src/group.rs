//! The core's [`Ledger`] on one replica of a running group: what the controller that leads the group writes its
//! usage records to.
//!
//! Owns [`GroupLedger`]: appends are proposed to the local replica and answered once committed by a quorum and
//! applied (so an `Ok` survives the loss of any minority of replicas, this one included); reads run on the
//! replica's driver thread after a ReadIndex round confirmed that it still leads, so they see every acknowledged
//! append. A replica that does not lead refuses both with [`BillingError::Unavailable`]: the controller acts only
//! while its replica leads, and the billing service keeps records pending and retries them.
//!
//! The core's trait is synchronous, so calls block the calling thread for a quorum's synced writes (a few
//! milliseconds) up to the ledger's timeout — as `LocalLedger`'s synced write does.
//!
//! Batches are numbered per `source` ([`Command::Append`]'s `seq`), continuing after the last number the group's
//! state holds for it: read once, through ReadIndex, before the first append of this process.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use kiln_core::billing::{Appended, BillingError, Ledger, LedgerStatus, Query, RecordId, UsageRecord};
use tokio::sync::watch;

use crate::node::ProposalError;
use crate::state::{Command, LedgerState, Outcome, ReadView};
use crate::transport::{Input, ReadFn, ReplicaStatus, Reply};

/// The core's `Ledger` trait on a running [`Replica`](crate::transport::Replica) (see the module docs). Give each
/// writer its own (a clone numbers its batches on its own, from the same starting point).
#[derive(Debug, Clone)]
pub struct GroupLedger {
    inputs: std_mpsc::Sender<Input>,
    status: watch::Receiver<ReplicaStatus>,
    source: String,
    next_seq: Option<u64>,
    timeout: Duration,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BillingError {
    BillingError::Unavailable(format!("{what}: {e}"))
}

impl GroupLedger {
    pub(crate) fn new(
        inputs: std_mpsc::Sender<Input>,
        status: watch::Receiver<ReplicaStatus>,
        source: &str,
        timeout: Duration,
    ) -> Self {
        GroupLedger { inputs, status, source: source.to_string(), next_seq: None, timeout }
    }

    /// Runs `f` on the applied state once a ReadIndex round confirmed this replica leads.
    pub fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LedgerState) -> T + Send + 'static,
    ) -> kiln_core::billing::Result<T> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        let read: ReadFn = Box::new(move |state| {
            let _ = tx.try_send(state.map(f));
        });
        let deadline = Instant::now() + self.timeout;
        self.inputs.send(Input::Read(read, deadline)).map_err(|_| unavailable("read", "the replica stopped"))?;
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(unavailable("read", e)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(unavailable("read", "no answer before the deadline")),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(unavailable("read", "the replica stopped")),
        }
    }

    /// Proposes `cmd` and waits until it is applied (or refused).
    pub fn submit(&self, cmd: Command) -> kiln_core::billing::Result<Outcome> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        let deadline = Instant::now() + self.timeout;
        self.inputs
            .send(Input::Propose(cmd, Reply::Blocking(tx, deadline)))
            .map_err(|_| unavailable("append", "the replica stopped"))?;
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e @ ProposalError::NotLeader { .. })) => Err(unavailable("append", e)),
            // Superseded, or covered by a snapshot: the outcome is unknown; resending the same records is safe.
            Ok(Err(e)) => Err(unavailable("append (resend the same records)", e)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                Err(unavailable("append (resend the same records)", "not applied before the deadline"))
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(unavailable("append", "the replica stopped")),
        }
    }

    fn next_seq(&mut self) -> kiln_core::billing::Result<u64> {
        if let Some(seq) = self.next_seq {
            return Ok(seq);
        }
        let source = self.source.clone();
        let last = self.read(move |state| state.sources().get(&source).map_or(0, |p| p.last_seq))?;
        self.next_seq = Some(last + 1);
        Ok(last + 1)
    }
}

impl Ledger for GroupLedger {
    fn append(&mut self, record: UsageRecord) -> kiln_core::billing::Result<Appended> {
        let mut results = self.append_all(vec![record])?;
        results.pop().ok_or_else(|| BillingError::InvalidInput("empty answer from the ledger".to_string()))
    }

    fn append_all(&mut self, records: Vec<UsageRecord>) -> kiln_core::billing::Result<Vec<Appended>> {
        let seq = self.next_seq()?;
        let result = self.submit(Command::Append { source: self.source.clone(), seq, records });
        // A number is used once proposed: even an unknown outcome may have been applied under it, and a resend
        // of the same records under the next number is deduplicated by their ids.
        self.next_seq = Some(seq + 1);
        match result? {
            Outcome::Appended { results, .. } => Ok(results),
            Outcome::Rejected { error, .. } => Err(error),
            other => Err(BillingError::InvalidInput(format!("unexpected ledger answer {other:?}"))),
        }
    }

    fn get(&self, id: &RecordId) -> kiln_core::billing::Result<Option<UsageRecord>> {
        let id = id.clone();
        self.read(move |state| state.record(&id).cloned())
    }

    fn query(&self, query: &Query) -> kiln_core::billing::Result<Vec<UsageRecord>> {
        let query = query.clone();
        self.read(move |state| ReadView(state).query(&query))?
    }

    fn status(&self) -> Option<LedgerStatus> {
        let s = self.status.borrow().clone();
        Some(LedgerStatus {
            replica: s.node.id,
            term: s.node.term,
            leader: s.node.leader,
            commit_index: s.node.commit,
            applied_index: s.node.applied,
            log: s.node.log,
            snapshot_index: s.node.snapshot_index,
            snapshots: s.node.snapshots_made + s.node.snapshots_installed,
            snapshots_failed: s.node.snapshots_failed,
            records: s.records,
            log_bytes: s.log_bytes,
        })
    }
}
