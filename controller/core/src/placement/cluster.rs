//! The cluster as the engine holds it: nodes as declared, their types, what is free on each, and the state
//! signature every policy scores.

use super::*;

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
    pub(super) fn could_hold(&self, request: &Request) -> bool {
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
    pub(super) models: Vec<String>,
    pub(super) names: Vec<String>,
    pub(super) types: Vec<NodeType>,
    pub(super) type_ids: HashMap<NodeType, u32>,
    pub(super) nodes: Vec<NodeState>,
    /// Registered selectors (index = [`Selector`]; 0 is the empty one) and, for each, which types match it.
    pub(super) selectors: Vec<(Labels, Vec<bool>)>,
    pub(super) gpu_capacity_milli: u64,
    pub(super) gpu_allocated_milli: u64,
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

    pub(super) fn apply(&mut self, request: &Request, placement: &Placement) {
        let node = &mut self.nodes[placement.node as usize];
        node.cpu_free -= request.cpu_milli;
        node.mem_free -= request.memory_mib;
        for i in placement.gpu_indexes() {
            node.gpu_free[i] -= placement.milli_per_gpu;
            self.gpu_allocated_milli += u64::from(placement.milli_per_gpu);
        }
    }

    pub(super) fn unapply(&mut self, request: &Request, placement: &Placement) {
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
    pub(super) fn of(state: &NodeState) -> Self {
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
