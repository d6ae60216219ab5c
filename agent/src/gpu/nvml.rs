//! Real GPUs through NVML (`nvml-wrapper`). [`NvmlGpus::open`] fails cleanly where there is no driver, and the
//! agent then falls back to simulated GPUs.
//!
//! Xid errors arrive through an NVML event set, waited on by a thread of its own (`nvmlEventSetWait` blocks); they
//! reach the sampler through a channel. NVML has no "recovered" event: a GPU that could not be read (as after
//! Xid 79) and reads again with the same UUID is reported as recovered.

use std::{
    sync::mpsc::{Receiver, Sender, channel},
    thread,
    time::Duration,
};

use nvml_wrapper::{
    Nvml,
    bitmasks::event::EventTypes,
    enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    error::NvmlError,
};

use super::{GpuBackend, GpuEvent, GpuInfo, GpuProcess, GpuSample};

/// GPUs read through NVML.
pub struct NvmlGpus {
    nvml: &'static Nvml,
    inventory: Vec<GpuInfo>,
    driver: String,
    cuda: String,
    events: Receiver<GpuEvent>,
    unreadable: Vec<bool>,
    recovered: Vec<GpuEvent>,
}

impl std::fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpus").field("inventory", &self.inventory).field("driver", &self.driver).finish()
    }
}

impl NvmlGpus {
    /// Opens NVML and reads the inventory; an error where there is no NVIDIA driver (or no GPU).
    pub fn open() -> Result<Self, NvmlError> {
        // One NVML handle for the life of the process: the event thread borrows it for as long as it runs.
        let nvml: &'static Nvml = Box::leak(Box::new(Nvml::init()?));
        let count = nvml.device_count()?;
        if count == 0 {
            return Err(NvmlError::NotFound);
        }
        let mut inventory = Vec::new();
        for index in 0..count {
            let d = nvml.device_by_index(index)?;
            let cc = d.cuda_compute_capability().map(|c| (c.major as u32, c.minor as u32)).unwrap_or((0, 0));
            inventory.push(GpuInfo {
                index,
                uuid: d.uuid()?,
                name: d.name()?,
                memory_total_bytes: d.memory_info()?.total,
                pci_bus_id: d.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                compute_capability: cc,
            });
        }
        let driver = nvml.sys_driver_version().unwrap_or_default();
        let cuda = nvml
            .sys_cuda_driver_version()
            .map(|v| {
                format!("{}.{}", nvml_wrapper::cuda_driver_version_major(v), nvml_wrapper::cuda_driver_version_minor(v))
            })
            .unwrap_or_default();
        let (tx, rx) = channel();
        spawn_xid_listener(nvml, count, tx);
        Ok(Self {
            nvml,
            unreadable: vec![false; inventory.len()],
            inventory,
            driver,
            cuda,
            events: rx,
            recovered: Vec::new(),
        })
    }

    fn read(&self, index: u32) -> Result<GpuSample, NvmlError> {
        let d = self.nvml.device_by_index(index)?;
        let memory = d.memory_info()?;
        let util = d.utilization_rates().ok();
        let processes = d
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                memory_used_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => bytes,
                    UsedGpuMemory::Unavailable => 0,
                },
            })
            .collect();
        Ok(GpuSample {
            index,
            sm_util_pct: util.as_ref().map(|u| u.gpu),
            mem_util_pct: util.as_ref().map(|u| u.memory),
            memory_used_bytes: Some(memory.used),
            memory_free_bytes: Some(memory.free),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            power_mw: d.power_usage().ok(),
            power_limit_mw: d.enforced_power_limit().ok(),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            ecc_corrected_total: d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate).ok(),
            ecc_uncorrected_total: d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate).ok(),
            // NVML reports KB/s.
            pcie_tx_bytes_per_sec: d.pcie_throughput(PcieUtilCounter::Send).ok().map(|k| u64::from(k) * 1024),
            pcie_rx_bytes_per_sec: d.pcie_throughput(PcieUtilCounter::Receive).ok().map(|k| u64::from(k) * 1024),
            processes,
        })
    }
}

/// Waits for critical Xid events on every GPU that supports them and forwards them.
fn spawn_xid_listener(nvml: &'static Nvml, count: u32, tx: Sender<GpuEvent>) {
    let spawned = thread::Builder::new().name("kiln-nvml-xid".into()).spawn(move || {
        let Ok(mut set) = nvml.create_event_set() else { return };
        for index in 0..count {
            let Ok(device) = nvml.device_by_index(index) else { continue };
            // GPUs without Xid event support (some boards) are skipped: registering would consume the set.
            let supported = device.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
            if !supported {
                tracing::warn!(gpu = index, "no Xid events from NVML for this GPU");
                continue;
            }
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(registered) => set = registered,
                Err(e) => {
                    tracing::warn!(gpu = index, "NVML Xid events unavailable: {}", e.error);
                    return;
                }
            }
        }
        loop {
            match set.wait(1000) {
                Ok(data) => {
                    let Ok(index) = data.device.index() else { continue };
                    let xid = match data.event_data {
                        Some(XidError::Value(v)) => v as u32,
                        _ => 0,
                    };
                    if tx.send(GpuEvent::Xid { index, xid }).is_err() {
                        return;
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(_) => thread::sleep(Duration::from_secs(1)),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("could not start the NVML Xid listener: {e}");
    }
}

impl GpuBackend for NvmlGpus {
    fn simulated(&self) -> bool {
        false
    }

    fn driver_version(&self) -> String {
        self.driver.clone()
    }

    fn cuda_version(&self) -> String {
        self.cuda.clone()
    }

    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        let mut out = Vec::with_capacity(self.inventory.len());
        for i in 0..self.inventory.len() {
            let index = self.inventory[i].index;
            match self.read(index) {
                Ok(sample) => {
                    if self.unreadable[i] {
                        self.unreadable[i] = false;
                        self.recovered.push(GpuEvent::Recovered { index });
                    }
                    out.push(sample);
                }
                Err(_) => {
                    self.unreadable[i] = true;
                    out.push(GpuSample { index, ..GpuSample::default() });
                }
            }
        }
        out
    }

    fn drain_events(&mut self) -> Vec<GpuEvent> {
        let mut events: Vec<GpuEvent> = self.events.try_iter().collect();
        events.append(&mut self.recovered);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs an NVIDIA GPU and driver: cargo nextest run -p kiln-agent --run-ignored only nvml"]
    fn reads_the_real_gpus() {
        let mut gpus = NvmlGpus::open().expect("NVML with at least one GPU");
        let first = gpus.inventory()[0].clone();
        assert!(first.uuid.starts_with("GPU-") && first.memory_total_bytes > 0, "{first:?}");
        assert!(!gpus.driver_version().is_empty());
        let samples = gpus.sample();
        assert_eq!(samples.len(), gpus.inventory().len());
        let s = &samples[0];
        assert!(s.memory_used_bytes.is_some() && s.temperature_c.is_some() && s.sm_util_pct.is_some(), "{s:?}");
        assert!(gpus.drain_events().iter().all(|e| matches!(e, GpuEvent::Xid { .. })), "no spurious recoveries");
    }
}
