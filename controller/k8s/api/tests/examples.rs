//! The manifests under `examples/` against the generated schemas: every example is accepted, every example under
//! `examples/invalid/` is rejected, and each rejection carries the messages its `# expect-error:` lines name.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{fs, path::PathBuf};

use kiln_k8s_api::validate::Validator;
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
        let expected: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect-error: ")).collect();
        assert!(!expected.is_empty(), "{} names no `# expect-error:` line", path.display());
        for doc in documents(&path) {
            let invalid = validator.validate(&doc).expect_err(&format!("{} should be rejected", path.display()));
            let message = invalid.to_string();
            for want in &expected {
                assert!(message.contains(want), "{}:\n  want: {want}\n  got:  {message}", path.display());
            }
        }
    }
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
