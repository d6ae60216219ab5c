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
//!   never panicking on malformed input. [`load_file`] reads only the header first ([`read_layout`]), then each
//!   tensor in 1 MiB positioned reads straight into the layer's buffer (no whole-file copy), and reports
//!   [`LoadTimings`] per phase that add up to its wall-clock time; on the CPU the f32 conversion stands in for the
//!   host-to-device copy. [`Layout`] tells the GPU loader where each tensor lies, in its file dtype.
//! * **Inference.** [`DenseModel::forward`] runs a batch of rows through the network, deterministically.
//! * **Writing.** [`write_model`] serializes layers into a valid file (tests, tooling), and [`example_model`] makes
//!   the small deterministic random MLP that `kiln up` serves out of the box.
//!
//! Seams: `format` (the file: element types, parsing and validation, [`load_file`] / [`load_bytes`]), `dense`
//! (the network and its forward pass), `write` (serializing models, [`example_model`]); the errors, limits and the
//! activation are shared here.

mod dense;
mod format;
#[cfg(test)]
mod tests;
mod write;

use std::{fmt, path::PathBuf};

use safetensors::SafeTensorError;

pub use dense::{DenseLayer, DenseModel};
pub use format::{
    Dtype, LayerLoc, Layout, LoadTimings, TensorLoc, layout_of_bytes, load_bytes, load_file, read_layout,
};
pub use write::{LayerSpec, example_model, try_write_model, write_model};

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
