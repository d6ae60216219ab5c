//! GPUs as the agent sees them: the inventory, 1 Hz samples and Xid events, from NVML ([`nvml`]) or from the
//! simulated backend ([`sim`]) used when NVML is absent or `--simulate-gpus` is given.
//!
//! Backends are blocking: NVML calls take a global driver lock, so they run on the agent's own sampler thread
//! ([`crate::telemetry`]), never on the async runtime's threads.

pub mod nvml;
pub mod sim;
pub mod xid;

/// One GPU of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index.
    pub index: u32,
    /// NVML UUID, `GPU-...`.
    pub uuid: String,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Total framebuffer memory, bytes.
    pub memory_total_bytes: u64,
    /// PCI bus id.
    pub pci_bus_id: String,
    /// CUDA compute capability.
    pub compute_capability: (u32, u32),
}

/// A process using a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    /// Process id.
    pub pid: u32,
    /// GPU memory it uses, bytes.
    pub memory_used_bytes: u64,
}

/// One telemetry sample of one GPU. Fields a backend cannot read are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    /// NVML index.
    pub index: u32,
    /// SM utilization, percent.
    pub sm_util_pct: Option<u32>,
    /// Memory (copy) utilization, percent.
    pub mem_util_pct: Option<u32>,
    /// Framebuffer used, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Framebuffer free, bytes.
    pub memory_free_bytes: Option<u64>,
    /// Temperature, °C.
    pub temperature_c: Option<u32>,
    /// Power draw, milliwatts.
    pub power_mw: Option<u32>,
    /// Power limit, milliwatts.
    pub power_limit_mw: Option<u32>,
    /// SM clock, MHz.
    pub sm_clock_mhz: Option<u32>,
    /// ECC errors since boot: corrected (single-bit) and uncorrected (double-bit).
    pub ecc_corrected_total: Option<u64>,
    /// See `ecc_corrected_total`.
    pub ecc_uncorrected_total: Option<u64>,
    /// PCIe throughput, bytes/s.
    pub pcie_tx_bytes_per_sec: Option<u64>,
    /// See `pcie_tx_bytes_per_sec`.
    pub pcie_rx_bytes_per_sec: Option<u64>,
    /// Processes on the GPU.
    pub processes: Vec<GpuProcess>,
}

/// Something that happened to a GPU between samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuEvent {
    /// An Xid error was reported for the GPU.
    Xid {
        /// NVML index.
        index: u32,
        /// The Xid code.
        xid: u32,
    },
    /// The GPU was reset or recovered (observed by the backend); it may return to service.
    Recovered {
        /// NVML index.
        index: u32,
    },
}

/// A source of GPU inventory, samples and events.
pub trait GpuBackend: Send {
    /// Whether the GPUs are simulated.
    fn simulated(&self) -> bool;
    /// Driver version (empty when unknown).
    fn driver_version(&self) -> String;
    /// CUDA driver version, e.g. "12.8" (empty when unknown).
    fn cuda_version(&self) -> String;
    /// The GPUs, by index.
    fn inventory(&self) -> &[GpuInfo];
    /// One sample of every GPU. A GPU that cannot be read is still listed, with `None` fields.
    fn sample(&mut self) -> Vec<GpuSample>;
    /// Events since the last call.
    fn drain_events(&mut self) -> Vec<GpuEvent>;
}
