//! The `kiln` binary as a user runs it (a separate process, built by cargo for this test).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{fs, process::Command};

use std::path::PathBuf;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The `# expect-error:` lines of an invalid example: messages its rejection must contain.
fn expected_errors(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("# expect-error: ")).collect()
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(repo_root()).output().expect("running kiln")
}

#[test]
fn validate_accepts_the_examples() {
    let out = kiln(&[
        "validate",
        "examples/modeldeployment-native.yaml",
        "examples/modeldeployment-vllm.yaml",
        "examples/gpurental.yaml",
        "examples/gpunode.yaml",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ModelDeployment/mlp-demo is valid"), "{stdout}");
    assert!(stdout.contains("4 valid, 0 invalid"), "{stdout}");
}

#[test]
fn validate_rejects_each_invalid_example_with_a_readable_message() {
    let dir = repo_root().join("examples/invalid");
    let mut files: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let out = kiln(&["validate", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{}: {stdout}", path.display());
        let text = fs::read_to_string(&path).unwrap();
        for want in expected_errors(&text) {
            assert!(stdout.contains(want), "{}:\n  want: {want}\n  got:  {stdout}", path.display());
        }
        assert!(stdout.contains(" is invalid: "), "{stdout}");
    }
}

#[test]
fn validate_reports_unknown_kinds_and_broken_yaml_without_stopping() {
    let dir = std::env::temp_dir().join(format!("kiln-e2e-validate-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mixed.yaml");
    fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: GpuRental\nmetadata: {name: ok}\n\
         spec: {gpuModel: NVIDIA H100 80GB HBM3, count: 1, hours: 2}\n---\nkey: [unclosed\n",
    )
    .unwrap();
    let out = kiln(&["validate", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("no matches for kind \"ConfigMap\" in version \"v1\""), "{stdout}");
    assert!(stdout.contains("not valid YAML"), "{stdout}");
    assert!(stdout.contains("GpuRental/ok is valid"), "{stdout}");
    assert!(stdout.contains("1 valid, 2 invalid"), "{stdout}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn crdgen_prints_the_checked_in_crds() {
    let out = kiln(&["crdgen"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    for file in ["kiln.dev_modeldeployments.yaml", "kiln.dev_gpurentals.yaml", "kiln.dev_gpunodes.yaml"] {
        let on_disk = fs::read_to_string(repo_root().join("crds").join(file)).unwrap();
        assert!(stdout.contains(&on_disk), "kiln crdgen output lacks crds/{file}");
    }
}

#[test]
fn commands_not_yet_built_say_so_and_fail() {
    for args in [&["up"][..], &["simulate", "serving"]] {
        let out = kiln(args);
        assert_eq!(out.status.code(), Some(2), "kiln {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not yet implemented"), "kiln {args:?}: {stderr}");
    }
}
