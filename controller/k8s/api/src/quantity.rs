//! Converts the byte sizes people write in specs (`memoryPerGpu: 40Gi`, `size: 16G`) to bytes.
//!
//! Follows the Kubernetes quantity grammar: a decimal number, then a binary suffix (`Ki` .. `Ei`), a decimal
//! suffix (`k`, `M`, `G`, `T`, `P`, `E`; `m` is milli) or an exponent (`e6`, `E9`). Fractions of a byte round up,
//! as the apiserver rounds quantities up.

use crate::{Error, Result};

/// Bytes in `quantity`, rounded up to a whole byte. Negative values and values past `u64::MAX` are errors.
pub fn parse_bytes(quantity: &str) -> Result<u64> {
    parse_scaled(quantity, 1)
}

/// Thousandths in `quantity`, rounded up (CPU: `500m` is 500 millicores, `2` is 2000, `0.25` is 250).
pub fn parse_milli(quantity: &str) -> Result<u64> {
    parse_scaled(quantity, 1000)
}

/// `quantity` times `scale`, rounded up.
fn parse_scaled(quantity: &str, scale: u128) -> Result<u64> {
    let invalid = || Error::InvalidQuantity(quantity.to_owned());
    let s = quantity.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(invalid());
    }
    if frac_part.contains('.') || frac_part.len() > 18 {
        return Err(invalid());
    }
    // value = digits / 10^frac_len * multiplier, where the multiplier is num / den.
    let digits: u128 = format!("{int_part}{frac_part}").parse().map_err(|_| invalid())?;
    let frac_den = 10u128.pow(frac_part.len() as u32);
    let (num, den): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().map_err(|_| invalid())?;
            if !(-18..=18).contains(&e) {
                return Err(invalid());
            }
            if e >= 0 { (10u128.pow(e as u32), 1) } else { (1, 10u128.pow((-e) as u32)) }
        }
        _ => return Err(invalid()),
    };
    let numerator = digits.checked_mul(num).and_then(|n| n.checked_mul(scale)).ok_or_else(invalid)?;
    let denominator = frac_den * den;
    let bytes = numerator.div_ceil(denominator);
    u64::try_from(bytes).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::{parse_bytes, parse_milli};

    #[test]
    fn cpu_in_millicores() {
        for (q, want) in [("500m", 500), ("2", 2000), ("0.25", 250), ("1.5", 1500), ("100m", 100), ("0.0001", 1)] {
            assert_eq!(parse_milli(q).unwrap(), want, "{q}");
        }
        assert!(parse_milli("-1").is_err());
    }

    #[test]
    fn binary_decimal_and_exponent_forms() {
        let cases = [
            ("0", 0),
            ("512", 512),
            ("1Ki", 1024),
            ("40Gi", 40 << 30),
            ("1.5Gi", 3 << 29),
            ("80G", 80_000_000_000),
            ("0.5k", 500),
            ("1e3", 1000),
            ("2E9", 2_000_000_000),
            ("+3M", 3_000_000),
            ("1500m", 2), // 1.5 bytes rounds up
            ("15Ei", 15 << 60),
        ];
        for (q, want) in cases {
            assert_eq!(parse_bytes(q).unwrap(), want, "{q}");
        }
    }

    #[test]
    fn malformed_negative_and_overflowing_quantities_are_errors() {
        for q in ["", "Gi", "-1Gi", "1.2.3", "40GB", "4 Gi", "1e40", "16Ei", "1e-19", "x"] {
            let err = parse_bytes(q).expect_err(q);
            assert!(err.to_string().contains("invalid quantity"), "{q}: {err}");
        }
    }
}
