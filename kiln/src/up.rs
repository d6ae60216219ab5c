//! `kiln up`: the whole system in one process on this machine — the controller (manifest-directory mode), the
//! gateway, and a local agent (NVML GPUs, or simulated H100s where NVML finds none). On first run it writes an
//! example deployment of a small native model (and the model), an API key for the `default` namespace, and the
//! prices of metering (`prices.yaml`).

use std::{
    fmt::Write as _,
    fs,
    io::{Read, Write},
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use kiln_agent::{
    model::example_model,
    node::{Node, NodeOptions, host_name},
};
use kiln_controller::{
    registry::RegistryConfig,
    server::{Server, ServerOptions},
};
use serde::{Deserialize, Serialize};

/// `kiln up` options.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory of ModelDeployment manifests to serve (watched for changes); an example is written there if it
    /// holds none.
    #[arg(long, default_value = "kiln-manifests")]
    pub manifests: PathBuf,
    /// Where Kiln keeps its state on this machine: API keys, the weight cache, generated example models, and the
    /// predictions and counters that survive a restart (`predictions.redb`).
    #[arg(long, default_value = ".kiln")]
    pub state_dir: PathBuf,
    /// The gateway: predictions API, `GET /kiln/v1/deployments`, `/metrics`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Limits of the gateway's listener.
    #[command(flatten)]
    pub listener: crate::listener::ListenerArgs,
    /// Where agents connect (`kiln.agent.v1.AgentService`).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub agent_listen: SocketAddr,
    /// Run no local agent: serve agents that connect to --agent-listen only.
    #[arg(long)]
    pub no_agent: bool,
    /// Simulate these GPUs on the local agent instead of NVML, e.g. `h100-80gb:8`.
    #[arg(long)]
    pub simulate_gpus: Option<String>,
    /// The local agent's metrics address (GPU metrics with dcgm-exporter names).
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub agent_metrics: SocketAddr,
    /// The local agent's admin address (fault injection on simulated GPUs).
    #[arg(long, default_value = "127.0.0.1:9401")]
    pub agent_admin: SocketAddr,
    /// API keys file (YAML list of `{namespace, key}`); written with one key for `default` if absent.
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// Prices of metering (YAML: `currency`, and per GPU model `serverlessPerGpuSecond`, `rentalPerGpuHour`,
    /// `lendingShare`). Default: `<state-dir>/prices.yaml`, written with list prices on first run.
    #[arg(long)]
    pub prices: Option<PathBuf>,
    /// Silence after which an agent is lost and its replicas are placed elsewhere, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = seconds)]
    pub agent_grace: Duration,
    /// How long a request may be held while its deployment cold-starts, e.g. `120s`.
    #[arg(long, default_value = "120s", value_parser = seconds)]
    pub hold: Duration,
    /// Requests held per deployment before 429.
    #[arg(long, default_value_t = 256)]
    pub hold_capacity: usize,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Also serve `/metrics` here without a key (for Prometheus); on --listen it needs an operator key.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM or Ctrl-C: how long predictions under way may take to finish before they are answered 503
    /// (new ones get 503 at once), e.g. `30s`. A second signal exits at once.
    #[arg(long, default_value = "30s", value_parser = seconds)]
    pub shutdown_grace: Duration,
}

/// The prediction store in a state directory.
pub(crate) fn open_store(state_dir: &Path) -> Result<std::sync::Arc<kiln_controller::store::RedbStore>> {
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let store = kiln_controller::store::RedbStore::open(&state_dir.join("predictions.redb"))
        .context("opening the prediction store (is another kiln using this state directory?)")?;
    Ok(std::sync::Arc::new(store))
}

/// A watch that turns true on the first SIGTERM or SIGINT; a second one ends the process at once.
pub(crate) fn shutdown_signal() -> Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        for n in 0..2 {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            if n == 0 {
                tracing::info!("{name}: shutting down gracefully (a second signal exits at once)");
                let _ = tx.send(true);
            } else {
                tracing::warn!("{name} again: exiting without waiting");
                std::process::exit(130);
            }
        }
    });
    Ok(rx)
}

/// What one namespace may ask of the gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Predictions a namespace may create per second, sustained (429 with Retry-After beyond).
    #[arg(long, env = "KILN_TENANT_RATE", default_value_t = 200.0)]
    pub tenant_rate: f64,
    /// Predictions a namespace may create at once after a quiet spell.
    #[arg(long, env = "KILN_TENANT_BURST", default_value_t = 400.0)]
    pub tenant_burst: f64,
    /// Predictions a namespace may have unfinished at once.
    #[arg(long, env = "KILN_TENANT_IN_FLIGHT", default_value_t = 1000)]
    pub tenant_in_flight: u32,
    /// Bytes of input a namespace's unfinished predictions may hold at once (default 256 MiB).
    #[arg(long, env = "KILN_TENANT_IN_FLIGHT_BYTES", default_value_t = 256 << 20)]
    pub tenant_in_flight_bytes: u64,
}

impl LimitArgs {
    /// The gateway's limits.
    pub fn config(&self) -> kiln_controller::limits::LimitConfig {
        kiln_controller::limits::LimitConfig {
            rate_per_s: self.tenant_rate.max(0.0),
            burst: self.tenant_burst.max(1.0),
            max_in_flight: self.tenant_in_flight.max(1),
            max_in_flight_bytes: self.tenant_in_flight_bytes.max(1),
        }
    }
}

/// Where tenants' webhooks may be delivered.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WebhookArgs {
    /// Address ranges webhooks may reach although they are loopback, private or link-local (CIDRs, comma-separated,
    /// e.g. `10.20.0.0/16` for an internal receiver; `127.0.0.1` for receivers on this machine). Default: none.
    #[arg(long, env = "KILN_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<kiln_controller::webhook::Cidr>,
    /// Further ranges webhooks may not reach (e.g. the cluster's pod and service ranges).
    #[arg(long, env = "KILN_WEBHOOK_DENY", value_delimiter = ',')]
    pub webhook_deny: Vec<kiln_controller::webhook::Cidr>,
}

impl WebhookArgs {
    /// The gateway's webhook destinations.
    pub fn destinations(&self) -> kiln_controller::webhook::Destinations {
        kiln_controller::webhook::Destinations { allow: self.webhook_allow.clone(), deny: self.webhook_deny.clone() }
    }
}

pub(crate) fn seconds(s: &str) -> Result<Duration, String> {
    kiln_core::autoscale::keepalive::parse_duration(s).map(Duration::from_secs_f64).map_err(|e| e.to_string())
}

/// One API key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The namespace it reaches.
    pub namespace: String,
    /// The key (sent as `Authorization: Bearer <key>`).
    pub key: String,
}

/// Reads an API keys file; a key must be at least 16 characters and appear once.
pub fn read_keys(path: &Path) -> Result<Vec<ApiKey>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let keys: Vec<ApiKey> = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: expected a YAML list of {{namespace: ..., key: ...}}", path.display()))?;
    for (i, k) in keys.iter().enumerate() {
        if k.key.len() < 16 {
            bail!("{}: key {} (namespace {}) is shorter than 16 characters", path.display(), i + 1, k.namespace);
        }
        if keys[..i].iter().any(|o| o.key == k.key) {
            bail!("{}: key {} appears twice", path.display(), i + 1);
        }
    }
    Ok(keys)
}

fn random_key() -> Result<String> {
    let mut bytes = [0u8; 20];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    Ok(format!("kiln_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The example model's layer widths: 4 inputs, two hidden layers of 64, 2 outputs.
const EXAMPLE_DIMS: [usize; 4] = [4, 64, 64, 2];

/// Writes the example deployment and its model if the manifest directory holds no manifest.
fn first_run(manifests: &Path, state: &Path) -> Result<Option<PathBuf>> {
    fs::create_dir_all(manifests).with_context(|| format!("creating {}", manifests.display()))?;
    let has_manifests =
        fs::read_dir(manifests)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "yaml" || x == "yml"));
    if has_manifests {
        return Ok(None);
    }
    let models = state.join("models");
    fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    let model = fs::canonicalize(&models)?.join("mlp-demo.safetensors");
    if !model.exists() {
        fs::write(&model, example_model(7, &EXAMPLE_DIMS)).with_context(|| format!("writing {}", model.display()))?;
    }
    let manifest = format!(
        "# Written by `kiln up` on first run: a small dense network (4 inputs, 2 outputs) served by Kiln's native
# worker, scaled to zero when idle. Edit it, or add more ModelDeployment manifests here; Kiln picks changes up.
apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: mlp-demo
  namespace: default
spec:
  model:
    uri: file://{}
    runtime: native
  gpu:
    count: 1
    memoryPerGpu: 1Gi
  scaling:
    minReplicas: 0
    maxReplicas: 4
    targetConcurrency: 8
    keepAlive:
      policy: fixed
      duration: 5m
",
        model.display()
    );
    let path = manifests.join("mlp-demo.yaml");
    fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

/// Permissions of the state directory: the owner's only (it holds API keys and the webhook secret).
const PRIVATE_DIR_MODE: u32 = 0o700;
/// Permissions of a secret file in the state directory: readable and writable by the owner only.
const SECRET_FILE_MODE: u32 = 0o600;

/// Creates the state directory owner-only (0700), parents included, or tightens an existing one that the group or
/// others can reach.
fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    tighten(dir)
}

/// Writes a new secret file that is owner-only (0600) from the moment it exists: created with that mode and
/// `O_EXCL`, so it is never readable by others, not even briefly, and a file or symlink already at `path` is an
/// error rather than something written through.
fn write_secret(path: &Path, text: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SECRET_FILE_MODE)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Takes the group's and others' permissions off an existing file or directory that has any (files written by
/// earlier versions were 0644), saying so.
fn tighten(path: &Path) -> Result<()> {
    let mode = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let tight = mode & !0o077;
        fs::set_permissions(path, fs::Permissions::from_mode(tight))
            .with_context(|| format!("restricting the permissions of {}", path.display()))?;
        tracing::warn!(
            "{} was accessible to other users (mode {mode:o}); now {tight:o}, owner only: it holds secrets",
            path.display()
        );
    }
    Ok(())
}

/// The webhook signing secret kept in the state directory (written on first run, owner-only).
fn webhook_secret(state: &Path) -> Result<String> {
    let path = state.join("webhook-secret");
    if path.exists() {
        tighten(&path)?;
    } else {
        let secret = kiln_controller::webhook::Secret::generate().context("generating a webhook secret")?;
        write_secret(&path, &format!("{}\n", secret.as_str()))?;
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    kiln_controller::webhook::Secret::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(text.trim().to_owned())
}

fn keys(args: &UpArgs) -> Result<(PathBuf, Vec<ApiKey>)> {
    keys_in(args.api_keys.as_deref(), &args.state_dir)
}

/// The API keys file given, or the state directory's (written on first run with a key for `default`, owner-only;
/// one found readable by others is tightened). A file given with `--api-keys` is the operator's: only a warning if
/// others can read it.
fn keys_in(given: Option<&Path>, state: &Path) -> Result<(PathBuf, Vec<ApiKey>)> {
    let path = given.map_or_else(|| state.join("api-keys.yaml"), Path::to_path_buf);
    if given.is_some() {
        if fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            tracing::warn!("{} is accessible to other users; API keys are secrets (chmod 600)", path.display());
        }
    } else if path.exists() {
        tighten(&path)?;
    } else {
        let tenant = ApiKey { namespace: "default".into(), key: random_key()? };
        let operator = ApiKey { namespace: kiln_controller::gateway::OPERATOR.into(), key: random_key()? };
        let text = format!(
            "# API keys of the predictions API: each reaches the deployments of one namespace. The key of namespace\n\
             # \"*\" is an operator's: it lists every namespace (GET /kiln/v1/deployments, kiln get) and reads /metrics,\n\
             # and runs no predictions.\n{}",
            serde_yaml::to_string(&vec![tenant, operator])?
        );
        write_secret(&path, &text)?;
    }
    Ok((path.clone(), read_keys(&path)?))
}

/// The price file given, or the state directory's (written with [`PriceFile::DEFAULT`] on first run), parsed.
pub(crate) fn prices_in(given: Option<&Path>, state: &Path) -> Result<(PathBuf, kiln_core::billing::PriceTable)> {
    use kiln_controller::billing::PriceFile;
    let path = given.map_or_else(|| state.join("prices.yaml"), Path::to_path_buf);
    if given.is_none() && !path.exists() {
        fs::write(&path, PriceFile::DEFAULT).with_context(|| format!("writing {}", path.display()))?;
    }
    let table = PriceFile::read(&path)?;
    Ok((path, table))
}

/// Runs until interrupted.
pub fn up(args: &UpArgs) -> Result<()> {
    private_dir(&args.state_dir)?;
    let example = if args.no_agent { None } else { first_run(&args.manifests, &args.state_dir)? };
    let (keys_file, keys) = keys(args)?;
    let (prices_file, prices) = prices_in(args.prices.as_deref(), &args.state_dir)?;
    let currency = prices.currency.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        let options = ServerOptions {
            manifests: Some(args.manifests.clone()),
            http_addr: args.listen,
            http_limits: args.listener.limits(),
            agent_addr: args.agent_listen,
            api_keys: keys.iter().map(|k| (k.key.clone(), k.namespace.clone())).collect(),
            registry: RegistryConfig { grace: args.agent_grace, ..RegistryConfig::default() },
            control: kiln_controller::control::ControlConfig {
                hold_capacity: args.hold_capacity,
                // A node that has not registered within the agents' grace is gone anyway.
                rental_settle: args.agent_grace,
                ..Default::default()
            },
            hold: args.hold,
            webhook_secret: Some(webhook_secret(&args.state_dir)?),
            webhook_destinations: args.webhooks.destinations(),
            metrics_addr: args.metrics_listen,
            tenant_limits: args.limits.config(),
            store: open_store(&args.state_dir)?,
            shutdown_grace: args.shutdown_grace,
            rental_records: Some(args.state_dir.join("rentals.json")),
            ledger: kiln_controller::server::UsageLedger::Local(args.state_dir.join("ledger")),
            prices: Some(prices),
            ..ServerOptions::default()
        };
        let server = Server::bind(options).await.with_context(|| {
            format!("binding the gateway ({}) and agent ({}) addresses", args.listen, args.agent_listen)
        })?;
        let (http, agents) = (server.http_addr, server.agent_addr);
        tokio::spawn(reload_keys(keys_file.clone(), std::sync::Arc::clone(&server.gateway)));
        let shutdown = shutdown_signal()?;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut agent_line = String::from("no local agent (--no-agent): waiting for agents to connect");
        let mut agent_metrics = None;
        let mut agent = None;
        if !args.no_agent {
            let node = Node::open(NodeOptions {
                node: host_name(),
                simulate_gpus: args.simulate_gpus.clone(),
                metrics_addr: args.agent_metrics,
                admin_addr: args.agent_admin,
                worker_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
                sample_interval: Duration::from_secs(1),
                cache_dir: args.state_dir.join("cache"),
                disk_cache_size: 20 << 30,
                host_cache_size: 4 << 30,
                controller: Some(format!("http://{agents}")),
            })
            .await?;
            agent_line = format!("local agent: {}", node.addresses.summary);
            agent_metrics = Some(node.addresses.metrics);
            let stop = stop.clone();
            agent = Some(tokio::spawn(async move {
                if let Err(e) = node.serve(stop).await {
                    tracing::error!("the local agent stopped: {:#}", anyhow::Error::from(e));
                }
            }));
        }
        let key = keys.iter().find(|k| k.namespace == "default").or(keys.first());
        let mut banner = String::new();
        let _ = writeln!(banner, "kiln up: {agent_line}");
        let _ = writeln!(
            banner,
            "  predictions API   http://{http}   (deployments and their replicas: GET http://{http}/kiln/v1/deployments)"
        );
        // The console's one-time login link: for the operator key (the whole fleet), else the first key.
        let console_key = keys.iter().find(|k| k.namespace == kiln_controller::gateway::OPERATOR).or(keys.first());
        match console_key.and_then(|k| server.console.login_token(&k.key)) {
            Some(token) => writeln!(banner, "  console           http://{http}/ui?token={token} (one-time login link)"),
            None => writeln!(banner, "  console           http://{http}/ui (sign in with an API key)"),
        }
        .ok();
        let _ = writeln!(banner, "  metrics           http://{http}/metrics (controller and gateway; an operator key)");
        if let Some(m) = agent_metrics {
            let _ = writeln!(banner, "                    http://{m}/metrics (GPUs, dcgm-exporter names)");
        }
        let _ = writeln!(banner, "  agents connect to http://{agents}");
        let _ = writeln!(
            banner,
            "  usage             kiln usage, GET http://{http}/v1/usage (prices: {}, {currency})",
            prices_file.display()
        );
        let _ = match &example {
            Some(path) => writeln!(
                banner,
                "  manifests         {} (watched; wrote the example {})",
                args.manifests.display(),
                path.display()
            ),
            None => writeln!(banner, "  manifests         {} (watched)", args.manifests.display()),
        };
        if let Some(key) = key {
            let _ = writeln!(
                banner,
                "  API keys          {} (namespace {}: {})",
                keys_file.display(),
                key.namespace,
                key.key
            );
            let _ = writeln!(banner, "try (the first request cold-starts a replica; the next ones are warm):");
            let _ = writeln!(
                banner,
                "  curl -s -H 'Authorization: Bearer {}' -H 'Prefer: wait' -H 'Content-Type: application/json' \\\n    \
                 -d '{{\"input\": {{\"x\": [0.5, -1.0, 2.0, 0.25]}}}}' \\\n    \
                 http://{http}/v1/deployments/{}/mlp-demo/predictions",
                key.key, key.namespace
            );
        }
        say(&banner);
        // The gateway drains first (the local agent keeps serving the predictions under way), then the agent
        // stops its replicas.
        let served = server.serve(shutdown).await.context("serving");
        let _ = stop_tx.send(true);
        if let Some(agent) = agent
            && tokio::time::timeout(Duration::from_secs(10), agent).await.is_err()
        {
            tracing::warn!("the local agent did not stop within 10 s");
        }
        served
    })
}

/// Re-reads the API keys file when it changes (every 2 s); a file that no longer parses is reported and the keys
/// read before stay in force.
async fn reload_keys(
    path: PathBuf,
    gateway: std::sync::Arc<kiln_controller::gateway::Gateway<std::sync::Arc<kiln_controller::control::ControlPlane>>>,
) {
    let stamp = |p: &Path| fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let mut seen = stamp(&path);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match read_keys(&path) {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), file = %path.display(), "API keys reloaded");
                gateway.set_keys(keys.into_iter().map(|k| (k.key, k.namespace)));
            }
            Err(e) => tracing::error!("API keys not reloaded, the previous ones stay: {e:#}"),
        }
    }
}

/// Writes to stdout, ignoring errors: a process whose stdout was closed keeps serving instead of dying on a
/// broken pipe.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `kiln agent` options: the node agent, from the same binary (as `kiln-agent` runs it).
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The controller's agent address.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub controller: String,
    /// Node name; defaults to the host name.
    #[arg(long)]
    pub node_name: Option<String>,
    /// Simulate these GPUs instead of NVML, e.g. `h100-80gb:8`.
    #[arg(long)]
    pub simulate_gpus: Option<String>,
    /// Metrics (dcgm-exporter names).
    #[arg(long, default_value = "0.0.0.0:9400")]
    pub metrics_addr: SocketAddr,
    /// Admin endpoints (fault injection on simulated GPUs).
    #[arg(long, default_value = "127.0.0.1:9401")]
    pub admin_addr: SocketAddr,
    /// Where the gateway reaches this node's replicas (`WorkerService`).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub worker_addr: SocketAddr,
    /// Local-disk weight cache.
    #[arg(long, default_value = "/var/lib/kiln/cache")]
    pub cache_dir: PathBuf,
    /// The replicas' address as the gateway reaches it (`host:port`), when --worker-addr binds 0.0.0.0.
    #[arg(long)]
    pub advertise: Option<String>,
}

/// Runs an agent until interrupted.
pub fn agent(args: &AgentArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        let node = Node::open(NodeOptions {
            node: args.node_name.clone().unwrap_or_else(host_name),
            simulate_gpus: args.simulate_gpus.clone(),
            metrics_addr: args.metrics_addr,
            admin_addr: args.admin_addr,
            worker_addr: args.worker_addr,
            advertise: args.advertise.clone(),
            sample_interval: Duration::from_secs(1),
            cache_dir: args.cache_dir.clone(),
            disk_cache_size: 20 << 30,
            host_cache_size: 4 << 30,
            controller: Some(args.controller.clone()),
        })
        .await?;
        let a = &node.addresses;
        let mut banner = String::new();
        let _ = writeln!(banner, "kiln agent: {}", a.summary);
        let _ = writeln!(banner, "metrics: http://{}/metrics", a.metrics);
        let _ = writeln!(banner, "admin: http://{} (token in {})", a.admin, a.admin_token_file.display());
        let _ = writeln!(banner, "workers: {}", a.workers);
        say(&banner);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = stop_tx.send(true);
            }
        });
        Ok(node.serve(stop).await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-up-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_state_directory_and_its_secrets_are_created_owner_only() {
        let root = scratch("create");
        let state = root.join("nested").join(".kiln");
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        let secret = webhook_secret(&state).unwrap();
        assert!(secret.starts_with("whsec_"), "{secret}");
        assert_eq!(mode(&state.join("webhook-secret")), 0o600);
        let (path, keys) = keys_in(None, &state).unwrap();
        assert_eq!(path, state.join("api-keys.yaml"));
        let namespaces: Vec<&str> = keys.iter().map(|k| k.namespace.as_str()).collect();
        assert_eq!(namespaces, ["default", kiln_controller::gateway::OPERATOR], "a tenant key and an operator key");
        assert_eq!(mode(&path), 0o600);
        // Read back as they are, not written again.
        assert_eq!(webhook_secret(&state).unwrap(), secret);
        assert_eq!(keys_in(None, &state).unwrap().1, keys);
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn secrets_left_readable_by_an_earlier_version_are_tightened_on_start() {
        let root = scratch("tighten");
        let state = root.join(".kiln");
        private_dir(&state).unwrap();
        let secret = webhook_secret(&state).unwrap();
        let (keys_file, keys) = keys_in(None, &state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(state.join("webhook-secret"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&keys_file, fs::Permissions::from_mode(0o664)).unwrap();
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(webhook_secret(&state).unwrap(), secret);
        assert_eq!(mode(&state.join("webhook-secret")), 0o600);
        assert_eq!(keys_in(None, &state).unwrap().1, keys);
        assert_eq!(mode(&keys_file), 0o600);
        // A keys file the operator gave is theirs: read, not changed.
        let given = root.join("team-keys.yaml");
        fs::copy(&keys_file, &given).unwrap();
        fs::set_permissions(&given, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(keys_in(Some(&given), &state).unwrap().1, keys);
        assert_eq!(mode(&given), 0o640);
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn a_secret_is_never_written_through_something_already_at_its_path() {
        let root = scratch("excl");
        let target = root.join("elsewhere");
        fs::write(&target, "untouched").unwrap();
        std::os::unix::fs::symlink(&target, root.join("webhook-secret-link")).unwrap();
        assert!(write_secret(&root.join("webhook-secret-link"), "whsec_x").is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        fs::remove_dir_all(&root).ok();
    }
}
