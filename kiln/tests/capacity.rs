//! `kiln up` on a simulated 8 x H100 node holds as many replicas as its GPUs do: eight single-GPU deployments at
//! once, then sixteen half-GPU ones — a replica's CPU and host memory are a small share of the simulated machine's,
//! not a whole core of the machine the test runs on. (An "80GB" H100 has 81,559 MiB, 79.6 GiB: a replica asking
//! for 80Gi needs two of them, and two asking for 40Gi do not fit on one; hence 79Gi and 39Gi.)

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{http, spawn_kiln};
use serde_json::Value;

fn manifest(name: &str, model: &Path, memory_per_gpu: &str) -> String {
    format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  model:\n    uri: file://{}\n    runtime: native\n  gpu:\n    count: 1\n    memoryPerGpu: {memory_per_gpu}\n\
         \x20 scaling:\n    minReplicas: 1\n    maxReplicas: 1\n",
        model.display()
    )
}

fn state(addr: &str, auth: &str) -> Value {
    let (status, _, body) = http(addr, "GET", "/kiln/v1/deployments", &[("Authorization", auth)], "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `n` deployments named `prefix-*` each have their replica ready; returns the GPUs they hold.
fn wait_ready(addr: &str, auth: &str, prefix: &str, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = state(addr, auth);
        let ours: Vec<&Value> = s["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["name"].as_str().unwrap().starts_with(&format!("default/{prefix}-")))
            .collect();
        let ready = ours.iter().filter(|d| d["replicas"]["ready"] == 1).count();
        if ours.len() == n && ready == n {
            let mut gpus: Vec<u64> = ours
                .iter()
                .flat_map(|d| d["placements"][0]["gpus"].as_array().unwrap().iter().map(|g| g.as_u64().unwrap()))
                .collect();
            gpus.sort_unstable();
            return gpus;
        }
        assert!(Instant::now() < deadline, "{ready} of {n} {prefix} replicas ready after 60 s: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn eight_simulated_h100s_hold_eight_whole_gpu_and_then_sixteen_half_gpu_replicas() {
    let dir = std::env::temp_dir().join(format!("kiln-capacity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let model = dir.join("tiny.safetensors");
    std::fs::write(&model, kiln_agent::model::example_model(1, &[8, 16, 4])).unwrap();
    let d = |p: &str| dir.join(p).to_str().unwrap().to_owned();
    let args = [
        "up",
        "--simulate-gpus",
        "h100-80gb:8",
        "--manifests",
        &d("manifests"),
        "--state-dir",
        &d("state"),
        "--listen",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--agent-metrics",
        "127.0.0.1:0",
        "--agent-admin",
        "127.0.0.1:0",
    ];
    let (_up, text) = spawn_kiln(&args, Some(&dir), "/predictions");
    let at = text.find("http://127.0.0.1:").unwrap_or_else(|| panic!("{text}")) + "http://".len();
    let addr: String = text[at..].chars().take_while(|c| !c.is_whitespace() && *c != '/').collect();
    let key = text.split("Bearer ").nth(1).unwrap().split('\'').next().unwrap();
    let auth = format!("Bearer {key}");

    for i in 0..8 {
        std::fs::write(manifests.join(format!("whole-{i}.yaml")), manifest(&format!("whole-{i}"), &model, "79Gi"))
            .unwrap();
    }
    assert_eq!(wait_ready(&addr, &auth, "whole", 8), (0..8).collect::<Vec<u64>>(), "one GPU each, all eight GPUs");

    for i in 0..8 {
        std::fs::remove_file(manifests.join(format!("whole-{i}.yaml"))).unwrap();
    }
    for i in 0..16 {
        std::fs::write(manifests.join(format!("half-{i}.yaml")), manifest(&format!("half-{i}"), &model, "39Gi"))
            .unwrap();
    }
    let gpus = wait_ready(&addr, &auth, "half", 16);
    for g in 0..8 {
        assert_eq!(gpus.iter().filter(|&&x| x == g).count(), 2, "two half-GPU replicas on GPU {g}: {gpus:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
