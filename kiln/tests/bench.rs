//! `kiln bench gateway` runs its parties in processes of their own and reports CPU per request: checked on a short,
//! slow run (the figures themselves are measured by hand on an idle machine, not in tests).

use std::process::Command;

/// The number after `label` on the line that starts with it (the median of the rounds).
fn figure(text: &str, line_start: &str, column: usize) -> f64 {
    let line = text.lines().find(|l| l.starts_with(line_start)).unwrap_or_else(|| panic!("no {line_start:?}: {text}"));
    let rest = &line[line_start.len()..];
    let value = rest.split_whitespace().filter(|w| !w.starts_with('[')).nth(column).unwrap_or_else(|| panic!("{line}"));
    value.parse().unwrap_or_else(|_| panic!("not a number in {line:?}"))
}

#[test]
fn the_gateway_bench_reports_latency_and_cpu_per_request_for_each_path() {
    // Over either hop to the replica: the worker port's HTTP/1.1 predict route, or gRPC.
    for (hop, says) in [("http1", "HTTP/1.1 predict route"), ("grpc", "WorkerService.Predict over gRPC")] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["bench", "gateway", "--rps", "100", "--seconds", "1", "--runs", "1", "--no-sweep", "--no-nginx"])
            .args(["--hop", hop])
            .args(if hop == "http1" { &[][..] } else { &["--no-floor"][..] })
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(says), "{text}");
        // p50 of each path, then the gateway's CPU: positive, and the replica's too (its own process).
        assert!(figure(&text, "direct to the replica (HTTP)", 0) > 0.0, "{text}");
        assert!(figure(&text, "through the kiln gateway (HTTP -> worker)", 0) > 0.0, "{text}");
        let cpu = text.split("CPU per request, microseconds").nth(1).unwrap_or_else(|| panic!("{text}"));
        let line = cpu.lines().find(|l| l.starts_with("through the kiln gateway")).unwrap_or_else(|| panic!("{text}"));
        let numbers: Vec<f64> = line
            .trim_start_matches("through the kiln gateway (HTTP -> worker)")
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(numbers.len(), 2, "proxy and replica CPU per request: {line}");
        assert!(numbers.iter().all(|us| *us > 0.0 && us.is_finite()), "{line}");
        assert!(text.contains("reference proxy: none"), "{text}");
        // The floor (the HTTP stack without the gateway's work) is measured beside it, once per hop is enough.
        if hop == "http1" {
            assert!(figure(&text, "through kiln's HTTP stack alone (floor)", 0) > 0.0, "{text}");
            let own =
                text.lines().find(|l| l.starts_with("the gateway's own work")).unwrap_or_else(|| panic!("{text}"));
            let us: f64 = own.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or_else(|| panic!("{own}"));
            assert!(us.is_finite(), "{own}");
        }
        assert!(text.contains("by thread"), "{text}");
    }
}
