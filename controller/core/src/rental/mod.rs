//! The lifecycle of a GPU rental as a pure state machine: what phase a `GpuRental` is in, and what the controller
//! must do about it, as a function of its spec, what the controller observes, and the time.
//!
//! Owns [`RentalSpec`] validation ([`validate`], [`validate_calendar`]) with typed errors, the [`Rental`] state
//! ([`RentalState`], which the controller persists in the object's status and restores), and [`Rental::step`],
//! which turns `(now, facts)` into [`RentalEvent`]s: phase changes and effects (fence GPUs, replace unhealthy
//! GPUs, stop the tenant's work, release the GPUs, emit an Event). It also answers what has been billed so far
//! ([`Rental::billed_gpu_hours`]) and which GPU-time was lost ([`Rental::credit_spans`]); turning those into
//! usage records is [`billing::meter::rental_records`](crate::billing::meter::rental_records).
//!
//! What it must not touch: placement (the controller asks the [`placement`](crate::placement) engine for
//! `GpuDemand::Whole(k)` gangs and feeds the result in as [`RentalFacts`]; [`pick_nodes`] is only a helper to
//! split a rental over the fewest nodes), Kubernetes types, I/O or a clock. Time comes in as seconds, like the rest
//! of the core, and is turned into integer milliseconds once, so that billing is exact.
//!
//! # Lifecycle
//! - **Pending** until delivery, with a reason a person can read: waiting for `startTime`, or no node has N free
//!   healthy GPUs of the model (the placement engine's reason when it gives one).
//! - With a future `startTime`, the GPUs are fenced [`RentalConfig::fence_lead_s`] before it (default 10 min):
//!   [`RentalEvent::Fence`] tells the controller to take the GPUs out of the serverless pool and drain the
//!   serverless replicas on them. Until then they stay in the pool. Without a `startTime` the fence is immediate.
//! - **Active** from *delivery*: the first step at or after `startTime` at which all N GPUs are assigned and
//!   healthy. Billing starts at delivery, not at the requested start. The end is `startTime + hours` (or
//!   `endTime`) when a start was requested — a late delivery shortens the rental, as a reservation window does —
//!   and `delivery + hours` when not.
//! - [`RentalEvent::Notice`] `ExpiringSoon` [`RentalConfig::expiry_warning_s`] before the end (default 15 min).
//! - **Expired** at the end: stop the tenant's work (SIGTERM, then kill after [`RentalConfig::stop_grace_s`]) and
//!   release the GPUs. Nothing is billed after the end; the grace is outside paid time and not billed.
//! - **Cancelled** (`spec.cancel` or the object deleted): free before delivery (fenced GPUs cost the tenant nothing;
//!   they go back to the pool); once Active, every started hour up to the cancel is billed.
//! - **Failed** while Pending when the rental can never be placed (unknown model, more GPUs of the model than the
//!   fleet has, or an invalid spec), with the reason.
//! - **Degraded** (a condition of an Active rental, not a phase): fewer healthy GPUs than paid for. The controller
//!   is told to replace them ([`RentalEvent::ReplaceGpus`]); the lost GPU-time, `(paid − healthy) × time` between
//!   the steps that observed it, is kept as [`CreditSpan`]s and credited exactly.

mod pick;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use pick::pick_nodes;

use crate::{
    billing::GpuPrice,
    money::{MS_PER_HOUR, Money, MoneyError, secs_to_ms, started_hours},
};

/// Timing settings of the lifecycle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RentalConfig {
    /// How long before a future `startTime` the GPUs are fenced (drained of serverless work), seconds.
    pub fence_lead_s: f64,
    /// How long before the end the `ExpiringSoon` warning is given, seconds.
    pub expiry_warning_s: f64,
    /// Grace between SIGTERM and kill when the tenant's work is stopped, seconds.
    pub stop_grace_s: f64,
    /// Longest rental allowed, hours.
    pub max_hours: u32,
}

impl Default for RentalConfig {
    fn default() -> Self {
        RentalConfig { fence_lead_s: 600.0, expiry_warning_s: 900.0, stop_grace_s: 30.0, max_hours: 24 * 31 }
    }
}

/// The GPU models of the fleet and how many whole GPUs of each it has (healthy or not): what decides whether a
/// rental can *ever* be placed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fleet {
    gpus_by_model: BTreeMap<String, u32>,
}

impl Fleet {
    /// An empty fleet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `count` GPUs of `model` (call once per node); returns the fleet for chaining.
    pub fn with(mut self, model: impl Into<String>, count: u32) -> Self {
        let total = self.gpus_by_model.entry(model.into()).or_default();
        *total = total.saturating_add(count);
        self
    }

    /// GPUs of `model` in the fleet, `None` when the fleet has no such model.
    pub fn gpus(&self, model: &str) -> Option<u32> {
        self.gpus_by_model.get(model).copied()
    }

    /// The models, in order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.gpus_by_model.keys().map(String::as_str)
    }
}

/// What a tenant asked for: the core's view of a `GpuRental` spec. Times in seconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct RentalSpec {
    /// The tenant.
    pub namespace: String,
    /// The rental's name.
    pub name: String,
    /// GPU model, as the fleet names it.
    pub gpu_model: String,
    /// Whole GPUs rented.
    pub gpu_count: u32,
    /// Requested start; `None`: as soon as the GPUs are free.
    pub start_time: Option<f64>,
    /// Length in hours. Exactly one of `hours` and `end_time` is set.
    pub hours: Option<u32>,
    /// End. Exactly one of `hours` and `end_time` is set.
    pub end_time: Option<f64>,
    /// The tenant asked to cancel.
    pub cancel: bool,
    /// Idle rented GPUs may be lent to serverless work (lending itself is not decided here yet).
    pub lend_when_idle: bool,
}

/// Why a spec is invalid (or can never be served).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RentalSpecError {
    /// Both or neither of `hours` and `endTime`.
    #[error("set exactly one of hours or endTime")]
    LengthNotExactlyOne,
    /// `hours: 0`.
    #[error("hours must be at least 1")]
    ZeroHours,
    /// `count: 0`.
    #[error("a rental needs at least one GPU")]
    ZeroGpus,
    /// A time that is not a finite number.
    #[error("{field} is not a valid time")]
    InvalidTime {
        /// Which field.
        field: &'static str,
    },
    /// `endTime` at or before the start (`startTime`, or the creation time without one).
    #[error("endTime ({end}) must be after the start ({start})")]
    EndBeforeStart {
        /// Start, seconds.
        start: f64,
        /// End, seconds.
        end: f64,
    },
    /// Longer than the operator allows.
    #[error("the rental lasts {hours:.2} hours; at most {max_hours} are allowed")]
    TooLong {
        /// Requested length, hours.
        hours: f64,
        /// Allowed, hours.
        max_hours: u32,
    },
    /// The fleet has no GPU of this model.
    #[error("no GPU of model {model:?} in the fleet (models: {known})")]
    UnknownModel {
        /// The model asked for.
        model: String,
        /// The fleet's models, comma-separated.
        known: String,
    },
    /// More GPUs than the fleet has of the model: it can never be placed.
    #[error("{requested} GPUs of {model:?} requested; the whole fleet has {fleet}")]
    MoreGpusThanFleet {
        /// The model.
        model: String,
        /// GPUs asked for.
        requested: u32,
        /// GPUs of the model in the fleet.
        fleet: u32,
    },
    /// Two rentals of the same namespace and name whose times overlap.
    #[error("rental {namespace}/{name} overlaps another rental of the same name")]
    Overlap {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// When a valid rental runs, in milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Requested start; `None`: on delivery.
    pub start_ms: Option<i64>,
    /// The end.
    pub end: End,
}

/// How a rental's end is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// At a fixed time, ms.
    At(i64),
    /// This many ms after delivery (no `startTime`, `hours` given).
    AfterDelivery(i64),
}

impl Window {
    /// The earliest span the rental may occupy, `[from, to)` ms, for overlap checks: an unset start counts from
    /// `created_ms`.
    pub fn span(&self, created_ms: i64) -> (i64, i64) {
        let from = self.start_ms.unwrap_or(created_ms);
        match self.end {
            End::At(end) => (from, end),
            End::AfterDelivery(len) => (from, from.saturating_add(len)),
        }
    }
}

/// Validates `spec`, created at `created_at` (seconds), against the settings and the fleet: the length is exactly
/// one of hours/endTime, the end is after the start, no longer than allowed, at least one GPU, a model the fleet
/// has, no more GPUs than the fleet has of it.
pub fn validate(
    spec: &RentalSpec,
    created_at: f64,
    config: &RentalConfig,
    fleet: &Fleet,
) -> Result<Window, RentalSpecError> {
    let time = |field: &'static str, t: f64| {
        if t.is_finite() { Ok(secs_to_ms(t)) } else { Err(RentalSpecError::InvalidTime { field }) }
    };
    let created_ms = time("creation time", created_at)?;
    let start_ms = spec.start_time.map(|t| time("startTime", t)).transpose()?;
    if spec.gpu_count == 0 {
        return Err(RentalSpecError::ZeroGpus);
    }
    let max_ms = i64::from(config.max_hours) * MS_PER_HOUR;
    let too_long =
        |ms: i64| RentalSpecError::TooLong { hours: ms as f64 / MS_PER_HOUR as f64, max_hours: config.max_hours };
    let end = match (spec.hours, spec.end_time) {
        (Some(_), Some(_)) | (None, None) => return Err(RentalSpecError::LengthNotExactlyOne),
        (Some(0), None) => return Err(RentalSpecError::ZeroHours),
        (Some(h), None) => {
            let len = i64::from(h) * MS_PER_HOUR;
            if len > max_ms {
                return Err(too_long(len));
            }
            match start_ms {
                Some(s) => End::At(s + len),
                None => End::AfterDelivery(len),
            }
        }
        (None, Some(e)) => {
            let end_ms = time("endTime", e)?;
            let from = start_ms.unwrap_or(created_ms);
            if end_ms <= from {
                return Err(RentalSpecError::EndBeforeStart { start: from as f64 / 1000.0, end: e });
            }
            if end_ms - from > max_ms {
                return Err(too_long(end_ms - from));
            }
            End::At(end_ms)
        }
    };
    match fleet.gpus(&spec.gpu_model) {
        None => {
            return Err(RentalSpecError::UnknownModel {
                model: spec.gpu_model.clone(),
                known: fleet.models().collect::<Vec<_>>().join(", "),
            });
        }
        Some(have) if have < spec.gpu_count => {
            return Err(RentalSpecError::MoreGpusThanFleet {
                model: spec.gpu_model.clone(),
                requested: spec.gpu_count,
                fleet: have,
            });
        }
        Some(_) => {}
    }
    Ok(Window { start_ms, end })
}

/// Validates a set of rentals together (a calendar, or a manifest directory): each with [`validate`], and no two
/// of the same namespace and name whose spans overlap. The first error is returned and nothing is accepted.
/// `specs` are `(spec, created_at)` pairs.
pub fn validate_calendar(
    specs: &[(RentalSpec, f64)],
    config: &RentalConfig,
    fleet: &Fleet,
) -> Result<Vec<Window>, RentalSpecError> {
    let mut windows = Vec::with_capacity(specs.len());
    let mut by_name: BTreeMap<(&str, &str), Vec<(i64, i64)>> = BTreeMap::new();
    for (spec, created_at) in specs {
        let w = validate(spec, *created_at, config, fleet)?;
        let (from, to) = w.span(secs_to_ms(*created_at));
        let spans = by_name.entry((&spec.namespace, &spec.name)).or_default();
        if spans.iter().any(|&(f, t)| from < t && f < to) {
            return Err(RentalSpecError::Overlap { namespace: spec.namespace.clone(), name: spec.name.clone() });
        }
        spans.push((from, to));
        windows.push(w);
    }
    Ok(windows)
}

/// Phase of a rental.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RentalPhase {
    /// Not delivered yet.
    Pending,
    /// Delivered; billing runs.
    Active,
    /// Ended at its end time.
    Expired,
    /// Cancelled by the tenant.
    Cancelled,
    /// Can never be served.
    Failed,
}

impl RentalPhase {
    /// True for phases a rental never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, RentalPhase::Expired | RentalPhase::Cancelled | RentalPhase::Failed)
    }
}

/// What the controller observes about a rental at a step.
#[derive(Clone, Copy, Debug)]
pub struct RentalFacts<'a> {
    /// The fleet's GPU models and counts: every registered node (`GpuNode`), down or not, not only the agents
    /// connected right now — a Pending rental whose model is missing or too scarce here is Failed, so an empty fleet
    /// at controller start-up must not be passed in.
    pub fleet: &'a Fleet,
    /// GPUs the placement engine holds for this rental (0 before a fence).
    pub assigned: u32,
    /// Of those, how many are healthy (on a ready node, no Xid).
    pub healthy: u32,
    /// Why the placement engine could not (yet) assign all of them, when it said.
    pub unplaced_reason: Option<&'a str>,
    /// The object was deleted.
    pub deleted: bool,
}

/// A span of paid-for GPU-time not delivered: `lost_gpus` GPUs unhealthy over `[from_ms, to_ms)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditSpan {
    /// Start, ms.
    pub from_ms: i64,
    /// End, ms.
    pub to_ms: i64,
    /// Paid GPUs that were not healthy.
    pub lost_gpus: u32,
}

impl CreditSpan {
    /// Lost GPU-milliseconds.
    pub fn gpu_ms(&self) -> i64 {
        i64::from(self.lost_gpus) * (self.to_ms - self.from_ms)
    }
}

/// A rental's mutable state: what the controller persists in status and restores after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RentalState {
    /// Current phase.
    pub phase: RentalPhase,
    /// Why it is in that phase, for a person.
    pub reason: String,
    /// GPUs have been fenced (a [`RentalEvent::Fence`] was issued and not released).
    pub fenced: bool,
    /// When the GPUs were delivered, ms.
    pub delivered_ms: Option<i64>,
    /// The end, ms, once known.
    pub end_ms: Option<i64>,
    /// When billing stopped (end or cancel), ms.
    pub billed_until_ms: Option<i64>,
    /// The `ExpiringSoon` warning was given.
    pub warned: bool,
    /// The degradation in progress: since when, how many GPUs lost.
    pub degraded: Option<(i64, u32)>,
    /// Finished spans of lost GPU-time, in order.
    pub credit_spans: Vec<CreditSpan>,
}

/// What a step decides: a phase change or an effect for the controller to carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum RentalEvent {
    /// The phase changed.
    PhaseChanged {
        /// Before.
        from: RentalPhase,
        /// After.
        to: RentalPhase,
        /// Why, for a person.
        reason: String,
    },
    /// Take `count` whole GPUs of `model` out of the serverless pool for this rental (one node when they fit,
    /// else the fewest nodes) and drain the serverless replicas on them (stopped with their grace, placed
    /// elsewhere or scaled to zero). Issued once, a fence lead time before a future start or at once.
    Fence {
        /// GPU model.
        model: String,
        /// GPUs.
        count: u32,
    },
    /// `count` assigned GPUs are unhealthy: replace them from the pool when possible.
    ReplaceGpus {
        /// GPUs to replace.
        count: u32,
    },
    /// Stop the tenant's work on the rental's GPUs: SIGTERM, then kill after `grace_s`.
    StopWork {
        /// Seconds between SIGTERM and kill.
        grace_s: f64,
    },
    /// Return the rental's GPUs (or fence) to the serverless pool.
    Release,
    /// Emit a Kubernetes Event (or a log line in manifest mode).
    Notice {
        /// Warning (true) or Normal.
        warning: bool,
        /// Machine-readable reason: `Fenced`, `Delivered`, `ExpiringSoon`, `Expired`, `Cancelled`, `Failed`,
        /// `Degraded`, `Recovered`.
        reason: &'static str,
        /// For a person.
        message: String,
    },
}

/// A rental: its spec, when it was created, and its state.
#[derive(Clone, Debug, PartialEq)]
pub struct Rental {
    /// What the tenant asked for (`cancel` may be set later).
    pub spec: RentalSpec,
    /// Creation time, ms.
    pub created_ms: i64,
    /// Lifecycle settings.
    pub config: RentalConfig,
    /// The state.
    pub state: RentalState,
}

impl Rental {
    /// A new, Pending rental created at `created_at` (seconds).
    pub fn new(spec: RentalSpec, created_at: f64, config: RentalConfig) -> Self {
        Rental {
            spec,
            created_ms: secs_to_ms(created_at),
            config,
            state: RentalState {
                phase: RentalPhase::Pending,
                reason: "not yet reconciled".to_string(),
                fenced: false,
                delivered_ms: None,
                end_ms: None,
                billed_until_ms: None,
                warned: false,
                degraded: None,
                credit_spans: Vec::new(),
            },
        }
    }

    /// Current phase.
    pub fn phase(&self) -> RentalPhase {
        self.state.phase
    }

    /// True while Active with fewer healthy GPUs than paid for.
    pub fn is_degraded(&self) -> bool {
        self.state.phase == RentalPhase::Active && self.state.degraded.is_some()
    }

    /// True once the `ExpiringSoon` warning was given and the rental is still Active.
    pub fn is_expiring_soon(&self) -> bool {
        self.state.phase == RentalPhase::Active && self.state.warned
    }

    /// Advances the lifecycle to `now` (seconds) given what the controller observes; returns what changed and what
    /// to do, in order. Idempotent: a second step at the same time with the same facts returns nothing.
    pub fn step(&mut self, now: f64, facts: &RentalFacts<'_>) -> Vec<RentalEvent> {
        let now_ms = secs_to_ms(now);
        let mut out = Vec::new();
        if self.state.phase == RentalPhase::Pending {
            self.step_pending(now_ms, facts, &mut out);
        }
        if self.state.phase == RentalPhase::Active {
            self.step_active(now_ms, facts, &mut out);
        }
        out
    }

    fn step_pending(&mut self, now_ms: i64, facts: &RentalFacts<'_>, out: &mut Vec<RentalEvent>) {
        let count = self.spec.gpu_count;
        let model = self.spec.gpu_model.clone();
        // A cancel wins over everything else before delivery, an invalid spec included: nothing is billed.
        if self.spec.cancel || facts.deleted {
            self.finish(RentalPhase::Cancelled, "cancelled before delivery; nothing billed".into(), "Cancelled", out);
            return;
        }
        let window = match validate(&self.spec, self.created_ms as f64 / 1000.0, &self.config, facts.fleet) {
            Ok(w) => w,
            Err(e) => {
                let reason = format!("can never be placed: {e}");
                self.finish(RentalPhase::Failed, reason, "Failed", out);
                return;
            }
        };
        if let End::At(end) = window.end {
            self.state.end_ms = Some(end);
        }
        if let Some(end) = self.state.end_ms
            && now_ms >= end
        {
            let reason = "ended before the GPUs could be delivered; nothing billed".to_string();
            self.finish(RentalPhase::Expired, reason, "Expired", out);
            return;
        }
        let start_ms = window.start_ms.unwrap_or(i64::MIN);
        let fence_ms = start_ms.saturating_sub(secs_to_ms(self.config.fence_lead_s));
        if now_ms < fence_ms {
            self.state.reason = format!(
                "waiting for startTime (in {}); GPUs are fenced {} before it",
                human(start_ms - now_ms),
                human(secs_to_ms(self.config.fence_lead_s))
            );
            return;
        }
        if !self.state.fenced {
            self.state.fenced = true;
            out.push(RentalEvent::Fence { model: model.clone(), count });
            out.push(notice(false, "Fenced", format!("taking {count} GPUs of {model} from the serverless pool")));
        }
        let all_ready = facts.assigned >= count && facts.healthy >= count;
        if now_ms < start_ms {
            self.state.reason = if all_ready {
                format!("GPUs fenced; waiting for startTime (in {})", human(start_ms - now_ms))
            } else {
                self.unplaced(facts)
            };
            return;
        }
        if !all_ready {
            self.state.reason = self.unplaced(facts);
            return;
        }
        let end = match window.end {
            End::At(end) => end,
            End::AfterDelivery(len) => now_ms + len,
        };
        self.state.delivered_ms = Some(now_ms);
        self.state.end_ms = Some(end);
        self.set_phase(RentalPhase::Active, format!("{count} GPUs of {model} delivered; billing started"), out);
        out.push(notice(
            false,
            "Delivered",
            format!("{count} GPUs of {model} delivered, until {}", end as f64 / 1000.0),
        ));
    }

    fn unplaced(&self, facts: &RentalFacts<'_>) -> String {
        let (count, model) = (self.spec.gpu_count, &self.spec.gpu_model);
        if facts.assigned >= count {
            format!("{} of {count} assigned GPUs healthy; waiting for the rest", facts.healthy.min(count))
        } else if let Some(why) = facts.unplaced_reason {
            format!("no node has {count} free healthy GPUs of {model}: {why}")
        } else {
            format!("no node has {count} free healthy GPUs of {model}")
        }
    }

    fn step_active(&mut self, now_ms: i64, facts: &RentalFacts<'_>, out: &mut Vec<RentalEvent>) {
        let count = self.spec.gpu_count;
        let end = self.state.end_ms.unwrap_or(i64::MAX);
        let t = now_ms.min(end);
        let lost = count - facts.healthy.min(count);
        let cancelled = self.spec.cancel || facts.deleted;
        let ending = cancelled || now_ms >= end;
        // Close the degradation span in progress when the loss changes or the rental ends; open a new one.
        if let Some((since, was_lost)) = self.state.degraded
            && (was_lost != lost || ending)
        {
            if t > since {
                self.state.credit_spans.push(CreditSpan { from_ms: since, to_ms: t, lost_gpus: was_lost });
            }
            self.state.degraded = None;
            if lost == 0 && !ending {
                out.push(notice(false, "Recovered", format!("all {count} GPUs healthy again")));
            }
        }
        if ending {
            let billed_until = if cancelled { t } else { end };
            self.state.billed_until_ms = Some(billed_until);
            let hours = self.billed_gpu_hours(now_ms as f64 / 1000.0);
            let (phase, reason, tag) = if cancelled && now_ms < end {
                (
                    RentalPhase::Cancelled,
                    format!("cancelled; {hours} GPU-hours billed (every started hour)"),
                    "Cancelled",
                )
            } else {
                (RentalPhase::Expired, format!("ended; {hours} GPU-hours billed"), "Expired")
            };
            out.push(RentalEvent::StopWork { grace_s: self.config.stop_grace_s });
            self.finish(phase, reason, tag, out);
            return;
        }
        if lost > 0 && self.state.degraded.is_none() {
            self.state.degraded = Some((t, lost));
            out.push(RentalEvent::ReplaceGpus { count: lost });
            out.push(notice(
                true,
                "Degraded",
                format!("{} of {count} paid GPUs healthy; lost GPU-time is credited", count - lost),
            ));
        }
        if !self.state.warned && now_ms >= end.saturating_sub(secs_to_ms(self.config.expiry_warning_s)) {
            self.state.warned = true;
            out.push(notice(
                false,
                "ExpiringSoon",
                format!("the rental ends in {}; work is stopped then", human(end - now_ms)),
            ));
        }
    }

    fn set_phase(&mut self, to: RentalPhase, reason: String, out: &mut Vec<RentalEvent>) {
        let from = self.state.phase;
        self.state.phase = to;
        self.state.reason = reason.clone();
        out.push(RentalEvent::PhaseChanged { from, to, reason });
    }

    fn finish(&mut self, to: RentalPhase, reason: String, tag: &'static str, out: &mut Vec<RentalEvent>) {
        if self.state.fenced {
            self.state.fenced = false;
            out.push(RentalEvent::Release);
        }
        self.set_phase(to, reason.clone(), out);
        out.push(notice(to == RentalPhase::Failed, tag, reason));
    }

    /// Milliseconds of delivered time billed by `now` (seconds): from delivery to the end, the cancel or `now`,
    /// whichever is first.
    pub fn billed_ms(&self, now: f64) -> i64 {
        let Some(delivered) = self.state.delivered_ms else { return 0 };
        let until =
            self.state.billed_until_ms.unwrap_or_else(|| secs_to_ms(now).min(self.state.end_ms.unwrap_or(i64::MAX)));
        (until - delivered).max(0)
    }

    /// Started hours billed by `now` (seconds): ⌈billed time ÷ 1 h⌉.
    pub fn billed_hours(&self, now: f64) -> i64 {
        started_hours(self.billed_ms(now))
    }

    /// GPU-hours billed by `now` (seconds): GPUs × started hours.
    pub fn billed_gpu_hours(&self, now: f64) -> i64 {
        i64::from(self.spec.gpu_count) * self.billed_hours(now)
    }

    /// Amount billed by `now` (seconds): GPU-hours × the rental price per GPU-hour. Credits are separate
    /// ([`Rental::credited`]).
    pub fn billed_amount(&self, now: f64, price: &GpuPrice) -> Result<Money, MoneyError> {
        price.rental_per_gpu_hour.checked_mul(i128::from(self.billed_gpu_hours(now)))
    }

    /// Credit for the finished spans of lost GPU-time (≤ 0): the sum, span by span, of lost GPU-milliseconds × the
    /// price per GPU-hour ÷ 3 600 000, each rounded half-up — the same amounts as the credit records.
    pub fn credited(&self, price: &GpuPrice) -> Result<Money, MoneyError> {
        let mut total = Money::ZERO;
        for span in &self.state.credit_spans {
            let credit = price.rental_per_gpu_hour.mul_div(i128::from(span.gpu_ms()), i128::from(MS_PER_HOUR))?;
            total = total.checked_sub(credit)?;
        }
        Ok(total)
    }

    /// Finished spans of lost GPU-time (the one in progress is added when it ends).
    pub fn credit_spans(&self) -> &[CreditSpan] {
        &self.state.credit_spans
    }

    /// Lost GPU-milliseconds in finished spans.
    pub fn lost_gpu_ms(&self) -> i64 {
        self.state.credit_spans.iter().map(CreditSpan::gpu_ms).sum()
    }
}

fn notice(warning: bool, reason: &'static str, message: String) -> RentalEvent {
    RentalEvent::Notice { warning, reason, message }
}

/// A duration in ms for a person: `1h 20m`, `45m`, `30s`.
fn human(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{sec}s"),
        (0, _) => format!("{m}m"),
        _ => format!("{h}h {m}m"),
    }
}
