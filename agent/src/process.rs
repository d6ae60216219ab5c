//! The `process` runtime: an external model server (a vLLM server, a Cog container's entrypoint, ...) launched by
//! the agent for one replica.
//!
//! The server gets `CUDA_VISIBLE_DEVICES` set to the assigned GPUs' UUIDs, `PORT` set to its port and
//! `KILN_MODEL_URI` to the weights; the agent waits until its readiness path answers 200 (failing the start if the
//! process exits first or the startup timeout passes), keeps the last lines of its output for the failure message
//! and the logs, proxies predictions to it (`POST /predictions` by default, Cog's convention; a `path` metadata
//! entry overrides it), and stops it with SIGTERM, then SIGKILL after the grace period.

use std::{
    collections::VecDeque,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};

/// Lines of output kept per process.
const LOG_LINES: usize = 200;

/// How a process start failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The command could not be run.
    #[error("cannot run {command:?}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Cause.
        source: std::io::Error,
    },
    /// No command given.
    #[error("the process runtime needs a command")]
    NoCommand,
    /// The process exited before it was ready.
    #[error("the model server exited during startup ({status}); last output: {tail}")]
    Exited {
        /// Exit status.
        status: String,
        /// Last lines of output.
        tail: String,
    },
    /// The readiness path did not answer 200 in time.
    #[error("the model server was not ready at {path} within {timeout:?}; last output: {tail}")]
    NotReady {
        /// Readiness path.
        path: String,
        /// Timeout.
        timeout: Duration,
        /// Last lines of output.
        tail: String,
    },
}

impl ProcessError {
    /// The machine-readable reason for `WorkerFailed`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProcessError::Spawn { .. } | ProcessError::NoCommand => "InvalidCommand",
            ProcessError::Exited { .. } => "ProcessExited",
            ProcessError::NotReady { .. } => "ReadinessTimeout",
        }
    }
}

/// How to launch one model server.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Executable and its arguments.
    pub command: Vec<String>,
    /// Environment added to the agent's.
    pub env: Vec<(String, String)>,
    /// Loopback port it listens on.
    pub port: u16,
    /// Path answering 200 when ready.
    pub readiness_path: String,
    /// How long to wait for readiness.
    pub startup_timeout: Duration,
    /// SIGTERM to SIGKILL.
    pub termination_grace: Duration,
    /// GPU UUIDs for `CUDA_VISIBLE_DEVICES`.
    pub gpu_uuids: Vec<String>,
    /// Where the weights are.
    pub model_uri: String,
}

/// A running model server.
#[derive(Debug)]
pub struct ProcessWorker {
    child: tokio::sync::Mutex<Child>,
    pid: Option<u32>,
    port: u16,
    grace: Duration,
    logs: Arc<Mutex<VecDeque<String>>>,
}

fn tail(logs: &Mutex<VecDeque<String>>) -> String {
    let logs = logs.lock().unwrap_or_else(|p| p.into_inner());
    let n = logs.len();
    logs.iter().skip(n.saturating_sub(5)).cloned().collect::<Vec<_>>().join(" | ")
}

impl ProcessWorker {
    /// Launches the server and waits until it is ready.
    pub async fn start(spec: &ProcessSpec) -> Result<Self, ProcessError> {
        let (program, args) = spec.command.split_first().ok_or(ProcessError::NoCommand)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CUDA_VISIBLE_DEVICES", spec.gpu_uuids.join(","))
            .env("PORT", spec.port.to_string())
            .env("KILN_MODEL_URI", &spec.model_uri)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child =
            command.spawn().map_err(|source| ProcessError::Spawn { command: spec.command.join(" "), source })?;
        let logs = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(collect(BufReader::new(out), Arc::clone(&logs)));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(collect(BufReader::new(err), Arc::clone(&logs)));
        }
        let worker = Self {
            pid: child.id(),
            child: tokio::sync::Mutex::new(child),
            port: spec.port,
            grace: spec.termination_grace,
            logs,
        };
        let deadline = Instant::now() + spec.startup_timeout;
        loop {
            if let Some(status) = worker.child.lock().await.try_wait().ok().flatten() {
                // Let the output readers catch the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(ProcessError::Exited { status: status.to_string(), tail: tail(&worker.logs) });
            }
            if let Ok((200, _)) = http(worker.port, "GET", &spec.readiness_path, b"", "").await {
                return Ok(worker);
            }
            if Instant::now() > deadline {
                worker.stop().await;
                return Err(ProcessError::NotReady {
                    path: spec.readiness_path.clone(),
                    timeout: spec.startup_timeout,
                    tail: tail(&worker.logs),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last five lines the server wrote, joined (for failure messages).
    pub fn tail(&self) -> String {
        tail(&self.logs)
    }

    /// The last lines the server wrote.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Whether the process has exited, and how.
    pub async fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child.lock().await.try_wait().ok().flatten()
    }

    /// Sends one request to the server: `(status, body)`.
    pub async fn request(&self, path: &str, body: &[u8], content_type: &str) -> std::io::Result<(u16, Vec<u8>)> {
        http(self.port, "POST", path, body, content_type).await
    }

    /// Sends one request asking for a server-sent event stream (`Accept: text/event-stream`, Cog's streaming
    /// predictions) and returns once the answer's head is read; the body is read as the server writes it.
    pub async fn request_events(&self, path: &str, body: &[u8], content_type: &str) -> std::io::Result<ResponseStream> {
        open(self.port, path, body, content_type, "text/event-stream").await
    }

    /// SIGTERM, then SIGKILL after the grace period; returns the exit status (`None` if it could not be reaped).
    pub async fn stop(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().await;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Some(pid) = self.pid {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(self.grace, child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.kill().await;
                child.wait().await.ok()
            }
        }
    }
}

async fn collect<R: tokio::io::AsyncRead + Unpin>(reader: BufReader<R>, logs: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut logs = logs.lock().unwrap_or_else(|p| p.into_inner());
        if logs.len() == LOG_LINES {
            logs.pop_front();
        }
        logs.push_back(line);
    }
}

/// Largest HTTP head or chunk-size line, and largest chunk or server-sent event, read from a model server.
const MAX_HEAD: usize = 64 << 10;
const MAX_EVENT: usize = 16 << 20;

/// An answer of the model server read as it arrives: the status and content type, then the body, chunk by chunk
/// (a chunked body decoded, an unframed one read until the server closes the connection).
#[derive(Debug)]
pub struct ResponseStream {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type` without parameters, lowercase (`text/event-stream`, `application/json`, ...).
    pub content_type: String,
    reader: BufReader<TcpStream>,
    framing: Framing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
    Done,
}

fn invalid(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.into())
}

impl ResponseStream {
    /// The next piece of the body as it arrives; `None` at its end.
    pub async fn next_bytes(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        match self.framing {
            Framing::Done => Ok(None),
            Framing::Length(0) => {
                self.framing = Framing::Done;
                Ok(None)
            }
            Framing::Length(left) => {
                let mut buf = vec![0; left.min(64 << 10)];
                let n = self.reader.read(&mut buf).await?;
                if n == 0 {
                    return Err(invalid("the model server closed the connection before the end of its answer"));
                }
                buf.truncate(n);
                self.framing = Framing::Length(left - n);
                Ok(Some(buf))
            }
            Framing::UntilClose => {
                let mut buf = vec![0; 64 << 10];
                let n = self.reader.read(&mut buf).await?;
                if n == 0 {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
            Framing::Chunked => {
                let line = self.line().await?;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16).map_err(|_| invalid(format!("bad chunk size {size:?}")))?;
                if size == 0 {
                    // Trailers, up to the blank line.
                    while !self.line().await?.is_empty() {}
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                if size > MAX_EVENT {
                    return Err(invalid(format!("a chunk of {size} bytes is over the limit of {MAX_EVENT}")));
                }
                let mut buf = vec![0; size];
                self.reader.read_exact(&mut buf).await?;
                if !self.line().await?.is_empty() {
                    return Err(invalid("a chunk does not end with CRLF"));
                }
                Ok(Some(buf))
            }
        }
    }

    /// The rest of the body, whole.
    pub async fn read_all(mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(piece) = self.next_bytes().await? {
            body.extend_from_slice(&piece);
        }
        Ok(body)
    }

    /// One line of the head or of the chunk framing, without its line end.
    async fn line(&mut self) -> std::io::Result<String> {
        let mut line = Vec::new();
        let n = (&mut self.reader).take(MAX_HEAD as u64).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(invalid("the model server closed the connection in the middle of its answer"));
        }
        if line.last() != Some(&b'\n') {
            return Err(invalid(format!("a line of the model server's answer is over {MAX_HEAD} bytes")));
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        String::from_utf8(line).map_err(|_| invalid("the model server's answer has a line that is not UTF-8"))
    }
}

/// Sends `POST path` to the loopback `port` with `accept` and returns once the answer's head is read; the body is
/// read from the [`ResponseStream`] as the server writes it.
async fn open(port: u16, path: &str, body: &[u8], content_type: &str, accept: &str) -> std::io::Result<ResponseStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: {accept}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = ResponseStream {
        status: 0,
        content_type: String::new(),
        reader: BufReader::new(stream),
        framing: Framing::UntilClose,
    };
    let status_line = answer.line().await?;
    answer.status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line: {status_line:?}")))?;
    loop {
        let line = answer.line().await?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => {
                answer.content_type = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
            }
            "transfer-encoding" if value.to_ascii_lowercase().contains("chunked") => answer.framing = Framing::Chunked,
            "content-length" if answer.framing != Framing::Chunked => {
                let n = value.parse().map_err(|_| invalid(format!("bad Content-Length {value:?}")))?;
                answer.framing = Framing::Length(n);
            }
            _ => {}
        }
    }
    Ok(answer)
}

/// One server-sent event: its `event` name (`message` when none is given) and its `data` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSentEvent {
    /// The event's name.
    pub event: String,
    /// Its data.
    pub data: String,
}

/// Splits a `text/event-stream` body, fed in pieces as they arrive, into events (the WHATWG format: `field: value`
/// lines, an event ends at a blank line, `:` starts a comment; `id` and `retry` are read and ignored).
#[derive(Debug, Default)]
pub struct EventParser {
    pending: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl EventParser {
    /// Feeds the next piece of the body; returns the events it completed.
    pub fn push(&mut self, bytes: &[u8]) -> std::io::Result<Vec<ServerSentEvent>> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.pending[start..start + end];
            start += end + 1;
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            let line = std::str::from_utf8(line).map_err(|_| invalid("an event-stream line is not UTF-8"))?;
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    let event = self.event.take().unwrap_or_else(|| "message".into());
                    events.push(ServerSentEvent { event, data });
                }
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = Some(value.to_owned()),
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
        self.pending.drain(..start);
        let held = self.pending.len() + self.data.as_ref().map_or(0, String::len);
        if held > MAX_EVENT {
            return Err(invalid(format!("a server-sent event is over {MAX_EVENT} bytes")));
        }
        Ok(events)
    }
}

/// One HTTP/1.1 request to the loopback `port` (the model server is local; no TLS, no keep-alive).
async fn http(port: u16, method: &str, path: &str, body: &[u8], content_type: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "the model server's answer has no header end")
    })?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status: u16 =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad status line: {head:?}"))
        })?;
    let body = response[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok((status, dechunk(&body)));
    }
    Ok((status, body))
}

/// Decodes a chunked HTTP body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..end]).trim(), 16).unwrap_or(0);
        body = &body[end + 2..];
        if size == 0 || body.len() < size {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &[&str]) -> ProcessSpec {
        ProcessSpec {
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: vec![],
            port: 1,
            readiness_path: "/health".into(),
            startup_timeout: Duration::from_secs(5),
            termination_grace: Duration::from_secs(1),
            gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
            model_uri: "file:///m".into(),
        }
    }

    #[tokio::test]
    async fn a_server_that_exits_during_startup_fails_with_its_last_output() {
        let err = ProcessWorker::start(&spec(&[
            "sh",
            "-c",
            "echo loading weights; echo CUDA=$CUDA_VISIBLE_DEVICES >&2; exit 3",
        ]))
        .await
        .unwrap_err();
        assert_eq!(err.reason(), "ProcessExited");
        let message = err.to_string();
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.contains("loading weights") && message.contains("CUDA=GPU-a,GPU-b"), "{message}");
        let err = ProcessWorker::start(&spec(&["/nonexistent/server"])).await.unwrap_err();
        assert_eq!(err.reason(), "InvalidCommand");
    }

    #[tokio::test]
    async fn a_server_that_never_gets_ready_times_out_and_is_stopped() {
        let mut s = spec(&["sleep", "30"]);
        s.startup_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = ProcessWorker::start(&s).await.unwrap_err();
        assert_eq!(err.reason(), "ReadinessTimeout");
        assert!(started.elapsed() < Duration::from_secs(5), "SIGTERM ended it well before the sleep");
    }

    #[test]
    fn server_sent_events_are_split_however_the_bytes_arrive() {
        let text = ": comment\r\nevent: output\r\ndata: {\"chunk\":1}\r\n\r\ndata: a\ndata: b\nid: 7\n\nevent: x\n\n";
        let whole = EventParser::default().push(text.as_bytes()).unwrap();
        let expected = vec![
            ServerSentEvent { event: "output".into(), data: r#"{"chunk":1}"#.into() },
            ServerSentEvent { event: "message".into(), data: "a\nb".into() },
        ];
        assert_eq!(whole, expected, "an event without data is not dispatched");
        // Byte by byte: the same events, each as soon as its blank line is in.
        let mut parser = EventParser::default();
        let mut seen = Vec::new();
        for (i, b) in text.bytes().enumerate() {
            let events = parser.push(&[b]).unwrap();
            if !events.is_empty() {
                seen.push(i);
            }
            assert!(events.len() <= 1);
        }
        assert_eq!(seen, [text.find("}\r\n\r\n").unwrap() + 4, text.find("7\n\n").unwrap() + 2]);
        let mut parser = EventParser::default();
        let huge = format!("data: {}", "x".repeat(MAX_EVENT + 1));
        assert!(parser.push(huge.as_bytes()).is_err(), "an endless event is refused, not buffered");
    }

    #[tokio::test]
    async fn a_streamed_answer_is_read_as_it_is_written() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let head = "HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n";
            s.write_all(format!("{head}5;ext=1\r\nfirst\r\n").as_bytes()).await.unwrap();
            gate.await.unwrap();
            s.write_all(b"4\r\nlast\r\n0\r\nTrailer: x\r\n\r\n").await.unwrap();
        });
        let mut answer = open(port, "/predictions", b"{}", "application/json", "text/event-stream").await.unwrap();
        assert_eq!((answer.status, answer.content_type.as_str()), (200, "text/event-stream"));
        assert_eq!(answer.next_bytes().await.unwrap().unwrap(), b"first", "before the rest is written");
        go.send(()).unwrap();
        assert_eq!(answer.next_bytes().await.unwrap().unwrap(), b"last");
        assert_eq!(answer.next_bytes().await.unwrap(), None);
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), b"hello world");
    }
}
