//! The controller's Prometheus metrics (`/metrics` on the gateway's address, OpenMetrics text):
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `kiln_gateway_requests_total` | `deployment`, `outcome` | predictions run, by outcome (`succeeded`, `failed`, `invalid`, `overloaded`, `cold_start_timeout`) |
//! | `kiln_gateway_request_duration_seconds` | `deployment` | from arrival to answer, including any hold |
//! | `kiln_gateway_queue_depth` | `deployment` | requests held for a replica now |
//! | `kiln_gateway_in_flight` | `deployment` | requests on replicas now |
//! | `kiln_cold_starts_total` | `deployment`, `source` | replicas started, by where the weights came from |
//! | `kiln_cold_start_duration_seconds` | `deployment` | from the start decision to the replica's ready event |
//! | `kiln_cold_start_phase_seconds` | `phase` | the agent's load phases (`fetch`, `read`, `host_to_device`, `init`) |
//! | `kiln_failed_starts_total` | `deployment`, `reason` | starts refused or failed, by the agent's reason (`ModelNotFound`, `InvalidWeights`, ...) |
//! | `kiln_replicas` | `deployment`, `state` | replicas `desired`, `loading`, `ready` |
//! | `kiln_scheduling_duration_seconds` | | one control-loop pass (events, placement, autoscaling) |
//! | `kiln_gpus` | `state` | GPUs of connected nodes by health (`healthy`, `degraded`, `unhealthy`), and on lost nodes (`lost`) |
//! | `kiln_gpu_allocated_ratio` | | share of the fleet's GPU capacity held by replicas |
//! | `kiln_nodes` | `ready` | nodes by readiness |
//! | `kiln_reconcile_errors_total` | `category` | failed `ModelDeployment` reconciles, by category (`invalid_spec`, `apiserver`, `conflict`, `internal`) |
//! | `kiln_billed_amount_total` | `namespace`, `phase` | amounts charged, currency units, counted once per usage record (`crate::billing`) |
//! | `kiln_credited_amount_total` | `namespace`, `phase` | amounts credited (lent GPU-time, failures), currency units, as positive numbers |
//! | `kiln_gpu_seconds_total` | `namespace`, `phase` | GPU-seconds metered (share-weighted; a rental hour is 3600 per GPU) |
//! | `kiln_billing_unpriced_gpu_models` | `gpu_model` | 1 for a GPU model in use that has no price: its usage is not billed until one is set |

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        MetricType, TypedMetric,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// The controller's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The latency family alone (the same series as in `registry`), for readers of its buckets.
    latency_registry: Registry,
    /// Every family registered: (name, kind).
    families: Vec<(&'static str, MetricType)>,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    queue: Family<Labels, Gauge>,
    in_flight: Family<Labels, Gauge>,
    cold_starts: Family<Labels, Counter>,
    cold_start_seconds: Family<Labels, Histogram>,
    phases: Family<Labels, Histogram>,
    failed_starts: Family<Labels, Counter>,
    replicas: Family<Labels, Gauge>,
    scheduling: Histogram,
    gpus: Family<Labels, Gauge>,
    allocated: Gauge<f64, AtomicU64>,
    /// `kiln_ledger_status{field}`.
    ledger: Family<Labels, Gauge<f64, AtomicU64>>,
    nodes: Family<Labels, Gauge>,
    reconcile_errors: Family<Labels, Counter>,
    billing: crate::billing::BillingCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, at zero.
    pub fn new() -> Self {
        let latency_buckets = || Histogram::new(exponential_buckets(0.0005, 2.0, 20));
        let m = Self {
            registry: Registry::default(),
            latency_registry: Registry::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_buckets),
            queue: Family::default(),
            in_flight: Family::default(),
            cold_starts: Family::default(),
            cold_start_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 16))),
            phases: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 20))),
            failed_starts: Family::default(),
            replicas: Family::default(),
            scheduling: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            gpus: Family::default(),
            allocated: Gauge::default(),
            ledger: Family::default(),
            nodes: Family::default(),
            reconcile_errors: Family::default(),
            billing: crate::billing::BillingCounters::default(),
            families: Vec::new(),
        };
        let mut m = m;
        let mut families = Vec::new();
        let r = &mut m.registry;
        // Registers a family and records its name and kind (what dashboards may query: `Metrics::families`).
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let metric = $metric;
                families.push(($name, kind_of(&metric)));
                r.register($name, $help, metric);
            }};
        }
        reg!("kiln_gateway_requests", "Predictions run, by outcome", m.requests.clone());
        reg!("kiln_gateway_request_duration_seconds", "Prediction latency including holds", m.latency.clone());
        reg!("kiln_gateway_queue_depth", "Requests held for a replica", m.queue.clone());
        reg!("kiln_gateway_in_flight", "Requests on replicas", m.in_flight.clone());
        reg!("kiln_cold_starts", "Replicas started, by weight source", m.cold_starts.clone());
        reg!("kiln_cold_start_duration_seconds", "Start decision to ready", m.cold_start_seconds.clone());
        reg!("kiln_cold_start_phase_seconds", "Agent load phases", m.phases.clone());
        reg!("kiln_failed_starts", "Starts refused or failed", m.failed_starts.clone());
        reg!("kiln_replicas", "Replicas by state", m.replicas.clone());
        reg!("kiln_scheduling_duration_seconds", "One control-loop pass", m.scheduling.clone());
        reg!("kiln_gpus", "GPUs by state", m.gpus.clone());
        reg!("kiln_gpu_allocated_ratio", "Share of GPU capacity held by replicas", m.allocated.clone());
        reg!("kiln_nodes", "Nodes by readiness", m.nodes.clone());
        reg!("kiln_reconcile_errors", "Failed reconciles, by category", m.reconcile_errors.clone());
        let b = &m.billing;
        reg!("kiln_billed_amount", "Amounts charged, currency units", b.billed.clone());
        reg!("kiln_credited_amount", "Amounts credited, currency units", b.credited.clone());
        reg!("kiln_gpu_seconds", "GPU-seconds metered", b.gpu_seconds.clone());
        reg!("kiln_billing_unpriced_gpu_models", "GPU models in use without a price", b.unpriced.clone());
        reg!(
            "kiln_ledger_append_duration_seconds",
            "One batch of usage records appended (committed) to the ledger",
            b.append_seconds.clone()
        );
        reg!(
            "kiln_ledger_status",
            "The usage ledger's raft group as this replica sees it, by field (term, leader, commit_index, \
             applied_index, log_first, log_last, snapshot_index, snapshots, snapshots_failed, records, log_bytes)",
            m.ledger.clone()
        );
        m.families = families;
        m.latency_registry.register(
            "kiln_gateway_request_duration_seconds",
            "Prediction latency including holds",
            m.latency.clone(),
        );
        m
    }

    /// Every metric family the controller registers, with its type, whether or not it has a series yet: what
    /// dashboards may query (a counter is exported as `<name>_total`, a histogram as `<name>_bucket`, `_sum`,
    /// `_count`).
    pub fn families(&self) -> &[(&'static str, MetricType)] {
        &self.families
    }

    /// The billing counters, registered here (the billing service counts into them).
    pub fn billing_counters(&self) -> crate::billing::BillingCounters {
        self.billing.clone()
    }

    /// A prediction finished with `outcome` after `seconds`.
    pub fn request(&self, deployment: &str, outcome: &str, seconds: f64) {
        self.requests.get_or_create(&labels(&[("deployment", deployment), ("outcome", outcome)])).inc();
        self.latency.get_or_create(&labels(&[("deployment", deployment)])).observe(seconds);
    }

    /// A replica became ready after `seconds`, its weights from `source`, with the agent's phases (ms).
    pub fn cold_start(&self, deployment: &str, source: &str, seconds: f64, phases_ms: [u64; 4]) {
        self.cold_starts.get_or_create(&labels(&[("deployment", deployment), ("source", source)])).inc();
        self.cold_start_seconds.get_or_create(&labels(&[("deployment", deployment)])).observe(seconds);
        for (phase, ms) in ["fetch", "read", "host_to_device", "init"].iter().zip(phases_ms) {
            self.phases.get_or_create(&labels(&[("phase", phase)])).observe(ms as f64 / 1000.0);
        }
    }

    /// A start was refused or failed.
    pub fn failed_start(&self, deployment: &str, reason: &str) {
        self.failed_starts.get_or_create(&labels(&[("deployment", deployment), ("reason", reason)])).inc();
    }

    /// A reconcile failed with an error of `category`.
    pub fn reconcile_error(&self, category: &str) {
        self.reconcile_errors.get_or_create(&labels(&[("category", category)])).inc();
    }

    /// One control-loop pass took `seconds`.
    pub fn scheduling(&self, seconds: f64) {
        self.scheduling.observe(seconds);
    }

    /// The current state, for the gauges set at scrape time.
    pub fn set_state(&self, state: &StateSnapshot) {
        for f in [&self.queue, &self.in_flight, &self.replicas, &self.gpus, &self.nodes] {
            f.clear();
        }
        for d in &state.deployments {
            let dep = [("deployment", d.name.as_str())];
            self.queue.get_or_create(&labels(&dep)).set(i64::from(d.waiting));
            self.in_flight.get_or_create(&labels(&dep)).set(i64::from(d.in_flight));
            for (s, n) in [("desired", d.desired), ("loading", d.loading), ("ready", d.ready)] {
                self.replicas.get_or_create(&labels(&[dep[0], ("state", s)])).set(i64::from(n));
            }
        }
        for (s, n) in &state.gpus {
            self.gpus.get_or_create(&labels(&[("state", s)])).set(*n);
        }
        for (ready, n) in [("true", state.nodes.0), ("false", state.nodes.1)] {
            self.nodes.get_or_create(&labels(&[("ready", ready)])).set(n);
        }
        self.allocated.set(state.gpu_allocated_ratio);
        self.ledger.clear();
        if let Some(l) = &state.ledger {
            let fields = [
                ("term", l.term),
                ("leader", l.leader.unwrap_or(0)),
                ("commit_index", l.commit_index),
                ("applied_index", l.applied_index),
                ("log_first", l.log.0),
                ("log_last", l.log.1),
                ("snapshot_index", l.snapshot_index),
                ("snapshots", l.snapshots),
                ("snapshots_failed", l.snapshots_failed),
                ("records", l.records),
                ("log_bytes", l.log_bytes),
            ];
            for (field, v) in fields {
                self.ledger.get_or_create(&labels(&[("field", field)])).set(v as f64);
            }
        }
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The OpenMetrics text of `kiln_gateway_request_duration_seconds` alone (per deployment, its buckets): the
    /// console reads its percentiles every second without rendering (or gathering the gauges of) every family.
    pub fn latency_text(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.latency_registry);
        out
    }
}

/// The type a metric is exported as.
fn kind_of<M: TypedMetric>(_: &M) -> MetricType {
    M::TYPE
}

/// What the scrape-time gauges show.
#[derive(Debug, Clone, Default)]
pub struct StateSnapshot {
    /// Per deployment.
    pub deployments: Vec<DeploymentGauges>,
    /// GPUs by state.
    pub gpus: Vec<(&'static str, i64)>,
    /// Nodes ready, not ready.
    pub nodes: (i64, i64),
    /// Share of GPU capacity allocated.
    pub gpu_allocated_ratio: f64,
    /// The usage ledger's group, when it is a replicated one.
    pub ledger: Option<kiln_core::billing::LedgerStatus>,
}

/// One deployment's gauges.
#[derive(Debug, Clone, Default)]
pub struct DeploymentGauges {
    /// `namespace/name`.
    pub name: String,
    /// Replicas wanted, loading, ready.
    pub desired: u32,
    /// Loading.
    pub loading: u32,
    /// Ready.
    pub ready: u32,
    /// Held requests.
    pub waiting: u32,
    /// Requests on replicas.
    pub in_flight: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latency_text_holds_the_latency_buckets_and_nothing_else() {
        let m = Metrics::new();
        m.request("ns/a", "succeeded", 0.003);
        let text = m.latency_text();
        assert!(text.contains("kiln_gateway_request_duration_seconds_bucket{"), "{text}");
        assert!(text.contains("deployment=\"ns/a\""), "{text}");
        assert!(text.contains("kiln_gateway_request_duration_seconds_count{deployment=\"ns/a\"} 1"), "{text}");
        assert!(!text.contains("kiln_gateway_requests_total"), "only the latency family: {text}");
        assert!(m.render().contains("kiln_gateway_requests_total"), "the full page still has every family");
    }
}
