//! `kiln-agent`: the node agent's command line; see the library's documentation ([`kiln_agent`]).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use kiln_agent::node::{Node, NodeOptions, host_name};

/// Kiln node agent.
#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Controller gRPC address (`AgentService`).
    #[arg(long, env = "KILN_CONTROLLER", default_value = "http://127.0.0.1:7070")]
    controller: String,
    /// Node name to register as; defaults to the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Simulate GPUs instead of using NVML, e.g. `h100-80gb:8` (also used, with `h100-80gb:8`, when NVML finds
    /// no GPU).
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// Where to serve Prometheus metrics (dcgm-exporter compatible names), `/healthz` and `/v1/gpus`.
    #[arg(long, default_value = "0.0.0.0:9400")]
    metrics_addr: SocketAddr,
    /// Where to serve the admin endpoints (fault injection for simulated GPUs).
    #[arg(long, default_value = "127.0.0.1:9401")]
    admin_addr: SocketAddr,
    /// GPU sampling interval, e.g. `1s` (NVML takes a global driver lock: do not poll faster than needed).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    sample_interval: Duration,
    /// Directory of the local-disk weight cache.
    #[arg(long, env = "KILN_CACHE_DIR", default_value = "/var/lib/kiln/cache")]
    cache_dir: std::path::PathBuf,
    /// Size of the local-disk weight cache, e.g. `200GiB`.
    #[arg(long, default_value = "200GiB", value_parser = parse_size)]
    disk_cache_size: u64,
    /// Size of the host-RAM weight cache, e.g. `64GiB` (page-locked where CUDA runs, so entries reach a GPU at the
    /// bus's speed; weights leaving the GPUs are kept there; 0: no host tier).
    #[arg(long, default_value = "64GiB", value_parser = parse_size)]
    host_cache_size: u64,
    /// Where the gateway reaches this agent's WorkerService (reported to the controller).
    #[arg(long, default_value = "127.0.0.1:7443")]
    worker_endpoint: String,
    /// Do not connect to a controller (GPU telemetry, metrics, admin endpoints and workers only).
    #[arg(long)]
    standalone: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inject an Xid error on a simulated GPU of a running agent.
    InjectXid {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
        /// Xid code (79: fell off the bus; 48: double-bit ECC; 13: application fault).
        #[arg(long)]
        xid: u32,
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:9401")]
        admin: SocketAddr,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Measure weight-load bandwidth on this node: local disk to host RAM, and host RAM copies.
    BenchLoad {
        /// Bytes to move, e.g. `4GiB`.
        #[arg(long, default_value = "4GiB", value_parser = parse_size)]
        size: u64,
        /// Directory for the test file (on the disk the weight cache uses).
        #[arg(long, default_value = "/var/lib/kiln/cache")]
        dir: std::path::PathBuf,
        /// Instead: build a model file of `--size`, cache it, and time cold starts through the CPU path from the
        /// disk cache (page cache warm) against a raw read of the same file.
        #[arg(long)]
        cold_start: bool,
        /// Cold starts to time (the median is printed).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The dtype of the model `--cold-start` builds: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: kiln_agent::model::Dtype,
    },
    /// Write a dense model of about `--size` as a safetensors file the native runtime serves (`--width` x
    /// `--width` identity layers): for cold-start measurements through `kiln up` or a real cluster.
    MakeModel {
        /// Bytes of weights, e.g. `1.34GB`.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: kiln_agent::model::Dtype,
        /// Inputs and outputs of every layer.
        #[arg(long, default_value_t = 2048)]
        width: usize,
        /// The file to write.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// A minimal model server for smoke tests of the process runtime: listens on `$PORT` (loopback), answers
    /// `GET /health` and echoes `POST /predictions` as `{"output": <input>, "gpus": "<CUDA_VISIBLE_DEVICES>"}`.
    EchoServer {
        /// Exit (with status 1) after this long, to exercise crash handling.
        #[arg(long, value_parser = parse_interval)]
        exit_after: Option<Duration>,
    },
    /// Reset a simulated GPU of a running agent (it returns to service).
    ResetGpu {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:9401")]
        admin: SocketAddr,
        #[command(flatten)]
        token: TokenArgs,
    },
}

/// The agent's admin token.
#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The file the agent keeps its admin token in (`<cache dir>/admin-token`).
    #[arg(long, default_value = "/var/lib/kiln/cache/admin-token")]
    token_file: std::path::PathBuf,
    /// The admin token itself (instead of --token-file).
    #[arg(long, env = "KILN_AGENT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl TokenArgs {
    fn read(&self) -> Result<String> {
        match &self.token {
            Some(t) => Ok(t.trim().to_owned()),
            None => Ok(std::fs::read_to_string(&self.token_file)
                .with_context(|| format!("reading the admin token from {}", self.token_file.display()))?
                .trim()
                .to_owned()),
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let units = [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("TB", 1_000_000_000_000),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
    ];
    let (number, scale) =
        units.iter().find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, *scale))).unwrap_or((s, 1));
    let value: f64 = number.trim().parse().map_err(|_| format!("{s:?}: expected a size like 200GiB or 500MB"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{s:?}: a size must not be negative"));
    }
    Ok((value * scale as f64) as u64)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let (number, scale) = match s.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    let seconds: f64 = number.parse().map_err(|_| format!("{s:?}: expected a duration like 1s or 500ms"))?;
    if !(0.05..=3600.0).contains(&(seconds * scale)) {
        return Err(format!("{s:?}: between 50ms and 1h"));
    }
    Ok(Duration::from_secs_f64(seconds * scale))
}

fn main() -> ExitCode {
    kiln_agent::allocator::bound_retention();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match &args.command {
        Some(Command::InjectXid { gpu, xid, admin, token }) => token.read().and_then(|token| {
            admin_post(*admin, &token, &format!("/admin/gpus/{gpu}/xid"), &format!("{{\"xid\":{xid}}}"))
        }),
        Some(Command::ResetGpu { gpu, admin, token }) => {
            token.read().and_then(|token| admin_post(*admin, &token, &format!("/admin/gpus/{gpu}/reset"), "{}"))
        }
        Some(Command::BenchLoad { size, dir, cold_start: true, runs, dtype }) => {
            bench_cold_start(dir, *size, *runs, *dtype)
        }
        Some(Command::BenchLoad { size, dir, cold_start: false, .. }) => bench_load(dir, *size),
        Some(Command::MakeModel { size, dtype, width, out }) => make_model(out, *size, *width, *dtype),
        Some(Command::EchoServer { exit_after }) => echo_server(*exit_after),
        None => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let options = NodeOptions {
        node: args.node_name.clone().filter(|n| !n.is_empty()).unwrap_or_else(host_name),
        simulate_gpus: args.simulate_gpus.clone(),
        metrics_addr: args.metrics_addr,
        admin_addr: args.admin_addr,
        worker_addr: worker_bind(&args.worker_endpoint)?,
        advertise: None,
        sample_interval: args.sample_interval,
        cache_dir: args.cache_dir.clone(),
        disk_cache_size: args.disk_cache_size,
        host_cache_size: args.host_cache_size,
        controller: (!args.standalone).then(|| args.controller.clone()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let node = Node::open(options).await?;
        let a = &node.addresses;
        // One write, errors ignored: an agent whose stdout was closed (a supervisor that stopped reading) keeps
        // serving instead of dying on a broken pipe, as `println!` would make it.
        let _ = write!(
            std::io::stdout().lock(),
            "kiln-agent: {}\nmetrics: http://{}/metrics\nadmin: http://{}/admin/gpus/<index>/xid (token in {})\n\
             workers: grpc://{} (kiln.agent.v1.WorkerService)\n",
            a.summary,
            a.metrics,
            a.admin,
            a.admin_token_file.display(),
            a.workers
        )
        .and_then(|()| std::io::stdout().flush());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("interrupted; exiting");
                let _ = stop.send(true);
            }
        });
        Ok(node.serve(stopped).await?)
    })
}

/// The worker endpoint as an address to bind (`host:port`; a host name is resolved).
fn worker_bind(endpoint: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    endpoint
        .to_socket_addrs()
        .with_context(|| format!("--worker-endpoint {endpoint}: expected host:port"))?
        .next()
        .with_context(|| format!("--worker-endpoint {endpoint}: no address"))
}

fn echo_server(exit_after: Option<Duration>) -> Result<()> {
    let port: u16 = std::env::var("PORT").context("PORT is not set")?.parse().context("PORT is not a port")?;
    let gpus = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("binding port {port}"))?;
    if let Some(after) = exit_after {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            eprintln!("echo-server: exiting as asked");
            std::process::exit(1);
        });
    }
    println!("echo-server: listening on 127.0.0.1:{port}, GPUs {gpus:?}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        // Read the head, then as much body as Content-Length says.
        let (head, mut body) = loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break (String::new(), Vec::new());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break (String::from_utf8_lossy(&buf[..i]).into_owned(), buf[i + 4..].to_vec());
            }
        };
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body.len() < length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        let (status, answer) = if head.starts_with("GET /health") {
            ("200 OK", "ok".to_owned())
        } else if head.starts_with("POST /predictions") {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => ("200 OK", serde_json::json!({ "output": v.get("input"), "gpus": gpus }).to_string()),
                Err(e) => ("400 Bad Request", format!("not JSON: {e}")),
            }
        } else {
            ("404 Not Found", "unknown path".to_owned())
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        );
    }
    Ok(())
}

fn bench_load(dir: &std::path::Path, size: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = kiln_agent::bench::run(dir, size).with_context(|| format!("benchmarking in {}", dir.display()))?;
    let gib = size as f64 / (1u64 << 30) as f64;
    println!("moved {gib:.2} GiB");
    println!(
        "disk -> host RAM: {:.2} GB/s{}",
        r.disk_gbps,
        if r.page_cache_dropped { "" } else { " (page cache not dropped: may be the cache's speed)" }
    );
    println!("host RAM -> host RAM (memcpy): {:.2} GB/s", r.host_copy_gbps);
    let (t, (pc1, pcn), (h1, hn)) = (r.fill_threads, r.fill_page_cache_gbps, r.fill_host_gbps);
    println!("the loader's staging fill from the page cache: {pc1:.2} GB/s on 1 thread, {pcn:.2} GB/s on {t}");
    println!("the loader's staging fill from host RAM: {h1:.2} GB/s on 1 thread, {hn:.2} GB/s on {t}");
    if kiln_agent::cuda::available() {
        match kiln_agent::cuda::bench_host_to_device(0, size as usize, 4) {
            Ok(r) => {
                println!("host RAM -> GPU 0, one plain pinned cudaMemcpyAsync (reference): {:.2} GB/s", r.plain);
                println!(
                    "host RAM -> GPU 0, the loader from pageable memory (pinned staging on 4 streams): {:.2} GB/s = {:.0}%",
                    r.staged,
                    100.0 * r.staged / r.plain.max(1e-9)
                );
                match r.pinned {
                    Some(p) => println!(
                        "host RAM -> GPU 0, the loader from the pinned host-RAM tier (straight): {p:.2} GB/s = {:.0}%",
                        100.0 * p / r.plain.max(1e-9)
                    ),
                    None => println!("host RAM -> GPU 0 from pinned memory: not measured (pinning failed)"),
                }
            }
            Err(e) => println!("host -> GPU: not measured: {e}"),
        }
        match kiln_agent::cuda::bench_staging(0, dir, (size as usize).min(1 << 30), 4) {
            Ok(variants) => {
                println!(
                    "the staged loader by buffer size and fill threads (GB/s: from pageable memory, from the page cache):"
                );
                for v in variants {
                    println!(
                        "  {:>2} MiB buffers, {:>2} threads: {:.2}, {:.2}",
                        v.chunk >> 20,
                        v.threads,
                        v.from_memory,
                        v.from_page_cache
                    );
                }
            }
            Err(e) => println!("staging variants: not measured: {e}"),
        }
    } else {
        println!("host -> GPU: not measured (no CUDA driver library on this machine)");
    }
    Ok(())
}

fn make_model(out: &std::path::Path, size: u64, width: usize, dtype: kiln_agent::model::Dtype) -> Result<()> {
    anyhow::ensure!(width > 0, "--width must be positive");
    let params = kiln_agent::bench::write_dense_model(out, size, width, dtype)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}: {params} parameters ({}), {width} inputs and outputs, {} bytes",
        out.display(),
        dtype.name(),
        std::fs::metadata(out)?.len()
    );
    Ok(())
}

fn bench_cold_start(dir: &std::path::Path, size: u64, runs: usize, dtype: kiln_agent::model::Dtype) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = kiln_agent::bench::cold_start(dir, size, runs, dtype)?;
    let gb = r.bytes as f64 / 1e9;
    println!(
        "model: {:.2} GB, {} parameters ({}), CPU path, page cache warm, median of {runs}",
        gb,
        r.params,
        dtype.name()
    );
    println!(
        "first start (fetch into the disk cache, hashed once): {:.3} s, {} bytes hashed",
        r.miss_s, r.miss_hashed_bytes
    );
    let [lookup, read, parse, convert, init] = r.phases;
    println!(
        "cold start from the {:?} cache: {:.3} s (lookup {:.4} s, read {:.3} s, parse {:.4} s, convert {:.3} s, \
         first forward {:.3} s); bytes hashed by all {runs} hits: {}",
        r.hit_tier, r.cold_start_s, lookup, read, parse, convert, init, r.hit_hashed_bytes
    );
    println!(
        "raw read of the same file (1 MiB preads on {} threads): {:.3} s = {:.2} GB/s",
        kiln_agent::parallel::default_threads(),
        r.raw_read_s,
        gb / r.raw_read_s.max(1e-9)
    );
    println!("cold start / raw read: {:.2}x", r.ratio());
    match &r.gpu {
        None => println!("GPU path: not measured (no CUDA driver library on this machine)"),
        Some(Err(e)) => println!("GPU path: failed: {e}"),
        Some(Ok(g)) => {
            println!("CUDA prewarm (as the agent does at start: driver init, kernels compiled): {:.3} s", g.prewarm_s);
            let mut starts =
                vec![("the disk cache (page cache warm)", g.from_disk), ("pageable host RAM", g.from_host)];
            match g.from_pinned {
                Some(s) => starts.push(("the host-RAM tier (pinned)", s)),
                None => println!("the host-RAM tier could not be pinned here"),
            }
            for (from, s) in starts {
                let t = s.timings;
                println!(
                    "cold start from {from} onto GPU 0: {:.3} s (header {:.4} s, CUDA init {:.3} s, streaming to the \
                     GPU {:.3} s = {:.2} GB/s, first forward {:.4} s)",
                    s.total_s,
                    t.read.as_secs_f64(),
                    t.init.as_secs_f64(),
                    t.host_to_device.as_secs_f64(),
                    gb / t.host_to_device.as_secs_f64().max(1e-9),
                    s.first_forward_s
                );
            }
            let m = g.memory;
            println!(
                "GPU memory: the weights hold {:.3} GB; in use on GPU 0 with a context alone {:.3} GB (stack limit {} \
                 B), with the model loaded and run {:.3} GB",
                g.device_bytes as f64 / 1e9,
                m.context as f64 / 1e9,
                m.stack_limit,
                m.with_model as f64 / 1e9
            );
        }
    }
    Ok(())
}

/// POSTs `body` to the agent's admin endpoint `path` and prints its answer.
fn admin_post(admin: SocketAddr, token: &str, path: &str, body: &str) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .with_context(|| format!("connecting to the agent's admin address {admin}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or("?").to_owned();
    let text = response.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default();
    if status != "200" {
        bail!("{path}: HTTP {status}: {text}");
    }
    println!("{text}");
    Ok(())
}
