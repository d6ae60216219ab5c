//! Simulated GPUs: used when NVML is absent, or with `--simulate-gpus h100-80gb:8`.
//!
//! The inventory is realistic (product names, memory, compute capability; UUIDs stable per node name and index),
//! memory used is what the agent's workers hold, utilization follows their in-flight requests, and faults can be
//! injected through a [`SimHandle`] (the admin endpoint and `kiln-agent inject` use it): an Xid (79 makes the GPU
//! unreadable, as a GPU that fell off the bus is), ECC errors, and a reset that brings the GPU back.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{GpuBackend, GpuEvent, GpuInfo, GpuSample};

/// A known GPU kind.
struct Kind {
    spec: &'static str,
    name: &'static str,
    memory_mib: u64,
    compute_capability: (u32, u32),
    tdp_w: u32,
}

const KINDS: [Kind; 7] = [
    Kind {
        spec: "h100-80gb",
        name: "NVIDIA H100 80GB HBM3",
        memory_mib: 81_559,
        compute_capability: (9, 0),
        tdp_w: 700,
    },
    Kind { spec: "h200-141gb", name: "NVIDIA H200", memory_mib: 143_771, compute_capability: (9, 0), tdp_w: 700 },
    Kind {
        spec: "a100-80gb",
        name: "NVIDIA A100-SXM4-80GB",
        memory_mib: 81_920,
        compute_capability: (8, 0),
        tdp_w: 400,
    },
    Kind {
        spec: "a100-40gb",
        name: "NVIDIA A100-SXM4-40GB",
        memory_mib: 40_960,
        compute_capability: (8, 0),
        tdp_w: 400,
    },
    Kind { spec: "l40s-48gb", name: "NVIDIA L40S", memory_mib: 46_068, compute_capability: (8, 9), tdp_w: 350 },
    Kind { spec: "l4-24gb", name: "NVIDIA L4", memory_mib: 23_034, compute_capability: (8, 9), tdp_w: 72 },
    Kind { spec: "t4-16gb", name: "Tesla T4", memory_mib: 15_360, compute_capability: (7, 5), tdp_w: 70 },
];

/// What the simulated backend refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The spec is not `<gpu>-<memory>gb:<count>`.
    #[error("{0:?}: expected <gpu>-<memory>gb:<count>, e.g. h100-80gb:8")]
    BadSpec(String),
    /// The spec asks for no GPU or more than a node holds.
    #[error("{0:?}: 1 to 16 GPUs per node")]
    Count(String),
    /// There is no GPU with this index.
    #[error("no GPU {0}")]
    NoGpu(u32),
}

/// Results of this module.
pub type Result<T, E = SimError> = std::result::Result<T, E>;

/// A parsed `--simulate-gpus` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSpec {
    /// Product name.
    pub name: String,
    /// Memory per GPU, bytes.
    pub memory_bytes: u64,
    /// CUDA compute capability.
    pub compute_capability: (u32, u32),
    /// Board power, W.
    pub tdp_w: u32,
    /// GPUs.
    pub count: u32,
}

/// Parses `<kind>:<count>`, e.g. `h100-80gb:8`; an unknown `<name>-<N>gb` kind gets N GiB and a generic name.
pub fn parse_spec(spec: &str) -> Result<SimSpec> {
    let bad = || SimError::BadSpec(spec.to_owned());
    let (kind, count) = spec.split_once(':').ok_or_else(bad)?;
    let count: u32 = count.parse().map_err(|_| bad())?;
    if count == 0 || count > 16 {
        return Err(SimError::Count(spec.to_owned()));
    }
    let kind = kind.to_ascii_lowercase();
    if let Some(k) = KINDS.iter().find(|k| k.spec == kind) {
        return Ok(SimSpec {
            name: k.name.to_owned(),
            memory_bytes: k.memory_mib * 1024 * 1024,
            compute_capability: k.compute_capability,
            tdp_w: k.tdp_w,
            count,
        });
    }
    let gb: u64 =
        kind.rsplit_once('-').and_then(|(_, m)| m.strip_suffix("gb")).and_then(|m| m.parse().ok()).ok_or_else(bad)?;
    Ok(SimSpec {
        name: format!("Simulated {}", kind.to_ascii_uppercase()),
        memory_bytes: gb * 1024 * 1024 * 1024,
        compute_capability: (9, 0),
        tdp_w: 400,
        count,
    })
}

/// A stable UUID for GPU `index` of node `node`, in NVML's format.
pub fn stable_uuid(node: &str, index: u32) -> String {
    let h = |salt: u64| {
        // FNV-1a over the node name, the index and a salt.
        let mut x: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
        for b in node.bytes().chain(index.to_le_bytes()) {
            x ^= u64::from(b);
            x = x.wrapping_mul(0x0000_0100_0000_01b3);
        }
        x
    };
    let (a, b) = (h(1), h(2));
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[derive(Debug, Clone, Default)]
struct SimGpu {
    memory_used: u64,
    in_flight: u32,
    ecc_corrected: u64,
    ecc_uncorrected: u64,
    /// Fell off the bus: unreadable until reset.
    lost: bool,
}

#[derive(Debug, Default)]
struct SimState {
    gpus: Vec<SimGpu>,
    events: Vec<GpuEvent>,
}

/// Simulated GPUs.
#[derive(Debug)]
pub struct SimulatedGpus {
    inventory: Vec<GpuInfo>,
    tdp_w: u32,
    state: Arc<Mutex<SimState>>,
}

/// Drives simulated GPUs from elsewhere: worker load and fault injection.
#[derive(Debug, Clone)]
pub struct SimHandle {
    state: Arc<Mutex<SimState>>,
}

fn lock(state: &Mutex<SimState>) -> MutexGuard<'_, SimState> {
    // A panic elsewhere while holding the lock leaves plain numbers behind: keep going with them.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SimulatedGpus {
    /// GPUs of `spec` (`h100-80gb:8`) on node `node`.
    pub fn new(node: &str, spec: &str) -> Result<Self> {
        let spec = parse_spec(spec)?;
        let inventory = (0..spec.count)
            .map(|i| GpuInfo {
                index: i,
                uuid: stable_uuid(node, i),
                name: spec.name.clone(),
                memory_total_bytes: spec.memory_bytes,
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i * 0x10),
                compute_capability: spec.compute_capability,
            })
            .collect();
        let state = SimState { gpus: vec![SimGpu::default(); spec.count as usize], events: Vec::new() };
        Ok(Self { inventory, tdp_w: spec.tdp_w, state: Arc::new(Mutex::new(state)) })
    }

    /// A handle for load and fault injection.
    pub fn handle(&self) -> SimHandle {
        SimHandle { state: Arc::clone(&self.state) }
    }
}

impl SimHandle {
    /// Number of GPUs.
    pub fn len(&self) -> usize {
        lock(&self.state).gpus.len()
    }

    /// Whether there is no GPU.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets what workers hold on GPU `index`: memory and requests in flight.
    pub fn set_load(&self, index: u32, memory_used_bytes: u64, in_flight: u32) -> Result<()> {
        let mut s = lock(&self.state);
        let gpu = s.gpus.get_mut(index as usize).ok_or(SimError::NoGpu(index))?;
        gpu.memory_used = memory_used_bytes;
        gpu.in_flight = in_flight;
        Ok(())
    }

    /// Reports Xid `xid` on GPU `index` (79 also makes the GPU unreadable until [`SimHandle::reset`]).
    pub fn inject_xid(&self, index: u32, xid: u32) -> Result<()> {
        let mut s = lock(&self.state);
        let gpu = s.gpus.get_mut(index as usize).ok_or(SimError::NoGpu(index))?;
        if xid == 79 {
            gpu.lost = true;
        }
        if matches!(xid, 48 | 95) {
            gpu.ecc_uncorrected += 1;
        }
        s.events.push(GpuEvent::Xid { index, xid });
        Ok(())
    }

    /// Adds ECC errors on GPU `index`.
    pub fn inject_ecc(&self, index: u32, corrected: u64, uncorrected: u64) -> Result<()> {
        let mut s = lock(&self.state);
        let gpu = s.gpus.get_mut(index as usize).ok_or(SimError::NoGpu(index))?;
        gpu.ecc_corrected += corrected;
        gpu.ecc_uncorrected += uncorrected;
        Ok(())
    }

    /// Resets GPU `index`: readable again, and the agent observes the recovery.
    pub fn reset(&self, index: u32) -> Result<()> {
        let mut s = lock(&self.state);
        let gpu = s.gpus.get_mut(index as usize).ok_or(SimError::NoGpu(index))?;
        gpu.lost = false;
        s.events.push(GpuEvent::Recovered { index });
        Ok(())
    }
}

impl GpuBackend for SimulatedGpus {
    fn simulated(&self) -> bool {
        true
    }

    fn driver_version(&self) -> String {
        "simulated".to_owned()
    }

    fn cuda_version(&self) -> String {
        String::new()
    }

    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        let s = lock(&self.state);
        self.inventory
            .iter()
            .zip(&s.gpus)
            .map(|(info, gpu)| {
                if gpu.lost {
                    return GpuSample { index: info.index, ..GpuSample::default() };
                }
                // Utilization follows the requests in flight: one keeps the SMs half busy, more saturate them.
                let busy = 1.0 - 0.5f64.powi(gpu.in_flight.min(32) as i32);
                let used = gpu.memory_used.min(info.memory_total_bytes);
                let tdp_mw = self.tdp_w * 1000;
                GpuSample {
                    index: info.index,
                    sm_util_pct: Some((100.0 * busy).round() as u32),
                    mem_util_pct: Some((60.0 * busy).round() as u32),
                    memory_used_bytes: Some(used),
                    memory_free_bytes: Some(info.memory_total_bytes - used),
                    temperature_c: Some(30 + (40.0 * busy).round() as u32),
                    power_mw: Some(tdp_mw / 10 + ((f64::from(tdp_mw) * 0.85 * busy) as u32)),
                    power_limit_mw: Some(tdp_mw),
                    sm_clock_mhz: Some(if gpu.in_flight > 0 { 1980 } else { 345 }),
                    ecc_corrected_total: Some(gpu.ecc_corrected),
                    ecc_uncorrected_total: Some(gpu.ecc_uncorrected),
                    pcie_tx_bytes_per_sec: Some(0),
                    pcie_rx_bytes_per_sec: Some(0),
                    processes: Vec::new(),
                }
            })
            .collect()
    }

    fn drain_events(&mut self) -> Vec<GpuEvent> {
        std::mem::take(&mut lock(&self.state).events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_is_realistic_and_uuids_are_stable_per_node() {
        let a = SimulatedGpus::new("node-a", "h100-80gb:8").unwrap();
        assert_eq!(a.inventory().len(), 8);
        assert_eq!(a.inventory()[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(a.inventory()[0].memory_total_bytes, 81_559 * 1024 * 1024);
        let again = SimulatedGpus::new("node-a", "h100-80gb:8").unwrap();
        let other = SimulatedGpus::new("node-b", "h100-80gb:8").unwrap();
        assert_eq!(a.inventory()[3].uuid, again.inventory()[3].uuid);
        assert_ne!(a.inventory()[3].uuid, other.inventory()[3].uuid);
        assert_ne!(a.inventory()[3].uuid, a.inventory()[4].uuid);
        assert!(a.inventory()[0].uuid.starts_with("GPU-") && a.inventory()[0].uuid.len() == 40);
        assert!(SimulatedGpus::new("n", "h100:8").is_err());
        assert!(SimulatedGpus::new("n", "h100-80gb:0").is_err());
        assert_eq!(parse_spec("x9-24gb:2").unwrap().memory_bytes, 24 << 30);
    }

    #[test]
    fn load_drives_memory_and_utilization_and_xid_79_makes_a_gpu_unreadable_until_reset() {
        let mut gpus = SimulatedGpus::new("n", "h100-80gb:2").unwrap();
        let h = gpus.handle();
        h.set_load(1, 20 << 30, 3).unwrap();
        let s = gpus.sample();
        assert_eq!(s[0].sm_util_pct, Some(0));
        assert_eq!(s[1].memory_used_bytes, Some(20 << 30));
        assert!(s[1].sm_util_pct.unwrap() > 80);
        h.inject_xid(1, 79).unwrap();
        assert_eq!(gpus.drain_events(), vec![GpuEvent::Xid { index: 1, xid: 79 }]);
        assert_eq!(gpus.sample()[1].memory_used_bytes, None);
        h.reset(1).unwrap();
        assert_eq!(gpus.drain_events(), vec![GpuEvent::Recovered { index: 1 }]);
        assert!(gpus.sample()[1].memory_used_bytes.is_some());
        assert!(h.inject_xid(7, 79).is_err());
    }
}
