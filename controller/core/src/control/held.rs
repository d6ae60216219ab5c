//! What the meter needs from the control loop: closed spans of GPU holding per replica and phase.
//!
//! Every replica that holds GPU is, at any moment, in one metered phase: loading (started, not ready), busy (at
//! least one request in flight) or idle-warm (ready, no request). The control loop sees every change of phase — a
//! start, ready, the first request routed, the last one finished, a stop — so it closes a span at each change, and
//! [`Control::take_held`] closes the spans still open at the caller's tick and hands over everything closed since the
//! last call. Spans of one replica are contiguous and never overlap, so GPU-time is counted once, whatever the tick.
//! Turning spans into usage records and amounts is the billing core's job
//! ([`Meter`](crate::billing::Meter)); this module only measures.

use super::{Control, NodeId, ServerlessPhase};

/// A replica held `share_milli` milli-GPU in `phase` over `[from, to)` (seconds on the control loop's clock).
#[derive(Debug, Clone, PartialEq)]
pub struct HeldSpan {
    /// Replica id.
    pub replica: String,
    /// Deployment key (`namespace/name`).
    pub deployment: String,
    /// Node name.
    pub node: String,
    /// The node's GPU model.
    pub gpu_model: String,
    /// GPU held: milli-GPU on one GPU for a share, 1000 × k for k whole GPUs.
    pub share_milli: u32,
    /// What the replica was doing.
    pub phase: ServerlessPhase,
    /// Start, seconds.
    pub from: f64,
    /// End, seconds.
    pub to: f64,
    /// The rental (`namespace/name`) the replica's deployment is pinned to: paid by the hour, not per second.
    pub rental: Option<String>,
    /// The rental whose idle GPU this replica borrowed (lent to the serverless pool): its owner is credited.
    pub lent_from: Option<String>,
}

impl Control {
    /// Turns metering on or off (off by default): with it on, closed spans are kept until [`Control::take_held`]
    /// takes them, so a caller that turns it on must take them regularly.
    pub fn set_metering(&mut self, on: bool) {
        self.metering = on;
        if !on {
            self.spans.clear();
        }
    }

    /// Closes the replica's open span at `now` and opens one in `phase` (a no-op when the phase is the same).
    pub(super) fn hold(&mut self, replica: &str, now: f64, phase: ServerlessPhase) {
        if self.replicas.get(replica).is_some_and(|r| r.held != phase) {
            self.close_span(replica, now);
            if let Some(r) = self.replicas.get_mut(replica) {
                r.held = phase;
            }
        }
    }

    /// Closes the replica's open span at `now` (a span of zero length is dropped) and opens the next one there.
    pub(super) fn close_span(&mut self, replica: &str, now: f64) {
        let Some(r) = self.replicas.get(replica) else { return };
        let to = now.max(r.held_since);
        let share_milli = u32::from(r.placement.milli_per_gpu) * r.placement.gpus.count_ones();
        if self.metering && to > r.held_since && share_milli > 0 {
            let lent_from = self.lender(r.node_id, r.placement.gpus, r.rental.as_deref());
            let gpu_model = self.node_model(r.node_id).to_owned();
            self.spans.push(HeldSpan {
                replica: replica.to_owned(),
                deployment: r.deployment.clone(),
                node: r.node.clone(),
                gpu_model,
                share_milli,
                phase: r.held,
                from: r.held_since,
                to,
                rental: r.rental.clone(),
                lent_from,
            });
        }
        if let Some(r) = self.replicas.get_mut(replica) {
            r.held_since = to;
        }
    }

    /// The rental lending the GPUs (in `gpus`, a bitmask on `node`) a replica not pinned to it runs on.
    fn lender(&self, node: NodeId, gpus: u16, pinned: Option<&str>) -> Option<String> {
        (0..16u32)
            .filter(|g| gpus & (1 << g) != 0)
            .filter_map(|g| self.held_by.get(&(node, g)))
            .find(|k| Some(k.as_str()) != pinned && self.rentals.get(*k).is_some_and(|s| s.lent))
            .cloned()
    }

    /// Closes, at the loop's clock, the open spans of replicas on any of `gpus`: before the GPUs change hands, so
    /// that what was lent (or not) is metered as it was.
    pub(super) fn close_spans_on(&mut self, gpus: &[(NodeId, u32)]) {
        let now = self.clock;
        let on: Vec<String> = self
            .replicas
            .iter()
            .filter(|(_, r)| gpus.iter().any(|&(n, g)| r.node_id == n && r.placement.gpus & (1 << g) != 0))
            .map(|(id, _)| id.clone())
            .collect();
        for id in on {
            self.close_span(&id, now);
        }
    }

    /// Every span of GPU holding closed since the last call, after closing the open ones at `now` (they go on from
    /// `now`). The meter turns them into usage records.
    pub fn take_held(&mut self, now: f64) -> Vec<HeldSpan> {
        self.tick(now);
        let ids: Vec<String> = self.replicas.keys().cloned().collect();
        for id in ids {
            self.close_span(&id, now);
        }
        std::mem::take(&mut self.spans)
    }
}
