//! GPU fragmentation as defined by FGD ("Beware of Fragmentation", Weng et al., USENIX ATC'23).
//!
//! For a node `n` and a kind of request `m`, the fragment `F_n(m)` is the free GPU on `n` that `m` cannot use:
//! - all of the node's free GPU if `m` cannot run on `n` at all (not enough CPU or memory, a GPU model `m` does not
//!   accept, not enough GPUs), or if `m` needs no GPU;
//! - otherwise, for a GPU share of `r` milli, the free GPU on GPUs with less than `r` free; for `k` whole GPUs, the
//!   free GPU on GPUs that are partly used.
//!
//! The node's fragmentation under a workload is the expectation `F_n(M) = sum_m p_m F_n(m)` over the workload's
//! request kinds `m` with their popularity `p_m`. Every kind counts, however rare: leaving out the rare 2/4/8-GPU
//! gangs stops the measure from protecting whole free nodes, and the gangs then starve.

use super::{GpuDemand, MILLI_PER_GPU, ModelSet, Request};

/// The request mix the fragmentation measure assumes: request kinds with their popularity.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    shapes: Vec<Shape>,
}

/// Request kinds with one GPU demand and one set of allowed models; they differ only in CPU and memory.
#[derive(Debug, Clone)]
struct Shape {
    gpu: GpuDemand,
    models: ModelSet,
    weight: f64,
    /// (cpu, memory, weight) of each kind.
    kinds: Vec<(u32, u32, f64)>,
}

impl Workload {
    /// The mix of `requests`, each kind weighted by how often it occurs.
    pub fn from_requests<'a>(requests: impl IntoIterator<Item = &'a Request>) -> Self {
        let mut counts: Vec<(Request, u64)> = Vec::new();
        let mut index: std::collections::HashMap<Request, usize> = std::collections::HashMap::new();
        let mut total = 0u64;
        for r in requests {
            total += 1;
            match index.get(r) {
                Some(&i) => counts[i].1 += 1,
                None => {
                    index.insert(*r, counts.len());
                    counts.push((*r, 1));
                }
            }
        }
        let mut workload = Self::default();
        for (r, count) in counts {
            workload.add(&r, count as f64 / total.max(1) as f64);
        }
        workload
    }

    /// Adds a request kind with popularity `weight`.
    pub fn add(&mut self, request: &Request, weight: f64) {
        let models = if request.gpu == GpuDemand::None { ModelSet::ANY } else { request.models };
        let shape = match self.shapes.iter_mut().find(|s| s.gpu == request.gpu && s.models == models) {
            Some(shape) => shape,
            None => {
                self.shapes.push(Shape { gpu: request.gpu, models, weight: 0.0, kinds: Vec::new() });
                self.shapes.last_mut().expect("just pushed")
            }
        };
        shape.weight += weight;
        shape.kinds.push((request.cpu_milli, request.memory_mib, weight));
    }

    /// Number of distinct request kinds.
    pub fn kinds(&self) -> usize {
        self.shapes.iter().map(|s| s.kinds.len()).sum()
    }

    /// `F_n(M)` in milli-GPU for a node with GPU model `model`, `cpu_free`, `mem_free` and GPUs with `gpu_free`
    /// milli free each (any order).
    pub fn node_frag(&self, model: u8, cpu_free: u32, mem_free: u32, gpu_free: &[u16]) -> f64 {
        let total: u32 = gpu_free.iter().map(|&f| u32::from(f)).sum();
        if total == 0 {
            return 0.0;
        }
        let total = f64::from(total);
        let whole_free = gpu_free.iter().filter(|&&f| f == MILLI_PER_GPU).count();
        let mut frag = 0.0;
        for shape in &self.shapes {
            if shape.gpu != GpuDemand::None && !shape.models.contains(model) {
                frag += shape.weight * total;
                continue;
            }
            let usable_frag = match shape.gpu {
                GpuDemand::None => total,
                GpuDemand::Share(r) => gpu_free.iter().filter(|&&f| f < r).map(|&f| f64::from(f)).sum(),
                GpuDemand::Whole(k) if whole_free >= usize::from(k) => {
                    gpu_free.iter().filter(|&&f| f < MILLI_PER_GPU).map(|&f| f64::from(f)).sum()
                }
                GpuDemand::Whole(_) => total,
            };
            let fits: f64 =
                shape.kinds.iter().filter(|(c, m, _)| *c <= cpu_free && *m <= mem_free).map(|(_, _, w)| w).sum();
            frag += fits * usable_frag + (shape.weight - fits) * total;
        }
        frag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: u32, gpu: GpuDemand) -> Request {
        Request { cpu_milli: cpu, memory_mib: 0, gpu, models: ModelSet::ANY }
    }

    #[test]
    fn share_kinds_count_gpus_too_small_for_them() {
        let workload = Workload::from_requests(&[req(1000, GpuDemand::Share(500))]);
        // GPUs with 300 and 200 free cannot hold 500; the one with 800 can.
        assert_eq!(workload.node_frag(0, 8000, 1000, &[300, 800, 200]), 500.0);
    }

    #[test]
    fn whole_gpu_kinds_count_partly_used_gpus_or_everything_when_too_few_are_free() {
        let workload = Workload::from_requests(&[req(0, GpuDemand::Whole(2))]);
        assert_eq!(workload.node_frag(0, 0, 0, &[1000, 1000, 400]), 400.0);
        assert_eq!(workload.node_frag(0, 0, 0, &[1000, 600, 400]), 2000.0);
    }

    #[test]
    fn lacking_cpu_or_model_makes_all_free_gpu_a_fragment() {
        let gpu_kind =
            Request { cpu_milli: 4000, memory_mib: 0, gpu: GpuDemand::Share(500), models: ModelSet::of([1]) };
        let workload = Workload::from_requests(&[gpu_kind]);
        assert_eq!(workload.node_frag(1, 8000, 0, &[1000, 100]), 100.0);
        assert_eq!(workload.node_frag(1, 2000, 0, &[1000, 100]), 1100.0, "not enough CPU");
        assert_eq!(workload.node_frag(0, 8000, 0, &[1000, 100]), 1100.0, "model not allowed");
    }

    #[test]
    fn the_measure_is_the_popularity_weighted_mean() {
        let a = req(0, GpuDemand::Share(500));
        let b = req(0, GpuDemand::Whole(2));
        let workload = Workload::from_requests(&[a, a, a, b]);
        // a: 300 (the GPU with 300 free); b: 1300 (only one whole GPU free). Mixed 3:1 -> 550.
        assert!((workload.node_frag(0, 0, 0, &[1000, 300]) - 550.0).abs() < 1e-9);
        // Full node: nothing free, nothing fragmented.
        assert_eq!(workload.node_frag(0, 0, 0, &[0, 0]), 0.0);
        assert_eq!(workload.kinds(), 2);
    }
}
