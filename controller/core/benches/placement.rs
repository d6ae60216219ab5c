//! Placement on a synthetic fleet of 10,000 nodes x 8 H100-80GB, at steady state: the fleet is first filled to
//! about 85% of its GPUs with a realistic request mix, then every measured decision is paired with a release, so
//! the fleet stays full and fragmented (the hard case: many distinct node states).
//!
//! `cargo bench -p kiln-core --bench placement`; the figures to quote are criterion's medians for `place/*`
//! (one decision) and `release/*` (one release).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_core::{
    placement::{
        CacheHint, CacheTier, Cluster, GpuDemand, Hints, NodeId, NodeSpec, Placement, PlacementEngine, Policy, Request,
        Workload,
    },
    rng::Rng,
};

const NODES: usize = 10_000;
const GIB: u32 = 1024;

/// The request mix: (request, relative frequency, deployment count for spreading and cache hints).
fn mix() -> Vec<(Request, u32)> {
    vec![
        // Model replicas sized by their weights: fractional GPUs.
        (Request::new(4_000, 32 * GIB, GpuDemand::Memory(8 * GIB)), 10),
        (Request::new(6_000, 48 * GIB, GpuDemand::Memory(16 * GIB)), 15),
        (Request::new(8_000, 64 * GIB, GpuDemand::Memory(24 * GIB)), 10),
        (Request::new(8_000, 96 * GIB, GpuDemand::Memory(40 * GIB)), 10),
        // Whole-GPU replicas and 1-GPU rentals.
        (Request::new(16_000, 128 * GIB, GpuDemand::Whole(1)), 25),
        // Gangs: tensor-parallel replicas and multi-GPU rentals.
        (Request::new(32_000, 256 * GIB, GpuDemand::Whole(2)), 8),
        (Request::new(64_000, 512 * GIB, GpuDemand::Whole(4)), 5),
        (Request::new(128_000, 1024 * GIB, GpuDemand::Whole(8)), 3),
        // CPU-only sidecars (tokenizers, routers).
        (Request::new(2_000, 8 * GIB, GpuDemand::None), 4),
    ]
}

fn fleet() -> Cluster {
    let nodes: Vec<NodeSpec> = (0..NODES)
        .map(|i| NodeSpec {
            gpu_memory_mib: 80 * GIB,
            labels: vec![("zone".into(), format!("z{}", i % 4))],
            ..NodeSpec::new(format!("gpu-{i:05}"), 192_000, 2048 * GIB, 8, "H100-80GB")
        })
        .collect();
    Cluster::new(&nodes).expect("a valid fleet")
}

struct Steady {
    engine: PlacementEngine,
    live: Vec<(Request, Placement)>,
    kinds: Vec<Request>,
    cumulative: Vec<u32>,
    rng: Rng,
}

impl Steady {
    fn new(policy: Policy) -> Self {
        let mix = mix();
        let kinds: Vec<Request> = mix.iter().map(|(r, _)| *r).collect();
        let mut workload = Workload::default();
        let total: u32 = mix.iter().map(|(_, w)| w).sum();
        for (r, w) in &mix {
            workload.add(r, f64::from(*w) / f64::from(total));
        }
        let cumulative = mix.iter().scan(0, |acc, (_, w)| Some(*acc + w).inspect(|v| *acc = *v)).collect();
        let engine = PlacementEngine::new(fleet(), policy, workload, 7);
        let mut steady = Self { engine, live: Vec::new(), kinds, cumulative, rng: Rng::new(11) };
        let target = steady.engine.cluster().gpu_capacity_milli() * 85 / 100;
        while steady.engine.cluster().gpu_allocated_milli() < target {
            let request = steady.next_request();
            if let Ok(p) = steady.engine.place(&request) {
                steady.live.push((request, p));
            }
        }
        steady
    }

    fn next_request(&mut self) -> Request {
        let total = *self.cumulative.last().expect("a mix");
        let x = self.rng.below(u64::from(total)) as u32;
        self.kinds[self.cumulative.iter().position(|&c| x < c).expect("x below the total")]
    }

    fn release_random(&mut self) -> Duration {
        let i = self.rng.below(self.live.len() as u64) as usize;
        let (request, p) = self.live.swap_remove(i);
        let start = Instant::now();
        self.engine.release(&request, &p);
        start.elapsed()
    }

    fn place_random(&mut self, hinted: bool) -> Duration {
        let request = self.next_request();
        // A deployment's other replicas and where its weights are cached: a handful of nodes.
        let colocated: Vec<NodeId> =
            if hinted { (0..3).map(|_| self.rng.below(NODES as u64) as NodeId).collect() } else { Vec::new() };
        let cached: Vec<CacheHint> = if hinted {
            vec![
                CacheHint { node: self.rng.below(NODES as u64) as NodeId, tier: CacheTier::HostRam },
                CacheHint { node: self.rng.below(NODES as u64) as NodeId, tier: CacheTier::Gpu(1 << 3) },
            ]
        } else {
            Vec::new()
        };
        let start = Instant::now();
        let placed = self.engine.place_with(&request, &Hints { cached: &cached, colocated: &colocated });
        let took = start.elapsed();
        if let Ok(p) = black_box(placed) {
            self.live.push((request, p));
        }
        took
    }
}

fn placement(c: &mut Criterion) {
    for (policy, hinted) in
        [(Policy::Kiln, false), (Policy::Kiln, true), (Policy::Fgd, false), (Policy::BestFit, false)]
    {
        let name = format!("{policy}{}", if hinted { "+hints" } else { "" });
        let mut steady = Steady::new(policy);
        // Criterion's figures are means over batches; this prints the distribution of single operations.
        let (mut places, mut releases) = (Vec::new(), Vec::new());
        for _ in 0..20_000 {
            releases.push(steady.release_random());
            places.push(steady.place_random(hinted));
        }
        println!("{name}: place {}; release {}", percentiles(&mut places), percentiles(&mut releases));
        let mut group = c.benchmark_group("place");
        group.sample_size(20);
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    steady.release_random();
                    total += steady.place_random(hinted);
                }
                total
            })
        });
        group.finish();
        let mut group = c.benchmark_group("release");
        group.sample_size(20);
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += steady.release_random();
                    steady.place_random(hinted);
                }
                total
            })
        });
        group.finish();
    }
}

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    format!("p50 {:.1} us, p99 {:.1} us, max {:.1} us", at(0.5), at(0.99), at(1.0))
}

criterion_group!(benches, placement);
criterion_main!(benches);
