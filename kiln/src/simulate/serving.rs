//! `kiln simulate serving`: keep-alive policies compared on real traces, through the serving simulator of
//! `kiln-sim` (the controller's control loop, `kiln_core::control::Control`, on a virtual clock).

use std::{
    fs,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use kiln_core::{autoscale::keepalive::Policy as KeepAlivePolicy, placement::Policy};
use kiln_sim::{
    serving::{DeploymentSpec, FleetSpec, KeepAliveChoice, Outcome, SimConfig, Source, hindsight_oracle, simulate},
    traces,
};
use serde_json::{Value, json};

use super::report;

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
            json!({
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
            })
        })
        .collect();
    json!({"settings": settings, "policies": policies})
}
