//! The native model file: a safetensors file of linear layers, its element types, and loading it — framing,
//! names, dtypes, shapes and limits checked before anything is converted to f32.

use std::{
    collections::BTreeMap,
    os::unix::fs::FileExt,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use half::{
    bf16, f16,
    slice::{HalfBitsSliceExt, HalfFloatSliceExt},
};
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors, tensor::Metadata};
use zerocopy::IntoBytes;

use super::{
    ACTIVATION_KEY, Activation, DenseLayer, DenseModel, HEADER_LEN_BYTES, MAX_DIM, MAX_FILE_BYTES, MAX_LAYERS,
    MAX_PARAMS, ModelError,
};

/// The element types a model file may store its tensors in (all are converted to f32 on load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl std::str::FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::BF16),
            _ => Err(format!("unknown dtype {s:?}: f32, f16 or bf16")),
        }
    }
}

impl Dtype {
    /// The safetensors dtype this corresponds to.
    pub(super) fn safetensors(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::F16 => StDtype::F16,
            Dtype::BF16 => StDtype::BF16,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// The name safetensors headers give it (`F32`, `F16`, `BF16`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }

    /// Encodes `values` little-endian in this dtype (rounding to nearest for F16 and BF16).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            Dtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        }
    }
}

/// Wall-clock time spent in each phase of [`load_file`]. The phases are consecutive intervals of one clock, so
/// [`LoadTimings::total`] is the function's wall-clock time (less the nanoseconds of its last return).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadTimings {
    /// Reading the file: opening it, its header, and every chunk of tensor data (from the page cache or the disk).
    pub read: Duration,
    /// Parsing and validating the header (names, dtypes, shapes, limits).
    pub parse: Duration,
    /// Converting the chunks read to f32 in the model's own buffers: the CPU stand-in for the host-to-device copy.
    pub convert: Duration,
}

impl LoadTimings {
    /// The sum of all phases.
    pub fn total(&self) -> Duration {
        self.read + self.parse + self.convert
    }
}

/// Where one validated tensor's data lies in a model file, and its element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLoc {
    /// Element type in the file.
    pub dtype: Dtype,
    /// Byte offset of the data from the start of the file.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: usize,
    /// Elements.
    pub elements: usize,
}

/// One layer of a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLoc {
    /// Output width.
    pub out_dim: usize,
    /// Input width.
    pub in_dim: usize,
    /// The `[out, in]` weight.
    pub weight: TensorLoc,
    /// The `[out]` bias, when present.
    pub bias: Option<TensorLoc>,
}

/// A model file's validated header: what a loader needs to read each tensor straight into its own buffers (host
/// or device) without reading the file whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The activation between layers.
    pub activation: Activation,
    /// The layers, input first.
    pub layers: Vec<LayerLoc>,
}

fn dtype_of(d: StDtype) -> Dtype {
    match d {
        StDtype::F16 => Dtype::F16,
        StDtype::BF16 => Dtype::BF16,
        _ => Dtype::F32,
    }
}

fn layout_of(activation: Activation, pending: &[PendingLayer], data_start: u64) -> Layout {
    let loc = |t: &TensorRef| TensorLoc {
        dtype: dtype_of(t.dtype),
        offset: data_start + t.start as u64,
        bytes: t.end - t.start,
        elements: t.elements(),
    };
    let layers = pending
        .iter()
        .map(|p| LayerLoc {
            out_dim: p.out_dim,
            in_dim: p.in_dim,
            weight: loc(&p.weight),
            bias: p.bias.as_ref().map(loc),
        })
        .collect();
    Layout { activation, layers }
}

/// The validated layout of a model held in memory (as [`load_bytes`] validates it); offsets are into `bytes`.
pub fn layout_of_bytes(bytes: &[u8]) -> Result<Layout, ModelError> {
    check_framing(bytes)?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(ModelError::Safetensors)?;
    let data_len = bytes.len() - HEADER_LEN_BYTES - header_len;
    let (activation, pending) = parse(&metadata, data_len)?;
    Ok(layout_of(activation, &pending, (HEADER_LEN_BYTES + header_len) as u64))
}

/// Reads and validates the header of the open model file `file` (at `path`, for messages): everything
/// [`load_bytes`] checks, reading only the header. Returns the layout and the time spent reading and parsing.
pub fn read_layout(file: &std::fs::File, path: &Path) -> Result<(Layout, Duration, Duration), ModelError> {
    let io_err = |source| ModelError::Io { path: path.to_path_buf(), source };
    let in_file = |source: ModelError| ModelError::File { path: path.to_path_buf(), source: Box::new(source) };
    let started = Instant::now();
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        // A device (/dev/zero reports size 0 and never ends) or a directory.
        return Err(io_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let size = meta.len();
    if size > MAX_FILE_BYTES {
        return Err(ModelError::FileTooLarge { path: path.to_path_buf(), size, limit: MAX_FILE_BYTES });
    }
    let size = size as usize; // at most MAX_FILE_BYTES, which fits a 64-bit usize
    let mut len = [0u8; HEADER_LEN_BYTES];
    if size < HEADER_LEN_BYTES {
        return Err(in_file(ModelError::Truncated { len: size }));
    }
    file.read_exact_at(&mut len, 0).map_err(io_err)?;
    let declared = u64::from_le_bytes(len);
    let available = size - HEADER_LEN_BYTES;
    let header_len = usize::try_from(declared).ok().filter(|&n| n <= available);
    let Some(header_len) = header_len else {
        return Err(in_file(ModelError::HeaderBeyondEnd { declared, available }));
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(in_file(ModelError::Safetensors(SafeTensorError::HeaderTooLarge)));
    }
    let mut header = vec![0u8; header_len];
    file.read_exact_at(&mut header, HEADER_LEN_BYTES as u64).map_err(io_err)?;
    let read = started.elapsed();

    let data_len = available - header_len;
    let data_start = (HEADER_LEN_BYTES + header_len) as u64;
    let (activation, pending) = (|| {
        check_header_framing(&header, data_len)?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| ModelError::Safetensors(SafeTensorError::InvalidHeaderDeserialization(e)))?;
        if data_end(&metadata) != data_len {
            return Err(ModelError::Safetensors(SafeTensorError::MetadataIncompleteBuffer));
        }
        parse(&metadata, data_len)
    })()
    .map_err(in_file)?;
    Ok((layout_of(activation, &pending, data_start), read, started.elapsed() - read))
}

/// Loads a model file: the header is read and validated first ([`read_layout`]), then each tensor is read in parts
/// with positioned reads on the loaders' threads straight into the layer's f32 buffer (converted on the way), with
/// no copy of the whole file in memory. Validates exactly what [`load_bytes`] does; errors about the contents name the file.
pub fn load_file(path: &Path) -> Result<(DenseModel, LoadTimings), ModelError> {
    let io_err = |source| ModelError::Io { path: path.to_path_buf(), source };
    let started = Instant::now();
    let file = std::fs::File::open(path).map_err(io_err)?;
    let opened = started.elapsed();
    let (layout, read, parse) = read_layout(&file, path)?;
    let mut timings = LoadTimings { read: opened + read, parse, convert: Duration::ZERO };
    let mut mark = Instant::now();
    timings.parse += (mark - started).saturating_sub(timings.read + timings.parse);
    let mut lap = |into: &mut Duration| {
        let now = Instant::now();
        *into += now - mark;
        mark = now;
    };
    // Tensors are read (and F16/BF16 widened) on the loaders' threads ([`crate::parallel::loaders`]): one thread
    // reads the page cache at a fraction of what memory carries, widening is CPU work, and the model's fresh pages
    // fault in on the threads that fill them.
    let pool = crate::parallel::loaders();
    let mut read_into = |t: &TensorLoc, timings: &mut LoadTimings| -> Result<Vec<f32>, ModelError> {
        if t.dtype == Dtype::F32 {
            // Straight into the layer's buffer: one copy, from the page cache (or the disk) into the model. The
            // file's little-endian bytes are the values on a little-endian target; a big-endian one swaps them.
            let mut out = vec![0f32; t.elements];
            crate::parallel::fill(pool, out.as_mut_bytes(), |at, part| file.read_exact_at(part, t.offset + at as u64))
                .map_err(io_err)?;
            lap(&mut timings.read);
            if cfg!(target_endian = "big") {
                out.iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
            }
            lap(&mut timings.convert);
            return Ok(out);
        }
        // F16 / BF16: each part of the tensor read through a buffer of the thread that takes it and widened into
        // its place. Reading and widening overlap across the threads, so the section's time is split between the
        // two phases in proportion to the time the threads spent on each.
        let (dtype, per) = (t.dtype.safetensors(), crate::parallel::PART / 2);
        let mut out = vec![0f32; t.elements];
        let (reading, widening) = (AtomicU64::new(0), AtomicU64::new(0));
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let part = |buf: &mut Vec<u16>, (i, dst): (usize, &mut [f32])| {
            let bits = &mut buf[..dst.len()];
            let began = Instant::now();
            file.read_exact_at(bits.as_mut_bytes(), t.offset + (i * crate::parallel::PART) as u64)?;
            let read = began.elapsed();
            widen_into(dtype, bits, dst);
            reading.fetch_add(nanos(read), Ordering::Relaxed);
            widening.fetch_add(nanos(began.elapsed() - read), Ordering::Relaxed);
            Ok::<_, std::io::Error>(())
        };
        let buffer = || vec![0u16; per.min(t.elements)];
        match pool {
            Some(pool) => pool.install(|| {
                use rayon::prelude::*;
                out.par_chunks_mut(per).enumerate().try_for_each_init(buffer, part)
            }),
            None => {
                let mut buf = buffer();
                out.chunks_mut(per).enumerate().try_for_each(|p| part(&mut buf, p))
            }
        }
        .map_err(io_err)?;
        let mut section = Duration::ZERO;
        lap(&mut section);
        let (r, w) = (reading.into_inner() as f64, widening.into_inner() as f64);
        let read = section.mul_f64(if r + w > 0.0 { r / (r + w) } else { 1.0 });
        timings.read += read;
        timings.convert += section - read;
        Ok(out)
    };
    let mut layers = Vec::with_capacity(layout.layers.len());
    for l in &layout.layers {
        let weight = read_into(&l.weight, &mut timings)?;
        let bias = l.bias.as_ref().map(|b| read_into(b, &mut timings)).transpose()?;
        layers.push(DenseLayer { weight, bias, out_dim: l.out_dim, in_dim: l.in_dim });
    }
    lap(&mut timings.convert);
    Ok((DenseModel { layers, activation: layout.activation }, timings))
}

/// Parses, validates and converts a model from a safetensors buffer held in memory.
pub fn load_bytes(bytes: &[u8]) -> Result<DenseModel, ModelError> {
    check_framing(bytes)?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(ModelError::Safetensors)?;
    // `read_metadata` checked that the header and the data it describes exactly fill the buffer.
    let data = bytes.get(HEADER_LEN_BYTES.saturating_add(header_len)..).unwrap_or_default();
    let (activation, pending) = parse(&metadata, data.len())?;
    let convert = |t: &TensorRef| {
        let mut out = Vec::with_capacity(t.elements());
        append_f32(t.dtype, &data[t.start..t.end], &mut out);
        out
    };
    let layers = pending
        .iter()
        .map(|p| DenseLayer {
            weight: convert(&p.weight),
            bias: p.bias.as_ref().map(convert),
            out_dim: p.out_dim,
            in_dim: p.in_dim,
        })
        .collect();
    Ok(DenseModel { layers, activation })
}

/// Largest safetensors header (the safetensors library's limit).
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Where the data of the last tensor ends (tensors are contiguous from 0: the library checked that).
fn data_end(metadata: &Metadata) -> usize {
    metadata.offset_keys().iter().filter_map(|n| metadata.info(n)).map(|i| i.data_offsets.1).max().unwrap_or(0)
}

/// A validated tensor: its dtype and where its data lies in the data section.
#[derive(Debug, Clone)]
pub(crate) struct TensorRef {
    pub(crate) dtype: StDtype,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl TensorRef {
    /// Elements held.
    pub(crate) fn elements(&self) -> usize {
        (self.end - self.start) / self.dtype.bitsize().div_ceil(8).max(1)
    }
}

/// A layer's tensors, validated but not yet read.
pub(crate) struct PendingLayer {
    pub(crate) weight: TensorRef,
    pub(crate) bias: Option<TensorRef>,
    pub(crate) out_dim: usize,
    pub(crate) in_dim: usize,
}

/// Checks the framing the safetensors library would otherwise only report vaguely (or, for offsets near
/// `usize::MAX`, overflow on): the header length fits the buffer and no tensor's data ends past the buffer.
/// A header that is not a JSON object is left for the library to report.
fn check_framing(bytes: &[u8]) -> Result<(), ModelError> {
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<HEADER_LEN_BYTES>() else {
        return Err(ModelError::Truncated { len: bytes.len() });
    };
    let declared = u64::from_le_bytes(*len_bytes);
    let header_len = usize::try_from(declared).ok().filter(|&n| n <= rest.len());
    let Some(header_len) = header_len else {
        return Err(ModelError::HeaderBeyondEnd { declared, available: rest.len() });
    };
    let (header, data) = rest.split_at(header_len);
    check_header_framing(header, data.len())
}

/// The part of [`check_framing`] after the header length: no tensor's data ends past `data_len`.
fn check_header_framing(header: &[u8], data_len: usize) -> Result<(), ModelError> {
    let Ok(serde_json::Value::Object(entries)) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Ok(());
    };
    for (name, info) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(serde_json::Value::as_u64);
        if let Some(end) = end
            && usize::try_from(end).ok().is_none_or(|e| e > data_len)
        {
            return Err(ModelError::TensorOutOfBounds { tensor: name.clone(), end, available: data_len });
        }
    }
    Ok(())
}

/// Which tensor of a layer a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Weight,
    Bias,
}

/// Splits `layers.{i}.weight` / `layers.{i}.bias` into index and part. The index must be written canonically
/// (decimal, no sign, no leading zeros); one too large for `usize` maps to `usize::MAX`, which fails the layer limit.
fn parse_name(name: &str) -> Option<(usize, Part)> {
    let (index, part) = name.strip_prefix("layers.")?.split_once('.')?;
    let part = match part {
        "weight" => Part::Weight,
        "bias" => Part::Bias,
        _ => return None,
    };
    let canonical =
        !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) && (index == "0" || !index.starts_with('0'));
    canonical.then(|| (index.parse().unwrap_or(usize::MAX), part))
}

/// Validates a parsed header against a data section of `data_len` bytes, returning the activation and the layers'
/// tensors in order.
pub(crate) fn parse(metadata: &Metadata, data_len: usize) -> Result<(Activation, Vec<PendingLayer>), ModelError> {
    let activation = match metadata.metadata().as_ref().and_then(|m| m.get(ACTIVATION_KEY)) {
        None => Activation::default(),
        Some(value) => {
            Activation::from_name(value).ok_or_else(|| ModelError::UnknownActivation { value: value.clone() })?
        }
    };

    // Classify every tensor, in name order so that errors are deterministic.
    let mut names = metadata.offset_keys();
    names.sort_unstable();
    let mut slots: BTreeMap<usize, (Option<&str>, Option<&str>)> = BTreeMap::new();
    for name in &names {
        let (index, part) = parse_name(name).ok_or_else(|| ModelError::UnexpectedTensor { tensor: name.to_owned() })?;
        if index >= MAX_LAYERS {
            return Err(ModelError::Limit {
                what: format!("{name}: layer index"),
                value: index,
                limit: MAX_LAYERS - 1,
            });
        }
        let slot = slots.entry(index).or_default();
        match part {
            Part::Weight => slot.0 = Some(name),
            Part::Bias => slot.1 = Some(name),
        }
    }
    if slots.is_empty() {
        return Err(ModelError::NoLayers);
    }

    let mut pending: Vec<PendingLayer> = Vec::with_capacity(slots.len());
    let mut params = 0usize;
    for (expected_index, (index, (weight_name, bias_name))) in slots.into_iter().enumerate() {
        if index != expected_index {
            let found = weight_name.or(bias_name).unwrap_or_default().to_owned();
            return Err(ModelError::MissingWeight { tensor: format!("layers.{expected_index}.weight"), found });
        }
        let Some(weight_name) = weight_name else {
            return Err(ModelError::MissingWeight {
                tensor: format!("layers.{index}.weight"),
                found: bias_name.unwrap_or_default().to_owned(),
            });
        };
        let (weight, shape) = view(metadata, data_len, weight_name)?;
        let &[out_dim, in_dim] = shape.as_slice() else {
            return Err(ModelError::BadRank {
                tensor: weight_name.to_owned(),
                shape: shape.clone(),
                expected: 2,
                layout: "[out, in]",
            });
        };
        if out_dim == 0 || in_dim == 0 {
            return Err(ModelError::ZeroDim { tensor: weight_name.to_owned(), shape: shape.clone() });
        }
        for (what, value) in [("inputs", in_dim), ("outputs", out_dim)] {
            if value > MAX_DIM {
                return Err(ModelError::Limit { what: format!("{weight_name}: {what}"), value, limit: MAX_DIM });
            }
        }
        if let Some(previous) = pending.last()
            && previous.out_dim != in_dim
        {
            return Err(ModelError::ShapeChain {
                tensor: weight_name.to_owned(),
                shape: shape.clone(),
                previous_out: previous.out_dim,
            });
        }
        let bias = match bias_name {
            None => None,
            Some(bias_name) => {
                let (bias, bias_shape) = view(metadata, data_len, bias_name)?;
                let &[len] = bias_shape.as_slice() else {
                    return Err(ModelError::BadRank {
                        tensor: bias_name.to_owned(),
                        shape: bias_shape.clone(),
                        expected: 1,
                        layout: "[out]",
                    });
                };
                if len != out_dim {
                    return Err(ModelError::BiasLength { tensor: bias_name.to_owned(), len, expected: out_dim });
                }
                Some(bias)
            }
        };
        // Dimensions are at most MAX_DIM (2^20) each, so this cannot overflow; checked anyway.
        params = out_dim
            .checked_mul(in_dim)
            .and_then(|w| w.checked_add(if bias.is_some() { out_dim } else { 0 }))
            .and_then(|n| n.checked_add(params))
            .unwrap_or(usize::MAX);
        if params > MAX_PARAMS {
            return Err(ModelError::Limit {
                what: format!("parameter count through layer {index}"),
                value: params,
                limit: MAX_PARAMS,
            });
        }
        pending.push(PendingLayer { weight, bias, out_dim, in_dim });
    }
    Ok((activation, pending))
}

/// The named tensor's dtype, place and shape, checked to have a supported dtype, to lie within the `data_len`
/// bytes of the data section and to hold exactly as many bytes as its shape needs.
fn view(metadata: &Metadata, data_len: usize, name: &str) -> Result<(TensorRef, Vec<usize>), ModelError> {
    let info =
        metadata.info(name).ok_or_else(|| ModelError::Safetensors(SafeTensorError::TensorNotFound(name.to_owned())))?;
    if !matches!(info.dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16) {
        return Err(ModelError::UnsupportedDtype { tensor: name.to_owned(), dtype: format!("{:?}", info.dtype) });
    }
    let (start, end) = info.data_offsets;
    if end > data_len || start > end {
        return Err(ModelError::TensorOutOfBounds {
            tensor: name.to_owned(),
            end: u64::try_from(end).unwrap_or(u64::MAX),
            available: data_len,
        });
    }
    let bytes = info
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(info.dtype.bitsize() / 8));
    if bytes != Some(end - start) {
        return Err(ModelError::Safetensors(SafeTensorError::TensorInvalidInfo));
    }
    Ok((TensorRef { dtype: info.dtype, start, end }, info.shape.clone()))
}

/// Converts F16 or BF16 values, read little-endian into `bits`, to f32 into `out` (one per value): F16 with the
/// `half` crate's slice conversion (F16C instructions where the CPU has them), BF16 by a shift the compiler
/// vectorizes.
fn widen_into(dtype: StDtype, bits: &mut [u16], out: &mut [f32]) {
    if cfg!(target_endian = "big") {
        bits.iter_mut().for_each(|b| *b = u16::from_le(*b));
    }
    if dtype == StDtype::BF16 {
        out.iter_mut().zip(bits.iter()).for_each(|(o, &b)| *o = f32::from_bits(u32::from(b) << 16));
    } else {
        bits.reinterpret_cast::<f16>().convert_to_f32_slice(out);
    }
}

/// Converts little-endian F32, F16 or BF16 values (`dtype` was validated by [`view`]) to f32, appending to `out`.
pub(crate) fn append_f32(dtype: StDtype, data: &[u8], out: &mut Vec<f32>) {
    match dtype {
        StDtype::F16 => out.extend(data.as_chunks::<2>().0.iter().map(|&b| f16::from_le_bytes(b).to_f32())),
        StDtype::BF16 => out.extend(data.as_chunks::<2>().0.iter().map(|&b| bf16::from_le_bytes(b).to_f32())),
        // `view` admits only F32 besides the two above.
        _ => out.extend(data.as_chunks::<4>().0.iter().map(|&b| f32::from_le_bytes(b))),
    }
}
