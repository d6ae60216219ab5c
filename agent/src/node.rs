//! One whole agent: GPUs (NVML, or simulated), the sampler thread, the weight cache, the workers and their
//! `WorkerService`, the metrics and admin HTTP servers, and the session to the controller. The `kiln-agent` binary
//! runs one; `kiln up` runs one in its own process.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    cache::{CacheError, WeightCache},
    commands::NodeCommands,
    gpu::{
        GpuBackend,
        nvml::NvmlGpus,
        sim::{SimError, SimulatedGpus},
    },
    http::{self, AppState},
    session::{self, Backoff, SessionConfig},
    telemetry::Telemetry,
    workers::{WorkerApi, Workers},
};

/// Why an agent could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The simulated GPU spec is invalid.
    #[error("simulated GPUs")]
    SimulatedGpus(#[source] SimError),
    /// The GPU sampler thread could not start.
    #[error("starting the GPU sampler")]
    Sampler(#[source] std::io::Error),
    /// The weight cache could not be opened.
    #[error("opening the weight cache in {dir}")]
    Cache {
        /// The cache directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: CacheError,
    },
    /// Reading, writing or generating the admin token failed (`what` says which, with the path).
    #[error("{what}")]
    AdminToken {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The admin token file exists but is empty.
    #[error("{} is empty", .0.display())]
    EmptyAdminToken(PathBuf),
    /// A listener could not be bound.
    #[error("binding the {what} address {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A bound listener's address could not be read.
    #[error("reading a bound listener's address")]
    LocalAddr(#[source] std::io::Error),
    /// The metrics, admin or worker server failed.
    #[error("{0} server")]
    Http(&'static str, #[source] std::io::Error),
}

/// Results of this module.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// How to run an agent.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Node name.
    pub node: String,
    /// Simulate these GPUs (`h100-80gb:8`) instead of NVML; NVML finding no GPU also falls back to `h100-80gb:8`.
    pub simulate_gpus: Option<String>,
    /// Metrics, `/healthz` and `/v1/gpus`.
    pub metrics_addr: SocketAddr,
    /// Admin endpoints (fault injection).
    pub admin_addr: SocketAddr,
    /// Where the `WorkerService` listens (port 0: any).
    pub worker_addr: SocketAddr,
    /// The worker endpoint reported to the controller (`host:port` the gateway can reach); `None`: the bound
    /// address (right on one machine, not behind `0.0.0.0`).
    pub advertise: Option<String>,
    /// GPU sampling interval.
    pub sample_interval: Duration,
    /// Local-disk weight cache directory and size, host-RAM cache size.
    pub cache_dir: PathBuf,
    /// Bytes.
    pub disk_cache_size: u64,
    /// Bytes.
    pub host_cache_size: u64,
    /// The controller's `AgentService`; `None`: standalone.
    pub controller: Option<String>,
}

/// The node name when none is given: the host name (`/etc/hostname`), else `localhost`.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Where a running agent listens.
#[derive(Debug, Clone)]
pub struct NodeAddresses {
    /// One line: the node, its GPUs and where they come from.
    pub summary: String,
    /// Metrics.
    pub metrics: SocketAddr,
    /// Admin.
    pub admin: SocketAddr,
    /// `WorkerService`.
    pub workers: SocketAddr,
    /// The file holding the admin token (0600).
    pub admin_token_file: PathBuf,
}

/// The node's admin token, kept in `cache_dir/admin-token` (created 0600 on first start, read after), so the
/// `inject-xid` / `reset-gpu` commands on the node can present it.
fn admin_token(cache_dir: &std::path::Path) -> Result<(http::AdminToken, PathBuf)> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = cache_dir.join("admin-token");
    let failed = |what: String| move |source| NodeError::AdminToken { what, source };
    std::fs::create_dir_all(cache_dir).map_err(failed(format!("creating {}", cache_dir.display())))?;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut file) => {
            let token = http::AdminToken::generate().map_err(failed("generating the admin token".into()))?;
            file.write_all(token.as_str().as_bytes()).map_err(failed(format!("writing {}", path.display())))?;
            Ok((token, path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path).map_err(failed(format!("reading {}", path.display())))?;
            let token = http::AdminToken::new(&text);
            if token.as_str().is_empty() {
                return Err(NodeError::EmptyAdminToken(path));
            }
            Ok((token, path))
        }
        Err(e) => Err(failed(format!("creating {}", path.display()))(e)),
    }
}

/// Opens the GPUs and the cache and binds the listeners; [`Node::serve`] then runs it.
#[derive(Debug)]
pub struct Node {
    /// Where it listens.
    pub addresses: NodeAddresses,
    options: NodeOptions,
    telemetry: Telemetry,
    commands: Arc<NodeCommands>,
    state: AppState,
    admin_token: http::AdminToken,
    listeners: [tokio::net::TcpListener; 3],
}

impl Node {
    /// Opens the GPUs (starting the sampler thread) and the cache, and binds the three listeners.
    pub async fn open(options: NodeOptions) -> Result<Self> {
        let node = options.node.clone();
        let (backend, sim): (Box<dyn GpuBackend>, _) = match &options.simulate_gpus {
            Some(spec) => {
                let gpus = SimulatedGpus::new(&node, spec).map_err(NodeError::SimulatedGpus)?;
                let handle = gpus.handle();
                (Box::new(gpus), Some(handle))
            }
            None => match NvmlGpus::open() {
                Ok(gpus) => {
                    // Real GPUs: say now, not at the first start, when the GPU path cannot run here.
                    if !crate::cuda::available() {
                        tracing::warn!(
                            "NVML sees GPUs but the CUDA driver library is not loadable: native replicas will run on the CPU"
                        );
                    } else {
                        let missing = crate::cuda::missing_libraries();
                        if !missing.is_empty() {
                            tracing::warn!(
                                "{} not found: native replicas on GPUs will fail to start",
                                missing.join(" and ")
                            );
                        }
                    }
                    // The GPU path's once-per-process set-up now, off the first start's clock.
                    std::thread::spawn(|| match crate::cuda::prewarm() {
                        Ok(took) => tracing::info!("CUDA ready in {took:?} (driver initialised, kernels compiled)"),
                        Err(e) => tracing::warn!("CUDA set-up failed: {e}"),
                    });
                    (Box::new(gpus), None)
                }
                Err(e) => {
                    tracing::warn!("NVML unavailable ({e}); simulating h100-80gb:8");
                    let gpus = SimulatedGpus::new(&node, "h100-80gb:8").map_err(NodeError::SimulatedGpus)?;
                    let handle = gpus.handle();
                    (Box::new(gpus), Some(handle))
                }
            },
        };
        let telemetry = Telemetry::new(&node, backend.as_ref());
        let summary = {
            let s = telemetry.read();
            let model = s.gpus.first().map(|g| g.info.name.clone()).unwrap_or_default();
            format!("node {node}, {} {} GPUs ({model})", s.gpus.len(), if s.simulated { "simulated" } else { "NVML" })
        };
        telemetry.spawn_sampler(backend, options.sample_interval).map_err(NodeError::Sampler)?;
        let cache = WeightCache::open(&options.cache_dir, options.disk_cache_size, options.host_cache_size)
            .map_err(|source| NodeError::Cache { dir: options.cache_dir.clone(), source })?;
        let cache = Arc::new(cache);
        if sim.is_none() && crate::cuda::check().is_ok() {
            // Host-RAM entries are pinned, so they reach a GPU by DMA with no staging copy.
            cache.set_pinner(crate::cache::Pinner(Arc::new(crate::cuda::pin_host)));
        }
        // Integrity of the disk tier without hashing on the request path: one entry re-hashed every minute at
        // most 256 MB/s (a 1.3 GB entry costs ~5 s of background reads).
        if let Err(e) = cache.spawn_scrubber(Duration::from_secs(60), 256_000_000) {
            tracing::warn!("the weight cache scrubber did not start: {e}");
        }
        let gpu_memory: Vec<u64> = telemetry.read().gpus.iter().map(|g| g.info.memory_total_bytes).collect();
        let workers = Workers::new(Arc::clone(&cache), sim.clone(), gpu_memory);
        let commands = Arc::new(NodeCommands { cache, telemetry: telemetry.clone(), workers: Arc::clone(&workers) });
        let state = AppState {
            telemetry: telemetry.clone(),
            sim,
            workers: Some(workers),
            cache: Some(Arc::clone(&commands.cache)),
        };
        let bind = |addr: SocketAddr, what: &'static str| async move {
            tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Bind { what, addr, source })
        };
        let (admin_token, admin_token_file) = admin_token(&options.cache_dir)?;
        let metrics = bind(options.metrics_addr, "metrics").await?;
        let admin = bind(options.admin_addr, "admin").await?;
        let worker = bind(options.worker_addr, "worker endpoint").await?;
        let addresses = NodeAddresses {
            summary,
            metrics: metrics.local_addr().map_err(NodeError::LocalAddr)?,
            admin: admin.local_addr().map_err(NodeError::LocalAddr)?,
            workers: worker.local_addr().map_err(NodeError::LocalAddr)?,
            admin_token_file,
        };
        let listeners = [metrics, admin, worker];
        Ok(Self { addresses, options, telemetry, commands, state, admin_token, listeners })
    }

    /// Serves until `stop` turns true or a server fails.
    pub async fn serve(self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let [metrics, admin, worker] = self.listeners;
        let (stop_session, session_stop) = watch::channel(false);
        if let Some(controller) = &self.options.controller {
            let config = SessionConfig {
                controller: controller.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                worker_endpoint: self.options.advertise.clone().unwrap_or_else(|| self.addresses.workers.to_string()),
                backoff: Backoff::default(),
                register_timeout: Duration::from_secs(10),
            };
            tokio::spawn(session::run(config, self.telemetry, Arc::clone(&self.commands), session_stop, None));
        }
        let workers = Arc::clone(&self.commands.workers);
        // gRPC and the HTTP/1.1 predict route on one port (`Register.worker_http1`).
        let worker_service = serve_worker(worker, WorkerApi(workers).router());
        let public = axum::serve(metrics, http::public_router(self.state.clone()));
        let admin = axum::serve(admin, http::admin_router(self.state, self.admin_token));
        let result = tokio::select! {
            r = public => r.map_err(|e| NodeError::Http("metrics", e)),
            r = admin => r.map_err(|e| NodeError::Http("admin", e)),
            r = worker_service => r.map_err(|e| NodeError::Http("worker", e)),
            _ = stop.wait_for(|s| *s) => Ok(()),
        };
        let _ = stop_session.send(true);
        result
    }
}

/// Serves the worker port: each connection as HTTP/1.1 or HTTP/2 (gRPC), told apart by its preface. Served here
/// rather than by `axum::serve` for one setting: an HTTP/2 connection takes any number of concurrent streams, as
/// tonic's server allowed (hyper's default is 200, and the gateway sends every streamed prediction to a node over
/// one connection). Accept errors (out of descriptors) are waited out, not fatal.
pub async fn serve_worker(listener: tokio::net::TcpListener, router: axum::Router) -> std::io::Result<()> {
    let service = hyper_util::service::TowerToHyperService::new(router);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a worker connection failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http2().max_concurrent_streams(None);
            if let Err(e) = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "a worker connection ended with an error");
            }
        });
    }
}
