//! The controller's billing service: prices from configuration, the ledger, the meter, and what the control loop
//! and the gateway call.
//!
//! Owns [`Billing`] — a [`PriceTable`], a ledger behind the core's [`Ledger`] trait (the in-memory
//! [`MemoryLedger`] today; the replicated raft ledger later, so nothing here depends on which), and a [`Meter`] —
//! and [`PriceFile`], the YAML price file (`kiln up`'s `.kiln/prices.yaml`, `kiln controller --prices`, the chart's
//! `billing.prices`). The pure logic (ids, windows, amounts, sums, statements) is the core's
//! ([`kiln_core::billing`]); this module only holds the state, takes its lock, and counts what it appends.
//!
//! # How it is driven
//! - The control loop feeds the spans of GPU holding it closed ([`Billing::observe`], [`Billing::observe_lent`];
//!   times in seconds since the Unix epoch) and then [`Billing::close`]s up to a little before now
//!   ([`CLOSE_LAG_S`]): every finished metering window becomes records, appended to the ledger. Records the ledger
//!   refused stay pending and are offered again at the next close (ids are deterministic, so a record appended
//!   twice counts once).
//! - A rental's records (one per started hour, credits) are appended with [`Billing::append_rental`] whenever its
//!   state changes or on a tick: appending the same hours again is a no-op.
//! - The gateway reads it back ([`Billing::usage`], [`Billing::statement`]) and prices a finished prediction
//!   ([`Billing::prediction_amount`]).
//!
//! # Missing prices
//! A GPU model that is used but has no price is never billed as zero: the meter's close fails and keeps the
//! GPU-time (the core's rule), and the operator sees it — an error log when it starts, and
//! `kiln_billing_unpriced_gpu_models{gpu_model}` at 1 while it lasts. [`Billing::check_models`] does the same for
//! the fleet's models as agents register, before anything is metered.
//!
//! # Metrics
//! `kiln_billed_amount_total{namespace,phase}` (currency units, charges), `kiln_credited_amount_total{namespace,
//! phase}` (currency units, credits as positive numbers: lent GPU-time, failures) and
//! `kiln_gpu_seconds_total{namespace,phase}` count each record once, when it is first appended (a duplicate adds
//! nothing). `phase` is the record's phase name (`loading`, `busy`, `idle-warm`, `rental-hours`, `lent`,
//! `credit`); rental hours count 3600 GPU-seconds per GPU-hour.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Mutex, MutexGuard, atomic::AtomicU64},
};

use kiln_core::{
    billing::{
        Appended, BillingError, GpuPrice, GroupBy, Ledger, MemoryLedger, Meter, PriceTable, Quantity, Query,
        ReplicaInterval, Statement, Totals, UsageRecord,
        meter::{LentInterval, rental_records, serverless_amount},
    },
    money::{Money, secs_to_ms},
    rental::Rental,
};
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use serde::Deserialize;

/// Width of a metering window, seconds: serverless GPU-time is recorded per deployment, phase and minute.
pub const WINDOW_S: u32 = 60;
/// How far behind now the control loop closes windows, seconds: spans that end now but began a little earlier
/// (a phase reported late) still land in an open window.
pub const CLOSE_LAG_S: f64 = 5.0;
/// The `source` of the meter's record ids.
pub const METER_SOURCE: &str = "meter";
/// The `source` of rental record ids.
pub const RENTAL_SOURCE: &str = "rental";
/// Records kept pending at most (a ledger that refuses appends for long): beyond it the oldest are dropped, with
/// an error log.
const MAX_PENDING: usize = 100_000;

/// Result of the billing service: the core's [`BillingError`].
pub type Result<T, E = BillingError> = std::result::Result<T, E>;

type Labels = Vec<(String, String)>;

/// The billing counters, registered in the controller's metrics (`Metrics::billing_counters`) or standalone.
#[derive(Debug, Clone)]
pub struct BillingCounters {
    /// `kiln_billed_amount_total{namespace,phase}`.
    pub billed: Family<Labels, Counter<f64, AtomicU64>>,
    /// `kiln_credited_amount_total{namespace,phase}`.
    pub credited: Family<Labels, Counter<f64, AtomicU64>>,
    /// `kiln_gpu_seconds_total{namespace,phase}`.
    pub gpu_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    /// `kiln_billing_unpriced_gpu_models{gpu_model}`: 1 while a used GPU model has no price.
    pub unpriced: Family<Labels, Gauge>,
    /// `kiln_ledger_append_duration_seconds`: one batch appended to the ledger (committed: for the raft ledger, after
    /// its synced write).
    pub append_seconds: Histogram,
}

impl Default for BillingCounters {
    fn default() -> Self {
        Self {
            billed: Family::default(),
            credited: Family::default(),
            gpu_seconds: Family::default(),
            unpriced: Family::default(),
            append_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
        }
    }
}

impl BillingCounters {
    /// Counts one record appended for the first time.
    fn count(&self, r: &UsageRecord) {
        let labels =
            vec![("namespace".to_owned(), r.namespace.clone()), ("phase".to_owned(), r.kind.phase_name().into())];
        // Presentation only: the exact amounts are in the ledger.
        let units = r.amount.nanos() as f64 / 1e9;
        if units > 0.0 {
            self.billed.get_or_create(&labels).inc_by(units);
        } else if units < 0.0 {
            self.credited.get_or_create(&labels).inc_by(-units);
        }
        let gpu_seconds = match r.quantity {
            Quantity::MicroGpuSeconds(micro) => micro as f64 / 1e6,
            Quantity::GpuHours(hours) => hours as f64 * 3600.0,
        };
        self.gpu_seconds.get_or_create(&labels).inc_by(gpu_seconds);
    }
}

/// Sums of a usage query: per group, and over everything selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Per group key, in key order.
    pub groups: BTreeMap<String, Totals>,
    /// Over every record selected.
    pub total: Totals,
}

/// What a close did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Closed {
    /// Records the meter emitted.
    pub emitted: usize,
    /// Records stored for the first time.
    pub appended: usize,
    /// Records still waiting for the ledger.
    pub pending: usize,
}

/// The billing service (see the module docs). Shared (`Arc`) by the control loop and the gateway.
pub struct Billing {
    prices: PriceTable,
    inner: Mutex<Inner>,
    counters: BillingCounters,
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing").field("prices", &self.prices).finish_non_exhaustive()
    }
}

struct Inner {
    ledger: Box<dyn Ledger + Send>,
    meter: Meter,
    /// Records emitted by the meter that the ledger has not taken yet.
    pending: Vec<UsageRecord>,
    /// GPU models seen without a price (the log says so once, the gauge while it lasts).
    unpriced: BTreeSet<String>,
}

impl Billing {
    /// A billing service with `prices`, keeping records in `ledger`, counting into `counters`.
    pub fn new(prices: PriceTable, ledger: Box<dyn Ledger + Send>, counters: BillingCounters) -> Self {
        // WINDOW_S is not zero, so the meter is made.
        let meter = Meter::new(METER_SOURCE, WINDOW_S).unwrap_or_else(|_| unreachable!("a non-zero window"));
        Self {
            prices,
            inner: Mutex::new(Inner { ledger, meter, pending: Vec::new(), unpriced: BTreeSet::new() }),
            counters,
        }
    }

    /// A billing service over an in-memory ledger, with counters of its own (tests, tools).
    pub fn in_memory(prices: PriceTable) -> Self {
        Self::new(prices, Box::new(MemoryLedger::new()), BillingCounters::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The prices.
    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    /// The currency of every amount.
    pub fn currency(&self) -> &str {
        &self.prices.currency
    }

    /// Notes that `model` is used: an error log and the gauge at 1 the first time it has no price; the gauge back
    /// at 0 is not needed (prices do not change while the process runs).
    fn note_unpriced(&self, inner: &mut Inner, model: &str) {
        if inner.unpriced.insert(model.to_owned()) {
            tracing::error!(
                gpu_model = %model,
                "no price is configured for GPU model {model:?}: its usage is kept but not billed until a price is \
                 set (prices file: `gpus.{model:?}`)"
            );
            self.counters.unpriced.get_or_create(&vec![("gpu_model".to_owned(), model.to_owned())]).set(1);
        }
    }

    /// Checks the fleet's GPU models have prices; each one that has none is reported (see the module docs). Returns
    /// the models without a price.
    pub fn check_models<'a>(&self, models: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let missing: BTreeSet<&str> =
            models.into_iter().filter(|m| !m.is_empty() && self.prices.get(m).is_err()).collect();
        if !missing.is_empty() {
            let mut inner = self.lock();
            for m in &missing {
                self.note_unpriced(&mut inner, m);
            }
        }
        missing.into_iter().map(str::to_owned).collect()
    }

    /// Adds a serverless replica's span of GPU holding.
    pub fn observe(&self, span: &ReplicaInterval) -> Result<()> {
        let mut inner = self.lock();
        if self.prices.get(&span.gpu_model).is_err() {
            self.note_unpriced(&mut inner, &span.gpu_model);
        }
        inner.meter.observe(span)
    }

    /// Adds a span of a rented GPU lent to serverless work (credited to the rental's owner).
    pub fn observe_lent(&self, span: &LentInterval) -> Result<()> {
        let mut inner = self.lock();
        if self.prices.get(&span.gpu_model).is_err() {
            self.note_unpriced(&mut inner, &span.gpu_model);
        }
        inner.meter.observe_lent(span)
    }

    /// Closes every metering window that ended by `up_to` (seconds since the Unix epoch) and appends its records,
    /// with any still pending. A missing price fails the close and keeps the GPU-time in the meter (nothing is
    /// billed as zero); a ledger that refuses the batch keeps the records pending for the next close.
    pub fn close(&self, up_to: f64) -> Result<Closed> {
        let mut inner = self.lock();
        let records = match inner.meter.close(up_to, &self.prices) {
            Ok(r) => r,
            Err(e) => {
                if let BillingError::MissingPrice { model } = &e {
                    self.note_unpriced(&mut inner, model);
                }
                return Err(e);
            }
        };
        let emitted = records.len();
        inner.pending.extend(records);
        if inner.pending.is_empty() {
            return Ok(Closed::default());
        }
        let batch = std::mem::take(&mut inner.pending);
        match self.append_locked(&mut inner, batch.clone()) {
            Ok(appended) => Ok(Closed { emitted, appended, pending: 0 }),
            Err(e) => {
                let mut batch = batch;
                if batch.len() > MAX_PENDING {
                    let dropped = batch.len() - MAX_PENDING;
                    tracing::error!(dropped, "the ledger refused usage records for too long; the oldest are dropped");
                    batch.drain(..dropped);
                }
                inner.pending = batch;
                Err(e)
            }
        }
    }

    fn append_locked(&self, inner: &mut Inner, records: Vec<UsageRecord>) -> Result<usize> {
        let began = std::time::Instant::now();
        let appended = inner.ledger.append_all(records.clone());
        self.counters.append_seconds.observe(began.elapsed().as_secs_f64());
        let appended = appended?;
        let mut new = 0;
        for (r, a) in records.iter().zip(appended) {
            if a == Appended::New {
                self.counters.count(r);
                new += 1;
            }
        }
        Ok(new)
    }

    /// Appends `records` all or none, idempotently by id; returns how many were new.
    pub fn append(&self, records: Vec<UsageRecord>) -> Result<usize> {
        let mut inner = self.lock();
        self.append_locked(&mut inner, records)
    }

    /// Appends a rental's records as of `now` (seconds since the Unix epoch; the rental's times must be on the same
    /// clock): one per started hour since delivery and its credits. Appending again later adds only the new hours.
    pub fn append_rental(&self, rental: &Rental, now: f64) -> Result<usize> {
        let records = match rental_records(rental, now, &self.prices, RENTAL_SOURCE) {
            Ok(r) => r,
            Err(e) => {
                if let BillingError::MissingPrice { model } = &e {
                    self.note_unpriced(&mut self.lock(), model);
                }
                return Err(e);
            }
        };
        self.append(records)
    }

    /// How the ledger's replicated group stands (`None` for an in-memory ledger).
    pub fn ledger_status(&self) -> Option<kiln_core::billing::LedgerStatus> {
        self.lock().ledger.status()
    }

    /// The records `query` selects, in id order.
    pub fn records(&self, query: &Query) -> Result<Vec<UsageRecord>> {
        self.lock().ledger.query(query)
    }

    /// Sums of the records `query` selects, grouped `by`, and their total.
    pub fn usage(&self, query: &Query, by: GroupBy) -> Result<Usage> {
        let inner = self.lock();
        let groups = inner.ledger.sum(query, by)?;
        let total = inner.ledger.total(query)?;
        Ok(Usage { groups, total })
    }

    /// The statement of `namespace` for the UTC calendar month `year`-`month`.
    pub fn statement(&self, namespace: &str, year: i64, month: u32) -> Result<Statement> {
        let inner = self.lock();
        Statement::monthly(inner.ledger.as_ref(), namespace, self.currency(), year, month)
    }

    /// What `predict_time` seconds on `share_milli` milli-GPU of `gpu_model` cost at the serverless price (exact,
    /// rounded once at the nano-unit): the per-prediction figure the API shows. An unpriced model is an error (and
    /// reported), never zero.
    pub fn prediction_amount(&self, gpu_model: &str, share_milli: u32, predict_time: f64) -> Result<Money> {
        let ms = secs_to_ms(predict_time.max(0.0));
        let micro = i64::from(share_milli)
            .checked_mul(ms)
            .ok_or_else(|| BillingError::InvalidInput("prediction GPU-time overflow".into()))?;
        serverless_amount(&self.prices, gpu_model, micro).inspect_err(|e| {
            if let BillingError::MissingPrice { model } = e {
                self.note_unpriced(&mut self.lock(), model);
            }
        })
    }
}

/// A price as written in the file: a quoted decimal (`"0.0008"`, exact) or a YAML number (taken by its text).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Decimal {
    Text(String),
    Number(serde_yaml::Number),
}

impl Decimal {
    fn text(&self) -> String {
        match self {
            Decimal::Text(s) => s.trim().to_owned(),
            Decimal::Number(n) => n.to_string(),
        }
    }
}

/// One GPU model's prices in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PriceEntry {
    serverless_per_gpu_second: Decimal,
    rental_per_gpu_hour: Decimal,
    lending_share: Decimal,
}

/// The price file (YAML):
///
/// ```yaml
/// currency: USD
/// gpus:
///   "NVIDIA H100 80GB HBM3":           # the GPU model as NVML names it (GpuNode status, /v1/hardware)
///     serverlessPerGpuSecond: "0.00125" # per GPU-second of serverless use (a half-GPU replica pays half)
///     rentalPerGpuHour: "3.50"          # per GPU-hour rented, billed per started hour
///     lendingShare: "0.5"               # share of the serverless price credited per lent GPU-second, 0..1
/// ```
///
/// Amounts are exact decimals (at most 9 decimals); quote them so YAML does not read them as floats.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFileText {
    currency: String,
    gpus: BTreeMap<String, PriceEntry>,
}

/// Errors of reading a price file.
#[derive(Debug, thiserror::Error)]
pub enum PricesError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not YAML of the expected shape (a missing or unknown field, a wrong type): serde's message names the field
    /// and line.
    #[error("{origin}: {message}")]
    Shape {
        /// Where the text came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A price or share that is not valid.
    #[error("{origin}: gpus.{model:?}.{field}: {reason}")]
    Price {
        /// Where the text came from.
        origin: String,
        /// The GPU model.
        model: String,
        /// The field, as written in the file.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The currency is not a three-letter code.
    #[error("{origin}: currency {currency:?} is not an ISO 4217 code such as USD or EUR")]
    Currency {
        /// Where the text came from.
        origin: String,
        /// What was given.
        currency: String,
    },
    /// No GPU model has a price.
    #[error("{origin}: no GPU model has a price (gpus: is empty)")]
    Empty {
        /// Where the text came from.
        origin: String,
    },
}

/// Reading price files.
#[derive(Debug)]
pub struct PriceFile;

impl PriceFile {
    /// Parses a price file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> std::result::Result<PriceTable, PricesError> {
        let file: PriceFileText = serde_yaml::from_str(text)
            .map_err(|e| PricesError::Shape { origin: origin.to_owned(), message: e.to_string() })?;
        let currency = file.currency.trim().to_owned();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(PricesError::Currency { origin: origin.to_owned(), currency: file.currency });
        }
        if file.gpus.is_empty() {
            return Err(PricesError::Empty { origin: origin.to_owned() });
        }
        let mut table = PriceTable::new(currency);
        for (model, entry) in file.gpus {
            let bad = |field: &'static str, e: BillingError| {
                let reason = match e {
                    BillingError::InvalidPrice { reason, .. } => reason,
                    other => other.to_string(),
                };
                PricesError::Price { origin: origin.to_owned(), model: model.clone(), field, reason }
            };
            let (s, r, l) =
                (entry.serverless_per_gpu_second.text(), entry.rental_per_gpu_hour.text(), entry.lending_share.text());
            // Each field on its own, so the error names the one that is wrong as the file spells it.
            GpuPrice::parse(&model, &s, "0", "0").map_err(|e| bad("serverlessPerGpuSecond", e))?;
            GpuPrice::parse(&model, "0", &r, "0").map_err(|e| bad("rentalPerGpuHour", e))?;
            GpuPrice::parse(&model, "0", "0", &l).map_err(|e| bad("lendingShare", e))?;
            let price = GpuPrice::parse(&model, &s, &r, &l).map_err(|e| bad("prices", e))?;
            table = table.with(model, price);
        }
        Ok(table)
    }

    /// Reads and parses the price file at `path`.
    pub fn read(path: &Path) -> std::result::Result<PriceTable, PricesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PricesError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The price file `kiln up` writes on first run: the GPU models its simulated agent offers (the default
    /// `NVIDIA H100 80GB HBM3` and the other `--simulate-gpus` kinds) and the common NVIDIA data-centre models, at
    /// illustrative list prices to edit.
    pub const DEFAULT: &'static str = r#"# Prices of Kiln's metering, per GPU model (the model as NVML names it: `kiln get`, GET /v1/hardware).
# Written by `kiln up` on first run; edit it and restart. Amounts are exact decimals in `currency` (quote them).
#   serverlessPerGpuSecond  per GPU-second held by a serverless replica (a half-GPU replica pays half), by phase
#                           (loading, busy, idle-warm)
#   rentalPerGpuHour        per GPU-hour of a GpuRental, billed per started hour
#   lendingShare            share (0..1) of the serverless price credited to a rental's owner per lent GPU-second
# A GPU model in use without a price is an error (log, kiln_billing_unpriced_gpu_models), never billed as zero.
currency: USD
gpus:
  "NVIDIA H100 80GB HBM3":
    serverlessPerGpuSecond: "0.001525"
    rentalPerGpuHour: "3.99"
    lendingShare: "0.5"
  "NVIDIA H100 PCIe":
    serverlessPerGpuSecond: "0.001400"
    rentalPerGpuHour: "3.49"
    lendingShare: "0.5"
  "NVIDIA H200":
    serverlessPerGpuSecond: "0.001800"
    rentalPerGpuHour: "4.49"
    lendingShare: "0.5"
  "NVIDIA B200":
    serverlessPerGpuSecond: "0.002500"
    rentalPerGpuHour: "5.99"
    lendingShare: "0.5"
  "NVIDIA A100-SXM4-80GB":
    serverlessPerGpuSecond: "0.001400"
    rentalPerGpuHour: "1.89"
    lendingShare: "0.5"
  "NVIDIA A100-SXM4-40GB":
    serverlessPerGpuSecond: "0.001150"
    rentalPerGpuHour: "1.49"
    lendingShare: "0.5"
  "NVIDIA L40S":
    serverlessPerGpuSecond: "0.000975"
    rentalPerGpuHour: "1.19"
    lendingShare: "0.5"
  "NVIDIA L4":
    serverlessPerGpuSecond: "0.000250"
    rentalPerGpuHour: "0.49"
    lendingShare: "0.5"
"#;
}

#[cfg(test)]
mod tests {
    use kiln_core::billing::{ServerlessPhase, Subject, UsageKind};

    use super::*;

    const H100: &str = "NVIDIA H100 80GB HBM3";

    fn prices() -> PriceTable {
        PriceFile::parse(
            "currency: USD\ngpus:\n  \"NVIDIA H100 80GB HBM3\":\n    serverlessPerGpuSecond: \"0.001\"\n    \
             rentalPerGpuHour: \"3.60\"\n    lendingShare: \"0.5\"\n",
            "test",
        )
        .unwrap()
    }

    fn span(ns: &str, dep: &str, share: u32, phase: ServerlessPhase, from: f64, to: f64) -> ReplicaInterval {
        ReplicaInterval {
            replica: format!("{dep}-r1"),
            deployment: dep.into(),
            namespace: ns.into(),
            gpu_model: H100.into(),
            share_milli: share,
            phase,
            from,
            to,
        }
    }

    #[test]
    fn the_default_price_file_parses_and_covers_the_simulated_gpus() {
        let table = PriceFile::parse(PriceFile::DEFAULT, "default").unwrap();
        assert_eq!(table.currency, "USD");
        for model in [H100, "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA L40S", "NVIDIA L4"]
        {
            assert!(table.get(model).is_ok(), "{model}");
        }
        assert_eq!(table.get(H100).unwrap().rental_per_gpu_hour, Money::parse("3.99").unwrap());
    }

    #[test]
    fn each_bad_field_is_a_clear_error() {
        let file = |entry: &str| format!("currency: USD\ngpus:\n  H100:\n{entry}");
        let ok = "    serverlessPerGpuSecond: \"0.001\"\n    rentalPerGpuHour: \"3\"\n    lendingShare: \"0.5\"\n";
        assert!(PriceFile::parse(&file(ok), "p.yaml").is_ok());
        let cases = [
            (ok.replace("\"0.001\"", "\"-0.001\""), "p.yaml: gpus.\"H100\".serverlessPerGpuSecond: -0.001 is negative"),
            (ok.replace("\"3\"", "\"three\""), "gpus.\"H100\".rentalPerGpuHour: \"three\" is not a decimal"),
            (ok.replace("\"0.5\"", "\"1.5\""), "gpus.\"H100\".lendingShare"),
            (ok.replace("\"0.001\"", "\"0.0000000001\""), "more than 9 decimal places"),
            (ok.replace("    lendingShare: \"0.5\"\n", ""), "missing field `lendingShare`"),
            (format!("{ok}    spotPrice: \"1\"\n"), "unknown field `spotPrice`"),
        ];
        for (entry, expected) in cases {
            let err = PriceFile::parse(&file(&entry), "p.yaml").unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
        let err = PriceFile::parse(&file(ok).replace("USD", "dollars"), "p.yaml").unwrap_err().to_string();
        assert!(err.contains("ISO 4217"), "{err}");
        assert!(PriceFile::parse("currency: USD\ngpus: {}\n", "p").unwrap_err().to_string().contains("no GPU model"));
        // A YAML number is taken by its text.
        let numbers = "    serverlessPerGpuSecond: 0.0008\n    rentalPerGpuHour: 2.5\n    lendingShare: 1\n";
        let table = PriceFile::parse(&file(numbers), "p").unwrap();
        assert_eq!(table.get("H100").unwrap().serverless_per_gpu_second, Money::parse("0.0008").unwrap());
    }

    #[test]
    fn spans_become_records_once_and_queries_sum_them() {
        let metrics = crate::metrics::Metrics::new();
        let billing = Billing::new(prices(), Box::new(MemoryLedger::new()), metrics.billing_counters());
        let t0 = 1_795_680_000.0; // 2026-11-26T08:00:00Z, a minute boundary
        billing.observe(&span("a", "a/d", 500, ServerlessPhase::Busy, t0, t0 + 30.0)).unwrap();
        billing.observe(&span("a", "a/d", 500, ServerlessPhase::IdleWarm, t0 + 30.0, t0 + 90.0)).unwrap();
        billing.observe(&span("b", "b/e", 1000, ServerlessPhase::Loading, t0, t0 + 10.0)).unwrap();
        let closed = billing.close(t0 + 60.0).unwrap();
        assert_eq!((closed.emitted, closed.appended, closed.pending), (3, 3, 0));
        // The rest of the idle time is in the next window.
        assert_eq!(billing.close(t0 + 119.0).unwrap().emitted, 0);
        assert_eq!(billing.close(t0 + 120.0).unwrap().appended, 1);

        let a = billing.usage(&Query::namespace("a"), GroupBy::Phase).unwrap();
        assert_eq!(a.groups.keys().collect::<Vec<_>>(), ["busy", "idle-warm"]);
        // 0.5 GPU × 30 s × $0.001 = $0.015 busy; 0.5 × 60 s = $0.03 idle-warm.
        assert_eq!(a.groups["busy"].amount, Money::parse("0.015").unwrap());
        assert_eq!(a.groups["idle-warm"].micro_gpu_seconds, 30_000_000);
        assert_eq!(a.total.amount, Money::parse("0.045").unwrap());
        let all = billing.usage(&Query::all(), GroupBy::Namespace).unwrap();
        assert_eq!(all.groups["b"].amount, Money::parse("0.01").unwrap());

        // Appending the same records again is a no-op: counters do not move.
        let again = billing.records(&Query::all()).unwrap();
        assert_eq!(billing.append(again).unwrap(), 0);
        let text = metrics.render();
        assert!(text.contains(r#"kiln_billed_amount_total{namespace="a",phase="busy"} 0.015"#), "{text}");
        assert!(text.contains(r#"kiln_gpu_seconds_total{namespace="a",phase="idle-warm"} 30.0"#), "{text}");
        assert!(text.contains(r#"kiln_gpu_seconds_total{namespace="b",phase="loading"} 10.0"#), "{text}");
    }

    #[test]
    fn an_unpriced_model_is_reported_and_its_time_kept_not_billed_as_zero() {
        let metrics = crate::metrics::Metrics::new();
        let billing = Billing::new(prices(), Box::new(MemoryLedger::new()), metrics.billing_counters());
        let mut s = span("a", "a/d", 1000, ServerlessPhase::Busy, 0.0, 60.0);
        s.gpu_model = "NVIDIA B300".into();
        billing.observe(&s).unwrap();
        assert_eq!(billing.close(60.0), Err(BillingError::MissingPrice { model: "NVIDIA B300".into() }));
        assert!(billing.records(&Query::all()).unwrap().is_empty(), "nothing billed as zero");
        assert!(metrics.render().contains(r#"kiln_billing_unpriced_gpu_models{gpu_model="NVIDIA B300"} 1"#));
        assert_eq!(billing.check_models(["NVIDIA B300", H100, ""]), ["NVIDIA B300"]);
        assert!(billing.prediction_amount("NVIDIA B300", 1000, 1.0).is_err());
    }

    #[test]
    fn a_prediction_is_priced_exactly_by_share_and_time() {
        let billing = Billing::in_memory(prices());
        // A quarter GPU for 1.234 s at $0.001/GPU-s = $0.0003085.
        assert_eq!(billing.prediction_amount(H100, 250, 1.234).unwrap(), Money::parse("0.0003085").unwrap());
        assert_eq!(billing.prediction_amount(H100, 2000, 0.5).unwrap(), Money::parse("0.001").unwrap());
    }

    #[test]
    fn statements_total_their_line_items() {
        let billing = Billing::in_memory(prices());
        let t0 = 1_795_680_000.0;
        billing.observe(&span("a", "a/d", 1000, ServerlessPhase::Busy, t0, t0 + 60.0)).unwrap();
        billing.observe(&span("a", "a/e", 250, ServerlessPhase::Loading, t0, t0 + 60.0)).unwrap();
        billing.close(t0 + 60.0).unwrap();
        let credit = UsageRecord::new(
            RENTAL_SOURCE,
            "a",
            Subject::Rental("r".into()),
            UsageKind::Credit,
            H100,
            Quantity::MicroGpuSeconds(1_000_000),
            Money::parse("-0.001").unwrap(),
            secs_to_ms(t0),
            secs_to_ms(t0 + 1.0),
        );
        billing.append(vec![credit]).unwrap();
        let s = billing.statement("a", 2026, 11).unwrap();
        assert_eq!(s.items.len(), 3);
        let sum = Money::sum(s.items.iter().map(|i| i.totals.amount)).unwrap();
        assert_eq!(s.total, sum);
        assert_eq!(s.total, Money::parse("0.074").unwrap(), "0.06 + 0.015 - 0.001");
        assert!(billing.statement("a", 2026, 10).unwrap().items.is_empty());
    }
}
