//! The ledger interface: append usage records idempotently by id, read them back, sum them by group.
//!
//! Owns the [`Ledger`] trait and [`MemoryLedger`], the in-memory implementation (a `BTreeMap` by id). The durable,
//! replicated implementation (raft) is a later step behind the same trait; callers must not depend on which one
//! they hold. It does not make records (the [`meter`](super::meter) does) or decide what is billed.
//!
//! # Semantics every implementation keeps
//! - [`Ledger::append`] of a record whose id is new stores it ([`Appended::New`]); of a record equal to the one
//!   stored under its id is a no-op that says so ([`Appended::Duplicate`]) — retries never double count; of a
//!   *different* record under an existing id is [`BillingError::Conflict`] and changes nothing. A malformed record
//!   ([`UsageRecord::validate`]) is refused.
//! - [`Ledger::append_all`] is all or nothing: if any record is malformed or conflicts (with the ledger or with
//!   another record of the batch), nothing is stored.
//! - A [`Query`] selects records by namespace, subject and time: a record is in `[from_ms, to_ms)` when its period
//!   *starts* in that range (so each record falls in exactly one of consecutive ranges, and sums never count a
//!   record twice). Results come in id order.

use std::collections::BTreeMap;

use super::{BillingError, Quantity, RecordId, Result, Subject, UsageRecord, utc_day};
use crate::money::Money;

/// What [`Ledger::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The record was stored.
    New,
    /// An equal record was already stored under that id; nothing changed.
    Duplicate,
}

/// Which records to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Only this namespace (tenant); `None`: all (an operator's view).
    pub namespace: Option<String>,
    /// Only this deployment or rental; `None`: all.
    pub subject: Option<Subject>,
    /// Records whose period starts at or after this, ms since the Unix epoch.
    pub from_ms: i64,
    /// ... and before this.
    pub to_ms: i64,
}

impl Query {
    /// Every record.
    pub fn all() -> Self {
        Query { namespace: None, subject: None, from_ms: i64::MIN, to_ms: i64::MAX }
    }

    /// Every record of `namespace`.
    pub fn namespace(namespace: impl Into<String>) -> Self {
        Query { namespace: Some(namespace.into()), ..Query::all() }
    }

    /// Restricts to `subject`.
    pub fn subject(mut self, subject: Subject) -> Self {
        self.subject = Some(subject);
        self
    }

    /// Restricts to records whose period starts in `[from_ms, to_ms)`.
    pub fn between(mut self, from_ms: i64, to_ms: i64) -> Self {
        self.from_ms = from_ms;
        self.to_ms = to_ms;
        self
    }

    /// True when `record` is selected.
    pub fn matches(&self, record: &UsageRecord) -> bool {
        self.namespace.as_ref().is_none_or(|n| *n == record.namespace)
            && self.subject.as_ref().is_none_or(|s| *s == record.subject)
            && record.start_ms >= self.from_ms
            && record.start_ms < self.to_ms
    }
}

/// How to group sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// By namespace.
    Namespace,
    /// By deployment name; records of rentals go under `-`.
    Deployment,
    /// By rental name; records of deployments go under `-`.
    Rental,
    /// By subject, `deployment/<name>` or `rental/<name>`.
    Subject,
    /// By phase: `loading`, `busy`, `idle-warm`, `rental-hours`, `lent`, `credit`.
    Phase,
    /// By UTC day of the period start, `YYYY-MM-DD`.
    Day,
    /// By GPU model.
    GpuModel,
}

impl GroupBy {
    /// The group `record` falls in.
    pub fn key(self, record: &UsageRecord) -> String {
        match (self, &record.subject) {
            (GroupBy::Namespace, _) => record.namespace.clone(),
            (GroupBy::Deployment, Subject::Deployment(n)) | (GroupBy::Rental, Subject::Rental(n)) => n.clone(),
            (GroupBy::Deployment | GroupBy::Rental, _) => "-".to_string(),
            (GroupBy::Subject, s) => s.to_string(),
            (GroupBy::Phase, _) => record.kind.phase_name().to_string(),
            (GroupBy::Day, _) => utc_day(record.start_ms),
            (GroupBy::GpuModel, _) => record.gpu_model.clone(),
        }
    }
}

/// Sums over a set of records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records summed.
    pub records: u64,
    /// Micro-GPU-seconds (serverless, lent and credited GPU-time).
    pub micro_gpu_seconds: i64,
    /// Rental GPU-hours.
    pub gpu_hours: i64,
    /// Sum of positive amounts.
    pub charges: Money,
    /// Sum of negative amounts (≤ 0).
    pub credits: Money,
    /// `charges + credits`.
    pub amount: Money,
}

impl Totals {
    /// Adds one record, or fails on overflow.
    pub fn add(&mut self, record: &UsageRecord) -> Result<()> {
        let overflow = || BillingError::Money(crate::money::MoneyError::Overflow { operation: "sum quantities" });
        self.records += 1;
        match record.quantity {
            Quantity::MicroGpuSeconds(q) => {
                self.micro_gpu_seconds = self.micro_gpu_seconds.checked_add(q).ok_or_else(overflow)?
            }
            Quantity::GpuHours(q) => self.gpu_hours = self.gpu_hours.checked_add(q).ok_or_else(overflow)?,
        }
        if record.amount.is_negative() {
            self.credits = self.credits.checked_add(record.amount)?;
        } else {
            self.charges = self.charges.checked_add(record.amount)?;
        }
        self.amount = self.amount.checked_add(record.amount)?;
        Ok(())
    }
}

/// How a replicated ledger's group stands, as one replica sees it (raft's term, leader, commit and applied indexes,
/// the stored log, snapshots): what a durable implementation can report; the in-memory one has nothing to say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerStatus {
    /// This replica's id.
    pub replica: u64,
    /// Current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Highest log index known committed.
    pub commit_index: u64,
    /// Highest log index applied to the records.
    pub applied_index: u64,
    /// First and last index of the stored log.
    pub log: (u64, u64),
    /// Index of the stored snapshot.
    pub snapshot_index: u64,
    /// Snapshots made or installed by this process.
    pub snapshots: u64,
    /// Snapshot builds that failed in this process (a disk full or unwritable: the log is not compacted until one
    /// succeeds).
    pub snapshots_failed: u64,
    /// Records held.
    pub records: u64,
    /// Bytes of log files on disk.
    pub log_bytes: u64,
}

/// Where usage records are kept. Implementations keep the semantics in the module docs.
pub trait Ledger {
    /// Appends `record` idempotently by its id.
    fn append(&mut self, record: UsageRecord) -> Result<Appended>;

    /// The record stored under `id`. Fails only where the ledger cannot be read (a replicated ledger that lost
    /// its leadership or its quorum), never for a missing record.
    fn get(&self, id: &RecordId) -> Result<Option<UsageRecord>>;

    /// The records `query` selects, in id order. Fails only where the ledger cannot be read.
    fn query(&self, query: &Query) -> Result<Vec<UsageRecord>>;

    /// How the replicated group stands, for implementations that have one (`None`: an in-memory ledger).
    fn status(&self) -> Option<LedgerStatus> {
        None
    }

    /// Appends every record or none: all are validated and checked for conflicts first.
    fn append_all(&mut self, records: Vec<UsageRecord>) -> Result<Vec<Appended>> {
        let mut batch: BTreeMap<RecordId, &UsageRecord> = BTreeMap::new();
        for r in &records {
            r.validate()?;
            let earlier = match batch.insert(r.id.clone(), r) {
                Some(e) => Some(e.clone()),
                None => self.get(&r.id)?,
            };
            if earlier.is_some_and(|e| e != *r) {
                return Err(BillingError::Conflict { id: r.id.to_string() });
            }
        }
        records.into_iter().map(|r| self.append(r)).collect()
    }

    /// Totals of the records `query` selects, per group.
    fn sum(&self, query: &Query, by: GroupBy) -> Result<BTreeMap<String, Totals>> {
        let mut groups: BTreeMap<String, Totals> = BTreeMap::new();
        for r in self.query(query)? {
            groups.entry(by.key(&r)).or_default().add(&r)?;
        }
        Ok(groups)
    }

    /// Totals of all records `query` selects.
    fn total(&self, query: &Query) -> Result<Totals> {
        let mut t = Totals::default();
        for r in self.query(query)? {
            t.add(&r)?;
        }
        Ok(t)
    }
}

/// The in-memory ledger: records by id in a `BTreeMap`. Real and complete, but not durable: a restart loses it.
#[derive(Clone, Debug, Default)]
pub struct MemoryLedger {
    records: BTreeMap<RecordId, UsageRecord>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records stored.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl Ledger for MemoryLedger {
    fn append(&mut self, record: UsageRecord) -> Result<Appended> {
        record.validate()?;
        match self.records.get(&record.id) {
            Some(existing) if *existing == record => Ok(Appended::Duplicate),
            Some(_) => Err(BillingError::Conflict { id: record.id.to_string() }),
            None => {
                self.records.insert(record.id.clone(), record);
                Ok(Appended::New)
            }
        }
    }

    fn get(&self, id: &RecordId) -> Result<Option<UsageRecord>> {
        Ok(self.records.get(id).cloned())
    }

    fn query(&self, query: &Query) -> Result<Vec<UsageRecord>> {
        Ok(self.records.values().filter(|r| query.matches(r)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{ServerlessPhase, UsageKind};

    fn busy(ns: &str, dep: &str, start_ms: i64, micro: i64, nanos: i128) -> UsageRecord {
        UsageRecord::new(
            "meter",
            ns,
            Subject::Deployment(dep.into()),
            UsageKind::Serverless(ServerlessPhase::Busy),
            "H100",
            Quantity::MicroGpuSeconds(micro),
            Money::from_nanos(nanos),
            start_ms,
            start_ms + 60_000,
        )
    }

    #[test]
    fn same_id_twice_counts_once_and_a_conflicting_record_errors() {
        let mut ledger = MemoryLedger::new();
        let r = busy("a", "d", 0, 1_000_000, 800_000);
        assert_eq!(ledger.append(r.clone()).unwrap(), Appended::New);
        assert_eq!(ledger.append(r.clone()).unwrap(), Appended::Duplicate);
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger.total(&Query::all()).unwrap().amount, Money::from_nanos(800_000));

        let mut changed = r.clone();
        changed.amount = Money::from_nanos(1);
        assert_eq!(ledger.append(changed), Err(BillingError::Conflict { id: r.id.to_string() }));
        assert_eq!(ledger.get(&r.id).unwrap(), Some(r), "the stored record is unchanged");
    }

    #[test]
    fn append_all_is_all_or_nothing() {
        let mut ledger = MemoryLedger::new();
        let a = busy("a", "d", 0, 1, 1);
        let b = busy("a", "d", 60_000, 2, 2);
        let mut a_conflict = a.clone();
        a_conflict.quantity = Quantity::MicroGpuSeconds(99);
        assert!(ledger.append_all(vec![a.clone(), b.clone(), a_conflict]).is_err());
        assert!(ledger.is_empty(), "a conflict inside the batch stores nothing");

        ledger.append(a.clone()).unwrap();
        let mut stored_conflict = a.clone();
        stored_conflict.amount = Money::from_nanos(7);
        assert!(ledger.append_all(vec![b.clone(), stored_conflict]).is_err());
        assert_eq!(ledger.len(), 1, "a conflict with the ledger stores nothing");

        assert_eq!(ledger.append_all(vec![a, b]).unwrap(), vec![Appended::Duplicate, Appended::New]);
        assert_eq!(ledger.len(), 2);
    }

    #[test]
    fn query_and_group_sums() {
        let mut ledger = MemoryLedger::new();
        let day = 86_400_000;
        ledger.append(busy("a", "d1", 0, 10, 100)).unwrap();
        ledger.append(busy("a", "d2", 60_000, 20, 200)).unwrap();
        ledger.append(busy("a", "d1", day, 30, 300)).unwrap();
        ledger.append(busy("b", "d1", 0, 40, 400)).unwrap();
        let credit = UsageRecord::new(
            "rental",
            "a",
            Subject::Rental("r".into()),
            UsageKind::Credit,
            "H100",
            Quantity::MicroGpuSeconds(5),
            Money::from_nanos(-50),
            0,
            10,
        );
        ledger.append(credit).unwrap();

        assert_eq!(ledger.query(&Query::namespace("b")).unwrap().len(), 1, "tenant b sees only its own record");
        assert_eq!(ledger.query(&Query::namespace("a").subject(Subject::Deployment("d1".into()))).unwrap().len(), 2);
        assert_eq!(
            ledger.query(&Query::namespace("a").between(0, day)).unwrap().len(),
            3,
            "the period start decides the range"
        );

        let by_dep = ledger.sum(&Query::namespace("a"), GroupBy::Deployment).unwrap();
        assert_eq!(by_dep["d1"].amount, Money::from_nanos(400));
        assert_eq!(by_dep["d2"].micro_gpu_seconds, 20);
        assert_eq!(by_dep["-"].credits, Money::from_nanos(-50));
        let by_day = ledger.sum(&Query::namespace("a"), GroupBy::Day).unwrap();
        assert_eq!(by_day.keys().collect::<Vec<_>>(), ["1970-01-01", "1970-01-02"]);
        assert_eq!(by_day["1970-01-01"].amount, Money::from_nanos(250));
        let by_phase = ledger.sum(&Query::namespace("a"), GroupBy::Phase).unwrap();
        assert_eq!(by_phase["busy"].records, 3);
        assert_eq!(by_phase["credit"].amount, Money::from_nanos(-50));
        let total = ledger.total(&Query::namespace("a")).unwrap();
        assert_eq!(total.charges, Money::from_nanos(600));
        assert_eq!(total.amount, Money::from_nanos(550));
    }

    #[test]
    fn malformed_records_are_refused() {
        let mut ledger = MemoryLedger::new();
        let mut r = busy("a", "d", 0, 1, 1);
        r.amount = Money::from_nanos(-1);
        assert!(matches!(ledger.append(r), Err(BillingError::InvalidRecord { .. })));
        assert!(ledger.is_empty());
    }
}
