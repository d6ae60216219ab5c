//! What the control plane shows of its deployments and replicas: the [`DeploymentView`] the Kubernetes status is
//! computed from ([`crate::k8s::status`]), the replicas of `GET /v1/deployments` and of the `GpuNode` writer
//! ([`ReplicaView`]), and the cold starts it measured ([`ColdStartRecord`]). Plain data, produced under the control
//! plane's lock and handed out as copies.

use std::time::SystemTime;

use kiln_core::control::StartFailure;

use crate::store::Counters;

/// What the control plane knows of one deployment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentView {
    /// Replicas wanted.
    pub desired: u32,
    /// Starting.
    pub loading: u32,
    /// Ready.
    pub ready: u32,
    /// Why replicas are missing, if they cannot be placed.
    pub unschedulable: Option<String>,
    /// Its replicas.
    pub placements: Vec<ReplicaView>,
    /// The newest cold start.
    pub last_cold_start: Option<ColdStartRecord>,
    /// Predictions run, failed; starts done, failed.
    pub counters: Counters,
    /// Replicas fail to start: the agent's last failure (`ModelNotFound`, ...), until one becomes ready.
    pub failure: Option<StartFailure>,
}

/// One replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    /// Replica id.
    pub id: String,
    /// Deployment (`namespace/name`).
    pub deployment: String,
    /// Node.
    pub node: String,
    /// GPU indexes on the node.
    pub gpus: Vec<u32>,
    /// Ready (otherwise loading).
    pub ready: bool,
}

/// A finished cold start.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdStartRecord {
    /// Deployment.
    pub deployment: String,
    /// Replica.
    pub replica: String,
    /// Node.
    pub node: String,
    /// From the start decision to ready, seconds.
    pub seconds: f64,
    /// The agent's load phases, ms: fetch, read, host-to-device, init.
    pub phases_ms: [u64; 4],
    /// Where the weights came from; `None` when the worker did not say (a process model server).
    pub source: Option<kiln_core::autoscale::coldstart::Tier>,
    /// When the replica became ready.
    pub finished_at: SystemTime,
}
