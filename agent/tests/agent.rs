//! The agent binary with simulated GPUs: metrics over HTTP, and an Xid injected through its CLI.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

struct Agent {
    child: Child,
    metrics: String,
    admin: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cache_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kiln-agent-test-{}", std::process::id()))
}

fn token_file() -> String {
    cache_dir().join("admin-token").to_str().unwrap().to_owned()
}

fn start() -> Agent {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["--simulate-gpus", "h100-80gb:8", "--node-name", "test-node", "--sample-interval", "100ms"])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--standalone",
            "--worker-endpoint",
            "127.0.0.1:0",
        ])
        .args(["--cache-dir", cache_dir().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut find = |prefix: &str| loop {
        let line = lines.next().expect("the agent prints its addresses").unwrap();
        if let Some(rest) = line.strip_prefix(prefix) {
            break rest.trim_start_matches("http://").split('/').next().unwrap().to_owned();
        }
    };
    let metrics = find("metrics: ");
    let admin = find("admin: ");
    // Keep reading: closing the pipe while the agent still prints would test the pipe, not the agent.
    std::thread::spawn(move || lines.for_each(drop));
    Agent { child, metrics, admin }
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn wait_for(addr: &str, what: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = get(addr, "/metrics");
        if what(&page) || Instant::now() > deadline {
            return page;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn simulated_gpus_serve_dcgm_metrics_and_an_injected_xid_79_marks_the_gpu_unhealthy() {
    let agent = start();
    let page = wait_for(&agent.metrics, |p| p.contains("DCGM_FI_DEV_FB_FREE{"));
    for name in ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"] {
        assert_eq!(page.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count(), 8, "{name}");
    }
    for name in ["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_XID_ERRORS"] {
        assert_eq!(page.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count(), 8, "{name}");
    }
    assert!(page.contains("Hostname=\"test-node\""));
    assert!(page.contains("kiln_agent_workers{Hostname=\"test-node\",phase=\"ready\"} 0.0"), "{page}");
    assert!(page.contains("kiln_agent_cache_capacity_bytes{Hostname=\"test-node\",tier=\"disk\"}"), "{page}");

    // Without the node's admin token (a webhook, a model server), the admin endpoints refuse; the token file is
    // the agent's alone.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["inject-xid", "--gpu", "3", "--xid", "79", "--admin", &agent.admin, "--token", "guess"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"), "{}", String::from_utf8_lossy(&out.stderr));
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(token_file()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["inject-xid", "--gpu", "3", "--xid", "79", "--admin", &agent.admin, "--token-file", &token_file()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unhealthy = |p: &str| {
        p.lines().any(|l| l.starts_with("kiln_agent_gpu_health{") && l.contains("gpu=\"3\"") && l.ends_with(" 2.0"))
    };
    let page = wait_for(&agent.metrics, unhealthy);
    assert!(unhealthy(&page), "GPU 3 is not unhealthy in:\n{page}");
    assert!(
        page.lines()
            .any(|l| l.starts_with("DCGM_FI_DEV_XID_ERRORS{") && l.contains("gpu=\"3\"") && l.ends_with(" 79.0"))
    );
    let gpus = get(&agent.metrics, "/v1/gpus");
    assert!(gpus.contains("\"health\":\"unhealthy\"") && gpus.contains("fallen off the bus"), "{gpus}");

    // A bad GPU index is refused with a clear error; a reset brings GPU 3 back.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["inject-xid", "--gpu", "12", "--xid", "79", "--admin", &agent.admin, "--token-file", &token_file()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no GPU 12"));
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["reset-gpu", "--gpu", "3", "--admin", &agent.admin, "--token-file", &token_file()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let healthy = |p: &str| {
        p.lines().any(|l| l.starts_with("kiln_agent_gpu_health{") && l.contains("gpu=\"3\"") && l.ends_with(" 0.0"))
    };
    assert!(healthy(&wait_for(&agent.metrics, healthy)));
}
