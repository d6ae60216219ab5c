//! Hand-made timelines of the rental lifecycle.

use super::*;

/// 2026-11-26T08:00:00Z, hour-aligned.
const T0: f64 = 1_795_680_000.0;
const H: f64 = 3600.0;
const MIN: f64 = 60.0;

fn fleet() -> Fleet {
    Fleet::new().with("H100", 8).with("H100", 8).with("A100", 4)
}

fn spec(count: u32, start: Option<f64>, hours: Option<u32>, end: Option<f64>) -> RentalSpec {
    RentalSpec {
        namespace: "tenant-a".into(),
        name: "train".into(),
        gpu_model: "H100".into(),
        gpu_count: count,
        start_time: start,
        hours,
        end_time: end,
        cancel: false,
        lend_when_idle: false,
    }
}

fn facts(fleet: &Fleet, assigned: u32, healthy: u32) -> RentalFacts<'_> {
    RentalFacts { fleet, assigned, healthy, unplaced_reason: None, deleted: false }
}

fn phase_changes(events: &[RentalEvent]) -> Vec<RentalPhase> {
    events.iter().filter_map(|e| if let RentalEvent::PhaseChanged { to, .. } = e { Some(*to) } else { None }).collect()
}

fn notices(events: &[RentalEvent]) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|e| if let RentalEvent::Notice { reason, .. } = e { Some(*reason) } else { None })
        .collect()
}

fn count(events: &[RentalEvent], f: impl Fn(&RentalEvent) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

fn is_fence(e: &RentalEvent) -> bool {
    matches!(e, RentalEvent::Fence { .. })
}

fn is_release(e: &RentalEvent) -> bool {
    matches!(e, RentalEvent::Release)
}

fn is_stop(e: &RentalEvent) -> bool {
    matches!(e, RentalEvent::StopWork { .. })
}

/// Delivers a rental of `n` GPUs without start time at `at`.
fn delivered(n: u32, hours: u32, fleet: &Fleet, at: f64) -> Rental {
    let mut r = Rental::new(spec(n, None, Some(hours), None), at, RentalConfig::default());
    let ev = r.step(at, &facts(fleet, n, n));
    assert_eq!(phase_changes(&ev), [RentalPhase::Active]);
    r
}

#[test]
fn future_start_fences_at_lead_time_and_is_active_only_at_delivery() {
    let fleet = fleet();
    let start = T0 + 2.0 * H;
    let mut r = Rental::new(spec(4, Some(start), Some(2), None), T0, RentalConfig::default());

    let ev = r.step(T0, &facts(&fleet, 0, 0));
    assert!(ev.is_empty(), "nothing to do two hours ahead: {ev:?}");
    assert_eq!(r.phase(), RentalPhase::Pending);
    assert!(r.state.reason.contains("waiting for startTime (in 2h 0m)"), "{}", r.state.reason);

    // One second before the fence: the GPUs stay in the serverless pool.
    assert!(r.step(start - 10.0 * MIN - 1.0, &facts(&fleet, 0, 0)).is_empty());
    assert!(!r.state.fenced);

    // At start - 10 min: fence (drain serverless replicas) exactly once.
    let ev = r.step(start - 10.0 * MIN, &facts(&fleet, 0, 0));
    assert_eq!(count(&ev, is_fence), 1);
    assert!(ev.contains(&RentalEvent::Fence { model: "H100".into(), count: 4 }));
    assert_eq!(r.phase(), RentalPhase::Pending);
    assert_eq!(count(&r.step(start - 9.0 * MIN, &facts(&fleet, 0, 0)), is_fence), 0, "fenced once only");

    // GPUs assigned and healthy before the start: still Pending, nothing billed.
    let ev = r.step(start - 5.0 * MIN, &facts(&fleet, 4, 4));
    assert!(phase_changes(&ev).is_empty());
    assert!(r.state.reason.starts_with("GPUs fenced; waiting for startTime"), "{}", r.state.reason);
    assert_eq!(r.billed_gpu_hours(start - 1.0), 0);

    // At the start: Active, delivered at the start.
    let ev = r.step(start, &facts(&fleet, 4, 4));
    assert_eq!(phase_changes(&ev), [RentalPhase::Active]);
    assert_eq!(notices(&ev), ["Delivered"]);
    assert_eq!(r.state.delivered_ms, Some(secs_to_ms(start)));
    assert_eq!(r.state.end_ms, Some(secs_to_ms(start + 2.0 * H)));
    assert_eq!(r.billed_gpu_hours(start), 0);
    assert_eq!(r.billed_gpu_hours(start + 1.0), 4, "the first started hour of 4 GPUs");
}

#[test]
fn billing_starts_at_delivery_not_at_the_requested_start() {
    let fleet = fleet();
    let mut r = Rental::new(spec(8, Some(T0), Some(3), None), T0 - H, RentalConfig::default());
    let busy = RentalFacts { unplaced_reason: Some("node gpu-1 is cordoned"), ..facts(&fleet, 0, 0) };
    let ev = r.step(T0, &busy);
    assert!(phase_changes(&ev).is_empty());
    assert_eq!(r.state.reason, "no node has 8 free healthy GPUs of H100: node gpu-1 is cordoned");
    let ev = r.step(T0 + 20.0 * MIN, &facts(&fleet, 8, 6));
    assert!(phase_changes(&ev).is_empty());
    assert_eq!(r.state.reason, "6 of 8 assigned GPUs healthy; waiting for the rest");

    // Delivered 40 minutes late: billing runs from there; the end stays at start + 3 h.
    r.step(T0 + 40.0 * MIN, &facts(&fleet, 8, 8));
    assert_eq!(r.phase(), RentalPhase::Active);
    assert_eq!(r.state.delivered_ms, Some(secs_to_ms(T0 + 40.0 * MIN)));
    assert_eq!(r.billed_ms(T0 + H), 20 * 60 * 1000);
    assert_eq!(r.billed_ms(T0 + 10.0 * H), secs_to_ms(2.0 * H + 20.0 * MIN), "nothing after the end");
    assert_eq!(r.billed_gpu_hours(T0 + 10.0 * H), 8 * 3);

    // Without a start time the end is delivery + hours.
    let r = delivered(2, 5, &fleet, T0 + 17.0);
    assert_eq!(r.state.end_ms, Some(secs_to_ms(T0 + 17.0 + 5.0 * H)));
}

#[test]
fn every_started_hour_is_billed() {
    let fleet = fleet();
    let mut r = delivered(3, 4, &fleet, T0);
    assert_eq!(r.billed_hours(T0 + 60.0 * MIN), 1);
    assert_eq!(r.billed_hours(T0 + 61.0 * MIN), 2, "61 minutes = 2 hours");
    assert_eq!(r.billed_gpu_hours(T0 + 61.0 * MIN), 6);
    r.step(T0 + 61.0 * MIN, &facts(&fleet, 3, 3));
    assert_eq!(r.billed_hours(T0 + 3.0 * H + 1.0), 4);
    assert_eq!(r.billed_hours(T0 + 100.0 * H), 4, "capped at the end");
}

#[test]
fn expiry_warns_fifteen_minutes_before_and_stops_at_the_end() {
    let fleet = fleet();
    let mut r = delivered(2, 1, &fleet, T0);
    assert!(notices(&r.step(T0 + 45.0 * MIN - 1.0, &facts(&fleet, 2, 2))).is_empty());
    let ev = r.step(T0 + 45.0 * MIN, &facts(&fleet, 2, 2));
    assert_eq!(notices(&ev), ["ExpiringSoon"]);
    assert!(r.is_expiring_soon());
    assert!(r.step(T0 + 50.0 * MIN, &facts(&fleet, 2, 2)).is_empty(), "warned once");

    let ev = r.step(T0 + H, &facts(&fleet, 2, 2));
    assert_eq!(phase_changes(&ev), [RentalPhase::Expired]);
    assert_eq!(count(&ev, is_stop), 1);
    assert_eq!(count(&ev, is_release), 1);
    assert!(ev.contains(&RentalEvent::StopWork { grace_s: 30.0 }));
    // Stopping comes before the GPUs are released.
    let stop = ev.iter().position(is_stop);
    let release = ev.iter().position(is_release);
    assert!(stop < release);
    assert_eq!(r.billed_gpu_hours(T0 + 5.0 * H), 2, "nothing billed after the end");
    assert!(r.step(T0 + 2.0 * H, &facts(&fleet, 2, 2)).is_empty(), "terminal");

    // A step that arrives late still bills only up to the end.
    let mut late = delivered(1, 1, &fleet, T0);
    late.step(T0 + 3.0 * H, &facts(&fleet, 1, 1));
    assert_eq!(late.phase(), RentalPhase::Expired);
    assert_eq!(late.billed_ms(T0 + 3.0 * H), 3_600_000);
}

#[test]
fn cancel_before_the_fence_is_free_and_releases_nothing() {
    let fleet = fleet();
    let start = T0 + 3.0 * H;
    let mut r = Rental::new(spec(4, Some(start), Some(2), None), T0, RentalConfig::default());
    r.step(T0, &facts(&fleet, 0, 0));
    r.spec.cancel = true;
    let ev = r.step(T0 + H, &facts(&fleet, 0, 0));
    assert_eq!(phase_changes(&ev), [RentalPhase::Cancelled]);
    assert_eq!(count(&ev, is_release), 0, "nothing was fenced");
    assert_eq!(r.billed_gpu_hours(start + H), 0);

    // A cancel also wins over an invalid spec: Cancelled, not Failed.
    let mut r = Rental::new(
        RentalSpec { cancel: true, gpu_model: "B200".into(), ..spec(1, None, Some(1), None) },
        T0,
        RentalConfig::default(),
    );
    assert_eq!(phase_changes(&r.step(T0, &facts(&fleet, 0, 0))), [RentalPhase::Cancelled]);

    // After the fence, before delivery: still free, and the fenced GPUs go back to the pool.
    let mut r = Rental::new(spec(4, Some(start), Some(2), None), T0, RentalConfig::default());
    assert_eq!(count(&r.step(start - 5.0 * MIN, &facts(&fleet, 4, 4)), is_fence), 1);
    let ev = r.step(start - 4.0 * MIN, &RentalFacts { deleted: true, ..facts(&fleet, 4, 4) });
    assert_eq!(phase_changes(&ev), [RentalPhase::Cancelled]);
    assert_eq!(count(&ev, is_release), 1);
    assert_eq!(count(&ev, is_stop), 0, "no tenant work ran");
    assert_eq!(r.billed_gpu_hours(start + H), 0);
}

#[test]
fn cancel_after_delivery_bills_every_started_hour() {
    let fleet = fleet();
    let mut r = delivered(2, 8, &fleet, T0);
    let ev = r.step(T0 + 90.0 * MIN, &RentalFacts { deleted: true, ..facts(&fleet, 2, 2) });
    assert_eq!(phase_changes(&ev), [RentalPhase::Cancelled]);
    assert_eq!(count(&ev, is_stop), 1);
    assert_eq!(count(&ev, is_release), 1);
    assert_eq!(r.billed_gpu_hours(T0 + 10.0 * H), 2 * 2, "90 minutes = 2 started hours × 2 GPUs");
    assert!(r.state.reason.contains("4 GPU-hours billed"), "{}", r.state.reason);
}

#[test]
fn an_unhealthy_gpu_degrades_and_credits_exactly_the_lost_time() {
    let fleet = fleet();
    let mut r = delivered(4, 2, &fleet, T0);
    let ev = r.step(T0 + 10.0 * MIN, &facts(&fleet, 4, 3));
    assert!(ev.contains(&RentalEvent::ReplaceGpus { count: 1 }));
    assert_eq!(notices(&ev), ["Degraded"]);
    assert!(r.is_degraded());
    assert_eq!(r.phase(), RentalPhase::Active, "degraded is a condition, not a phase");
    assert!(r.step(T0 + 15.0 * MIN, &facts(&fleet, 4, 3)).is_empty(), "no repeat while unchanged");

    // A second GPU lost at 20 min, both back at 40 min.
    r.step(T0 + 20.0 * MIN, &facts(&fleet, 4, 2));
    let ev = r.step(T0 + 40.0 * MIN, &facts(&fleet, 4, 4));
    assert_eq!(notices(&ev), ["Recovered"]);
    assert!(!r.is_degraded());
    assert_eq!(
        r.credit_spans(),
        [
            CreditSpan { from_ms: secs_to_ms(T0 + 10.0 * MIN), to_ms: secs_to_ms(T0 + 20.0 * MIN), lost_gpus: 1 },
            CreditSpan { from_ms: secs_to_ms(T0 + 20.0 * MIN), to_ms: secs_to_ms(T0 + 40.0 * MIN), lost_gpus: 2 },
        ]
    );
    // 1 GPU × 10 min + 2 GPUs × 20 min = 50 GPU-minutes.
    assert_eq!(r.lost_gpu_ms(), 50 * 60 * 1000);

    // Degraded at the end: the span is closed at the end, not at the late step.
    r.step(T0 + 2.0 * H - 5.0 * MIN, &facts(&fleet, 4, 3));
    r.step(T0 + 3.0 * H, &facts(&fleet, 4, 3));
    assert_eq!(r.phase(), RentalPhase::Expired);
    assert_eq!(r.lost_gpu_ms(), 55 * 60 * 1000);
    assert_eq!(r.billed_gpu_hours(T0 + 3.0 * H), 8, "credits do not change the hours billed");
    // At $3.60 per GPU-hour: 8 GPU-hours = $28.80 billed, 55 GPU-minutes = $3.30 credited.
    let price = crate::billing::GpuPrice::parse("H100", "0.001", "3.60", "0").unwrap();
    assert_eq!(r.billed_amount(T0 + 3.0 * H, &price).unwrap(), Money::parse("28.80").unwrap());
    assert_eq!(r.credited(&price).unwrap(), Money::parse("-3.30").unwrap());
}

#[test]
fn an_impossible_rental_fails_with_the_reason() {
    let fleet = fleet();
    let mut r = Rental::new(spec(17, None, Some(1), None), T0, RentalConfig::default());
    let ev = r.step(T0, &facts(&fleet, 0, 0));
    assert_eq!(phase_changes(&ev), [RentalPhase::Failed]);
    assert_eq!(notices(&ev), ["Failed"]);
    assert!(matches!(
        ev.iter().find(|e| matches!(e, RentalEvent::Notice { .. })),
        Some(RentalEvent::Notice { warning: true, .. })
    ));
    assert_eq!(r.state.reason, "can never be placed: 17 GPUs of \"H100\" requested; the whole fleet has 16");
    assert!(r.step(T0 + 1.0, &facts(&fleet, 0, 0)).is_empty());

    let mut unknown = Rental::new(
        RentalSpec { gpu_model: "B200".into(), ..spec(1, None, Some(1), None) },
        T0,
        RentalConfig::default(),
    );
    unknown.step(T0, &facts(&fleet, 0, 0));
    assert_eq!(unknown.phase(), RentalPhase::Failed);
    assert!(
        unknown.state.reason.contains("no GPU of model \"B200\" in the fleet (models: A100, H100)"),
        "{}",
        unknown.state.reason
    );

    // Never delivered before its end: Expired, fence released, nothing billed.
    let mut starved = Rental::new(spec(8, Some(T0), Some(1), None), T0 - H, RentalConfig::default());
    assert_eq!(count(&starved.step(T0 - 5.0 * MIN, &facts(&fleet, 0, 0)), is_fence), 1);
    let ev = starved.step(T0 + H, &facts(&fleet, 0, 0));
    assert_eq!(phase_changes(&ev), [RentalPhase::Expired]);
    assert_eq!(count(&ev, is_release), 1);
    assert_eq!(starved.billed_gpu_hours(T0 + H), 0);
}

#[test]
fn specs_are_validated_with_typed_errors() {
    let fleet = fleet();
    let cfg = RentalConfig { max_hours: 48, ..RentalConfig::default() };
    let v = |s: RentalSpec| validate(&s, T0, &cfg, &fleet);
    assert_eq!(v(spec(1, None, Some(1), Some(T0 + H))), Err(RentalSpecError::LengthNotExactlyOne));
    assert_eq!(v(spec(1, None, None, None)), Err(RentalSpecError::LengthNotExactlyOne));
    assert_eq!(v(spec(1, None, Some(0), None)), Err(RentalSpecError::ZeroHours));
    assert_eq!(v(spec(0, None, Some(1), None)), Err(RentalSpecError::ZeroGpus));
    assert!(matches!(v(spec(1, Some(T0 + H), None, Some(T0 + H))), Err(RentalSpecError::EndBeforeStart { .. })));
    assert!(matches!(v(spec(1, None, None, Some(T0 - 1.0))), Err(RentalSpecError::EndBeforeStart { .. })));
    assert_eq!(v(spec(1, None, Some(49), None)), Err(RentalSpecError::TooLong { hours: 49.0, max_hours: 48 }));
    assert!(matches!(v(spec(1, Some(T0), None, Some(T0 + 48.5 * H))), Err(RentalSpecError::TooLong { .. })));
    assert!(matches!(
        v(spec(1, Some(f64::NAN), Some(1), None)),
        Err(RentalSpecError::InvalidTime { field: "startTime" })
    ));
    assert!(matches!(
        v(RentalSpec { gpu_model: "B200".into(), ..spec(1, None, Some(1), None) }),
        Err(RentalSpecError::UnknownModel { .. })
    ));
    assert!(matches!(
        v(spec(17, None, Some(1), None)),
        Err(RentalSpecError::MoreGpusThanFleet { requested: 17, fleet: 16, .. })
    ));
    assert_eq!(
        v(spec(16, Some(T0), None, Some(T0 + 48.0 * H))),
        Ok(Window { start_ms: Some(secs_to_ms(T0)), end: End::At(secs_to_ms(T0 + 48.0 * H)) })
    );
    assert_eq!(
        RentalSpecError::TooLong { hours: 49.0, max_hours: 48 }.to_string(),
        "the rental lasts 49.00 hours; at most 48 are allowed"
    );
}

#[test]
fn a_calendar_rejects_overlapping_rentals_of_the_same_name() {
    let fleet = fleet();
    let cfg = RentalConfig::default();
    let a = spec(1, Some(T0), Some(2), None);
    let later_same_name = spec(1, Some(T0 + 2.0 * H), Some(1), None);
    let overlapping = spec(2, Some(T0 + H), Some(3), None);
    let other_name = RentalSpec { name: "other".into(), ..overlapping.clone() };
    assert_eq!(
        validate_calendar(&[(a.clone(), T0), (later_same_name.clone(), T0), (other_name, T0)], &cfg, &fleet)
            .map(|w| w.len()),
        Ok(3)
    );
    assert_eq!(
        validate_calendar(&[(a, T0), (later_same_name, T0), (overlapping, T0)], &cfg, &fleet),
        Err(RentalSpecError::Overlap { namespace: "tenant-a".into(), name: "train".into() })
    );
    // One bad rental rejects the whole calendar.
    assert!(
        validate_calendar(&[(spec(1, None, Some(1), None), T0), (spec(0, None, Some(1), None), T0)], &cfg, &fleet)
            .is_err()
    );
}

#[test]
fn stepping_twice_at_the_same_time_changes_nothing() {
    let fleet = fleet();
    let mut r = delivered(1, 1, &fleet, T0);
    r.step(T0 + 50.0 * MIN, &facts(&fleet, 1, 0));
    let before = r.clone();
    assert!(r.step(T0 + 50.0 * MIN, &facts(&fleet, 1, 0)).is_empty());
    assert_eq!(r, before);
}
