//! The native model runtime's CPU path: the dense-network model format, loading it from a safetensors file, and
//! running inference on the host.
//!
//! This module owns the *format* of a native Kiln model and its reference (CPU) implementation:
//!
//! * **Format.** One safetensors file holding a stack of linear layers: `layers.{i}.weight` with shape
//!   `[out, in]` (row-major) and an optional `layers.{i}.bias` with shape `[out]`, for `i = 0..n` with no gaps.
//!   Tensors may be F32, F16 or BF16; they are converted to f32 on load. The activation applied between layers
//!   (never after the last one) comes from the `activation` key of the file's `__metadata__`: `relu` (the
//!   default), `gelu` (tanh approximation), `silu` or `identity`. Any other tensor name, dtype or metadata value
//!   is rejected.
//! * **Loading.** [`load_file`] and [`load_bytes`] validate everything (header bounds, tensor offsets, names,
//!   dtypes, shapes that chain, size limits) and return a [`ModelError`] naming the tensor or field at fault,
//!   never panicking on malformed input. [`load_file`] also reports [`LoadTimings`] per phase; on the CPU the
//!   f32 conversion stands in for the host-to-device copy.
//! * **Inference.** [`DenseModel::forward`] runs a batch of rows through the network, deterministically.
//! * **Writing.** [`write_model`] serializes layers into a valid file (tests, tooling), and [`example_model`] makes
//!   the small deterministic random MLP that `kiln up` serves out of the box.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    io::Read,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use half::{bf16, f16};
use safetensors::{
    Dtype as StDtype, SafeTensorError, SafeTensors,
    tensor::{Metadata, TensorView},
};

/// Most layers a model may have.
pub const MAX_LAYERS: usize = 1024;

/// Largest input or output width of any layer.
pub const MAX_DIM: usize = 1 << 20;

/// Most parameters (weights plus biases, over all layers) a model may hold: 4 GiB once converted to f32.
pub const MAX_PARAMS: usize = 1 << 30;

/// Largest model file [`load_file`] reads: the parameter limit at F32 plus room for the header.
pub const MAX_FILE_BYTES: u64 = (MAX_PARAMS as u64) * 4 + 100_000_008;

/// The `__metadata__` key naming the activation between layers.
pub const ACTIVATION_KEY: &str = "activation";

/// Bytes of the little-endian header length that opens every safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// Everything that can go wrong loading, writing or running a dense model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file could not be read from disk.
    #[error("cannot read model file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The model file is larger than [`MAX_FILE_BYTES`].
    #[error("model file {} is {size} bytes, more than the limit of {limit}", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// [`MAX_FILE_BYTES`].
        limit: u64,
    },
    /// Loading the model file failed; `source` says why.
    #[error("model file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: Box<ModelError>,
    },
    /// The buffer is too short to hold even the 8-byte header length.
    #[error("truncated safetensors data: {len} bytes, the header length alone needs 8")]
    Truncated {
        /// Bytes available.
        len: usize,
    },
    /// The header length points past the end of the buffer.
    #[error("truncated safetensors data: header declares {declared} bytes but only {available} follow the length")]
    HeaderBeyondEnd {
        /// Header length declared by the first 8 bytes.
        declared: u64,
        /// Bytes actually present after them.
        available: usize,
    },
    /// A tensor's data offsets reach past the end of the data section.
    #[error("{tensor}: data offsets end at byte {end}, but the data section holds only {available} bytes")]
    TensorOutOfBounds {
        /// Tensor name.
        tensor: String,
        /// End offset declared in the header.
        end: u64,
        /// Size of the data section.
        available: usize,
    },
    /// The safetensors library rejected the buffer (bad JSON, inconsistent offsets, ...).
    #[error("invalid safetensors data: {0}")]
    Safetensors(#[source] SafeTensorError),
    /// The file holds no `layers.{i}.weight` tensor.
    #[error("the model has no layers: expected tensors layers.0.weight, layers.1.weight, ...")]
    NoLayers,
    /// A tensor whose name is not part of the format.
    #[error("unexpected tensor `{tensor}`: expected names of the form layers.{{i}}.weight or layers.{{i}}.bias")]
    UnexpectedTensor {
        /// Tensor name.
        tensor: String,
    },
    /// A layer's weight is missing although a later layer, or the same layer's bias, is present.
    #[error("{tensor} is missing but {found} is present: layers must be numbered contiguously from 0")]
    MissingWeight {
        /// The missing tensor.
        tensor: String,
        /// The tensor that shows it should exist.
        found: String,
    },
    /// A tensor's dtype is not F32, F16 or BF16.
    #[error("{tensor}: dtype {dtype} is not supported (expected F32, F16 or BF16)")]
    UnsupportedDtype {
        /// Tensor name.
        tensor: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor has the wrong number of dimensions.
    #[error("{tensor}: shape {shape:?} must have {expected} dimension(s) ({layout})")]
    BadRank {
        /// Tensor name.
        tensor: String,
        /// The shape found.
        shape: Vec<usize>,
        /// Dimensions required.
        expected: usize,
        /// The required layout, e.g. `[out, in]`.
        layout: &'static str,
    },
    /// A weight with a zero-sized dimension.
    #[error("{tensor}: shape {shape:?} has a zero dimension")]
    ZeroDim {
        /// Tensor name.
        tensor: String,
        /// The shape found.
        shape: Vec<usize>,
    },
    /// A weight whose input width differs from the previous layer's output width.
    #[error("{tensor}: shape {shape:?} does not chain: previous layer outputs {previous_out}")]
    ShapeChain {
        /// Tensor name.
        tensor: String,
        /// The shape found.
        shape: Vec<usize>,
        /// Output width of the previous layer.
        previous_out: usize,
    },
    /// A bias whose length differs from its layer's output width.
    #[error("{tensor}: length {len} does not match the layer's {expected} outputs")]
    BiasLength {
        /// Tensor name.
        tensor: String,
        /// Length found.
        len: usize,
        /// The layer's output width.
        expected: usize,
    },
    /// A weight buffer handed to [`write_model`] whose length is not `out * in`.
    #[error("{tensor}: {len} values given for shape [{out}, {inp}]")]
    WeightLength {
        /// Tensor name.
        tensor: String,
        /// Values given.
        len: usize,
        /// Output width.
        out: usize,
        /// Input width.
        inp: usize,
    },
    /// A size beyond one of this module's limits.
    #[error("{what} is {value}, more than the limit of {limit}")]
    Limit {
        /// What was measured, naming the tensor where there is one.
        what: String,
        /// The value found.
        value: usize,
        /// The limit.
        limit: usize,
    },
    /// The `activation` metadata value is not one this runtime implements.
    #[error("metadata `activation`: unknown value `{value}` (expected relu, gelu, silu or identity)")]
    UnknownActivation {
        /// The value found.
        value: String,
    },
    /// An input row of the wrong width.
    #[error("input row {row}: expected {expected} values, got {got}")]
    InputLength {
        /// Index of the row within the batch.
        row: usize,
        /// The model's input width.
        expected: usize,
        /// The row's length.
        got: usize,
    },
}

/// The nonlinearity applied between layers (never after the last one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// `max(x, 0)`; the default when the metadata names none.
    #[default]
    Relu,
    /// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    Gelu,
    /// SiLU (swish): `x / (1 + e^-x)`.
    Silu,
    /// No activation: `x`.
    Identity,
}

impl Activation {
    /// Every activation, in the order the metadata documentation lists them.
    pub const ALL: [Activation; 4] = [Activation::Relu, Activation::Gelu, Activation::Silu, Activation::Identity];

    /// The metadata value naming this activation.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
            Activation::Identity => "identity",
        }
    }

    /// The activation a metadata value names, if any (exact, lowercase match).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Applies the activation to one value.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
            }
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Identity => x,
        }
    }

    /// Applies the activation to every value of `values`, in place.
    pub fn apply_slice(self, values: &mut [f32]) {
        if self != Activation::Identity {
            for v in values {
                *v = self.apply(*v);
            }
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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

impl Dtype {
    /// The safetensors dtype this corresponds to.
    fn safetensors(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::F16 => StDtype::F16,
            Dtype::BF16 => StDtype::BF16,
        }
    }

    /// Encodes `values` little-endian in this dtype (rounding to nearest for F16 and BF16).
    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            Dtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        }
    }
}

/// Wall-clock time spent in each phase of [`load_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadTimings {
    /// Reading the file from disk into memory.
    pub read: Duration,
    /// Parsing and validating the header (names, dtypes, shapes, limits).
    pub parse: Duration,
    /// Converting the tensors to f32: the CPU stand-in for the host-to-device copy.
    pub convert: Duration,
}

impl LoadTimings {
    /// The sum of all phases.
    pub fn total(&self) -> Duration {
        self.read + self.parse + self.convert
    }
}

/// One linear layer: `y = W x + b`, with `W` row-major `[out, in]`.
#[derive(Clone, PartialEq)]
pub struct DenseLayer {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    out_dim: usize,
    in_dim: usize,
}

impl DenseLayer {
    /// Input width (columns of the weight).
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output width (rows of the weight).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The weight, row-major `[out, in]`.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    /// The bias, `[out]`, when the file has one.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Parameters held: weights plus biases.
    pub fn param_count(&self) -> usize {
        self.weight.len() + self.bias.as_ref().map_or(0, Vec::len)
    }

    /// Writes `W x + b` into `y` (cleared first). `x` must have `in_dim` values.
    fn apply_into(&self, x: &[f32], y: &mut Vec<f32>) {
        y.clear();
        y.extend(self.weight.chunks_exact(self.in_dim).map(|row| dot(row, x)));
        if let Some(bias) = &self.bias {
            for (v, b) in y.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

impl fmt::Debug for DenseLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenseLayer")
            .field("out_dim", &self.out_dim)
            .field("in_dim", &self.in_dim)
            .field("bias", &self.bias.is_some())
            .finish_non_exhaustive()
    }
}

/// Dot product over two equally long slices, accumulated in eight fixed lanes (so the compiler can vectorize it)
/// and summed in a fixed order: the result is deterministic for given inputs.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_chunks, a_rest) = a.as_chunks::<8>();
    let (b_chunks, b_rest) = b.as_chunks::<8>();
    let mut lanes = [0.0f32; 8];
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for ((lane, &p), &q) in lanes.iter_mut().zip(x).zip(y) {
            *lane += p * q;
        }
    }
    let [l0, l1, l2, l3, l4, l5, l6, l7] = lanes;
    let mut sum = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7));
    for (&p, &q) in a_rest.iter().zip(b_rest) {
        sum += p * q;
    }
    sum
}

/// A loaded dense network: linear layers with an activation between consecutive ones, weights in f32.
///
/// Invariants (established by the loader): at least one layer, no zero widths, and each layer's input width equals
/// the previous layer's output width.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseModel {
    layers: Vec<DenseLayer>,
    activation: Activation,
}

impl DenseModel {
    /// The layers, input first.
    pub fn layers(&self) -> &[DenseLayer] {
        &self.layers
    }

    /// The activation applied between layers.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Width of an input row.
    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, DenseLayer::in_dim)
    }

    /// Width of an output row.
    pub fn output_dim(&self) -> usize {
        self.layers.last().map_or(0, DenseLayer::out_dim)
    }

    /// Parameters held (weights plus biases over all layers).
    pub fn param_count(&self) -> usize {
        self.layers.iter().map(DenseLayer::param_count).sum()
    }

    /// Bytes of f32 parameters held in memory.
    pub fn param_bytes(&self) -> usize {
        self.param_count() * size_of::<f32>()
    }

    /// Runs every row of `batch` through the network, returning one output row (of [`Self::output_dim`] values)
    /// per input row. Every row must have [`Self::input_dim`] values; the first that does not is reported by index
    /// and nothing is computed. Results are deterministic: the same model and input give bit-identical outputs, and
    /// a row's output does not depend on the rest of the batch.
    pub fn forward(&self, batch: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let expected = self.input_dim();
        if let Some((row, x)) = batch.iter().enumerate().find(|(_, x)| x.len() != expected) {
            return Err(ModelError::InputLength { row, expected, got: x.len() });
        }
        let width = self.layers.iter().map(DenseLayer::out_dim).max().unwrap_or(0).max(expected);
        let mut current = Vec::with_capacity(width);
        let mut next = Vec::with_capacity(width);
        Ok(batch.iter().map(|x| self.run_row(x, &mut current, &mut next)).collect())
    }

    /// Runs one input row through the network; see [`Self::forward`]. A wrong length is reported as row 0.
    pub fn forward_one(&self, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        let expected = self.input_dim();
        if x.len() != expected {
            return Err(ModelError::InputLength { row: 0, expected, got: x.len() });
        }
        Ok(self.run_row(x, &mut Vec::new(), &mut Vec::new()))
    }

    /// One row through all layers, using `current` and `next` as scratch. `x` has the input width.
    fn run_row(&self, x: &[f32], current: &mut Vec<f32>, next: &mut Vec<f32>) -> Vec<f32> {
        current.clear();
        current.extend_from_slice(x);
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.apply_into(current, next);
            if i < last {
                self.activation.apply_slice(next);
            }
            std::mem::swap(current, next);
        }
        current.clone()
    }
}

/// Reads a model file into memory, then parses, validates and converts it as [`load_bytes`] does, timing each
/// phase. Errors about the contents name the file.
pub fn load_file(path: &Path) -> Result<(DenseModel, LoadTimings), ModelError> {
    let io_err = |source| ModelError::Io { path: path.to_path_buf(), source };
    let started = Instant::now();
    let file = std::fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        // A device (/dev/zero reports size 0 and never ends) or a directory.
        return Err(io_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let size = meta.len();
    if size > MAX_FILE_BYTES {
        return Err(ModelError::FileTooLarge { path: path.to_path_buf(), size, limit: MAX_FILE_BYTES });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // At most one byte past the limit, should the file grow while it is read.
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ModelError::FileTooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    let read = started.elapsed();

    let (model, parse, convert) =
        load_timed(&bytes).map_err(|source| ModelError::File { path: path.to_path_buf(), source: Box::new(source) })?;
    Ok((model, LoadTimings { read, parse, convert }))
}

/// Parses, validates and converts a model from a safetensors buffer held in memory.
pub fn load_bytes(bytes: &[u8]) -> Result<DenseModel, ModelError> {
    load_timed(bytes).map(|(model, _, _)| model)
}

/// A layer's tensors, validated but not yet converted.
struct PendingLayer<'a> {
    weight: TensorView<'a>,
    bias: Option<TensorView<'a>>,
    out_dim: usize,
    in_dim: usize,
}

/// [`load_bytes`], also returning the parse and convert durations.
fn load_timed(bytes: &[u8]) -> Result<(DenseModel, Duration, Duration), ModelError> {
    let started = Instant::now();
    let (activation, pending) = parse(bytes)?;
    let parse_time = started.elapsed();

    let started = Instant::now();
    let layers = pending
        .into_iter()
        .map(|p| DenseLayer {
            weight: to_f32(&p.weight),
            bias: p.bias.as_ref().map(to_f32),
            out_dim: p.out_dim,
            in_dim: p.in_dim,
        })
        .collect();
    let convert_time = started.elapsed();
    Ok((DenseModel { layers, activation }, parse_time, convert_time))
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
    let Ok(serde_json::Value::Object(entries)) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Ok(());
    };
    for (name, info) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(serde_json::Value::as_u64);
        if let Some(end) = end
            && usize::try_from(end).ok().is_none_or(|e| e > data.len())
        {
            return Err(ModelError::TensorOutOfBounds { tensor: name.clone(), end, available: data.len() });
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

/// Parses and validates the buffer, returning the activation and the layers' tensor views in order.
fn parse(bytes: &[u8]) -> Result<(Activation, Vec<PendingLayer<'_>>), ModelError> {
    check_framing(bytes)?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(ModelError::Safetensors)?;
    // `read_metadata` checked that the header and the data it describes exactly fill the buffer.
    let data = bytes.get(HEADER_LEN_BYTES.saturating_add(header_len)..).unwrap_or_default();

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

    let mut pending: Vec<PendingLayer<'_>> = Vec::with_capacity(slots.len());
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
        let weight = view(&metadata, data, weight_name)?;
        let &[out_dim, in_dim] = weight.shape() else {
            return Err(ModelError::BadRank {
                tensor: weight_name.to_owned(),
                shape: weight.shape().to_vec(),
                expected: 2,
                layout: "[out, in]",
            });
        };
        if out_dim == 0 || in_dim == 0 {
            return Err(ModelError::ZeroDim { tensor: weight_name.to_owned(), shape: weight.shape().to_vec() });
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
                shape: weight.shape().to_vec(),
                previous_out: previous.out_dim,
            });
        }
        let bias = match bias_name {
            None => None,
            Some(bias_name) => {
                let bias = view(&metadata, data, bias_name)?;
                let &[len] = bias.shape() else {
                    return Err(ModelError::BadRank {
                        tensor: bias_name.to_owned(),
                        shape: bias.shape().to_vec(),
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

/// The named tensor's view into `data` (the buffer after the header), checked to have a supported dtype.
fn view<'a>(metadata: &Metadata, data: &'a [u8], name: &str) -> Result<TensorView<'a>, ModelError> {
    let info =
        metadata.info(name).ok_or_else(|| ModelError::Safetensors(SafeTensorError::TensorNotFound(name.to_owned())))?;
    if !matches!(info.dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16) {
        return Err(ModelError::UnsupportedDtype { tensor: name.to_owned(), dtype: format!("{:?}", info.dtype) });
    }
    let (start, end) = info.data_offsets;
    let bytes = data.get(start..end).ok_or_else(|| ModelError::TensorOutOfBounds {
        tensor: name.to_owned(),
        end: u64::try_from(end).unwrap_or(u64::MAX),
        available: data.len(),
    })?;
    TensorView::new(info.dtype, info.shape.clone(), bytes).map_err(ModelError::Safetensors)
}

/// Converts a validated F32, F16 or BF16 tensor to f32 values.
fn to_f32(view: &TensorView<'_>) -> Vec<f32> {
    let data = view.data();
    match view.dtype() {
        StDtype::F16 => data.as_chunks::<2>().0.iter().map(|&b| f16::from_le_bytes(b).to_f32()).collect(),
        StDtype::BF16 => data.as_chunks::<2>().0.iter().map(|&b| bf16::from_le_bytes(b).to_f32()).collect(),
        // `view` admits only F32 besides the two above.
        _ => data.as_chunks::<4>().0.iter().map(|&b| f32::from_le_bytes(b)).collect(),
    }
}

/// One layer for [`write_model`]: `(weight, bias, out, in)`, the weight row-major with `out * in` values and the
/// bias either empty (no bias tensor is written) or `out` values.
pub type LayerSpec = (Vec<f32>, Vec<f32>, usize, usize);

/// Serializes `layers` into a safetensors buffer in the native model format, storing tensors as `dtype` and the
/// activation in the metadata. Each layer is checked on its own (weight length `out * in`, bias empty or `out`
/// long); whether consecutive layers chain is left to the loader, so tests can write invalid models.
pub fn try_write_model(layers: &[LayerSpec], activation: Activation, dtype: Dtype) -> Result<Vec<u8>, ModelError> {
    let mut encoded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(layers.len() * 2);
    for (i, (weight, bias, out, inp)) in layers.iter().enumerate() {
        let tensor = format!("layers.{i}.weight");
        if out.checked_mul(*inp) != Some(weight.len()) {
            return Err(ModelError::WeightLength { tensor, len: weight.len(), out: *out, inp: *inp });
        }
        encoded.push((tensor, vec![*out, *inp], dtype.encode(weight)));
        if !bias.is_empty() {
            let tensor = format!("layers.{i}.bias");
            if bias.len() != *out {
                return Err(ModelError::BiasLength { tensor, len: bias.len(), expected: *out });
            }
            encoded.push((tensor, vec![*out], dtype.encode(bias)));
        }
    }
    let views = encoded
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(dtype.safetensors(), shape.clone(), data).map(|view| (name.as_str(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(ModelError::Safetensors)?;
    let metadata = HashMap::from([(ACTIVATION_KEY.to_owned(), activation.name().to_owned())]);
    safetensors::serialize(views, Some(metadata)).map_err(ModelError::Safetensors)
}

/// [`try_write_model`] for callers whose layers are known to be well-formed (tests, generated models).
///
/// # Panics
///
/// If a layer's weight does not have `out * in` values or its bias is neither empty nor `out` long.
pub fn write_model(layers: &[LayerSpec], activation: Activation, dtype: Dtype) -> Vec<u8> {
    try_write_model(layers, activation, dtype).unwrap_or_else(|e| panic!("write_model: {e}"))
}

/// SplitMix64: a tiny, fast, deterministic generator, plenty for example weights.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-0.5, 0.5)`, on a grid of 2^-24 (exact in f32).
    fn next_weight(&mut self) -> f32 {
        // 24 random bits fit an f32 mantissa exactly, and so does the subtraction.
        (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32 - 0.5
    }
}

/// A small deterministic random MLP, F32 with ReLU: `dims = [input, hidden..., output]` gives `dims.len() - 1`
/// layers with biases, every value uniform in `[-0.5, 0.5)`. The same seed and dims always give the same bytes.
///
/// # Panics
///
/// If `dims` has fewer than two entries, or one of them is zero or above [`MAX_DIM`].
pub fn example_model(seed: u64, dims: &[usize]) -> Vec<u8> {
    assert!(dims.len() >= 2, "example_model: need at least an input and an output width, got {dims:?}");
    assert!(dims.iter().all(|&d| d > 0 && d <= MAX_DIM), "example_model: widths must be in 1..={MAX_DIM}: {dims:?}");
    let mut rng = SplitMix64(seed);
    let layers: Vec<LayerSpec> = dims
        .windows(2)
        .map(|pair| {
            let (inp, out) = (pair[0], pair[1]);
            let weight = (0..out * inp).map(|_| rng.next_weight()).collect();
            let bias = (0..out).map(|_| rng.next_weight()).collect();
            (weight, bias, out, inp)
        })
        .collect();
    write_model(&layers, Activation::Relu, Dtype::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layer 0: 2 -> 3 with bias; layer 1: 3 -> 2 with bias. All values are exact in f16 and bf16.
    fn hand_layers() -> Vec<LayerSpec> {
        vec![
            (vec![1.0, -1.0, 2.0, 0.5, -1.0, -1.0], vec![0.5, -1.0, 0.0], 3, 2),
            (vec![1.0, 2.0, -1.0, 0.5, -1.0, 1.0], vec![0.25, 0.0], 2, 3),
        ]
    }

    fn hand_model(activation: Activation, dtype: Dtype) -> DenseModel {
        load_bytes(&write_model(&hand_layers(), activation, dtype)).unwrap()
    }

    /// A safetensors buffer from raw tensors, for files `write_model` refuses to or cannot produce.
    fn raw_file(tensors: &[(&str, StDtype, Vec<usize>, Vec<u8>)], metadata: Option<(&str, &str)>) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|(name, dtype, shape, data)| (*name, TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        let metadata = metadata.map(|(k, v)| HashMap::from([(k.to_owned(), v.to_owned())]));
        safetensors::serialize(views, metadata).unwrap()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        Dtype::F32.encode(values)
    }

    /// A file with header `header` (padded JSON) followed by `data`.
    fn framed(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn err_text(bytes: &[u8]) -> String {
        load_bytes(bytes).unwrap_err().to_string()
    }

    #[test]
    fn hand_computed_relu() {
        let model = hand_model(Activation::Relu, Dtype::F32);
        assert_eq!((model.input_dim(), model.output_dim(), model.layers().len()), (2, 2, 2));
        assert_eq!(model.activation(), Activation::Relu);
        assert_eq!(model.param_count(), 6 + 3 + 6 + 2);
        assert_eq!(model.param_bytes(), 17 * 4);
        // x = [1, 2]: h = [1-2+0.5, 2+1-1, -1-2+0] = [-0.5, 2, -3] -> relu [0, 2, 0]
        // y = [0+4-0+0.25, 0-2+0+0] = [4.25, -2] (no activation after the last layer).
        // x = [-1, 0.5]: h = [-1.5+0.5, -2+0.25-1, 1-0.5] = [-1, -2.75, 0.5] -> relu [0, 0, 0.5]
        // y = [-0.5+0.25, 0.5] = [-0.25, 0.5].
        let out = model.forward(&[vec![1.0, 2.0], vec![-1.0, 0.5]]).unwrap();
        assert_eq!(out, vec![vec![4.25, -2.0], vec![-0.25, 0.5]]);
        assert_eq!(model.forward_one(&[1.0, 2.0]).unwrap(), vec![4.25, -2.0]);
        assert_eq!(model.forward(&[]).unwrap(), Vec::<Vec<f32>>::new());
    }

    #[test]
    fn hand_computed_identity() {
        let model = hand_model(Activation::Identity, Dtype::F32);
        // x = [1, 2]: h = [-0.5, 2, -3]; y = [-0.5+4+3+0.25, -0.25-2-3+0] = [6.75, -5.25].
        // x = [-1, 0.5]: h = [-1, -2.75, 0.5]; y = [-1-5.5-0.5+0.25, -0.5+2.75+0.5] = [-6.75, 2.75].
        let out = model.forward(&[vec![1.0, 2.0], vec![-1.0, 0.5]]).unwrap();
        assert_eq!(out, vec![vec![6.75, -5.25], vec![-6.75, 2.75]]);
    }

    #[test]
    fn missing_activation_defaults_to_relu_and_bias_is_optional() {
        let bytes = raw_file(
            &[
                ("layers.0.weight", StDtype::F32, vec![1, 2], f32_bytes(&[1.0, -1.0])),
                ("layers.1.weight", StDtype::F32, vec![1, 1], f32_bytes(&[2.0])),
            ],
            None,
        );
        let model = load_bytes(&bytes).unwrap();
        assert_eq!(model.activation(), Activation::Relu);
        assert!(model.layers()[0].bias().is_none());
        assert_eq!(model.forward(&[vec![1.0, 3.0], vec![3.0, 1.0]]).unwrap(), vec![vec![0.0], vec![4.0]]);
    }

    #[test]
    fn half_precision_round_trip() {
        // Exactly representable values: identical outputs.
        let reference = hand_model(Activation::Relu, Dtype::F32);
        let input = vec![vec![1.0, 2.0], vec![-1.0, 0.5], vec![0.75, -3.0]];
        let expected = reference.forward(&input).unwrap();
        for dtype in [Dtype::F16, Dtype::BF16] {
            let model = hand_model(Activation::Relu, dtype);
            assert_eq!(model, reference, "{dtype:?}");
            assert_eq!(model.forward(&input).unwrap(), expected, "{dtype:?}");
        }

        // Random weights: close to f32, and bit-identical to f32 weights pre-rounded the same way.
        let f32_model = load_bytes(&example_model(7, &[16, 32, 8])).unwrap();
        let layers: Vec<LayerSpec> = f32_model
            .layers()
            .iter()
            .map(|l| (l.weight().to_vec(), l.bias().unwrap().to_vec(), l.out_dim(), l.in_dim()))
            .collect();
        let input: Vec<Vec<f32>> =
            (0..4).map(|r| (0..16).map(|c| ((r * 16 + c) as f32 * 0.37).sin()).collect()).collect();
        let exact = f32_model.forward(&input).unwrap();
        for (dtype, round, tolerance) in [
            (Dtype::F16, (|v: f32| f16::from_f32(v).to_f32()) as fn(f32) -> f32, 0.02),
            (Dtype::BF16, |v: f32| bf16::from_f32(v).to_f32(), 0.1),
        ] {
            let model = load_bytes(&write_model(&layers, Activation::Relu, dtype)).unwrap();
            let got = model.forward(&input).unwrap();
            for (g, e) in got.iter().flatten().zip(exact.iter().flatten()) {
                assert!((g - e).abs() <= tolerance, "{dtype:?}: {g} vs {e}");
            }
            let rounded: Vec<LayerSpec> = layers
                .iter()
                .map(|(w, b, o, i)| {
                    (w.iter().map(|&v| round(v)).collect(), b.iter().map(|&v| round(v)).collect(), *o, *i)
                })
                .collect();
            let pre_rounded = load_bytes(&write_model(&rounded, Activation::Relu, Dtype::F32)).unwrap();
            assert_eq!(pre_rounded.forward(&input).unwrap(), got, "{dtype:?}");
        }
    }

    #[test]
    fn activation_values() {
        let close = |a: f32, b: f32| (a - b).abs() < 1e-5;
        for (x, gelu, silu) in [
            (0.0, 0.0, 0.0),
            (1.0, 0.841_192, 0.731_058_6),
            (-1.0, -0.158_808, -0.268_941_4),
            (2.0, 1.954_597_7, 1.761_594_2),
            (-3.0, -0.003_637_392, -0.142_277_3),
        ] {
            assert!(close(Activation::Gelu.apply(x), gelu), "gelu({x}) = {}", Activation::Gelu.apply(x));
            assert!(close(Activation::Silu.apply(x), silu), "silu({x}) = {}", Activation::Silu.apply(x));
        }
        assert_eq!(Activation::Relu.apply(-2.5), 0.0);
        assert_eq!(Activation::Relu.apply(2.5), 2.5);
        assert_eq!(Activation::Identity.apply(-2.5), -2.5);
        // Extremes stay finite.
        assert_eq!(Activation::Silu.apply(-1000.0), 0.0);
        assert_eq!(Activation::Silu.apply(1000.0), 1000.0);
        assert_eq!(Activation::Gelu.apply(1000.0), 1000.0);
        assert_eq!(Activation::Gelu.apply(-1000.0), 0.0);
        for a in Activation::ALL {
            assert_eq!(Activation::from_name(a.name()), Some(a));
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!(Activation::from_name("ReLU"), None);

        // Through a model: gelu/silu between layers.
        for (activation, f) in [(Activation::Gelu, 0.841_192f32), (Activation::Silu, 0.731_058_6)] {
            let layers = vec![(vec![1.0], vec![], 1, 1), (vec![2.0], vec![0.5], 1, 1)];
            let model = load_bytes(&write_model(&layers, activation, Dtype::F32)).unwrap();
            let y = model.forward_one(&[1.0]).unwrap()[0];
            assert!(close(y, 2.0 * f + 0.5), "{activation}: {y}");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = write_model(&hand_layers(), Activation::Gelu, Dtype::BF16);
        assert!(load_bytes(&bytes).is_ok());
        for cut in 0..bytes.len() {
            assert!(load_bytes(&bytes[..cut]).is_err(), "cut at {cut} of {} loaded", bytes.len());
        }
        assert!(err_text(&bytes[..5]).contains("truncated"));
        assert!(err_text(&bytes[..20]).contains("header declares"));
        // Trailing garbage is rejected too.
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(load_bytes(&longer).is_err());
    }

    #[test]
    fn corrupt_bytes_never_panic() {
        let bytes = write_model(&hand_layers(), Activation::Silu, Dtype::F16);
        for i in 0..bytes.len() {
            for value in [0x00, 0xFF, b'"', b'9', b'{'] {
                let mut corrupt = bytes.clone();
                corrupt[i] = value;
                // Either outcome is fine (data bytes may change harmlessly); panicking is not.
                if let Ok(model) = load_bytes(&corrupt) {
                    model.forward(&[vec![1.0, 2.0]]).unwrap();
                }
            }
        }
    }

    #[test]
    fn corrupt_framing() {
        // Header length far beyond the file.
        let mut bytes = write_model(&hand_layers(), Activation::Relu, Dtype::F32);
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = err_text(&bytes);
        assert!(err.contains("header declares 18446744073709551615 bytes"), "{err}");

        // Bad JSON.
        let err = err_text(&framed("{\"layers.0.weight\": [", &[]));
        assert!(err.contains("invalid safetensors data"), "{err}");
        let err = err_text(&framed("not json", &[]));
        assert!(err.contains("invalid safetensors data"), "{err}");

        // Data offsets outside the buffer, including near usize::MAX.
        let header = r#"{"layers.0.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4000]}}"#;
        let err = err_text(&framed(header, &[0; 4]));
        assert_eq!(err, "layers.0.weight: data offsets end at byte 4000, but the data section holds only 4 bytes");
        let header = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[18446744073709551614],"data_offsets":[1,18446744073709551615]}}"#;
        assert!(matches!(load_bytes(&framed(header, &[0; 4])), Err(ModelError::TensorOutOfBounds { .. })));

        // Offsets inside the buffer but inconsistent with shape and dtype.
        let header = r#"{"layers.0.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,4]}}"#;
        assert!(matches!(load_bytes(&framed(header, &[0; 4])), Err(ModelError::Safetensors(_))));
    }

    #[test]
    fn shapes_must_chain() {
        let layers = vec![(vec![0.0; 8 * 3], vec![], 8, 3), (vec![0.0; 4 * 7], vec![0.0; 4], 4, 7)];
        let err = err_text(&write_model(&layers, Activation::Relu, Dtype::F32));
        assert_eq!(err, "layers.1.weight: shape [4, 7] does not chain: previous layer outputs 8");
    }

    #[test]
    fn layer_numbering_must_be_contiguous() {
        let one = || f32_bytes(&[1.0]);
        let gap = raw_file(
            &[
                ("layers.0.weight", StDtype::F32, vec![1, 1], one()),
                ("layers.2.weight", StDtype::F32, vec![1, 1], one()),
            ],
            None,
        );
        assert_eq!(
            err_text(&gap),
            "layers.1.weight is missing but layers.2.weight is present: layers must be numbered contiguously from 0"
        );
        let not_from_zero = raw_file(&[("layers.1.weight", StDtype::F32, vec![1, 1], one())], None);
        assert!(err_text(&not_from_zero).starts_with("layers.0.weight is missing but layers.1.weight"));
        let bias_only = raw_file(
            &[("layers.0.weight", StDtype::F32, vec![1, 1], one()), ("layers.1.bias", StDtype::F32, vec![1], one())],
            None,
        );
        assert!(err_text(&bias_only).starts_with("layers.1.weight is missing but layers.1.bias is present"));
        let empty = write_model(&[], Activation::Relu, Dtype::F32);
        assert!(matches!(load_bytes(&empty), Err(ModelError::NoLayers)));
    }

    #[test]
    fn names_dtypes_and_shapes_are_checked() {
        let one = || f32_bytes(&[1.0]);
        for name in ["layers.01.weight", "layers.0.kernel", "layer.0.weight", "layers..weight", "head.weight"] {
            let bytes = raw_file(&[(name, StDtype::F32, vec![1, 1], one())], None);
            assert!(matches!(load_bytes(&bytes), Err(ModelError::UnexpectedTensor { tensor }) if tensor == name));
        }
        let huge_index = raw_file(&[("layers.99999999999999999999999.weight", StDtype::F32, vec![1, 1], one())], None);
        assert!(matches!(load_bytes(&huge_index), Err(ModelError::Limit { .. })));

        let int = raw_file(&[("layers.0.weight", StDtype::I32, vec![1, 1], vec![1, 0, 0, 0])], None);
        assert_eq!(err_text(&int), "layers.0.weight: dtype I32 is not supported (expected F32, F16 or BF16)");
        let f64_bias = raw_file(
            &[
                ("layers.0.weight", StDtype::F32, vec![1, 1], one()),
                ("layers.0.bias", StDtype::F64, vec![1], vec![0; 8]),
            ],
            None,
        );
        assert!(err_text(&f64_bias).starts_with("layers.0.bias: dtype F64"));

        let rank = raw_file(&[("layers.0.weight", StDtype::F32, vec![1], one())], None);
        assert_eq!(err_text(&rank), "layers.0.weight: shape [1] must have 2 dimension(s) ([out, in])");
        let zero = raw_file(&[("layers.0.weight", StDtype::F32, vec![0, 3], vec![])], None);
        assert_eq!(err_text(&zero), "layers.0.weight: shape [0, 3] has a zero dimension");
        let wide =
            raw_file(&[("layers.0.weight", StDtype::F16, vec![1, MAX_DIM + 1], vec![0; 2 * (MAX_DIM + 1)])], None);
        assert_eq!(
            err_text(&wide),
            format!("layers.0.weight: inputs is {}, more than the limit of {MAX_DIM}", MAX_DIM + 1)
        );
        let bias = raw_file(
            &[
                ("layers.0.weight", StDtype::F32, vec![1, 1], one()),
                ("layers.0.bias", StDtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
            ],
            None,
        );
        assert_eq!(err_text(&bias), "layers.0.bias: length 2 does not match the layer's 1 outputs");
    }

    #[test]
    fn unknown_activation() {
        let bytes =
            raw_file(&[("layers.0.weight", StDtype::F32, vec![1, 1], f32_bytes(&[1.0]))], Some(("activation", "tanh")));
        assert_eq!(
            err_text(&bytes),
            "metadata `activation`: unknown value `tanh` (expected relu, gelu, silu or identity)"
        );
    }

    #[test]
    fn wrong_input_length() {
        let model = hand_model(Activation::Relu, Dtype::F32);
        let err = model.forward(&[vec![1.0, 2.0], vec![1.0, 2.0], vec![1.0]]).unwrap_err();
        assert!(matches!(err, ModelError::InputLength { row: 2, expected: 2, got: 1 }));
        assert_eq!(err.to_string(), "input row 2: expected 2 values, got 1");
        assert!(model.forward_one(&[1.0, 2.0, 3.0]).is_err());
    }

    #[test]
    fn writer_rejects_malformed_layers() {
        let bad_weight = try_write_model(&[(vec![1.0; 5], vec![], 2, 3)], Activation::Relu, Dtype::F32);
        assert!(matches!(bad_weight, Err(ModelError::WeightLength { len: 5, out: 2, inp: 3, .. })));
        let bad_bias = try_write_model(&[(vec![1.0; 6], vec![1.0], 2, 3)], Activation::Relu, Dtype::F32);
        assert!(matches!(bad_bias, Err(ModelError::BiasLength { len: 1, expected: 2, .. })));
    }

    #[test]
    fn load_file_matches_load_bytes() {
        let bytes = example_model(42, &[6, 10, 3]);
        let path = std::env::temp_dir().join(format!(
            "kiln-model-test-{}-{}.safetensors",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::write(&path, &bytes).unwrap();
        let result = load_file(&path);
        let corrupt_path = path.with_extension("corrupt");
        std::fs::write(&corrupt_path, &bytes[..bytes.len() - 1]).unwrap();
        let corrupt = load_file(&corrupt_path);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&corrupt_path).unwrap();

        let (model, timings) = result.unwrap();
        assert_eq!(timings.total(), timings.read + timings.parse + timings.convert);
        let input = vec![vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.25]];
        assert_eq!(model.forward(&input).unwrap(), load_bytes(&bytes).unwrap().forward(&input).unwrap());
        assert_eq!(model.param_bytes(), (6 * 10 + 10 + 10 * 3 + 3) * 4);

        let err = corrupt.unwrap_err().to_string();
        assert!(err.starts_with(&format!("model file {}: ", corrupt_path.display())), "{err}");
        let err = load_file(&path).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn example_model_is_deterministic() {
        let dims = [4, 8, 8, 2];
        let a = example_model(3, &dims);
        assert_eq!(a, example_model(3, &dims));
        assert_ne!(a, example_model(4, &dims));
        let model = load_bytes(&a).unwrap();
        assert_eq!((model.input_dim(), model.output_dim(), model.layers().len()), (4, 2, 3));
        for layer in model.layers() {
            let values = layer.weight().iter().chain(layer.bias().unwrap());
            assert!(values.clone().all(|v| (-0.5..=0.5).contains(v)));
            assert!(values.clone().any(|&v| v != 0.0));
        }
        // Inference is deterministic, and a row's output does not depend on its batch.
        let batch: Vec<Vec<f32>> = (0..5).map(|r| (0..4).map(|c| (r * 4 + c) as f32 / 7.0 - 1.0).collect()).collect();
        let first = model.forward(&batch).unwrap();
        assert_eq!(first, model.forward(&batch).unwrap());
        for (x, y) in batch.iter().zip(&first) {
            assert_eq!(&model.forward_one(x).unwrap(), y);
        }
    }

    #[test]
    fn dot_handles_every_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let b: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 1.0 } else { -0.5 }).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(dot(&a, &b), naive, "n = {n}");
        }
    }
}
