//! `GpuNode`: one GPU node as its agent registered it. Cluster-scoped, written by the controller; operators only
//! touch `spec.unschedulable`. Telemetry does not go here (it goes over gRPC and to Prometheus).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model_deployment::CacheTier;

/// A GPU node as its Kiln agent registered it: GPU inventory, health and cached model weights.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "GpuNode",
    plural = "gpunodes",
    shortname = "gpunode",
    category = "kiln",
    status = "GpuNodeStatus",
    derive = "PartialEq",
    doc = "A GPU node as its Kiln agent registered it: GPU inventory, health and cached model weights.",
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.gpuCount"),
    printcolumn(
        name = "Free",
        type_ = "integer",
        json_path = ".status.freeGpus",
        description = "GPUs with no replica or rental"
    ),
    printcolumn(name = "Healthy", type_ = "integer", json_path = ".status.healthyGpus"),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.gpus[0].model"),
    printcolumn(name = "Heartbeat", type_ = "date", json_path = ".status.lastHeartbeat"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Agent", type_ = "string", json_path = ".status.agentVersion", priority = "1")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeSpec {
    /// Cordon: no new replicas or rentals are placed on this node; running ones stay.
    #[serde(default)]
    pub unschedulable: bool,
}

/// What the node's agent last reported, written by the controller.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeStatus {
    /// GPU inventory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub gpus: Vec<GpuInfo>,
    /// Number of GPUs (for `kubectl get`).
    #[serde(default)]
    pub gpu_count: i32,
    /// GPUs with no replica, rental or idle resident weights that cannot be evicted.
    #[serde(default)]
    pub free_gpus: i32,
    /// GPUs whose health is Healthy.
    #[serde(default)]
    pub healthy_gpus: i32,
    /// Model weights cached on the node, by tier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached_models: Vec<CachedModel>,
    /// Version of the node's kiln-agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// NVIDIA driver version; absent for simulated GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports; absent for simulated GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    /// True when the agent simulates its GPUs (no NVML on the node).
    #[serde(default)]
    pub simulated: bool,
    /// Last heartbeat the controller received from the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// `Ready` (agent connected and heartbeating).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// One GPU of a node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    /// NVML device index.
    pub index: i32,
    /// NVML UUID, e.g. "GPU-5a3c...".
    pub uuid: String,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub model: String,
    /// Total GPU memory in MiB, as nvidia-smi shows it.
    pub memory_mib: i64,
    /// Health as the agent classifies it.
    pub health: GpuHealth,
    /// Why the GPU is not healthy, e.g. "Xid 79: GPU has fallen off the bus".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Health of one GPU.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuHealth {
    /// In service.
    Healthy,
    /// In service with warnings (correctable ECC errors, throttling).
    Degraded,
    /// Out of service until the agent observes a reset.
    Unhealthy,
    /// Not reported (agent disconnected).
    Unknown,
}

/// A model's weights cached on the node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CachedModel {
    /// Model source URI.
    pub uri: String,
    /// Cache tier holding the copy.
    pub tier: CacheTier,
    /// Size of the weights in bytes.
    pub size_bytes: i64,
    /// For tier Gpu: the GPU index holding the idle copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<i32>,
}
