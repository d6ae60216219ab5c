//! A deterministic simulator of a ledger group: seeded, no real time, no threads, no I/O.
//!
//! Owns [`simulate`]: 3 or 5 replicas ([`Node`] on [`MemStore`]) exchanging raft messages through a simulated
//! network that drops, duplicates, delays (and so reorders) messages and partitions the group; replicas that crash
//! at every step of the loop ([`CrashPoint`]) or between loops, lose what they had not synced ([`MemDisk::crash`])
//! and restart from their disk; on odd seeds, snapshots built off the loop that finish steps later, fail, or die
//! with their replica; clients that propose `Append` batches with record ids, retry what was not
//! acknowledged (same ids, same batch number) against whoever leads, issue ReadIndex reads, and keep a model of
//! what was acknowledged. After the faulty phase the network heals, everyone restarts, and the run continues until
//! every client's batches are acknowledged and every replica has applied the same log. [`SimReport::violations`]
//! lists every broken invariant:
//! - every acknowledged record is in the converged state, exactly once, unchanged; nothing else is;
//! - a batch carrying a record that conflicts with an acknowledged one (same id, other contents) is refused whole,
//!   and nothing of it is stored;
//! - the state's running totals and its `Ledger` totals equal the model's;
//! - all replicas hold byte-identical snapshots of the state;
//! - a restarted replica never has an applied index above its commit index;
//! - a ReadIndex answer reflects every record acknowledged before the read was asked;
//! - a replica's loop never fails, and the group converges.
//!
//! The same seed and config always give the same run (the report's figures included). It touches nothing outside
//! the group it builds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use kiln_core::billing::{Ledger, MemoryLedger, Quantity, Query, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;
use kiln_core::rng::Rng;
use raft::eraftpb::{Message, MessageType};

use crate::node::{CrashPoint, Event, Handled, Node, NodeConfig, ProposalId, ReadId, SnapshotJob};
use crate::state::{Command, Outcome, ReadView};
use crate::storage::{MemDisk, MemStore};

/// What to simulate. Probabilities are per mille.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed: everything random comes from it.
    pub seed: u64,
    /// Replicas in the group (3 or 5).
    pub replicas: u64,
    /// Steps (ticks) of the faulty phase.
    pub fault_steps: u64,
    /// Most steps the healed phase may take to converge.
    pub heal_steps: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Batches each client must get acknowledged.
    pub batches_per_client: usize,
    /// Records per batch.
    pub records_per_batch: usize,
    /// A message is lost.
    pub drop: u32,
    /// A message is delivered twice.
    pub duplicate: u32,
    /// Largest delivery delay, steps (delays are uniform in `1..=max_delay`, which reorders messages).
    pub max_delay: u64,
    /// Per live replica per step: it crashes (at a random step of its next loop, or between loops).
    pub crash: u32,
    /// Per step: a partition starts (when none is in force).
    pub partition: u32,
    /// Per batch: a client adds a record conflicting with an acknowledged one (the batch must be refused whole).
    pub conflict: u32,
    /// Steps a client waits for an answer before resending.
    pub client_timeout: u64,
    /// The replicas' snapshot threshold (entries).
    pub snapshot_every: u64,
    /// Entries kept before a snapshot when compacting.
    pub compact_margin: u64,
    /// 0: replicas build snapshots inside their loop. Otherwise they hand them out as jobs
    /// ([`NodeConfig::background_snapshots`]) that finish 1 to this many steps later, fail one time in ten, and
    /// are lost when their replica crashes meanwhile — as a snapshot thread does.
    pub snapshot_delay: u64,
    /// Bugs to inject, to check that the checker catches them.
    pub bugs: Bugs,
}

/// Deliberate bugs, off by default: a run with one on should report violations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    /// Every replica's disk ignores fsync: a crash loses everything, votes and acknowledged entries included.
    pub lying_fsync: bool,
    /// Clients give a resent batch fresh record ids, as a client that makes ids at send time would.
    pub fresh_ids_on_retry: bool,
}

impl SimConfig {
    /// A busy, faulty run of `replicas` replicas from `seed`.
    pub fn new(seed: u64, replicas: u64) -> Self {
        SimConfig {
            seed,
            replicas,
            fault_steps: 600,
            heal_steps: 3000,
            clients: 3,
            batches_per_client: 20,
            records_per_batch: 4,
            drop: 100,
            duplicate: 50,
            max_delay: 4,
            crash: 8,
            partition: 10,
            conflict: 50,
            client_timeout: 40,
            snapshot_every: 16,
            compact_margin: 4,
            snapshot_delay: if seed % 2 == 1 { 20 } else { 0 },
            bugs: Bugs::default(),
        }
    }
}

/// What happened in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Steps run (both phases).
    pub steps: u64,
    /// Batches acknowledged to clients.
    pub acked_batches: u64,
    /// Records in the model (acknowledged).
    pub acked_records: u64,
    /// Proposals sent (first tries and retries).
    pub proposals: u64,
    /// Retries (a failure answer or a timeout).
    pub retries: u64,
    /// Crashes, by where they happened (`between` for between loops).
    pub crashes: BTreeMap<String, u64>,
    /// Messages dropped (by loss, partition or a down replica), duplicated.
    pub dropped: u64,
    /// Messages duplicated.
    pub duplicated: u64,
    /// Partitions started.
    pub partitions: u64,
    /// Snapshots made and installed across replicas and incarnations.
    pub snapshots_made: u64,
    /// Snapshots installed from a leader.
    pub snapshots_installed: u64,
    /// Batches refused whole for a conflicting record, as they must be.
    pub conflicts_refused: u64,
    /// ReadIndex reads answered and checked.
    pub reads_checked: u64,
    /// The converged applied index.
    pub applied_index: u64,
    /// Broken invariants (empty when the run is correct).
    pub violations: Vec<String>,
}

struct Replica {
    id: u64,
    disk: Arc<Mutex<MemDisk>>,
    node: Option<Node<MemStore>>,
    incarnation: u64,
    down_until: u64,
    crash_at: Option<Option<CrashPoint>>,
    /// A snapshot job out of the loop, and the step it finishes at.
    building: Option<(u64, SnapshotJob)>,
}

struct Attempt {
    replica: u64,
    incarnation: u64,
    proposal: ProposalId,
    deadline: u64,
}

struct Client {
    source: String,
    batches: Vec<Vec<UsageRecord>>,
    next: usize,
    attempt: Option<Attempt>,
    leader_hint: Option<u64>,
    /// A record conflicting with an acknowledged one (same id, another amount) sent with the current batch.
    conflict: Option<UsageRecord>,
    /// Whether the current batch was already considered for a conflict.
    conflict_tried: bool,
}

struct PendingRead {
    replica: u64,
    incarnation: u64,
    id: ReadId,
    acked_before: usize,
}

struct InFlight {
    at: u64,
    order: u64,
    msg: Message,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    replicas: Vec<Replica>,
    clients: Vec<Client>,
    network: Vec<InFlight>,
    order: u64,
    cut: BTreeSet<(u64, u64)>,
    heal_at: u64,
    /// Acknowledged records in acknowledgement order, and as a ledger.
    acked: Vec<UsageRecord>,
    model: MemoryLedger,
    reads: Vec<PendingRead>,
    report: SimReport,
    logger: slog::Logger,
}

fn node_config(cfg: &SimConfig, id: u64, rng: &mut Rng) -> NodeConfig {
    NodeConfig {
        fixed_election_timeout: Some(10 + rng.below(10) as usize),
        snapshot_every: cfg.snapshot_every,
        compact_margin: cfg.compact_margin,
        background_snapshots: cfg.snapshot_delay > 0,
        max_size_per_msg: 16 * 1024,
        max_inflight_msgs: 16,
        ..NodeConfig::new(id)
    }
}

/// Runs one simulation; see the module docs.
pub fn simulate(cfg: SimConfig) -> SimReport {
    let mut sim = Sim::new(cfg);
    // raft-rs panics on some broken invariants (e.g. a commit index past a follower's log after lost writes):
    // such a panic is a finding of this run, not the end of the test binary.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    if let Err(panic) = run {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        sim.report.steps = sim.now;
        sim.report.violations.push(format!("step {}: panic: {what}", sim.now));
    }
    sim.report
}

impl Sim {
    fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let voters: Vec<u64> = (1..=cfg.replicas).collect();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let replicas = voters
            .iter()
            .map(|&id| {
                let disk = MemStore::new_disk(&voters);
                disk.lock().unwrap_or_else(|p| p.into_inner()).lies_about_sync = cfg.bugs.lying_fsync;
                let node = Node::open(node_config(&cfg, id, &mut rng), MemStore::open(disk.clone()), &logger)
                    .unwrap_or_else(|e| panic!("a fresh replica opens: {e}"));
                Replica { id, disk, node: Some(node), incarnation: 0, down_until: 0, crash_at: None, building: None }
            })
            .collect();
        let clients = (0..cfg.clients)
            .map(|c| {
                let source = format!("client-{c}");
                let batches = (0..cfg.batches_per_client)
                    .map(|b| {
                        (0..cfg.records_per_batch)
                            .map(|i| {
                                let n = (b * cfg.records_per_batch + i) as i64;
                                let start_ms = n * 3_600_000 + 1_000 * c as i64;
                                UsageRecord::new(
                                    &source,
                                    &format!("ns-{}", c % 2),
                                    Subject::Deployment(format!("d-{}", i % 3)),
                                    UsageKind::Serverless(ServerlessPhase::Busy),
                                    "H100",
                                    Quantity::MicroGpuSeconds(rng.below(10_000_000) as i64),
                                    Money::from_nanos(i128::from(rng.below(1_000_000_000))),
                                    start_ms,
                                    start_ms + 60_000,
                                )
                            })
                            .collect()
                    })
                    .collect();
                Client {
                    source,
                    batches,
                    next: 0,
                    attempt: None,
                    leader_hint: None,
                    conflict: None,
                    conflict_tried: false,
                }
            })
            .collect();
        let report = SimReport { seed: cfg.seed, ..SimReport::default() };
        Sim {
            cfg,
            rng,
            now: 0,
            replicas,
            clients,
            network: Vec::new(),
            order: 0,
            cut: BTreeSet::new(),
            heal_at: 0,
            acked: Vec::new(),
            model: MemoryLedger::new(),
            reads: Vec::new(),
            report,
            logger,
        }
    }

    fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.rng.below(1000) < u64::from(per_mille)
    }

    fn violation(&mut self, what: String) {
        if self.report.violations.len() < 20 {
            self.report.violations.push(format!("step {}: {what}", self.now));
        }
    }

    fn run(&mut self) {
        let end = self.cfg.fault_steps + self.cfg.heal_steps;
        while self.now < end && self.report.violations.is_empty() {
            let faulty = self.now < self.cfg.fault_steps;
            if self.now == self.cfg.fault_steps {
                self.heal();
            }
            self.step(faulty);
            self.now += 1;
            if !faulty && self.converged() {
                break;
            }
        }
        self.report.steps = self.now;
        if self.report.violations.is_empty() {
            self.check_final();
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
        for i in 0..self.replicas.len() {
            self.replicas[i].crash_at = None;
            if self.replicas[i].node.is_none() {
                self.restart(i);
            }
        }
    }

    fn step(&mut self, faulty: bool) {
        // Partitions come and go.
        if faulty {
            if self.cut.is_empty() && self.chance(self.cfg.partition) {
                self.partition();
            } else if !self.cut.is_empty() && self.now >= self.heal_at {
                self.cut.clear();
            }
        }
        // Restarts and crash decisions.
        for i in 0..self.replicas.len() {
            if self.replicas[i].node.is_none() {
                if self.now >= self.replicas[i].down_until {
                    self.restart(i);
                }
            } else if faulty && self.replicas[i].crash_at.is_none() && self.chance(self.cfg.crash) {
                let k = self.rng.below(CrashPoint::ALL.len() as u64 + 1) as usize;
                self.replicas[i].crash_at = Some(CrashPoint::ALL.get(k).copied());
            }
        }
        // Clocks.
        for r in &mut self.replicas {
            if let Some(n) = r.node.as_mut() {
                n.tick();
            }
        }
        self.deliver();
        self.clients_act();
        for i in 0..self.replicas.len() {
            self.drive(i, faulty);
        }
    }

    fn partition(&mut self) {
        let ids: Vec<u64> = self.replicas.iter().map(|r| r.id).collect();
        let minority: BTreeSet<u64> = ids.iter().copied().filter(|_| self.rng.below(2) == 0).collect();
        for &a in &ids {
            for &b in &ids {
                if minority.contains(&a) != minority.contains(&b) {
                    self.cut.insert((a, b));
                }
            }
        }
        self.heal_at = self.now + 20 + self.rng.below(80);
        self.report.partitions += 1;
    }

    fn index_of(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due: Vec<InFlight> = Vec::new();
        let mut later = Vec::new();
        for f in self.network.drain(..) {
            if f.at <= now { due.push(f) } else { later.push(f) }
        }
        self.network = later;
        due.sort_by_key(|f| (f.at, f.order));
        for f in due {
            let (from, to) = (f.msg.from, f.msg.to);
            let is_snap = f.msg.get_msg_type() == MessageType::MsgSnapshot;
            let ti = self.index_of(to);
            let reachable = !self.cut.contains(&(from, to)) && self.replicas[ti].node.is_some();
            if reachable {
                if let Some(n) = self.replicas[ti].node.as_mut() {
                    // Errors here are raft refusing a message (e.g. from an unknown peer): nothing changes.
                    let _ = n.step(f.msg);
                }
            } else {
                self.report.dropped += 1;
            }
            if is_snap {
                let fi = self.index_of(from);
                if let Some(n) = self.replicas[fi].node.as_mut() {
                    n.report_snapshot(to, reachable);
                }
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>, faulty: bool) {
        for msg in msgs {
            if faulty && self.chance(self.cfg.drop) {
                self.report.dropped += 1;
                if msg.get_msg_type() == MessageType::MsgSnapshot {
                    let fi = self.index_of(msg.from);
                    if let Some(n) = self.replicas[fi].node.as_mut() {
                        n.report_snapshot(msg.to, false);
                    }
                }
                continue;
            }
            let copies = if faulty && self.chance(self.cfg.duplicate) { 2 } else { 1 };
            self.report.duplicated += copies - 1;
            for _ in 0..copies {
                let delay = if faulty { 1 + self.rng.below(self.cfg.max_delay.max(1)) } else { 1 };
                self.order += 1;
                self.network.push(InFlight { at: self.now + delay, order: self.order, msg: msg.clone() });
            }
        }
    }

    /// Finishes a snapshot job whose time has come; hands out a new one the node made.
    fn snapshots(&mut self, i: usize) {
        let now = self.now;
        if self.replicas[i].building.as_ref().is_some_and(|(at, _)| *at <= now)
            && let Some((_, job)) = self.replicas[i].building.take()
        {
            let fails = self.chance(100);
            let id = self.replicas[i].id;
            let Some(node) = self.replicas[i].node.as_mut() else { return };
            let result = if fails { Err(crate::LedgerError::Storage("injected".into())) } else { job.build() };
            match result {
                Ok(snap) => {
                    if let Err(e) = node.finish_snapshot(snap) {
                        self.violation(format!("replica {id} failed to store its snapshot: {e}"));
                    }
                }
                Err(_) => node.snapshot_failed(job.index()),
            }
        }
        if self.replicas[i].building.is_none()
            && let Some(job) = self.replicas[i].node.as_mut().and_then(Node::take_snapshot_job)
        {
            let at = now + 1 + self.rng.below(self.cfg.snapshot_delay.max(1));
            self.replicas[i].building = Some((at, job));
        }
    }

    fn drive(&mut self, i: usize, faulty: bool) {
        self.snapshots(i);
        for _ in 0..8 {
            let crash = if faulty { self.replicas[i].crash_at.flatten() } else { None };
            let Some(node) = self.replicas[i].node.as_mut() else { return };
            let handled = node.handle_ready_until(crash);
            let msgs = node.take_messages();
            let events = node.take_events();
            self.send(msgs, faulty);
            self.on_events(i, events);
            match handled {
                Ok(Handled::Idle) => break,
                Ok(Handled::Done) => {}
                Ok(Handled::Crashed) => {
                    let point = crash.map_or("between".to_string(), |c| format!("{c:?}"));
                    self.crash(i, point);
                    return;
                }
                Err(e) => {
                    let id = self.replicas[i].id;
                    self.violation(format!("replica {id}'s loop failed: {e}"));
                    return;
                }
            }
        }
        // A crash decided for between loops, or for a loop that had nothing ready.
        if faulty && self.replicas[i].crash_at.is_some() && self.replicas[i].node.is_some() {
            self.crash(i, "between".to_string());
        }
    }

    fn crash(&mut self, i: usize, point: String) {
        *self.report.crashes.entry(point).or_default() += 1;
        let r = &mut self.replicas[i];
        if let Some(node) = r.node.take() {
            let st = node.status();
            self.report.snapshots_made += st.snapshots_made;
            self.report.snapshots_installed += st.snapshots_installed;
        }
        r.disk.lock().unwrap_or_else(|p| p.into_inner()).crash();
        r.crash_at = None;
        r.building = None;
        r.down_until = self.now + 5 + self.rng.below(40);
    }

    fn restart(&mut self, i: usize) {
        let cfg = node_config(&self.cfg, self.replicas[i].id, &mut self.rng);
        let store = MemStore::open(self.replicas[i].disk.clone());
        match Node::open(cfg, store, &self.logger) {
            Ok(node) => {
                let st = node.status();
                if st.applied > st.commit {
                    self.violation(format!(
                        "replica {} restarted with applied {} > commit {}",
                        st.id, st.applied, st.commit
                    ));
                }
                let r = &mut self.replicas[i];
                r.node = Some(node);
                r.incarnation += 1;
            }
            Err(e) => {
                let id = self.replicas[i].id;
                self.violation(format!("replica {id} failed to restart: {e}"));
            }
        }
    }

    fn clients_act(&mut self) {
        for c in 0..self.clients.len() {
            // Timeouts: the replica crashed, the answer was lost with a partition, or the entry is stuck.
            if let Some(a) = &self.clients[c].attempt
                && self.now >= a.deadline
            {
                self.clients[c].attempt = None;
                self.clients[c].leader_hint = None;
                self.retry(c);
            }
            let client = &self.clients[c];
            if client.attempt.is_some() || client.next >= client.batches.len() {
                continue;
            }
            // Now and then, a batch carries a record that conflicts with an acknowledged one: the whole batch
            // must be refused, and nothing of it stored.
            if !client.conflict_tried && !self.acked.is_empty() {
                self.clients[c].conflict_tried = true;
                if self.chance(self.cfg.conflict) {
                    let mut r = self.acked[self.rng.below(self.acked.len() as u64) as usize].clone();
                    r.amount = Money::from_nanos(r.amount.nanos() + 1);
                    self.clients[c].conflict = Some(r);
                }
            }
            let client = &self.clients[c];
            let live: Vec<u64> = self.replicas.iter().filter(|r| r.node.is_some()).map(|r| r.id).collect();
            if live.is_empty() {
                continue;
            }
            let target = match client.leader_hint {
                Some(l) if live.contains(&l) => l,
                _ => live[self.rng.below(live.len() as u64) as usize],
            };
            let cmd = Command::Append {
                source: client.source.clone(),
                seq: client.next as u64 + 1,
                records: client.batches[client.next].iter().chain(client.conflict.as_ref()).cloned().collect(),
            };
            let ti = self.index_of(target);
            let incarnation = self.replicas[ti].incarnation;
            let Some(node) = self.replicas[ti].node.as_mut() else { continue };
            let proposal = node.propose(&cmd);
            self.report.proposals += 1;
            self.clients[c].attempt =
                Some(Attempt { replica: target, incarnation, proposal, deadline: self.now + self.cfg.client_timeout });
            // Now and then, a linearizable read at the same replica.
            if self.rng.below(4) == 0 {
                let id = node.read_index();
                self.reads.push(PendingRead { replica: target, incarnation, id, acked_before: self.acked.len() });
            }
            let events = node.take_events();
            self.on_events(ti, events);
        }
    }

    fn on_events(&mut self, i: usize, events: Vec<Event>) {
        let (replica, incarnation) = (self.replicas[i].id, self.replicas[i].incarnation);
        for event in events {
            match event {
                Event::Proposal { id, result } => {
                    let Some(c) = self.clients.iter().position(|c| {
                        c.attempt
                            .as_ref()
                            .is_some_and(|a| a.replica == replica && a.incarnation == incarnation && a.proposal == id)
                    }) else {
                        continue; // an answer the client stopped waiting for
                    };
                    self.clients[c].attempt = None;
                    match result {
                        Ok(Outcome::Appended { .. }) if self.clients[c].conflict.is_some() => {
                            self.violation("a batch with a conflicting record was accepted".to_string());
                        }
                        Ok(Outcome::Rejected { error, .. }) => {
                            if self.clients[c].conflict.take().is_none()
                                || !matches!(error, kiln_core::billing::BillingError::Conflict { .. })
                            {
                                self.violation(format!("a batch was refused: {error}"));
                            }
                            self.report.conflicts_refused += 1;
                        }
                        Ok(Outcome::Appended { results, .. }) => {
                            let batch = self.clients[c].batches[self.clients[c].next].clone();
                            if results.len() != batch.len() {
                                self.violation(format!(
                                    "answer for {} results, batch of {}",
                                    results.len(),
                                    batch.len()
                                ));
                            }
                            for r in batch {
                                if let Err(e) = self.model.append(r.clone()) {
                                    self.violation(format!("model refused an acknowledged record: {e}"));
                                }
                                self.acked.push(r);
                            }
                            self.clients[c].next += 1;
                            self.clients[c].conflict_tried = false;
                            self.clients[c].leader_hint = Some(replica);
                            self.report.acked_batches += 1;
                        }
                        Ok(other) => self.violation(format!("unexpected outcome for an append: {other:?}")),
                        Err(crate::ProposalError::NotLeader { leader }) => {
                            self.clients[c].leader_hint = leader;
                            self.retry(c);
                        }
                        Err(_) => {
                            self.clients[c].leader_hint = None;
                            self.retry(c);
                        }
                    }
                }
                Event::Read { id, result } => {
                    let Some(pos) = self
                        .reads
                        .iter()
                        .position(|r| r.replica == replica && r.incarnation == incarnation && r.id == id)
                    else {
                        continue;
                    };
                    let read = self.reads.swap_remove(pos);
                    if result.is_err() {
                        continue;
                    }
                    let Some(node) = self.replicas[i].node.as_ref() else { continue };
                    let missing = self.acked[..read.acked_before]
                        .iter()
                        .find(|r| node.state().record(&r.id) != Some(*r))
                        .map(|r| r.id.to_string());
                    if let Some(id) = missing {
                        self.violation(format!("a ReadIndex read at replica {replica} misses acknowledged {id}"));
                    }
                    self.report.reads_checked += 1;
                }
            }
        }
    }

    /// The client will send its current batch again: with the same ids, unless the fresh-ids bug is on.
    fn retry(&mut self, c: usize) {
        self.report.retries += 1;
        if !self.cfg.bugs.fresh_ids_on_retry {
            return;
        }
        let client = &mut self.clients[c];
        let Some(batch) = client.batches.get_mut(client.next) else { return };
        for r in batch.iter_mut() {
            *r = UsageRecord::new(
                &client.source,
                &r.namespace,
                r.subject.clone(),
                r.kind,
                &r.gpu_model,
                r.quantity,
                r.amount,
                r.start_ms,
                r.end_ms + 1,
            );
        }
    }

    fn converged(&self) -> bool {
        if self.clients.iter().any(|c| c.next < c.batches.len()) {
            return false;
        }
        let mut applied = BTreeSet::new();
        for r in &self.replicas {
            let Some(n) = r.node.as_ref() else { return false };
            let st = n.status();
            if st.applied != st.commit {
                return false;
            }
            applied.insert(st.applied);
        }
        applied.len() == 1
    }

    fn check_final(&mut self) {
        if !self.converged() {
            let status: Vec<String> = self
                .replicas
                .iter()
                .map(|r| r.node.as_ref().map_or("down".to_string(), |n| format!("{:?}", n.status())))
                .collect();
            let done: Vec<usize> = self.clients.iter().map(|c| c.next).collect();
            self.violation(format!("did not converge: clients at {done:?}, replicas {status:?}"));
            return;
        }
        let nodes: Vec<&Node<MemStore>> = self.replicas.iter().filter_map(|r| r.node.as_ref()).collect();
        let first = nodes[0].state();
        let bytes = first.snapshot();
        let mut problems = Vec::new();
        for n in &nodes[1..] {
            if n.state().snapshot() != bytes {
                problems.push(format!("replica {} differs from replica {}", n.status().id, nodes[0].status().id));
            }
        }
        if first.len() != self.acked.len() {
            problems.push(format!("{} records stored, {} acknowledged", first.len(), self.acked.len()));
        }
        for r in &self.acked {
            if first.record(&r.id) != Some(r) {
                problems.push(format!("acknowledged record {} missing or changed", r.id));
                break;
            }
        }
        let view = ReadView(first);
        match (view.total(&Query::all()), self.model.total(&Query::all())) {
            (Ok(a), Ok(b)) if a == b => {}
            (a, b) => problems.push(format!("totals {a:?} != model {b:?}")),
        }
        let mut running = kiln_core::billing::Totals::default();
        for t in first.totals().values() {
            running.records += t.records;
            running.micro_gpu_seconds += t.micro_gpu_seconds;
            running.amount = running.amount.checked_add(t.amount).unwrap_or(Money::ZERO);
        }
        match self.model.total(&Query::all()) {
            Ok(m)
                if m.records == running.records
                    && m.micro_gpu_seconds == running.micro_gpu_seconds
                    && m.amount == running.amount => {}
            m => problems.push(format!("running totals {running:?} != model {m:?}")),
        }
        for (source, p) in first.sources() {
            if p.missing_count() != 0 {
                problems.push(format!("source {source} has gaps {:?}", p.missing));
            }
        }
        self.report.applied_index = first.applied_index();
        self.report.acked_records = self.acked.len() as u64;
        for n in &nodes {
            let st = n.status();
            self.report.snapshots_made += st.snapshots_made;
            self.report.snapshots_installed += st.snapshots_installed;
        }
        for p in problems {
            self.violation(p);
        }
    }
}
