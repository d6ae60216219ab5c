//! `kiln-agent bench-load`: how fast weights move from local disk and from host RAM towards the GPU on this node.
//!
//! It writes a file of the given size, evicts it from the page cache (`posix_fadvise(DONTNEED)`, so the read
//! comes from the device), and times reading it back; then it times copying the bytes from one host buffer into
//! another. With CUDA, `kiln-agent bench-load` adds the host-to-device figures of [`crate::cuda`]: the loader's
//! pinned, multi-stream path against one plain pinned copy.

use std::{
    fs::{self, File},
    io::{Read, Write},
    path::Path,
    time::Instant,
};

/// Figures of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadBench {
    /// Bytes moved.
    pub bytes: u64,
    /// Disk to host RAM, GB/s.
    pub disk_gbps: f64,
    /// Whether the page cache could be dropped for the file (if not, the disk figure may be the cache's).
    pub page_cache_dropped: bool,
    /// Host RAM to host RAM (memcpy), GB/s.
    pub host_copy_gbps: f64,
}

/// Runs the benchmark with a file of `bytes` in `dir`.
pub fn run(dir: &Path, bytes: u64) -> std::io::Result<LoadBench> {
    let path = dir.join(format!("kiln-bench-load-{}.bin", std::process::id()));
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    {
        let mut f = File::create(&path)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    let result = (|| {
        let file = File::open(&path)?;
        let dropped =
            nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).is_ok();
        let mut host = vec![0u8; bytes as usize];
        let started = Instant::now();
        let mut reader = file;
        let mut done = 0usize;
        while done < host.len() {
            let n = reader.read(&mut host[done..])?;
            if n == 0 {
                break;
            }
            done += n;
        }
        let disk = started.elapsed().as_secs_f64();
        let mut device = vec![0u8; bytes as usize];
        // Touch the destination first: the copy should not time page faults.
        device.iter_mut().step_by(4096).for_each(|b| *b = 1);
        let started = Instant::now();
        device.copy_from_slice(&host);
        let copy = started.elapsed().as_secs_f64();
        std::hint::black_box(&device);
        let gbps = |seconds: f64| if seconds > 0.0 { bytes as f64 / seconds / 1e9 } else { f64::INFINITY };
        Ok(LoadBench { bytes, disk_gbps: gbps(disk), page_cache_dropped: dropped, host_copy_gbps: gbps(copy) })
    })();
    let _ = fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_both_paths_and_cleans_up() {
        let dir = std::env::temp_dir();
        let r = run(&dir, 8 << 20).unwrap();
        assert_eq!(r.bytes, 8 << 20);
        assert!(r.disk_gbps > 0.0 && r.host_copy_gbps > 0.0, "{r:?}");
        let leftovers = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy() == format!("kiln-bench-load-{}.bin", std::process::id()));
        assert!(!leftovers);
    }
}
