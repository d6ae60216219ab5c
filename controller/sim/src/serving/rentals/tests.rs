//! Rentals in the serving simulator on hand-made timelines.

use kiln_core::{
    autoscale::keepalive::Policy as KeepAlivePolicy,
    billing::{GpuPrice, PriceTable},
    money::Money,
    rental::{RentalConfig, RentalSpec, RentalSpecError},
};

use super::{RentalOutcome, RentalPlan, RentalPlanError};
use crate::{
    serving::{DeploymentSpec, FleetSpec, KeepAliveChoice, Outcome, SimConfig, Source, simulate},
    traces::{Pattern, TraceRequest, Window},
};

/// 2026-01-01T00:00:00Z.
const EPOCH: f64 = 1_767_225_600.0;
const GBYTES: u64 = 1_000_000_000;

fn one_gpu() -> FleetSpec {
    FleetSpec::parse("h100-80gb:1x1").unwrap()
}

fn prices() -> PriceTable {
    PriceTable::new("USD").with("h100-80gb", GpuPrice::parse("h100-80gb", "0.001", "2.00", "0.5").unwrap())
}

fn spec(name: &str, count: u32, start_s: Option<f64>, hours: u32, lend: bool) -> RentalSpec {
    RentalSpec {
        namespace: "team-a".into(),
        name: name.into(),
        gpu_model: "h100-80gb".into(),
        gpu_count: count,
        start_time: start_s.map(|s| EPOCH + s),
        hours: Some(hours),
        end_time: None,
        cancel: false,
        lend_when_idle: lend,
    }
}

fn plan(fleet: &FleetSpec, rentals: Vec<(RentalSpec, f64, Option<f64>)>) -> Result<RentalPlan, RentalPlanError> {
    RentalPlan::new(rentals, EPOCH, prices(), RentalConfig::default(), fleet)
}

/// A 16 GB model (0.2 of a GPU) with requests at `times`, kept warm `keep_alive` after its last one.
fn run(fleet: &FleetSpec, plan: RentalPlan, times: &[f64], keep_alive: &str, days: f64) -> (Outcome, RentalOutcome) {
    let deps = [DeploymentSpec {
        name: "hand".into(),
        weights_bytes: 16 * GBYTES,
        source: Source::Requests(
            times.iter().map(|&at_s| TraceRequest { at_s, context_tokens: 1024, generated_tokens: 256 }).collect(),
        ),
    }];
    let config = SimConfig { days, rentals: Some(plan), ..SimConfig::default() };
    let choice = KeepAliveChoice::Uniform(KeepAlivePolicy::parse(keep_alive).unwrap());
    let mut out = simulate(&config, fleet, &deps, &choice, &mut |_| {});
    let rentals = out.rentals.take().expect("a run with a plan reports rentals");
    assert_eq!(rentals.billing_error, None);
    (out, rentals)
}

fn money(s: &str) -> Money {
    Money::parse(s).unwrap()
}

#[test]
fn a_fence_stops_the_replica_on_the_rented_gpu_and_the_next_request_is_a_cold_start_it_caused() {
    // One GPU. A 2-hour rental starting at 3600 s, booked at 0: fenced at 3000 (10 min lead).
    // - t=100: cold start (remote store), served; the replica then idles (kept 1 h).
    // - t=3000: the fence takes the GPU: the idle replica is stopped (Fenced). Nowhere else to go.
    // - t=3300: no replica, no GPU: a cold start, caused by the fence; it waits.
    // - t=3600: delivered (Active): billing starts. t=10800: expired, the GPU returns; the request is served.
    let fleet = one_gpu();
    let plan = plan(&fleet, vec![(spec("train", 1, Some(3600.0), 2, false), 0.0, None)]).unwrap();
    let (out, r) = run(&fleet, plan, &[100.0, 3300.0], "fixed:1h", 0.2);
    assert_eq!((out.requests, out.cold_starts), (2, 2));
    assert_eq!((r.fenced_stops, r.reclaimed_stops, r.in_flight_at_stops), (1, 0, 0));
    assert_eq!((r.cold_starts_after_fence, r.cold_starts_after_reclaim), (1, 0));
    let line = &r.rentals[0];
    assert_eq!((line.key.as_str(), line.phase.as_str(), line.delivered_s), ("team-a/train", "Expired", Some(3600.0)));
    // 1 GPU × 2 started hours × $2.00, exactly.
    assert_eq!(line.billed_gpu_hours, 2);
    assert_eq!(line.billed, money("4.00"));
    assert_eq!(r.revenue.rental_hours, money("4.00"));
    assert!((r.rented_gpu_s - 7200.0).abs() < 1e-9);
    assert!((r.rented_share() - 7200.0 / 17_280.0).abs() < 1e-12);
    // Serverless: what the simulator accounted is what the meter billed, at $0.001 per GPU-second.
    let g = out.gpu_seconds;
    let metered = r.serverless_gpu_s;
    for (a, b) in [(g.busy, metered.busy), (g.idle_warm, metered.idle_warm), (g.loading, metered.loading)] {
        assert!((a - b).abs() < 0.01, "simulated {g:?}, metered {metered:?}");
    }
    let micro = (metered.busy + metered.idle_warm + metered.loading) * 1e6;
    assert!((r.revenue.serverless.nanos() as f64 - micro).abs() < 1.0, "{:?}", r.revenue);
    assert_eq!(r.revenue.total, r.revenue.serverless.checked_add(money("4.00")).unwrap(), "{:?}", r.revenue);
    assert_eq!(r.revenue.lending_credits, Money::ZERO);
}

#[test]
fn a_lending_rental_earns_its_owner_a_share_of_what_borrowers_pay() {
    // One GPU rented at once for an hour and lent while idle: the request at 1000 s borrows it (0.2 GPU) and is
    // kept 600 s; the owner is credited half the serverless price of that time. Without lending it waits for the
    // end of the rental.
    let fleet = one_gpu();
    let lend = plan(&fleet, vec![(spec("idle", 1, None, 1, true), 0.0, None)]).unwrap();
    let (out, r) = run(&fleet, lend, &[1000.0], "fixed:600s", 0.1);
    assert_eq!(out.cold_starts, 1);
    let held = out.gpu_seconds.busy + out.gpu_seconds.idle_warm + out.gpu_seconds.loading;
    assert!(held > 100.0);
    assert!((r.lent_gpu_s - held).abs() < 0.01, "lent {} of {held} serverless GPU-s", r.lent_gpu_s);
    // The credit is half the serverless price of the lent time, rounded once per record.
    let credit = r.revenue.lending_credits.nanos() as f64;
    assert!((credit + 0.5 * r.lent_gpu_s * 1e6).abs() < 10.0, "{:?}", r.revenue);
    assert_eq!(r.rentals[0].lending_earned.checked_neg().unwrap(), r.revenue.lending_credits);
    assert_eq!(r.revenue.rental_hours, money("2.00"));
    let sum = Money::sum([r.revenue.serverless, r.revenue.rental_hours, r.revenue.lending_credits]).unwrap();
    assert_eq!(r.revenue.total, sum);
    assert_eq!(r.fenced_stops, 0);

    let keep = plan(&fleet, vec![(spec("idle", 1, None, 1, false), 0.0, None)]).unwrap();
    let (out, r) = run(&fleet, keep, &[1000.0], "fixed:600s", 0.1);
    assert_eq!((out.cold_starts, r.lent_gpu_s), (1, 0.0));
    assert!(out.latency_ms[0] > 2_500_000.0, "it waited for the rental's end: {:?}", out.latency_ms);
}

#[test]
fn a_cancel_after_delivery_bills_every_started_hour_and_frees_the_gpu() {
    // Rented at once for 4 hours, cancelled at 5400 s: 2 started hours; the request at 6000 s finds the GPU free.
    let fleet = one_gpu();
    let plan = plan(&fleet, vec![(spec("short", 1, None, 4, false), 0.0, Some(5400.0))]).unwrap();
    let (out, r) = run(&fleet, plan, &[6000.0], "fixed:60s", 0.1);
    assert_eq!(r.rentals[0].phase, "Cancelled");
    assert_eq!(r.revenue.rental_hours, money("4.00"));
    assert!((r.rented_gpu_s - 5400.0).abs() < 1e-9);
    assert!(out.latency_ms[2] < 60_000.0, "served at once: {:?}", out.latency_ms);
}

#[test]
fn a_calendar_is_refused_whole_with_the_rental_that_is_wrong() {
    let fleet = one_gpu();
    let err = |rentals| plan(&fleet, rentals).unwrap_err().to_string();
    let ok = (spec("a", 1, Some(0.0), 1, false), 0.0, None);
    assert_eq!(
        err(vec![ok.clone(), (spec("b", 0, None, 1, false), 0.0, None)]),
        "rental 2 (team-a/b): a rental needs at least one GPU"
    );
    let mut a100 = spec("c", 1, None, 1, false);
    a100.gpu_model = "a100-40gb".into();
    assert_eq!(
        err(vec![(a100, 0.0, None)]),
        "rental 1 (team-a/c): no GPU of model \"a100-40gb\" in the fleet (models: h100-80gb)"
    );
    assert_eq!(
        err(vec![(spec("d", 2, None, 1, false), 0.0, None)]),
        "rental 1 (team-a/d): 2 GPUs of \"h100-80gb\" requested; the whole fleet has 1"
    );
    assert_eq!(
        err(vec![(spec("e", 1, None, 745, false), 0.0, None)]),
        "rental 1 (team-a/e): the rental lasts 745.00 hours; at most 744 are allowed"
    );
    assert_eq!(
        err(vec![ok.clone(), (spec("a", 1, Some(1800.0), 1, false), 0.0, None)]),
        RentalSpecError::Overlap { namespace: "team-a".into(), name: "a".into() }.to_string()
    );
    assert_eq!(
        err(vec![(spec("f", 1, None, 1, false), 600.0, Some(300.0))]),
        "rental 1 (team-a/f): cancelled at 300 s, before it is created at 600 s"
    );
    assert_eq!(
        err(vec![(spec("g", 1, None, 1, false), -1.0, None)]),
        "rental 1 (team-a/g): created at -1 s, before the trace starts"
    );
    let other = RentalPlan::new(vec![ok.clone()], EPOCH, PriceTable::new("USD"), RentalConfig::default(), &fleet);
    assert_eq!(other.unwrap_err().to_string(), "prices: no price configured for GPU model \"h100-80gb\"");
    // One name used twice without overlap: two keys.
    let twice = plan(&fleet, vec![ok, (spec("a", 1, Some(7200.0), 1, false), 0.0, None)]).unwrap();
    let keys: Vec<&str> = twice.rentals.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["team-a/a#1", "team-a/a#2"]);
}

#[test]
fn a_crowded_fleet_with_fences_and_lending_runs_the_same_every_time() {
    // Eight GPUs, twelve deployments of 1-140 GB and rentals holding up to seven GPUs: fences stop replicas, lent
    // GPUs are borrowed and requests queue for room, the regime where one different placement changes the rest of
    // the run. Each run builds its maps afresh (every std HashMap with keys of its own, so another iteration
    // order): the outcome must depend on nothing but the inputs and the seed.
    let fleet = FleetSpec::parse("h100-80gb:4x2").unwrap();
    let deps: Vec<DeploymentSpec> = (0..12)
        .map(|i| {
            let windows = (0..72)
                .map(|w| Window {
                    start_s: f64::from(w) * 600.0,
                    rate: if w % (3 + i) < 2 { 0.01 } else { 0.0 },
                    pattern: Pattern::Gamma(0.5),
                })
                .collect();
            let gb = [1, 4, 16, 40, 80, 140][i as usize % 6];
            DeploymentSpec { name: format!("d{i}"), weights_bytes: gb * GBYTES, source: Source::Windows(windows) }
        })
        .collect();
    let rentals = || {
        let mut late = spec("late", 3, Some(9.0 * 3600.0), 2, false);
        late.namespace = "team-b".into();
        vec![
            (spec("big", 4, Some(3600.0), 6, true), 0.0, None),
            (spec("mid", 2, Some(2.0 * 3600.0), 4, false), 0.0, None),
            (spec("now", 1, None, 3, true), 1800.0, None),
            (spec("cancelled", 2, Some(8.0 * 3600.0), 2, false), 0.0, Some(9.0 * 3600.0)),
            (late, 0.0, None),
        ]
    };
    for keep_alive in ["fixed:600s", "adaptive"] {
        let once = || {
            let config =
                SimConfig { days: 0.5, rentals: Some(plan(&fleet, rentals()).unwrap()), ..SimConfig::default() };
            let choice = KeepAliveChoice::Uniform(KeepAlivePolicy::parse(keep_alive).unwrap());
            simulate(&config, &fleet, &deps, &choice, &mut |_| {})
        };
        let first = once();
        let r = first.rentals.as_ref().expect("a run with a plan reports rentals");
        assert_eq!(r.billing_error, None);
        assert!(r.lent_gpu_s > 0.0 && first.wait_s > 0.0, "{keep_alive}: {r:?}");
        if keep_alive.starts_with("fixed") {
            assert!(r.fenced_stops > 0 && r.cold_starts_after_fence > 0, "{r:?}");
        }
        assert_eq!(once(), first, "{keep_alive}: the same inputs gave another run");
    }
}
