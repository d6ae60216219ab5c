//! Three replicas in one process, each behind its own gRPC server on loopback: appends are answered once applied,
//! a follower redirects to the leader, a conflicting batch is refused, a resend is a duplicate, and a replica
//! stopped and started again on its directory catches up.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_core::billing::{Quantity, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;
use kiln_ledger::Command;
use kiln_ledger::transport::{ClientError, LedgerClient, Replica, ReplicaConfig, parse_peer};
use kiln_proto::ledger::v1 as pb;
use kiln_proto::ledger::v1::ledger_service_client::LedgerServiceClient;

struct Running {
    replica: Replica,
    server: tokio::task::JoinHandle<()>,
}

async fn start(dir: &Path, id: u64, peers: &BTreeMap<u64, String>) -> Running {
    // A restart binds its port again: the stopped server's listener goes with its aborted task, a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match tokio::net::TcpListener::bind(&peers[&id]).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("binding {}: {e}", peers[&id]),
        }
    };
    serve(dir, id, peers, listener)
}

fn serve(dir: &Path, id: u64, peers: &BTreeMap<u64, String>, listener: tokio::net::TcpListener) -> Running {
    let mut cfg = ReplicaConfig::new(id, dir.join(format!("r{id}")), peers.clone());
    cfg.tick = Duration::from_millis(20);
    let replica = Replica::start(cfg).unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let service = replica.service();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
    Running { replica, server }
}

/// Three replicas on loopback ports, each behind its gRPC server. The ports are held from the moment they are
/// chosen (a port picked free and bound again later can be taken meanwhile by a test running beside this one).
async fn start_group(dir: &Path) -> (BTreeMap<u64, String>, BTreeMap<u64, Running>) {
    let mut listeners = BTreeMap::new();
    for id in 1..=3u64 {
        listeners.insert(id, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let peers: BTreeMap<u64, String> =
        listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap().to_string())).collect();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        nodes.insert(id, serve(dir, id, &peers, listener));
    }
    (peers, nodes)
}

fn batch(seq: u64, amount: i128) -> Command {
    let records = (0..3)
        .map(|i| {
            let start = (seq as i64 * 3 + i) * 1_000;
            UsageRecord::new(
                "meter",
                "ns",
                Subject::Deployment("d".into()),
                UsageKind::Serverless(ServerlessPhase::Busy),
                "H100",
                Quantity::MicroGpuSeconds(1_000),
                Money::from_nanos(amount),
                start,
                start + 1_000,
            )
        })
        .collect();
    Command::Append { source: "meter".into(), seq, records }
}

async fn leader(client: &mut LedgerClient, peers: &BTreeMap<u64, String>) -> u64 {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        for (id, addr) in peers {
            if let Ok(s) = client.status(addr).await
                && s.is_leader
            {
                return *id;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no leader elected");
}

#[test]
fn peers_parse() {
    assert_eq!(parse_peer("2=10.0.0.2:7400").unwrap(), (2, "10.0.0.2:7400".to_string()));
    assert!(parse_peer("0=a:1").is_err());
    assert!(parse_peer("x=a:1").is_err());
    assert!(parse_peer("a:1").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_applied_followers_redirect_and_a_restarted_replica_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let (peers, mut nodes) = start_group(dir.path()).await;
    let mut client = LedgerClient::new(peers.clone()).unwrap();
    let lead = leader(&mut client, &peers).await;
    let (deadline, retry) = (Duration::from_secs(10), Duration::from_millis(10));

    let reply = client.append(&batch(1, 5), deadline, retry).await.unwrap();
    assert_eq!(reply.new_records, vec![true; 3]);
    let again = client.append(&batch(1, 5), deadline, retry).await.unwrap();
    assert_eq!(again.new_records, vec![false; 3], "a resend is a duplicate");
    let conflict = client.append(&batch(1, 6), deadline, retry).await;
    assert!(matches!(conflict, Err(ClientError::Rejected(_))), "{conflict:?}");

    // A follower answers with the leader's address, and applies nothing itself.
    let follower = (1..=3).find(|id| *id != lead).unwrap();
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", peers[&follower])).unwrap();
    let mut raw = LedgerServiceClient::new(ep.connect().await.unwrap());
    let r = raw.append(pb::AppendRequest { command: batch(2, 5).encode() }).await.unwrap().into_inner();
    assert_eq!(r.status(), pb::AppendStatus::NotLeader);
    assert_eq!((r.leader_id, r.leader_address.as_str()), (lead, peers[&lead].as_str()));

    // A follower stopped while the group goes on, then started on its directory, catches up.
    let down = nodes.remove(&follower).unwrap();
    down.server.abort();
    down.replica.stop().unwrap();
    for seq in 2..=20 {
        client.append(&batch(seq, 5), deadline, retry).await.unwrap();
    }
    nodes.insert(follower, start(dir.path(), follower, &peers).await);
    let start = Instant::now();
    loop {
        let l = client.status(&peers[&lead]).await.unwrap();
        let f = client.status(&peers[&follower]).await;
        if let Ok(f) = f
            && f.applied >= l.commit
        {
            assert_eq!((f.records, l.records), (60, 60));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the restarted replica did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (_, n) in nodes {
        n.server.abort();
        n.replica.stop().unwrap();
    }
}

fn record(i: i64, nanos: i128) -> UsageRecord {
    UsageRecord::new(
        "controller",
        if i % 2 == 0 { "a" } else { "b" },
        Subject::Deployment("d".into()),
        UsageKind::Serverless(ServerlessPhase::Busy),
        "H100",
        Quantity::MicroGpuSeconds(1_000),
        Money::from_nanos(nanos),
        i * 60_000,
        (i + 1) * 60_000,
    )
}

/// The core's `Ledger` on the leading replica of a group: appends committed by the quorum, reads through ReadIndex;
/// a follower's refuses both as unavailable; after the leader stops, the next leader's continues the numbering and
/// reads every acknowledged record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_ledger_bills_through_whoever_leads() {
    use kiln_core::billing::{Appended, BillingError, Ledger, Query};
    let dir = tempfile::tempdir().unwrap();
    let (peers, mut nodes) = start_group(dir.path()).await;
    let mut client = LedgerClient::new(peers.clone()).unwrap();
    let lead = leader(&mut client, &peers).await;
    let timeout = Duration::from_secs(5);

    let mut ledger = nodes[&lead].replica.ledger("controller", timeout);
    let first: Vec<UsageRecord> = (0..4).map(|i| record(i, 10)).collect();
    // Right after its election the leader may not have committed in its term yet (its first read of the
    // source's numbering answers Unavailable): the caller retries, as the billing service does.
    let results = loop {
        match tokio::task::block_in_place(|| ledger.append_all(first.clone())) {
            Err(BillingError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other.unwrap(),
        }
    };
    assert_eq!(results, vec![Appended::New; 4]);
    let again = tokio::task::block_in_place(|| ledger.append_all(first.clone())).unwrap();
    assert_eq!(again, vec![Appended::Duplicate; 4], "a resend counts once");
    let mut conflicting = record(0, 10);
    conflicting.amount = Money::from_nanos(11);
    let refused = tokio::task::block_in_place(|| ledger.append(conflicting));
    assert!(matches!(refused, Err(BillingError::Conflict { .. })), "{refused:?}");
    let total = tokio::task::block_in_place(|| ledger.total(&Query::namespace("a"))).unwrap();
    assert_eq!(total.amount, Money::from_nanos(20));
    let status = ledger.status().unwrap();
    assert_eq!((status.replica, status.leader), (lead, Some(lead)));

    let follower = (1..=3).find(|id| *id != lead).unwrap();
    let mut on_follower = nodes[&follower].replica.ledger("controller", timeout);
    let read = tokio::task::block_in_place(|| on_follower.query(&Query::all()));
    assert!(matches!(read, Err(BillingError::Unavailable(_))), "a follower does not serve reads: {read:?}");
    let write = tokio::task::block_in_place(|| on_follower.append(record(9, 1)));
    assert!(matches!(write, Err(BillingError::Unavailable(_))), "nor appends: {write:?}");

    // A clean handover: the most up-to-date follower leads at once.
    let to = nodes[&lead].replica.transfer_leadership(Duration::from_secs(5)).await;
    let to = to.expect("a follower took the leadership over");
    assert_ne!(to, lead);
    assert!(nodes[&to].replica.watch_status().borrow().node.is_leader);
    assert_eq!(nodes[&lead].replica.transfer_leadership(Duration::from_secs(1)).await, None, "a follower has none");
    let mut ledger = nodes[&to].replica.ledger("controller", timeout);
    let appended = loop {
        match tokio::task::block_in_place(|| ledger.append(record(8, 10))) {
            Err(BillingError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other.unwrap(),
        }
    };
    assert_eq!(appended, Appended::New);

    // That leader goes away; whoever leads next bills on, numbering after the batches already in the state.
    let gone = nodes.remove(&to).unwrap();
    gone.server.abort();
    gone.replica.stop().unwrap();
    let next = {
        let start = Instant::now();
        loop {
            let found = nodes.iter().find(|(_, n)| {
                let s = n.replica.watch_status().borrow().clone();
                s.node.is_leader
            });
            if let Some((id, _)) = found {
                break *id;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no new leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut ledger = nodes[&next].replica.ledger("controller", timeout);
    let more: Vec<UsageRecord> = (4..6).map(|i| record(i, 10)).collect();
    // Right after an election the leader may not have committed in its term yet: the caller retries.
    let appended = loop {
        match tokio::task::block_in_place(|| ledger.append_all(more.clone())) {
            Err(BillingError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other.unwrap(),
        }
    };
    assert_eq!(appended, vec![Appended::New; 2]);
    let all = tokio::task::block_in_place(|| ledger.query(&Query::all())).unwrap();
    assert_eq!(all.len(), 7, "every acknowledged record, once");
    let seq = tokio::task::block_in_place(|| ledger.read(|s| s.sources()["controller"].last_seq)).unwrap();
    assert!(seq >= 5, "the numbering went on after the earlier leaders' batches: {seq}");
    let missing = tokio::task::block_in_place(|| ledger.read(|s| s.sources()["controller"].missing_count())).unwrap();
    assert_eq!(missing, 0, "no gap in the source's numbering");
    for (_, n) in nodes {
        n.server.abort();
        n.replica.stop().unwrap();
    }
}
