//! `kiln-agent bench-load`: how fast weights move from local disk and from host RAM towards the GPU on this node.
//!
//! It writes a file of the given size, evicts it from the page cache (`posix_fadvise(DONTNEED)`, so the read
//! comes from the device), and times reading it back; then it times copying the bytes from one host buffer into
//! another. With CUDA, `kiln-agent bench-load` adds the host-to-device figures of [`crate::cuda`]: the loader's
//! pinned, multi-stream path against one plain pinned copy.
//!
//! `kiln-agent bench-load --cold-start` ([`cold_start`]) builds a dense model file of about the given size, puts
//! it in a weight cache, and cold-starts it through the CPU path from the disk cache with the page cache warm
//! (cache lookup, chunked read straight into the model's buffers, one forward pass), against the raw read
//! bandwidth of the same cached file (on as many threads as the loader reads with): the ratio says how close a cold
//! start is to the speed of reading the file.

use std::{
    fs::{self, File},
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::Path,
    time::Instant,
};

use crate::{
    cache::{HostBytes, Pinner, Tier, WeightCache, Weights},
    model::{Dtype, load_file},
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
    /// Fill threads of the parallel figures below (the loader's, capped by this machine's cores).
    pub fill_threads: usize,
    /// The loader's staging fill ([`crate::cuda::bench_fill`]) from the file in the page cache, GB/s: one thread,
    /// then `fill_threads`.
    pub fill_page_cache_gbps: (f64, f64),
    /// The same from host RAM (the host-RAM tier), GB/s: one thread, then `fill_threads`.
    pub fill_host_gbps: (f64, f64),
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
        // The file was just read, so it is in the page cache (as a cached model's file usually is).
        let threads = crate::parallel::default_threads();
        let fill = |src: crate::cuda::Source<'_>, t: usize| {
            crate::cuda::bench_fill(src, bytes, t).map_err(|e| std::io::Error::other(e.to_string()))
        };
        let page_cache = crate::cuda::Source::File(&reader);
        let fill_page_cache_gbps = (fill(page_cache, 1)?, fill(page_cache, threads)?);
        let fill_host_gbps =
            (fill(crate::cuda::Source::Bytes(&host), 1)?, fill(crate::cuda::Source::Bytes(&host), threads)?);
        Ok(LoadBench {
            bytes,
            disk_gbps: gbps(disk),
            page_cache_dropped: dropped,
            host_copy_gbps: gbps(copy),
            fill_threads: threads,
            fill_page_cache_gbps,
            fill_host_gbps,
        })
    })();
    let _ = fs::remove_file(&path);
    result
}

/// Figures of [`cold_start`]: medians over the runs, seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdStartBench {
    /// Bytes of the model file.
    pub bytes: u64,
    /// Parameters.
    pub params: usize,
    /// The first start, fetching the file into the cache (stream, hash once, write).
    pub miss_s: f64,
    /// Bytes hashed by the miss.
    pub miss_hashed_bytes: u64,
    /// Bytes hashed by all the cold starts from the cache together (a hit hashes nothing).
    pub hit_hashed_bytes: u64,
    /// The source tier the hits reported.
    pub hit_tier: Tier,
    /// Cold start from the disk cache: lookup + read + parse + convert + first forward pass.
    pub cold_start_s: f64,
    /// Its phases (medians of each): cache lookup, read, parse, convert, first forward pass.
    pub phases: [f64; 5],
    /// Reading the same cached file with 1 MiB positioned reads on the loaders' threads
    /// ([`crate::parallel::loaders`]), nothing else.
    pub raw_read_s: f64,
    /// Where CUDA is present: the same cold start through the GPU path, or why it failed.
    pub gpu: Option<Result<GpuColdStart, String>>,
}

/// Cold starts onto GPU 0 ([`cold_start`], where CUDA is present).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuColdStart {
    /// The once-per-process set-up ([`crate::cuda::prewarm`]), done first as the agent does when it starts.
    pub prewarm_s: f64,
    /// From the disk cache, page cache warm (the median run).
    pub from_disk: GpuStart,
    /// From the file's bytes in pageable host memory, staged (the median run).
    pub from_host: GpuStart,
    /// From the host-RAM tier as the agent keeps it with CUDA: pinned ([`crate::cuda::pin_host`]), copied straight
    /// (the median run); `None` if pinning failed.
    pub from_pinned: Option<GpuStart>,
    /// GPU memory the loaded weights hold ([`crate::cuda::CudaModel::device_bytes`]).
    pub device_bytes: u64,
    /// GPU memory in use with a context alone and with the model loaded and run once
    /// ([`crate::cuda::memory_in_use`]).
    pub memory: crate::cuda::MemoryInUse,
}

/// One cold start onto the GPU: its total, the loader's phases (header read, CUDA init, streaming to the GPU) and
/// the first forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuStart {
    /// Seconds, from the cache lookup to the first forward pass's output.
    pub total_s: f64,
    /// The loader's phases.
    pub timings: crate::cuda::CudaLoadTimings,
    /// Seconds of the first forward pass.
    pub first_forward_s: f64,
}

impl ColdStartBench {
    /// Cold start over raw read: 1.0 is a start as fast as reading the file.
    pub fn ratio(&self) -> f64 {
        self.cold_start_s / self.raw_read_s.max(1e-9)
    }
}

/// Writes a dense model of square `width` layers in `dtype`, about `bytes` in all, into `path` (streamed: no copy
/// of the model in memory); returns its parameter count.
pub fn write_dense_model(path: &Path, bytes: u64, width: usize, dtype: Dtype) -> std::io::Result<usize> {
    let layer_bytes = (width * width * dtype.size()) as u64;
    let layers = (bytes / layer_bytes).max(1) as usize;
    let mut header = String::from(r#"{"__metadata__":{"activation":"identity"}"#);
    for i in 0..layers {
        let (start, end) = (i as u64 * layer_bytes, (i as u64 + 1) * layer_bytes);
        header.push_str(&format!(
            r#","layers.{i}.weight":{{"dtype":"{}","shape":[{width},{width}],"data_offsets":[{start},{end}]}}"#,
            dtype.name()
        ));
    }
    header.push('}');
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    // Small values (|w| < 1/width) keep activations bounded through any number of identity layers.
    let values: Vec<f32> = (0..width).map(|c| (((c * 7919) % 255) as f32 - 127.0) / (128.0 * width as f32)).collect();
    let row = dtype.encode(&values);
    for _ in 0..layers * width {
        f.write_all(&row)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(layers * width * width)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Builds a model of about `bytes` in `dtype` in `dir`, caches it, and cold-starts it `runs` times from the disk cache
/// through the CPU path (see the module docs). Everything it writes is removed.
pub fn cold_start(dir: &Path, bytes: u64, runs: usize, dtype: Dtype) -> anyhow::Result<ColdStartBench> {
    use anyhow::Context;
    let work = dir.join(format!("kiln-bench-coldstart-{}", std::process::id()));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = (|| {
        let src = work.join("model.safetensors");
        let params = write_dense_model(&src, bytes, 2048, dtype).context("writing the model")?;
        let size = fs::metadata(&src)?.len();
        let cache = WeightCache::open(&work.join("cache"), size * 2, 0)?;
        let uri = format!("file://{}", src.display());
        let started = Instant::now();
        let first = cache.locate(&uri, None)?;
        let miss_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(first.tier == Tier::Remote, "the first start should fetch, not hit {:?}", first.tier);
        let miss_hashed_bytes = cache.stats().hashed_bytes();
        let Weights::File { path: cached, .. } = first.weights else { anyhow::bail!("expected a disk entry") };
        // The page cache's bandwidth at its best: 1 MiB positioned reads on the loader's fill threads, into a
        // buffer reused (no page faults), nothing else.
        let pool = crate::parallel::loaders();
        let raw_read = || -> std::io::Result<f64> {
            let f = File::open(&cached)?;
            let mut buf = vec![0u8; 8 * crate::parallel::PART];
            let started = Instant::now();
            let mut at = 0u64;
            while at < size {
                let n = (size - at).min(buf.len() as u64) as usize;
                crate::parallel::fill(pool, &mut buf[..n], |a, part| f.read_exact_at(part, at + a as u64))?;
                std::hint::black_box(&buf);
                at += n as u64;
            }
            Ok(started.elapsed().as_secs_f64())
        };
        raw_read()?; // page cache warm
        let (mut starts, mut reads, mut phases) = (Vec::new(), Vec::new(), vec![Vec::new(); 5]);
        let mut hit_tier = Tier::Remote;
        for _ in 0..runs.max(1) {
            reads.push(raw_read()?);
            let started = Instant::now();
            let hit = cache.locate(&uri, None)?;
            let lookup = started.elapsed();
            hit_tier = hit.tier;
            let Weights::File { path, .. } = &hit.weights else { anyhow::bail!("expected a disk entry") };
            let (model, t) = load_file(path)?;
            let before_init = started.elapsed();
            let out = model.forward_one(&vec![1.0; model.input_dim()])?;
            std::hint::black_box(out);
            let total = started.elapsed();
            starts.push(total.as_secs_f64());
            let init = total - before_init;
            for (series, d) in phases.iter_mut().zip([lookup, t.read, t.parse, t.convert, init]) {
                series.push(d.as_secs_f64());
            }
            drop(model);
        }
        let phases: Vec<f64> = phases.into_iter().map(median).collect();
        let gpu = crate::cuda::available().then(|| {
            // Set up as the agent is when it starts; then `runs` starts (the median kept) from the disk cache (page
            // cache warm), from the file's bytes in pageable memory, and from the pinned host-RAM tier.
            let prewarm_s = crate::cuda::prewarm().map_err(|e| e.to_string())?.as_secs_f64();
            let bytes = fs::read(&cached).map_err(|e| e.to_string())?;
            let pageable = Weights::Host(std::sync::Arc::new(HostBytes::new(bytes.clone())));

            let time_gpu = |weights: Option<&Weights>| -> Result<(GpuStart, u64), String> {
                let mut runs_gpu = Vec::new();
                let mut device_bytes = 0;
                for _ in 0..runs.max(1) {
                    let started = Instant::now();
                    let hit;
                    let weights = match weights {
                        Some(w) => w,
                        None => {
                            hit = cache.locate(&uri, None).map_err(|e| e.to_string())?;
                            &hit.weights
                        }
                    };
                    let (model, t) =
                        crate::cuda::CudaModel::load_weights(weights, 0, crate::cuda::DEFAULT_COPY_STREAMS)
                            .map_err(|e| e.to_string())?;
                    let before = started.elapsed();
                    model.forward(&[vec![1.0; model.input_dim()]]).map_err(|e| e.to_string())?;
                    let total = started.elapsed();
                    device_bytes = model.device_bytes();
                    runs_gpu.push(GpuStart {
                        total_s: total.as_secs_f64(),
                        timings: t,
                        first_forward_s: (total - before).as_secs_f64(),
                    });
                }
                runs_gpu.sort_by(|a, b| a.total_s.total_cmp(&b.total_s));
                Ok((runs_gpu[runs_gpu.len() / 2], device_bytes))
            };
            let (from_disk, device_bytes) = time_gpu(None)?;
            let (from_host, _) = time_gpu(Some(&pageable))?;
            let memory = crate::cuda::memory_in_use(0, &pageable).map_err(|e| e.to_string())?;
            // Pinning keeps a context on GPU 0 for the rest of the process (see `pin_host`): after the other runs,
            // which each made their own.
            let pinner = Pinner(std::sync::Arc::new(crate::cuda::pin_host));
            let pinned = std::sync::Arc::new(HostBytes::pinned(bytes, &pinner));
            let pinned = pinned.is_pinned().then_some(Weights::Host(pinned));
            let from_pinned = pinned.as_ref().map(|p| time_gpu(Some(p))).transpose()?.map(|(s, _)| s);
            Ok(GpuColdStart { prewarm_s, from_disk, from_host, from_pinned, device_bytes, memory })
        });
        Ok(ColdStartBench {
            bytes: size,
            params,
            miss_s,
            miss_hashed_bytes,
            hit_hashed_bytes: cache.stats().hashed_bytes() - miss_hashed_bytes,
            hit_tier,
            cold_start_s: median(starts),
            phases: [phases[0], phases[1], phases[2], phases[3], phases[4]],
            raw_read_s: median(reads),
            gpu,
        })
    })();
    let _ = fs::remove_dir_all(&work);
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
        assert!(r.fill_threads >= 1, "{r:?}");
        for gbps in [r.fill_page_cache_gbps.0, r.fill_page_cache_gbps.1, r.fill_host_gbps.0, r.fill_host_gbps.1] {
            assert!(gbps > 0.0 && gbps.is_finite(), "{r:?}");
        }
        let leftovers = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy() == format!("kiln-bench-load-{}.bin", std::process::id()));
        assert!(!leftovers);
    }

    #[test]
    fn a_cold_start_from_the_disk_cache_hashes_nothing_and_is_compared_with_a_raw_read() {
        for dtype in [Dtype::F32, Dtype::F16] {
            // One 2048 x 2048 layer in either dtype (16 MiB in F32, 8 MiB in F16).
            let r = cold_start(&std::env::temp_dir(), 4 << 20, 3, dtype).unwrap();
            assert_eq!((r.hit_tier, r.hit_hashed_bytes), (Tier::Disk, 0));
            assert_eq!(r.miss_hashed_bytes, r.bytes);
            assert_eq!(r.params, 2048 * 2048);
            assert!(
                r.bytes > (2048 * 2048 * dtype.size()) as u64 && r.bytes < (2048 * 2048 * dtype.size() + 4096) as u64
            );
            assert!(r.cold_start_s > 0.0 && r.raw_read_s > 0.0 && r.ratio() > 0.0, "{r:?}");
            assert!(!std::env::temp_dir().join(format!("kiln-bench-coldstart-{}", std::process::id())).exists());
        }
    }
}
