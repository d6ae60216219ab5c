//! Usage records: what was measured, for whom, over which period, and what it costs.
//!
//! Owns [`UsageRecord`] and its deterministic id ([`RecordId`]). It does not measure anything (the
//! [`meter`](super::meter) does) and does not store anything (a [`Ledger`](super::Ledger) does).
//!
//! # Id scheme
//! An id is made where the usage is measured, from what identifies the measurement and nothing else:
//! `source|namespace|subject-kind/subject-name|usage-kind|gpu-model|period-start-ms|period-end-ms` (`source` names
//! the measuring component, e.g. `meter` or `rental`). Measuring the same thing again (a retry after a crash, a
//! resend) yields the same id, so the ledger can drop the duplicate; measuring something different never does.
//! Fields are escaped so that a `|` inside a name cannot forge another id.

use std::fmt;

use super::{BillingError, Result};
use crate::money::Money;

/// What the usage is attributed to, inside its namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    /// A `ModelDeployment`, by name.
    Deployment(String),
    /// A `GpuRental`, by name.
    Rental(String),
}

impl Subject {
    /// The object's name.
    pub fn name(&self) -> &str {
        match self {
            Subject::Deployment(n) | Subject::Rental(n) => n,
        }
    }

    /// `deployment` or `rental`.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::Deployment(_) => "deployment",
            Subject::Rental(_) => "rental",
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind(), self.name())
    }
}

/// The phase of a serverless replica while it holds GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServerlessPhase {
    /// Loading weights (cold start).
    Loading,
    /// Serving at least one request.
    Busy,
    /// Loaded, no request, kept warm by the keep-alive policy.
    IdleWarm,
}

impl ServerlessPhase {
    /// `loading`, `busy` or `idle-warm`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerlessPhase::Loading => "loading",
            ServerlessPhase::Busy => "busy",
            ServerlessPhase::IdleWarm => "idle-warm",
        }
    }
}

/// What kind of usage a record measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UsageKind {
    /// Serverless GPU-seconds in a phase, weighted by the GPU share held. Quantity: micro-GPU-seconds; amount ≥ 0.
    Serverless(ServerlessPhase),
    /// Rental GPU-hours, one record per started hour. Quantity: GPU-hours; amount ≥ 0.
    RentalHours,
    /// GPU-seconds of a rented GPU lent to serverless work; credited to the owner. Quantity: micro-GPU-seconds;
    /// amount ≤ 0.
    Lent,
    /// Credit for GPU-time paid for but not delivered (an unhealthy GPU, a lost node). Quantity:
    /// micro-GPU-seconds; amount ≤ 0.
    Credit,
}

impl UsageKind {
    /// A stable name: `serverless-loading`, `serverless-busy`, `serverless-idle-warm`, `rental-hours`, `lent`,
    /// `credit`.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Serverless(ServerlessPhase::Loading) => "serverless-loading",
            UsageKind::Serverless(ServerlessPhase::Busy) => "serverless-busy",
            UsageKind::Serverless(ServerlessPhase::IdleWarm) => "serverless-idle-warm",
            UsageKind::RentalHours => "rental-hours",
            UsageKind::Lent => "lent",
            UsageKind::Credit => "credit",
        }
    }

    /// The phase name used when grouping by phase: the serverless phase, or the kind's name otherwise.
    pub fn phase_name(self) -> &'static str {
        match self {
            UsageKind::Serverless(p) => p.as_str(),
            other => other.as_str(),
        }
    }

    /// True for kinds whose amount is a credit (≤ 0).
    pub fn is_credit(self) -> bool {
        matches!(self, UsageKind::Lent | UsageKind::Credit)
    }
}

/// A measured quantity with its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Quantity {
    /// Micro-GPU-seconds (milli-GPU × milliseconds): 1 000 000 = one whole GPU for one second.
    MicroGpuSeconds(i64),
    /// Whole GPU-hours (GPUs × started hours).
    GpuHours(i64),
}

/// A deterministic, unique record id; see the module docs for the scheme.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(String);

impl RecordId {
    /// The id of the measurement of `kind` of `subject` in `namespace` on `gpu_model` over `[start_ms, end_ms)`,
    /// measured by `source`.
    pub fn new(
        source: &str,
        namespace: &str,
        subject: &Subject,
        kind: UsageKind,
        gpu_model: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Self {
        let esc = |s: &str| s.replace('%', "%25").replace('|', "%7C");
        RecordId(format!(
            "{}|{}|{}/{}|{}|{}|{start_ms}|{end_ms}",
            esc(source),
            esc(namespace),
            subject.kind(),
            esc(subject.name()),
            kind.as_str(),
            esc(gpu_model)
        ))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One measured usage and its amount: the unit the ledger stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    /// Unique, deterministic id (see the module docs).
    pub id: RecordId,
    /// The tenant.
    pub namespace: String,
    /// The deployment or rental used.
    pub subject: Subject,
    /// What was measured.
    pub kind: UsageKind,
    /// GPU model the usage ran on (what it is priced by).
    pub gpu_model: String,
    /// How much, in the unit its kind implies.
    pub quantity: Quantity,
    /// What it costs: ≥ 0 for charges, ≤ 0 for credits ([`UsageKind::is_credit`]).
    pub amount: Money,
    /// Period start, ms since the Unix epoch (inclusive).
    pub start_ms: i64,
    /// Period end, ms since the Unix epoch (exclusive).
    pub end_ms: i64,
}

impl UsageRecord {
    /// Builds a record with its deterministic id.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: &str,
        namespace: &str,
        subject: Subject,
        kind: UsageKind,
        gpu_model: &str,
        quantity: Quantity,
        amount: Money,
        start_ms: i64,
        end_ms: i64,
    ) -> Self {
        UsageRecord {
            id: RecordId::new(source, namespace, &subject, kind, gpu_model, start_ms, end_ms),
            namespace: namespace.to_string(),
            subject,
            kind,
            gpu_model: gpu_model.to_string(),
            quantity,
            amount,
            start_ms,
            end_ms,
        }
    }

    /// Checks the record is well formed: a period that does not run backwards, the quantity's unit matching the
    /// kind, a non-negative quantity, and the amount's sign matching charge or credit.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |reason: &str| Err(BillingError::InvalidRecord { id: self.id.to_string(), reason: reason.to_string() });
        if self.end_ms < self.start_ms {
            return bad("period ends before it starts");
        }
        let q = match (self.kind, self.quantity) {
            (UsageKind::RentalHours, Quantity::GpuHours(q)) => q,
            (UsageKind::RentalHours, _) => return bad("rental hours must be counted in GPU-hours"),
            (_, Quantity::MicroGpuSeconds(q)) => q,
            (_, Quantity::GpuHours(_)) => return bad("only rental hours are counted in GPU-hours"),
        };
        if q < 0 {
            return bad("negative quantity");
        }
        if self.kind.is_credit() && self.amount > Money::ZERO {
            return bad("a credit must have an amount ≤ 0");
        }
        if !self.kind.is_credit() && self.amount.is_negative() {
            return bad("a charge must have an amount ≥ 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = RecordId::new(
            "meter",
            "ns",
            &Subject::Deployment("d".into()),
            UsageKind::Serverless(ServerlessPhase::Busy),
            "H100",
            0,
            60_000,
        );
        let b = RecordId::new(
            "meter",
            "ns",
            &Subject::Deployment("d".into()),
            UsageKind::Serverless(ServerlessPhase::Busy),
            "H100",
            0,
            60_000,
        );
        assert_eq!(a, b);
        let other_phase = RecordId::new(
            "meter",
            "ns",
            &Subject::Deployment("d".into()),
            UsageKind::Serverless(ServerlessPhase::IdleWarm),
            "H100",
            0,
            60_000,
        );
        let other_subject = RecordId::new(
            "meter",
            "ns",
            &Subject::Rental("d".into()),
            UsageKind::Serverless(ServerlessPhase::Busy),
            "H100",
            0,
            60_000,
        );
        assert_ne!(a, other_phase);
        assert_ne!(a, other_subject);
        // A '|' inside a name cannot forge another record's id.
        let forged = RecordId::new(
            "meter",
            "ns|deployment/d",
            &Subject::Deployment("x".into()),
            UsageKind::Credit,
            "H100",
            0,
            1,
        );
        let real = RecordId::new(
            "meter",
            "ns",
            &Subject::Deployment("d|deployment/x".into()),
            UsageKind::Credit,
            "H100",
            0,
            1,
        );
        assert_ne!(forged, real);
        assert_eq!(a.as_str(), "meter|ns|deployment/d|serverless-busy|H100|0|60000");
    }

    #[test]
    fn validation_catches_malformed_records() {
        let ok = UsageRecord::new(
            "t",
            "ns",
            Subject::Rental("r".into()),
            UsageKind::RentalHours,
            "H100",
            Quantity::GpuHours(2),
            Money::from_units(5),
            0,
            3_600_000,
        );
        assert!(ok.validate().is_ok());
        let mut wrong_unit = ok.clone();
        wrong_unit.quantity = Quantity::MicroGpuSeconds(1);
        assert!(wrong_unit.validate().is_err());
        let mut backwards = ok.clone();
        backwards.end_ms = -1;
        assert!(backwards.validate().is_err());
        let mut negative_charge = ok.clone();
        negative_charge.amount = Money::from_units(-1);
        assert!(negative_charge.validate().is_err());
        let positive_credit = UsageRecord::new(
            "t",
            "ns",
            Subject::Rental("r".into()),
            UsageKind::Credit,
            "H100",
            Quantity::MicroGpuSeconds(1),
            Money::from_units(1),
            0,
            1,
        );
        assert!(positive_credit.validate().is_err());
    }
}
