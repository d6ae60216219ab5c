//! `kiln bench gateway`: what the gateway adds to a request, in latency and in CPU, beside an established reverse
//! proxy on the same machine.
//!
//! Each party runs in a process of its own so its CPU time can be read from `/proc`: the stand-in replica
//! (`kiln bench replica`: answers every prediction at once, over plain HTTP/1.1 on one port, and on a worker port
//! as an agent serves it: `WorkerService` over gRPC beside the HTTP/1.1 predict route), the Kiln gateway
//! (`kiln bench gateway-server`: the real server with a stand-in agent that registered the replica and a redb
//! prediction store, as `kiln up` runs it), nginx when it is installed (`proxy_pass` to the replica's HTTP port over
//! keep-alive upstream connections, one worker process), and the load generator (this process: open loop, each
//! request timed from its due time, so a stall is not hidden).
//!
//! Four paths are measured with the same schedule: straight to the replica (HTTP), through nginx (HTTP → HTTP),
//! through the floor (`kiln bench floor-server`: the gateway's HTTP server and worker client with none of the
//! gateway's work, which shows what the stack costs by itself; `--no-floor` skips it) and through Kiln (HTTP → the
//! worker port, `Prefer: wait`; its hop is the HTTP/1.1 predict route, or gRPC with `--hop grpc`). A round runs each
//! path once; rounds repeat `--runs` times and each
//! figure is printed as the median with the spread (min–max) of the runs. Latency percentiles of different requests
//! do not subtract, so "added" is stated for what it is: in each round, a path's percentile minus the direct path's
//! same percentile, then the median over rounds. CPU per request is a process's CPU time (`utime + stime`) over the
//! measured window divided by the requests answered in it; the gateway's time is also broken down by thread name.
//! Last, a sweep over rising rates finds the highest at which each proxy's added p99 stays under 1 ms.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{open_loop, percentiles};

/// The added p99 a proxy must stay under in the rate sweep, seconds.
const GOAL_P99_S: f64 = 0.001;
/// Warm-up before each measured window.
const WARMUP: Duration = Duration::from_secs(1);

/// What `kiln bench gateway` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Requests per second.
    pub rps: u32,
    /// Measured seconds per run.
    pub seconds: u32,
    /// Client connections.
    pub connections: u32,
    /// Rounds (each path once per round).
    pub runs: u32,
    /// Rates of the sweep, ascending; empty: no sweep.
    pub rates: Vec<u32>,
    /// Measured seconds per sweep step.
    pub sweep_seconds: u32,
    /// The nginx binary, `None`: no reference proxy.
    pub nginx: Option<PathBuf>,
    /// The gateway's hop to the replica.
    pub hop: super::Hop,
    /// Whether the floor (Kiln's HTTP server and worker client alone) is measured too.
    pub floor: bool,
}

/// The response the stand-in replica gives over HTTP.
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"output\": [1.0]}";

/// `kiln bench replica`: the stand-in replica in a process of its own. Prints `grpc=<addr> http=<addr>` and serves
/// until its standard input closes.
pub async fn replica() -> Result<()> {
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    println!("grpc={} http={}", grpc.local_addr()?, http.local_addr()?);
    std::io::stdout().flush()?;
    tokio::spawn(super::stand_in_worker(grpc));
    tokio::spawn(async move {
        while let Ok((stream, _)) = http.accept().await {
            tokio::spawn(serve_http(stream));
        }
    });
    until_stdin_closes().await
}

/// Answers HTTP/1.1 requests on one keep-alive connection with [`HTTP_RESPONSE`].
async fn serve_http(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // One request: headers, then the body its Content-Length declares.
        let (end, length) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..end])?;
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .map_or(Ok(0), |v| v.parse())?;
                break (end + 4, length);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        while buf.len() < end + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..end + length);
        stream.write_all(HTTP_RESPONSE).await?;
    }
}

/// `kiln bench gateway-server`: Kiln's server with a stand-in agent whose replica is on `worker`, in a process
/// of its own. Prints `http=<addr>` once the deployment has a ready replica; when its standard input closes, flushes
/// the prediction store and prints its figures.
pub async fn gateway_server(worker: SocketAddr, hop: super::Hop) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-gateway-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let running = super::start_server(&dir, &["instant".to_owned()], 1, worker, hop).await?;
    while running.control.status("bench/instant").is_none_or(|s| s.ready == 0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("http={}", running.http);
    std::io::stdout().flush()?;
    until_stdin_closes().await?;
    running.persister.flush().await?;
    let stats = running.persister.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "store written={} commits={} busy_us={}",
        load(&stats.written),
        load(&stats.commits),
        load(&stats.busy_us)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `kiln bench floor-server`: the stack the gateway is built on with none of the gateway, in a process of its own.
/// The same HTTP/1.1 server (`connections::serve` with its limits: hyper, an axum router on the same route) and the
/// same client of the worker port's predict route (`WorkerHttp`, keep-alive connections), on the same tokio
/// runtime; each request's body is sent to the replica as it came and the replica's answer back. No key,
/// admission, JSON, prediction record or store: its CPU per request is what the gateway cannot go below on this
/// stack, and the gateway's own work is the rest. Prints `http=<addr>`; serves until its standard input closes.
pub async fn floor_server(worker: SocketAddr) -> Result<()> {
    use axum::{http::StatusCode, response::IntoResponse};
    let client = Arc::new(kiln_controller::control::WorkerHttp::new(worker.to_string()));
    let forward = axum::routing::post(move |body: axum::body::Bytes| async move {
        match client.predict("floor", &body).await {
            Ok(output) => ([(axum::http::header::CONTENT_TYPE, "application/json")], output).into_response(),
            Err(status) => (StatusCode::BAD_GATEWAY, status.message().to_owned()).into_response(),
        }
    });
    let router = axum::Router::new().route("/v1/deployments/{owner}/{name}/predictions", forward);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("http={}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let limits = kiln_controller::connections::HttpLimits::default();
    tokio::select! {
        served = kiln_controller::connections::serve(listener, router, limits, std::future::pending()) => served?,
        closed = until_stdin_closes() => closed?,
    }
    Ok(())
}

async fn until_stdin_closes() -> Result<()> {
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await?;
    Ok(())
}

/// A party of the benchmark running in a child process; killed on drop.
struct Party {
    name: &'static str,
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Party {
    /// Starts `command` and reads its first line of output.
    fn start(name: &'static str, mut command: Command) -> Result<(Self, String)> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("the {name} exited before it was ready");
        }
        Ok((Self { name, child, stdout: Some(stdout) }, line.trim().to_owned()))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its standard input and returns the rest of its output.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        if let Some(mut out) = self.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        }
        let _ = self.child.wait();
        rest
    }
}

impl Drop for Party {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.name, self.child.id())
    }
}

/// A process's CPU time: in all (`utime + stime`, including threads that have exited), and by thread name
/// (`/proc/<pid>/task/*/schedstat`, threads alive at the reading); and its resident memory.
#[derive(Debug, Clone, Default)]
struct Cpu {
    total_s: f64,
    by_thread: BTreeMap<String, f64>,
    /// Resident memory at the reading (`VmRSS`), KiB.
    rss_kib: u64,
}

impl Cpu {
    fn read(pid: u32) -> Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) start at field 3; utime and stime are 14 and 15,
        // in clock ticks (USER_HZ, 100 per second on Linux).
        let after = stat.rsplit_once(')').context("malformed /proc stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let total_s = (ticks(14) + ticks(15)) as f64 / 100.0;
        let mut by_thread = BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let path = task.path();
            let (Ok(comm), Ok(sched)) =
                (std::fs::read_to_string(path.join("comm")), std::fs::read_to_string(path.join("schedstat")))
            else {
                continue;
            };
            let ns: u64 = sched.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_thread.entry(thread_group(comm.trim())).or_insert(0.0) += ns as f64 / 1e9;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        Ok(Self { total_s, by_thread, rss_kib })
    }

    fn since(&self, before: &Self) -> Self {
        let by_thread = self
            .by_thread
            .iter()
            .map(|(k, v)| (k.clone(), (v - before.by_thread.get(k).copied().unwrap_or(0.0)).max(0.0)))
            .collect();
        Self { total_s: (self.total_s - before.total_s).max(0.0), by_thread, rss_kib: self.rss_kib }
    }
}

/// A thread's group: its name without a trailing number (`tokio-runtime-w`, `kiln-persister`, ...).
fn thread_group(comm: &str) -> String {
    comm.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-').to_owned()
}

/// The paths measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Path3 {
    Direct,
    Nginx,
    /// Kiln's HTTP server and worker client without the gateway.
    Floor,
    Kiln,
}

impl Path3 {
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to the replica (HTTP)",
            Self::Nginx => "through nginx (HTTP -> HTTP)",
            Self::Floor => "through kiln's HTTP stack alone (floor)",
            Self::Kiln => "through the kiln gateway (HTTP -> worker)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Nginx => "nginx",
            Self::Floor => "floor",
            Self::Kiln => "kiln gateway",
        }
    }
}

/// One run of one path.
#[derive(Debug, Clone)]
struct Run {
    /// p50, p90, p99, p99.9, seconds.
    latency: [f64; 4],
    requests: usize,
    /// CPU seconds per request of the proxy (none for the direct path) and of the replica.
    proxy_cpu: Option<Cpu>,
    replica_cpu_s: f64,
}

struct Rig {
    replica: Party,
    replica_http: SocketAddr,
    gateway: Party,
    gateway_http: SocketAddr,
    nginx: Option<(Party, SocketAddr, PathBuf)>,
    floor: Option<(Party, SocketAddr)>,
}

/// Runs the whole benchmark and prints its report.
pub async fn run(options: &Options) -> Result<()> {
    let rig = rig(options)?;
    let result = measure_all(options, &rig).await;
    let Rig { replica, gateway, nginx, floor, .. } = rig;
    drop(floor);
    let store = gateway.finish();
    drop(replica);
    if let Some((nginx, _, dir)) = nginx {
        drop(nginx);
        let _ = std::fs::remove_dir_all(dir);
    }
    result?;
    if let Some(line) = store.lines().find(|l| l.starts_with("store ")) {
        let field = |k: &str| {
            line.split_whitespace().find_map(|f| f.strip_prefix(k)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        };
        let (written, commits, busy_us) = (field("written="), field("commits=").max(1.0), field("busy_us="));
        println!(
            "prediction store (redb, off the request path): {written} records in {commits} commits ({:.1} per \
             commit), {:.2} ms per commit",
            written / commits,
            busy_us / 1000.0 / commits
        );
    }
    Ok(())
}

fn rig(options: &Options) -> Result<Rig> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(&exe);
    command.args(["bench", "replica"]);
    let (replica, line) = Party::start("stand-in replica", command)?;
    let field = |line: &str, key: &str| -> Result<SocketAddr> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .with_context(|| format!("no {key} in {line:?}"))?
            .parse()
            .context("not an address")
    };
    let (replica_grpc, replica_http) = (field(&line, "grpc=")?, field(&line, "http=")?);
    let mut command = Command::new(&exe);
    command.args(["bench", "gateway-server", "--worker", &replica_grpc.to_string(), "--hop", options.hop.as_str()]);
    let (gateway, line) = Party::start("kiln gateway", command)?;
    let gateway_http = field(&line, "http=")?;
    let nginx = match &options.nginx {
        Some(binary) => Some(start_nginx(binary, replica_http)?),
        None => None,
    };
    let floor = if options.floor {
        let mut command = Command::new(&exe);
        command.args(["bench", "floor-server", "--worker", &replica_grpc.to_string()]);
        let (floor, line) = Party::start("floor", command)?;
        Some((floor, field(&line, "http=")?))
    } else {
        None
    };
    Ok(Rig { replica, replica_http, gateway, gateway_http, nginx, floor })
}

/// Starts nginx in the foreground as one process (no master, one worker loop), proxying to `upstream` over
/// keep-alive connections, on a free loopback port.
fn start_nginx(binary: &Path, upstream: SocketAddr) -> Result<(Party, SocketAddr, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let d = dir.display();
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         upstream replica {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n  \
         server {{\n    listen {port};\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://replica;\n      \
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    );
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config)?;
    let mut child = Command::new(binary)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(port).is_err() {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("nginx exited ({status}): {err}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("nginx did not listen on {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((Party { name: "nginx", child, stdout: None }, port, dir))
}

/// Nginx's version (`nginx -v` prints to standard error).
fn nginx_version(binary: &Path) -> String {
    Command::new(binary)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().trim_start_matches("nginx version: ").to_owned())
        .unwrap_or_default()
}

fn request(path: Path3, addr: SocketAddr) -> Vec<u8> {
    let body = r#"{"input": {"x": [1.0]}}"#;
    let head = match path {
        Path3::Direct | Path3::Nginx => format!("POST /predict HTTP/1.1\r\nHost: {addr}\r\n"),
        Path3::Kiln | Path3::Floor => format!(
            "POST /v1/deployments/bench/instant/predictions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer \
             {}\r\nPrefer: wait\r\n",
            super::BENCH_KEY
        ),
    };
    format!("{head}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// Runs `path` once at `rps` for `seconds` (after the warm-up), reading the processes' CPU time around the
/// measured window.
async fn once(rig: &Rig, path: Path3, rps: u32, seconds: u32, connections: u32) -> Result<Run> {
    let (addr, proxy) = match path {
        Path3::Direct => (rig.replica_http, None),
        Path3::Nginx => {
            let (nginx, addr, _) = rig.nginx.as_ref().context("no nginx")?;
            (*addr, Some(nginx.pid()))
        }
        Path3::Floor => {
            let (floor, addr) = rig.floor.as_ref().context("no floor")?;
            (*addr, Some(floor.pid()))
        }
        Path3::Kiln => (rig.gateway_http, Some(rig.gateway.pid())),
    };
    let replica = rig.replica.pid();
    let total = WARMUP + Duration::from_secs(u64::from(seconds));
    let before = Arc::new(Mutex::new(None));
    let reader = {
        let before = Arc::clone(&before);
        tokio::spawn(async move {
            tokio::time::sleep(WARMUP).await;
            let read = (proxy.map(Cpu::read).transpose(), Cpu::read(replica));
            *before.lock().unwrap_or_else(|p| p.into_inner()) = Some(read);
        })
    };
    let (latencies, failed) = open_loop(addr, request(path, addr), connections, rps, total, WARMUP).await?;
    let after = (proxy.map(Cpu::read).transpose()?, Cpu::read(replica)?);
    reader.await?;
    let Some((proxy_before, replica_before)) = before.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        bail!("the CPU time was not read at the end of the warm-up");
    };
    if failed > 0 {
        bail!("{}: {failed} requests did not answer 200", path.label());
    }
    let requests = latencies.len();
    let proxy_cpu = match (after.0, proxy_before?) {
        (Some(a), Some(b)) => Some(a.since(&b)),
        _ => None,
    };
    let replica_cpu_s = after.1.since(&replica_before?).total_s;
    Ok(Run { latency: percentiles(latencies), requests, proxy_cpu, replica_cpu_s })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `median [min–max]` of `v`, scaled and with `decimals`.
fn spread(v: &[f64], scale: f64, decimals: usize) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min) * scale;
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max) * scale;
    let m = median(v.to_vec()) * scale;
    if v.len() < 2 {
        return format!("{m:.decimals$}");
    }
    format!("{m:.decimals$} [{min:.decimals$}-{max:.decimals$}]")
}

async fn measure_all(options: &Options, rig: &Rig) -> Result<()> {
    let paths: Vec<Path3> = [
        Some(Path3::Direct),
        rig.nginx.as_ref().map(|_| Path3::Nginx),
        rig.floor.as_ref().map(|_| Path3::Floor),
        Some(Path3::Kiln),
    ]
    .into_iter()
    .flatten()
    .collect();
    let nginx = options.nginx.as_deref().map(nginx_version);
    println!(
        "kiln bench gateway: {} requests/s open loop, {} s measured per run after {} s of warm-up, {} connections, \
         {} rounds of {} (each figure: median [min-max] over the rounds)",
        options.rps,
        options.seconds,
        WARMUP.as_secs(),
        options.connections,
        options.runs,
        paths.iter().map(|p| p.label()).collect::<Vec<_>>().join(", ")
    );
    println!(
        "kiln's hop to the replica (the worker port): {}",
        match options.hop {
            super::Hop::Http1 => "HTTP/1.1 predict route, keep-alive connections (--hop http1)",
            super::Hop::Grpc => "WorkerService.Predict over gRPC (--hop grpc)",
        }
    );
    match &nginx {
        Some(v) => println!("reference proxy: nginx {v}, one process, keep-alive upstream connections"),
        None => println!("reference proxy: none (nginx not found; install it or pass --nginx <path>)"),
    }
    let mut runs: BTreeMap<Path3, Vec<Run>> = BTreeMap::new();
    for _ in 0..options.runs.max(1) {
        for &path in &paths {
            let run = once(rig, path, options.rps, options.seconds, options.connections).await?;
            runs.entry(path).or_default().push(run);
        }
    }
    println!();
    println!("{:<42} {:>22} {:>22} {:>22}", "latency, ms", "p50", "p99", "p99.9");
    for path in &paths {
        let r = &runs[path];
        let col = |i: usize| spread(&r.iter().map(|x| x.latency[i]).collect::<Vec<_>>(), 1000.0, 3);
        println!("{:<42} {:>22} {:>22} {:>22}", path.label(), col(0), col(2), col(3));
    }
    let direct = &runs[&Path3::Direct];
    let added = |path: Path3, i: usize| -> Vec<f64> {
        runs[&path].iter().zip(direct).map(|(r, d)| r.latency[i] - d.latency[i]).collect()
    };
    println!("added over direct (per round: the path's percentile minus the direct path's, in the same round):");
    for &path in paths.iter().filter(|p| **p != Path3::Direct) {
        let label = format!("  {}", path.short());
        println!(
            "{:<42} {:>22} {:>22} {:>22}",
            label,
            spread(&added(path, 0), 1000.0, 3),
            spread(&added(path, 2), 1000.0, 3),
            spread(&added(path, 3), 1000.0, 3)
        );
    }
    println!();
    println!("{:<42} {:>22} {:>22}", "CPU per request, microseconds", "proxy process", "replica process");
    for path in &paths {
        let r = &runs[path];
        let per = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { r.iter().map(|x| f(x) / x.requests.max(1) as f64).collect() };
        let proxy = if *path == Path3::Direct {
            "-".to_owned()
        } else {
            spread(&per(&|x| x.proxy_cpu.as_ref().map_or(f64::NAN, |c| c.total_s)), 1e6, 1)
        };
        println!("{:<42} {:>22} {:>22}", path.label(), proxy, spread(&per(&|x| x.replica_cpu_s), 1e6, 1));
    }
    let cpu_us = |path: Path3| -> f64 {
        median(
            runs[&path]
                .iter()
                .map(|x| x.proxy_cpu.as_ref().map_or(f64::NAN, |c| c.total_s) / x.requests.max(1) as f64 * 1e6)
                .collect(),
        )
    };
    if runs.contains_key(&Path3::Nginx) {
        println!(
            "kiln gateway / nginx: {:.1}x the CPU per request; added p99 {:.3} ms vs {:.3} ms",
            cpu_us(Path3::Kiln) / cpu_us(Path3::Nginx),
            median(added(Path3::Kiln, 2)) * 1000.0,
            median(added(Path3::Nginx, 2)) * 1000.0
        );
    }
    if runs.contains_key(&Path3::Floor) {
        let mut line = format!(
            "the gateway's own work (kiln gateway - floor): {:.1} us per request of {:.1}",
            cpu_us(Path3::Kiln) - cpu_us(Path3::Floor),
            cpu_us(Path3::Kiln)
        );
        if runs.contains_key(&Path3::Nginx) {
            line.push_str(&format!("; the floor alone is {:.1}x nginx", cpu_us(Path3::Floor) / cpu_us(Path3::Nginx)));
        }
        println!("{line}");
    }
    // The gateway's CPU by thread group, from the round with the median total.
    let kiln = &runs[&Path3::Kiln];
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in kiln {
        if let Some(cpu) = &run.proxy_cpu {
            for (name, s) in &cpu.by_thread {
                groups.entry(name.clone()).or_default().push(s / run.requests.max(1) as f64 * 1e6);
            }
        }
    }
    let mut groups: Vec<(String, f64)> = groups.into_iter().map(|(k, v)| (k, median(v))).collect();
    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shown: Vec<String> =
        groups.iter().filter(|(_, us)| *us >= 0.05).map(|(name, us)| format!("{name} {us:.1}")).collect();
    println!("kiln gateway CPU-us per request by thread (median over rounds): {}", shown.join(", "));
    // Resident memory at the end of each run (the gateway's grows with the predictions it keeps for an hour).
    let rss = |path: Path3| -> Vec<f64> {
        runs[&path].iter().filter_map(|x| x.proxy_cpu.as_ref().map(|c| c.rss_kib as f64 / 1024.0)).collect()
    };
    let mut line = format!("resident memory after each run, MiB: kiln gateway {}", spread(&rss(Path3::Kiln), 1.0, 1));
    if runs.contains_key(&Path3::Nginx) {
        line.push_str(&format!(", nginx {}", spread(&rss(Path3::Nginx), 1.0, 1)));
    }
    println!("{line}");
    if !options.rates.is_empty() {
        sweep(options, rig, &paths).await?;
    }
    Ok(())
}

/// The highest rate of `options.rates` (ascending, one run each) at which each proxy's added p99 stays under the
/// goal; a proxy drops out at its first miss.
async fn sweep(options: &Options, rig: &Rig, paths: &[Path3]) -> Result<()> {
    // The floor is a measuring aid, not a proxy anyone runs: it stays out of the sweep.
    let proxies: Vec<Path3> = paths.iter().copied().filter(|p| matches!(p, Path3::Nginx | Path3::Kiln)).collect();
    let mut best: BTreeMap<Path3, Option<u32>> = proxies.iter().map(|p| (*p, None)).collect();
    let mut missed: BTreeMap<Path3, Option<(u32, f64)>> = proxies.iter().map(|p| (*p, None)).collect();
    println!();
    println!(
        "rate sweep: one {} s run per path and rate, rates {:?}; added p99 = the path's p99 minus the direct p99 of \
         the same step",
        options.sweep_seconds, options.rates
    );
    let mut rates = options.rates.clone();
    rates.sort_unstable();
    for rate in rates {
        let live: Vec<Path3> = proxies.iter().copied().filter(|p| missed[p].is_none()).collect();
        if live.is_empty() {
            break;
        }
        let direct = once(rig, Path3::Direct, rate, options.sweep_seconds, options.connections).await?;
        let mut line = format!("  {rate:>6}/s: direct p99 {:.3} ms", direct.latency[2] * 1000.0);
        for path in live {
            let added = match once(rig, path, rate, options.sweep_seconds, options.connections).await {
                Ok(run) => run.latency[2] - direct.latency[2],
                Err(e) => {
                    line.push_str(&format!("; {e}"));
                    f64::INFINITY
                }
            };
            line.push_str(&format!("; {} added p99 {:.3} ms", path.short(), added * 1000.0));
            if added < GOAL_P99_S {
                best.insert(path, Some(rate));
            } else {
                missed.insert(path, Some((rate, added)));
            }
        }
        println!("{line}");
    }
    for path in proxies {
        let name = path.short();
        let top = options.rates.iter().max().copied().unwrap_or(0);
        match (best[&path], missed[&path]) {
            (Some(r), None) => {
                println!("max rate with added p99 < 1 ms, {name}: at least {r}/s (the sweep's top {top}/s)")
            }
            (Some(r), Some((m, a))) => {
                println!("max rate with added p99 < 1 ms, {name}: {r}/s (at {m}/s it added {:.3} ms)", a * 1000.0)
            }
            (None, Some((m, a))) => println!(
                "max rate with added p99 < 1 ms, {name}: below {m}/s, the sweep's lowest (it added {:.3} ms)",
                a * 1000.0
            ),
            (None, None) => println!("max rate with added p99 < 1 ms, {name}: not measured"),
        }
    }
    Ok(())
}
