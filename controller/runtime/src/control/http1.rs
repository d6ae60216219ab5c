//! The gateway's HTTP/1.1 hop to a worker: `Predict` as [`kiln_proto::worker_http`] defines it, on keep-alive
//! connections that the request's own task drives — one write, then reads until the answer is whole. No
//! connection task, no HTTP/2 framing: per prediction that is a write and a read or two on the socket and nothing
//! handed between tasks, which is what makes it cheaper than the gRPC hop (`kiln bench gateway` measures both).
//!
//! [`WorkerHttp`] keeps the idle connections to one worker endpoint. A connection is checked out for one exchange
//! and put back only when its answer was read whole and the agent did not ask to close it; one dropped in the
//! middle (the request's future was dropped) is closed with it, never reused half-read. A kept connection the
//! agent has closed meanwhile fails before any byte of an answer arrives; the kept connections are then dropped
//! (they are as old, and all closed if the agent restarted) and the request is sent once more on a new one, as HTTP
//! clients retry an unanswered request on a reused connection. A failure on a new connection, or after part of an
//! answer, is the worker's answer: `Unavailable`, which the router treats as it treats an unreachable gRPC worker.

use std::{sync::Mutex, time::Duration};

use kiln_proto::worker_http::{MAX_BODY_BYTES, PREDICT_PATH, REPLICA_HEADER, STATUS_HEADER, status_of};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Status;

/// Longest wait to connect to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most idle connections kept per worker endpoint; one more is closed.
const MAX_IDLE: usize = 256;
/// Most bytes of an answer's head (status line and headers).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in an answer's head.
const MAX_HEADERS: usize = 32;

/// The idle HTTP/1.1 connections to one worker endpoint.
#[derive(Debug)]
pub struct WorkerHttp {
    /// `host:port`.
    address: String,
    idle: Mutex<Vec<TcpStream>>,
}

/// How one exchange on a connection ended, when it gave no answer.
#[derive(Debug)]
enum Failed {
    /// Nothing of an answer arrived (the write failed, or the connection closed first).
    Unanswered(std::io::Error),
    /// Part of an answer arrived, or it was malformed or too large.
    Broken(String),
}

/// An answer read whole.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// [`STATUS_HEADER`], when the answer had it.
    code: Option<String>,
    body: Vec<u8>,
    /// Whether the connection may carry another request.
    keep_alive: bool,
}

impl WorkerHttp {
    /// The connections to `address` (`host:port`), none open yet.
    pub fn new(address: String) -> Self {
        Self { address, idle: Mutex::new(Vec::new()) }
    }

    /// Runs one prediction on `replica` with `input` (JSON): the output, or the worker's failure as the gRPC call
    /// would have returned it.
    pub async fn predict(&self, replica: &str, input: &[u8]) -> Result<Vec<u8>, Status> {
        if replica.bytes().any(|b| b.is_ascii_control()) {
            return Err(Status::invalid_argument(format!("replica id {replica:?} cannot be sent in a header")));
        }
        if input.len() > MAX_BODY_BYTES {
            return Err(Status::invalid_argument(format!(
                "the input is {} bytes; a worker takes at most {MAX_BODY_BYTES}",
                input.len()
            )));
        }
        let mut request = Vec::with_capacity(160 + input.len());
        request.extend_from_slice(b"POST ");
        request.extend_from_slice(PREDICT_PATH.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        request.extend_from_slice(self.address.as_bytes());
        request.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        request.extend_from_slice(input.len().to_string().as_bytes());
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(REPLICA_HEADER.as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(replica.as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        request.extend_from_slice(input);
        let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let answer = match kept {
            Some(mut connection) => match exchange(&mut connection, &request).await {
                // The worker closed the kept connection while it was idle (or restarted, closing every one): the
                // kept ones are dropped and the request is sent once more, on a new connection.
                Err(Failed::Unanswered(_)) => {
                    self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    self.exchange_new(&request).await?
                }
                other => (connection, other),
            },
            None => self.exchange_new(&request).await?,
        };
        match answer {
            (connection, Ok(answer)) => {
                if answer.keep_alive {
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() < MAX_IDLE {
                        idle.push(connection);
                    }
                }
                match answer.status {
                    200 => Ok(answer.body),
                    status => Err(status_of(status, answer.code.as_deref(), &answer.body)),
                }
            }
            (_, Err(Failed::Unanswered(e))) => Err(Status::unavailable(format!("the worker at {}: {e}", self.address))),
            (_, Err(Failed::Broken(why))) => Err(Status::unavailable(format!("the worker at {}: {why}", self.address))),
        }
    }

    /// One exchange on a new connection.
    async fn exchange_new(&self, request: &[u8]) -> Result<(TcpStream, Result<Answer, Failed>), Status> {
        let mut connection = self.connect().await?;
        let answer = exchange(&mut connection, request).await;
        Ok((connection, answer))
    }

    async fn connect(&self) -> Result<TcpStream, Status> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("connecting to the worker at {}: {e}", self.address))
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.address))
            .await
            .map_err(|e| unreachable(&e))?
            .map_err(|e| unreachable(&e))?;
        stream.set_nodelay(true).map_err(|e| unreachable(&e))?;
        Ok(stream)
    }
}

/// Writes `request` and reads its answer whole.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Result<Answer, Failed> {
    stream.write_all(request).await.map_err(Failed::Unanswered)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    // The head.
    let (head_len, status, code, length, chunked, keep_alive) = loop {
        let read = read_more(stream, &mut buf).await;
        match read {
            Ok(0) if buf.is_empty() => {
                return Err(Failed::Unanswered(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(0) => return Err(Failed::Broken("the connection closed in the middle of an answer".into())),
            Ok(_) => {}
            Err(e) if buf.is_empty() => return Err(Failed::Unanswered(e)),
            Err(e) => return Err(Failed::Broken(e.to_string())),
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                let mut code = None;
                let mut length = None;
                let mut chunked = false;
                // HTTP/1.1 keeps the connection unless told otherwise; 1.0 closes it unless told otherwise.
                let mut keep_alive = response.version == Some(1);
                for h in response.headers.iter() {
                    let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length =
                            Some(value.parse::<usize>().map_err(|_| {
                                Failed::Broken(format!("an answer with a content-length of {value:?}"))
                            })?);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = value.to_ascii_lowercase().split(',').any(|t| t.trim() == "chunked");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        let value = value.to_ascii_lowercase();
                        keep_alive = if keep_alive { !value.contains("close") } else { value.contains("keep-alive") };
                    } else if h.name.eq_ignore_ascii_case(STATUS_HEADER) {
                        code = Some(value.to_owned());
                    }
                }
                break (len, status, code, length, chunked, keep_alive);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) => {
                return Err(Failed::Broken(format!("an answer whose head is over {MAX_HEAD_BYTES} bytes")));
            }
            Err(e) => return Err(Failed::Broken(format!("an answer that is not HTTP/1.1: {e}"))),
        }
    };
    // The body: by its length, in chunks, or (neither) up to the end of the connection.
    let too_large = || Failed::Broken(format!("an answer over {MAX_BODY_BYTES} bytes"));
    buf.drain(..head_len);
    let body = if chunked {
        dechunk(stream, buf).await?
    } else if let Some(length) = length {
        if length > MAX_BODY_BYTES {
            return Err(too_large());
        }
        while buf.len() < length {
            if read_more(stream, &mut buf).await.map_err(|e| Failed::Broken(e.to_string()))? == 0 {
                return Err(Failed::Broken("the connection closed in the middle of an answer".into()));
            }
        }
        if buf.len() > length {
            return Err(Failed::Broken("the worker sent more than the answer it announced".into()));
        }
        buf
    } else {
        while read_more(stream, &mut buf).await.map_err(|e| Failed::Broken(e.to_string()))? > 0 {
            if buf.len() > MAX_BODY_BYTES {
                return Err(too_large());
            }
        }
        return Ok(Answer { status, code, body: buf, keep_alive: false });
    };
    Ok(Answer { status, code, body, keep_alive })
}

/// Reads what is there into the spare room of `buf` (growing it): the number of bytes read, 0 at the end.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(buf.capacity().max(1024));
    }
    stream.read_buf(buf).await
}

/// The body of a chunked answer, of which `buf` holds what was read after the head.
async fn dechunk(stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<Vec<u8>, Failed> {
    let broken = |why: &str| Failed::Broken(format!("a chunked answer: {why}"));
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        // A chunk's size line.
        let line_end = loop {
            if let Some(i) = buf[at..].windows(2).position(|w| w == b"\r\n") {
                break at + i;
            }
            if buf.len() - at > 1024 {
                return Err(broken("a size line over 1 KiB"));
            }
            if read_more(stream, &mut buf).await.map_err(|e| Failed::Broken(e.to_string()))? == 0 {
                return Err(broken("the connection closed"));
            }
        };
        let line = std::str::from_utf8(&buf[at..line_end]).map_err(|_| broken("a size line that is not text"))?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| broken("a size that is not hexadecimal"))?;
        if body.len() + size > MAX_BODY_BYTES {
            return Err(Failed::Broken(format!("an answer over {MAX_BODY_BYTES} bytes")));
        }
        at = line_end + 2;
        // The chunk and its CRLF; the last (empty) chunk is followed by trailers, which are not read: the
        // connection is then closed rather than reused (the answer is whole).
        while buf.len() < at + size + 2 {
            if read_more(stream, &mut buf).await.map_err(|e| Failed::Broken(e.to_string()))? == 0 {
                return Err(broken("the connection closed"));
            }
        }
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A worker that answers the requests it reads with `answers`, in order: `(Some(answer), close)` writes it (and
    /// closes the connection if `close`), `(None, _)` closes the connection unanswered. Counts requests it read.
    async fn worker(answers: Vec<(Option<&'static str>, bool)>) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let handle = tokio::spawn(async move {
            let mut answers = answers.into_iter();
            let mut requests = 0;
            'accept: while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = Vec::new();
                loop {
                    // One request: its head, then its content-length.
                    let (end, length) = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            break (end + 4, length);
                        }
                        if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            continue 'accept;
                        }
                    };
                    while buf.len() < end + length {
                        stream.read_buf(&mut buf).await.unwrap();
                    }
                    buf.drain(..end + length);
                    requests += 1;
                    let close = match answers.next() {
                        Some((Some(answer), close)) => {
                            stream.write_all(answer.as_bytes()).await.unwrap();
                            close
                        }
                        Some((None, _)) => true,
                        None => return requests,
                    };
                    if answers.len() == 0 {
                        return requests;
                    }
                    if close {
                        continue 'accept;
                    }
                }
            }
            requests
        });
        (address, handle)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n{\"output\":1}\n";

    #[tokio::test]
    async fn answers_come_back_whole_and_connections_are_kept() {
        let chunked =
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"out\r\n8;x=y\r\nput\":2}\n\r\n0\r\n\r\n";
        let (address, worker) = worker(vec![(Some(OK), false), (Some(OK), false), (Some(chunked), false)]).await;
        let http = WorkerHttp::new(address);
        assert_eq!(http.predict("r-1", b"{\"input\":{}}").await.unwrap(), b"{\"output\":1}\n");
        assert_eq!(http.idle.lock().unwrap().len(), 1, "kept after a whole answer");
        assert_eq!(http.predict("r-1", b"{}").await.unwrap(), b"{\"output\":1}\n");
        assert_eq!(http.predict("r-1", b"{}").await.unwrap(), b"{\"output\":2}\n");
        assert_eq!(worker.await.unwrap(), 3, "three requests on one connection");
    }

    #[tokio::test]
    async fn failures_come_back_as_the_grpc_status_the_worker_named() {
        let invalid = "HTTP/1.1 400 Bad Request\r\nx-kiln-status: 3\r\ncontent-length: 9\r\n\r\nbad input";
        let proxy = "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope";
        let (address, _worker) = worker(vec![(Some(invalid), false), (Some(proxy), true)]).await;
        let http = WorkerHttp::new(address);
        let status = http.predict("r-1", b"{}").await.unwrap_err();
        assert_eq!((status.code(), status.message()), (tonic::Code::InvalidArgument, "bad input"));
        let status = http.predict("r-1", b"{}").await.unwrap_err();
        assert_eq!((status.code(), status.message()), (tonic::Code::Unavailable, "HTTP 502: nope"));
        assert!(http.idle.lock().unwrap().is_empty(), "a connection the worker closes is not kept");
        assert!(http.predict("bad\r\nx: y", b"{}").await.unwrap_err().message().contains("cannot be sent"));
    }

    #[tokio::test]
    async fn a_kept_connection_the_worker_closed_is_retried_once_on_a_new_one() {
        // The first connection answers once, then is closed unanswered when the second request comes.
        let (address, worker) = worker(vec![(Some(OK), false), (None, true), (Some(OK), false)]).await;
        let http = WorkerHttp::new(address);
        assert!(http.predict("r-1", b"{}").await.is_ok());
        assert_eq!(http.predict("r-1", b"{}").await.unwrap(), b"{\"output\":1}\n", "sent again on a new one");
        assert_eq!(http.idle.lock().unwrap().len(), 1, "the new connection is kept in the closed one's place");
        assert_eq!(worker.await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_new_connection_closed_unanswered_or_an_answer_cut_short_is_unavailable() {
        let cut = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial";
        let (address, _worker) = worker(vec![(None, true), (Some(cut), true), (None, true)]).await;
        let http = WorkerHttp::new(address);
        let status = http.predict("r-1", b"{}").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{}", status.message());
        let status = http.predict("r-1", b"{}").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("in the middle of an answer"), "{}", status.message());
        let nobody = WorkerHttp::new("127.0.0.1:1".into());
        assert_eq!(nobody.predict("r-1", b"{}").await.unwrap_err().code(), tonic::Code::Unavailable);
    }
}
