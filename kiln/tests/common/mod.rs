//! What the process-level tests share: a child process killed on drop, starting `kiln` and reading its banner, and
//! a one-shot HTTP/1.1 client.

#![allow(dead_code)] // each test binary uses its part

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kiln args...` (in `cwd` if given), reads stdout until a line contains `marker`, keeps draining it (a
/// closed pipe would test the pipe, not kiln); returns the process and the lines read.
pub fn spawn_kiln(args: &[&str], cwd: Option<&Path>, marker: &str) -> (Proc, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(args).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::null());
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let mut child = command.spawn().expect("starting kiln");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut text = String::new();
    for line in lines.by_ref() {
        let line = line.expect("kiln's stdout");
        text += &line;
        text.push('\n');
        if line.contains(marker) {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (Proc(child), text)
}

/// One HTTP/1.1 request: (status, head, body).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(90))).expect("a timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request += &format!("{k}: {v}\r\n");
    }
    request += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(request.as_bytes()).expect("sending");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("reading");
    let status = response.get(9..12).and_then(|c| c.parse().ok()).expect("a status line");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_owned(), body.to_owned())
}
