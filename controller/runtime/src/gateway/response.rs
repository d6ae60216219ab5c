//! A prediction as the API returns it (and webhooks deliver it), in the shape of Replicate's: `id`, `model`,
//! `version`, `status`, `input`, `output`, `error`, `logs`, the three timestamps (RFC 3339 in UTC with
//! microseconds, `null` until they happen), `urls` and `metrics`, plus `input_dropped` / `output_dropped` when an
//! input or output over the store's limits was let go.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use super::Prediction;
use crate::{
    prediction::{Metrics, PredictionStatus},
    store::{INPUT_LIMIT, OUTPUT_LIMIT},
};

/// The JSON of a prediction.
#[derive(Debug, Serialize)]
pub(super) struct PredictionResponse<'a> {
    id: &'a str,
    model: &'a str,
    version: &'a str,
    status: PredictionStatus,
    input: &'a Value,
    output: &'a Value,
    error: Option<&'a str>,
    logs: &'a str,
    created_at: Rfc3339,
    started_at: Option<Rfc3339>,
    completed_at: Option<Rfc3339>,
    urls: Urls,
    metrics: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_dropped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dropped: Option<String>,
}

/// A prediction's `urls`: where to read it, cancel it and stream it. Every prediction can be streamed (its output
/// as server-sent events once produced), so `stream` is always there, as Replicate's is now (clients such as the
/// JavaScript `replicate.stream` only stream when they find it), with a capability token: like Replicate's stream
/// URLs it is opened without the API key.
#[derive(Debug, Serialize)]
struct Urls {
    get: String,
    cancel: String,
    stream: String,
}

impl<'a> PredictionResponse<'a> {
    /// The JSON of `p`, its URLs under `base`.
    pub(super) fn new(p: &'a Prediction, base: &str) -> Self {
        let get = format!("{base}/v1/predictions/{}", p.id);
        let stream = match &p.stream_token {
            Some(token) => format!("{get}/stream?token={token}"),
            None => format!("{get}/stream"),
        };
        let urls = Urls { cancel: format!("{get}/cancel"), stream, get };
        Self {
            id: &p.id,
            model: &p.model,
            version: &p.version,
            status: p.status,
            input: &p.input,
            output: &p.output,
            error: p.error.as_deref(),
            logs: "",
            created_at: Rfc3339(p.created_at),
            started_at: p.started_at.map(Rfc3339),
            completed_at: p.completed_at.map(Rfc3339),
            urls,
            metrics: Metrics::new(p.run, p.failure),
            input_dropped: p.dropped.0.map(|n| format!("the input ({n} bytes) was over the {} kept", kib(INPUT_LIMIT))),
            output_dropped: p
                .dropped
                .1
                .map(|n| format!("the output ({n} bytes) was over the {} kept across restarts", kib(OUTPUT_LIMIT))),
        }
    }
}

fn kib(bytes: usize) -> String {
    format!("{} KiB", bytes / 1024)
}

/// A time as RFC 3339 in UTC with microseconds (`2025-11-25T12:00:00.123456Z`, truncated, as Replicate writes
/// them).
#[derive(Debug, Clone, Copy)]
pub(super) struct Rfc3339(pub(super) SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A SystemTime outside jiff's range (years -9999 to 9999) is not one a prediction can have.
        let t = jiff::Timestamp::try_from(self.0).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        write!(f, "{t:.6}")
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::prediction::{FailureKind, RunMetrics};

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let t = |secs, nanos| Rfc3339(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)).to_string();
        assert_eq!(t(1_764_072_000, 123_456_000), "2025-11-25T12:00:00.123456Z");
        assert_eq!(t(1_764_072_000, 123_456_999), "2025-11-25T12:00:00.123456Z", "truncated, not rounded");
        assert_eq!(t(1_764_072_000, 0), "2025-11-25T12:00:00.000000Z");
        assert_eq!(t(951_782_400, 5_000), "2000-02-29T00:00:00.000005Z", "a leap day");
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            serde_json::to_value(Rfc3339(SystemTime::UNIX_EPOCH)).unwrap(),
            json!("1970-01-01T00:00:00.000000Z")
        );
    }

    /// The shapes the API returned before the response was a struct, field for field.
    #[test]
    fn the_response_has_replicates_shape_in_every_state() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_764_072_000, 123_456_789);
        let base = Prediction::new("abc".into(), "ns/m".into(), "v1".into(), json!({ "x": 1 }));
        let base = Prediction { created_at: t, ..base };
        let shape = |p: &Prediction| serde_json::to_value(PredictionResponse::new(p, "http://g")).unwrap();
        let urls = json!({
            "cancel": "http://g/v1/predictions/abc/cancel", "get": "http://g/v1/predictions/abc",
            "stream": "http://g/v1/predictions/abc/stream"
        });
        let starting = json!({
            "completed_at": null, "created_at": "2025-11-25T12:00:00.123456Z", "error": null, "id": "abc",
            "input": { "x": 1 }, "logs": "", "metrics": {}, "model": "ns/m", "output": null, "started_at": null,
            "status": "starting", "urls": urls, "version": "v1"
        });
        assert_eq!(shape(&base), starting);

        let mut done = base.clone();
        done.status = PredictionStatus::Succeeded;
        done.started_at = Some(t);
        done.completed_at = Some(t + Duration::from_micros(1500));
        done.output = json!([1.5, 2]);
        done.run = Some(RunMetrics {
            predict_time: 0.25,
            queue_time: 1.5,
            cold_start: true,
            cold_start_time: Some(1.25),
            gpu_share: None,
            billed_amount: None,
        });
        done.stream = true;
        done.dropped = (Some(70_000), Some(2_000_000));
        let succeeded = json!({
            "completed_at": "2025-11-25T12:00:00.124956Z", "created_at": "2025-11-25T12:00:00.123456Z",
            "error": null, "id": "abc", "input": { "x": 1 },
            "input_dropped": "the input (70000 bytes) was over the 64 KiB kept", "logs": "",
            "metrics": { "cold_start": true, "cold_start_time": 1.25, "predict_time": 0.25, "queue_time": 1.5 },
            "model": "ns/m", "output": [1.5, 2],
            "output_dropped": "the output (2000000 bytes) was over the 1024 KiB kept across restarts",
            "started_at": "2025-11-25T12:00:00.123456Z", "status": "succeeded",
            "urls": {
                "cancel": "http://g/v1/predictions/abc/cancel", "get": "http://g/v1/predictions/abc",
                "stream": "http://g/v1/predictions/abc/stream"
            },
            "version": "v1"
        });
        assert_eq!(shape(&done), succeeded);
        done.run = Some(RunMetrics {
            predict_time: 0.25,
            queue_time: 0.0,
            cold_start: false,
            cold_start_time: None,
            gpu_share: None,
            billed_amount: None,
        });
        let warm = shape(&done);
        assert_eq!(
            warm["metrics"],
            json!({ "cold_start": false, "cold_start_time": null, "predict_time": 0.25, "queue_time": 0.0 })
        );

        for (kind, metrics) in [
            (FailureKind::Overloaded { retry_after_s: 2 }, json!({ "overloaded": true, "retry_after": 2 })),
            (FailureKind::ColdStartTimeout, json!({ "cold_start_timeout": true, "overloaded": false })),
            (FailureKind::Failed, json!({ "overloaded": false })),
            (FailureKind::Shutdown { retry_after_s: 5 }, json!({ "retry_after": 5, "shutdown": true })),
            (FailureKind::Restarted, json!({ "controller_restarted": true })),
        ] {
            let mut failed = base.clone();
            failed.status = PredictionStatus::Failed;
            failed.error = Some("too many".into());
            failed.failure = Some(kind);
            let mut expected = starting.clone();
            expected["status"] = json!("failed");
            expected["error"] = json!("too many");
            expected["metrics"] = metrics;
            assert_eq!(shape(&failed), expected, "{kind:?}");
        }
        let canceled = Prediction { status: PredictionStatus::Canceled, ..base.clone() };
        let mut expected = starting;
        expected["status"] = json!("canceled");
        assert_eq!(shape(&canceled), expected);
    }
}
