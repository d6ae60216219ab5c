//! Writing native model files: layers serialized into a valid safetensors file, and the small deterministic random
//! MLP that `kiln up` serves out of the box (weights from the core's seeded [`Rng`]).

use std::collections::HashMap;

use kiln_core::rng::Rng;
use safetensors::tensor::TensorView;

use super::{ACTIVATION_KEY, Activation, Dtype, MAX_DIM, ModelError};

/// One layer for [`write_model`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Row-major `[out, in]`: `out * in` values.
    pub weight: Vec<f32>,
    /// Empty (no bias tensor is written) or `out` values.
    pub bias: Vec<f32>,
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

impl LayerSpec {
    /// A layer of `out` x `inp` weights (row-major) and `bias` (empty for none).
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, out: usize, inp: usize) -> Self {
        Self { weight, bias, out, inp }
    }
}

/// Serializes `layers` into a safetensors buffer in the native model format, storing tensors as `dtype` and the
/// activation in the metadata. Each layer is checked on its own (weight length `out * in`, bias empty or `out`
/// long); whether consecutive layers chain is left to the loader, so tests can write invalid models.
pub fn try_write_model(layers: &[LayerSpec], activation: Activation, dtype: Dtype) -> Result<Vec<u8>, ModelError> {
    let mut encoded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(layers.len() * 2);
    for (i, LayerSpec { weight, bias, out, inp }) in layers.iter().enumerate() {
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

/// Uniform in `[-0.5, 0.5)`, on a grid of 2^-24 (exact in f32).
fn next_weight(rng: &mut Rng) -> f32 {
    // 24 random bits fit an f32 mantissa exactly, and so does the subtraction.
    (rng.next_u64() >> 40) as f32 / (1u32 << 24) as f32 - 0.5
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
    let mut rng = Rng::new(seed);
    let layers: Vec<LayerSpec> = dims
        .windows(2)
        .map(|pair| {
            let (inp, out) = (pair[0], pair[1]);
            let weight = (0..out * inp).map(|_| next_weight(&mut rng)).collect();
            let bias = (0..out).map(|_| next_weight(&mut rng)).collect();
            LayerSpec { weight, bias, out, inp }
        })
        .collect();
    write_model(&layers, Activation::Relu, Dtype::F32)
}
