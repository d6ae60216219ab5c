//! Durable raft log storage: entries, hard state, the latest snapshot (with its conf state), compaction.
//!
//! Owns the [`LogStore`] trait — [`raft::Storage`] plus the few writes the driver loop needs, each with a stated
//! durability — and its two implementations: [`EngineStore`] on raft-engine (production; survives restarts) and
//! [`MemStore`] (the simulator's disk: memory with crash semantics, where what was not synced is lost by
//! [`MemDisk::crash`]). It does not know what entries mean (that is [`state`](crate::state)) or when to write
//! (that is [`node`](crate::node)).
//!
//! # Layout and invariants
//! - The log holds the contiguous entries `first_index..=last_index`; everything before `first_index` is covered
//!   by the stored snapshot, whose index is `>= first_index - 1` (compaction never passes the snapshot).
//! - When no entry is stored, `first_index = snapshot.index + 1` and `last_index = snapshot.index`.
//! - Appending entries starting at index `i` drops every stored entry at `i` or after (raft overwrites a
//!   conflicting tail); installing a snapshot drops the whole log.
//! - The membership is the snapshot's conf state: static peers, set once by `initialize`.
//! - [`EngineStore`] keeps a snapshot's data out of raft-engine, in a file of its own
//!   (`<dir>/snapshots/<index>-<term>.snap`, written to a temporary name, synced, renamed, directory synced); the
//!   engine holds the snapshot's metadata, written after the file. A large snapshot so never passes through the
//!   engine's write queue, where it would hold up the log's small synced appends, and can be written off the
//!   driver thread ([`SnapshotFiles`]). Files no stored snapshot names (a crash between the two writes, a
//!   superseded snapshot) are deleted at open and after each new snapshot.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command as EngineCommand, Engine, LogBatch, MessageExt};

use crate::{LedgerError, Result};

/// What one [`LogStore::persist`] call writes, atomically and synced.
#[derive(Debug, Default)]
pub struct Persist<'a> {
    /// A snapshot received from the leader: replaces the whole log.
    pub snapshot: Option<&'a Snapshot>,
    /// Entries to append (after the snapshot, if any).
    pub entries: &'a [Entry],
    /// The new hard state (term, vote, commit).
    pub hard_state: Option<&'a HardState>,
}

impl Persist<'_> {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none()
    }
}

/// Log storage as the driver loop uses it.
pub trait LogStore: raft::Storage {
    /// Writes a snapshot, entries and hard state in ONE synced write: after it returns, all of it survives a crash.
    fn persist(&mut self, write: Persist<'_>) -> Result<()>;

    /// Records a higher commit index (from a `LightReady`). Not synced by itself: the next synced write makes it
    /// durable. Losing it in a crash is safe, because applied state is never durable on its own — only snapshots
    /// are, and [`LogStore::save_snapshot`] is synced after it.
    fn persist_commit(&mut self, commit: u64) -> Result<()>;

    /// Stores a snapshot made locally at an applied index (synced). Also raises the stored commit index to the
    /// snapshot's index, so that a restart never finds a snapshot above the commit index.
    fn save_snapshot(&mut self, snapshot: Snapshot) -> Result<()>;

    /// Drops entries before `to` (clamped to `snapshot index + 1`). Not synced: a crash may bring them back,
    /// which is harmless.
    fn compact(&mut self, to: u64) -> Result<()>;

    /// Frees space that compaction made obsolete (raft-engine deletes whole log files nothing refers to). The
    /// node calls it after each compaction.
    fn reclaim(&mut self) -> Result<()> {
        Ok(())
    }

    /// The stored snapshot (index 0 and no data before the first one is made).
    fn stored_snapshot(&self) -> Snapshot;

    /// Where a snapshot built off the driver thread writes its data before [`LogStore::save_snapshot`] records it
    /// (`None`: the store keeps snapshot data itself, and `save_snapshot` is all there is).
    fn snapshot_files(&self) -> Option<SnapshotFiles> {
        None
    }

    /// The stored hard state.
    fn hard_state(&self) -> HardState;
}

fn snap_index(s: &Snapshot) -> u64 {
    s.get_metadata().index
}

fn check_range(low: u64, high: u64, first: u64, last: u64) -> raft::Result<()> {
    if low < first {
        return Err(raft::Error::Store(StorageError::Compacted));
    }
    if high > last + 1 || low > high {
        return Err(raft::Error::Store(StorageError::Unavailable));
    }
    Ok(())
}

fn limit_size(entries: &mut Vec<Entry>, max_size: Option<u64>) {
    if let Some(max) = max_size {
        raft::util::limit_size(entries, Some(max));
    }
}

/// The snapshot a fresh store starts from: index 0, the static membership.
fn initial_snapshot(voters: &[u64]) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut cs = ConfState::default();
    cs.set_voters(voters.to_vec());
    snap.mut_metadata().set_conf_state(cs);
    snap
}

// ---------------------------------------------------------------------------------------------------------------
// In memory, with crash semantics.

/// One copy of everything a store holds.
#[derive(Clone, Debug, Default)]
struct LogImage {
    entries: Vec<Entry>,
    hard_state: HardState,
    snapshot: Snapshot,
}

impl LogImage {
    fn first_index(&self) -> u64 {
        self.entries.first().map_or(snap_index(&self.snapshot) + 1, |e| e.index)
    }

    fn last_index(&self) -> u64 {
        self.entries.last().map_or(snap_index(&self.snapshot), |e| e.index)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let Some(head) = entries.first() else { return Ok(()) };
        let (first, last) = (self.first_index(), self.last_index());
        if head.index < first || head.index > last + 1 {
            return Err(LedgerError::Storage(format!(
                "append at {} outside the stored log {first}..={last}",
                head.index
            )));
        }
        self.entries.truncate((head.index - first) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    fn install(&mut self, snapshot: &Snapshot) {
        self.entries.clear();
        self.snapshot = snapshot.clone();
    }

    fn compact(&mut self, to: u64) {
        let to = to.min(snap_index(&self.snapshot) + 1);
        let first = self.first_index();
        if to > first {
            let n = ((to - first) as usize).min(self.entries.len());
            self.entries.drain(..n);
        }
    }
}

/// The simulator's disk for one replica: what the process sees, and what survives a crash.
#[derive(Debug, Default)]
pub struct MemDisk {
    current: LogImage,
    synced: LogImage,
    /// Synced writes so far (the simulator's fsync count).
    pub syncs: u64,
    /// A broken disk whose fsync does nothing (to check that the simulator notices lost writes).
    pub lies_about_sync: bool,
}

impl MemDisk {
    /// Loses everything written since the last synced write, as a power cut would.
    pub fn crash(&mut self) {
        self.current = self.synced.clone();
    }

    fn sync(&mut self) {
        if !self.lies_about_sync {
            self.synced = self.current.clone();
        }
        self.syncs += 1;
    }
}

/// In-memory [`LogStore`] over a shared [`MemDisk`]: drop the store (the process), [`MemDisk::crash`] the disk,
/// and [`MemStore::open`] it again to simulate a restart.
#[derive(Clone, Debug)]
pub struct MemStore {
    disk: Arc<Mutex<MemDisk>>,
}

impl MemStore {
    /// A fresh disk for a group with these voters.
    pub fn new_disk(voters: &[u64]) -> Arc<Mutex<MemDisk>> {
        let image = LogImage { snapshot: initial_snapshot(voters), ..LogImage::default() };
        Arc::new(Mutex::new(MemDisk { current: image.clone(), synced: image, syncs: 0, lies_about_sync: false }))
    }

    /// A store on `disk`.
    pub fn open(disk: Arc<Mutex<MemDisk>>) -> Self {
        MemStore { disk }
    }

    fn disk(&self) -> MutexGuard<'_, MemDisk> {
        // A panic while holding the lock leaves the disk as it was written; keep using it.
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl raft::Storage for MemStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let d = self.disk();
        Ok(RaftState::new(d.current.hard_state.clone(), d.current.snapshot.get_metadata().get_conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let d = self.disk();
        let (first, last) = (d.current.first_index(), d.current.last_index());
        check_range(low, high, first, last)?;
        let mut out = d.current.entries[(low - first) as usize..(high - first) as usize].to_vec();
        limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let d = self.disk();
        let meta = d.current.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        let (first, last) = (d.current.first_index(), d.current.last_index());
        if idx < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(d.current.entries[(idx - first) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.disk().current.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.disk().current.last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let d = self.disk();
        if snap_index(&d.current.snapshot) < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(d.current.snapshot.clone())
    }
}

impl LogStore for MemStore {
    fn persist(&mut self, write: Persist<'_>) -> Result<()> {
        let mut d = self.disk();
        if let Some(s) = write.snapshot {
            d.current.install(s);
        }
        d.current.append(write.entries)?;
        if let Some(hs) = write.hard_state {
            d.current.hard_state = hs.clone();
        }
        d.sync();
        Ok(())
    }

    fn persist_commit(&mut self, commit: u64) -> Result<()> {
        let mut d = self.disk();
        if commit > d.current.hard_state.commit {
            d.current.hard_state.commit = commit;
        }
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let mut d = self.disk();
        let index = snap_index(&snapshot);
        if index > d.current.last_index() || index < snap_index(&d.current.snapshot) {
            return Err(LedgerError::Storage(format!("snapshot at {index} is outside the stored log")));
        }
        if d.current.hard_state.commit < index {
            d.current.hard_state.commit = index;
        }
        d.current.snapshot = snapshot;
        d.sync();
        Ok(())
    }

    fn compact(&mut self, to: u64) -> Result<()> {
        self.disk().current.compact(to);
        Ok(())
    }

    fn stored_snapshot(&self) -> Snapshot {
        self.disk().current.snapshot.clone()
    }

    fn hard_state(&self) -> HardState {
        self.disk().current.hard_state.clone()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// On raft-engine.

/// The raft-engine group id of the ledger's one raft group.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

#[derive(Clone, Copy, Debug)]
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// [`LogStore`] on a raft-engine directory. Hard state and snapshot are cached in memory and written through.
pub struct EngineStore {
    engine: Arc<Engine>,
    files: SnapshotFiles,
    hard_state: HardState,
    snapshot: Snapshot,
}

/// A snapshot file is written and synced this many bytes at a time.
const SNAPSHOT_PIECE: usize = 1 << 20;
/// The fastest a snapshot file is written (a 30 MB ledger of 250,000 records: half a second, off the loop).
const SNAPSHOT_BYTES_PER_SEC: f64 = 64.0 * 1024.0 * 1024.0;

/// The directory of an [`EngineStore`]'s snapshot files; cheap to clone and usable from any thread.
#[derive(Clone, Debug)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    fn path(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("{index:020}-{term:020}.snap"))
    }

    /// Writes `snap`'s data durably under its index and term (temporary file, sync, rename, directory sync),
    /// paced for a thread off the loop. A file already there is the same deterministic state and is kept.
    pub fn write(&self, snap: &Snapshot) -> Result<()> {
        self.write_paced(snap, true)
    }

    fn write_paced(&self, snap: &Snapshot, paced: bool) -> Result<()> {
        let meta = snap.get_metadata();
        let path = self.path(meta.index, meta.term);
        if path.exists() {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{:020}-{:020}.tmp", meta.index, meta.term));
        {
            // In synced pieces, paced: a whole ledger flushed at once holds the disk (and, on ext4, the journal)
            // long enough to stall the log's own small synced appends for a third of a second; a piece at a time
            // lets them in between. (RocksDB's `bytes_per_sync` and rate limiter do the same for its files.)
            let mut f = std::fs::File::create(&tmp)?;
            let began = std::time::Instant::now();
            let mut written = 0usize;
            for piece in snap.data.chunks(SNAPSHOT_PIECE) {
                f.write_all(piece)?;
                f.sync_data()?;
                written += piece.len();
                let due = std::time::Duration::from_secs_f64(written as f64 / SNAPSHOT_BYTES_PER_SEC);
                if paced && let Some(ahead) = due.checked_sub(began.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    fn read(&self, index: u64, term: u64) -> Result<Vec<u8>> {
        let path = self.path(index, term);
        std::fs::read(&path).map_err(|e| {
            LedgerError::Storage(format!("the stored snapshot's data {} cannot be read: {e}", path.display()))
        })
    }

    /// Deletes every file but the one of the snapshot at (`index`, `term`). Errors are ignored: a file left
    /// behind is deleted next time.
    fn keep_only(&self, index: u64, term: u64) {
        let keep = self.path(index, term);
        if let Ok(dir) = std::fs::read_dir(&self.dir) {
            for e in dir.flatten() {
                if e.path() != keep {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn size(&self, index: u64, term: u64) -> usize {
        std::fs::metadata(self.path(index, term)).map_or(0, |m| m.len() as usize)
    }
}

/// The snapshot's metadata alone, as the engine stores it (its data is in a file).
fn meta_only(s: &Snapshot) -> Snapshot {
    Snapshot { metadata: s.metadata.clone(), ..Snapshot::default() }
}

impl std::fmt::Debug for EngineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStore")
            .field("dir", &self.engine.path())
            .field("hard_state", &self.hard_state)
            .field("snapshot_index", &snap_index(&self.snapshot))
            .field("snapshot_files", &self.files.dir)
            .finish()
    }
}

impl EngineStore {
    /// Opens (or creates) the store in `dir`. A new store starts with the static membership `voters`; an existing
    /// one keeps what it stored (and `voters` is ignored).
    pub fn open(dir: &Path, voters: &[u64]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cfg = raft_engine::Config { dir: dir.to_string_lossy().into_owned(), ..raft_engine::Config::default() };
        let engine = Arc::new(Engine::open(cfg)?);
        let files = SnapshotFiles { dir: dir.join("snapshots") };
        std::fs::create_dir_all(&files.dir)?;
        let hard_state = engine.get_message::<HardState>(GROUP, KEY_HARD_STATE)?.unwrap_or_default();
        let snapshot = match engine.get_message::<Snapshot>(GROUP, KEY_SNAPSHOT)? {
            // A store of an earlier version kept the data inline; the next snapshot moves it to a file.
            Some(s) if !s.data.is_empty() || snap_index(&s) == 0 => s,
            Some(mut s) => {
                let meta = s.get_metadata();
                s.data = files.read(meta.index, meta.term)?.into();
                s
            }
            None => {
                let s = initial_snapshot(voters);
                let mut batch = LogBatch::default();
                batch.put_message(GROUP, KEY_SNAPSHOT.to_vec(), &s)?;
                engine.write(&mut batch, true)?;
                s
            }
        };
        let meta = snapshot.get_metadata();
        files.keep_only(meta.index, meta.term);
        Ok(EngineStore { engine, files, hard_state, snapshot })
    }

    /// Bytes on disk: raft-engine's log files and the stored snapshot's file.
    pub fn used_size(&self) -> usize {
        let meta = self.snapshot.get_metadata();
        self.engine.get_used_size() + self.files.size(meta.index, meta.term)
    }

    /// Lets raft-engine delete log files nothing refers to any more (call after compaction, periodically).
    pub fn purge(&self) -> Result<()> {
        self.engine.purge_expired_files()?;
        Ok(())
    }

    fn first(&self) -> u64 {
        self.engine.first_index(GROUP).unwrap_or(snap_index(&self.snapshot) + 1)
    }

    fn last(&self) -> u64 {
        self.engine.last_index(GROUP).unwrap_or(snap_index(&self.snapshot))
    }
}

fn engine_err(e: raft_engine::Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for EngineStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.snapshot.get_metadata().get_conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        check_range(low, high, self.first(), self.last())?;
        let mut out = Vec::with_capacity((high - low) as usize);
        if low < high {
            let max = max_size.into().map(|m| usize::try_from(m).unwrap_or(usize::MAX));
            self.engine.fetch_entries_to::<EntryExt>(GROUP, low, high, max, &mut out).map_err(engine_err)?;
        }
        // raft-engine's size limit may return none; raft needs at least one entry when any is asked for.
        if out.is_empty() && low < high {
            self.engine.fetch_entries_to::<EntryExt>(GROUP, low, low + 1, None, &mut out).map_err(engine_err)?;
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.engine.get_entry::<EntryExt>(GROUP, idx).map_err(engine_err)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if snap_index(&self.snapshot) < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

impl LogStore for EngineStore {
    fn persist(&mut self, write: Persist<'_>) -> Result<()> {
        if write.is_empty() {
            return Ok(());
        }
        let mut batch = LogBatch::default();
        if let Some(s) = write.snapshot {
            // The data first (synced, in its file), then the metadata with the rest of the write. Not paced: this
            // runs in the loop of a replica that is behind, which has nothing better to do.
            self.files.write_paced(s, false)?;
            // Drop the whole log: everything up to and past the snapshot.
            let past = self.last().max(snap_index(s)) + 1;
            batch.add_command(GROUP, EngineCommand::Compact { index: past });
            batch.put_message(GROUP, KEY_SNAPSHOT.to_vec(), &meta_only(s))?;
        }
        if let Some(head) = write.entries.first() {
            let (first, last) = match write.snapshot {
                Some(s) => (snap_index(s) + 1, snap_index(s)),
                None => (self.first(), self.last()),
            };
            if head.index < first || head.index > last + 1 {
                return Err(LedgerError::Storage(format!(
                    "append at {} outside the stored log {first}..={last}",
                    head.index
                )));
            }
            batch.add_entries::<EntryExt>(GROUP, write.entries)?;
        }
        if let Some(hs) = write.hard_state {
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), hs)?;
        }
        self.engine.write(&mut batch, true)?;
        if let Some(s) = write.snapshot {
            self.snapshot = s.clone();
            self.files.keep_only(snap_index(s), s.get_metadata().term);
        }
        if let Some(hs) = write.hard_state {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    fn persist_commit(&mut self, commit: u64) -> Result<()> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        let mut batch = LogBatch::default();
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs)?;
        self.engine.write(&mut batch, false)?;
        self.hard_state = hs;
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let index = snap_index(&snapshot);
        if index > self.last() || index < snap_index(&self.snapshot) {
            return Err(LedgerError::Storage(format!("snapshot at {index} is outside the stored log")));
        }
        // Built off the driver thread, the file is there already; otherwise it is written now (unpaced: the
        // caller waits for it either way).
        self.files.write_paced(&snapshot, false)?;
        let mut batch = LogBatch::default();
        batch.put_message(GROUP, KEY_SNAPSHOT.to_vec(), &meta_only(&snapshot))?;
        let mut hs = self.hard_state.clone();
        if hs.commit < index {
            hs.commit = index;
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs)?;
        }
        self.engine.write(&mut batch, true)?;
        self.files.keep_only(index, snapshot.get_metadata().term);
        self.snapshot = snapshot;
        self.hard_state = hs;
        Ok(())
    }

    fn compact(&mut self, to: u64) -> Result<()> {
        let to = to.min(snap_index(&self.snapshot) + 1);
        if to > self.first() && self.engine.first_index(GROUP).is_some() {
            self.engine.compact_to(GROUP, to);
        }
        Ok(())
    }

    fn reclaim(&mut self) -> Result<()> {
        self.purge()
    }

    fn stored_snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }

    fn hard_state(&self) -> HardState {
        self.hard_state.clone()
    }

    fn snapshot_files(&self) -> Option<SnapshotFiles> {
        Some(self.files.clone())
    }
}

/// The size in bytes of a snapshot as stored (data and metadata).
pub fn snapshot_size(s: &Snapshot) -> usize {
    s.compute_size() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 16].into(), ..Entry::default() }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..HardState::default() }
    }

    fn snapshot_at(index: u64, term: u64, data: &[u8]) -> Snapshot {
        let mut s = initial_snapshot(&[1, 2, 3]);
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.data = data.to_vec().into();
        s
    }

    fn ents(s: &impl raft::Storage, low: u64, high: u64) -> Vec<(u64, u64)> {
        s.entries(low, high, None, GetEntriesContext::empty(false)).unwrap().iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn engine_store_writes_reopens_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = EngineStore::open(dir.path(), &[1, 2, 3]).unwrap();
            assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
            assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
            let es: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
            s.persist(Persist { entries: &es, hard_state: Some(&hs(1, 2, 3)), ..Default::default() }).unwrap();
            // A conflicting tail from a new term replaces 4 and 5.
            s.persist(Persist { entries: &[entry(4, 2)], hard_state: Some(&hs(2, 3, 3)), ..Default::default() })
                .unwrap();
            assert_eq!(ents(&s, 1, 5), [(1, 1), (2, 1), (3, 1), (4, 2)]);
            s.persist_commit(4).unwrap();
            s.engine.sync().unwrap();
        }
        let s = EngineStore::open(dir.path(), &[9]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 4));
        assert_eq!(ents(&s, 2, 5), [(2, 1), (3, 1), (4, 2)]);
        assert_eq!(s.term(4).unwrap(), 2);
        let st = s.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (2, 3, 4));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3], "the stored membership wins over the argument");
        assert!(matches!(
            s.entries(1, 6, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
    }

    #[test]
    fn engine_store_snapshot_and_compaction_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = EngineStore::open(dir.path(), &[1, 2, 3]).unwrap();
            let es: Vec<Entry> = (1..=10).map(|i| entry(i, 1)).collect();
            s.persist(Persist { entries: &es, hard_state: Some(&hs(1, 1, 6)), ..Default::default() }).unwrap();
            assert!(s.save_snapshot(snapshot_at(11, 1, b"x")).is_err(), "no snapshot past the log");
            s.save_snapshot(snapshot_at(8, 1, b"state@8")).unwrap();
            assert_eq!(s.hard_state().commit, 8, "commit raised to the snapshot");
            s.compact(6).unwrap();
            assert_eq!(s.first_index().unwrap(), 6);
            assert!(matches!(s.term(5), Err(raft::Error::Store(StorageError::Compacted))));
            assert!(matches!(
                s.entries(5, 7, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            s.compact(100).unwrap();
            assert_eq!(s.first_index().unwrap(), 9, "compaction stops at the snapshot");
            assert_eq!(s.term(8).unwrap(), 1, "the snapshot's term answers for its index");
            s.persist(Persist::default()).unwrap();
            s.engine.sync().unwrap();
            s.purge().unwrap();
        }
        let mut s = EngineStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (9, 10));
        assert_eq!(&s.snapshot(0, 2).unwrap().data[..], b"state@8");
        assert!(matches!(s.snapshot(9, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))));
        // Installing a leader's snapshot at 20 drops the whole log.
        let snap = snapshot_at(20, 3, b"state@20");
        s.persist(Persist { snapshot: Some(&snap), entries: &[entry(21, 3)], hard_state: Some(&hs(3, 2, 20)) })
            .unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 21));
        drop(s);
        let s = EngineStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 21));
        assert_eq!(s.term(20).unwrap(), 3);
        assert_eq!(s.hard_state().commit, 20);
    }

    #[test]
    fn engine_store_keeps_snapshot_data_in_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("snapshots");
        {
            let mut s = EngineStore::open(dir.path(), &[1, 2, 3]).unwrap();
            let es: Vec<Entry> = (1..=10).map(|i| entry(i, 1)).collect();
            s.persist(Persist { entries: &es, hard_state: Some(&hs(1, 1, 9)), ..Default::default() }).unwrap();
            // Built off the loop: the file first, then the record of it.
            let snap = snapshot_at(5, 1, b"state@5");
            s.snapshot_files().unwrap().write(&snap).unwrap();
            s.save_snapshot(snap).unwrap();
            s.save_snapshot(snapshot_at(8, 1, b"state@8")).unwrap();
            let names: Vec<String> =
                std::fs::read_dir(&files).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            assert_eq!(names.len(), 1, "the superseded snapshot's file is gone: {names:?}");
            let stored = s.engine.get_message::<Snapshot>(GROUP, KEY_SNAPSHOT).unwrap().unwrap();
            assert!(stored.data.is_empty(), "the engine holds the metadata only");
            assert_eq!(stored.get_metadata().index, 8);
            assert!(s.used_size() >= 7, "the file counts as disk usage");
        }
        // A crash left a half-written file and an orphan behind: both go at open.
        std::fs::write(files.join("00000000000000000009-00000000000000000001.tmp"), b"half").unwrap();
        std::fs::write(files.join("00000000000000000007-00000000000000000001.snap"), b"old").unwrap();
        let s = EngineStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(&s.stored_snapshot().data[..], b"state@8");
        assert_eq!(std::fs::read_dir(&files).unwrap().count(), 1);
        drop(s);
        // The file lost: a clear error, not an empty ledger.
        for e in std::fs::read_dir(&files).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let err = EngineStore::open(dir.path(), &[1, 2, 3]).unwrap_err().to_string();
        assert!(err.contains("cannot be read"), "{err}");
    }

    #[test]
    fn mem_store_loses_only_what_was_not_synced() {
        let disk = MemStore::new_disk(&[1, 2, 3]);
        let mut s = MemStore::open(disk.clone());
        let es: Vec<Entry> = (1..=4).map(|i| entry(i, 1)).collect();
        s.persist(Persist { entries: &es, hard_state: Some(&hs(1, 1, 2)), ..Default::default() }).unwrap();
        s.persist_commit(4).unwrap();
        s.compact(3).unwrap(); // ignored: no snapshot covers 1..3 yet
        assert_eq!(s.first_index().unwrap(), 1);
        drop(s);
        disk.lock().unwrap().crash();
        let mut s = MemStore::open(disk.clone());
        assert_eq!(s.hard_state().commit, 2, "the unsynced commit is lost");
        assert_eq!(ents(&s, 1, 5).len(), 4, "synced entries survive");
        s.save_snapshot(snapshot_at(3, 1, b"s")).unwrap();
        assert_eq!(s.hard_state().commit, 3);
        s.compact(4).unwrap();
        assert_eq!(s.first_index().unwrap(), 4);
        drop(s);
        disk.lock().unwrap().crash();
        let s = MemStore::open(disk);
        assert_eq!(s.first_index().unwrap(), 1, "an unsynced compaction comes back after a crash, harmlessly");
        assert_eq!(s.term(3).unwrap(), 1);
        assert_eq!(&s.stored_snapshot().data[..], b"s");
    }
}
