//! Runs the deterministic simulation over a range of seeds and prints a summary.
//!
//! `cargo run -p kiln-ledger --release --example sim_seeds -- <first-seed> <count> <replicas>`

use std::time::Instant;

use kiln_ledger::sim::{SimConfig, simulate};

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (first, count, replicas) =
        (args.first().copied().unwrap_or(0), args.get(1).copied().unwrap_or(100), args.get(2).copied().unwrap_or(3));
    let t = Instant::now();
    let mut failed = 0;
    let (mut crashes, mut steps, mut snaps) = (0u64, 0u64, 0u64);
    for seed in first..first + count {
        let r = simulate(SimConfig::new(seed, replicas));
        crashes += r.crashes.values().sum::<u64>();
        steps += r.steps;
        snaps += r.snapshots_installed;
        if !r.violations.is_empty() {
            failed += 1;
            println!("seed {seed}: {:#?}", r.violations);
        }
    }
    println!(
        "{count} seeds x {replicas} replicas: {failed} failed, {crashes} crashes, {snaps} snapshots installed, {steps} steps, {:.1?}",
        t.elapsed()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
