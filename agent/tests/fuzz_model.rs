//! Fuzzing of the safetensors loader (`model::load_bytes`, and `load_file`'s framing) with proptest: arbitrary
//! bytes, and valid files from `example_model` with bytes flipped, cut short, the 8-byte header length replaced, or
//! the JSON header edited (shapes, dtypes and offsets that overflow, missing or extra tensors, odd metadata).
//!
//! Properties: no panic; an error or a model whose shapes chain; and no allocation proportional to a declared but
//! absent size: this test binary counts the largest single allocation made while loading (a counting global
//! allocator) and requires it to stay within a small multiple of the input's length.
//!
//! CI runs a bounded number of cases per target (256). Run longer locally (release mode is ~10x faster):
//! `KILN_FUZZ_CASES=100000 cargo test --release -p kiln-agent --test fuzz_model`.

#![allow(unsafe_code)] // the counting allocator below; nothing else

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use kiln_agent::model::{MAX_PARAMS, example_model, load_bytes};
use proptest::prelude::*;
use serde_json::{Value, json};

/// The system allocator, remembering per thread the largest allocation since [`Largest::reset`].
struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

impl Largest {
    fn reset() {
        LARGEST.with(|l| l.set(0));
    }

    fn get() -> usize {
        LARGEST.with(Cell::get)
    }

    fn note(size: usize) {
        // `try_with`: the thread-local may be gone while a thread exits.
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract; the bookkeeping
// only touches a const-initialised thread-local `Cell` (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: forwarded with the caller's layout, as the caller guarantees it is valid.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (every allocation goes through it) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller guarantees `new_size` is valid.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// Cases per property: `KILN_FUZZ_CASES` or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() }
}

/// Loads `bytes`: never a panic; a model that parses has layers whose shapes chain; the largest allocation stays
/// within 4x the input (the f32 conversion of F16 data doubles it) plus 64 KiB of bookkeeping.
fn check(bytes: &[u8]) {
    Largest::reset();
    let result = load_bytes(bytes);
    let largest = Largest::get();
    assert!(
        largest <= 4 * bytes.len() + (64 << 10),
        "loading {} bytes allocated {largest} bytes at once ({:?})",
        bytes.len(),
        result.as_ref().map(|m| m.param_count()).map_err(ToString::to_string)
    );
    match result {
        Ok(model) => {
            assert!(!model.layers().is_empty() && model.param_count() <= MAX_PARAMS);
            for pair in model.layers().windows(2) {
                assert_eq!(pair[0].out_dim(), pair[1].in_dim());
            }
            for layer in model.layers() {
                assert_eq!(layer.weight().len(), layer.out_dim() * layer.in_dim());
            }
            // A model that loads also runs.
            let out = model.forward_one(&vec![0.5; model.input_dim()]).expect("the input has the model's width");
            assert_eq!(out.len(), model.output_dim());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A valid model of 1 to 3 small layers.
fn valid_model() -> impl Strategy<Value = Vec<u8>> {
    (any::<u64>(), prop::collection::vec(1usize..6, 2..5)).prop_map(|(seed, dims)| example_model(seed, &dims))
}

/// Splits a safetensors buffer into its JSON header and data (the input is a valid file).
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + len]).expect("a valid header");
    (header, bytes[8 + len..].to_vec())
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Numbers that break size arithmetic.
fn hostile_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!(u64::MAX / 2 + 1)),
        Just(json!(u32::MAX)),
        Just(json!(1u64 << 40)),
        Just(json!(1u64 << 20)),
        Just(json!((1u64 << 20) + 1)),
        Just(json!(1.5)),
        Just(json!(1e300)),
        Just(json!("7")),
        Just(Value::Null),
        any::<u64>().prop_map(|n| json!(n)),
        (0u64..64).prop_map(|n| json!(n)),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    /// Replace entry `i` of tensor `t`'s shape (or append when past the end).
    Shape(usize, usize, Value),
    /// Replace the whole shape.
    WholeShape(usize, Vec<Value>),
    /// Replace start (0) or end (1) of tensor `t`'s data offsets.
    Offset(usize, usize, Value),
    Dtype(usize, String),
    Remove(usize),
    Rename(usize, String),
    /// Add a tensor with this name, shape and offsets.
    Add(String, Vec<Value>, Value, Value),
    Metadata(Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    let name = prop_oneof![
        Just("layers.0.weight".to_owned()),
        Just("layers.1.bias".to_owned()),
        Just("layers.01.weight".to_owned()),
        Just("layers.18446744073709551616.weight".to_owned()),
        Just("layers.1023.weight".to_owned()),
        Just("__metadata__".to_owned()),
        (0usize..2000).prop_map(|i| format!("layers.{i}.weight")),
        "\\PC{0,16}",
    ];
    let dtype = prop_oneof![
        Just("F32".to_owned()),
        Just("F16".to_owned()),
        Just("BF16".to_owned()),
        Just("F64".to_owned()),
        Just("I8".to_owned()),
        Just("BOOL".to_owned()),
        Just("F8_E4M3".to_owned()),
        Just("F4".to_owned()),
        "[A-Z0-9_]{0,8}",
    ];
    prop_oneof![
        3 => (any::<usize>(), 0usize..3, hostile_number()).prop_map(|(t, i, v)| Edit::Shape(t, i, v)),
        1 => (any::<usize>(), prop::collection::vec(hostile_number(), 0..5)).prop_map(|(t, s)| Edit::WholeShape(t, s)),
        3 => (any::<usize>(), 0usize..2, hostile_number()).prop_map(|(t, i, v)| Edit::Offset(t, i, v)),
        2 => (any::<usize>(), dtype).prop_map(|(t, d)| Edit::Dtype(t, d)),
        1 => any::<usize>().prop_map(Edit::Remove),
        1 => (any::<usize>(), name.clone()).prop_map(|(t, n)| Edit::Rename(t, n)),
        1 => (name, prop::collection::vec(hostile_number(), 0..3), hostile_number(), hostile_number())
            .prop_map(|(n, s, a, b)| Edit::Add(n, s, a, b)),
        1 => prop_oneof![
            Just(json!({"activation": "gelu"})),
            Just(json!({"activation": "sigmoid"})),
            Just(json!({"activation": 3})),
            Just(json!([1, 2])),
            Just(json!("relu")),
            Just(Value::Null),
        ].prop_map(Edit::Metadata),
    ]
}

fn apply(header: &mut Value, edits: &[Edit]) {
    for e in edits {
        let Some(map) = header.as_object_mut() else { return };
        let names: Vec<String> = map.keys().filter(|k| *k != "__metadata__").cloned().collect();
        let pick = |t: usize| names.get(t % names.len().max(1)).cloned();
        match e {
            Edit::Shape(t, i, v) => {
                if let Some(shape) = pick(*t).and_then(|n| map.get_mut(&n)?.get_mut("shape")?.as_array_mut().cloned()) {
                    let mut shape = shape;
                    match shape.get_mut(*i) {
                        Some(slot) => *slot = v.clone(),
                        None => shape.push(v.clone()),
                    }
                    if let Some(n) = pick(*t) {
                        map[&n]["shape"] = Value::Array(shape);
                    }
                }
            }
            Edit::WholeShape(t, s) => {
                if let Some(n) = pick(*t) {
                    map[&n]["shape"] = Value::Array(s.clone());
                }
            }
            Edit::Offset(t, i, v) => {
                if let Some(n) = pick(*t)
                    && let Some(offsets) = map[&n].get_mut("data_offsets").and_then(Value::as_array_mut)
                    && let Some(slot) = offsets.get_mut(*i)
                {
                    *slot = v.clone();
                }
            }
            Edit::Dtype(t, d) => {
                if let Some(n) = pick(*t) {
                    map[&n]["dtype"] = json!(d);
                }
            }
            Edit::Remove(t) => {
                if let Some(n) = pick(*t) {
                    map.remove(&n);
                }
            }
            Edit::Rename(t, to) => {
                if let Some(n) = pick(*t)
                    && let Some(v) = map.remove(&n)
                {
                    map.insert(to.clone(), v);
                }
            }
            Edit::Add(n, shape, a, b) => {
                map.insert(n.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [a, b]}));
            }
            Edit::Metadata(m) => {
                map.insert("__metadata__".into(), m.clone());
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn arbitrary_header_text(header in "\\PC{0,300}", data in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        check(&bytes);
    }

    #[test]
    fn flipped_and_truncated(model in valid_model(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8), cut in any::<usize>()) {
        let mut bytes = model;
        let len = bytes.len();
        for (at, x) in flips {
            bytes[at % len] ^= x;
        }
        check(&bytes);
        bytes.truncate(cut % (len + 1));
        check(&bytes);
    }

    #[test]
    fn header_length_prefix(model in valid_model(), declared in prop_oneof![any::<u64>(), Just(u64::MAX), Just(1u64 << 40), 0u64..4096]) {
        let mut bytes = model;
        bytes[..8].copy_from_slice(&declared.to_le_bytes());
        check(&bytes);
    }

    #[test]
    fn edited_header(model in valid_model(), edits in prop::collection::vec(edit(), 1..5), data_cut in any::<usize>()) {
        let (mut header, mut data) = split(&model);
        apply(&mut header, &edits);
        check(&join(&header, &data));
        // The same header over a data section cut short: declared offsets past the end.
        data.truncate(data_cut % (data.len() + 1));
        check(&join(&header, &data));
    }
}

/// A header claiming a 1 TiB tensor (2^19 x 2^19 x F32, within the dimension limit) with no data fails fast,
/// without allocating anything near the declared size.
#[test]
fn a_header_claiming_a_terabyte_tensor_fails_without_allocating_it() {
    let side = 1u64 << 19;
    let header = json!({
        "layers.0.weight": {"dtype": "F32", "shape": [side, side], "data_offsets": [0, side * side * 4]},
    });
    let bytes = join(&header, &[0; 16]);
    let started = std::time::Instant::now();
    check(&bytes);
    assert!(load_bytes(&bytes).is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

/// Found reading `load_file` beside the fuzzing: a device as the model file (`/dev/zero` reports size 0, passes
/// the size check and never ends) was read until memory ran out. Now anything but a regular file is refused.
#[test]
fn load_file_refuses_devices() {
    let started = std::time::Instant::now();
    let err = kiln_agent::model::load_file(std::path::Path::new("/dev/zero")).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

/// The allocation bound can fail: the counter sees a large allocation made on this thread.
#[test]
fn the_allocation_counter_sees_large_allocations() {
    Largest::reset();
    let big = std::hint::black_box(vec![1u8; 8 << 20]);
    assert!(Largest::get() >= 8 << 20, "{}", Largest::get());
    drop(big);
}
