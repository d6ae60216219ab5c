//! `kiln simulate placement`: the FGD paper's experiment through Kiln's placement engine, side by side with the
//! paper artifact's published medians.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use kiln_core::placement::{Cluster, Policy, Workload};
use kiln_sim::{
    experiment::{REPORTED_MARKS, SeedRun, median_at, run_seed},
    openb,
    variant::Variant,
};
use serde_json::{Value, json};

/// Options of `kiln simulate placement`.
#[derive(Debug, clap::Args)]
pub struct PlacementArgs {
    /// Node list CSV (sn,cpu_milli,memory_mib,gpu,model).
    #[arg(long)]
    pub nodes: PathBuf,
    /// Pod list CSV (cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec]).
    #[arg(long)]
    pub pods: PathBuf,
    /// Policies to compare (repeat or separate with commas): random, dotprod, clustering, packing, bestfit, fgd, kiln.
    #[arg(long = "policy", value_delimiter = ',', default_value = "kiln")]
    pub policies: Vec<Policy>,
    /// Seeds: a range `42-51` or a list `42,43`.
    #[arg(long, default_value = "42-51")]
    pub seeds: String,
    /// Total requested GPU as a multiple of cluster capacity.
    #[arg(long, default_value_t = 1.3)]
    pub inflation: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run on a variant generated from the pod list instead of the list itself, compared with the published
    /// medians of the artifact's matching list: `cpuN` (CPU-only pods N per mille of the pods: `cpu050` to
    /// `cpu250`), `shareN` (the GPU pods that are not shares replaced by the list's shares until shares carry N% of
    /// the GPU demand: `gpushare40` to `gpushare100`; `share-only` = `share100`), `gangN` (the list's gangs appended
    /// until they carry N%: `multigpu20` to `multigpu50`; `gang-heavy` = `gang50`), all made from the default list
    /// as the artifact made them, `constrained` (a third of the GPU pods restricted to GPU models: `gpuspec33`) or
    /// `constrainedN` (N% of them: `gpuspecN`, published for 10, 20 and 25). A constrained variant draws every restriction afresh, each kind of pod (share, one GPU, gang) at its
    /// own rate and to the model sets of the list's restricted pods of the same kind, so use a list that has some,
    /// such as `gpuspec20`. The variant is drawn once, with seed 0, and shared by every run seed.
    #[arg(long)]
    pub variant: Option<Variant>,
    /// Directory of the FGD artifact's results (derived_median_gpu_alloc_pct_by_arrival.csv); by default
    /// `fgd-expected-results` next to the pod list's directory, when present.
    #[arg(long)]
    pub expected: Option<PathBuf>,
}

fn parse_seeds(spec: &str) -> Result<Vec<u64>> {
    let mut seeds = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
                if a > b {
                    bail!("seed range {part:?} runs backwards");
                }
                seeds.extend(a..=b);
            }
            None => seeds.push(part.parse().with_context(|| format!("seed {part:?} is not a number"))?),
        }
    }
    if seeds.is_empty() {
        bail!("no seeds given");
    }
    Ok(seeds)
}

/// Published per-policy medians of the allocation ratio for `workload`, keyed by artifact policy name, then mark.
fn published(dir: &Path, workload: &str) -> Result<BTreeMap<String, Vec<f64>>> {
    let path = dir.join("derived_median_gpu_alloc_pct_by_arrival.csv");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() < 3 || cells[0] != workload {
            continue;
        }
        let values: Vec<f64> = cells[2..].iter().map(|c| c.parse().unwrap_or(f64::NAN)).collect();
        out.insert(cells[1].to_owned(), values);
    }
    Ok(out)
}

pub fn placement(args: &PlacementArgs) -> Result<()> {
    let seeds = parse_seeds(&args.seeds)?;
    if !(1.0..=3.0).contains(&args.inflation) {
        bail!("--inflation must be between 1.0 and 3.0, not {}", args.inflation);
    }
    let nodes_name = args.nodes.display().to_string();
    let pods_name = args.pods.display().to_string();
    let nodes_text = fs::read_to_string(&args.nodes).with_context(|| format!("reading {nodes_name}"))?;
    let pods_text = fs::read_to_string(&args.pods).with_context(|| format!("reading {pods_name}"))?;
    let cluster = Cluster::new(&openb::parse_nodes(&nodes_name, &nodes_text)?)?;
    let list = openb::parse_pods(&pods_name, &pods_text, &cluster)?;
    let pods = match args.variant {
        Some(variant) => variant.apply(&list.pods, 0)?,
        None => list.pods,
    };
    if !list.infeasible_lines.is_empty() {
        let shown: Vec<String> = list.infeasible_lines.iter().take(10).map(usize::to_string).collect();
        eprintln!(
            "{} pod(s) no node could ever hold (counted as unscheduled, as in the paper's simulator): {pods_name} \
             line(s) {}{}",
            list.infeasible_lines.len(),
            shown.join(", "),
            if list.infeasible_lines.len() > shown.len() { ", ..." } else { "" }
        );
    }
    let workload = Workload::from_requests(&pods);
    let workload_name = match args.variant {
        Some(variant) => variant.artifact_workload(),
        None => args.pods.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let expected_dir = args.expected.clone().or_else(|| {
        let dir = args.pods.parent()?.parent()?.join("fgd-expected-results");
        dir.exists().then_some(dir)
    });
    let published = match &expected_dir {
        Some(dir) => published(dir, &workload_name)?,
        None => BTreeMap::new(),
    };
    eprintln!(
        "{} nodes, {} GPUs; {} pods of {} kinds from {workload_name}; seeds {:?}; inflation {}",
        cluster.len(),
        cluster.gpu_capacity_milli() / 1000,
        pods.len(),
        workload.kinds(),
        seeds,
        args.inflation
    );

    let mut results = Vec::new();
    for &policy in &args.policies {
        let mut runs: Vec<SeedRun> = Vec::new();
        let mut seconds = 0.0;
        for &seed in &seeds {
            let start = Instant::now();
            let run = run_seed(&cluster, &pods, &workload, policy, seed, args.inflation);
            seconds += start.elapsed().as_secs_f64();
            eprint!("\r{policy}: seed {seed} done ({}/{})   ", runs.len() + 1, seeds.len());
            std::io::stderr().flush().ok();
            runs.push(run);
        }
        eprintln!();
        let decisions: u64 = runs.iter().map(|r| r.decisions).sum();
        results.push((policy, runs, decisions as f64 / seconds.max(1e-9)));
    }

    print_table(&results, &published, &workload_name);
    if let Some(path) = &args.json {
        let mut json = to_json(&results, &published, &workload_name, &nodes_name, &pods_name, args.inflation);
        json["unschedulable_pods"] = json!(list.infeasible_lines.len());
        json["variant"] = json!(args.variant.map(Variant::name));
        fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn marks_object(f: impl Fn(u32) -> f64) -> Value {
    let map: serde_json::Map<String, Value> = REPORTED_MARKS.iter().map(|&m| (m.to_string(), json!(f(m)))).collect();
    Value::Object(map)
}

fn to_json(
    results: &[(Policy, Vec<SeedRun>, f64)],
    published: &BTreeMap<String, Vec<f64>>,
    workload: &str,
    nodes: &str,
    pods: &str,
    inflation: f64,
) -> Value {
    let policies: Vec<Value> = results
        .iter()
        .map(|(policy, runs, rate)| {
            let alloc = |m| median_at(runs, m, |r| &r.alloc_pct);
            let published = policy
                .artifact_name()
                .and_then(|name| published.get(name))
                .map(|values| marks_object(|m| values.get(m as usize).copied().unwrap_or(f64::NAN)));
            json!({
                "policy": policy.name(),
                "seeds": runs.iter().map(|r| r.seed).collect::<Vec<_>>(),
                "alloc_pct_median": marks_object(alloc),
                "unallocated_pct_median": marks_object(|m| 100.0 - alloc(m)),
                "frag_pct_median": marks_object(|m| median_at(runs, m, |r| &r.frag_pct)),
                "decisions_per_sec": rate.round(),
                "published_alloc_pct_median": published,
            })
        })
        .collect();
    json!({"workload": workload, "nodes": nodes, "pods": pods, "inflation": inflation, "policies": policies})
}

fn print_table(results: &[(Policy, Vec<SeedRun>, f64)], published: &BTreeMap<String, Vec<f64>>, workload: &str) {
    println!("GPU allocation ratio (%), median over seeds, by arrived GPU demand (% of capacity) -- {workload}");
    print!("{:<11}", "policy");
    // "(paper)" only where a published figure is shown beside Kiln's.
    let any_published = results.iter().any(|(p, ..)| p.artifact_name().is_some_and(|n| published.contains_key(n)));
    for m in REPORTED_MARKS {
        print!(" {:>15}", if any_published { format!("{m}% (paper)") } else { format!("{m}%") });
    }
    println!(" {:>9} {:>11}", "frag@100", "decisions/s");
    for (policy, runs, rate) in results {
        print!("{:<11}", policy.name());
        let paper = policy.artifact_name().and_then(|n| published.get(n));
        for m in REPORTED_MARKS {
            let ours = median_at(runs, m, |r| &r.alloc_pct);
            match paper.and_then(|v| v.get(m as usize)) {
                Some(p) => print!(" {:>15}", format!("{ours:.2} ({p:.2})")),
                None => print!(" {:>15}", format!("{ours:.2}")),
            }
        }
        println!(" {:>9.2} {:>11.0}", median_at(runs, 100, |r| &r.frag_pct), rate);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_seeds;

    #[test]
    fn seeds_parse_as_ranges_and_lists() {
        assert_eq!(parse_seeds("42-45").unwrap(), vec![42, 43, 44, 45]);
        assert_eq!(parse_seeds("1,5-6").unwrap(), vec![1, 5, 6]);
        assert!(parse_seeds("9-3").is_err());
        assert!(parse_seeds("x").is_err());
    }
}
