//! The agent's HTTP endpoints: `/metrics` (Prometheus, dcgm-exporter names), `/healthz` and `/v1/gpus` on the
//! metrics address; fault injection for simulated GPUs on a separate admin address (loopback by default), so
//! that exposing metrics never exposes the admin endpoints. The admin endpoints also need the node's admin token
//! (`Authorization: Bearer <token>`), even on loopback: anything on the node that can make a request — a model
//! server, or a webhook the gateway delivers — must not be able to mark a GPU healthy.

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::{
    cache::{Tier, WeightCache},
    gpu::sim::{SimError, SimHandle},
    metrics,
    telemetry::Telemetry,
    workers::Workers,
};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// GPU state.
    pub telemetry: Telemetry,
    /// Simulated GPUs, for fault injection (`None` on real GPUs).
    pub sim: Option<SimHandle>,
    /// Replicas (for their metrics).
    pub workers: Option<Arc<Workers>>,
    /// Weight cache (for its metrics).
    pub cache: Option<Arc<WeightCache>>,
}

/// `/metrics`, `/healthz`, `/v1/gpus`.
pub fn public_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/gpus", get(gpus))
        .with_state(state)
}

/// `/admin/gpus/{index}/xid|ecc|reset|load` (simulated GPUs only), for callers that present `token`.
pub fn admin_router(state: AppState, token: AdminToken) -> Router {
    Router::new()
        .route("/admin/gpus/{index}/xid", post(inject_xid))
        .route("/admin/gpus/{index}/ecc", post(inject_ecc))
        .route("/admin/gpus/{index}/reset", post(reset))
        .route("/admin/gpus/{index}/load", post(set_load))
        .route_layer(middleware::from_fn_with_state(token, require_token))
        .with_state(state)
}

/// The secret the admin endpoints ask for.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// A token from its text (surrounding whitespace ignored).
    pub fn new(text: &str) -> Self {
        Self(Arc::from(text.trim()))
    }

    /// A new random token: 32 bytes from the system's random source, hex.
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read as _;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self(Arc::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())))
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && !a.is_empty() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

async fn require_token(State(token): State<AdminToken>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if token.matches(presented) {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, "the admin endpoints need the node's admin token (Authorization: Bearer ...)\n")
            .into_response()
    }
}

async fn metrics_page(State(state): State<AppState>) -> Response {
    let mut extra = metrics::Extra::default();
    if let Some(workers) = &state.workers {
        extra.workers = workers.metrics();
    }
    if let Some(cache) = &state.cache {
        let report = cache.report();
        let (host, disk) = cache.capacities();
        for (name, tier, capacity) in [("host_ram", Tier::HostRam, host), ("disk", Tier::Disk, disk)] {
            let entries: Vec<_> = report.iter().filter(|e| e.tier == tier).collect();
            let bytes = entries.iter().map(|e| e.size).sum();
            extra.cache.push(metrics::CacheTierMetrics { tier: name, entries: entries.len(), bytes, capacity });
        }
        extra.cache_stats = Some(cache.stats());
    }
    let page = metrics::render_with(&state.telemetry.read(), &extra);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], page).into_response()
}

/// One GPU in `/v1/gpus`.
#[derive(Debug, Serialize)]
struct GpuView {
    index: u32,
    uuid: String,
    name: String,
    memory_total_bytes: u64,
    memory_used_bytes: Option<u64>,
    sm_util_pct: Option<u32>,
    health: String,
    reason: String,
    last_xid: u32,
}

async fn gpus(State(state): State<AppState>) -> Json<Vec<GpuView>> {
    let s = state.telemetry.read();
    Json(
        s.gpus
            .iter()
            .map(|g| GpuView {
                index: g.info.index,
                uuid: g.info.uuid.clone(),
                name: g.info.name.clone(),
                memory_total_bytes: g.info.memory_total_bytes,
                memory_used_bytes: g.sample.memory_used_bytes,
                sm_util_pct: g.sample.sm_util_pct,
                health: format!("{:?}", g.health).to_lowercase(),
                reason: g.reason.clone(),
                last_xid: g.last_xid,
            })
            .collect(),
    )
}

/// Body of `/admin/gpus/{index}/xid`.
#[derive(Debug, Deserialize)]
struct XidBody {
    xid: u32,
}

/// Body of `/admin/gpus/{index}/ecc`.
#[derive(Debug, Deserialize)]
struct EccBody {
    #[serde(default)]
    corrected: u64,
    #[serde(default)]
    uncorrected: u64,
}

/// Body of `/admin/gpus/{index}/load`.
#[derive(Debug, Deserialize)]
struct LoadBody {
    memory_used_bytes: u64,
    #[serde(default)]
    in_flight: u32,
}

/// Why an admin request failed; the response is its status and message.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The node's GPUs are real: there is nothing to inject into.
    #[error("fault injection needs simulated GPUs (--simulate-gpus)")]
    NotSimulated,
    /// The simulated backend refused (e.g. no such GPU).
    #[error(transparent)]
    Sim(#[from] SimError),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match self {
            AdminError::NotSimulated => StatusCode::CONFLICT,
            AdminError::Sim(_) => StatusCode::NOT_FOUND,
        };
        (status, format!("{self}\n")).into_response()
    }
}

fn simulated(state: &AppState) -> Result<&SimHandle, AdminError> {
    state.sim.as_ref().ok_or(AdminError::NotSimulated)
}

/// `what` as the answer when `result` is `Ok`.
fn outcome(result: Result<(), SimError>, what: String) -> Result<String, AdminError> {
    result?;
    Ok(format!("{what}\n"))
}

async fn inject_xid(
    State(state): State<AppState>,
    Path(index): Path<u32>,
    Json(body): Json<XidBody>,
) -> Result<String, AdminError> {
    outcome(simulated(&state)?.inject_xid(index, body.xid), format!("Xid {} injected on GPU {index}", body.xid))
}

async fn inject_ecc(
    State(state): State<AppState>,
    Path(index): Path<u32>,
    Json(body): Json<EccBody>,
) -> Result<String, AdminError> {
    outcome(
        simulated(&state)?.inject_ecc(index, body.corrected, body.uncorrected),
        format!("{} corrected, {} uncorrected ECC errors on GPU {index}", body.corrected, body.uncorrected),
    )
}

async fn reset(State(state): State<AppState>, Path(index): Path<u32>) -> Result<String, AdminError> {
    outcome(simulated(&state)?.reset(index), format!("GPU {index} reset"))
}

async fn set_load(
    State(state): State<AppState>,
    Path(index): Path<u32>,
    Json(body): Json<LoadBody>,
) -> Result<String, AdminError> {
    outcome(
        simulated(&state)?.set_load(index, body.memory_used_bytes, body.in_flight),
        format!("GPU {index}: {} bytes used, {} in flight", body.memory_used_bytes, body.in_flight),
    )
}
