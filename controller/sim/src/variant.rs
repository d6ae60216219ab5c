//! Pod-list variants generated from a shared list, the way the FGD paper's artifact built its workload families
//! (`openb_pod_list_gpushare{40,60,80,100}`, ...): the CPU-only pods are kept and GPU pods are re-drawn from the
//! list's own pods of the emphasised kind, so the variant keeps the trace's CPU, memory and GPU sizes and only the
//! mix changes. Generated test inputs, seeded: no copied data.
//!
//! `share-only` is the artifact's `gpushare100`: every GPU pod is a fractional share of one GPU. Each pod asking for
//! whole GPUs is replaced by a share pod of the list drawn uniformly at random (with replacement, CPU and memory
//! included); the list's share pods stay as they are. The share sizes are therefore the trace's own (810, 470, 650,
//! 320, ... milli-GPU, with their popularity), as in the artifact's list, whose rows are copies of the default
//! list's share pods.
//!
//! `gang-heavy` is the artifact's `multigpu50`: pods asking for several whole GPUs carry half of the GPU demand
//! (the default list: 7%, `multigpu30`: 30%). Each other GPU pod is replaced, with the one probability that makes
//! the expected share of gang demand 50%, by a gang pod of the list drawn uniformly.
//!
//! `constrained` is the artifact's `gpuspec33`: a third of the GPU pods restricted to some GPU models. Each
//! unrestricted GPU pod is restricted, with the one probability that makes the expected restricted share a third,
//! to the model set of a restricted pod of the list asking for the same number of GPUs, drawn uniformly (the
//! lists' own restrictions, with their popularity: T4, P100, G2, V100, ... on `gpuspec20`); a list with no
//! restricted pods has nothing to draw from.

use std::{fmt, str::FromStr};

use kiln_core::{
    placement::{GpuDemand, ModelSet, Request},
    rng::Rng,
};

/// A generated variant of a pod list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Every GPU pod a fractional share of one GPU (the artifact's `gpushare100`).
    ShareOnly,
    /// Half of the GPU demand from multi-GPU gangs (the artifact's `multigpu50`).
    GangHeavy,
    /// A third of the GPU pods restricted to GPU models (the artifact's `gpuspec33`).
    Constrained,
}

/// Share of GPU demand from gangs in [`Variant::GangHeavy`].
pub const GANG_DEMAND_SHARE: f64 = 0.5;
/// Share of GPU pods restricted to GPU models in [`Variant::Constrained`].
pub const CONSTRAINED_SHARE: f64 = 0.33;

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 3] = [Variant::ShareOnly, Variant::GangHeavy, Variant::Constrained];

    /// The variant's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Variant::ShareOnly => "share-only",
            Variant::GangHeavy => "gang-heavy",
            Variant::Constrained => "constrained",
        }
    }

    /// The artifact workload this variant stands for (its published medians are the ones to compare with).
    pub fn artifact_workload(self) -> &'static str {
        match self {
            Variant::ShareOnly => "openb_pod_list_gpushare100",
            Variant::GangHeavy => "openb_pod_list_multigpu50",
            Variant::Constrained => "openb_pod_list_gpuspec33",
        }
    }

    /// The variant of `pods`, drawn with `seed`.
    pub fn apply(self, pods: &[Request], seed: u64) -> Result<Vec<Request>> {
        match self {
            Variant::ShareOnly => share_only(pods, seed),
            Variant::GangHeavy => gang_heavy(pods, GANG_DEMAND_SHARE, seed),
            Variant::Constrained => constrained(pods, CONSTRAINED_SHARE, seed),
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = VariantError;

    fn from_str(s: &str) -> Result<Self> {
        Variant::ALL.into_iter().find(|v| v.name() == s).ok_or_else(|| VariantError::Unknown(s.to_owned()))
    }
}

/// Errors making a variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VariantError {
    /// No variant of that name.
    #[error("unknown variant {0:?}; expected share-only, gang-heavy or constrained")]
    Unknown(String),
    /// The list has none of the pods the variant draws from.
    #[error("the pod list has no {0} pod to draw from")]
    NothingToDraw(&'static str),
}

/// The result of making a variant.
pub type Result<T, E = VariantError> = std::result::Result<T, E>;

/// `pods` with every pod asking for whole GPUs replaced by a share pod of `pods`, drawn uniformly with `seed`.
pub fn share_only(pods: &[Request], seed: u64) -> Result<Vec<Request>> {
    let shares: Vec<Request> = pods.iter().filter(|p| matches!(p.gpu, GpuDemand::Share(_))).copied().collect();
    if shares.is_empty() && pods.iter().any(|p| !matches!(p.gpu, GpuDemand::None | GpuDemand::Share(_))) {
        return Err(VariantError::NothingToDraw("GPU-share"));
    }
    let mut rng = Rng::new(seed);
    Ok(pods
        .iter()
        .map(|p| match p.gpu {
            GpuDemand::None | GpuDemand::Share(_) => *p,
            GpuDemand::Whole(_) | GpuDemand::Memory(_) => shares[rng.below(shares.len() as u64) as usize],
        })
        .collect())
}

fn is_gang(p: &Request) -> bool {
    matches!(p.gpu, GpuDemand::Whole(k) if k >= 2)
}

fn is_gpu(p: &Request) -> bool {
    p.gpu != GpuDemand::None
}

/// `pods` with each GPU pod that is not a gang replaced, with one probability, by a gang pod of `pods` drawn
/// uniformly, so that gangs carry `share` of the expected GPU demand (if they carry more already, `pods` as they
/// are).
pub fn gang_heavy(pods: &[Request], share: f64, seed: u64) -> Result<Vec<Request>> {
    let gangs: Vec<Request> = pods.iter().filter(|p| is_gang(p)).copied().collect();
    let others: Vec<&Request> = pods.iter().filter(|p| is_gpu(p) && !is_gang(p)).collect();
    if gangs.is_empty() {
        if others.is_empty() {
            return Ok(pods.to_vec());
        }
        return Err(VariantError::NothingToDraw("multi-GPU"));
    }
    let gang_demand: f64 = gangs.iter().map(|p| p.gpu.milli() as f64).sum();
    let other_demand: f64 = others.iter().map(|p| p.gpu.milli() as f64).sum();
    let mean_gang = gang_demand / gangs.len() as f64;
    // Replacing each of the n other pods with probability q: (G + q n g) = share (G + q n g + (1 - q) O).
    let n = others.len() as f64;
    let q = ((share * (gang_demand + other_demand) - gang_demand)
        / (n * mean_gang * (1.0 - share) + share * other_demand))
        .clamp(0.0, 1.0);
    let mut rng = Rng::new(seed);
    Ok(pods
        .iter()
        .map(|p| {
            if is_gpu(p) && !is_gang(p) && rng.unit() < q { gangs[rng.below(gangs.len() as u64) as usize] } else { *p }
        })
        .collect())
}

/// `pods` with each unrestricted GPU pod restricted, with one probability, to the model set of a restricted pod of
/// `pods` with the same GPU count (any restricted pod where none has it), drawn uniformly, so that `share` of the
/// GPU pods are restricted in expectation.
pub fn constrained(pods: &[Request], share: f64, seed: u64) -> Result<Vec<Request>> {
    let gpu_count = |p: &Request| match p.gpu {
        GpuDemand::Whole(k) => u32::from(k),
        _ => 1,
    };
    let restricted: Vec<&Request> = pods.iter().filter(|p| is_gpu(p) && p.models != ModelSet::ANY).collect();
    let gpu_pods = pods.iter().filter(|p| is_gpu(p)).count() as f64;
    if restricted.is_empty() {
        if gpu_pods == 0.0 {
            return Ok(pods.to_vec());
        }
        return Err(VariantError::NothingToDraw("GPU-model-restricted"));
    }
    let free = gpu_pods - restricted.len() as f64;
    let q = if free > 0.0 { ((share * gpu_pods - restricted.len() as f64) / free).clamp(0.0, 1.0) } else { 0.0 };
    let mut rng = Rng::new(seed);
    Ok(pods
        .iter()
        .map(|p| {
            if !is_gpu(p) || p.models != ModelSet::ANY || rng.unit() >= q {
                return *p;
            }
            let same: Vec<&&Request> = restricted.iter().filter(|r| gpu_count(r) == gpu_count(p)).collect();
            let models = if same.is_empty() {
                restricted[rng.below(restricted.len() as u64) as usize].models
            } else {
                same[rng.below(same.len() as u64) as usize].models
            };
            Request { models, ..*p }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(cpu: u32, gpu: GpuDemand) -> Request {
        Request::new(cpu, 1024, gpu)
    }

    #[test]
    fn share_only_keeps_cpu_pods_and_shares_and_redraws_whole_gpu_pods_from_the_shares() {
        let pods = vec![
            pod(1000, GpuDemand::None),
            pod(3152, GpuDemand::Share(810)),
            pod(8000, GpuDemand::Whole(1)),
            pod(4000, GpuDemand::Share(320)),
            pod(88_000, GpuDemand::Whole(8)),
        ];
        let variant = share_only(&pods, 42).unwrap();
        assert_eq!(variant.len(), pods.len());
        assert_eq!((variant[0], variant[1], variant[3]), (pods[0], pods[1], pods[3]));
        for p in [variant[2], variant[4]] {
            assert!(p == pods[1] || p == pods[3], "{p:?} is not one of the list's share pods");
        }
        assert_eq!(share_only(&pods, 42).unwrap(), variant, "same seed, same list");
        assert_eq!(Variant::ShareOnly.apply(&pods, 42).unwrap(), variant);
    }

    #[test]
    fn share_only_needs_a_share_pod_when_there_are_gpu_pods() {
        let err = share_only(&[pod(1, GpuDemand::Whole(1))], 1).unwrap_err();
        assert_eq!(err.to_string(), "the pod list has no GPU-share pod to draw from");
        assert_eq!(share_only(&[pod(1, GpuDemand::None)], 1).unwrap(), vec![pod(1, GpuDemand::None)]);
        assert_eq!("share-only".parse::<Variant>().unwrap(), Variant::ShareOnly);
        assert!("x".parse::<Variant>().is_err());
    }

    fn gang_demand_share(pods: &[Request]) -> f64 {
        let total: u64 = pods.iter().map(|p| p.gpu.milli()).sum();
        let gangs: u64 = pods.iter().filter(|p| is_gang(p)).map(|p| p.gpu.milli()).sum();
        gangs as f64 / total as f64
    }

    #[test]
    fn gang_heavy_raises_the_gang_share_of_demand_to_about_half_from_the_lists_gangs() {
        let mut pods = vec![pod(1000, GpuDemand::None); 100];
        pods.extend(vec![pod(4000, GpuDemand::Share(500)); 1500]);
        pods.extend(vec![pod(8000, GpuDemand::Whole(1)); 1500]);
        pods.extend(vec![pod(32_000, GpuDemand::Whole(4)); 20]);
        pods.extend(vec![pod(64_000, GpuDemand::Whole(8)); 10]);
        assert!(gang_demand_share(&pods) < 0.1);
        let variant = gang_heavy(&pods, 0.5, 7).unwrap();
        assert_eq!(variant.len(), pods.len());
        assert_eq!(variant[..100], pods[..100], "CPU pods stay");
        let share = gang_demand_share(&variant);
        assert!((share - 0.5).abs() < 0.05, "gang share of demand {share}");
        assert!(variant.iter().all(|p| pods.contains(p)), "every pod is one of the list's");
        assert_eq!(Variant::GangHeavy.apply(&pods, 7).unwrap(), gang_heavy(&pods, GANG_DEMAND_SHARE, 7).unwrap());
        let no_gangs = vec![pod(1, GpuDemand::Whole(1))];
        assert_eq!(gang_heavy(&no_gangs, 0.5, 1).unwrap_err(), VariantError::NothingToDraw("multi-GPU"));
    }

    #[test]
    fn constrained_restricts_a_third_of_gpu_pods_to_the_lists_own_model_sets() {
        let t4 = ModelSet::of([3]);
        let v100 = ModelSet::of([4, 5]);
        let mut pods = vec![pod(1000, GpuDemand::None); 100];
        pods.extend(vec![pod(4000, GpuDemand::Share(500)); 1800]);
        pods.extend(vec![Request { models: t4, ..pod(4000, GpuDemand::Share(300)) }; 150]);
        pods.extend(vec![pod(16_000, GpuDemand::Whole(2)); 200]);
        pods.extend(vec![Request { models: v100, ..pod(16_000, GpuDemand::Whole(2)) }; 50]);
        let variant = constrained(&pods, 0.33, 3).unwrap();
        assert_eq!(variant.len(), pods.len());
        let restricted: Vec<&Request> = variant.iter().filter(|p| p.models != ModelSet::ANY).collect();
        let share = restricted.len() as f64 / 2200.0;
        assert!((share - 0.33).abs() < 0.03, "restricted share {share}");
        for (before, after) in pods.iter().zip(&variant) {
            assert_eq!(Request { models: before.models, ..*after }, *before, "only the model set changes");
            if after.models != before.models {
                let expected = if matches!(after.gpu, GpuDemand::Whole(2)) { v100 } else { t4 };
                assert_eq!(after.models, expected, "{after:?} drew a set of a pod with another GPU count");
            }
        }
        let err = constrained(&[pod(1, GpuDemand::Whole(1))], 0.33, 1).unwrap_err();
        assert_eq!(err.to_string(), "the pod list has no GPU-model-restricted pod to draw from");
        assert_eq!("constrained".parse::<Variant>().unwrap(), Variant::Constrained);
        assert_eq!("gang-heavy".parse::<Variant>().unwrap(), Variant::GangHeavy);
    }
}
