//! What is asked and what is answered: a request for resources, the selectors and GPU-model sets it names, where
//! it was placed, or why it could not be.

use super::*;

/// A node label selector registered with [`Cluster::selector`]; [`Selector::ANY`] matches every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector(pub(super) u16);

impl Selector {
    /// Matches every node.
    pub const ANY: Self = Self(0);
}

/// A set of GPU models, as a bitmask over the cluster's model ids (at most 64 models).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ModelSet(pub(super) u64);

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
