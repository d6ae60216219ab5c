//! `GpuRental`: a tenant (the namespace) rents whole GPUs of one model for a number of hours, billed per started
//! hour.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whole GPUs rented by the namespace's tenant for a fixed time, billed per started hour.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "GpuRental",
    plural = "gpurentals",
    shortname = "rental",
    category = "kiln",
    namespaced,
    status = "GpuRentalStatus",
    derive = "PartialEq",
    doc = "Whole GPUs rented by the namespace's tenant for a fixed time, billed per started hour.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.count"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.gpuModel"),
    printcolumn(name = "Ends", type_ = "date", json_path = ".status.endTime", description = "When the rental ends"),
    printcolumn(name = "Cost", type_ = "string", json_path = ".status.amount", description = "Amount billed so far"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.hours) != has(self.endTime)")
    .message("set exactly one of hours or endTime"))]
#[x_kube(validation = Rule::new("!has(self.startTime) || !has(self.endTime) || self.endTime > self.startTime")
    .message("endTime must be after startTime"))]
#[x_kube(validation = Rule::new("self.gpuModel == oldSelf.gpuModel && self.count == oldSelf.count")
    .message("gpuModel and count cannot change after creation; create a new GpuRental instead"))]
pub struct GpuRentalSpec {
    /// GPU model as the GpuNode inventory names it, e.g. "NVIDIA H100 80GB HBM3".
    #[schemars(length(min = 1, max = 128))]
    pub gpu_model: String,
    /// Whole GPUs to rent. They are exclusive to the tenant: no other workload shares them.
    #[schemars(range(min = 1, max = 64))]
    pub count: i32,
    /// Length of the rental in hours. Exactly one of hours and endTime is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8760))]
    pub hours: Option<i32>,
    /// When the rental ends. Exactly one of hours and endTime is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// When the rental should start; unset means as soon as the GPUs are free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
}

/// Observed state of a GpuRental, written by the controller.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuRentalStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Active, Expired or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RentalPhase>,
    /// Why the rental is in its phase (e.g. why it is still pending or why it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The GPUs held for the tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assigned_gpus: Vec<AssignedGpu>,
    /// When the GPUs were handed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the rental ends (or ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// GPU-hours billed so far: GPUs x started hours.
    #[serde(default)]
    pub billed_hours: i64,
    /// Price of one GPU-hour, decimal string, e.g. "2.49".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_gpu_hour: Option<String>,
    /// Amount billed so far, decimal string with the currency, e.g. "19.92 USD".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// `Ready` (GPUs handed over) and `Degraded` (an assigned GPU became unhealthy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// Lifecycle of a rental.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RentalPhase {
    /// Waiting for its start time or for free GPUs.
    Pending,
    /// GPUs handed over; billing runs.
    Active,
    /// Ended; GPUs returned to the pool.
    Expired,
    /// Could not be served (e.g. no such GPU model in the fleet).
    Failed,
}

/// One GPU held by a rental.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AssignedGpu {
    /// GpuNode name.
    pub node: String,
    /// NVML index on that node.
    pub index: i32,
    /// NVML UUID.
    pub uuid: String,
}
