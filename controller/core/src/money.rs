//! Exact money: amounts as integer nano-units of one currency, never floats.
//!
//! Owns [`Money`] (an `i128` count of nano-units: 1 USD = 1 000 000 000), parsing from and formatting to decimal
//! strings, checked arithmetic, and the one rounding rule of the core. It knows nothing of prices, GPUs or time;
//! [`billing`](crate::billing) and [`rental`](crate::rental) build on it. It must not grow a float anywhere on a
//! path that produces an amount.
//!
//! # Rounding rules
//! - Parsing is exact: a string with more than [`DECIMALS`] decimals is an error, never rounded.
//! - Multiplying by an integer (GPU-hours × price per GPU-hour, GPU count × price) is exact; overflow is an error.
//! - Where a division cannot be avoided (micro-GPU-seconds × price per GPU-second ÷ 10⁶; lost GPU-milliseconds ×
//!   price per hour ÷ 3 600 000), [`Money::mul_div`] rounds **half-up at the nano-unit** (half away from zero for
//!   negative amounts, so a credit rounds exactly like the charge it offsets). That is the only rounding that happens
//!   to an amount that is summed; display rounding ([`Money::round_dp`]) is for presentation only.
//! - Per-started-hour billing rounds *time* up (61 minutes = 2 hours) before any money is involved: see
//!   [`started_hours`].

use std::{fmt, str::FromStr};

/// Decimal places a [`Money`] keeps: nano-units.
pub const DECIMALS: u32 = 9;
/// Nano-units in one whole currency unit.
pub const NANOS_PER_UNIT: i128 = 1_000_000_000;
/// Milliseconds in one hour.
pub const MS_PER_HOUR: i64 = 3_600_000;

/// Errors of parsing decimals and of money arithmetic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not a plain decimal such as `2.50` or `-0.000691`.
    #[error("{input:?} is not a decimal number (expected digits with an optional '-' and '.', e.g. \"2.50\")")]
    Syntax {
        /// The string given.
        input: String,
    },
    /// More decimal places than the type keeps; rounding it silently would change the amount.
    #[error("{input:?} has more than {max} decimal places")]
    TooPrecise {
        /// The string given.
        input: String,
        /// Decimal places allowed.
        max: u32,
    },
    /// The result does not fit.
    #[error("amount overflow in {operation}")]
    Overflow {
        /// The operation that overflowed.
        operation: &'static str,
    },
    /// Division by zero or a negative divisor in [`Money::mul_div`].
    #[error("invalid divisor {0} (must be > 0)")]
    Divisor(i128),
}

/// An exact amount of one currency in nano-units (10⁻⁹). Negative amounts are credits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i128);

impl Money {
    /// Zero.
    pub const ZERO: Money = Money(0);

    /// An amount of `nanos` nano-units.
    pub const fn from_nanos(nanos: i128) -> Self {
        Money(nanos)
    }

    /// Whole currency units, e.g. `Money::from_units(3)` is 3.00.
    pub const fn from_units(units: i64) -> Self {
        Money(units as i128 * NANOS_PER_UNIT)
    }

    /// The amount in nano-units.
    pub const fn nanos(self) -> i128 {
        self.0
    }

    /// True when the amount is below zero (a credit).
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Parses a decimal such as `"2.50"`, `"-1"` or `"0.000691667"`; at most [`DECIMALS`] decimal places.
    pub fn parse(s: &str) -> Result<Self, MoneyError> {
        parse_fixed(s, DECIMALS).map(Money)
    }

    /// `self + other`, or an overflow error.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.0.checked_add(other.0).map(Money).ok_or(MoneyError::Overflow { operation: "add" })
    }

    /// `self - other`, or an overflow error.
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.0.checked_sub(other.0).map(Money).ok_or(MoneyError::Overflow { operation: "subtract" })
    }

    /// `-self`, or an overflow error.
    pub fn checked_neg(self) -> Result<Money, MoneyError> {
        self.0.checked_neg().map(Money).ok_or(MoneyError::Overflow { operation: "negate" })
    }

    /// `self × k`, exact, or an overflow error.
    pub fn checked_mul(self, k: i128) -> Result<Money, MoneyError> {
        self.0.checked_mul(k).map(Money).ok_or(MoneyError::Overflow { operation: "multiply" })
    }

    /// `self × num ÷ den`, rounded half-up at the nano-unit (half away from zero when negative). `den` must be > 0.
    pub fn mul_div(self, num: i128, den: i128) -> Result<Money, MoneyError> {
        if den <= 0 {
            return Err(MoneyError::Divisor(den));
        }
        let product = self.0.checked_mul(num).ok_or(MoneyError::Overflow { operation: "multiply" })?;
        Ok(Money(div_half_up(product, den)))
    }

    /// The amount rounded half-up to `dp` decimal places (for display: "2.4967" → "2.50" with `dp = 2`).
    pub fn round_dp(self, dp: u32) -> Money {
        if dp >= DECIMALS {
            return self;
        }
        let step = 10i128.pow(DECIMALS - dp);
        Money(div_half_up(self.0, step) * step)
    }

    /// The sum of `amounts`, or an overflow error.
    pub fn sum<I: IntoIterator<Item = Money>>(amounts: I) -> Result<Money, MoneyError> {
        amounts.into_iter().try_fold(Money::ZERO, Money::checked_add)
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Money::parse(s)
    }
}

/// Formats with at least two decimals and no trailing zeros past them: `2.50`, `0.000691667`, `-1.80`, `0.00`.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_fixed(self.0, DECIMALS, 2))
    }
}

/// `value ÷ den` rounded half away from zero; `den > 0`.
fn div_half_up(value: i128, den: i128) -> i128 {
    let q = value / den;
    let r = value % den;
    // |r| < den, so 2|r| cannot overflow unless den is close to i128::MAX; compare without doubling.
    if r.abs() >= den - r.abs() { q + value.signum() } else { q }
}

/// Parses a plain decimal into an integer scaled by 10^`scale` (`"2.5"` with scale 9 → 2 500 000 000). Exact: more
/// than `scale` decimals is an error. Shared by [`Money`] and the ratios of [`billing`](crate::billing).
pub fn parse_fixed(s: &str, scale: u32) -> Result<i128, MoneyError> {
    let syntax = || MoneyError::Syntax { input: s.to_string() };
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = match body.split_once('.') {
        Some((w, f)) => (w, f),
        None => (body, ""),
    };
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || (body.contains('.') && frac.is_empty()) {
        return Err(syntax());
    }
    if frac.len() > scale as usize {
        return Err(MoneyError::TooPrecise { input: s.to_string(), max: scale });
    }
    let overflow = MoneyError::Overflow { operation: "parse" };
    let mut value: i128 = 0;
    for b in whole.bytes().chain(frac.bytes()) {
        value = value.checked_mul(10).and_then(|v| v.checked_add(i128::from(b - b'0'))).ok_or(overflow.clone())?;
    }
    let pad = 10i128.pow(scale - frac.len() as u32);
    value = value.checked_mul(pad).ok_or(overflow)?;
    Ok(if negative { -value } else { value })
}

/// Formats an integer scaled by 10^`scale` as a decimal with at least `min_dp` decimals.
pub fn format_fixed(value: i128, scale: u32, min_dp: u32) -> String {
    let unit = 10u128.pow(scale);
    let magnitude = value.unsigned_abs();
    let whole = magnitude / unit;
    let mut frac = format!("{:0width$}", magnitude % unit, width = scale as usize);
    while frac.len() > min_dp as usize && frac.ends_with('0') {
        frac.pop();
    }
    let sign = if value < 0 { "-" } else { "" };
    if frac.is_empty() { format!("{sign}{whole}") } else { format!("{sign}{whole}.{frac}") }
}

/// Hours billed for `active_ms` milliseconds of use when every started hour is billed: ⌈ms ÷ 3 600 000⌉
/// (0 ms → 0 hours, 1 ms → 1 hour, 61 minutes → 2 hours). Negative input counts as 0.
pub fn started_hours(active_ms: i64) -> i64 {
    if active_ms <= 0 { 0 } else { (active_ms - 1) / MS_PER_HOUR + 1 }
}

/// Seconds (as the rest of the core passes time) to integer milliseconds, rounded to the nearest millisecond.
/// Every quantity that is billed is computed from these integers, so the same timeline always bills the same.
pub fn secs_to_ms(secs: f64) -> i64 {
    (secs * 1000.0).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        for (input, nanos, shown) in [
            ("2.50", 2_500_000_000, "2.50"),
            ("2.5", 2_500_000_000, "2.50"),
            ("0", 0, "0.00"),
            ("-1.8", -1_800_000_000, "-1.80"),
            ("0.000691667", 691_667, "0.000691667"),
            ("12", 12_000_000_000, "12.00"),
            ("0.000000001", 1, "0.000000001"),
        ] {
            let m = Money::parse(input).unwrap();
            assert_eq!(m.nanos(), nanos, "{input}");
            assert_eq!(m.to_string(), shown, "{input}");
            assert_eq!(Money::parse(&m.to_string()).unwrap(), m, "{input} round trip");
        }
    }

    #[test]
    fn rejects_bad_syntax_and_excess_precision() {
        for bad in ["", "-", ".5", "5.", "1,5", "+1", "1e3", " 1", "1.2.3", "abc", "--1"] {
            assert!(matches!(Money::parse(bad), Err(MoneyError::Syntax { .. })), "{bad:?} accepted");
        }
        assert!(matches!(Money::parse("0.0000000001"), Err(MoneyError::TooPrecise { max: 9, .. })));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert!(matches!(Money::parse(&"9".repeat(40)), Err(MoneyError::Overflow { .. })));
        let big = Money::from_nanos(i128::MAX);
        assert!(big.checked_add(Money::from_nanos(1)).is_err());
        assert!(big.checked_mul(2).is_err());
        assert!(Money::from_nanos(i128::MIN).checked_neg().is_err());
        assert!(Money::sum([big, big]).is_err());
        assert!(Money::from_units(1).mul_div(1, 0).is_err());
    }

    #[test]
    fn mul_div_rounds_half_up_at_the_nano() {
        // 1 nano × 1 / 2 = 0.5 nano → 1; 1 × 1/3 → 0; negative halves round away from zero.
        assert_eq!(Money::from_nanos(1).mul_div(1, 2).unwrap().nanos(), 1);
        assert_eq!(Money::from_nanos(1).mul_div(1, 3).unwrap().nanos(), 0);
        assert_eq!(Money::from_nanos(-1).mul_div(1, 2).unwrap().nanos(), -1);
        assert_eq!(Money::from_nanos(5).mul_div(1, 4).unwrap().nanos(), 1); // 1.25 → 1
        assert_eq!(Money::from_nanos(7).mul_div(1, 4).unwrap().nanos(), 2); // 1.75 → 2
        // $2.49/h for 1 s: 2.49 / 3600 = 0.000691666666… → 0.000691667.
        assert_eq!(
            Money::parse("2.49").unwrap().mul_div(1000, MS_PER_HOUR as i128).unwrap().to_string(),
            "0.000691667"
        );
    }

    #[test]
    fn display_rounding_is_half_up() {
        assert_eq!(Money::parse("2.495").unwrap().round_dp(2).to_string(), "2.50");
        assert_eq!(Money::parse("2.494999999").unwrap().round_dp(2).to_string(), "2.49");
        assert_eq!(Money::parse("-2.495").unwrap().round_dp(2).to_string(), "-2.50");
    }

    #[test]
    fn started_hours_round_up() {
        assert_eq!(started_hours(0), 0);
        assert_eq!(started_hours(1), 1);
        assert_eq!(started_hours(MS_PER_HOUR), 1);
        assert_eq!(started_hours(61 * 60_000), 2);
        assert_eq!(started_hours(-5), 0);
        assert_eq!(secs_to_ms(1.0005), 1001);
    }
}
