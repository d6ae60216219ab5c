//! Carrying the core's actions out: each [`Action`] becomes a `StartWorker` / `StopWorker` command sent to its node
//! through the registry, on a task of its own (the loop never waits for an agent). A start the agent refuses or
//! never acknowledges is a failed start, fed back to the core like the agent's own `WorkerFailed`.

use std::sync::{Arc, atomic::Ordering};

use kiln_core::control::{Action, StartFailure, StopReason};
use kiln_proto::v1::{self, command};

use super::ControlPlane;
use crate::registry::succeeded;

impl ControlPlane {
    /// Sends the command that carries out `action` (returns at once; the ack is awaited on a task).
    pub(super) fn execute(self: &Arc<Self>, action: Action) {
        let id = format!("cmd-{}", self.commands.fetch_add(1, Ordering::Relaxed) + 1);
        let (node, body, replica) = match &action {
            Action::Start { replica, deployment, node, gpus, .. } => {
                let Some(served) = self.state().served.get(deployment).cloned() else { return };
                let uuids = self
                    .registry
                    .node(node)
                    .map(|n| {
                        gpus.iter()
                            .filter_map(|g| n.gpus.iter().find(|x| x.index == *g).map(|x| x.uuid.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let start = v1::StartWorker {
                    replica_id: replica.clone(),
                    deployment: deployment.clone(),
                    generation: 0,
                    model: Some(served.source.clone()),
                    gpu_indexes: gpus.clone(),
                    gpu_uuids: uuids,
                    gpu_memory_bytes: served.gpu_memory_bytes,
                    max_concurrency: served.max_concurrency,
                };
                tracing::info!(%replica, %node, ?gpus, "starting replica");
                (node.clone(), command::Action::StartWorker(start), Some(replica.clone()))
            }
            Action::Stop { replica, node, reason, .. } => {
                tracing::info!(%replica, %node, ?reason, "stopping replica");
                // A GPU that goes to a rental (or back to its owner) must be left empty: no idle copy of the weights.
                let handed_over =
                    matches!(reason, StopReason::Fenced | StopReason::Reclaimed | StopReason::RentalEnded);
                let grace =
                    if *reason == StopReason::Reclaimed { self.config.reclaim_notice } else { self.config.stop_grace };
                let stop = v1::StopWorker {
                    replica_id: replica.clone(),
                    grace_period_ms: u32::try_from(grace.as_millis()).unwrap_or(u32::MAX),
                    keep_weights_resident: !handed_over,
                };
                (node.clone(), command::Action::StopWorker(stop), None)
            }
        };
        let command = v1::Command { command_id: id, deadline: None, action: Some(body) };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let result = this.registry.command(&node, command, this.config.command_timeout).await;
            let failed = match result {
                Ok(ack) if succeeded(&ack) => None,
                Ok(ack) => Some(("StartRefused", format!("the agent refused: {}", ack.message), true)),
                Err(e) => Some(("AgentUnreachable", e.to_string(), e.is_retryable())),
            };
            if let (Some((reason, message, retryable)), Some(replica)) = (failed, replica) {
                tracing::warn!(%replica, %node, %reason, error = %message, "start failed");
                let failure = StartFailure { reason: reason.into(), message, retryable };
                let now = this.now();
                this.start_failed(&mut this.state(), &replica, failure, now, false);
                this.wake.notify_one();
            }
        });
    }
}
