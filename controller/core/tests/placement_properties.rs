//! Properties of the placement engine under random clusters and random sequences of placements, releases,
//! cordons and GPU failures, checked against shadow accounting kept by the test.

use std::collections::HashMap;

use kiln_core::placement::{
    CacheHint, CacheTier, Cluster, GpuDemand, Hints, MILLI_PER_GPU, ModelSet, NodeId, NodeSpec, NodeState, Placement,
    PlacementEngine, Policy, Request, Selector, Unplaceable, Workload,
};
use proptest::prelude::*;

const MODELS: [&str; 3] = ["H100", "A100", "T4"];
const GPU_MEMORY_MIB: [u32; 3] = [80 * 1024, 40 * 1024, 16 * 1024];

#[derive(Clone, Debug)]
enum Op {
    Place { request: Request, label: Option<u8>, spread: bool, cached: Option<(u8, u8)> },
    Release(usize),
    Cordon(u8, bool),
    GpuHealth(u8, u8, bool),
}

fn node_strategy() -> impl Strategy<Value = (u32, u32, u8, usize, u8)> {
    (1u32..=64, 1u32..=256, 0u8..=8, 0usize..3, 0u8..2)
}

fn demand_strategy() -> impl Strategy<Value = GpuDemand> {
    prop_oneof![
        Just(GpuDemand::None),
        (1u16..MILLI_PER_GPU).prop_map(GpuDemand::Share),
        (1u8..=8).prop_map(GpuDemand::Whole),
        (1u32..=200 * 1024).prop_map(GpuDemand::Memory),
    ]
}

fn request_strategy() -> impl Strategy<Value = Request> {
    (0u32..=16, 0u32..=64, demand_strategy(), 1u64..8).prop_map(|(cpu, mem, gpu, models)| Request {
        models: ModelSet::of((0..3u8).filter(|m| models & (1 << m) != 0)),
        ..Request::new(cpu * 1000, mem * 1024, gpu)
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (request_strategy(), prop::option::of(0u8..2), any::<bool>(), prop::option::of((0u8..8, 0u8..9)))
            .prop_map(|(request, label, spread, cached)| Op::Place { request, label, spread, cached }),
        3 => (0usize..64).prop_map(Op::Release),
        1 => (0u8..8, any::<bool>()).prop_map(|(n, s)| Op::Cordon(n, s)),
        1 => (0u8..8, 0u8..8, any::<bool>()).prop_map(|(n, g, h)| Op::GpuHealth(n, g, h)),
    ]
}

fn specs(nodes: &[(u32, u32, u8, usize, u8)]) -> Vec<NodeSpec> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, &(cpu, mem, gpus, model, pool))| NodeSpec {
            gpu_memory_mib: GPU_MEMORY_MIB[model],
            labels: vec![("pool".into(), format!("p{pool}"))],
            ..NodeSpec::new(format!("n{i}"), cpu * 1000, mem * 1024, gpus, MODELS[model])
        })
        .collect()
}

/// Checks one placement against the request and the state the engine saw before it.
fn check_placement(
    cluster: &Cluster,
    before: &NodeState,
    request: &Request,
    placement: &Placement,
) -> Result<(), TestCaseError> {
    let node_type = cluster.node_type(before.type_id);
    prop_assert!(before.cpu_free >= request.cpu_milli && before.mem_free >= request.memory_mib);
    prop_assert!(cluster.selects(request.selector, before.type_id), "selector violated");
    let gpus: Vec<usize> = placement.gpu_indexes().collect();
    match request.gpu.resolve(node_type.gpu_memory_mib) {
        Some(GpuDemand::None) => prop_assert!(gpus.is_empty()),
        Some(GpuDemand::Share(m)) => {
            prop_assert_eq!(gpus.len(), 1);
            prop_assert_eq!(placement.milli_per_gpu, m);
            prop_assert!(before.usable(gpus[0]) >= m, "share on a GPU without room (or unhealthy)");
        }
        Some(GpuDemand::Whole(k)) => {
            prop_assert_eq!(gpus.len(), usize::from(k), "a gang gets exactly k GPUs on one node");
            prop_assert_eq!(placement.milli_per_gpu, MILLI_PER_GPU);
            for &g in &gpus {
                prop_assert_eq!(before.usable(g), MILLI_PER_GPU, "whole GPU {} was not entirely free", g);
            }
        }
        other => prop_assert!(false, "placed a request that cannot fit this node type: {:?}", other),
    }
    if !gpus.is_empty() {
        prop_assert!(request.models.contains(node_type.model), "GPU model constraint violated");
        prop_assert!(gpus.iter().all(|&g| g < usize::from(node_type.gpu_count)));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn placements_respect_capacity_constraints_exclusivity_and_release_exactly(
        nodes in prop::collection::vec(node_strategy(), 1..8),
        ops in prop::collection::vec(op_strategy(), 1..80),
        policy in prop::sample::select(Policy::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        let specs = specs(&nodes);
        let cluster = Cluster::new(&specs).unwrap();
        let initial: Vec<NodeState> = (0..cluster.len() as NodeId).map(|n| cluster.node(n).clone()).collect();
        let workload = Workload::from_requests(&[
            Request::new(1000, 1024, GpuDemand::Share(500)),
            Request::new(2000, 1024, GpuDemand::Whole(2)),
        ]);
        let mut engine = PlacementEngine::new(cluster, policy, workload, seed);
        let pools = [engine.selector(&[("pool", "p0")]), engine.selector(&[("pool", "p1")])];
        let mut live: Vec<(Request, Placement)> = Vec::new();
        let n = specs.len();
        for op in ops {
            match op {
                Op::Place { request, label, spread, cached } => {
                    let request = Request {
                        selector: label.map_or(Selector::ANY, |l| pools[usize::from(l)]),
                        ..request
                    };
                    let colocated: Vec<NodeId> =
                        if spread { live.iter().map(|(_, p)| p.node).collect() } else { Vec::new() };
                    let cached: Vec<CacheHint> = cached
                        .map(|(node, tier)| CacheHint {
                            node: u32::from(node) % n as u32,
                            tier: if tier < 8 { CacheTier::Gpu(1 << tier) } else { CacheTier::HostRam },
                        })
                        .into_iter()
                        .collect();
                    let states: Vec<NodeState> =
                        (0..n as NodeId).map(|i| engine.cluster().node(i).clone()).collect();
                    let hints = Hints { cached: &cached, colocated: &colocated };
                    match engine.place_with(&request, &hints) {
                        Ok(p) => {
                            prop_assert!(engine.is_schedulable(p.node), "placed on a cordoned node");
                            check_placement(engine.cluster(), &states[p.node as usize], &request, &p)?;
                            // Placing then releasing at once restores the exact state.
                            engine.release(&request, &p);
                            let after: Vec<NodeState> =
                                (0..n as NodeId).map(|i| engine.cluster().node(i).clone()).collect();
                            prop_assert_eq!(&after, &states);
                            // Place again (same inputs, the engine may choose otherwise) and keep it.
                            if let Ok(p) = engine.place_with(&request, &hints) {
                                check_placement(engine.cluster(), &states[p.node as usize], &request, &p)?;
                                live.push((request, p));
                            }
                        }
                        Err(Unplaceable::NoFit) => {
                            prop_assert!(engine.cluster().could_ever_hold(&request));
                        }
                        Err(Unplaceable::Impossible(_)) => {
                            prop_assert!(!engine.cluster().could_ever_hold(&request));
                        }
                    }
                }
                Op::Release(i) => {
                    if !live.is_empty() {
                        let (request, p) = live.swap_remove(i % live.len());
                        engine.release(&request, &p);
                    }
                }
                Op::Cordon(node, schedulable) => engine.set_schedulable(u32::from(node) % n as u32, schedulable),
                Op::GpuHealth(node, gpu, healthy) => {
                    engine.set_gpu_healthy(u32::from(node) % n as u32, usize::from(gpu), healthy)
                }
            }
            // Shadow accounting: what is free is capacity minus what the live placements hold, exactly.
            let mut held: HashMap<(NodeId, usize), (u32, bool)> = HashMap::new();
            let mut cpu = vec![0u32; n];
            let mut mem = vec![0u32; n];
            for (request, p) in &live {
                cpu[p.node as usize] += request.cpu_milli;
                mem[p.node as usize] += request.memory_mib;
                for g in p.gpu_indexes() {
                    let entry = held.entry((p.node, g)).or_default();
                    let whole = p.milli_per_gpu == MILLI_PER_GPU;
                    prop_assert!(!(entry.1 || (whole && entry.0 > 0)), "an exclusive GPU is shared");
                    entry.0 += u32::from(p.milli_per_gpu);
                    entry.1 |= whole;
                }
            }
            for (i, state) in initial.iter().enumerate() {
                let now = engine.cluster().node(i as NodeId);
                prop_assert_eq!(now.cpu_free + cpu[i], state.cpu_free);
                prop_assert_eq!(now.mem_free + mem[i], state.mem_free);
                for g in 0..state.gpu_free.len() {
                    let used = held.get(&(i as NodeId, g)).map_or(0, |h| h.0);
                    prop_assert!(used <= u32::from(MILLI_PER_GPU), "GPU over capacity");
                    prop_assert_eq!(u32::from(now.gpu_free[g]) + used, u32::from(MILLI_PER_GPU));
                }
            }
        }
        // Releasing everything, in any order, restores the empty cluster.
        for (request, p) in live.drain(..).rev() {
            engine.release(&request, &p);
        }
        for (i, state) in initial.iter().enumerate() {
            let now = engine.cluster().node(i as NodeId);
            prop_assert_eq!((now.cpu_free, now.mem_free, &now.gpu_free), (state.cpu_free, state.mem_free, &state.gpu_free));
        }
        prop_assert_eq!(engine.cluster().gpu_allocated_milli(), 0);
    }
}
