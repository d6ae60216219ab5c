//! Filling big buffers on several threads. One thread copies 2-10 GB/s from the page cache or host RAM (measured
//! 6.2 GB/s on an H200 host, 2.2 and 8 GB/s on the 2-core CI machine), a fraction of what memory and PCIe carry
//! (55 GB/s for one plain pinned copy to an H200), so the loaders split a buffer into parts of [`PART`] bytes and
//! fill them at once on one small pool the process shares ([`loaders`]: made on first use; loads at the same time
//! share its threads rather than each starting its own).

use rayon::prelude::*;

/// Bytes one thread fills at a time.
pub const PART: usize = 1 << 20;

/// Threads a loader fills with: this many at most, and no more than the machine's cores. On an H100 machine of
/// 16 cores (2026-11-27, `bench-load`'s staging variants) 16 threads with 16 MiB staging buffers streamed a
/// file from the page cache to the GPU at 32.7 GB/s, against 19.5 with 8 threads and 8 MiB.
pub const MAX_THREADS: usize = 16;

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

/// The smallest part [`fill`] cuts a buffer into, when [`PART`]s would leave threads idle.
pub const MIN_PART: usize = 256 << 10;

/// The part size [`fill`] uses for `len` bytes on `threads` threads: [`PART`], or less (down to [`MIN_PART`],
/// in 64 KiB steps) so that every thread gets a part. An 8 MiB tensor on 16 threads: 512 KiB parts, not 8 of
/// 1 MiB with 8 threads idle.
pub fn part_size(len: usize, threads: usize) -> usize {
    len.div_ceil(threads.max(1)).next_multiple_of(64 << 10).clamp(MIN_PART, PART)
}

/// Fills `buf` by calling `part(at, slice)` for each slice of it ([`part_size`]; `at`: the slice's offset in
/// `buf`), on the threads of `pool` at once, or in order on this thread without one. On failure, the error of a
/// failed part is returned (other parts may have run).
pub fn fill<E: Send>(
    pool: Option<&rayon::ThreadPool>,
    buf: &mut [u8],
    part: impl Fn(usize, &mut [u8]) -> Result<(), E> + Sync,
) -> Result<(), E> {
    match pool {
        Some(pool) if buf.len() > MIN_PART => {
            let size = part_size(buf.len(), pool.current_num_threads());
            pool.install(|| buf.par_chunks_mut(size).enumerate().try_for_each(|(i, slice)| part(i * size, slice)))
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
        for len in [0, 1, MIN_PART - 1, MIN_PART + 1, PART - 1, PART, PART + 1, 3 * MIN_PART + 7, 5 * PART + 3] {
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

    #[test]
    fn parts_shrink_so_every_thread_gets_one_but_not_below_the_minimum() {
        assert_eq!(part_size(16 * PART, 16), PART);
        assert_eq!(part_size(64 * PART, 16), PART, "never above PART");
        assert_eq!(part_size(8 * PART, 16), PART / 2);
        assert_eq!(part_size(PART, 16), MIN_PART, "never below MIN_PART");
        assert_eq!(part_size(3 * PART, 8), 384 << 10, "rounded up to 64 KiB");
        assert_eq!(part_size(5 * PART, 0), PART);
        // Through `fill`: a buffer of 2 MiB on 4 threads comes in four parts.
        let pool = pool(4).unwrap().expect("a pool of 4");
        let parts = std::sync::atomic::AtomicUsize::new(0);
        fill(Some(&pool), &mut vec![0u8; 2 * PART], |_, _| {
            parts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(parts.into_inner(), 4);
    }

    fn pool_is_none(threads: usize) -> bool {
        pool(threads).unwrap().is_none()
    }
}
