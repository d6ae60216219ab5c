//! Fuzzing of the manifest parser and validator with proptest: `manifests::load_dir` (a file's text becomes
//! deployments or errors naming the file and document) and `kiln_k8s_api::validate::Validator` (`validate`,
//! `validate_apply`, `validate_status_apply`), on arbitrary text and on the examples under `examples/` mutated:
//! fields dropped, values of the wrong type, huge numbers, long strings, deep nesting, broken YAML.
//!
//! Properties: no panic and no stack overflow; every document is either served as a deployment that validates or
//! reported with its file, its document number and a message; every deployment served translates at the spec port
//! (`spec::translate`) or fails with a typed `SpecError`; the validator returns a result or an error whose message
//! names the resource.
//!
//! CI runs a bounded number of cases per target (128). Run longer locally:
//! `KILN_FUZZ_CASES=20000 cargo test --release -p kiln-controller --test fuzz_manifests`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    path::PathBuf,
    sync::{
        LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use kiln_controller::manifests::load_dir;
use kiln_k8s_api::validate::Validator;
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::{Value, json};

/// Cases per property: `KILN_FUZZ_CASES` or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig { cases: cases(128), failure_persistence: None, ..ProptestConfig::default() })
}

static VALIDATOR: LazyLock<Validator> = LazyLock::new(Validator::default);

const EXAMPLES: [&str; 9] = [
    include_str!("../../../examples/modeldeployment-native.yaml"),
    include_str!("../../../examples/modeldeployment-vllm.yaml"),
    include_str!("../../../examples/gpurental.yaml"),
    include_str!("../../../examples/gpunode.yaml"),
    include_str!("../../../examples/invalid/modeldeployment-bad-fields.yaml"),
    include_str!("../../../examples/invalid/modeldeployment-min-above-max.yaml"),
    include_str!("../../../examples/invalid/modeldeployment-process-without-command.yaml"),
    include_str!("../../../examples/invalid/modeldeployment-unknown-field.yaml"),
    include_str!("../../../examples/invalid/gpurental-hours-and-end.yaml"),
];

/// The examples as JSON values (each file's first document).
static PARSED: LazyLock<Vec<Value>> =
    LazyLock::new(|| EXAMPLES.iter().map(|text| serde_yaml::from_str(text).unwrap()).collect());

/// A directory of its own per call (tests run in parallel).
fn scratch() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-fuzz-manifests-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Loads `text` as the one manifest of a directory and checks the outcome; returns (deployments served, documents
/// refused).
fn check_text(dir: &std::path::Path, text: &str) -> (usize, usize) {
    let file = dir.join("m.yaml");
    std::fs::write(&file, text).unwrap();
    let set = load_dir(dir, &VALIDATOR).unwrap();
    for e in &set.errors {
        assert_eq!(e.file, file);
        assert!(e.document >= 1 && !e.message.is_empty(), "{e}");
    }
    for (key, d) in &set.deployments {
        assert_eq!(*key, d.key());
        assert!(!d.name.is_empty() && !d.namespace.is_empty(), "{key}");
        let value = serde_json::to_value(&d.resource).unwrap();
        VALIDATOR.validate(&value).unwrap_or_else(|e| panic!("{key} was served but does not validate: {e}"));
        // The spec port: what validates translates, or says why it cannot be served (never a panic).
        match d.served() {
            Ok(served) => {
                assert_eq!((served.key.as_str(), served.version.as_str()), (key.as_str(), d.version.as_str()))
            }
            Err(e) => assert!(!e.to_string().is_empty() && e.category() == "invalid_spec", "{key}: {e:?}"),
        }
    }
    let (served, rejected) = set.served();
    assert_eq!(served.len() + rejected.len(), set.deployments.len());
    (set.deployments.len(), set.errors.len())
}

/// Validates `value` every way the validator offers; a rejection names the resource and says why.
fn check_value(value: &Value, live: &Value) {
    for result in [
        VALIDATOR.validate(value).map(|()| Value::Null),
        VALIDATOR.validate_apply(value, Some(live)),
        VALIDATOR.validate_apply(value, None),
        VALIDATOR.validate_status_apply(value, live),
    ] {
        if let Err(invalid) = result {
            assert!(!invalid.errors.is_empty());
            assert!(invalid.to_string().contains(" is invalid: "), "{invalid}");
        }
    }
}

/// Hostile values: wrong types, huge numbers, long strings, deep nesting.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(true)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(json!("1e400")),
        Just(json!("80GB")),
        Just(json!("1Gi")),
        Just(json!("999999999999999999999999Ei")),
        Just(json!("0.000000001m")),
        Just(json!("fixed:-5s")),
        Just(json!("fixed:99999999999999999999h")),
        Just(json!("adaptive")),
        Just(json!("native")),
        Just(json!("process")),
        Just(json!([])),
        Just(json!({})),
        Just(json!([null, 1, "a"])),
        (0usize..100_000).prop_map(|n| json!("a".repeat(n))),
        (1usize..120).prop_map(|depth| (0..depth).fold(json!(1), |v, _| json!([v]))),
        (1usize..120).prop_map(|depth| (0..depth).fold(json!(1), |v, _| json!({ "x": v }))),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "\\PC{0,16}".prop_map(Value::String),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    /// Replace the value at a path (chosen by the indexes, modulo what exists) with another.
    Replace(Vec<usize>, Value),
    Remove(Vec<usize>),
    /// Add a field at a path.
    Add(Vec<usize>, String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    let path = prop::collection::vec(any::<usize>(), 0..5);
    let key = prop_oneof![
        Just("spec".to_owned()),
        Just("minReplicas".to_owned()),
        Just("maxReplicas".to_owned()),
        Just("keepAlive".to_owned()),
        Just("memoryPerGpu".to_owned()),
        Just("x-kubernetes-preserve-unknown-fields".to_owned()),
        Just("status".to_owned()),
        "[a-zA-Z]{1,10}",
    ];
    prop_oneof![
        4 => (path.clone(), hostile_value()).prop_map(|(p, v)| Edit::Replace(p, v)),
        2 => path.clone().prop_map(Edit::Remove),
        1 => (path, key, hostile_value()).prop_map(|(p, k, v)| Edit::Add(p, k, v)),
    ]
}

fn has_children(v: &Value) -> bool {
    matches!(v, Value::Object(map) if !map.is_empty()) || matches!(v, Value::Array(items) if !items.is_empty())
}

/// The child of `v` that `i` picks, if `v` has children.
fn child(v: &mut Value, i: usize) -> Option<&mut Value> {
    match v {
        Value::Object(map) if !map.is_empty() => {
            let n = map.len();
            map.values_mut().nth(i % n)
        }
        Value::Array(items) if !items.is_empty() => {
            let n = items.len();
            items.get_mut(i % n)
        }
        _ => None,
    }
}

fn apply(value: &mut Value, edit: &Edit) {
    let (path, last) = match edit {
        Edit::Replace(p, _) | Edit::Remove(p) | Edit::Add(p, _, _) => (p.as_slice(), p.last().copied()),
    };
    // Walk to the parent of the target (for Add: to the target itself).
    let steps = match edit {
        Edit::Add(..) => path.len(),
        _ => path.len().saturating_sub(1),
    };
    let mut at = value;
    for &i in &path[..steps] {
        if !has_children(at) {
            break;
        }
        at = child(at, i).unwrap();
    }
    match edit {
        Edit::Replace(_, v) => match last {
            Some(i) if has_children(at) => *child(at, i).unwrap() = v.clone(),
            _ => *at = v.clone(),
        },
        Edit::Remove(_) => match at {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(last.unwrap_or(0) % map.len()).cloned().unwrap();
                map.remove(&key);
            }
            Value::Array(items) if !items.is_empty() => {
                let n = items.len();
                items.remove(last.unwrap_or(0) % n);
            }
            _ => {}
        },
        Edit::Add(_, key, v) => {
            if let Value::Object(map) = at {
                map.insert(key.clone(), v.clone());
            }
        }
    }
}

/// Text-level damage after the edits: cut, insert, a second document.
#[derive(Debug, Clone)]
enum TextEdit {
    None,
    Truncate(usize),
    Insert(usize, String),
    SecondDocument(usize),
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        3 => Just(TextEdit::None),
        1 => any::<usize>().prop_map(TextEdit::Truncate),
        1 => (any::<usize>(), prop_oneof![
            Just("\n---\n".to_owned()),
            Just(": : :".to_owned()),
            Just("\t".to_owned()),
            Just("&a [*a]".to_owned()),
            Just("!!binary".to_owned()),
            Just("\"".to_owned()),
            "\\PC{0,8}",
        ]).prop_map(|(at, s)| TextEdit::Insert(at, s)),
        1 => any::<usize>().prop_map(TextEdit::SecondDocument),
    ]
}

fn render(value: &Value, text_edit: &TextEdit) -> String {
    let mut text = serde_yaml::to_string(value).unwrap();
    let boundary = |text: &str, at: usize| {
        let mut at = at % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    match text_edit {
        TextEdit::None => {}
        TextEdit::Truncate(at) => text.truncate(boundary(&text, *at)),
        TextEdit::Insert(at, s) => text.insert_str(boundary(&text, *at), s),
        TextEdit::SecondDocument(i) => {
            text.push_str("---\n");
            text.push_str(EXAMPLES[i % EXAMPLES.len()]);
        }
    }
    text
}

#[test]
fn mutated_examples() {
    let dir = scratch();
    // The harness serves the valid examples unchanged (the two ModelDeployments).
    let served: usize = EXAMPLES.iter().map(|text| check_text(&dir, text).0).sum();
    assert_eq!(served, 2);
    let refused = std::cell::Cell::new(0);
    let strategy = (0..EXAMPLES.len(), prop::collection::vec(edit(), 1..5), text_edit(), 0..EXAMPLES.len());
    runner()
        .run(&strategy, |(example, edits, text_edit, live)| {
            let mut value = PARSED[example].clone();
            for e in &edits {
                apply(&mut value, e);
            }
            check_value(&value, &PARSED[live]);
            refused.set(refused.get() + check_text(&dir, &render(&value, &text_edit)).1);
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(refused.get() > 0, "the mutations reach the validator's refusals");
}

#[test]
fn arbitrary_text() {
    let dir = scratch();
    let text = prop_oneof![
        "\\PC{0,300}",
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        // Examples with a random slice of another spliced in.
        (0..EXAMPLES.len(), any::<usize>(), any::<usize>()).prop_map(|(i, a, b)| {
            let (x, y) = (EXAMPLES[i], EXAMPLES[(i + 1) % EXAMPLES.len()]);
            let (a, b) = (a % (x.len() + 1), b % (y.len() + 1));
            let (a, b) = (
                (0..=a).rev().find(|&a| x.is_char_boundary(a)).unwrap(),
                (0..=b).rev().find(|&b| y.is_char_boundary(b)).unwrap(),
            );
            format!("{}{}", &x[..a], &y[b..])
        }),
    ];
    runner()
        .run(&text, |text| {
            check_text(&dir, &text);
            if let Ok(value) = serde_yaml::from_str::<Value>(&text) {
                check_value(&value, &PARSED[0]);
            }
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Nesting far past the parsers' limits, in flow and block style, and an alias bomb, are errors, not a stack
/// overflow or an exponential expansion. Found by this test: serde_yaml (libyaml) refuses more than 128 levels
/// but scans flow nesting in quadratic time first (64,000 `[` took 18 s, `{a: ` 34 s, in release; 200,000 took
/// minutes); `load_dir` now refuses flow nesting past 128 levels before parsing.
#[test]
fn deep_nesting_and_alias_bombs_are_reported() {
    let dir = scratch();
    let depth = 200_000;
    let flow = format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: ModelDeployment\nspec: {}1{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let block: String = (0..1_000).map(|i| format!("{}- \n", "  ".repeat(i))).collect();
    let mut bomb = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n".to_owned();
    for (i, c) in ('b'..='j').enumerate() {
        let prev = (b'a' + i as u8) as char;
        bomb.push_str(&format!(
            "{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
    }
    bomb.push_str("kind: ModelDeployment\n");
    for text in [flow, block, bomb] {
        let started = std::time::Instant::now();
        let file = dir.join("m.yaml");
        std::fs::write(&file, &text).unwrap();
        let set = load_dir(&dir, &VALIDATOR).unwrap();
        assert!(set.deployments.is_empty());
        assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", set.errors);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_depth_guard_counts_brackets_outside_quotes_and_comments_only() {
    use kiln_controller::manifests::too_deep;
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    assert_eq!(too_deep(&format!("a: {}\n", deep(128)), 128), None);
    assert_eq!(too_deep(&format!("a: 1\nb: {}\n", deep(129)), 128), Some((1, 2)));
    assert_eq!(too_deep(&format!("a: 1\n---\nb: {}\n", deep(129)), 128), Some((2, 3)));
    assert_eq!(
        too_deep(&format!("a: \"{}\"\nb: '{}' # {}\n", "[".repeat(200), "{".repeat(200), "[".repeat(200)), 128),
        None
    );
    // A quote inside a plain scalar does not hide what follows.
    assert_eq!(too_deep(&format!("a: don't\nb: {}\n", deep(129)), 128), Some((1, 2)));
    // Every example passes.
    for text in EXAMPLES {
        assert_eq!(too_deep(text, 128), None);
    }
}
