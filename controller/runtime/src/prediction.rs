//! A prediction's state as data, shared by the gateway (which serves it) and the store (which keeps it): its
//! [`PredictionStatus`], why it failed ([`FailureKind`]), the timings of a run ([`RunMetrics`]) and the `metrics`
//! object the API shows ([`Metrics`]). No I/O, no HTTP: the gateway picks status codes and `Retry-After` from a
//! [`FailureKind`], the store writes these types as they serialize.

use serde::{Deserialize, Serialize};

/// Where a prediction is in its life, as Replicate names it (`starting`, `processing`, `succeeded`, `failed`,
/// `canceled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictionStatus {
    /// Created, not yet sent to a replica.
    Starting,
    /// Sent to a replica, or held while one starts.
    Processing,
    /// Finished with output.
    Succeeded,
    /// Finished without output; its [`FailureKind`] says why.
    Failed,
    /// Canceled by the client before it finished.
    Canceled,
}

impl PredictionStatus {
    /// Whether the prediction has finished (`succeeded`, `failed` or `canceled`): nothing changes it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

impl std::fmt::Display for PredictionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a prediction failed: kept with the prediction and in its stored record (`{"kind": "overloaded",
/// "retry_after_s": 2}`), so the HTTP status, `Retry-After` and the `metrics` flags come from it after a restart
/// too. The kinds are [`crate::gateway::PredictError`]'s and the gateway's own (shutdown, restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailureKind {
    /// Too many requests were held for the deployment (429).
    Overloaded {
        /// When to retry, seconds.
        retry_after_s: u64,
    },
    /// Held past the deadline while the deployment was cold-starting (504 for a waiting client).
    ColdStartTimeout,
    /// The deployment's replicas fail to start.
    SetupFailed,
    /// The model rejected the input.
    Invalid,
    /// The model or its replica failed.
    Failed,
    /// Still running when a shutdown's grace period ran out (503 for a waiting client).
    Shutdown {
        /// When to retry, seconds.
        retry_after_s: u64,
    },
    /// Running when the controller process ended.
    Restarted,
}

impl FailureKind {
    /// A short machine-readable name (`overloaded`, `cold_start_timeout`, `setup_failed`, `invalid`, `failed`,
    /// `shutdown`, `restarted`): a metric label, the `kind` of the stored form.
    pub fn category(self) -> &'static str {
        match self {
            Self::Overloaded { .. } => "overloaded",
            Self::ColdStartTimeout => "cold_start_timeout",
            Self::SetupFailed => "setup_failed",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
            Self::Shutdown { .. } => "shutdown",
            Self::Restarted => "restarted",
        }
    }

    /// Whether sending the same prediction again may succeed without anything else changing: the deployment was
    /// busy or still starting, or the controller went away. A failed setup waits for a new spec or model file, an
    /// invalid input stays invalid, and a replica's failure was already retried on another replica by the backend.
    pub fn is_retryable(self) -> bool {
        match self {
            Self::Overloaded { .. } | Self::ColdStartTimeout | Self::Shutdown { .. } | Self::Restarted => true,
            Self::SetupFailed | Self::Invalid | Self::Failed => false,
        }
    }

    /// The `Retry-After` seconds the gateway answers with, when it gives one.
    pub fn retry_after_s(self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after_s } | Self::Shutdown { retry_after_s } => Some(retry_after_s),
            _ => None,
        }
    }
}

/// The timings of a prediction that ran, as the API shows them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// Time the model spent, seconds.
    pub predict_time: f64,
    /// Time waiting for a replica (including a cold start), seconds.
    pub queue_time: f64,
    /// Whether the prediction waited for a cold start.
    pub cold_start: bool,
    /// The cold start it waited for, seconds (`null` without one).
    pub cold_start_time: Option<f64>,
    /// GPUs held by the replica that ran it (`0.5` for half a GPU, `2` for two), when the backend knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_share: Option<f64>,
    /// What `predict_time` on that share costs at the serverless price of its GPU model, an exact decimal string
    /// in the prices' currency (as Replicate's billing shows per prediction). The bill itself comes from the
    /// meter (replica GPU-seconds by phase), not from the sum of these.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "money_text")]
    pub billed_amount: Option<kiln_core::money::Money>,
}

/// An optional [`Money`](kiln_core::money::Money) as its exact decimal text (`"0.000125"`).
mod money_text {
    use kiln_core::money::Money;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(m: &Option<Money>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.collect_str(m),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Money>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| Money::parse(&t).map_err(serde::de::Error::custom)).transpose()
    }
}

/// A prediction's `metrics` object as the API shows it (and the store keeps it): the [`RunMetrics`] of one that
/// succeeded, or flags saying why one failed (`{"overloaded": true, "retry_after": 2}`,
/// `{"overloaded": false, "cold_start_timeout": true}`, `{"overloaded": false}`, `{"shutdown": true,
/// "retry_after": 5}`, `{"controller_restarted": true}`), or `{}`. Built with [`Metrics::new`]; fields absent from
/// the JSON are `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// The timings, when the prediction ran.
    #[serde(flatten)]
    pub run: Option<RunMetrics>,
    /// Whether it failed because too many requests were held (set on every failure of a run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overloaded: Option<bool>,
    /// `Retry-After` seconds of an overloaded or shut-down prediction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Whether it was held past the deadline of a cold start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_timeout: Option<bool>,
    /// Whether a shutdown cut it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<bool>,
    /// Whether the controller restarted while it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_restarted: Option<bool>,
}

impl Metrics {
    /// The metrics of a prediction that ran (`run`) or failed (`failure`); `{}` for neither.
    pub fn new(run: Option<RunMetrics>, failure: Option<FailureKind>) -> Self {
        let mut metrics = Self { run, ..Self::default() };
        match failure {
            None => {}
            Some(FailureKind::Shutdown { retry_after_s }) => {
                metrics.shutdown = Some(true);
                metrics.retry_after = Some(retry_after_s);
            }
            Some(FailureKind::Restarted) => metrics.controller_restarted = Some(true),
            Some(FailureKind::Overloaded { retry_after_s }) => {
                metrics.overloaded = Some(true);
                metrics.retry_after = Some(retry_after_s);
            }
            Some(FailureKind::ColdStartTimeout) => {
                metrics.overloaded = Some(false);
                metrics.cold_start_timeout = Some(true);
            }
            Some(FailureKind::SetupFailed | FailureKind::Invalid | FailureKind::Failed) => {
                metrics.overloaded = Some(false);
            }
        }
        metrics
    }

    /// The failure these flags describe, for a failed prediction stored without its [`FailureKind`] (records
    /// written before the kind was kept): the flags of [`Metrics::new`] read back; a setup failure, an invalid
    /// input and a model failure carried the same flags and come back as [`FailureKind::Failed`].
    pub fn failure(&self) -> FailureKind {
        let retry_after_s = self.retry_after.unwrap_or(1);
        if self.shutdown == Some(true) {
            FailureKind::Shutdown { retry_after_s }
        } else if self.controller_restarted == Some(true) {
            FailureKind::Restarted
        } else if self.overloaded == Some(true) {
            FailureKind::Overloaded { retry_after_s }
        } else if self.cold_start_timeout == Some(true) {
            FailureKind::ColdStartTimeout
        } else {
            FailureKind::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn statuses_are_lowercase_names_and_the_last_three_are_terminal() {
        let all = [
            PredictionStatus::Starting,
            PredictionStatus::Processing,
            PredictionStatus::Succeeded,
            PredictionStatus::Failed,
            PredictionStatus::Canceled,
        ];
        let names: Vec<Value> = all.iter().map(|s| serde_json::to_value(s).unwrap()).collect();
        assert_eq!(
            names,
            [json!("starting"), json!("processing"), json!("succeeded"), json!("failed"), json!("canceled")]
        );
        for s in all {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
            assert_eq!(serde_json::from_value::<PredictionStatus>(json!(s.to_string())).unwrap(), s);
        }
        assert_eq!(all.map(PredictionStatus::is_terminal), [false, false, true, true, true]);
    }

    #[test]
    fn metrics_have_the_api_shape_and_old_flags_read_back_as_the_failure() {
        let run = RunMetrics {
            predict_time: 0.25,
            queue_time: 1.5,
            cold_start: true,
            cold_start_time: Some(1.25),
            gpu_share: None,
            billed_amount: None,
        };
        let warm = RunMetrics { cold_start: false, cold_start_time: None, ..run };
        let priced = RunMetrics {
            gpu_share: Some(0.5),
            billed_amount: Some(kiln_core::money::Money::parse("0.000125").unwrap()),
            ..warm
        };
        let cases = [
            (Metrics::new(None, None), json!({})),
            (
                Metrics::new(Some(run), None),
                json!({ "predict_time": 0.25, "queue_time": 1.5, "cold_start": true, "cold_start_time": 1.25 }),
            ),
            (
                Metrics::new(Some(warm), None),
                json!({ "predict_time": 0.25, "queue_time": 1.5, "cold_start": false, "cold_start_time": null }),
            ),
            (
                Metrics::new(Some(priced), None),
                json!({ "predict_time": 0.25, "queue_time": 1.5, "cold_start": false, "cold_start_time": null,
                        "gpu_share": 0.5, "billed_amount": "0.000125" }),
            ),
        ];
        for (metrics, shape) in cases {
            assert_eq!(serde_json::to_value(metrics).unwrap(), shape);
            assert_eq!(serde_json::from_value::<Metrics>(shape).unwrap(), metrics);
        }
        let failures = [
            (FailureKind::Overloaded { retry_after_s: 2 }, json!({ "overloaded": true, "retry_after": 2 })),
            (FailureKind::ColdStartTimeout, json!({ "overloaded": false, "cold_start_timeout": true })),
            (FailureKind::SetupFailed, json!({ "overloaded": false })),
            (FailureKind::Invalid, json!({ "overloaded": false })),
            (FailureKind::Failed, json!({ "overloaded": false })),
            (FailureKind::Shutdown { retry_after_s: 5 }, json!({ "shutdown": true, "retry_after": 5 })),
            (FailureKind::Restarted, json!({ "controller_restarted": true })),
        ];
        for (kind, shape) in failures {
            let metrics = Metrics::new(None, Some(kind));
            assert_eq!(serde_json::to_value(metrics).unwrap(), shape, "{kind:?}");
            let read: Metrics = serde_json::from_value(shape).unwrap();
            let legacy = if matches!(kind, FailureKind::SetupFailed | FailureKind::Invalid) {
                FailureKind::Failed
            } else {
                kind
            };
            assert_eq!(read.failure(), legacy);
        }
    }

    #[test]
    fn failure_kinds_are_stored_by_kind_and_say_whether_a_retry_may_help() {
        let kind = FailureKind::Overloaded { retry_after_s: 2 };
        assert_eq!(serde_json::to_value(kind).unwrap(), json!({ "kind": "overloaded", "retry_after_s": 2 }));
        assert_eq!(
            serde_json::to_value(FailureKind::ColdStartTimeout).unwrap(),
            json!({ "kind": "cold_start_timeout" })
        );
        for kind in [
            kind,
            FailureKind::ColdStartTimeout,
            FailureKind::SetupFailed,
            FailureKind::Invalid,
            FailureKind::Failed,
            FailureKind::Shutdown { retry_after_s: 5 },
            FailureKind::Restarted,
        ] {
            let stored = serde_json::to_value(kind).unwrap();
            assert_eq!(stored["kind"], kind.category());
            assert_eq!(serde_json::from_value::<FailureKind>(stored).unwrap(), kind);
        }
        assert!(kind.is_retryable() && FailureKind::Restarted.is_retryable());
        assert!(!FailureKind::Invalid.is_retryable() && !FailureKind::SetupFailed.is_retryable());
        assert_eq!((kind.retry_after_s(), FailureKind::Failed.retry_after_s()), (Some(2), None));
    }
}
