//! What the controller keeps across restarts: prediction records and the deployment counters users read as totals
//! (`status.counters`). It owns the record format, the size limits, the [`PredictionStore`] trait with its two
//! implementations — [`RedbStore`] (an embedded, crash-safe B-tree file in the state directory; what `kiln up` and
//! `kiln controller` use) and [`MemoryStore`] (the same encoding in memory, for tests) — and the [`Persister`], the
//! one writer thread that batches the gateway's and the control loop's writes into transactions. It knows nothing of
//! HTTP or of the control loop: the gateway turns its predictions into [`PredictionRecord`]s and back (a record's
//! status, failure kind and metrics are [`crate::prediction`]'s types, stored as they serialize). A replicated
//! ledger can later replace [`RedbStore`] behind the same trait.
//!
//! Writes are asynchronous: the hot path hands a record to the writer's queue and goes on; the writer gathers
//! writes for a few milliseconds, keeps the last version of each prediction, and commits them in one durable
//! transaction (group commit). A crash can lose the writes of the last ~25 ms and of the commit in progress;
//! [`Persister::flush`] waits until everything queued before it is on disk.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::SystemTime,
};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::prediction::{FailureKind, Metrics, PredictionStatus};

/// The largest input kept with a record, bytes of JSON; a larger one is dropped (its size noted).
pub const INPUT_LIMIT: usize = 64 * 1024;
/// The largest output kept with a record, bytes of JSON; a larger one is dropped (its size noted).
pub const OUTPUT_LIMIT: usize = 1024 * 1024;

/// A deployment's counters as kept across restarts: totals since it was created (shown as `status.counters` and by
/// `GET /v1/deployments`; stored as this JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// Predictions received.
    #[serde(default)]
    pub requests: i64,
    /// Predictions that failed (model error, timeout, rejected while cold).
    #[serde(default)]
    pub failed_requests: i64,
    /// Replicas started without a warm replica of this deployment.
    #[serde(default)]
    pub cold_starts: i64,
    /// Replica starts that failed.
    #[serde(default)]
    pub failed_starts: i64,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened, read or written.
    #[error("prediction store {path}: {source}")]
    Database {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: Box<redb::Error>,
    },
    /// A record could not be encoded.
    #[error("encoding the record of {id}: {source}")]
    Encode {
        /// Prediction id or counters key.
        id: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The writer's transaction failed (the cause was logged when it happened).
    #[error("writing to the prediction store failed: {0}")]
    WriteFailed(String),
    /// The writer thread is gone (it panicked, or the process is ending).
    #[error("the prediction store's writer stopped")]
    WriterStopped,
}

/// A `Result` with a [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A prediction as stored: what `GET /v1/predictions/{id}` returns, plus its webhook and why it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRecord {
    /// Id.
    pub id: String,
    /// `namespace/name` of the deployment.
    pub model: String,
    /// The deployment's version when it was created.
    pub version: String,
    /// Where it is in its life.
    pub status: PredictionStatus,
    /// Input (`null` when dropped).
    pub input: Value,
    /// Size of the input's JSON when it was larger than [`INPUT_LIMIT`] and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_dropped_bytes: Option<usize>,
    /// Output (`null` when dropped).
    pub output: Value,
    /// Size of the output's JSON when it was larger than [`OUTPUT_LIMIT`] and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dropped_bytes: Option<usize>,
    /// Error.
    pub error: Option<String>,
    /// Why it failed. Records written before this field was kept lack it: their `metrics` flags say it
    /// ([`Metrics::failure`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// Logs.
    #[serde(default)]
    pub logs: String,
    /// Metrics as the API shows them.
    pub metrics: Metrics,
    /// Created.
    pub created_at: SystemTime,
    /// Sent to a replica (or held for one).
    pub started_at: Option<SystemTime>,
    /// Finished.
    pub completed_at: Option<SystemTime>,
    /// Webhook URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// The webhook's events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhook_events_filter: Vec<String>,
    /// Whether a stream URL was asked for.
    #[serde(default)]
    pub stream: bool,
}

impl PredictionRecord {
    /// Whether the prediction has finished.
    pub fn is_finished(&self) -> bool {
        self.status.is_terminal()
    }

    /// Why it failed, `None` unless it did: the stored [`FailureKind`], or for a record written without one, what
    /// its `metrics` flags say.
    pub fn failure(&self) -> Option<FailureKind> {
        match self.status {
            PredictionStatus::Failed => Some(self.failure.unwrap_or_else(|| self.metrics.failure())),
            _ => None,
        }
    }

    /// The stored bytes: JSON, with an input or output over its limit replaced by `null` and its size noted.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let encode = |r: &Self| serde_json::to_vec(r).map_err(|source| StoreError::Encode { id: r.id.clone(), source });
        let bytes = encode(self)?;
        if bytes.len() <= INPUT_LIMIT.min(OUTPUT_LIMIT) {
            return Ok(bytes);
        }
        let size = |v: &Value| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        let (input, output) = (size(&self.input), size(&self.output));
        if input <= INPUT_LIMIT && output <= OUTPUT_LIMIT {
            return Ok(bytes);
        }
        let mut kept = self.clone();
        if input > INPUT_LIMIT {
            kept.input = Value::Null;
            kept.input_dropped_bytes = Some(input);
        }
        if output > OUTPUT_LIMIT {
            kept.output = Value::Null;
            kept.output_dropped_bytes = Some(output);
        }
        encode(&kept)
    }

    /// A record from its stored bytes.
    pub fn decode(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }
}

/// One atomic change to a store.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    /// Predictions written (inserted or replaced by id).
    pub predictions: Vec<PredictionRecord>,
    /// Predictions removed (expired).
    pub removed: Vec<String>,
    /// Counters by deployment written; `None` removes them (the deployment was deleted).
    pub counters: Vec<(String, Option<Counters>)>,
}

impl Batch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.predictions.is_empty() && self.removed.is_empty() && self.counters.is_empty()
    }
}

/// Everything a store holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// Prediction records, in id order.
    pub predictions: Vec<PredictionRecord>,
    /// Counters by deployment.
    pub counters: Vec<(String, Counters)>,
    /// Entries that could not be decoded (left out, and reported in the log).
    pub unreadable: usize,
}

/// Where prediction records and counters are kept.
pub trait PredictionStore: Send + Sync + std::fmt::Debug + 'static {
    /// Applies `batch` atomically and durably.
    fn write(&self, batch: &Batch) -> Result<()>;
    /// Everything stored.
    fn load(&self) -> Result<Snapshot>;
}

fn decode_all<'a>(
    predictions: impl Iterator<Item = (String, &'a [u8])>,
    counters: impl Iterator<Item = (String, &'a [u8])>,
) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (id, bytes) in predictions {
        match PredictionRecord::decode(bytes) {
            Ok(r) => snapshot.predictions.push(r),
            Err(e) => {
                tracing::warn!(%id, error = %e, "a stored prediction record does not decode; left out");
                snapshot.unreadable += 1;
            }
        }
    }
    for (key, bytes) in counters {
        match serde_json::from_slice(bytes) {
            Ok(c) => snapshot.counters.push((key, c)),
            Err(e) => {
                tracing::warn!(deployment = %key, error = %e, "stored counters do not decode; left out");
                snapshot.unreadable += 1;
            }
        }
    }
    snapshot
}

fn encode_counters(key: &str, c: &Counters) -> Result<Vec<u8>> {
    serde_json::to_vec(c).map_err(|source| StoreError::Encode { id: key.to_owned(), source })
}

const PREDICTIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("predictions.v1");
const COUNTERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("counters.v1");

/// The store in one [redb](https://www.redb.org) file: copy-on-write B-trees, each commit durable (fsync) and
/// atomic, safe against a crash at any point. One process opens it at a time.
#[derive(Debug)]
pub struct RedbStore {
    db: redb::Database,
    path: String,
}

impl RedbStore {
    /// Opens the file at `path`, creating it (and its tables) if needed.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let fail = |e: redb::Error| StoreError::Database { path: name.clone(), source: Box::new(e) };
        let db = redb::Database::create(path).map_err(|e| fail(e.into()))?;
        let txn = db.begin_write().map_err(|e| fail(e.into()))?;
        txn.open_table(PREDICTIONS).map_err(|e| fail(e.into()))?;
        txn.open_table(COUNTERS).map_err(|e| fail(e.into()))?;
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(Self { db, path: name })
    }

    fn fail(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Database { path: self.path.clone(), source: Box::new(e.into()) }
    }
}

impl PredictionStore for RedbStore {
    fn write(&self, batch: &Batch) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut predictions = txn.open_table(PREDICTIONS).map_err(|e| self.fail(e))?;
            for r in &batch.predictions {
                predictions.insert(r.id.as_str(), r.encode()?.as_slice()).map_err(|e| self.fail(e))?;
            }
            for id in &batch.removed {
                predictions.remove(id.as_str()).map_err(|e| self.fail(e))?;
            }
            let mut counters = txn.open_table(COUNTERS).map_err(|e| self.fail(e))?;
            for (key, c) in &batch.counters {
                match c {
                    Some(c) => counters.insert(key.as_str(), encode_counters(key, c)?.as_slice()),
                    None => counters.remove(key.as_str()),
                }
                .map_err(|e| self.fail(e))?;
            }
        }
        txn.commit().map_err(|e| self.fail(e))
    }

    fn load(&self) -> Result<Snapshot> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let read = |table: TableDefinition<'_, &str, &[u8]>| -> Result<Vec<(String, Vec<u8>)>> {
            let table = txn.open_table(table).map_err(|e| self.fail(e))?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(|e| self.fail(e))? {
                let (k, v) = entry.map_err(|e| self.fail(e))?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        };
        let (predictions, counters) = (read(PREDICTIONS)?, read(COUNTERS)?);
        Ok(decode_all(
            predictions.iter().map(|(k, v)| (k.clone(), v.as_slice())),
            counters.iter().map(|(k, v)| (k.clone(), v.as_slice())),
        ))
    }
}

type Table = BTreeMap<String, Vec<u8>>;

/// The store in memory, with the same encoding and limits as [`RedbStore`]: for tests, and for a process that
/// keeps nothing across restarts.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Encoded predictions by id, encoded counters by deployment.
    tables: Mutex<(Table, Table)>,
    writes: AtomicU64,
}

impl MemoryStore {
    /// Batches written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

impl PredictionStore for MemoryStore {
    fn write(&self, batch: &Batch) -> Result<()> {
        // Encode first, so a failing batch changes nothing.
        let predictions: Vec<_> =
            batch.predictions.iter().map(|r| Ok((r.id.clone(), r.encode()?))).collect::<Result<_>>()?;
        let counters: Vec<_> = batch
            .counters
            .iter()
            .map(|(k, c)| Ok((k.clone(), c.as_ref().map(|c| encode_counters(k, c)).transpose()?)))
            .collect::<Result<_>>()?;
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables.0.extend(predictions);
        for id in &batch.removed {
            tables.0.remove(id);
        }
        for (k, c) in counters {
            match c {
                Some(c) => tables.1.insert(k, c),
                None => tables.1.remove(&k),
            };
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn load(&self) -> Result<Snapshot> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        Ok(decode_all(
            tables.0.iter().map(|(k, v)| (k.clone(), v.as_slice())),
            tables.1.iter().map(|(k, v)| (k.clone(), v.as_slice())),
        ))
    }
}

enum Op {
    Put(Box<PredictionRecord>),
    Latest(String, std::sync::Weak<dyn RecordSource>),
    Remove(String),
    Counters(String, Option<Counters>),
    Flush(tokio::sync::oneshot::Sender<Result<()>>),
}

/// Most operations taken into one transaction.
const MAX_BATCH: usize = 4096;
/// How long the writer gathers writes after the first before it commits: the created, started and finished
/// writes of a short prediction then become one, and a busy gateway costs about 35 commits a second, not one per
/// transition. While it gathers, the writer sleeps and takes the queue whole when it wakes, so a queued write
/// wakes no thread (only the first of a batch does, and a flush, which commits at once). Half of a commit's CPU
/// is the commit itself (its pages written and synced, freed pages processed), not the records in it: at 2,000
/// predictions a second, 25 ms instead of 10 ms took the writer from 45 to 29 CPU-µs per prediction
/// (`kiln bench gateway`), for a crash window of 25 ms of writes instead of 10.
const LINGER: std::time::Duration = std::time::Duration::from_millis(25);

/// The one writer of a [`PredictionStore`]: a thread taking queued writes in batches (the last version of each
/// prediction and counter wins within a batch), one transaction each. Cheap to clone; the thread ends when the
/// last clone is dropped.
#[derive(Debug, Clone)]
pub struct Persister {
    tx: mpsc::Sender<Op>,
    stats: Arc<Stats>,
    /// The writer thread, unparked by a flush so it commits without waiting out [`LINGER`].
    writer: std::thread::Thread,
}

/// Where the writer reads the records it was asked to write in their latest version ([`Persister::put_latest`]):
/// the gateway's predictions in memory.
pub trait RecordSource: Send + Sync + 'static {
    /// The current record of prediction `id`; `None` if it is no longer there (nothing is written for it).
    fn record(&self, id: &str) -> Option<PredictionRecord>;
}

/// What the writer did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Records and counters written.
    pub written: AtomicU64,
    /// Transactions that failed (their writes are lost; each is logged).
    pub failures: AtomicU64,
    /// Time spent encoding and committing, microseconds.
    pub busy_us: AtomicU64,
}

impl Persister {
    /// Starts the writer thread over `store`.
    pub fn spawn(store: Arc<dyn PredictionStore>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        let writer = std::thread::Builder::new()
            .name("kiln-store-writer".into())
            .spawn(move || write_loop(&*store, &rx, &thread_stats))?
            .thread()
            .clone();
        Ok(Self { tx, stats, writer })
    }

    /// Queues a prediction record.
    pub fn put(&self, record: PredictionRecord) {
        let _ = self.tx.send(Op::Put(Box::new(record)));
    }

    /// Queues prediction `id` to be written as it is when the writer commits, read then from `source` (held
    /// weakly: the source owns this persister; one gone by then writes nothing): a prediction that changes several
    /// times within one batch (created, started and finished in a few milliseconds) is copied once, on the
    /// writer's thread, instead of once per change on the request's.
    pub fn put_latest(&self, id: String, source: std::sync::Weak<dyn RecordSource>) {
        let _ = self.tx.send(Op::Latest(id, source));
    }

    /// Queues the removal of a prediction.
    pub fn remove(&self, id: String) {
        let _ = self.tx.send(Op::Remove(id));
    }

    /// Queues a deployment's counters (`None`: remove them).
    pub fn counters(&self, deployment: String, counters: Option<Counters>) {
        let _ = self.tx.send(Op::Counters(deployment, counters));
    }

    /// Waits until everything queued before is written; the error of that last transaction, if it failed.
    pub async fn flush(&self) -> Result<()> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tx.send(Op::Flush(reply)).map_err(|_| StoreError::WriterStopped)?;
        self.writer.unpark();
        done.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// What the writer did so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// The last write to a prediction within a batch.
enum Write {
    Put(Box<PredictionRecord>),
    Latest(std::sync::Weak<dyn RecordSource>),
    Remove,
}

fn write_loop(store: &dyn PredictionStore, rx: &mpsc::Receiver<Op>, stats: &Stats) {
    while let Ok(first) = rx.recv() {
        let mut predictions: HashMap<String, Write> = HashMap::new();
        let mut counters: HashMap<String, Option<Counters>> = HashMap::new();
        let mut flushes = Vec::new();
        let mut take = |op| match op {
            Op::Put(r) => {
                predictions.insert(r.id.clone(), Write::Put(r));
            }
            Op::Latest(id, source) => {
                predictions.insert(id, Write::Latest(source));
            }
            Op::Remove(id) => {
                predictions.insert(id, Write::Remove);
            }
            Op::Counters(key, c) => {
                counters.insert(key, c);
            }
            Op::Flush(reply) => flushes.push(reply),
        };
        let mut flushing = matches!(first, Op::Flush(_));
        take(first);
        let until = std::time::Instant::now() + LINGER;
        let mut taken = 1;
        // Sleeps (no sender wakes a parked thread; a flush unparks it) and takes what queued meanwhile, until the
        // linger ends, a flush comes or the batch is full. `park_timeout` may return early: the loop checks.
        loop {
            while taken < MAX_BATCH {
                let Ok(op) = rx.try_recv() else { break };
                flushing |= matches!(op, Op::Flush(_));
                take(op);
                taken += 1;
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if flushing || taken >= MAX_BATCH || left.is_zero() {
                break;
            }
            std::thread::park_timeout(left);
        }
        let mut batch = Batch::default();
        for (id, w) in predictions {
            match w {
                Write::Put(r) => batch.predictions.push(*r),
                Write::Latest(source) => batch.predictions.extend(source.upgrade().and_then(|s| s.record(&id))),
                Write::Remove => batch.removed.push(id),
            }
        }
        batch.counters = counters.into_iter().collect();
        let written = (batch.predictions.len() + batch.removed.len() + batch.counters.len()) as u64;
        let began = std::time::Instant::now();
        let result = if batch.is_empty() { Ok(()) } else { store.write(&batch) };
        stats.busy_us.fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
        match &result {
            Ok(()) if written > 0 => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.written.fetch_add(written, Ordering::Relaxed);
            }
            Ok(()) => {}
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = written, "writing predictions to the store failed; these writes are lost");
            }
        }
        for reply in flushes {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::WriteFailed(e.to_string())),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prediction::{PredictionStatus::*, RunMetrics};
    use std::time::Duration;

    fn record(id: &str, status: PredictionStatus) -> PredictionRecord {
        let run = RunMetrics {
            predict_time: 0.01,
            queue_time: 0.5,
            cold_start: true,
            cold_start_time: Some(0.49),
            gpu_share: None,
            billed_amount: None,
        };
        PredictionRecord {
            id: id.into(),
            model: "ns/m".into(),
            version: "3".into(),
            status,
            input: serde_json::json!({ "x": [1, 2] }),
            input_dropped_bytes: None,
            output: if status == Succeeded { serde_json::json!([0.5, -0.25]) } else { Value::Null },
            output_dropped_bytes: None,
            error: None,
            failure: None,
            logs: String::new(),
            metrics: Metrics::new((status == Succeeded).then_some(run), None),
            created_at: SystemTime::UNIX_EPOCH + Duration::new(1_764_072_000, 123_456_789),
            started_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_072_001)),
            completed_at: (status == Succeeded).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_072_002)),
            webhook: Some("http://127.0.0.1:9/hook".into()),
            webhook_events_filter: vec!["completed".into()],
            stream: true,
        }
    }

    fn temp_file(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("predictions.redb")
    }

    fn roundtrip(store: &dyn PredictionStore) {
        let (a, b) = (record("a", Succeeded), record("b", Processing));
        let counters = Counters { requests: 7, failed_requests: 2, cold_starts: 1, failed_starts: 0 };
        store
            .write(&Batch {
                predictions: vec![a.clone(), b.clone(), record("c", Succeeded)],
                removed: vec![],
                counters: vec![("ns/m".into(), Some(counters.clone())), ("ns/gone".into(), Some(counters.clone()))],
            })
            .unwrap();
        store
            .write(&Batch { predictions: vec![], removed: vec!["c".into()], counters: vec![("ns/gone".into(), None)] })
            .unwrap();
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.predictions, vec![a, b], "exactly what was written, timestamps to the nanosecond");
        assert_eq!(snapshot.counters, vec![("ns/m".to_owned(), counters)]);
        assert_eq!(snapshot.unreadable, 0);
    }

    #[test]
    fn records_and_counters_round_trip_through_redb_and_memory() {
        let path = temp_file("roundtrip");
        roundtrip(&RedbStore::open(&path).unwrap());
        roundtrip(&MemoryStore::default());
    }

    #[test]
    fn redb_keeps_records_across_reopening_and_refuses_a_second_opener() {
        let path = temp_file("reopen");
        let store = RedbStore::open(&path).unwrap();
        store.write(&Batch { predictions: vec![record("a", Succeeded)], ..Batch::default() }).unwrap();
        let second = RedbStore::open(&path);
        assert!(second.is_err(), "a second process on the same state directory must not write beside the first");
        drop(store);
        let again = RedbStore::open(&path).unwrap();
        assert_eq!(again.load().unwrap().predictions, vec![record("a", Succeeded)]);
    }

    #[test]
    fn inputs_and_outputs_over_their_limits_are_dropped_with_their_size() {
        let mut r = record("big", Succeeded);
        r.input = serde_json::json!({ "text": "x".repeat(INPUT_LIMIT) });
        r.output = serde_json::json!("y".repeat(OUTPUT_LIMIT));
        let kept = PredictionRecord::decode(&r.encode().unwrap()).unwrap();
        assert_eq!(kept.input, Value::Null);
        assert_eq!(kept.input_dropped_bytes, Some(INPUT_LIMIT + 11), "{{\"text\":\"...\"}}");
        assert_eq!(kept.output, Value::Null);
        assert_eq!(kept.output_dropped_bytes, Some(OUTPUT_LIMIT + 2));
        assert_eq!((kept.id, kept.status, kept.metrics), (r.id.clone(), r.status, r.metrics));

        // Just under the limits: kept whole, even though the record as a whole is larger than either.
        r.input = serde_json::json!("x".repeat(INPUT_LIMIT - 2));
        r.output = serde_json::json!("y".repeat(OUTPUT_LIMIT - 2));
        let kept = PredictionRecord::decode(&r.encode().unwrap()).unwrap();
        assert_eq!(kept, r);
    }

    #[test]
    fn an_unreadable_record_is_left_out_not_fatal() {
        let store = MemoryStore::default();
        store.write(&Batch { predictions: vec![record("a", Succeeded)], ..Batch::default() }).unwrap();
        store.tables.lock().unwrap().0.insert("junk".into(), b"{not json".to_vec());
        let snapshot = store.load().unwrap();
        assert_eq!((snapshot.predictions.len(), snapshot.unreadable), (1, 1));
    }

    #[tokio::test]
    async fn the_persister_batches_keeps_the_last_version_and_flushes() {
        let store = Arc::new(MemoryStore::default());
        let persister = Persister::spawn(Arc::clone(&store) as Arc<dyn PredictionStore>).unwrap();
        for status in [Starting, Processing, Succeeded] {
            persister.put(record("a", status));
        }
        persister.put(record("gone", Succeeded));
        persister.remove("gone".into());
        persister.counters("ns/m".into(), Some(Counters { requests: 1, ..Default::default() }));
        persister.counters("ns/m".into(), Some(Counters { requests: 2, ..Default::default() }));
        persister.flush().await.unwrap();
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.predictions, vec![record("a", Succeeded)], "the last version of each, none removed");
        assert_eq!(snapshot.counters[0].1.requests, 2);
        let commits = persister.stats().commits.load(Ordering::Relaxed);
        assert!(
            (1..=7).contains(&commits) && commits == store.writes(),
            "{commits} commits, {} writes",
            store.writes()
        );
    }

    /// A source whose records can be changed after they were queued.
    #[derive(Default)]
    struct Live(Mutex<HashMap<String, PredictionRecord>>);

    impl RecordSource for Live {
        fn record(&self, id: &str) -> Option<PredictionRecord> {
            self.0.lock().unwrap().get(id).cloned()
        }
    }

    #[tokio::test]
    async fn latest_writes_store_the_version_current_at_the_commit() {
        let store = Arc::new(MemoryStore::default());
        let persister = Persister::spawn(Arc::clone(&store) as Arc<dyn PredictionStore>).unwrap();
        let live = Arc::new(Live::default());
        let source = || Arc::downgrade(&live) as std::sync::Weak<dyn RecordSource>;
        let set = |r: PredictionRecord| live.0.lock().unwrap().insert(r.id.clone(), r);
        set(record("a", Starting));
        persister.put_latest("a".into(), source());
        // Changed after it was queued, before the commit: the commit has the change.
        set(record("a", Succeeded));
        set(record("b", Processing));
        persister.put_latest("b".into(), source());
        persister.put_latest("b".into(), source());
        // Queued, then removed: the removal wins; queued but gone from the source: nothing written.
        set(record("c", Succeeded));
        persister.put_latest("c".into(), source());
        persister.remove("c".into());
        persister.put_latest("missing".into(), source());
        persister.flush().await.unwrap();
        let stored = store.load().unwrap().predictions;
        assert_eq!(stored, vec![record("a", Succeeded), record("b", Processing)]);
        // Put and latest writes mix: the last one queued wins.
        persister.put_latest("b".into(), source());
        persister.put(record("b", Failed));
        persister.flush().await.unwrap();
        assert_eq!(store.load().unwrap().predictions[1], record("b", Failed));
        // A source gone by the commit writes nothing.
        let gone = Arc::new(Live::default());
        gone.0.lock().unwrap().insert("d".into(), record("d", Succeeded));
        persister.put_latest("d".into(), Arc::downgrade(&gone) as std::sync::Weak<dyn RecordSource>);
        drop(gone);
        persister.flush().await.unwrap();
        assert_eq!(store.load().unwrap().predictions.len(), 2);
    }

    #[test]
    fn failures_are_kept_by_kind_and_records_written_without_one_still_load() {
        let mut r = record("f", Failed);
        r.error = Some("too many requests are waiting".into());
        r.failure = Some(FailureKind::Overloaded { retry_after_s: 2 });
        r.metrics = Metrics::new(None, r.failure);
        let bytes = r.encode().unwrap();
        let stored: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(stored["failure"], serde_json::json!({ "kind": "overloaded", "retry_after_s": 2 }));
        assert_eq!(stored["status"], "failed");
        assert_eq!(PredictionRecord::decode(&bytes).unwrap(), r);

        // Records as this store wrote them before it kept the kind: the metrics flags say it.
        let old = |status: &str, metrics: Value| {
            let v = serde_json::json!({
                "id": "old", "model": "ns/m", "version": "3", "status": status, "input": {}, "output": null,
                "error": "e", "logs": "", "metrics": metrics,
                "created_at": { "secs_since_epoch": 1, "nanos_since_epoch": 0 }, "started_at": null,
                "completed_at": null
            });
            PredictionRecord::decode(&serde_json::to_vec(&v).unwrap()).unwrap()
        };
        let cases = [
            (serde_json::json!({ "overloaded": true, "retry_after": 3 }), FailureKind::Overloaded { retry_after_s: 3 }),
            (serde_json::json!({ "overloaded": false, "cold_start_timeout": true }), FailureKind::ColdStartTimeout),
            (serde_json::json!({ "overloaded": false }), FailureKind::Failed),
            (serde_json::json!({ "shutdown": true, "retry_after": 5 }), FailureKind::Shutdown { retry_after_s: 5 }),
            (serde_json::json!({ "controller_restarted": true }), FailureKind::Restarted),
        ];
        for (metrics, kind) in cases {
            let r = old("failed", metrics.clone());
            assert_eq!((r.failure, r.failure()), (None, Some(kind)), "{metrics}");
            assert_eq!(serde_json::to_value(r.metrics).unwrap(), metrics, "shown as before");
        }
        // And through a redb file holding such a record (the bytes as the old store wrote them).
        let path = temp_file("legacy");
        let store = RedbStore::open(&path).unwrap();
        let legacy = br#"{"id":"old","model":"ns/m","version":"3","status":"failed","input":{},"output":null,"error":"e","logs":"","metrics":{"overloaded":true,"retry_after":2},"created_at":{"secs_since_epoch":1,"nanos_since_epoch":0},"started_at":null,"completed_at":null,"stream":false}"#;
        let txn = store.db.begin_write().unwrap();
        txn.open_table(PREDICTIONS).unwrap().insert("old", legacy.as_slice()).unwrap();
        txn.commit().unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.unreadable, 0);
        assert_eq!(loaded.predictions[0].failure(), Some(FailureKind::Overloaded { retry_after_s: 2 }));
        let done = old(
            "succeeded",
            serde_json::json!({ "predict_time": 0.5, "queue_time": 0.0, "cold_start": false, "cold_start_time": null }),
        );
        assert_eq!((done.status, done.failure()), (Succeeded, None));
        assert_eq!(done.metrics.run.map(|m| m.predict_time), Some(0.5));
    }
}
