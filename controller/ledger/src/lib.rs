//! Kiln's replicated usage ledger: the billing ledger as a raft state machine (tikv/raft-rs) with its log on
//! raft-engine, so that no acknowledged usage record is lost or counted twice across failovers.
//!
//! The split follows raft-rs's own:
//! - [`state`] — the replicated state machine, pure: commands, records by id, per-source sequence numbers,
//!   running totals, the applied index, deterministic snapshots.
//! - [`storage`] — the raft log: [`storage::LogStore`] on raft-engine ([`storage::EngineStore`]) and in memory
//!   with crash semantics ([`storage::MemStore`], for the simulator).
//! - [`node`] — the raft driver loop, independent of transport and clock: tick, step, propose, ReadIndex, the
//!   ready handling in raft-rs's required order, snapshots and compaction.
//! - [`local`] — [`local::LocalLedger`]: a one-replica group on disk behind the core's
//!   [`Ledger`](kiln_core::billing::Ledger) trait, the drop-in replacement for `MemoryLedger`.
//! - [`loopback`] — replicas wired together in one process, for tests and benchmarks on raft-engine.
//! - [`transport`] — the ledger between processes: a replica driven by a real clock with raft messages over gRPC
//!   (`kiln.ledger.v1.LedgerService`), `Append` answered once applied, and the client that follows redirects. The
//!   `ledger-node` binary runs one replica with it.
//! - [`group`] — [`group::GroupLedger`]: the core's `Ledger` on one replica of a running group (appends committed
//!   by a quorum, reads through ReadIndex), what a controller that leads the group bills into.
//! - [`sim`] — a deterministic, seeded simulator of 3 or 5 replicas with a faulty network and crashes at every step
//!   of the loop, and the checker of the ledger's invariants.
//!
//! # Using it in place of `MemoryLedger`
//! ```
//! use kiln_core::billing::{Appended, Ledger, Quantity, Query, ServerlessPhase, Subject, UsageKind, UsageRecord};
//! use kiln_core::money::Money;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let mut ledger = kiln_ledger::LocalLedger::open(dir.path(), "meter", None).unwrap();
//! let record = UsageRecord::new(
//!     "meter", "team-a", Subject::Deployment("llama".into()), UsageKind::Serverless(ServerlessPhase::Busy),
//!     "H100", Quantity::MicroGpuSeconds(1_000_000), Money::from_nanos(2_500_000), 0, 1_000,
//! );
//! assert_eq!(ledger.append(record.clone()).unwrap(), Appended::New); // committed and synced on return
//! assert_eq!(ledger.append(record).unwrap(), Appended::Duplicate); // a retry counts once
//! assert_eq!(ledger.total(&Query::namespace("team-a")).unwrap().amount, Money::from_nanos(2_500_000));
//! ```
//!
//! What it must not touch: Kubernetes or HTTP. Only [`transport`] (and the binary) know an async runtime, sockets
//! and a real clock; everything else is driven by its caller.

mod codec;
pub mod group;
pub mod local;
pub mod loopback;
pub mod node;
pub mod sim;
pub mod state;
pub mod storage;
pub mod transport;

pub use group::GroupLedger;
pub use local::LocalLedger;
pub use node::{
    CrashPoint, Event, Handled, Node, NodeConfig, NodeStatus, ProposalError, ProposalId, ReadId, SnapshotJob,
};
pub use state::{Command, Frozen, LedgerState, Outcome, ReadView, SeqStatus, SourceProgress, TotalsKey};
pub use storage::{EngineStore, LogStore, MemDisk, MemStore, Persist, SnapshotFiles};

/// Errors of the replicated ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// raft refused an operation or found its storage broken.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// raft-engine failed to read or write.
    #[error("raft-engine: {0}")]
    Engine(#[from] raft_engine::Error),
    /// The store's directory could not be created.
    #[error("log directory: {0}")]
    Io(#[from] std::io::Error),
    /// The store's contents break an invariant (an append outside the log, a snapshot above the commit index).
    #[error("log storage: {0}")]
    Storage(String),
    /// Bytes that should be a command or a snapshot do not decode.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// An entry was applied out of log order.
    #[error("entry {got} applied out of order: expected {expected}")]
    OutOfOrder {
        /// The next index the state expects.
        expected: u64,
        /// The index offered.
        got: u64,
    },
    /// Billing arithmetic failed while rebuilding totals.
    #[error(transparent)]
    Billing(#[from] kiln_core::billing::BillingError),
    /// A proposal or read was not served.
    #[error(transparent)]
    Proposal(#[from] ProposalError),
}

/// Result of ledger operations.
pub type Result<T, E = LedgerError> = std::result::Result<T, E>;
