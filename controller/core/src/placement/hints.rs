//! What the engine should know about a request beyond its resources: where its weights are cached, and which nodes
//! already run replicas of its deployment.

use super::*;

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
    pub(super) fn of(&self, tier: CacheTier) -> f64 {
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
