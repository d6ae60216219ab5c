//! The node's weight cache: a content-addressed local-disk tier and a host-RAM tier, each size-bounded and evicted
//! least-recently-used first. (The third tier, idle copies left in GPU memory by stopped replicas, belongs to the
//! worker runtimes.) What it holds is reported to the controller, whose placement engine prefers nodes that avoid
//! a cold load.
//!
//! Entries are keyed by the SHA-256 of the file (`sha256:<hex>`). A fetched file is checked against the digest the
//! controller gave and must parse as safetensors (header and tensor bounds); one that fails is never cached. A disk
//! entry is hashed again when it is read: a file corrupted or truncated on disk fails the read with a clear error
//! and is evicted, never served.
//!
//! Sources: `file://` URIs (a path on the node, e.g. a shared file system). Object stores and registries are not
//! reachable from this build; their URIs are refused with an error saying so.

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use sha2::{Digest, Sha256};

/// Where weights are held: the core's tier vocabulary. This cache holds [`Tier::HostRam`] and [`Tier::Disk`];
/// [`Tier::Gpu`] copies belong to the worker runtimes and [`Tier::Remote`] is the model store.
pub use kiln_core::autoscale::coldstart::Tier;

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
    /// The file is not a valid safetensors file (corrupt or truncated).
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

#[derive(Debug)]
struct HostEntry {
    entry: Entry,
    bytes: Arc<[u8]>,
}

#[derive(Debug, Default)]
struct State {
    disk: Vec<Entry>,
    host: Vec<HostEntry>,
}

/// Weights read from the cache, and the tier they came from.
pub type Cached = (Tier, Arc<[u8]>);

/// The weight cache of one node.
#[derive(Debug)]
pub struct WeightCache {
    dir: PathBuf,
    disk_capacity: u64,
    host_capacity: u64,
    state: Mutex<State>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in hash.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Reads a `file://` source's `path`: a regular file only (a device such as `/dev/zero` would be read forever, a
/// FIFO would block), and no more than `limit` bytes (what the largest tier holds: a larger file cannot be cached).
fn read_source(uri: &str, path: &str, limit: u64, tier: Tier) -> Result<Vec<u8>, CacheError> {
    let io = |source| CacheError::Io { what: format!("reading {uri}"), source };
    let not_regular = || io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    // Checked before opening too: opening a FIFO blocks until a writer comes.
    if !fs::metadata(path).map_err(io)?.is_file() {
        return Err(not_regular());
    }
    let file = fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?;
    if !size.is_file() {
        return Err(not_regular());
    }
    let too_large = |size| CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: limit };
    if size.len() > limit {
        return Err(too_large(size.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size.len()).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

fn check_safetensors(uri: &str, bytes: &[u8]) -> Result<(), CacheError> {
    safetensors::SafeTensors::deserialize(bytes)
        .map(|_| ())
        .map_err(|e| CacheError::Corrupt { uri: uri.to_owned(), reason: e.to_string() })
}

impl WeightCache {
    /// A cache keeping disk entries in `dir` (created if needed; entries already there are adopted).
    pub fn open(dir: &Path, disk_capacity: u64, host_capacity: u64) -> Result<Self, CacheError> {
        fs::create_dir_all(dir)
            .map_err(|source| CacheError::Io { what: format!("creating {}", dir.display()), source })?;
        let mut state = State::default();
        let listing = fs::read_dir(dir)
            .map_err(|source| CacheError::Io { what: format!("reading {}", dir.display()), source })?;
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_prefix("sha256-").and_then(|n| n.strip_suffix(".safetensors")) else { continue };
            let Ok(meta) = item.metadata() else { continue };
            state.disk.push(Entry {
                uri: String::new(),
                digest: format!("sha256:{hex}"),
                size: meta.len(),
                tier: Tier::Disk,
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(Self { dir: dir.to_owned(), disk_capacity, host_capacity, state: Mutex::new(state) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn path_of(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{}.safetensors", digest.replace(':', "-")))
    }

    /// Fetches `uri` into `tier` (host RAM also keeps a disk copy when it fits), checking `expected_digest` when
    /// given; returns the entry. Already cached content is only touched.
    pub fn prefetch(&self, uri: &str, expected_digest: Option<&str>, tier: Tier) -> Result<Entry, CacheError> {
        if matches!(tier, Tier::Gpu | Tier::Remote) {
            return Err(CacheError::NotACacheTier { uri: uri.to_owned(), tier });
        }
        if let Some(d) = expected_digest.filter(|d| !d.is_empty())
            && let Some(entry) = self.lookup(d, tier)
        {
            return Ok(entry);
        }
        let Some(path) = uri.strip_prefix("file://") else {
            return Err(CacheError::Unsupported { uri: uri.to_owned() });
        };
        let bytes = read_source(uri, path, self.disk_capacity.max(self.host_capacity), tier)?;
        let digest = digest_of(&bytes);
        if let Some(expected) = expected_digest.filter(|d| !d.is_empty())
            && expected != digest
        {
            return Err(CacheError::DigestMismatch {
                uri: uri.to_owned(),
                expected: expected.to_owned(),
                actual: digest,
            });
        }
        check_safetensors(uri, &bytes)?;
        let size = bytes.len() as u64;
        let now = SystemTime::now();
        let entry = Entry { uri: uri.to_owned(), digest: digest.clone(), size, tier: Tier::Disk, last_used: now };
        if size <= self.disk_capacity {
            self.store_disk(&entry, &bytes)?;
        } else if tier == Tier::Disk {
            return Err(CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: self.disk_capacity });
        }
        if tier == Tier::HostRam {
            if size > self.host_capacity {
                return Err(CacheError::TooLarge { uri: uri.to_owned(), size, tier, capacity: self.host_capacity });
            }
            let entry = Entry { tier: Tier::HostRam, ..entry };
            self.store_host(entry.clone(), bytes.into());
            return Ok(entry);
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
            Tier::Disk => s.disk.iter_mut().find(|e| e.digest == digest).map(|e| {
                e.last_used = now;
                e.clone()
            }),
            Tier::Gpu | Tier::Remote => None,
        }
    }

    fn store_disk(&self, entry: &Entry, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.path_of(&entry.digest);
        let mut s = self.lock();
        if let Some(e) = s.disk.iter_mut().find(|e| e.digest == entry.digest) {
            e.last_used = entry.last_used;
            if e.uri.is_empty() {
                e.uri.clone_from(&entry.uri);
            }
            return Ok(());
        }
        while s.disk.iter().map(|e| e.size).sum::<u64>() + entry.size > self.disk_capacity {
            let Some(oldest) = (0..s.disk.len()).min_by_key(|&i| s.disk[i].last_used) else { break };
            let gone = s.disk.swap_remove(oldest);
            let _ = fs::remove_file(self.path_of(&gone.digest));
        }
        // Write to a temporary name and rename: a crash never leaves a partial file under the final name.
        let tmp = path.with_extension("partial");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| CacheError::Io { what: format!("writing {}", path.display()), source })?;
        s.disk.push(entry.clone());
        Ok(())
    }

    fn store_host(&self, entry: Entry, bytes: Arc<[u8]>) {
        let mut s = self.lock();
        if let Some(h) = s.host.iter_mut().find(|h| h.entry.digest == entry.digest) {
            h.entry.last_used = entry.last_used;
            return;
        }
        while s.host.iter().map(|h| h.entry.size).sum::<u64>() + entry.size > self.host_capacity {
            let Some(oldest) = (0..s.host.len()).min_by_key(|&i| s.host[i].entry.last_used) else { break };
            s.host.swap_remove(oldest);
        }
        s.host.push(HostEntry { entry, bytes });
    }

    /// The weights with `digest`, from host RAM or else from disk (verified; a corrupt disk entry is evicted and
    /// the error returned); `None` when not cached.
    pub fn read(&self, digest: &str) -> Option<Result<Cached, CacheError>> {
        {
            let mut s = self.lock();
            if let Some(h) = s.host.iter_mut().find(|h| h.entry.digest == digest) {
                h.entry.last_used = SystemTime::now();
                return Some(Ok((Tier::HostRam, Arc::clone(&h.bytes))));
            }
            if !s.disk.iter().any(|e| e.digest == digest) {
                return None;
            }
        }
        let path = self.path_of(digest);
        let checked = fs::read(&path)
            .map_err(|source| CacheError::Io { what: format!("reading {}", path.display()), source })
            .and_then(|bytes| {
                let actual = digest_of(&bytes);
                if actual != digest {
                    return Err(CacheError::DigestMismatch {
                        uri: path.display().to_string(),
                        expected: digest.to_owned(),
                        actual,
                    });
                }
                check_safetensors(&path.display().to_string(), &bytes)?;
                Ok(bytes)
            });
        match checked {
            Ok(bytes) => {
                if let Some(e) = self.lock().disk.iter_mut().find(|e| e.digest == digest) {
                    e.last_used = SystemTime::now();
                }
                Some(Ok((Tier::Disk, bytes.into())))
            }
            Err(e) => {
                tracing::warn!("evicting corrupt cache entry {digest}: {e}");
                self.evict(digest, None);
                Some(Err(e))
            }
        }
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
            let (drop, keep): (Vec<Entry>, Vec<Entry>) =
                std::mem::take(&mut s.disk).into_iter().partition(|e| matches(e));
            for e in &drop {
                let _ = fs::remove_file(self.path_of(&e.digest));
            }
            gone += drop.len();
            s.disk = keep;
        }
        gone
    }

    /// Everything cached, for the controller.
    pub fn report(&self) -> Vec<Entry> {
        let s = self.lock();
        s.host.iter().map(|h| h.entry.clone()).chain(s.disk.iter().cloned()).collect()
    }

    /// Capacities: host, disk (bytes).
    pub fn capacities(&self) -> (u64, u64) {
        (self.host_capacity, self.disk_capacity)
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
        assert_eq!(&*cache.read(&digest_of(&files[2].1)).unwrap().unwrap().1, files[2].1.as_slice());
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
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(cache.read(&entry.digest).is_none(), "evicted, never served");
        assert!(!cached.exists());
        fs::remove_dir_all(&dir).ok();
    }
}
