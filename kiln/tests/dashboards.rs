//! The Grafana dashboards the chart ships (`charts/kiln/dashboards/*.json`): each parses as a dashboard, and every
//! metric a panel queries is one the binaries register — the controller's families
//! (`kiln_controller::metrics::Metrics::families`, recorded as they are registered) and the agent's
//! (`kiln_agent::metrics::FAMILIES`, checked against a fully populated page in the agent's tests), with the series
//! names Prometheus sees (`_total` for counters; `_bucket`, `_sum`, `_count` for histograms).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde_json::Value;

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kiln/dashboards");
    let mut out: Vec<(PathBuf, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every PromQL expression of a dashboard: panel targets and query variables.
fn expressions(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            out.push(v["query"]["query"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// PromQL's words that are not metric names.
const WORDS: &[&str] = &[
    "sum",
    "avg",
    "max",
    "min",
    "count",
    "rate",
    "increase",
    "irate",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "label_values",
    "topk",
    "bottomk",
    "abs",
    "delta",
    "deriv",
    "time",
    "vector",
    "scalar",
];

/// The metric names an expression reads: its identifiers, less label matchers (`{...}`), ranges (`[...]`), grouping
/// label lists (`by (...)`), strings, numbers and PromQL's own words.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut depth_brace, mut depth_bracket) = (0, 0, 0);
    let mut grouping = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            '"' => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += 1;
                }
            }
            ')' if grouping => grouping = false,
            c if c.is_ascii_digit() && depth_brace == 0 && depth_bracket == 0 => {
                while i + 1 < chars.len() && (chars[i + 1].is_ascii_alphanumeric() || "._-".contains(chars[i + 1])) {
                    i += 1;
                }
            }
            c if (c.is_ascii_alphabetic() || c == '_' || c == ':') && depth_brace == 0 && depth_bracket == 0 => {
                let start = i;
                while i + 1 < chars.len() && (chars[i + 1].is_ascii_alphanumeric() || "_:".contains(chars[i + 1])) {
                    i += 1;
                }
                let word: String = chars[start..=i].iter().collect();
                if word == "by" || word == "without" {
                    grouping = true;
                } else if !grouping && !WORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => {}
        }
        i += 1;
    }
    // `label_values(metric, label)`: the label is not a metric.
    if let Some(args) = expr.strip_prefix("label_values(")
        && let Some((_, label)) = args.trim_end_matches(')').rsplit_once(',')
    {
        names.remove(label.trim());
    }
    names
}

/// The series names of every family the controller and the agent register.
fn registered() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for &(name, kind) in kiln_controller::metrics::Metrics::new().families() {
        match kind.as_str() {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names.extend(kiln_agent::metrics::FAMILIES.iter().map(|n| (*n).to_owned()));
    names
}

#[test]
fn the_expression_reader_finds_metrics_and_nothing_else() {
    let e = r#"histogram_quantile(0.95, sum by (deployment, le) (rate(kiln_x_bucket{deployment=~"$d",a!="b"}[5m])))"#;
    assert_eq!(metrics_in(e), BTreeSet::from(["kiln_x_bucket".to_owned()]));
    let e = r#"sum(rate(a_total{phase="idle-warm"}[1h])) / clamp_min(sum(rate(b_total[1h])), 1e-9)"#;
    assert_eq!(metrics_in(e), BTreeSet::from(["a_total".to_owned(), "b_total".to_owned()]));
    assert_eq!(
        metrics_in("label_values(DCGM_FI_DEV_GPU_UTIL, Hostname)"),
        BTreeSet::from(["DCGM_FI_DEV_GPU_UTIL".to_owned()])
    );
}

#[test]
fn every_dashboard_parses_and_queries_only_metrics_the_binaries_register() {
    let dashboards = dashboards();
    assert_eq!(dashboards.len(), 3, "fleet, deployments, billing");
    for (path, d) in &dashboards {
        assert!(d["uid"].as_str().is_some_and(|u| u.starts_with("kiln-")), "{}", path.display());
        assert!(!d["panels"].as_array().unwrap().is_empty(), "{}", path.display());
    }

    let names = registered();
    assert!(names.contains("DCGM_FI_DEV_GPU_UTIL") && names.contains("kiln_billed_amount_total"), "{names:?}");
    assert!(names.contains("kiln_gateway_request_duration_seconds_bucket"), "{names:?}");

    let mut missing = Vec::new();
    for (path, d) in &dashboards {
        for e in expressions(d) {
            for m in metrics_in(&e) {
                if !names.contains(&m) {
                    missing.push(format!("{}: {m} (in {e})", path.file_name().unwrap().to_string_lossy()));
                }
            }
        }
    }
    assert!(missing.is_empty(), "queried but not exported:\n{}", missing.join("\n"));
}
