//! `kiln bench console`: the console on a large fleet. Registers `nodes` stand-in agents of `gpus` GPUs each over
//! the real `AgentService` (gRPC), each sending a telemetry batch a second whose figures move every second (half
//! the GPUs busy with utilisation, power and temperature wandering, the rest idle), then measures what the fleet
//! page costs: the bytes and time of the page, its assets and the fleet's JSON; the event stream's bytes per second
//! once its first snapshot is sent; and, with Chromium, the time from navigation to the rendered page.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use kiln_controller::{
    gateway::OPERATOR,
    registry::RegistryConfig,
    server::{Server, ServerOptions},
};
use kiln_proto::v1::{self, AgentMessage, agent_message, agent_service_client::AgentServiceClient};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

const KEY: &str = "bench-console-operator-0123456789";

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stand-in nodes.
    pub nodes: u32,
    /// GPUs per node.
    pub gpus: u32,
    /// Seconds the event stream is read.
    pub seconds: u32,
    /// Chromium, for the render time (`None`: not measured).
    pub chromium: Option<std::path::PathBuf>,
    /// Where to write a PNG of the rendered fleet page (with Chromium).
    pub screenshot: Option<std::path::PathBuf>,
}

/// A small xorshift generator: the telemetry's noise (no randomness crate needed for that).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A step in -span..=span.
    fn step(&mut self, span: u32) -> i64 {
        (self.next() % (2 * u64::from(span) + 1)) as i64 - i64::from(span)
    }
}

/// One stand-in agent: registers, then sends telemetry and a heartbeat every second until the channel closes.
async fn agent(channel: tonic::transport::Channel, node: u32, gpus: u32) -> Result<()> {
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let register = v1::Register {
        node_name: format!("node-{node:04}"),
        simulated: true,
        gpus: (0..gpus)
            .map(|i| v1::Gpu {
                index: i,
                uuid: format!("GPU-{node}-{i}"),
                model: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                health: v1::GpuHealth::Healthy as i32,
                ..Default::default()
            })
            .collect(),
        worker_endpoint: "127.0.0.1:1".into(),
        ..Default::default()
    };
    tx.send(AgentMessage { seq: 1, body: Some(agent_message::Body::Register(register)) }).await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15 ^ (u64::from(node) << 17 | 1));
    // Per GPU: busy or idle, and its current figures.
    let mut state: Vec<(bool, i64, i64, i64)> =
        (0..gpus).map(|i| ((node + i).is_multiple_of(2), 80, 500, 65)).collect();
    let mut seq = 1;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let samples = state
            .iter_mut()
            .enumerate()
            .map(|(i, (busy, util, power, temp))| {
                if *busy {
                    *util = (*util + noise.step(8)).clamp(40, 100);
                    *power = (*power + noise.step(30)).clamp(250, 700);
                    *temp = (*temp + noise.step(1)).clamp(45, 85);
                } else {
                    (*util, *power, *temp) = (0, 70 + noise.step(2), 30);
                }
                v1::GpuSample {
                    gpu_index: i as u32,
                    sm_util_pct: *util as u32,
                    memory_used_bytes: if *busy { 60 << 30 } else { 0 },
                    power_mw: (*power * 1000) as u32,
                    temperature_c: *temp as u32,
                    ..Default::default()
                }
            })
            .collect();
        seq += 2;
        let telemetry =
            AgentMessage { seq, body: Some(agent_message::Body::Telemetry(v1::TelemetryBatch { samples })) };
        let heartbeat =
            AgentMessage { seq: seq + 1, body: Some(agent_message::Body::Heartbeat(v1::Heartbeat::default())) };
        if tx.send(telemetry).await.is_err() || tx.send(heartbeat).await.is_err() {
            return Ok(());
        }
    }
}

/// One GET: (status, body bytes, seconds).
async fn get(http: SocketAddr, path: &str) -> Result<(u16, Vec<u8>, f64)> {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(http).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let seconds = started.elapsed().as_secs_f64();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = response[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body, seconds))
}

/// The payload of a chunked body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < end + 2 + size {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[(end + 4 + size).min(data.len())..];
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the bench (see the module docs) and prints its figures.
pub async fn run(options: &Options) -> Result<()> {
    let Options { nodes, gpus, seconds, .. } = *options;
    let server = Server::bind(ServerOptions {
        manifests: None,
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        agent_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_keys: vec![(KEY.into(), OPERATOR.into())],
        registry: RegistryConfig { grace: Duration::from_secs(600), ..RegistryConfig::default() },
        ..ServerOptions::default()
    })
    .await?;
    let (http, agents) = (server.http_addr, server.agent_addr);
    let registry = server.registry.clone();
    let console = std::sync::Arc::clone(&server.console);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(server.serve(stop));
    // 50 agents' streams per HTTP/2 connection.
    let mut channels = Vec::new();
    for _ in 0..nodes.div_ceil(50) {
        channels.push(tonic::transport::Endpoint::from_shared(format!("http://{agents}"))?.connect().await?);
    }
    for node in 0..nodes {
        let channel = channels[(node / 50) as usize].clone();
        tokio::spawn(async move {
            if let Err(e) = agent(channel, node, gpus).await {
                tracing::warn!(node, error = %e, "a stand-in agent stopped");
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry.nodes().len() < nodes as usize {
        if Instant::now() > deadline {
            bail!("only {} of {nodes} stand-in agents registered within 60 s", registry.nodes().len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two telemetry rounds, so every GPU has figures.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    println!("kiln bench console: {nodes} nodes x {gpus} GPUs registered over gRPC, telemetry at 1 Hz");
    println!("{:<40} {:>12} {:>14}", "GET (median of 5)", "bytes", "ms");
    let mut page_bytes = 0;
    for path in [
        "/ui",
        "/ui/app.js",
        "/ui/app.css",
        "/kiln/v1/console/fleet",
        "/kiln/v1/console/deployments",
        "/kiln/v1/console/rentals",
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let (status, body, s) = get(http, path).await?;
            if status != 200 {
                bail!("{path}: status {status}");
            }
            bytes = body.len();
            times.push(s * 1000.0);
        }
        if path == "/kiln/v1/console/fleet" {
            let fleet: Value = serde_json::from_slice(&get(http, path).await?.1)?;
            let cells: usize = fleet["nodes"]
                .as_array()
                .map_or(0, |n| n.iter().map(|n| n["gpus"].as_array().map_or(0, Vec::len)).sum());
            if cells != (nodes * gpus) as usize {
                bail!("the fleet lists {cells} GPUs, not {}", nodes * gpus);
            }
        }
        page_bytes += bytes;
        println!("{path:<40} {bytes:>12} {:>14.1}", median(times));
    }
    println!("{:<40} {page_bytes:>12}", "the console's first load, in all");

    // The event stream: its first snapshot, then what it sends per second.
    let mut tcp = TcpStream::connect(http).await?;
    let request = format!(
        "GET /kiln/v1/console/events HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {KEY}\r\nAccept: text/event-stream\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 1 << 16];
    let mut first = Vec::new();
    let opened = Instant::now();
    // The first snapshot ends where the first delta begins, or after 3 s.
    while !String::from_utf8_lossy(&first).contains("event: delta") && opened.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Ok(Ok(0)) => bail!("the event stream closed"),
            Ok(Ok(n)) => first.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
    }
    let snapshot = String::from_utf8_lossy(&first).find("event: delta").unwrap_or(first.len());
    let mut streamed = first.len() - snapshot;
    let mut deltas = String::from_utf8_lossy(&first[snapshot..]).matches("event: delta").count();
    let started = Instant::now();
    let mut per_second = Vec::new();
    let mut this_second = 0usize;
    let mut second_began = Instant::now();
    while started.elapsed() < Duration::from_secs(u64::from(seconds)) {
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            if n == 0 {
                bail!("the event stream closed");
            }
            streamed += n;
            this_second += n;
            deltas += String::from_utf8_lossy(&buf[..n]).matches("event: delta").count();
        }
        if second_began.elapsed() >= Duration::from_secs(1) {
            per_second.push(this_second as f64);
            this_second = 0;
            second_began = Instant::now();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("event stream: first snapshot {snapshot} bytes; then {deltas} deltas in {elapsed:.1} s");
    println!(
        "event stream: {:.1} KB/s mean, {:.1} KB/s median second, {:.1} KB/s worst second (goal < 200 KB/s)",
        streamed as f64 / elapsed / 1000.0,
        median(per_second.clone()) / 1000.0,
        per_second.iter().copied().fold(0.0, f64::max) / 1000.0
    );

    // The stream read above would go on costing the server a snapshot a second during the render figures.
    drop(tcp);
    if let Some(chromium) = &options.chromium {
        let mut times = Vec::new();
        for run in 0..3 {
            let token = console.login_token(KEY).context("a login token")?;
            let url = format!("http://{http}/ui?token={token}");
            let shot = if run == 2 { options.screenshot.clone() } else { None };
            let ms = tokio::task::spawn_blocking({
                let chromium = chromium.clone();
                move || render_ms(&chromium, &url, shot.as_deref())
            })
            .await??;
            times.push(ms);
        }
        println!(
            "chromium: navigation to the rendered fleet page (warm browser) {:.0} ms median of 3 ({:.0}, {:.0}, {:.0}; goal < 1000)",
            median(times.clone()),
            times[0],
            times[1],
            times[2]
        );
    } else {
        println!("chromium: not found (--chromium): render time not measured");
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
    Ok(())
}

/// Headless Chromium over `--remote-debugging-pipe`: opens the login link `url`, then `/ui` again in the same
/// browser, and returns the second load's own figure for the time from navigation start to the fleet rendered
/// (`window.kilnReadyMs`); both loads' steps are printed.
fn render_ms(chromium: &Path, url: &str, screenshot: Option<&Path>) -> Result<f64> {
    let profile = std::env::temp_dir().join(format!("kiln-bench-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let script = format!(
        "exec \"$0\" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
         --window-size=1400,1000 --user-data-dir='{}' --remote-debugging-pipe about:blank \
         3<&0 4>&1 </dev/null >/dev/null 2>/dev/null",
        profile.display()
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .arg(chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", chromium.display()))?;
    let mut pipe = Pipe::new(child)?;
    let target = pipe.call(None, "Target.createTarget", json!({ "url": "about:blank" }))?;
    let target = target["targetId"].as_str().context("a target id")?.to_owned();
    let attached = pipe.call(None, "Target.attachToTarget", json!({ "targetId": target, "flatten": true }))?;
    let session = attached["sessionId"].as_str().context("a session id")?.to_owned();
    // The login link in a fresh browser (its first page pays for Chromium's own start), then the page again in
    // the same browser, signed in by its cookie: the second figure is the one reported.
    let mut result = Err(anyhow::anyhow!("not measured"));
    for (step, target) in
        [("cold browser", url.to_owned()), ("warm browser", url.split('?').next().unwrap_or(url).to_owned())]
    {
        pipe.call(Some(&session), "Page.navigate", json!({ "url": target }))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        result = loop {
            let r = pipe.call(
                Some(&session),
                "Runtime.evaluate",
                json!({
                    "expression": "window.kilnReadyMs == null ? null : [window.kilnReadyMs, window.kilnSteps.whoami, window.kilnSteps.fleetReceived, window.kilnSteps.fleetRendered]",
                    "returnByValue": true
                }),
            )?;
            if let Some(v) = r["result"]["value"].as_array() {
                let ms: Vec<f64> = v.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect();
                println!(
                    "  {step}: signed in at {:.0} ms, fleet snapshot received at {:.0} ms, rendered at {:.0} ms, ready at {:.0} ms",
                    ms[1], ms[2], ms[3], ms[0]
                );
                break Ok(ms[0]);
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!("the page did not render within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if result.is_err() {
            break;
        }
    }
    if let (Ok(_), Some(path)) = (&result, screenshot) {
        use base64::Engine as _;
        let shot = pipe.call(Some(&session), "Page.captureScreenshot", json!({ "format": "png" }))?;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().context("png data")?)?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        println!("  screenshot: {}", path.display());
    }
    drop(pipe);
    let _ = std::fs::remove_dir_all(&profile);
    result
}

/// The DevTools protocol on a pipe: NUL-terminated JSON messages.
struct Pipe {
    child: Child,
    commands: ChildStdin,
    messages: std_mpsc::Receiver<Value>,
    next: u64,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pipe {
    fn new(mut child: Child) -> Result<Self> {
        let commands = child.stdin.take().context("the pipe's stdin")?;
        let mut out = BufReader::new(child.stdout.take().context("the pipe's stdout")?);
        let (tx, messages) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while out.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        Ok(Self { child, commands, messages, next: 0 })
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next += 1;
        let mut message = json!({ "id": self.next, "method": method, "params": params });
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.commands.write_all(&bytes)?;
        self.commands.flush()?;
        loop {
            let v =
                self.messages.recv_timeout(Duration::from_secs(30)).with_context(|| format!("{method}: no answer"))?;
            if v["id"] == json!(self.next) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }
}
