//! The CUDA path of the native runtime (cudarc): a dense model's weights streamed from the model file (or the
//! host-RAM tier) to the GPU, inference with cuBLAS GEMMs and small NVRTC-compiled kernels; and the host-to-device
//! bandwidth figures of `bench-load`.
//!
//! **Loading** ([`CudaModel::load_weights`]) is a pipeline with no whole-file copy in host memory: the header is
//! read and validated first; then each tensor's bytes, in file dtype, go chunk by chunk with positioned reads from
//! the file (page cache or disk) into one of `2 x streams` pinned buffers and from there to the GPU with an async
//! copy on that buffer's stream; the CPU waits only for the copy that last used the buffer it fills next, so
//! reading chunk `i + 1` overlaps the DMA of chunk `i`. Each tensor is widened to f32 on the GPU by a kernel (F16
//! and BF16 cross PCIe at half size); the weights are held in f32 on the GPU (mixed-precision GEMMs that would
//! keep them in f16 are not done). A multi-GPU replica loads onto its first GPU only (no tensor parallelism).
//! **Unmeasured:** this pipeline compiles in CI but has not been timed on a GPU yet; `bench-load` prints its
//! figure against one plain pinned copy on a machine with CUDA.
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
        CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig, PinnedHostSlice,
        PushKernelArg,
    },
    nvrtc::compile_ptx,
};

use crate::model::Activation;

/// Whether the CUDA driver library can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only tries to load the driver library and look up its symbols; nothing is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
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

/// Bytes per staging buffer (8 MiB).
const CHUNK: usize = 8 << 20;

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

struct Layer {
    weight: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
    out_dim: usize,
    in_dim: usize,
}

/// A dense model resident on one GPU.
pub struct CudaModel {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    bias_act: CudaFunction,
    layers: Vec<Layer>,
    activation: Activation,
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
}

impl Source<'_> {
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<(), CudaError> {
        match self {
            Source::File(f) => std::os::unix::fs::FileExt::read_exact_at(*f, buf, offset)
                .map_err(|e| CudaError::new(CudaErrorKind::InvalidWeights, format!("reading the weights: {e}"))),
            Source::Bytes(b) => {
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
/// `i % streams`; a buffer is refilled only once the event recorded after its last copy has completed.
struct Pipeline {
    streams: Vec<Arc<CudaStream>>,
    buffers: Vec<PinnedHostSlice<u8>>,
    done: Vec<Option<CudaEvent>>,
    next: usize,
}

impl Pipeline {
    fn new(ctx: &Arc<CudaContext>, streams: usize) -> Result<Self, CudaError> {
        let streams: Vec<Arc<CudaStream>> =
            (0..streams.max(1)).map(|_| ctx.new_stream().map_err(err)).collect::<Result<_, _>>()?;
        let depth = 2 * streams.len();
        // SAFETY: the buffers' contents are unset; `upload` writes every byte it then copies (`Source::fill`
        // fills the chunk before the copy of that chunk is enqueued).
        let buffers =
            (0..depth).map(|_| unsafe { ctx.alloc_pinned::<u8>(CHUNK) }.map_err(err)).collect::<Result<_, _>>()?;
        Ok(Self { streams, buffers, done: (0..depth).map(|_| None).collect(), next: 0 })
    }

    /// Copies `dst.len()` bytes of `src` from `offset` into `dst`, chunk by chunk.
    fn upload(&mut self, src: Source<'_>, offset: u64, dst: &mut CudaSlice<u8>) -> Result<(), CudaError> {
        let len = dst.len();
        let mut at = 0usize;
        while at < len {
            let n = (len - at).min(CHUNK);
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
            src.fill(offset + at as u64, host)?;
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
            crate::cache::Weights::Host(bytes) => {
                (crate::model::layout_of_bytes(bytes).map_err(invalid)?, Source::Bytes(bytes))
            }
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
        if !available() {
            return Err(CudaError::new(CudaErrorKind::Unavailable, "the CUDA driver library is not present"));
        }
        let started = Instant::now();
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        let stream = ctx.default_stream();
        let ptx = compile_ptx(KERNELS).map_err(err)?;
        let module = ctx.load_module(ptx).map_err(err)?;
        let bias_act = module.load_function("bias_act").map_err(err)?;
        let widen = module.load_function("widen").map_err(err)?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(err)?;
        let mut pipeline = Pipeline::new(&ctx, copy_streams)?;
        let init = started.elapsed();

        let started = Instant::now();
        let mut to_device = |t: &crate::model::TensorLoc| -> Result<CudaSlice<f32>, CudaError> {
            // SAFETY: every byte of `raw` is written by the pipeline's copies before `widen` reads it (same
            // buffer, ordered by cudarc's per-slice events across streams).
            let mut raw = unsafe { stream.alloc::<u8>(t.bytes.max(1)) }.map_err(err)?;
            pipeline.upload(source, t.offset, &mut raw)?;
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
            let weight = to_device(&l.weight)?;
            let bias = l.bias.as_ref().map(&mut to_device).transpose()?;
            layers.push(Layer { weight, bias, out_dim: l.out_dim, in_dim: l.in_dim });
        }
        pipeline.finish()?;
        stream.synchronize().map_err(err)?;
        let copy = started.elapsed();
        Ok((Self { stream, blas, bias_act, layers, activation: layout.activation }, init, copy))
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
        self.layers.iter().map(|l| (l.weight.len() + l.bias.as_ref().map_or(0, CudaSlice::len)) as u64 * 4).sum()
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
            // SAFETY: the dimensions and leading dimensions match the allocations: W holds out*in, X rows*in and
            // Y rows*out f32 values, all on this model's context and stream.
            unsafe { self.blas.gemm(cfg, &layer.weight, &x, &mut y) }.map_err(err)?;
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

/// Host-to-device bandwidth on GPU `ordinal`, GB/s: `(staged, plain)` where `staged` streams `bytes` from host
/// memory through the loader's [`Pipeline`] on `streams` streams, and `plain` is one `cudaMemcpyAsync` from a
/// pinned buffer holding everything (the reference).
pub fn bench_host_to_device(ordinal: usize, bytes: usize, streams: usize) -> Result<(f64, f64), CudaError> {
    if !available() {
        return Err(CudaError::new(CudaErrorKind::Unavailable, "the CUDA driver library is not present"));
    }
    let ctx = CudaContext::new(ordinal).map_err(err)?;
    let host: Vec<u8> = (0..bytes).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let mut pipeline = Pipeline::new(&ctx, streams)?;
    let stream = ctx.default_stream();
    // SAFETY: the pipeline writes every byte of `dst` before anything reads it (nothing does).
    let mut dst = unsafe { stream.alloc::<u8>(bytes.max(1)) }.map_err(err)?;
    // Warm-up (first-touch costs), then the staged copy.
    // SAFETY: as `dst`.
    let mut warm = unsafe { stream.alloc::<u8>(bytes.clamp(1, CHUNK)) }.map_err(err)?;
    pipeline.upload(Source::Bytes(&host), 0, &mut warm)?;
    pipeline.finish()?;
    let started = Instant::now();
    pipeline.upload(Source::Bytes(&host), 0, &mut dst)?;
    pipeline.finish()?;
    let staged_s = started.elapsed().as_secs_f64();
    // The reference: all of it pinned, one copy.
    // SAFETY: filled whole below before the copy reads it.
    let mut all = unsafe { ctx.alloc_pinned::<u8>(bytes.max(1)) }.map_err(err)?;
    all.as_mut_slice().map_err(err)?[..bytes].copy_from_slice(&host);
    stream.synchronize().map_err(err)?;
    let started = Instant::now();
    stream.memcpy_htod(&all, &mut dst).map_err(err)?;
    stream.synchronize().map_err(err)?;
    let plain_s = started.elapsed().as_secs_f64();
    let gbps = |s: f64| bytes as f64 / s.max(1e-9) / 1e9;
    Ok((gbps(staged_s), gbps(plain_s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{example_model, load_bytes};

    fn wanted() -> bool {
        std::env::var("KILN_TEST_CUDA").is_ok_and(|v| v == "1")
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
    /// buffers are reused) and widened on the GPU give the CPU path's answers.
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
        for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
            let bytes = write_model(&layers, Activation::Gelu, dtype);
            let path = dir.join(format!("kiln-cuda-{dtype:?}-{}.safetensors", std::process::id()));
            std::fs::write(&path, &bytes).unwrap();
            let weights = crate::cache::Weights::File { path: path.clone(), size: bytes.len() as u64 };
            let (gpu_model, t) = CudaModel::load_weights(&weights, 0, 4).unwrap();
            std::fs::remove_file(&path).ok();
            println!("{dtype:?}: {t:?}");
            let cpu = load_bytes(&bytes).unwrap();
            assert_eq!(gpu_model.device_bytes(), cpu.param_bytes() as u64);
            let batch: Vec<Vec<f32>> =
                (0..4).map(|r| (0..2000).map(|c| ((r * 7 + c) as f32).cos()).collect()).collect();
            let (a, b) = (cpu.forward(&batch).unwrap(), gpu_model.forward(&batch).unwrap());
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() <= 1e-3 * (1.0 + x.abs()), "{dtype:?}: {x} vs {y}");
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: KILN_TEST_CUDA=1 cargo nextest run -p kiln-agent --run-ignored only cuda"]
    fn staged_copies_reach_most_of_a_plain_pinned_copy() {
        assert!(wanted() && available(), "set KILN_TEST_CUDA=1 on a machine with CUDA");
        let (staged, plain) = bench_host_to_device(0, 1 << 30, 4).unwrap();
        println!("host-to-device: staged {staged:.1} GB/s, plain pinned {plain:.1} GB/s");
        assert!(staged > 0.0 && plain > 0.0);
    }
}
