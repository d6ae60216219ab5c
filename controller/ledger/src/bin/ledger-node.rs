//! `ledger-node`: one replica of the usage ledger as its own process.
//!
//! ```text
//! ledger-node --id 1 --dir /var/lib/kiln/ledger --listen 0.0.0.0:7400 \
//!     --peer 1=ctl-0.ctl:7400 --peer 2=ctl-1.ctl:7400 --peer 3=ctl-2.ctl:7400 \
//!     [--tick-ms 100] [--election-ticks 10] [--heartbeat-ticks 3] [--snapshot-every 1000]
//! ```
//! Peers are static (`ID=HOST:PORT`, this replica included; it is added with its `--listen` address when
//! missing). The replica restarts from `--dir` after any stop, `kill -9` included. It serves
//! `kiln.ledger.v1.LedgerService` on `--listen`: `Raft` from its peers, `Append` (answered once committed and
//! applied; followers redirect) and `Status`. It prints one line, `ledger-node ID listening on ADDR`, once the
//! replica is running.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_ledger::transport::{Replica, ReplicaConfig, parse_peer};

const USAGE: &str = "usage: ledger-node --id ID --dir DIR --listen HOST:PORT --peer ID=HOST:PORT... \
[--tick-ms MS] [--election-ticks N] [--heartbeat-ticks N] [--snapshot-every N]";

struct Args {
    id: u64,
    dir: PathBuf,
    listen: SocketAddr,
    peers: BTreeMap<u64, String>,
    tick_ms: u64,
    election_ticks: usize,
    heartbeat_ticks: usize,
    snapshot_every: Option<u64>,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut id, mut dir, mut listen) = (None, None, None);
    let mut peers = BTreeMap::new();
    let (mut tick_ms, mut election_ticks, mut heartbeat_ticks, mut snapshot_every) = (100, 10, 3, None);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_string());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--id" => id = Some(num(&value)?),
            "--dir" => dir = Some(PathBuf::from(value)),
            "--listen" => listen = Some(value.parse::<SocketAddr>().map_err(|e| format!("--listen: {e}"))?),
            "--peer" => {
                let (pid, addr) = parse_peer(&value)?;
                peers.insert(pid, addr);
            }
            "--tick-ms" => tick_ms = num(&value)?,
            "--election-ticks" => election_ticks = num(&value)? as usize,
            "--heartbeat-ticks" => heartbeat_ticks = num(&value)? as usize,
            "--snapshot-every" => snapshot_every = Some(num(&value)?),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    let id = id.filter(|i| *i > 0).ok_or_else(|| format!("--id (non-zero) is required\n{USAGE}"))?;
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    peers.entry(id).or_insert_with(|| listen.to_string());
    Ok(Args {
        id,
        dir: dir.ok_or_else(|| format!("--dir is required\n{USAGE}"))?,
        listen,
        peers,
        tick_ms,
        election_ticks,
        heartbeat_ticks,
        snapshot_every,
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut cfg = ReplicaConfig::new(args.id, &args.dir, args.peers);
    cfg.tick = Duration::from_millis(args.tick_ms.max(1));
    cfg.node.election_tick = args.election_ticks.max(2);
    cfg.node.heartbeat_tick = args.heartbeat_ticks.clamp(1, cfg.node.election_tick - 1);
    if let Some(n) = args.snapshot_every {
        cfg.node.snapshot_every = n;
    }
    let replica = match Replica::start(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ledger-node {}: cannot start: {e}", args.id);
            return std::process::ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ledger-node {}: cannot listen on {}: {e}", args.id, args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("ledger-node {} listening on {}", args.id, args.listen);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tonic::transport::Server::builder().add_service(replica.service()).serve_with_incoming(incoming).await;
    if let Err(e) = served {
        eprintln!("ledger-node {}: server failed: {e}", args.id);
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
