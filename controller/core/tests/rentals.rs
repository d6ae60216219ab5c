//! A hand-made day of one tenant (a rental and a serverless deployment) and a neighbour, driven through the rental
//! lifecycle, the meter, the in-memory ledger and the monthly statement, with every record re-sent on every tick as
//! a retrying controller would.

use kiln_core::{
    billing::{
        Appended, GpuPrice, GroupBy, Ledger, MemoryLedger, Meter, PriceTable, Query, ReplicaInterval, ServerlessPhase,
        Statement, Subject, UsageKind, meter::rental_records,
    },
    money::Money,
    rental::{Fleet, Rental, RentalConfig, RentalFacts, RentalPhase, RentalSpec},
};

/// 2026-11-26T08:00:00Z.
const T0: f64 = 1_795_680_000.0;
const MIN: f64 = 60.0;

fn prices() -> PriceTable {
    PriceTable::new("USD").with("H100", GpuPrice::parse("H100", "0.0008", "2.49", "0.5").expect("valid prices"))
}

fn money(s: &str) -> Money {
    Money::parse(s).expect("a decimal amount")
}

/// What the replicas of the day did: (namespace, deployment, replica, milli-GPU, phase, from, to).
fn serverless_timeline() -> Vec<ReplicaInterval> {
    let iv = |ns: &str, dep: &str, replica: &str, share: u32, phase, from: f64, to: f64| ReplicaInterval {
        replica: replica.into(),
        deployment: dep.into(),
        namespace: ns.into(),
        gpu_model: "H100".into(),
        share_milli: share,
        phase,
        from,
        to,
    };
    vec![
        iv("acme", "llm", "llm-0", 500, ServerlessPhase::Loading, T0 + 5.0, T0 + 35.0),
        iv("acme", "llm", "llm-0", 500, ServerlessPhase::Busy, T0 + 35.0, T0 + 35.0 + 10.0 * MIN),
        iv("acme", "llm", "llm-0", 500, ServerlessPhase::IdleWarm, T0 + 35.0 + 10.0 * MIN, T0 + 35.0 + 15.0 * MIN),
        iv("beta", "chat", "chat-0", 1000, ServerlessPhase::Busy, T0 + 100.0, T0 + 160.0),
    ]
}

/// Clips an interval to `[from, to)`, as a controller feeding "what happened since the last tick" does.
fn clip(iv: &ReplicaInterval, from: f64, to: f64) -> Option<ReplicaInterval> {
    let (a, b) = (iv.from.max(from), iv.to.min(to));
    (a < b).then(|| ReplicaInterval { from: a, to: b, ..iv.clone() })
}

#[test]
fn a_day_of_usage_bills_exactly_and_the_statement_adds_up() {
    let fleet = Fleet::new().with("H100", 8).with("H100", 8);
    let prices = prices();
    let mut ledger = MemoryLedger::new();
    let mut meter = Meter::new("meter", 60).unwrap();
    let spec = RentalSpec {
        namespace: "acme".into(),
        name: "train".into(),
        gpu_model: "H100".into(),
        gpu_count: 2,
        start_time: None,
        hours: Some(3),
        end_time: None,
        cancel: false,
        lend_when_idle: false,
    };
    let mut rental = Rental::new(spec, T0, RentalConfig::default());
    let timeline = serverless_timeline();
    let delivered_at = T0 + 10.0 * MIN;
    let cancel_at = delivered_at + 125.0 * MIN;
    let mut duplicates = 0;

    let tick = 20.0;
    let mut t = T0;
    while t <= T0 + 4.0 * 3600.0 {
        // What the controller observes: GPUs assigned 10 min in; one of them unhealthy from 40 to 70 min; the
        // tenant deletes the rental 2 h 5 min after delivery.
        let assigned = if t >= delivered_at { 2 } else { 0 };
        let healthy = if (T0 + 40.0 * MIN..T0 + 70.0 * MIN).contains(&t) { 1 } else { assigned };
        let facts = RentalFacts {
            fleet: &fleet,
            assigned,
            healthy,
            unplaced_reason: Some("the GPUs are draining"),
            deleted: t >= cancel_at,
        };
        rental.step(t, &facts);
        for iv in &timeline {
            if let Some(part) = clip(iv, t - tick, t) {
                meter.observe(&part).unwrap();
            }
        }
        let mut records = meter.close(t, &prices).unwrap();
        records.extend(rental_records(&rental, t, &prices, "rental").unwrap());
        for outcome in ledger.append_all(records).unwrap() {
            duplicates += usize::from(outcome == Appended::Duplicate);
        }
        t += tick;
    }

    assert_eq!(rental.phase(), RentalPhase::Cancelled);
    assert!(duplicates > 100, "rental hours are re-sent on every tick and counted once ({duplicates} duplicates)");

    // The rental: 2 h 5 min delivered = 3 started hours × 2 GPUs × $2.49; 30 GPU-minutes lost, credited exactly.
    let rental_q = Query::namespace("acme").subject(Subject::Rental("train".into()));
    let by_kind = ledger.sum(&rental_q, GroupBy::Phase).unwrap();
    assert_eq!(by_kind["rental-hours"].gpu_hours, 6);
    assert_eq!(by_kind["rental-hours"].records, 3);
    assert_eq!(by_kind["rental-hours"].amount, money("14.94"));
    assert_eq!(by_kind["credit"].micro_gpu_seconds, 30 * 60 * 1_000_000);
    assert_eq!(by_kind["credit"].amount, money("-1.245"));
    // The status view of the rental agrees with the ledger.
    let price = prices.get("H100").expect("priced");
    assert_eq!(rental.billed_amount(t, price), Ok(by_kind["rental-hours"].amount));
    assert_eq!(rental.credited(price), Ok(by_kind["credit"].amount));
    let first_hour = ledger
        .query(&rental_q)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == UsageKind::RentalHours)
        .map(|r| r.start_ms)
        .min();
    assert_eq!(first_hour, Some((delivered_at * 1000.0) as i64), "billing starts at delivery");

    // The deployment: half a GPU loading 30 s, busy 10 min, idle-warm 5 min at $0.0008 per GPU-second.
    let llm = ledger.sum(&Query::namespace("acme").subject(Subject::Deployment("llm".into())), GroupBy::Phase).unwrap();
    assert_eq!(llm["loading"].micro_gpu_seconds, 15_000_000);
    assert_eq!(llm["loading"].amount, money("0.012"));
    assert_eq!(llm["busy"].amount, money("0.24"));
    assert_eq!(llm["idle-warm"].amount, money("0.12"));

    // The statement: line items add up to the total, which is what the ledger holds for the tenant.
    let st = Statement::monthly(&ledger, "acme", "USD", 2026, 11).unwrap();
    let item_sum = Money::sum(st.items.iter().map(|i| i.totals.amount)).unwrap();
    assert_eq!(st.total, item_sum);
    assert_eq!(st.total, money("14.067"));
    assert_eq!(st.charges, money("15.312"));
    assert_eq!(st.credits, money("-1.245"));
    assert_eq!(st.total, ledger.total(&Query::namespace("acme")).unwrap().amount);
    assert_eq!(st.items.len(), 5, "loading, busy, idle-warm, rental hours, credit");
    let csv = st.to_csv();
    assert!(csv.contains("\"acme\",\"rental/train\",rental-hours,\"H100\",0,6,14.94,USD\n"), "{csv}");
    assert!(csv.ends_with("\"acme\",,total,,,,14.067,USD\n"), "{csv}");

    // Isolation: the neighbour's statement holds only its own minute of busy GPU.
    let beta = Statement::monthly(&ledger, "beta", "USD", 2026, 11).unwrap();
    assert_eq!(beta.total, money("0.048"));
    assert!(beta.items.iter().all(|i| i.subject == Subject::Deployment("chat".into())));
    // Nothing in December.
    assert!(Statement::monthly(&ledger, "acme", "USD", 2026, 12).unwrap().items.is_empty());
}
