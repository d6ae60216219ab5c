//! What the reconcilers write, computed without I/O (linkerd2's "compute first, write later"): a
//! `ModelDeployment`'s status from the control plane's [`DeploymentView`] (or from why its spec cannot be served),
//! the Events its transitions deserve, and a `GpuNode`'s status from its agent's registration. The reconcilers
//! apply what comes out; tests assert it exactly. This module consumes the control plane's view; it never reads
//! the control plane's state.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kiln_k8s_api::{
    gpu_node::{CachedModel, GpuHealth, GpuInfo, GpuNodeStatus},
    model_deployment::{
        CacheTier, ColdStart, ColdStartPhase, ColdStartPhaseName, DeploymentCounters, DeploymentState,
        ModelDeploymentStatus, ReplicaCounts, ReplicaPlacement, ReplicaState,
    },
};
use kiln_proto::{convert, v1};

use crate::{
    control::{DeploymentView, ReplicaView},
    registry::NodeView,
    spec::SpecError,
    store::Counters,
};

/// An Event to publish: (type is Warning when `warning`), reason, note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    /// Warning rather than Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// What a person needs to know.
    pub note: String,
}

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    // The transition time moves only when the status does.
    let since = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: kind.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Kubernetes keeps times to the second: anything finer would read back different and be written again.
fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn seconds_text(ms: i64) -> String {
    if ms < 10_000 { format!("{:.1}s", ms as f64 / 1000.0) } else { format!("{}s", (ms + 500) / 1000) }
}

/// The API's counters from the control plane's.
fn counters(c: &Counters) -> DeploymentCounters {
    DeploymentCounters {
        requests: c.requests,
        failed_requests: c.failed_requests,
        cold_starts: c.cold_starts,
        failed_starts: c.failed_starts,
    }
}

/// The status to write for a deployment at `generation`, given what is served — the control plane's view, or why
/// the spec cannot be served (then nothing runs) — and the status now on the object.
pub fn deployment_status(
    generation: Option<i64>,
    served: Result<&DeploymentView, &SpecError>,
    previous: Option<&ModelDeploymentStatus>,
    now: Timestamp,
) -> ModelDeploymentStatus {
    let nothing = DeploymentView::default();
    let (view, invalid) = match served {
        Ok(view) => (view, None),
        Err(why) => (&nothing, Some(why.to_string())),
    };
    let failure = view.failure.as_ref().map(|f| (f.reason.clone(), f.message.clone()));
    let now = Time(whole_seconds(now));
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let state = if invalid.is_some() || view.unschedulable.is_some() || failure.is_some() {
        DeploymentState::Degraded
    } else if view.ready > 0 {
        DeploymentState::Ready
    } else if view.loading > 0 {
        DeploymentState::Loading
    } else if view.desired > 0 {
        DeploymentState::Pending
    } else {
        DeploymentState::ScaledToZero
    };
    let (ready_reason, ready_message) = match state {
        DeploymentState::Ready => ("ReplicasReady", format!("{} of {} replicas ready", view.ready, view.desired)),
        DeploymentState::ScaledToZero => ("ScaledToZero", "no replica runs; the next request starts one".to_owned()),
        DeploymentState::Loading => ("Loading", format!("{} replica(s) loading", view.loading)),
        DeploymentState::Pending => ("Pending", "replicas are being placed".to_owned()),
        DeploymentState::Degraded => match (&invalid, &failure) {
            (Some(why), _) => ("InvalidSpec", why.clone()),
            (None, Some((reason, message))) => (reason.as_str(), message.clone()),
            (None, None) => ("Unschedulable", view.unschedulable.clone().unwrap_or_default()),
        },
    };
    // Ready: requests are served without waiting for a placement (true at zero too: a cold start follows).
    let serving = matches!(state, DeploymentState::Ready | DeploymentState::ScaledToZero);
    let mut conditions =
        vec![condition("Ready", serving, ready_reason, ready_message, generation, prev_conditions, &now)];
    let (scheduled, reason, message) = match (&invalid, &view.unschedulable) {
        (Some(why), _) => (false, "InvalidSpec", why.clone()),
        (None, Some(why)) => (false, "Unschedulable", why.clone()),
        (None, None) => (true, "Scheduled", format!("{} replica(s) placed", view.placements.len())),
    };
    conditions.push(condition("Scheduled", scheduled, reason, message, generation, prev_conditions, &now));
    // Degraded: replicas fail to start (the agent's reason and load error); an invalid or unschedulable spec shows
    // in Scheduled instead.
    let (failing, reason, message) = match &failure {
        Some((reason, message)) => (true, reason.as_str(), message.clone()),
        None => (false, "StartsSucceed", "replicas start".to_owned()),
    };
    conditions.push(condition("Degraded", failing, reason, message, generation, prev_conditions, &now));
    let last_cold_start = match &view.last_cold_start {
        Some(record) => {
            let finished = Timestamp::try_from(record.finished_at).unwrap_or_default();
            let ms = (record.seconds * 1000.0).round() as i64;
            let started = finished.checked_sub(k8s_openapi::jiff::SignedDuration::from_millis(ms)).unwrap_or(finished);
            let names = [
                ColdStartPhaseName::Fetch,
                ColdStartPhaseName::Read,
                ColdStartPhaseName::HostToDevice,
                ColdStartPhaseName::Init,
            ];
            Some(ColdStart {
                started_at: Time(whole_seconds(started)),
                duration: seconds_text(ms),
                duration_ms: ms,
                node: record.node.clone(),
                source: record.source.map_or(CacheTier::Remote, CacheTier::from),
                phases: names
                    .into_iter()
                    .zip(record.phases_ms)
                    .map(|(name, ms)| ColdStartPhase { name, duration_ms: i64::try_from(ms).unwrap_or(i64::MAX) })
                    .collect(),
            })
        }
        None => previous.and_then(|p| p.last_cold_start.clone()),
    };
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    ModelDeploymentStatus {
        observed_generation: generation,
        state: Some(state),
        replicas: ReplicaCounts {
            desired: count(view.desired),
            loading: count(view.loading),
            ready: count(view.ready),
            idle: 0,
        },
        placements: view
            .placements
            .iter()
            .map(|r: &ReplicaView| ReplicaPlacement {
                replica: r.id.clone(),
                node: r.node.clone(),
                gpus: r.gpus.iter().map(|&g| i32::try_from(g).unwrap_or(i32::MAX)).collect(),
                state: if r.ready { ReplicaState::Ready } else { ReplicaState::Loading },
            })
            .collect(),
        last_cold_start,
        counters: counters(&view.counters),
        conditions,
    }
}

/// The Events a change of status deserves: only transitions, never a repeat of the same state.
pub fn transitions(previous: Option<&ModelDeploymentStatus>, next: &ModelDeploymentStatus) -> Vec<EventSpec> {
    let mut events = Vec::new();
    let was = previous.and_then(|p| p.state);
    let find = |s: Option<&ModelDeploymentStatus>, kind: &str| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == kind).cloned())
    };
    // A condition turning bad (or bad for another reason) is a Warning; turning good again, a Normal Event.
    let turned = |kind: &str, bad: &str| {
        let (before, after) = (find(previous, kind), find(Some(next), kind));
        let was_bad = before.as_ref().filter(|c| c.status == bad);
        match after {
            Some(c) if c.status == bad && was_bad.is_none_or(|b| b.reason != c.reason) => Some((true, c)),
            Some(c) if c.status != bad && was_bad.is_some() => Some((false, c)),
            _ => None,
        }
    };
    match turned("Scheduled", "False") {
        // An invalid spec's Warning comes from the reconciler's error path, once per distinct error.
        Some((true, c)) if c.reason == "InvalidSpec" => {}
        Some((true, c)) => events.push(EventSpec { warning: true, reason: c.reason, note: c.message }),
        Some((false, _)) => events.push(EventSpec {
            warning: false,
            reason: "Scheduled".into(),
            note: "replicas can be placed again".into(),
        }),
        None => {}
    }
    match turned("Degraded", "True") {
        Some((true, c)) => events.push(EventSpec {
            warning: true,
            reason: c.reason,
            note: format!("a replica failed to start: {}", c.message),
        }),
        Some((false, _)) => events.push(EventSpec {
            warning: false,
            reason: "Recovered".into(),
            note: "a replica started again after failed starts".into(),
        }),
        None => {}
    }
    let cold = |s: &ModelDeploymentStatus| s.last_cold_start.as_ref().map(|c| c.started_at.clone());
    if let Some(c) = &next.last_cold_start
        && cold(next) != previous.and_then(cold)
    {
        let source = match c.source {
            CacheTier::Gpu => "an idle copy in GPU memory",
            CacheTier::Host => "host RAM",
            CacheTier::Disk => "local disk",
            CacheTier::Remote => "the model store",
        };
        events.push(EventSpec {
            warning: false,
            reason: "ColdStart".into(),
            note: format!("cold start took {} on {} (weights from {source})", c.duration, c.node),
        });
    }
    if next.state == Some(DeploymentState::ScaledToZero)
        && matches!(was, Some(DeploymentState::Ready | DeploymentState::Loading))
    {
        events.push(EventSpec {
            warning: false,
            reason: "ScaledToZero".into(),
            note: "idle past its keep-alive: no replica runs; the next request starts one".into(),
        });
    }
    events
}

/// The server-side apply patch that makes sure a registered agent's `GpuNode` exists: `spec: {}` and nothing in it.
///
/// The CRD requires `spec` (kube-derive marks it required), so a patch without one is rejected (`spec: Required
/// value`). An empty map is the right thing to send rather than `spec: {unschedulable: false}`: under server-side
/// apply the field manager then owns the existence of `spec` and no field inside it, so the controller never
/// takes `spec.unschedulable` from the operator who cordons a node (a forced apply of `unschedulable: false` would
/// uncordon it on every pass), and the apiserver's defaulting fills `unschedulable: false` on create. Making `spec`
/// optional in the CRD instead would also fix the write, but Helm never upgrades CRDs in a chart's `crds/`, so
/// clusters installed with the current CRD would keep rejecting it.
pub fn gpu_node_object(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "GpuNode",
        "metadata": { "name": name },
        "spec": {},
    })
}

/// The server-side apply patch of a `GpuNode`'s status subresource.
pub fn gpu_node_status_patch(status: &GpuNodeStatus) -> serde_json::Value {
    serde_json::json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode", "status": status })
}

/// A `GpuNode`'s status from what its agent said; `busy`: GPU indexes holding replicas.
pub fn gpu_node_status(node: &NodeView, busy: &[u32], now: Timestamp) -> GpuNodeStatus {
    let health = |h: v1::GpuHealth| match h {
        v1::GpuHealth::Healthy => GpuHealth::Healthy,
        v1::GpuHealth::Degraded => GpuHealth::Degraded,
        v1::GpuHealth::Unhealthy => GpuHealth::Unhealthy,
        v1::GpuHealth::Unspecified => GpuHealth::Unknown,
    };
    let gpus: Vec<GpuInfo> = node
        .gpus
        .iter()
        .map(|g| GpuInfo {
            index: i32::try_from(g.index).unwrap_or(i32::MAX),
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            memory_mib: i64::try_from(g.memory_bytes >> 20).unwrap_or(i64::MAX),
            health: health(g.health),
            reason: None,
        })
        .collect();
    let healthy = gpus.iter().filter(|g| g.health == GpuHealth::Healthy).count();
    let free = node.gpus.iter().filter(|g| !busy.contains(&g.index) && g.health != v1::GpuHealth::Unhealthy).count();
    let now = Time(whole_seconds(now));
    let ready = Condition {
        type_: "Ready".into(),
        status: if node.ready { "True" } else { "False" }.into(),
        reason: if node.ready { "AgentConnected" } else { "AgentLost" }.into(),
        message: if node.ready {
            "the agent reports".into()
        } else {
            "the agent stopped reporting; its replicas were placed elsewhere".into()
        },
        observed_generation: None,
        last_transition_time: now.clone(),
    };
    GpuNodeStatus {
        gpu_count: i32::try_from(gpus.len()).unwrap_or(i32::MAX),
        free_gpus: i32::try_from(free).unwrap_or(i32::MAX),
        healthy_gpus: i32::try_from(healthy).unwrap_or(i32::MAX),
        gpus,
        cached_models: node
            .cached
            .iter()
            .map(|m| CachedModel {
                uri: m.model_uri.clone(),
                tier: convert::required_tier("CachedModel.tier", m.tier).map_or(CacheTier::Remote, CacheTier::from),
                size_bytes: i64::try_from(m.size_bytes).unwrap_or(i64::MAX),
                gpu: m.gpu_index.map(|g| i32::try_from(g).unwrap_or(i32::MAX)),
            })
            .collect(),
        agent_version: Some(node.versions[0].clone()).filter(|v| !v.is_empty()),
        driver_version: Some(node.versions[1].clone()).filter(|v| !v.is_empty()),
        cuda_version: Some(node.versions[2].clone()).filter(|v| !v.is_empty()),
        simulated: node.simulated,
        last_heartbeat: Some(now),
        conditions: vec![ready],
    }
}

/// The status to write for a rental at `generation` from the control plane's view (`None`: the control plane does not
/// know it yet — the status is left Pending with a message saying so), with the amount billed at
/// `price_per_gpu_hour` when a price is known.
pub fn rental_status(
    generation: Option<i64>,
    view: Option<&crate::control::RentalStatusView>,
    price: Option<&kiln_core::billing::GpuPrice>,
    currency: &str,
    previous: Option<&kiln_k8s_api::GpuRentalStatus>,
    now: Timestamp,
) -> kiln_k8s_api::GpuRentalStatus {
    use kiln_core::rental::RentalPhase as Core;
    use kiln_k8s_api::gpu_rental::{AssignedGpu, RentalPhase};
    let now = Time(whole_seconds(now));
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let Some(v) = view else {
        return kiln_k8s_api::GpuRentalStatus {
            observed_generation: generation,
            phase: Some(RentalPhase::Pending),
            message: Some("not yet seen by the control loop".into()),
            ..previous.cloned().unwrap_or_default()
        };
    };
    let phase = match v.phase {
        Core::Pending => RentalPhase::Pending,
        Core::Active => RentalPhase::Active,
        Core::Expired => RentalPhase::Expired,
        Core::Cancelled => RentalPhase::Cancelled,
        Core::Failed => RentalPhase::Failed,
    };
    let time = |secs: f64| Timestamp::from_second(secs.floor() as i64).ok().map(Time);
    let active = v.phase == Core::Active;
    let mut conditions = vec![condition(
        "Ready",
        active,
        if active { "Delivered" } else { crate::control::phase_name(v.phase) },
        v.message.clone(),
        generation,
        prev,
        &now,
    )];
    conditions.push(condition(
        "Degraded",
        v.degraded,
        if v.degraded { "GpuLost" } else { "AllGpusHealthy" },
        if v.degraded {
            format!("fewer than {} healthy GPUs; the lost GPU-time is credited", v.count)
        } else {
            "every paid GPU is healthy".into()
        },
        generation,
        prev,
        &now,
    ));
    if active {
        conditions.push(condition(
            "ExpiringSoon",
            v.expiring_soon,
            if v.expiring_soon { "EndApproaching" } else { "NotYet" },
            if v.expiring_soon { "the rental ends soon; work is stopped at the end".into() } else { String::new() },
            generation,
            prev,
            &now,
        ));
    }
    let amount = price.and_then(|p| p.rental_per_gpu_hour.checked_mul(i128::from(v.billed_gpu_hours)).ok());
    kiln_k8s_api::GpuRentalStatus {
        observed_generation: generation,
        phase: Some(phase),
        message: Some(v.message.clone()),
        assigned_gpus: v
            .gpus
            .iter()
            .map(|g| AssignedGpu {
                node: g.node.clone(),
                index: i32::try_from(g.index).unwrap_or(0),
                uuid: g.uuid.clone(),
            })
            .collect(),
        lent: v.lent,
        lost_gpu_seconds: (v.lost_gpu_seconds > 0).then_some(v.lost_gpu_seconds),
        lifecycle: Some(v.lifecycle.clone()),
        start_time: v.delivered_at.and_then(time),
        end_time: v.end_at.and_then(time),
        billed_hours: v.billed_gpu_hours,
        price_per_gpu_hour: price.map(|p| p.rental_per_gpu_hour.to_string()),
        amount: amount.map(|a| format!("{a} {currency}")),
        conditions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ColdStartRecord;

    /// An Active rental's status: phase, GPUs, times, billed hours and amount, conditions; applied onto the object it
    /// describes, the whole stays valid against the CRD (schema and CEL rules, as the apiserver checks a status
    /// patch); Degraded and ExpiringSoon follow the view, and the lifecycle reads back.
    #[test]
    fn an_active_rentals_status_is_exact_and_valid_against_the_crd() {
        use kiln_core::{billing::GpuPrice, rental::RentalPhase as Core};
        let view = crate::control::RentalStatusView {
            key: "t/train".into(),
            phase: Core::Active,
            message: "2 GPUs of H100 delivered; billing started".into(),
            gpu_model: "H100".into(),
            count: 2,
            gpus: vec![crate::control::AssignedGpuView { node: "node-a".into(), index: 1, uuid: "GPU-1".into() }],
            delivered_at: Some(1_795_680_000.4),
            end_at: Some(1_795_687_200.0),
            billed_gpu_hours: 2,
            degraded: true,
            expiring_soon: false,
            lent: false,
            lost_gpu_seconds: 0,
            lifecycle: r#"{"phase":"Active"}"#.into(),
        };
        let price = GpuPrice::parse("H100", "0.001", "2.50", "0.5").unwrap();
        let now = Timestamp::from_second(1_795_680_100).unwrap();
        let status = rental_status(Some(3), Some(&view), Some(&price), "USD", None, now);
        assert_eq!(status.phase, Some(kiln_k8s_api::gpu_rental::RentalPhase::Active));
        assert_eq!(status.billed_hours, 2);
        assert_eq!(status.amount.as_deref(), Some("5.00 USD"));
        assert_eq!(status.price_per_gpu_hour.as_deref(), Some("2.50"));
        assert_eq!(status.start_time, Some(Time(Timestamp::from_second(1_795_680_000).unwrap())));
        assert_eq!(status.assigned_gpus[0].uuid, "GPU-1");
        let cond = |t: &str| status.conditions.iter().find(|c| c.type_ == t).map(|c| c.status.as_str());
        assert_eq!(
            (cond("Ready"), cond("Degraded"), cond("ExpiringSoon")),
            (Some("True"), Some("True"), Some("False"))
        );

        let validator = kiln_k8s_api::validate::Validator::default();
        let object = serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuRental",
            "metadata": { "name": "train", "namespace": "t" },
            "spec": { "gpuModel": "H100", "count": 2, "hours": 2 },
        });
        let live = validator.validate_apply(&object, None).unwrap();
        let patch = serde_json::json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuRental",
                                        "metadata": { "name": "train", "namespace": "t" }, "status": status });
        validator.validate_status_apply(&patch, &live).unwrap();
        // Written again a minute later with nothing changed, the conditions keep their transition times.
        let later = rental_status(
            Some(3),
            Some(&view),
            Some(&price),
            "USD",
            Some(&status),
            Timestamp::from_second(1_795_680_160).unwrap(),
        );
        assert_eq!(later, status);
    }

    /// What a real apiserver answered to the `GpuNode` object patch without `spec`, reproduced offline; the patch
    /// sent now is accepted, owns nothing inside `spec`, and its status patch keeps the whole object valid.
    #[test]
    fn the_gpu_node_patches_are_valid_against_the_crd() {
        let validator = kiln_k8s_api::validate::Validator::default();
        let before = serde_json::json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode",
                                         "metadata": { "name": "node-a" } });
        let rejected = validator.validate_apply(&before, None).unwrap_err();
        assert_eq!(rejected.to_string(), r#"GpuNode.kiln.dev "node-a" is invalid: spec: Required value"#);

        let object = gpu_node_object("node-a");
        assert_eq!(object["spec"], serde_json::json!({}), "no field of spec is claimed");
        let live = validator.validate_apply(&object, None).unwrap();
        let node = crate::registry::NodeView {
            name: "node-a".into(),
            ready: true,
            simulated: true,
            gpus: vec![crate::registry::GpuView {
                index: 0,
                uuid: "GPU-0".into(),
                model: "H100".into(),
                memory_bytes: 80 << 30,
                health: v1::GpuHealth::Healthy,
            }],
            replicas: Default::default(),
            cached: Vec::new(),
            versions: Default::default(),
            worker_endpoint: String::new(),
            worker_http1: false,
            cpu_milli: 0,
            host_memory_bytes: 0,
            labels: Vec::new(),
            last_seen: std::time::Instant::now(),
        };
        let status = gpu_node_status(&node, &[0], at(0));
        let stored = validator.validate_status_apply(&gpu_node_status_patch(&status), &live).unwrap();
        assert_eq!(stored["status"]["freeGpus"], 0);
        // The status subresource validates the whole object: without the spec the status could not be written.
        let without_spec = serde_json::json!({ "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuNode",
                                               "metadata": { "name": "node-a" } });
        let rejected = validator.validate_status_apply(&gpu_node_status_patch(&status), &without_spec).unwrap_err();
        assert!(rejected.to_string().ends_with("spec: Required value"), "{rejected}");
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_790_000_000 + s).unwrap()
    }

    fn failure(reason: &str, message: &str) -> kiln_core::control::StartFailure {
        kiln_core::control::StartFailure { reason: reason.into(), message: message.into(), retryable: false }
    }

    fn cold(seconds: f64) -> ColdStartRecord {
        ColdStartRecord {
            deployment: "ns/m".into(),
            replica: "ns.m-1".into(),
            node: "node-a".into(),
            seconds,
            phases_ms: [10, 200, 900, 40],
            source: Some(kiln_core::autoscale::coldstart::Tier::Disk),
            finished_at: std::time::SystemTime::from(at(100)),
        }
    }

    #[test]
    fn states_follow_the_replicas_and_conditions_keep_their_transition_time() {
        let zero = deployment_status(Some(1), Ok(&DeploymentView::default()), None, at(0));
        assert_eq!(zero.state, Some(DeploymentState::ScaledToZero));
        let loading = DeploymentView { desired: 1, loading: 1, ..Default::default() };
        let s1 = deployment_status(Some(1), Ok(&loading), Some(&zero), at(10));
        assert_eq!(s1.state, Some(DeploymentState::Loading));
        assert_eq!(s1.conditions[0].status, "False");
        assert_eq!(s1.conditions[0].last_transition_time, Time(at(10)), "Ready turned False at 10");
        assert_eq!(s1.conditions[1].last_transition_time, Time(at(0)), "Scheduled stayed True since 0");
        let s2 = deployment_status(Some(2), Ok(&loading), Some(&s1), at(20));
        assert_eq!(s2.conditions[0].last_transition_time, Time(at(10)));
        assert_eq!(s2.conditions[0].observed_generation, Some(2));
        let bad = DeploymentView { desired: 1, unschedulable: Some("no room".into()), ..Default::default() };
        let s3 = deployment_status(Some(2), Ok(&bad), Some(&s2), at(30));
        assert_eq!(s3.state, Some(DeploymentState::Degraded));
        assert_eq!((s3.conditions[1].reason.as_str(), s3.conditions[1].message.as_str()), ("Unschedulable", "no room"));
    }

    #[test]
    fn failed_starts_make_the_deployment_degraded_with_one_warning_and_a_recovery() {
        let zero = deployment_status(Some(1), Ok(&DeploymentView::default()), None, at(0));
        let failing = DeploymentView {
            desired: 1,
            failure: Some(failure("ModelNotFound", "/m/x.safetensors: No such file or directory")),
            ..Default::default()
        };
        let s1 = deployment_status(Some(1), Ok(&failing), Some(&zero), at(1));
        assert_eq!(s1.state, Some(DeploymentState::Degraded));
        let degraded = s1.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ModelNotFound"));
        assert_eq!(s1.conditions[0].reason, "ModelNotFound", "Ready says why too");
        assert_eq!(
            transitions(Some(&zero), &s1),
            vec![EventSpec {
                warning: true,
                reason: "ModelNotFound".into(),
                note: "a replica failed to start: /m/x.safetensors: No such file or directory".into()
            }]
        );
        let s2 = deployment_status(Some(1), Ok(&failing), Some(&s1), at(2));
        assert!(transitions(Some(&s1), &s2).is_empty(), "the same failure again: no repeat");
        let other = DeploymentView { failure: Some(failure("InvalidWeights", "bad")), ..failing.clone() };
        let s3 = deployment_status(Some(1), Ok(&other), Some(&s2), at(3));
        assert_eq!(transitions(Some(&s2), &s3).len(), 1, "another reason is news");
        let ready = DeploymentView { desired: 1, ready: 1, ..Default::default() };
        let s4 = deployment_status(Some(1), Ok(&ready), Some(&s3), at(4));
        assert_eq!(s4.state, Some(DeploymentState::Ready));
        let events = transitions(Some(&s3), &s4);
        assert_eq!(events.iter().map(|e| (e.warning, e.reason.as_str())).collect::<Vec<_>>(), [(false, "Recovered")]);
    }

    #[test]
    fn events_come_on_transitions_only() {
        let zero = deployment_status(Some(1), Ok(&DeploymentView::default()), None, at(0));
        assert!(transitions(None, &zero).is_empty(), "appearing at zero is no news");
        let bad = DeploymentView { desired: 1, unschedulable: Some("no room".into()), ..Default::default() };
        let degraded = deployment_status(Some(1), Ok(&bad), Some(&zero), at(1));
        assert_eq!(
            transitions(Some(&zero), &degraded),
            vec![EventSpec { warning: true, reason: "Unschedulable".into(), note: "no room".into() }]
        );
        let again = deployment_status(Some(1), Ok(&bad), Some(&degraded), at(2));
        assert!(transitions(Some(&degraded), &again).is_empty(), "still degraded: no repeat");
        let ready = DeploymentView {
            desired: 1,
            ready: 1,
            placements: vec![ReplicaView {
                id: "ns.m-1".into(),
                deployment: "ns/m".into(),
                node: "node-a".into(),
                gpus: vec![0],
                ready: true,
            }],
            last_cold_start: Some(cold(1.16)),
            ..Default::default()
        };
        let up = deployment_status(Some(1), Ok(&ready), Some(&again), at(3));
        let events = transitions(Some(&again), &up);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].reason, "Scheduled");
        assert_eq!(events[1].note, "cold start took 1.2s on node-a (weights from local disk)");
        let c = up.last_cold_start.as_ref().unwrap();
        assert_eq!((c.duration_ms, c.phases.len(), c.source), (1160, 4, CacheTier::Disk));
        let same = deployment_status(Some(1), Ok(&ready), Some(&up), at(4));
        assert_eq!(same, up, "nothing changed: the same status, so nothing is written");
        let down = deployment_status(Some(1), Ok(&DeploymentView::default()), Some(&up), at(5));
        let events = transitions(Some(&up), &down);
        assert_eq!(events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), ["ScaledToZero"]);
        assert!(down.last_cold_start.is_some(), "the last cold start stays on record");
    }
}
