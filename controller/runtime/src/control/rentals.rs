//! Rentals at run time: the spec source's `GpuRental`s into the core, and what their status shows out.
//!
//! The lifecycle and what it does to the fleet are the core's ([`kiln_core::rental`],
//! [`kiln_core::control::Control::step_rentals`]); the control loop steps rentals at every pass, before it
//! reconciles, and carries out the stops they decide like any other (a reclaimed borrower gets
//! [`ControlConfig::reclaim_notice`](super::ControlConfig::reclaim_notice) as its grace, and a GPU handed to a rental
//! keeps no idle copy of the weights). This module owns:
//! - [`ServedRental`]: a rental as the spec source gives it (the manifest directory, or the Kubernetes reconciler),
//!   with the lifecycle state its status recorded, so that a restarted controller resumes it instead of delivering
//!   (and billing) it again;
//! - [`RentalStatusView`]: what the status shows, with the GPUs' UUIDs from the registry;
//! - the lifecycle's serialized form in status ([`lifecycle_to_json`], [`lifecycle_from_json`]);
//! - the events the lifecycle emitted, kept (bounded) until a status writer takes them.

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_core::{
    control::RestoredRental,
    rental::{CreditSpan, Rental, RentalEvent, RentalPhase, RentalSpec, RentalState},
};
use serde::{Deserialize, Serialize};

use super::{ControlPlane, State};

/// Rental events kept for status writers; older ones are dropped (they were logged).
const MAX_RENTAL_EVENTS: usize = 1024;

/// Seconds since the Unix epoch, now.
pub(crate) fn wall_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A rental as the spec source gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedRental {
    /// `namespace/name`.
    pub key: String,
    /// The core's view of the spec.
    pub spec: RentalSpec,
    /// When the object was created, seconds since the Unix epoch.
    pub created_at: f64,
    /// What its status recorded (after a controller restart), if anything.
    pub restored: Option<RestoredRental>,
}

/// One GPU held by a rental, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssignedGpuView {
    /// Node name.
    pub node: String,
    /// NVML index.
    pub index: u32,
    /// NVML UUID (empty when the node's agent is not connected).
    pub uuid: String,
}

/// What a rental's status shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RentalStatusView {
    /// `namespace/name`.
    pub key: String,
    /// Phase.
    #[serde(serialize_with = "serialize_phase")]
    pub phase: RentalPhase,
    /// Why it is in that phase.
    pub message: String,
    /// GPU model.
    pub gpu_model: String,
    /// GPUs rented.
    pub count: u32,
    /// GPUs held now.
    pub gpus: Vec<AssignedGpuView>,
    /// Delivery (billing start), seconds since the Unix epoch.
    pub delivered_at: Option<f64>,
    /// The end, seconds since the Unix epoch, once known.
    pub end_at: Option<f64>,
    /// GPU-hours billed so far (GPUs × started hours).
    pub billed_gpu_hours: i64,
    /// Fewer healthy GPUs than paid for.
    pub degraded: bool,
    /// The end is near (the warning was given).
    pub expiring_soon: bool,
    /// Lent to serverless work now.
    pub lent: bool,
    /// GPU-seconds lost (credited), in finished spans.
    pub lost_gpu_seconds: i64,
    /// The lifecycle state, serialized for status ([`lifecycle_from_json`] reads it back).
    #[serde(skip)]
    pub lifecycle: String,
}

/// The lifecycle state as status keeps it: the core's [`RentalState`], field for field.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Lifecycle {
    phase: String,
    reason: String,
    fenced: bool,
    delivered_ms: Option<i64>,
    end_ms: Option<i64>,
    billed_until_ms: Option<i64>,
    warned: bool,
    degraded: Option<(i64, u32)>,
    credit_spans: Vec<(i64, i64, u32)>,
}

fn serialize_phase<S: serde::Serializer>(p: &RentalPhase, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(phase_name(*p))
}

/// The phase as the API names it.
pub fn phase_name(p: RentalPhase) -> &'static str {
    match p {
        RentalPhase::Pending => "Pending",
        RentalPhase::Active => "Active",
        RentalPhase::Expired => "Expired",
        RentalPhase::Cancelled => "Cancelled",
        RentalPhase::Failed => "Failed",
    }
}

/// The lifecycle state as a JSON string for status.
pub fn lifecycle_to_json(s: &RentalState) -> String {
    let l = Lifecycle {
        phase: phase_name(s.phase).to_owned(),
        reason: s.reason.clone(),
        fenced: s.fenced,
        delivered_ms: s.delivered_ms,
        end_ms: s.end_ms,
        billed_until_ms: s.billed_until_ms,
        warned: s.warned,
        degraded: s.degraded,
        credit_spans: s.credit_spans.iter().map(|c| (c.from_ms, c.to_ms, c.lost_gpus)).collect(),
    };
    serde_json::to_string(&l).unwrap_or_default()
}

/// Reads back what [`lifecycle_to_json`] wrote; an error says what is wrong (the rental then starts afresh).
pub fn lifecycle_from_json(text: &str) -> Result<RentalState, String> {
    let l: Lifecycle = serde_json::from_str(text).map_err(|e| format!("unreadable rental lifecycle: {e}"))?;
    let phase = match l.phase.as_str() {
        "Pending" => RentalPhase::Pending,
        "Active" => RentalPhase::Active,
        "Expired" => RentalPhase::Expired,
        "Cancelled" => RentalPhase::Cancelled,
        "Failed" => RentalPhase::Failed,
        other => return Err(format!("unknown rental phase {other:?}")),
    };
    Ok(RentalState {
        phase,
        reason: l.reason,
        fenced: l.fenced,
        delivered_ms: l.delivered_ms,
        end_ms: l.end_ms,
        billed_until_ms: l.billed_until_ms,
        warned: l.warned,
        degraded: l.degraded,
        credit_spans: l
            .credit_spans
            .into_iter()
            .map(|(from_ms, to_ms, lost_gpus)| CreditSpan { from_ms, to_ms, lost_gpus })
            .collect(),
    })
}

impl State {
    /// The rentals whose bill changed since the last call (started hours, credits, phase), those forgotten at this
    /// step, and forgotten ones whose last bill failed before: what to append to the ledger.
    pub(super) fn rentals_to_bill(&mut self, wall: f64, forgotten: Vec<(String, Rental)>) -> Vec<Rental> {
        let mut out = Vec::new();
        let keys: Vec<String> = self.core.rental_keys().map(str::to_owned).collect();
        for key in keys {
            let Some(v) = self.core.rental(&key) else { continue };
            let r = v.rental;
            let mark = (r.billed_gpu_hours(wall), r.credit_spans().len(), r.phase());
            if self.rental_billed.get(&key) != Some(&mark) {
                self.rental_billed.insert(key, mark);
                out.push(r.clone());
            }
        }
        for (key, r) in forgotten {
            self.rental_billed.remove(&key);
            out.push(r);
        }
        out.append(&mut self.rental_unbilled);
        out
    }

    /// Logs the lifecycle's events and keeps them for the status writers.
    pub(super) fn record_rental_events(&mut self, events: Vec<(String, RentalEvent)>) {
        for (key, event) in events {
            match &event {
                RentalEvent::Notice { warning: true, reason, message } => {
                    tracing::warn!(rental = %key, %reason, %message, "rental");
                }
                RentalEvent::Notice { reason, message, .. } => {
                    tracing::info!(rental = %key, %reason, %message, "rental")
                }
                RentalEvent::PhaseChanged { from, to, reason } => {
                    tracing::info!(rental = %key, ?from, ?to, %reason, "rental phase");
                }
                _ => tracing::debug!(rental = %key, ?event, "rental"),
            }
            self.rental_events.push((key, event));
        }
        if self.rental_events.len() > MAX_RENTAL_EVENTS {
            let excess = self.rental_events.len() - MAX_RENTAL_EVENTS;
            self.rental_events.drain(..excess);
        }
    }
}

impl ControlPlane {
    /// Takes the whole set of rentals of a spec source: each is added or updated; every other rental is removed
    /// (a deleted object: a cancel).
    pub fn apply_rentals(&self, rentals: Vec<ServedRental>) {
        let keys: Vec<String> = rentals.iter().map(|r| r.key.clone()).collect();
        for r in rentals {
            self.upsert_rental(r);
        }
        let gone: Vec<String> =
            self.state().core.rental_keys().filter(|k| !keys.iter().any(|x| x == k)).map(str::to_owned).collect();
        for key in gone {
            self.remove_rental(&key);
        }
    }

    /// Adds or updates one rental.
    pub fn upsert_rental(&self, r: ServedRental) {
        self.state().core.upsert_rental(&r.key, r.spec, r.created_at, r.restored);
        self.wake.notify_one();
    }

    /// The rental's object is gone: a cancel (its GPUs return to the pool).
    pub fn remove_rental(&self, key: &str) {
        self.state().core.remove_rental(key);
        self.wake.notify_one();
    }

    /// What a rental's status shows now, `None` if it is not known (or was forgotten after a cancel).
    pub fn rental_view(&self, key: &str) -> Option<RentalStatusView> {
        let view = {
            let state = self.state();
            let v = state.core.rental(key)?;
            let r = v.rental;
            // The loop's own wall clock, as the rentals were stepped with.
            let now = self.epoch(self.now());
            RentalStatusView {
                key: key.to_owned(),
                phase: r.phase(),
                message: r.state.reason.clone(),
                gpu_model: r.spec.gpu_model.clone(),
                count: r.spec.gpu_count,
                gpus: v
                    .gpus
                    .iter()
                    .map(|(node, index)| AssignedGpuView { node: node.clone(), index: *index, uuid: String::new() })
                    .collect(),
                delivered_at: r.state.delivered_ms.map(|ms| ms as f64 / 1000.0),
                end_at: r.state.end_ms.map(|ms| ms as f64 / 1000.0),
                billed_gpu_hours: r.billed_gpu_hours(now),
                degraded: r.is_degraded(),
                expiring_soon: r.is_expiring_soon(),
                lent: v.lent,
                lost_gpu_seconds: r.lost_gpu_ms() / 1000,
                lifecycle: lifecycle_to_json(&r.state),
            }
        };
        // UUIDs from the registry, with the state lock released.
        let mut view = view;
        for g in &mut view.gpus {
            if let Some(n) = self.registry.node(&g.node)
                && let Some(x) = n.gpus.iter().find(|x| x.index == g.index)
            {
                g.uuid.clone_from(&x.uuid);
            }
        }
        Some(view)
    }

    /// Every rental's status view, in key order.
    pub fn rental_views(&self) -> Vec<RentalStatusView> {
        let keys: Vec<String> = self.state().core.rental_keys().map(str::to_owned).collect();
        keys.iter().filter_map(|k| self.rental_view(k)).collect()
    }

    /// The lifecycle events of rental `key` emitted since the last call, in order.
    pub fn take_rental_events(&self, key: &str) -> Vec<RentalEvent> {
        let mut state = self.state();
        let (mine, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut state.rental_events).into_iter().partition(|(k, _)| k == key);
        state.rental_events = rest;
        mine.into_iter().map(|(_, e)| e).collect()
    }

    /// The price of a GPU model, when billing is on and prices name it.
    pub fn gpu_price(&self, model: &str) -> Option<kiln_core::billing::GpuPrice> {
        self.billing.get()?.prices().get(model).ok().cloned()
    }

    /// The currency of the configured prices (`USD` when none are).
    pub fn currency(&self) -> String {
        self.billing.get().map_or_else(|| "USD".to_owned(), |b| b.prices().currency.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifecycle_reads_back_as_it_was_written_and_garbage_is_refused() {
        let state = RentalState {
            phase: RentalPhase::Active,
            reason: "2 GPUs delivered".into(),
            fenced: true,
            delivered_ms: Some(1_795_680_000_000),
            end_ms: Some(1_795_683_600_000),
            billed_until_ms: None,
            warned: false,
            degraded: Some((1_795_680_100_000, 1)),
            credit_spans: vec![CreditSpan { from_ms: 1, to_ms: 5, lost_gpus: 2 }],
        };
        assert_eq!(lifecycle_from_json(&lifecycle_to_json(&state)), Ok(state));
        assert!(lifecycle_from_json("{}").is_err());
        assert!(lifecycle_from_json(r#"{"phase":"Dormant"}"#).unwrap_err().contains("unreadable"));
    }
}
