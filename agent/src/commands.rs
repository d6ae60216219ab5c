//! What this agent does with the controller's commands: cache prefetches and evictions; worker starts (checked
//! against the inventory and GPU health first) and stops, carried out by [`crate::workers`].

use std::{sync::Arc, time::SystemTime};

use kiln_proto::{
    convert,
    v1::{self, AckStatus, Command, command::Action},
};

use crate::{
    cache::{Tier, WeightCache},
    session::CommandHandler,
    telemetry::{Health, Telemetry},
    workers::Workers,
};

/// The agent's command handler.
#[derive(Debug, Clone)]
pub struct NodeCommands {
    /// Weight cache.
    pub cache: Arc<WeightCache>,
    /// GPU state.
    pub telemetry: Telemetry,
    /// Replicas.
    pub workers: Arc<Workers>,
}

impl NodeCommands {
    /// Why `start` cannot run on this node's GPUs, if it cannot.
    fn check_gpus(&self, start: &v1::StartWorker) -> Option<String> {
        let s = self.telemetry.read();
        if start.gpu_indexes.len() != start.gpu_uuids.len() {
            return Some("gpu_indexes and gpu_uuids differ in length".into());
        }
        for (index, uuid) in start.gpu_indexes.iter().zip(&start.gpu_uuids) {
            let Some(gpu) = s.gpus.get(*index as usize) else {
                return Some(format!("no GPU {index} on this node ({} GPUs)", s.gpus.len()));
            };
            if gpu.info.uuid != *uuid {
                return Some(format!("GPU {index} is {}, not {uuid}", gpu.info.uuid));
            }
            if gpu.health == Health::Unhealthy {
                return Some(format!("GPU {index} is unhealthy: {}", gpu.reason));
            }
        }
        None
    }
}

impl CommandHandler for NodeCommands {
    async fn handle(&self, command: Command) -> (AckStatus, String) {
        match command.action {
            Some(Action::PrefetchModel(p)) => {
                let tier = match convert::optional_tier("PrefetchModel.target_tier", p.target_tier) {
                    Ok(None | Some(Tier::Disk)) => Tier::Disk,
                    Ok(Some(Tier::HostRam)) => Tier::HostRam,
                    Ok(Some(Tier::Gpu | Tier::Remote)) => {
                        let why = "GPU copies are left by stopped replicas (keep_weights_resident), not prefetched";
                        return (AckStatus::Rejected, why.into());
                    }
                    Err(e) => return (AckStatus::Rejected, e.to_string()),
                };
                let cache = Arc::clone(&self.cache);
                let digest = (!p.digest.is_empty()).then_some(p.digest.clone());
                let uri = p.model_uri.clone();
                let fetched = tokio::task::spawn_blocking(move || cache.prefetch(&uri, digest.as_deref(), tier)).await;
                match fetched {
                    Ok(Ok(entry)) => (AckStatus::Done, format!("{} bytes cached ({})", entry.size, entry.digest)),
                    Ok(Err(e)) => (AckStatus::Failed, e.to_string()),
                    Err(e) => (AckStatus::Failed, format!("prefetch task failed: {e}")),
                }
            }
            Some(Action::EvictModel(e)) => {
                // Unspecified evicts from every tier: the cache's two and the idle GPU copies.
                let tier = match convert::optional_tier("EvictModel.tier", e.tier) {
                    Ok(tier) => tier,
                    Err(why) => return (AckStatus::Rejected, why.to_string()),
                };
                let mut gone = self.cache.evict(&e.model_uri, tier);
                if matches!(tier, None | Some(Tier::Gpu)) {
                    gone += self.workers.evict_resident(&e.model_uri, e.gpu_index);
                }
                (AckStatus::Done, format!("{gone} entries evicted"))
            }
            Some(Action::StartWorker(start)) => match self.check_gpus(&start) {
                Some(why) => (AckStatus::Rejected, why),
                None => self.workers.start(&command.command_id, start),
            },
            Some(Action::StopWorker(stop)) => self.workers.stop(&stop).await,
            None => (AckStatus::Rejected, "a command without an action".into()),
        }
    }

    fn cache_report(&self) -> Option<v1::CacheReport> {
        let (host, disk) = self.cache.capacities();
        let models = self
            .cache
            .report()
            .into_iter()
            .map(|e| v1::CachedModel {
                model_uri: e.uri,
                digest: e.digest,
                size_bytes: e.size,
                tier: v1::CacheTier::from(e.tier) as i32,
                gpu_index: None,
                last_used: Some(convert::timestamp(e.last_used.max(SystemTime::UNIX_EPOCH))),
            })
            .chain(self.workers.resident_copies().into_iter().map(|copy| v1::CachedModel {
                model_uri: copy.uri,
                digest: String::new(),
                size_bytes: copy.bytes,
                tier: v1::CacheTier::from(Tier::Gpu) as i32,
                gpu_index: Some(copy.gpu),
                last_used: Some(convert::timestamp(copy.since)),
            }))
            .collect();
        Some(v1::CacheReport { models, host_capacity_bytes: host, disk_capacity_bytes: disk })
    }

    fn running_workers(&self) -> Vec<v1::RunningWorker> {
        self.workers.running()
    }

    fn worker_loads(&self) -> Vec<v1::WorkerLoad> {
        self.workers.loads()
    }

    fn worker_events(&self) -> Option<tokio::sync::broadcast::Receiver<v1::WorkerEvent>> {
        Some(self.workers.subscribe())
    }
}
