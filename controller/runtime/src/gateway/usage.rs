//! The usage read side: `GET /v1/usage` (sums of the ledger's records, grouped) and `GET /v1/usage/statement` (a
//! tenant's monthly statement), JSON or, with `Accept: text/csv`, CSV. Reads the gateway's
//! [`Billing`](crate::billing::Billing) service; decides nothing about amounts (the records carry them) and
//! writes nothing.
//!
//! - `GET /v1/usage?namespace=&from=&to=&group_by=`: `from`/`to` are RFC 3339 times (`2026-11-01T00:00:00Z`) or
//!   UTC dates (`2026-11-01`; a date `to` includes that day); default: the current UTC month. A record is counted
//!   in the range its period *starts* in. `group_by` is `deployment`, `rental`, `phase`, `day`, `namespace`,
//!   `subject` or `gpu_model` (default `subject`). Amounts and GPU-seconds are exact decimal strings.
//! - `GET /v1/usage/statement?namespace=&month=YYYY-MM` (default: the current month): line items per deployment
//!   or rental, kind and GPU model, and `charges`, `credits` and `total` (exactly the sum of the items).
//! - Auth: a tenant's key reads its own namespace only (naming another is a 403 that says nothing about it,
//!   whether it exists or not); an operator's key reads every namespace (`/v1/usage` without `namespace` sums
//!   them all) or any one. Unknown parameters and malformed values are 400s that say what is wrong; a gateway
//!   without prices (billing off) answers 501.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Json,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use kiln_core::{
    billing::{BillingError, GroupBy, Query, Statement, Totals, month_bounds_ms, utc_day},
    money::format_fixed,
};
use serde_json::{Value, json};

use super::{Backend, Caller, Gateway, routes::problem};

/// The parameters of a query string, percent-decoded (`+` stays `+`, so `+01:00` offsets need no escaping).
fn params(uri: &Uri) -> Result<Vec<(String, String)>, String> {
    let Some(query) = uri.query() else { return Ok(Vec::new()) };
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte =
                hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| format!("bad escape in {s:?}"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

/// Milliseconds since the Unix epoch of `text`: an RFC 3339 time, or a UTC date (its midnight; with `end_of_day`
/// the next midnight, so a date `to` includes the day).
fn parse_time(name: &str, text: &str, end_of_day: bool) -> Result<i64, String> {
    let bad = || format!("{name}={text:?} is neither an RFC 3339 time (2026-11-01T00:00:00Z) nor a date (2026-11-01)");
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t.as_millisecond());
    }
    let date: jiff::civil::Date = text.parse().map_err(|_| bad())?;
    let midnight: jiff::Timestamp = format!("{date}T00:00:00Z").parse().map_err(|_| bad())?;
    Ok(midnight.as_millisecond() + if end_of_day { 86_400_000 } else { 0 })
}

/// `YYYY-MM` as (year, month).
fn parse_month(text: &str) -> Result<(i64, u32), String> {
    let bad = || format!("month={text:?} is not a month such as 2026-11");
    let (y, m) = text.split_once('-').ok_or_else(bad)?;
    let (year, month): (i64, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if y.len() != 4 || m.len() != 2 || !(1..=12).contains(&month) {
        return Err(bad());
    }
    Ok((year, month))
}

/// The current UTC month as (year, month).
fn this_month() -> (i64, u32) {
    let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let day = utc_day(ms);
    parse_month(&day[..7]).unwrap_or((1970, 1))
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

fn group_by(text: &str) -> Result<GroupBy, String> {
    Ok(match text {
        "deployment" => GroupBy::Deployment,
        "rental" => GroupBy::Rental,
        "phase" => GroupBy::Phase,
        "day" => GroupBy::Day,
        "namespace" => GroupBy::Namespace,
        "subject" => GroupBy::Subject,
        "gpu_model" => GroupBy::GpuModel,
        other => {
            return Err(format!(
                "group_by={other:?}: expected deployment, rental, phase, day, namespace, subject or gpu_model"
            ));
        }
    })
}

fn gpu_seconds(t: &Totals) -> String {
    format_fixed(i128::from(t.micro_gpu_seconds), 6, 0)
}

fn totals_json(t: &Totals) -> Value {
    json!({
        "records": t.records,
        "gpu_seconds": gpu_seconds(t),
        "gpu_hours": t.gpu_hours,
        "charges": t.charges.to_string(),
        "credits": t.credits.to_string(),
        "amount": t.amount.to_string(),
    })
}

fn wants_csv(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("text/csv"))
}

fn csv(body: String) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    response
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Whose usage the caller may read: `Ok(None)` every namespace (an operator without `namespace`), `Ok(Some(ns))`
/// one, or the refusal.
fn scope<B: Backend>(
    gw: &Gateway<B>,
    headers: &HeaderMap,
    asked: Option<&str>,
) -> Result<Option<String>, Box<Response>> {
    match (gw.caller(headers), asked) {
        (None, _) => Err(Box::new(gw.unauthorized())),
        (Some(Caller::Operator), asked) => Ok(asked.map(str::to_owned)),
        (Some(Caller::Tenant(own)), None) => Ok(Some(own)),
        (Some(Caller::Tenant(own)), Some(asked)) if asked == own => Ok(Some(own)),
        (Some(Caller::Tenant(_)), Some(asked)) => Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            format!("this API key does not give access to namespace {asked}"),
        ))),
    }
}

fn billing_off() -> Response {
    problem(
        StatusCode::NOT_IMPLEMENTED,
        "usage is not metered by this gateway: no prices are configured (kiln controller --prices FILE)",
    )
}

/// Takes the known parameters of `uri`, refusing unknown and repeated ones.
fn known(uri: &Uri, names: &[&str]) -> Result<std::collections::BTreeMap<String, String>, Box<Response>> {
    let mut out = std::collections::BTreeMap::new();
    let bad = |detail: String| Box::new(problem(StatusCode::BAD_REQUEST, detail));
    for (k, v) in params(uri).map_err(bad)? {
        if !names.contains(&k.as_str()) {
            return Err(bad(format!("unknown parameter {k:?}; expected {}", names.join(", "))));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(bad(format!("parameter {k:?} given twice")));
        }
    }
    Ok(out)
}

/// `GET /v1/usage`.
pub(super) async fn usage<B: Backend>(
    axum::extract::State(gw): axum::extract::State<Arc<Gateway<B>>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let p = match known(&uri, &["namespace", "from", "to", "group_by"]) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let namespace = match scope(&gw, &headers, p.get("namespace").map(String::as_str).filter(|n| !n.is_empty())) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let Some(billing) = &gw.billing else { return billing_off() };
    let (month_from, month_to) = {
        let (y, m) = this_month();
        month_bounds_ms(y, m)
    };
    let from = match p.get("from").map(|t| parse_time("from", t, false)).transpose() {
        Ok(t) => t.unwrap_or(month_from),
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let to = match p.get("to").map(|t| parse_time("to", t, true)).transpose() {
        Ok(t) => t.unwrap_or(month_to),
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    if to < from {
        return problem(StatusCode::BAD_REQUEST, format!("to ({}) is before from ({})", rfc3339(to), rfc3339(from)));
    }
    let by_name = p.get("group_by").map_or("subject", String::as_str);
    let by = match group_by(by_name) {
        Ok(b) => b,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let query = Query { namespace: namespace.clone(), subject: None, from_ms: from, to_ms: to };
    let usage = match billing.usage(&query, by) {
        Ok(u) => u,
        Err(e @ BillingError::Unavailable(_)) => return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let currency = billing.currency();
    if wants_csv(&headers) {
        let mut out = format!("{by_name},records,gpu_seconds,gpu_hours,charges,credits,amount,currency\n");
        let row = |key: &str, t: &Totals| {
            format!(
                "{},{},{},{},{},{},{},{currency}\n",
                quote(key),
                t.records,
                gpu_seconds(t),
                t.gpu_hours,
                t.charges,
                t.credits,
                t.amount
            )
        };
        for (key, t) in &usage.groups {
            out.push_str(&row(key, t));
        }
        out.push_str(&row("TOTAL", &usage.total));
        return csv(out);
    }
    let groups: Vec<Value> = usage
        .groups
        .iter()
        .map(|(key, t)| {
            let mut g = totals_json(t);
            g["key"] = json!(key);
            g
        })
        .collect();
    Json(json!({
        "namespace": namespace,
        "from": rfc3339(from),
        "to": rfc3339(to),
        "group_by": by_name,
        "currency": currency,
        "groups": groups,
        "total": totals_json(&usage.total),
    }))
    .into_response()
}

/// `GET /v1/usage/statement`.
pub(super) async fn statement<B: Backend>(
    axum::extract::State(gw): axum::extract::State<Arc<Gateway<B>>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let p = match known(&uri, &["namespace", "month"]) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let namespace = match scope(&gw, &headers, p.get("namespace").map(String::as_str).filter(|n| !n.is_empty())) {
        Ok(Some(n)) => n,
        Ok(None) => {
            return problem(StatusCode::BAD_REQUEST, "a statement is one namespace's: give namespace=<tenant>");
        }
        Err(r) => return *r,
    };
    let Some(billing) = &gw.billing else { return billing_off() };
    let (year, month) = match p.get("month").map(|m| parse_month(m)).transpose() {
        Ok(m) => m.unwrap_or_else(this_month),
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let s: Statement = match billing.statement(&namespace, year, month) {
        Ok(s) => s,
        Err(e @ BillingError::Unavailable(_)) => return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if wants_csv(&headers) {
        return csv(s.to_csv());
    }
    let items: Vec<Value> = s
        .items
        .iter()
        .map(|i| {
            json!({
                "subject": i.subject.to_string(),
                "kind": i.kind.as_str(),
                "gpu_model": i.gpu_model,
                "records": i.totals.records,
                "gpu_seconds": gpu_seconds(&i.totals),
                "gpu_hours": i.totals.gpu_hours,
                "amount": i.totals.amount.to_string(),
            })
        })
        .collect();
    Json(json!({
        "namespace": s.namespace,
        "month": format!("{year:04}-{month:02}"),
        "from": rfc3339(s.from_ms),
        "to": rfc3339(s.to_ms),
        "currency": s.currency,
        "items": items,
        "charges": s.charges.to_string(),
        "credits": s.credits.to_string(),
        "total": s.total.to_string(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_months_and_parameters_parse_or_say_why() {
        assert_eq!(parse_time("from", "1970-01-02", false), Ok(86_400_000));
        assert_eq!(parse_time("to", "1970-01-02", true), Ok(2 * 86_400_000), "a date `to` includes its day");
        assert_eq!(parse_time("from", "1970-01-01T01:00:00+01:00", false), Ok(0));
        assert_eq!(parse_time("from", "1970-01-01T00:00:01.5Z", false), Ok(1500));
        assert!(parse_time("from", "yesterday", false).unwrap_err().contains("RFC 3339"));
        assert_eq!(parse_month("2026-11"), Ok((2026, 11)));
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "x"] {
            assert!(parse_month(bad).is_err(), "{bad}");
        }
        let uri: Uri = "/v1/usage?from=2026-11-01T00%3A00%3A00%2B01%3A00&group_by=day".parse().unwrap();
        assert_eq!(
            params(&uri).unwrap(),
            [("from".to_owned(), "2026-11-01T00:00:00+01:00".to_owned()), ("group_by".to_owned(), "day".to_owned())]
        );
        assert!(group_by("week").unwrap_err().contains("expected deployment"));
    }
}
