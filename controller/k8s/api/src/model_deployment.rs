//! `ModelDeployment`: a model served on GPUs, scaled by Kiln between `minReplicas` (possibly zero) and
//! `maxReplicas`.

use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, KubeSchema, core::Duration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A model served on GPUs through the predictions API, scaled by Kiln (to zero when idle).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    category = "kiln",
    namespaced,
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A model served on GPUs through the predictions API, scaled by Kiln between minReplicas (possibly zero) and maxReplicas.",
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.replicas.ready",
        description = "Replicas ready to serve"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.replicas.desired",
        description = "Replicas the autoscaler wants"
    ),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpu.count", description = "GPUs per replica"),
    printcolumn(
        name = "GPU-Mem",
        type_ = "string",
        json_path = ".spec.gpu.memoryPerGpu",
        description = "GPU memory per GPU"
    ),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Cold-Start",
        type_ = "string",
        json_path = ".status.lastColdStart.duration",
        description = "Duration of the last cold start"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.uri", priority = "1")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Where the weights come from and how they are served.
    pub model: ModelSource,
    /// GPUs each replica needs.
    pub gpu: GpuRequirement,
    /// Replica bounds and scale-to-zero behaviour.
    #[serde(default)]
    pub scaling: Scaling,
    /// The longest cold start this deployment tolerates (e.g. 30s). The placement engine prefers nodes that
    /// already cache the weights to stay within it, and a miss is reported in the Degraded condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::duration")]
    pub cold_start_budget: Option<Duration>,
    /// Host CPU and memory each replica reserves on its node, besides its GPUs (defaults: 250m CPU, 1Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ReplicaResources>,
}

/// CPU of one replica when the spec does not say, millicores: a small share, so that a GPU node's replicas are
/// limited by its GPUs, not its cores.
pub const DEFAULT_REPLICA_CPU_MILLI: u64 = 250;
/// Host memory of one replica when the spec does not say, bytes.
pub const DEFAULT_REPLICA_MEMORY_BYTES: u64 = 1 << 30;

/// Host resources of one replica.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaResources {
    /// CPU, as a Kubernetes quantity (e.g. 500m, 2). Default 250m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::cpu_quantity")]
    pub cpu: Option<Quantity>,
    /// Host memory (e.g. 2Gi). Default 1Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::byte_quantity")]
    pub memory: Option<Quantity>,
}

/// Where a model's weights come from and which runtime serves them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.runtime != 'process' || has(self.process)")
    .message("runtime 'process' needs a 'process' section with the command and port of the model server"))]
#[x_kube(validation = Rule::new("self.runtime == 'process' || !has(self.process)")
    .message("a 'process' section is only allowed with runtime 'process'"))]
pub struct ModelSource {
    /// URI of a safetensors file or directory: file://, s3://, gs://, hf:// or http(s)://.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(file|s3|gs|hf|https?)://.+"))]
    pub uri: String,
    /// Size of the weights if known (e.g. 16Gi); used to estimate cold starts before the first load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::byte_quantity")]
    pub size: Option<Quantity>,
    /// `native`: Kiln's built-in CUDA worker loads the safetensors weights. `process`: an external model server
    /// (e.g. vLLM) that Kiln launches on the assigned GPUs.
    #[serde(default)]
    pub runtime: Runtime,
    /// The external model server, for runtime `process`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessRuntime>,
}

/// Which worker runtime serves a model.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Kiln's built-in CUDA worker.
    #[default]
    Native,
    /// An external model server process.
    Process,
}

/// An external model server launched with `CUDA_VISIBLE_DEVICES` set to the replica's GPUs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRuntime {
    /// Executable and leading arguments, e.g. ["vllm", "serve"].
    #[schemars(length(min = 1, max = 64))]
    pub command: Vec<String>,
    /// Further arguments. `$(MODEL_PATH)` and `$(PORT)` are replaced by the local weights path and the port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub args: Vec<String>,
    /// Environment variables for the server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,
    /// TCP port the server listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// HTTP path answering 200 once the server is ready.
    #[serde(default = "default_readiness_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub readiness_path: String,
    /// How long to wait for readiness before the start counts as failed.
    #[serde(default = "default_startup_timeout")]
    #[schemars(schema_with = "crate::schema::duration")]
    pub startup_timeout: Duration,
}

fn default_readiness_path() -> String {
    "/health".to_owned()
}

fn default_startup_timeout() -> Duration {
    std::time::Duration::from_secs(600).into()
}

/// One environment variable.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    /// Variable name.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// Variable value.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// GPUs each replica needs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequirement {
    /// GPUs per replica. More than one means whole GPUs on one node (a gang).
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 1, max = 16))]
    pub count: i32,
    /// GPU memory each replica needs on each of its GPUs (e.g. 20Gi). Below a whole GPU, replicas of several
    /// deployments may share one GPU.
    #[schemars(schema_with = "crate::schema::byte_quantity")]
    pub memory_per_gpu: Quantity,
    /// GPU models the replica may run on, as the GpuNode inventory names them (e.g. "NVIDIA H100 80GB HBM3").
    /// Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 128)))]
    pub models: Vec<String>,
    /// A GpuRental of the same namespace whose GPUs alone the replicas run on (paid by the hour, not metered per
    /// second). Unset: the serverless pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub rental: Option<String>,
}

fn default_gpu_count() -> i32 {
    1
}

/// Replica bounds and scale-to-zero behaviour.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("minReplicas must not be greater than maxReplicas"))]
pub struct Scaling {
    /// Replicas kept even with no traffic. 0 allows scale to zero.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Upper bound on replicas.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// In-flight requests one replica should serve; the autoscaler sizes the deployment to keep the average near it.
    #[serde(default = "default_target_concurrency")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_concurrency: i32,
    /// What happens to an idle replica.
    #[serde(default)]
    pub keep_alive: KeepAlive,
}

fn default_max_replicas() -> i32 {
    1
}

fn default_target_concurrency() -> i32 {
    1
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: default_max_replicas(),
            target_concurrency: default_target_concurrency(),
            keep_alive: KeepAlive::default(),
        }
    }
}

/// How long an idle replica stays warm before it is scaled away.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.policy != 'fixed' || has(self.duration)")
    .message("keepAlive policy 'fixed' needs a duration, e.g. 60s"))]
pub struct KeepAlive {
    /// `fixed`: keep an idle replica for `duration`. `adaptive`: learn this deployment's idle-time distribution
    /// and keep replicas warm while the expected cold-start cost exceeds the idle GPU cost.
    #[serde(default)]
    pub policy: KeepAlivePolicy,
    /// For `fixed`: the idle time before scale-down. For `adaptive`: an upper bound on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::duration")]
    pub duration: Option<Duration>,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self { policy: KeepAlivePolicy::Adaptive, duration: None }
    }
}

/// Keep-alive policy names.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeepAlivePolicy {
    /// A fixed idle timeout.
    Fixed,
    /// Cost-based keep-alive learned from the deployment's traffic.
    #[default]
    Adaptive,
}

/// Observed state of a ModelDeployment, written by the controller.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One-word summary for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DeploymentState>,
    /// Replica counts by state.
    #[serde(default)]
    pub replicas: ReplicaCounts,
    /// Where each replica runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<ReplicaPlacement>,
    /// The most recent cold start and its phases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cold_start: Option<ColdStart>,
    /// Cumulative counters since the deployment was created (flushed periodically, not per request).
    #[serde(default)]
    pub counters: DeploymentCounters,
    /// `Ready`, `Scheduled`, `ScaledToZero`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// One-word summary of a deployment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeploymentState {
    /// Waiting for placement.
    Pending,
    /// At least one replica is loading and none is ready.
    Loading,
    /// At least one replica serves.
    Ready,
    /// No replica runs; the next request starts one.
    ScaledToZero,
    /// The spec cannot be served as written (see the Degraded condition).
    Degraded,
}

/// Replica counts by state.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Replicas the autoscaler wants now.
    #[serde(default)]
    pub desired: i32,
    /// Replicas loading weights.
    #[serde(default)]
    pub loading: i32,
    /// Replicas ready to serve.
    #[serde(default)]
    pub ready: i32,
    /// Ready replicas with no request in flight.
    #[serde(default)]
    pub idle: i32,
}

/// Where one replica runs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    /// Replica id (unique for the replica's lifetime).
    pub replica: String,
    /// GpuNode name.
    pub node: String,
    /// GPU indexes on that node.
    pub gpus: Vec<i32>,
    /// Replica state.
    pub state: ReplicaState,
}

/// State of one replica.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Placed, weights loading.
    Loading,
    /// Serving.
    Ready,
    /// Finishing in-flight requests before it stops.
    Draining,
}

/// A cold start: from the decision to start a replica to the replica being ready.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ColdStart {
    /// When the replica was requested.
    pub started_at: Time,
    /// Total duration, e.g. "4.2s".
    pub duration: String,
    /// Total duration in milliseconds.
    pub duration_ms: i64,
    /// Node the replica started on.
    pub node: String,
    /// Tier the weights were loaded from.
    pub source: CacheTier,
    /// Time spent in each phase, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<ColdStartPhase>,
}

/// One phase of a cold start.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ColdStartPhase {
    /// Phase name.
    pub name: ColdStartPhaseName,
    /// Milliseconds spent in the phase.
    pub duration_ms: i64,
}

/// Phases of a cold start, in order.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdStartPhaseName {
    /// Choosing a node and GPUs.
    Scheduling,
    /// Remote store to local disk.
    Fetch,
    /// Local disk to host memory.
    Read,
    /// Host memory to GPU memory.
    HostToDevice,
    /// Runtime initialization until ready.
    Init,
}

/// Where weights were loaded from, fastest first.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheTier {
    /// An idle copy already resident in GPU memory.
    Gpu,
    /// Host RAM.
    Host,
    /// Local disk.
    Disk,
    /// Remote store.
    Remote,
}

impl From<kiln_core::autoscale::coldstart::Tier> for CacheTier {
    fn from(tier: kiln_core::autoscale::coldstart::Tier) -> Self {
        use kiln_core::autoscale::coldstart::Tier;
        match tier {
            Tier::Gpu => CacheTier::Gpu,
            Tier::HostRam => CacheTier::Host,
            Tier::Disk => CacheTier::Disk,
            Tier::Remote => CacheTier::Remote,
        }
    }
}

impl From<CacheTier> for kiln_core::autoscale::coldstart::Tier {
    fn from(tier: CacheTier) -> Self {
        match tier {
            CacheTier::Gpu => Self::Gpu,
            CacheTier::Host => Self::HostRam,
            CacheTier::Disk => Self::Disk,
            CacheTier::Remote => Self::Remote,
        }
    }
}

/// Cumulative counters.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentCounters {
    /// Predictions received.
    #[serde(default)]
    pub requests: i64,
    /// Predictions that failed (model error, timeout, rejected while cold).
    #[serde(default)]
    pub failed_requests: i64,
    /// Replicas started without a warm replica of this deployment.
    #[serde(default)]
    pub cold_starts: i64,
    /// Replica starts that failed.
    #[serde(default)]
    pub failed_starts: i64,
}
