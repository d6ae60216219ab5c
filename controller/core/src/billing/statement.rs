//! A tenant's statement for a period (usually a calendar month): line items and totals that add up exactly.
//!
//! Owns [`Statement`] and its CSV rendering. It reads a [`Ledger`] through the trait and nothing
//! else; it does not decide prices (records carry their amounts) or who may see it (the API checks the key).

use std::collections::BTreeMap;

use super::{Ledger, Query, Result, Subject, Totals, UsageKind, month_bounds_ms};
use crate::money::{Money, format_fixed};

/// One line: the usage of one kind, of one deployment or rental, on one GPU model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineItem {
    /// Deployment or rental.
    pub subject: Subject,
    /// What kind of usage.
    pub kind: UsageKind,
    /// GPU model.
    pub gpu_model: String,
    /// Quantities and amount of the line.
    pub totals: Totals,
}

/// A tenant's statement for `[from_ms, to_ms)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The tenant.
    pub namespace: String,
    /// Currency code of the amounts.
    pub currency: String,
    /// Period start, ms (inclusive).
    pub from_ms: i64,
    /// Period end, ms (exclusive).
    pub to_ms: i64,
    /// Lines, ordered by subject, kind and GPU model.
    pub items: Vec<LineItem>,
    /// Sum of the positive line amounts.
    pub charges: Money,
    /// Sum of the negative line amounts (≤ 0).
    pub credits: Money,
    /// `charges + credits`: exactly the sum of every line item's amount.
    pub total: Money,
}

impl Statement {
    /// The statement of `namespace` over `[from_ms, to_ms)`, from the records whose period starts in it.
    pub fn build(ledger: &dyn Ledger, namespace: &str, currency: &str, from_ms: i64, to_ms: i64) -> Result<Self> {
        let query = Query::namespace(namespace).between(from_ms, to_ms);
        let mut lines: BTreeMap<(Subject, UsageKind, String), Totals> = BTreeMap::new();
        for r in ledger.query(&query)? {
            lines.entry((r.subject.clone(), r.kind, r.gpu_model.clone())).or_default().add(&r)?;
        }
        let items: Vec<LineItem> = lines
            .into_iter()
            .map(|((subject, kind, gpu_model), totals)| LineItem { subject, kind, gpu_model, totals })
            .collect();
        let amounts = || items.iter().map(|i| i.totals.amount);
        let charges = Money::sum(amounts().filter(|a| !a.is_negative()))?;
        let credits = Money::sum(amounts().filter(|a| a.is_negative()))?;
        let total = charges.checked_add(credits)?;
        Ok(Statement {
            namespace: namespace.to_string(),
            currency: currency.to_string(),
            from_ms,
            to_ms,
            items,
            charges,
            credits,
            total,
        })
    }

    /// The statement of `namespace` for the UTC calendar month `year`-`month` (1..=12).
    pub fn monthly(ledger: &dyn Ledger, namespace: &str, currency: &str, year: i64, month: u32) -> Result<Self> {
        let (from, to) = month_bounds_ms(year, month);
        Self::build(ledger, namespace, currency, from, to)
    }

    /// CSV: a header, one row per line item, then `charges`, `credits` and `total` rows. GPU-seconds with six
    /// decimals, amounts with all nine.
    pub fn to_csv(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let mut out = String::from("namespace,subject,kind,gpu_model,gpu_seconds,gpu_hours,amount,currency\n");
        for i in &self.items {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                q(&self.namespace),
                q(&i.subject.to_string()),
                i.kind.as_str(),
                q(&i.gpu_model),
                format_fixed(i128::from(i.totals.micro_gpu_seconds), 6, 0),
                i.totals.gpu_hours,
                i.totals.amount,
                self.currency
            ));
        }
        for (label, amount) in [("charges", self.charges), ("credits", self.credits), ("total", self.total)] {
            out.push_str(&format!("{},,{label},,,,{amount},{}\n", q(&self.namespace), self.currency));
        }
        out
    }
}
