//! `kiln apply -f FILE` and `kiln get`: conveniences for the manifest-directory mode of `kiln up`.
//! `apply` checks every document as the API server would and, only if all are valid, writes the file into the
//! watched directory (the controller picks it up within a second); `get` prints what the gateway's
//! `GET /kiln/v1/deployments` says.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use kiln_k8s_api::validate::Validator;
use serde::Deserialize;
use serde_json::Value;

/// Validates `file` and copies it into `manifests` under its own name.
pub fn apply(file: &Path, manifests: &Path) -> Result<ExitCode> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let limit = kiln_controller::manifests::MAX_FLOW_DEPTH;
    if let Some((document, line)) = kiln_controller::manifests::too_deep(&text, limit) {
        bail!("{}: document {document}: nested deeper than {limit} levels at line {line}", file.display());
    }
    let validator = Validator::default();
    let mut applied = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("document {}: not valid YAML: {e}", index + 1));
                break;
            }
        };
        match validator.validate(&value) {
            Ok(()) => applied.push(format!(
                "{}/{}",
                value["kind"].as_str().unwrap_or_default(),
                value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
            )),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{}: {e}", file.display());
        }
        eprintln!("nothing applied");
        return Ok(ExitCode::FAILURE);
    }
    if applied.is_empty() {
        bail!("{}: no document to apply", file.display());
    }
    fs::create_dir_all(manifests).with_context(|| format!("creating {}", manifests.display()))?;
    let name = file.file_name().context("the file has no name")?;
    let mut target = manifests.join(name);
    if target.extension().is_none_or(|e| e != "yaml" && e != "yml") {
        target.set_extension("yaml");
    }
    fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    for a in applied {
        println!("{a} applied ({})", target.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the deployments and nodes of the gateway at `server` (`host:port`), as `key` (else the operator key of
/// `keys_file`, else its first key) may see them.
pub fn get(server: &str, key: Option<String>, keys_file: &Path) -> Result<ExitCode> {
    let address = server.trim_start_matches("http://").trim_end_matches('/');
    let key = match key {
        Some(k) => k,
        None => {
            let keys = crate::up::read_keys(keys_file)
                .with_context(|| format!("no --key given (or KILN_API_KEY), and {}", keys_file.display()))?;
            let chosen = keys.iter().find(|k| k.namespace == kiln_controller::gateway::OPERATOR).or(keys.first());
            chosen.map(|k| k.key.clone()).with_context(|| format!("{} holds no key", keys_file.display()))?
        }
    };
    let mut stream =
        TcpStream::connect(address).with_context(|| format!("connecting to {address} (is `kiln up` running?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /kiln/v1/deployments HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or_default().to_owned();
    if status != "200" {
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default();
        bail!("GET /kiln/v1/deployments: HTTP {status}: {body}");
    }
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).context("a malformed HTTP response")?;
    let state: Value = serde_json::from_str(body).context("the gateway's answer is not JSON")?;
    println!(
        "{:<32} {:>7} {:>7} {:>7} {:>8} {:>7}  NOTE",
        "DEPLOYMENT", "READY", "LOADING", "DESIRED", "INFLIGHT", "WAITING"
    );
    for d in state["deployments"].as_array().into_iter().flatten() {
        let note = match &d["degraded"] {
            Value::Object(f) => format!(
                "start failed ({}): {}; next start in {} s",
                f["reason"].as_str().unwrap_or_default(),
                f["message"].as_str().unwrap_or_default(),
                f["nextStartInSeconds"]
            ),
            _ => d["unschedulable"].as_str().unwrap_or_default().to_owned(),
        };
        println!(
            "{:<32} {:>7} {:>7} {:>7} {:>8} {:>7}  {}",
            d["name"].as_str().unwrap_or_default(),
            d["replicas"]["ready"],
            d["replicas"]["loading"],
            d["replicas"]["desired"],
            d["inFlight"],
            d["waiting"],
            note
        );
    }
    for e in state["invalid"].as_array().into_iter().flatten() {
        let what = e["file"].as_str().or(e["deployment"].as_str()).unwrap_or_default();
        println!("invalid: {what}: {}", e["error"].as_str().unwrap_or_default());
    }
    println!();
    println!("{:<32} {:>6} {:>6} {:>10}", "NODE", "READY", "GPUS", "SIMULATED");
    for n in state["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<32} {:>6} {:>6} {:>10}",
            n["name"].as_str().unwrap_or_default(),
            n["ready"],
            n["gpus"],
            n["simulated"]
        );
    }
    Ok(ExitCode::SUCCESS)
}
