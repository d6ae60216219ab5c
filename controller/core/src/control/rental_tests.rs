//! Rentals and metering in the control loop, on hand-made timelines. The loop's clock and the wall clock differ by
//! `WALL` so that a mix-up of the two shows.

use super::{tests::stops, *};
use crate::rental::{RentalEvent, RentalPhase, RentalSpec};

/// Wall-clock seconds at loop time 0 (2026-11-26T08:00:00Z).
const WALL: f64 = 1_795_680_000.0;
const H: f64 = 3600.0;

fn whole(max_replicas: u32, rental: Option<&str>) -> DeploymentSpec {
    DeploymentSpec {
        cpu_milli: 1000,
        memory_mib: 1024,
        gpu: GpuDemand::Whole(1),
        gpu_models: Vec::new(),
        scaling: ScalingConfig { target_concurrency: 1.0, max_replicas, ..ScalingConfig::default() },
        keep_alive: KeepAlivePolicy::Fixed(60.0),
        keep_alive_cap_s: f64::INFINITY,
        model_uri: "file:///m.safetensors".into(),
        weights_bytes: 1 << 30,
        max_concurrency: 1,
        rental: rental.map(str::to_owned),
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

fn rental(count: u32, start: Option<f64>, hours: u32, lend: bool) -> RentalSpec {
    RentalSpec {
        namespace: "t".into(),
        name: "r".into(),
        gpu_model: "h100-80gb".into(),
        gpu_count: count,
        start_time: start,
        hours: Some(hours),
        end_time: None,
        cancel: false,
        lend_when_idle: lend,
    }
}

fn control(nodes: &[(&str, usize)]) -> Control {
    let mut c = Control::new(Policy::Kiln, ColdStartModel::default(), Prices::default());
    c.set_metering(true);
    for (name, gpus) in nodes {
        c.node_up(&node(name, *gpus), &[]).unwrap();
    }
    c
}

/// Steps rentals and reconciles at loop time `t`; returns the rental events and all actions.
fn tick(c: &mut Control, t: f64) -> (Vec<RentalEvent>, Vec<Action>) {
    let step = c.step_rentals(t, WALL + t, true);
    let mut actions = step.actions;
    actions.extend(c.reconcile(t));
    (step.events.into_iter().map(|(_, e)| e).collect(), actions)
}

fn phases(events: &[RentalEvent]) -> Vec<RentalPhase> {
    events.iter().filter_map(|e| if let RentalEvent::PhaseChanged { to, .. } = e { Some(*to) } else { None }).collect()
}

fn started(actions: &[Action]) -> Vec<(String, String, Vec<u32>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { replica, node, gpus, .. } => Some((replica.clone(), node.clone(), gpus.clone())),
            Action::Stop { .. } => None,
        })
        .collect()
}

/// Requests arrive for `key` at `t` and its replicas are started and made ready; returns their ids.
fn serve(c: &mut Control, key: &str, requests: usize, t: f64) -> Vec<String> {
    for _ in 0..requests {
        c.arrive(key, t);
    }
    let ids: Vec<String> = started(&c.reconcile(t)).into_iter().map(|(id, ..)| id).collect();
    for id in &ids {
        c.replica_ready(id, t);
    }
    for _ in 0..requests {
        c.route(key, t);
    }
    ids
}

#[test]
fn metered_spans_cover_a_replicas_life_once_phase_by_phase() {
    let mut c = control(&[("a", 1)]);
    let mut spec = whole(1, None);
    spec.gpu = GpuDemand::Share(250);
    c.upsert_deployment("ns/m", spec, 0.0);
    c.arrive("ns/m", 0.0);
    let id = started(&c.reconcile(0.0))[0].0.clone();
    c.replica_ready(&id, 10.0);
    assert!(matches!(c.route("ns/m", 15.0), Route::Replica { .. }));
    c.finish("ns/m", &id, 20.0);
    let spans = c.take_held(30.0);
    let got: Vec<(ServerlessPhase, f64, f64)> = spans.iter().map(|s| (s.phase, s.from, s.to)).collect();
    assert_eq!(
        got,
        vec![
            (ServerlessPhase::Loading, 0.0, 10.0),
            (ServerlessPhase::IdleWarm, 10.0, 15.0),
            (ServerlessPhase::Busy, 15.0, 20.0),
            (ServerlessPhase::IdleWarm, 20.0, 30.0),
        ]
    );
    assert!(spans.iter().all(|s| s.share_milli == 250 && s.gpu_model == "h100-80gb" && s.lent_from.is_none()));
    // The open span goes on from the last take; a stop closes it.
    c.reconcile(200.0); // keep-alive (60 s) expired: the replica stops at 200.
    let spans = c.take_held(300.0);
    assert_eq!(
        spans.iter().map(|s| (s.phase, s.from, s.to)).collect::<Vec<_>>(),
        vec![(ServerlessPhase::IdleWarm, 30.0, 200.0)]
    );
    assert!(c.take_held(400.0).is_empty(), "nothing holds GPU any more");
}

#[test]
fn a_future_rental_fences_its_gpus_a_lead_time_before_and_bills_from_delivery() {
    // Two nodes of 2 GPUs; a serverless deployment runs one whole-GPU replica on each node.
    let mut c = control(&[("a", 2), ("b", 2)]);
    c.upsert_deployment("ns/s", whole(4, None), 0.0);
    let ids = serve(&mut c, "ns/s", 2, 0.0);
    assert_eq!(ids.len(), 2);
    // A rental of 2 GPUs starting in 1 h: the fence is 10 min before.
    c.upsert_rental("t/r", rental(2, Some(WALL + H), 1, false), WALL, None);
    let (events, actions) = tick(&mut c, 60.0);
    assert!(events.iter().all(|e| !matches!(e, RentalEvent::Fence { .. })), "{events:?}");
    assert!(stops(&actions).is_empty());
    assert!(c.rental("t/r").unwrap().rental.state.reason.contains("waiting for startTime"));
    // At the fence: both GPUs of one node are taken, the serverless replica there stops, and (both requests still in
    // flight) its deployment gets a replacement on the other node's free GPU.
    let (events, actions) = tick(&mut c, H - 600.0);
    assert!(events.iter().any(|e| matches!(e, RentalEvent::Fence { count: 2, .. })), "{events:?}");
    let fenced = stops(&actions);
    assert_eq!(fenced.len(), 1, "{actions:?}");
    assert_eq!(fenced[0].1, StopReason::Fenced);
    // The fenced replica's GPU-time was its own deployment's, not lent by the rental.
    let spans = c.take_held(H - 600.0);
    assert!(spans.iter().any(|s| s.replica == fenced[0].0 && s.to == H - 600.0), "{spans:?}");
    assert!(spans.iter().all(|s| s.lent_from.is_none()), "{spans:?}");
    let view = c.rental("t/r").unwrap();
    assert_eq!(view.gpus.len(), 2);
    let rented_node = view.gpus[0].0.clone();
    assert!(view.gpus.iter().all(|(n, _)| *n == rented_node), "one node when it fits: {:?}", view.gpus);
    assert_eq!(view.rental.phase(), RentalPhase::Pending);
    let replacement = started(&actions);
    assert_eq!(replacement.len(), 1);
    assert_ne!(replacement[0].1, rented_node, "serverless work is placed off the fenced GPUs");
    // Delivery at the start time: Active, billing from here.
    let (events, _) = tick(&mut c, H);
    assert_eq!(phases(&events), vec![RentalPhase::Active]);
    assert_eq!(c.rental("t/r").unwrap().rental.state.delivered_ms, Some(((WALL + H) * 1000.0) as i64));
    // Nothing else can use the rented GPUs: a third and fourth request find room for one more replica only.
    c.arrive("ns/s", H + 1.0);
    c.arrive("ns/s", H + 1.0);
    let actions = c.reconcile(H + 1.0);
    assert!(started(&actions).iter().all(|(_, n, _)| *n != rented_node));
    assert!(matches!(c.unschedulable("ns/s"), Some(Unschedulable::NoRoom { .. })), "{:?}", c.unschedulable("ns/s"));
}

#[test]
fn a_pinned_deployment_runs_only_on_its_rental_and_stops_when_the_rental_ends() {
    let mut c = control(&[("a", 2)]);
    c.upsert_deployment("t/pinned", whole(2, Some("t/r")), 0.0);
    // Before the rental exists (or is Active) a pinned replica cannot be placed, and the reason names the rental.
    c.arrive("t/pinned", 0.0);
    assert!(started(&c.reconcile(0.0)).is_empty());
    assert!(matches!(c.unschedulable("t/pinned"), Some(Unschedulable::Rental { rental, .. }) if rental == "t/r"));
    c.upsert_rental("t/r", rental(1, None, 1, false), WALL + 1.0, None);
    let (events, actions) = tick(&mut c, 1.0);
    assert_eq!(phases(&events), vec![RentalPhase::Active]);
    let gpu = c.rental("t/r").unwrap().gpus[0].clone();
    let pinned = started(&actions);
    assert_eq!(pinned.len(), 1);
    assert_eq!((pinned[0].1.clone(), pinned[0].2.clone()), (gpu.0.clone(), vec![gpu.1]), "on the rental's GPU");
    c.replica_ready(&pinned[0].0, 5.0);
    assert!(matches!(c.route("t/pinned", 5.0), Route::Replica { .. }));
    // A second request needs a second replica: the rental has one GPU, so it waits, saying why.
    c.arrive("t/pinned", 6.0);
    assert!(started(&c.reconcile(6.0)).is_empty());
    let why = c.unschedulable("t/pinned").unwrap().to_string();
    assert!(why.contains("no room"), "{why}");
    // Serverless work gets the other GPU only.
    c.upsert_deployment("ns/s", whole(2, None), 6.0);
    c.arrive("ns/s", 6.0);
    c.arrive("ns/s", 6.0);
    let s = started(&c.reconcile(6.0));
    assert_eq!(s.len(), 1);
    assert_ne!(s[0].2, vec![gpu.1]);
    // The pinned replica's GPU time is not metered per second (the hour is paid): its spans carry the rental.
    let spans = c.take_held(10.0);
    assert!(spans.iter().filter(|s| s.deployment == "t/pinned").all(|s| s.rental.as_deref() == Some("t/r")));
    // At the end the pinned replica stops, the GPU goes back, and the waiting serverless request gets it.
    let (events, actions) = tick(&mut c, H + 1.0);
    assert_eq!(phases(&events), vec![RentalPhase::Expired]);
    assert!(events.iter().any(|e| matches!(e, RentalEvent::StopWork { .. })));
    assert_eq!(stops(&actions), vec![(pinned[0].0.clone(), StopReason::RentalEnded)]);
    assert_eq!(started(&actions).len(), 1, "the serverless request waiting for room: {actions:?}");
    assert!(c.rental("t/r").unwrap().gpus.is_empty());
}

#[test]
fn an_idle_rental_lends_its_gpus_and_takes_them_back_when_its_owner_needs_them() {
    let mut c = control(&[("a", 1)]);
    c.upsert_deployment("t/pinned", whole(1, Some("t/r")), 0.0);
    c.upsert_rental("t/r", rental(1, None, 2, true), WALL, None);
    tick(&mut c, 0.0);
    assert!(c.rental("t/r").unwrap().lent, "the owner runs nothing: lent");
    // Another tenant's serverless replica borrows the GPU; its spans name the lender.
    c.upsert_deployment("ns/s", whole(1, None), 1.0);
    let borrower = serve(&mut c, "ns/s", 1, 1.0);
    assert_eq!(borrower.len(), 1);
    let spans = c.take_held(11.0);
    assert!(spans.iter().all(|s| s.lent_from.as_deref() == Some("t/r")), "{spans:?}");
    // The owner's request: lending stops, the borrower is reclaimed, the owner's replica starts on the GPU.
    c.arrive("t/pinned", 20.0);
    let (_, actions) = tick(&mut c, 20.0);
    assert_eq!(stops(&actions), vec![(borrower[0].clone(), StopReason::Reclaimed)]);
    // The borrower's last span runs to the reclaim, lent.
    let spans = c.take_held(20.0);
    let last = spans.iter().filter(|s| s.replica == borrower[0]).map(|s| (s.to, s.lent_from.clone())).next_back();
    assert_eq!(last, Some((20.0, Some("t/r".to_owned()))), "{spans:?}");
    let owner = started(&actions);
    assert_eq!(owner.len(), 1, "{actions:?}");
    assert!(owner[0].0.starts_with("t.pinned"));
    assert!(!c.rental("t/r").unwrap().lent);
}

#[test]
fn an_unhealthy_rented_gpu_is_replaced_from_the_pool_at_the_step_that_sees_it() {
    let mut c = control(&[("a", 2), ("b", 2)]);
    c.upsert_rental("t/r", rental(2, None, 4, false), WALL, None);
    tick(&mut c, 0.0);
    let before = c.rental("t/r").unwrap().gpus.clone();
    let (node, gpu) = before[0].clone();
    c.gpu_health(&node, gpu, false);
    let (events, _) = tick(&mut c, 600.0);
    assert!(events.iter().any(|e| matches!(e, RentalEvent::ReplaceGpus { count: 1 })), "{events:?}");
    let after = c.rental("t/r").unwrap().gpus.clone();
    assert_eq!(after.len(), 2);
    assert!(!after.contains(&(node.clone(), gpu)), "the unhealthy GPU was dropped: {after:?}");
    assert!(!c.rental("t/r").unwrap().rental.is_degraded(), "replaced at the step that saw the loss");
}

#[test]
fn a_rented_gpu_that_cannot_be_replaced_is_credited_for_the_time_it_was_lost() {
    let mut c = control(&[("a", 2)]);
    c.upsert_rental("t/r", rental(2, None, 4, false), WALL, None);
    tick(&mut c, 0.0);
    c.gpu_health("a", 1, false);
    tick(&mut c, 100.0);
    assert!(c.rental("t/r").unwrap().rental.is_degraded());
    c.gpu_health("a", 1, true);
    tick(&mut c, 700.0);
    let r = c.rental("t/r").unwrap().rental;
    assert!(!r.is_degraded());
    assert_eq!(r.lost_gpu_ms(), 600_000, "1 GPU lost from 100 s to 700 s");
}

#[test]
fn a_pending_rental_waits_for_the_fleet_to_settle_then_fails_when_it_can_never_fit() {
    let mut c = control(&[("a", 2)]);
    c.upsert_rental("t/r", rental(3, None, 1, false), WALL, None);
    let step = c.step_rentals(0.0, WALL, false);
    assert!(step.events.is_empty());
    assert!(c.rental("t/r").unwrap().rental.state.reason.contains("register"));
    let step = c.step_rentals(1.0, WALL + 1.0, true);
    let events: Vec<RentalEvent> = step.events.into_iter().map(|(_, e)| e).collect();
    assert_eq!(phases(&events), vec![RentalPhase::Failed]);
    assert!(c.rental("t/r").unwrap().rental.state.reason.contains("3 GPUs"));
}

#[test]
fn deleting_an_active_rental_cancels_it_releases_its_gpus_and_forgets_it() {
    let mut c = control(&[("a", 1)]);
    c.upsert_rental("t/r", rental(1, None, 3, false), WALL, None);
    tick(&mut c, 0.0);
    assert_eq!(c.rental("t/r").unwrap().rental.phase(), RentalPhase::Active);
    c.remove_rental("t/r");
    let (events, _) = tick(&mut c, 1.5 * H);
    assert_eq!(phases(&events), vec![RentalPhase::Cancelled]);
    assert!(c.rental("t/r").is_none());
    // The GPU is back in the pool.
    c.upsert_deployment("ns/s", whole(1, None), 1.5 * H);
    assert_eq!(serve(&mut c, "ns/s", 1, 1.5 * H).len(), 1);
}

#[test]
fn a_restored_rental_takes_back_the_gpus_its_status_recorded() {
    let mut c = control(&[("a", 2), ("b", 2)]);
    c.upsert_rental("t/r", rental(1, None, 3, false), WALL, None);
    tick(&mut c, 0.0);
    let view = c.rental("t/r").unwrap();
    let (state, gpus) = (view.rental.state.clone(), view.gpus.clone());
    // A new controller: the same nodes, the rental restored from status. It is still Active on the same GPU.
    let mut c2 = control(&[("a", 2), ("b", 2)]);
    let other = if gpus[0].0 == "a" { ("b".to_string(), 1) } else { ("a".to_string(), 1) };
    c2.upsert_rental("t/r", rental(1, None, 3, false), WALL, Some(RestoredRental { state, gpus: vec![other.clone()] }));
    let (events, _) = tick(&mut c2, 10.0);
    assert!(phases(&events).is_empty(), "no new delivery: {events:?}");
    assert_eq!(c2.rental("t/r").unwrap().gpus, vec![other]);
    assert_eq!(c2.rental("t/r").unwrap().rental.phase(), RentalPhase::Active);
}
