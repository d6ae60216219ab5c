//! The placement engine: which node and which GPUs a request (a model replica, a rented GPU, a trace pod) goes to.
//!
//! Pure: input is the cluster state held by the engine and a [`Request`]; output is a [`Placement`] or the reason
//! none exists. Nothing here reads a clock, a file or the network.
//!
//! # Resource model
//! A node has CPU (millicores), host memory (MiB) and up to [`MAX_GPUS_PER_NODE`] GPUs of one model, each with a
//! capacity of [`MILLI_PER_GPU`] milli-GPU. A request asks for CPU, memory and one of: no GPU, a share of one GPU
//! (`Share(milli)`, 1..999, co-located with other shares on that GPU) or `Whole(k)` GPUs on one node (a gang; whole
//! GPUs are never shared, which is what rentals need), optionally restricted to a set of GPU models.
//!
//! # Speed: state signatures
//! Every policy here scores a node from its *signature* alone: node type, free CPU, free memory and the sorted
//! free milli-GPU of its GPUs. Nodes with equal signatures are interchangeable, so the engine keeps nodes grouped by
//! signature and scores each group once per distinct request, caching the result; placing or releasing updates one
//! node and moves it between two groups (O(GPUs) plus a hash), with no rebuild of anything cluster-wide. Ties
//! between equally good nodes are broken uniformly at random with the engine's seeded RNG, as the Kubernetes
//! scheduler does.

pub mod experiment;
pub mod frag;
pub mod openb;
mod policy;

use std::collections::HashMap;

pub use frag::{Measure, Workload};
pub use policy::Policy;

use crate::rng::Rng;

/// Capacity of one GPU in milli-GPU.
pub const MILLI_PER_GPU: u16 = 1000;
/// Most GPUs one node may have.
pub const MAX_GPUS_PER_NODE: usize = 16;

/// Index of a node in the cluster, in the order the nodes were given.
pub type NodeId = u32;

/// A set of GPU models, as a bitmask over the cluster's model ids (at most 64 models).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelSet(u64);

impl ModelSet {
    /// Every model.
    pub const ANY: Self = Self(u64::MAX);

    /// The set holding exactly `ids`.
    pub fn of(ids: impl IntoIterator<Item = u8>) -> Self {
        Self(ids.into_iter().fold(0, |mask, id| mask | (1u64 << id)))
    }

    /// Whether model `id` is in the set.
    pub fn contains(self, id: u8) -> bool {
        self.0 & (1u64 << id) != 0
    }
}

/// What a request needs of GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuDemand {
    /// No GPU.
    None,
    /// A share of one GPU, in milli-GPU (1..=999).
    Share(u16),
    /// This many whole GPUs on one node.
    Whole(u8),
}

impl GpuDemand {
    /// Total milli-GPU demanded.
    pub fn milli(self) -> u64 {
        match self {
            Self::None => 0,
            Self::Share(m) => u64::from(m),
            Self::Whole(k) => u64::from(k) * u64::from(MILLI_PER_GPU),
        }
    }
}

/// A request for resources on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// CPU, millicores.
    pub cpu_milli: u32,
    /// Host memory, MiB.
    pub memory_mib: u32,
    /// GPUs.
    pub gpu: GpuDemand,
    /// GPU models the request may use (ignored when it needs no GPU).
    pub models: ModelSet,
}

/// A node as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// Allocatable CPU, millicores.
    pub cpu_milli: u32,
    /// Allocatable host memory, MiB.
    pub memory_mib: u32,
    /// Number of GPUs (0..=16).
    pub gpu_count: u8,
    /// GPU model name (all GPUs of a node are one model); empty for CPU-only nodes.
    pub gpu_model: String,
}

/// Where a request was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    /// The node.
    pub node: NodeId,
    /// Bitmask of the GPU indexes used on the node.
    pub gpus: u16,
    /// Milli-GPU taken on each of those GPUs.
    pub milli_per_gpu: u16,
}

impl Placement {
    /// The GPU indexes used, ascending.
    pub fn gpu_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_GPUS_PER_NODE).filter(|i| self.gpus & (1 << i) != 0)
    }
}

/// Why a request could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unplaceable {
    /// No node has room for it now.
    #[error("no node has room for the request now")]
    NoFit,
    /// No node could ever hold it (too large for every node, or no node of an allowed GPU model).
    #[error("no node in the cluster could ever hold the request: {0}")]
    Impossible(String),
}

/// Errors building a cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// A node declares more GPUs than supported.
    #[error("node {node}: {count} GPUs; at most {MAX_GPUS_PER_NODE} per node are supported")]
    TooManyGpus {
        /// Node name.
        node: String,
        /// GPUs declared.
        count: u8,
    },
    /// More than 64 GPU models.
    #[error("more than 64 GPU models in one cluster")]
    TooManyModels,
}

/// Per-node mutable state: what is free.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeState {
    /// Node type (capacities and model): nodes of one type differ only in what is free.
    pub type_id: u32,
    /// Free CPU, millicores.
    pub cpu_free: u32,
    /// Free memory, MiB.
    pub mem_free: u32,
    /// Free milli-GPU of each GPU, by index.
    pub gpu_free: Vec<u16>,
}

/// Capacities shared by nodes of one type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeType {
    /// Allocatable CPU, millicores.
    pub cpu_milli: u32,
    /// Allocatable memory, MiB.
    pub memory_mib: u32,
    /// GPUs per node.
    pub gpu_count: u8,
    /// GPU model id.
    pub model: u8,
}

/// The nodes, their types and what is free on each.
#[derive(Clone, Debug)]
pub struct Cluster {
    models: Vec<String>,
    names: Vec<String>,
    types: Vec<NodeType>,
    nodes: Vec<NodeState>,
    gpu_capacity_milli: u64,
    gpu_allocated_milli: u64,
}

impl Cluster {
    /// A cluster of empty nodes.
    pub fn new(specs: &[NodeSpec]) -> Result<Self, ClusterError> {
        let mut models: Vec<String> = Vec::new();
        let mut types: Vec<NodeType> = Vec::new();
        let mut type_ids: HashMap<NodeType, u32> = HashMap::new();
        let mut nodes = Vec::with_capacity(specs.len());
        let mut capacity = 0u64;
        for spec in specs {
            if usize::from(spec.gpu_count) > MAX_GPUS_PER_NODE {
                return Err(ClusterError::TooManyGpus { node: spec.name.clone(), count: spec.gpu_count });
            }
            let model = match models.iter().position(|m| *m == spec.gpu_model) {
                Some(i) => i,
                None => {
                    if models.len() == 64 {
                        return Err(ClusterError::TooManyModels);
                    }
                    models.push(spec.gpu_model.clone());
                    models.len() - 1
                }
            } as u8;
            let node_type =
                NodeType { cpu_milli: spec.cpu_milli, memory_mib: spec.memory_mib, gpu_count: spec.gpu_count, model };
            let next = types.len() as u32;
            let type_id = *type_ids.entry(node_type.clone()).or_insert_with(|| {
                types.push(node_type);
                next
            });
            capacity += u64::from(spec.gpu_count) * u64::from(MILLI_PER_GPU);
            nodes.push(NodeState {
                type_id,
                cpu_free: spec.cpu_milli,
                mem_free: spec.memory_mib,
                gpu_free: vec![MILLI_PER_GPU; usize::from(spec.gpu_count)],
            });
        }
        Ok(Self {
            models,
            names: specs.iter().map(|s| s.name.clone()).collect(),
            types,
            nodes,
            gpu_capacity_milli: capacity,
            gpu_allocated_milli: 0,
        })
    }

    /// The id of GPU model `name`, if any node has it.
    pub fn model_id(&self, name: &str) -> Option<u8> {
        self.models.iter().position(|m| m == name).map(|i| i as u8)
    }

    /// GPU model names, by id.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A node's name.
    pub fn name(&self, node: NodeId) -> &str {
        &self.names[node as usize]
    }

    /// A node's state.
    pub fn node(&self, node: NodeId) -> &NodeState {
        &self.nodes[node as usize]
    }

    /// A node type.
    pub fn node_type(&self, type_id: u32) -> &NodeType {
        &self.types[type_id as usize]
    }

    /// Total GPU capacity, milli-GPU.
    pub fn gpu_capacity_milli(&self) -> u64 {
        self.gpu_capacity_milli
    }

    /// GPU allocated, milli-GPU.
    pub fn gpu_allocated_milli(&self) -> u64 {
        self.gpu_allocated_milli
    }

    /// Whether some node, empty, could hold `request`.
    pub fn could_ever_hold(&self, request: &Request) -> bool {
        self.types.iter().any(|t| {
            t.cpu_milli >= request.cpu_milli
                && t.memory_mib >= request.memory_mib
                && match request.gpu {
                    GpuDemand::None => true,
                    GpuDemand::Share(_) => t.gpu_count >= 1 && request.models.contains(t.model),
                    GpuDemand::Whole(k) => t.gpu_count >= k && request.models.contains(t.model),
                }
        })
    }

    fn apply(&mut self, request: &Request, placement: &Placement) {
        let node = &mut self.nodes[placement.node as usize];
        node.cpu_free -= request.cpu_milli;
        node.mem_free -= request.memory_mib;
        for i in placement.gpu_indexes() {
            node.gpu_free[i] -= placement.milli_per_gpu;
            self.gpu_allocated_milli += u64::from(placement.milli_per_gpu);
        }
    }

    fn unapply(&mut self, request: &Request, placement: &Placement) {
        let node = &mut self.nodes[placement.node as usize];
        node.cpu_free += request.cpu_milli;
        node.mem_free += request.memory_mib;
        for i in placement.gpu_indexes() {
            node.gpu_free[i] += placement.milli_per_gpu;
            self.gpu_allocated_milli -= u64::from(placement.milli_per_gpu);
        }
    }
}

/// A node's state with its GPUs sorted by free milli-GPU: what every policy scores.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Signature {
    /// Node type.
    pub type_id: u32,
    /// Free CPU, millicores.
    pub cpu_free: u32,
    /// Free memory, MiB.
    pub mem_free: u32,
    /// Free milli-GPU per GPU, ascending.
    pub gpu_free: Vec<u16>,
}

impl Signature {
    fn of(state: &NodeState) -> Self {
        let mut gpu_free = state.gpu_free.clone();
        gpu_free.sort_unstable();
        Self { type_id: state.type_id, cpu_free: state.cpu_free, mem_free: state.mem_free, gpu_free }
    }
}

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
}

#[derive(Clone, Copy, Debug)]
struct Eval {
    score: f64,
    choice: GpuChoice,
}

#[derive(Debug)]
struct Group {
    sig: Signature,
    members: Vec<NodeId>,
    /// Expected fragmentation of a node with this signature, milli-GPU (see [`frag`]); computed only for the
    /// policies that descend its gradient, 0 for the others.
    frag: f64,
}

/// Places requests on a cluster with one policy, keeping per-node state up to date on place and release.
#[derive(Debug)]
pub struct PlacementEngine {
    cluster: Cluster,
    policy: Policy,
    workload: Workload,
    rng: Rng,
    groups: Vec<Group>,
    group_of: HashMap<Signature, u32>,
    node_group: Vec<u32>,
    node_pos: Vec<u32>,
    active: Vec<u32>,
    active_pos: Vec<Option<u32>>,
    cache: HashMap<(u32, Request), Option<Eval>>,
    decisions: u64,
}

/// Score cache entries kept before the cache is cleared (bounds memory on long runs).
const CACHE_LIMIT: usize = 4_000_000;

impl PlacementEngine {
    /// An engine over `cluster`. `workload` is the request mix the fragmentation measure (and so `fgd` and `kiln`)
    /// assumes (its measure is set by the policy: FGD's for all but `kiln`); `seed` drives tie-breaking.
    pub fn new(cluster: Cluster, policy: Policy, workload: Workload, seed: u64) -> Self {
        let n = cluster.len();
        let workload = if policy == Policy::Kiln {
            workload.with_measure(frag::Measure::Kiln)
        } else {
            workload.with_measure(frag::Measure::Fgd)
        };
        let mut engine = Self {
            cluster,
            policy,
            workload,
            rng: Rng::new(seed),
            groups: Vec::new(),
            group_of: HashMap::new(),
            node_group: vec![0; n],
            node_pos: vec![0; n],
            active: Vec::new(),
            active_pos: Vec::new(),
            cache: HashMap::new(),
            decisions: 0,
        };
        for node in 0..n as NodeId {
            engine.join_group(node);
        }
        engine
    }

    /// The cluster state.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Placement decisions made so far (successful or not).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// Chooses a node and GPUs for `request` and reserves them.
    pub fn place(&mut self, request: &Request) -> Result<Placement, Unplaceable> {
        self.decisions += 1;
        if let GpuDemand::Share(m) = request.gpu
            && (m == 0 || m >= MILLI_PER_GPU)
        {
            return Err(Unplaceable::Impossible(format!("a GPU share must be 1..999 milli-GPU, not {m}")));
        }
        if self.cache.len() > CACHE_LIMIT {
            self.cache.clear();
        }
        let mut best = f64::NEG_INFINITY;
        let mut ties: Vec<(u32, GpuChoice)> = Vec::new();
        let mut tie_count = 0usize;
        for i in 0..self.active.len() {
            let g = self.active[i];
            let Some(eval) = self.eval(g, request) else { continue };
            let members = self.groups[g as usize].members.len();
            let tolerance = if best.is_finite() { 1e-9 * best.abs().max(1.0) } else { 0.0 };
            if ties.is_empty() || eval.score > best + tolerance {
                best = eval.score;
                ties.clear();
                tie_count = 0;
            }
            if (eval.score - best).abs() <= tolerance {
                ties.push((g, eval.choice));
                tie_count += members;
            }
        }
        if ties.is_empty() {
            return Err(if self.cluster.could_ever_hold(request) {
                Unplaceable::NoFit
            } else {
                Unplaceable::Impossible(format!("{request:?} is larger than every node that may hold it"))
            });
        }
        let mut k = self.rng.below(tie_count as u64) as usize;
        let (group, choice) = ties
            .iter()
            .find(|(g, _)| {
                let len = self.groups[*g as usize].members.len();
                if k < len {
                    true
                } else {
                    k -= len;
                    false
                }
            })
            .copied()
            .unwrap_or(ties[0]);
        let node = self.groups[group as usize].members[k];
        let placement = self.concrete(node, request, choice);
        self.leave_group(node);
        self.cluster.apply(request, &placement);
        self.join_group(node);
        Ok(placement)
    }

    /// Returns a placement's resources. `request` must be the one `placement` was made for.
    pub fn release(&mut self, request: &Request, placement: &Placement) {
        self.leave_group(placement.node);
        self.cluster.unapply(request, placement);
        self.join_group(placement.node);
    }

    fn eval(&mut self, group: u32, request: &Request) -> Option<Eval> {
        if let Some(cached) = self.cache.get(&(group, *request)) {
            return *cached;
        }
        let g = &self.groups[group as usize];
        let node_type = self.cluster.node_type(g.sig.type_id);
        let eval = policy::evaluate(self.policy, &g.sig, g.frag, node_type, request, &self.workload);
        self.cache.insert((group, *request), eval);
        eval
    }

    fn concrete(&mut self, node: NodeId, request: &Request, choice: GpuChoice) -> Placement {
        let free = &self.cluster.node(node).gpu_free;
        let (gpus, milli) = match (choice, request.gpu) {
            (GpuChoice::None, _) | (_, GpuDemand::None) => (0u16, 0u16),
            (GpuChoice::ShareOn(v), GpuDemand::Share(m)) => {
                let i = free.iter().position(|&f| f == v).expect("signature names a GPU with this free value");
                (1 << i, m)
            }
            (GpuChoice::ShareRandom, GpuDemand::Share(m)) => {
                let fitting: Vec<usize> = (0..free.len()).filter(|&i| free[i] >= m).collect();
                let i = fitting[self.rng.below(fitting.len() as u64) as usize];
                (1 << i, m)
            }
            (_, GpuDemand::Whole(k)) => {
                let mask = (0..free.len())
                    .filter(|&i| free[i] == MILLI_PER_GPU)
                    .take(usize::from(k))
                    .fold(0u16, |mask, i| mask | (1 << i));
                (mask, MILLI_PER_GPU)
            }
            (GpuChoice::Whole, GpuDemand::Share(m)) => {
                let i = free.iter().position(|&f| f == MILLI_PER_GPU).expect("a free GPU");
                (1 << i, m)
            }
        };
        Placement { node, gpus, milli_per_gpu: milli }
    }

    fn join_group(&mut self, node: NodeId) {
        let sig = Signature::of(self.cluster.node(node));
        let group = match self.group_of.get(&sig) {
            Some(&g) => g,
            None => {
                let g = self.groups.len() as u32;
                let frag = if matches!(self.policy, Policy::Fgd | Policy::Kiln) {
                    let model = self.cluster.node_type(sig.type_id).model;
                    self.workload.node_frag(model, sig.cpu_free, sig.mem_free, &sig.gpu_free)
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
        self.node_group[node as usize] = group;
        if members.len() == 1 {
            self.active_pos[group as usize] = Some(self.active.len() as u32);
            self.active.push(group);
        }
    }

    fn leave_group(&mut self, node: NodeId) {
        let group = self.node_group[node as usize];
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

#[cfg(test)]
mod tests;
