//! The `kiln` binary as a user runs it (a separate process, built by cargo for this test).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{fs, process::Command};

use std::path::PathBuf;

use kiln_k8s_api::validate::expected_errors;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
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
            assert!(stdout.contains(want.message), "{}:\n  want: {}\n  got:  {stdout}", path.display(), want.message);
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
fn simulate_placement_writes_the_json_the_experiment_promises_and_names_bad_rows() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-placement-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let nodes = dir.join("nodes.csv");
    let pods = dir.join("pods.csv");
    let json = dir.join("out.json");
    let mut node_rows = String::from("sn,cpu_milli,memory_mib,gpu,model\n");
    for i in 0..20 {
        node_rows += &format!("n{i},64000,262144,{},G{}\n", if i % 2 == 0 { 8 } else { 2 }, i % 3);
    }
    fs::write(&nodes, node_rows).unwrap();
    fs::write(
        &pods,
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n\
         a,8000,16384,1,1000,\nb,4000,8192,1,500,\nc,2000,4096,0,0,\nd,16000,65536,8,1000,G0\ne,6000,8192,2,1000,G1|G2\n\
         f,100000,16384,1,1000,G1\n",
    )
    .unwrap();
    let out = kiln(&[
        "simulate",
        "placement",
        "--nodes",
        nodes.to_str().unwrap(),
        "--pods",
        pods.to_str().unwrap(),
        "--policy",
        "fgd,kiln",
        "--policy",
        "bestfit",
        "--seeds",
        "1-3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("GPU allocation ratio"), "{table}");
    assert!(!table.contains("(paper)"), "no published figures here, so no column says paper: {table}");
    // Pod f wants more CPU than any node has: counted as unscheduled, not an abort.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 pod(s) no node could ever hold") && stderr.contains("line(s) 7"), "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(value["unschedulable_pods"], 1);
    let policies = value["policies"].as_array().unwrap();
    let names: Vec<&str> = policies.iter().map(|p| p["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["fgd", "kiln", "bestfit"]);
    for p in policies {
        assert_eq!(p["seeds"], serde_json::json!([1, 2, 3]));
        for key in ["alloc_pct_median", "unallocated_pct_median", "frag_pct_median"] {
            for mark in ["90", "95", "100", "110", "130"] {
                let v = p[key][mark].as_f64().unwrap_or_else(|| panic!("{key}[{mark}] in {p}"));
                assert!((0.0..=100.0).contains(&v), "{key}[{mark}] = {v}");
            }
        }
        let alloc = p["alloc_pct_median"]["130"].as_f64().unwrap();
        let unalloc = p["unallocated_pct_median"]["130"].as_f64().unwrap();
        assert!((alloc + unalloc - 100.0).abs() < 0.02);
        assert!(p["decisions_per_sec"].as_f64().unwrap() > 0.0);
    }

    fs::write(
        &pods,
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\na,8000,16384,1,1000,\nb,4000,lots,1,500,\n",
    )
    .unwrap();
    let out = kiln(&["simulate", "placement", "--nodes", nodes.to_str().unwrap(), "--pods", pods.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pods.csv:3: memory_mib: \"lots\" is not a non-negative integer"), "{stderr}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn simulate_serving_is_deterministic_and_names_bad_trace_rows() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-serving-{}", std::process::id()));
    let traces = dir.join("servegen");
    fs::create_dir_all(&traces).unwrap();
    // Three synthetic ServeGen clients: a day of 10-minute windows, busy, periodic and sparse.
    for (client, rate) in [(0, 0.5), (1, 0.02), (2, 0.002)] {
        let rows: String = (0..144)
            .map(|w| {
                let r = if client == 1 && w % 6 != 0 { 0.0 } else { rate };
                if r == 0.0 {
                    format!("{},0,0,,0,0\n", w * 600)
                } else {
                    format!("{},{r},2.0,Gamma,0.25,1.0\n", w * 600)
                }
            })
            .collect();
        fs::write(traces.join(format!("chunk-{client}-trace.csv")), rows).unwrap();
    }
    let run = |json: &str| {
        let out = kiln(&[
            "simulate",
            "serving",
            "--servegen",
            traces.to_str().unwrap(),
            "--fleet",
            "h100-80gb:8x2",
            "--days",
            "1",
            "--keep-alive",
            "fixed:600s,fixed:90s,adaptive,oracle",
            "--json",
            dir.join(json).to_str().unwrap(),
            "--html",
            dir.join("report.html").to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        fs::read(dir.join(json)).unwrap()
    };
    let first = run("a.json");
    assert_eq!(first, run("b.json"), "the same seed gives byte-identical JSON");
    let json: serde_json::Value = serde_json::from_slice(&first).unwrap();
    let policies = json["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 4);
    for p in policies {
        for key in ["policy", "requests", "cold_starts", "cold_start_rate", "gpu_cost_usd", "wait_cost_usd"] {
            assert!(!p[key].is_null(), "{key} missing in {p}");
        }
        let cost = |p: &serde_json::Value, key: &str| p[key].as_f64().unwrap();
        assert!((cost(p, "total_cost_usd") - cost(p, "gpu_cost_usd") - cost(p, "wait_cost_usd")).abs() < 1e-6);
        let deployments = p["deployments"].as_array().unwrap();
        assert!(!deployments.is_empty());
        let sum: f64 = deployments.iter().map(|d| cost(d, "total_cost_usd")).sum();
        assert!((sum - cost(p, "total_cost_usd")).abs() < 1e-6, "{sum} vs {p}");
        for key in ["p50", "p95", "p99"] {
            assert!(p["latency_ms"][key].as_f64().unwrap() > 0.0);
        }
        for key in ["busy", "idle_warm", "loading"] {
            assert!(p["gpu_seconds"][key].as_f64().unwrap() >= 0.0);
        }
        assert!(p["requests"].as_u64().unwrap() > 100);
    }
    let html = fs::read_to_string(dir.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 4);

    // Past the traces' end: a warning with their real length, and the report says what was simulated.
    let out = kiln(&[
        "simulate",
        "serving",
        "--servegen",
        traces.to_str().unwrap(),
        "--fleet",
        "h100-80gb:8x2",
        "--days",
        "2",
        "--keep-alive",
        "fixed:90s",
        "--json",
        dir.join("c.json").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--days 2 goes past the traces, which hold 1.00 days"), "{stderr}");
    let json = fs::read_to_string(dir.join("c.json")).unwrap();
    assert!(json.contains("2 days (the traces hold 1.00 days: the rest has no requests)"), "{json}");

    // A malformed window: the error names the file, the line and the field.
    fs::write(traces.join("chunk-3-trace.csv"), "0,0,0,,0,0\n600,fast,0,,0,0\n").unwrap();
    let out = kiln(&["simulate", "serving", "--servegen", traces.to_str().unwrap(), "--keep-alive", "adaptive"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chunk-3-trace.csv:2: rate_req_per_s: \"fast\" is not a number"), "{stderr}");
    let out = kiln(&["simulate", "serving", "--servegen", traces.to_str().unwrap(), "--keep-alive", "lru"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected fixed:<duration> or adaptive"));
    fs::remove_dir_all(&dir).ok();
}

#[test]
fn simulate_serving_with_rentals_reports_revenue_fences_and_lending() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-rentals-{}", std::process::id()));
    let traces = dir.join("servegen");
    fs::create_dir_all(&traces).unwrap();
    // One busy client for six hours on two one-GPU nodes.
    let rows: String = (0..36).map(|w| format!("{},0.2,2.0,Gamma,0.25,1.0\n", w * 600)).collect();
    fs::write(traces.join("chunk-0-trace.csv"), rows).unwrap();
    // A GPU rented at once for 3 h, lent as the calendar says, and one fenced at 50 min for 4 h from 1 h (the
    // trace starts at 2026-01-01T00:00:00Z by default).
    let calendar = dir.join("calendar.yaml");
    fs::write(
        &calendar,
        "rentals:\n\
         - {namespace: t, name: lender, gpuModel: h100-80gb, count: 1, hours: 3, lendWhenIdle: true}\n\
         - {namespace: t, name: fenced, gpuModel: h100-80gb, count: 1, start: 2026-01-01T01:00:00Z, hours: 4}\n",
    )
    .unwrap();
    let run = |lending: &str| {
        let json = dir.join(format!("{lending}.json"));
        let out = kiln(&[
            "simulate",
            "serving",
            "--servegen",
            traces.to_str().unwrap(),
            "--fleet",
            "h100-80gb:1x2",
            "--model-sizes",
            "16",
            "--days",
            "0.25",
            "--keep-alive",
            "fixed:600s",
            "--rentals",
            calendar.to_str().unwrap(),
            "--rental-usd-per-gpu-hour",
            "3.10",
            "--lending",
            lending,
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains("rental $") && stdout.contains("cold starts after fences"), "{stdout}");
        let json: serde_json::Value = serde_json::from_slice(&fs::read(json).unwrap()).unwrap();
        json["policies"][0]["rentals"].clone()
    };
    let on = run("calendar");
    // 3 GPU-hours lent + 4 fenced, exactly, at $3.10.
    assert_eq!(on["revenue"]["rental_hours"], "21.70", "{on}");
    assert_eq!(on["stops"]["fenced"], 1, "{on}");
    assert!(on["lending_earned"] != "0.00", "{on}");
    assert_eq!(on["rentals"][0]["key"], "t/lender");
    let off = run("off");
    assert_eq!(off["revenue"]["rental_hours"], "21.70");
    assert_eq!((off["lending_earned"].as_str(), off["gpu_seconds"]["lent"].as_f64()), (Some("0.00"), Some(0.0)));
    // A bad calendar is refused whole, naming the rental.
    fs::write(&calendar, "rentals:\n- {namespace: t, name: x, gpuModel: a100, count: 1, hours: 1}\n").unwrap();
    let out =
        kiln(&["simulate", "serving", "--servegen", traces.to_str().unwrap(), "--rentals", calendar.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rental 1 (t/x): no GPU of model \"a100\" in the fleet"), "{stderr}");
    fs::remove_dir_all(&dir).ok();
}

#[test]
fn apply_puts_only_valid_manifests_into_the_watched_directory() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-apply-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let manifests = dir.join("manifests");
    let root = repo_root();
    let out = kiln(&[
        "apply",
        "-f",
        root.join("examples/invalid/modeldeployment-min-above-max.yaml").to_str().unwrap(),
        "--manifests",
        manifests.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("minReplicas must not be greater than maxReplicas") && stderr.contains("nothing applied"),
        "{stderr}"
    );
    assert!(!manifests.exists() || fs::read_dir(&manifests).unwrap().next().is_none(), "nothing written");
    let out = kiln(&[
        "apply",
        "-f",
        root.join("examples/modeldeployment-native.yaml").to_str().unwrap(),
        "--manifests",
        manifests.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ModelDeployment/mlp-demo applied"));
    assert_eq!(
        fs::read_to_string(manifests.join("modeldeployment-native.yaml")).unwrap(),
        fs::read_to_string(root.join("examples/modeldeployment-native.yaml")).unwrap()
    );
    let _ = fs::remove_dir_all(&dir);
}
