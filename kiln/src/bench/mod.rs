//! `kiln bench`: the control plane's own overheads, measured on loopback against a stand-in agent whose replicas
//! answer at once (so what is measured is Kiln, not a model):
//!
//! - `gateway` ([`gateway`]): what the gateway adds in latency and CPU per request at a fixed rate, beside nginx as a
//!   reference proxy, each party in a process of its own; and the highest rate at which its added p99 stays under
//!   1 ms.
//! - `ledger` ([`ledger`]): the replicated usage ledger, three replicas on loopback gRPC: batched append
//!   throughput and commit latency at a fixed rate, beside the disk's fsync latency.
//! - `cold-start`: requests to deployments at zero replicas, one at a time; the figure is the time from the
//!   request leaving the client to the stand-in agent receiving its `StartWorker` command.
//! - `abuse`: normal traffic (open loop) while attackers hold slow-header connections and a request declaring a
//!   1 GiB body, then the gateway's resident memory while one tenant sends many 1.9 MB predictions: the normal
//!   traffic's latency and failures, and the growth of the process's RSS.
//! - `console` ([`console`]): the built-in console on a fleet of stand-in agents (1,000 nodes x 8 GPUs by
//!   default): page and fleet JSON bytes, the event stream's bytes per second, Chromium's render time.

pub mod console;
pub mod gateway;
pub mod ledger;

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kiln_controller::server::{Server, ServerOptions};
use kiln_proto::v1::{
    self, AgentMessage, agent_message, agent_service_client::AgentServiceClient, command, controller_message,
    worker_event::Event, worker_service_server::WorkerService, worker_service_server::WorkerServiceServer,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

/// `kiln bench` measurements.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Latency and CPU per request the gateway adds at a fixed rate, beside nginx; the highest rate under the goal.
    Gateway {
        /// Requests per second (open loop).
        #[arg(long, default_value_t = 2000)]
        rps: u32,
        /// Seconds measured per run (after one second of warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Client connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Rounds: each path runs once per round; figures are the median and spread over rounds.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Rates of the sweep for the highest rate with added p99 under 1 ms (empty: no sweep).
        #[arg(long, value_delimiter = ',', default_value = "1000,2000,3000,4000,6000,8000")]
        rates: Vec<u32>,
        /// Skip the rate sweep.
        #[arg(long)]
        no_sweep: bool,
        /// Seconds measured per step of the sweep.
        #[arg(long, default_value_t = 10)]
        sweep_seconds: u32,
        /// The reference proxy's binary.
        #[arg(long, default_value = "nginx")]
        nginx: std::path::PathBuf,
        /// Measure without the reference proxy.
        #[arg(long)]
        no_nginx: bool,
        /// The gateway's hop to the replica: `http1` (the worker port's HTTP/1.1 predict route, what an agent
        /// offers) or `grpc` (`WorkerService.Predict`, what an agent that does not offers the route gets).
        #[arg(long, value_enum, default_value_t = Hop::Http1)]
        hop: Hop,
        /// Skip the floor: Kiln's HTTP server and worker client alone, without the gateway's work.
        #[arg(long)]
        no_floor: bool,
    },
    /// The gateway bench's stand-in replica, in a process of its own (started by `kiln bench gateway`).
    #[command(hide = true)]
    Replica,
    /// The gateway bench's Kiln server, in a process of its own (started by `kiln bench gateway`).
    #[command(hide = true)]
    GatewayServer {
        /// The stand-in replica's worker port (gRPC and the HTTP/1.1 predict route).
        #[arg(long)]
        worker: SocketAddr,
        /// The hop to it.
        #[arg(long, value_enum, default_value_t = Hop::Http1)]
        hop: Hop,
    },
    /// The gateway bench's floor (Kiln's HTTP server and worker client without the gateway), in a process of its
    /// own (started by `kiln bench gateway`).
    #[command(hide = true)]
    FloorServer {
        /// The stand-in replica's worker port.
        #[arg(long)]
        worker: SocketAddr,
    },
    /// The replicated usage ledger on loopback: append throughput and commit latency, three replicas.
    Ledger(ledger::LedgerArgs),
    /// From a request at zero replicas to the agent receiving `StartWorker`.
    ColdStart {
        /// Deployments, each started once from zero.
        #[arg(long, default_value_t = 200)]
        deployments: u32,
    },
    /// The console on a large fleet: page weight, event-stream bytes per second, render time in Chromium.
    Console {
        /// Stand-in nodes.
        #[arg(long, default_value_t = 1000)]
        nodes: u32,
        /// GPUs per node.
        #[arg(long, default_value_t = 8)]
        gpus: u32,
        /// Seconds the event stream is read.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
        /// Chromium's binary, for the render time (skipped when it cannot be run).
        #[arg(long, default_value = "chromium")]
        chromium: std::path::PathBuf,
        /// Write a PNG of the rendered fleet page here.
        #[arg(long)]
        screenshot: Option<std::path::PathBuf>,
    },
    /// Normal traffic beside slow-header connections and a 1 GiB declared body; RSS under large predictions.
    Abuse {
        /// Normal requests per second (open loop).
        #[arg(long, default_value_t = 500)]
        rps: u32,
        /// Seconds of normal load under attack.
        #[arg(long, default_value_t = 15)]
        seconds: u32,
        /// Slow-header connections held open by the attacker.
        #[arg(long, default_value_t = 2000)]
        slow: u32,
        /// Predictions of 1.9 MB sent by one tenant afterwards.
        #[arg(long, default_value_t = 2000)]
        big: u32,
    },
}

/// The gateway's hop to a replica, as the stand-in agent registers its worker port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hop {
    /// The worker port's HTTP/1.1 predict route (`Register.worker_http1`).
    Http1,
    /// `WorkerService` over gRPC only.
    Grpc,
}

impl Hop {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Grpc => "grpc",
        }
    }
}

/// The stand-in replica's worker port, as an agent serves it: `WorkerService` over gRPC and the HTTP/1.1 predict
/// route, both answering every prediction at once.
fn stand_in_worker(listener: tokio::net::TcpListener) -> impl Future<Output = std::io::Result<()>> {
    let http = axum::routing::post(|| async {
        ([(axum::http::header::CONTENT_TYPE, "application/json")], INSTANT_OUTPUT.as_slice())
    });
    let router = tonic::service::Routes::new(WorkerServiceServer::new(Instant0))
        .into_axum_router()
        .route(kiln_proto::worker_http::PREDICT_PATH, http);
    kiln_agent::node::serve_worker(listener, router)
}

/// What the stand-in replica answers.
const INSTANT_OUTPUT: &[u8; 17] = br#"{"output": [1.0]}"#;

/// The stand-in replica: answers every prediction at once.
#[derive(Debug, Clone, Copy)]
struct Instant0;

type Chunks = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::PredictChunk, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for Instant0 {
    async fn predict(
        &self,
        request: tonic::Request<v1::PredictRequest>,
    ) -> Result<tonic::Response<v1::PredictResponse>, tonic::Status> {
        let r = request.into_inner();
        Ok(tonic::Response::new(v1::PredictResponse {
            prediction_id: r.prediction_id,
            output: INSTANT_OUTPUT.to_vec(),
            content_type: "application/json".into(),
            metrics: None,
        }))
    }

    type PredictStreamStream = Chunks;

    async fn predict_stream(
        &self,
        _request: tonic::Request<v1::PredictRequest>,
    ) -> Result<tonic::Response<Chunks>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in the benchmark"))
    }
}

/// A stand-in agent: registers 8 GPUs, acks every command, reports each started replica ready at once, and
/// records when each `StartWorker` arrived.
async fn stand_in_agent(
    controller: SocketAddr,
    worker: SocketAddr,
    hop: Hop,
    starts: Arc<Mutex<HashMap<String, Instant>>>,
) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{controller}"))?.connect().await?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
    let seq = std::sync::atomic::AtomicU64::new(0);
    let next = move || seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let gpus = (0..8)
        .map(|i| v1::Gpu {
            index: i,
            uuid: format!("GPU-bench-{i}"),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            health: v1::GpuHealth::Healthy as i32,
            ..Default::default()
        })
        .collect();
    let register = v1::Register {
        node_name: "bench-node".into(),
        simulated: true,
        gpus,
        worker_endpoint: worker.to_string(),
        worker_http1: hop == Hop::Http1,
        cpu_milli: 256_000,
        host_memory_bytes: 2 << 40,
        ..Default::default()
    };
    tx.send(AgentMessage { seq: next(), body: Some(agent_message::Body::Register(register)) }).await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    let heartbeat = tx.clone();
    tokio::spawn(async move {
        let mut n = 1_000_000;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            n += 1;
            let hb = AgentMessage { seq: n, body: Some(agent_message::Body::Heartbeat(v1::Heartbeat::default())) };
            if heartbeat.send(hb).await.is_err() {
                return;
            }
        }
    });
    while let Some(message) = inbound.message().await? {
        let Some(controller_message::Body::Command(c)) = message.body else { continue };
        let ack = |status: v1::AckStatus| AgentMessage {
            seq: next(),
            body: Some(agent_message::Body::Ack(v1::CommandAck {
                command_id: c.command_id.clone(),
                status: status as i32,
                message: String::new(),
            })),
        };
        match c.action {
            Some(command::Action::StartWorker(start)) => {
                starts.lock().unwrap_or_else(|p| p.into_inner()).insert(start.deployment.clone(), Instant::now());
                tx.send(ack(v1::AckStatus::Accepted)).await?;
                let ready = v1::WorkerEvent {
                    replica_id: start.replica_id,
                    command_id: c.command_id.clone(),
                    time: None,
                    event: Some(Event::Ready(v1::WorkerReady {
                        max_concurrency: start.max_concurrency,
                        ..Default::default()
                    })),
                };
                tx.send(AgentMessage { seq: next(), body: Some(agent_message::Body::WorkerEvent(ready)) }).await?;
            }
            _ => tx.send(ack(v1::AckStatus::Done)).await?,
        }
    }
    Ok(())
}

/// A minimal keep-alive HTTP/1.1 client for one connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buf: Vec::with_capacity(4096) })
    }

    /// Sends `request` and reads one response; returns the status.
    async fn call(&mut self, request: &[u8]) -> Result<u16> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the gateway closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = std::str::from_utf8(&self.buf[..end])?;
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .context("no content-length")?
                .parse()?;
            if self.buf.len() >= end + 4 + length {
                return Ok(head.get(9..12).context("short status line")?.parse()?);
            }
        }
    }
}

/// Sends `request` over `connections` keep-alive connections at `rps` in all for `total` (open loop: each request
/// has its due time, and its latency is counted from then, so a stall is not hidden); returns the latencies of the
/// requests answered 200 after `warmup`, and how many were not (a connection that failed is opened again).
async fn open_loop(
    http: SocketAddr,
    request: Vec<u8>,
    connections: u32,
    rps: u32,
    total: Duration,
    warmup: Duration,
) -> Result<(Vec<f64>, u32)> {
    let per_conn = Duration::from_secs_f64(f64::from(connections) / f64::from(rps.max(1)));
    let request = Arc::new(request);
    let tasks: Vec<_> = (0..connections)
        .map(|k| {
            let request = Arc::clone(&request);
            tokio::spawn(async move {
                let start = Instant::now() + per_conn.mul_f64(f64::from(k) / f64::from(connections));
                let (mut latencies, mut failed) = (Vec::new(), 0u32);
                let mut conn = Conn::open(http).await.ok();
                let mut i = 0u32;
                loop {
                    let due = start + per_conn * i;
                    if due > start + total {
                        return (latencies, failed);
                    }
                    tokio::time::sleep_until(due.into()).await;
                    if conn.is_none() {
                        conn = Conn::open(http).await.ok();
                    }
                    let ok = match conn.as_mut() {
                        Some(c) => matches!(c.call(&request).await, Ok(200)),
                        None => false,
                    };
                    if !ok {
                        failed += 1;
                        conn = None;
                    } else if due > start + warmup {
                        latencies.push(due.elapsed().as_secs_f64());
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let (mut latencies, mut failed) = (Vec::new(), 0u32);
    for t in tasks {
        let (l, f) = t.await?;
        latencies.extend(l);
        failed += f;
    }
    Ok((latencies, failed))
}

fn percentiles(mut samples: Vec<f64>) -> [f64; 4] {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples.get(((samples.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    [at(0.5), at(0.9), at(0.99), at(0.999)]
}

fn ms(s: f64) -> String {
    format!("{:.3}", s * 1000.0)
}

/// Writes a manifest per deployment into `dir`.
fn manifests(dir: &std::path::Path, names: &[String], min_replicas: u32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for name in names {
        let text = format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\n  namespace: bench\nspec:\n  \
             model:\n    uri: file:///dev/null\n    size: 1Mi\n  gpu:\n    count: 1\n    memoryPerGpu: 1Gi\n  scaling:\n    \
             minReplicas: {min_replicas}\n    maxReplicas: 4\n    targetConcurrency: 1000\n    keepAlive:\n      policy: fixed\n      duration: 1h\n"
        );
        std::fs::write(dir.join(format!("{name}.yaml")), text)?;
    }
    Ok(())
}

/// The API key of the bench's tenant (namespace `bench`).
const BENCH_KEY: &str = "bench-key-0123456789";

/// A Kiln server started for a benchmark, with a stand-in agent whose replicas are served at `worker`.
struct Running {
    http: SocketAddr,
    control: Arc<kiln_controller::control::ControlPlane>,
    persister: kiln_controller::store::Persister,
    starts: Arc<Mutex<HashMap<String, Instant>>>,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// Writes a manifest per name into `dir` (namespace `bench`; and `greedy/instant` for the abuse bench's second
/// tenant), starts the server on loopback with a redb store in `dir` and tenant limits out of the way, and a
/// stand-in agent; returns once the deployments are loaded and the agent has registered.
async fn start_server(
    dir: &std::path::Path,
    names: &[String],
    min_replicas: u32,
    worker: SocketAddr,
    hop: Hop,
) -> Result<Running> {
    manifests(dir, names, min_replicas)?;
    if names.iter().any(|n| n == "instant") {
        // The abuse bench's second tenant's own deployment.
        let text = std::fs::read_to_string(dir.join("instant.yaml"))?.replace("namespace: bench", "namespace: greedy");
        std::fs::write(dir.join("greedy.yaml"), text)?;
    }
    // What is measured is the gateway, not the tenant limits: they are set out of the way (the abuse bench's
    // second tenant still meets the limit on the input bytes its unfinished predictions hold).
    let tenant_limits = kiln_controller::limits::LimitConfig {
        rate_per_s: 1e6,
        burst: 1e6,
        max_in_flight: 1_000_000,
        ..kiln_controller::limits::LimitConfig::default()
    };
    let server = Server::bind(ServerOptions {
        manifests: Some(dir.to_owned()),
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        agent_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_keys: vec![(BENCH_KEY.into(), "bench".into()), ("greedy-key-0123456789".into(), "greedy".into())],
        tenant_limits,
        watch_interval: Duration::from_millis(200),
        // As `kiln up` keeps predictions: every transition written to redb on this disk.
        store: Arc::new(kiln_controller::store::RedbStore::open(&dir.join("predictions.redb"))?),
        ..ServerOptions::default()
    })
    .await?;
    let (http, agents, control) = (server.http_addr, server.agent_addr, Arc::clone(&server.control));
    let persister = server.persister.clone();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(server.serve(stop));
    let starts = Arc::new(Mutex::new(HashMap::new()));
    let agent = tokio::spawn(stand_in_agent(agents, worker, hop, Arc::clone(&starts)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let expected = names.len() + usize::from(names.iter().any(|n| n == "instant"));
    while control.statuses().len() < expected || control.gpu_milli().1 == 0 {
        if Instant::now() > deadline || agent.is_finished() {
            bail!("the benchmark's controller did not come up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Running { http, control, persister, starts, _stop: stop_tx })
}

/// Runs one benchmark and prints its figures.
pub fn run(bench: &Bench) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let names: Vec<String> = match bench {
            Bench::Gateway {
                rps,
                seconds,
                connections,
                runs,
                rates,
                no_sweep,
                sweep_seconds,
                nginx,
                no_nginx,
                hop,
                no_floor,
            } => {
                let found = !no_nginx && Command::new(nginx).arg("-v").output().is_ok();
                let options = gateway::Options {
                    rps: *rps,
                    seconds: *seconds,
                    connections: *connections,
                    runs: *runs,
                    rates: if *no_sweep { Vec::new() } else { rates.clone() },
                    sweep_seconds: *sweep_seconds,
                    nginx: found.then(|| nginx.clone()),
                    hop: *hop,
                    floor: !no_floor,
                };
                return gateway::run(&options).await;
            }
            Bench::Replica => return gateway::replica().await,
            Bench::Ledger(args) => return ledger::run(args).await,
            Bench::Console { nodes, gpus, seconds, chromium, screenshot } => {
                let found = Command::new(chromium).arg("--version").output().is_ok_and(|o| o.status.success());
                let options = console::Options {
                    nodes: *nodes,
                    gpus: *gpus,
                    seconds: *seconds,
                    chromium: found.then(|| chromium.clone()),
                    screenshot: screenshot.clone(),
                };
                return console::run(&options).await;
            }
            Bench::GatewayServer { worker, hop } => return gateway::gateway_server(*worker, *hop).await,
            Bench::FloorServer { worker } => return gateway::floor_server(*worker).await,
            Bench::Abuse { .. } => vec!["instant".into()],
            Bench::ColdStart { deployments } => (0..*deployments).map(|i| format!("d{i}")).collect(),
        };
        let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let worker = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let worker_addr = worker.local_addr()?;
        tokio::spawn(stand_in_worker(worker));
        let min_replicas = u32::from(!matches!(bench, Bench::ColdStart { .. }));
        let running = start_server(&dir, &names, min_replicas, worker_addr, Hop::Http1).await?;
        let result = match bench {
            Bench::ColdStart { .. } => cold_start(running.http, &names, &running.starts).await,
            Bench::Abuse { rps, seconds, slow, big } => {
                abuse(running.http, &running.control, *rps, *seconds, *slow, *big).await
            }
            Bench::Gateway { .. }
            | Bench::Replica
            | Bench::GatewayServer { .. }
            | Bench::FloorServer { .. }
            | Bench::Ledger(_)
            | Bench::Console { .. } => Ok(()),
        };
        drop(running);
        let _ = std::fs::remove_dir_all(&dir);
        result
    })
}

async fn cold_start(http: SocketAddr, names: &[String], starts: &Arc<Mutex<HashMap<String, Instant>>>) -> Result<()> {
    let mut gaps = Vec::new();
    let mut totals = Vec::new();
    let mut conn = Conn::open(http).await?;
    for name in names {
        let body = r#"{"input": {"x": [1.0]}}"#;
        let request = format!(
            "POST /v1/deployments/bench/{name}/predictions HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer \
             bench-key-0123456789\r\nPrefer: wait\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let sent = Instant::now();
        let status = conn.call(request.as_bytes()).await?;
        let done = sent.elapsed();
        if status != 200 {
            bail!("bench/{name}: status {status}");
        }
        let started = starts.lock().unwrap_or_else(|p| p.into_inner()).get(&format!("bench/{name}")).copied();
        let Some(started) = started else { bail!("bench/{name}: the agent never got a StartWorker") };
        gaps.push(started.duration_since(sent).as_secs_f64());
        totals.push(done.as_secs_f64());
    }
    let g = percentiles(gaps);
    let t = percentiles(totals);
    println!("kiln bench cold-start: {} deployments at zero replicas, one request each", names.len());
    println!("{:<44} {:>9} {:>9} {:>9} {:>9}", "ms", "p50", "p90", "p99", "p99.9");
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "request sent -> agent receives StartWorker",
        ms(g[0]),
        ms(g[1]),
        ms(g[2]),
        ms(g[3])
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "request sent -> answer (instant load)",
        ms(t[0]),
        ms(t[1]),
        ms(t[2]),
        ms(t[3])
    );
    Ok(())
}

/// Resident memory of this process, bytes (`VmRSS`).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Sends part of a request's headers, then a byte every second; returns when the gateway closes the connection
/// (or after `hold`), saying whether it did.
async fn slow_header(http: SocketAddr, hold: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect(http).await else { return true };
    let deadline = Instant::now() + hold;
    if s.write_all(b"POST /v1/deployments/bench/instant/predictions HTTP/1.1\r\nHost: x\r\n").await.is_err() {
        return true;
    }
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if s.write_all(b"X").await.is_err() {
            return true;
        }
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            return true;
        }
    }
    false
}

async fn abuse(
    http: SocketAddr,
    control: &Arc<kiln_controller::control::ControlPlane>,
    rps: u32,
    seconds: u32,
    slow: u32,
    big: u32,
) -> Result<()> {
    while ["bench/instant", "greedy/instant"].iter().any(|d| control.status(d).is_none_or(|s| s.ready == 0)) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hold = Duration::from_secs(u64::from(seconds) + 5);
    // The attack: slow-header connections, and one request declaring a 1 GiB body it never sends.
    let attackers: Vec<_> = (0..slow).map(|_| tokio::spawn(slow_header(http, hold))).collect();
    let huge = tokio::spawn(async move {
        let began = Instant::now();
        let mut s = TcpStream::connect(http).await?;
        s.write_all(
            b"POST /v1/deployments/bench/instant/predictions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
              bench-key-0123456789\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{\"input\":",
        )
        .await?;
        let mut head = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut head)).await??;
        let status = String::from_utf8_lossy(&head[..n]).get(9..12).unwrap_or("---").to_owned();
        Ok::<_, anyhow::Error>((status, began.elapsed()))
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Normal traffic meanwhile: open loop, latency from each request's scheduled time.
    let body = r#"{"input": {"x": [1.0]}}"#;
    let request = format!(
        "POST /v1/deployments/bench/instant/predictions HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer \
         bench-key-0123456789\r\nPrefer: wait\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let total = Duration::from_secs(u64::from(seconds));
    let (latencies, failed) = open_loop(http, request, 16, rps, total, Duration::ZERO).await?;
    let (huge_status, huge_after) = huge.await??;
    let mut closed = 0;
    for a in attackers {
        closed += u32::from(a.await?);
    }
    let n = latencies.len();
    let p = percentiles(latencies);
    println!(
        "kiln bench abuse: {rps} requests/s for {seconds} s beside {slow} slow-header connections and a 1 GiB declared body"
    );
    println!(
        "normal traffic: {n} answered 200, {failed} failed; latency ms p50 {} p90 {} p99 {} p99.9 {}",
        ms(p[0]),
        ms(p[1]),
        ms(p[2]),
        ms(p[3])
    );
    println!("slow-header connections closed by the gateway: {closed} of {slow}");
    println!("1 GiB declared body: HTTP {huge_status} after {:.1} ms", huge_after.as_secs_f64() * 1000.0);

    // Memory: one tenant sends `big` predictions of 1.9 MB (async), 16 at a time.
    let payload = format!("{{\"input\": {{\"x\": \"{}\"}}}}", "a".repeat(1_900_000));
    let request = format!(
        "POST /v1/deployments/greedy/instant/predictions HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer \
         greedy-key-0123456789\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )
    .into_bytes();
    // Three rounds: memory that is bounded levels off (what the allocator keeps from the first round is reused),
    // memory that leaks grows with every round.
    let request = Arc::new(request);
    let per = big.div_ceil(16);
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    println!(
        "one tenant sends {} predictions of 1.9 MB ({:.0} MiB) per round, 16 at a time; RSS before: {:.0} MiB",
        per * 16,
        f64::from(per * 16) * 1.9,
        mib(rss_bytes())
    );
    for round in 1..=3 {
        let senders: Vec<_> = (0..16)
            .map(|_| {
                let request = Arc::clone(&request);
                tokio::spawn(async move {
                    let mut counts = HashMap::<u16, u32>::new();
                    let mut conn = Conn::open(http).await?;
                    for _ in 0..per {
                        let status = conn.call(&request).await.unwrap_or(0);
                        *counts.entry(status).or_default() += 1;
                        if status == 0 {
                            conn = Conn::open(http).await?;
                        }
                    }
                    Ok::<_, anyhow::Error>(counts)
                })
            })
            .collect();
        let mut counts = HashMap::<u16, u32>::new();
        for t in senders {
            for (k, v) in t.await?? {
                *counts.entry(k).or_default() += v;
            }
        }
        // Let the accepted ones finish.
        let deadline = Instant::now() + Duration::from_secs(30);
        while control.status("greedy/instant").is_some_and(|s| s.in_flight + s.waiting > 0) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut statuses: Vec<_> = counts.into_iter().collect();
        statuses.sort_unstable();
        println!("round {round}: statuses {statuses:?}; RSS after {:.0} MiB", mib(rss_bytes()));
    }
    Ok(())
}
