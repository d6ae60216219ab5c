//! `kiln bench ledger`: the replicated usage ledger on loopback — three replicas in this process, each on its own
//! raft-engine directory with its driver thread, raft messages between them over gRPC on 127.0.0.1 (the transport
//! the controller's StatefulSet uses), proposals made at the leader as the controller's billing does.
//!
//! Two figures, as issue 14 defines them:
//! - throughput: batches of `--batch` records, `--in-flight` at a time (closed loop), records per second from the
//!   first proposal to the last acknowledgement (an acknowledgement = committed by a quorum's synced writes, and
//!   applied);
//! - commit latency at `--rate` records per second (open loop: a batch of 50 every 50/rate s): p50/p99/max.
//!
//! Every synced write is an `fsync`, so the disk's own fsync latency bounds both; it is measured on the same
//! directory and printed first.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kiln_core::{
    billing::{Quantity, ServerlessPhase, Subject, UsageKind, UsageRecord},
    money::Money,
};
use kiln_ledger::{
    Command, Outcome,
    transport::{Replica, ReplicaConfig},
};

/// `kiln bench ledger` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct LedgerArgs {
    /// Where the three replicas' directories go (removed afterwards). Default: `.kiln/ledger-bench` here — on the
    /// disk the ledger would use; a tmpfs would make fsync free.
    #[arg(long, default_value = ".kiln/ledger-bench")]
    pub dir: PathBuf,
    /// Records appended in the throughput run.
    #[arg(long, default_value_t = 200_000)]
    pub records: usize,
    /// Records per batch in the throughput run.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Batches in flight in the throughput run.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Records per second of the latency run.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u32,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
}

fn batch(source: &str, seq: u64, size: usize) -> Command {
    let records = (0..size)
        .map(|i| {
            let start = (seq as i64 * size as i64 + i as i64) * 1_000;
            UsageRecord::new(
                source,
                &format!("ns-{}", i % 7),
                Subject::Deployment(format!("d-{}", i % 13)),
                UsageKind::Serverless(ServerlessPhase::Busy),
                "NVIDIA H100 80GB HBM3",
                Quantity::MicroGpuSeconds(1_000_000),
                Money::from_nanos(1_525_000),
                start,
                start + 1_000,
            )
        })
        .collect();
    Command::Append { source: source.to_string(), seq, records }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and p99 of `n` synced 4 KiB appends to a file in `dir`.
fn fsync_latency(dir: &Path, n: usize) -> Result<(Duration, Duration)> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [7u8; 4096];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(t.elapsed());
    }
    std::fs::remove_file(&path)?;
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

async fn proposal(replica: &Replica, cmd: Command) -> Result<Duration> {
    let t = Instant::now();
    match replica.propose(cmd).await {
        Ok(Outcome::Appended { results, .. }) if !results.is_empty() => Ok(t.elapsed()),
        other => bail!("a proposal was not applied: {other:?}"),
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: &LedgerArgs) -> Result<()> {
    if args.batch == 0 || args.in_flight == 0 || args.rate < 50 {
        bail!("--batch and --in-flight must be positive and --rate at least 50 records/s");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let (fsync_p50, fsync_p99) = fsync_latency(&args.dir, 200)?;
    println!(
        "disk: fsync of a 4 KiB append p50 {:.2} ms, p99 {:.2} ms ({})",
        ms(fsync_p50),
        ms(fsync_p99),
        args.dir.display()
    );

    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        peers.insert(id, l.local_addr()?.to_string());
        listeners.push((id, l));
    }
    let mut replicas = BTreeMap::new();
    let mut servers = Vec::new();
    for (id, listener) in listeners {
        let replica = Replica::start(ReplicaConfig::new(id, args.dir.join(format!("r{id}")), peers.clone()))?;
        let service = replica.service();
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        servers
            .push(tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming)));
        replicas.insert(id, Arc::new(replica));
    }
    let began = Instant::now();
    let leader = loop {
        if let Some((id, _)) = replicas.iter().find(|(_, r)| r.watch_status().borrow().node.is_leader) {
            break *id;
        }
        if began.elapsed() > Duration::from_secs(20) {
            bail!("no leader elected in 20 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("3 replicas on loopback gRPC; replica {leader} leads after {:.2} s", began.elapsed().as_secs_f64());
    let lead = Arc::clone(&replicas[&leader]);
    // The first entry of a new term commits before anything else can: wait for it.
    while lead.propose(batch("warm-up", 1, 1)).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Throughput: closed loop, `in_flight` proposers.
    let batches = args.records.div_ceil(args.batch);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.in_flight {
        let (lead, next, size) = (Arc::clone(&lead), Arc::clone(&next), args.batch);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seq > batches as u64 {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                latencies.push(proposal(&lead, batch("throughput", seq, size)).await?);
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let records = batches * args.batch;
    println!(
        "throughput: {records} records in batches of {} ({} in flight): {:.0} records/s; commit p50 {:.2} ms, p99 {:.2} ms",
        args.batch,
        args.in_flight,
        records as f64 / elapsed.as_secs_f64(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );

    // Latency: open loop at `rate`.
    let size = 50usize;
    let interval = Duration::from_secs_f64(size as f64 / f64::from(args.rate));
    let count = (f64::from(args.seconds) / interval.as_secs_f64()).ceil() as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for seq in 1..=count {
        tokio::time::sleep_until(start + interval * u32::try_from(seq - 1).unwrap_or(u32::MAX)).await;
        let lead = Arc::clone(&lead);
        tasks.push(tokio::spawn(async move { proposal(&lead, batch("latency", seq, size)).await }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await??);
    }
    latencies.sort();
    println!(
        "latency at {} records/s (a batch of {size} every {:.1} ms, {} batches): commit p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.rate,
        ms(interval),
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
    );

    for (id, r) in &replicas {
        let s = r.watch_status().borrow().clone();
        println!(
            "replica {id}: applied {}, records {}, log {}..={}, snapshot at {}, snapshots {}, raft-engine {} KiB",
            s.node.applied,
            s.records,
            s.node.log.0,
            s.node.log.1,
            s.node.snapshot_index,
            s.node.snapshots_made + s.node.snapshots_installed,
            s.log_bytes / 1024
        );
    }
    for s in servers {
        s.abort();
    }
    for (_, r) in replicas {
        if let Ok(r) = Arc::try_unwrap(r) {
            tokio::task::spawn_blocking(move || r.stop()).await??;
        }
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
