//! Filling big buffers on several threads. One thread copies 2-10 GB/s from the page cache or host RAM (measured
//! 6.2 GB/s on an H200 host, 2.2 and 8 GB/s on the 2-core CI machine), a fraction of what memory and PCIe carry
//! (55 GB/s for one plain pinned copy to an H200), so the loaders split a buffer into parts of [`PART`] bytes and
//! fill them at once on one small pool the process shares ([`loaders`]: made on first use; loads at the same time
//! share its threads rather than each starting its own).

use rayon::prelude::*;

/// Bytes one thread fills at a time.
pub const PART: usize = 1 << 20;

/// Threads a loader fills with: this many at most, and no more than the machine's cores.
pub const MAX_THREADS: usize = 8;

/// The fill threads of this machine ([`MAX_THREADS`] capped by its cores).
pub fn default_threads() -> usize {
    MAX_THREADS.min(std::thread::available_parallelism().map_or(1, usize::from))
}

/// A pool of `threads` fill threads, or none for one (the caller's thread fills).
pub fn pool(threads: usize) -> std::io::Result<Option<rayon::ThreadPool>> {
    if threads <= 1 {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kiln-fill-{i}"))
        .build()
        .map(Some)
        .map_err(std::io::Error::other)
}

/// The loaders' pool: [`default_threads`] threads, made on first use (none on a machine of one core, or if the
/// threads could not be started: the loaders then fill on their own thread).
pub fn loaders() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        pool(default_threads()).unwrap_or_else(|e| {
            tracing::warn!("the loaders' fill threads did not start ({e}); loading on one thread");
            None
        })
    })
    .as_ref()
}

/// Fills `buf` by calling `part(at, slice)` for each [`PART`]-sized slice of it (`at`: the slice's offset in
/// `buf`), on the threads of `pool` at once, or in order on this thread without one. On failure, the error of a
/// failed part is returned (other parts may have run).
pub fn fill<E: Send>(
    pool: Option<&rayon::ThreadPool>,
    buf: &mut [u8],
    part: impl Fn(usize, &mut [u8]) -> Result<(), E> + Sync,
) -> Result<(), E> {
    match pool {
        Some(pool) if buf.len() > PART => {
            pool.install(|| buf.par_chunks_mut(PART).enumerate().try_for_each(|(i, slice)| part(i * PART, slice)))
        }
        _ => part(0, buf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_is_filled_once_by_its_part_and_errors_come_back() {
        let pool = pool(3).unwrap().expect("a pool of 3");
        assert!(pool_is_none(1) && pool_is_none(0));
        for len in [0, 1, PART - 1, PART, PART + 1, 5 * PART + 3] {
            for p in [None, Some(&pool)] {
                let mut buf = vec![0u8; len];
                fill(p, &mut buf, |at, slice| {
                    slice.iter_mut().enumerate().for_each(|(i, b)| *b = b.wrapping_add(((at + i) % 251) as u8 + 1));
                    Ok::<_, ()>(())
                })
                .unwrap();
                assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8 + 1), "{len} bytes");
            }
        }
        let mut buf = vec![0u8; 4 * PART];
        let e = fill(Some(&pool), &mut buf, |at, _| if at == 2 * PART { Err(at) } else { Ok(()) });
        assert_eq!(e, Err(2 * PART));
    }

    fn pool_is_none(threads: usize) -> bool {
        pool(threads).unwrap().is_none()
    }
}
