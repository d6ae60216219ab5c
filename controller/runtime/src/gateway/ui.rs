//! The built-in console at `/ui`: a fleet page (every node and GPU with its state, utilisation, memory, power,
//! temperature and the weights cached per tier), a deployments page (request rate, errors, latency percentiles,
//! queue, replicas, cold starts with their phases, the keep-alive's decision and why, GPU-seconds by phase) and a
//! rentals and usage page, served by the gateway process from assets compiled into the binary (`ui/`: one HTML
//! page, one script, one style sheet; plots are inline SVG drawn by the script — no CDN, no build step).
//!
//! Data: `GET /kiln/v1/console/fleet`, `/kiln/v1/console/deployments`, `/kiln/v1/console/rentals` (JSON), and
//! `GET /kiln/v1/console/events`, server-sent events: a `fleet` snapshot, then once a second a `delta` carrying only
//! the GPUs whose state changed or whose telemetry moved past a dead band ([`DEADBAND`]) since it was last sent,
//! and `deployments` whenever that list changed. A fleet of 1,000 nodes × 8 GPUs sends a few KB/s while its states
//! hold still (`kiln bench console` measures it).
//!
//! Who sees what: the gateway's own key → namespace logic ([`Gateway::caller`]). A tenant's key sees its
//! namespace's deployments and rentals and only the GPUs they hold; an operator key sees everything. A browser
//! signs in Jupyter's way: a one-time login token in the URL (`/ui?token=...`, printed by `kiln up`, minted for a
//! key by `POST /kiln/v1/console/login-tokens`) or a key typed into the page (`POST /ui/login`) opens a session:
//! an `HttpOnly`, `SameSite=Strict` cookie naming a random session id. The session keeps the key, not the
//! namespace: every request resolves it through the gateway again, so a key removed from the keys file ends its
//! sessions at once. Tokens are single use and expire after [`TOKEN_TTL`]; sessions after [`SESSION_TTL`].
//!
//! It reads the control plane, the registry and the billing service; it changes nothing in them.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use kiln_core::billing::{GroupBy, Query, Subject};
use kiln_proto::v1::{CacheTier, GpuHealth};
use serde_json::{Value, json};

use super::{Caller, Gateway, problem};
use crate::{
    control::{ControlPlane, RentalStatusView, phase_name},
    registry::Registry,
};

/// How long a login token may wait to be used.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a console session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "kiln_console";
/// How often the event stream sends a delta.
pub const TICK: Duration = Duration::from_secs(1);
/// Telemetry moves sent only past these: utilisation (points), memory (MiB), power (W), temperature (°C).
pub const DEADBAND: [u32; 4] = [5, 512, 15, 2];
/// Logins waiting to be used, at most (the oldest are dropped past it).
const MAX_TOKENS: usize = 1024;
/// Sessions at most (the oldest are dropped past it).
const MAX_SESSIONS: usize = 4096;

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// The state names of a GPU, in the order the fleet's compact cells number them.
pub const STATES: [&str; 9] =
    ["free", "busy", "idle-warm", "loading", "rented", "lent", "cordoned", "unhealthy", "offline"];

type Gw = Gateway<Arc<ControlPlane>>;

/// The console (see the module docs).
#[derive(Debug)]
pub struct Console {
    gateway: Arc<Gw>,
    control: Arc<ControlPlane>,
    registry: Registry,
    logins: Mutex<Logins>,
    /// GPU-seconds by phase per deployment, with when they were read: billing closes one-minute windows, so a
    /// ledger query per deployment per viewer every second would only read the same totals again.
    gpu_seconds: Mutex<HashMap<String, (Instant, PhaseSeconds)>>,
}

/// GPU-seconds by phase.
type PhaseSeconds = BTreeMap<String, f64>;

/// How long metered GPU-seconds are shown before the ledger is asked again.
const GPU_SECONDS_FRESH: Duration = Duration::from_secs(15);

#[derive(Debug, Default)]
struct Logins {
    /// One-time login token → (key, expiry).
    tokens: HashMap<String, (String, Instant)>,
    /// Session id → (key, expiry).
    sessions: HashMap<String, (String, Instant)>,
}

impl Logins {
    fn prune(&mut self, now: Instant) {
        self.tokens.retain(|_, (_, until)| *until > now);
        self.sessions.retain(|_, (_, until)| *until > now);
        for (map, cap) in [(&mut self.tokens, MAX_TOKENS), (&mut self.sessions, MAX_SESSIONS)] {
            while map.len() > cap {
                let oldest = map.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => map.remove(&k),
                    None => break,
                };
            }
        }
    }
}

/// 32 random bytes as hex (from the kernel's generator).
fn random_id() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of the query parameter `name`.
fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// The session id in the request's cookies.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

impl Console {
    /// A console over `gateway`'s keys and `control`'s and `registry`'s state.
    pub fn new(gateway: Arc<Gw>, control: Arc<ControlPlane>, registry: Registry) -> Arc<Self> {
        Arc::new(Self { gateway, control, registry, logins: Mutex::default(), gpu_seconds: Mutex::default() })
    }

    fn logins(&self) -> std::sync::MutexGuard<'_, Logins> {
        self.logins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A one-time login token for `key`, `None` when the gateway does not know the key (or the kernel's random
    /// generator cannot be read).
    pub fn login_token(&self, key: &str) -> Option<String> {
        self.resolve(key)?;
        let token = random_id().ok()?;
        let now = Instant::now();
        let mut logins = self.logins();
        logins.prune(now);
        logins.tokens.insert(token.clone(), (key.to_owned(), now + TOKEN_TTL));
        Some(token)
    }

    /// Uses a login token up: its key, once; `None` for a token unknown, used or expired.
    fn redeem(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut logins = self.logins();
        logins.prune(now);
        let found = logins.tokens.keys().find(|t| same(t, token)).cloned()?;
        logins.tokens.remove(&found).map(|(key, _)| key)
    }

    /// Opens a session for `key`: the `Set-Cookie` value.
    fn open_session(&self, key: String) -> std::io::Result<String> {
        let id = random_id()?;
        let now = Instant::now();
        let mut logins = self.logins();
        logins.prune(now);
        logins.sessions.insert(id.clone(), (key, now + SESSION_TTL));
        Ok(format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_TTL.as_secs()))
    }

    /// Who `key` belongs to, through the gateway's keys.
    fn resolve(&self, key: &str) -> Option<Caller> {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {key}")).ok()?);
        self.gateway.caller(&headers)
    }

    /// Who makes the request: its `Authorization` key if it has one, else its session's key.
    pub fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        if headers.contains_key(header::AUTHORIZATION) {
            return self.gateway.caller(headers);
        }
        let id = session_cookie(headers)?;
        let now = Instant::now();
        let key = {
            let logins = self.logins();
            let (key, until) = logins.sessions.get(id)?;
            (*until > now).then(|| key.clone())?
        };
        self.resolve(&key)
    }

    /// The console's routes: `/ui` and its assets, sign-in and out, and the data under `/kiln/v1/console/`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/ui", get(index))
            .route("/ui/", get(index))
            .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
            .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
            .route("/ui/login", post(login))
            .route("/ui/logout", post(logout))
            .route("/kiln/v1/console/login-tokens", post(mint))
            .route("/kiln/v1/console/whoami", get(whoami))
            .route("/kiln/v1/console/fleet", get(fleet))
            .route("/kiln/v1/console/deployments", get(deployments))
            .route("/kiln/v1/console/rentals", get(rentals))
            .route("/kiln/v1/console/events", get(events))
            .with_state(Arc::clone(self))
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::HeaderName::from_static("content-security-policy"),
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'",
            ),
            (header::HeaderName::from_static("x-frame-options"), "DENY"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

/// `GET /ui`: the page; with `?token=`, the token is redeemed for a session cookie and the browser sent to `/ui`
/// (so the token leaves the address bar and history). A token that is unknown, used or expired gets the page with
/// a 401 (the page then asks for a key).
async fn index(State(console): State<Arc<Console>>, uri: Uri) -> Response {
    let Some(token) = query_param(&uri, "token") else { return page() };
    let Some(key) = console.redeem(token) else {
        let mut response = page();
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    };
    match console.open_session(key) {
        Ok(cookie) => signed_in(&cookie),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, format!("no session: {e}")),
    }
}

fn signed_in(cookie: &str) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/ui")]).into_response();
    if let Ok(v) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `POST /ui/login` with `{"key": "..."}`: a session for a key the gateway knows (303 to `/ui` with the cookie),
/// 401 otherwise.
async fn login(State(console): State<Arc<Console>>, body: axum::body::Bytes) -> Response {
    let key = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("key")?.as_str().map(str::trim).map(str::to_owned));
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return problem(StatusCode::BAD_REQUEST, "the body must be {\"key\": \"<API key>\"}");
    };
    if console.resolve(&key).is_none() {
        return problem(StatusCode::UNAUTHORIZED, "unknown API key");
    }
    match console.open_session(key) {
        Ok(cookie) => signed_in(&cookie),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, format!("no session: {e}")),
    }
}

/// `POST /ui/logout`: ends the request's session.
async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        console.logins().sessions.remove(id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    let expired = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `POST /kiln/v1/console/login-tokens` with a key: a one-time login link for that key.
async fn mint(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let key = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let token = key.and_then(|k| console.login_token(k.trim()));
    match token {
        Some(token) => Json(json!({ "token": token, "path": format!("/ui?token={token}") })).into_response(),
        None => console.gateway.unauthorized(),
    }
}

/// Resolves the caller or answers 401.
macro_rules! caller_or_401 {
    ($console:expr, $headers:expr) => {
        match $console.caller(&$headers) {
            Some(c) => c,
            None => return $console.gateway.unauthorized(),
        }
    };
}

/// `GET /kiln/v1/console/whoami`: `{"operator": bool, "namespace": ...}`.
async fn whoami(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match caller_or_401!(console, headers) {
        Caller::Operator => Json(json!({ "operator": true, "namespace": null })),
        Caller::Tenant(ns) => Json(json!({ "operator": false, "namespace": ns })),
    }
    .into_response()
}

/// Whether `key` (`namespace/name`) is the caller's to see.
fn visible(caller: &Caller, key: &str) -> bool {
    match caller {
        Caller::Operator => true,
        Caller::Tenant(ns) => key.split_once('/').is_some_and(|(n, _)| n == ns),
    }
}

/// One GPU in the fleet's compact form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// Index into [`STATES`].
    pub state: u8,
    /// SM utilisation, percent.
    pub util: u32,
    /// Memory used, MiB.
    pub mem_mib: u32,
    /// Power, W.
    pub power_w: u32,
    /// Temperature, °C.
    pub temp_c: u32,
    /// The Xid of its last health change.
    pub xid: u32,
    /// Who holds it: a deployment or a rental (`namespace/name`), empty when free.
    pub holder: String,
}

impl Cell {
    /// `[state, util, memMiB, powerW, tempC, xid, holder]`, appended to `out`.
    fn write_json(&self, out: &mut String) {
        out.push('[');
        self.write_fields(out);
        out.push(']');
    }

    /// The fields of [`Cell::write_json`] without the brackets.
    fn write_fields(&self, out: &mut String) {
        use std::fmt::Write as _;
        let holder = serde_json::to_string(&self.holder).unwrap_or_else(|_| "\"\"".into());
        let _ = write!(
            out,
            "{},{},{},{},{},{},{holder}",
            self.state, self.util, self.mem_mib, self.power_w, self.temp_c, self.xid
        );
    }

    /// Whether `self` differs from `sent` enough to be sent again: another state, holder or Xid, or telemetry
    /// past the dead band.
    fn moved(&self, sent: &Cell) -> bool {
        let far = |a: u32, b: u32, band: u32| a.abs_diff(b) >= band;
        self.state != sent.state
            || self.holder != sent.holder
            || self.xid != sent.xid
            || far(self.util, sent.util, DEADBAND[0])
            || far(self.mem_mib, sent.mem_mib, DEADBAND[1])
            || far(self.power_w, sent.power_w, DEADBAND[2])
            || far(self.temp_c, sent.temp_c, DEADBAND[3])
    }
}

/// One node as the fleet page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    /// Node name.
    pub name: String,
    /// Agent connected.
    pub ready: bool,
    /// Cordoned.
    pub cordoned: bool,
    /// Simulated GPUs.
    pub simulated: bool,
    /// GPU model.
    pub model: String,
    /// Memory per GPU, MiB.
    pub mem_mib: u32,
    /// Cached model URIs per tier (`gpu`, `host`, `disk`); empty for tenants.
    pub cache: BTreeMap<&'static str, Vec<String>>,
    /// GPU indexes (as NVML numbers them) and cells.
    pub gpus: Vec<(u32, Cell)>,
}

impl NodeRow {
    /// `{"name", "ready", "model" (index into `models`), "gpus": [cell...]}`, with `"cordoned": true`,
    /// `"simulated": true`, `"index": [...]` (when the GPUs are not numbered 0..n) and `"cache"` only when they say
    /// something: a thousand nodes' worth of fields that never change would be most of the fleet's bytes.
    fn write_json(&self, model: usize, out: &mut String) {
        use std::fmt::Write as _;
        let name = serde_json::to_string(&self.name).unwrap_or_default();
        let _ = write!(out, "{{\"name\":{name},\"ready\":{},\"model\":{model}", self.ready);
        if self.cordoned {
            out.push_str(",\"cordoned\":true");
        }
        if self.simulated {
            out.push_str(",\"simulated\":true");
        }
        if self.gpus.iter().enumerate().any(|(n, (i, _))| usize::try_from(*i).ok() != Some(n)) {
            let index: Vec<u32> = self.gpus.iter().map(|(i, _)| *i).collect();
            let _ = write!(out, ",\"index\":{}", json!(index));
        }
        if !self.cache.is_empty() {
            let _ = write!(out, ",\"cache\":{}", json!(self.cache));
        }
        out.push_str(",\"gpus\":[");
        for (n, (_, cell)) in self.gpus.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            cell.write_json(out);
        }
        out.push_str("]}");
    }
}

fn state_index(name: &str) -> u8 {
    STATES.iter().position(|s| *s == name).unwrap_or(0) as u8
}

impl Console {
    /// The fleet as `caller` may see it: every node for an operator; for a tenant, only the GPUs its deployments'
    /// replicas and its rentals hold (and the nodes of those), without the cache contents.
    pub fn fleet_rows(&self, caller: &Caller) -> Vec<NodeRow> {
        let nodes = self.registry.nodes();
        let live = self.registry.live();
        let replicas = self.control.replicas();
        let rentals = self.control.rental_views();
        let mib = |b: u64| u32::try_from(b >> 20).unwrap_or(u32::MAX);
        // Who holds each GPU, by (node, index): looked up once per GPU, not searched.
        let mut on_gpu: HashMap<(&str, u32), &crate::control::ReplicaView> = HashMap::new();
        for r in &replicas {
            for g in &r.gpus {
                on_gpu.insert((r.node.as_str(), *g), r);
            }
        }
        let mut rented: HashMap<(&str, u32), &RentalStatusView> = HashMap::new();
        for v in rentals.iter().filter(|v| v.phase == kiln_core::rental::RentalPhase::Active) {
            for g in &v.gpus {
                rented.insert((g.node.as_str(), g.index), v);
            }
        }
        let mut rows = Vec::with_capacity(nodes.len());
        for node in nodes {
            let cordoned = self.control.is_cordoned(&node.name);
            let samples = live.get(&node.name);
            let mut gpus = Vec::with_capacity(node.gpus.len());
            for gpu in &node.gpus {
                let sample = samples.and_then(|s| s.iter().find(|g| g.index == gpu.index));
                let replica = on_gpu.get(&(node.name.as_str(), gpu.index)).copied();
                let rental = rented.get(&(node.name.as_str(), gpu.index)).copied();
                let util = sample.map_or(0, |s| s.sm_util_pct);
                let (state, holder) = if !node.ready {
                    ("offline", String::new())
                } else if gpu.health == GpuHealth::Unhealthy {
                    ("unhealthy", replica.map(|r| r.deployment.clone()).unwrap_or_default())
                } else if let Some(v) = rental.filter(|v| !v.lent) {
                    ("rented", v.key.clone())
                } else if let Some(r) = replica {
                    let in_flight = node.replicas.get(&r.id).map_or(0, |x| x.in_flight);
                    let state = if !r.ready {
                        "loading"
                    } else if in_flight > 0 || util >= 5 {
                        "busy"
                    } else {
                        "idle-warm"
                    };
                    (state, r.deployment.clone())
                } else if let Some(v) = rental {
                    ("lent", v.key.clone())
                } else if cordoned {
                    ("cordoned", String::new())
                } else {
                    ("free", String::new())
                };
                let mine = match caller {
                    Caller::Operator => true,
                    Caller::Tenant(_) => !holder.is_empty() && visible(caller, &holder),
                };
                if !mine {
                    continue;
                }
                let cell = Cell {
                    state: state_index(state),
                    util,
                    mem_mib: sample.map_or(0, |s| mib(s.memory_used_bytes)),
                    power_w: sample.map_or(0, |s| s.power_mw / 1000),
                    temp_c: sample.map_or(0, |s| s.temperature_c),
                    xid: sample.map_or(0, |s| s.xid),
                    holder,
                };
                gpus.push((gpu.index, cell));
            }
            if gpus.is_empty() && *caller != Caller::Operator {
                continue;
            }
            let mut cache: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
            if *caller == Caller::Operator {
                for m in &node.cached {
                    let tier = match m.tier() {
                        CacheTier::Gpu => "gpu",
                        CacheTier::Host => "host",
                        CacheTier::Disk => "disk",
                        _ => continue,
                    };
                    cache.entry(tier).or_default().push(m.model_uri.clone());
                }
            }
            rows.push(NodeRow {
                model: node.gpus.first().map(|g| g.model.clone()).unwrap_or_default(),
                mem_mib: node.gpus.first().map_or(0, |g| mib(g.memory_bytes)),
                name: node.name,
                ready: node.ready,
                cordoned,
                simulated: node.simulated,
                cache,
                gpus,
            });
        }
        rows
    }

    /// The fleet's JSON text: `states` (the names cells number), `models` (`{"name", "memMiB"}`, which nodes
    /// point to), `nodes`, and `counts` per state.
    pub fn fleet_json(rows: &[NodeRow]) -> String {
        let mut counts: BTreeMap<&str, u32> = STATES.iter().map(|s| (*s, 0)).collect();
        for (_, c) in rows.iter().flat_map(|r| &r.gpus) {
            *counts.entry(STATES[usize::from(c.state)]).or_default() += 1;
        }
        let mut models: Vec<(&str, u32)> = Vec::new();
        let per_node = 48 + 28 * rows.first().map_or(0, |r| r.gpus.len());
        let mut out = String::with_capacity(64 + rows.len() * per_node);
        out.push_str("{\"nodes\":[");
        for (n, row) in rows.iter().enumerate() {
            let key = (row.model.as_str(), row.mem_mib);
            let model = match models.iter().position(|m| *m == key) {
                Some(m) => m,
                None => {
                    models.push(key);
                    models.len() - 1
                }
            };
            if n > 0 {
                out.push(',');
            }
            row.write_json(model, &mut out);
        }
        let models: Vec<Value> = models.iter().map(|(name, mem)| json!({ "name": name, "memMiB": mem })).collect();
        let tail = json!({ "models": models, "states": STATES, "counts": counts }).to_string();
        out.push_str("],");
        out.push_str(tail.trim_start_matches('{'));
        out
    }

    /// Each visible deployment: replicas, queue, counters, latency percentiles, its last cold start with phases,
    /// the keep-alive's decision and why, GPU-seconds by phase.
    pub fn deployments_json(&self, caller: &Caller) -> Value {
        let latency = latency_histograms(&self.control.metrics().latency_text());
        let items: Vec<Value> = self
            .control
            .statuses()
            .into_iter()
            .filter(|(key, _)| visible(caller, key))
            .map(|(key, s)| {
                let view = self.control.view(&key).unwrap_or_default();
                let c = &view.counters;
                let hist = latency.get(&key);
                let pct = |q: f64| hist.and_then(|h| quantile(h, q));
                let cold = view.last_cold_start.as_ref().map(|r| {
                    json!({
                        "seconds": r.seconds,
                        "phasesMs": { "fetch": r.phases_ms[0], "read": r.phases_ms[1], "hostToDevice": r.phases_ms[2], "init": r.phases_ms[3] },
                        "source": r.source.map(|t| format!("{t:?}")),
                        "node": r.node,
                        "at": r.finished_at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                    })
                });
                let keep = self.control.keep_alive(&key).map(|k| {
                    json!({ "idleForS": k.idle_for_s, "releaseInS": k.release_in_s, "prewarmInS": k.prewarm_in_s, "why": k.why })
                });
                json!({
                    "name": key,
                    "replicas": { "desired": s.desired, "ready": s.ready, "loading": s.starting },
                    "inFlight": s.in_flight,
                    "waiting": s.waiting,
                    "requests": c.requests,
                    "failed": c.failed_requests,
                    "coldStarts": c.cold_starts,
                    "failedStarts": c.failed_starts,
                    "latency": { "count": hist.map_or(0, |h| h.last().map_or(0, |b| b.1)), "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99) },
                    "lastColdStart": cold,
                    "keepAlive": keep,
                    "unschedulable": s.unschedulable.map(|u| u.to_string()),
                    "degraded": s.failure.map(|f| format!("{}: {}", f.last.reason, f.last.message)),
                    "gpuSeconds": self.gpu_seconds(&key),
                })
            })
            .collect();
        json!({ "deployments": items })
    }

    /// GPU-seconds metered for a deployment, by phase (closed one-minute windows; empty without billing).
    fn gpu_seconds(&self, key: &str) -> BTreeMap<String, f64> {
        let Some(billing) = &self.gateway.billing else { return BTreeMap::new() };
        let Some((ns, name)) = key.split_once('/') else { return BTreeMap::new() };
        let now = Instant::now();
        let cached = |c: &HashMap<String, (Instant, PhaseSeconds)>| {
            c.get(key).filter(|(at, _)| now.duration_since(*at) < GPU_SECONDS_FRESH).map(|(_, v)| v.clone())
        };
        if let Some(v) = cached(&self.gpu_seconds.lock().unwrap_or_else(|p| p.into_inner())) {
            return v;
        }
        let query = Query::namespace(ns).subject(Subject::Deployment(name.to_owned()));
        let read = billing
            .usage(&query, GroupBy::Phase)
            .map(|u| u.groups.into_iter().map(|(phase, t)| (phase, t.micro_gpu_seconds as f64 / 1e6)).collect());
        match read {
            Ok(v) => {
                let mut cache = self.gpu_seconds.lock().unwrap_or_else(|p| p.into_inner());
                cache.retain(|_, (at, _)| now.duration_since(*at) < GPU_SECONDS_FRESH);
                cache.insert(key.to_owned(), (now, BTreeMap::clone(&v)));
                v
            }
            // Unreadable now (a ledger without its leader): shown as nothing metered, asked again next time.
            Err(_) => BTreeMap::new(),
        }
    }

    /// Rentals (calendar, time to active, expiring, lent) and usage (spend and GPU-hours per tenant, or by phase
    /// for a tenant).
    pub fn rentals_json(&self, caller: &Caller) -> Value {
        let rentals: Vec<RentalStatusView> =
            self.control.rental_views().into_iter().filter(|v| visible(caller, &v.key)).collect();
        let items: Vec<Value> = rentals
            .iter()
            .map(|v| {
                json!({
                    "name": v.key,
                    "phase": phase_name(v.phase),
                    "message": v.message,
                    "gpuModel": v.gpu_model,
                    "count": v.count,
                    "gpus": v.gpus.iter().map(|g| format!("{}/{}", g.node, g.index)).collect::<Vec<_>>(),
                    "deliveredAt": v.delivered_at,
                    "endAt": v.end_at,
                    "billedGpuHours": v.billed_gpu_hours,
                    "degraded": v.degraded,
                    "expiringSoon": v.expiring_soon,
                    "lent": v.lent,
                })
            })
            .collect();
        let usage = self.gateway.billing.as_ref().map(|billing| {
            let (query, by) = match caller {
                Caller::Operator => (Query::all(), GroupBy::Namespace),
                Caller::Tenant(ns) => (Query::namespace(ns.clone()), GroupBy::Phase),
            };
            match billing.usage(&query, by) {
                Ok(u) => json!({
                    "currency": billing.currency(),
                    "by": if *caller == Caller::Operator { "namespace" } else { "phase" },
                    "groups": u.groups.iter().map(|(k, t)| json!({
                        "key": k,
                        "gpuSeconds": t.micro_gpu_seconds as f64 / 1e6,
                        "gpuHours": t.gpu_hours,
                        "amount": t.amount.to_string(),
                    })).collect::<Vec<_>>(),
                    "total": { "gpuSeconds": u.total.micro_gpu_seconds as f64 / 1e6, "gpuHours": u.total.gpu_hours, "amount": u.total.amount.to_string() },
                }),
                Err(e) => json!({ "error": e.to_string() }),
            }
        });
        json!({ "rentals": items, "usage": usage })
    }
}

/// Per deployment, the cumulative buckets `(upper bound, count)` of `kiln_gateway_request_duration_seconds` in
/// the controller's OpenMetrics text.
fn latency_histograms(text: &str) -> HashMap<String, Vec<(f64, u64)>> {
    let mut out: HashMap<String, Vec<(f64, u64)>> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("kiln_gateway_request_duration_seconds_bucket{") else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let label =
            |name: &str| labels.split(',').find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\"")?.strip_suffix('"'));
        let (Some(deployment), Some(le)) = (label("deployment"), label("le")) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        let Ok(count) = value.split_whitespace().next().unwrap_or("").parse::<f64>() else { continue };
        if le.is_nan() {
            continue;
        }
        out.entry(deployment.to_owned()).or_default().push((le, count as u64));
    }
    for buckets in out.values_mut() {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The `q` quantile of cumulative `buckets`, interpolated inside its bucket as Prometheus' `histogram_quantile`
/// does; `None` without observations.
pub fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let inside = (count - lower.1) as f64;
            let frac = if inside > 0.0 { (rank - lower.1 as f64) / inside } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * frac);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

async fn fleet(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let caller = caller_or_401!(console, headers);
    let rows = console.fleet_rows(&caller);
    ([(header::CONTENT_TYPE, "application/json")], Console::fleet_json(&rows)).into_response()
}

async fn deployments(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let caller = caller_or_401!(console, headers);
    Json(console.deployments_json(&caller)).into_response()
}

async fn rentals(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let caller = caller_or_401!(console, headers);
    Json(console.rentals_json(&caller)).into_response()
}

/// What one event stream last sent: the nodes in order and each GPU's cell, and the deployments' text.
#[derive(Debug, Default)]
pub struct Sent {
    nodes: Vec<(String, bool, bool, Vec<u32>)>,
    cells: HashMap<(String, u32), Cell>,
    deployments: String,
    fleet_sent: bool,
}

impl Sent {
    /// The events that bring a client from what was sent to `rows` and `deployments`: a full `fleet` when the set
    /// of nodes or GPUs (or a node's readiness or cordon) changed, else a `delta` of the cells that moved
    /// (`{"g": [[node, gpu, ...cell]]}`, node and GPU by their positions in the last `fleet`) if any did; `deployments`
    /// when that changed. Records what it returns as sent.
    pub fn next(&mut self, rows: &[NodeRow], deployments: String) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let shape: Vec<(String, bool, bool, Vec<u32>)> = rows
            .iter()
            .map(|r| (r.name.clone(), r.ready, r.cordoned, r.gpus.iter().map(|(i, _)| *i).collect()))
            .collect();
        if shape != self.nodes || !self.fleet_sent {
            self.fleet_sent = true;
            self.nodes = shape;
            self.cells =
                rows.iter().flat_map(|r| r.gpus.iter().map(|(i, c)| ((r.name.clone(), *i), c.clone()))).collect();
            out.push(("fleet", Console::fleet_json(rows)));
        } else {
            let mut changed = String::new();
            for (n, row) in rows.iter().enumerate() {
                for (g, (i, cell)) in row.gpus.iter().enumerate() {
                    let key = (row.name.clone(), *i);
                    if self.cells.get(&key).is_none_or(|sent| cell.moved(sent)) {
                        changed.push_str(if changed.is_empty() { "{\"g\":[" } else { "," });
                        changed.push_str(&format!("[{n},{g},"));
                        cell.write_fields(&mut changed);
                        changed.push(']');
                        self.cells.insert(key, cell.clone());
                    }
                }
            }
            if !changed.is_empty() {
                changed.push_str("]}");
                out.push(("delta", changed));
            }
        }
        if deployments != self.deployments {
            out.push(("deployments", deployments.clone()));
            self.deployments = deployments;
        }
        out
    }
}

/// `GET /kiln/v1/console/events`: server-sent events (see the module docs). The caller is checked again at every
/// tick: a key removed ends the stream.
async fn events(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    if console.caller(&headers).is_none() {
        return console.gateway.unauthorized();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(8);
    tokio::spawn(async move {
        let mut sent = Sent::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            // A client gone, or a key removed: the stream ends.
            if tx.is_closed() {
                return;
            }
            let Some(caller) = console.caller(&headers) else { return };
            let rows = console.fleet_rows(&caller);
            let deployments = console.deployments_json(&caller).to_string();
            for (name, data) in sent.next(&rows, deployments) {
                if tx.send(Ok(Event::default().event(name).data(data))).await.is_err() {
                    return;
                }
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket_as_prometheus_does() {
        let b = [(0.1, 50), (0.2, 90), (0.4, 100), (f64::INFINITY, 100)];
        assert!((quantile(&b, 0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((quantile(&b, 0.7).unwrap() - 0.15).abs() < 1e-9);
        assert!((quantile(&b, 0.95).unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(quantile(&[(0.1, 0), (f64::INFINITY, 0)], 0.5), None);
        // Everything past the last finite bound: that bound.
        assert_eq!(quantile(&[(0.1, 0), (f64::INFINITY, 4)], 0.5), Some(0.1));
    }

    #[test]
    fn latency_buckets_are_read_from_the_metrics_text_per_deployment() {
        let text = "# TYPE kiln_gateway_request_duration_seconds histogram\n\
            kiln_gateway_request_duration_seconds_bucket{le=\"0.5\",deployment=\"a/x\"} 3\n\
            kiln_gateway_request_duration_seconds_bucket{le=\"+Inf\",deployment=\"a/x\"} 4\n\
            kiln_gateway_request_duration_seconds_bucket{deployment=\"b/y\",le=\"1.0\"} 1\n\
            kiln_gateway_request_duration_seconds_count{deployment=\"a/x\"} 4\n";
        let h = latency_histograms(text);
        assert_eq!(h["a/x"], vec![(0.5, 3), (f64::INFINITY, 4)]);
        assert_eq!(h["b/y"], vec![(1.0, 1)]);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn cells_move_past_the_dead_band_or_on_any_state_change() {
        let a = Cell { state: 1, util: 50, mem_mib: 1000, power_w: 300, temp_c: 60, xid: 0, holder: "n/d".into() };
        assert!(!a.moved(&Cell { util: 53, power_w: 310, temp_c: 61, mem_mib: 1400, ..a.clone() }));
        assert!(a.moved(&Cell { util: 55, ..a.clone() }));
        assert!(a.moved(&Cell { power_w: 285, ..a.clone() }));
        assert!(a.moved(&Cell { state: 2, ..a.clone() }));
        assert!(a.moved(&Cell { xid: 79, ..a.clone() }));
        assert!(a.moved(&Cell { holder: String::new(), ..a.clone() }));
    }

    fn row(name: &str, cells: Vec<Cell>) -> NodeRow {
        NodeRow {
            name: name.into(),
            ready: true,
            cordoned: false,
            simulated: true,
            model: "NVIDIA H100 80GB HBM3".into(),
            mem_mib: 81_559,
            cache: BTreeMap::new(),
            gpus: cells.into_iter().enumerate().map(|(i, c)| (i as u32, c)).collect(),
        }
    }

    #[test]
    fn the_event_stream_sends_a_snapshot_then_only_the_cells_that_moved() {
        let free = Cell { state: 0, util: 0, mem_mib: 0, power_w: 70, temp_c: 30, xid: 0, holder: String::new() };
        let mut rows = vec![row("a", vec![free.clone(), free.clone()]), row("b", vec![free.clone()])];
        let mut sent = Sent::default();
        let first = sent.next(&rows, "[]".into());
        assert_eq!(first.iter().map(|e| e.0).collect::<Vec<_>>(), ["fleet", "deployments"]);
        let fleet: Value = serde_json::from_str(&first[0].1).unwrap();
        assert_eq!(fleet["nodes"][0]["gpus"][1], json!([0, 0, 0, 70, 30, 0, ""]));
        assert_eq!(fleet["models"], json!([{ "name": "NVIDIA H100 80GB HBM3", "memMiB": 81_559 }]));
        assert_eq!(fleet["counts"]["free"], 3);
        assert!(fleet["nodes"][0].get("cordoned").is_none() && fleet["nodes"][0].get("index").is_none());
        // Nothing moved, or only inside the dead band: nothing to send.
        assert!(sent.next(&rows, "[]".into()).is_empty());
        rows[1].gpus[0].1.power_w = 80;
        assert!(sent.next(&rows, "[]".into()).is_empty());
        // A state change: one delta naming node 1's GPU 0 by position, with its cell flat after them.
        rows[1].gpus[0].1 = Cell { state: 2, holder: "ns/d".into(), ..free.clone() };
        let delta = sent.next(&rows, "[]".into());
        assert_eq!(delta.len(), 1);
        assert_eq!(delta[0].0, "delta");
        let delta: Value = serde_json::from_str(&delta[0].1).unwrap();
        assert_eq!(delta, json!({ "g": [[1, 0, 2, 0, 0, 70, 30, 0, "ns/d"]] }));
        // A node gone: a new snapshot.
        rows.pop();
        assert_eq!(sent.next(&rows, "[]".into())[0].0, "fleet");
        // The deployments, whenever their text changes.
        assert_eq!(sent.next(&rows, "[1]".into()), vec![("deployments", "[1]".to_owned())]);
    }

    use axum::body::Body;
    use tower::ServiceExt as _;

    use crate::{
        control::ControlConfig,
        registry::{MonotonicClock, RegistryConfig},
    };

    const TENANT_A: &str = "key-a-0123456789abcdef";
    const TENANT_B: &str = "key-b-0123456789abcdef";
    const OPS: &str = "key-ops-0123456789abcdef";

    /// A console over keys for namespaces `a` and `b` and an operator, serving `a/one` and `b/two`.
    fn console() -> (Arc<Console>, Arc<Gw>) {
        let registry = Registry::new(RegistryConfig::default(), MonotonicClock::system());
        let control = ControlPlane::new(registry.clone(), ControlConfig::default());
        control.upsert(crate::control::tests::spec("a/one"));
        control.upsert(crate::control::tests::spec("b/two"));
        let keys = [(TENANT_A, "a"), (TENANT_B, "b"), (OPS, super::super::OPERATOR)];
        let gateway = Gateway::new(Arc::clone(&control), keys.map(|(k, n)| (k.to_owned(), n.to_owned())), "http://t");
        (Console::new(Arc::clone(&gateway), control, registry), gateway)
    }

    /// One request through the console's router: (status, headers, body).
    async fn call(
        console: &Arc<Console>,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let mut request = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = console.router().oneshot(request.body(Body::from(body.to_owned())).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The `name=value` of a `Set-Cookie`.
    fn cookie_of(headers: &HeaderMap) -> String {
        let set = headers.get(header::SET_COOKIE).expect("a cookie").to_str().unwrap();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"), "{set}");
        set.split(';').next().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_login_token_opens_one_session_once_and_the_session_is_the_keys() {
        let (console, _) = console();
        assert!(console.login_token("not-a-key-0123456789").is_none(), "no token for an unknown key");
        let token = console.login_token(TENANT_A).unwrap();
        let (status, headers, _) = call(&console, "GET", &format!("/ui?token={token}"), &[], "").await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers[header::LOCATION], "/ui", "the token leaves the address bar");
        let cookie = cookie_of(&headers);
        // Used once: a second use is refused, and sets no cookie.
        let (again, headers, page) = call(&console, "GET", &format!("/ui?token={token}"), &[], "").await;
        assert_eq!(again, StatusCode::UNAUTHORIZED);
        assert!(headers.get(header::SET_COOKIE).is_none() && page.contains("Sign in"));
        // The cookie is namespace a's key.
        let (status, _, who) = call(&console, "GET", "/kiln/v1/console/whoami", &[("cookie", &cookie)], "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(serde_json::from_str::<Value>(&who).unwrap(), json!({ "operator": false, "namespace": "a" }));
        // Without it, or with a made-up one: 401.
        for headers in [vec![], vec![("cookie", "kiln_console=0000")]] {
            let (status, _, _) = call(&console, "GET", "/kiln/v1/console/fleet", &headers, "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        // Signing out ends it.
        let (status, headers, _) = call(&console, "POST", "/ui/logout", &[("cookie", &cookie)], "").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(headers[header::SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
        let (status, _, _) = call(&console, "GET", "/kiln/v1/console/whoami", &[("cookie", &cookie)], "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_key_removed_from_the_gateway_ends_its_sessions_and_tokens() {
        let (console, gateway) = console();
        let (status, headers, _) =
            call(&console, "POST", "/ui/login", &[], &json!({ "key": TENANT_B }).to_string()).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let cookie = cookie_of(&headers);
        let token = console.login_token(TENANT_B).unwrap();
        assert_eq!(
            call(&console, "GET", "/kiln/v1/console/whoami", &[("cookie", &cookie)], "").await.0,
            StatusCode::OK
        );
        gateway.set_keys([(TENANT_A.to_owned(), "a".to_owned())]);
        assert_eq!(
            call(&console, "GET", "/kiln/v1/console/whoami", &[("cookie", &cookie)], "").await.0,
            StatusCode::UNAUTHORIZED
        );
        let (status, headers, _) = call(&console, "GET", &format!("/ui?token={token}"), &[], "").await;
        assert_eq!(status, StatusCode::SEE_OTHER, "the token itself was valid");
        let cookie = cookie_of(&headers);
        assert_eq!(
            call(&console, "GET", "/kiln/v1/console/whoami", &[("cookie", &cookie)], "").await.0,
            StatusCode::UNAUTHORIZED,
            "but its session carries a key that is gone"
        );
        // A wrong key typed in: 401; no key: 400.
        let (status, headers, _) =
            call(&console, "POST", "/ui/login", &[], &json!({ "key": TENANT_B }).to_string()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.get(header::SET_COOKIE).is_none());
        assert_eq!(call(&console, "POST", "/ui/login", &[], "{}").await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_tenant_sees_its_namespace_only_and_an_operator_everything() {
        let (console, _) = console();
        let names = |body: &str| -> Vec<String> {
            let v: Value = serde_json::from_str(body).unwrap();
            v["deployments"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_owned()).collect()
        };
        let get = |key: &'static str| {
            let console = Arc::clone(&console);
            async move {
                let auth = format!("Bearer {key}");
                call(&console, "GET", "/kiln/v1/console/deployments", &[("authorization", &auth)], "").await
            }
        };
        assert_eq!(names(&get(TENANT_A).await.2), ["a/one"]);
        assert_eq!(names(&get(TENANT_B).await.2), ["b/two"]);
        assert_eq!(names(&get(OPS).await.2), ["a/one", "b/two"]);
        // A login link minted with a key is that key's.
        let (status, _, minted) = call(
            &console,
            "POST",
            "/kiln/v1/console/login-tokens",
            &[("authorization", &format!("Bearer {TENANT_B}"))],
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let path = serde_json::from_str::<Value>(&minted).unwrap()["path"].as_str().unwrap().to_owned();
        let (_, headers, _) = call(&console, "GET", &path, &[], "").await;
        let cookie = cookie_of(&headers);
        let (_, _, body) = call(&console, "GET", "/kiln/v1/console/deployments", &[("cookie", &cookie)], "").await;
        assert_eq!(names(&body), ["b/two"]);
        assert_eq!(
            call(&console, "POST", "/kiln/v1/console/login-tokens", &[("authorization", "Bearer nope-0123456789")], "")
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        // The page and its assets need no key; the data does.
        for (path, kind) in [("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")] {
            let (status, headers, _) = call(&console, "GET", path, &[], "").await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind), "{path}");
        }
        for path in ["/kiln/v1/console/deployments", "/kiln/v1/console/rentals", "/kiln/v1/console/events"] {
            assert_eq!(call(&console, "GET", path, &[], "").await.0, StatusCode::UNAUTHORIZED, "{path}");
        }
    }

    /// Metered GPU-seconds come from the ledger once per freshness period, not once per viewer and second.
    #[test]
    fn gpu_seconds_are_read_from_billing_at_most_once_per_freshness_period() {
        use kiln_core::billing::{Quantity, ServerlessPhase, UsageKind, UsageRecord};
        let registry = Registry::new(RegistryConfig::default(), MonotonicClock::system());
        let control = ControlPlane::new(registry.clone(), ControlConfig::default());
        let mut gateway = Gateway::new(Arc::clone(&control), Vec::new(), "http://t");
        let billing = Arc::new(crate::billing::Billing::in_memory(kiln_core::billing::PriceTable::new("USD")));
        Arc::get_mut(&mut gateway).unwrap().billing = Some(Arc::clone(&billing));
        let console = Console::new(gateway, control, registry);
        let busy = |start_ms: i64| {
            UsageRecord::new(
                "meter",
                "a",
                Subject::Deployment("one".into()),
                UsageKind::Serverless(ServerlessPhase::Busy),
                "H100",
                Quantity::MicroGpuSeconds(2_000_000),
                kiln_core::money::Money::from_nanos(0),
                start_ms,
                start_ms + 60_000,
            )
        };
        billing.append(vec![busy(0)]).unwrap();
        assert_eq!(console.gpu_seconds("a/one").get("busy"), Some(&2.0));
        billing.append(vec![busy(60_000)]).unwrap();
        assert_eq!(console.gpu_seconds("a/one").get("busy"), Some(&2.0), "within the freshness period: the same read");
        console.gpu_seconds.lock().unwrap().clear();
        assert_eq!(console.gpu_seconds("a/one").get("busy"), Some(&4.0), "read again once stale");
    }

    #[test]
    fn cookies_and_query_parameters_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("other=1; kiln_console=abc; x=y"));
        assert_eq!(session_cookie(&h), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("kiln_consolex=abc"));
        assert_eq!(session_cookie(&h), None);
        let uri: Uri = "/ui?a=1&token=t0k".parse().unwrap();
        assert_eq!(query_param(&uri, "token"), Some("t0k"));
        let uri: Uri = "/ui?xtoken=t0k".parse().unwrap();
        assert_eq!(query_param(&uri, "token"), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
