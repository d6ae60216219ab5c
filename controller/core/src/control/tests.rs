use super::*;

fn spec(max_replicas: u32, keep_s: f64) -> DeploymentSpec {
    DeploymentSpec {
        cpu_milli: 1000,
        memory_mib: 1024,
        gpu: GpuDemand::Memory(8 * 1024),
        gpu_models: Vec::new(),
        scaling: ScalingConfig { target_concurrency: 2.0, max_replicas, ..ScalingConfig::default() },
        keep_alive: KeepAlivePolicy::Fixed(keep_s),
        keep_alive_cap_s: f64::INFINITY,
        model_uri: "file:///m.safetensors".into(),
        weights_bytes: 1 << 30,
        max_concurrency: 2,
        rental: None,
    }
}

fn node(name: &str, gpus: usize) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        cpu_milli: 64_000,
        memory_mib: 512 * 1024,
        gpu_model: "h100-80gb".into(),
        gpu_memory_mib: 80 * 1024,
        gpu_healthy: vec![true; gpus],
        labels: Vec::new(),
    }
}

fn control() -> Control {
    let mut c = Control::new(Policy::Kiln, ColdStartModel::default(), Prices::default());
    c.node_up(&node("a", 2), &[]).unwrap();
    c.node_up(&node("b", 2), &[]).unwrap();
    c
}

fn starts(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { replica, node, .. } => Some((replica.clone(), node.clone())),
            Action::Stop { .. } => None,
        })
        .collect()
}

pub(super) fn stops(actions: &[Action]) -> Vec<(String, StopReason)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { replica, reason, .. } => Some((replica.clone(), *reason)),
            Action::Start { .. } => None,
        })
        .collect()
}

#[test]
fn a_request_at_zero_starts_one_replica_at_once_and_is_routed_when_it_is_ready() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(4, 60.0), 0.0);
    assert!(c.reconcile(0.0).is_empty(), "minReplicas 0 and no traffic: nothing runs");
    assert!(c.arrive("ns/m", 1.0));
    assert_eq!(c.route("ns/m", 0.0), Route::Wait);
    let started = starts(&c.reconcile(1.0));
    assert_eq!(started.len(), 1, "the first waiting request starts a replica in the same reconcile");
    assert_eq!(c.status("ns/m").unwrap().starting, 1);
    assert!(c.reconcile(1.1).is_empty(), "a starting replica is not started twice");
    assert_eq!(c.route("ns/m", 0.0), Route::Wait, "not ready yet");
    assert_eq!(c.replica_ready(&started[0].0, 0.0), Some("ns/m"));
    assert_eq!(c.route("ns/m", 0.0), Route::Replica { replica: started[0].0.clone(), node: started[0].1.clone() });
    let s = c.status("ns/m").unwrap();
    assert_eq!((s.ready, s.in_flight, s.waiting), (1, 1, 0));
    assert_eq!(c.route("ns/unknown", 0.0), Route::Unknown);
    assert!(!c.arrive("ns/unknown", 1.0));
}

#[test]
fn a_burst_beyond_the_slots_scales_out_at_once_spread_over_nodes_and_within_the_maximum() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(3, 60.0), 0.0);
    c.arrive("ns/m", 0.0);
    let first = starts(&c.reconcile(0.0));
    c.replica_ready(&first[0].0, 0.0);
    assert!(matches!(c.route("ns/m", 0.0), Route::Replica { .. }));
    // Nine more: two slots per replica, so five replicas would be needed; three is the maximum.
    for _ in 0..9 {
        c.arrive("ns/m", 0.5);
    }
    assert!(matches!(c.route("ns/m", 0.0), Route::Replica { .. }), "the second slot of the first replica");
    assert_eq!(c.route("ns/m", 0.0), Route::Wait);
    let more = starts(&c.reconcile(0.5));
    assert_eq!(more.len(), 2, "up to maxReplicas at once");
    let nodes: Vec<&str> = std::iter::once(first[0].1.as_str()).chain(more.iter().map(|(_, n)| n.as_str())).collect();
    assert!(nodes.contains(&"a") && nodes.contains(&"b"), "replicas spread over both nodes: {nodes:?}");
    for (r, _) in &more {
        c.replica_ready(r, 0.0);
    }
    let mut routed = 0;
    while let Route::Replica { .. } = c.route("ns/m", 0.0) {
        routed += 1;
    }
    assert_eq!(routed, 4, "two free slots on each new replica");
    let status = c.status("ns/m").unwrap();
    assert_eq!((status.ready, status.in_flight, status.waiting, status.desired), (3, 6, 4, 3));
}

#[test]
fn least_loaded_ready_replica_takes_the_next_request() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 60.0), 0.0);
    for _ in 0..3 {
        c.arrive("ns/m", 0.0);
    }
    let started = starts(&c.reconcile(0.0));
    assert_eq!(started.len(), 2);
    c.replica_ready(&started[0].0, 0.0);
    c.replica_ready(&started[1].0, 0.0);
    let mut on: HashMap<String, u32> = HashMap::new();
    for _ in 0..3 {
        let Route::Replica { replica, .. } = c.route("ns/m", 0.0) else { panic!("a free slot") };
        *on.entry(replica).or_default() += 1;
    }
    let mut counts: Vec<u32> = on.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![1, 2]);
    let busiest = on.iter().find(|(_, n)| **n == 2).unwrap().0.clone();
    c.finish("ns/m", &busiest, 1.0);
    c.finish("ns/m", &busiest, 1.0);
    c.arrive("ns/m", 1.0);
    assert_eq!(
        c.route("ns/m", 0.0),
        Route::Replica { replica: busiest.clone(), node: c.replica(&busiest).unwrap().node.clone() }
    );
}

#[test]
fn an_idle_deployment_keeps_its_replica_for_the_keep_alive_then_scales_to_zero() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 30.0), 0.0);
    c.arrive("ns/m", 0.0);
    let started = starts(&c.reconcile(0.0));
    c.replica_ready(&started[0].0, 0.0);
    let Route::Replica { replica, .. } = c.route("ns/m", 0.0) else { panic!("ready") };
    c.finish("ns/m", &replica, 2.0);
    assert!(c.reconcile(20.0).is_empty(), "within the keep-alive the replica stays");
    assert!(c.reconcile(31.0).is_empty(), "30 s after it became idle, not after it started");
    assert_eq!(stops(&c.reconcile(32.5)), vec![(replica, StopReason::KeepAliveExpired)]);
    let s = c.status("ns/m").unwrap();
    assert_eq!((s.ready, s.starting, s.desired), (0, 0, 0));
    assert_eq!(c.gpu_milli().0, 0, "the GPU share is released");
}

#[test]
fn min_replicas_are_kept_without_traffic() {
    let mut c = control();
    let mut s = spec(4, 1.0);
    s.scaling.min_replicas = 2;
    c.upsert_deployment("ns/m", s, 0.0);
    assert_eq!(starts(&c.reconcile(0.0)).len(), 2);
    assert!(c.reconcile(1000.0).is_empty());
}

#[test]
fn a_lost_node_frees_its_replicas_and_they_are_replaced_on_another_node() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 600.0), 0.0);
    c.arrive("ns/m", 0.0);
    let started = starts(&c.reconcile(0.0));
    let (replica, on) = started[0].clone();
    c.replica_ready(&replica, 0.0);
    assert!(matches!(c.route("ns/m", 0.0), Route::Replica { .. }));
    assert_eq!(c.node_lost(&on), vec![replica.clone()]);
    // The request on it fails at the gateway and is retried: still demand.
    c.finish("ns/m", &replica, 1.0);
    c.arrive("ns/m", 1.0);
    let replaced = starts(&c.reconcile(1.0));
    assert_eq!(replaced.len(), 1);
    assert_ne!(replaced[0].1, on, "not on the lost node");
    // The node comes back reporting the old replica: it is an orphan now, and is stopped.
    let back = c.node_up(&node(&on, 2), std::slice::from_ref(&replica)).unwrap();
    assert_eq!(stops(&back), vec![(replica, StopReason::Orphan)]);
}

#[test]
fn a_re_registering_agent_that_lost_a_replica_frees_its_slot() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 600.0), 0.0);
    c.arrive("ns/m", 0.0);
    let (replica, on) = starts(&c.reconcile(0.0))[0].clone();
    assert_eq!(c.gpu_milli().0, 100);
    assert!(c.node_up(&node(&on, 2), &[]).unwrap().is_empty());
    assert!(c.replica(&replica).is_none());
    assert_eq!(starts(&c.reconcile(0.1)).len(), 1, "the waiting request gets a new replica");
}

#[test]
fn replicas_on_a_gpu_that_turns_unhealthy_are_stopped_and_replaced_elsewhere() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(1, 600.0), 0.0);
    c.arrive("ns/m", 0.0);
    let started = starts(&c.reconcile(0.0));
    let (replica, on) = started[0].clone();
    let gpu = c.replica(&replica).unwrap().gpus[0];
    c.gpu_health(&on, gpu, false);
    let actions = c.reconcile(1.0);
    assert_eq!(stops(&actions), vec![(replica.clone(), StopReason::GpuUnhealthy)]);
    let again = starts(&actions);
    assert_eq!(again.len(), 1);
    let moved = c.replica(&again[0].0).unwrap();
    assert!(moved.node != on || moved.gpus[0] != gpu, "not on the unhealthy GPU");
}

#[test]
fn an_unschedulable_deployment_says_why_and_is_retried() {
    let mut c = control();
    let mut s = spec(1, 60.0);
    s.gpu = GpuDemand::Whole(4);
    c.upsert_deployment("ns/big", s, 0.0);
    c.arrive("ns/big", 0.0);
    assert!(c.reconcile(0.0).is_empty());
    let why = c.status("ns/big").unwrap().unschedulable.unwrap().to_string();
    assert!(why.contains("4 whole GPU(s)"), "{why}");
    c.node_up(&node("c", 8), &[]).unwrap();
    assert_eq!(starts(&c.reconcile(1.0)), vec![(starts_name(&c), "c".to_owned())]);
    assert_eq!(c.status("ns/big").unwrap().unschedulable, None);

    let mut s = spec(1, 60.0);
    s.gpu_models = vec!["b200".into()];
    c.upsert_deployment("ns/b200", s, 0.0);
    c.arrive("ns/b200", 0.0);
    assert!(c.reconcile(2.0).is_empty());
    let why = c.status("ns/b200").unwrap().unschedulable.unwrap().to_string();
    assert!(why.contains("b200"), "{why}");
}

fn starts_name(c: &Control) -> String {
    c.replicas().find(|(_, r)| r.deployment == "ns/big").map(|(id, _)| id.to_owned()).unwrap_or_default()
}

#[test]
fn the_node_that_caches_the_weights_is_preferred_and_reported() {
    let mut c = control();
    c.set_cached("b", vec![Cached { model_uri: "file:///m.safetensors".into(), tier: CacheTier::HostRam }]);
    c.upsert_deployment("ns/m", spec(1, 60.0), 0.0);
    c.arrive("ns/m", 0.0);
    let actions = c.reconcile(0.0);
    let Some(Action::Start { node, cached, .. }) = actions.first() else { panic!("a start: {actions:?}") };
    assert_eq!((node.as_str(), *cached), ("b", Some(CacheTier::HostRam)));
}

#[test]
fn deleting_a_deployment_stops_its_replicas_and_frees_the_gpus() {
    let mut c = control();
    let mut s = spec(4, 60.0);
    s.scaling.min_replicas = 2;
    c.upsert_deployment("ns/m", s, 0.0);
    assert_eq!(starts(&c.reconcile(0.0)).len(), 2);
    c.remove_deployment("ns/m");
    let stopped = stops(&c.reconcile(1.0));
    assert_eq!(stopped.len(), 2);
    assert!(stopped.iter().all(|(_, r)| *r == StopReason::Deleted));
    assert_eq!(c.gpu_milli().0, 0);
}

#[test]
fn adaptive_keep_alive_is_capped_by_the_deployment() {
    let mut c = control();
    let mut s = spec(1, 0.0);
    s.keep_alive = KeepAlivePolicy::Adaptive(crate::autoscale::keepalive::AdaptiveConfig::default());
    s.keep_alive_cap_s = 5.0;
    c.upsert_deployment("ns/m", s, 0.0);
    c.arrive("ns/m", 0.0);
    let (replica, _) = starts(&c.reconcile(0.0))[0].clone();
    c.replica_ready(&replica, 0.0);
    assert!(matches!(c.route("ns/m", 0.0), Route::Replica { .. }));
    c.finish("ns/m", &replica, 1.0);
    assert!(c.reconcile(5.5).is_empty(), "the break-even fallback alone would keep it much longer");
    assert_eq!(stops(&c.reconcile(6.5)), vec![(replica, StopReason::KeepAliveExpired)]);
}

#[test]
fn a_cordoned_node_keeps_its_replicas_and_takes_no_new_ones_until_uncordoned() {
    let mut c = control();
    let mut s = spec(4, 60.0);
    s.scaling.min_replicas = 1;
    c.upsert_deployment("ns/m", s, 0.0);
    let (first, on) = starts(&c.reconcile(0.0))[0].clone();
    c.set_cordoned(&on, true);
    // A re-registration does not undo the cordon.
    c.node_up(&node(&on, 2), std::slice::from_ref(&first)).unwrap();
    let other = if on == "a" { "b" } else { "a" };
    c.set_cordoned(other, true);
    let mut s = spec(4, 60.0);
    s.scaling.min_replicas = 2;
    c.upsert_deployment("ns/m", s.clone(), 1.0);
    assert!(c.reconcile(1.0).is_empty(), "both nodes cordoned: nothing new is placed");
    assert!(c.replica(&first).is_some(), "what runs stays");
    assert!(c.status("ns/m").unwrap().unschedulable.is_some());
    c.set_cordoned(other, false);
    assert_eq!(starts(&c.reconcile(2.0)), vec![(starts_after(&c, &first), other.to_owned())]);
}

fn starts_after(c: &Control, first: &str) -> String {
    c.replicas().map(|(id, _)| id.to_owned()).find(|id| id != first).unwrap_or_default()
}

#[test]
fn a_periodic_deployment_is_released_then_prewarmed_before_its_next_request() {
    // Two whole GPUs of 140 GB weights at $3 per GPU-hour, requests every 30 minutes: holding the GPUs idle costs
    // more than a load, so the adaptive plan releases them and pre-warms.
    let prices = Prices { gpu_usd_per_hour: 3.0, wait_usd_per_s: 0.05 };
    let mut c = Control::new(Policy::Kiln, ColdStartModel::default(), prices);
    c.node_up(&node("a", 2), &[]).unwrap();
    c.node_up(&node("b", 2), &[]).unwrap();
    let mut s = spec(1, 0.0);
    s.gpu = GpuDemand::Whole(2);
    s.weights_bytes = 140 << 30;
    s.keep_alive = KeepAlivePolicy::Adaptive(crate::autoscale::keepalive::AdaptiveConfig::default());
    c.upsert_deployment("ns/big", s, 0.0);
    let mut t = 0.0;
    let mut last_finish = 0.0;
    for i in 0..30 {
        t = f64::from(i) * 1800.0 + f64::from(i % 5) * 4.0;
        c.arrive("ns/big", t);
        for a in c.reconcile(t) {
            if let Action::Start { replica, .. } = a {
                c.replica_ready(&replica, 0.0);
            }
        }
        let Route::Replica { replica, .. } = c.route("ns/big", 0.0) else { panic!("ready at {t}") };
        last_finish = t + 1.0;
        c.finish("ns/big", &replica, last_finish);
        c.reconcile(last_finish + 0.5);
    }
    assert!(t > 0.0);
    assert_eq!(c.status("ns/big").unwrap().ready, 0, "released right after the request");
    let mut prewarmed_at = None;
    let mut stopped_at = None;
    let mut now = last_finish + 1.0;
    while now < last_finish + 3600.0 {
        for a in c.reconcile(now) {
            match a {
                Action::Start { replica, .. } => {
                    prewarmed_at.get_or_insert(now - last_finish);
                    c.replica_ready(&replica, 0.0);
                }
                Action::Stop { reason, .. } => {
                    assert_eq!(reason, StopReason::KeepAliveExpired);
                    stopped_at.get_or_insert(now - last_finish);
                }
            }
        }
        now += 5.0;
    }
    let started = prewarmed_at.expect("a pre-warm");
    assert!(started > 1500.0 && started < 1800.0, "a load time before the next request: {started}");
    let stopped = stopped_at.expect("the pre-warmed replica is released when nobody came");
    assert!(stopped > 1800.0 && stopped < 3000.0, "{stopped}");
}

fn missing_file() -> StartFailure {
    StartFailure { reason: "ModelNotFound".into(), message: "no such file".into(), retryable: true }
}

#[test]
fn failed_starts_back_off_exponentially_and_waiting_requests_fail_with_the_reason() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 60.0), 0.0);
    c.arrive("ns/m", 0.0);
    let first = starts(&c.reconcile(0.0));
    assert_eq!(first.len(), 1);
    assert!(c.failing("ns/m", 0.1).is_none(), "starting: the request waits");
    assert!(c.replica_failed(&first[0].0, missing_file(), 0.5).is_some());
    assert_eq!(c.failing("ns/m", 0.6).map(|f| f.reason.as_str()), Some("ModelNotFound"), "waiting requests fail");
    assert!(c.reconcile(1.0).is_empty(), "in backoff: no start, although a request waits");
    let status = c.status("ns/m").unwrap();
    let f = status.failure.expect("the failure is on record");
    assert_eq!(f.consecutive, 1);
    assert!((9.5..=11.5).contains(&f.retry_at), "10 s ± 10% after the failure: {}", f.retry_at);
    // Each failure doubles the wait (±10%), up to five minutes; count the starts over ten minutes of demand.
    let (mut t, mut attempts, mut last_retry) = (1.0, 1, f.retry_at);
    let mut gaps = Vec::new();
    while t < 600.0 {
        let started = starts(&c.reconcile(t));
        if let Some((r, _)) = started.first() {
            attempts += 1;
            gaps.push(t - last_retry);
            c.replica_failed(r, missing_file(), t);
            last_retry = c.status("ns/m").unwrap().failure.unwrap().retry_at;
        }
        t += 0.5;
    }
    assert!(gaps.iter().all(|g| *g < 0.6), "each retry comes at its time: {gaps:?}");
    // 10 + 20 + 40 + 80 + 160 = 310 s, then 300 s steps: 6 or 7 attempts in 600 s, never a tight loop.
    assert!((5..=7).contains(&attempts), "attempts: {attempts}");
    let f = c.status("ns/m").unwrap().failure.unwrap();
    assert!(f.retry_at - t <= BACKOFF_MAX_S * 1.1, "capped at five minutes");
    assert!(c.failing("ns/m", t).is_some());
}

#[test]
fn a_retry_that_succeeds_clears_the_failure_and_the_backoff_resets_after_a_while_ready() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 1e9), 0.0);
    c.arrive("ns/m", 0.0);
    let r1 = starts(&c.reconcile(0.0));
    c.replica_failed(&r1[0].0, missing_file(), 0.0);
    let retry_at = c.status("ns/m").unwrap().failure.unwrap().retry_at;
    assert!(c.failing("ns/m", retry_at).is_none(), "the backoff is over: the request waits for a retry");
    let r2 = starts(&c.reconcile(retry_at));
    assert_eq!(r2.len(), 1, "one retry");
    c.replica_ready(&r2[0].0, 0.0);
    assert!(c.status("ns/m").unwrap().failure.is_none(), "a ready replica: no longer degraded");
    assert!(matches!(c.route("ns/m", 0.0), Route::Replica { .. }));
    // A second failure soon after: the backoff continues (20 s), ...
    c.reconcile(20.0);
    let exited = StartFailure { reason: "Exited".into(), message: "exit code 1".into(), retryable: true };
    let (_, counted) = c.replica_exited(&r2[0].0, exited.clone(), 30.0).unwrap();
    assert!(counted, "an exit 30 s after the start is a failed start");
    let f = c.status("ns/m").unwrap().failure.unwrap();
    assert_eq!(f.consecutive, 2, "an early exit counts as a failed start");
    assert!((30.0 + 18.0..=30.0 + 22.0).contains(&f.retry_at), "{}", f.retry_at);
    // ... but after ten minutes of serving it starts again from 10 s.
    let r3 = starts(&c.reconcile(f.retry_at));
    c.replica_ready(&r3[0].0, 0.0);
    c.reconcile(f.retry_at + 1.0);
    c.reconcile(f.retry_at + 1.0 + BACKOFF_RESET_S);
    c.replica_failed(&r3[0].0, missing_file(), f.retry_at + 2.0 + BACKOFF_RESET_S);
    let f = c.status("ns/m").unwrap().failure.unwrap();
    assert_eq!(f.consecutive, 1);
    // A replica that exits after serving longer than that is replaced without a failure.
    let r4 = starts(&c.reconcile(f.retry_at));
    c.replica_ready(&r4[0].0, 0.0);
    let (_, counted) = c.replica_exited(&r4[0].0, exited, f.retry_at + BACKOFF_RESET_S + 1.0).unwrap();
    assert!(!counted);
    assert!(c.status("ns/m").unwrap().failure.is_none());
}

#[test]
fn a_failure_no_retry_can_fix_waits_for_a_new_spec_or_a_changed_file() {
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 60.0), 0.0);
    c.arrive("ns/m", 0.0);
    let r = starts(&c.reconcile(0.0));
    let invalid = StartFailure { reason: "InvalidWeights".into(), message: "not safetensors".into(), retryable: false };
    c.replica_failed(&r[0].0, invalid, 0.0);
    assert!(c.reconcile(1800.0).is_empty(), "no retry within the hour");
    assert_eq!(c.failed_deployments().map(|(k, _, _)| k).collect::<Vec<_>>(), ["ns/m"]);
    c.retry_now("ns/m", 1800.0);
    assert!(c.failing("ns/m", 1800.0).is_none(), "the file changed: requests wait for a retry");
    assert_eq!(starts(&c.reconcile(1800.0)).len(), 1);
    // A new spec clears everything.
    let mut c = control();
    c.upsert_deployment("ns/m", spec(2, 60.0), 0.0);
    c.arrive("ns/m", 0.0);
    let r = starts(&c.reconcile(0.0));
    c.replica_failed(&r[0].0, missing_file(), 0.0);
    c.upsert_deployment("ns/m", spec(3, 60.0), 1.0);
    assert!(c.status("ns/m").unwrap().failure.is_none());
    assert_eq!(starts(&c.reconcile(1.0)).len(), 1, "the new spec starts at once");
}

#[test]
fn the_unschedulable_reason_names_the_resource_that_binds() {
    let mut c = Control::new(Policy::Kiln, ColdStartModel::default(), Prices::default());
    let mut small = node("a", 8);
    small.cpu_milli = 2000;
    c.node_up(&small, &[]).unwrap();
    c.upsert_deployment("ns/m", spec(8, 60.0), 0.0);
    for _ in 0..8 {
        c.arrive("ns/m", 0.0);
    }
    c.reconcile(0.0);
    let reason = c.status("ns/m").unwrap().unschedulable.expect("two 1-CPU replicas fill a 2-CPU node");
    assert_eq!(reason.binding(), Some(Resource::Cpu));
    let why = reason.to_string();
    assert_eq!(
        why,
        "no schedulable node has room for a replica (8192 MiB of GPU memory, 1 CPU and 1024 MiB of host memory): \
         1 node(s) lack free CPU (most free: 0 CPU of the 1 CPU needed)"
    );
    assert!(why.contains("1 node(s) lack free CPU (most free: 0 CPU of the 1 CPU needed)"), "{why}");
    assert!(!why.contains("GPU ("), "GPUs are free: {why}");
}

#[test]
fn an_idle_deployment_is_not_scaled_up_by_averages_that_lag_behind_its_demand() {
    let mut c = control();
    let mut s = spec(4, 600.0);
    s.max_concurrency = 8;
    c.upsert_deployment("ns/m", s, 0.0);
    for _ in 0..6 {
        c.arrive("ns/m", 0.0);
    }
    let started = starts(&c.reconcile(0.0));
    assert_eq!(started.len(), 1, "one replica takes all six");
    let id = started[0].0.clone();
    c.replica_ready(&id, 0.0);
    for _ in 0..6 {
        assert!(matches!(c.route("ns/m", 0.0), Route::Replica { .. }));
    }
    for _ in 0..6 {
        c.finish("ns/m", &id, 5.0);
    }
    // Six in flight for 4 s of the 6 s panic window: the averages want two replicas, but nothing is left to serve.
    assert!(starts(&c.reconcile(5.5)).is_empty(), "no start while nothing is in flight or waiting");
    assert_eq!(c.status("ns/m").unwrap().desired, 1);
    // The next request scales up at once.
    c.arrive("ns/m", 6.0);
    assert!(matches!(c.route("ns/m", 0.0), Route::Replica { .. }));
    assert!(!starts(&c.reconcile(6.0)).is_empty(), "demand again: the averages decide");
}
