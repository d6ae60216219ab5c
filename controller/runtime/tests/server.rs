//! The controller process as `kiln up` runs it, without agents: special files in the manifest directory are listed
//! as invalid while the service answers, and the gateway's listener limits hold in front of the real routes.

#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use kiln_controller::{
    connections::HttpLimits,
    server::{Server, ServerOptions},
};
use serde_json::Value;

const VALID: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: mlp
  namespace: demo
spec:
  model:
    uri: file:///models/mlp.safetensors
  gpu:
    count: 1
    memoryPerGpu: 1Gi
  scaling:
    minReplicas: 0
    maxReplicas: 2
"#;

/// Sends `request` and reads the answer until the server closes, within 5 s.
fn exchange(addr: SocketAddr, request: &[u8]) -> (String, Duration) {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(request).unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).expect("no answer within 5 s");
    (String::from_utf8_lossy(&response).into_owned(), started.elapsed())
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    // The manifest files are the operator's to see.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-ops-0123456789\r\nConnection: close\r\n\r\n"
    );
    let (response, _) = exchange(addr, request.as_bytes());
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), serde_json::from_str(body).unwrap_or(Value::Null))
}

fn manifest_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-server-special-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("a-valid.yaml"), VALID).unwrap();
    nix::unistd::mkfifo(&d.join("b-fifo.yaml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("c-zero.yaml")).unwrap();
    std::os::unix::fs::symlink("d-loop.yaml", d.join("d-loop.yaml")).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_manifest_files_are_listed_as_invalid_and_the_gateway_keeps_its_limits() {
    let dir = manifest_dir();
    let server = Server::bind(ServerOptions {
        manifests: Some(dir.clone()),
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        agent_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_keys: vec![
            ("key-demo-0123456789".into(), "demo".into()),
            ("key-ops-0123456789".into(), kiln_controller::gateway::OPERATOR.into()),
        ],
        watch_interval: Duration::from_millis(50),
        http_limits: HttpLimits { header_read_timeout: Duration::from_millis(500), ..HttpLimits::default() },
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let addr = server.http_addr;
    let (_stop, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(server.serve(stop));

    let state = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, state) = get(addr, "/kiln/v1/deployments");
            assert_eq!(status, 200);
            if state["invalid"].as_array().is_some_and(|i| i.len() == 3) || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let names: Vec<&str> =
        state["deployments"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["demo/mlp"], "{state:#}");
    let invalid: Vec<(String, String)> = state["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let file = PathBuf::from(e["file"].as_str().unwrap());
            (file.file_name().unwrap().to_string_lossy().into_owned(), e["error"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        invalid,
        [
            ("b-fifo.yaml".to_owned(), "not a regular file (a FIFO); only regular files are read".to_owned()),
            (
                "c-zero.yaml".to_owned(),
                "not a regular file (a character device); only regular files are read".to_owned()
            ),
            ("d-loop.yaml".to_owned(), "a symbolic link loop (too many levels of symbolic links)".to_owned()),
        ],
        "{state:#}"
    );

    tokio::task::spawn_blocking(move || {
        assert_eq!(get(addr, "/healthz").0, 200);
        // A prediction declaring 1 GiB with a short body: 413 at once, not a held connection.
        let request = b"POST /v1/deployments/demo/mlp/predictions HTTP/1.1\r\nHost: x\r\n\
            Authorization: Bearer key-demo-0123456789\r\nContent-Type: application/json\r\n\
            Content-Length: 1073741824\r\n\r\n{\"input\": {}}";
        let (response, took) = exchange(addr, request);
        assert!(response.starts_with("HTTP/1.1 413"), "{response}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        // A slow-header connection is closed after the header timeout; /healthz answers meanwhile.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
        assert_eq!(get(addr, "/healthz").0, 200);
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        slow.read_to_end(&mut rest).expect("the slow connection was not closed");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    })
    .await
    .unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
