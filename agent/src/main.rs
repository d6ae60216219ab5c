//! `kiln-agent`: one per GPU node (a DaemonSet in a cluster; in-process under `kiln up`).
//!
//! It will own everything that touches the GPU: NVML telemetry and Xid health, the simulated backend used when
//! NVML is absent, the worker runtimes (native CUDA through cudarc, external processes) and the tiered weight
//! cache, and it will speak `kiln.agent.v1` (the `kiln-proto` crate) to the controller.
//!
//! It is the only crate allowed `unsafe` code (FFI into CUDA and NVML). The workspace denies `unsafe_code`; the
//! agent's FFI modules opt in one by one with `#[allow(unsafe_code)]`, and every `unsafe` block carries a
//! `// SAFETY:` comment.

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;

/// Kiln node agent.
#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version, about)]
struct Args {
    /// Controller gRPC address (`AgentService`).
    #[arg(long, env = "KILN_CONTROLLER", default_value = "http://127.0.0.1:7070")]
    controller: String,
    /// Node name to register as; defaults to the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Simulate GPUs instead of using NVML, e.g. `h100-80gb:8`.
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// Where to serve Prometheus metrics (DCGM-exporter compatible names).
    #[arg(long, default_value = "0.0.0.0:9400")]
    metrics_addr: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "kiln-agent: not yet implemented (see issue 5, node agent); would register {:?} with {} and serve metrics on {}",
        args.node_name, args.controller, args.metrics_addr
    );
    ExitCode::from(2)
}
