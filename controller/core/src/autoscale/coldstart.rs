//! How long a replica takes to load, from the size of its weights and where they come from.
//!
//! `load = init + bytes / bandwidth(tier)`. The default bandwidths are physical figures, not measurements of this
//! project: pinned host-to-device copies over PCIe Gen5 x16 reach about 50 GB/s, a datacenter NVMe SSD about
//! 7 GB/s sequential, a remote object store 1-12 GB/s depending on the network (2.5 GB/s by default, a 25 Gbit/s
//! link with headroom). An idle copy already in GPU memory costs only the re-initialisation. The fixed `init`
//! (process start, CUDA context, allocator warm-up) defaults to 2 s; it can instead be drawn from measured load
//! latencies (such as the Alibaba GenAI trace's) with [`ColdStartModel::with_init_samples`].

use crate::rng::Rng;

/// Where a replica's weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// An idle copy already in the GPU's memory.
    Gpu,
    /// Host RAM (page cache or pinned buffers).
    HostRam,
    /// Local NVMe.
    Disk,
    /// The remote model store.
    Remote,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 4] = [Tier::Gpu, Tier::HostRam, Tier::Disk, Tier::Remote];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::HostRam => "host_ram",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }
}

/// The load-time model.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdStartModel {
    /// Fixed initialisation, seconds.
    pub init_s: f64,
    /// Re-initialisation over an idle copy already in GPU memory, seconds.
    pub gpu_resident_s: f64,
    /// Host RAM to GPU, bytes/s.
    pub host_bps: f64,
    /// Local NVMe to GPU, bytes/s.
    pub disk_bps: f64,
    /// Remote store to GPU, bytes/s.
    pub remote_bps: f64,
    /// Measured initialisation times to draw `init` from instead of `init_s` (seconds), if any.
    init_samples: Vec<f64>,
}

impl Default for ColdStartModel {
    fn default() -> Self {
        Self {
            init_s: 2.0,
            gpu_resident_s: 0.3,
            host_bps: 50e9,
            disk_bps: 7e9,
            remote_bps: 2.5e9,
            init_samples: Vec::new(),
        }
    }
}

impl ColdStartModel {
    /// Draws the fixed initialisation from `samples` (seconds; empty keeps `init_s`).
    pub fn with_init_samples(mut self, samples: Vec<f64>) -> Self {
        self.init_samples = samples.into_iter().filter(|s| s.is_finite() && *s >= 0.0).collect();
        self
    }

    /// The expected load time of `bytes` from `tier`, seconds.
    pub fn expected(&self, bytes: u64, tier: Tier) -> f64 {
        let init = if self.init_samples.is_empty() {
            self.init_s
        } else {
            self.init_samples.iter().sum::<f64>() / self.init_samples.len() as f64
        };
        self.with_init(bytes, tier, init)
    }

    /// One load time of `bytes` from `tier`, seconds (the initialisation drawn from the samples when given).
    pub fn sample(&self, bytes: u64, tier: Tier, rng: &mut Rng) -> f64 {
        let init = if self.init_samples.is_empty() {
            self.init_s
        } else {
            self.init_samples[rng.below(self.init_samples.len() as u64) as usize]
        };
        self.with_init(bytes, tier, init)
    }

    fn with_init(&self, bytes: u64, tier: Tier, init: f64) -> f64 {
        let bytes = bytes as f64;
        match tier {
            Tier::Gpu => self.gpu_resident_s,
            Tier::HostRam => init + bytes / self.host_bps,
            Tier::Disk => init + bytes / self.disk_bps,
            Tier::Remote => init + bytes / self.remote_bps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_time_grows_with_size_and_slower_tiers() {
        let m = ColdStartModel::default();
        let gb = 1_000_000_000;
        assert_eq!(m.expected(80 * gb, Tier::Gpu), 0.3);
        assert!((m.expected(80 * gb, Tier::HostRam) - (2.0 + 1.6)).abs() < 1e-9);
        assert!((m.expected(70 * gb, Tier::Disk) - 12.0).abs() < 1e-9);
        assert!((m.expected(10 * gb, Tier::Remote) - 6.0).abs() < 1e-9);
        let mut last = 0.0;
        for tier in Tier::ALL {
            let t = m.expected(16 * gb, tier);
            assert!(t > last, "{tier:?}");
            last = t;
        }
    }

    #[test]
    fn measured_init_times_replace_the_constant() {
        let m = ColdStartModel::default().with_init_samples(vec![10.0, 30.0, f64::NAN]);
        assert_eq!(m.expected(0, Tier::HostRam), 20.0);
        let mut rng = Rng::new(1);
        for _ in 0..20 {
            let t = m.sample(0, Tier::Disk, &mut rng);
            assert!(t == 10.0 || t == 30.0, "{t}");
        }
    }
}
