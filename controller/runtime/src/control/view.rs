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

/// The keep-alive's current decision for an idle deployment (what the console shows): keep until, release, or
/// pre-warm at, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepAliveView {
    /// Seconds the deployment has been idle (nothing in flight or waiting).
    pub idle_for_s: f64,
    /// Seconds until its replicas are released (scale to `minReplicas`); `None`: kept.
    pub release_in_s: Option<f64>,
    /// Seconds until a pre-warm starts a replica again, if one is planned.
    pub prewarm_in_s: Option<f64>,
    /// The policy and what made the decision, in words.
    pub why: String,
}

impl super::ControlPlane {
    /// The keep-alive's decision for `key` now; `None` while it has work (or is unknown).
    pub fn keep_alive(&self, key: &str) -> Option<KeepAliveView> {
        use kiln_core::autoscale::keepalive::Policy;
        let now = self.now();
        let state = self.state();
        let (policy, since, plan) = state.core.keep_alive(key)?;
        let spec = state.core.spec(key)?;
        let idle_for_s = (now - since).max(0.0);
        let release_in_s = plan.unload_after.is_finite().then(|| (plan.unload_after - idle_for_s).max(0.0));
        let prewarm_in_s =
            plan.prewarm.filter(|(_, until)| idle_for_s < *until).map(|(at, _)| (at - idle_for_s).max(0.0));
        let capped = plan.unload_after.is_finite() && plan.unload_after >= spec.keep_alive_cap_s;
        let mut why = match policy {
            Policy::Fixed(s) if capped && spec.keep_alive_cap_s < s => {
                format!("fixed {s:.0} s timer, capped by keepAlive.duration ({:.0} s)", spec.keep_alive_cap_s)
            }
            Policy::Fixed(s) => format!("fixed keep-alive: release after {s:.0} s idle"),
            Policy::Adaptive(_) if !plan.unload_after.is_finite() => {
                "adaptive: keeping is cheaper than the expected cold starts".to_owned()
            }
            Policy::Adaptive(_) if capped => format!(
                "adaptive: least expected cost (idle GPU share vs cold starts), capped by keepAlive.duration ({:.0} s)",
                spec.keep_alive_cap_s
            ),
            Policy::Adaptive(_) => format!(
                "adaptive: least expected cost under this deployment's idle times: release after {:.0} s idle",
                plan.unload_after
            ),
        };
        if let Some((at, _)) = plan.prewarm {
            why.push_str(&format!(
                "; pre-warm to be ready {at:.0} s after going idle (the next request is predicted then)"
            ));
        }
        let min = spec.scaling.min_replicas;
        if min > 0 {
            why.push_str(&format!("; minReplicas {min} stay"));
        }
        Some(KeepAliveView { idle_for_s, release_in_s, prewarm_in_s, why })
    }

    /// Whether `node` is cordoned.
    pub fn is_cordoned(&self, node: &str) -> bool {
        self.state().core.is_cordoned(node)
    }
}
