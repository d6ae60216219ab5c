//! The placement policies, each a function from a node signature and a request to a score (higher is better) and
//! the GPUs to use. The first six re-implement the policies compared in the FGD paper from its description:
//!
//! - `random`: any node that fits, uniformly; a random GPU that fits.
//! - `dotprod`: Tetris-style alignment: the largest dot product of the request and the node's free resources
//!   (CPU, memory, GPU, each normalised by the node's capacity); the best-fitting GPU.
//! - `clustering`: keeps requests of one GPU size together: first GPUs whose used part is a multiple of the request
//!   (they most likely hold only requests of that size), then empty GPUs, then any GPU that fits.
//! - `packing`: fills used GPUs before used nodes before idle nodes: a share goes to a partly used GPU if one fits,
//!   otherwise to a node that already has work, and only then to an idle node.
//! - `bestfit`: the node left with the least free resources: CPU and GPU left, each divided by the largest node's
//!   (128 cores, 8 GPUs, as in the paper's simulator), averaged; the best-fitting GPU.
//! - `fgd`: fragmentation gradient descent: the node and GPUs whose use increases the expected fragmentation of the
//!   cluster (see [`super::frag`]) the least.
//!
//! `bestfit` and `fgd` score as the paper's simulator does, in whole points out of 100 (`bestfit`: 100 x (1 - the
//! average above); `fgd`: 100 x sigmoid(-increase / 1000 milli-GPU)), so choices within a point of each other tie;
//! how ties are broken is the engine's [`super::TieBreak`] (the FGD experiment in `kiln-sim` takes the paper's node
//! order for both).
//!
//! `kiln` is Kiln's default; see [`Policy::Kiln`].

use std::{fmt, str::FromStr};

use super::{EVICTION_WEIGHT, Eval, GpuChoice, GpuDemand, MILLI_PER_GPU, NodeType, Request, Signature, Workload};

/// A placement policy, selectable by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Uniformly random among nodes that fit.
    Random,
    /// Largest dot product of request and free resources.
    DotProd,
    /// Keep equal GPU shares together.
    Clustering,
    /// Fill used GPUs, then used nodes, then idle nodes.
    Packing,
    /// Least free resources left.
    BestFit,
    /// Fragmentation gradient descent (Weng et al., ATC'23).
    Fgd,
    /// Kiln's default: the gradient of a CPU-aware fragmentation measure (FGD's, sharpened for unconstrained
    /// GPU shares by a packing count that sees CPU and memory strand GPUs; see [`super::frag::Measure::Kiln`]),
    /// with ties broken towards the node left fullest, so that equally fragment-neutral choices consolidate work
    /// and keep whole GPUs and whole nodes free for gangs and rentals.
    Kiln,
}

impl Policy {
    /// Every policy, in the paper's order, then `kiln`.
    pub const ALL: [Policy; 7] = [
        Policy::Random,
        Policy::DotProd,
        Policy::Clustering,
        Policy::Packing,
        Policy::BestFit,
        Policy::Fgd,
        Policy::Kiln,
    ];

    /// The policy's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Random => "random",
            Policy::DotProd => "dotprod",
            Policy::Clustering => "clustering",
            Policy::Packing => "packing",
            Policy::BestFit => "bestfit",
            Policy::Fgd => "fgd",
            Policy::Kiln => "kiln",
        }
    }

    /// The name of the matching policy in the FGD artifact's results (`01-Random` ... `06-FGD`), if any.
    pub fn artifact_name(self) -> Option<&'static str> {
        match self {
            Policy::Random => Some("01-Random"),
            Policy::DotProd => Some("02-DotProd"),
            Policy::Clustering => Some("03-GpuClustering"),
            Policy::Packing => Some("04-GpuPacking"),
            Policy::BestFit => Some("05-BestFit"),
            Policy::Fgd => Some("06-FGD"),
            Policy::Kiln => None,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
            format!("unknown policy {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// Scores a node with signature `sig` (whose fragmentation is `frag_before`) for `request`; `None` if it does not
/// fit. `request.gpu` must be resolved for the node type (no `Memory`).
pub(super) fn evaluate(
    policy: Policy,
    sig: &Signature,
    frag_before: f64,
    node_type: &NodeType,
    request: &Request,
    workload: &Workload,
) -> Option<Eval> {
    if sig.cpu_free < request.cpu_milli || sig.mem_free < request.memory_mib {
        return None;
    }
    let fits_gpu = match request.gpu {
        GpuDemand::None => true,
        GpuDemand::Memory(_) => false,
        GpuDemand::Share(m) => request.models.contains(node_type.model) && sig.gpu_free.iter().any(|&f| f >= m),
        GpuDemand::Whole(k) => {
            request.models.contains(node_type.model)
                && sig.gpu_free.iter().filter(|&&f| f == MILLI_PER_GPU).count() >= usize::from(k)
        }
    };
    if !fits_gpu {
        return None;
    }
    let eval = match policy {
        Policy::Random => Eval { score: 0.0, choice: random_choice(request) },
        Policy::DotProd => Eval { score: dot_product(sig, node_type, request), choice: best_fit_gpu(sig, request) },
        Policy::BestFit => Eval { score: best_fit_points(sig, request), choice: best_fit_gpu(sig, request) },
        Policy::Packing => packing(sig, request),
        Policy::Clustering => clustering(sig, request),
        Policy::Fgd => {
            let (delta, choice) = fragmentation_gradient(sig, frag_before, node_type, request, workload, 0.0);
            Eval { score: fgd_points(delta), choice }
        }
        Policy::Kiln => {
            // Shares weigh evictions GPU by GPU inside the gradient; gangs (and a share on a whole free GPU) after.
            let (delta, choice) =
                fragmentation_gradient(sig, frag_before, node_type, request, workload, EVICTION_WEIGHT);
            let evicted = match (request.gpu, choice) {
                (GpuDemand::Share(_), GpuChoice::ShareOn(_)) => 0.0,
                _ => EVICTION_WEIGHT * evicted_milli(sig, request, choice),
            };
            // The tie-breaker is at most 2e-3 milli-GPU: it only orders choices whose gradients are equal.
            Eval { score: -delta - evicted - 1e-3 * residual(sig, node_type, request), choice }
        }
    };
    Some(eval)
}

/// Milli-GPU of idle copies that `choice` overwrites (the GPUs the engine would pick: among equally free ones, the
/// least cached, which the signature lists first).
fn evicted_milli(sig: &Signature, request: &Request, choice: GpuChoice) -> f64 {
    let n = sig.gpu_free.len();
    let evicted = |i: usize, need: u16| f64::from(need.saturating_sub(sig.gpu_free[i] - sig.gpu_cached[i]));
    let first_whole = sig.gpu_free.iter().position(|&g| g == MILLI_PER_GPU).unwrap_or(n);
    match (request.gpu, choice) {
        (GpuDemand::Share(m), GpuChoice::ShareOn(f)) => {
            sig.gpu_free.iter().position(|&g| g == f).map_or(0.0, |i| evicted(i, m))
        }
        (GpuDemand::Share(m), GpuChoice::Whole) if first_whole < n => evicted(first_whole, m),
        (GpuDemand::Whole(k), _) => (first_whole..n).take(usize::from(k)).map(|i| f64::from(sig.gpu_cached[i])).sum(),
        _ => 0.0,
    }
}

fn random_choice(request: &Request) -> GpuChoice {
    match request.gpu {
        GpuDemand::None | GpuDemand::Memory(_) => GpuChoice::None,
        GpuDemand::Share(_) => GpuChoice::ShareRandom,
        GpuDemand::Whole(_) => GpuChoice::Whole,
    }
}

/// The GPU with the least free milli that still fits a share.
fn best_fit_gpu(sig: &Signature, request: &Request) -> GpuChoice {
    match request.gpu {
        GpuDemand::None | GpuDemand::Memory(_) => GpuChoice::None,
        GpuDemand::Share(m) => {
            // `gpu_free` is ascending: the first that fits is the tightest.
            GpuChoice::ShareOn(*sig.gpu_free.iter().find(|&&f| f >= m).expect("checked that a GPU fits"))
        }
        GpuDemand::Whole(_) => GpuChoice::Whole,
    }
}

fn gpu_free_total(sig: &Signature) -> f64 {
    sig.gpu_free.iter().map(|&f| f64::from(f)).sum()
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

/// CPU and GPU left free after placing, each as a fraction of the node's capacity, summed (0 = full node): `kiln`'s
/// tie-breaker. Memory is left out: it rarely binds on GPU nodes.
fn residual(sig: &Signature, node_type: &NodeType, request: &Request) -> f64 {
    let gpu_cap = f64::from(node_type.gpu_count) * f64::from(MILLI_PER_GPU);
    ratio(f64::from(sig.cpu_free - request.cpu_milli), f64::from(node_type.cpu_milli))
        + ratio(gpu_free_total(sig) - request.gpu.milli() as f64, gpu_cap)
}

/// CPU (milli) and GPU (milli-GPU) of the largest node of the Alibaba trace, which the paper's `bestfit` divides
/// by.
const BEST_FIT_SPEC: (f64, f64) = (128_000.0, 8_000.0);

/// The paper's `bestfit` score: 100 x (1 - the mean of CPU and GPU left after placing, each divided by
/// [`BEST_FIT_SPEC`]), truncated to whole points (it can fall below 0 on a node larger than the spec).
fn best_fit_points(sig: &Signature, request: &Request) -> f64 {
    let cpu_left = f64::from(sig.cpu_free - request.cpu_milli) / BEST_FIT_SPEC.0;
    let gpu_left = (gpu_free_total(sig) - request.gpu.milli() as f64) / BEST_FIT_SPEC.1;
    (100.0 * (1.0 - 0.5 * (cpu_left + gpu_left))).trunc()
}

/// The paper's `fgd` score for an increase of `delta` milli-GPU in the node's expected fragmentation:
/// 100 x sigmoid(-delta / 1000), truncated to whole points.
fn fgd_points(delta: f64) -> f64 {
    (100.0 / (1.0 + (delta / 1000.0).exp())).trunc()
}

fn dot_product(sig: &Signature, node_type: &NodeType, request: &Request) -> f64 {
    let cpu_cap = f64::from(node_type.cpu_milli);
    let mem_cap = f64::from(node_type.memory_mib);
    let gpu_cap = f64::from(node_type.gpu_count) * f64::from(MILLI_PER_GPU);
    ratio(f64::from(request.cpu_milli), cpu_cap) * ratio(f64::from(sig.cpu_free), cpu_cap)
        + ratio(f64::from(request.memory_mib), mem_cap) * ratio(f64::from(sig.mem_free), mem_cap)
        + ratio(request.gpu.milli() as f64, gpu_cap) * ratio(gpu_free_total(sig), gpu_cap)
}

fn packing(sig: &Signature, request: &Request) -> Eval {
    let node_in_use = sig.gpu_free.iter().any(|&f| f < MILLI_PER_GPU);
    match request.gpu {
        GpuDemand::Share(m) => {
            if let Some(&f) = sig.gpu_free.iter().find(|&&f| f >= m && f < MILLI_PER_GPU) {
                Eval { score: 3.0, choice: GpuChoice::ShareOn(f) }
            } else {
                Eval { score: if node_in_use { 2.0 } else { 1.0 }, choice: GpuChoice::Whole }
            }
        }
        GpuDemand::Whole(_) => Eval { score: if node_in_use { 2.0 } else { 1.0 }, choice: GpuChoice::Whole },
        GpuDemand::None | GpuDemand::Memory(_) => {
            Eval { score: if node_in_use { 2.0 } else { 1.0 }, choice: GpuChoice::None }
        }
    }
}

fn clustering(sig: &Signature, request: &Request) -> Eval {
    match request.gpu {
        GpuDemand::Share(m) => {
            let same_size =
                sig.gpu_free.iter().find(|&&f| f >= m && f < MILLI_PER_GPU && (MILLI_PER_GPU - f).is_multiple_of(m));
            if let Some(&f) = same_size {
                Eval { score: 3.0, choice: GpuChoice::ShareOn(f) }
            } else if sig.gpu_free.contains(&MILLI_PER_GPU) {
                Eval { score: 2.0, choice: GpuChoice::Whole }
            } else {
                Eval { score: 1.0, choice: best_fit_gpu(sig, request) }
            }
        }
        GpuDemand::Whole(_) => {
            // Whole-GPU work clusters with whole-GPU work: prefer nodes with no shared GPU.
            let shared = sig.gpu_free.iter().any(|&f| f > 0 && f < MILLI_PER_GPU);
            Eval { score: if shared { 1.0 } else { 2.0 }, choice: GpuChoice::Whole }
        }
        GpuDemand::None | GpuDemand::Memory(_) => Eval { score: 0.0, choice: GpuChoice::None },
    }
}

/// The smallest increase of the node's expected fragmentation over the ways to place `request` on it.
fn fragmentation_gradient(
    sig: &Signature,
    frag_before: f64,
    node_type: &NodeType,
    request: &Request,
    workload: &Workload,
    evict_weight: f64,
) -> (f64, GpuChoice) {
    let cpu = sig.cpu_free - request.cpu_milli;
    let mem = sig.mem_free - request.memory_mib;
    let (model, gpu_mem) = (node_type.model, node_type.gpu_memory_mib);
    match request.gpu {
        GpuDemand::None | GpuDemand::Memory(_) => {
            (workload.node_frag(model, gpu_mem, cpu, mem, &sig.gpu_free) - frag_before, GpuChoice::None)
        }
        GpuDemand::Whole(k) => {
            let mut after = sig.gpu_free.clone();
            let mut left = k;
            for f in after.iter_mut().rev() {
                if left > 0 && *f == MILLI_PER_GPU {
                    *f = 0;
                    left -= 1;
                }
            }
            (workload.node_frag(model, gpu_mem, cpu, mem, &after) - frag_before, GpuChoice::Whole)
        }
        GpuDemand::Share(m) => {
            let mut best = (f64::INFINITY, GpuChoice::None);
            let mut after = sig.gpu_free.clone();
            let mut previous = None;
            for i in 0..after.len() {
                let f = sig.gpu_free[i];
                if f < m || previous == Some(f) {
                    continue;
                }
                previous = Some(f);
                after[i] = f - m;
                let delta = workload.node_frag(model, gpu_mem, cpu, mem, &after) - frag_before
                    + evict_weight * f64::from(m.saturating_sub(f - sig.gpu_cached[i]));
                after[i] = f;
                if delta < best.0 - 1e-9 {
                    best = (delta, GpuChoice::ShareOn(f));
                }
            }
            best
        }
    }
}

/// The score of placing share `request` on one GPU whose free milli-GPU is `free` (a GPU holding an idle copy of
/// the model's weights); `None` if it does not fit there. Only `kiln` scores the GPU itself; other policies keep
/// their node score.
pub(super) fn evaluate_on_gpu(
    policy: Policy,
    sig: &Signature,
    frag_before: f64,
    node_type: &NodeType,
    request: &Request,
    workload: &Workload,
    free: u16,
) -> Option<f64> {
    let GpuDemand::Share(m) = request.gpu else { return None };
    if free < m {
        return None;
    }
    let node = evaluate(policy, sig, frag_before, node_type, request, workload)?;
    if policy != Policy::Kiln {
        return Some(node.score);
    }
    let mut after = sig.gpu_free.clone();
    let i = after.iter().position(|&f| f == free)?;
    after[i] = free - m;
    let cpu = sig.cpu_free - request.cpu_milli;
    let mem = sig.mem_free - request.memory_mib;
    let delta = workload.node_frag(node_type.model, node_type.gpu_memory_mib, cpu, mem, &after) - frag_before;
    Some(-delta - 1e-3 * residual(sig, node_type, request))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fgd_scores_in_whole_points_of_a_sigmoid() {
        assert_eq!(fgd_points(0.0), 50.0);
        // Within a point of each other: a tie.
        assert_eq!(fgd_points(-10.0), fgd_points(-30.0));
        assert!(fgd_points(-100.0) > fgd_points(0.0) && fgd_points(100.0) < fgd_points(0.0));
        // Large drops saturate at 99, large rises at 0.
        assert_eq!((fgd_points(-8000.0), fgd_points(-20_000.0), fgd_points(9000.0)), (99.0, 99.0, 0.0));
    }

    #[test]
    fn best_fit_scores_what_is_left_against_the_largest_node_in_whole_points() {
        let sig = |cpu_free, gpu_free: Vec<u16>| Signature {
            type_id: 0,
            cpu_free,
            mem_free: 0,
            gpu_cached: vec![0; gpu_free.len()],
            gpu_free,
        };
        let share = Request::new(3152, 0, GpuDemand::Share(810));
        // 64,000 - 3,152 milli-CPU and 1,000 - 810 milli-GPU left: 100 x (1 - (0.4754 + 0.0238) / 2) = 75.04.
        assert_eq!(best_fit_points(&sig(64_000, vec![1000]), &share), 75.0);
        // An empty node of the largest size, for a pod that takes nothing, scores 0.
        assert_eq!(best_fit_points(&sig(128_000, vec![1000; 8]), &Request::new(0, 0, GpuDemand::None)), 0.0);
        // Fuller nodes score higher.
        assert!(best_fit_points(&sig(8_000, vec![1000]), &share) > best_fit_points(&sig(64_000, vec![1000]), &share));
    }
}
