//! The native model file: a safetensors file of linear layers, its element types, and loading it — framing,
//! names, dtypes, shapes and limits checked before anything is converted to f32.

use std::{
    collections::BTreeMap,
    io::Read,
    path::Path,
    time::{Duration, Instant},
};

use half::{bf16, f16};
use safetensors::{
    Dtype as StDtype, SafeTensorError, SafeTensors,
    tensor::{Metadata, TensorView},
};

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

impl Dtype {
    /// The safetensors dtype this corresponds to.
    pub(super) fn safetensors(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::F16 => StDtype::F16,
            Dtype::BF16 => StDtype::BF16,
        }
    }

    /// Encodes `values` little-endian in this dtype (rounding to nearest for F16 and BF16).
    pub(super) fn encode(self, values: &[f32]) -> Vec<u8> {
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
