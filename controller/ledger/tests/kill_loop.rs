//! The ledger between real processes on loopback: three `ledger-node` replicas, a client appending batches of
//! records with ids at a steady rate through whoever leads, and `kill -9` of the leader in a loop, each time
//! restarted from its directory. At the end every acknowledged record is in the ledger, none is counted twice,
//! the replicas agree, and the time from each kill to the next committed write is printed (median, worst).
//!
//! `kill_the_leader_3_times` runs in the normal suite; the long loop is opt-in:
//! `KILN_LEDGER_KILLS=50 cargo nextest run -p kiln-ledger --run-ignored only --no-capture kill_the_leader_in_a_loop`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::billing::{Quantity, RecordId, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;
use kiln_ledger::loopback::LoopbackGroup;
use kiln_ledger::transport::LedgerClient;
use kiln_ledger::{Command, EngineStore, Node, NodeConfig};

const SOURCE: &str = "kill-loop";
const PER_BATCH: i64 = 5;

struct Cluster {
    dir: PathBuf,
    peers: BTreeMap<u64, String>,
    children: BTreeMap<u64, Child>,
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let peers = (1..=3u64)
            .map(|id| {
                let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                (id, format!("127.0.0.1:{port}"))
            })
            .collect();
        let mut c = Cluster { dir: dir.to_path_buf(), peers, children: BTreeMap::new() };
        for id in 1..=3 {
            c.spawn(id);
        }
        c
    }

    fn spawn(&mut self, id: u64) {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ledger-node"));
        cmd.arg("--id").arg(id.to_string());
        cmd.arg("--dir").arg(self.dir.join(format!("r{id}")));
        cmd.arg("--listen").arg(&self.peers[&id]);
        cmd.arg("--snapshot-every").arg("200");
        for (p, addr) in &self.peers {
            cmd.arg("--peer").arg(format!("{p}={addr}"));
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("r{id}.log")));
        cmd.stdout(Stdio::null()).stderr(log.map(Stdio::from).unwrap_or_else(|_| Stdio::null()));
        self.children.insert(id, cmd.spawn().expect("ledger-node starts"));
    }

    /// `kill -9` (std's `Child::kill` is SIGKILL on Unix) and reap.
    fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.children.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.children.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

fn record(seq: u64, i: i64) -> UsageRecord {
    let start = (seq as i64 * PER_BATCH + i) * 1_000;
    UsageRecord::new(
        SOURCE,
        "team-a",
        Subject::Deployment("llama".into()),
        UsageKind::Serverless(ServerlessPhase::Busy),
        "H100",
        Quantity::MicroGpuSeconds(1_000_000),
        Money::from_nanos(1),
        start,
        start + 1_000,
    )
}

#[derive(Default)]
struct Acks {
    ids: BTreeSet<RecordId>,
    /// When each acknowledgement came, and from which replica.
    times: Vec<(Instant, String)>,
    last_seq: u64,
}

/// The leader among the live replicas, as they report it (the one that says it leads with the highest term).
async fn find_leader(client: &mut LedgerClient, cluster: &Cluster, within: Duration) -> Option<u64> {
    let start = Instant::now();
    while start.elapsed() < within {
        let mut best: Option<(u64, u64)> = None;
        for id in cluster.children.keys() {
            if let Ok(s) = client.status(&cluster.peers[id]).await
                && s.is_leader
                && best.is_none_or(|(t, _)| s.term > t)
            {
                best = Some((s.term, *id));
            }
        }
        if let Some((_, id)) = best {
            return Some(id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until replica `id` has applied what the leader had committed when asked.
async fn wait_caught_up(client: &mut LedgerClient, cluster: &Cluster, id: u64, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(leader) = find_leader(client, cluster, Duration::from_secs(5)).await
            && let Ok(l) = client.status(&cluster.peers[&leader]).await
            && let Ok(s) = client.status(&cluster.peers[&id]).await
            && s.applied >= l.commit
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn kill_loop(kills: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path());
    let mut control = LedgerClient::new(cluster.peers.clone()).unwrap();
    assert!(find_leader(&mut control, &cluster, Duration::from_secs(20)).await.is_some(), "a leader is elected");

    // The writer: one batch every 20 ms (when the previous was acknowledged), each resent until applied.
    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acks, stop) = (acks.clone(), stop.clone());
        let mut client = LedgerClient::new(cluster.peers.clone()).unwrap();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                every.tick().await;
                seq += 1;
                let records: Vec<UsageRecord> = (0..PER_BATCH).map(|i| record(seq, i)).collect();
                let ids: Vec<RecordId> = records.iter().map(|r| r.id.clone()).collect();
                let cmd = Command::Append { source: SOURCE.into(), seq, records };
                let reply = client
                    .append(&cmd, Duration::from_secs(60), Duration::from_millis(10))
                    .await
                    .unwrap_or_else(|e| panic!("batch {seq} was never applied: {e}"));
                assert_eq!(reply.new_records.len(), ids.len());
                let mut a = acks.lock().unwrap();
                a.ids.extend(ids);
                a.times.push((Instant::now(), client.leader_hint.clone().unwrap_or_default()));
                a.last_seq = seq;
            }
        })
    };

    let mut gaps = Vec::new();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader = find_leader(&mut control, &cluster, Duration::from_secs(20)).await.expect("a leader");
        let killed_at = Instant::now();
        cluster.kill(leader);
        // The first write committed after the kill: acknowledged after it by another replica (an answer of the
        // killed leader that was already on its way does not count).
        let killed_addr = cluster.peers[&leader].clone();
        let first = loop {
            let found = acks
                .lock()
                .unwrap()
                .times
                .iter()
                .filter(|(t, from)| *t > killed_at && *from != killed_addr)
                .map(|(t, _)| *t)
                .min();
            if let Some(t) = found {
                break t;
            }
            assert!(killed_at.elapsed() < Duration::from_secs(30), "kill {k}: no write committed within 30 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        gaps.push(first - killed_at);
        cluster.spawn(leader);
        assert!(
            wait_caught_up(&mut control, &cluster, leader, Duration::from_secs(30)).await,
            "kill {k}: replica {leader} caught up after its restart"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("the writer finished");
    drop(cluster);

    // Every replica's directory, reopened in one process: they agree, and hold every acknowledged record once.
    let group_dir = dir.path().to_path_buf();
    let open = |id: u64| {
        let store = EngineStore::open(&group_dir.join(format!("r{id}")), &[1, 2, 3]).unwrap();
        Node::open(NodeConfig::new(id), store, &slog::Logger::root(slog::Discard, slog::o!())).unwrap()
    };
    let mut group = LoopbackGroup::new((1..=3).map(open));
    group.elect(200).unwrap();
    for _ in 0..20 {
        group.tick();
        group.pump(100).unwrap();
    }
    let acks = acks.lock().unwrap();
    let states: Vec<Vec<u8>> = group.nodes.values().map(|n| n.state().snapshot()).collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "the replicas hold identical states");
    let state = group.nodes[&1].state();
    let lost: Vec<&RecordId> = acks.ids.iter().filter(|id| state.record(id).is_none()).collect();
    assert!(lost.is_empty(), "{} acknowledged records lost, e.g. {:?}", lost.len(), lost.first());
    // Counted once: the totals (updated on every applied record) equal the records stored, one nano each.
    let (mut counted, mut amount) = (0u64, 0i128);
    for t in state.totals().values() {
        counted += t.records;
        amount += t.amount.nanos();
    }
    assert_eq!(counted, state.len() as u64, "every record counted exactly once in the totals");
    assert_eq!(amount, state.len() as i128);
    assert!(state.len() as u64 <= (acks.last_seq + 1) * PER_BATCH as u64, "nothing beyond what was sent");
    let progress = &state.sources()[SOURCE];
    assert_eq!(progress.missing_count(), 0, "no batch number missing");
    assert!(progress.last_seq >= acks.last_seq);

    gaps.sort();
    println!(
        "kill loop: {kills} kills of the leader, {} acknowledged records ({} batches applied, resends included), \
         0 lost, 0 counted twice; kill -> next committed write: median {:?}, p90 {:?}, worst {:?}",
        acks.ids.len(),
        progress.batches,
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.9),
        gaps[gaps.len() - 1],
    );
    println!("kill -> next committed write, all: {gaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_leader_3_times() {
    kill_loop(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about 3 s per kill; KILN_LEDGER_KILLS (default 50) sets how many"]
async fn kill_the_leader_in_a_loop() {
    let kills = std::env::var("KILN_LEDGER_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(50);
    kill_loop(kills).await;
}
