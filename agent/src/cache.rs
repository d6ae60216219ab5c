//! The node's weight cache: a content-addressed local-disk tier and a host-RAM tier, each size-bounded and evicted
//! least-recently-used first. (The third tier, idle copies left in GPU memory by stopped replicas, belongs to the
//! worker runtimes.) What it holds is reported to the controller, whose placement engine prefers nodes that avoid
//! a cold load.
//!
//! **Keys.** Entries are stored under the SHA-256 of their content (`sha256:<hex>`). A start finds its entry either
//! by the digest the spec gives or, for a `file://` source without one, by the source's identity: canonical path,
//! size, modification and change times, inode and device ([`SourceId`], one `stat`). A source file that changes
//! (a new write changes its size, mtime or ctime; a replaced file has a new inode) no longer matches and is fetched
//! again.
//!
//! **Hashing happens once**, when an entry is created: the source is streamed in chunks through SHA-256 into a
//! temporary file (no whole-file buffer), checked against the expected digest and the safetensors framing (header
//! and tensor bounds), then renamed into place. A hit hashes nothing: [`WeightCache::stats`] counts every byte
//! hashed, by purpose, and tests read it. Each disk entry has a sidecar (`<digest>.json`) recording its source's
//! identity and the cached file's own size and mtime, so the index survives a restart; an entry adopted without a
//! sidecar (written by an older agent) is hashed once on its first use. Starts of one source at the same time fetch
//! it once: the others wait for that fetch (by the source's canonical path) and take the entry it made.
//!
//! **Integrity.** A hit checks the cached file's size and mtime against the sidecar (one `stat`): a file truncated,
//! rewritten or replaced on disk is evicted and never served. Rot that keeps size and mtime (a flipped bit) is
//! caught by the scrubber ([`WeightCache::spawn_scrubber`]), which re-hashes one entry at a time at a bounded rate
//! and evicts the corrupt ones; the loader also re-validates the framing it reads.
//!
//! Sources: `file://` URIs (a path on the node, e.g. a shared file system). Object stores and registries are not
//! reachable from this build; their URIs are refused with an error saying so.

use std::{
    collections::HashMap,
    fs,
    io::{Read, Write},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where weights are held: the core's tier vocabulary. This cache holds [`Tier::HostRam`] and [`Tier::Disk`];
/// [`Tier::Gpu`] copies belong to the worker runtimes and [`Tier::Remote`] is the model store.
pub use kiln_core::autoscale::coldstart::Tier;

/// Bytes read and hashed per step when streaming a file.
const CHUNK: usize = 8 << 20;

/// Largest safetensors header accepted (the safetensors library's limit).
const MAX_HEADER: u64 = 100_000_000;

/// The name of a tier in this module's messages.
fn tier_title(tier: Tier) -> &'static str {
    match tier {
        Tier::Gpu => "Gpu",
        Tier::HostRam => "Host",
        Tier::Disk => "Disk",
        Tier::Remote => "Remote",
    }
}

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The URI scheme cannot be fetched here.
    #[error("{uri}: only file:// sources can be fetched by this agent")]
    Unsupported {
        /// The URI.
        uri: String,
    },
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The content does not match the expected digest.
    #[error("{uri}: digest {actual} does not match the expected {expected}")]
    DigestMismatch {
        /// The URI.
        uri: String,
        /// Expected.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The file is not a valid safetensors file (corrupt or truncated), or a cached file changed on disk.
    #[error("{uri}: not a valid safetensors file: {reason}")]
    Corrupt {
        /// The URI or cache path.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// A tier this cache does not hold ([`Tier::Gpu`] or [`Tier::Remote`]).
    #[error("{uri}: the weight cache holds host RAM and disk copies, not {} ones", tier_title(*.tier))]
    NotACacheTier {
        /// The URI.
        uri: String,
        /// The tier asked for.
        tier: Tier,
    },
    /// The entry is larger than the tier.
    #[error("{uri}: {size} bytes do not fit the {} tier ({capacity} bytes)", tier_title(*.tier))]
    TooLarge {
        /// The URI.
        uri: String,
        /// Size.
        size: u64,
        /// Tier.
        tier: Tier,
        /// Capacity.
        capacity: u64,
    },
}

/// A cached model, as reported to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where it came from.
    pub uri: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Tier.
    pub tier: Tier,
    /// Last use.
    pub last_used: SystemTime,
}

/// What identifies a source file without reading it: if none of these changed, neither did the content (short of
/// a write that restores both times, which needs privileges and a deliberate `utimensat` for the ctime).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceId {
    /// Canonical path (symlinks resolved).
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch (changes on every write, and cannot be set by `touch`).
    pub ctime_ns: i64,
    /// Inode.
    pub ino: u64,
    /// Device.
    pub dev: u64,
}

impl SourceId {
    fn of(path: &Path, meta: &fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Self {
            path: path.to_path_buf(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// A disk entry's sidecar: its source, and the cached file's size and mtime when written (the cheap check).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sidecar {
    uri: String,
    size: u64,
    mtime_ns: i64,
    source: Option<SourceId>,
}

#[derive(Debug)]
struct DiskEntry {
    entry: Entry,
    /// The cached file's mtime when written; `None` until the entry was hashed by this agent (adopted without a
    /// sidecar): its first use then hashes it.
    mtime_ns: Option<i64>,
    source: Option<SourceId>,
    /// When the scrubber last re-hashed it (`UNIX_EPOCH`: never).
    scrubbed: SystemTime,
}

#[derive(Debug)]
struct HostEntry {
    entry: Entry,
    bytes: Arc<HostBytes>,
}

/// What keeps a host-RAM entry's pages locked for DMA; dropping it unlocks them.
pub type PinGuard = Box<dyn std::any::Any + Send + Sync>;

/// Page-locks (pins) bytes for DMA to a GPU, or says why it could not; the cache keeps an entry it could not pin,
/// unpinned. Set by the node when the GPU path can run ([`WeightCache::set_pinner`], `crate::cuda::pin_host`).
#[derive(Clone)]
pub struct Pinner(pub Arc<PinFn>);

/// The function of a [`Pinner`].
pub type PinFn = dyn Fn(&[u8]) -> Result<PinGuard, String> + Send + Sync;

impl std::fmt::Debug for Pinner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pinner")
    }
}

/// The bytes of a host-RAM entry, pinned for DMA when the node's GPU path pinned them: the GPU loader then copies
/// them to the GPU straight from where they are, with no staging copy.
pub struct HostBytes {
    // Declared (so dropped) before `bytes`: the pages are unpinned before they are freed.
    pin: Option<PinGuard>,
    bytes: Box<[u8]>,
}

impl HostBytes {
    /// Bytes, not pinned.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { pin: None, bytes: bytes.into_boxed_slice() }
    }

    /// Bytes pinned by `pinner` (left unpinned, with a warning, when it fails).
    pub fn pinned(bytes: Vec<u8>, pinner: &Pinner) -> Self {
        let mut host = Self::new(bytes);
        match (pinner.0)(&host.bytes) {
            Ok(guard) => host.pin = Some(guard),
            Err(why) => tracing::warn!("a host-RAM cache entry stays pageable ({why}); the GPU loader stages it"),
        }
        host
    }

    /// Whether the pages are locked for DMA.
    pub fn is_pinned(&self) -> bool {
        self.pin.is_some()
    }
}

impl std::ops::Deref for HostBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBytes").field("len", &self.bytes.len()).field("pinned", &self.is_pinned()).finish()
    }
}

#[derive(Debug, Default)]
struct State {
    disk: Vec<DiskEntry>,
    host: Vec<HostEntry>,
}

/// Weights as a cache hit hands them out: a file the loader reads straight into its own buffers, or bytes
/// already in host RAM.
#[derive(Debug, Clone)]
pub enum Weights {
    /// A disk entry: its path and size.
    File {
        /// The cached file.
        path: PathBuf,
        /// Bytes.
        size: u64,
    },
    /// A host-RAM entry.
    Host(Arc<HostBytes>),
}

impl Weights {
    /// Bytes.
    pub fn len(&self) -> u64 {
        match self {
            Weights::File { size, .. } => *size,
            Weights::Host(bytes) => bytes.len() as u64,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All the bytes, read into memory (tests and tools; the loader reads files itself).
    pub fn to_vec(&self) -> Result<Vec<u8>, CacheError> {
        match self {
            Weights::File { path, .. } => {
                fs::read(path).map_err(|source| CacheError::Io { what: format!("reading {}", path.display()), source })
            }
            Weights::Host(bytes) => Ok(bytes.to_vec()),
        }
    }
}

/// Weights read from the cache, and the tier they came from.
pub type Cached = (Tier, Weights);

/// Where a start's weights were found: the tier they came from ([`Tier::Remote`] when they were fetched from the
/// source just now, into the disk cache), the entry's digest, and the weights.
#[derive(Debug, Clone)]
pub struct Located {
    /// The tier the weights came from.
    pub tier: Tier,
    /// `sha256:<hex>`.
    pub digest: String,
    /// The weights.
    pub weights: Weights,
}

/// Counters of the cache's work since it opened. Bytes hashed are what a hit must not add to.
#[derive(Debug, Default)]
struct Counters {
    hashed_fetch: AtomicU64,
    hashed_adopted: AtomicU64,
    hashed_scrub: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evicted_corrupt: AtomicU64,
    scrubbed_entries: AtomicU64,
}

/// A snapshot of [`Counters`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes hashed while fetching sources into the cache (once per entry created).
    pub hashed_fetch_bytes: u64,
    /// Bytes hashed on first use of entries adopted without a sidecar.
    pub hashed_adopted_bytes: u64,
    /// Bytes hashed by the background scrubber.
    pub hashed_scrub_bytes: u64,
    /// Starts served from the cache (either tier).
    pub hits: u64,
    /// Starts that fetched from the source.
    pub misses: u64,
    /// Entries evicted because they were corrupt or changed on disk.
    pub evicted_corrupt: u64,
    /// Entries the scrubber re-hashed.
    pub scrubbed_entries: u64,
}

impl CacheStats {
    /// Every byte hashed, for any purpose.
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed_fetch_bytes + self.hashed_adopted_bytes + self.hashed_scrub_bytes
    }
}

/// What one scrub step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrubOutcome {
    /// The entry's content still matches its digest.
    Verified(String),
    /// The entry was corrupt (or unreadable) and is gone.
    Evicted(String),
}

/// The weight cache of one node.
#[derive(Debug)]
pub struct WeightCache {
    dir: PathBuf,
    disk_capacity: u64,
    host_capacity: u64,
    state: Mutex<State>,
    counters: Counters,
    /// The sources being fetched now, by canonical path: a second start of one waits for the first's fetch and
    /// then finds its entry, rather than reading and hashing the same file beside it.
    fetching: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// Pins host-RAM entries for DMA when the GPU path can run ([`Self::set_pinner`]).
    pinner: std::sync::OnceLock<Pinner>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    hex_digest(Sha256::digest(bytes).as_slice())
}

fn hex_digest(hash: &[u8]) -> String {
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in hash {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn mtime_ns(meta: &fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

/// Streams `file` (from its start) through SHA-256, `rate` bytes per second at most (0: unbounded), adding to
/// `counter`; returns the digest and the bytes read.
fn hash_file(mut file: &fs::File, counter: &AtomicU64, rate: u64) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let (started, mut total) = (Instant::now(), 0u64);
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if rate > 0 {
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok((hex_digest(hasher.finalize().as_slice()), total))
}

/// Checks the safetensors framing of `file` (`size` bytes) without reading its data: the header parses (the
/// safetensors library checks that tensors' offsets are contiguous and match their shapes) and the data it
/// describes exactly fills the rest of the file.
fn check_safetensors_file(what: &str, file: &fs::File, size: u64) -> Result<(), CacheError> {
    let corrupt = |reason: String| CacheError::Corrupt { uri: what.to_owned(), reason };
    let io = |source| CacheError::Io { what: format!("reading {what}"), source };
    let mut len = [0u8; 8];
    if size < 8 {
        return Err(corrupt(format!("{size} bytes, the header length alone needs 8")));
    }
    file.read_exact_at(&mut len, 0).map_err(io)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER || header_len > size - 8 {
        return Err(corrupt(format!("the header declares {header_len} bytes but only {} follow", size - 8)));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(io)?;
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("bad header: {e}")))?;
    let end = metadata
        .offset_keys()
        .iter()
        .filter_map(|name| metadata.info(name).map(|info| info.data_offsets.1 as u64))
        .max()
        .unwrap_or(0);
    let expected = 8 + header_len + end;
    if expected != size {
        return Err(corrupt(format!("the header describes {expected} bytes, the file has {size}")));
    }
    Ok(())
}

fn check_safetensors(uri: &str, bytes: &[u8]) -> Result<(), CacheError> {
    safetensors::SafeTensors::deserialize(bytes)
        .map(|_| ())
        .map_err(|e| CacheError::Corrupt { uri: uri.to_owned(), reason: e.to_string() })
}

impl WeightCache {
    /// A cache keeping disk entries in `dir` (created if needed; entries already there are adopted, with their
    /// sidecars; leftovers of interrupted fetches are removed).
    pub fn open(dir: &Path, disk_capacity: u64, host_capacity: u64) -> Result<Self, CacheError> {
        fs::create_dir_all(dir)
            .map_err(|source| CacheError::Io { what: format!("creating {}", dir.display()), source })?;
        let mut state = State::default();
        let listing = fs::read_dir(dir)
            .map_err(|source| CacheError::Io { what: format!("reading {}", dir.display()), source })?;
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") {
                let _ = fs::remove_file(item.path());
                continue;
            }
            let Some(hex) = name.strip_prefix("sha256-").and_then(|n| n.strip_suffix(".safetensors")) else { continue };
            let Ok(meta) = item.metadata() else { continue };
            let digest = format!("sha256:{hex}");
            let sidecar: Option<Sidecar> =
                fs::read(dir.join(format!("sha256-{hex}.json"))).ok().and_then(|b| serde_json::from_slice(&b).ok());
            // A sidecar that disagrees with the file is ignored: the entry is hashed on first use.
            let sidecar = sidecar.filter(|s| s.size == meta.len() && s.mtime_ns == mtime_ns(&meta));
            state.disk.push(DiskEntry {
                entry: Entry {
                    uri: sidecar.as_ref().map(|s| s.uri.clone()).unwrap_or_default(),
                    digest,
                    size: meta.len(),
                    tier: Tier::Disk,
                    last_used: meta.accessed().or_else(|_| meta.modified()).unwrap_or(SystemTime::UNIX_EPOCH),
                },
                mtime_ns: sidecar.as_ref().map(|s| s.mtime_ns),
                source: sidecar.and_then(|s| s.source),
                scrubbed: SystemTime::UNIX_EPOCH,
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            disk_capacity,
            host_capacity,
            state: Mutex::new(state),
            counters: Counters::default(),
            fetching: Mutex::default(),
            pinner: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{}.safetensors", digest.replace(':', "-")))
    }

    fn sidecar_of(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{}.json", digest.replace(':', "-")))
    }

    /// The cache's counters since it opened.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hashed_fetch_bytes: get(&c.hashed_fetch),
            hashed_adopted_bytes: get(&c.hashed_adopted),
            hashed_scrub_bytes: get(&c.hashed_scrub),
            hits: get(&c.hits),
            misses: get(&c.misses),
            evicted_corrupt: get(&c.evicted_corrupt),
            scrubbed_entries: get(&c.scrubbed_entries),
        }
    }

    /// The identity of a `file://` source (one `stat`): a regular file only (a device such as `/dev/zero` would be
    /// read forever, a FIFO would block).
    fn source_id(uri: &str) -> Result<SourceId, CacheError> {
        let Some(path) = uri.strip_prefix("file://") else {
            return Err(CacheError::Unsupported { uri: uri.to_owned() });
        };
        let io = |source| CacheError::Io { what: format!("reading {uri}"), source };
        let meta = fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
        }
        let canonical = fs::canonicalize(path).map_err(io)?;
        Ok(SourceId::of(&canonical, &meta))
    }

    /// The digest of what is cached for `uri`: by `expected_digest` when given, else by the source's identity.
    fn find(&self, expected_digest: Option<&str>, source: Option<&SourceId>) -> Option<String> {
        let s = self.lock();
        if let Some(d) = expected_digest {
            let held = s.host.iter().any(|h| h.entry.digest == d) || s.disk.iter().any(|e| e.entry.digest == d);
            return held.then(|| d.to_owned());
        }
        let source = source?;
        s.disk.iter().find(|e| e.source.as_ref() == Some(source)).map(|e| e.entry.digest.clone())
    }

    /// Finds the weights of `uri` for a start: from host RAM or the disk cache when held (no hashing: a cheap
    /// check of the cached file), else fetched from the source into the disk cache now ([`Tier::Remote`]). An
    /// entry found corrupt is evicted and the source fetched again.
    pub fn locate(&self, uri: &str, expected_digest: Option<&str>) -> Result<Located, CacheError> {
        let expected = expected_digest.filter(|d| !d.is_empty());
        let source = if expected.is_none() { Some(Self::source_id(uri)?) } else { None };
        if let Some(digest) = self.find(expected, source.as_ref()) {
            match self.read(&digest) {
                Some(Ok((tier, weights))) => {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Located { tier, digest, weights });
                }
                Some(Err(e)) => tracing::warn!("{uri}: the cached copy was bad ({e}); fetching it again"),
                None => {}
            }
        }
        let entry = self.fetch(uri, expected, Tier::Disk, source.map_or_else(|| Self::source_id(uri), Ok)?)?;
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let weights = match self.read(&entry.digest) {
            Some(Ok((_, weights))) => weights,
            Some(Err(e)) => return Err(e),
            None => return Err(CacheError::Unsupported { uri: uri.to_owned() }),
        };
        Ok(Located { tier: Tier::Remote, digest: entry.digest, weights })
    }

    /// Loads the disk copy of `uri` (found as [`Self::locate`] finds it) into host RAM, without fetching or
    /// hashing: for weights leaving a GPU. `Ok(None)` when the disk cache does not hold it or it is larger than
    /// host RAM's capacity.
    pub fn hold_in_host(&self, uri: &str, expected_digest: Option<&str>) -> Result<Option<Entry>, CacheError> {
        let expected = expected_digest.filter(|d| !d.is_empty());
        let source = if expected.is_none() { Some(Self::source_id(uri)?) } else { None };
        match self.cached(uri, expected, source.as_ref(), Tier::HostRam) {
            None | Some(Err(CacheError::TooLarge { .. })) => Ok(None),
            Some(found) => found.map(Some),
        }
    }

    /// Fetches `uri` into `tier` (host RAM also keeps a disk copy when it fits), checking `expected_digest` when
    /// given; returns the entry. Already cached content is only touched (and, for host RAM, loaded from the disk
    /// copy without hashing).
    pub fn prefetch(&self, uri: &str, expected_digest: Option<&str>, tier: Tier) -> Result<Entry, CacheError> {
        if matches!(tier, Tier::Gpu | Tier::Remote) {
            return Err(CacheError::NotACacheTier { uri: uri.to_owned(), tier });
        }
        let expected = expected_digest.filter(|d| !d.is_empty());
        if expected.is_none() && !uri.starts_with("file://") {
            return Err(CacheError::Unsupported { uri: uri.to_owned() });
        }
        let source = if expected.is_none() { Some(Self::source_id(uri)?) } else { None };
        if let Some(found) = self.cached(uri, expected, source.as_ref(), tier) {
            return found;
        }
        self.fetch(uri, expected, tier, source.map_or_else(|| Self::source_id(uri), Ok)?)
    }

    /// What is cached of `uri` for `tier`, without fetching: its entry in `tier`, or, for host RAM, its disk copy
    /// loaded into memory (not hashed). `None` when neither is there.
    fn cached(
        &self,
        uri: &str,
        expected: Option<&str>,
        source: Option<&SourceId>,
        tier: Tier,
    ) -> Option<Result<Entry, CacheError>> {
        let digest = self.find(expected, source)?;
        if let Some(entry) = self.lookup(&digest, tier) {
            return Some(Ok(entry));
        }
        if tier != Tier::HostRam {
            return None;
        }
        let Some(Ok((Tier::Disk, Weights::File { path, size }))) = self.read(&digest) else { return None };
        if size > self.host_capacity {
            return Some(Err(CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: self.host_capacity }));
        }
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(source) => return Some(Err(CacheError::Io { what: format!("reading {}", path.display()), source })),
        };
        let entry = Entry { uri: uri.to_owned(), digest, size, tier: Tier::HostRam, last_used: SystemTime::now() };
        self.store_host(entry.clone(), bytes);
        Some(Ok(entry))
    }

    /// Fetches `uri` (whose identity is `source`) into `tier`, one fetch of a source at a time: a start that finds
    /// the same source being fetched waits for that fetch, then takes the entry it made (or fetches itself if it
    /// failed).
    fn fetch(&self, uri: &str, expected: Option<&str>, tier: Tier, source: SourceId) -> Result<Entry, CacheError> {
        let key = source.path.clone();
        let flight = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(fetching.entry(key.clone()).or_default())
        };
        let fetched = {
            let _one_at_a_time = flight.lock().unwrap_or_else(|p| p.into_inner());
            // Made while this start waited (the source's identity is the same, so is its content).
            let lookup = if expected.is_some() { None } else { Some(&source) };
            match self.cached(uri, expected, lookup, tier) {
                Some(found) => found,
                None => self.fetch_now(uri, expected, tier, source),
            }
        };
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // Held by the map and this start only: nobody waits on it (a waiter clones it under this lock).
        if Arc::strong_count(&flight) == 2 {
            fetching.remove(&key);
        }
        fetched
    }

    /// Streams `uri` into the disk cache (hashing it on the way: the one time its content is hashed), or, when it
    /// fits only host RAM and `tier` is host RAM, into memory.
    fn fetch_now(&self, uri: &str, expected: Option<&str>, tier: Tier, source: SourceId) -> Result<Entry, CacheError> {
        let io = |source| CacheError::Io { what: format!("reading {uri}"), source };
        let file = fs::File::open(&source.path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
        }
        let size = meta.len();
        let limit = self.disk_capacity.max(self.host_capacity);
        if size > limit {
            return Err(CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: limit });
        }
        let check_digest = |actual: &str| match expected {
            Some(expected) if expected != actual => Err(CacheError::DigestMismatch {
                uri: uri.to_owned(),
                expected: expected.to_owned(),
                actual: actual.to_owned(),
            }),
            _ => Ok(()),
        };
        let now = SystemTime::now();
        if size > self.disk_capacity {
            if tier == Tier::Disk {
                return Err(CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: self.disk_capacity });
            }
            // Host RAM only: read it once, hash the bytes in memory.
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            (&file).take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
            self.counters.hashed_fetch.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let digest = digest_of(&bytes);
            check_digest(&digest)?;
            check_safetensors(uri, &bytes)?;
            if bytes.len() as u64 > self.host_capacity {
                let size = bytes.len() as u64;
                return Err(CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: self.host_capacity });
            }
            let entry = Entry { uri: uri.to_owned(), digest, size, tier: Tier::HostRam, last_used: now };
            self.store_host(entry.clone(), bytes);
            return Ok(entry);
        }
        // Stream source -> hash -> temporary file; check; rename into place.
        static FETCHES: AtomicU64 = AtomicU64::new(0);
        let tmp =
            self.dir.join(format!("fetch-{}-{}.partial", std::process::id(), FETCHES.fetch_add(1, Ordering::Relaxed)));
        let write_err = |source| CacheError::Io { what: format!("writing {}", tmp.display()), source };
        let written = (|| -> Result<(String, u64), CacheError> {
            let out =
                fs::File::options().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(write_err)?;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            let mut reader = (&file).take(self.disk_capacity.saturating_add(1));
            // Reading and hashing on this thread, writing on another, two buffers in flight: a fetch costs about
            // the slower of the two rather than their sum.
            let (full, to_write) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
            let (emptied, to_fill) = std::sync::mpsc::channel::<Vec<u8>>();
            let (read, out) = std::thread::scope(|scope| {
                let writer = scope.spawn(move || -> std::io::Result<fs::File> {
                    let mut out = out;
                    for buf in to_write {
                        out.write_all(&buf)?;
                        let _ = emptied.send(buf);
                    }
                    Ok(out)
                });
                let read = (|| -> std::io::Result<()> {
                    loop {
                        let mut buf = to_fill.try_recv().unwrap_or_default();
                        buf.resize(CHUNK, 0);
                        let n = reader.read(&mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        buf.truncate(n);
                        hasher.update(&buf);
                        self.counters.hashed_fetch.fetch_add(n as u64, Ordering::Relaxed);
                        total += n as u64;
                        if full.send(buf).is_err() {
                            return Ok(()); // the writer failed: its error is returned below
                        }
                    }
                })();
                drop(full);
                let out = writer.join().unwrap_or_else(|_| Err(std::io::Error::other("the cache writer panicked")));
                (read, out)
            });
            read.map_err(io)?;
            let out = out.map_err(write_err)?;
            if total > self.disk_capacity {
                return Err(CacheError::TooLarge {
                    uri: uri.to_owned(),
                    size: total,
                    tier: Tier::Disk,
                    capacity: self.disk_capacity,
                });
            }
            let digest = hex_digest(hasher.finalize().as_slice());
            check_digest(&digest)?;
            out.sync_all().map_err(write_err)?;
            check_safetensors_file(uri, &out, total)?;
            Ok((digest, total))
        })();
        let (digest, size) = match written {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let entry = Entry { uri: uri.to_owned(), digest: digest.clone(), size, tier: Tier::Disk, last_used: now };
        self.store_disk(&entry, &tmp, source)?;
        if tier == Tier::HostRam && size <= self.host_capacity {
            let path = self.path_of(&digest);
            let bytes = fs::read(&path)
                .map_err(|source| CacheError::Io { what: format!("reading {}", path.display()), source })?;
            let entry = Entry { tier: Tier::HostRam, ..entry };
            self.store_host(entry.clone(), bytes);
            return Ok(entry);
        } else if tier == Tier::HostRam {
            return Err(CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: self.host_capacity });
        }
        Ok(entry)
    }

    fn lookup(&self, digest: &str, tier: Tier) -> Option<Entry> {
        let mut s = self.lock();
        let now = SystemTime::now();
        match tier {
            Tier::HostRam => s.host.iter_mut().find(|h| h.entry.digest == digest).map(|h| {
                h.entry.last_used = now;
                h.entry.clone()
            }),
            Tier::Disk => s.disk.iter_mut().find(|e| e.entry.digest == digest).map(|e| {
                e.entry.last_used = now;
                e.entry.clone()
            }),
            Tier::Gpu | Tier::Remote => None,
        }
    }

    /// Moves the fetched file `tmp` into place as `entry` (evicting least-recently-used entries to make room) and
    /// writes its sidecar. Content already cached under the digest only gains the source.
    fn store_disk(&self, entry: &Entry, tmp: &Path, source: SourceId) -> Result<(), CacheError> {
        let path = self.path_of(&entry.digest);
        let mut s = self.lock();
        if let Some(e) = s.disk.iter_mut().find(|e| e.entry.digest == entry.digest) {
            let _ = fs::remove_file(tmp);
            e.entry.last_used = entry.last_used;
            e.entry.uri.clone_from(&entry.uri);
            e.source = Some(source);
            if let Some(mtime_ns) = e.mtime_ns {
                let sidecar =
                    Sidecar { uri: e.entry.uri.clone(), size: e.entry.size, mtime_ns, source: e.source.clone() };
                write_sidecar(&self.sidecar_of(&entry.digest), &sidecar);
            }
            return Ok(());
        }
        while s.disk.iter().map(|e| e.entry.size).sum::<u64>() + entry.size > self.disk_capacity {
            let Some(oldest) = (0..s.disk.len()).min_by_key(|&i| s.disk[i].entry.last_used) else { break };
            let gone = s.disk.swap_remove(oldest);
            let _ = fs::remove_file(self.path_of(&gone.entry.digest));
            let _ = fs::remove_file(self.sidecar_of(&gone.entry.digest));
        }
        // Renamed into place: a crash never leaves a partial file under the final name.
        let placed = fs::rename(tmp, &path).and_then(|()| fs::metadata(&path));
        let meta = match placed {
            Ok(meta) => meta,
            Err(source) => {
                let _ = fs::remove_file(tmp);
                return Err(CacheError::Io { what: format!("writing {}", path.display()), source });
            }
        };
        let sidecar =
            Sidecar { uri: entry.uri.clone(), size: entry.size, mtime_ns: mtime_ns(&meta), source: Some(source) };
        write_sidecar(&self.sidecar_of(&entry.digest), &sidecar);
        s.disk.push(DiskEntry {
            entry: entry.clone(),
            mtime_ns: Some(sidecar.mtime_ns),
            source: sidecar.source,
            scrubbed: SystemTime::now(),
        });
        Ok(())
    }

    /// Pins the host-RAM entries made from now on with `pinner` (the node sets it once, when the GPU path can
    /// run: pinned entries reach a GPU by DMA with no staging copy). Later calls are ignored.
    pub fn set_pinner(&self, pinner: Pinner) {
        let _ = self.pinner.set(pinner);
    }

    fn store_host(&self, entry: Entry, bytes: Vec<u8>) {
        let touch = |s: &mut State| {
            let held = s.host.iter_mut().find(|h| h.entry.digest == entry.digest);
            held.map(|h| h.entry.last_used = entry.last_used).is_some()
        };
        if touch(&mut self.lock()) {
            return;
        }
        // Pinning takes time (the kernel locks every page): outside the lock.
        let bytes = Arc::new(match self.pinner.get() {
            Some(pinner) => HostBytes::pinned(bytes, pinner),
            None => HostBytes::new(bytes),
        });
        let mut s = self.lock();
        if touch(&mut s) {
            return;
        }
        while s.host.iter().map(|h| h.entry.size).sum::<u64>() + entry.size > self.host_capacity {
            let Some(oldest) = (0..s.host.len()).min_by_key(|&i| s.host[i].entry.last_used) else { break };
            s.host.swap_remove(oldest);
        }
        s.host.push(HostEntry { entry, bytes });
    }

    /// The weights with `digest`, from host RAM or else from disk; `None` when not cached. A disk entry is checked
    /// cheaply (its file's size and mtime against the sidecar; an entry adopted without one is hashed once): one
    /// that fails is evicted and the error returned, never served.
    pub fn read(&self, digest: &str) -> Option<Result<Cached, CacheError>> {
        let recorded = {
            let mut s = self.lock();
            if let Some(h) = s.host.iter_mut().find(|h| h.entry.digest == digest) {
                h.entry.last_used = SystemTime::now();
                return Some(Ok((Tier::HostRam, Weights::Host(Arc::clone(&h.bytes)))));
            }
            let e = s.disk.iter().find(|e| e.entry.digest == digest)?;
            (e.entry.size, e.mtime_ns)
        };
        let path = self.path_of(digest);
        let what = path.display().to_string();
        let checked = (|| -> Result<(), CacheError> {
            let io = |source| CacheError::Io { what: format!("reading {what}"), source };
            let changed = |reason: String| CacheError::Corrupt { uri: what.clone(), reason };
            let file = fs::File::open(&path).map_err(io)?;
            let meta = file.metadata().map_err(io)?;
            match recorded {
                (size, Some(mtime)) => {
                    if meta.len() != size || mtime_ns(&meta) != mtime {
                        return Err(changed(format!(
                            "changed on disk since it was cached ({} bytes, expected {size}; mtime {} ns, \
                             expected {mtime})",
                            meta.len(),
                            mtime_ns(&meta)
                        )));
                    }
                    Ok(())
                }
                (_, None) => {
                    // Adopted without a sidecar: hash it this once.
                    let (actual, _) = hash_file(&file, &self.counters.hashed_adopted, 0).map_err(io)?;
                    if actual != digest {
                        return Err(CacheError::DigestMismatch {
                            uri: what.clone(),
                            expected: digest.to_owned(),
                            actual,
                        });
                    }
                    check_safetensors_file(&what, &file, meta.len())?;
                    let mut s = self.lock();
                    if let Some(e) = s.disk.iter_mut().find(|e| e.entry.digest == digest) {
                        e.mtime_ns = Some(mtime_ns(&meta));
                        e.scrubbed = SystemTime::now();
                        let sidecar = Sidecar {
                            uri: e.entry.uri.clone(),
                            size: meta.len(),
                            mtime_ns: mtime_ns(&meta),
                            source: e.source.clone(),
                        };
                        write_sidecar(&self.sidecar_of(digest), &sidecar);
                    }
                    Ok(())
                }
            }
        })();
        match checked {
            Ok(()) => {
                if let Some(e) = self.lock().disk.iter_mut().find(|e| e.entry.digest == digest) {
                    e.entry.last_used = SystemTime::now();
                }
                Some(Ok((Tier::Disk, Weights::File { path, size: recorded.0 })))
            }
            Err(e) => {
                tracing::warn!("evicting corrupt cache entry {digest}: {e}");
                self.counters.evicted_corrupt.fetch_add(1, Ordering::Relaxed);
                self.evict(digest, Some(Tier::Disk));
                Some(Err(e))
            }
        }
    }

    /// Re-hashes the disk entry scrubbed longest ago, reading at most `rate` bytes per second (0: unbounded); a
    /// corrupt one is evicted. `None` when there are no disk entries.
    pub fn scrub_once(&self, rate: u64) -> Option<ScrubOutcome> {
        let digest = {
            let s = self.lock();
            s.disk.iter().min_by_key(|e| e.scrubbed)?.entry.digest.clone()
        };
        let path = self.path_of(&digest);
        let result = fs::File::open(&path).and_then(|f| hash_file(&f, &self.counters.hashed_scrub, rate));
        self.counters.scrubbed_entries.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok((actual, _)) if actual == digest => {
                if let Some(e) = self.lock().disk.iter_mut().find(|e| e.entry.digest == digest) {
                    e.scrubbed = SystemTime::now();
                }
                Some(ScrubOutcome::Verified(digest))
            }
            Ok((actual, _)) => {
                tracing::warn!("scrub: cache entry {digest} now hashes to {actual}; evicting it");
                self.counters.evicted_corrupt.fetch_add(1, Ordering::Relaxed);
                self.evict(&digest, Some(Tier::Disk));
                Some(ScrubOutcome::Evicted(digest))
            }
            Err(e) => {
                tracing::warn!("scrub: cannot read cache entry {digest} ({e}); evicting it");
                self.counters.evicted_corrupt.fetch_add(1, Ordering::Relaxed);
                self.evict(&digest, Some(Tier::Disk));
                Some(ScrubOutcome::Evicted(digest))
            }
        }
    }

    /// Starts the background scrubber: every `every`, one disk entry is re-hashed at `rate` bytes per second at
    /// most, so a full pass over the cache costs bounded I/O. The thread ends when the cache is dropped.
    pub fn spawn_scrubber(
        self: &Arc<Self>,
        every: Duration,
        rate: u64,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let cache: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new().name("kiln-cache-scrub".into()).spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(cache) = cache.upgrade() else { return };
                cache.scrub_once(rate);
            }
        })
    }

    /// Drops `digest_or_uri` from `tier` (host RAM and disk when `None`; nothing for a tier this cache does not
    /// hold). Returns how many entries went.
    pub fn evict(&self, digest_or_uri: &str, tier: Option<Tier>) -> usize {
        if matches!(tier, Some(Tier::Gpu | Tier::Remote)) {
            return 0;
        }
        let mut s = self.lock();
        let matches = |e: &Entry| e.digest == digest_or_uri || (!e.uri.is_empty() && e.uri == digest_or_uri);
        let mut gone = 0;
        if tier != Some(Tier::Disk) {
            let before = s.host.len();
            s.host.retain(|h| !matches(&h.entry));
            gone += before - s.host.len();
        }
        if tier != Some(Tier::HostRam) {
            let (drop, keep): (Vec<DiskEntry>, Vec<DiskEntry>) =
                std::mem::take(&mut s.disk).into_iter().partition(|e| matches(&e.entry));
            for e in &drop {
                let _ = fs::remove_file(self.path_of(&e.entry.digest));
                let _ = fs::remove_file(self.sidecar_of(&e.entry.digest));
            }
            gone += drop.len();
            s.disk = keep;
        }
        gone
    }

    /// Everything cached, for the controller.
    pub fn report(&self) -> Vec<Entry> {
        let s = self.lock();
        s.host.iter().map(|h| h.entry.clone()).chain(s.disk.iter().map(|e| e.entry.clone())).collect()
    }

    /// Capacities: host, disk (bytes).
    pub fn capacities(&self) -> (u64, u64) {
        (self.host_capacity, self.disk_capacity)
    }
}

/// Writes a sidecar; a failure only costs a hash on the next restart, so it is logged, not returned.
fn write_sidecar(path: &Path, sidecar: &Sidecar) {
    let tmp = path.with_extension("json.partial");
    let written = serde_json::to_vec(sidecar)
        .map_err(std::io::Error::other)
        .and_then(|bytes| fs::write(&tmp, bytes))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A minimal valid safetensors file with one F32 tensor of `n` values.
    fn model(n: usize, fill: f32) -> Vec<u8> {
        let data: Vec<u8> = (0..n).flat_map(|_| fill.to_le_bytes()).collect();
        let header = format!(r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#, data.len());
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn prefetch_checks_digests_and_format_and_evicts_lru() {
        let dir = temp_dir("lru");
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap();
        let files: Vec<(String, Vec<u8>)> = (0..3)
            .map(|i| {
                let bytes = model(100, i as f32);
                let path = src.join(format!("m{i}.safetensors"));
                fs::write(&path, &bytes).unwrap();
                (format!("file://{}", path.display()), bytes)
            })
            .collect();
        let size = files[0].1.len() as u64;
        let cache = WeightCache::open(&dir.join("cache"), 2 * size, size).unwrap();
        let e0 = cache.prefetch(&files[0].0, Some(&digest_of(&files[0].1)), Tier::Disk).unwrap();
        assert_eq!((e0.size, e0.tier), (size, Tier::Disk));
        std::thread::sleep(std::time::Duration::from_millis(5));
        cache.prefetch(&files[1].0, None, Tier::HostRam).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        cache.prefetch(&files[2].0, None, Tier::Disk).unwrap();
        // Disk holds two: the oldest (m0) went. Host holds m1.
        let report = cache.report();
        let on_disk: Vec<&str> = report.iter().filter(|e| e.tier == Tier::Disk).map(|e| e.uri.as_str()).collect();
        assert_eq!(on_disk.len(), 2);
        assert!(!on_disk.contains(&files[0].0.as_str()));
        assert_eq!(cache.read(&digest_of(&files[1].1)).unwrap().unwrap().0, Tier::HostRam);
        assert_eq!(cache.read(&digest_of(&files[2].1)).unwrap().unwrap().1.to_vec().unwrap(), files[2].1);
        assert!(cache.read(&digest_of(&files[0].1)).is_none());

        let wrong = cache.prefetch(&files[0].0, Some("sha256:00"), Tier::Disk).unwrap_err();
        assert!(wrong.to_string().contains("does not match the expected sha256:00"), "{wrong}");
        assert!(matches!(cache.prefetch("s3://bucket/m", None, Tier::Disk), Err(CacheError::Unsupported { .. })));
        assert_eq!(cache.evict(&files[2].0, None), 1);
        assert!(cache.read(&digest_of(&files[2].1)).is_none());
        // Entries on disk survive a restart.
        let again = WeightCache::open(&dir.join("cache"), 2 * size, size).unwrap();
        assert_eq!(again.report().len(), 1);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn truncated_files_are_never_cached_and_corrupt_entries_are_evicted_not_served() {
        let dir = temp_dir("corrupt");
        let bytes = model(64, 1.5);
        let truncated = dir.join("truncated.safetensors");
        fs::write(&truncated, &bytes[..bytes.len() - 7]).unwrap();
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20).unwrap();
        let err = cache.prefetch(&format!("file://{}", truncated.display()), None, Tier::Disk).unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
        assert!(cache.report().is_empty());

        let good = dir.join("good.safetensors");
        fs::write(&good, &bytes).unwrap();
        let entry = cache.prefetch(&format!("file://{}", good.display()), None, Tier::Disk).unwrap();
        // The disk copy rots: the read fails clearly, and the entry is gone.
        let cached = dir.join("cache").join(format!("{}.safetensors", entry.digest.replace(':', "-")));
        let mut rotten = fs::read(&cached).unwrap();
        rotten.truncate(rotten.len() / 2);
        fs::write(&cached, rotten).unwrap();
        let err = cache.read(&entry.digest).unwrap().unwrap_err();
        assert!(err.to_string().contains("changed on disk since it was cached"), "{err}");
        assert!(cache.read(&entry.digest).is_none(), "evicted, never served");
        assert!(!cached.exists());
        assert_eq!(cache.stats().evicted_corrupt, 1);
        // A start of the same source heals the cache: the source is fetched again.
        let again = cache.locate(&format!("file://{}", good.display()), None).unwrap();
        assert_eq!((again.tier, again.digest.as_str()), (Tier::Remote, entry.digest.as_str()));
        assert_eq!(again.weights.to_vec().unwrap(), bytes);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn starts_of_one_new_source_at_once_fetch_and_hash_it_once() {
        let dir = temp_dir("flight");
        let bytes = model(1 << 20, 0.5);
        let src = dir.join("m.safetensors");
        fs::write(&src, &bytes).unwrap();
        let uri = format!("file://{}", src.display());
        let cache = WeightCache::open(&dir.join("cache"), 64 << 20, 64 << 20).unwrap();
        let together = std::sync::Barrier::new(4);
        let located: Vec<Located> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        together.wait();
                        cache.locate(&uri, None).unwrap()
                    })
                })
                .collect();
            starts.into_iter().map(|s| s.join().unwrap()).collect()
        });
        for l in &located {
            assert_eq!(l.digest, located[0].digest);
            assert_eq!(l.weights.to_vec().unwrap(), bytes);
        }
        assert_eq!(cache.stats().hashed_bytes(), bytes.len() as u64, "read and hashed by one start, not by each");
        assert_eq!(cache.report().len(), 1);
        assert!(cache.fetching.lock().unwrap().is_empty(), "no fetch left in flight");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_hit_hashes_nothing_even_after_a_restart_and_says_it_came_from_the_disk_cache() {
        let dir = temp_dir("hit");
        let bytes = model(4096, 0.25);
        let src = dir.join("m.safetensors");
        fs::write(&src, &bytes).unwrap();
        let uri = format!("file://{}", src.display());
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20).unwrap();
        let first = cache.locate(&uri, None).unwrap();
        assert_eq!(first.tier, Tier::Remote, "fetched from the source");
        assert_eq!(cache.stats().hashed_bytes(), bytes.len() as u64, "hashed once, when the entry was created");
        for _ in 0..3 {
            let hit = cache.locate(&uri, None).unwrap();
            assert_eq!((hit.tier, hit.digest.as_str()), (Tier::Disk, first.digest.as_str()));
        }
        // By digest too.
        assert_eq!(cache.locate(&uri, Some(&first.digest)).unwrap().tier, Tier::Disk);
        let stats = cache.stats();
        assert_eq!((stats.hashed_bytes(), stats.hits, stats.misses), (bytes.len() as u64, 4, 1));
        drop(cache);
        // A restart keeps the index (the sidecar): still a disk hit, still nothing hashed.
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20).unwrap();
        let hit = cache.locate(&uri, None).unwrap();
        assert_eq!((hit.tier, hit.weights.to_vec().unwrap()), (Tier::Disk, bytes.clone()));
        assert_eq!(cache.stats().hashed_bytes(), 0);
        // Host RAM from the disk copy: no hash either, and reported as host RAM afterwards.
        cache.prefetch(&uri, None, Tier::HostRam).unwrap();
        assert_eq!(cache.locate(&uri, None).unwrap().tier, Tier::HostRam);
        assert_eq!(cache.stats().hashed_bytes(), 0);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_entry_adopted_without_a_sidecar_is_hashed_once_then_trusted() {
        let dir = temp_dir("adopted");
        let bytes = model(512, 0.5);
        let src = dir.join("m.safetensors");
        fs::write(&src, &bytes).unwrap();
        let uri = format!("file://{}", src.display());
        let digest = WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20)
            .unwrap()
            .prefetch(&uri, None, Tier::Disk)
            .unwrap()
            .digest;
        // An older agent's entry: no sidecar.
        fs::remove_file(dir.join("cache").join(format!("{}.json", digest.replace(':', "-")))).unwrap();
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20).unwrap();
        assert_eq!(cache.locate(&uri, Some(&digest)).unwrap().tier, Tier::Disk);
        assert_eq!(cache.stats().hashed_adopted_bytes, bytes.len() as u64, "hashed on first use");
        assert_eq!(cache.locate(&uri, Some(&digest)).unwrap().tier, Tier::Disk);
        assert_eq!(cache.stats().hashed_bytes(), bytes.len() as u64, "and not again");
        // The sidecar it wrote makes the next restart free too.
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20).unwrap();
        assert_eq!(cache.locate(&uri, Some(&digest)).unwrap().tier, Tier::Disk);
        assert_eq!(cache.stats().hashed_bytes(), 0);
        fs::remove_dir_all(&dir).ok();
    }

    /// Weights leaving a GPU go to host RAM from the disk copy, with no fetch and no hash; nothing happens for a
    /// model the disk cache does not hold or one too large for host RAM.
    #[test]
    fn hold_in_host_loads_the_disk_copy_only() {
        let dir = temp_dir("hold");
        let (small, big) = (model(100, 1.0), model(1000, 2.0));
        let uri = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            fs::write(&path, bytes).unwrap();
            format!("file://{}", path.display())
        };
        let (small_uri, big_uri) = (uri("small.safetensors", &small), uri("big.safetensors", &big));
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, small.len() as u64).unwrap();
        assert_eq!(cache.hold_in_host(&small_uri, None).unwrap(), None, "not cached: nothing fetched");
        assert!(cache.report().is_empty());
        cache.locate(&small_uri, None).unwrap();
        cache.locate(&big_uri, None).unwrap();
        let hashed = cache.stats().hashed_bytes();
        let held = cache.hold_in_host(&small_uri, None).unwrap().expect("held in host RAM");
        assert_eq!((held.tier, held.size), (Tier::HostRam, small.len() as u64));
        assert_eq!(cache.locate(&small_uri, None).unwrap().tier, Tier::HostRam);
        assert_eq!(cache.hold_in_host(&big_uri, None).unwrap(), None, "larger than host RAM");
        assert_eq!(cache.locate(&big_uri, None).unwrap().tier, Tier::Disk);
        assert_eq!(cache.stats().hashed_bytes(), hashed, "nothing hashed");
        fs::remove_dir_all(&dir).ok();
    }

    /// With a pinner set, host-RAM entries are pinned (the GPU loader then copies them straight); one it fails to
    /// pin is kept, unpinned; an evicted entry is unpinned before its bytes are freed.
    #[test]
    fn host_entries_are_pinned_when_a_pinner_is_set_and_unpinned_on_eviction() {
        use std::sync::atomic::AtomicUsize;
        let dir = temp_dir("pin");
        let paths: Vec<String> = (0..3)
            .map(|i| {
                let path = dir.join(format!("m{i}.safetensors"));
                fs::write(&path, model(100 + i, i as f32)).unwrap();
                format!("file://{}", path.display())
            })
            .collect();
        let size = fs::metadata(dir.join("m2.safetensors")).unwrap().len();
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, size + 8).unwrap();
        // Before a pinner: pageable.
        cache.prefetch(&paths[0], None, Tier::HostRam).unwrap();
        let Weights::Host(first) = cache.locate(&paths[0], None).unwrap().weights else { panic!("not in host RAM") };
        assert!(!first.is_pinned());
        drop(first);
        // A guard that counts the live pins, and a pinner that refuses the third model.
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let live = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&live);
        let refuse = fs::read(dir.join("m2.safetensors")).unwrap().len();
        cache.set_pinner(Pinner(Arc::new(move |bytes: &[u8]| {
            if bytes.len() == refuse {
                return Err("no".into());
            }
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Guard(Arc::clone(&counter))) as PinGuard)
        })));
        cache.prefetch(&paths[1], None, Tier::HostRam).unwrap();
        let Weights::Host(second) = cache.locate(&paths[1], None).unwrap().weights else { panic!("not in host RAM") };
        assert!(second.is_pinned());
        assert_eq!(live.load(Ordering::SeqCst), 1);
        // The third evicts the second from host RAM (room for one); it could not be pinned and is served anyway.
        cache.prefetch(&paths[2], None, Tier::HostRam).unwrap();
        let Weights::Host(third) = cache.locate(&paths[2], None).unwrap().weights else { panic!("not in host RAM") };
        assert!(!third.is_pinned());
        assert_eq!(third.to_vec(), fs::read(dir.join("m2.safetensors")).unwrap());
        // The evicted entry stays pinned while a load still holds it, and is unpinned when the last holder lets go.
        assert_eq!(live.load(Ordering::SeqCst), 1);
        drop(second);
        assert_eq!(live.load(Ordering::SeqCst), 0);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_changed_source_file_is_fetched_again() {
        let dir = temp_dir("changed");
        let src = dir.join("m.safetensors");
        let uri = format!("file://{}", src.display());
        let (old, new) = (model(256, 1.0), model(256, 2.0));
        assert_eq!(old.len(), new.len());
        fs::write(&src, &old).unwrap();
        let cache = WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20).unwrap();
        let first = cache.locate(&uri, None).unwrap();
        assert_eq!(cache.locate(&uri, None).unwrap().tier, Tier::Disk);
        // Same size, rewritten in place: the ctime (and mtime) moved.
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&src, &new).unwrap();
        let second = cache.locate(&uri, None).unwrap();
        assert_eq!(second.tier, Tier::Remote, "re-fetched");
        assert_ne!(second.digest, first.digest);
        assert_eq!(second.weights.to_vec().unwrap(), new);
        assert_eq!(cache.stats().hashed_fetch_bytes, 2 * old.len() as u64);
        // Replaced by another file (a new inode) with the old content: fetched, and it is the old entry again.
        let other = dir.join("other");
        fs::write(&other, &old).unwrap();
        fs::rename(&other, &src).unwrap();
        let third = cache.locate(&uri, None).unwrap();
        assert_eq!((third.tier, third.digest.as_str()), (Tier::Remote, first.digest.as_str()));
        assert_eq!(cache.locate(&uri, None).unwrap().tier, Tier::Disk);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_scrubber_evicts_rot_the_cheap_check_cannot_see() {
        let dir = temp_dir("scrub");
        let bytes = model(1024, 3.0);
        let src = dir.join("m.safetensors");
        fs::write(&src, &bytes).unwrap();
        let uri = format!("file://{}", src.display());
        let cache = Arc::new(WeightCache::open(&dir.join("cache"), 1 << 20, 1 << 20).unwrap());
        let entry = cache.prefetch(&uri, None, Tier::Disk).unwrap();
        assert_eq!(cache.scrub_once(0), Some(ScrubOutcome::Verified(entry.digest.clone())));
        // A flipped bit, size and mtime kept.
        let cached = dir.join("cache").join(format!("{}.safetensors", entry.digest.replace(':', "-")));
        let mtime = fs::metadata(&cached).unwrap().modified().unwrap();
        let mut rotten = fs::read(&cached).unwrap();
        *rotten.last_mut().unwrap() ^= 0x40;
        fs::write(&cached, &rotten).unwrap();
        fs::File::options().write(true).open(&cached).unwrap().set_modified(mtime).unwrap();
        assert!(cache.read(&entry.digest).unwrap().is_ok(), "the cheap check passes: this is the scrubber's job");
        let before = cache.stats().hashed_scrub_bytes;
        assert_eq!(cache.scrub_once(0), Some(ScrubOutcome::Evicted(entry.digest.clone())));
        assert_eq!(cache.stats().hashed_scrub_bytes - before, bytes.len() as u64);
        assert!(cache.read(&entry.digest).is_none(), "never served again");
        assert!(!cached.exists());
        assert_eq!(cache.scrub_once(0), None, "nothing left to scrub");
        // The rate bound holds: 64 KiB at 1 MiB/s takes at least ~60 ms.
        let small = model(16 << 10, 1.0);
        fs::write(&src, &small).unwrap();
        cache.prefetch(&uri, None, Tier::Disk).unwrap();
        let started = Instant::now();
        assert!(matches!(cache.scrub_once(1 << 20), Some(ScrubOutcome::Verified(_))));
        assert!(started.elapsed() >= Duration::from_millis(55), "{:?}", started.elapsed());
        // The background thread ends once the cache is gone.
        let handle = cache.spawn_scrubber(Duration::from_millis(5), 0).unwrap();
        // It scrubs on its own (waited for, not timed: a loaded machine may run it late).
        let deadline = Instant::now() + Duration::from_secs(10);
        while cache.stats().scrubbed_entries < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(cache.stats().scrubbed_entries >= 4, "{}", cache.stats().scrubbed_entries);
        drop(cache);
        handle.join().unwrap();
        fs::remove_dir_all(&dir).ok();
    }
}
