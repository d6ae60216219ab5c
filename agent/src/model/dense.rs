//! The dense network in memory and its forward pass (deterministic: a fixed summation order).

use std::fmt;

use super::{Activation, ModelError};

/// One linear layer: `y = W x + b`, with `W` row-major `[out, in]`.
#[derive(Clone, PartialEq)]
pub struct DenseLayer {
    pub(super) weight: Vec<f32>,
    pub(super) bias: Option<Vec<f32>>,
    pub(super) out_dim: usize,
    pub(super) in_dim: usize,
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

    /// Writes `W x + b` into `y` (cleared first). `x` must have `in_dim` values. A layer of at least
    /// [`PARALLEL_WEIGHTS`] weights is split by output rows over the loaders' threads
    /// ([`crate::parallel::loaders`]); each output is still one [`dot`], so the result is the same bits either way.
    fn apply_into(&self, x: &[f32], y: &mut Vec<f32>) {
        y.clear();
        y.resize(self.out_dim, 0.0);
        let rows = |weights: &[f32], out: &mut [f32]| {
            for (v, row) in out.iter_mut().zip(weights.chunks_exact(self.in_dim)) {
                *v = dot(row, x);
            }
        };
        match crate::parallel::loaders() {
            Some(pool) if self.weight.len() >= PARALLEL_WEIGHTS => {
                use rayon::prelude::*;
                // A few tasks per thread, so a slow thread does not hold the layer up.
                let per = self.out_dim.div_ceil(4 * pool.current_num_threads()).max(1);
                pool.install(|| {
                    y.par_chunks_mut(per).zip(self.weight.par_chunks(per * self.in_dim)).for_each(|(o, w)| rows(w, o))
                });
            }
            _ => rows(&self.weight, y),
        }
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

/// Layers with at least this many weights (4 MiB of f32) compute their outputs on several threads; smaller ones
/// on the caller's (a thread hand-off costs more than they do).
pub const PARALLEL_WEIGHTS: usize = 1 << 20;

/// Dot product over two equally long slices, accumulated in eight fixed lanes (so the compiler can vectorize it)
/// and summed in a fixed order: the result is deterministic for given inputs.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    pub(super) layers: Vec<DenseLayer>,
    pub(super) activation: Activation,
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
