//! The rental calendar of `kiln simulate serving --rentals FILE`: a YAML list of `GpuRental`s with times relative
//! to the trace's start, read into a checked [`RentalPlan`] (every rental valid for the fleet, no overlap of one
//! name, a price for the fleet's GPU model: the first error names the rental and nothing is applied).
//!
//! ```yaml
//! rentals:
//!   - namespace: team-a        # the tenant
//!     name: finetune
//!     gpuModel: h100-80gb      # the fleet's GPU model (the part of --fleet before ':')
//!     count: 8                 # whole GPUs
//!     start: 6h                # startTime: an offset from the trace's start (s, m, h, d) or RFC 3339;
//!                              # omitted: as soon as the GPUs are free after the rental is created
//!     hours: 12                # or end: 18h (exactly one of them)
//!     lendWhenIdle: true       # default false
//!     createdAt: 1h            # when the object is created; default: the trace's start
//!     cancelAt: 10h            # optional: the tenant cancels then
//! ```

use std::{fs, path::Path};

use anyhow::{Context, Result, anyhow, bail};
use kiln_core::{billing::PriceTable, rental::RentalConfig, rental::RentalSpec};
use kiln_sim::{
    serving::{FleetSpec, RentalPlan},
    traces,
};
use serde::Deserialize;

/// Whether rented GPUs are lent while idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lending {
    /// No rental lends, whatever the calendar says.
    Off,
    /// Every rental lends.
    On,
    /// As each rental's `lendWhenIdle` says.
    Calendar,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    rentals: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Time {
    Text(String),
    Number(f64),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    namespace: String,
    name: String,
    gpu_model: String,
    count: u32,
    #[serde(default)]
    start: Option<Time>,
    #[serde(default)]
    hours: Option<u32>,
    #[serde(default)]
    end: Option<Time>,
    #[serde(default)]
    lend_when_idle: bool,
    #[serde(default)]
    created_at: Option<Time>,
    #[serde(default)]
    cancel_at: Option<Time>,
}

/// Seconds since the Unix epoch of RFC 3339 `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.split_once(['T', 't'])?;
    let (clock, offset_s) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0.0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (clock, offset) = time.split_at(at);
        let sign = if offset.starts_with('-') { -1.0 } else { 1.0 };
        let (h, m) = offset[1..].split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        if h > 23 || m > 59 {
            return None;
        }
        (clock, sign * f64::from(h * 3600 + m * 60))
    };
    Some(traces::parse_timestamp(&format!("{date} {clock}"))? - offset_s)
}

/// Seconds of a duration `<number><unit>`, unit `s`, `m`, `h` or `d` (`0` alone is zero).
fn parse_offset(s: &str) -> Option<f64> {
    let s = s.trim();
    if s == "0" {
        return Some(0.0);
    }
    let unit = match s.chars().last()? {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86_400.0,
        _ => return None,
    };
    let n: f64 = s[..s.len() - 1].trim().parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some(n * unit)
}

/// Simulated seconds of a calendar time: an offset from the trace's start, or an RFC 3339 instant.
fn sim_seconds(field: &str, t: &Time, start_epoch_s: f64) -> Result<f64> {
    match t {
        Time::Number(n) if *n == 0.0 => Ok(0.0),
        Time::Number(n) => bail!("{field}: {n} has no unit; write an offset like 6h or 90m, or an RFC 3339 time"),
        Time::Text(s) if s.contains(['T', 't']) && s.contains(':') => parse_rfc3339(s)
            .map(|abs| abs - start_epoch_s)
            .ok_or_else(|| anyhow!("{field}: {s:?} is not an RFC 3339 time such as 2026-01-01T06:00:00Z")),
        Time::Text(s) => parse_offset(s).ok_or_else(|| {
            anyhow!(
                "{field}: {s:?} is neither an offset from the trace's start (30s, 90m, 6h, 2d) nor an RFC 3339 time"
            )
        }),
    }
}

/// Reads a calendar from YAML `text` into a checked plan. `lending` overrides `lendWhenIdle`.
pub fn parse(
    text: &str,
    fleet: &FleetSpec,
    start_epoch_s: f64,
    prices: PriceTable,
    lending: Lending,
) -> Result<RentalPlan> {
    let file: File = serde_yaml::from_str(text).context("not a rental calendar (a `rentals:` list)")?;
    let mut rentals = Vec::with_capacity(file.rentals.len());
    for (i, e) in file.rentals.into_iter().enumerate() {
        let at = |field: &str, t: &Option<Time>| -> Result<Option<f64>> {
            t.as_ref()
                .map(|t| sim_seconds(field, t, start_epoch_s))
                .transpose()
                .with_context(|| format!("rental {} ({}/{})", i + 1, e.namespace, e.name))
        };
        let (start, end) = (at("start", &e.start)?, at("end", &e.end)?);
        let created = at("createdAt", &e.created_at)?.unwrap_or(0.0);
        let cancel = at("cancelAt", &e.cancel_at)?;
        let spec = RentalSpec {
            namespace: e.namespace.clone(),
            name: e.name.clone(),
            gpu_model: e.gpu_model.clone(),
            gpu_count: e.count,
            start_time: start.map(|s| start_epoch_s + s),
            hours: e.hours,
            end_time: end.map(|s| start_epoch_s + s),
            cancel: false,
            lend_when_idle: match lending {
                Lending::Off => false,
                Lending::On => true,
                Lending::Calendar => e.lend_when_idle,
            },
        };
        rentals.push((spec, created, cancel));
    }
    Ok(RentalPlan::new(rentals, start_epoch_s, prices, RentalConfig::default(), fleet)?)
}

/// Reads the calendar file at `path` (see [`parse`]).
pub fn load(
    path: &Path,
    fleet: &FleetSpec,
    start_epoch_s: f64,
    prices: PriceTable,
    lending: Lending,
) -> Result<RentalPlan> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text, fleet, start_epoch_s, prices, lending).with_context(|| format!("rental calendar {}", path.display()))
}

#[cfg(test)]
mod tests {
    use kiln_core::billing::GpuPrice;

    use super::*;

    /// 2026-01-01T00:00:00Z.
    const EPOCH: f64 = 1_767_225_600.0;

    fn fleet() -> FleetSpec {
        FleetSpec::parse("h100-80gb:8x2").unwrap()
    }

    fn prices() -> PriceTable {
        PriceTable::new("USD").with("h100-80gb", GpuPrice::parse("h100-80gb", "0.0007", "2", "0.5").unwrap())
    }

    fn read(yaml: &str, lending: Lending) -> Result<RentalPlan> {
        parse(yaml, &fleet(), EPOCH, prices(), lending)
    }

    fn error(yaml: &str) -> String {
        format!("{:#}", read(yaml, Lending::Calendar).unwrap_err())
    }

    const ONE: &str = "rentals:\n- {namespace: a, name: r, gpuModel: h100-80gb, count: 2";

    #[test]
    fn a_calendar_reads_offsets_and_rfc3339_times() {
        let yaml = "rentals:
- {namespace: a, name: now, gpuModel: h100-80gb, count: 8, hours: 4, createdAt: 30m, lendWhenIdle: true}
- {namespace: a, name: later, gpuModel: h100-80gb, count: 1, start: 2026-01-01T06:00:00+01:00, end: 1d}
- {namespace: b, name: gone, gpuModel: h100-80gb, count: 4, start: 6h, hours: 3, cancelAt: 2h}
";
        let plan = read(yaml, Lending::Calendar).unwrap();
        let r = &plan.rentals;
        assert_eq!((r[0].created_at_s, r[0].spec.start_time, r[0].spec.lend_when_idle), (1800.0, None, true));
        assert_eq!(r[1].spec.start_time, Some(EPOCH + 5.0 * 3600.0));
        assert_eq!((r[1].spec.end_time, r[1].spec.hours), (Some(EPOCH + 86_400.0), None));
        assert_eq!((r[2].spec.start_time, r[2].cancel_at_s), (Some(EPOCH + 21_600.0), Some(7200.0)));
        assert_eq!(r[2].key, "b/gone");
        let off = read(yaml, Lending::Off).unwrap();
        assert!(off.rentals.iter().all(|r| !r.spec.lend_when_idle));
        let on = read(yaml, Lending::On).unwrap();
        assert!(on.rentals.iter().all(|r| r.spec.lend_when_idle));
    }

    #[test]
    fn calendar_errors_name_the_rental_and_the_field() {
        assert_eq!(
            error(&format!("{ONE}, start: 6 hours, hours: 1}}")),
            "rental 1 (a/r): start: \"6 hours\" is neither an offset from the trace's start (30s, 90m, 6h, 2d) nor an \
             RFC 3339 time"
        );
        assert_eq!(
            error(&format!("{ONE}, start: 2026-13-01T00:00:00Z, hours: 1}}")),
            "rental 1 (a/r): start: \"2026-13-01T00:00:00Z\" is not an RFC 3339 time such as 2026-01-01T06:00:00Z"
        );
        assert_eq!(
            error(&format!("{ONE}, start: 3600, hours: 1}}")),
            "rental 1 (a/r): start: 3600 has no unit; write an offset like 6h or 90m, or an RFC 3339 time"
        );
        assert_eq!(
            error(&format!("{ONE}, hours: 1, end: 2h}}")),
            "rental 1 (a/r): set exactly one of hours or endTime"
        );
        assert_eq!(
            error(&format!("{ONE}, hours: 800}}")),
            "rental 1 (a/r): the rental lasts 800.00 hours; at most 744 are allowed"
        );
        assert_eq!(
            error("rentals:\n- {namespace: a, name: r, gpuModel: a100, count: 1, hours: 1}"),
            "rental 1 (a/r): no GPU of model \"a100\" in the fleet (models: h100-80gb)"
        );
        assert_eq!(
            error("rentals:\n- {namespace: a, name: r, gpuModel: h100-80gb, count: 0, hours: 1}"),
            "rental 1 (a/r): a rental needs at least one GPU"
        );
        assert_eq!(
            error(&format!(
                "{ONE}, start: 1h, hours: 3}}\n\
                 - {{namespace: a, name: r, gpuModel: h100-80gb, count: 1, start: 2h, hours: 1}}"
            )),
            "rental a/r overlaps another rental of the same name"
        );
        assert!(error(&format!("{ONE}, hours: 1, colour: red}}")).contains("unknown field `colour`"));
        assert!(error("rentals: 3").starts_with("not a rental calendar"));
    }

    #[test]
    fn the_calendar_shipped_in_examples_is_valid_for_the_serving_fleet() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rentals/calendar-2d.yaml");
        let fleet = FleetSpec::parse("h100-80gb:8x16").unwrap();
        let plan = load(&path, &fleet, EPOCH, prices(), Lending::Calendar).unwrap();
        assert!(plan.rentals.len() >= 18, "{} rentals", plan.rentals.len());
        assert!(plan.rentals.iter().any(|r| r.cancel_at_s.is_some()));
        assert!(plan.rentals.iter().any(|r| r.spec.lend_when_idle));
        assert!(plan.rentals.iter().any(|r| r.spec.start_time.is_none()));
    }
}
