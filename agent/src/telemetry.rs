//! The agent's view of its GPUs: the latest sample of each, and their health, kept up to date by a sampler thread
//! of its own (NVML calls block on a global driver lock: never on the async runtime's threads).
//!
//! Health: a critical Xid ([`crate::gpu::xid`]) makes a GPU unhealthy at once and it stays so until the backend
//! observes a reset or recovery; warnings (e.g. a high single-bit ECC rate, a contained ECC error, new
//! uncorrectable ECC errors) make it degraded. Every change is kept as a [`HealthChange`] and broadcast, so the
//! controller session can send it at once rather than with the next telemetry batch.

use std::{
    sync::{Arc, RwLock, RwLockReadGuard},
    thread,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::broadcast;

use crate::gpu::{
    GpuBackend, GpuEvent, GpuInfo, GpuSample,
    xid::{Severity, classify},
};

/// Health of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// In service.
    Healthy,
    /// In service, with warnings.
    Degraded,
    /// Out of service until a reset or recovery is observed.
    Unhealthy,
}

/// A change of one GPU's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// NVML index.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// The new health.
    pub health: Health,
    /// The Xid that caused it, 0 if none.
    pub xid: u32,
    /// Why, for people.
    pub reason: String,
    /// When.
    pub time: SystemTime,
}

/// One GPU: what it is, its last sample, its health.
#[derive(Debug, Clone)]
pub struct GpuStatus {
    /// Inventory.
    pub info: GpuInfo,
    /// Latest sample (fields `None` when unreadable).
    pub sample: GpuSample,
    /// Health.
    pub health: Health,
    /// Why it is not healthy (empty when healthy).
    pub reason: String,
    /// Last Xid seen, 0 if none.
    pub last_xid: u32,
    /// Xids seen, by code.
    pub xid_counts: Vec<(u32, u64)>,
}

/// Everything the agent knows about its GPUs at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Node name.
    pub node: String,
    /// Whether the GPUs are simulated.
    pub simulated: bool,
    /// Driver version.
    pub driver_version: String,
    /// CUDA driver version.
    pub cuda_version: String,
    /// GPUs by index.
    pub gpus: Vec<GpuStatus>,
    /// Samples taken.
    pub samples: u64,
    /// Duration of the last sample.
    pub last_sample: Duration,
}

/// Shared GPU state: read by the metrics endpoint and the controller session, written by the sampler.
#[derive(Debug, Clone)]
pub struct Telemetry {
    snapshot: Arc<RwLock<Snapshot>>,
    changes: broadcast::Sender<HealthChange>,
}

impl Telemetry {
    /// The state of `backend`'s GPUs before any sample.
    pub fn new(node: &str, backend: &dyn GpuBackend) -> Self {
        let gpus = backend
            .inventory()
            .iter()
            .map(|info| GpuStatus {
                info: info.clone(),
                sample: GpuSample { index: info.index, ..GpuSample::default() },
                health: Health::Healthy,
                reason: String::new(),
                last_xid: 0,
                xid_counts: Vec::new(),
            })
            .collect();
        let snapshot = Snapshot {
            node: node.to_owned(),
            simulated: backend.simulated(),
            driver_version: backend.driver_version(),
            cuda_version: backend.cuda_version(),
            gpus,
            samples: 0,
            last_sample: Duration::ZERO,
        };
        Self { snapshot: Arc::new(RwLock::new(snapshot)), changes: broadcast::channel(256).0 }
    }

    /// The current state.
    pub fn read(&self) -> RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Health changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HealthChange> {
        self.changes.subscribe()
    }

    /// Applies the backend's pending events (health), and takes a sample when `sample` is true.
    pub fn tick(&self, backend: &mut dyn GpuBackend, sample: bool) -> Vec<HealthChange> {
        let events = backend.drain_events();
        let started = Instant::now();
        let samples = if sample { Some(backend.sample()) } else { None };
        let took = started.elapsed();
        let mut s = self.snapshot.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut changes = Vec::new();
        for event in events {
            let (index, health, xid, reason) = match event {
                GpuEvent::Xid { index, xid } => {
                    let Some(gpu) = s.gpus.get_mut(index as usize) else { continue };
                    gpu.last_xid = xid;
                    match gpu.xid_counts.iter_mut().find(|(code, _)| *code == xid) {
                        Some((_, n)) => *n += 1,
                        None => gpu.xid_counts.push((xid, 1)),
                    }
                    let (severity, what) = classify(xid);
                    let health = match (severity, gpu.health) {
                        (Severity::Critical, _) => Health::Unhealthy,
                        (Severity::Warning, Health::Healthy) => Health::Degraded,
                        (_, current) => current,
                    };
                    (index, health, xid, format!("Xid {xid}: {what}"))
                }
                GpuEvent::Recovered { index } => (index, Health::Healthy, 0, "reset or recovery observed".to_owned()),
            };
            if let Some(change) = set_health(&mut s.gpus, index, health, xid, reason) {
                changes.push(change);
            }
        }
        if let Some(samples) = samples {
            for sample in samples {
                let index = sample.index;
                let Some(gpu) = s.gpus.get_mut(index as usize) else { continue };
                let new_dbe = match (gpu.sample.ecc_uncorrected_total, sample.ecc_uncorrected_total) {
                    (Some(before), Some(now)) => now > before,
                    _ => false,
                };
                gpu.sample = sample;
                if new_dbe && gpu.health == Health::Healthy {
                    let reason = "new uncorrectable ECC errors".to_owned();
                    if let Some(change) = set_health(&mut s.gpus, index, Health::Degraded, 0, reason) {
                        changes.push(change);
                    }
                }
            }
            s.samples += 1;
            s.last_sample = took;
        }
        drop(s);
        for change in &changes {
            // No subscriber is fine: the change is in the snapshot.
            let _ = self.changes.send(change.clone());
        }
        changes
    }

    /// Runs the sampler on a thread of its own: events every 100 ms (so a critical Xid is acted on at once),
    /// a sample every `interval`.
    pub fn spawn_sampler(&self, mut backend: Box<dyn GpuBackend>, interval: Duration) -> std::io::Result<()> {
        let telemetry = self.clone();
        thread::Builder::new().name("kiln-gpu-sampler".into()).spawn(move || {
            let step = Duration::from_millis(100).min(interval);
            let mut next_sample = Instant::now();
            loop {
                let now = Instant::now();
                let due = now >= next_sample;
                if due {
                    next_sample += interval;
                    if next_sample < now {
                        next_sample = now + interval;
                    }
                }
                for change in telemetry.tick(backend.as_mut(), due) {
                    tracing::warn!(gpu = change.index, uuid = %change.uuid, health = ?change.health, "{}", change.reason);
                }
                thread::sleep(step);
            }
        })?;
        Ok(())
    }
}

fn set_health(gpus: &mut [GpuStatus], index: u32, health: Health, xid: u32, reason: String) -> Option<HealthChange> {
    let gpu = gpus.get_mut(index as usize)?;
    if gpu.health == health && (health == Health::Healthy || gpu.reason == reason) {
        return None;
    }
    gpu.health = health;
    gpu.reason = if health == Health::Healthy { String::new() } else { reason.clone() };
    Some(HealthChange { index, uuid: gpu.info.uuid.clone(), health, xid, reason, time: SystemTime::now() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sim::SimulatedGpus;

    #[test]
    fn a_critical_xid_makes_the_gpu_unhealthy_until_reset() {
        let mut gpus = SimulatedGpus::new("n", "h100-80gb:8").unwrap();
        let handle = gpus.handle();
        let t = Telemetry::new("n", &gpus);
        let mut changes = t.subscribe();
        assert!(t.tick(&mut gpus, true).is_empty());
        assert_eq!(t.read().samples, 1);

        handle.inject_xid(3, 79).unwrap();
        let c = t.tick(&mut gpus, false);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].index, c[0].health, c[0].xid), (3, Health::Unhealthy, 79));
        assert_eq!(c[0].reason, "Xid 79: GPU has fallen off the bus");
        assert_eq!(changes.try_recv().unwrap(), c[0]);
        // Sampling does not bring it back; an application Xid on another GPU changes nothing.
        handle.inject_xid(5, 13).unwrap();
        assert!(t.tick(&mut gpus, true).is_empty());
        {
            let s = t.read();
            assert_eq!(s.gpus[3].health, Health::Unhealthy);
            assert_eq!(s.gpus[3].sample.memory_used_bytes, None, "unreadable");
            assert_eq!(s.gpus[5].health, Health::Healthy);
            assert_eq!(s.gpus[5].xid_counts, vec![(13, 1)]);
        }
        handle.reset(3).unwrap();
        let c = t.tick(&mut gpus, true);
        assert_eq!((c[0].index, c[0].health), (3, Health::Healthy));
        assert_eq!(t.read().gpus[3].last_xid, 79, "the last Xid stays visible");
    }

    #[test]
    fn warnings_and_new_uncorrectable_ecc_errors_degrade() {
        let mut gpus = SimulatedGpus::new("n", "a100-80gb:2").unwrap();
        let handle = gpus.handle();
        let t = Telemetry::new("n", &gpus);
        t.tick(&mut gpus, true);
        handle.inject_xid(0, 92).unwrap();
        assert_eq!(t.tick(&mut gpus, true)[0].health, Health::Degraded);
        handle.inject_ecc(1, 10, 1).unwrap();
        let c = t.tick(&mut gpus, true);
        assert_eq!((c[0].index, c[0].health), (1, Health::Degraded));
        // A critical Xid on a degraded GPU still takes it out.
        handle.inject_xid(0, 48).unwrap();
        assert_eq!(t.tick(&mut gpus, true)[0].health, Health::Unhealthy);
    }
}
