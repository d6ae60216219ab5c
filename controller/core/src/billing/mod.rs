//! Billing: prices, usage records, the ledger interface, the meter and monthly statements.
//!
//! Owns the money side of the core, as pure data and functions:
//! - [`prices`]: per GPU model, the serverless price per GPU-second, the rental price per GPU-hour and the share of
//!   the serverless price a rental's owner is credited for lent GPU-seconds. A model without a price is an error.
//! - [`usage`]: [`UsageRecord`] — one measured quantity and its amount, with an id made where it is measured,
//!   deterministic in (source, subject, kind, period) so that a retry produces the same id.
//! - [`ledger`]: the [`Ledger`] trait (idempotent append by id, query, sums by group) and [`MemoryLedger`], the
//!   in-memory implementation. The durable, replicated ledger (raft) implements the same trait later; nothing here
//!   depends on which implementation is behind it.
//! - [`meter`]: [`Meter`] turns observed replica phase intervals into per-phase GPU-second records per deployment
//!   per window, and [`meter::rental_records`] turns a rental's delivery into per-started-hour records and credits.
//! - [`statement`]: a tenant's monthly statement, whose total is the exact sum of its line items.
//!
//! What it must not touch: no I/O, no clock (times come in as seconds or integer milliseconds), no Kubernetes or
//! HTTP types, no floats on any path that produces an amount ([`Money`](crate::money::Money) is integer
//! nano-units). It decides nothing about placement or a rental's phase; [`rental`](crate::rental) owns the lifecycle.
//!
//! # Units
//! Record periods are integer milliseconds since the Unix epoch (converted once from seconds with
//! [`secs_to_ms`](crate::money::secs_to_ms)). GPU-time is metered in micro-GPU-seconds (milli-GPU × milliseconds),
//! so a half-GPU share for 1.5 s is exactly 750 000; rental time in whole GPU-hours per started hour.

pub mod ledger;
pub mod meter;
pub mod prices;
pub mod statement;
pub mod usage;

pub use ledger::{Appended, GroupBy, Ledger, LedgerStatus, MemoryLedger, Query, Totals};
pub use meter::{Meter, ReplicaInterval};
pub use prices::{GpuPrice, PriceTable, Ratio};
pub use statement::{LineItem, Statement};
pub use usage::{Quantity, RecordId, ServerlessPhase, Subject, UsageKind, UsageRecord};

use crate::money::MoneyError;

/// Errors of billing: bad prices, missing prices, ledger conflicts, late meter input, arithmetic overflow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingError {
    /// No price is configured for a GPU model that was used: never billed as zero.
    #[error("no price configured for GPU model {model:?}")]
    MissingPrice {
        /// The GPU model.
        model: String,
    },
    /// A configured price or share is invalid (negative, a share above 1, not a decimal).
    #[error("invalid {field} for GPU model {model:?}: {reason}")]
    InvalidPrice {
        /// The GPU model.
        model: String,
        /// Which setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A record with this id is already in the ledger with different contents.
    #[error("usage record {id} conflicts with the record already stored under that id")]
    Conflict {
        /// The id.
        id: String,
    },
    /// A record is not well formed (period end before start, quantity of the wrong unit for its kind, ...).
    #[error("invalid usage record {id}: {reason}")]
    InvalidRecord {
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A meter interval reaches into a window that was already closed and emitted.
    #[error(
        "interval of replica {replica} starts at {from_ms} ms, before the meter's closed watermark {watermark_ms} ms"
    )]
    LateInterval {
        /// Replica id.
        replica: String,
        /// Interval start, ms.
        from_ms: i64,
        /// Everything before this was emitted, ms.
        watermark_ms: i64,
    },
    /// A meter input is not well formed (end before start, a share outside 1..=1000 milli-GPU, zero window).
    #[error("invalid meter input: {0}")]
    InvalidInput(String),
    /// The ledger cannot be read or written now (a replicated ledger without a leader or a quorum, or one that
    /// answered too late): nothing was changed by the failed call, and it may be retried.
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
    /// A ratio (a lending share) below 0 or above 1.
    #[error("{0:?} is not between 0 and 1")]
    RatioOutOfRange(String),
    /// Money parsing or arithmetic failed.
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// Result of billing operations.
pub type Result<T, E = BillingError> = std::result::Result<T, E>;

/// The UTC calendar day (`YYYY-MM-DD`) of a time in milliseconds since the Unix epoch.
pub fn utc_day(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The start and end (exclusive), in milliseconds since the Unix epoch, of a UTC calendar month (`month` 1..=12).
pub fn month_bounds_ms(year: i64, month: u32) -> (i64, i64) {
    let start = days_from_civil(year, month, 1);
    let (ny, nm) = if month >= 12 { (year + 1, 1) } else { (year, month + 1) };
    let end = days_from_civil(ny, nm, 1);
    (start * 86_400_000, end * 86_400_000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_helpers() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(-1), "1969-12-31");
        // 2026-11-26T09:00:00Z
        assert_eq!(utc_day(1_795_683_600_000), "2026-11-26");
        let (s, e) = month_bounds_ms(2024, 2);
        assert_eq!(utc_day(s), "2024-02-01");
        assert_eq!((e - s) / 86_400_000, 29, "leap February");
        let (s, e) = month_bounds_ms(2026, 12);
        assert_eq!(utc_day(s), "2026-12-01");
        assert_eq!(utc_day(e), "2027-01-01");
    }
}
