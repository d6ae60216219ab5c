//! The CUDA path of the native runtime (cudarc): a dense model's weights streamed from the model file (or the
//! host-RAM tier) to the GPU, inference with cuBLAS GEMMs and small NVRTC-compiled kernels; and the host-to-device
//! bandwidth figures of `bench-load`.
//!
//! **Loading** ([`CudaModel::load_weights`]) is a pipeline with no whole-file copy in host memory: the header is
//! read and validated first; then each tensor's bytes, in file dtype, go chunk by chunk with positioned reads from
//! the file (page cache or disk) into one of `2 x streams` pinned buffers, and from there to the GPU with an async
//! copy on that buffer's stream; the CPU waits only for the copy that last used the buffer it fills next, so
//! reading chunk `i + 1` overlaps the DMA of chunk `i`. Each buffer is filled by several threads at once
//! ([`crate::parallel`]): one thread copies a tenth to a fifth of what PCIe carries. A host-RAM entry pinned by
//! [`pin_host`] needs no staging: it is copied straight from where it is. A multi-GPU replica loads onto its first
//! GPU only (no tensor parallelism).
//!
//! **Precision.** F16 and BF16 weight matrices stay in their format on the GPU (half the memory of f32, and half
//! the bytes across PCIe; BF16 from compute capability 8.0 on, below which cuBLAS has no BF16 GEMM and the
//! weights are widened to f32): each layer rounds its input to the weights' format (a kernel) and cuBLAS
//! multiplies the two with f32 accumulation into an f32 output (`cublasGemmEx`), to which the bias (widened to f32
//! when loaded) and the activation are applied in f32. F32 weights use the f32 GEMM. The CPU path widens every
//! weight and keeps f32 activations, so the two agree to about 3 significant digits on F16 models and 2 on BF16.
//!
//! **Measured** on an H100 (2026-11-27; `agent/GPU-NOTES.md`): from the pinned host-RAM tier the loader moves
//! 99-100% of one plain pinned copy (about 54 GB/s), staged from pageable memory 35-62%; a 1.39 GB F16 model
//! cold-starts from the disk cache in 0.11-0.15 s and from the pinned host-RAM tier in 0.033-0.036 s; the GPU path
//! matches the CPU path to 2.9e-5 (F16), 8.9e-5 (BF16) and 7.8e-8 (F32).
//!
//! CUDA failures at run time are classified ([`CudaErrorKind`]): no driver or a stub library, and out of memory,
//! are not retryable on the same node.
//!
//! cudarc loads the CUDA libraries at run time and panics when they are missing, so every entry point checks
//! [`available`] first; without CUDA the agent uses the CPU path, which gives the same results within float
//! tolerance. This module needs `unsafe` (cudarc marks pinned allocation, kernel launches and cuBLAS calls unsafe);
//! every block says why it is sound.
//!
//! It compiles everywhere; its tests need a GPU and are opt-in
//! (`KILN_TEST_CUDA=1 cargo nextest run -p kiln-agent --run-ignored only cuda`; NVML's:
//! `cargo nextest run -p kiln-agent --run-ignored only nvml`).

#![allow(unsafe_code)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use cudarc::{
    cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t},
    driver::{
        CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
        PinnedHostSlice, PushKernelArg,
    },
    nvrtc::compile_ptx,
};

use crate::model::Activation;

/// Whether the CUDA driver library can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only tries to load the driver library and look up its symbols; nothing is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The CUDA libraries besides the driver that the GPU path loads (NVRTC compiles its kernels, cuBLAS runs its
/// GEMMs) and this machine lacks. A node can have the driver without them (the agent's image must bring them);
/// cudarc would panic on the first call, so a start checks first and fails with a reason instead.
pub fn missing_libraries() -> Vec<&'static str> {
    // SAFETY: only tries to load each library and look up its symbols; nothing is called.
    let present = unsafe { [cudarc::nvrtc::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()] };
    ["NVRTC (libnvrtc)", "cuBLAS (libcublas)"].into_iter().zip(present).filter(|(_, p)| !p).map(|(n, _)| n).collect()
}

/// Whether the GPU path can run on this machine: the driver and the libraries it loads are there; if not, an
/// [`CudaErrorKind::Unavailable`] error saying what is missing.
pub fn check() -> Result<(), CudaError> {
    let driver = available();
    usable(driver, &if driver { missing_libraries() } else { Vec::new() })
}

/// Whether the GPU path can run with the driver library loadable (`driver`) and the libraries `missing`
/// ([`missing_libraries`]): if not, an [`CudaErrorKind::Unavailable`] error saying what is missing.
fn usable(driver: bool, missing: &[&str]) -> Result<(), CudaError> {
    if !driver {
        return Err(CudaError::new(CudaErrorKind::Unavailable, "the CUDA driver library is not present"));
    }
    if !missing.is_empty() {
        return Err(CudaError::new(
            CudaErrorKind::Unavailable,
            format!("the CUDA driver is present but {} not found on the library path", missing.join(" and ")),
        ));
    }
    Ok(())
}

/// Copy streams the loader uses when the spec names none.
pub const DEFAULT_COPY_STREAMS: usize = 4;

/// What kind of CUDA failure an error is: whether retrying the same start on this node can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaErrorKind {
    /// No usable driver: the library is missing, is the toolkit's stub (`CUDA_ERROR_STUB_LIBRARY`: the `stubs`
    /// directory shadows the real driver on the library path), is older than the runtime, or sees no device.
    Unavailable,
    /// The GPU (or pinned host memory) ran out of memory.
    OutOfMemory,
    /// The weights cannot be read or are invalid.
    InvalidWeights,
    /// Anything else (may be transient).
    Other,
}

/// A CUDA error, as text (cudarc's driver, NVRTC and cuBLAS errors differ in type), with its kind.
#[derive(Debug, thiserror::Error)]
#[error("CUDA: {message}")]
pub struct CudaError {
    kind: CudaErrorKind,
    message: String,
}

impl CudaError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: CudaErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// An error from a CUDA library's message, classified by the error names it contains.
    pub fn classify(message: impl Into<String>) -> Self {
        let message = message.into();
        const UNAVAILABLE: &[&str] = &[
            "CUDA_ERROR_STUB_LIBRARY",
            "CUDA_ERROR_NO_DEVICE",
            "CUDA_ERROR_INSUFFICIENT_DRIVER",
            "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
            "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
            "CUDA_ERROR_INVALID_DEVICE",
            "CUDA_ERROR_NOT_INITIALIZED",
            "CUDA_ERROR_DEVICE_UNAVAILABLE",
        ];
        const OUT_OF_MEMORY: &[&str] = &["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED"];
        let kind = if UNAVAILABLE.iter().any(|n| message.contains(n)) {
            CudaErrorKind::Unavailable
        } else if OUT_OF_MEMORY.iter().any(|n| message.contains(n)) {
            CudaErrorKind::OutOfMemory
        } else {
            CudaErrorKind::Other
        };
        Self { kind, message }
    }

    /// The kind of failure.
    pub fn kind(&self) -> CudaErrorKind {
        self.kind
    }
}

fn err(e: impl std::fmt::Debug) -> CudaError {
    CudaError::classify(format!("{e:?}"))
}

/// The kernels, compiled by NVRTC once per process (the first compilation also loads NVRTC: hundreds of
/// milliseconds a cold start should not pay; [`prewarm`] does it when the agent starts).
fn kernels() -> Result<cudarc::nvrtc::Ptx, CudaError> {
    static PTX: std::sync::OnceLock<Result<cudarc::nvrtc::Ptx, String>> = std::sync::OnceLock::new();
    PTX.get_or_init(|| compile_ptx(KERNELS).map_err(|e| format!("{e:?}"))).clone().map_err(CudaError::classify)
}

/// The once-per-process part of the GPU path's set-up, done ahead of the first start: the driver initialised
/// (`cuInit`), NVRTC and cuBLAS loaded, the kernels compiled, a first context made on every GPU, its per-thread
/// stack limit lowered to [`SMALL_STACK`]. The driver keeps that context's memory on each GPU for this process
/// from then on, released or not, as it would after the first replica on that GPU anyway (measured on an H100:
/// 529 MiB in nvidia-smi with no replica, before the stack limit was lowered).
/// Returns how long it took; an error when the GPU path cannot run here.
pub fn prewarm() -> Result<Duration, CudaError> {
    check()?;
    let started = Instant::now();
    cudarc::driver::result::init().map_err(err)?;
    kernels()?;
    // A process's first context on a GPU costs hundreds of milliseconds (measured: 0.26 s on an H100); later
    // ones about a millisecond, even after the first was released. A GPU that fails here is left to fail its
    // starts with their own reasons; the others are still made ready.
    for ordinal in 0..CudaContext::device_count().map_err(err)?.max(0) as usize {
        if let Err(e) = prewarm_gpu(ordinal) {
            tracing::warn!(gpu = ordinal, "CUDA set-up of this GPU failed: {e}");
        }
    }
    Ok(started.elapsed())
}

/// [`prewarm`]'s part for GPU `ordinal`.
fn prewarm_gpu(ordinal: usize) -> Result<(), CudaError> {
    let ctx = CudaContext::new(ordinal).map_err(err)?;
    // The driver reserves the per-thread stack limit for every thread the GPU can hold (1 KiB by default:
    // 0.28 GB on an H100) and grows it for a kernel that needs more; ours need none. Lowered once here (it
    // waits for the GPU's work, so not on every load): 0.208 GB less per GPU, measured on an H100.
    let stack = cudarc::driver::sys::CUlimit::CU_LIMIT_STACK_SIZE;
    if ctx.get_limit(stack).map_err(err)? > SMALL_STACK {
        ctx.set_limit(stack, SMALL_STACK).map_err(err)?;
    }
    let module = ctx.load_module(kernels()?).map_err(err)?;
    let blas = CudaBlas::new(ctx.default_stream()).map_err(err)?;
    drop((blas, module, ctx));
    Ok(())
}

/// Page-locks `bytes` for DMA to every GPU of this process (`cuMemHostRegister`, portable), for the host-RAM tier
/// of the weight cache ([`crate::cache::WeightCache::set_pinner`]): a pinned entry is copied to a GPU straight from
/// where it is, at the bus's speed, with no staging copy. The registration needs a context: GPU 0's primary
/// context, kept for the life of the process once a first entry was pinned (the registrations belong to it).
/// Dropping the guard unpins the bytes; it must be dropped before they are freed
/// ([`crate::cache::HostBytes`] does so).
pub fn pin_host(bytes: &[u8]) -> Result<crate::cache::PinGuard, String> {
    static HOLDER: std::sync::OnceLock<Result<Arc<CudaContext>, String>> = std::sync::OnceLock::new();
    if bytes.is_empty() {
        return Err("nothing to pin".into());
    }
    let ctx = HOLDER.get_or_init(|| CudaContext::new(0).map_err(|e| format!("{e:?}"))).clone()?;
    ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
    let ptr = bytes.as_ptr() as *mut std::ffi::c_void;
    // SAFETY: registers the live allocation `bytes` (nothing else registered it: each host entry is its own
    // allocation); the guard unregisters exactly this pointer before the caller frees it.
    unsafe {
        cudarc::driver::sys::cuMemHostRegister_v2(ptr, bytes.len(), cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE)
    }
    .result()
    .map_err(|e| format!("cuMemHostRegister of {} bytes: {e:?}", bytes.len()))?;
    struct Pinned {
        ctx: Arc<CudaContext>,
        ptr: usize,
    }
    impl Drop for Pinned {
        fn drop(&mut self) {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `ptr` was registered by `pin_host` and is unregistered once, here, while still allocated.
            let unpinned = unsafe { cudarc::driver::sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void) };
            if let Err(e) = unpinned.result() {
                tracing::warn!("cuMemHostUnregister: {e:?}");
            }
        }
    }
    Ok(Box::new(Pinned { ctx, ptr: ptr as usize }))
}

/// GPU memory in use on a GPU ([`memory_in_use`]), bytes (`cuMemGetInfo`: total - free, so other processes' too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInUse {
    /// With this process's context alone.
    pub context: u64,
    /// The context's per-thread stack limit (bytes): the driver reserves it for every thread the GPU can hold
    /// ([`prewarm`] lowers it to [`SMALL_STACK`]).
    pub stack_limit: usize,
    /// With the weights loaded and run once (cuBLAS allocates its workspace at the first GEMM).
    pub with_model: u64,
}

/// The per-thread stack limit (bytes) [`prewarm`] sets.
pub const SMALL_STACK: usize = 256;

/// What a replica costs beyond its weights on GPU `ordinal`: [`MemoryInUse`] with `weights`.
pub fn memory_in_use(ordinal: usize, weights: &crate::cache::Weights) -> Result<MemoryInUse, CudaError> {
    let ctx = CudaContext::new(ordinal).map_err(err)?;
    // Memory freed in stream order by earlier loads goes back to the device at a synchronisation.
    ctx.synchronize().map_err(err)?;
    let used = || ctx.mem_get_info().map(|(free, total)| (total - free) as u64).map_err(err);
    let context = used()?;
    let stack_limit = ctx.get_limit(cudarc::driver::sys::CUlimit::CU_LIMIT_STACK_SIZE).map_err(err)?;
    let (model, _) = CudaModel::load_weights(weights, ordinal, DEFAULT_COPY_STREAMS)?;
    model.forward(&[vec![1.0; model.input_dim()]])?;
    Ok(MemoryInUse { context, stack_limit, with_model: used()? })
}

/// One configuration of the staged loader ([`bench_staging`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StagingVariant {
    /// Bytes per staging buffer.
    pub chunk: usize,
    /// Fill threads.
    pub threads: usize,
    /// GB/s from pageable memory (median of three).
    pub from_memory: f64,
    /// GB/s from a file in the page cache (median of three).
    pub from_page_cache: f64,
}

/// The staged loader on GPU `ordinal` with `streams` streams, by staging buffer size (8, 16, 32 MiB) and fill
/// threads (8 and 16, as the machine's cores allow), from pageable memory and from a file of `bytes` written in
/// `dir` (in the page cache, as it was just written): for choosing [`CHUNK`] and the loaders' threads.
pub fn bench_staging(
    ordinal: usize,
    dir: &std::path::Path,
    bytes: usize,
    streams: usize,
) -> Result<Vec<StagingVariant>, CudaError> {
    if !available() {
        return Err(CudaError::new(CudaErrorKind::Unavailable, "the CUDA driver library is not present"));
    }
    let io = |e: std::io::Error| CudaError::new(CudaErrorKind::Other, e.to_string());
    let ctx = CudaContext::new(ordinal).map_err(err)?;
    let stream = ctx.default_stream();
    let host: Vec<u8> = (0..bytes).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let path = dir.join(format!("kiln-bench-staging-{}.bin", std::process::id()));
    std::fs::write(&path, &host).map_err(io)?;
    let result = (|| {
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the pipeline writes every byte of `dst` before anything reads it (nothing does).
        let mut dst = unsafe { stream.alloc::<u8>(bytes.max(1)) }.map_err(err)?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let mut out = Vec::new();
        for threads in [8, 16].into_iter().filter(|&t| t <= cores.max(8)) {
            let pool = crate::parallel::pool(threads.min(cores)).map_err(io)?;
            for chunk in [8 << 20, 16 << 20, 32 << 20] {
                let mut pipeline = Pipeline::with(&ctx, streams, chunk, pool.as_ref())?;
                let mut time = |src: Source<'_>| -> Result<f64, CudaError> {
                    let mut runs = Vec::new();
                    for _ in 0..4 {
                        let started = Instant::now();
                        pipeline.upload(src, 0, &mut dst)?;
                        pipeline.finish()?;
                        runs.push(started.elapsed().as_secs_f64());
                    }
                    // The first run allocates the pinned buffers: left out.
                    runs.remove(0);
                    runs.sort_by(f64::total_cmp);
                    Ok(bytes as f64 / runs[1].max(1e-9) / 1e9)
                };
                let from_memory = time(Source::Bytes(&host))?;
                let from_page_cache = time(Source::File(&file))?;
                out.push(StagingVariant { chunk, threads: threads.min(cores), from_memory, from_page_cache });
            }
        }
        Ok(out)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Bytes per copy when the source is pinned host memory ([`Source::Pinned`]): copied straight, several in flight.
const PINNED_CHUNK: usize = 64 << 20;

/// Bytes per staging buffer (16 MiB: 16 parts of [`crate::parallel::PART`], one per fill thread at most; with
/// fewer parts than threads the fill leaves threads idle: 8 MiB on 16 threads streamed 19.8 GB/s on an H100
/// machine, 16 MiB 32.7).
const CHUNK: usize = 16 << 20;

const KERNELS: &str = r#"
// Decodes `n` little-endian elements of `kind` (0 F32, 1 F16, 2 BF16) from `src` into f32 `dst`.
extern "C" __global__ void widen(float* dst, const unsigned char* src, int kind, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (kind == 0) { dst[i] = ((const float*)src)[i]; return; }
    unsigned int h = ((const unsigned short*)src)[i];
    if (kind == 2) { dst[i] = __uint_as_float(h << 16); return; }
    unsigned int sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    float v;
    if (e == 0) v = __uint_as_float(sign) + (sign ? -1.0f : 1.0f) * (float)m * 5.9604644775390625e-8f;
    else if (e == 31) v = __uint_as_float(sign | 0x7f800000u | (m << 13));
    else v = __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
    dst[i] = v;
}

// f32 to IEEE half, round to nearest even (overflow to infinity, NaN kept quiet), with integer operations only so
// that it compiles for every architecture NVRTC targets.
__device__ unsigned short to_f16(float f) {
    unsigned int x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);
    if (a >= 0x38800000u) {
        unsigned int r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (unsigned short)(sign | (r >> 13));
    }
    if (a < 0x33000000u) return (unsigned short)sign;
    unsigned int shift = 126u - (a >> 23), m = (a & 0x7fffffu) | 0x800000u;
    unsigned int q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (unsigned short)(sign | q);
}

// f32 to bfloat16, round to nearest even (NaN kept quiet).
__device__ unsigned short to_bf16(float f) {
    unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Encodes `n` f32 values of `src` as `kind` (1 F16, 2 BF16) into `dst`: a layer's input for a half-precision GEMM.
extern "C" __global__ void narrow(unsigned short* dst, const float* src, int kind, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dst[i] = kind == 2 ? to_bf16(src[i]) : to_f16(src[i]);
}

extern "C" __global__ void bias_act(float* y, const float* b, int has_bias, int out, int n, int act) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = y[i] + (has_bias ? b[i % out] : 0.0f);
    if (act == 1) v = v > 0.0f ? v : 0.0f;
    else if (act == 2) v = 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
    else if (act == 3) v = v / (1.0f + expf(-v));
    y[i] = v;
}
"#;

/// A half-precision format weights stay in on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    F16,
    BF16,
}

impl Half {
    /// The `kind` argument of the `widen` and `narrow` kernels.
    fn kernel_kind(self) -> i32 {
        match self {
            Half::F16 => 1,
            Half::BF16 => 2,
        }
    }

    fn cuda_type(self) -> cudarc::cublas::sys::cudaDataType {
        match self {
            Half::F16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16F,
            Half::BF16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// A layer's weight matrix on the GPU: in f32, or in the file's half-precision format (2 bytes a value).
enum Weight {
    F32(CudaSlice<f32>),
    Half { raw: CudaSlice<u8>, format: Half },
}

impl Weight {
    fn bytes(&self) -> u64 {
        match self {
            Weight::F32(w) => w.len() as u64 * 4,
            Weight::Half { raw, .. } => raw.len() as u64,
        }
    }
}

struct Layer {
    weight: Weight,
    bias: Option<CudaSlice<f32>>,
    out_dim: usize,
    in_dim: usize,
}

/// A dense model resident on one GPU.
pub struct CudaModel {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    bias_act: CudaFunction,
    narrow: CudaFunction,
    layers: Vec<Layer>,
    activation: Activation,
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        // The weights are freed in stream order; the memory pool hands memory back to the device only at a
        // synchronisation. Without one, an unloaded model's memory would stay reserved by this process.
        self.layers.clear();
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel").field("layers", &self.layers.len()).finish()
    }
}

/// Where the loader reads bytes from: a model file (positioned reads) or bytes in host RAM.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A file.
    File(&'a std::fs::File),
    /// Memory.
    Bytes(&'a [u8]),
    /// Page-locked memory ([`pin_host`]): copied to the GPU by DMA straight from where it is.
    Pinned(&'a [u8]),
}

impl Source<'_> {
    /// Fills `buf` from `offset` as [`Source::fill`] does, its parts copied at once by the threads of `pool`
    /// ([`crate::parallel::fill`]: positioned reads of a file are independent; so are copies from memory).
    pub fn fill_on(&self, pool: Option<&rayon::ThreadPool>, offset: u64, buf: &mut [u8]) -> Result<(), CudaError> {
        crate::parallel::fill(pool, buf, |at, part| self.fill(offset + at as u64, part))
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<(), CudaError> {
        match self {
            Source::File(f) => std::os::unix::fs::FileExt::read_exact_at(*f, buf, offset)
                .map_err(|e| CudaError::new(CudaErrorKind::InvalidWeights, format!("reading the weights: {e}"))),
            Source::Bytes(b) | Source::Pinned(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let src = b.get(start..start.saturating_add(buf.len())).ok_or_else(|| {
                    CudaError::new(CudaErrorKind::InvalidWeights, "the weights end before their tensors")
                })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

/// The streaming host-to-device pipeline: pinned buffers used round robin, buffer `i` copied on stream
/// `i % streams`; a buffer is refilled only once the event recorded after its last copy has completed, by several
/// threads at once ([`crate::parallel`]).
struct Pipeline<'p> {
    ctx: Arc<CudaContext>,
    /// Bytes per staging buffer.
    chunk: usize,
    /// The fill threads.
    pool: Option<&'p rayon::ThreadPool>,
    streams: Vec<Arc<CudaStream>>,
    /// Made at the first staged copy (a pinned source needs none).
    buffers: Vec<PinnedHostSlice<u8>>,
    done: Vec<Option<CudaEvent>>,
    next: usize,
}

impl Pipeline<'static> {
    /// [`CHUNK`]-sized buffers filled on the loaders' threads.
    fn new(ctx: &Arc<CudaContext>, streams: usize) -> Result<Self, CudaError> {
        Pipeline::with(ctx, streams, CHUNK, crate::parallel::loaders())
    }
}

impl<'p> Pipeline<'p> {
    fn with(
        ctx: &Arc<CudaContext>,
        streams: usize,
        chunk: usize,
        pool: Option<&'p rayon::ThreadPool>,
    ) -> Result<Self, CudaError> {
        let streams: Vec<Arc<CudaStream>> =
            (0..streams.max(1)).map(|_| ctx.new_stream().map_err(err)).collect::<Result<_, _>>()?;
        let depth = 2 * streams.len();
        let done = (0..depth).map(|_| None).collect();
        Ok(Self { ctx: Arc::clone(ctx), chunk: chunk.max(1), pool, streams, buffers: Vec::new(), done, next: 0 })
    }

    /// Makes every copy stream wait for the work queued on `stream` so far.
    fn wait_for(&self, stream: &CudaStream) -> Result<(), CudaError> {
        let queued = stream.record_event(None).map_err(err)?;
        self.streams.iter().try_for_each(|s| s.wait(&queued).map_err(err))
    }

    /// Copies `dst.len()` bytes of pinned `bytes` from `offset` into `dst`: [`PINNED_CHUNK`]s straight from where
    /// they are, round robin on the streams, no staging. `bytes` must stay unmodified until [`Self::finish`].
    fn upload_pinned(&mut self, bytes: &[u8], offset: u64, dst: &mut CudaSlice<u8>) -> Result<(), CudaError> {
        let len = dst.len();
        let start = usize::try_from(offset).ok().filter(|s| s.checked_add(len).is_some_and(|end| end <= bytes.len()));
        let start = start
            .ok_or_else(|| CudaError::new(CudaErrorKind::InvalidWeights, "the weights end before their tensors"))?;
        let mut at = 0usize;
        while at < len {
            let n = (len - at).min(PINNED_CHUNK);
            let stream = &self.streams[self.next % self.streams.len()];
            self.next = (self.next + 1) % self.done.len();
            let mut view = dst.slice_mut(at..at + n);
            let (device, _written) = view.device_ptr_mut(stream);
            // SAFETY: `device` points at `n` writable bytes of `dst` on this context; the host range is inside
            // `bytes` (checked above), page-locked, and the caller keeps it unmodified until `finish` has waited for
            // every stream.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    device,
                    &bytes[start + at..start + at + n],
                    stream.cu_stream(),
                )
            }
            .map_err(err)?;
            drop(_written);
            at += n;
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes of `src` from `offset` into `dst`, chunk by chunk.
    fn upload(&mut self, src: Source<'_>, offset: u64, dst: &mut CudaSlice<u8>) -> Result<(), CudaError> {
        if let Source::Pinned(bytes) = src {
            return self.upload_pinned(bytes, offset, dst);
        }
        if self.buffers.is_empty() {
            // SAFETY: the buffers' contents are unset; this function writes every byte it then copies
            // (`Source::fill_on` fills the chunk before the copy of that chunk is enqueued).
            self.buffers = (0..self.done.len())
                .map(|_| unsafe { self.ctx.alloc_pinned::<u8>(self.chunk) }.map_err(err))
                .collect::<Result<_, _>>()?;
        }
        let len = dst.len();
        let mut at = 0usize;
        while at < len {
            let n = (len - at).min(self.chunk);
            let k = self.next;
            self.next = (k + 1) % self.buffers.len();
            if let Some(event) = self.done[k].take() {
                event.synchronize().map_err(err)?;
            }
            let stream = &self.streams[k % self.streams.len()];
            let ptr = self.buffers[k].as_mut_ptr().map_err(err)?;
            // SAFETY: `ptr` is the start of a live pinned allocation of CHUNK >= n bytes owned by `self.buffers`;
            // no copy reads it now (its last copy's event completed above), and the slice ends before the next
            // use of the buffer.
            let host = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
            src.fill_on(self.pool, offset + at as u64, host)?;
            let mut view = dst.slice_mut(at..at + n);
            let (device, _written) = view.device_ptr_mut(stream);
            // SAFETY: `device` points at `n` writable bytes of `dst` on this context; `host` is pinned memory that
            // stays allocated and unmodified until `done[k]`, recorded right after on the same stream, completes.
            unsafe { cudarc::driver::result::memcpy_htod_async(device, host, stream.cu_stream()) }.map_err(err)?;
            drop(_written);
            self.done[k] = Some(stream.record_event(None).map_err(err)?);
            at += n;
        }
        Ok(())
    }

    /// Waits for every copy enqueued.
    fn finish(&mut self) -> Result<(), CudaError> {
        for s in &self.streams {
            s.synchronize().map_err(err)?;
        }
        self.done.iter_mut().for_each(|d| *d = None);
        Ok(())
    }
}

/// Phases of [`CudaModel::load_weights`], consecutive: reading and validating the header, initializing CUDA
/// (context, kernels, cuBLAS, pinned buffers), and streaming the weights to the GPU (file reads overlapped with
/// copies, widening on the GPU, until the last copy completed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaLoadTimings {
    /// Header read and validated.
    pub read: Duration,
    /// CUDA set up.
    pub init: Duration,
    /// Weights on the GPU.
    pub host_to_device: Duration,
}

impl CudaModel {
    /// Puts the model in `weights` on GPU `ordinal`, streaming it on `copy_streams` streams ([`Pipeline`]).
    pub fn load_weights(
        weights: &crate::cache::Weights,
        ordinal: usize,
        copy_streams: usize,
    ) -> Result<(Self, CudaLoadTimings), CudaError> {
        let invalid = |e: crate::model::ModelError| CudaError::new(CudaErrorKind::InvalidWeights, e.to_string());
        let started = Instant::now();
        let file;
        let (layout, source) = match weights {
            crate::cache::Weights::File { path, .. } => {
                file = std::fs::File::open(path).map_err(|e| {
                    CudaError::new(CudaErrorKind::InvalidWeights, format!("opening {}: {e}", path.display()))
                })?;
                (crate::model::read_layout(&file, path).map_err(invalid)?.0, Source::File(&file))
            }
            crate::cache::Weights::Host(bytes) => (
                crate::model::layout_of_bytes(bytes).map_err(invalid)?,
                if bytes.is_pinned() { Source::Pinned(bytes) } else { Source::Bytes(bytes) },
            ),
        };
        let read = started.elapsed();
        let (model, init, host_to_device) = Self::stream(&layout, source, ordinal, copy_streams)?;
        Ok((model, CudaLoadTimings { read, init, host_to_device }))
    }

    fn stream(
        layout: &crate::model::Layout,
        source: Source<'_>,
        ordinal: usize,
        copy_streams: usize,
    ) -> Result<(Self, Duration, Duration), CudaError> {
        check()?;
        let started = Instant::now();
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        // cuBLAS multiplies BF16 from compute capability 8.0 (Ampere) on; older GPUs get BF16 weights widened.
        let bf16_gemm = ctx.compute_capability().map_err(err)?.0 >= 8;
        let stream = ctx.default_stream();
        let ptx = kernels()?;
        let module = ctx.load_module(ptx).map_err(err)?;
        let bias_act = module.load_function("bias_act").map_err(err)?;
        let widen = module.load_function("widen").map_err(err)?;
        let narrow = module.load_function("narrow").map_err(err)?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(err)?;
        let mut pipeline = Pipeline::new(&ctx, copy_streams)?;
        let init = started.elapsed();

        let started = Instant::now();
        // A tensor's bytes, in its file dtype, on the GPU.
        let mut upload = |t: &crate::model::TensorLoc| -> Result<CudaSlice<u8>, CudaError> {
            // SAFETY: every byte of `raw` is written by the pipeline's copies before anything reads it (same
            // buffer, ordered by cudarc's per-slice events across streams).
            let mut raw = unsafe { stream.alloc::<u8>(t.bytes.max(1)) }.map_err(err)?;
            // The allocator is stream-ordered: `raw` may be memory just freed on `stream` (a widened tensor's
            // file bytes) that a kernel queued there still reads. The copies run on other streams, so they wait
            // for `stream` first. (cudarc's per-slice events do not cover this: a new slice's are unrecorded.)
            pipeline.wait_for(&stream)?;
            pipeline.upload(source, t.offset, &mut raw)?;
            Ok(raw)
        };
        // A tensor widened to f32 on the GPU.
        let widened = |t: &crate::model::TensorLoc, raw: CudaSlice<u8>| -> Result<CudaSlice<f32>, CudaError> {
            // SAFETY: `widen` writes every element of `out` (indexes below `n` = its length) before it is read.
            let mut out = unsafe { stream.alloc::<f32>(t.elements.max(1)) }.map_err(err)?;
            let kind: i32 = match t.dtype {
                crate::model::Dtype::F32 => 0,
                crate::model::Dtype::F16 => 1,
                crate::model::Dtype::BF16 => 2,
            };
            let n = t.elements as u32;
            let mut launch = stream.launch_builder(&widen);
            launch.arg(&mut out).arg(&raw).arg(&kind).arg(&n);
            // SAFETY: the signature is (float*, const unsigned char*, int, unsigned int); `raw` holds `n`
            // elements of `kind` (the layout checked bytes = elements x size), `out` holds `n` floats.
            unsafe { launch.launch(LaunchConfig::for_num_elems(n.max(1))) }.map_err(err)?;
            Ok(out)
        };
        let mut layers = Vec::with_capacity(layout.layers.len());
        for l in &layout.layers {
            // Half-precision weight matrices stay in their format (the GEMM reads them as they are), BF16 only
            // where cuBLAS multiplies it; biases, a vector each, are widened for the f32 epilogue.
            let raw = upload(&l.weight)?;
            let weight = match l.weight.dtype {
                crate::model::Dtype::F16 => Weight::Half { raw, format: Half::F16 },
                crate::model::Dtype::BF16 if bf16_gemm => Weight::Half { raw, format: Half::BF16 },
                crate::model::Dtype::BF16 | crate::model::Dtype::F32 => Weight::F32(widened(&l.weight, raw)?),
            };
            let bias = match &l.bias {
                Some(b) => Some(widened(b, upload(b)?)?),
                None => None,
            };
            layers.push(Layer { weight, bias, out_dim: l.out_dim, in_dim: l.in_dim });
        }
        pipeline.finish()?;
        stream.synchronize().map_err(err)?;
        let copy = started.elapsed();
        Ok((Self { stream, blas, bias_act, narrow, layers, activation: layout.activation }, init, copy))
    }

    /// Puts an in-memory model file on GPU `ordinal`; returns the model and the host-to-device time.
    pub fn load_bytes(bytes: &[u8], ordinal: usize, copy_streams: usize) -> Result<(Self, Duration), CudaError> {
        let layout = crate::model::layout_of_bytes(bytes)
            .map_err(|e| CudaError::new(CudaErrorKind::InvalidWeights, e.to_string()))?;
        let (model, _, copy) = Self::stream(&layout, Source::Bytes(bytes), ordinal, copy_streams)?;
        Ok((model, copy))
    }

    /// Width of an input row.
    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.in_dim)
    }

    /// Bytes of GPU memory the weights hold.
    pub fn device_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.weight.bytes() + l.bias.as_ref().map_or(0, |b| b.len() as u64 * 4)).sum()
    }

    /// Runs a batch (rows of `input_dim`), as [`DenseModel::forward`] does on the CPU.
    pub fn forward(&self, batch: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, CudaError> {
        let Some(first) = self.layers.first() else { return Ok(Vec::new()) };
        let rows = batch.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        if let Some((i, row)) = batch.iter().enumerate().find(|(_, r)| r.len() != first.in_dim) {
            return Err(CudaError::new(
                CudaErrorKind::Other,
                format!("row {i}: expected {} values, got {}", first.in_dim, row.len()),
            ));
        }
        let flat: Vec<f32> = batch.iter().flatten().copied().collect();
        let mut x = self.stream.clone_htod(&flat).map_err(err)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut y = self.stream.alloc_zeros::<f32>(rows * layer.out_dim).map_err(err)?;
            // Row-major X [rows x in] is column-major X^T (in x rows); row-major W [out x in] is column-major
            // W^T (in x out). Y^T (out x rows) = W X^T: op(A) = A^T with A = the stored W^T, lda = in.
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: layer.out_dim as i32,
                n: rows as i32,
                k: layer.in_dim as i32,
                alpha: 1.0f32,
                lda: layer.in_dim as i32,
                ldb: layer.in_dim as i32,
                beta: 0.0f32,
                ldc: layer.out_dim as i32,
            };
            match &layer.weight {
                // SAFETY: the dimensions and leading dimensions match the allocations: W holds out*in, X rows*in
                // and Y rows*out f32 values, all on this model's context and stream.
                Weight::F32(w) => unsafe { self.blas.gemm(cfg, w, &x, &mut y) }.map_err(err)?,
                Weight::Half { raw, format } => self.half_gemm(&cfg, raw, *format, &x, &mut y)?,
            }
            let last = l + 1 == self.layers.len();
            let act: i32 = match (last, self.activation) {
                (true, _) | (false, Activation::Identity) => 0,
                (false, Activation::Relu) => 1,
                (false, Activation::Gelu) => 2,
                (false, Activation::Silu) => 3,
            };
            let n = (rows * layer.out_dim) as i32;
            let (out, has_bias) = (layer.out_dim as i32, i32::from(layer.bias.is_some()));
            // Without a bias the kernel never reads `b`; pass the output as a valid pointer.
            let dummy;
            let bias = match &layer.bias {
                Some(b) => b,
                None => {
                    dummy = self.stream.alloc_zeros::<f32>(1).map_err(err)?;
                    &dummy
                }
            };
            let mut launch = self.stream.launch_builder(&self.bias_act);
            launch.arg(&mut y).arg(bias).arg(&has_bias).arg(&out).arg(&n).arg(&act);
            // SAFETY: the kernel's signature is (float*, const float*, int, int, int, int), matching the arguments
            // pushed above; it touches indexes below `n` = the length of `y`, and `b` only below `out` when
            // `has_bias` (the bias holds `out` values).
            unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(err)?;
            x = y;
        }
        let out_dim = self.layers.last().map_or(0, |l| l.out_dim);
        let host = self.stream.clone_dtoh(&x).map_err(err)?;
        Ok(host.chunks(out_dim.max(1)).map(<[f32]>::to_vec).collect())
    }
}

impl CudaModel {
    /// `y = W x` as [`forward`](Self::forward)'s f32 GEMM does (`cfg`), with W in a half-precision `format`: X is
    /// rounded to that format (the `narrow` kernel) and cuBLAS multiplies the two half matrices with f32
    /// accumulation into the f32 Y (`cublasGemmEx`: A and B 16F or 16BF, C 32F, compute 32F), so the weights
    /// never need an f32 copy. Rounding the activations costs precision the CPU path (f32 activations) does not
    /// lose: about 3 decimal digits for F16 and 2 for BF16, as in any half-precision inference.
    fn half_gemm(
        &self,
        cfg: &GemmConfig<f32>,
        w: &CudaSlice<u8>,
        format: Half,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let n = x.len();
        // SAFETY: `narrow` writes all `n` values (2 bytes each) before the GEMM reads them.
        let mut xh = unsafe { self.stream.alloc::<u8>(2 * n.max(1)) }.map_err(err)?;
        let (kind, count) = (format.kernel_kind(), n as u32);
        let mut launch = self.stream.launch_builder(&self.narrow);
        launch.arg(&mut xh).arg(x).arg(&kind).arg(&count);
        // SAFETY: the signature is (unsigned short*, const float*, int, unsigned int); `x` holds `count` floats and
        // `xh` room for `count` 2-byte values.
        unsafe { launch.launch(LaunchConfig::for_num_elems(count.max(1))) }.map_err(err)?;
        let (alpha, beta) = (cfg.alpha, cfg.beta);
        let (a, _read_a) = w.device_ptr(&self.stream);
        let (b, _read_b) = xh.device_ptr(&self.stream);
        let (c, _write_c) = y.device_ptr_mut(&self.stream);
        // SAFETY: the handle's stream is `self.stream` (`CudaBlas::new`), on which every pointer was taken; W holds
        // out*in values of `format` (checked against the file's layout when loaded), X^T in*rows of it, Y out*rows
        // f32 values; `cfg` gives the same shapes and leading dimensions as the f32 GEMM; alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F requires; the records (`_read_a` ...) are dropped after the call is enqueued.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                (&raw const alpha).cast(),
                a as *const std::ffi::c_void,
                format.cuda_type(),
                cfg.lda,
                b as *const std::ffi::c_void,
                format.cuda_type(),
                cfg.ldb,
                (&raw const beta).cast(),
                c as *mut std::ffi::c_void,
                cudarc::cublas::sys::cudaDataType::CUDA_R_32F,
                cfg.ldc,
                cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(err)
    }
}

/// The staging side of the loader alone, no GPU needed: GB/s of filling one [`CHUNK`]-sized buffer over and over
/// from `src` until `len` bytes have been read, as [`Pipeline::upload`] fills its pinned buffers (pageable memory
/// here), with `threads` fill threads ([`crate::parallel::pool`]).
pub fn bench_fill(src: Source<'_>, len: u64, threads: usize) -> Result<f64, CudaError> {
    let pool = crate::parallel::pool(threads)
        .map_err(|e| CudaError::new(CudaErrorKind::Other, format!("starting the fill threads: {e}")))?;
    let mut buf = vec![0u8; CHUNK];
    // Touch the buffer first: the fill should not time page faults.
    buf.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let started = Instant::now();
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        src.fill_on(pool.as_ref(), at, &mut buf[..n])?;
        at += n as u64;
    }
    std::hint::black_box(&buf);
    Ok(len as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e9)
}

/// Host-to-device bandwidth on GPU `ordinal` (GB/s, the median of three copies of `bytes` each): the loader from
/// pageable host memory (staged through its pinned buffers on `streams` streams), the loader from pinned host
/// memory (the host-RAM tier as the agent keeps it with CUDA: copied straight; `None` if pinning failed), and the
/// reference, one plain `cudaMemcpyAsync` from a pinned buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostToDevice {
    /// The loader, from pageable memory.
    pub staged: f64,
    /// The loader, from pinned memory.
    pub pinned: Option<f64>,
    /// One plain pinned copy.
    pub plain: f64,
}

/// Measures [`HostToDevice`].
pub fn bench_host_to_device(ordinal: usize, bytes: usize, streams: usize) -> Result<HostToDevice, CudaError> {
    if !available() {
        return Err(CudaError::new(CudaErrorKind::Unavailable, "the CUDA driver library is not present"));
    }
    let ctx = CudaContext::new(ordinal).map_err(err)?;
    let host: Vec<u8> = (0..bytes).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let mut pipeline = Pipeline::new(&ctx, streams)?;
    let stream = ctx.default_stream();
    // SAFETY: the pipeline writes every byte of `dst` before anything reads it (nothing does).
    let mut dst = unsafe { stream.alloc::<u8>(bytes.max(1)) }.map_err(err)?;
    let gbps = |s: f64| bytes as f64 / s.max(1e-9) / 1e9;
    let median3 = |f: &mut dyn FnMut() -> Result<f64, CudaError>| -> Result<f64, CudaError> {
        let mut v = [f()?, f()?, f()?];
        v.sort_by(f64::total_cmp);
        Ok(gbps(v[1]))
    };
    // Warm-up (first-touch costs), then the staged copy.
    // SAFETY: as `dst`.
    let mut warm = unsafe { stream.alloc::<u8>(bytes.clamp(1, CHUNK)) }.map_err(err)?;
    pipeline.upload(Source::Bytes(&host), 0, &mut warm)?;
    pipeline.finish()?;
    let staged = median3(&mut || {
        let started = Instant::now();
        pipeline.upload(Source::Bytes(&host), 0, &mut dst)?;
        pipeline.finish()?;
        Ok(started.elapsed().as_secs_f64())
    })?;
    let pinned = match pin_host(&host) {
        Ok(guard) => {
            let r = median3(&mut || {
                let started = Instant::now();
                pipeline.upload(Source::Pinned(&host), 0, &mut dst)?;
                pipeline.finish()?;
                Ok(started.elapsed().as_secs_f64())
            });
            drop(guard);
            Some(r?)
        }
        Err(why) => {
            tracing::warn!("pinning the source failed: {why}");
            None
        }
    };
    // The reference: all of it pinned, one copy.
    // SAFETY: filled whole below before the copy reads it.
    let mut all = unsafe { ctx.alloc_pinned::<u8>(bytes.max(1)) }.map_err(err)?;
    all.as_mut_slice().map_err(err)?[..bytes].copy_from_slice(&host);
    stream.synchronize().map_err(err)?;
    let plain = median3(&mut || {
        let started = Instant::now();
        stream.memcpy_htod(&all, &mut dst).map_err(err)?;
        stream.synchronize().map_err(err)?;
        Ok(started.elapsed().as_secs_f64())
    })?;
    Ok(HostToDevice { staged, pinned, plain })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{example_model, load_bytes};

    fn wanted() -> bool {
        std::env::var("KILN_TEST_CUDA").is_ok_and(|v| v == "1")
    }

    /// The staging fill split over threads reads exactly what one thread reads, from a file and from memory, at
    /// every size around the part boundaries and at an offset, and a read past the end fails as one would.
    #[test]
    fn a_parallel_fill_reads_what_a_single_thread_reads() {
        let data: Vec<u8> = (0..3 * crate::parallel::PART + 4099)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect();
        let path = std::env::temp_dir().join(format!("kiln-fill-{}.bin", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let pool = crate::parallel::pool(4).unwrap().expect("a pool of 4");
        for (name, src) in [("file", Source::File(&file)), ("memory", Source::Bytes(&data))] {
            for (offset, len) in [
                (0, 0),
                (0, 1),
                (0, crate::parallel::PART - 1),
                (0, crate::parallel::PART),
                (0, crate::parallel::PART + 1),
                (0, data.len()),
                (4099, 3 * crate::parallel::PART),
            ] {
                let mut one = vec![0u8; len];
                let mut many = vec![7u8; len];
                src.fill(offset as u64, &mut one).unwrap();
                src.fill_on(Some(&pool), offset as u64, &mut many).unwrap();
                assert!(one == many, "{name} at {offset}, {len} bytes");
                assert_eq!(&one[..], &data[offset..offset + len]);
            }
            let mut past = vec![0u8; 2 * crate::parallel::PART];
            let e = src.fill_on(Some(&pool), (data.len() - crate::parallel::PART) as u64, &mut past).unwrap_err();
            assert_eq!(e.kind(), CudaErrorKind::InvalidWeights, "{name}: {e}");
        }
        std::fs::remove_file(&path).ok();
    }

    /// A node with the driver but without NVRTC or cuBLAS fails a GPU start with a reason naming what is missing,
    /// of the kind the worker reports as not retryable (`workers` tests that mapping; cudarc would panic on the
    /// first call instead).
    #[test]
    fn a_gpu_start_without_the_cuda_libraries_fails_naming_them() {
        let e = usable(true, &["NVRTC (libnvrtc)", "cuBLAS (libcublas)"]).unwrap_err();
        assert_eq!(e.kind(), CudaErrorKind::Unavailable);
        assert!(e.to_string().contains("NVRTC (libnvrtc) and cuBLAS (libcublas) not found"), "{e}");
        let e = usable(false, &[]).unwrap_err();
        assert_eq!(e.kind(), CudaErrorKind::Unavailable);
        assert!(e.to_string().contains("driver library is not present"), "{e}");
        assert!(usable(true, &[]).is_ok());
        // Without a driver here, a load says so instead of panicking.
        if !available() {
            let err = CudaModel::load_bytes(&crate::model::example_model(1, &[4, 2]), 0, 1).unwrap_err();
            assert_eq!(err.kind(), CudaErrorKind::Unavailable);
        }
    }

    /// The `narrow` kernel's conversions, compiled for the CPU with the system C compiler, round as the `half`
    /// crate does (to nearest, ties to even; overflow to infinity; subnormals; NaN stays NaN): every value next to
    /// each F16 and BF16 value and midpoint, and a million others.
    #[test]
    fn the_narrow_kernels_conversions_round_to_nearest_even() {
        use std::io::Write;
        let start = KERNELS.find("__device__ unsigned short to_f16").expect("to_f16 in KERNELS");
        let end = KERNELS.find("// Encodes `n` f32 values").expect("narrow in KERNELS");
        let program = format!(
            "#include <stdio.h>\n#include <string.h>\n#define __device__ static\n\
             static unsigned int __float_as_uint(float f) {{ unsigned int u; memcpy(&u, &f, 4); return u; }}\n\
             {}\n\
             int main(void) {{ unsigned int u; float f; unsigned short h[2];\n\
             while (fread(&u, 4, 1, stdin) == 1) {{ memcpy(&f, &u, 4); h[0] = to_f16(f); h[1] = to_bf16(f);\n\
             fwrite(h, 2, 2, stdout); }} return 0; }}\n",
            &KERNELS[start..end]
        );
        let dir = std::env::temp_dir().join(format!("kiln-narrow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("narrow.c"), program).unwrap();
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = std::process::Command::new(&cc)
            .args(["-O2", "-o"])
            .arg(dir.join("narrow"))
            .arg(dir.join("narrow.c"))
            .status()
            .unwrap_or_else(|e| panic!("running the C compiler {cc}: {e}"));
        assert!(built.success(), "the kernel's conversions do not compile as C");

        let mut inputs: Vec<u32> = Vec::new();
        for h in 0..=u16::MAX {
            let f16_bits = half::f16::from_bits(h).to_f32().to_bits();
            let bf16_bits = u32::from(h) << 16;
            for d in [0u32, 1, 0xfff, 0x1000, 0x1001] {
                inputs.extend([f16_bits.wrapping_add(d), f16_bits.wrapping_sub(d)]);
            }
            for d in [0u32, 1, 0x7fff, 0x8000, 0x8001] {
                inputs.extend([bf16_bits.wrapping_add(d), bf16_bits.wrapping_sub(d)]);
            }
        }
        let mut rng = kiln_core::rng::Rng::new(7);
        inputs.extend((0..1_000_000).map(|_| rng.below(1 << 32) as u32));
        let mut child = std::process::Command::new(dir.join("narrow"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let bytes: Vec<u8> = inputs.iter().flat_map(|u| u.to_le_bytes()).collect();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&bytes));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(out.stdout.len(), inputs.len() * 4);
        for (u, got) in inputs.iter().zip(out.stdout.as_chunks::<4>().0) {
            let f = f32::from_bits(*u);
            let (h, b) = (u16::from_le_bytes([got[0], got[1]]), u16::from_le_bytes([got[2], got[3]]));
            if f.is_nan() {
                assert!(half::f16::from_bits(h).is_nan() && half::bf16::from_bits(b).is_nan(), "{u:#010x}");
            } else {
                assert_eq!(h, half::f16::from_f32(f).to_bits(), "f16 of {u:#010x} ({f:e})");
                assert_eq!(b, half::bf16::from_f32(f).to_bits(), "bf16 of {u:#010x} ({f:e})");
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: KILN_TEST_CUDA=1 cargo nextest run -p kiln-agent --run-ignored only cuda"]
    fn the_gpu_path_matches_the_cpu_path() {
        assert!(wanted() && available(), "set KILN_TEST_CUDA=1 on a machine with CUDA");
        let bytes = example_model(3, &[64, 256, 256, 10]);
        let model = load_bytes(&bytes).unwrap();
        let batch: Vec<Vec<f32>> = (0..32).map(|r| (0..64).map(|c| ((r * 64 + c) as f32).sin()).collect()).collect();
        let cpu = model.forward(&batch).unwrap();
        let (gpu_model, copy) = CudaModel::load_bytes(&bytes, 0, 4).unwrap();
        assert!(copy > Duration::ZERO);
        let gpu = gpu_model.forward(&batch).unwrap();
        for (a, b) in cpu.iter().flatten().zip(gpu.iter().flatten()) {
            assert!((a - b).abs() <= 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }

    /// F16 and BF16 files streamed from disk through the pipeline (tensors larger than a staging buffer, so
    /// buffers are reused), kept in their format on the GPU and multiplied in half precision, give the CPU path's
    /// answers within the rounding of the activations, and hold half the GPU memory of f32.
    #[test]
    #[ignore = "needs an NVIDIA GPU: KILN_TEST_CUDA=1 cargo nextest run -p kiln-agent --run-ignored only cuda"]
    fn streamed_half_precision_files_match_the_cpu_path() {
        use crate::model::{Activation, Dtype, LayerSpec, write_model};
        assert!(wanted() && available(), "set KILN_TEST_CUDA=1 on a machine with CUDA");
        let w: Vec<f32> = (0..3000 * 2000).map(|i| ((i % 613) as f32 - 306.0) / 5000.0).collect();
        let layers = [
            LayerSpec::new(w, (0..3000).map(|i| i as f32 / 3000.0).collect(), 3000, 2000),
            LayerSpec::new(vec![0.01; 7 * 3000], vec![], 7, 3000),
        ];
        let dir = std::env::temp_dir();
        let bf16_gemm = CudaContext::new(0).unwrap().compute_capability().unwrap().0 >= 8;
        for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
            let bytes = write_model(&layers, Activation::Gelu, dtype);
            let path = dir.join(format!("kiln-cuda-{dtype:?}-{}.safetensors", std::process::id()));
            std::fs::write(&path, &bytes).unwrap();
            let weights = crate::cache::Weights::File { path: path.clone(), size: bytes.len() as u64 };
            let (gpu_model, t) = CudaModel::load_weights(&weights, 0, 4).unwrap();
            std::fs::remove_file(&path).ok();
            println!("{dtype:?}: {t:?}");
            let cpu = load_bytes(&bytes).unwrap();
            // Weight matrices in the file's dtype, biases in f32.
            let (weights, biases) = (3000 * 2000 + 7 * 3000, 3000u64);
            let widened = dtype == Dtype::F32 || (dtype == Dtype::BF16 && !bf16_gemm);
            let size = if widened { 4 } else { 2 };
            assert_eq!(gpu_model.device_bytes(), weights * size + biases * 4, "{dtype:?}");
            let batch: Vec<Vec<f32>> =
                (0..4).map(|r| (0..2000).map(|c| ((r * 7 + c) as f32).cos()).collect()).collect();
            let (a, b) = (cpu.forward(&batch).unwrap(), gpu_model.forward(&batch).unwrap());
            // The GPU rounds each layer's input to the weights' format (F16: 11 significant bits, BF16: 8).
            let tolerance = match dtype {
                Dtype::F32 => 1e-3,
                Dtype::F16 => 2e-3,
                Dtype::BF16 => 1e-2,
            };
            // The same file from the host-RAM tier, pinned (copied straight, no staging) and pageable (staged):
            // the same weights on the GPU, so the same answers.
            let pinner = crate::cache::Pinner(Arc::new(pin_host));
            for host in
                [crate::cache::HostBytes::pinned(bytes.clone(), &pinner), crate::cache::HostBytes::new(bytes.clone())]
            {
                let pinned = host.is_pinned();
                let (from_host, _) =
                    CudaModel::load_weights(&crate::cache::Weights::Host(Arc::new(host)), 0, 4).unwrap();
                assert_eq!(from_host.forward(&batch).unwrap(), b, "{dtype:?}, pinned: {pinned}");
            }
            let worst = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs() / (1.0 + x.abs()));
            println!("{dtype:?}: worst |cpu - gpu| / (1 + |cpu|) = {:.2e}", worst.fold(0.0f32, f32::max));
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() <= tolerance * (1.0 + x.abs()), "{dtype:?}: {x} vs {y}");
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: KILN_TEST_CUDA=1 cargo nextest run -p kiln-agent --run-ignored only cuda"]
    fn staged_copies_reach_most_of_a_plain_pinned_copy() {
        assert!(wanted() && available(), "set KILN_TEST_CUDA=1 on a machine with CUDA");
        let r = bench_host_to_device(0, 1 << 30, 4).unwrap();
        println!("host-to-device: {r:?}");
        assert!(r.staged > 0.0 && r.plain > 0.0);
        // Pinned host memory goes straight to the GPU: as fast as the plain copy, give or take the noise.
        let pinned = r.pinned.expect("pinning works where CUDA does");
        assert!(pinned >= 0.8 * r.plain, "{r:?}");
    }
}
