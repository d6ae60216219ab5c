//! `kiln apply -f FILE`, `kiln get` and `kiln usage`: conveniences for the manifest-directory mode of `kiln up`.
//! `apply` checks every document as the API server would and, only if all are valid, writes the file into the
//! watched directory (the controller picks it up within a second); `get` prints what the gateway's
//! `GET /kiln/v1/deployments` says; `usage` prints `GET /v1/usage` (or a monthly statement) as a table or CSV.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use kiln_k8s_api::validate::Validator;
use serde::Deserialize;
use serde_json::Value;

/// Validates `file` and copies it into `manifests` under its own name.
pub fn apply(file: &Path, manifests: &Path) -> Result<ExitCode> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let limit = kiln_controller::manifests::MAX_FLOW_DEPTH;
    if let Some((document, line)) = kiln_controller::manifests::too_deep(&text, limit) {
        bail!("{}: document {document}: nested deeper than {limit} levels at line {line}", file.display());
    }
    let validator = Validator::default();
    let mut applied = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("document {}: not valid YAML: {e}", index + 1));
                break;
            }
        };
        match validator.validate(&value) {
            Ok(()) => applied.push(format!(
                "{}/{}",
                value["kind"].as_str().unwrap_or_default(),
                value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
            )),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{}: {e}", file.display());
        }
        eprintln!("nothing applied");
        return Ok(ExitCode::FAILURE);
    }
    if applied.is_empty() {
        bail!("{}: no document to apply", file.display());
    }
    fs::create_dir_all(manifests).with_context(|| format!("creating {}", manifests.display()))?;
    let name = file.file_name().context("the file has no name")?;
    let mut target = manifests.join(name);
    if target.extension().is_none_or(|e| e != "yaml" && e != "yml") {
        target.set_extension("yaml");
    }
    fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    for a in applied {
        println!("{a} applied ({})", target.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The key to call the gateway with: `key`, else the operator key of `keys_file`, else its first key.
fn pick_key(key: Option<String>, keys_file: &Path) -> Result<String> {
    match key {
        Some(k) => Ok(k),
        None => {
            let keys = crate::up::read_keys(keys_file)
                .with_context(|| format!("no --key given (or KILN_API_KEY), and {}", keys_file.display()))?;
            let chosen = keys.iter().find(|k| k.namespace == kiln_controller::gateway::OPERATOR).or(keys.first());
            chosen.map(|k| k.key.clone()).with_context(|| format!("{} holds no key", keys_file.display()))
        }
    }
}

/// `GET path` on the gateway at `server` (`host:port`) with `key`, accepting `accept`: the body of a 200, else
/// an error with the status and the gateway's message.
fn gateway_get(server: &str, path: &str, key: &str, accept: &str) -> Result<String> {
    let address = server.trim_start_matches("http://").trim_end_matches('/');
    let mut stream =
        TcpStream::connect(address).with_context(|| format!("connecting to {address} (is `kiln up` running?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).context("a malformed HTTP response")?;
    if status != "200" {
        let detail = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        bail!("GET {path}: HTTP {status}: {detail}");
    }
    Ok(body.to_owned())
}

/// Prints the deployments and nodes of the gateway at `server` (`host:port`), as `key` (else the operator key of
/// `keys_file`, else its first key) may see them.
/// A JSON value as a table cell: strings without quotes, null as `-` (`Value`'s `Display` ignores widths).
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

pub fn get(server: &str, key: Option<String>, keys_file: &Path) -> Result<ExitCode> {
    let key = pick_key(key, keys_file)?;
    let body = gateway_get(server, "/kiln/v1/deployments", &key, "application/json")?;
    let state: Value = serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
    println!(
        "{:<32} {:>7} {:>7} {:>7} {:>8} {:>7}  NOTE",
        "DEPLOYMENT", "READY", "LOADING", "DESIRED", "INFLIGHT", "WAITING"
    );
    for d in state["deployments"].as_array().into_iter().flatten() {
        let note = match &d["degraded"] {
            Value::Object(f) => format!(
                "start failed ({}): {}; next start in {} s",
                f["reason"].as_str().unwrap_or_default(),
                f["message"].as_str().unwrap_or_default(),
                f["nextStartInSeconds"]
            ),
            _ => d["unschedulable"].as_str().unwrap_or_default().to_owned(),
        };
        println!(
            "{:<32} {:>7} {:>7} {:>7} {:>8} {:>7}  {}",
            d["name"].as_str().unwrap_or_default(),
            cell(&d["replicas"]["ready"]),
            cell(&d["replicas"]["loading"]),
            cell(&d["replicas"]["desired"]),
            cell(&d["inFlight"]),
            cell(&d["waiting"]),
            note
        );
    }
    for e in state["invalid"].as_array().into_iter().flatten() {
        let what = e["file"].as_str().or(e["deployment"].as_str()).unwrap_or_default();
        println!("invalid: {what}: {}", e["error"].as_str().unwrap_or_default());
    }
    println!();
    println!("{:<32} {:>6} {:>6} {:>10}", "NODE", "READY", "GPUS", "SIMULATED");
    for n in state["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<32} {:>6} {:>6} {:>10}",
            n["name"].as_str().unwrap_or_default(),
            cell(&n["ready"]),
            cell(&n["gpus"]),
            cell(&n["simulated"])
        );
    }
    let body = gateway_get(server, "/kiln/v1/rentals", &key, "application/json")?;
    let rentals: Value = serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
    let rentals = rentals["rentals"].as_array().cloned().unwrap_or_default();
    if !rentals.is_empty() {
        println!();
        println!(
            "{:<32} {:<10} {:>4} {:>5} {:<26} {:>8} {:<20}  NOTE",
            "RENTAL", "PHASE", "GPUS", "HELD", "MODEL", "BILLED-H", "ENDS"
        );
        for r in &rentals {
            let ends = r["end_at"]
                .as_f64()
                .and_then(|t| jiff::Timestamp::from_second(t.floor() as i64).ok())
                .map_or_else(|| "-".to_owned(), |t| t.to_string());
            let mut note = r["message"].as_str().unwrap_or_default().to_owned();
            for (flag, word) in [("degraded", "degraded"), ("expiring_soon", "expiring soon"), ("lent", "lent")] {
                if r[flag] == true {
                    note = format!("{word}; {note}");
                }
            }
            println!(
                "{:<32} {:<10} {:>4} {:>5} {:<26} {:>8} {:<20}  {}",
                r["key"].as_str().unwrap_or_default(),
                r["phase"].as_str().unwrap_or_default(),
                cell(&r["count"]),
                r["gpus"].as_array().map_or(0, Vec::len),
                r["gpu_model"].as_str().unwrap_or_default(),
                cell(&r["billed_gpu_hours"]),
                ends,
                note
            );
        }
    }
    // The usage ledger is an operator's view: a tenant's key gets 403, and the section is left out.
    if let Ok(body) = gateway_get(server, "/kiln/v1/ledger", &key, "application/json") {
        let l: Value = serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
        println!();
        match l["kind"].as_str() {
            Some("raft") => {
                println!(
                    "{:<8} {:>7} {:>6} {:>6} {:>10} {:>10} {:>9} {:>10} {:>9}",
                    "LEDGER", "REPLICA", "TERM", "LEADER", "COMMIT", "APPLIED", "RECORDS", "LOG-BYTES", "SNAPSHOTS"
                );
                println!(
                    "{:<8} {:>7} {:>6} {:>6} {:>10} {:>10} {:>9} {:>10} {:>9}",
                    "raft",
                    cell(&l["replica"]),
                    cell(&l["term"]),
                    cell(&l["leader"]),
                    cell(&l["commitIndex"]),
                    cell(&l["appliedIndex"]),
                    cell(&l["records"]),
                    cell(&l["log"]["bytes"]),
                    cell(&l["snapshots"])
                );
            }
            _ => {
                println!("LEDGER  {}: {}", l["kind"].as_str().unwrap_or("?"), l["detail"].as_str().unwrap_or_default())
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln usage`: metered GPU usage and what it costs, from the gateway's `GET /v1/usage`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UsageArgs {
    #[command(subcommand)]
    what: Option<UsageWhat>,
    #[command(flatten)]
    common: UsageCommon,
    /// Start of the range: an RFC 3339 time or a UTC date (default: the start of this month).
    #[arg(long)]
    from: Option<String>,
    /// End of the range: an RFC 3339 time or a UTC date, that day included (default: the end of this month).
    #[arg(long)]
    to: Option<String>,
    /// Group by `deployment`, `rental`, `phase`, `day`, `namespace`, `subject` or `gpu_model`.
    #[arg(long, default_value = "subject")]
    group_by: String,
}

/// What `kiln usage` and `kiln usage statement` share.
#[derive(Debug, Clone, clap::Args)]
struct UsageCommon {
    /// The gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: String,
    /// The API key (a tenant's reads its namespace; an operator's any). Default: `$KILN_API_KEY`, else the operator
    /// key of `.kiln/api-keys.yaml`, else its first key.
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    key: Option<String>,
    /// The keys file to take the key from when none is given.
    #[arg(long, default_value = ".kiln/api-keys.yaml")]
    keys_file: std::path::PathBuf,
    /// The tenant (default: the key's own; with an operator key, every namespace).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Print CSV instead of a table.
    #[arg(long)]
    csv: bool,
}

#[derive(Debug, clap::Subcommand)]
enum UsageWhat {
    /// A tenant's monthly statement: line items and totals.
    Statement {
        #[command(flatten)]
        common: UsageCommon,
        /// The month, `YYYY-MM` (default: this month).
        #[arg(long)]
        month: Option<String>,
    },
}

/// A query string of the parameters that are set, escaped.
fn query(params: &[(&str, Option<&str>)]) -> String {
    let escape = |v: &str| {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' | b'+' => {
                    (b as char).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect::<String>()
    };
    let set: Vec<String> = params.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", escape(v)))).collect();
    if set.is_empty() { String::new() } else { format!("?{}", set.join("&")) }
}

/// Prints usage or a statement.
pub fn usage(args: &UsageArgs) -> Result<ExitCode> {
    let (common, path) = match &args.what {
        None => {
            let c = &args.common;
            let q = query(&[
                ("namespace", c.namespace.as_deref()),
                ("from", args.from.as_deref()),
                ("to", args.to.as_deref()),
                ("group_by", Some(&args.group_by)),
            ]);
            (c, format!("/v1/usage{q}"))
        }
        Some(UsageWhat::Statement { common, month }) => {
            let q = query(&[("namespace", common.namespace.as_deref()), ("month", month.as_deref())]);
            (common, format!("/v1/usage/statement{q}"))
        }
    };
    let key = pick_key(common.key.clone(), &common.keys_file)?;
    if common.csv {
        print!("{}", gateway_get(&common.server, &path, &key, "text/csv")?);
        return Ok(ExitCode::SUCCESS);
    }
    let body = gateway_get(&common.server, &path, &key, "application/json")?;
    let value: Value = serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
    print!("{}", if args.what.is_some() { statement_table(&value) } else { usage_table(&value) });
    Ok(ExitCode::SUCCESS)
}

/// Rows as aligned columns: the first left-aligned, the others right-aligned, two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..n).map(|i| rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| if i == 0 { format!("{c:<w$}", w = widths[i]) } else { format!("{c:>w$}", w = widths[i]) })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `GET /v1/usage`'s JSON as a table: a row per group, then the total.
fn usage_table(u: &Value) -> String {
    let currency = text(&u["currency"]);
    let mut rows = vec![vec![
        text(&u["group_by"]).to_uppercase(),
        "RECORDS".into(),
        "GPU-SECONDS".into(),
        "GPU-HOURS".into(),
        "CHARGES".into(),
        "CREDITS".into(),
        format!("AMOUNT ({currency})"),
    ]];
    let row = |key: String, t: &Value| {
        vec![
            key,
            text(&t["records"]),
            text(&t["gpu_seconds"]),
            text(&t["gpu_hours"]),
            text(&t["charges"]),
            text(&t["credits"]),
            text(&t["amount"]),
        ]
    };
    for g in u["groups"].as_array().into_iter().flatten() {
        rows.push(row(text(&g["key"]), g));
    }
    rows.push(row("TOTAL".into(), &u["total"]));
    let scope = match &u["namespace"] {
        Value::String(ns) => format!("namespace {ns}"),
        _ => "every namespace".into(),
    };
    format!("{scope}, {} to {}\n{}", text(&u["from"]), text(&u["to"]), columns(&rows))
}

/// A statement's JSON as a table: its line items, then charges, credits and the total.
fn statement_table(s: &Value) -> String {
    let currency = text(&s["currency"]);
    let mut rows = vec![vec![
        "SUBJECT".into(),
        "KIND".into(),
        "GPU MODEL".into(),
        "GPU-SECONDS".into(),
        "GPU-HOURS".into(),
        format!("AMOUNT ({currency})"),
    ]];
    for i in s["items"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&i["subject"]),
            text(&i["kind"]),
            text(&i["gpu_model"]),
            text(&i["gpu_seconds"]),
            text(&i["gpu_hours"]),
            text(&i["amount"]),
        ]);
    }
    for label in ["charges", "credits", "total"] {
        let mut r = vec![label.to_uppercase(), String::new(), String::new(), String::new(), String::new()];
        r.push(text(&s[label]));
        rows.push(r);
    }
    format!("statement of {} for {}\n{}", text(&s["namespace"]), text(&s["month"]), columns(&rows))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn usage_prints_aligned_columns_and_a_total() {
        let u = json!({
            "namespace": "demo", "from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z", "group_by": "phase",
            "currency": "USD",
            "groups": [
                {"key": "busy", "records": 2, "gpu_seconds": "45", "gpu_hours": 0, "charges": "0.045", "credits": "0.00", "amount": "0.045"},
                {"key": "idle-warm", "records": 1, "gpu_seconds": "15.5", "gpu_hours": 0, "charges": "0.0155", "credits": "0.00", "amount": "0.0155"}
            ],
            "total": {"records": 3, "gpu_seconds": "60.5", "gpu_hours": 0, "charges": "0.0605", "credits": "0.00", "amount": "0.0605"}
        });
        let table = usage_table(&u);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "namespace demo, 2026-11-01T00:00:00Z to 2026-12-01T00:00:00Z");
        assert_eq!(lines[1], "PHASE      RECORDS  GPU-SECONDS  GPU-HOURS  CHARGES  CREDITS  AMOUNT (USD)");
        assert_eq!(lines[2], "busy             2           45          0    0.045     0.00         0.045");
        assert_eq!(lines[4], "TOTAL            3         60.5          0   0.0605     0.00        0.0605");
        // Every row is as wide as the header: the columns line up.
        assert!(lines[1..].iter().all(|l| l.len() == lines[1].len()), "{table}");
    }

    #[test]
    fn statements_print_items_then_totals_and_queries_are_escaped() {
        let s = json!({
            "namespace": "demo", "month": "2026-11", "currency": "EUR", "charges": "1.50", "credits": "-0.25", "total": "1.25",
            "items": [{"subject": "rental/r1", "kind": "rental-hours", "gpu_model": "NVIDIA H100 80GB HBM3", "gpu_seconds": "0", "gpu_hours": 1, "amount": "1.50"}]
        });
        let table = statement_table(&s);
        assert!(table.starts_with("statement of demo for 2026-11\nSUBJECT "), "{table}");
        assert!(table.lines().last().unwrap().starts_with("TOTAL") && table.ends_with(" 1.25\n"), "{table}");
        assert_eq!(
            query(&[("namespace", Some("a b")), ("from", None), ("to", Some("2026-11-01T00:00:00+01:00"))]),
            "?namespace=a%20b&to=2026-11-01T00:00:00+01:00"
        );
    }
}
