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
//! scheduler does.

pub mod frag;
mod policy;

use std::collections::HashMap;

pub use frag::{Measure, Workload};
pub use policy::Policy;

use crate::rng::Rng;

/// Capacity of one GPU in milli-GPU.
pub const MILLI_PER_GPU: u16 = 1000;
/// Most GPUs one node may have.
pub const MAX_GPUS_PER_NODE: usize = 16;

/// Node labels, `(key, value)`.
pub type Labels = Vec<(String, String)>;

/// Index of a node in the cluster, in the order the nodes were given (or added).
pub type NodeId = u32;

/// A node label selector registered with [`Cluster::selector`]; [`Selector::ANY`] matches every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector(u16);

impl Selector {
    /// Matches every node.
    pub const ANY: Self = Self(0);
}

/// A set of GPU models, as a bitmask over the cluster's model ids (at most 64 models).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ModelSet(u64);

impl ModelSet {
    /// Every model.
    pub const ANY: Self = Self(u64::MAX);

    /// The set holding exactly `ids`.
    pub fn of(ids: impl IntoIterator<Item = u8>) -> Self {
        Self(ids.into_iter().fold(0, |mask, id| mask | (1u64 << id)))
    }

    /// The models in either set.
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
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
    /// GPU memory, MiB: on a node whose GPUs have `g` MiB, a share of `ceil(1000 * mib / g)` milli-GPU when that is
    /// below one GPU, otherwise `ceil(mib / g)` whole GPUs. Fits no node whose GPU memory is unknown (0).
    Memory(u32),
}

impl GpuDemand {
    /// Total milli-GPU demanded (for `Memory`, as on an 80 GB GPU).
    pub fn milli(self) -> u64 {
        match self.resolve(80 * 1024) {
            Some(Self::Share(m)) => u64::from(m),
            Some(Self::Whole(k)) => u64::from(k) * u64::from(MILLI_PER_GPU),
            _ => 0,
        }
    }

    /// The demand on GPUs of `gpu_memory_mib` each: `Memory` becomes `Share` or `Whole`; `None` if it needs more
    /// GPUs than a node can have, or the GPU memory is unknown.
    pub fn resolve(self, gpu_memory_mib: u32) -> Option<Self> {
        let Self::Memory(mib) = self else { return Some(self) };
        if gpu_memory_mib == 0 {
            return None;
        }
        if mib < gpu_memory_mib {
            let milli = (u64::from(mib) * u64::from(MILLI_PER_GPU)).div_ceil(u64::from(gpu_memory_mib)).max(1);
            return Some(if milli >= u64::from(MILLI_PER_GPU) { Self::Whole(1) } else { Self::Share(milli as u16) });
        }
        let gpus = mib.div_ceil(gpu_memory_mib);
        (gpus as usize <= MAX_GPUS_PER_NODE).then_some(Self::Whole(gpus as u8))
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
    /// Nodes the request may use, by label.
    pub selector: Selector,
}

impl Request {
    /// A request for any GPU model on any node.
    pub fn new(cpu_milli: u32, memory_mib: u32, gpu: GpuDemand) -> Self {
        Self { cpu_milli, memory_mib, gpu, models: ModelSet::ANY, selector: Selector::ANY }
    }
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
    /// Memory of each GPU, MiB (0 if unknown: then no `Memory` demand fits the node).
    pub gpu_memory_mib: u32,
    /// Node labels.
    pub labels: Vec<(String, String)>,
}

impl NodeSpec {
    /// A node without labels and with unknown GPU memory.
    pub fn new(name: impl Into<String>, cpu_milli: u32, memory_mib: u32, gpu_count: u8, gpu_model: &str) -> Self {
        Self {
            name: name.into(),
            cpu_milli,
            memory_mib,
            gpu_count,
            gpu_model: gpu_model.to_owned(),
            gpu_memory_mib: 0,
            labels: Vec::new(),
        }
    }
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
    /// Node type (capacities, model, labels): nodes of one type differ only in what is free.
    pub type_id: u32,
    /// Free CPU, millicores.
    pub cpu_free: u32,
    /// Free memory, MiB.
    pub mem_free: u32,
    /// Free milli-GPU of each GPU, by index (unhealthy GPUs included: this is what is not allocated).
    pub gpu_free: Vec<u16>,
    /// Bitmask of the GPUs marked unhealthy: they take no new work.
    pub unhealthy: u16,
    /// Milli-GPU of each GPU's free memory holding idle copies of model weights (evictable, see
    /// [`PlacementEngine::set_cached`]).
    pub cached: Vec<u16>,
}

impl NodeState {
    /// Free milli-GPU of GPU `i` that new work may use (0 on an unhealthy GPU, or one the node does not have).
    pub fn usable(&self, i: usize) -> u16 {
        match self.gpu_free.get(i) {
            Some(&free) if self.unhealthy & (1 << i) == 0 => free,
            _ => 0,
        }
    }
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
    /// Memory of each GPU, MiB (0 if unknown).
    pub gpu_memory_mib: u32,
    /// Labels, sorted.
    pub labels: Vec<(String, String)>,
}

impl NodeType {
    /// Whether a node of this type, empty, could hold `request` (selectors aside).
    fn could_hold(&self, request: &Request) -> bool {
        self.cpu_milli >= request.cpu_milli
            && self.memory_mib >= request.memory_mib
            && match request.gpu.resolve(self.gpu_memory_mib) {
                None => false,
                Some(GpuDemand::None) => true,
                Some(GpuDemand::Share(_)) => self.gpu_count >= 1 && request.models.contains(self.model),
                Some(GpuDemand::Whole(k)) => self.gpu_count >= k && request.models.contains(self.model),
                Some(GpuDemand::Memory(_)) => unreachable!("resolved"),
            }
    }
}

/// The nodes, their types and what is free on each.
#[derive(Clone, Debug)]
pub struct Cluster {
    models: Vec<String>,
    names: Vec<String>,
    types: Vec<NodeType>,
    type_ids: HashMap<NodeType, u32>,
    nodes: Vec<NodeState>,
    /// Registered selectors (index = [`Selector`]; 0 is the empty one) and, for each, which types match it.
    selectors: Vec<(Labels, Vec<bool>)>,
    gpu_capacity_milli: u64,
    gpu_allocated_milli: u64,
}

impl Cluster {
    /// A cluster of empty nodes.
    pub fn new(specs: &[NodeSpec]) -> Result<Self, ClusterError> {
        let mut cluster = Self {
            models: Vec::new(),
            names: Vec::new(),
            types: Vec::new(),
            type_ids: HashMap::new(),
            nodes: Vec::with_capacity(specs.len()),
            selectors: vec![(Vec::new(), Vec::new())],
            gpu_capacity_milli: 0,
            gpu_allocated_milli: 0,
        };
        for spec in specs {
            cluster.add_node(spec)?;
        }
        Ok(cluster)
    }

    /// Adds an empty node.
    pub fn add_node(&mut self, spec: &NodeSpec) -> Result<NodeId, ClusterError> {
        if usize::from(spec.gpu_count) > MAX_GPUS_PER_NODE {
            return Err(ClusterError::TooManyGpus { node: spec.name.clone(), count: spec.gpu_count });
        }
        let model = match self.models.iter().position(|m| *m == spec.gpu_model) {
            Some(i) => i,
            None => {
                if self.models.len() == 64 {
                    return Err(ClusterError::TooManyModels);
                }
                self.models.push(spec.gpu_model.clone());
                self.models.len() - 1
            }
        } as u8;
        let mut labels = spec.labels.clone();
        labels.sort();
        let node_type = NodeType {
            cpu_milli: spec.cpu_milli,
            memory_mib: spec.memory_mib,
            gpu_count: spec.gpu_count,
            model,
            gpu_memory_mib: spec.gpu_memory_mib,
            labels,
        };
        let type_id = match self.type_ids.get(&node_type) {
            Some(&id) => id,
            None => {
                let id = self.types.len() as u32;
                for (wanted, matches) in &mut self.selectors {
                    matches.push(wanted.iter().all(|label| node_type.labels.contains(label)));
                }
                self.type_ids.insert(node_type.clone(), id);
                self.types.push(node_type);
                id
            }
        };
        self.gpu_capacity_milli += u64::from(spec.gpu_count) * u64::from(MILLI_PER_GPU);
        self.names.push(spec.name.clone());
        self.nodes.push(NodeState {
            type_id,
            cpu_free: spec.cpu_milli,
            mem_free: spec.memory_mib,
            gpu_free: vec![MILLI_PER_GPU; usize::from(spec.gpu_count)],
            unhealthy: 0,
            cached: vec![0; usize::from(spec.gpu_count)],
        });
        Ok(self.nodes.len() as NodeId - 1)
    }

    /// The selector for nodes carrying all of `labels` (registered on first use).
    pub fn selector(&mut self, labels: &[(&str, &str)]) -> Selector {
        let mut wanted: Vec<(String, String)> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        wanted.sort();
        wanted.dedup();
        if let Some(i) = self.selectors.iter().position(|(w, _)| *w == wanted) {
            return Selector(i as u16);
        }
        let matches = self.types.iter().map(|t| wanted.iter().all(|label| t.labels.contains(label))).collect();
        self.selectors.push((wanted, matches));
        Selector(self.selectors.len() as u16 - 1)
    }

    /// Whether nodes of type `type_id` match `selector`.
    pub fn selects(&self, selector: Selector, type_id: u32) -> bool {
        selector == Selector::ANY
            || self.selectors.get(usize::from(selector.0)).is_some_and(|(_, m)| m[type_id as usize])
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

    /// Whether some node, empty and healthy, could hold `request`.
    pub fn could_ever_hold(&self, request: &Request) -> bool {
        self.types.iter().enumerate().any(|(id, t)| self.selects(request.selector, id as u32) && t.could_hold(request))
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
    /// Idle-copy milli-GPU of the same GPUs (GPUs with equal free milli ordered by it, ascending).
    pub gpu_cached: Vec<u16>,
}

impl Signature {
    fn of(state: &NodeState) -> Self {
        let mut gpus: Vec<(u16, u16)> =
            (0..state.gpu_free.len()).map(|i| (state.usable(i), state.cached[i].min(state.usable(i)))).collect();
        gpus.sort_unstable();
        Self {
            type_id: state.type_id,
            cpu_free: state.cpu_free,
            mem_free: state.mem_free,
            gpu_free: gpus.iter().map(|g| g.0).collect(),
            gpu_cached: gpus.iter().map(|g| g.1).collect(),
        }
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
    /// This GPU (one holding an idle copy of the model).
    ShareAt(u8),
}

#[derive(Clone, Copy, Debug)]
struct Eval {
    score: f64,
    choice: GpuChoice,
}

/// Where a model's weights are already cached on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheTier {
    /// An idle copy in the memory of these GPUs (a bitmask of indexes): placing the replica on exactly them is a
    /// warm start.
    Gpu(u16),
    /// In host RAM: a load over PCIe.
    HostRam,
    /// On local disk: a load from NVMe.
    Disk,
}

/// A node that holds a request's model weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheHint {
    /// The node.
    pub node: NodeId,
    /// Where on it.
    pub tier: CacheTier,
}

/// What the engine should know about a request beyond its resources.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hints<'a> {
    /// Nodes holding the model's weights.
    pub cached: &'a [CacheHint],
    /// Nodes running replicas of the same deployment, once per replica: replicas spread to nodes with fewer.
    pub colocated: &'a [NodeId],
}

/// How much more expected fragmentation (milli-GPU) `kiln` accepts to avoid a cold load, per GPU of the request's
/// demand (load time grows with the weights; at least a tenth of a GPU counts), by the tier the weights are in. The
/// defaults weigh a warm start on a GPU at half a GPU, a load from host RAM (a second or two for tens of GB at PCIe
/// speed) at a quarter and a load from local NVMe at a tenth: enough to win between nodes that fragment alike,
/// never enough to break a whole free node for a one-GPU model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheWeights {
    /// Idle copy on the GPU.
    pub gpu: f64,
    /// Host RAM.
    pub host_ram: f64,
    /// Local disk.
    pub disk: f64,
}

impl Default for CacheWeights {
    fn default() -> Self {
        Self { gpu: 500.0, host_ram: 250.0, disk: 100.0 }
    }
}

impl CacheWeights {
    fn of(&self, tier: CacheTier) -> f64 {
        match tier {
            CacheTier::Gpu(_) => self.gpu,
            CacheTier::HostRam => self.host_ram,
            CacheTier::Disk => self.disk,
        }
    }
}

/// Score cost, for `kiln`, of each milli-GPU of idle model copies a placement overwrites: evicting a whole GPU of
/// them weighs half what a warm start of a one-GPU model is worth ([`CacheWeights::default`]'s `gpu`), since an
/// idle copy may never be used again.
pub const EVICTION_WEIGHT: f64 = 0.25;

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

/// The best candidates seen so far in a decision, with ties kept for a uniform random pick.
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

/// Places requests on a cluster with one policy, keeping per-node state up to date on place and release.
#[derive(Debug)]
pub struct PlacementEngine {
    cluster: Cluster,
    policy: Policy,
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
}

/// Score cache entries kept before the cache is cleared (bounds memory on long runs).
const CACHE_LIMIT: usize = 4_000_000;
/// Empty groups tolerated beyond twice the live ones before they are dropped.
const GROUP_SLACK: usize = 4096;

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
        };
        for node in 0..n as NodeId {
            engine.join_group(node);
        }
        engine
    }

    /// Replaces the request mix the fragmentation measure assumes (the deployments changed); scores are
    /// recomputed from the next decision on.
    pub fn set_workload(&mut self, workload: Workload) {
        let measure = if self.policy == Policy::Kiln { frag::Measure::Kiln } else { frag::Measure::Fgd };
        self.workload = workload.with_measure(measure);
        self.cache.clear();
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
        self.node_group.push(None);
        self.node_pos.push(0);
        self.schedulable.push(true);
        self.join_group(node);
        Ok(node)
    }

    /// Whether `node` takes new work (false: cordoned, draining or not ready). Work already on it stays until
    /// released.
    pub fn set_schedulable(&mut self, node: NodeId, schedulable: bool) {
        if self.schedulable[node as usize] == schedulable {
            return;
        }
        self.schedulable[node as usize] = schedulable;
        if schedulable {
            self.join_group(node);
        } else {
            self.leave_group(node);
        }
    }

    /// Whether `node` takes new work.
    pub fn is_schedulable(&self, node: NodeId) -> bool {
        self.schedulable[node as usize]
    }

    /// Marks GPU `gpu` of `node` healthy or not; an unhealthy GPU takes no new work.
    pub fn set_gpu_healthy(&mut self, node: NodeId, gpu: usize, healthy: bool) {
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
        let (node, choice) = match candidate {
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
        self.leave_group(node);
        self.cluster.apply(request, &placement);
        self.join_group(node);
        Ok(placement)
    }

    /// Returns a placement's resources. `request` must be the one `placement` was made for.
    pub fn release(&mut self, request: &Request, placement: &Placement) {
        self.maybe_compact();
        self.leave_group(placement.node);
        self.cluster.unapply(request, placement);
        self.join_group(placement.node);
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

#[cfg(test)]
mod tests;
