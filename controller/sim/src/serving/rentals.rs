//! Rentals in the serving simulator: a calendar of `GpuRental`s replayed beside the trace through the core's own
//! rental and billing code, as the controller runtime drives them.
//!
//! Owns [`RentalPlan`] (the calendar, checked as a whole before a run: nothing half-applied), the run's rental and
//! billing state, and [`RentalOutcome`] (revenue, utilisation, and the serverless work rentals cost). It decides
//! nothing: fences, lending, reclaims and stops are [`Control`](kiln_core::control::Control)'s
//! ([`Control::step_rentals`](kiln_core::control::Control::step_rentals)), the lifecycle is
//! [`kiln_core::rental`]'s, amounts are [`kiln_core::billing`]'s.
//!
//! # How a run drives them
//! - Each rental is [`Control::upsert_rental`](kiln_core::control::Control::upsert_rental)'d at its creation time and
//!   updated with `cancel` at its cancel time; each is a watch event for the runtime, so the loop steps the rentals
//!   and reconciles at once. Wall-clock time is [`RentalPlan::start_epoch_s`] plus the simulated time.
//! - Every reconcile tick steps the rentals first; the replicas they stop (`Fenced`, `Reclaimed`, `RentalEnded`) are
//!   stopped like any other, except that requests in flight finish in the replica's grace (the GPU is free in the
//!   books at once, as in `Control`'s) and no idle copy of the weights is left on a GPU a rental took. Idle copies
//!   on GPUs a rental holds (not lent) are evicted: the tenant has the whole GPU.
//! - Billing: every [`METER_EVERY_S`] the spans of GPU holding ([`Control::take_held`]) go to a [`Meter`] —
//!   serverless spans per phase, and for a span on a lent GPU also a lent interval credited to the rental's owner
//!   — closed into hourly records in a [`MemoryLedger`]; just before a lending rental ends, the spans are taken
//!   so that the borrowers' time up to the end is credited to it. A rental's per-started-hour records
//!   ([`rental_records`]) go in when it ends and at the end of the run (the ledger drops duplicates by id).
//!
//! # What is counted
//! - A *stop by a rental*: a replica stopped as `Fenced` or `Reclaimed`. A cold start *after* one: a cold start of
//!   that deployment after the stop and before its next replica became ready.
//! - Utilisation: serverless GPU-seconds (share-weighted, from the ledger) and rented GPU-seconds (delivered time
//!   up to the end, the cancel or the end of the run, × GPUs) over the fleet's GPU-seconds.
//!
//! [`Control::take_held`]: kiln_core::control::Control::take_held

use std::collections::BTreeMap;

use kiln_core::{
    billing::{
        BillingError, GroupBy, Ledger, MemoryLedger, Meter, PriceTable, Query, ReplicaInterval, Subject, Totals,
        meter::{LentInterval, rental_records},
    },
    control::{Action, StopReason},
    money::Money,
    rental::{self, Fleet, RentalConfig, RentalEvent, RentalSpec, RentalSpecError},
};

use super::{FleetSpec, GpuSeconds, Sim};

/// How often the spans of GPU holding are metered, simulated seconds (spans are contiguous: the figures do not
/// depend on it).
pub const METER_EVERY_S: f64 = 60.0;
/// The meter's window: one record per deployment, phase and hour.
pub const METER_WINDOW_S: u32 = 3600;
/// The meter's name in record ids.
const SOURCE: &str = "kiln-sim";
/// The namespace of the simulated serverless deployments.
pub const SERVERLESS_NAMESPACE: &str = "sim";

/// One rental of a calendar.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRental {
    /// `Control`'s key: `namespace/name`, with `#n` for the n-th rental of a name the calendar reuses.
    pub key: String,
    /// The spec, times in seconds since the Unix epoch.
    pub spec: RentalSpec,
    /// When the rental object is created, simulated seconds.
    pub created_at_s: f64,
    /// When the tenant cancels it, simulated seconds.
    pub cancel_at_s: Option<f64>,
}

/// A calendar of rentals and what bills them, checked as a whole ([`RentalPlan::new`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RentalPlan {
    /// The rentals, in calendar order.
    pub rentals: Vec<PlannedRental>,
    /// Wall-clock time of the trace's start, seconds since the Unix epoch.
    pub start_epoch_s: f64,
    /// Prices (the fleet's GPU model must have one).
    pub prices: PriceTable,
    /// Lifecycle settings (fence lead, longest rental, ...).
    pub config: RentalConfig,
}

/// Why a calendar is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RentalPlanError {
    /// A rental's spec is invalid for the fleet (zero GPUs, unknown model, too long, ...).
    #[error("rental {index} ({namespace}/{name}): {error}")]
    Spec {
        /// Position in the calendar, from 1.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        error: RentalSpecError,
    },
    /// Created before the trace starts, or cancelled before it is created.
    #[error("rental {index} ({namespace}/{name}): {why}")]
    Times {
        /// Position in the calendar, from 1.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        why: String,
    },
    /// The calendar as a whole (two rentals of one name that overlap).
    #[error("{0}")]
    Calendar(RentalSpecError),
    /// The prices do not cover the fleet.
    #[error("prices: {0}")]
    Prices(BillingError),
}

impl RentalPlan {
    /// Checks a calendar against the fleet and the prices: every rental with [`rental::validate`], the whole with
    /// [`rental::validate_calendar`] (no overlap of one name), creation within the run's time (not before 0), a
    /// cancel not before the creation, a price for the fleet's GPU model. `rentals`: (spec, created at, cancel
    /// at), times of creation and cancel in simulated seconds. Keys are given here.
    pub fn new(
        rentals: Vec<(RentalSpec, f64, Option<f64>)>,
        start_epoch_s: f64,
        prices: PriceTable,
        config: RentalConfig,
        fleet: &FleetSpec,
    ) -> Result<Self, RentalPlanError> {
        let gpus = u32::try_from(fleet.gpus()).unwrap_or(u32::MAX);
        let core_fleet = Fleet::new().with(fleet.gpu_model.clone(), gpus);
        prices.check_covers([fleet.gpu_model.as_str()]).map_err(RentalPlanError::Prices)?;
        let mut uses: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (spec, _, _) in &rentals {
            *uses.entry((spec.namespace.clone(), spec.name.clone())).or_default() += 1;
        }
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut planned = Vec::with_capacity(rentals.len());
        for (i, (spec, created_at_s, cancel_at_s)) in rentals.into_iter().enumerate() {
            let times = |why: String| RentalPlanError::Times {
                index: i + 1,
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                why,
            };
            if !(created_at_s.is_finite() && created_at_s >= 0.0) {
                return Err(times(format!("created at {created_at_s} s, before the trace starts")));
            }
            if let Some(c) = cancel_at_s
                && !(c.is_finite() && c >= created_at_s)
            {
                return Err(times(format!("cancelled at {c} s, before it is created at {created_at_s} s")));
            }
            rental::validate(&spec, start_epoch_s + created_at_s, &config, &core_fleet).map_err(|error| {
                RentalPlanError::Spec {
                    index: i + 1,
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                    error,
                }
            })?;
            let id = (spec.namespace.clone(), spec.name.clone());
            let n = seen.entry(id.clone()).or_default();
            *n += 1;
            let key = if uses[&id] > 1 {
                format!("{}/{}#{n}", spec.namespace, spec.name)
            } else {
                format!("{}/{}", spec.namespace, spec.name)
            };
            planned.push(PlannedRental { key, spec, created_at_s, cancel_at_s });
        }
        let specs: Vec<(RentalSpec, f64)> =
            planned.iter().map(|r| (r.spec.clone(), start_epoch_s + r.created_at_s)).collect();
        rental::validate_calendar(&specs, &config, &core_fleet).map_err(RentalPlanError::Calendar)?;
        Ok(Self { rentals: planned, start_epoch_s, prices, config })
    }
}

/// Revenue from the ledger, in the price table's currency.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Revenue {
    /// Serverless GPU-seconds loading.
    pub serverless_loading: Money,
    /// Serverless GPU-seconds busy.
    pub serverless_busy: Money,
    /// Serverless GPU-seconds idle-warm.
    pub serverless_idle_warm: Money,
    /// The three together.
    pub serverless: Money,
    /// Rentals' started hours.
    pub rental_hours: Money,
    /// Credits to rentals' owners for lent GPU-seconds (≤ 0).
    pub lending_credits: Money,
    /// Credits for rented GPU-time not delivered (≤ 0).
    pub failure_credits: Money,
    /// Everything: the ledger's total.
    pub total: Money,
}

/// One rental's result.
#[derive(Debug, Clone, PartialEq)]
pub struct RentalLine {
    /// `Control`'s key.
    pub key: String,
    /// GPUs.
    pub gpus: u32,
    /// Lent when idle.
    pub lend_when_idle: bool,
    /// Phase at the end of the run.
    pub phase: String,
    /// Why, for a person.
    pub reason: String,
    /// Delivery, simulated seconds.
    pub delivered_s: Option<f64>,
    /// GPU-hours billed (GPUs × started hours).
    pub billed_gpu_hours: i64,
    /// Its rental-hour records.
    pub billed: Money,
    /// GPU-seconds lent to serverless work (share-weighted).
    pub lent_gpu_s: f64,
    /// What lending earned its owner (≥ 0: the credit's magnitude).
    pub lending_earned: Money,
}

/// Rentals, revenue and utilisation of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RentalOutcome {
    /// Currency of every amount.
    pub currency: String,
    /// Revenue by source.
    pub revenue: Revenue,
    /// Serverless GPU-seconds by phase, as metered (share-weighted; borrowers on lent GPUs included).
    pub serverless_gpu_s: GpuSeconds,
    /// The fleet's GPU-seconds over the run.
    pub fleet_gpu_s: f64,
    /// Rented GPU-seconds delivered (up to the end, the cancel or the end of the run).
    pub rented_gpu_s: f64,
    /// Rented GPU-seconds lent to serverless work.
    pub lent_gpu_s: f64,
    /// Replicas stopped because a rental took their GPU before its start.
    pub fenced_stops: u64,
    /// Replicas stopped because the lending rental took its GPU back (or ended).
    pub reclaimed_stops: u64,
    /// Requests in flight on those replicas (they finished in the grace).
    pub in_flight_at_stops: u64,
    /// Cold starts of a deployment after a fence stopped one of its replicas, before its next replica was ready.
    pub cold_starts_after_fence: u64,
    /// The same after a reclaim.
    pub cold_starts_after_reclaim: u64,
    /// Per rental, in calendar order.
    pub rentals: Vec<RentalLine>,
    /// Records in the ledger.
    pub records: usize,
    /// The first billing error, if any (none is expected: prices are checked first).
    pub billing_error: Option<String>,
}

impl RentalOutcome {
    /// Serverless busy GPU-seconds over the fleet's GPU-seconds.
    pub fn busy_utilisation(&self) -> f64 {
        ratio(self.serverless_gpu_s.busy, self.fleet_gpu_s)
    }

    /// Rented GPU-seconds over the fleet's GPU-seconds.
    pub fn rented_share(&self) -> f64 {
        ratio(self.rented_gpu_s, self.fleet_gpu_s)
    }

    /// GPU-seconds someone pays for (serverless in any phase, rented; lent time counted once) over the fleet's.
    pub fn paid_share(&self) -> f64 {
        let s = self.serverless_gpu_s;
        ratio(s.busy + s.idle_warm + s.loading + self.rented_gpu_s - self.lent_gpu_s, self.fleet_gpu_s)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The run's rental and billing state.
#[derive(Debug)]
pub(super) struct RentalSim {
    start: f64,
    meter: Meter,
    ledger: MemoryLedger,
    next_meter_s: f64,
    /// The earliest end of a lending rental, simulated seconds: the spans are taken before the step at it.
    flush_at_s: f64,
    /// Per deployment: the reason of the rental stop not yet followed by a ready replica.
    disrupted: Vec<Option<StopReason>>,
    out: RentalOutcome,
}

impl RentalSim {
    pub(super) fn new(plan: &RentalPlan, deployments: usize) -> Self {
        Self {
            start: plan.start_epoch_s,
            meter: Meter::new(SOURCE, METER_WINDOW_S).expect("a non-zero window"),
            ledger: MemoryLedger::new(),
            next_meter_s: 0.0,
            flush_at_s: f64::INFINITY,
            disrupted: vec![None; deployments],
            out: RentalOutcome { currency: plan.prices.currency.clone(), ..RentalOutcome::default() },
        }
    }

    pub(super) fn cold_start(&mut self, dep: u32) {
        match self.disrupted[dep as usize] {
            Some(StopReason::Fenced) => self.out.cold_starts_after_fence += 1,
            Some(StopReason::Reclaimed) => self.out.cold_starts_after_reclaim += 1,
            _ => {}
        }
    }

    pub(super) fn replica_ready(&mut self, dep: u32) {
        self.disrupted[dep as usize] = None;
    }

    fn stopped(&mut self, dep: u32, reason: StopReason, in_flight: u32) {
        match reason {
            StopReason::Fenced => self.out.fenced_stops += 1,
            StopReason::Reclaimed => self.out.reclaimed_stops += 1,
            _ => return,
        }
        self.out.in_flight_at_stops += u64::from(in_flight);
        self.disrupted[dep as usize] = Some(reason);
    }

    fn error(&mut self, e: &BillingError) {
        debug_assert!(false, "billing in the simulator failed: {e}");
        self.out.billing_error.get_or_insert_with(|| e.to_string());
    }
}

/// `namespace/name` split; a key without a slash is a name in `SERVERLESS_NAMESPACE`.
fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((SERVERLESS_NAMESPACE, key))
}

impl Sim<'_> {
    fn plan(&self) -> &RentalPlan {
        self.config.rentals.as_ref().expect("rentals are simulated only with a plan")
    }

    /// A replica stopped by a rental (called by [`Sim::stop`]).
    pub(super) fn rental_stop(&mut self, dep: u32, reason: StopReason, in_flight: u32) {
        if let Some(r) = &mut self.rentals {
            r.stopped(dep, reason, in_flight);
        }
    }

    /// The rental object is created: a watch event, so the loop steps the rentals and reconciles at once.
    pub(super) fn rental_created(&mut self, now: f64, rental: u32) {
        let r = &self.plan().rentals[rental as usize];
        let (key, spec, wall) = (r.key.clone(), r.spec.clone(), self.plan().start_epoch_s + now);
        self.control.upsert_rental(&key, spec, wall, None);
        self.step_rentals(now);
        self.reconcile(now);
    }

    /// The tenant sets `cancel`.
    pub(super) fn rental_cancelled(&mut self, now: f64, rental: u32) {
        let r = &self.plan().rentals[rental as usize];
        let (key, spec, wall) =
            (r.key.clone(), RentalSpec { cancel: true, ..r.spec.clone() }, self.plan().start_epoch_s + now);
        // Borrowers' time up to the cancel is the owner's.
        self.meter(now);
        self.control.upsert_rental(&key, spec, wall, None);
        self.step_rentals(now);
        self.reconcile(now);
    }

    /// Steps every rental and carries out what `Control` decided.
    pub(super) fn step_rentals(&mut self, now: f64) {
        let Some(flush_at) = self.rentals.as_ref().map(|r| r.flush_at_s) else { return };
        let due = now >= flush_at;
        if due {
            self.meter(now);
        }
        let wall = self.plan().start_epoch_s + now;
        let step = self.control.step_rentals(now, wall, true);
        for action in step.actions {
            match action {
                Action::Stop { replica, reason, .. } => self.stop(now, &replica, reason),
                Action::Start { .. } => unreachable!("a rental step only stops replicas"),
            }
        }
        if step.events.is_empty() && !due {
            return;
        }
        for (key, event) in &step.events {
            if let RentalEvent::PhaseChanged { to, .. } = event
                && to.is_terminal()
            {
                self.bill_rental(key, now);
            }
        }
        self.evict_copies_on_rented(now);
        self.update_flush_at();
    }

    /// The earliest end of a rental that lends now.
    fn update_flush_at(&mut self) {
        let start = self.plan().start_epoch_s;
        let mut at = f64::INFINITY;
        for r in &self.plan().rentals {
            if let Some(v) = self.control.rental(&r.key)
                && v.lent
                && let Some(end) = v.rental.state.end_ms
            {
                at = at.min(end as f64 / 1000.0 - start);
            }
        }
        if let Some(r) = &mut self.rentals {
            r.flush_at_s = at;
        }
    }

    /// Idle copies of weights on GPUs a rental holds and does not lend are gone: the tenant has the whole GPU.
    fn evict_copies_on_rented(&mut self, now: f64) {
        let mut held: Vec<(usize, u32)> = Vec::new();
        for r in &self.plan().rentals {
            if let Some(v) = self.control.rental(&r.key)
                && !v.lent
            {
                held.extend(v.gpus.iter().filter_map(|(node, g)| self.node_ids.get(node).map(|&n| (n, *g))));
            }
        }
        let mut touched: Vec<usize> = Vec::new();
        for (node, g) in held {
            let before = self.gpu_copies[node].len();
            let mut gone = 0.0;
            self.gpu_copies[node].retain(|c| {
                let keep = c.gpus & (1 << g) == 0;
                if !keep {
                    gone += now - c.since;
                }
                keep
            });
            let evicted = before - self.gpu_copies[node].len();
            if evicted > 0 {
                self.copy_seconds += gone;
                self.copy_evictions += evicted as u64;
                touched.push(node);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for node in touched {
            self.report_cached(node);
        }
    }

    /// Meters the spans of GPU holding at most every [`METER_EVERY_S`].
    pub(super) fn meter_if_due(&mut self, now: f64) {
        if self.rentals.as_ref().is_some_and(|r| now >= r.next_meter_s) {
            self.meter(now);
            if let Some(r) = &mut self.rentals {
                r.next_meter_s = now + METER_EVERY_S;
            }
        }
    }

    /// The spans of GPU holding up to `now` into the meter, and the windows that ended into the ledger.
    fn meter(&mut self, now: f64) {
        let spans = self.control.take_held(now);
        let config = self.config;
        let plan = config.rentals.as_ref().expect("a plan");
        let Some(rs) = &mut self.rentals else { return };
        let start = rs.start;
        for s in spans {
            let (from, to) = (start + s.from, start + s.to);
            // `Control` names the rental that lent the GPU the span ran on (only while it lends).
            let lent_from = s.lent_from.as_deref();
            if let Some(owner) = lent_from {
                let (namespace, name) = plan
                    .rentals
                    .iter()
                    .find(|r| r.key == owner)
                    .map_or_else(|| split_key(owner), |r| (r.spec.namespace.as_str(), r.spec.name.as_str()));
                let iv = LentInterval {
                    namespace: namespace.to_owned(),
                    rental: name.to_owned(),
                    gpu_model: s.gpu_model.clone(),
                    share_milli: s.share_milli,
                    from,
                    to,
                };
                if let Err(e) = rs.meter.observe_lent(&iv) {
                    rs.error(&e);
                }
            }
            if s.rental.is_some() {
                // Pinned to a rental: paid by the hour, not metered.
                continue;
            }
            let (namespace, deployment) = split_key(&s.deployment);
            let iv = ReplicaInterval {
                replica: s.replica,
                deployment: deployment.to_owned(),
                namespace: namespace.to_owned(),
                gpu_model: s.gpu_model,
                share_milli: s.share_milli,
                phase: s.phase,
                from,
                to,
            };
            if let Err(e) = rs.meter.observe(&iv) {
                rs.error(&e);
            }
        }
        let closed = rs.meter.close(start + now, &plan.prices).and_then(|records| rs.ledger.append_all(records));
        if let Err(e) = closed {
            rs.error(&e);
        }
    }

    /// A rental's records by `now` into the ledger (the ledger drops the ones it has).
    fn bill_rental(&mut self, key: &str, now: f64) {
        let config = self.config;
        let plan = config.rentals.as_ref().expect("a plan");
        let Some(v) = self.control.rental(key) else { return };
        let records = rental_records(v.rental, plan.start_epoch_s + now, &plan.prices, SOURCE);
        let Some(rs) = &mut self.rentals else { return };
        if let Err(e) = records.and_then(|r| rs.ledger.append_all(r)) {
            rs.error(&e);
        }
    }

    /// The end of the run: the last spans, the last windows (closed past the end: nothing is observed after it),
    /// every rental's records, and the figures.
    pub(super) fn finish_rentals(&mut self) {
        let end = self.end_s;
        self.meter(end);
        let config = self.config;
        let plan = config.rentals.as_ref().expect("a plan");
        let window = f64::from(METER_WINDOW_S);
        let last = ((plan.start_epoch_s + end) / window).ceil() * window;
        if let Some(rs) = &mut self.rentals
            && let Err(e) = rs.meter.close(last, &plan.prices).and_then(|r| rs.ledger.append_all(r))
        {
            rs.error(&e);
        }
        let keys: Vec<String> = plan.rentals.iter().map(|r| r.key.clone()).collect();
        for key in &keys {
            self.bill_rental(key, end);
        }
        let fleet_gpu_s = self.fleet.gpus() as f64 * end;
        let wall_end = plan.start_epoch_s + end;
        let mut lines = Vec::new();
        let mut rented_gpu_s = 0.0;
        let Some(rs) = &mut self.rentals else { return };
        for r in &plan.rentals {
            let Some(v) = self.control.rental(&r.key) else { continue };
            let rental = v.rental;
            let gpu_s = rental.billed_ms(wall_end) as f64 / 1000.0 * f64::from(rental.spec.gpu_count);
            rented_gpu_s += gpu_s;
            let price = plan.prices.get(&rental.spec.gpu_model).ok();
            let billed = price.and_then(|p| rental.billed_amount(wall_end, p).ok()).unwrap_or(Money::ZERO);
            let query = Query::namespace(&r.spec.namespace).subject(Subject::Rental(r.spec.name.clone()));
            let lent = rs.ledger.sum(&query, GroupBy::Phase).ok().and_then(|m| m.get("lent").copied());
            let lent = lent.unwrap_or_default();
            lines.push(RentalLine {
                key: r.key.clone(),
                gpus: rental.spec.gpu_count,
                lend_when_idle: rental.spec.lend_when_idle,
                phase: format!("{:?}", rental.phase()),
                reason: rental.state.reason.clone(),
                delivered_s: rental.state.delivered_ms.map(|ms| ms as f64 / 1000.0 - plan.start_epoch_s),
                billed_gpu_hours: rental.billed_gpu_hours(wall_end),
                billed,
                lent_gpu_s: lent.micro_gpu_seconds as f64 / 1e6,
                lending_earned: lent.amount.checked_neg().unwrap_or(Money::ZERO),
            });
        }
        let by_phase = match rs.ledger.sum(&Query::all(), GroupBy::Phase) {
            Ok(m) => m,
            Err(e) => {
                rs.error(&e);
                BTreeMap::new()
            }
        };
        let phase = |name: &str| by_phase.get(name).copied().unwrap_or_default();
        let gpu_s = |t: Totals| t.micro_gpu_seconds as f64 / 1e6;
        let (loading, busy, idle) = (phase("loading"), phase("busy"), phase("idle-warm"));
        let serverless = Money::sum([loading.amount, busy.amount, idle.amount]).unwrap_or(Money::ZERO);
        let total = rs.ledger.total(&Query::all()).map(|t| t.amount).unwrap_or(Money::ZERO);
        let out = &mut rs.out;
        out.revenue = Revenue {
            serverless_loading: loading.amount,
            serverless_busy: busy.amount,
            serverless_idle_warm: idle.amount,
            serverless,
            rental_hours: phase("rental-hours").amount,
            lending_credits: phase("lent").amount,
            failure_credits: phase("credit").amount,
            total,
        };
        out.serverless_gpu_s = GpuSeconds { busy: gpu_s(busy), idle_warm: gpu_s(idle), loading: gpu_s(loading) };
        out.fleet_gpu_s = fleet_gpu_s;
        out.rented_gpu_s = rented_gpu_s;
        out.lent_gpu_s = gpu_s(phase("lent"));
        out.rentals = lines;
        out.records = rs.ledger.len();
        self.out.rentals = Some(std::mem::take(&mut rs.out));
    }
}

#[cfg(test)]
mod tests;
