//! The manifests under `examples/` against the generated schemas: every example is accepted, every example under
//! `examples/invalid/` is rejected, and each rejection carries the messages its `# expect-error:` lines name.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{fs, path::PathBuf};

use kiln_k8s_api::validate::{Validator, expected_errors};
use serde::Deserialize;
use serde_json::Value;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../examples")
}

fn yaml_files(dir: &PathBuf) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &PathBuf) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_example_is_valid() {
    let validator = Validator::default();
    let files = yaml_files(&examples_dir());
    assert!(files.len() >= 4, "expected the examples, found {files:?}");
    for path in files {
        for doc in documents(&path) {
            if let Err(invalid) = validator.validate(&doc) {
                panic!("{} should be valid: {invalid}", path.display());
            }
        }
    }
}

#[test]
fn every_invalid_example_is_rejected_with_its_expected_messages() {
    let validator = Validator::default();
    let files = yaml_files(&examples_dir().join("invalid"));
    assert!(!files.is_empty());
    for path in files {
        let text = fs::read_to_string(&path).unwrap();
        let expected = expected_errors(&text);
        assert!(!expected.is_empty(), "{} names no `# expect-error:` line", path.display());
        let older = text.lines().filter(|l| l.starts_with("# expect-error-before-1.35: ")).count();
        let paired = expected.iter().filter(|e| e.before_1_35.is_some()).count();
        assert_eq!(
            older,
            paired,
            "{}: an `expect-error-before-1.35` line must follow its `expect-error` line",
            path.display()
        );
        for doc in documents(&path) {
            let invalid = validator.validate(&doc).expect_err(&format!("{} should be rejected", path.display()));
            let message = invalid.to_string();
            for want in &expected {
                // Offline, only the current wording counts.
                assert!(
                    message.contains(want.message),
                    "{}:\n  want: {}\n  got:  {message}",
                    path.display(),
                    want.message
                );
            }
        }
    }
}

/// kube-apiserver 1.35+ wording for failed CEL rules: the value for a scalar, nothing for an object; never the
/// type name that 1.30-1.34 printed.
#[test]
fn failed_cel_rules_are_worded_as_a_current_apiserver_words_them() {
    let validator = Validator::default();
    let rental = serde_json::json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "GpuRental", "metadata": { "name": "r" },
        "spec": { "gpuModel": "NVIDIA H100 80GB HBM3", "count": 1, "hours": 2, "endTime": "2026-12-01T00:00:00Z" }
    });
    let message = validator.validate(&rental).unwrap_err().to_string();
    assert_eq!(
        message,
        "GpuRental.kiln.dev \"r\" is invalid: spec: Invalid value: set exactly one of hours or endTime"
    );
    let md = serde_json::json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": { "name": "m" },
        "spec": { "model": { "uri": "file:///m", "size": "80GB" }, "gpu": { "memoryPerGpu": "1Gi" } }
    });
    let message = validator.validate(&md).unwrap_err().to_string();
    assert!(message.contains(r#"spec.model.size: Invalid value: "80GB": must be a positive size"#), "{message}");
    assert!(!message.contains(r#""string""#) && !message.contains(r#""object""#), "{message}");
}

/// The old wording is accepted only where an example says so, and then either wording is found.
#[test]
fn an_expected_error_accepts_the_older_wording_only_where_given() {
    let text = "# expect-error: spec: Invalid value: x\n\
                # expect-error-before-1.35: spec: Invalid value: \"object\": x\n\
                # expect-error: spec.a: Required value\n";
    let expected = expected_errors(text);
    assert_eq!(expected.len(), 2);
    assert!(expected[0].found_in("R \"n\" is invalid: spec: Invalid value: x"));
    assert!(expected[0].found_in("R \"n\" is invalid: spec: Invalid value: \"object\": x"));
    assert!(!expected[0].found_in("R \"n\" is invalid: spec: Invalid value: \"string\": x"));
    assert_eq!(expected[1].before_1_35, None);
    assert!(!expected[1].found_in("spec.b: Required value"));
}

#[test]
fn examples_deserialize_into_the_rust_types() {
    use kiln_k8s_api::{GpuNode, GpuRental, ModelDeployment};
    for path in yaml_files(&examples_dir()) {
        for doc in documents(&path) {
            let kind = doc["kind"].as_str().unwrap().to_owned();
            let result = match kind.as_str() {
                "ModelDeployment" => serde_json::from_value::<ModelDeployment>(doc).map(drop),
                "GpuRental" => serde_json::from_value::<GpuRental>(doc).map(drop),
                "GpuNode" => serde_json::from_value::<GpuNode>(doc).map(drop),
                other => panic!("{}: unexpected kind {other}", path.display()),
            };
            result.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

/// A quantity far outside any real range (kube's CEL quantity comparison overflows on it) is refused with a
/// message, not a panic of the validator's caller.
#[test]
fn a_quantity_out_of_any_range_is_refused_not_a_crash() {
    let validator = Validator::default();
    for size in ["1e99999", "9e9999999999"] {
        let md = serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": { "name": "m" },
            "spec": { "model": { "uri": "file:///m", "size": size }, "gpu": { "memoryPerGpu": "1Gi" } }
        });
        let message = validator.validate(&md).unwrap_err().to_string();
        assert!(message.contains("spec"), "{size}: {message}");
    }
}
