//! Engine behaviour on small hand-made clusters.

use super::*;

fn node(name: &str, gpus: u8, model: &str) -> NodeSpec {
    NodeSpec { name: name.into(), cpu_milli: 32_000, memory_mib: 128_000, gpu_count: gpus, gpu_model: model.into() }
}

fn req(gpu: GpuDemand) -> Request {
    Request { cpu_milli: 1000, memory_mib: 1000, gpu, models: ModelSet::ANY }
}

fn engine(policy: Policy, nodes: &[NodeSpec], workload: &[Request]) -> PlacementEngine {
    PlacementEngine::new(Cluster::new(nodes).unwrap(), policy, Workload::from_requests(workload), 1)
}

#[test]
fn release_restores_the_exact_previous_state() {
    let nodes = [node("a", 8, "H100"), node("b", 4, "H100")];
    let mix = [req(GpuDemand::Share(300)), req(GpuDemand::Whole(2)), req(GpuDemand::None)];
    for policy in Policy::ALL {
        let mut e = engine(policy, &nodes, &mix);
        let before: Vec<NodeState> = (0..2).map(|n| e.cluster().node(n).clone()).collect();
        let mut placed = Vec::new();
        for r in mix.iter().cycle().take(9) {
            placed.push((*r, e.place(r).unwrap()));
        }
        for (r, p) in placed.iter().rev() {
            e.release(r, p);
        }
        let after: Vec<NodeState> = (0..2).map(|n| e.cluster().node(n).clone()).collect();
        assert_eq!(after, before, "{policy}");
        assert_eq!(e.cluster().gpu_allocated_milli(), 0);
        // The engine's view agrees: the same request fits exactly as it did on the empty cluster.
        assert!(e.place(&req(GpuDemand::Whole(8))).is_ok(), "{policy}");
    }
}

#[test]
fn gangs_take_whole_gpus_on_one_node_and_models_are_respected() {
    let nodes = [node("t4", 2, "T4"), node("h100", 8, "H100")];
    let mut e = engine(Policy::Kiln, &nodes, &[req(GpuDemand::Whole(4))]);
    let h100 = e.cluster().model_id("H100").unwrap();
    let gang = Request { models: ModelSet::of([h100]), ..req(GpuDemand::Whole(4)) };
    let p = e.place(&gang).unwrap();
    assert_eq!(p.node, 1);
    assert_eq!(p.gpus.count_ones(), 4);
    assert_eq!(p.milli_per_gpu, 1000);
    // A 4-GPU gang cannot fit on the T4 node, and the H100 node has only 4 whole GPUs left.
    e.place(&gang).unwrap();
    assert_eq!(e.place(&gang), Err(Unplaceable::NoFit));
    let too_big = req(GpuDemand::Whole(9));
    assert!(matches!(e.place(&too_big), Err(Unplaceable::Impossible(_))));
}

#[test]
fn fgd_packs_shares_onto_a_used_gpu_instead_of_breaking_a_whole_one() {
    let nodes = [node("a", 2, "G"), node("b", 2, "G")];
    let mix = [req(GpuDemand::Share(500)), req(GpuDemand::Whole(1)), req(GpuDemand::Whole(2))];
    let mut e = engine(Policy::Fgd, &nodes, &mix);
    let first = e.place(&req(GpuDemand::Share(500))).unwrap();
    let second = e.place(&req(GpuDemand::Share(500))).unwrap();
    assert_eq!((second.node, second.gpus), (first.node, first.gpus), "the second half goes on the same GPU");
    // The other node is still whole for a 2-GPU gang.
    assert!(e.place(&req(GpuDemand::Whole(2))).is_ok());
}

#[test]
fn shares_outside_one_to_999_are_refused() {
    let mut e = engine(Policy::BestFit, &[node("a", 1, "G")], &[]);
    assert!(matches!(e.place(&req(GpuDemand::Share(0))), Err(Unplaceable::Impossible(_))));
    assert!(matches!(e.place(&req(GpuDemand::Share(1000))), Err(Unplaceable::Impossible(_))));
}

#[test]
fn policies_parse_by_name() {
    for p in Policy::ALL {
        assert_eq!(p.name().parse::<Policy>(), Ok(p));
    }
    assert!("tetris".parse::<Policy>().unwrap_err().contains("expected one of random, dotprod"));
}
