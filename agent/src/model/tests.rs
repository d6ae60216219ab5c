//! Loading, validation, inference and writing of native models, on hand-computed and corrupted files.

use std::collections::HashMap;

use half::{bf16, f16};
use safetensors::{Dtype as StDtype, tensor::TensorView};

use super::{dense::dot, *};

/// Layer 0: 2 -> 3 with bias; layer 1: 3 -> 2 with bias. All values are exact in f16 and bf16.
fn hand_layers() -> Vec<LayerSpec> {
    vec![
        LayerSpec::new(vec![1.0, -1.0, 2.0, 0.5, -1.0, -1.0], vec![0.5, -1.0, 0.0], 3, 2),
        LayerSpec::new(vec![1.0, 2.0, -1.0, 0.5, -1.0, 1.0], vec![0.25, 0.0], 2, 3),
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
        .map(|l| LayerSpec::new(l.weight().to_vec(), l.bias().unwrap().to_vec(), l.out_dim(), l.in_dim()))
        .collect();
    let input: Vec<Vec<f32>> = (0..4).map(|r| (0..16).map(|c| ((r * 16 + c) as f32 * 0.37).sin()).collect()).collect();
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
            .map(|l| LayerSpec {
                weight: l.weight.iter().map(|&v| round(v)).collect(),
                bias: l.bias.iter().map(|&v| round(v)).collect(),
                ..l.clone()
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
        let layers = vec![LayerSpec::new(vec![1.0], vec![], 1, 1), LayerSpec::new(vec![2.0], vec![0.5], 1, 1)];
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
    let layers =
        vec![LayerSpec::new(vec![0.0; 8 * 3], vec![], 8, 3), LayerSpec::new(vec![0.0; 4 * 7], vec![0.0; 4], 4, 7)];
    let err = err_text(&write_model(&layers, Activation::Relu, Dtype::F32));
    assert_eq!(err, "layers.1.weight: shape [4, 7] does not chain: previous layer outputs 8");
}

#[test]
fn layer_numbering_must_be_contiguous() {
    let one = || f32_bytes(&[1.0]);
    let gap = raw_file(
        &[("layers.0.weight", StDtype::F32, vec![1, 1], one()), ("layers.2.weight", StDtype::F32, vec![1, 1], one())],
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
        &[("layers.0.weight", StDtype::F32, vec![1, 1], one()), ("layers.0.bias", StDtype::F64, vec![1], vec![0; 8])],
        None,
    );
    assert!(err_text(&f64_bias).starts_with("layers.0.bias: dtype F64"));

    let rank = raw_file(&[("layers.0.weight", StDtype::F32, vec![1], one())], None);
    assert_eq!(err_text(&rank), "layers.0.weight: shape [1] must have 2 dimension(s) ([out, in])");
    let zero = raw_file(&[("layers.0.weight", StDtype::F32, vec![0, 3], vec![])], None);
    assert_eq!(err_text(&zero), "layers.0.weight: shape [0, 3] has a zero dimension");
    let wide = raw_file(&[("layers.0.weight", StDtype::F16, vec![1, MAX_DIM + 1], vec![0; 2 * (MAX_DIM + 1)])], None);
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
    assert_eq!(err_text(&bytes), "metadata `activation`: unknown value `tanh` (expected relu, gelu, silu or identity)");
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
    let bad_weight = try_write_model(&[LayerSpec::new(vec![1.0; 5], vec![], 2, 3)], Activation::Relu, Dtype::F32);
    assert!(matches!(bad_weight, Err(ModelError::WeightLength { len: 5, out: 2, inp: 3, .. })));
    let bad_bias = try_write_model(&[LayerSpec::new(vec![1.0; 6], vec![1.0], 2, 3)], Activation::Relu, Dtype::F32);
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

/// `load_file`'s phases account for its whole wall-clock time (within 5%), and it loads every dtype exactly as
/// `load_bytes` does, tensors larger than one read chunk included.
#[test]
fn load_file_phases_add_up_to_its_time_and_every_dtype_matches_load_bytes() {
    let dir = std::env::temp_dir().join(format!("kiln-model-phases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 1100 x 1000 weights: 4.4 MB in F32, past the 1 MiB read chunk, and not a multiple of it.
    let weight: Vec<f32> = (0..1100 * 1000).map(|i| ((i % 977) as f32 - 488.0) / 1000.0).collect();
    let layers = [
        LayerSpec::new(weight, (0..1100).map(|i| i as f32 / 100.0).collect(), 1100, 1000),
        LayerSpec::new(vec![0.25; 3 * 1100], vec![], 3, 1100),
    ];
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let bytes = write_model(&layers, Activation::Silu, dtype);
        let path = dir.join(format!("{dtype:?}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let started = std::time::Instant::now();
        let (model, timings) = load_file(&path).unwrap();
        let wall = started.elapsed();
        assert_eq!(model, load_bytes(&bytes).unwrap(), "{dtype:?}");
        let (sum, wall_s) = (timings.total().as_secs_f64(), wall.as_secs_f64());
        assert!(sum <= wall_s && sum >= 0.95 * wall_s, "{dtype:?}: phases {sum} s of {wall_s} s ({timings:?})");
        assert!(timings.read > std::time::Duration::ZERO && timings.convert > std::time::Duration::ZERO);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A layer large enough to be split over threads gives the bits of the one-thread computation, row by row.
#[test]
fn a_large_layer_on_several_threads_gives_the_bits_of_one() {
    let (out, inp) = (1100, 1000);
    assert!(out * inp >= super::dense::PARALLEL_WEIGHTS);
    let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 1e4).collect();
    let b: Vec<f32> = (0..out).map(|i| i as f32 / 1e3).collect();
    let layers = [LayerSpec::new(w.clone(), b.clone(), out, inp), LayerSpec::new(vec![0.5; 3 * out], vec![], 3, out)];
    let model = load_bytes(&write_model(&layers, Activation::Relu, Dtype::F32)).unwrap();
    let x: Vec<f32> = (0..inp).map(|i| (i as f32).sin()).collect();
    let hidden: Vec<f32> =
        w.chunks_exact(inp).zip(&b).map(|(row, bias)| Activation::Relu.apply(dot(row, &x) + bias)).collect();
    let want: Vec<f32> = vec![0.5; 3 * out].chunks_exact(out).map(|row| dot(row, &hidden)).collect();
    assert_eq!(model.forward_one(&x).unwrap(), want);
    assert_eq!(model.forward(&[x.clone(), x]).unwrap(), vec![want.clone(), want]);
}
