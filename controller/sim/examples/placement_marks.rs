//! A quick loop for placement work: the FGD experiment on several pod lists (and generated variants), each policy
//! over seeds, medians at the reported marks beside the published FGD medians, and `kiln - fgd` at its worst mark
//! from 90 to 130.
//!
//! `cargo run --release -p kiln-sim --example placement_marks -- NODES.csv LIST.csv[:VARIANT] ...`
//! Environment: `POLICIES` (default `fgd,kiln`), `SEEDS` (first-last, default `42-51`), `THREADS` (default 2),
//! `EXPECTED` (the artifact's results directory, default `fgd-expected-results` beside the list's directory),
//! `VARIANT_SEED` (the seed a variant is drawn with, default 0, as `kiln simulate placement` draws it) or
//! `VARIANT_SEEDS` (first-last: several draws of each variant, every run seed on each; the medians are then over
//! all their runs, and a line gives the spread of the draws' own medians).

use std::{collections::BTreeMap, env, fs, path::Path, thread};

use kiln_core::placement::{Cluster, Policy, Request, Workload};
use kiln_sim::{
    experiment::{REPORTED_MARKS, SeedRun, median_at, run_seed},
    openb,
    variant::Variant,
};

fn published(dir: &Path, workload: &str) -> Option<Vec<f64>> {
    let text = fs::read_to_string(dir.join("derived_median_gpu_alloc_pct_by_arrival.csv")).ok()?;
    text.lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|c| c[0] == workload && c[1] == "06-FGD")
        .map(|c| c[2..].iter().map(|v| v.parse().unwrap_or(f64::NAN)).collect())
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: placement_marks NODES.csv LIST.csv[:VARIANT] ... (VARIANT: cpuN, shareN, gangN, constrainedN, \
             share-only, gang-heavy, constrained)"
        );
        std::process::exit(2);
    }
    let policies: Vec<Policy> = env::var("POLICIES")
        .unwrap_or_else(|_| "fgd,kiln".into())
        .split(',')
        .map(|p| p.parse().expect("a policy"))
        .collect();
    let seeds = env::var("SEEDS").unwrap_or_else(|_| "42-51".into());
    let (a, b) = seeds.split_once('-').unwrap_or((&seeds, &seeds));
    let seeds: Vec<u64> = (a.parse().expect("seed")..=b.parse().expect("seed")).collect();
    let threads: usize = env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let variant_seeds: Vec<u64> = match (env::var("VARIANT_SEEDS"), env::var("VARIANT_SEED")) {
        (Ok(range), _) => {
            let (a, b) = range.split_once('-').unwrap_or((&range, &range));
            (a.parse().expect("a variant seed")..=b.parse().expect("a variant seed")).collect()
        }
        (_, Ok(seed)) => vec![seed.parse().expect("a variant seed")],
        _ => vec![0],
    };
    let nodes_text = fs::read_to_string(&args[0]).expect("nodes");
    let cluster = Cluster::new(&openb::parse_nodes(&args[0], &nodes_text).expect("nodes")).expect("cluster");
    println!(
        "{:<28} {:<6} {:>7} {:>7} {:>7} {:>7} {:>7}  worst(kiln-fgd)@mark",
        "list", "policy", 90, 95, 100, 110, 130
    );
    for spec in &args[1..] {
        let (path, variant) = match spec.split_once(':') {
            Some((p, v)) => (p, Some(v.parse::<Variant>().expect("a variant"))),
            None => (spec.as_str(), None),
        };
        let text = fs::read_to_string(path).expect("pods");
        let list = openb::parse_pods(path, &text, &cluster).expect("pods");
        let draws: Vec<Vec<Request>> = match variant {
            Some(v) => variant_seeds.iter().map(|&vs| v.apply(&list.pods, vs).expect("variant")).collect(),
            None => vec![list.pods],
        };
        let stem = Path::new(path).file_stem().expect("a file name").to_string_lossy().into_owned();
        // The published list to compare with, and the label of the rows (the list, and the variant drawn from it).
        let (name, label) = match variant {
            Some(v) => (v.artifact_workload(), format!("{}:{v}", stem.trim_start_matches("openb_pod_list_"))),
            None => (stem.clone(), stem.trim_start_matches("openb_pod_list_").to_owned()),
        };
        let expected = env::var("EXPECTED").map(Into::into).unwrap_or_else(|_| {
            Path::new(path).parent().and_then(Path::parent).unwrap_or(Path::new(".")).join("fgd-expected-results")
        });
        let mut medians: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for &policy in &policies {
            let mut runs: Vec<SeedRun> = Vec::new();
            let mut per_draw: Vec<Vec<f64>> = Vec::new();
            for pods in &draws {
                let workload = Workload::from_requests(pods);
                let chunks: Vec<Vec<u64>> = seeds.chunks(seeds.len().div_ceil(threads)).map(<[u64]>::to_vec).collect();
                let draw_runs: Vec<SeedRun> = thread::scope(|s| {
                    let handles: Vec<_> = chunks
                        .iter()
                        .map(|chunk| {
                            let (cluster, pods, workload) = (&cluster, pods, &workload);
                            s.spawn(move || {
                                chunk
                                    .iter()
                                    .map(|&seed| run_seed(cluster, pods, workload, policy, seed, 1.3))
                                    .collect::<Vec<_>>()
                            })
                        })
                        .collect();
                    handles.into_iter().flat_map(|h| h.join().expect("a seed run")).collect()
                });
                per_draw.push(REPORTED_MARKS.iter().map(|&m| median_at(&draw_runs, m, |r| &r.alloc_pct)).collect());
                runs.extend(draw_runs);
            }
            let series: Vec<f64> = (0..=130).map(|m| median_at(&runs, m, |r| &r.alloc_pct)).collect();
            let row: Vec<String> = REPORTED_MARKS.iter().map(|&m| format!("{:>7.2}", series[m as usize])).collect();
            println!("{label:<28} {:<6} {}", policy.name(), row.join(" "));
            if per_draw.len() > 1 {
                let spread: Vec<String> = (0..REPORTED_MARKS.len())
                    .map(|i| {
                        let (lo, hi) =
                            per_draw.iter().fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(d[i]), hi.max(d[i])));
                        format!("{lo:>6.2}-{hi:<6.2}")
                    })
                    .collect();
                println!("{label:<28} {:<6} {} ({} draws' medians)", "", spread.join(" "), per_draw.len());
            }
            medians.insert(policy.name(), series);
        }
        let paper = published(&expected, &name);
        if let Some(p) = &paper {
            let row: Vec<String> = REPORTED_MARKS.iter().map(|&m| format!("{:>7.2}", p[m as usize])).collect();
            println!("{label:<28} {:<6} {} ({name})", "paper", row.join(" "));
        }
        // The worst mark from 90 to 130 of `a - b`.
        let worst = |a: &[f64], b: &[f64]| {
            (90..=130).map(|m| (m, a[m] - b[m])).min_by(|x, y| x.1.total_cmp(&y.1)).expect("marks")
        };
        let marks = |s: &[f64]| format!("{:.2} / {:.2} / {:.2}", s[90], s[100], s[130]);
        if let (Some(k), Some(f)) = (medians.get("kiln"), medians.get("fgd")) {
            let (mark, gap) = worst(k, f);
            let mut line = format!("{label:<28} worst kiln-fgd {gap:+.3} pp at {mark}");
            let mut table = format!("| {label} | {} | ", marks(f));
            match &paper {
                Some(p) => {
                    let (pmark, pgap) = worst(k, p);
                    let (fmark, fgap) = (90..=130)
                        .map(|m| (m, f[m] - p[m]))
                        .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
                        .expect("marks");
                    line += &format!(", kiln-paper {pgap:+.3} pp at {pmark}, |fgd-paper| {fgap:+.3} pp at {fmark}");
                    table += &format!("{} | {} | {gap:+.3} ({mark}) | {pgap:+.3} ({pmark}) |", marks(p), marks(k));
                }
                None => table += &format!("- | {} | {gap:+.3} ({mark}) | - |", marks(k)),
            }
            println!("{line}");
            println!("{table}");
        }
    }
}
