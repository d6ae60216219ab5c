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
    printcolumn(
        name = "Start",
        type_ = "date",
        json_path = ".status.startTime",
        description = "When the GPUs were delivered"
    ),
    printcolumn(name = "End", type_ = "date", json_path = ".status.endTime", description = "When the rental ends"),
    printcolumn(
        name = "Billed",
        type_ = "integer",
        json_path = ".status.billedHours",
        description = "GPU-hours billed"
    ),
    printcolumn(name = "Amount", type_ = "string", json_path = ".status.amount", description = "Amount billed so far"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.hours) != has(self.endTime)")
    .message("set exactly one of hours or endTime"))]
#[x_kube(validation = Rule::new("!has(self.startTime) || !has(self.endTime) || self.endTime > self.startTime")
    .message("endTime must be after startTime"))]
#[x_kube(validation = Rule::new("self.gpuModel == oldSelf.gpuModel && self.count == oldSelf.count")
    .message("gpuModel and count cannot change after creation; create a new GpuRental instead"))]
#[x_kube(validation = Rule::new("!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)")
    .message("a cancelled rental cannot be resumed; create a new GpuRental instead"))]
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
    /// Cancel the rental: free while Pending (before its GPUs are delivered); once Active every started hour is
    /// billed. Deleting the object cancels it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
    /// While the tenant runs nothing on the rented GPUs, other tenants' serverless replicas may borrow them; they are
    /// reclaimed with a short notice when the tenant's own deployment needs them, and the tenant is credited a share
    /// of the serverless price for the lent GPU-time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lend_when_idle: bool,
}

/// Observed state of a GpuRental, written by the controller.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuRentalStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Active, Expired, Cancelled or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RentalPhase>,
    /// Why the rental is in its phase (e.g. why it is still pending or why it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The GPUs held for the tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assigned_gpus: Vec<AssignedGpu>,
    /// The rented GPUs are lent to serverless work now (lendWhenIdle, and the tenant runs nothing on them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lent: bool,
    /// GPU-time paid for but not delivered (an unhealthy GPU, a lost node), GPU-seconds, credited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_gpu_seconds: Option<i64>,
    /// The controller's lifecycle state, so that a restarted controller resumes the rental where it was (opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<String>,
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
    /// `Ready` (GPUs handed over), `Degraded` (fewer healthy GPUs than paid for) and `ExpiringSoon`.
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
    /// Cancelled by the tenant (the cancel field or deletion).
    Cancelled,
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
