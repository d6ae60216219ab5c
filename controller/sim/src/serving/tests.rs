//! The simulator on hand-made arrival sequences.

use super::*;
use kiln_core::autoscale::keepalive::AdaptiveConfig;

const GBYTES: u64 = 1_000_000_000;

fn fleet() -> FleetSpec {
    FleetSpec::parse("h100-80gb:8x2").unwrap()
}

fn requests(times: impl IntoIterator<Item = f64>) -> Source {
    Source::Requests(
        times.into_iter().map(|at_s| TraceRequest { at_s, context_tokens: 1024, generated_tokens: 256 }).collect(),
    )
}

fn run(deps: &[DeploymentSpec], policy: &str) -> Outcome {
    run_with(SimConfig { days: 2.0, ..SimConfig::default() }, deps, policy)
}

fn run_with(config: SimConfig, deps: &[DeploymentSpec], policy: &str) -> Outcome {
    simulate(&config, &fleet(), deps, &KeepAliveChoice::Uniform(KeepAlivePolicy::parse(policy).unwrap()), &mut |_| {})
}

fn dep(name: &str, gb: u64, source: Source) -> DeploymentSpec {
    DeploymentSpec { name: name.into(), weights_bytes: gb * GBYTES, source }
}

#[test]
fn a_periodic_client_gets_prewarmed() {
    // A 140 GB model (two GPUs) called every 30 minutes for two days.
    // With no idle copies kept in GPU memory, every restart is a full load.
    let deps = [dep("cron", 140, requests((0..96).map(|i| f64::from(i) * 1800.0)))];
    let config = SimConfig { idle_gpu_copies: false, ..SimConfig::default() };
    let adaptive = run_with(config.clone(), &deps, "adaptive");
    let knative = run_with(config.clone(), &deps, "fixed:90s");
    assert_eq!(knative.cold_starts, 96, "a 90 s timer misses every call");
    assert!(adaptive.prewarms > 60, "{} pre-warms", adaptive.prewarms);
    assert!(adaptive.cold_starts < 20, "{} cold starts", adaptive.cold_starts);
    // Pre-warming costs a little idle time, far less than keeping two GPUs warm all along.
    let always = run_with(config, &deps, "fixed:1h");
    assert!(always.cold_starts <= 1);
    let (a, b) = (adaptive.gpu_seconds.idle_warm, always.gpu_seconds.idle_warm);
    assert!(a < 0.25 * b, "{a} vs {b}");
}

#[test]
fn with_idle_copies_in_gpu_memory_adaptive_releases_the_gpu_and_restarts_warm() {
    // The same client on a fleet with nothing else: its copy is never evicted, so a restart is a warm hit and
    // keeping two GPUs warm for half an hour is not worth it.
    let deps = [dep("cron", 140, requests((0..96).map(|i| f64::from(i) * 1800.0)))];
    let adaptive = run(&deps, "adaptive");
    let (cold, warm, prewarms) = (adaptive.cold_starts, adaptive.warm_hits, adaptive.prewarms);
    assert!(cold <= 2, "{cold} cold starts");
    // Each call finds its replica restarting from the copy, or pre-warmed from it just before.
    assert!(warm + prewarms > 80, "{warm} warm hits, {prewarms} pre-warms");
    let always = run(&deps, "fixed:1h");
    assert!(adaptive.gpu_seconds.idle_warm < 0.25 * always.gpu_seconds.idle_warm);
}

#[test]
fn a_one_off_burst_does_not_keep_a_gpu_warm_for_hours() {
    // One user's burst: thirty requests ten seconds apart, then nothing for two days.
    let burst = (0..30).map(|i| 100.0 + f64::from(i) * 10.0);
    let deps = [dep("burst", 40, requests(burst))];
    let adaptive = run(&deps, "adaptive");
    assert_eq!(adaptive.requests, 30);
    // Half a GPU: an hour of it idle would be 1,800 GPU-seconds; the burst's own gaps say it ends quickly.
    assert!(adaptive.gpu_seconds.idle_warm < 600.0, "{:?}", adaptive.gpu_seconds);
    // Even with no history at all (one request), the break-even fallback is capped at an hour.
    let single = run(&[dep("once", 40, requests([100.0]))], "adaptive");
    assert!(single.gpu_seconds.idle_warm <= 1800.0 + 1.0, "{:?}", single.gpu_seconds);
    assert_eq!(adaptive.series.replicas.last(), Some(&0));
}

#[test]
fn a_client_busier_than_its_target_never_scales_to_zero() {
    // A request every 0.1 s for 12 hours: ~27 in flight against a target of 11 per replica.
    let busy = (0..(43_200 * 10)).map(|i| f64::from(i) * 0.1);
    let deps = [dep("busy", 16, requests(busy))];
    let out = run(&deps, "fixed:0s");
    let active = out.series.t_s.iter().filter(|&&t| t > 0.0 && t < 43_200.0).count();
    assert!(out.series.replicas[1..=active].iter().all(|&r| r >= 2), "{:?}", &out.series.replicas[..10]);
    assert_eq!(out.series.replicas.last(), Some(&0), "at zero once the client stops");
    // Only the requests that arrived during the very first load were cold.
    assert!(out.cold_starts < 200, "{}", out.cold_starts);
    assert!(out.gpu_seconds.busy > 0.9 * (out.gpu_seconds.busy + out.gpu_seconds.idle_warm));
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let w = |rate| Window { start_s: 0.0, rate, pattern: crate::traces::Pattern::Gamma(0.3) };
    let windows: Vec<Window> =
        (0..288).map(|i| Window { start_s: f64::from(i) * 600.0, ..w(if i % 7 == 0 { 0.05 } else { 0.0 }) }).collect();
    let deps: Vec<DeploymentSpec> =
        (0..6).map(|i| dep(&format!("d{i}"), [1, 4, 16, 40, 80, 140][i], Source::Windows(windows.clone()))).collect();
    let a = run(&deps, "adaptive");
    assert_eq!(a, run(&deps, "adaptive"));
    assert!(a.requests > 100);
    let other = simulate(
        &SimConfig { seed: 7, ..SimConfig::default() },
        &fleet(),
        &deps,
        &KeepAliveChoice::Uniform(KeepAlivePolicy::Adaptive(AdaptiveConfig::default())),
        &mut |_| {},
    );
    assert_ne!(a.requests, other.requests, "another seed draws other arrivals");
}

#[test]
fn the_modelled_timers_are_the_cheapest_on_the_idle_gaps() {
    let c = Costs {
        idle_per_s: 1.0,
        cold_penalty: 100.0,
        load_cost: 1.0,
        load_s: 1.0,
        warm_penalty: 1.0,
        copy_lifetime_s: 0.0,
    };
    // Gaps of 10 s are worth covering (10 < 100), gaps of 1000 s are not.
    let timers = modelled_timers(&[vec![10.0, 10.0, 1000.0, 1000.0], vec![1000.0], vec![]], &[c, c, c]);
    assert!(timers[0] >= 10.0 && timers[0] < 12.0, "{timers:?}");
    assert_eq!(timers[1], 0.0);
    assert_eq!(timers[2], 0.0);
    // With idle copies that outlive the gaps, a restart is a cheap warm hit: no timer is worth it.
    let lasting = Costs { copy_lifetime_s: 1e6, ..c };
    assert_eq!(modelled_timers(&[vec![10.0, 10.0, 1000.0]], &[lasting]), vec![0.0]);
}

#[test]
fn fleets_parse() {
    let f = FleetSpec::parse("h100-80gb:8x16").unwrap();
    assert_eq!((f.gpus_per_node, f.nodes, f.gpus(), f.gpu_memory_bytes), (8, 16, 128, 80 * GBYTES));
    assert!(FleetSpec::parse("h100:8x16").unwrap_err().to_string().contains("expected <gpu>-<memory>gb"));
    assert_eq!(FleetSpec::parse("h100-80gb:17x1"), Err(FleetError::OutOfRange("h100-80gb:17x1".into())));
    assert_eq!(gpu_share(40 * GBYTES, 80 * GBYTES), 0.5);
    assert_eq!(gpu_share(140 * GBYTES, 80 * GBYTES), 2.0);
}

#[test]
fn a_tiny_trace_counts_cold_starts_warm_hits_and_idle_time_by_hand() {
    // A 16 GB model (0.2 of a GPU) on an empty fleet, kept 600 s after its last request:
    // - t=100: nothing runs; Control starts a replica from the remote store (2 s + 16 GB at 2.5 GB/s = 8.4 s): cold;
    // - t=104: still loading: cold too; both are served from 108.4 to 111.11 (2.71 s each);
    // - idle from 111.11; the tick after 711.11 (711.5) stops it and leaves its weights in GPU memory;
    // - t=5000: Control places the replica on the GPU holding the copy (the cache hint): a warm hit (0.3 s).
    let deps = [dep("hand", 16, requests([100.0, 104.0, 5000.0]))];
    let out = run_with(SimConfig { days: 0.1, ..SimConfig::default() }, &deps, "fixed:600s");
    assert_eq!((out.requests, out.cold_starts, out.warm_hits, out.prewarms), (3, 2, 1, 0));
    assert_eq!(out.demand_loads, [1, 0, 0, 1], "one load from the idle copy, one from the remote store");
    let idle_s = 711.5 - (108.4 + service_s(16 * GBYTES, 1.0, 1024, 256));
    // ...and after the last request, the same 600 s (to the tick at 5603.5).
    let last = 5603.5 - (5000.0 + 0.3 + service_s(16 * GBYTES, 1.0, 1024, 256));
    assert!((out.gpu_seconds.idle_warm - 0.2 * (idle_s + last)).abs() < 0.01, "{:?}", out.gpu_seconds);
    assert!((out.gpu_seconds.loading - 0.2 * (8.4 + 0.3)).abs() < 0.01, "{:?}", out.gpu_seconds);
}

#[test]
fn a_burst_at_zero_gets_enough_replicas_for_every_waiting_request_at_once() {
    // 40 requests at the same instant, 16 per replica: Control's burst scale-out starts ceil(40 / 16) = 3 replicas
    // while the scaler's windows still say 1; every request waited for a load.
    let deps = [dep("burst", 1, requests(std::iter::repeat_n(100.0, 40)))];
    let out = run_with(SimConfig { days: 0.1, ..SimConfig::default() }, &deps, "fixed:60s");
    assert_eq!((out.requests, out.cold_starts, out.warm_hits), (40, 40, 0));
    assert_eq!(out.demand_loads.iter().sum::<u64>(), 3, "{:?}", out.demand_loads);
    assert_eq!(out.series.replicas.last(), Some(&0), "back to zero after the keep-alive");
}

#[test]
fn the_oracle_keeps_per_deployment_the_timer_whose_run_cost_it_least_in_total() {
    let outcome = |totals: &[f64]| Outcome {
        per_deployment: totals.iter().map(|&t| DeploymentOutcome { total_cost_usd: t, ..Default::default() }).collect(),
        ..Outcome::default()
    };
    let (short, long, mixed) = (outcome(&[5.0, 9.0, 1.0]), outcome(&[7.0, 3.0, 1.0]), outcome(&[6.0, 2.0, 4.0]));
    let runs = [(vec![30.0; 3], &short), (vec![600.0; 3], &long), (vec![90.0, 45.0, 10.0], &mixed)];
    assert_eq!(oracle_timers(&runs), vec![30.0, 45.0, 30.0], "a tie goes to the first run");
    assert!(oracle_timers(&[]).is_empty());
}

#[test]
fn the_hindsight_oracle_costs_no_more_in_total_than_any_fixed_timer_it_tried() {
    let calls = (0..40).map(|i| 100.0 + f64::from(i * i) * 37.0);
    let deps = [dep("uneven", 40, requests(calls))];
    let config = SimConfig { days: 1.0, ..SimConfig::default() };
    let (timers, oracle) = hindsight_oracle(&config, &fleet(), &deps, &mut |_| {});
    assert_eq!(oracle, simulate(&config, &fleet(), &deps, &KeepAliveChoice::PerDeployment(timers), &mut |_| {}));
    for t in ORACLE_CANDIDATES_S {
        let fixed = simulate(&config, &fleet(), &deps, &KeepAliveChoice::PerDeployment(vec![t]), &mut |_| {});
        assert!(oracle.total_cost_usd <= fixed.total_cost_usd + 1e-9, "{t} s: {fixed:?} vs {oracle:?}");
    }
    // The three figures add up, per deployment and in all.
    assert!((oracle.total_cost_usd - oracle.gpu_cost_usd - oracle.wait_cost_usd).abs() < 1e-9);
    assert_eq!(oracle.per_deployment[0].total_cost_usd, oracle.total_cost_usd);
}

#[test]
fn waiting_for_a_load_is_counted_and_valued_at_the_wait_price() {
    // The hand-made trace of `a_tiny_trace_counts...`: the request at 100 waits 8.4 s for the remote load, the one
    // at 104 waits 4.4 s, the one at 5000 waits 0.3 s for the restart from the idle copy.
    let deps = [dep("hand", 16, requests([100.0, 104.0, 5000.0]))];
    let config = SimConfig { days: 0.1, wait_usd_per_s: 2.0, ..SimConfig::default() };
    let out = run_with(config, &deps, "fixed:600s");
    assert!((out.wait_s - (8.4 + 4.4 + 0.3)).abs() < 0.05, "{}", out.wait_s);
    assert!((out.wait_cost_usd - 2.0 * out.wait_s).abs() < 1e-9);
    let g = out.gpu_seconds;
    assert!((out.gpu_cost_usd - (g.busy + g.idle_warm + g.loading) * 2.5 / 3600.0).abs() < 1e-9);
    assert_eq!(out.per_deployment[0].gpu_seconds, g);
}

#[test]
fn busy_time_is_the_time_a_replica_serves_so_requests_that_waited_for_the_same_load_share_it() {
    // Busy GPU-seconds are the time a replica has at least one request in flight (a batch costs what one request
    // does), not the sum of service times: requests that wait together for a load start together and overlap, so
    // the same requests keep a GPU busy for less time under a keep-alive that makes them wait. A 16 GB model (0.2 of
    // a GPU); a pair half a second apart, long after a first request.
    let deps = [dep("pair", 16, requests([100.0, 3000.0, 3000.5]))];
    let config = SimConfig { days: 0.1, idle_gpu_copies: false, ..SimConfig::default() };
    let s = service_s(16 * GBYTES, 1.0, 1024, 256);
    // Kept warm: the pair is served at once, half a second apart.
    let warm = run_with(config.clone(), &deps, "fixed:1h");
    assert_eq!(warm.cold_starts, 1);
    assert!((warm.gpu_seconds.busy - 0.2 * (s + s + 0.5)).abs() < 1e-6, "{:?}", warm.gpu_seconds);
    // Scaled to zero: both wait for the load and are served side by side.
    let cold = run_with(config, &deps, "fixed:0s");
    assert_eq!(cold.cold_starts, 3);
    assert!((cold.gpu_seconds.busy - 0.2 * (s + s)).abs() < 1e-6, "{:?}", cold.gpu_seconds);
}

#[test]
fn sparse_newcomers_borrow_the_fleets_idle_times_instead_of_keeping_a_gpu_warm_for_an_hour() {
    // Six 80 GB deployments (a GPU each) called every 30 minutes for two days: the fleet's history. Six more of the
    // same size start on the second day with four calls each, 30 minutes apart: sparse, and cold. Every restart is
    // a full load (no idle copies).
    let config = SimConfig { idle_gpu_copies: false, ..SimConfig::default() };
    let mut deps = Vec::new();
    for i in 0..6 {
        let calls = (0..96).map(move |k| f64::from(i) * 60.0 + f64::from(k) * 1800.0);
        deps.push(dep(&format!("old-{i}"), 80, requests(calls)));
    }
    for i in 0..6 {
        let calls = (0..4).map(move |k| 86_400.0 + f64::from(i) * 300.0 + f64::from(k) * 1800.0);
        deps.push(dep(&format!("new-{i}"), 80, requests(calls)));
    }
    let adaptive = run_with(config.clone(), &deps, "adaptive");
    for (i, d) in adaptive.per_deployment[6..].iter().enumerate() {
        assert_eq!(d.requests, 4);
        // The first idle time has nothing to go by (the break-even timer, capped at an hour, keeps it warm for the
        // 30 minutes); from the second on, the neighbours' pool says "back in 30 minutes": a pre-warm, not another
        // half hour warm (three would be 5,400 GPU-seconds).
        assert!(d.gpu_seconds.idle_warm < 3_000.0, "newcomer {i}: {:?}", d.gpu_seconds);
        assert!(d.cold_starts <= 2, "newcomer {i}: {} cold starts", d.cold_starts);
    }
    for timer in ["fixed:90s", "fixed:600s"] {
        let fixed = run_with(config.clone(), &deps, timer);
        assert!(
            adaptive.total_cost_usd <= fixed.total_cost_usd,
            "adaptive ${:.2} vs {timer} ${:.2}",
            adaptive.total_cost_usd,
            fixed.total_cost_usd
        );
    }
}
