//! Request traces for the serving simulator, parsed from text (the caller reads the files): ServeGen per-client
//! rate series and the Azure LLM inference trace. Every error names the file, the line and the field.

pub use crate::openb::TraceError;

/// Inter-arrival distribution within a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Exponential gaps (Poisson arrivals).
    Poisson,
    /// Gamma gaps with this shape.
    Gamma(f64),
    /// Weibull gaps with this shape.
    Weibull(f64),
}

/// One window of a ServeGen client: from `start_s`, `rate` requests/s with gaps shaped by `pattern`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Start, seconds from the trace start.
    pub start_s: f64,
    /// Mean request rate, requests/s.
    pub rate: f64,
    /// Shape of the inter-arrival times.
    pub pattern: Pattern,
}

/// Parses a ServeGen client file: no header, rows `timestamp_s,rate,cv,pattern,param1,param2`.
///
/// The pattern's shape parameter (`param1`) shapes the gaps; their mean is set by the window's rate. (The published
/// `param2` scales do not match the published rates, so the rate is taken as the truth.)
pub fn parse_servegen(file: &str, text: &str) -> Result<Vec<Window>, TraceError> {
    let err = |line: usize, field: &str, message: String| TraceError {
        file: file.to_owned(),
        line,
        field: field.to_owned(),
        message,
    };
    let mut windows: Vec<Window> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != 6 {
            return Err(err(
                line_no,
                "row",
                format!("{} fields, expected 6 (timestamp_s,rate,cv,pattern,param1,param2)", cells.len()),
            ));
        }
        let number = |idx: usize, field: &str| -> Result<f64, TraceError> {
            let v: f64 =
                cells[idx].parse().map_err(|_| err(line_no, field, format!("{:?} is not a number", cells[idx])))?;
            if !v.is_finite() || v < 0.0 {
                return Err(err(line_no, field, format!("{v} must be a non-negative number")));
            }
            Ok(v)
        };
        let start_s = number(0, "timestamp_s")?;
        let rate = number(1, "rate_req_per_s")?;
        if let Some(last) = windows.last()
            && start_s <= last.start_s
        {
            return Err(err(line_no, "timestamp_s", format!("{start_s} does not follow {}", last.start_s)));
        }
        let pattern = match cells[3] {
            "" => Pattern::Poisson,
            "Gamma" => Pattern::Gamma(number(4, "param1")?.clamp(0.05, 100.0)),
            "Weibull" => Pattern::Weibull(number(4, "param1")?.clamp(0.1, 100.0)),
            other => {
                return Err(err(line_no, "arrival_pattern", format!("{other:?}: expected Gamma, Weibull or empty")));
            }
        };
        windows.push(Window { start_s, rate, pattern });
    }
    if windows.is_empty() {
        return Err(err(1, "row", "the file has no windows".to_owned()));
    }
    Ok(windows)
}

/// One request of the Azure LLM trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRequest {
    /// Arrival, seconds from the first request.
    pub at_s: f64,
    /// Prompt tokens.
    pub context_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
}

/// Parses the Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps
/// `YYYY-MM-DD HH:MM:SS.fffffff`).
pub fn parse_azure(file: &str, text: &str) -> Result<Vec<TraceRequest>, TraceError> {
    let err = |line: usize, field: &str, message: String| TraceError {
        file: file.to_owned(),
        line,
        field: field.to_owned(),
        message,
    };
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or_else(|| err(1, "header", "the file is empty".to_owned()))?;
    let header: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| err(1, name, format!("missing column (header has: {})", header.join(", "))))
    };
    let (ts, ctx, gen_col) = (column("TIMESTAMP")?, column("ContextTokens")?, column("GeneratedTokens")?);
    let mut out: Vec<TraceRequest> = Vec::new();
    let mut first: Option<f64> = None;
    for (i, line) in lines {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(err(line_no, "row", format!("{} fields, the header has {}", cells.len(), header.len())));
        }
        let t = parse_timestamp(cells[ts]).ok_or_else(|| {
            err(line_no, "TIMESTAMP", format!("{:?} is not a time like 2023-11-16 18:15:46.6805900", cells[ts]))
        })?;
        let tokens = |idx: usize, field: &str| -> Result<u32, TraceError> {
            cells[idx].parse().map_err(|_| err(line_no, field, format!("{:?} is not a token count", cells[idx])))
        };
        let start = *first.get_or_insert(t);
        let at_s = t - start;
        if let Some(last) = out.last()
            && at_s < last.at_s
        {
            return Err(err(line_no, "TIMESTAMP", "timestamps go backwards".to_owned()));
        }
        out.push(TraceRequest {
            at_s,
            context_tokens: tokens(ctx, "ContextTokens")?,
            generated_tokens: tokens(gen_col, "GeneratedTokens")?,
        });
    }
    if out.is_empty() {
        return Err(err(2, "row", "the trace has no requests".to_owned()));
    }
    Ok(out)
}

/// Seconds since 1970 of `YYYY-MM-DD HH:MM:SS[.frac]` (UTC, proleptic Gregorian; years 0 to 9999).
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Years beyond four digits would overflow the day arithmetic below; hours and minutes parse signed.
    if !(0..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(0..=23).contains(&h)
        || !(0..=59).contains(&min)
        || !(0.0..61.0).contains(&sec)
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86400 + h * 3600 + min * 60) as f64 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servegen_rows_become_windows() {
        let text = "0,0,0,,0,0\n600,0.5,2.2,Gamma,0.2,0.17\n1200,1.5,6.0,Weibull,0.35,0.01\n";
        let w = parse_servegen("chunk-0-trace.csv", text).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], Window { start_s: 0.0, rate: 0.0, pattern: Pattern::Poisson });
        assert_eq!(w[1].pattern, Pattern::Gamma(0.2));
        assert_eq!(w[2].pattern, Pattern::Weibull(0.35));
    }

    #[test]
    fn servegen_errors_name_file_line_and_field() {
        let cases = [
            ("0,0,0,,0,0\n600,x,0,,0,0\n", "c.csv:2: rate_req_per_s: \"x\" is not a number"),
            ("0,0,0,,0\n", "c.csv:1: row: 5 fields"),
            ("0,1,0,Pareto,1,1\n", "c.csv:1: arrival_pattern: \"Pareto\""),
            ("600,0,0,,0,0\n0,0,0,,0,0\n", "c.csv:2: timestamp_s: 0 does not follow 600"),
            ("0,-1,0,,0,0\n", "c.csv:1: rate_req_per_s: -1 must be"),
            ("", "c.csv:1: row: the file has no windows"),
        ];
        for (text, want) in cases {
            let got = parse_servegen("c.csv", text).unwrap_err().to_string();
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn azure_rows_become_requests_relative_to_the_first() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n2023-11-16 18:15:50.0,396,109\n2023-11-17 00:00:00,1,1\n";
        let r = parse_azure("conv.csv", text).unwrap();
        assert_eq!(r[0], TraceRequest { at_s: 0.0, context_tokens: 374, generated_tokens: 44 });
        assert!((r[1].at_s - 3.5).abs() < 1e-9);
        assert!((r[2].at_s - (5.0 * 3600.0 + 44.0 * 60.0 + 13.5)).abs() < 1e-6);
    }

    #[test]
    fn azure_errors_name_file_line_and_field() {
        let h = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
        let cases = [
            (format!("{h}2023-11-16 18:15:46,x,1\n"), "a.csv:2: ContextTokens: \"x\""),
            (format!("{h}yesterday,1,1\n"), "a.csv:2: TIMESTAMP: \"yesterday\""),
            (format!("{h}2023-11-16 18:15:46,1\n"), "a.csv:2: row: 2 fields"),
            (
                format!("{h}2023-11-16 18:15:46,1,1\n2023-11-16 18:15:45,1,1\n"),
                "a.csv:3: TIMESTAMP: timestamps go backwards",
            ),
            ("TIMESTAMP,Tokens\n".to_owned(), "a.csv:1: ContextTokens: missing column"),
        ];
        for (text, want) in cases {
            let got = parse_azure("a.csv", &text).unwrap_err().to_string();
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
        }
    }
}
