//! The request path: the gateway's [`Backend`] over the control plane. A request goes to the least-loaded ready
//! replica with a free slot, over its node's `WorkerService` (clients cached per endpoint, [`WorkerClients`]); with
//! none free it waits in the deployment's bounded [`HoldQueue`] while the loop is woken to start one. A replica that
//! turns out unreachable is given up and the request routed again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kiln_core::control::{Action, Route, StopReason};
use kiln_proto::v1::{self, worker_service_client::WorkerServiceClient};
use serde_json::Value;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::ControlPlane;
use crate::gateway::{Backend, GpuUse, Outcome, PredictError};

/// Requests held for one deployment while it has no ready replica: bounded, woken together when a replica is
/// ready.
#[derive(Debug)]
pub struct HoldQueue {
    capacity: usize,
    held: Mutex<usize>,
    state: watch::Sender<HoldState>,
}

/// What held requests wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// No replica has a free slot yet.
    Waiting,
    /// A ready replica has a free slot: held requests go and get routed.
    Ready,
    /// The deployment's replicas fail to start: held requests go and fail with the reason.
    Failed,
}

/// A place in a [`HoldQueue`], given back on drop.
#[derive(Debug)]
pub struct Held<'a>(&'a HoldQueue);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut held = self.0.held.lock().unwrap_or_else(|p| p.into_inner());
        *held = held.saturating_sub(1);
    }
}

impl HoldQueue {
    /// A queue holding at most `capacity` requests.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, held: Mutex::new(0), state: watch::channel(HoldState::Waiting).0 }
    }

    /// Requests held now.
    pub fn len(&self) -> usize {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a replica is ready.
    pub fn is_ready(&self) -> bool {
        *self.state.borrow() == HoldState::Ready
    }

    /// Sets whether a replica is ready; held requests wake when it becomes true.
    pub fn set_ready(&self, ready: bool) {
        self.set_state(if ready { HoldState::Ready } else { HoldState::Waiting });
    }

    /// Sets what held requests wait for; they wake on anything but [`HoldState::Waiting`].
    pub fn set_state(&self, state: HoldState) {
        self.state.send_if_modified(|s| std::mem::replace(s, state) != state);
    }

    /// Holds one request until a replica is ready, the deployment fails, or `timeout` passes; `Err(None)` when
    /// the queue is full, `Err(Some(waited))` on timeout. The caller asks the control plane which of the first two
    /// it was.
    pub async fn wait(&self, timeout: Duration) -> Result<Duration, Option<Duration>> {
        let started = Instant::now();
        if *self.state.borrow() != HoldState::Waiting {
            return Ok(Duration::ZERO);
        }
        let _place = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if *held >= self.capacity {
                return Err(None);
            }
            *held += 1;
            Held(self)
        };
        let mut rx = self.state.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|s| *s != HoldState::Waiting)).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            _ => Err(Some(started.elapsed())),
        }
    }
}

/// The `WorkerService` clients of the nodes, one per worker endpoint (channels connect lazily: making one does no
/// I/O, so it is made under the control plane's lock).
#[derive(Debug, Default)]
pub(super) struct WorkerClients(HashMap<String, WorkerServiceClient<Channel>>);

impl WorkerClients {
    /// The client of `endpoint` (`host:port` or a URL), made on first use.
    fn get(&mut self, endpoint: &str) -> Result<WorkerServiceClient<Channel>, PredictError> {
        if let Some(c) = self.0.get(endpoint) {
            return Ok(c.clone());
        }
        let url = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| PredictError::Failed(format!("bad worker endpoint {endpoint}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let client = WorkerServiceClient::new(channel);
        self.0.insert(endpoint.to_owned(), client.clone());
        Ok(client)
    }
}

/// The output of a worker's answer: its `output` field when it has one.
fn output_of(bytes: &[u8]) -> Result<Value, PredictError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| PredictError::Failed(format!("the replica answered something that is not JSON: {e}")))?;
    Ok(match value {
        Value::Object(mut o) if o.contains_key("output") => o.remove("output").unwrap_or(Value::Null),
        other => other,
    })
}

impl Backend for Arc<ControlPlane> {
    fn version(&self, deployment: &str) -> Option<String> {
        self.state().served.get(deployment).map(|s| s.version.clone())
    }

    async fn predict(&self, deployment: &str, input: Value, hold: Duration) -> Result<Outcome, PredictError> {
        let arrived = Instant::now();
        let result = self.run_prediction(deployment, input, hold).await;
        let outcome = match &result {
            Ok(_) => "succeeded",
            Err(PredictError::Invalid(_)) => "invalid",
            Err(PredictError::SetupFailed { .. }) => "setup_failed",
            Err(PredictError::Overloaded { .. }) => "overloaded",
            Err(PredictError::ColdStartTimeout { .. }) => "cold_start_timeout",
            Err(PredictError::Failed(_)) => "failed",
        };
        self.metrics.request(deployment, outcome, arrived.elapsed().as_secs_f64());
        self.state().count(deployment, |c| {
            c.requests += 1;
            if result.is_err() {
                c.failed_requests += 1;
            }
        });
        result
    }
}

impl ControlPlane {
    async fn run_prediction(
        self: &Arc<Self>,
        deployment: &str,
        input: Value,
        hold: Duration,
    ) -> Result<Outcome, PredictError> {
        let arrived = Instant::now();
        let removed = || PredictError::Failed(format!("deployment {deployment} was removed"));
        let queue = {
            let mut state = self.state();
            let Some(queue) = state.served.get(deployment).map(|s| Arc::clone(&s.hold)) else {
                return Err(removed());
            };
            if !state.core.arrive(deployment, self.now()) {
                return Err(removed());
            }
            queue
        };
        let body = serde_json::json!({ "input": input }).to_string().into_bytes();
        let mut cold = false;
        let mut attempts = 0;
        loop {
            let route = {
                let mut state = self.state();
                let core = &mut state.core;
                let now = self.now();
                let route = core.route(deployment, now);
                if route == Route::Wait {
                    if let Some(f) = core.failing(deployment, now) {
                        let error = PredictError::SetupFailed {
                            deployment: deployment.to_owned(),
                            reason: f.reason.clone(),
                            message: f.message.clone(),
                        };
                        core.abandon(deployment, now);
                        return Err(error);
                    }
                    cold |= core.status(deployment).is_some_and(|s| s.ready == 0);
                    queue.set_state(HoldState::Waiting);
                }
                route
            };
            let (replica, node) = match route {
                Route::Replica { replica, node } => (replica, node),
                Route::Unknown => return Err(removed()),
                Route::Wait => {
                    self.wake.notify_one();
                    let left = hold.saturating_sub(arrived.elapsed());
                    match queue.wait(left).await {
                        Ok(_) => continue,
                        Err(full) => {
                            let now = self.now();
                            self.state().core.abandon(deployment, now);
                            return Err(match full {
                                None => {
                                    PredictError::Overloaded { deployment: deployment.to_owned(), retry_after_s: 1 }
                                }
                                Some(waited) => PredictError::ColdStartTimeout {
                                    deployment: deployment.to_owned(),
                                    waited_s: waited.as_secs(),
                                },
                            });
                        }
                    }
                }
            };
            let queue_time = arrived.elapsed().as_secs_f64();
            let mut client = match self.client(&node) {
                Ok(c) => c,
                Err(e) => {
                    self.finish(deployment, &replica);
                    return Err(e);
                }
            };
            let request = v1::PredictRequest {
                prediction_id: String::new(),
                replica_id: replica.clone(),
                input: body.clone(),
                content_type: "application/json".into(),
                metadata: HashMap::new(),
            };
            let sent = Instant::now();
            let answer = client.predict(request).await;
            // The round trip to the replica: the model's time plus one loopback or LAN hop.
            let predict_time = sent.elapsed().as_secs_f64();
            self.finish(deployment, &replica);
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    return Ok(Outcome {
                        output: output_of(&r.output)?,
                        predict_time,
                        queue_time,
                        cold_start: cold.then_some(queue_time),
                        gpu: self.gpu_use(&replica, &node),
                    });
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(PredictError::Invalid(s.message().to_owned()));
                }
                // The replica is full (a race with another gateway) or unreachable (its agent died, or it is no
                // longer there): an unreachable one is given up and stopped (a no-op if its node is gone), and the
                // request is routed again, to another replica or held for a replacement.
                Err(s)
                    if attempts < 2
                        && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted) =>
                {
                    attempts += 1;
                    tracing::warn!(%replica, %node, error = %s.message(), "replica unreachable; routing again");
                    if s.code() == tonic::Code::Unavailable {
                        let gone = self.state().core.replica_gone(&replica);
                        if let Some(r) = gone {
                            self.execute(Action::Stop {
                                replica: replica.clone(),
                                deployment: r.deployment,
                                node: r.node,
                                reason: StopReason::Unreachable,
                            });
                        }
                    }
                    let now = self.now();
                    self.state().core.arrive(deployment, now);
                    self.wake.notify_one();
                }
                Err(s) => return Err(PredictError::Failed(format!("replica {replica}: {}", s.message()))),
            }
        }
    }

    /// The `WorkerService` client of `node`'s replicas.
    fn client(&self, node: &str) -> Result<WorkerServiceClient<Channel>, PredictError> {
        let endpoint = self
            .registry
            .node(node)
            .map(|n| n.worker_endpoint)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| PredictError::Failed(format!("node {node} has no worker endpoint")))?;
        self.state().clients.get(&endpoint)
    }

    /// The GPU `replica` on `node` holds: its share as its start decided it, the model its node's agent reports.
    /// `None` for a replica this process did not start (adopted from an agent after a restart): its share is not
    /// known here.
    fn gpu_use(&self, replica: &str, node: &str) -> Option<GpuUse> {
        let share_milli = *self.state().shares.get(replica)?;
        let gpu_model = self.registry.node(node)?.gpus.first()?.model.clone();
        Some(GpuUse { gpu_model, share_milli })
    }

    /// Releases a routed request's slot and wakes a held request if one is now free.
    fn finish(&self, deployment: &str, replica: &str) {
        let now = self.now();
        let mut state = self.state();
        state.core.finish(deployment, replica, now);
        let free = state.core.has_free_slot(deployment);
        if let Some(s) = state.served.get(deployment) {
            s.hold.set_ready(free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hold_queue_is_bounded_times_out_and_wakes_everyone_when_ready() {
        let q = Arc::new(HoldQueue::new(2));
        assert!(matches!(q.wait(Duration::from_millis(20)).await, Err(Some(_))), "nothing ready: a timeout");
        let (a, b) = (Arc::clone(&q), Arc::clone(&q));
        let ha = tokio::spawn(async move { a.wait(Duration::from_secs(5)).await });
        let hb = tokio::spawn(async move { b.wait(Duration::from_secs(5)).await });
        while q.len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(q.wait(Duration::from_secs(1)).await, Err(None), "a third is refused");
        q.set_ready(true);
        assert!(ha.await.unwrap().is_ok() && hb.await.unwrap().is_ok());
        assert!(q.is_empty());
        assert_eq!(q.wait(Duration::from_secs(1)).await, Ok(Duration::ZERO));
    }
}
