//! The CUDA path of the native runtime (cudarc): a dense model's weights copied to the GPU through pinned host
//! staging buffers on several streams, inference with cuBLAS GEMMs and one small NVRTC-compiled kernel for bias
//! and activation; and the host-to-device bandwidth figures of `bench-load`.
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
    driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg},
    nvrtc::compile_ptx,
};

use crate::model::{Activation, DenseModel};

/// Whether the CUDA driver library can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only tries to load the driver library and look up its symbols; nothing is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A CUDA error, as text (cudarc's driver, NVRTC and cuBLAS errors differ in type).
#[derive(Debug, thiserror::Error)]
#[error("CUDA: {0}")]
pub struct CudaError(pub String);

fn err(e: impl std::fmt::Debug) -> CudaError {
    CudaError(format!("{e:?}"))
}

/// Elements per staging chunk (16 MiB of f32).
const CHUNK: usize = 4 << 20;

const KERNELS: &str = r#"
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

/// Copies `host` into device memory through pinned staging buffers, one per stream, round robin: the CPU fills one
/// buffer while the others are in flight.
fn upload(
    streams: &[Arc<CudaStream>],
    staging: &mut [PinnedHostSlice<f32>],
    host: &[f32],
) -> Result<CudaSlice<f32>, CudaError> {
    let mut dst = streams[0].alloc_zeros::<f32>(host.len().max(1)).map_err(err)?;
    streams[0].synchronize().map_err(err)?;
    for (i, chunk) in host.chunks(CHUNK).enumerate() {
        let k = i % streams.len();
        // The buffer is reused: its previous copy must be done.
        streams[k].synchronize().map_err(err)?;
        let buffer = staging[k].as_mut_slice().map_err(err)?;
        buffer[..chunk.len()].copy_from_slice(chunk);
        let start = i * CHUNK;
        let mut view = dst.slice_mut(start..start + chunk.len());
        let src = &staging[k].as_slice().map_err(err)?[..chunk.len()];
        streams[k].memcpy_htod(src, &mut view).map_err(err)?;
    }
    for s in streams {
        s.synchronize().map_err(err)?;
    }
    Ok(dst)
}

fn pinned(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedHostSlice<f32>, CudaError> {
    // SAFETY: the buffer's contents are unset; every use writes the elements it then reads (`upload` copies a chunk
    // in before copying that chunk out; `bench` fills the whole buffer first).
    unsafe { ctx.alloc_pinned::<f32>(len) }.map_err(err)
}

impl CudaModel {
    /// Puts `model` on GPU `ordinal`, copying on `copy_streams` streams; returns the model and the copy time.
    pub fn load(model: &DenseModel, ordinal: usize, copy_streams: usize) -> Result<(Self, Duration), CudaError> {
        if !available() {
            return Err(CudaError("the CUDA driver library is not present".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        let stream = ctx.default_stream();
        let streams: Vec<Arc<CudaStream>> =
            (0..copy_streams.max(1)).map(|_| ctx.new_stream().map_err(err)).collect::<Result<_, _>>()?;
        let mut staging: Vec<PinnedHostSlice<f32>> =
            streams.iter().map(|_| pinned(&ctx, CHUNK)).collect::<Result<_, _>>()?;
        let started = Instant::now();
        let mut layers = Vec::with_capacity(model.layers().len());
        for layer in model.layers() {
            let weight = upload(&streams, &mut staging, layer.weight())?;
            let bias = layer.bias().map(|b| upload(&streams, &mut staging, b)).transpose()?;
            layers.push(Layer { weight, bias, out_dim: layer.out_dim(), in_dim: layer.in_dim() });
        }
        let copy = started.elapsed();
        let ptx = compile_ptx(KERNELS).map_err(err)?;
        let module = ctx.load_module(ptx).map_err(err)?;
        let bias_act = module.load_function("bias_act").map_err(err)?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(err)?;
        Ok((Self { stream, blas, bias_act, layers, activation: model.activation() }, copy))
    }

    /// Runs a batch (rows of `input_dim`), as [`DenseModel::forward`] does on the CPU.
    pub fn forward(&self, batch: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, CudaError> {
        let Some(first) = self.layers.first() else { return Ok(Vec::new()) };
        let rows = batch.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        if let Some((i, row)) = batch.iter().enumerate().find(|(_, r)| r.len() != first.in_dim) {
            return Err(CudaError(format!("row {i}: expected {} values, got {}", first.in_dim, row.len())));
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

/// Host-to-device bandwidth on GPU `ordinal`, GB/s: `(staged, plain)` where `staged` copies `bytes` through
/// `streams` pinned staging buffers as the model loader does, and `plain` is one `cudaMemcpyAsync` from a pinned
/// buffer holding everything (the reference).
pub fn bench_host_to_device(ordinal: usize, bytes: usize, streams: usize) -> Result<(f64, f64), CudaError> {
    if !available() {
        return Err(CudaError("the CUDA driver library is not present".into()));
    }
    let ctx = CudaContext::new(ordinal).map_err(err)?;
    let len = bytes / 4;
    let host: Vec<f32> = (0..len).map(|i| i as f32).collect();
    let copy_streams: Vec<Arc<CudaStream>> =
        (0..streams.max(1)).map(|_| ctx.new_stream().map_err(err)).collect::<Result<_, _>>()?;
    let mut staging: Vec<PinnedHostSlice<f32>> =
        copy_streams.iter().map(|_| pinned(&ctx, CHUNK)).collect::<Result<_, _>>()?;
    // Warm-up, then the staged copy.
    drop(upload(&copy_streams, &mut staging, &host[..len.min(CHUNK)])?);
    let started = Instant::now();
    let staged = upload(&copy_streams, &mut staging, &host)?;
    let staged_s = started.elapsed().as_secs_f64();
    drop(staged);
    // The reference: all of it pinned, one copy.
    let mut all = pinned(&ctx, len)?;
    all.as_mut_slice().map_err(err)?.copy_from_slice(&host);
    let stream = ctx.default_stream();
    let mut dst = stream.alloc_zeros::<f32>(len).map_err(err)?;
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
        let model = load_bytes(&example_model(3, &[64, 256, 256, 10])).unwrap();
        let batch: Vec<Vec<f32>> = (0..32).map(|r| (0..64).map(|c| ((r * 64 + c) as f32).sin()).collect()).collect();
        let cpu = model.forward(&batch).unwrap();
        let (gpu_model, copy) = CudaModel::load(&model, 0, 4).unwrap();
        assert!(copy > Duration::ZERO);
        let gpu = gpu_model.forward(&batch).unwrap();
        for (a, b) in cpu.iter().flatten().zip(gpu.iter().flatten()) {
            assert!((a - b).abs() <= 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
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
