//! `kiln simulate serving`: keep-alive policies compared on real traces, through the serving simulator of
//! `kiln-sim` (the controller's control loop, `kiln_core::control::Control`, on a virtual clock).

use std::{
    fs,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use kiln_core::{
    autoscale::keepalive::Policy as KeepAlivePolicy,
    billing::{GpuPrice, PriceTable},
    money::Money,
    placement::Policy,
};
use kiln_sim::{
    serving::{
        DeploymentSpec, FleetSpec, KeepAliveChoice, Outcome, RentalOutcome, RentalPlan, SimConfig, Source,
        hindsight_oracle, simulate,
    },
    traces,
};
use serde_json::{Value, json};

use super::{calendar, report};

/// Options of `kiln simulate serving`.
#[derive(Debug, clap::Args)]
pub struct ServingArgs {
    /// ServeGen directory: each `chunk-<n>-trace.csv` is one deployment, in the order of `n`.
    #[arg(long)]
    pub servegen: Option<PathBuf>,
    /// Azure LLM inference trace CSV; each file is one deployment (repeatable).
    #[arg(long = "azure-llm")]
    pub azure_llm: Vec<PathBuf>,
    /// Fleet: <gpu>-<memory>gb:<gpus per node>x<nodes>.
    #[arg(long, default_value = "h100-80gb:8x16")]
    pub fleet: String,
    /// Model sizes in GB, assigned to the deployments in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,40,80,140")]
    pub model_sizes: Vec<f64>,
    /// Keep-alive policies to compare (repeat or separate with commas): fixed:<duration>, adaptive, oracle.
    #[arg(long = "keep-alive", value_delimiter = ',', default_value = "fixed:600s,fixed:90s,adaptive,oracle")]
    pub keep_alive: Vec<String>,
    /// Simulated days from the start of the traces.
    #[arg(long, default_value_t = 2.0)]
    pub days: f64,
    /// Multiplies ServeGen request rates (thins Azure requests when below 1).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Seed for arrivals and load times.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Price of one GPU-hour, dollars.
    #[arg(long, default_value_t = 2.5)]
    pub gpu_usd_per_hour: f64,
    /// What a second of a request waiting on a load is worth, dollars: the exchange rate `adaptive` uses between
    /// waiting and idle GPU time (higher: fewer cold starts, more idle GPU).
    #[arg(long, default_value_t = 0.5)]
    pub wait_usd_per_s: f64,
    /// Do not leave weights in GPU memory when a replica stops (every restart is then a full load).
    #[arg(long)]
    pub no_idle_copies: bool,
    /// Requests one replica serves at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u32,
    /// Placement policy for replicas.
    #[arg(long, default_value = "kiln")]
    pub placement: Policy,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// A rental calendar (YAML, see `examples/rentals/calendar-2d.yaml`) replayed beside the trace through the
    /// controller's rental and billing code; the report adds revenue, utilisation and the cold starts fences cost.
    #[arg(long)]
    pub rentals: Option<PathBuf>,
    /// With --rentals: the rental price per GPU-hour, dollars (billed per started hour). The serverless price per
    /// GPU-second is --gpu-usd-per-hour / 3600.
    #[arg(long, default_value = "2.00")]
    pub rental_usd_per_gpu_hour: String,
    /// With --rentals: the share of the serverless price a rental's owner is credited for lent GPU-seconds.
    #[arg(long, default_value = "0.5")]
    pub lending_share: String,
    /// With --rentals: lend idle rented GPUs to serverless work: off, on (every rental), or as the calendar says.
    #[arg(long, value_enum, default_value = "calendar")]
    pub lending: calendar::Lending,
    /// With --rentals: the wall-clock time of the trace's start (RFC 3339), for the calendar's absolute times.
    #[arg(long, default_value = "2026-01-01T00:00:00Z")]
    pub trace_start: String,
}

#[derive(Debug, Clone)]
enum Choice {
    Policy(KeepAlivePolicy),
    Oracle,
}

fn parse_choice(spec: &str) -> Result<Choice> {
    if spec == "oracle" {
        return Ok(Choice::Oracle);
    }
    KeepAlivePolicy::parse(spec).map(Choice::Policy).map_err(|e| anyhow::anyhow!("{e} (or oracle)"))
}

/// The client number of a ServeGen file name `chunk-<n>-trace.csv`.
fn client_number(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("chunk-")?.strip_suffix("-trace.csv")?.parse().ok()
}

fn load_deployments(args: &ServingArgs) -> Result<Vec<DeploymentSpec>> {
    if args.model_sizes.is_empty() || args.model_sizes.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        bail!("--model-sizes must be positive numbers of GB, e.g. 1,4,16,40,80,140");
    }
    let mut sources: Vec<(String, Source)> = Vec::new();
    if let Some(dir) = &args.servegen {
        let mut files: Vec<(u32, PathBuf)> = fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter_map(|path| client_number(&path).map(|n| (n, path)))
            .collect();
        if files.is_empty() {
            bail!("{}: no ServeGen client files (chunk-<n>-trace.csv)", dir.display());
        }
        files.sort();
        for (_, path) in files {
            let name = path.display().to_string();
            let text = fs::read_to_string(&path).with_context(|| format!("reading {name}"))?;
            sources.push((name.clone(), Source::Windows(traces::parse_servegen(&name, &text)?)));
        }
    }
    for path in &args.azure_llm {
        let name = path.display().to_string();
        let text = fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
        sources.push((name.clone(), Source::Requests(traces::parse_azure(&name, &text)?)));
    }
    if sources.is_empty() {
        bail!("no traces: give --servegen DIR and/or --azure-llm FILE");
    }
    Ok(sources
        .into_iter()
        .enumerate()
        .map(|(i, (name, source))| DeploymentSpec {
            name,
            weights_bytes: (args.model_sizes[i % args.model_sizes.len()] * 1e9) as u64,
            source,
        })
        .collect())
}

fn progress_bar(label: &str, quiet: bool) -> impl FnMut(f64) {
    let label = label.to_owned();
    let mut last = -1i64;
    move |fraction: f64| {
        let pct = (fraction * 100.0).floor() as i64;
        if quiet || pct == last || !std::io::stderr().is_terminal() {
            return;
        }
        last = pct;
        let filled = (pct / 4) as usize;
        eprint!("\r{label:<14} [{}{}] {pct:>3}%", "#".repeat(filled), "-".repeat(25 - filled.min(25)));
        if pct >= 100 {
            eprintln!();
        }
        std::io::stderr().flush().ok();
    }
}

/// Runs `kiln simulate serving`.
pub fn serving(args: &ServingArgs) -> Result<()> {
    if !(args.days > 0.0 && args.days <= 14.0) {
        bail!("--days must be in (0, 14], not {}", args.days);
    }
    if !(args.rate_scale > 0.0 && args.rate_scale.is_finite()) {
        bail!("--rate-scale must be positive, not {}", args.rate_scale);
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let fleet = FleetSpec::parse(&args.fleet)?;
    let choices: Vec<(String, Choice)> =
        args.keep_alive.iter().map(|s| parse_choice(s).map(|c| (s.clone(), c))).collect::<Result<_>>()?;
    let deployments = load_deployments(args)?;
    let mut config = SimConfig {
        days: args.days,
        rate_scale: args.rate_scale,
        seed: args.seed,
        gpu_usd_per_hour: args.gpu_usd_per_hour,
        wait_usd_per_s: args.wait_usd_per_s,
        max_concurrency: args.concurrency,
        placement: args.placement,
        idle_gpu_copies: !args.no_idle_copies,
        ..SimConfig::default()
    };
    config.scaling.target_concurrency = (0.7 * f64::from(args.concurrency)).max(1.0);
    if let Some(path) = &args.rentals {
        config.rentals = Some(rental_plan(args, path, &fleet)?);
    }
    // What the traces hold: simulating past it adds only idle time, so say so.
    let span_days = deployments.iter().map(|d| d.source.span_s()).fold(0.0, f64::max) / 86_400.0;
    let covered = if args.days > span_days * 1.01 {
        eprintln!(
            "warning: --days {} goes past the traces, which hold {span_days:.2} days; the last {:.2} days simulated \
             have no requests",
            args.days,
            args.days - span_days
        );
        format!(" (the traces hold {span_days:.2} days: the rest has no requests)")
    } else {
        String::new()
    };
    eprintln!(
        "{} deployments, fleet {} ({} GPUs), {} days, rate scale {}, seed {}",
        deployments.len(),
        args.fleet,
        fleet.gpus(),
        args.days,
        args.rate_scale,
        args.seed
    );

    let mut results: Vec<(String, Outcome, f64)> = Vec::new();
    for (name, choice) in &choices {
        let start = Instant::now();
        let outcome = match choice {
            Choice::Policy(p) => {
                let mut bar = progress_bar(name, args.quiet);
                simulate(&config, &fleet, &deployments, &KeepAliveChoice::Uniform(*p), &mut bar)
            }
            // The cheapest fixed timer per deployment found in hindsight, under the total cost.
            Choice::Oracle => hindsight_oracle(&config, &fleet, &deployments, &mut progress_bar(name, args.quiet)).1,
        };
        results.push((name.clone(), outcome, start.elapsed().as_secs_f64()));
    }

    print_table(&results);
    if config.rentals.is_some() {
        print_rentals(&results);
    }
    let settings = vec![
        format!("traces: {} deployments", deployments.len()),
        format!("fleet {} ({} GPUs), placement {}", args.fleet, fleet.gpus(), args.placement),
        format!(
            "model sizes {:?} GB, {} days{covered}, rate scale {}, seed {}",
            args.model_sizes, args.days, args.rate_scale, args.seed
        ),
        format!(
            "${}/GPU-hour, cold-start wait valued at ${}/s, {} requests per replica",
            args.gpu_usd_per_hour, args.wait_usd_per_s, args.concurrency
        ),
    ];
    let mut settings = settings;
    if let (Some(path), Some(plan)) = (&args.rentals, &config.rentals) {
        settings.push(format!(
            "rentals {} ({} rentals, lending {:?}), trace start {}, ${}/GPU-hour rented, lending share {}",
            path.display(),
            plan.rentals.len(),
            args.lending,
            args.trace_start,
            args.rental_usd_per_gpu_hour,
            args.lending_share
        ));
    }
    if let Some(path) = &args.json {
        let names: Vec<&str> = deployments.iter().map(|d| d.name.as_str()).collect();
        let json = to_json(&results, &names, &settings);
        fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.html {
        let runs: Vec<report::Run<'_>> =
            results.iter().map(|(name, outcome, _)| report::Run { policy: name, outcome }).collect();
        fs::write(path, report::html("kiln simulate serving", &settings, &runs))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print_table(results: &[(String, Outcome, f64)]) {
    println!(
        "{:<13} {:>9} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "keep-alive",
        "requests",
        "warm hits",
        "cold",
        "cold%",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "busy GPU-s",
        "idle GPU-s",
        "load GPU-s",
        "prewarms",
        "GPU $",
        "wait $",
        "total $",
        "sim req/s"
    );
    for (name, o, seconds) in results {
        let g = o.gpu_seconds;
        println!(
            "{:<13} {:>9} {:>8} {:>8} {:>7.3} {:>9.0} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>9.0} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>11.0}",
            name,
            o.requests,
            o.warm_hits,
            o.cold_starts,
            100.0 * o.cold_start_rate(),
            o.latency_ms[0],
            o.latency_ms[1],
            o.latency_ms[2],
            g.busy,
            g.idle_warm,
            g.loading,
            o.prewarms,
            o.gpu_cost_usd,
            o.wait_cost_usd,
            o.total_cost_usd,
            o.requests as f64 / seconds.max(1e-9)
        );
    }
}

/// The plan of `--rentals`: the calendar, checked against the fleet, with the prices of the flags.
fn rental_plan(args: &ServingArgs, path: &Path, fleet: &FleetSpec) -> Result<RentalPlan> {
    let start = calendar::parse_rfc3339(&args.trace_start)
        .ok_or_else(|| anyhow::anyhow!("--trace-start {:?} is not an RFC 3339 time", args.trace_start))?;
    if !(args.gpu_usd_per_hour.is_finite() && args.gpu_usd_per_hour >= 0.0) {
        bail!("--gpu-usd-per-hour must not be negative");
    }
    let per_hour = Money::parse(&args.gpu_usd_per_hour.to_string()).context("--gpu-usd-per-hour")?;
    let per_second = per_hour.mul_div(1, 3600).context("--gpu-usd-per-hour")?;
    let price =
        GpuPrice::parse(&fleet.gpu_model, &per_second.to_string(), &args.rental_usd_per_gpu_hour, &args.lending_share)
            .context("prices")?;
    let prices = PriceTable::new("USD").with(fleet.gpu_model.clone(), price);
    calendar::load(path, fleet, start, prices, args.lending)
}

fn print_rentals(results: &[(String, Outcome, f64)]) {
    println!();
    println!(
        "{:<13} {:>11} {:>10} {:>10} {:>10} {:>10} {:>11} {:>7} {:>8} {:>7} {:>7} {:>9} {:>11} {:>10}",
        "rentals",
        "serverless$",
        "(busy)",
        "(idle)",
        "(loading)",
        "rental $",
        "lending $",
        "total $",
        "busy%",
        "rented%",
        "paid%",
        "fenced",
        "reclaimed",
        "cold after"
    );
    for (name, o, _) in results {
        let Some(r) = &o.rentals else { continue };
        let v = &r.revenue;
        let usd = |m: Money| m.round_dp(2).to_string();
        println!(
            "{:<13} {:>11} {:>10} {:>10} {:>10} {:>10} {:>11} {:>7} {:>8.2} {:>7.2} {:>7.2} {:>9} {:>11} {:>10}",
            name,
            usd(v.serverless),
            usd(v.serverless_busy),
            usd(v.serverless_idle_warm),
            usd(v.serverless_loading),
            usd(v.rental_hours),
            usd(v.lending_credits),
            usd(v.total),
            100.0 * r.busy_utilisation(),
            100.0 * r.rented_share(),
            100.0 * r.paid_share(),
            r.fenced_stops,
            r.reclaimed_stops,
            r.cold_starts_after_fence + r.cold_starts_after_reclaim
        );
    }
    for (name, o, _) in results {
        let Some(r) = &o.rentals else { continue };
        let phases: Vec<String> = {
            let mut by: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
            for line in &r.rentals {
                *by.entry(line.phase.as_str()).or_default() += 1;
            }
            by.into_iter().map(|(p, n)| format!("{n} {p}")).collect()
        };
        println!(
            "{name}: rentals {}; lent {:.1} GPU-h earned owners ${}; {} requests in flight on stopped replicas; cold \
             starts after fences {}, after reclaims {}",
            phases.join(", "),
            r.lent_gpu_s / 3600.0,
            r.revenue.lending_credits.checked_neg().unwrap_or(Money::ZERO).round_dp(2),
            r.in_flight_at_stops,
            r.cold_starts_after_fence,
            r.cold_starts_after_reclaim
        );
        if let Some(e) = &r.billing_error {
            eprintln!("warning: {name}: billing failed: {e}");
        }
    }
}

/// The `rentals` object of a policy in the JSON report: amounts as exact decimal strings in `currency`.
fn rentals_json(r: &RentalOutcome) -> Value {
    let m = |m: Money| Value::String(m.to_string());
    let v = &r.revenue;
    let lines: Vec<Value> = r
        .rentals
        .iter()
        .map(|l| {
            json!({
                "key": l.key,
                "gpus": l.gpus,
                "lend_when_idle": l.lend_when_idle,
                "phase": l.phase,
                "reason": l.reason,
                "delivered_s": l.delivered_s,
                "billed_gpu_hours": l.billed_gpu_hours,
                "billed": m(l.billed),
                "lent_gpu_s": l.lent_gpu_s,
                "lending_earned": m(l.lending_earned),
            })
        })
        .collect();
    let s = r.serverless_gpu_s;
    json!({
        "currency": r.currency,
        "revenue": {
            "serverless": {
                "loading": m(v.serverless_loading),
                "busy": m(v.serverless_busy),
                "idle_warm": m(v.serverless_idle_warm),
                "total": m(v.serverless),
            },
            "rental_hours": m(v.rental_hours),
            "lending_credits": m(v.lending_credits),
            "failure_credits": m(v.failure_credits),
            "total": m(v.total),
        },
        "gpu_seconds": {
            "fleet": r.fleet_gpu_s,
            "serverless": {"busy": s.busy, "idle_warm": s.idle_warm, "loading": s.loading},
            "rented": r.rented_gpu_s,
            "lent": r.lent_gpu_s,
        },
        "utilisation": {"busy": r.busy_utilisation(), "rented_share": r.rented_share(), "paid_share": r.paid_share()},
        "stops": {"fenced": r.fenced_stops, "reclaimed": r.reclaimed_stops, "requests_in_flight": r.in_flight_at_stops},
        "cold_starts_after": {"fence": r.cold_starts_after_fence, "reclaim": r.cold_starts_after_reclaim},
        "lending_earned": m(v.lending_credits.checked_neg().unwrap_or(Money::ZERO)),
        "records": r.records,
        "billing_error": r.billing_error,
        "rentals": lines,
    })
}

/// The JSON report: no wall-clock figures, so the same seed gives the same bytes. Costs in dollars: `gpu_cost_usd`
/// (the GPU bill), `wait_cost_usd` (requests' waiting for loads, `wait_s`, at `--wait-usd-per-s`) and their sum
/// `total_cost_usd`, per policy and per deployment (in `deployments`, in trace order).
fn to_json(results: &[(String, Outcome, f64)], names: &[&str], settings: &[String]) -> Value {
    let policies: Vec<Value> = results
        .iter()
        .map(|(name, o, _)| {
            let deployments: Vec<Value> = o
                .per_deployment
                .iter()
                .zip(names)
                .map(|(d, name)| {
                    json!({
                        "name": name,
                        "requests": d.requests,
                        "cold_starts": d.cold_starts,
                        "gpu_seconds": {
                            "busy": d.gpu_seconds.busy,
                            "idle_warm": d.gpu_seconds.idle_warm,
                            "loading": d.gpu_seconds.loading,
                        },
                        "wait_s": d.wait_s,
                        "gpu_cost_usd": d.gpu_cost_usd,
                        "wait_cost_usd": d.wait_cost_usd,
                        "total_cost_usd": d.total_cost_usd,
                    })
                })
                .collect();
            let mut policy = json!({
                "policy": name,
                "requests": o.requests,
                "cold_starts": o.cold_starts,
                "warm_hits": o.warm_hits,
                "cold_start_rate": o.cold_start_rate(),
                "latency_ms": {"p50": o.latency_ms[0], "p95": o.latency_ms[1], "p99": o.latency_ms[2]},
                "gpu_seconds": {
                    "busy": o.gpu_seconds.busy,
                    "idle_warm": o.gpu_seconds.idle_warm,
                    "loading": o.gpu_seconds.loading,
                },
                "wait_s": o.wait_s,
                "gpu_cost_usd": o.gpu_cost_usd,
                "wait_cost_usd": o.wait_cost_usd,
                "total_cost_usd": o.total_cost_usd,
                "prewarms": o.prewarms,
                "demand_loads_by_tier": {
                    "gpu": o.demand_loads[0],
                    "host_ram": o.demand_loads[1],
                    "disk": o.demand_loads[2],
                    "remote": o.demand_loads[3],
                },
                "unschedulable": o.unschedulable,
                "deployments": deployments,
            });
            if let Some(r) = &o.rentals {
                policy["rentals"] = rentals_json(r);
            }
            policy
        })
        .collect();
    json!({"settings": settings, "policies": policies})
}
