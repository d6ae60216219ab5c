//! The placement engine: which node and which GPUs a request (a model replica, a rented GPU, a trace pod) goes to.
//!
//! Pure: input is the cluster state held by the engine and a [`Request`]; output is a [`Placement`] or the reason
//! none exists. Nothing here reads a clock, a file or the network.
//!
//! # Resource model
//! A node has CPU (millicores), host memory (MiB), labels and up to [`MAX_GPUS_PER_NODE`] GPUs of one model, each
//! with a capacity of [`MILLI_PER_GPU`] milli-GPU and a memory size. A request asks for CPU, memory and one of: no
//! GPU, a share of one GPU (`Share(milli)`, 1..999, co-located with other shares on that GPU; or `Memory(mib)`,
//! the share a model's weights need on the node's GPU model, whole GPUs past one GPU's memory) or `Whole(k)` GPUs
//! on one node (a gang; whole GPUs are never shared, which is what rentals need), optionally restricted to a set of
//! GPU models and to nodes with given labels ([`Selector`]).
//!
//! Nodes can be cordoned or marked not ready ([`PlacementEngine::set_schedulable`]) and single GPUs unhealthy
//! ([`PlacementEngine::set_gpu_healthy`]): neither takes new work; what already runs there stays until released.
//!
//! # Hints: spreading and warm caches
//! [`PlacementEngine::place_with`] takes [`Hints`]: the nodes already running replicas of the same deployment
//! (a node with fewer of them always wins, so replicas spread across nodes wherever they fit) and the nodes that
//! already hold the model's weights, by tier (an idle copy on a GPU, host RAM, local disk). The `kiln` policy
//! adds a tier's [`CacheWeights`] to a cached node's score: it accepts that much more expected fragmentation
//! (milli-GPU) to avoid a cold load, and no more. The paper's policies ignore cache hints.
//!
//! # Speed: state signatures
//! Every policy here scores a node from its *signature* alone: node type, free CPU, free memory and the sorted
//! free milli-GPU of its GPUs. Nodes with equal signatures are interchangeable, so the engine keeps nodes grouped by
//! signature and scores each group once per distinct request, caching the result; placing or releasing updates one
//! node and moves it between two groups (O(GPUs) plus a hash), with no rebuild of anything cluster-wide. Ties
//! between equally good nodes are broken uniformly at random with the engine's seeded RNG, as the Kubernetes
//! scheduler does, or, with [`TieBreak::NodeOrder`], by a fixed seeded node order, as the FGD paper's simulator does.

mod cluster;
pub mod frag;
mod hints;
mod policy;
mod request;

use std::collections::HashMap;

pub use cluster::*;
pub use frag::{Measure, Workload};
pub use hints::*;
pub use policy::Policy;
pub use request::*;

use crate::rng::Rng;

/// Capacity of one GPU in milli-GPU.
pub const MILLI_PER_GPU: u16 = 1000;
/// Most GPUs one node may have.
pub const MAX_GPUS_PER_NODE: usize = 16;

/// Node labels, `(key, value)`.
pub type Labels = Vec<(String, String)>;

/// Index of a node in the cluster, in the order the nodes were given (or added).
pub type NodeId = u32;

/// Which GPUs of a node a policy chose, in signature terms (GPUs with equal free milli are interchangeable).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum GpuChoice {
    /// No GPU.
    None,
    /// One GPU whose free milli-GPU is this value.
    ShareOn(u16),
    /// One GPU among those that fit, chosen at random.
    ShareRandom,
    /// Fully free GPUs, as many as requested.
    Whole,
    /// This GPU (one holding an idle copy of the model).
    ShareAt(u8),
}

#[derive(Clone, Copy, Debug)]
struct Eval {
    score: f64,
    choice: GpuChoice,
}

/// Score penalty per replica of the same deployment already on a node: larger than any policy's score range, so
/// spreading comes first and the policy orders nodes with equally few replicas.
const SPREAD_PENALTY: f64 = 1e9;

#[derive(Debug)]
struct Group {
    sig: Signature,
    members: Vec<NodeId>,
    /// Expected fragmentation of a node with this signature, milli-GPU (see [`frag`]); computed only for the
    /// policies that descend its gradient, 0 for the others.
    frag: f64,
}

/// A candidate in a decision: a whole group of interchangeable nodes (less the hinted ones), or one hinted node.
#[derive(Clone, Copy, Debug)]
enum Candidate {
    Group { group: u32, choice: GpuChoice, eligible: usize },
    Node { node: NodeId, choice: GpuChoice },
}

impl Candidate {
    fn weight(&self) -> usize {
        match self {
            Candidate::Group { eligible, .. } => *eligible,
            Candidate::Node { .. } => 1,
        }
    }
}

/// The best candidates seen so far in a decision, with ties kept for the tie-break.
#[derive(Default)]
struct Best {
    score: f64,
    ties: Vec<Candidate>,
    weight: usize,
}

impl Best {
    fn offer(&mut self, score: f64, candidate: Candidate) {
        let tolerance = if self.ties.is_empty() { 0.0 } else { 1e-9 * self.score.abs().max(1.0) };
        if self.ties.is_empty() || score > self.score + tolerance {
            self.score = score;
            self.ties.clear();
            self.weight = 0;
        } else if score < self.score - tolerance {
            return;
        }
        self.weight += candidate.weight();
        self.ties.push(candidate);
    }
}

/// How the engine chooses among equally good candidates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TieBreak {
    /// Uniformly at random with the engine's seeded RNG, as the Kubernetes scheduler does.
    #[default]
    Random,
    /// The node first in a fixed order, a random permutation of the nodes drawn once from the seed, as in the FGD
    /// paper's simulator (its scheduler takes the lexicographically smallest node name among equal scores, and the
    /// names carry a random per-seed prefix). Equally good choices then keep landing on the same nodes: work
    /// consolidates instead of spreading over idle ones.
    NodeOrder,
}

/// Places requests on a cluster with one policy, keeping per-node state up to date on place and release.
#[derive(Debug)]
pub struct PlacementEngine {
    cluster: Cluster,
    policy: Policy,
    /// The request mix the caller gave.
    assumed: Workload,
    /// The mix the policy's measure uses: `assumed` under the policy's measure (`kiln`: gangs weighed by the
    /// scarcity of the nodes that could hold them now, see [`Workload::weigh_by_room`]).
    workload: Workload,
    cache_weights: CacheWeights,
    rng: Rng,
    groups: Vec<Group>,
    group_of: HashMap<Signature, u32>,
    /// Each node's group; `None` while the node is unschedulable.
    node_group: Vec<Option<u32>>,
    node_pos: Vec<u32>,
    schedulable: Vec<bool>,
    active: Vec<u32>,
    active_pos: Vec<Option<u32>>,
    cache: HashMap<(u32, Request), Option<Eval>>,
    decisions: u64,
    seed: u64,
    tie_break: TieBreak,
    /// Each node's place in the tie-break order ([`TieBreak::NodeOrder`] only; empty otherwise).
    rank: Vec<u32>,
    /// Whether the gang weights follow the room for gangs: `kiln` with gang kinds in its workload.
    follows_room: bool,
    /// GPUs of schedulable nodes of two GPUs or more with every GPU free (when `follows_room`): the room for gangs,
    /// which `kiln`'s gang weights follow ([`Workload::weigh_by_room`]).
    room: u64,
    /// `room` when the weights were last derived.
    room_at_refresh: u64,
}

/// Score cache entries kept before the cache is cleared (bounds memory on long runs).
const CACHE_LIMIT: usize = 4_000_000;
/// Empty groups tolerated beyond twice the live ones before they are dropped.
const GROUP_SLACK: usize = 4096;
/// Relative change in the room for gangs after which `kiln`'s gang weights are derived again.
const ROOM_STEP: f64 = 0.125;
/// Mixed into the seed for the tie-break order's own generator.
const TIE_ORDER_SALT: u64 = 0x7E1E_B4EA_C0DE_0001;

impl PlacementEngine {
    /// An engine over `cluster`. `workload` is the request mix the fragmentation measure (and so `fgd` and `kiln`)
    /// assumes (its measure is set by the policy: FGD's for all but `kiln`); `seed` drives tie-breaking.
    pub fn new(cluster: Cluster, policy: Policy, workload: Workload, seed: u64) -> Self {
        let n = cluster.len();
        let effective = effective_workload(policy, &workload, &cluster);
        let mut engine = Self {
            cluster,
            policy,
            assumed: workload,
            workload: effective,
            cache_weights: CacheWeights::default(),
            rng: Rng::new(seed),
            groups: Vec::new(),
            group_of: HashMap::new(),
            node_group: vec![None; n],
            node_pos: vec![0; n],
            schedulable: vec![true; n],
            active: Vec::new(),
            active_pos: Vec::new(),
            cache: HashMap::new(),
            decisions: 0,
            seed,
            tie_break: TieBreak::Random,
            rank: Vec::new(),
            follows_room: false,
            room: 0,
            room_at_refresh: 0,
        };
        engine.follows_room = follows_room(engine.policy, &engine.workload);
        for node in 0..n as NodeId {
            engine.join_group(node);
        }
        engine.room = (0..n as NodeId).map(|node| engine.room_of(node)).sum();
        engine.room_at_refresh = engine.room;
        engine
    }

    /// Replaces the request mix the fragmentation measure assumes (the deployments changed); scores are
    /// recomputed from the next decision on.
    pub fn set_workload(&mut self, workload: Workload) {
        self.assumed = workload;
        self.refresh_workload();
    }

    /// Re-derives the measure's mix from the caller's (the cluster or the mix changed), with the expected
    /// fragmentation of every group under it, and drops the cached scores.
    fn refresh_workload(&mut self) {
        self.workload = effective_workload(self.policy, &self.assumed, &self.cluster);
        self.follows_room = follows_room(self.policy, &self.workload);
        self.room = (0..self.cluster.len() as NodeId).map(|n| self.room_of(n)).sum();
        self.room_at_refresh = self.room;
        if matches!(self.policy, Policy::Fgd | Policy::Kiln) {
            for g in &mut self.groups {
                let node_type = self.cluster.node_type(g.sig.type_id);
                g.frag = self.workload.node_frag(
                    node_type.model,
                    node_type.gpu_memory_mib,
                    g.sig.cpu_free,
                    g.sig.mem_free,
                    &g.sig.gpu_free,
                );
            }
        }
        self.cache.clear();
    }

    /// Sets how ties between equally good candidates are broken ([`TieBreak::Random`] by default). The node order
    /// of [`TieBreak::NodeOrder`] is drawn from the engine's seed by a generator of its own, so the random draws
    /// of everything else stay as they were.
    pub fn set_tie_break(&mut self, tie_break: TieBreak) {
        self.tie_break = tie_break;
        self.rank.clear();
        if tie_break == TieBreak::NodeOrder {
            let mut order: Vec<u32> = (0..self.cluster.len() as u32).collect();
            Rng::new(self.seed ^ TIE_ORDER_SALT).shuffle(&mut order);
            self.rank = vec![0; order.len()];
            for (place, node) in order.into_iter().enumerate() {
                self.rank[node as usize] = place as u32;
            }
        }
    }

    /// How ties are broken.
    pub fn tie_break(&self) -> TieBreak {
        self.tie_break
    }

    /// Sets how much fragmentation `kiln` trades for a warm cache.
    pub fn set_cache_weights(&mut self, weights: CacheWeights) {
        self.cache_weights = weights;
    }

    /// The cluster state.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The selector for nodes carrying all of `labels`.
    pub fn selector(&mut self, labels: &[(&str, &str)]) -> Selector {
        self.cluster.selector(labels)
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Placement decisions made so far (successful or not).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// Adds an empty, schedulable node (an agent registered).
    pub fn add_node(&mut self, spec: &NodeSpec) -> Result<NodeId, ClusterError> {
        let node = self.cluster.add_node(spec)?;
        if self.tie_break == TieBreak::NodeOrder {
            self.rank.push(node);
        }
        self.node_group.push(None);
        self.node_pos.push(0);
        self.schedulable.push(true);
        if self.policy == Policy::Kiln {
            // The capacity that holds each gang kind changed.
            self.refresh_workload();
        }
        self.join_group(node);
        Ok(node)
    }

    /// Whether `node` takes new work (false: cordoned, draining or not ready). Work already on it stays until
    /// released.
    pub fn set_schedulable(&mut self, node: NodeId, schedulable: bool) {
        if self.schedulable[node as usize] == schedulable {
            return;
        }
        let room = self.room_of(node);
        self.schedulable[node as usize] = schedulable;
        if schedulable {
            self.join_group(node);
        } else {
            self.leave_group(node);
        }
        self.track_room(node, room);
    }

    /// Whether `node` takes new work.
    pub fn is_schedulable(&self, node: NodeId) -> bool {
        self.schedulable[node as usize]
    }

    /// Marks GPU `gpu` of `node` healthy or not; an unhealthy GPU takes no new work.
    pub fn set_gpu_healthy(&mut self, node: NodeId, gpu: usize, healthy: bool) {
        let room = self.room_of(node);
        self.leave_group(node);
        let state = &mut self.cluster.nodes[node as usize];
        if gpu < state.gpu_free.len() {
            if healthy {
                state.unhealthy &= !(1 << gpu);
            } else {
                state.unhealthy |= 1 << gpu;
            }
        }
        self.join_group(node);
        self.track_room(node, room);
    }

    /// Records that `milli` of GPU `gpu`'s free memory on `node` holds idle copies of model weights: free for
    /// placement, but `kiln` avoids overwriting them when other free memory fits (each milli-GPU evicted weighs
    /// [`EVICTION_WEIGHT`] in its score), and every policy prefers, among equally free GPUs, the one with the least
    /// cached. Values above the GPU's free milli count as all of it.
    pub fn set_cached(&mut self, node: NodeId, gpu: usize, milli: u16) {
        if self.cluster.nodes[node as usize].cached.get(gpu) == Some(&milli) {
            return;
        }
        self.leave_group(node);
        if let Some(c) = self.cluster.nodes[node as usize].cached.get_mut(gpu) {
            *c = milli;
        }
        self.join_group(node);
    }

    /// Chooses a node and GPUs for `request` and reserves them.
    pub fn place(&mut self, request: &Request) -> Result<Placement, Unplaceable> {
        self.place_with(request, &Hints::default())
    }

    /// Chooses a node and GPUs for `request`, given what is known of its deployment, and reserves them.
    pub fn place_with(&mut self, request: &Request, hints: &Hints<'_>) -> Result<Placement, Unplaceable> {
        self.decisions += 1;
        if let GpuDemand::Share(m) = request.gpu
            && (m == 0 || m >= MILLI_PER_GPU)
        {
            return Err(Unplaceable::Impossible(format!("a GPU share must be 1..999 milli-GPU, not {m}")));
        }
        self.maybe_compact();
        // Hinted nodes are scored one by one; their groups offer only their other members.
        let mut hinted: Vec<NodeId> =
            hints.cached.iter().map(|h| h.node).chain(hints.colocated.iter().copied()).collect();
        hinted.sort_unstable();
        hinted.dedup();
        hinted.retain(|&n| (n as usize) < self.schedulable.len() && self.node_group[n as usize].is_some());
        let mut hinted_in: Vec<(u32, usize)> = Vec::new();
        for &n in &hinted {
            let g = self.node_group[n as usize].expect("retained schedulable nodes");
            match hinted_in.iter_mut().find(|(group, _)| *group == g) {
                Some((_, count)) => *count += 1,
                None => hinted_in.push((g, 1)),
            }
        }
        let mut best = Best::default();
        for i in 0..self.active.len() {
            let g = self.active[i];
            let Some(eval) = self.eval(g, request) else { continue };
            let taken = hinted_in.iter().find(|(group, _)| *group == g).map_or(0, |(_, c)| *c);
            let eligible = self.groups[g as usize].members.len() - taken;
            if eligible > 0 {
                best.offer(eval.score, Candidate::Group { group: g, choice: eval.choice, eligible });
            }
        }
        for &node in &hinted {
            let g = self.node_group[node as usize].expect("retained schedulable nodes");
            let Some(eval) = self.eval(g, request) else { continue };
            let replicas = hints.colocated.iter().filter(|&&n| n == node).count() as f64;
            let mut score = eval.score - SPREAD_PENALTY * replicas;
            let mut choice = eval.choice;
            if self.policy == Policy::Kiln {
                // Loads take time in proportion to the weights: the bonuses are per GPU of demand (at least 0.1).
                let size = self.resolved(node, request).map_or(0.0, |d| d.milli() as f64 / 1000.0).max(0.1);
                let weights = CacheWeights {
                    gpu: self.cache_weights.gpu * size,
                    host_ram: self.cache_weights.host_ram * size,
                    disk: self.cache_weights.disk * size,
                };
                for hint in hints.cached.iter().filter(|h| h.node == node) {
                    match (hint.tier, self.resolved(node, request)) {
                        (CacheTier::Gpu(mask), Some(GpuDemand::Share(_))) if mask.count_ones() == 1 => {
                            let i = mask.trailing_zeros() as u8;
                            let free = self.cluster.node(node).usable(usize::from(i));
                            if let Some(on_gpu) = self.eval_on_gpu(g, request, free) {
                                let warm = on_gpu + weights.gpu - SPREAD_PENALTY * replicas;
                                if warm > score {
                                    (score, choice) = (warm, GpuChoice::ShareAt(i));
                                }
                            }
                        }
                        (CacheTier::Gpu(mask), Some(GpuDemand::Whole(k))) if mask.count_ones() == u32::from(k) => {
                            let state = self.cluster.node(node);
                            let all_free = (0..MAX_GPUS_PER_NODE)
                                .filter(|i| mask & (1 << i) != 0)
                                .all(|i| state.usable(i) == MILLI_PER_GPU);
                            if all_free {
                                score = score.max(eval.score + weights.gpu - SPREAD_PENALTY * replicas);
                            }
                        }
                        (CacheTier::Gpu(_), _) => {}
                        (tier, _) => score = score.max(eval.score + weights.of(tier) - SPREAD_PENALTY * replicas),
                    }
                }
            }
            best.offer(score, Candidate::Node { node, choice });
        }
        if best.ties.is_empty() {
            return Err(if self.cluster.could_ever_hold(request) {
                Unplaceable::NoFit
            } else {
                Unplaceable::Impossible(if self.cluster.is_empty() {
                    "the cluster has no node".to_owned()
                } else {
                    format!(
                        "it needs more than any node that may hold it has (CPU {} milli, memory {} MiB, GPU {:?})",
                        request.cpu_milli, request.memory_mib, request.gpu
                    )
                })
            });
        }
        let (node, choice) = match self.tie_break {
            TieBreak::Random => self.pick_at_random(&best, &hinted),
            TieBreak::NodeOrder => self.pick_first_in_order(&best, &hinted),
        };
        let preferred = hints
            .cached
            .iter()
            .find_map(|h| match h.tier {
                CacheTier::Gpu(mask) if h.node == node => Some(mask),
                _ => None,
            })
            .unwrap_or(0);
        let placement = self.concrete(node, request, choice, preferred);
        let room = self.room_of(node);
        self.leave_group(node);
        self.cluster.apply(request, &placement);
        self.join_group(node);
        self.track_room(node, room);
        Ok(placement)
    }

    /// A tied candidate drawn uniformly, each node of a group counting once.
    fn pick_at_random(&mut self, best: &Best, hinted: &[NodeId]) -> (NodeId, GpuChoice) {
        let mut k = self.rng.below(best.weight as u64) as usize;
        let candidate = *best
            .ties
            .iter()
            .find(|c| {
                if k < c.weight() {
                    true
                } else {
                    k -= c.weight();
                    false
                }
            })
            .unwrap_or(&best.ties[0]);
        match candidate {
            Candidate::Node { node, choice } => (node, choice),
            Candidate::Group { group, choice, .. } => {
                let members = &self.groups[group as usize].members;
                let node = if hinted.is_empty() {
                    members[k]
                } else {
                    *members
                        .iter()
                        .filter(|n| hinted.binary_search(n).is_err())
                        .nth(k)
                        .expect("k is below the group's eligible count")
                };
                (node, choice)
            }
        }
    }

    /// The tied node first in the tie-break order.
    fn pick_first_in_order(&self, best: &Best, hinted: &[NodeId]) -> (NodeId, GpuChoice) {
        let rank = |n: &NodeId| self.rank.get(*n as usize).copied().unwrap_or(u32::MAX);
        best.ties
            .iter()
            .filter_map(|c| match *c {
                Candidate::Node { node, choice } => Some((node, choice)),
                Candidate::Group { group, choice, .. } => self.groups[group as usize]
                    .members
                    .iter()
                    .filter(|n| hinted.binary_search(n).is_err())
                    .min_by_key(|n| rank(n))
                    .map(|&node| (node, choice)),
            })
            .min_by_key(|(node, _)| rank(node))
            .expect("a tied candidate has an eligible node")
    }

    /// Places `request` on `node` using only the GPUs in the bitmask `gpus`, whatever the node's schedulable and
    /// health marks say: for work confined to GPUs set aside for it (a rental's own GPUs, which general placement
    /// sees as unavailable), whose health the caller has checked. Among the allowed GPUs a share goes to the one with
    /// the least free room that fits (best fit) and whole GPUs to the lowest free indexes; CPU and host memory must
    /// fit on the node as usual.
    pub fn place_on(&mut self, request: &Request, node: NodeId, gpus: u16) -> Result<Placement, Unplaceable> {
        self.decisions += 1;
        if node as usize >= self.cluster.len() {
            return Err(Unplaceable::Impossible(format!("no node {node}")));
        }
        let state = self.cluster.node(node);
        let Some(demand) = self.resolved(node, request) else {
            return Err(Unplaceable::Impossible("the node's GPUs cannot hold the request".into()));
        };
        if state.cpu_free < request.cpu_milli || state.mem_free < request.memory_mib {
            return Err(Unplaceable::NoFit);
        }
        let allowed = |i: &usize| gpus & (1 << i) != 0;
        let (mask, milli) = match demand {
            GpuDemand::None | GpuDemand::Memory(_) => (0u16, 0u16),
            GpuDemand::Share(m) => {
                let best = (0..state.gpu_free.len())
                    .filter(allowed)
                    .filter(|&i| state.gpu_free[i] >= m)
                    .min_by_key(|&i| (state.gpu_free[i], state.cached[i], i))
                    .ok_or(Unplaceable::NoFit)?;
                (1 << best, m)
            }
            GpuDemand::Whole(k) => {
                let free: Vec<usize> =
                    (0..state.gpu_free.len()).filter(allowed).filter(|&i| state.gpu_free[i] == MILLI_PER_GPU).collect();
                if free.len() < usize::from(k) {
                    return Err(Unplaceable::NoFit);
                }
                (free.iter().take(usize::from(k)).fold(0u16, |mask, &i| mask | (1 << i)), MILLI_PER_GPU)
            }
        };
        let placement = Placement { node, gpus: mask, milli_per_gpu: milli };
        self.maybe_compact();
        let room = self.room_of(node);
        self.leave_group(node);
        self.cluster.apply(request, &placement);
        self.join_group(node);
        self.track_room(node, room);
        Ok(placement)
    }

    /// Returns a placement's resources. `request` must be the one `placement` was made for.
    pub fn release(&mut self, request: &Request, placement: &Placement) {
        self.maybe_compact();
        let room = self.room_of(placement.node);
        self.leave_group(placement.node);
        self.cluster.unapply(request, placement);
        self.join_group(placement.node);
        self.track_room(placement.node, room);
    }

    /// The node's GPUs if it is schedulable, has two or more and all are free (room for gangs), else 0; always 0
    /// unless `kiln` weighs gang kinds by the room for them (`follows_room`).
    fn room_of(&self, node: NodeId) -> u64 {
        if !self.follows_room || !self.schedulable[node as usize] {
            return 0;
        }
        let state = self.cluster.node(node);
        let n = state.gpu_free.len();
        if n >= 2 && (0..n).all(|i| state.usable(i) == MILLI_PER_GPU) { n as u64 } else { 0 }
    }

    /// Follows a change on `node` (whose room was `before`): once the room for gangs has moved by more than
    /// [`ROOM_STEP`] of what it was when the weights were derived, `kiln` derives them again (a refresh costs
    /// O(groups x kinds), so about 40 refreshes while a large cluster's room runs from thousands of GPUs to none).
    fn track_room(&mut self, node: NodeId, before: u64) {
        let after = self.room_of(node);
        if after == before {
            return;
        }
        self.room = (self.room + after).saturating_sub(before);
        let moved = self.room.abs_diff(self.room_at_refresh) as f64;
        if moved > ROOM_STEP * self.room_at_refresh.max(self.room) as f64 {
            self.refresh_workload();
        }
    }

    /// Drops the score cache when it grows past [`CACHE_LIMIT`], and groups no node has any more (every
    /// signature ever seen would otherwise stay) once they outnumber the live ones: a rebuild from the nodes,
    /// O(nodes), at most once per that many new signatures.
    fn maybe_compact(&mut self) {
        if self.cache.len() > CACHE_LIMIT {
            self.cache.clear();
        }
        if self.groups.len() <= 2 * self.active.len() + GROUP_SLACK {
            return;
        }
        self.cache.clear();
        self.groups.clear();
        self.group_of.clear();
        self.active.clear();
        self.active_pos.clear();
        self.node_group.iter_mut().for_each(|g| *g = None);
        for node in 0..self.cluster.len() as NodeId {
            self.join_group(node);
        }
    }

    fn resolved(&self, node: NodeId, request: &Request) -> Option<GpuDemand> {
        let node_type = self.cluster.node_type(self.cluster.node(node).type_id);
        request.gpu.resolve(node_type.gpu_memory_mib)
    }

    fn eval(&mut self, group: u32, request: &Request) -> Option<Eval> {
        if let Some(cached) = self.cache.get(&(group, *request)) {
            return *cached;
        }
        let g = &self.groups[group as usize];
        let node_type = self.cluster.node_type(g.sig.type_id);
        let eval = if self.cluster.selects(request.selector, g.sig.type_id) {
            request.gpu.resolve(node_type.gpu_memory_mib).and_then(|gpu| {
                let request = Request { gpu, ..*request };
                policy::evaluate(self.policy, &g.sig, g.frag, node_type, &request, &self.workload)
            })
        } else {
            None
        };
        self.cache.insert((group, *request), eval);
        eval
    }

    fn eval_on_gpu(&self, group: u32, request: &Request, free: u16) -> Option<f64> {
        let g = &self.groups[group as usize];
        let node_type = self.cluster.node_type(g.sig.type_id);
        let gpu = request.gpu.resolve(node_type.gpu_memory_mib)?;
        let request = Request { gpu, ..*request };
        policy::evaluate_on_gpu(self.policy, &g.sig, g.frag, node_type, &request, &self.workload, free)
    }

    /// The GPUs for `choice` on `node`; among equal candidates, those in `preferred` (a bitmask: GPUs holding an
    /// idle copy of the request's weights) first, then the least cached.
    fn concrete(&mut self, node: NodeId, request: &Request, choice: GpuChoice, preferred: u16) -> Placement {
        let state = self.cluster.node(node);
        let free: Vec<u16> = (0..state.gpu_free.len()).map(|i| state.usable(i)).collect();
        // GPU indexes by (free, cached): among equally free GPUs, the one with the fewest idle copies first.
        let mut order: Vec<usize> = (0..free.len()).collect();
        order.sort_by_key(|&i| (free[i], preferred & (1 << i) == 0, state.cached[i]));
        let demand = self.resolved(node, request).expect("the node was scored for the request");
        let (gpus, milli) = match (choice, demand) {
            (GpuChoice::None, _) | (_, GpuDemand::None | GpuDemand::Memory(_)) => (0u16, 0u16),
            (GpuChoice::ShareAt(i), GpuDemand::Share(m)) => (1 << i, m),
            (GpuChoice::ShareOn(v), GpuDemand::Share(m)) => {
                let i =
                    order.iter().copied().find(|&i| free[i] == v).expect("signature names a GPU with this free value");
                (1 << i, m)
            }
            (GpuChoice::ShareRandom, GpuDemand::Share(m)) => {
                let fitting: Vec<usize> = (0..free.len()).filter(|&i| free[i] >= m).collect();
                let i = fitting[self.rng.below(fitting.len() as u64) as usize];
                (1 << i, m)
            }
            (_, GpuDemand::Whole(k)) => {
                let whole = |i: &usize| free.get(*i) == Some(&MILLI_PER_GPU);
                let mask =
                    order.iter().copied().filter(whole).take(usize::from(k)).fold(0u16, |mask, i| mask | (1 << i));
                (mask, MILLI_PER_GPU)
            }
            (GpuChoice::Whole, GpuDemand::Share(m)) => {
                let i = order.iter().copied().find(|&i| free[i] == MILLI_PER_GPU).expect("a free GPU");
                (1 << i, m)
            }
        };
        Placement { node, gpus, milli_per_gpu: milli }
    }

    fn join_group(&mut self, node: NodeId) {
        if !self.schedulable[node as usize] {
            return;
        }
        let sig = Signature::of(self.cluster.node(node));
        let group = match self.group_of.get(&sig) {
            Some(&g) => g,
            None => {
                let g = self.groups.len() as u32;
                let frag = if matches!(self.policy, Policy::Fgd | Policy::Kiln) {
                    let node_type = self.cluster.node_type(sig.type_id);
                    self.workload.node_frag(
                        node_type.model,
                        node_type.gpu_memory_mib,
                        sig.cpu_free,
                        sig.mem_free,
                        &sig.gpu_free,
                    )
                } else {
                    0.0
                };
                self.group_of.insert(sig.clone(), g);
                self.groups.push(Group { sig, members: Vec::new(), frag });
                self.active_pos.push(None);
                g
            }
        };
        let members = &mut self.groups[group as usize].members;
        self.node_pos[node as usize] = members.len() as u32;
        members.push(node);
        self.node_group[node as usize] = Some(group);
        if members.len() == 1 {
            self.active_pos[group as usize] = Some(self.active.len() as u32);
            self.active.push(group);
        }
    }

    fn leave_group(&mut self, node: NodeId) {
        let Some(group) = self.node_group[node as usize].take() else { return };
        let pos = self.node_pos[node as usize] as usize;
        let g = &mut self.groups[group as usize];
        g.members.swap_remove(pos);
        if let Some(&moved) = g.members.get(pos) {
            self.node_pos[moved as usize] = pos as u32;
        }
        if g.members.is_empty() {
            let at = self.active_pos[group as usize].take().expect("an active group") as usize;
            self.active.swap_remove(at);
            if let Some(&moved) = self.active.get(at) {
                self.active_pos[moved as usize] = Some(at as u32);
            }
        }
    }
}

/// Whether `policy`'s gang weights follow the room for gangs on `workload` ([`Workload::weigh_by_room`]).
fn follows_room(policy: Policy, workload: &Workload) -> bool {
    policy == Policy::Kiln && workload.has_gangs()
}

/// The mix `policy`'s measure uses for the caller's `workload` on `cluster`.
fn effective_workload(policy: Policy, workload: &Workload, cluster: &Cluster) -> Workload {
    if policy == Policy::Kiln {
        let mut workload = workload.clone().with_measure(frag::Measure::Kiln);
        workload.weigh_by_room(cluster);
        workload
    } else {
        workload.clone().with_measure(frag::Measure::Fgd)
    }
}

#[cfg(test)]
mod tests;
