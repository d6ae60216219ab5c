//! The meter: observed GPU-holding intervals in, usage records with deterministic ids out.
//!
//! Owns [`Meter`], the pure accumulator of serverless replica phase intervals (and lent intervals of rented GPUs)
//! into per-window, per-phase GPU-time per deployment, and [`rental_records`], which turns a
//! [`Rental`]'s delivery into one record per started hour plus its credits. It does not
//! observe anything itself (the controller feeds it what the agents report), keep records (a
//! [`Ledger`](super::Ledger) does), or decide a rental's phase.
//!
//! # How the controller drives it
//! At each tick, for every replica holding GPU, feed the interval of its current phase since the last tick
//! ([`Meter::observe`]); on a phase change, feed the interval that ended. Then [`Meter::close`] up to the tick:
//! every window that ended by then becomes one record per (namespace, deployment, GPU model, phase), and the
//! meter's watermark moves there; an interval that starts before the watermark is refused as late
//! ([`BillingError::LateInterval`]) rather than silently lost or double counted. Records of a window are the same
//! (same id, same contents) however the intervals were split, so appending them again after a crash is a no-op.
//!
//! # Amounts
//! GPU-time is micro-GPU-seconds: milli-GPU share × milliseconds, exact. A record's amount is
//! `micro-GPU-seconds × price per GPU-second ÷ 10⁶`, rounded half-up at the nano-unit once per record; lent
//! GPU-time is credited at the lending share of that price (`÷ 10¹²` with the share in ppm), also rounded once.

use std::collections::BTreeMap;

use super::{BillingError, PriceTable, Quantity, Result, ServerlessPhase, Subject, UsageKind, UsageRecord};
use crate::{
    money::{MS_PER_HOUR, Money, secs_to_ms},
    rental::Rental,
};

/// Milli-GPU in one whole GPU.
const MILLI_PER_GPU: i64 = 1000;

/// A serverless replica held `share_milli` milli-GPU of `gpu_model` in `phase` over `[from, to)` (seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaInterval {
    /// Replica id (for error messages).
    pub replica: String,
    /// The replica's deployment.
    pub deployment: String,
    /// The tenant.
    pub namespace: String,
    /// GPU model it ran on.
    pub gpu_model: String,
    /// GPU held, milli-GPU: 1..=999 for a share, 1000 × k for k whole GPUs.
    pub share_milli: u32,
    /// What it was doing.
    pub phase: ServerlessPhase,
    /// Start, seconds since the Unix epoch.
    pub from: f64,
    /// End, seconds since the Unix epoch.
    pub to: f64,
}

/// A rented GPU (or share of one) lent to serverless work over `[from, to)` (seconds): credited to the owner.
#[derive(Clone, Debug, PartialEq)]
pub struct LentInterval {
    /// The owner's namespace.
    pub namespace: String,
    /// The rental lent from.
    pub rental: String,
    /// GPU model.
    pub gpu_model: String,
    /// GPU lent, milli-GPU.
    pub share_milli: u32,
    /// Start, seconds.
    pub from: f64,
    /// End, seconds.
    pub to: f64,
}

type Key = (String, Subject, UsageKind, String, i64);

/// Accumulates GPU-time per (namespace, subject, kind, GPU model, window) until the window is closed.
#[derive(Clone, Debug)]
pub struct Meter {
    source: String,
    window_ms: i64,
    watermark_ms: i64,
    open: BTreeMap<Key, i64>,
}

impl Meter {
    /// A meter named `source` (part of every record id: one per measuring component) with windows of `window_s`
    /// seconds (e.g. 60 or 3600), aligned to the Unix epoch.
    pub fn new(source: impl Into<String>, window_s: u32) -> Result<Self> {
        if window_s == 0 {
            return Err(BillingError::InvalidInput("window must be at least one second".into()));
        }
        Ok(Meter {
            source: source.into(),
            window_ms: i64::from(window_s) * 1000,
            watermark_ms: i64::MIN,
            open: BTreeMap::new(),
        })
    }

    /// Everything before this (ms) was emitted by [`Meter::close`].
    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// Adds a replica's interval.
    pub fn observe(&mut self, iv: &ReplicaInterval) -> Result<()> {
        if iv.share_milli == 0 || iv.share_milli > 16 * 1000 {
            return Err(BillingError::InvalidInput(format!(
                "replica {}: share of {} milli-GPU",
                iv.replica, iv.share_milli
            )));
        }
        let subject = Subject::Deployment(iv.deployment.clone());
        let kind = UsageKind::Serverless(iv.phase);
        self.add(&iv.replica, &iv.namespace, subject, kind, &iv.gpu_model, iv.share_milli, iv.from, iv.to)
    }

    /// Adds a lent interval of a rented GPU.
    pub fn observe_lent(&mut self, iv: &LentInterval) -> Result<()> {
        if iv.share_milli == 0 || iv.share_milli > 16 * 1000 {
            return Err(BillingError::InvalidInput(format!("rental {}: lent {} milli-GPU", iv.rental, iv.share_milli)));
        }
        let subject = Subject::Rental(iv.rental.clone());
        self.add(&iv.rental, &iv.namespace, subject, UsageKind::Lent, &iv.gpu_model, iv.share_milli, iv.from, iv.to)
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        who: &str,
        ns: &str,
        subject: Subject,
        kind: UsageKind,
        model: &str,
        milli: u32,
        from: f64,
        to: f64,
    ) -> Result<()> {
        if !from.is_finite() || !to.is_finite() || to < from {
            return Err(BillingError::InvalidInput(format!(
                "{who}: interval [{from}, {to}) is not a forward span of time"
            )));
        }
        let (from_ms, to_ms) = (secs_to_ms(from), secs_to_ms(to));
        if from_ms < self.watermark_ms {
            return Err(BillingError::LateInterval {
                replica: who.to_string(),
                from_ms,
                watermark_ms: self.watermark_ms,
            });
        }
        let mut t = from_ms;
        while t < to_ms {
            let window = t.div_euclid(self.window_ms) * self.window_ms;
            let until = (window + self.window_ms).min(to_ms);
            let micro = i64::from(milli) * (until - t);
            let slot = self.open.entry((ns.to_string(), subject.clone(), kind, model.to_string(), window)).or_default();
            *slot = slot.checked_add(micro).ok_or(BillingError::InvalidInput("GPU-time overflow".into()))?;
            t = until;
        }
        Ok(())
    }

    /// Emits a record for every window that ended at or before `up_to` (seconds) and moves the watermark there.
    /// On an error (a missing price) nothing is emitted and the meter is unchanged.
    pub fn close(&mut self, up_to: f64, prices: &PriceTable) -> Result<Vec<UsageRecord>> {
        let limit = secs_to_ms(up_to).div_euclid(self.window_ms) * self.window_ms;
        let mut records = Vec::new();
        for ((ns, subject, kind, model, window), micro) in &self.open {
            if window + self.window_ms > limit {
                continue;
            }
            let price = prices.get(model)?;
            let amount = match kind {
                UsageKind::Lent => price
                    .serverless_per_gpu_second
                    .mul_div(i128::from(*micro) * i128::from(price.lending_share.ppm()), 1_000_000_000_000)?
                    .checked_neg()?,
                _ => price.serverless_per_gpu_second.mul_div(i128::from(*micro), 1_000_000)?,
            };
            records.push(UsageRecord::new(
                &self.source,
                ns,
                subject.clone(),
                *kind,
                model,
                Quantity::MicroGpuSeconds(*micro),
                amount,
                *window,
                window + self.window_ms,
            ));
        }
        self.open.retain(|(_, _, _, _, window), _| window + self.window_ms > limit);
        self.watermark_ms = self.watermark_ms.max(limit);
        Ok(records)
    }
}

/// The usage records of a rental by `now` (seconds): one [`UsageKind::RentalHours`] record per started hour since
/// delivery (GPUs × 1 GPU-hour at the rental price), and one [`UsageKind::Credit`] per finished span of lost
/// GPU-time (lost GPU-milliseconds × price per hour ÷ 3 600 000, rounded half-up, negative).
///
/// Deterministic: the record of hour k covers the nominal hour `[delivery + k h, min(delivery + (k+1) h, end))`
/// whenever it is emitted, so emitting at the start of the hour, later, or again after a cancel gives the same
/// id and contents, and the ledger keeps one. A started hour is billed in full (61 minutes = 2 records).
pub fn rental_records(rental: &Rental, now: f64, prices: &PriceTable, source: &str) -> Result<Vec<UsageRecord>> {
    let Some(delivered) = rental.state.delivered_ms else { return Ok(Vec::new()) };
    let spec = &rental.spec;
    let price = prices.get(&spec.gpu_model)?;
    let end = rental.state.end_ms.unwrap_or(i64::MAX);
    let subject = Subject::Rental(spec.name.clone());
    let gpus = i64::from(spec.gpu_count);
    let hour_amount = price.rental_per_gpu_hour.checked_mul(i128::from(gpus))?;
    let mut out = Vec::new();
    for k in 0..rental.billed_hours(now) {
        let from = delivered + k * MS_PER_HOUR;
        let to = (from + MS_PER_HOUR).min(end);
        out.push(UsageRecord::new(
            source,
            &spec.namespace,
            subject.clone(),
            UsageKind::RentalHours,
            &spec.gpu_model,
            Quantity::GpuHours(gpus),
            hour_amount,
            from,
            to,
        ));
    }
    for span in rental.credit_spans() {
        let gpu_ms = span.gpu_ms();
        let amount = price.rental_per_gpu_hour.mul_div(i128::from(gpu_ms), i128::from(MS_PER_HOUR))?.checked_neg()?;
        out.push(UsageRecord::new(
            source,
            &spec.namespace,
            subject.clone(),
            UsageKind::Credit,
            &spec.gpu_model,
            Quantity::MicroGpuSeconds(gpu_ms * MILLI_PER_GPU),
            amount,
            span.from_ms,
            span.to_ms,
        ));
    }
    Ok(out)
}

/// The price of `micro` micro-GPU-seconds of serverless use of `model`: what one prediction costs when the
/// gateway knows its GPU share and run time (rounded half-up at the nano-unit).
pub fn serverless_amount(prices: &PriceTable, model: &str, micro: i64) -> Result<Money> {
    Ok(prices.get(model)?.serverless_per_gpu_second.mul_div(i128::from(micro), 1_000_000)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{GpuPrice, Ledger, MemoryLedger, Query};

    fn prices() -> PriceTable {
        PriceTable::new("USD").with("H100", GpuPrice::parse("H100", "0.001", "3.60", "0.5").unwrap())
    }

    fn iv(replica: &str, dep: &str, share: u32, phase: ServerlessPhase, from: f64, to: f64) -> ReplicaInterval {
        ReplicaInterval {
            replica: replica.into(),
            deployment: dep.into(),
            namespace: "a".into(),
            gpu_model: "H100".into(),
            share_milli: share,
            phase,
            from,
            to,
        }
    }

    #[test]
    fn splits_intervals_into_windows_by_phase_weighted_by_share() {
        let mut m = Meter::new("meter", 60).unwrap();
        // Half a GPU loading 50..70 s (crosses the minute), then busy 70..130 s.
        m.observe(&iv("r1", "d", 500, ServerlessPhase::Loading, 50.0, 70.0)).unwrap();
        m.observe(&iv("r1", "d", 500, ServerlessPhase::Busy, 70.0, 130.0)).unwrap();
        // A whole-GPU replica idle-warm 0..60 s.
        m.observe(&iv("r2", "d", 1000, ServerlessPhase::IdleWarm, 0.0, 60.0)).unwrap();
        let recs = m.close(120.0, &prices()).unwrap();
        let get = |kind: ServerlessPhase, start: i64| {
            recs.iter()
                .find(|r| r.kind == UsageKind::Serverless(kind) && r.start_ms == start)
                .map(|r| (r.quantity, r.amount))
        };
        assert_eq!(
            get(ServerlessPhase::Loading, 0),
            Some((Quantity::MicroGpuSeconds(5_000_000), Money::parse("0.005").unwrap()))
        );
        assert_eq!(
            get(ServerlessPhase::Loading, 60_000),
            Some((Quantity::MicroGpuSeconds(5_000_000), Money::parse("0.005").unwrap()))
        );
        assert_eq!(
            get(ServerlessPhase::Busy, 60_000),
            Some((Quantity::MicroGpuSeconds(25_000_000), Money::parse("0.025").unwrap()))
        );
        assert_eq!(
            get(ServerlessPhase::IdleWarm, 0),
            Some((Quantity::MicroGpuSeconds(60_000_000), Money::parse("0.06").unwrap()))
        );
        assert_eq!(recs.len(), 4, "the window 120..180 s is still open");
        // The last 10 s of busy time are emitted with the next window.
        let rest = m.close(180.0, &prices()).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].quantity, Quantity::MicroGpuSeconds(5_000_000));
        // Late input is refused, not lost.
        assert!(matches!(
            m.observe(&iv("r1", "d", 500, ServerlessPhase::Busy, 150.0, 200.0)),
            Err(BillingError::LateInterval { .. })
        ));
    }

    #[test]
    fn same_timeline_split_differently_gives_the_same_records() {
        let mut one = Meter::new("meter", 60).unwrap();
        one.observe(&iv("r1", "d", 250, ServerlessPhase::Busy, 0.0, 60.0)).unwrap();
        let mut split = Meter::new("meter", 60).unwrap();
        for s in 0..6 {
            split
                .observe(&iv("r1", "d", 250, ServerlessPhase::Busy, f64::from(s) * 10.0, f64::from(s + 1) * 10.0))
                .unwrap();
        }
        let a = one.close(60.0, &prices()).unwrap();
        let b = split.close(60.0, &prices()).unwrap();
        assert_eq!(a, b);
        let mut ledger = MemoryLedger::new();
        ledger.append_all(a).unwrap();
        ledger.append_all(b).unwrap();
        assert_eq!(ledger.len(), 1, "a re-emitted window counts once");
    }

    #[test]
    fn missing_price_fails_the_close_and_keeps_the_data() {
        let mut m = Meter::new("meter", 60).unwrap();
        let mut x = iv("r1", "d", 1000, ServerlessPhase::Busy, 0.0, 60.0);
        x.gpu_model = "B200".into();
        m.observe(&x).unwrap();
        assert_eq!(m.close(60.0, &prices()), Err(BillingError::MissingPrice { model: "B200".into() }));
        let fixed = prices().with("B200", GpuPrice::parse("B200", "0.002", "5", "0").unwrap());
        let recs = m.close(60.0, &fixed).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].amount, Money::parse("0.12").unwrap());
    }

    #[test]
    fn lent_time_is_credited_at_the_lending_share() {
        let mut m = Meter::new("meter", 3600).unwrap();
        m.observe_lent(&LentInterval {
            namespace: "owner".into(),
            rental: "r".into(),
            gpu_model: "H100".into(),
            share_milli: 1000,
            from: 0.0,
            to: 600.0,
        })
        .unwrap();
        let recs = m.close(3600.0, &prices()).unwrap();
        // 600 GPU-s × $0.001 × 0.5 = $0.30 credited.
        assert_eq!(recs[0].kind, UsageKind::Lent);
        assert_eq!(recs[0].amount, Money::parse("-0.30").unwrap());
        let mut ledger = MemoryLedger::new();
        ledger.append_all(recs).unwrap();
        assert_eq!(ledger.total(&Query::namespace("owner")).unwrap().credits, Money::parse("-0.3").unwrap());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(Meter::new("m", 0).is_err());
        let mut m = Meter::new("m", 60).unwrap();
        assert!(m.observe(&iv("r", "d", 0, ServerlessPhase::Busy, 0.0, 1.0)).is_err());
        assert!(m.observe(&iv("r", "d", 10, ServerlessPhase::Busy, 2.0, 1.0)).is_err());
        assert!(m.observe(&iv("r", "d", 10, ServerlessPhase::Busy, f64::NAN, 1.0)).is_err());
        assert_eq!(serverless_amount(&prices(), "H100", 1_500_000).unwrap(), Money::parse("0.0015").unwrap());
    }
}
