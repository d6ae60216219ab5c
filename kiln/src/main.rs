//! `kiln`: the composition root. It wires the pure core, the Kubernetes API types, the controller and the agent
//! into commands; it holds no logic of its own beyond argument parsing, file I/O and exit codes.

use std::{
    fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

mod bench;
mod client;
mod controller;
mod listener;
mod simulate;
mod up;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_k8s_api::{crdgen, validate::Validator};
use serde::Deserialize;

/// Kiln: a self-hosted serverless GPU inference platform on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system on this machine: controller, gateway and a local agent (simulated GPUs when NVML finds
    /// none), serving the manifests in a directory.
    Up(up::UpArgs),
    /// Check a manifest file and put it into the directory `kiln up` watches.
    Apply {
        /// The manifest file (several documents allowed).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The directory `kiln up` watches.
        #[arg(long, default_value = "kiln-manifests")]
        manifests: PathBuf,
    },
    /// Show the deployments and nodes of a running `kiln up` (its gateway's `GET /kiln/v1/deployments`).
    Get {
        /// The gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        server: String,
        /// The API key to list with (an operator key sees every namespace and the nodes; a tenant's, its own).
        /// Default: `$KILN_API_KEY`, else the operator key of `.kiln/api-keys.yaml`, else its first key.
        #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
        key: Option<String>,
        /// The keys file to take the key from when none is given.
        #[arg(long, default_value = ".kiln/api-keys.yaml")]
        keys_file: std::path::PathBuf,
    },
    /// Show metered GPU usage and its cost (the gateway's `GET /v1/usage`), or a tenant's monthly statement
    /// (`kiln usage statement --month 2026-11`).
    Usage(client::UsageArgs),
    /// Run the controller against a Kubernetes cluster (in-cluster or kubeconfig), with leader election.
    Controller(controller::ControllerArgs),
    /// Run a node agent (the same agent as `kiln-agent`), connecting to a controller.
    Agent(up::AgentArgs),
    /// Measure the control plane's overheads (gateway latency, cold-start signalling) on loopback.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
    /// Replay real traces through the real placement engine and autoscaler.
    Simulate {
        #[command(subcommand)]
        what: Simulation,
    },
    /// Print the CustomResourceDefinitions (for `kubectl apply -f -`), or write one file per CRD with --out.
    Crdgen {
        /// Directory to write `<group>_<plural>.yaml` files into, instead of printing one YAML stream.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check Kiln manifests offline against the CRD schemas and CEL rules, as the apiserver would on apply.
    Validate {
        /// YAML files (several documents per file allowed); `-` reads standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum Simulation {
    /// GPU allocation under the placement policies, on the Alibaba GPU cluster trace (the FGD paper's experiment).
    Placement(simulate::PlacementArgs),
    /// Cold starts, latency and GPU cost under keep-alive policies, on serving traces.
    Serving(simulate::ServingArgs),
}

fn main() -> ExitCode {
    kiln_agent::allocator::bound_retention();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Up(_) | Command::Controller(_) | Command::Agent(_) | Command::Bench { .. }) {
        // Before any listener is sized: the gateway's connection cap follows the descriptor limit.
        kiln_controller::connections::raise_descriptor_limit();
    }
    let result = match cli.command {
        Command::Up(args) => {
            init_tracing();
            up::up(&args).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench { what } => bench::run(&what).map(|()| ExitCode::SUCCESS),
        Command::Apply { file, manifests } => client::apply(&file, &manifests),
        Command::Get { server, key, keys_file } => client::get(&server, key, &keys_file),
        Command::Usage(args) => client::usage(&args),
        Command::Controller(args) => {
            init_tracing();
            controller::controller(&args).map(|()| ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            init_tracing();
            up::agent(&args).map(|()| ExitCode::SUCCESS)
        }
        Command::Simulate { what: Simulation::Placement(args) } => {
            simulate::placement(&args).map(|()| ExitCode::SUCCESS)
        }
        Command::Simulate { what: Simulation::Serving(args) } => simulate::serving(&args).map(|()| ExitCode::SUCCESS),
        Command::Crdgen { out } => crdgen_cmd(out.as_deref()),
        Command::Validate { files } => validate_cmd(&files),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise.
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn crdgen_cmd(out: Option<&Path>) -> Result<ExitCode> {
    let manifests = crdgen::render()?;
    match out {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for manifest in &manifests {
                let path = dir.join(&manifest.file_name);
                fs::write(&path, &manifest.contents).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
        None => {
            let mut stdout = io::stdout().lock();
            for manifest in &manifests {
                writeln!(stdout, "---")?;
                stdout.write_all(manifest.contents.as_bytes())?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn validate_cmd(files: &[PathBuf]) -> Result<ExitCode> {
    let validator = Validator::default();
    let mut invalid = 0usize;
    let mut valid = 0usize;
    for file in files {
        let (name, text) = if file.as_os_str() == "-" {
            let mut text = String::new();
            io::stdin().read_to_string(&mut text).context("reading standard input")?;
            ("<stdin>".to_owned(), text)
        } else {
            let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            (file.display().to_string(), text)
        };
        let limit = kiln_controller::manifests::MAX_FLOW_DEPTH;
        if let Some((document, line)) = kiln_controller::manifests::too_deep(&text, limit) {
            println!("{name}: document {document}: nested deeper than {limit} levels at line {line}; not parsed");
            invalid += 1;
            continue;
        }
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = match serde_json::Value::deserialize(document) {
                Ok(serde_json::Value::Null) => continue,
                Ok(value) => value,
                Err(err) => {
                    // The parser cannot resynchronise after a syntax error: the rest of the file is unread.
                    println!("{name} (document {}): not valid YAML, rest of the file skipped: {err}", index + 1);
                    invalid += 1;
                    break;
                }
            };
            match validator.validate(&value) {
                Ok(()) => {
                    valid += 1;
                    let kind = value["kind"].as_str().unwrap_or_default();
                    let object = value.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or_default();
                    println!("{name}: {kind}/{object} is valid");
                }
                Err(err) => {
                    invalid += 1;
                    println!("{name}: {err}");
                }
            }
        }
    }
    println!("{valid} valid, {invalid} invalid");
    Ok(if invalid == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
