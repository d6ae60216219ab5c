//! Prices as configuration data: per GPU model, what a GPU-second of serverless use and a GPU-hour of rental
//! cost, and the share of the serverless price an owner earns for lending an idle rented GPU.
//!
//! Owns [`PriceTable`] and its validation. It does not read files or chart values: the composition root parses
//! those and hands the decimal strings to [`GpuPrice::parse`]. A model with no entry is
//! [`BillingError::MissingPrice`], never a silent zero.

use std::{collections::BTreeMap, fmt};

use super::{BillingError, Result};
use crate::money::{Money, format_fixed, parse_fixed};

/// A ratio between 0 and 1 in parts per million, parsed exactly from a decimal (`"0.5"` → 500 000).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ratio(u32);

impl Ratio {
    /// Parts per million in one.
    pub const ONE_PPM: u32 = 1_000_000;
    /// Zero.
    pub const ZERO: Ratio = Ratio(0);

    /// A ratio of `ppm` parts per million; `None` above one.
    pub const fn from_ppm(ppm: u32) -> Option<Self> {
        if ppm <= Self::ONE_PPM { Some(Ratio(ppm)) } else { None }
    }

    /// Parts per million.
    pub const fn ppm(self) -> u32 {
        self.0
    }

    /// Parses a decimal in `0..=1` with at most 6 decimals (`"0.5"`, `"1"`, `"0.125"`).
    pub fn parse(s: &str) -> Result<Self> {
        let ppm = parse_fixed(s, 6)?;
        u32::try_from(ppm).ok().and_then(Ratio::from_ppm).ok_or_else(|| BillingError::RatioOutOfRange(s.to_owned()))
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_fixed(i128::from(self.0), 6, 1))
    }
}

/// The prices of one GPU model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuPrice {
    /// Serverless use, per GPU-second (a replica holding half a GPU pays half).
    pub serverless_per_gpu_second: Money,
    /// Rental, per GPU-hour; billed per started hour.
    pub rental_per_gpu_hour: Money,
    /// Share of the serverless price credited to a rental's owner per lent GPU-second.
    pub lending_share: Ratio,
}

impl GpuPrice {
    /// Parses the three settings of `model` from decimal strings (e.g. `"0.0008"`, `"2.49"`, `"0.5"`); prices must
    /// not be negative.
    pub fn parse(
        model: &str,
        serverless_per_gpu_second: &str,
        rental_per_gpu_hour: &str,
        lending_share: &str,
    ) -> Result<Self> {
        let invalid = |field: &'static str, reason: String| BillingError::InvalidPrice {
            model: model.to_string(),
            field,
            reason,
        };
        let price = |field: &'static str, s: &str| -> Result<Money> {
            let m = Money::parse(s).map_err(|e| invalid(field, e.to_string()))?;
            if m.is_negative() {
                return Err(invalid(field, format!("{s} is negative")));
            }
            Ok(m)
        };
        Ok(GpuPrice {
            serverless_per_gpu_second: price("serverless price per GPU-second", serverless_per_gpu_second)?,
            rental_per_gpu_hour: price("rental price per GPU-hour", rental_per_gpu_hour)?,
            lending_share: Ratio::parse(lending_share).map_err(|e| invalid("lending share", e.to_string()))?,
        })
    }
}

/// Prices of every GPU model, in one currency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    /// ISO 4217 code shown next to amounts, e.g. `USD`.
    pub currency: String,
    by_model: BTreeMap<String, GpuPrice>,
}

impl PriceTable {
    /// An empty table in `currency`.
    pub fn new(currency: impl Into<String>) -> Self {
        PriceTable { currency: currency.into(), by_model: BTreeMap::new() }
    }

    /// Sets the prices of `model` (replacing any earlier entry); returns the table for chaining.
    pub fn with(mut self, model: impl Into<String>, price: GpuPrice) -> Self {
        self.by_model.insert(model.into(), price);
        self
    }

    /// The prices of `model`, or [`BillingError::MissingPrice`].
    pub fn get(&self, model: &str) -> Result<&GpuPrice> {
        self.by_model.get(model).ok_or_else(|| BillingError::MissingPrice { model: model.to_string() })
    }

    /// Checks that every model in `models` (e.g. the fleet's) has a price; the first missing one is the error. Run
    /// at start-up so a missing price stops the configuration, not a bill.
    pub fn check_covers<'a>(&self, models: impl IntoIterator<Item = &'a str>) -> Result<()> {
        models.into_iter().try_for_each(|m| self.get(m).map(|_| ()))
    }

    /// The models priced, in order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.by_model.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prices_and_rejects_bad_ones() {
        let p = GpuPrice::parse("H100", "0.0008", "2.49", "0.5").unwrap();
        assert_eq!(p.serverless_per_gpu_second.nanos(), 800_000);
        assert_eq!(p.rental_per_gpu_hour.to_string(), "2.49");
        assert_eq!(p.lending_share.ppm(), 500_000);
        assert_eq!(p.lending_share.to_string(), "0.5");
        assert!(
            matches!(GpuPrice::parse("H100", "-1", "2", "0"), Err(BillingError::InvalidPrice { field, .. }) if field.starts_with("serverless"))
        );
        assert!(
            matches!(GpuPrice::parse("H100", "1", "x", "0"), Err(BillingError::InvalidPrice { field, .. }) if field.starts_with("rental"))
        );
        assert!(matches!(
            GpuPrice::parse("H100", "1", "2", "1.5"),
            Err(BillingError::InvalidPrice { field: "lending share", .. })
        ));
        assert!(GpuPrice::parse("H100", "1", "2", "1").is_ok());
    }

    #[test]
    fn a_missing_price_is_an_error_not_zero() {
        let table = PriceTable::new("USD").with("H100", GpuPrice::parse("H100", "0.0008", "2.49", "0.5").unwrap());
        assert!(table.get("H100").is_ok());
        assert_eq!(table.get("H200"), Err(BillingError::MissingPrice { model: "H200".into() }));
        assert_eq!(table.check_covers(["H100", "A100"]), Err(BillingError::MissingPrice { model: "A100".into() }));
        assert!(table.check_covers(["H100"]).is_ok());
    }
}
