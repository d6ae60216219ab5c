//! The raft driver loop: one replica of the ledger, independent of the transport and the clock.
//!
//! Owns [`Node`]: a `raft::RawNode` over a [`LogStore`], the [`LedgerState`] it applies committed entries to, the
//! proposals and reads waiting for an answer, and the snapshot/compaction policy. The caller owns time and the
//! network: it calls [`Node::tick`] on a fixed interval, hands inbound messages to [`Node::step`], calls
//! [`Node::handle_ready`] after either, and sends what [`Node::take_messages`] returns. Answers come back as
//! [`Event`]s from [`Node::take_events`]. It must not block, sleep, read a clock or open a socket.
//!
//! # The loop, in the order raft-rs requires ([`Node::handle_ready`])
//! 1. send `messages` (a leader may send before its own write);
//! 2. persist the snapshot, the entries and the hard state in ONE synced write ([`LogStore::persist`]); a received
//!    snapshot also replaces the state machine;
//! 3. send `persisted_messages` (votes and append answers only after they are durable);
//! 4. apply `committed_entries` in order (the applied index lives in the state, and goes to disk only inside a
//!    snapshot, which is never above the durable commit index);
//! 5. `advance()`; then the `LightReady`: record its commit index, send its messages, apply its committed entries;
//! 6. `advance_apply()`; then snapshot and compact when `snapshot_every` entries were applied since the last one.
//!
//! # Snapshots off the loop
//! Encoding a large state and writing it takes time in proportion to the whole ledger; done inside the loop it
//! would hold every proposal up for as long. With [`NodeConfig::background_snapshots`] the loop only freezes the
//! state (O(1): [`LedgerState::freeze`]) into a [`SnapshotJob`]; the caller takes it ([`Node::take_snapshot_job`]),
//! builds it anywhere ([`SnapshotJob::build`]: encode, and write the data where the store keeps it), and hands the
//! result back ([`Node::finish_snapshot`]), which records it (a small synced write) and compacts. One job is out at
//! a time; a job overtaken by a snapshot received from the leader is dropped; a job that failed is forgotten and a
//! new one made at the next threshold ([`Node::snapshot_failed`]). Until a job is finished the log is simply not
//! compacted: nothing depends on it.
//!
//! # Answers are never left hanging
//! A proposal is matched to its caller by the (term, index) its entry got. It is answered when that index is
//! applied: with the [`Outcome`] if the entry there has the same term, [`ProposalError::Superseded`] if another
//! term's entry replaced it, [`ProposalError::Unknown`] if a received snapshot covered it (the caller resends with
//! the same record ids, which the state deduplicates). A proposal this node cannot take (it is not the leader) is
//! answered at once with [`ProposalError::NotLeader`]. Reads that must be current go through ReadIndex
//! ([`Node::read_index`]); they are answered when the state has applied up to the read index, and failed if the
//! node stops leading first.
//!
//! Restart is [`Node::open`] on the same store: the state is restored from the stored snapshot, and raft
//! re-delivers the committed entries after it.

use std::collections::BTreeMap;

use raft::eraftpb::{ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};

use crate::state::{Command, Frozen, LedgerState, Outcome};
use crate::storage::{LogStore, Persist, SnapshotFiles};
use crate::{LedgerError, Result};

/// A proposal's handle, unique within one [`Node`] (process lifetime).
pub type ProposalId = u64;
/// A read's handle, unique within one [`Node`].
pub type ReadId = u64;

/// How a replica runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This replica's raft id (non-zero).
    pub id: u64,
    /// Ticks without a leader before an election (randomized up to twice this by raft).
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_tick: usize,
    /// A fixed election timeout in ticks (at least `election_tick`) instead of raft's random one in
    /// `election_tick..2 * election_tick`, which comes from a thread-local RNG: the simulator draws it from its
    /// seed so that runs repeat exactly.
    pub fixed_election_timeout: Option<usize>,
    /// Take a snapshot (and compact the log) after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept before a snapshot's index when compacting, so that a follower slightly behind catches up from
    /// the log instead of a whole snapshot.
    pub compact_margin: u64,
    /// Largest append message, bytes.
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// Hand due snapshots to the caller as [`SnapshotJob`]s instead of building them inside the loop.
    pub background_snapshots: bool,
}

impl NodeConfig {
    /// Defaults for replica `id`: election after 10 ticks, heartbeat every 3, a snapshot every 1000 entries.
    pub fn new(id: u64) -> Self {
        NodeConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 3,
            fixed_election_timeout: None,
            snapshot_every: 1000,
            compact_margin: 100,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            background_snapshots: false,
        }
    }
}

/// Why a proposal or a read did not succeed. The caller may retry (with the same record ids) at the leader.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    /// This replica does not lead; `leader` is the one it knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader, if any.
        leader: Option<u64>,
    },
    /// The entry was replaced by another term's entry at the same index: it was never applied.
    #[error("the proposal was superseded by a new leader's log")]
    Superseded,
    /// A snapshot from the leader covered the entry: it may or may not have been applied. Resend with the same
    /// record ids; the ledger deduplicates them.
    #[error("outcome unknown (covered by a received snapshot); resend with the same ids")]
    Unknown,
    /// A read was asked before this leader committed an entry of its term: ask again shortly.
    #[error("the leader is not ready to serve reads yet")]
    NotReady,
}

/// An answer for a caller of [`Node::propose`] or [`Node::read_index`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A proposal's answer.
    Proposal {
        /// The handle [`Node::propose`] returned.
        id: ProposalId,
        /// What applying it did, or why it was not applied.
        result: std::result::Result<Outcome, ProposalError>,
    },
    /// A read's answer: on `Ok(index)` the local state has applied at least up to the read index `index`, so
    /// reading it now is linearizable.
    Read {
        /// The handle [`Node::read_index`] returned.
        id: ReadId,
        /// The read index, or why there is none.
        result: std::result::Result<u64, ProposalError>,
    },
}

/// Where [`Node::handle_ready_until`] stops, to simulate a crash at each step of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CrashPoint {
    /// After sending `messages`, before the synced write.
    BeforeSyncedWrite,
    /// After the synced write, before sending `persisted_messages`.
    AfterSyncedWrite,
    /// After sending `persisted_messages`, before applying.
    BeforeApply,
    /// After applying the ready's committed entries, before `advance`.
    AfterApply,
}

impl CrashPoint {
    /// Every crash point, in loop order.
    pub const ALL: [CrashPoint; 4] =
        [CrashPoint::BeforeSyncedWrite, CrashPoint::AfterSyncedWrite, CrashPoint::BeforeApply, CrashPoint::AfterApply];
}

/// What a call of the loop did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Raft had nothing ready.
    Idle,
    /// One ready was handled completely.
    Done,
    /// The loop stopped at the crash point: the node must be dropped and reopened from its store.
    Crashed,
}

/// A snapshot that is due: the state frozen at an applied index, to be built off the driver loop.
#[derive(Debug)]
pub struct SnapshotJob {
    frozen: Frozen,
    conf_state: ConfState,
    files: Option<SnapshotFiles>,
}

impl SnapshotJob {
    /// The applied index the snapshot is taken at.
    pub fn index(&self) -> u64 {
        self.frozen.applied_index()
    }

    /// Encodes the snapshot and, for a store that keeps snapshot data in files, writes it there (synced). The
    /// expensive part of a snapshot: call it on any thread, then give the result to [`Node::finish_snapshot`].
    pub fn build(&self) -> Result<Snapshot> {
        let mut snap = Snapshot { data: self.frozen.encode().into(), ..Snapshot::default() };
        let meta = snap.mut_metadata();
        meta.index = self.frozen.applied_index();
        meta.term = self.frozen.applied_term();
        meta.set_conf_state(self.conf_state.clone());
        if let Some(files) = &self.files {
            files.write(&snap)?;
        }
        Ok(snap)
    }
}

/// A replica's health, for metrics and status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// This replica.
    pub id: u64,
    /// Current term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<u64>,
    /// True when this replica leads.
    pub is_leader: bool,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// First and last index of the stored log.
    pub log: (u64, u64),
    /// Index of the stored snapshot.
    pub snapshot_index: u64,
    /// Snapshots this process made.
    pub snapshots_made: u64,
    /// Snapshots this process received from a leader and installed.
    pub snapshots_installed: u64,
    /// Snapshot builds that failed in this process ([`Node::snapshot_failed`]).
    pub snapshots_failed: u64,
    /// Proposals waiting for their entry to be applied.
    pub pending_proposals: usize,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    id: ProposalId,
    term: u64,
}

/// One replica: raft, the store, the state machine and the callers waiting on them.
pub struct Node<S: LogStore> {
    raw: RawNode<S>,
    cfg: NodeConfig,
    state: LedgerState,
    /// Proposals by the index their entry got.
    pending: BTreeMap<u64, Pending>,
    /// Reads by id, with their read index once raft gave it.
    reads: BTreeMap<ReadId, Option<u64>>,
    next_id: u64,
    outbox: Vec<Message>,
    events: Vec<Event>,
    snapshot_index: u64,
    snapshots_made: u64,
    snapshots_installed: u64,
    snapshots_failed: u64,
    /// A due snapshot not yet taken by the caller.
    snapshot_due: Option<SnapshotJob>,
    /// The index of the snapshot job taken and not yet finished or failed.
    snapshot_building: Option<u64>,
    /// After a failed build, no new job before this applied index (a full disk does not spin).
    snapshot_not_before: u64,
    was_leader: bool,
}

impl<S: LogStore> std::fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("status", &self.status()).finish()
    }
}

impl<S: LogStore> Node<S> {
    /// Opens a replica on `store`: a new store starts empty, an existing one restarts from its snapshot (the
    /// committed entries after it are applied again as raft re-delivers them).
    pub fn open(cfg: NodeConfig, store: S, logger: &slog::Logger) -> Result<Self> {
        let snap = store.stored_snapshot();
        let meta = snap.get_metadata();
        let state = LedgerState::restore(&snap.data)?;
        if state.applied_index() != meta.index {
            return Err(LedgerError::Storage(format!(
                "snapshot at index {} holds a state applied to {}",
                meta.index,
                state.applied_index()
            )));
        }
        let commit = store.hard_state().commit;
        if meta.index > commit {
            return Err(LedgerError::Storage(format!(
                "snapshot index {} is above the commit index {commit}",
                meta.index
            )));
        }
        let mut raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied: meta.index,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        if let Some(t) = cfg.fixed_election_timeout {
            raft_cfg.min_election_tick = t.max(cfg.election_tick);
            raft_cfg.max_election_tick = raft_cfg.min_election_tick + 1;
        }
        let snapshot_index = meta.index;
        let raw = RawNode::new(&raft_cfg, store, logger)?;
        Ok(Node {
            raw,
            cfg,
            state,
            pending: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_id: 1,
            outbox: Vec::new(),
            events: Vec::new(),
            snapshot_index,
            snapshots_made: 0,
            snapshots_installed: 0,
            snapshots_failed: 0,
            snapshot_due: None,
            snapshot_building: None,
            snapshot_not_before: 0,
            was_leader: false,
        })
    }

    /// One clock tick (elections, heartbeats).
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Starts an election now (a one-replica group uses this at start instead of waiting for ticks).
    pub fn campaign(&mut self) -> Result<()> {
        Ok(self.raw.campaign()?)
    }

    /// Hands an inbound message to raft. Messages from unknown peers or of local types are refused with an error
    /// and change nothing.
    pub fn step(&mut self, msg: Message) -> Result<()> {
        Ok(self.raw.step(msg)?)
    }

    /// Proposes `cmd`. The answer comes as an [`Event::Proposal`] with the returned id: at once if this replica
    /// does not lead, otherwise when the entry's index is applied.
    pub fn propose(&mut self, cmd: &Command) -> ProposalId {
        let id = self.next_id;
        self.next_id += 1;
        // Proposals are matched by (term, index), so only the leader takes them: a follower would forward the
        // entry to the leader, where its index is unknown here.
        let before = self.raw.raft.raft_log.last_index();
        let proposed = if self.is_leader() { self.raw.propose(Vec::new(), cmd.encode()).is_ok() } else { false };
        let index = self.raw.raft.raft_log.last_index();
        if !proposed || index == before {
            let result = Err(ProposalError::NotLeader { leader: self.leader() });
            self.events.push(Event::Proposal { id, result });
            return id;
        }
        let term = self.raw.raft.term;
        // The leader appended at `index`, dropping any of its own entries there and after: proposals waiting on
        // those will never see their entry applied.
        let stale: Vec<u64> = self.pending.range(index..).map(|(i, _)| *i).collect();
        for i in stale {
            if let Some(p) = self.pending.remove(&i) {
                self.events.push(Event::Proposal { id: p.id, result: Err(ProposalError::Superseded) });
            }
        }
        self.pending.insert(index, Pending { id, term });
        id
    }

    /// Asks for a linearizable read. The answer comes as an [`Event::Read`] with the returned id.
    pub fn read_index(&mut self) -> ReadId {
        let id = self.next_id;
        self.next_id += 1;
        if self.raw.raft.state != StateRole::Leader {
            let result = Err(ProposalError::NotLeader { leader: self.leader() });
            self.events.push(Event::Read { id, result });
        } else if !self.raw.raft.commit_to_current_term() {
            self.events.push(Event::Read { id, result: Err(ProposalError::NotReady) });
        } else {
            self.raw.read_index(id.to_le_bytes().to_vec());
            self.reads.insert(id, None);
        }
        id
    }

    /// Tells raft whether a snapshot message sent to `to` arrived.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
        self.raw.report_snapshot(to, status);
    }

    /// Tells raft that `to` could not be reached.
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    /// Messages to send, in order.
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    /// Answers for callers, in order.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The state machine as applied so far.
    pub fn state(&self) -> &LedgerState {
        &self.state
    }

    /// The log store.
    pub fn store(&self) -> &S {
        self.raw.store()
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|l| *l != raft::INVALID_ID)
    }

    /// True when this replica leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Asks the most up-to-date follower to take the leadership over (a clean shutdown's handover: it campaigns at
    /// once instead of after an election timeout). Returns it, or `None` when this replica does not lead or has no
    /// follower.
    pub fn transfer_leadership(&mut self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let me = self.cfg.id;
        let to = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != me)
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id)?;
        self.raw.transfer_leader(to);
        Some(to)
    }

    /// Health figures.
    pub fn status(&self) -> NodeStatus {
        let log = &self.raw.raft.raft_log;
        NodeStatus {
            id: self.cfg.id,
            term: self.raw.raft.term,
            leader: self.leader(),
            is_leader: self.is_leader(),
            commit: log.committed,
            applied: self.state.applied_index(),
            log: (self.raw.store().first_index().unwrap_or(0), self.raw.store().last_index().unwrap_or(0)),
            snapshot_index: self.snapshot_index,
            snapshots_made: self.snapshots_made,
            snapshots_installed: self.snapshots_installed,
            snapshots_failed: self.snapshots_failed,
            pending_proposals: self.pending.len(),
        }
    }

    /// Runs the loop once (see the module docs).
    pub fn handle_ready(&mut self) -> Result<Handled> {
        self.handle_ready_until(None)
    }

    /// Runs the loop once, stopping at `crash` as a process killed there would (for the simulator). Messages
    /// queued before the stop are still in [`Node::take_messages`]: they were sent before the crash.
    pub fn handle_ready_until(&mut self, crash: Option<CrashPoint>) -> Result<Handled> {
        self.run_ready(crash, None)
    }

    /// Runs the loop once, handing the messages that may go before the synced write to `send` as soon as they
    /// exist (so that followers write in parallel with the leader), and the rest at the end. Nothing is left in
    /// [`Node::take_messages`].
    pub fn handle_ready_sending(&mut self, send: &mut dyn FnMut(Vec<Message>)) -> Result<Handled> {
        let handled = self.run_ready(None, Some(&mut *send))?;
        send(self.take_messages());
        Ok(handled)
    }

    fn run_ready(&mut self, crash: Option<CrashPoint>, early: Option<&mut dyn FnMut(Vec<Message>)>) -> Result<Handled> {
        if !self.raw.has_ready() {
            return Ok(Handled::Idle);
        }
        let mut ready = self.raw.ready();
        if ready.ss().is_some() {
            self.on_role_change();
        }
        // 1. Messages that may go before the write.
        self.outbox.extend(ready.take_messages());
        if let Some(send) = early
            && !self.outbox.is_empty()
        {
            send(std::mem::take(&mut self.outbox));
        }
        if crash == Some(CrashPoint::BeforeSyncedWrite) {
            return Ok(Handled::Crashed);
        }
        // 2. One synced write.
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        let write = Persist { snapshot: snapshot.as_ref(), entries: ready.entries(), hard_state: ready.hs() };
        if !write.is_empty() {
            self.raw.mut_store().persist(write)?;
        }
        if let Some(s) = snapshot {
            self.install(&s)?;
        }
        if crash == Some(CrashPoint::AfterSyncedWrite) {
            return Ok(Handled::Crashed);
        }
        // 3. Messages that must follow the write.
        self.outbox.extend(ready.take_persisted_messages());
        for rs in ready.take_read_states() {
            if let Ok(bytes) = <[u8; 8]>::try_from(&rs.request_ctx[..])
                && let Some(slot) = self.reads.get_mut(&u64::from_le_bytes(bytes))
            {
                *slot = Some(rs.index);
            }
        }
        if crash == Some(CrashPoint::BeforeApply) {
            return Ok(Handled::Crashed);
        }
        // 4. Apply.
        self.apply(ready.take_committed_entries())?;
        if crash == Some(CrashPoint::AfterApply) {
            return Ok(Handled::Crashed);
        }
        // 5. Advance and the light ready.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().persist_commit(commit)?;
        }
        self.outbox.extend(light.take_messages());
        self.apply(light.take_committed_entries())?;
        // 6. Applied; maybe snapshot.
        self.raw.advance_apply();
        self.answer_reads();
        self.maybe_snapshot()?;
        Ok(Handled::Done)
    }

    fn on_role_change(&mut self) {
        let leader = self.is_leader();
        if self.was_leader && !leader {
            let known = self.leader();
            for (id, _) in std::mem::take(&mut self.reads) {
                self.events.push(Event::Read { id, result: Err(ProposalError::NotLeader { leader: known }) });
            }
        }
        self.was_leader = leader;
    }

    fn install(&mut self, snap: &Snapshot) -> Result<()> {
        let index = snap.get_metadata().index;
        let state = LedgerState::restore(&snap.data)?;
        if state.applied_index() != index {
            return Err(LedgerError::Storage(format!(
                "received snapshot at {index} holds a state applied to {}",
                state.applied_index()
            )));
        }
        self.state = state;
        self.snapshot_index = index;
        self.snapshots_installed += 1;
        if self.snapshot_due.as_ref().is_some_and(|j| j.index() <= index) {
            self.snapshot_due = None; // overtaken before anyone took it
        }
        let covered: Vec<u64> = self.pending.range(..=index).map(|(i, _)| *i).collect();
        for i in covered {
            if let Some(p) = self.pending.remove(&i) {
                self.events.push(Event::Proposal { id: p.id, result: Err(ProposalError::Unknown) });
            }
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        for e in entries {
            if e.index <= self.state.applied_index() {
                continue; // already in the state (covered by a snapshot)
            }
            // Membership is static: a conf change entry (none is proposed) only advances the index.
            let data: &[u8] = if e.get_entry_type() == EntryType::EntryNormal { &e.data } else { &[] };
            let outcome = self.state.apply(e.index, e.term, data)?;
            // Proposals at lower indexes were resolved when their index was applied; this one is resolved now.
            if let Some(p) = self.pending.remove(&e.index) {
                let result = if p.term == e.term { Ok(outcome) } else { Err(ProposalError::Superseded) };
                self.events.push(Event::Proposal { id: p.id, result });
            }
        }
        Ok(())
    }

    fn answer_reads(&mut self) {
        let applied = self.state.applied_index();
        let done: Vec<(ReadId, u64)> =
            self.reads.iter().filter_map(|(id, ix)| ix.filter(|i| *i <= applied).map(|i| (*id, i))).collect();
        for (id, index) in done {
            self.reads.remove(&id);
            self.events.push(Event::Read { id, result: Ok(index) });
        }
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        let applied = self.state.applied_index();
        if self.snapshot_due.is_some()
            || self.snapshot_building.is_some()
            || applied < self.snapshot_index + self.cfg.snapshot_every.max(1)
            || applied < self.snapshot_not_before
        {
            return Ok(());
        }
        let stored = self.raw.store().stored_snapshot();
        let job = SnapshotJob {
            frozen: self.state.freeze(),
            conf_state: stored.get_metadata().get_conf_state().clone(),
            files: self.raw.store().snapshot_files(),
        };
        if self.cfg.background_snapshots {
            self.snapshot_due = Some(job);
            return Ok(());
        }
        self.finish_snapshot(job.build()?)?;
        Ok(())
    }

    /// A due snapshot to build off the loop ([`NodeConfig::background_snapshots`]); at most one is out at a time.
    pub fn take_snapshot_job(&mut self) -> Option<SnapshotJob> {
        let job = self.snapshot_due.take()?;
        self.snapshot_building = Some(job.index());
        Some(job)
    }

    /// Records a snapshot built from a [`SnapshotJob`] and compacts the log before it (keeping
    /// [`NodeConfig::compact_margin`] entries). Returns false, storing nothing, when the snapshot is stale: a
    /// snapshot at or past its index was stored meanwhile (one received from the leader).
    pub fn finish_snapshot(&mut self, snap: Snapshot) -> Result<bool> {
        let index = snap.get_metadata().index;
        if self.snapshot_building == Some(index) {
            self.snapshot_building = None;
        }
        if index <= self.snapshot_index {
            return Ok(false);
        }
        let store = self.raw.mut_store();
        store.save_snapshot(snap)?;
        store.compact((index + 1).saturating_sub(self.cfg.compact_margin))?;
        store.reclaim()?;
        self.snapshot_index = index;
        self.snapshots_made += 1;
        Ok(true)
    }

    /// Building the job at `index` failed: forget it; a new one is made once another `snapshot_every` entries
    /// are applied.
    pub fn snapshot_failed(&mut self, index: u64) {
        if self.snapshot_building == Some(index) {
            self.snapshot_building = None;
            self.snapshot_not_before = index + self.cfg.snapshot_every.max(1);
            self.snapshots_failed += 1;
        }
    }
}
