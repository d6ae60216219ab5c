//! The ledger between processes: one replica driven by a real clock, raft messages carried over gRPC
//! (`kiln.ledger.v1.LedgerService`, tonic), and the client that appends through whoever leads.
//!
//! Owns [`Replica`] (a driver thread that owns the [`Node`] on its [`EngineStore`], ticks it on a fixed interval,
//! steps what peers send and sends what it must, one outbound task per peer), [`LedgerGrpc`] (the service: `Raft`
//! from peers, `Append` and `Status` for clients) and [`LedgerClient`]. Peers are static configuration: raft id →
//! address (`host:port`). It must not touch Kubernetes or the state machine's rules: those are [`state`]'s.
//!
//! # Appends are answered once applied
//! `Append` carries a [`Command`] in the log's encoding. The leader proposes it and answers when its entry is
//! committed and applied ([`Node`]'s (term, index) matching); a follower answers `NOT_LEADER` with the address of
//! the leader it knows (a redirect, no forwarding); a leadership change or the handler's deadline answers `RETRY`.
//! The client resends the same command (same record ids) until it gets `APPLIED` or `REJECTED`: the state
//! deduplicates by id, so a batch resent after a failover is applied once.
//!
//! # The driver thread
//! The node's loop does synced raft-engine writes, so it runs on its own OS thread, not on the async runtime. It
//! waits for input (peer messages, proposals, status asks) until the next tick, takes everything queued, and then
//! runs [`Node::handle_ready_sending`] until raft is idle: messages a leader may send before its own write leave
//! at once, so followers write in parallel. Each peer has an outbound queue drained by one task that sends
//! batches in order; a failed send reports the peer unreachable to raft, which retries on its own.
//!
//! [`state`]: crate::state

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use kiln_proto::ledger::v1 as pb;
use kiln_proto::ledger::v1::ledger_service_client::LedgerServiceClient;
use kiln_proto::ledger::v1::ledger_service_server::{LedgerService, LedgerServiceServer};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::node::{Event, Handled, Node, NodeConfig, NodeStatus, ProposalError, ProposalId};
use crate::state::{Command, LedgerState, Outcome};
use crate::storage::EngineStore;
use crate::{LedgerError, Result};

/// Most messages sent to a peer in one `Raft` call.
const MAX_BATCH: usize = 256;

/// How one replica of a group runs.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// The raft loop's settings; `node.id` is this replica.
    pub node: NodeConfig,
    /// The raft-engine directory.
    pub dir: PathBuf,
    /// Every replica of the group, this one included: raft id → `host:port`.
    pub peers: BTreeMap<u64, String>,
    /// The raft tick (elections after `node.election_tick` ticks, heartbeats every `node.heartbeat_tick`).
    pub tick: Duration,
    /// How long an `Append` waits for its entry to be applied before answering `RETRY`.
    pub append_timeout: Duration,
}

impl ReplicaConfig {
    /// Replica `id` of `peers` in `dir`: a 100 ms tick, an election after 10 ticks (1–2 s), heartbeats every 3.
    pub fn new(id: u64, dir: impl Into<PathBuf>, peers: BTreeMap<u64, String>) -> Self {
        ReplicaConfig {
            node: NodeConfig { background_snapshots: true, ..NodeConfig::new(id) },
            dir: dir.into(),
            peers,
            tick: Duration::from_millis(100),
            append_timeout: Duration::from_secs(3),
        }
    }
}

/// A replica's status with the figures a client needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The node's health figures.
    pub node: NodeStatus,
    /// Records in the applied state.
    pub records: u64,
    /// Bytes of raft-engine files.
    pub log_bytes: u64,
}

type ProposalResult = std::result::Result<Outcome, ProposalError>;

/// Where a proposal's answer goes: an async caller (the gRPC service) or a blocking one (the [`GroupLedger`],
/// behind the core's synchronous `Ledger` trait), which gives up at its deadline.
///
/// [`GroupLedger`]: crate::group::GroupLedger
pub(crate) enum Reply {
    Async(oneshot::Sender<ProposalResult>),
    Blocking(std_mpsc::SyncSender<ProposalResult>, Instant),
}

impl Reply {
    fn send(self, result: ProposalResult) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
            Reply::Blocking(tx, _) => {
                let _ = tx.try_send(result);
            }
        }
    }

    /// True when nobody waits for the answer any more.
    fn abandoned(&self, now: Instant) -> bool {
        match self {
            Reply::Async(tx) => tx.is_closed(),
            Reply::Blocking(_, deadline) => now > *deadline,
        }
    }
}

/// A linearizable read of the applied state: run on the driver thread once a ReadIndex round confirmed this
/// replica still leads and the state has applied up to the read index; given the reason instead when it cannot be.
pub(crate) type ReadFn = Box<dyn FnOnce(std::result::Result<&LedgerState, ProposalError>) + Send>;

pub(crate) enum Input {
    Raft(Vec<Message>),
    Propose(Command, Reply),
    Read(ReadFn, Instant),
    Status(oneshot::Sender<ReplicaStatus>),
    Transfer(oneshot::Sender<Option<u64>>),
    Unreachable { to: u64, snapshot: bool },
    SnapshotSent { to: u64 },
    SnapshotBuilt { index: u64, result: Result<raft::eraftpb::Snapshot> },
    Stop,
}

/// One running replica: the driver thread and the per-peer senders. Dropping it stops the thread.
#[derive(Debug)]
pub struct Replica {
    inputs: std_mpsc::Sender<Input>,
    status: tokio::sync::watch::Receiver<ReplicaStatus>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    ended: std::sync::Arc<tokio::sync::Notify>,
    cfg: ReplicaConfig,
}

impl Replica {
    /// Opens the replica's store (restarting from it if it holds a log) and starts driving it. Must be called
    /// within a tokio runtime (the per-peer senders are tasks on it).
    pub fn start(cfg: ReplicaConfig) -> Result<Self> {
        let id = cfg.node.id;
        if !cfg.peers.contains_key(&id) {
            return Err(LedgerError::Storage(format!("replica {id} is not among its peers {:?}", cfg.peers)));
        }
        let voters: Vec<u64> = cfg.peers.keys().copied().collect();
        let store = EngineStore::open(&cfg.dir, &voters)?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = Node::open(cfg.node.clone(), store, &logger)?;
        let (inputs, rx) = std_mpsc::channel();
        let mut outbound = BTreeMap::new();
        for (peer, addr) in cfg.peers.iter().filter(|(p, _)| **p != id) {
            let (tx, queue) = mpsc::unbounded_channel();
            tokio::spawn(send_to_peer(*peer, addr.clone(), queue, inputs.clone()));
            outbound.insert(*peer, tx);
        }
        let tick = cfg.tick;
        let ended = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = ended.clone();
        let (status_tx, status) = tokio::sync::watch::channel(replica_status(&node));
        let own = inputs.clone();
        let thread = std::thread::Builder::new().name(format!("ledger-replica-{id}")).spawn(move || {
            let mut builder = None;
            let result = drive(node, rx, &own, outbound, tick, &status_tx, &mut builder);
            // A snapshot still being written finishes before the replica counts as stopped (a restart in the
            // same process then finds its file complete, or not there at all).
            if let Some(b) = builder.take() {
                let _ = std::thread::JoinHandle::join(b);
            }
            notify.notify_one();
            result
        })?;
        Ok(Replica { inputs, status, thread: Some(thread), ended, cfg })
    }

    /// This replica's status, updated by the driver thread whenever it changes (term, leader, indexes, records):
    /// the controller watches it to know whether it leads.
    pub fn watch_status(&self) -> tokio::sync::watch::Receiver<ReplicaStatus> {
        self.status.clone()
    }

    /// How this replica runs.
    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    /// Hands the leadership to the most up-to-date follower and waits up to `wait` for it to lead; returns it, or
    /// `None` when this replica did not lead, had no follower, or the follower did not take over in time (the
    /// group then elects a leader after its election timeout, as after a crash).
    pub async fn transfer_leadership(&self, wait: Duration) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Transfer(tx)).ok()?;
        let to = rx.await.ok()??;
        let mut status = self.status.clone();
        let took_over = tokio::time::timeout(wait, status.wait_for(|s| s.node.leader == Some(to))).await;
        matches!(took_over, Ok(Ok(_))).then_some(to)
    }

    /// Proposes `cmd` at this replica and answers once its entry is applied (committed by a quorum), or why not
    /// (`NotLeader` at a follower; `Superseded`/`Unknown` after a leadership change: resend the same records).
    pub async fn propose(&self, cmd: Command) -> std::result::Result<Outcome, ProposalError> {
        let (tx, rx) = oneshot::channel();
        let stopped = ProposalError::NotLeader { leader: None };
        self.inputs.send(Input::Propose(cmd, Reply::Async(tx))).map_err(|_| stopped.clone())?;
        rx.await.unwrap_or(Err(stopped))
    }

    /// The core's `Ledger` on this replica: appends proposed here (so they succeed only while this replica leads)
    /// and numbered as batches of `source`; reads through ReadIndex. Calls block up to `timeout`.
    pub fn ledger(&self, source: &str, timeout: Duration) -> crate::group::GroupLedger {
        crate::group::GroupLedger::new(self.inputs.clone(), self.status.clone(), source, timeout)
    }

    /// Completes when the driver thread has ended (stopped, or failed: [`Replica::stop`] then returns why). A
    /// process running one replica exits then, and restarts from its directory.
    pub async fn ended(&self) {
        self.ended.notified().await;
    }

    /// The gRPC service of this replica, to add to a tonic server.
    pub fn service(&self) -> LedgerServiceServer<LedgerGrpc> {
        LedgerServiceServer::new(LedgerGrpc {
            inputs: self.inputs.clone(),
            peers: self.cfg.peers.clone(),
            append_timeout: self.cfg.append_timeout,
        })
        .max_decoding_message_size(64 << 20)
    }

    /// Stops the driver thread and waits for it; returns the error that stopped it early, if one did.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let _ = self.inputs.send(Input::Stop);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(LedgerError::Storage("the replica's driver thread panicked".to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The driver loop (see the module docs). Returns when stopped or when the node fails (a storage error: the
/// process should exit and restart from disk).
fn replica_status(node: &Node<EngineStore>) -> ReplicaStatus {
    ReplicaStatus {
        node: node.status(),
        records: node.state().len() as u64,
        log_bytes: node.store().used_size() as u64,
    }
}

fn drive(
    mut node: Node<EngineStore>,
    inputs: std_mpsc::Receiver<Input>,
    own: &std_mpsc::Sender<Input>,
    outbound: BTreeMap<u64, mpsc::UnboundedSender<Message>>,
    tick: Duration,
    status: &tokio::sync::watch::Sender<ReplicaStatus>,
    builder: &mut Option<std::thread::JoinHandle<()>>,
) -> Result<()> {
    let mut waiting: BTreeMap<ProposalId, Reply> = BTreeMap::new();
    let mut reads: BTreeMap<crate::node::ReadId, (ReadFn, Instant)> = BTreeMap::new();
    let mut next_tick = Instant::now() + tick;
    let mut send = |msgs: Vec<Message>| {
        for m in msgs {
            if let Some(q) = outbound.get(&m.to) {
                let _ = q.send(m);
            }
        }
    };
    loop {
        let first = match inputs.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(input) => Some(input),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        for input in first.into_iter().chain(std::iter::from_fn(|| inputs.try_recv().ok())) {
            match input {
                Input::Raft(msgs) => {
                    for m in msgs {
                        // A message from an unknown peer or of a local type changes nothing.
                        let _ = node.step(m);
                    }
                }
                Input::Propose(cmd, reply) => {
                    let id = node.propose(&cmd);
                    waiting.insert(id, reply);
                }
                Input::Read(read, deadline) => {
                    let id = node.read_index();
                    reads.insert(id, (read, deadline));
                }
                Input::Status(reply) => {
                    let _ = reply.send(replica_status(&node));
                }
                Input::Transfer(reply) => {
                    let _ = reply.send(node.transfer_leadership());
                }
                Input::Unreachable { to, snapshot } => {
                    node.report_unreachable(to);
                    if snapshot {
                        node.report_snapshot(to, false);
                    }
                }
                Input::SnapshotSent { to } => node.report_snapshot(to, true),
                Input::SnapshotBuilt { index, result } => match result {
                    Ok(snap) => {
                        node.finish_snapshot(snap)?;
                    }
                    Err(_) => node.snapshot_failed(index),
                },
                Input::Stop => return Ok(()),
            }
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick += tick;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + tick; // the loop fell behind: do not tick in a burst
            }
        }
        while node.handle_ready_sending(&mut send)? == Handled::Done {}
        if let Some(job) = node.take_snapshot_job() {
            // Encoding and writing a snapshot of the whole ledger takes time in proportion to it: a thread of its
            // own, so that proposals go on committing meanwhile (the node allows one job at a time).
            if let Some(done) = builder.take() {
                let _ = done.join();
            }
            let (tx, index) = (own.clone(), job.index());
            let spawned =
                std::thread::Builder::new().name(format!("ledger-snapshot-{}", node.status().id)).spawn(move || {
                    lower_priority();
                    let _ = tx.send(Input::SnapshotBuilt { index, result: job.build() });
                });
            match spawned {
                Ok(handle) => *builder = Some(handle),
                Err(_) => node.snapshot_failed(index),
            }
        }
        for event in node.take_events() {
            match event {
                Event::Proposal { id, result } => {
                    if let Some(reply) = waiting.remove(&id) {
                        reply.send(result);
                    }
                }
                Event::Read { id, result } => {
                    if let Some((read, _)) = reads.remove(&id) {
                        read(result.map(|_| node.state()));
                    }
                }
            }
        }
        // Callers that gave up (their deadline passed) no longer wait.
        let now = Instant::now();
        waiting.retain(|_, reply| !reply.abandoned(now));
        reads.retain(|_, (_, deadline)| now <= *deadline);
        status.send_if_modified(|current| {
            let fresh = replica_status(&node);
            let changed = *current != fresh;
            if changed {
                *current = fresh;
            }
            changed
        });
    }
}

/// Makes the calling thread yield the CPU to the driver threads (Linux: a per-thread nice of 10), so that encoding a
/// snapshot on a small machine does not delay the loop's own work. Best effort.
#[allow(unsafe_code)]
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority on the calling thread take and return plain integers; no memory is touched.
    unsafe {
        let tid = nix::libc::gettid();
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, 10);
    }
}

fn endpoint(addr: &str) -> std::result::Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .tcp_nodelay(true))
}

/// Drains one peer's queue: messages in order, in batches; a failed call drops its batch and reports the peer
/// unreachable (raft resends what matters).
async fn send_to_peer(
    peer: u64,
    addr: String,
    mut queue: mpsc::UnboundedReceiver<Message>,
    inputs: std_mpsc::Sender<Input>,
) {
    let Ok(endpoint) = endpoint(&addr) else { return };
    let mut client = LedgerServiceClient::new(endpoint.connect_lazy());
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshot = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let messages = batch.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
        match client.raft(pb::RaftBatch { messages }).await {
            Ok(_) => {
                if snapshot {
                    let _ = inputs.send(Input::SnapshotSent { to: peer });
                }
            }
            Err(_) => {
                if inputs.send(Input::Unreachable { to: peer, snapshot }).is_err() {
                    return;
                }
                // Drop what queued up while the peer was away; raft resends from its own progress. A fresh
                // channel reconnects to a restarted peer.
                while queue.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_millis(20)).await;
                client = LedgerServiceClient::new(endpoint.connect_lazy());
            }
        }
    }
}

/// The `kiln.ledger.v1.LedgerService` of one replica.
#[derive(Clone, Debug)]
pub struct LedgerGrpc {
    inputs: std_mpsc::Sender<Input>,
    peers: BTreeMap<u64, String>,
    append_timeout: Duration,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Raft(_) => "Raft",
            Input::Propose(..) => "Propose",
            Input::Read(..) => "Read",
            Input::Status(_) => "Status",
            Input::Transfer(_) => "Transfer",
            Input::Unreachable { .. } => "Unreachable",
            Input::SnapshotSent { .. } => "SnapshotSent",
            Input::SnapshotBuilt { .. } => "SnapshotBuilt",
            Input::Stop => "Stop",
        })
    }
}

fn stopped() -> tonic::Status {
    tonic::Status::unavailable("the ledger replica stopped")
}

fn reply(status: pb::AppendStatus) -> pb::AppendReply {
    pb::AppendReply { status: status as i32, ..pb::AppendReply::default() }
}

#[tonic::async_trait]
impl LedgerService for LedgerGrpc {
    async fn raft(
        &self,
        request: tonic::Request<pb::RaftBatch>,
    ) -> std::result::Result<tonic::Response<pb::RaftAck>, tonic::Status> {
        let mut msgs = Vec::new();
        for bytes in request.into_inner().messages {
            let m = Message::parse_from_bytes(&bytes)
                .map_err(|e| tonic::Status::invalid_argument(format!("not a raft message: {e}")))?;
            msgs.push(m);
        }
        self.inputs.send(Input::Raft(msgs)).map_err(|_| stopped())?;
        Ok(tonic::Response::new(pb::RaftAck {}))
    }

    async fn append(
        &self,
        request: tonic::Request<pb::AppendRequest>,
    ) -> std::result::Result<tonic::Response<pb::AppendReply>, tonic::Status> {
        let cmd = Command::decode(&request.into_inner().command)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Propose(cmd, Reply::Async(tx))).map_err(|_| stopped())?;
        let answer = match tokio::time::timeout(self.append_timeout, rx).await {
            Ok(Ok(result)) => result,
            // The deadline passed, or the replica stopped with the proposal open: the outcome is unknown.
            Ok(Err(_)) | Err(_) => return Ok(tonic::Response::new(reply(pb::AppendStatus::Retry))),
        };
        let out = match answer {
            Ok(Outcome::Appended { results, .. }) => pb::AppendReply {
                new_records: results.iter().map(|a| *a == kiln_core::billing::Appended::New).collect(),
                ..reply(pb::AppendStatus::Applied)
            },
            Ok(Outcome::Rejected { error, .. }) => {
                pb::AppendReply { error: error.to_string(), ..reply(pb::AppendStatus::Rejected) }
            }
            Ok(other) => {
                pb::AppendReply { error: format!("unexpected outcome {other:?}"), ..reply(pb::AppendStatus::Rejected) }
            }
            Err(ProposalError::NotLeader { leader }) => {
                let leader_id = leader.unwrap_or(0);
                pb::AppendReply {
                    leader_id,
                    leader_address: self.peers.get(&leader_id).cloned().unwrap_or_default(),
                    ..reply(pb::AppendStatus::NotLeader)
                }
            }
            Err(e @ (ProposalError::Superseded | ProposalError::Unknown | ProposalError::NotReady)) => {
                pb::AppendReply { error: e.to_string(), ..reply(pb::AppendStatus::Retry) }
            }
        };
        Ok(tonic::Response::new(out))
    }

    async fn status(
        &self,
        _request: tonic::Request<pb::StatusRequest>,
    ) -> std::result::Result<tonic::Response<pb::StatusReply>, tonic::Status> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Status(tx)).map_err(|_| stopped())?;
        let s = rx.await.map_err(|_| stopped())?;
        Ok(tonic::Response::new(pb::StatusReply {
            id: s.node.id,
            term: s.node.term,
            leader_id: s.node.leader.unwrap_or(0),
            is_leader: s.node.is_leader,
            commit: s.node.commit,
            applied: s.node.applied,
            records: s.records,
            snapshot_index: s.node.snapshot_index,
            log_first: s.node.log.0,
            log_last: s.node.log.1,
        }))
    }
}

/// Why [`LedgerClient::append`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The group refused the batch as a whole (it is committed as refused: resending will not help).
    #[error("the ledger refused the batch: {0}")]
    Rejected(String),
    /// No replica applied the batch before the deadline; its outcome is unknown (resend with the same ids).
    #[error("no answer before the deadline (last: {0})")]
    Deadline(String),
    /// A peer address does not parse.
    #[error("bad peer address: {0}")]
    Address(String),
}

/// A client of the group: appends through whoever leads, following redirects and retrying with the same command.
#[derive(Clone, Debug)]
pub struct LedgerClient {
    peers: BTreeMap<u64, String>,
    clients: BTreeMap<String, LedgerServiceClient<Channel>>,
    /// The replica tried first (the last one that answered as leader).
    pub leader_hint: Option<String>,
}

impl LedgerClient {
    /// A client of the group `peers` (raft id → `host:port`). Connects lazily.
    pub fn new(peers: BTreeMap<u64, String>) -> std::result::Result<Self, ClientError> {
        let mut clients = BTreeMap::new();
        for addr in peers.values() {
            let ep = endpoint(addr).map_err(|e| ClientError::Address(format!("{addr}: {e}")))?;
            clients.insert(addr.clone(), LedgerServiceClient::new(ep.connect_lazy()));
        }
        Ok(LedgerClient { peers, clients, leader_hint: None })
    }

    /// Appends `cmd` (an [`Command::Append`], normally) and returns the reply once the group applied it —
    /// `APPLIED`, with one `new` flag per record. Follows `NOT_LEADER` redirects, and on errors and `RETRY` tries
    /// the replicas in turn, every `retry_every`, until `deadline` has passed.
    pub async fn append(
        &mut self,
        cmd: &Command,
        deadline: Duration,
        retry_every: Duration,
    ) -> std::result::Result<pb::AppendReply, ClientError> {
        let bytes = cmd.encode();
        let start = Instant::now();
        let order: Vec<String> = self.peers.values().cloned().collect();
        let mut next = 0usize;
        let mut last = String::from("no attempt");
        while start.elapsed() < deadline {
            let addr = match self.leader_hint.clone() {
                Some(a) => a,
                None => {
                    next += 1;
                    order[next % order.len()].clone()
                }
            };
            let Some(client) = self.clients.get_mut(&addr) else {
                self.leader_hint = None;
                continue;
            };
            match client.append(pb::AppendRequest { command: bytes.clone() }).await {
                Ok(r) => {
                    let r = r.into_inner();
                    match r.status() {
                        pb::AppendStatus::Applied => {
                            self.leader_hint = Some(addr);
                            return Ok(r);
                        }
                        pb::AppendStatus::Rejected => return Err(ClientError::Rejected(r.error)),
                        pb::AppendStatus::NotLeader if !r.leader_address.is_empty() && r.leader_address != addr => {
                            self.leader_hint = Some(r.leader_address);
                            continue; // a redirect: at once
                        }
                        other => {
                            last = format!("{addr}: {other:?} {}", r.error);
                            self.leader_hint = None;
                        }
                    }
                }
                Err(e) => {
                    last = format!("{addr}: {}", e.message());
                    self.leader_hint = None;
                    self.reconnect(&addr);
                }
            }
            tokio::time::sleep(retry_every).await;
        }
        Err(ClientError::Deadline(last))
    }

    /// The status of the replica at `addr`.
    pub async fn status(&mut self, addr: &str) -> std::result::Result<pb::StatusReply, tonic::Status> {
        let client = self.clients.get_mut(addr).ok_or_else(|| tonic::Status::not_found(addr.to_string()))?;
        let reply = client.status(pb::StatusRequest {}).await;
        if reply.is_err() {
            self.reconnect(addr);
        }
        Ok(reply?.into_inner())
    }

    /// A fresh channel to `addr` after a failure, so that a replica restarted at the same address is reached on
    /// a new connection.
    fn reconnect(&mut self, addr: &str) {
        if let Ok(ep) = endpoint(addr) {
            self.clients.insert(addr.to_string(), LedgerServiceClient::new(ep.connect_lazy()));
        }
    }
}

/// Parses `id=host:port`.
pub fn parse_peer(s: &str) -> std::result::Result<(u64, String), String> {
    let (id, addr) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected ID=HOST:PORT"))?;
    let id: u64 = id.parse().map_err(|_| format!("`{s}`: the id must be a positive number"))?;
    if id == 0 || addr.is_empty() {
        return Err(format!("`{s}`: expected a non-zero ID and an address"));
    }
    Ok((id, addr.to_string()))
}
