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

use std::{fmt, str::FromStr};

use kiln_core::{
    placement::{GpuDemand, Request},
    rng::Rng,
};

/// A generated variant of a pod list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Every GPU pod a fractional share of one GPU (the artifact's `gpushare100`).
    ShareOnly,
}

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 1] = [Variant::ShareOnly];

    /// The variant's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Variant::ShareOnly => "share-only",
        }
    }

    /// The artifact workload this variant stands for (its published medians are the ones to compare with).
    pub fn artifact_workload(self) -> &'static str {
        match self {
            Variant::ShareOnly => "openb_pod_list_gpushare100",
        }
    }

    /// The variant of `pods`, drawn with `seed`.
    pub fn apply(self, pods: &[Request], seed: u64) -> Result<Vec<Request>> {
        match self {
            Variant::ShareOnly => share_only(pods, seed),
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
    #[error("unknown variant {0:?}; expected share-only")]
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
}
