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
//! `constrained` is the artifact's `gpuspec33` (`constrainedN`: N% of the GPU pods; the artifact publishes figures
//! for `gpuspec10`, `gpuspec20`, `gpuspec25` and `gpuspec33`): a share of the GPU pods restricted to some GPU models.
//! What the artifact's lists show about how it drew them (`openb_pod_list_gpuspec20` in full, 656 rows of
//! `openb_pod_list_gpuspec33_cpu0` in three places):
//! - each list is the default list's pods, row for row, with restrictions drawn independently per list (pods
//!   restricted in `gpuspec20` are unrestricted in `gpuspec33` and the other way round; the sets differ too), so
//!   `gpuspec20` is not a thinned `gpuspec33`;
//! - a pod's restriction does not depend on its CPU, memory or arrival (every popular pod shape of `gpuspec20`,
//!   and every tenth of the list in arrival order, has 14-26% restricted) but on its kind: on `gpuspec20` 17.8% of
//!   the share pods, 22.7% of the whole-GPU pods and 11% of the gangs are restricted; in the `gpuspec33` rows 27%
//!   of the share pods and 34% of the whole-GPU pods;
//! - the model set depends on the kind alone: share pods T4 (60% on `gpuspec20`, 70% of the `gpuspec33` rows) or
//!   P100 (38%, 27%), almost never anything else; whole-GPU pods T4 (44%, 48%), G2 (24%, 19%), V100 (15%, 18%),
//!   P100 with V100 (6%, 5%), G3, ...
//!
//! So the variant draws every restriction afresh: each GPU pod of a kind (a share of one GPU, one whole GPU, a
//! gang) is restricted with its kind's probability (the list's rate for the kind, scaled by the target share over
//! the list's overall rate, so the kinds keep their ratios) to the model set of a restricted pod of the list of the
//! same kind (gangs: of the same GPU count where one has it, else any restricted gang, else a whole-GPU pod's),
//! drawn uniformly: the list's own restrictions with their popularity. A list with no restricted pods has nothing
//! to draw from. Drawn from `gpuspec20` at 20%, the variant reproduces the published `gpuspec20` medians (a new
//! list, not the same one: the restrictions are redrawn); the figures at 10, 25 and 33% are in the README.
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
    /// This percentage (1-100) of the GPU pods restricted to GPU models, drawn afresh (the artifact's
    /// `gpuspec{10,20,25,33}` at 10, 20, 25 and 33).
    Constrained(u8),
}

/// Share of GPU demand from gangs in [`Variant::GangHeavy`].
pub const GANG_DEMAND_SHARE: f64 = 0.5;
/// Percentage of GPU pods restricted to GPU models in `constrained` ([`Variant::Constrained`] without a number).
pub const CONSTRAINED_PCT: u8 = 33;
/// The constrained lists the artifact publishes figures for (`openb_pod_list_gpuspec{N}`).
pub const PUBLISHED_CONSTRAINED_PCTS: [u8; 4] = [10, 20, 25, 33];

impl Variant {
    /// The variants with published counterparts.
    pub const ALL: [Variant; 6] = [
        Variant::ShareOnly,
        Variant::GangHeavy,
        Variant::Constrained(10),
        Variant::Constrained(20),
        Variant::Constrained(25),
        Variant::Constrained(CONSTRAINED_PCT),
    ];

    /// The variant's name on the command line (`constrained` is `constrained33`).
    pub fn name(self) -> String {
        match self {
            Variant::ShareOnly => "share-only".into(),
            Variant::GangHeavy => "gang-heavy".into(),
            Variant::Constrained(CONSTRAINED_PCT) => "constrained".into(),
            Variant::Constrained(pct) => format!("constrained{pct}"),
        }
    }

    /// The artifact workload this variant stands for (its published medians, where there are some, are the ones to
    /// compare with).
    pub fn artifact_workload(self) -> String {
        match self {
            Variant::ShareOnly => "openb_pod_list_gpushare100".into(),
            Variant::GangHeavy => "openb_pod_list_multigpu50".into(),
            Variant::Constrained(pct) => format!("openb_pod_list_gpuspec{pct}"),
        }
    }

    /// The variant of `pods`, drawn with `seed`.
    pub fn apply(self, pods: &[Request], seed: u64) -> Result<Vec<Request>> {
        match self {
            Variant::ShareOnly => share_only(pods, seed),
            Variant::GangHeavy => gang_heavy(pods, GANG_DEMAND_SHARE, seed),
            Variant::Constrained(pct) => constrained(pods, f64::from(pct) / 100.0, seed),
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Variant {
    type Err = VariantError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "share-only" => return Ok(Variant::ShareOnly),
            "gang-heavy" => return Ok(Variant::GangHeavy),
            "constrained" => return Ok(Variant::Constrained(CONSTRAINED_PCT)),
            _ => {}
        }
        match s.strip_prefix("constrained").map(str::parse::<u8>) {
            Some(Ok(pct)) if (1..=100).contains(&pct) => Ok(Variant::Constrained(pct)),
            _ => Err(VariantError::Unknown(s.to_owned())),
        }
    }
}

/// Errors making a variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VariantError {
    /// No variant of that name.
    #[error("unknown variant {0:?}; expected share-only, gang-heavy, constrained or constrainedN (N: 1-100)")]
    Unknown(String),
    /// A constrained share outside (0, 1].
    #[error("the share of GPU pods to restrict must be within (0, 1], not {0}")]
    Share(String),
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

/// The kinds of GPU pod [`constrained`] restricts at their own rates and draws model sets for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GpuKind {
    /// A fraction of one GPU (a share, or GPU memory below one GPU's).
    Share,
    /// One whole GPU.
    One,
    /// Several whole GPUs on one node.
    Gang(u8),
}

fn gpu_kind(p: &Request) -> Option<GpuKind> {
    match p.gpu {
        GpuDemand::None => None,
        GpuDemand::Share(_) => Some(GpuKind::Share),
        GpuDemand::Whole(k) if k >= 2 => Some(GpuKind::Gang(k)),
        GpuDemand::Whole(_) => Some(GpuKind::One),
        GpuDemand::Memory(_) => match p.gpu.milli() {
            m if m < u64::from(kiln_core::placement::MILLI_PER_GPU) => Some(GpuKind::Share),
            m if m == u64::from(kiln_core::placement::MILLI_PER_GPU) => Some(GpuKind::One),
            m => {
                Some(GpuKind::Gang(u8::try_from(m / u64::from(kiln_core::placement::MILLI_PER_GPU)).unwrap_or(u8::MAX)))
            }
        },
    }
}

/// The rate class of a kind: gangs of every size share one rate (they are few).
fn rate_class(kind: GpuKind) -> usize {
    match kind {
        GpuKind::Share => 0,
        GpuKind::One => 1,
        GpuKind::Gang(_) => 2,
    }
}

/// The probability that a GPU pod of each rate class is restricted in a variant with `share` of the GPU pods
/// restricted: the class's rate in the list times one factor for every class, found so that the expected share is
/// `share` where a class capped at every pod leaves more to the others; a class with no restricted pod counts as
/// one at the list's overall rate. `count` holds (GPU pods, restricted pods) per class.
fn class_rates(count: &[(usize, usize); 3], share: f64) -> [f64; 3] {
    let (pods, restricted) = count.iter().fold((0, 0), |(n, r), c| (n + c.0, r + c.1));
    let overall = restricted as f64 / pods.max(1) as f64;
    let base = count.map(|(n, r)| {
        if n == 0 {
            0.0
        } else if r == 0 {
            overall
        } else {
            r as f64 / n as f64
        }
    });
    let rates = |factor: f64| base.map(|b| (b * factor).min(1.0));
    let expected = |factor: f64| -> f64 {
        rates(factor).iter().zip(count).map(|(q, &(n, _))| q * n as f64).sum::<f64>() / pods.max(1) as f64
    };
    // `expected` rises with the factor up to 1 (every pod) at 1 / (the least base rate).
    let (mut lo, mut hi) = (0.0, 1.0 / base.iter().copied().filter(|&b| b > 0.0).fold(1.0, f64::min));
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if expected(mid) < share { lo = mid } else { hi = mid }
    }
    rates(hi)
}

/// `pods` with the GPU-model restrictions drawn afresh so that `share` of the GPU pods are restricted in
/// expectation: each GPU pod is restricted with the probability of its kind ([`class_rates`]: the kinds keep their
/// rates' ratios in the list) to the model set of a restricted pod of `pods` of the same kind, drawn uniformly (see
/// the module's notes). CPU, memory and GPU demand stay; only the model sets change.
pub fn constrained(pods: &[Request], share: f64, seed: u64) -> Result<Vec<Request>> {
    if !(share > 0.0 && share <= 1.0) {
        return Err(VariantError::Share(share.to_string()));
    }
    let restricted: Vec<(GpuKind, ModelSet)> =
        pods.iter().filter(|p| p.models != ModelSet::ANY).filter_map(|p| gpu_kind(p).map(|k| (k, p.models))).collect();
    if restricted.is_empty() {
        if pods.iter().all(|p| !is_gpu(p)) {
            return Ok(pods.to_vec());
        }
        return Err(VariantError::NothingToDraw("GPU-model-restricted"));
    }
    // Per rate class: GPU pods, restricted pods.
    let mut count = [(0usize, 0usize); 3];
    for p in pods {
        if let Some(k) = gpu_kind(p) {
            let c = &mut count[rate_class(k)];
            c.0 += 1;
            c.1 += usize::from(p.models != ModelSet::ANY);
        }
    }
    let q = class_rates(&count, share);
    let sets_of = |f: &dyn Fn(GpuKind) -> bool| -> Vec<ModelSet> {
        restricted.iter().filter(|(k, _)| f(*k)).map(|&(_, m)| m).collect()
    };
    let all: Vec<ModelSet> = restricted.iter().map(|&(_, m)| m).collect();
    let shares = sets_of(&|k| k == GpuKind::Share);
    let ones = sets_of(&|k| k == GpuKind::One);
    let gangs = sets_of(&|k| matches!(k, GpuKind::Gang(_)));
    let pool = |kind: GpuKind| -> Vec<ModelSet> {
        let candidates = match kind {
            GpuKind::Share => vec![shares.clone()],
            GpuKind::One => vec![ones.clone()],
            GpuKind::Gang(g) => vec![sets_of(&|k| k == GpuKind::Gang(g)), gangs.clone(), ones.clone()],
        };
        candidates.into_iter().find(|c| !c.is_empty()).unwrap_or_else(|| all.clone())
    };
    let mut pools: Vec<(GpuKind, Vec<ModelSet>)> = Vec::new();
    let mut rng = Rng::new(seed);
    Ok(pods
        .iter()
        .map(|p| {
            let Some(kind) = gpu_kind(p) else { return *p };
            if rng.unit() >= q[rate_class(kind)] {
                return Request { models: ModelSet::ANY, ..*p };
            }
            let i = match pools.iter().position(|(k, _)| *k == kind) {
                Some(i) => i,
                None => {
                    pools.push((kind, pool(kind)));
                    pools.len() - 1
                }
            };
            let sets = &pools[i].1;
            Request { models: sets[rng.below(sets.len() as u64) as usize], ..*p }
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
        for target in [0.1, 0.2, 0.33, 0.6] {
            let variant = constrained(&pods, target, 3).unwrap();
            assert_eq!(variant.len(), pods.len());
            let restricted = variant.iter().filter(|p| p.models != ModelSet::ANY).count();
            let share = restricted as f64 / 2200.0;
            assert!((share - target).abs() < 0.03, "restricted share {share}, wanted {target}");
            let mut changed = 0;
            for (before, after) in pods.iter().zip(&variant) {
                assert_eq!(Request { models: before.models, ..*after }, *before, "only the model set changes");
                changed += usize::from(after.models != before.models);
                if after.models != ModelSet::ANY {
                    let expected = if matches!(after.gpu, GpuDemand::Whole(2)) { v100 } else { t4 };
                    assert_eq!(after.models, expected, "{after:?} drew a set of a pod with another GPU count");
                }
            }
            // Drawn afresh: even at the list's own rate (9%) restrictions move between pods.
            assert!(changed > 100, "{changed} pods changed at {target}");
        }
        let err = constrained(&[pod(1, GpuDemand::Whole(1))], 0.33, 1).unwrap_err();
        assert_eq!(err.to_string(), "the pod list has no GPU-model-restricted pod to draw from");
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(matches!(constrained(&pods, bad, 1), Err(VariantError::Share(_))), "{bad}");
        }
        assert_eq!(constrained(&pods[..100], 0.5, 1).unwrap(), pods[..100].to_vec(), "no GPU pod, nothing to do");
    }

    #[test]
    fn constrained_keeps_each_kinds_rate_ratio_and_draws_sets_of_the_same_kind() {
        let (t4, p100, g2) = (ModelSet::of([3]), ModelSet::of([2]), ModelSet::of([0]));
        let mut pods = vec![pod(1000, GpuDemand::None); 200];
        // Shares: 10% restricted (T4 or P100); whole GPUs: 20% restricted (G2); overall 15%.
        pods.extend(vec![pod(4000, GpuDemand::Share(500)); 2700]);
        pods.extend(vec![Request { models: t4, ..pod(4000, GpuDemand::Share(300)) }; 200]);
        pods.extend(vec![Request { models: p100, ..pod(4000, GpuDemand::Share(300)) }; 100]);
        pods.extend(vec![pod(8000, GpuDemand::Whole(1)); 2400]);
        pods.extend(vec![Request { models: g2, ..pod(8000, GpuDemand::Whole(1)) }; 600]);
        let variant = constrained(&pods, 0.3, 11).unwrap();
        assert_eq!(Variant::Constrained(30).apply(&pods, 11).unwrap(), variant);
        let rate = |whole: bool| {
            let kind: Vec<&Request> =
                variant.iter().filter(|p| is_gpu(p) && matches!(p.gpu, GpuDemand::Whole(_)) == whole).collect();
            kind.iter().filter(|p| p.models != ModelSet::ANY).count() as f64 / kind.len() as f64
        };
        // Doubling the overall rate doubles each kind's: 20% of the shares, 40% of the whole GPUs.
        let (shares, wholes) = (rate(false), rate(true));
        assert!((shares - 0.2).abs() < 0.02 && (wholes - 0.4).abs() < 0.025, "shares {shares}, whole {wholes}");
        for p in &variant {
            match p.gpu {
                GpuDemand::Share(_) => assert!(p.models == ModelSet::ANY || p.models == t4 || p.models == p100),
                GpuDemand::Whole(_) => assert!(p.models == ModelSet::ANY || p.models == g2, "{p:?}"),
                _ => assert_eq!(p.models, ModelSet::ANY),
            }
        }
        let t4_shares = variant.iter().filter(|p| p.models == t4).count() as f64;
        let p100_shares = variant.iter().filter(|p| p.models == p100).count() as f64;
        assert!(
            (t4_shares / p100_shares - 2.0).abs() < 0.4,
            "the sets keep their popularity: {t4_shares}/{p100_shares}"
        );
        // A gang with no restricted gang to copy draws a whole-GPU pod's set.
        let mut with_gang = pods.clone();
        with_gang.extend(vec![pod(64_000, GpuDemand::Whole(8)); 400]);
        let gangs = constrained(&with_gang, 0.3, 5).unwrap();
        assert!(gangs.iter().any(|p| p.gpu == GpuDemand::Whole(8) && p.models == g2));
        assert!(gangs.iter().all(|p| p.gpu != GpuDemand::Whole(8) || p.models == ModelSet::ANY || p.models == g2));
    }

    #[test]
    fn constrained_variants_are_named_by_their_share_and_stand_for_the_artifacts_lists() {
        assert_eq!("constrained".parse::<Variant>().unwrap(), Variant::Constrained(CONSTRAINED_PCT));
        assert_eq!("constrained33".parse::<Variant>().unwrap(), Variant::Constrained(33));
        assert_eq!("constrained10".parse::<Variant>().unwrap(), Variant::Constrained(10));
        assert_eq!("gang-heavy".parse::<Variant>().unwrap(), Variant::GangHeavy);
        for bad in ["constrained0", "constrained101", "constrainedx", "constrained-5", "gpuspec20"] {
            assert_eq!(bad.parse::<Variant>(), Err(VariantError::Unknown(bad.into())), "{bad}");
        }
        assert_eq!(Variant::Constrained(33).name(), "constrained");
        assert_eq!(Variant::Constrained(25).name(), "constrained25");
        assert_eq!(Variant::Constrained(25).artifact_workload(), "openb_pod_list_gpuspec25");
        for v in Variant::ALL {
            assert_eq!(v.name().parse::<Variant>().unwrap(), v, "names round-trip");
        }
        let published: Vec<String> =
            PUBLISHED_CONSTRAINED_PCTS.iter().map(|&p| Variant::Constrained(p).name()).collect();
        assert_eq!(published, ["constrained10", "constrained20", "constrained25", "constrained"]);
    }

    #[test]
    fn a_constrained_pod_is_placed_only_on_its_gpu_models() {
        use kiln_core::placement::{Cluster, NodeSpec, PlacementEngine, Policy, Workload};
        let mut specs = Vec::new();
        for i in 0..6 {
            specs.push(NodeSpec::new(format!("t4-{i}"), 32_000, 128_000, 2, "T4"));
            specs.push(NodeSpec::new(format!("p100-{i}"), 16_000, 64_000, 2, "P100"));
            specs.push(NodeSpec::new(format!("g2-{i}"), 96_000, 393_216, 8, "G2"));
        }
        let cluster = Cluster::new(&specs).unwrap();
        let (t4, p100, g2) =
            (cluster.model_id("T4").unwrap(), cluster.model_id("P100").unwrap(), cluster.model_id("G2").unwrap());
        let mut pods = vec![pod(2000, GpuDemand::None); 20];
        pods.extend(vec![pod(4000, GpuDemand::Share(470)); 60]);
        pods.extend(vec![Request { models: ModelSet::of([t4]), ..pod(4000, GpuDemand::Share(320)) }; 10]);
        pods.extend(vec![Request { models: ModelSet::of([p100]), ..pod(4000, GpuDemand::Share(650)) }; 10]);
        pods.extend(vec![pod(8000, GpuDemand::Whole(1)); 40]);
        pods.extend(vec![Request { models: ModelSet::of([g2]), ..pod(8000, GpuDemand::Whole(1)) }; 10]);
        pods.extend(vec![Request { models: ModelSet::of([t4, p100]), ..pod(8000, GpuDemand::Whole(1)) }; 10]);
        pods.extend(vec![Request { models: ModelSet::of([g2]), ..pod(32_000, GpuDemand::Whole(4)) }; 5]);
        let variant = constrained(&pods, 0.6, 9).unwrap();
        let restricted = variant.iter().filter(|p| p.models != ModelSet::ANY).count();
        assert!(restricted > 60, "{restricted} restricted pods");
        for policy in [Policy::Fgd, Policy::BestFit, Policy::Kiln] {
            let mut engine = PlacementEngine::new(cluster.clone(), policy, Workload::from_requests(&variant), 1);
            let (mut placed, mut refused) = (0, 0);
            // Twice over, so that the scarce models fill up and restricted pods are refused rather than moved.
            for p in variant.iter().chain(&variant) {
                match engine.place(p) {
                    Ok(placement) => {
                        placed += 1;
                        if p.gpu != GpuDemand::None {
                            let model = cluster.node_type(engine.cluster().node(placement.node).type_id).model;
                            assert!(p.models.contains(model), "{policy}: {p:?} placed on model {model}");
                        }
                    }
                    Err(_) => refused += 1,
                }
            }
            assert!(placed > 100 && refused > 0, "{policy}: {placed} placed, {refused} refused");
        }
    }
}
