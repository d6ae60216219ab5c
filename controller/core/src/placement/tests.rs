//! Engine behaviour on small hand-made clusters.

use super::*;

fn node(name: &str, gpus: u8, model: &str) -> NodeSpec {
    NodeSpec::new(name, 32_000, 128_000, gpus, model)
}

fn req(gpu: GpuDemand) -> Request {
    Request::new(1000, 1000, gpu)
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

fn labelled(name: &str, pool: &str) -> NodeSpec {
    NodeSpec { labels: vec![("pool".into(), pool.into())], gpu_memory_mib: 80 * 1024, ..node(name, 8, "H100") }
}

#[test]
fn selectors_restrict_requests_to_labelled_nodes() {
    let nodes = [labelled("a", "spot"), labelled("b", "reserved")];
    let mut e = engine(Policy::Kiln, &nodes, &[req(GpuDemand::Whole(1))]);
    let reserved = e.selector(&[("pool", "reserved")]);
    let missing = e.selector(&[("pool", "gold")]);
    assert_eq!(e.selector(&[("pool", "reserved")]), reserved, "selectors are interned");
    for _ in 0..8 {
        assert_eq!(e.place(&Request { selector: reserved, ..req(GpuDemand::Whole(1)) }).unwrap().node, 1);
    }
    assert_eq!(e.place(&Request { selector: reserved, ..req(GpuDemand::Whole(1)) }), Err(Unplaceable::NoFit));
    assert!(matches!(
        e.place(&Request { selector: missing, ..req(GpuDemand::Whole(1)) }),
        Err(Unplaceable::Impossible(_))
    ));
    // A node added later with the label is selected by the existing selector.
    let c = e.add_node(&labelled("c", "reserved")).unwrap();
    assert_eq!(e.place(&Request { selector: reserved, ..req(GpuDemand::Whole(1)) }).unwrap().node, c);
}

#[test]
fn memory_demands_become_shares_or_whole_gpus_by_the_node_gpu_memory() {
    let h100 = 80 * 1024;
    assert_eq!(GpuDemand::Memory(20 * 1024).resolve(h100), Some(GpuDemand::Share(250)));
    assert_eq!(GpuDemand::Memory(1).resolve(h100), Some(GpuDemand::Share(1)));
    assert_eq!(GpuDemand::Memory(h100).resolve(h100), Some(GpuDemand::Whole(1)));
    assert_eq!(GpuDemand::Memory(140 * 1024).resolve(h100), Some(GpuDemand::Whole(2)));
    assert_eq!(GpuDemand::Memory(20 * 1024).resolve(0), None, "unknown GPU memory");
    assert_eq!(GpuDemand::Memory(h100 * 17).resolve(h100), None);

    let small = NodeSpec { gpu_memory_mib: 16 * 1024, ..node("v100", 2, "V100") };
    let big = NodeSpec { gpu_memory_mib: h100, ..node("h100", 1, "H100") };
    let mut e = engine(Policy::Kiln, &[small, big], &[req(GpuDemand::Memory(20 * 1024))]);
    // 20 GiB: two whole 16 GiB GPUs, or a quarter of an 80 GiB one.
    let p = e.place(&req(GpuDemand::Memory(20 * 1024))).unwrap();
    let expected = if p.node == 0 { (2, 1000) } else { (1, 250) };
    assert_eq!((p.gpus.count_ones(), p.milli_per_gpu), expected);
    e.release(&req(GpuDemand::Memory(20 * 1024)), &p);
    assert_eq!(e.cluster().gpu_allocated_milli(), 0);
}

#[test]
fn unhealthy_gpus_and_cordoned_nodes_take_no_new_work_and_keep_what_runs() {
    let mut e = engine(Policy::BestFit, &[node("a", 2, "G"), node("b", 2, "G")], &[]);
    let running = e.place(&req(GpuDemand::Share(500))).unwrap();
    let gpu = running.gpu_indexes().next().unwrap();
    e.set_gpu_healthy(running.node, gpu, false);
    // Best fit would put the next share beside the first; the GPU is unhealthy now.
    let next = e.place(&req(GpuDemand::Share(500))).unwrap();
    assert!(next.node != running.node || next.gpus != running.gpus, "{next:?}");
    assert_eq!(e.cluster().node(running.node).gpu_free[gpu], 500, "the running share keeps its GPU");
    e.set_gpu_healthy(running.node, gpu, true);

    let other = 1 - running.node;
    e.set_schedulable(other, false);
    assert!(!e.is_schedulable(other));
    for _ in 0..2 {
        assert_eq!(e.place(&req(GpuDemand::Share(400))).unwrap().node, running.node);
    }
    // Releasing work on a cordoned node frees it, and uncordoning makes it usable again.
    e.release(&req(GpuDemand::Share(500)), &next);
    e.set_schedulable(other, true);
    assert_eq!(e.place(&req(GpuDemand::Whole(2))).unwrap().node, other);
}

#[test]
fn replicas_of_one_deployment_spread_across_nodes() {
    for policy in Policy::ALL {
        let nodes: Vec<NodeSpec> = (0..3).map(|i| node(&format!("n{i}"), 8, "H100")).collect();
        let mut e = engine(policy, &nodes, &[req(GpuDemand::Share(250))]);
        let mut replicas: Vec<NodeId> = Vec::new();
        for _ in 0..6 {
            let p = e.place_with(&req(GpuDemand::Share(250)), &Hints { colocated: &replicas, ..Hints::default() });
            replicas.push(p.unwrap().node);
        }
        let mut per_node = [0; 3];
        for n in &replicas {
            per_node[*n as usize] += 1;
        }
        assert_eq!(per_node, [2, 2, 2], "{policy}: {replicas:?}");
    }
}

#[test]
fn kiln_prefers_a_warm_cache_when_it_costs_little_fragmentation() {
    let nodes: Vec<NodeSpec> = (0..4).map(|i| node(&format!("n{i}"), 8, "H100")).collect();
    let mix = [req(GpuDemand::Share(500)), req(GpuDemand::Whole(1)), req(GpuDemand::Whole(8))];
    let share = req(GpuDemand::Share(500));
    for cached_on in 0..4 {
        let mut e = engine(Policy::Kiln, &nodes, &mix);
        for tier in [CacheTier::HostRam, CacheTier::Disk] {
            let hint = [CacheHint { node: cached_on, tier }];
            let p = e.place_with(&share, &Hints { cached: &hint, ..Hints::default() }).unwrap();
            assert_eq!(p.node, cached_on, "{tier:?}");
            e.release(&share, &p);
        }
        // An idle copy on GPU 5: the replica goes on that very GPU.
        let hint = [CacheHint { node: cached_on, tier: CacheTier::Gpu(1 << 5) }];
        let p = e.place_with(&share, &Hints { cached: &hint, ..Hints::default() }).unwrap();
        assert_eq!((p.node, p.gpus), (cached_on, 1 << 5));
    }
    // But not when it would break a whole free node while a half-used GPU is waiting elsewhere.
    let mut e = engine(Policy::Kiln, &nodes[..2], &mix);
    let first = e.place(&share).unwrap();
    let empty = 1 - first.node;
    let hint = [CacheHint { node: empty, tier: CacheTier::Disk }];
    let p = e.place_with(&share, &Hints { cached: &hint, ..Hints::default() }).unwrap();
    assert_eq!((p.node, p.gpus), (first.node, first.gpus));
}

#[test]
fn churn_does_not_grow_the_engine_without_bound() {
    let nodes: Vec<NodeSpec> = (0..64).map(|i| node(&format!("n{i}"), 8, "H100")).collect();
    let mut e = engine(Policy::Kiln, &nodes, &[req(GpuDemand::Share(100))]);
    let mut rng = crate::rng::Rng::new(3);
    let mut live = Vec::new();
    for step in 0..60_000u32 {
        // Odd CPU sizes make nearly every node state new.
        let r = Request::new(1 + step % 977, 1 + step % 331, GpuDemand::Share(1 + (step % 500) as u16));
        if let Ok(p) = e.place(&r) {
            live.push((r, p));
        }
        if live.len() > 200 {
            let (r, p) = live.swap_remove(rng.below(live.len() as u64) as usize);
            e.release(&r, &p);
        }
    }
    assert!(e.groups.len() <= 2 * e.active.len() + GROUP_SLACK + 1, "{} groups", e.groups.len());
    assert!(e.cache.len() <= CACHE_LIMIT + 1);
    // Every schedulable node is in exactly one live group, at its recorded position.
    for n in 0..64u32 {
        let g = e.node_group[n as usize].unwrap();
        assert_eq!(e.groups[g as usize].members[e.node_pos[n as usize] as usize], n);
        assert_eq!(e.groups[g as usize].sig, Signature::of(e.cluster().node(n)));
    }
}

#[test]
fn node_order_ties_keep_landing_on_one_node_where_random_ties_spread() {
    // CPU-only pods on idle 8-GPU nodes raise no kind's fragment (every kind still fits), so `fgd` ties all nodes.
    // The paper's simulator then takes one fixed node again and again; random tie-breaking spreads the pods and
    // eats the CPU of nodes whose GPUs later need it.
    let nodes: Vec<NodeSpec> = (0..16).map(|i| NodeSpec::new(format!("n{i}"), 96_000, 393_216, 8, "G2")).collect();
    let cpu_pod = Request::new(8000, 1000, GpuDemand::None);
    let mix = [cpu_pod, Request::new(3152, 5600, GpuDemand::Share(810))];
    let nodes_used = |tie_break| {
        let mut e = engine(Policy::Fgd, &nodes, &mix);
        e.set_tie_break(tie_break);
        assert_eq!(e.tie_break(), tie_break);
        let mut used: Vec<NodeId> = (0..8).map(|_| e.place(&cpu_pod).unwrap().node).collect();
        used.sort_unstable();
        used.dedup();
        used.len()
    };
    assert_eq!(nodes_used(TieBreak::NodeOrder), 1);
    assert!(nodes_used(TieBreak::Random) > 1);
}

#[test]
fn node_order_is_a_seeded_permutation_and_covers_added_nodes() {
    let nodes: Vec<NodeSpec> = (0..8).map(|i| node(&format!("n{i}"), 1, "G")).collect();
    let first = |seed: u64| {
        let mut e = PlacementEngine::new(Cluster::new(&nodes).unwrap(), Policy::BestFit, Workload::default(), seed);
        e.set_tie_break(TieBreak::NodeOrder);
        e.place(&req(GpuDemand::None)).unwrap().node
    };
    assert_eq!(first(3), first(3), "same seed, same order");
    assert!((0..16).map(first).collect::<std::collections::HashSet<_>>().len() > 1, "the order depends on the seed");
    let mut e = engine(Policy::BestFit, &nodes[..1], &[]);
    e.set_tie_break(TieBreak::NodeOrder);
    let added = e.add_node(&node("late", 1, "G")).unwrap();
    e.place(&req(GpuDemand::Whole(1))).unwrap();
    assert_eq!(e.place(&req(GpuDemand::Whole(1))).unwrap().node, added);
}

#[test]
fn a_new_workload_rescores_the_nodes_already_grouped() {
    // Engine built assuming CPU-only work (every free GPU a fragment), then told the mix is 500-milli shares: the
    // nodes' expected fragmentation must be recomputed, or the 4-GPU node looks like the larger improvement.
    let nodes = [node("two", 2, "G"), node("four", 4, "G")];
    let share = Request::new(0, 0, GpuDemand::Share(500));
    for policy in [Policy::Fgd, Policy::Kiln] {
        let mut told = engine(policy, &nodes, &[Request::new(1000, 0, GpuDemand::None)]);
        told.set_workload(Workload::from_requests(&[share]));
        let mut fresh = engine(policy, &nodes, &[share]);
        fresh.set_tie_break(TieBreak::NodeOrder);
        told.set_tie_break(TieBreak::NodeOrder);
        let (a, b) = (told.place(&share).unwrap(), fresh.place(&share).unwrap());
        assert_eq!(a, b, "{policy}");
        if policy == Policy::Kiln {
            assert_eq!(a.node, 0, "kiln breaks the tie towards the node left fullest");
        }
    }
}

#[test]
fn gang_weights_follow_the_room_left_for_gangs_once_it_is_scarce() {
    let mut nodes: Vec<NodeSpec> = (0..20).map(|i| node(&format!("big{i}"), 8, "G")).collect();
    nodes.extend((0..4).map(|i| node(&format!("small{i}"), 2, "G")));
    let mut cluster = Cluster::new(&nodes).unwrap();
    let share = req(GpuDemand::Share(500));
    let gang = req(GpuDemand::Whole(8));
    let mut mix = vec![share; 99];
    mix.push(gang);
    let assumed = Workload::from_requests(&mix).with_measure(Measure::Kiln);
    let frag_of = |w: &Workload| w.node_frag(0, 0, 31_000, 127_000, &[500, 1000, 1000, 1000, 1000, 1000, 1000, 1000]);
    let weighed = |cluster: &Cluster| {
        let mut w = assumed.clone();
        w.weigh_by_room(cluster);
        w
    };
    let mut by_scarcity = assumed.clone();
    by_scarcity.weigh_by_scarcity(&cluster);
    let empty = frag_of(&weighed(&cluster));
    assert_eq!(empty, frag_of(&by_scarcity), "on an empty cluster, the weights of weigh_by_scarcity");
    let break_node = |cluster: &mut Cluster, n: u32| {
        cluster.apply(&share, &Placement { node: n, gpus: 1, milli_per_gpu: 500 });
    };
    // 17 of the 20 8-GPU nodes broken: 3 x 8 GPUs left, more than a tenth of 160; the weights stay.
    for n in 0..17 {
        break_node(&mut cluster, n);
    }
    assert!((frag_of(&weighed(&cluster)) - empty).abs() < 1e-9);
    // 19 broken: 8 GPUs left, counted ten times over: the gang's weight grows from 1% x 168/160 to 1% x 168/80.
    for n in 17..19 {
        break_node(&mut cluster, n);
    }
    let now = frag_of(&weighed(&cluster));
    assert!((now - empty - (0.021 - 0.0105) * 7500.0).abs() < 1e-6, "{empty} -> {now}");
    // None left: the weight stays at one node's worth, not without bound.
    break_node(&mut cluster, 19);
    assert!((frag_of(&weighed(&cluster)) - now).abs() < 1e-6);
    assert_eq!(frag_of(&by_scarcity), empty, "weigh_by_scarcity sees the empty cluster only");
}

#[test]
fn kiln_keeps_the_last_whole_node_for_gangs_and_refreshes_as_room_runs_out() {
    // Four 8-GPU nodes; shares arrive that could go anywhere. Once three nodes are broken, breaking the last
    // whole one costs the (now heavy) gang weight, so shares fill the broken nodes first.
    let nodes: Vec<NodeSpec> = (0..4).map(|i| node(&format!("big{i}"), 8, "G")).collect();
    let share = req(GpuDemand::Share(500));
    let gang = req(GpuDemand::Whole(8));
    let mut mix = vec![share; 199];
    mix.push(gang);
    let mut e = engine(Policy::Kiln, &nodes, &mix);
    let whole_nodes = |e: &PlacementEngine| {
        (0..4).filter(|&n| e.cluster().node(n).gpu_free.iter().all(|&f| f == MILLI_PER_GPU)).count()
    };
    let mut placed = 0;
    while placed < 48 && e.place(&share).is_ok() {
        placed += 1;
    }
    assert_eq!(placed, 48, "3 nodes x 8 GPUs x 2 shares");
    assert!(whole_nodes(&e) >= 1, "a whole node is kept while the broken ones have room");
    assert_eq!(e.room, 8 * whole_nodes(&e) as u64, "the room for gangs is tracked as nodes break");
    assert!(e.room_at_refresh < 32, "the weights were derived again as the room ran out");
    assert!(e.place(&gang).is_ok(), "the gang still fits");
    // Without gang kinds nothing is tracked.
    let mut plain = engine(Policy::Kiln, &nodes, &[share]);
    plain.place(&share).unwrap();
    assert_eq!((plain.room, plain.room_at_refresh), (0, 0));
}
