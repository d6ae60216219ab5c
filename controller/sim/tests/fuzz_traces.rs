//! Fuzzing of the trace parsers (`traces::{parse_servegen, parse_azure}`, `openb::{parse_nodes, parse_pods}`) with
//! proptest: arbitrary text, and real-looking files (the shapes of `../shared/data`) with cells replaced by hostile
//! tokens, lines dropped, duplicated or cut. Properties: no panic; a parse either succeeds with
//! sane values or fails with an error naming the file, a line of the text and a field.
//!
//! CI runs a bounded number of cases per target (256). Run longer locally (release mode is ~10x faster):
//! `KILN_FUZZ_CASES=200000 cargo test --release -p kiln-sim --test fuzz_traces`.

use kiln_core::placement::Cluster;
use kiln_sim::{
    openb::{TraceError, parse_nodes, parse_pods},
    traces::{parse_azure, parse_servegen},
};
use proptest::prelude::*;

/// Cases per property: `KILN_FUZZ_CASES` or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() }
}

const SERVEGEN: &str = "0,0,0,,0,0\n600,0.5,2.2,Gamma,0.2,0.17\n1200,1.5,6.0,Weibull,0.35,0.01\n1800,0,0,,0,0\n";
const AZURE: &str = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n\
                     2023-11-16 18:15:50.0,396,109\n2023-11-17 00:00:00,1,1\n";
const NODES: &str = "sn,cpu_milli,memory_mib,gpu,model\nopenb-node-0000,64000,262144,2,P100\n\
                     openb-node-0001,96000,786432,8,G2\nopenb-node-0002,32000,262144,0,\n";
const PODS: &str = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n\
                    openb-pod-0000,12000,16384,1,1000,,LS,Running,0,12537496,0\n\
                    openb-pod-0001,6000,12288,1,460,,LS,Running,427061,12902960,427061\n\
                    openb-pod-0002,8000,30517,0,0,,BE,Running,11811762,11827364,11811762\n\
                    openb-pod-0003,12000,16384,8,1000,G2,LS,Running,0,1,0\n\
                    openb-pod-0004,1000,10,1,1000,P100|G2,LS,Running,0,1,0\n";

/// Cell values that break parsers: huge, negative, non-finite, empty, odd Unicode, odd dates.
fn hostile_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("-1".to_owned()),
        Just("NaN".to_owned()),
        Just("inf".to_owned()),
        Just("-inf".to_owned()),
        Just("1e400".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("340282366920938463463374607431768211456".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("255".to_owned()),
        Just("256".to_owned()),
        Just("65536".to_owned()),
        Just("Gamma".to_owned()),
        Just("Weibull".to_owned()),
        Just("P100|P100|G2|".to_owned()),
        Just("|".to_owned()),
        Just("9999999999999999999-01-01 00:00:00".to_owned()),
        Just("99999999999-12-31 23:59:60.999".to_owned()),
        Just("2023-02-31 -1:-1:-1".to_owned()),
        Just("2023-11-16 18:15:46.".to_owned()),
        Just("0000-00-00 00:00:00".to_owned()),
        Just("\u{feff}0".to_owned()),
        Just("é\u{0}".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        (any::<i64>(), 0i64..14, 0i64..33, -2i64..25, -2i64..61, -1.0f64..62.0)
            .prop_map(|(y, mo, d, h, mi, s)| format!("{y}-{mo:02}-{d:02} {h:02}:{mi:02}:{s}")),
        (0u32..64, 1i64..13).prop_map(|(bits, mo)| format!("{}-{mo}-01 00:00:00", 1u64 << bits)),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "[ -~]{0,12}",
        "\\PC{0,8}",
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace cell `col` of line `line` (both modulo what exists).
    Cell(usize, usize, String),
    DropLine(usize),
    DuplicateLine(usize),
    /// Cut the text at a byte position (moved back to a char boundary).
    Truncate(usize),
    InsertLine(usize, String),
    AddCells(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<usize>(), hostile_token()).prop_map(|(l, c, t)| Mutation::Cell(l, c, t)),
        1 => any::<usize>().prop_map(Mutation::DropLine),
        1 => any::<usize>().prop_map(Mutation::DuplicateLine),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), "\\PC{0,40}").prop_map(|(l, s)| Mutation::InsertLine(l, s)),
        1 => (any::<usize>(), 1usize..4).prop_map(|(l, n)| Mutation::AddCells(l, n)),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match m {
            Mutation::Cell(l, c, token) => {
                let mut cells: Vec<String> = lines[l % n].split(',').map(str::to_owned).collect();
                let c = c % cells.len();
                cells[c] = token.clone();
                lines[l % n] = cells.join(",");
            }
            Mutation::DropLine(l) => {
                lines.remove(l % n);
            }
            Mutation::DuplicateLine(l) => {
                let line = lines[l % n].clone();
                lines.insert(l % n, line);
            }
            Mutation::Truncate(at) => {
                let mut joined = lines.join("\n");
                let mut at = at % (joined.len() + 1);
                while !joined.is_char_boundary(at) {
                    at -= 1;
                }
                joined.truncate(at);
                lines = joined.lines().map(str::to_owned).collect();
            }
            Mutation::InsertLine(l, s) => lines.insert(l % (n + 1), s.clone()),
            Mutation::AddCells(l, k) => lines[l % n].push_str(&",".repeat(*k)),
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// The error names `file`, a line that exists (or the one after the last, for "no rows"), and a field.
fn check_error(e: &TraceError, file: &str, text: &str) {
    assert_eq!(e.file, file);
    assert!(e.line >= 1 && e.line <= text.lines().count() + 1, "line {} of a {}-line text: {e}", e.line, {
        text.lines().count()
    });
    assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
    assert!(e.to_string().starts_with(&format!("{file}:{}: {}: ", e.line, e.field)), "{e}");
}

fn check_servegen(text: &str) {
    match parse_servegen("s.csv", text) {
        Ok(windows) => {
            assert!(!windows.is_empty());
            for w in &windows {
                assert!(w.start_s.is_finite() && w.start_s >= 0.0 && w.rate.is_finite() && w.rate >= 0.0, "{w:?}");
            }
            assert!(windows.windows(2).all(|p| p[0].start_s < p[1].start_s));
        }
        Err(e) => check_error(&e, "s.csv", text),
    }
}

fn check_azure(text: &str) {
    match parse_azure("a.csv", text) {
        Ok(requests) => {
            assert!(!requests.is_empty());
            assert_eq!(requests[0].at_s, 0.0);
            for r in &requests {
                assert!(r.at_s.is_finite() && r.at_s >= 0.0, "{r:?}");
            }
            assert!(requests.windows(2).all(|p| p[0].at_s <= p[1].at_s));
        }
        Err(e) => check_error(&e, "a.csv", text),
    }
}

fn check_openb(nodes_text: &str, pods_text: &str) {
    let nodes = match parse_nodes("nodes.csv", nodes_text) {
        Ok(nodes) => nodes,
        Err(e) => return check_error(&e, "nodes.csv", nodes_text),
    };
    // A node list that parses may still not make a cluster (no nodes, duplicate names): that is an error too.
    let Ok(cluster) = Cluster::new(&nodes) else { return };
    match parse_pods("pods.csv", pods_text, &cluster) {
        Ok(list) => {
            // Exactly the pods no node could ever hold are named, and a run over them places none of those.
            let infeasible = list.pods.iter().filter(|p| !cluster.could_ever_hold(p)).count();
            assert_eq!(infeasible, list.infeasible_lines.len());
            let workload = kiln_core::placement::Workload::from_requests(&list.pods);
            let run = kiln_sim::experiment::run_seed(
                &cluster,
                &list.pods,
                &workload,
                kiln_core::placement::Policy::Kiln,
                1,
                1.0,
            );
            let arrived = kiln_sim::experiment::arrival_order(&list.pods, cluster.gpu_capacity_milli().max(1), 1, 1.0);
            assert!(run.placed as usize <= arrived.len());
            if infeasible == list.pods.len() {
                assert_eq!(run.placed, 0, "only pods no node could hold arrived");
            }
        }
        Err(e) => check_error(&e, "pods.csv", pods_text),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn servegen_arbitrary_text(text in "\\PC{0,200}") {
        check_servegen(&text);
    }

    #[test]
    fn servegen_mutated(mutations in prop::collection::vec(mutation(), 1..6)) {
        check_servegen(&mutate(SERVEGEN, &mutations));
    }

    #[test]
    fn azure_arbitrary_text(text in "\\PC{0,200}") {
        check_azure(&text);
        check_azure(&format!("TIMESTAMP,ContextTokens,GeneratedTokens\n{text}"));
    }

    #[test]
    fn azure_mutated(mutations in prop::collection::vec(mutation(), 1..6)) {
        check_azure(&mutate(AZURE, &mutations));
    }

    #[test]
    fn openb_arbitrary_text(nodes in "\\PC{0,200}", pods in "\\PC{0,200}") {
        check_openb(&nodes, &pods);
        check_openb(NODES, &format!("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n{pods}"));
    }

    #[test]
    fn openb_mutated(
        node_mutations in prop::collection::vec(mutation(), 0..4),
        pod_mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        check_openb(&mutate(NODES, &node_mutations), &mutate(PODS, &pod_mutations));
    }
}

/// Found by `azure_mutated`: a year past ~2.9e11 overflowed the seconds computation (a panic in debug builds,
/// a wrapped, wrong time in release); negative hours and minutes were accepted.
#[test]
fn azure_timestamps_out_of_range_are_line_errors() {
    let h = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
    for bad in [
        "9999999999999999999-01-01 00:00:00",
        "300000000000-01-01 00:00:00",
        "99999-12-31 23:59:59",
        "2023-11-16 -1:-5:00",
    ] {
        let err = parse_azure("a.csv", &format!("{h}{bad},1,1\n")).unwrap_err().to_string();
        assert!(err.starts_with("a.csv:2: TIMESTAMP: "), "{bad}: {err}");
    }
}
