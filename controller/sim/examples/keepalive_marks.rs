//! A quick loop for keep-alive work: `kiln simulate serving`'s ServeGen setup (default fleet, model sizes
//! 1,4,16,40,80,140 GB in client order, 16 requests per replica) without the CLI, each keep-alive policy's total
//! cost beside the best fixed timer and the hindsight oracle.
//!
//! `cargo run --release -p kiln-sim --example keepalive_marks -- SERVEGEN_DIR DAYS RATE_SCALE [POLICY ...]`
//! (POLICY: `fixed:<duration>`, `adaptive`, `oracle`; default fixed:30s,fixed:90s,fixed:300s,fixed:600s,adaptive,
//! oracle). Environment: `PRIOR_SAMPLES` overrides the adaptive policy's prior strength
//! ([`AdaptiveConfig::prior_samples`]); `DUMP=PREFIX` writes each policy's per-deployment figures (GB, requests,
//! cold starts, idle GPU-s, GPU $, wait $, total $) to `PREFIX.<policy>`.

use std::{env, fs, path::PathBuf};

use kiln_core::autoscale::keepalive::{AdaptiveConfig, Policy};
use kiln_sim::{
    serving::{DeploymentSpec, FleetSpec, KeepAliveChoice, Outcome, SimConfig, Source, hindsight_oracle, simulate},
    traces,
};

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: keepalive_marks SERVEGEN_DIR DAYS RATE_SCALE [POLICY ...]");
        std::process::exit(2);
    }
    let dir = PathBuf::from(&args[0]);
    let days: f64 = args[1].parse().expect("days");
    let rate_scale: f64 = args[2].parse().expect("a rate scale");
    let policies: Vec<String> = if args.len() > 3 {
        args[3..].to_vec()
    } else {
        "fixed:30s,fixed:90s,fixed:300s,fixed:600s,adaptive,oracle".split(',').map(str::to_owned).collect()
    };
    let mut files: Vec<(u32, PathBuf)> = fs::read_dir(&dir)
        .expect("the ServeGen directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?.strip_prefix("chunk-")?.strip_suffix("-trace.csv")?.parse().ok()?;
            Some((n, p))
        })
        .collect();
    files.sort();
    let sizes = [1.0, 4.0, 16.0, 40.0, 80.0, 140.0];
    let deployments: Vec<DeploymentSpec> = files
        .iter()
        .enumerate()
        .map(|(i, (_, path))| {
            let name = path.display().to_string();
            let text = fs::read_to_string(path).expect("a client file");
            DeploymentSpec {
                weights_bytes: (sizes[i % sizes.len()] * 1e9) as u64,
                source: Source::Windows(traces::parse_servegen(&name, &text).expect("a ServeGen client")),
                name,
            }
        })
        .collect();
    let fleet = FleetSpec::parse("h100-80gb:8x16").expect("the default fleet");
    let mut config = SimConfig { days, rate_scale, ..SimConfig::default() };
    config.scaling.target_concurrency = (0.7 * f64::from(config.max_concurrency)).max(1.0);
    println!(
        "{:<12} {:>8} {:>7} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "keep-alive", "requests", "cold", "busy GPU-s", "idle GPU-s", "GPU $", "wait $", "total $"
    );
    let mut rows: Vec<(String, Outcome)> = Vec::new();
    for p in &policies {
        let outcome = if p == "oracle" {
            hindsight_oracle(&config, &fleet, &deployments, &mut |_| {}).1
        } else {
            let policy = match (Policy::parse(p).expect("a keep-alive policy"), env::var("PRIOR_SAMPLES")) {
                (Policy::Adaptive(c), Ok(k)) => {
                    Policy::Adaptive(AdaptiveConfig { prior_samples: k.parse().expect("a prior strength"), ..c })
                }
                (policy, _) => policy,
            };
            simulate(&config, &fleet, &deployments, &KeepAliveChoice::Uniform(policy), &mut |_| {})
        };
        println!(
            "{:<12} {:>8} {:>7} {:>11.0} {:>11.0} {:>9.2} {:>9.2} {:>9.2}",
            p,
            outcome.requests,
            outcome.cold_starts,
            outcome.gpu_seconds.busy,
            outcome.gpu_seconds.idle_warm,
            outcome.gpu_cost_usd,
            outcome.wait_cost_usd,
            outcome.total_cost_usd
        );
        if let Ok(path) = env::var("DUMP") {
            let lines: Vec<String> = outcome
                .per_deployment
                .iter()
                .zip(&deployments)
                .map(|(d, spec)| {
                    format!(
                        "{} {} {} {} {:.2} {:.2} {:.2}",
                        spec.weights_bytes / 1_000_000_000,
                        d.requests,
                        d.cold_starts,
                        d.gpu_seconds.idle_warm as u64,
                        d.gpu_cost_usd,
                        d.wait_cost_usd,
                        d.total_cost_usd
                    )
                })
                .collect();
            fs::write(format!("{path}.{}", p.replace(':', "_")), lines.join("\n") + "\n").expect("the dump");
        }
        rows.push((p.clone(), outcome));
    }
    let total = |name: &str| rows.iter().find(|(p, _)| p == name).map(|(_, o)| o.total_cost_usd);
    if let Some(a) = total("adaptive") {
        let fixed = rows
            .iter()
            .filter(|(p, _)| p.starts_with("fixed:"))
            .map(|(p, o)| (p.as_str(), o.total_cost_usd))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((p, f)) = fixed {
            println!("adaptive / best fixed ({p}): {:.3}", a / f);
        }
        if let Some(o) = total("oracle") {
            println!("adaptive / oracle: {:.3}", a / o);
        }
    }
}
