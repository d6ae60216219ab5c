//! The replicated state machine: what every replica computes from the same committed log, and nothing else.
//!
//! Owns [`Command`] (what is proposed), [`LedgerState`] (records by id, the per-source sequence progress, running
//! totals, a small control-plane key-value map, and the index of the last applied entry) and its snapshot format.
//! Pure: no I/O, no clock, no randomness, no raft types — [`node`](crate::node) feeds it committed entries in log
//! order, [`storage`](crate::storage) keeps its snapshots. Deterministic: the same sequence of applied entries
//! yields a byte-identical [`LedgerState::snapshot`] on every replica.
//!
//! # Semantics
//! - Records are keyed by id with exactly the core's [`Ledger`] rules: an `Append`
//!   batch is all or nothing; a record equal to the one stored under its id is [`Appended::Duplicate`], a different
//!   one under the same id rejects the whole batch with [`BillingError::Conflict`]. The set of applied ids is the
//!   record map itself, kept in the state and its snapshots for ever — never a time-limited cache — so a batch
//!   resent after any outage is applied once.
//! - Each measuring source numbers its batches `1, 2, 3, ...`. The state keeps, per source, the highest number
//!   seen and the ranges never seen ([`SourceProgress::missing`]): a gap stays visible until the missing batch
//!   arrives. A resent batch (a number already seen) is applied again idempotently by its record ids.
//! - Running totals per namespace / subject / phase / UTC day are updated on every new record; they are derived
//!   data, rebuilt from the records when a snapshot is restored, so they can never drift from the records.

use std::collections::BTreeMap;

use kiln_core::billing::{Appended, BillingError, Ledger, Query, RecordId, Totals, UsageRecord, utc_day};

use crate::codec::{Reader, Writer};
use crate::{LedgerError, Result};

/// A command in the replicated log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A batch of usage records from one measuring source, with that source's batch number (from 1).
    Append {
        /// The measuring source (`meter`, `rental`, an agent's node name, ...).
        source: String,
        /// The source's batch number; gaps in a source's numbers are recorded.
        seq: u64,
        /// The records, each with the id made where it was measured.
        records: Vec<UsageRecord>,
    },
    /// Sets a control-plane value that must survive a failover (e.g. a rental's fence, the last metered window).
    Put {
        /// The key.
        key: String,
        /// The value; empty removes the key.
        value: Vec<u8>,
    },
}

const CMD_APPEND: u8 = 1;
const CMD_PUT: u8 = 2;

impl Command {
    /// The command's bytes in a log entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Command::Append { source, seq, records } => {
                w.u8(CMD_APPEND);
                w.str(source);
                w.u64(*seq);
                w.u64(records.len() as u64);
                for r in records {
                    w.record(r);
                }
            }
            Command::Put { key, value } => {
                w.u8(CMD_PUT);
                w.str(key);
                w.bytes(value);
            }
        }
        w.buf
    }

    /// Reads a command back from a log entry's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "command");
        let cmd = match r.u8()? {
            CMD_APPEND => {
                let source = r.string()?;
                let seq = r.u64()?;
                let n = r.u64()?;
                let mut records = Vec::new();
                for _ in 0..n {
                    records.push(r.record()?);
                }
                Command::Append { source, seq, records }
            }
            CMD_PUT => Command::Put { key: r.string()?, value: r.bytes()? },
            t => return Err(r.err(format!("unknown command tag {t}"))),
        };
        if !r.is_empty() {
            return Err(r.err("trailing bytes"));
        }
        Ok(cmd)
    }
}

/// Where a batch's number falls in its source's sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    /// The next number after the highest seen.
    Next,
    /// Beyond the next number: the numbers in between (inclusive) are now recorded as missing.
    Gap {
        /// First missing number.
        from: u64,
        /// Last missing number.
        to: u64,
    },
    /// A number that was missing: the gap shrinks.
    FillsGap,
    /// A number already seen: a resend (its records are deduplicated by id).
    Resent,
}

/// What applying one command did; the answer a proposer gets once its entry is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The batch was applied: one answer per record, in the batch's order.
    Appended {
        /// [`Appended::New`] or [`Appended::Duplicate`] per record.
        results: Vec<Appended>,
        /// Where the batch number fell.
        seq: SeqStatus,
    },
    /// The batch was refused as a whole (a malformed record or a conflicting id); nothing was stored. The batch
    /// number still counts as seen.
    Rejected {
        /// Why.
        error: BillingError,
        /// Where the batch number fell.
        seq: SeqStatus,
    },
    /// A control-plane value was set.
    Put,
    /// An empty entry (a new leader's first entry): nothing to apply.
    Empty,
    /// Bytes that are not a command (never proposed by this crate): skipped, identically on every replica.
    Undecodable {
        /// Why it did not decode.
        reason: String,
    },
}

/// A source's batch numbers as seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceProgress {
    /// Highest batch number seen.
    pub last_seq: u64,
    /// Numbers below `last_seq` never seen, as inclusive ranges `start -> end`.
    pub missing: BTreeMap<u64, u64>,
    /// Batches applied (resends included).
    pub batches: u64,
}

impl SourceProgress {
    /// How many numbers below `last_seq` are missing.
    pub fn missing_count(&self) -> u64 {
        self.missing.iter().map(|(s, e)| e - s + 1).sum()
    }

    fn observe(&mut self, seq: u64) -> SeqStatus {
        self.batches += 1;
        if seq == self.last_seq + 1 {
            self.last_seq = seq;
            return SeqStatus::Next;
        }
        if seq > self.last_seq {
            let (from, to) = (self.last_seq + 1, seq - 1);
            self.missing.insert(from, to);
            self.last_seq = seq;
            return SeqStatus::Gap { from, to };
        }
        let range = self.missing.range(..=seq).next_back().map(|(s, e)| (*s, *e));
        match range {
            Some((start, end)) if seq <= end => {
                self.missing.remove(&start);
                if start < seq {
                    self.missing.insert(start, seq - 1);
                }
                if seq < end {
                    self.missing.insert(seq + 1, end);
                }
                SeqStatus::FillsGap
            }
            _ => SeqStatus::Resent,
        }
    }
}

/// The key of a running total.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TotalsKey {
    /// The tenant.
    pub namespace: String,
    /// `deployment/<name>` or `rental/<name>`.
    pub subject: String,
    /// The phase name ([`UsageKind::phase_name`](kiln_core::billing::UsageKind::phase_name)).
    pub phase: String,
    /// UTC day of the period start, `YYYY-MM-DD`.
    pub day: String,
}

impl TotalsKey {
    fn of(r: &UsageRecord) -> Self {
        TotalsKey {
            namespace: r.namespace.clone(),
            subject: r.subject.to_string(),
            phase: r.kind.phase_name().to_string(),
            day: utc_day(r.start_ms),
        }
    }
}

/// The replicated ledger state at one log index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerState {
    applied_index: u64,
    applied_term: u64,
    /// A persistent (structurally shared) map: [`LedgerState::freeze`] copies it in O(1), so a snapshot of a large
    /// ledger is encoded off the driver thread while the live state goes on applying.
    records: imbl::OrdMap<RecordId, UsageRecord>,
    sources: BTreeMap<String, SourceProgress>,
    totals: BTreeMap<TotalsKey, Totals>,
    values: BTreeMap<String, Vec<u8>>,
}

/// A frozen copy of a [`LedgerState`] at one applied index, cheap to make (the record map is shared with the live
/// state, which copies only the nodes it changes afterwards) and `Send`: its [`Frozen::encode`] — the expensive
/// part of a snapshot — runs on another thread.
#[derive(Clone, Debug)]
pub struct Frozen {
    applied_index: u64,
    applied_term: u64,
    records: imbl::OrdMap<RecordId, UsageRecord>,
    sources: BTreeMap<String, SourceProgress>,
    values: BTreeMap<String, Vec<u8>>,
}

impl Frozen {
    /// Index of the last entry applied to the frozen state.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Term of that entry.
    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }

    /// The deterministic serialization of the frozen state: exactly [`LedgerState::snapshot`] at its index.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.buf.reserve(64 + self.records.len() * 128);
        w.buf.extend_from_slice(SNAPSHOT_MAGIC);
        w.u64(self.applied_index);
        w.u64(self.applied_term);
        w.u64(self.records.len() as u64);
        for r in self.records.values() {
            w.record(r);
        }
        w.u64(self.sources.len() as u64);
        for (name, p) in &self.sources {
            w.str(name);
            w.u64(p.last_seq);
            w.u64(p.batches);
            w.u64(p.missing.len() as u64);
            for (s, e) in &p.missing {
                w.u64(*s);
                w.u64(*e);
            }
        }
        w.u64(self.values.len() as u64);
        for (k, v) in &self.values {
            w.str(k);
            w.bytes(v);
        }
        w.buf
    }
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"KLS1";

impl LedgerState {
    /// The empty state (before index 1).
    pub fn new() -> Self {
        Self::default()
    }

    /// Index of the last applied log entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Term of the last applied log entry.
    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }

    /// Number of records stored.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record is stored.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The record stored under `id`.
    pub fn record(&self, id: &RecordId) -> Option<&UsageRecord> {
        self.records.get(id)
    }

    /// All records in id order.
    pub fn records(&self) -> impl Iterator<Item = &UsageRecord> {
        self.records.values()
    }

    /// Per-source batch progress.
    pub fn sources(&self) -> &BTreeMap<String, SourceProgress> {
        &self.sources
    }

    /// Running totals per namespace / subject / phase / day.
    pub fn totals(&self) -> &BTreeMap<TotalsKey, Totals> {
        &self.totals
    }

    /// A control-plane value.
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.values.get(key).map(Vec::as_slice)
    }

    /// Applies the entry at `index` (term `term`) whose bytes are `data` (empty: a leader's no-op entry). Entries
    /// must come in log order, each exactly once: an index that is not `applied_index + 1` is an error and
    /// changes nothing. Bytes that do not decode are skipped ([`Outcome::Undecodable`]), as on every replica.
    pub fn apply(&mut self, index: u64, term: u64, data: &[u8]) -> Result<Outcome> {
        if index != self.applied_index + 1 {
            return Err(LedgerError::OutOfOrder { expected: self.applied_index + 1, got: index });
        }
        let outcome = if data.is_empty() {
            Outcome::Empty
        } else {
            match Command::decode(data) {
                Ok(cmd) => self.apply_command(cmd),
                Err(e) => Outcome::Undecodable { reason: e.to_string() },
            }
        };
        self.applied_index = index;
        self.applied_term = term;
        Ok(outcome)
    }

    fn apply_command(&mut self, cmd: Command) -> Outcome {
        match cmd {
            Command::Put { key, value } => {
                if value.is_empty() {
                    self.values.remove(&key);
                } else {
                    self.values.insert(key, value);
                }
                Outcome::Put
            }
            Command::Append { source, seq, records } => {
                let seq = self.sources.entry(source).or_default().observe(seq);
                let results = match self.check_batch(&records) {
                    Ok(results) => results,
                    Err(error) => return Outcome::Rejected { error, seq },
                };
                // Totals of the keys this batch touches, committed only if every addition succeeds.
                let mut totals: BTreeMap<TotalsKey, Totals> = BTreeMap::new();
                for (r, _) in records.iter().zip(&results).filter(|(_, a)| **a == Appended::New) {
                    let key = TotalsKey::of(r);
                    let current = self.totals.get(&key).copied().unwrap_or_default();
                    if let Err(error) = totals.entry(key).or_insert(current).add(r) {
                        return Outcome::Rejected { error, seq };
                    }
                }
                self.totals.extend(totals);
                for (r, _) in records.into_iter().zip(&results).filter(|(_, a)| **a == Appended::New) {
                    self.records.insert(r.id.clone(), r);
                }
                Outcome::Appended { results, seq }
            }
        }
    }

    /// The core's `append_all` checks — every record well formed, none conflicting with a stored record or with
    /// another record of the batch — and each record's answer: new, or an equal copy of one stored or earlier in
    /// the batch.
    fn check_batch(&self, records: &[UsageRecord]) -> std::result::Result<Vec<Appended>, BillingError> {
        let mut batch: BTreeMap<&RecordId, &UsageRecord> = BTreeMap::new();
        let mut results = Vec::with_capacity(records.len());
        for r in records {
            r.validate()?;
            let earlier = match batch.insert(&r.id, r) {
                Some(e) => Some(e),
                None => self.records.get(&r.id),
            };
            match earlier {
                Some(e) if e != r => return Err(BillingError::Conflict { id: r.id.to_string() }),
                Some(_) => results.push(Appended::Duplicate),
                None => results.push(Appended::New),
            }
        }
        Ok(results)
    }

    /// The deterministic serialization of the whole state (the snapshot's data).
    pub fn snapshot(&self) -> Vec<u8> {
        self.freeze().encode()
    }

    /// A frozen copy of the state as it is now, for encoding a snapshot elsewhere (O(1) in the number of
    /// records; the small per-source and key-value maps are copied).
    pub fn freeze(&self) -> Frozen {
        Frozen {
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            records: self.records.clone(),
            sources: self.sources.clone(),
            values: self.values.clone(),
        }
    }

    /// Restores a state from [`LedgerState::snapshot`] bytes; empty bytes are the empty state. Totals are rebuilt
    /// from the records.
    pub fn restore(bytes: &[u8]) -> Result<Self> {
        if bytes.is_empty() {
            return Ok(Self::new());
        }
        let mut r = Reader::new(bytes, "snapshot");
        if bytes.len() < 4 || &bytes[..4] != SNAPSHOT_MAGIC {
            return Err(r.err("not a ledger snapshot"));
        }
        r = Reader::new(&bytes[4..], "snapshot");
        let mut s = LedgerState { applied_index: r.u64()?, applied_term: r.u64()?, ..Self::default() };
        for _ in 0..r.u64()? {
            let rec = r.record()?;
            s.totals.entry(TotalsKey::of(&rec)).or_default().add(&rec)?;
            if s.records.insert(rec.id.clone(), rec).is_some() {
                return Err(r.err("a record id appears twice"));
            }
        }
        for _ in 0..r.u64()? {
            let name = r.string()?;
            let mut p = SourceProgress { last_seq: r.u64()?, batches: r.u64()?, ..Default::default() };
            for _ in 0..r.u64()? {
                p.missing.insert(r.u64()?, r.u64()?);
            }
            s.sources.insert(name, p);
        }
        for _ in 0..r.u64()? {
            s.values.insert(r.string()?, r.bytes()?);
        }
        if !r.is_empty() {
            return Err(r.err("trailing bytes"));
        }
        Ok(s)
    }
}

/// A read-only view of a state as the core's [`Ledger`], for `query`, `sum` and `total` with the core's exact
/// semantics. Appending through it is refused: writes go through the log ([`Command::Append`]).
#[derive(Debug)]
pub struct ReadView<'a>(pub &'a LedgerState);

impl Ledger for ReadView<'_> {
    fn append(&mut self, record: UsageRecord) -> kiln_core::billing::Result<Appended> {
        Err(BillingError::InvalidRecord {
            id: record.id.to_string(),
            reason: "a read view of the replicated ledger cannot append; propose Command::Append".to_string(),
        })
    }

    fn get(&self, id: &RecordId) -> kiln_core::billing::Result<Option<UsageRecord>> {
        Ok(self.0.records.get(id).cloned())
    }

    fn query(&self, query: &Query) -> kiln_core::billing::Result<Vec<UsageRecord>> {
        Ok(self.0.records.values().filter(|r| query.matches(r)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::billing::{GroupBy, MemoryLedger, Quantity, ServerlessPhase, Subject, UsageKind};
    use kiln_core::money::Money;

    fn busy(ns: &str, dep: &str, start_ms: i64, nanos: i128) -> UsageRecord {
        UsageRecord::new(
            "meter",
            ns,
            Subject::Deployment(dep.into()),
            UsageKind::Serverless(ServerlessPhase::Busy),
            "H100",
            Quantity::MicroGpuSeconds(1_000),
            Money::from_nanos(nanos),
            start_ms,
            start_ms + 60_000,
        )
    }

    fn append(source: &str, seq: u64, records: Vec<UsageRecord>) -> Vec<u8> {
        Command::Append { source: source.into(), seq, records }.encode()
    }

    #[test]
    fn commands_round_trip_and_garbage_is_refused() {
        let cmd = Command::Append { source: "s".into(), seq: 9, records: vec![busy("a", "d", 0, 5)] };
        assert_eq!(Command::decode(&cmd.encode()).unwrap(), cmd);
        let put = Command::Put { key: "k".into(), value: vec![1, 2] };
        assert_eq!(Command::decode(&put.encode()).unwrap(), put);
        assert!(Command::decode(&[9]).is_err());
        let mut trailing = put.encode();
        trailing.push(0);
        assert!(Command::decode(&trailing).is_err());
    }

    #[test]
    fn same_semantics_as_the_memory_ledger() {
        let mut state = LedgerState::new();
        let mut memory = MemoryLedger::new();
        let a = busy("a", "d", 0, 100);
        let b = busy("a", "d", 60_000, 200);
        let mut a_conflict = a.clone();
        a_conflict.amount = Money::from_nanos(1);

        let out = state.apply(1, 1, &append("m", 1, vec![a.clone(), b.clone(), a.clone()])).unwrap();
        let expected = memory.append_all(vec![a.clone(), b.clone(), a.clone()]).unwrap();
        assert_eq!(out, Outcome::Appended { results: expected, seq: SeqStatus::Next });

        let out = state.apply(2, 1, &append("m", 2, vec![busy("b", "d", 0, 1), a_conflict.clone()])).unwrap();
        assert!(memory.append_all(vec![busy("b", "d", 0, 1), a_conflict]).is_err());
        assert!(matches!(out, Outcome::Rejected { error: BillingError::Conflict { .. }, seq: SeqStatus::Next }));
        assert_eq!(state.len(), 2, "a rejected batch stores nothing");

        let view = ReadView(&state);
        assert_eq!(view.query(&Query::all()).unwrap(), memory.query(&Query::all()).unwrap());
        assert_eq!(view.sum(&Query::all(), GroupBy::Day).unwrap(), memory.sum(&Query::all(), GroupBy::Day).unwrap());
        let running: Totals = state.totals().values().fold(Totals::default(), |mut t, x| {
            t.records += x.records;
            t.amount = t.amount.checked_add(x.amount).unwrap();
            t
        });
        assert_eq!(running.records, 2);
        assert_eq!(running.amount, Money::from_nanos(300));
    }

    #[test]
    fn entries_must_come_in_order_exactly_once() {
        let mut state = LedgerState::new();
        assert!(matches!(state.apply(2, 1, &[]), Err(LedgerError::OutOfOrder { expected: 1, got: 2 })));
        assert_eq!(state.apply(1, 1, &[]).unwrap(), Outcome::Empty);
        assert!(state.apply(1, 1, &[]).is_err(), "re-applying an index is refused");
        assert_eq!((state.applied_index(), state.applied_term()), (1, 1));
        assert!(matches!(state.apply(2, 1, &[77]).unwrap(), Outcome::Undecodable { .. }));
        assert_eq!(state.applied_index(), 2, "garbage is skipped, not a stop");
    }

    #[test]
    fn gaps_in_a_source_stay_visible_until_filled() {
        let mut s = SourceProgress::default();
        assert_eq!(s.observe(1), SeqStatus::Next);
        assert_eq!(s.observe(5), SeqStatus::Gap { from: 2, to: 4 });
        assert_eq!(s.missing_count(), 3);
        assert_eq!(s.observe(3), SeqStatus::FillsGap);
        assert_eq!(s.missing.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(), [(2, 2), (4, 4)]);
        assert_eq!(s.observe(3), SeqStatus::Resent);
        assert_eq!(s.observe(5), SeqStatus::Resent);
        assert_eq!(s.observe(2), SeqStatus::FillsGap);
        assert_eq!(s.observe(4), SeqStatus::FillsGap);
        assert_eq!(s.missing_count(), 0);
        assert_eq!(s.observe(6), SeqStatus::Next);
        assert_eq!(s.batches, 8);
    }

    #[test]
    fn snapshots_are_deterministic_and_restore_exactly() {
        let log: Vec<Vec<u8>> = vec![
            append("m", 1, vec![busy("a", "d", 0, 1), busy("b", "e", 86_400_000, 2)]),
            Vec::new(),
            Command::Put { key: "fence/r1".into(), value: b"node-3".to_vec() }.encode(),
            append("agent-1", 4, vec![busy("a", "d", 60_000, 3)]),
            append("m", 1, vec![busy("a", "d", 0, 1)]),
        ];
        let run = || {
            let mut s = LedgerState::new();
            for (i, data) in log.iter().enumerate() {
                s.apply(i as u64 + 1, 2, data).unwrap();
            }
            s
        };
        let (one, two) = (run(), run());
        assert_eq!(one.snapshot(), two.snapshot(), "same log, same bytes");
        let restored = LedgerState::restore(&one.snapshot()).unwrap();
        assert_eq!(restored, one, "restore rebuilds records, sources, values and totals");
        assert_eq!(restored.applied_index(), 5);
        assert_eq!(restored.sources()["agent-1"].missing_count(), 3);
        assert_eq!(restored.value("fence/r1"), Some(&b"node-3"[..]));
        assert_eq!(LedgerState::restore(&[]).unwrap(), LedgerState::new());
        assert!(LedgerState::restore(b"nope").is_err());
        let snap = one.snapshot();
        assert!(LedgerState::restore(&snap[..snap.len() - 1]).is_err());
    }
}
