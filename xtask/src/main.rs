//! Developer tasks.
//!
//! `cargo xtask test [ARGS...]`: the test suite, the README's test command and CI's. It runs
//! `cargo nextest run --workspace ARGS...` (each test in its own process, and the slow-test timeout of
//! `.config/nextest.toml`), installing cargo-nextest first (`cargo install cargo-nextest --locked`) when this machine
//! has none, so a fresh machine with only Rust runs it as is. `ARGS` go to nextest (a filter, `--no-fail-fast`, or
//! `-p CRATE`, which replaces `--workspace`).
//!
//! `cargo xtask codegen [--check]`: the one command that regenerates every generated file in the repository.
//!
//! - `crds/*.yaml` and `charts/kiln/crds/*.yaml`: the CustomResourceDefinitions, from `kiln-k8s-api`'s Rust types.
//! - `proto/src/gen/*.rs`: Rust code for the agent and ledger protocols, from `proto/proto/**/*.proto`, compiled with `protox`
//!   (a pure-Rust protobuf compiler, so no system `protoc`) and `tonic-prost-build`.
//!
//! With `--check`, nothing is written; the command fails and lists the stale files when any differs from what it
//! would generate. CI runs the check.
//!
//! `cargo xtask gpu-bundle [DIR]`: what the agent's GPU checks need on a machine with a GPU and no Rust toolchain,
//! in `DIR` (default `.gpu/`, git-ignored): the release `kiln-agent` and `kiln`, the agent's unit-test binary
//! (release, with the opt-in CUDA and NVML tests) as `agent_tests`, `agent/gpu-up-check.py` (cold starts through
//! `kiln up`) and `agent/gpu-check.sh`, which runs them all.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

/// The protobuf sources, relative to `proto/proto`.
const PROTOS: &[&str] = &["kiln/agent/v1/agent.proto", "kiln/ledger/v1/ledger.proto"];

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["codegen"] => codegen(Mode::Write).map(|()| ExitCode::SUCCESS),
        ["codegen", "--check"] => codegen(Mode::Check).map(|()| ExitCode::SUCCESS),
        ["test", rest @ ..] => test(rest),
        ["gpu-bundle"] => gpu_bundle(&workspace_root().join(".gpu")).map(|()| ExitCode::SUCCESS),
        ["gpu-bundle", dir] => gpu_bundle(Path::new(dir)).map(|()| ExitCode::SUCCESS),
        _ => bail!(
            "usage: cargo xtask test [NEXTEST ARGS...] | cargo xtask codegen [--check] | cargo xtask gpu-bundle [DIR]"
        ),
    }
}

/// The cargo that runs this task (`CARGO`, set by `cargo run`), else `cargo` on the path.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `cargo nextest run` with `args`: `--workspace` first unless `args` names packages.
fn nextest_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let names_packages =
        args.iter().any(|a| matches!(*a, "-p" | "--package" | "--workspace") || a.starts_with("--package="));
    let mut all = vec!["nextest", "run"];
    if !names_packages {
        all.push("--workspace");
    }
    all.extend_from_slice(args);
    all
}

fn test(args: &[&str]) -> Result<ExitCode> {
    let present = Command::new(cargo()).args(["nextest", "--version"]).output().is_ok_and(|out| out.status.success());
    if !present {
        eprintln!("cargo-nextest is not installed: installing it (cargo install cargo-nextest --locked)");
        let status = Command::new(cargo())
            .args(["install", "cargo-nextest", "--locked"])
            .status()
            .context("running cargo install cargo-nextest")?;
        if !status.success() {
            bail!("cargo install cargo-nextest --locked failed ({status})");
        }
    }
    let status = Command::new(cargo()).args(nextest_args(args)).status().context("running cargo nextest")?;
    Ok(ExitCode::from(status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1)))
}

/// The workspace's root (this crate's parent).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

/// The unit-test executable of the library `lib` among the JSON messages of `cargo test --no-run
/// --message-format=json`.
fn test_executable(messages: &str, lib: &str) -> Option<PathBuf> {
    messages.lines().filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok()).find_map(|m| {
        let is_test = m["reason"] == "compiler-artifact" && m["profile"]["test"] == true && m["target"]["name"] == lib;
        let lib_target = m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "lib"));
        (is_test && lib_target).then(|| m["executable"].as_str().map(PathBuf::from)).flatten()
    })
}

fn gpu_bundle(dir: &Path) -> Result<()> {
    let root = workspace_root();
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new(cargo())
            .current_dir(&root)
            .args(args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running cargo {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("cargo {} failed ({})", args.join(" "), out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&["build", "--release", "--locked", "-p", "kiln-agent", "--bin", "kiln-agent", "-p", "kiln", "--bin", "kiln"])?;
    let messages =
        run(&["test", "--release", "--locked", "-p", "kiln-agent", "--lib", "--no-run", "--message-format=json"])?;
    let tests =
        test_executable(&messages, "kiln_agent").context("cargo test --no-run named no kiln_agent test binary")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (from, to) in [
        (root.join("target/release/kiln-agent"), "kiln-agent"),
        (root.join("target/release/kiln"), "kiln"),
        (tests, "agent_tests"),
        (root.join("agent/gpu-check.sh"), "gpu-check.sh"),
        (root.join("agent/gpu-up-check.py"), "gpu-up-check.py"),
    ] {
        fs::copy(&from, dir.join(to)).with_context(|| format!("copying {} into {}", from.display(), dir.display()))?;
    }
    println!(
        "{}: kiln-agent, kiln, agent_tests, gpu-check.sh, gpu-up-check.py; on the GPU machine run gpu-check.sh from there",
        dir.display()
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Write,
    Check,
}

/// Every generated file: path relative to the workspace root, and contents.
fn generated(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    for manifest in kiln_k8s_api::crdgen::render()? {
        files.push((Path::new("crds").join(&manifest.file_name), manifest.contents.clone()));
        files.push((Path::new("charts/kiln/crds").join(&manifest.file_name), manifest.contents));
    }
    files.extend(protobuf(root)?);
    Ok(files)
}

fn protobuf(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let include = root.join("proto/proto");
    let descriptors = protox::compile(PROTOS, [&include]).context("compiling the .proto files")?;
    let out = std::env::temp_dir().join(format!("kiln-protogen-{}", std::process::id()));
    fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .out_dir(&out)
        .build_client(true)
        .build_server(true)
        // No `Client::connect(addr)` constructor: it would clash with the `Connect` RPC's method. Callers build a
        // `tonic::transport::Channel` and use `Client::new(channel)`.
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)
        .context("generating Rust code for the protobuf files")?;
    let mut files = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&out)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let body = fs::read_to_string(entry.path())?;
        files.push((
            Path::new("proto/src/gen").join(&name),
            format!("// Generated from proto/proto by `cargo xtask codegen`. Do not edit.\n{body}"),
        ));
    }
    fs::remove_dir_all(&out)?;
    Ok(files)
}

fn codegen(mode: Mode) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask lives in the workspace")?.to_owned();
    let files = generated(&root)?;
    let mut stale = Vec::new();
    for (rel, contents) in &files {
        let path = root.join(rel);
        let current = fs::read_to_string(&path).ok();
        if current.as_deref() == Some(contents.as_str()) {
            continue;
        }
        match mode {
            Mode::Check => stale.push(rel.display().to_string()),
            Mode::Write => {
                fs::create_dir_all(path.parent().context("generated files live in a directory")?)?;
                fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", rel.display());
            }
        }
    }
    // Generated directories hold nothing else: a leftover file (e.g. a renamed CRD) is drift too.
    for dir in ["crds", "charts/kiln/crds", "proto/src/gen"] {
        for entry in fs::read_dir(root.join(dir)).into_iter().flatten().flatten() {
            let rel = Path::new(dir).join(entry.file_name());
            if !files.iter().any(|(p, _)| *p == rel) {
                match mode {
                    Mode::Check => stale.push(format!("{} (not generated any more)", rel.display())),
                    Mode::Write => {
                        fs::remove_file(entry.path())?;
                        println!("removed {}", rel.display());
                    }
                }
            }
        }
    }
    if !stale.is_empty() {
        bail!("generated files are stale; run `cargo xtask codegen`:\n  {}", stale.join("\n  "));
    }
    if mode == Mode::Check {
        println!("generated files are up to date ({} files)", files.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_bundle_takes_the_librarys_test_binary_from_cargos_messages() {
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"kiln_agent"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"kiln-agent"},"profile":{"test":true},"executable":"/t/release/deps/kiln_agent-bin"}"#,
            "not json",
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"kiln_core"},"profile":{"test":true},"executable":"/t/release/deps/kiln_core-1"}"#,
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"kiln_agent"},"profile":{"test":true},"executable":"/t/release/deps/kiln_agent-2"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(test_executable(&messages, "kiln_agent"), Some(PathBuf::from("/t/release/deps/kiln_agent-2")));
        assert_eq!(test_executable(&messages, "kiln_sim"), None);
    }

    #[test]
    fn the_test_task_runs_the_workspace_unless_packages_are_named() {
        assert_eq!(nextest_args(&[]), ["nextest", "run", "--workspace"]);
        assert_eq!(
            nextest_args(&["--no-fail-fast", "gateway"]),
            ["nextest", "run", "--workspace", "--no-fail-fast", "gateway"]
        );
        assert_eq!(nextest_args(&["-p", "kiln-core"]), ["nextest", "run", "-p", "kiln-core"]);
        assert_eq!(nextest_args(&["--package=kiln"]), ["nextest", "run", "--package=kiln"]);
    }

    /// Fails when any generated file (CRDs or protobuf code) differs from what `cargo xtask codegen` would write.
    #[test]
    fn generated_files_are_up_to_date() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
        for (rel, contents) in generated(&root).unwrap() {
            let on_disk = fs::read_to_string(root.join(&rel)).unwrap_or_default();
            assert!(on_disk == contents, "{} is stale; run `cargo xtask codegen`", rel.display());
        }
    }
}
