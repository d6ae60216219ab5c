//! The agent's messages to the controller (`kiln.agent.v1`), built from its current state: the registration that
//! opens every session, telemetry batches and health events. Conversions between the protocol and `kiln-core`
//! types are `kiln_proto::convert`'s; the agent's own GPU health converts here (`From<Health>`).

use std::time::SystemTime;

use kiln_proto::{convert, v1};

use crate::{
    gpu::GpuSample,
    telemetry::{Health, HealthChange, Snapshot},
};

impl From<Health> for v1::GpuHealth {
    fn from(health: Health) -> Self {
        match health {
            Health::Healthy => v1::GpuHealth::Healthy,
            Health::Degraded => v1::GpuHealth::Degraded,
            Health::Unhealthy => v1::GpuHealth::Unhealthy,
        }
    }
}

/// The registration for `snapshot` (workers and cache contents are added by their owners).
pub fn registration(snapshot: &Snapshot, agent_version: &str, worker_endpoint: &str) -> v1::Register {
    v1::Register {
        node_name: snapshot.node.clone(),
        agent_version: agent_version.to_owned(),
        driver_version: snapshot.driver_version.clone(),
        cuda_version: snapshot.cuda_version.clone(),
        simulated: snapshot.simulated,
        gpus: snapshot
            .gpus
            .iter()
            .map(|g| v1::Gpu {
                index: g.info.index,
                uuid: g.info.uuid.clone(),
                model: g.info.name.clone(),
                memory_total_bytes: g.info.memory_total_bytes,
                health: v1::GpuHealth::from(g.health) as i32,
                pci_bus_id: g.info.pci_bus_id.clone(),
                compute_capability_major: g.info.compute_capability.0,
                compute_capability_minor: g.info.compute_capability.1,
            })
            .collect(),
        worker_endpoint: worker_endpoint.to_owned(),
        // The worker port serves the HTTP/1.1 predict route beside gRPC (`WorkerApi::router`).
        worker_http1: true,
        cpu_milli: host_cpu_milli(snapshot),
        host_memory_bytes: host_memory(snapshot),
        ..v1::Register::default()
    }
}

/// Host CPU of a simulated node, per GPU: the shape of the 8-GPU cloud machines (192 vCPU and 2 TiB for 8 H100s),
/// so that a simulated 8-GPU node is not limited by the 2-core machine it happens to run on.
pub const SIMULATED_CPU_MILLI_PER_GPU: u64 = 24_000;
/// Host memory of a simulated node, per GPU, bytes.
pub const SIMULATED_HOST_MEMORY_PER_GPU: u64 = 256 << 30;

/// The node's CPU, millicores: the simulated machine's for simulated GPUs, this machine's otherwise.
fn host_cpu_milli(snapshot: &Snapshot) -> u64 {
    if snapshot.simulated && !snapshot.gpus.is_empty() {
        return snapshot.gpus.len() as u64 * SIMULATED_CPU_MILLI_PER_GPU;
    }
    std::thread::available_parallelism().map_or(0, |n| n.get() as u64 * 1000)
}

/// The node's host memory, bytes: the simulated machine's for simulated GPUs, this machine's otherwise.
fn host_memory(snapshot: &Snapshot) -> u64 {
    if snapshot.simulated && !snapshot.gpus.is_empty() {
        return snapshot.gpus.len() as u64 * SIMULATED_HOST_MEMORY_PER_GPU;
    }
    host_memory_bytes().unwrap_or(0)
}

/// `MemTotal` from `/proc/meminfo`, bytes; `None` where it cannot be read.
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A telemetry batch of the latest samples.
pub fn telemetry(snapshot: &Snapshot, at: SystemTime) -> v1::TelemetryBatch {
    let sample = |s: &GpuSample| v1::GpuSample {
        gpu_index: s.index,
        time: Some(convert::timestamp(at)),
        sm_util_pct: s.sm_util_pct.unwrap_or_default(),
        mem_util_pct: s.mem_util_pct.unwrap_or_default(),
        memory_used_bytes: s.memory_used_bytes.unwrap_or_default(),
        memory_free_bytes: s.memory_free_bytes.unwrap_or_default(),
        temperature_c: s.temperature_c.unwrap_or_default(),
        power_mw: s.power_mw.unwrap_or_default(),
        power_limit_mw: s.power_limit_mw.unwrap_or_default(),
        sm_clock_mhz: s.sm_clock_mhz.unwrap_or_default(),
        ecc_corrected_total: s.ecc_corrected_total.unwrap_or_default(),
        ecc_uncorrected_total: s.ecc_uncorrected_total.unwrap_or_default(),
        pcie_tx_bytes_per_sec: s.pcie_tx_bytes_per_sec.unwrap_or_default(),
        pcie_rx_bytes_per_sec: s.pcie_rx_bytes_per_sec.unwrap_or_default(),
        processes: s
            .processes
            .iter()
            .map(|p| v1::GpuProcess { pid: p.pid, memory_used_bytes: p.memory_used_bytes })
            .collect(),
    };
    v1::TelemetryBatch { samples: snapshot.gpus.iter().map(|g| sample(&g.sample)).collect() }
}

/// The health event for `change`.
pub fn health_event(change: &HealthChange) -> v1::GpuHealthEvent {
    v1::GpuHealthEvent {
        gpu_index: change.index,
        uuid: change.uuid.clone(),
        health: v1::GpuHealth::from(change.health) as i32,
        xid: change.xid,
        reason: change.reason.clone(),
        time: Some(convert::timestamp(change.time)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{gpu::sim::SimulatedGpus, telemetry::Telemetry};

    #[test]
    fn an_xid_79_shows_in_the_next_registration_and_as_an_event() {
        let mut gpus = SimulatedGpus::new("node-a", "h100-80gb:8").unwrap();
        let handle = gpus.handle();
        let t = Telemetry::new("node-a", &gpus);
        t.tick(&mut gpus, true);
        let before = registration(&t.read(), "0.1.0", "127.0.0.1:7443");
        assert_eq!(before.gpus.len(), 8);
        assert!(before.simulated);
        assert_eq!(before.cpu_milli, 8 * SIMULATED_CPU_MILLI_PER_GPU, "the simulated machine's CPU, not this one's");
        assert_eq!(before.host_memory_bytes, 8 * SIMULATED_HOST_MEMORY_PER_GPU);
        assert!(before.gpus.iter().all(|g| g.health == v1::GpuHealth::Healthy as i32));

        handle.inject_xid(3, 79).unwrap();
        let changes = t.tick(&mut gpus, true);
        let event = health_event(&changes[0]);
        assert_eq!((event.gpu_index, event.xid), (3, 79));
        assert_eq!(event.health, v1::GpuHealth::Unhealthy as i32);
        let after = registration(&t.read(), "0.1.0", "127.0.0.1:7443");
        assert_eq!(after.gpus[3].health, v1::GpuHealth::Unhealthy as i32);
        assert_eq!(after.gpus[2].health, v1::GpuHealth::Healthy as i32);
        let batch = telemetry(&t.read(), SystemTime::now());
        assert_eq!(batch.samples.len(), 8);
        let lost = &batch.samples[3];
        assert_eq!(lost.memory_used_bytes + lost.memory_free_bytes, 0, "nothing read from a GPU off the bus");
    }
}
