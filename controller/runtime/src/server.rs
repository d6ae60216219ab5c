//! The controller process without a cluster: the manifest directory as the spec source, the agent registry's
//! `AgentService` on one address, and the gateway (the Replicate-shaped API, Kiln's own listing at
//! `GET /kiln/v1/deployments`, `/metrics`, `/healthz`) on another; the gateway's [`Catalog`] is the control plane's
//! deployments and the registry's GPUs ([`FleetCatalog`]). `kiln up` runs one with a local agent beside it; `kiln controller` runs one alone.
//!
//! Billing: with [`ServerOptions::prices`] the control loop meters GPU holding into a [`Billing`] service (an
//! in-memory ledger for now) that the gateway's `/v1/usage` reads; without, nothing is metered.
//!
//! State: prediction records and deployment counters go to [`ServerOptions::store`] (redb in the state directory
//! for `kiln up` and `kiln controller`) and are read back by [`Server::bind`]. Shutdown ([`Server::serve`]): when
//! its `shutdown` signal turns true the gateway drains (new predictions 503, those under way get
//! [`ServerOptions::shutdown_grace`], the rest are cut off), `/healthz` answers 503, then the HTTP server stops,
//! the control loop stops, the store is flushed and pending webhooks get a few seconds to go out.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
    routing::get,
};
use kiln_k8s_api::validate::Validator;
use kiln_proto::v1::agent_service_server::AgentServiceServer;
use serde_json::json;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::{
    billing::Billing,
    connections::HttpLimits,
    control::{ControlConfig, ControlPlane, RentalStatusView, ServedRental},
    gateway::{Caller, Catalog, ChangeError, ChangeKind, DeploymentChange, DeploymentInfo, Gateway},
    manifests::{DirWatcher, ManifestError, load_dir},
    registry::{AgentServer, MonotonicClock, Registry, RegistryConfig},
    rental_records::{RentalRecord, RentalRecords},
    spec::Rejected,
    store::{MemoryStore, Persister, PredictionStore},
};

/// How to run the controller.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Directory of manifests, watched (`None`: deployments come from elsewhere, e.g. the Kubernetes API).
    pub manifests: Option<PathBuf>,
    /// Gateway (HTTP).
    pub http_addr: SocketAddr,
    /// `AgentService` (gRPC).
    pub agent_addr: SocketAddr,
    /// API keys: (key, namespace).
    pub api_keys: Vec<(String, String)>,
    /// Registry settings (the grace period after which a silent agent is lost).
    pub registry: RegistryConfig,
    /// Control loop settings.
    pub control: ControlConfig,
    /// How long a request may be held for a cold start.
    pub hold: Duration,
    /// How often the manifest directory is checked.
    pub watch_interval: Duration,
    /// Webhook signing secret (`whsec_...`); `None`: a new one for this process.
    pub webhook_secret: Option<String>,
    /// Where webhook deliveries may go (public addresses by default; see [`crate::webhook::Destinations`]).
    pub webhook_destinations: crate::webhook::Destinations,
    /// An internal address serving `/metrics` (and `/healthz`) without a key, for Prometheus; on the public
    /// address `/metrics` needs an operator key.
    pub metrics_addr: Option<SocketAddr>,
    /// Per-namespace admission limits of the gateway.
    pub tenant_limits: crate::limits::LimitConfig,
    /// Limits of the gateway's listener: connections, header and body timeouts, body size.
    pub http_limits: HttpLimits,
    /// Where prediction records and counters are kept across restarts.
    pub store: Arc<dyn PredictionStore>,
    /// How long a shutdown lets predictions under way finish.
    pub shutdown_grace: Duration,
    /// Where the manifest directory's rentals keep what their status would hold (`None`: nowhere; a restart starts
    /// them afresh).
    pub rental_records: Option<PathBuf>,
    /// Prices of metering (`None`: billing off — nothing is metered and `/v1/usage` answers 501).
    pub prices: Option<kiln_core::billing::PriceTable>,
    /// Where usage records are kept.
    pub ledger: UsageLedger,
    /// In Kubernetes mode (no manifest directory): where the gateway writes deployment changes
    /// (`POST`/`PATCH`/`DELETE /v1/deployments`) as `ModelDeployment` resources; `None` refuses them (501).
    pub kube: Option<crate::k8s::changes::KubeDeployments>,
}

/// Where the billing service keeps usage records.
#[derive(Debug, Clone, Default)]
pub enum UsageLedger {
    /// In memory only: a restart loses them.
    #[default]
    Memory,
    /// A one-replica raft ledger in this directory (`kiln_ledger::LocalLedger`): what was metered survives a
    /// restart (`kiln up`).
    Local(PathBuf),
    /// The replicated group this controller's replica belongs to (`kiln controller --ledger-peer`): appends are
    /// committed by a quorum, and succeed only while this replica leads — as the controller acts only then.
    Group(kiln_ledger::GroupLedger),
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            manifests: Some(PathBuf::from("kiln-manifests")),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            agent_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            api_keys: Vec::new(),
            registry: RegistryConfig::default(),
            control: ControlConfig::default(),
            hold: Duration::from_secs(120),
            watch_interval: Duration::from_secs(1),
            webhook_secret: None,
            webhook_destinations: crate::webhook::Destinations::default(),
            metrics_addr: None,
            tenant_limits: crate::limits::LimitConfig::default(),
            http_limits: HttpLimits::default(),
            store: Arc::new(MemoryStore::default()),
            shutdown_grace: Duration::from_secs(30),
            rental_records: None,
            prices: None,
            ledger: UsageLedger::Memory,
            kube: None,
        }
    }
}

/// How long, after the drain, open connections may take to close, and pending webhooks to go out.
const AFTER_DRAIN: Duration = Duration::from_secs(5);

/// A bound controller; [`Server::serve`] runs it.
#[derive(Debug)]
pub struct Server {
    /// Where the gateway listens.
    pub http_addr: SocketAddr,
    /// Where agents connect.
    pub agent_addr: SocketAddr,
    /// Where `/metrics` is served without a key, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The control plane (for tests and `kiln up`'s own figures).
    pub control: Arc<ControlPlane>,
    /// The gateway (its API keys can be replaced while it serves).
    pub gateway: Arc<Gateway<Arc<ControlPlane>>>,
    /// The console at `/ui` (`kiln up` asks it for a login link).
    pub console: Arc<crate::gateway::ui::Console>,
    /// The agent registry.
    pub registry: Registry,
    /// The store's writer.
    pub persister: Persister,
    options: ServerOptions,
    http: tokio::net::TcpListener,
    agents: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
}

#[derive(Debug)]
struct Shared {
    control: Arc<ControlPlane>,
    gateway: Arc<Gateway<Arc<ControlPlane>>>,
    registry: Registry,
    manifest_errors: Mutex<Vec<ManifestError>>,
    rejected: Mutex<Vec<Rejected>>,
}

impl Server {
    /// Binds both listeners and reads the store back (counters restored; predictions readable again, those that
    /// were running finished as failed and their webhooks sent). A webhook secret that does not parse is an error
    /// (`InvalidInput`), so is a store that cannot be read.
    pub async fn bind(options: ServerOptions) -> std::io::Result<Self> {
        let secret = match &options.webhook_secret {
            Some(text) => crate::webhook::Secret::parse(text)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            None => crate::webhook::Secret::generate()?,
        };
        let http = tokio::net::TcpListener::bind(options.http_addr).await?;
        let agents = tokio::net::TcpListener::bind(options.agent_addr).await?;
        let metrics = match options.metrics_addr {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(tokio::net::TcpListener::local_addr).transpose()?;
        let registry = Registry::new(options.registry, MonotonicClock::system());
        let control = ControlPlane::new(registry.clone(), options.control.clone());
        let snapshot = options.store.load().map_err(std::io::Error::other)?;
        let persister = Persister::spawn(Arc::clone(&options.store))?;
        control.restore_counters(snapshot.counters, persister.clone());
        let billing = match options.prices.clone() {
            Some(prices) => {
                let ledger: Box<dyn kiln_core::billing::Ledger + Send> = match &options.ledger {
                    UsageLedger::Local(dir) => {
                        std::fs::create_dir_all(dir)?;
                        let local = kiln_ledger::LocalLedger::open(dir, "controller", None).map_err(|e| {
                            std::io::Error::other(format!("opening the usage ledger in {}: {e}", dir.display()))
                        })?;
                        Box::new(local)
                    }
                    UsageLedger::Group(group) => Box::new(group.clone()),
                    UsageLedger::Memory => Box::new(kiln_core::billing::MemoryLedger::new()),
                };
                Some(Arc::new(Billing::new(prices, ledger, control.metrics().billing_counters())))
            }
            None => None,
        };
        if let Some(b) = &billing {
            control.set_billing(Arc::clone(b));
        }
        let http_addr = http.local_addr()?;
        let mut gateway = Gateway::new(Arc::clone(&control), options.api_keys.clone(), &format!("http://{http_addr}"));
        if let Some(g) = Arc::get_mut(&mut gateway) {
            g.hold = options.hold;
            g.limits = crate::limits::TenantLimits::new(options.tenant_limits);
            g.webhooks = crate::webhook::Webhooks::with_destinations(
                g.webhooks.backoff,
                g.webhooks.attempts,
                options.webhook_destinations.clone(),
            );
            g.webhooks.secret = Some(secret);
            g.persister = Some(persister.clone());
            let mut catalog = FleetCatalog::new(Arc::clone(&control), registry.clone());
            catalog.manifests = options.manifests.clone();
            catalog.kube = options.kube.clone();
            g.catalog = Arc::new(catalog);
            g.billing = billing;
        }
        let restored = gateway.restore(snapshot.predictions);
        if restored != Default::default() || snapshot.unreadable > 0 {
            tracing::info!(
                finished = restored.finished,
                interrupted = restored.interrupted,
                expired = restored.expired,
                unreadable = snapshot.unreadable,
                "predictions restored from the store"
            );
        }
        let console = crate::gateway::ui::Console::new(Arc::clone(&gateway), Arc::clone(&control), registry.clone());
        Ok(Self {
            console,
            http_addr,
            agent_addr: agents.local_addr()?,
            metrics_addr,
            control,
            gateway,
            persister,
            options,
            registry,
            http,
            agents,
            metrics,
        })
    }

    /// Serves until `shutdown` turns true, then shuts down gracefully (see the module docs); returns when done.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        let (stop_tx, stop) = watch::channel(false);
        let shared = Arc::new(Shared {
            control: Arc::clone(&self.control),
            gateway: Arc::clone(&self.gateway),
            registry: self.registry.clone(),
            manifest_errors: Mutex::new(Vec::new()),
            rejected: Mutex::new(Vec::new()),
        });
        let agents = tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(AgentServer(self.registry.clone())))
            .serve_with_incoming(TcpIncoming::from(self.agents).with_nodelay(Some(true)));
        tokio::spawn(async move {
            if let Err(e) = agents.await {
                tracing::error!(error = %e, "the agent service stopped");
            }
        });
        tokio::spawn(Arc::clone(&self.control).run(stop.clone()));
        if let Some(dir) = self.options.manifests.clone() {
            let records = self.options.rental_records.clone();
            tokio::spawn(watch_manifests(Arc::clone(&shared), dir, records, self.options.watch_interval));
        }
        if let Some(listener) = self.metrics {
            let internal = Router::new()
                .route("/metrics", get(internal_metrics))
                .route("/healthz", get(|| async { "ok" }))
                .with_state(Arc::clone(&shared));
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let serve = axum::serve(listener, internal).with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "the internal metrics listener stopped");
                }
            });
        }
        let health = Arc::clone(&self.gateway);
        let router = self.gateway.router().merge(self.console.router()).merge(
            Router::new()
                .route("/kiln/v1/deployments", get(deployments))
                .route("/kiln/v1/rentals", get(rentals))
                .route("/kiln/v1/ledger", get(ledger))
                .route("/metrics", get(metrics_page))
                .route(
                    "/healthz",
                    get(move || async move {
                        if health.is_draining() {
                            (axum::http::StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                        } else {
                            (axum::http::StatusCode::OK, "ok")
                        }
                    }),
                )
                .with_state(shared),
        );
        // The drain runs while the listener still accepts: a client gets a clear 503 with Retry-After, not a
        // refused connection, and reads of finished predictions keep working.
        let gateway = Arc::clone(&self.gateway);
        let grace = self.options.shutdown_grace;
        let (drained_tx, mut drained) = watch::channel(false);
        let drain = async move {
            let _ = shutdown.wait_for(|s| *s).await;
            tracing::info!(
                in_flight = gateway.in_flight(),
                grace_s = grace.as_secs_f64(),
                "shutting down: draining the gateway"
            );
            let cut = gateway.drain(grace).await;
            if cut > 0 {
                tracing::warn!(predictions = cut, "the shutdown grace ran out; predictions still running were failed");
            } else {
                tracing::info!("drained: every prediction under way finished");
            }
            let _ = drained_tx.send(true);
        };
        let http = crate::connections::serve(self.http, router, self.options.http_limits, drain);
        let served = tokio::select! {
            r = http => r,
            // A connection that does not close soon after the drain (a client that stopped reading) does not
            // hold the process.
            _ = async {
                let _ = drained.wait_for(|d| *d).await;
                tokio::time::sleep(AFTER_DRAIN).await;
            } => {
                tracing::warn!("connections still open {AFTER_DRAIN:?} after the drain; closing them");
                Ok(())
            }
        };
        let _ = stop_tx.send(true);
        if let Err(e) = self.persister.flush().await {
            tracing::error!(error = %e, "the prediction store could not be flushed");
        }
        if !self.gateway.webhooks.settle(AFTER_DRAIN).await {
            tracing::warn!(
                pending = self.gateway.webhooks.pending(),
                "webhooks still being retried at exit are dropped"
            );
        }
        served
    }
}

async fn watch_manifests(shared: Arc<Shared>, dir: PathBuf, records_path: Option<PathBuf>, every: Duration) {
    let validator = Validator::default();
    let mut watcher = DirWatcher::default();
    let mut records = match records_path.as_deref().map(RentalRecords::load) {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            tracing::error!(error = %e, "rental records unreadable; rentals start afresh");
            RentalRecords::default()
        }
        None => RentalRecords::default(),
    };
    let mut declared: Vec<String> = Vec::new();
    loop {
        match watcher.changed(&dir) {
            Ok(true) => match load_dir(&dir, &validator) {
                Ok(set) => {
                    for e in &set.errors {
                        tracing::error!("invalid manifest, left out: {e}");
                    }
                    let (served, rejected) = set.served();
                    let unservable: Vec<String> = rejected.iter().map(|r| r.key.clone()).collect();
                    let count = served.len();
                    shared.control.apply(served, &unservable);
                    for Rejected { key, error } in &rejected {
                        tracing::error!(deployment = %key, "deployment left out: {error}");
                    }
                    declared = set.rentals.keys().cloned().collect();
                    let rentals = served_rentals(&set, &mut records);
                    shared.control.apply_rentals(rentals);
                    tracing::info!(deployments = count, rentals = declared.len(), dir = %dir.display(), "manifests loaded");
                    *shared.manifest_errors.lock().unwrap_or_else(|p| p.into_inner()) = set.errors;
                    *shared.rejected.lock().unwrap_or_else(|p| p.into_inner()) = rejected;
                }
                Err(e) => tracing::error!(dir = %dir.display(), error = %e, "reading the manifests"),
            },
            Ok(false) => {}
            Err(e) => tracing::error!(dir = %dir.display(), error = %e, "watching the manifests"),
        }
        if let Some(path) = &records_path
            && records.update(&shared.control.rental_views(), &declared)
            && let Err(e) = records.save(path)
        {
            tracing::error!(path = %path.display(), error = %e, "writing the rental records");
        }
        tokio::time::sleep(every).await;
    }
}

/// The manifests' rentals for the control plane, each with its record (created when first seen: a manifest has no
/// creation time unless it says one).
fn served_rentals(set: &crate::manifests::ManifestSet, records: &mut RentalRecords) -> Vec<ServedRental> {
    set.rentals
        .values()
        .map(|m| {
            let key = m.key();
            let created = m.resource.metadata.creation_timestamp.as_ref().map(|t| t.0.as_millisecond() as f64 / 1000.0);
            let record = records.rentals.entry(key).or_insert_with(|| RentalRecord {
                created_at: created.unwrap_or_else(crate::control::wall_now),
                lifecycle: None,
                gpus: Vec::new(),
            });
            let status = kiln_k8s_api::GpuRentalStatus {
                lifecycle: record.lifecycle.clone(),
                assigned_gpus: record
                    .gpus
                    .iter()
                    .map(|(node, index)| kiln_k8s_api::gpu_rental::AssignedGpu {
                        node: node.clone(),
                        index: i32::try_from(*index).unwrap_or(0),
                        uuid: String::new(),
                    })
                    .collect(),
                ..Default::default()
            };
            crate::spec::translate_rental(&m.namespace, &m.name, &m.resource.spec, Some(&status), record.created_at)
        })
        .collect()
}

/// `GET /kiln/v1/ledger`: how the usage ledger stands (an operator's key): its kind, and for the raft ledger the
/// group as this replica sees it — term, leader, commit and applied index, stored log, snapshots, records, bytes.
async fn ledger(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match shared.gateway.caller(&headers) {
        None => return shared.gateway.unauthorized(),
        Some(Caller::Tenant(_)) => {
            return (axum::http::StatusCode::FORBIDDEN, "the ledger's state is an operator's: use an operator key\n")
                .into_response();
        }
        Some(Caller::Operator) => {}
    }
    let body = match shared.control.ledger_status() {
        None => json!({ "kind": "none", "detail": "billing is off (no prices configured): nothing is metered" }),
        Some(None) => json!({ "kind": "memory", "detail": "records are kept in memory: a restart loses them" }),
        Some(Some(s)) => json!({
            "kind": "raft",
            "replica": s.replica,
            "term": s.term,
            "leader": s.leader,
            "commitIndex": s.commit_index,
            "appliedIndex": s.applied_index,
            "log": { "first": s.log.0, "last": s.log.1, "bytes": s.log_bytes },
            "snapshotIndex": s.snapshot_index,
            "snapshots": s.snapshots,
            "snapshots_failed": s.snapshots_failed,
            "records": s.records,
        }),
    };
    Json(body).into_response()
}

/// `GET /kiln/v1/rentals`: each rental's state (phase, why, GPUs held, delivery, end, GPU-hours billed, lent). A
/// tenant's key sees its namespace's rentals; an operator's, all.
async fn rentals(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let tenant = match shared.gateway.caller(&headers) {
        None => return shared.gateway.unauthorized(),
        Some(Caller::Operator) => None,
        Some(Caller::Tenant(ns)) => Some(format!("{ns}/")),
    };
    let items: Vec<RentalStatusView> = shared
        .control
        .rental_views()
        .into_iter()
        .filter(|v| tenant.as_ref().is_none_or(|p| v.key.starts_with(p.as_str())))
        .collect();
    Json(json!({ "rentals": items })).into_response()
}

/// `GET /kiln/v1/deployments`: each deployment's state, and the manifests that were left out and why. A tenant's key
/// sees its namespace's deployments only; an operator's sees the fleet (every namespace, the nodes, every invalid
/// manifest); no key, nothing.
async fn deployments(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let tenant = match shared.gateway.caller(&headers) {
        None => return shared.gateway.unauthorized(),
        Some(Caller::Operator) => None,
        Some(Caller::Tenant(ns)) => Some(format!("{ns}/")),
    };
    let visible = |key: &str| tenant.as_ref().is_none_or(|prefix| key.starts_with(prefix.as_str()));
    let replicas = shared.control.replicas();
    let now = shared.control.now();
    let items: Vec<_> = shared
        .control
        .statuses()
        .into_iter()
        .filter(|(key, _)| visible(key))
        .map(|(key, s)| {
            let placements: Vec<_> = replicas
                .iter()
                .filter(|r| r.deployment == key)
                .map(|r| {
                    let state = if r.ready { "ready" } else { "loading" };
                    json!({ "replica": r.id, "node": r.node, "gpus": r.gpus, "state": state })
                })
                .collect();
            json!({
                "name": key,
                "replicas": { "desired": s.desired, "loading": s.starting, "ready": s.ready },
                "inFlight": s.in_flight,
                "waiting": s.waiting,
                "unschedulable": s.unschedulable.map(|u| u.to_string()),
                "degraded": s.failure.map(|f| json!({
                    "reason": f.last.reason,
                    "message": f.last.message,
                    "retryable": f.last.retryable,
                    "consecutiveFailures": f.consecutive,
                    "nextStartInSeconds": (f.retry_at - now).max(0.0).ceil(),
                })),
                "placements": placements,
                "counters": shared.control.counters(&key),
            })
        })
        .collect();
    // Manifest files belong to whoever runs the controller: operators see them; tenants see their rejected
    // deployments.
    let files: Vec<_> = if tenant.is_none() {
        let errors = shared.manifest_errors.lock().unwrap_or_else(|p| p.into_inner());
        errors
            .iter()
            .map(|e| json!({ "file": e.file.display().to_string(), "document": e.document, "error": e.message }))
            .collect()
    } else {
        Vec::new()
    };
    let rejected: Vec<_> = shared
        .rejected
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|r| visible(&r.key))
        .map(|r| json!({ "deployment": r.key, "error": r.error.to_string() }))
        .collect();
    let errors: Vec<_> = files.into_iter().chain(rejected).collect();
    let nodes: Vec<_> = if tenant.is_none() {
        shared
            .registry
            .nodes()
            .into_iter()
            .map(|n| json!({ "name": n.name, "ready": n.ready, "gpus": n.gpus.len(), "simulated": n.simulated }))
            .collect()
    } else {
        Vec::new()
    };
    Json(json!({ "deployments": items, "invalid": errors, "nodes": nodes })).into_response()
}

/// `/metrics` on the public address: the fleet's figures, for operator keys only.
async fn metrics_page(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match shared.gateway.caller(&headers) {
        Some(Caller::Operator) => internal_metrics(State(shared)).await.into_response(),
        Some(Caller::Tenant(_)) => (
            axum::http::StatusCode::FORBIDDEN,
            "the metrics cover every namespace: they need an operator key (or the internal metrics address)\n",
        )
            .into_response(),
        None => shared.gateway.unauthorized(),
    }
}

/// `/metrics` on the internal address.
async fn internal_metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        shared.control.metrics_text(),
    )
}

/// The gateway's [`Catalog`] in a controller process: the deployments the control plane serves (their specs,
/// versions and counters) and the GPU models of the registered nodes. With a manifest directory, deployment changes
/// are written there as `ModelDeployment` manifests, checked first as `kiln apply` checks them
/// ([`FleetCatalog::change`]); in Kubernetes mode they are written as the resource
/// ([`crate::k8s::changes::KubeDeployments`]); with neither they are refused as unsupported.
#[derive(Debug)]
pub struct FleetCatalog {
    control: Arc<ControlPlane>,
    registry: Registry,
    /// The manifest directory deployment changes are written to, if any.
    pub manifests: Option<PathBuf>,
    /// The Kubernetes API deployment changes are written to, without a manifest directory.
    pub kube: Option<crate::k8s::changes::KubeDeployments>,
    /// Per deployment: the version last seen, when it was first seen, and its release number.
    releases: Mutex<std::collections::HashMap<String, (String, std::time::SystemTime, u64)>>,
}

impl FleetCatalog {
    /// The catalog of `control`'s deployments on `registry`'s nodes.
    pub fn new(control: Arc<ControlPlane>, registry: Registry) -> Self {
        Self { control, registry, manifests: None, kube: None, releases: Mutex::default() }
    }

    /// The release of `key` at `version`: the spec generation where the version is one (Kubernetes), else counted
    /// here from 1 (the manifest directory's versions are hashes); released when this process first saw it.
    fn release(&self, key: &str, version: &str) -> (u64, std::time::SystemTime) {
        let mut releases = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now();
        let entry = releases.entry(key.to_owned()).or_insert_with(|| (version.to_owned(), now, 0));
        if entry.2 == 0 || entry.0 != version {
            let number = version.parse::<u64>().ok().filter(|n| *n > 0).unwrap_or(entry.2 + 1);
            *entry = (version.to_owned(), now, number);
        }
        (entry.2, entry.1)
    }
}

impl Catalog for FleetCatalog {
    fn deployments(&self) -> Vec<DeploymentInfo> {
        let nodes = self.registry.nodes();
        let replicas = self.control.replicas();
        let node_model =
            |name: &str| nodes.iter().find(|n| n.name == name).and_then(|n| n.gpus.first()).map(|g| &g.model);
        let mut fleet: Vec<&String> = nodes.iter().flat_map(|n| n.gpus.iter().map(|g| &g.model)).collect();
        fleet.sort();
        fleet.dedup();
        let only = if fleet.len() == 1 { fleet.first().copied() } else { None };
        self.control
            .statuses()
            .into_iter()
            .filter_map(|(key, _)| {
                let (spec, version) = self.control.spec(&key)?;
                let placed = replicas.iter().filter(|r| r.deployment == key).find_map(|r| node_model(&r.node));
                let gpu_model = spec.gpu_models.first().or(placed).or(only).cloned();
                let (release, released_at) = self.release(&key, &version);
                let run_count = self.control.counters(&key).requests;
                Some(DeploymentInfo {
                    key,
                    version,
                    release,
                    released_at,
                    gpu_model,
                    min_instances: spec.scaling.min_replicas,
                    max_instances: spec.scaling.max_replicas,
                    run_count,
                })
            })
            .collect()
    }

    fn gpu_models(&self) -> Vec<String> {
        self.registry.nodes().into_iter().flat_map(|n| n.gpus.into_iter().map(|g| g.model)).collect()
    }

    /// Writes the change into the manifest directory: a create copies the spec of the deployment `model` names
    /// (in the same namespace) into `<namespace>-<name>.yaml` with the scaling and hardware asked for; an update
    /// rewrites the deployment's manifest, a delete removes it, either only where that file holds this deployment
    /// alone (409 otherwise: edit it by hand). The result is validated as `kiln apply` validates (an update also
    /// against its transition rules) before anything is written.
    fn change(&self, namespace: &str, change: &DeploymentChange) -> Result<(), ChangeError> {
        let Some(dir) = &self.manifests else {
            let Some(kube) = &self.kube else {
                return Err(ChangeError::Unsupported("this controller (no manifest directory, no Kubernetes API)"));
            };
            // Called on a blocking thread of the runtime (the gateway's `spawn_blocking`).
            let fleet = self.gpu_models();
            return tokio::runtime::Handle::current().block_on(kube.change(namespace, change, &fleet));
        };
        let validator = Validator::default();
        let io = |e: std::io::Error| ChangeError::Io(format!("manifest directory {}: {e}", dir.display()));
        let set = load_dir(dir, &validator).map_err(io)?;
        let key = crate::spec::key(namespace, &change.name);
        let existing = set.deployments.get(&key);
        // The one file that holds this deployment and nothing else, for an update or delete.
        let own_file = || -> Result<PathBuf, ChangeError> {
            let d = existing.ok_or_else(|| ChangeError::NotFound(key.clone()))?;
            let text = crate::manifests::read_manifest(&d.file, crate::manifests::MAX_MANIFEST_BYTES)
                .map_err(|e| ChangeError::Io(format!("{}: {e}", d.file.display())))?;
            let documents = serde_yaml::Deserializer::from_str(&text)
                .map(<serde_json::Value as serde::Deserialize>::deserialize)
                .filter(|doc| !matches!(doc, Ok(serde_json::Value::Null)))
                .count();
            if documents != 1 {
                return Err(ChangeError::Conflict(format!(
                    "{key} is one of {documents} documents in {}: change it there",
                    d.file.display()
                )));
            }
            Ok(d.file.clone())
        };
        let (file, old, template) = match change.kind {
            ChangeKind::Delete => {
                let file = own_file()?;
                return std::fs::remove_file(&file).map_err(|e| ChangeError::Io(format!("{}: {e}", file.display())));
            }
            ChangeKind::Update => {
                let d = existing.ok_or_else(|| ChangeError::NotFound(key.clone()))?;
                (own_file()?, Some(to_value(&d.resource)?), to_value(&d.resource)?)
            }
            ChangeKind::Create => {
                if existing.is_some() {
                    return Err(ChangeError::Conflict(format!("deployment {key} exists already")));
                }
                let model = change.model.as_deref().unwrap_or_default();
                let source = change.copied(namespace)?;
                let d = set.deployments.get(&source).ok_or_else(|| {
                    ChangeError::Invalid(format!(
                        "model {model}: no deployment {source} to copy (a model here is a deployment; write a \
                         ModelDeployment for a new model source)"
                    ))
                })?;
                let file = dir.join(format!("{namespace}-{}.yaml", change.name));
                if file.exists() {
                    return Err(ChangeError::Conflict(format!("{} exists already", file.display())));
                }
                (file, None, to_value(&d.resource)?)
            }
        };
        let mut object = template;
        if change.kind == ChangeKind::Create {
            // A new object: its own name, nothing else of the copied one's metadata.
            object["metadata"] = serde_json::json!({ "name": change.name, "namespace": namespace });
        }
        if let Some(fields) = object.as_object_mut() {
            fields.remove("status");
        }
        crate::gateway::merge_patch(&mut object, &change.spec_patch(&self.gpu_models())?);
        validator.validate_update(&object, old.as_ref()).map_err(|e| ChangeError::Invalid(e.to_string()))?;
        let text = serde_yaml::to_string(&object).map_err(|e| ChangeError::Io(e.to_string()))?;
        let text = format!("# Written by the gateway (Replicate's deployments API).\n{text}");
        // Written beside the file under a name the directory's reader skips, then renamed over it.
        let partial = file.with_extension("partial");
        let written = std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, &file));
        written.map_err(|e| ChangeError::Io(format!("{}: {e}", file.display())))
    }
}

/// A resource as JSON.
fn to_value(resource: &kiln_k8s_api::model_deployment::ModelDeployment) -> Result<serde_json::Value, ChangeError> {
    serde_json::to_value(resource).map_err(|e| ChangeError::Io(e.to_string()))
}
