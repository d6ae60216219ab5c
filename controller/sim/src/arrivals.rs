//! Arrival times from a ServeGen client's windows, by time rescaling: gaps of unit mean, shaped by the window
//! in which each gap starts, are laid out along the cumulative rate `Λ(t) = ∫ rate`, so that every window gets its
//! rate on average, bursts keep their shape, and a client with a rate of one request per day still gets one
//! request per day (a window-by-window draw would lose the gaps longer than a window).

use crate::traces::{Pattern, Window};
use kiln_core::rng::Rng;

/// Window length of the ServeGen trace, seconds.
pub const WINDOW_S: f64 = 600.0;

/// A lazy source of one client's arrival times.
#[derive(Debug, Clone)]
pub struct Arrivals {
    windows: Vec<Window>,
    scale: f64,
    end_s: f64,
    rng: Rng,
    /// Current window and position in it.
    window: usize,
    t: f64,
}

impl Arrivals {
    /// Arrivals from `windows` with rates multiplied by `scale`, up to `end_s`, drawn with `rng`.
    pub fn new(windows: Vec<Window>, scale: f64, end_s: f64, rng: Rng) -> Self {
        let t = windows.first().map_or(0.0, |w| w.start_s);
        Self { windows, scale, end_s, rng, window: 0, t }
    }

    fn window_end(&self, i: usize) -> f64 {
        self.windows.get(i + 1).map_or(self.windows[i].start_s + WINDOW_S, |w| w.start_s)
    }
}

impl Iterator for Arrivals {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        // Find a window with a positive rate from the current position, then draw the gap with its shape.
        while self.window < self.windows.len() && self.windows[self.window].rate * self.scale <= 0.0 {
            self.window += 1;
            self.t = self.windows.get(self.window).map_or(f64::INFINITY, |w| w.start_s);
        }
        if self.window >= self.windows.len() || self.t >= self.end_s {
            return None;
        }
        let mut gap = unit_gap(self.windows[self.window].pattern, &mut self.rng);
        loop {
            let w = &self.windows[self.window];
            let rate = w.rate * self.scale;
            let end = self.window_end(self.window);
            if rate > 0.0 {
                let room = rate * (end - self.t);
                if gap <= room {
                    self.t += gap / rate;
                    return (self.t < self.end_s).then_some(self.t);
                }
                gap -= room;
            }
            self.window += 1;
            if self.window >= self.windows.len() {
                return None;
            }
            self.t = self.windows[self.window].start_s;
            if self.t >= self.end_s {
                return None;
            }
        }
    }
}

/// A gap of mean 1 with the pattern's shape.
pub fn unit_gap(pattern: Pattern, rng: &mut Rng) -> f64 {
    match pattern {
        Pattern::Poisson => -(1.0 - rng.unit()).ln(),
        Pattern::Gamma(k) => gamma(k, rng) / k,
        Pattern::Weibull(k) => (-(1.0 - rng.unit()).ln()).powf(1.0 / k) / gamma_fn(1.0 + 1.0 / k),
    }
}

fn normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.unit();
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gamma(`k`, 1) variate (Marsaglia and Tsang; boosted for `k < 1`).
fn gamma(k: f64, rng: &mut Rng) -> f64 {
    if k < 1.0 {
        let u = 1.0 - rng.unit();
        return gamma(k + 1.0, rng) * u.powf(1.0 / k);
    }
    let d = k - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.unit();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// The Gamma function (Lanczos approximation, g = 7), for `x > 0`.
fn gamma_fn(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma_fn(1.0 - x));
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = G.iter().enumerate().skip(1).fold(G[0], |acc, (i, g)| acc + g / (x + i as f64));
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_and_cv(pattern: Pattern) -> (f64, f64) {
        let mut rng = Rng::new(5);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| unit_gap(pattern, &mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn gaps_have_unit_mean_and_the_pattern_shape() {
        let (m, cv) = mean_and_cv(Pattern::Poisson);
        assert!((m - 1.0).abs() < 0.02 && (cv - 1.0).abs() < 0.03, "{m} {cv}");
        // Gamma: cv = 1/sqrt(k).
        let (m, cv) = mean_and_cv(Pattern::Gamma(0.25));
        assert!((m - 1.0).abs() < 0.03 && (cv - 2.0).abs() < 0.1, "{m} {cv}");
        let (m, cv) = mean_and_cv(Pattern::Gamma(4.0));
        assert!((m - 1.0).abs() < 0.02 && (cv - 0.5).abs() < 0.02, "{m} {cv}");
        // Weibull k = 0.5: cv = sqrt(Γ(5)/Γ(3)^2 - 1) = sqrt(5).
        let (m, cv) = mean_and_cv(Pattern::Weibull(0.5));
        assert!((m - 1.0).abs() < 0.05 && (cv - 5f64.sqrt()).abs() < 0.25, "{m} {cv}");
        assert!((gamma_fn(5.0) - 24.0).abs() < 1e-9 && (gamma_fn(0.5) - std::f64::consts::PI.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn each_window_gets_its_rate_and_sparse_clients_keep_their_requests() {
        let windows = vec![
            Window { start_s: 0.0, rate: 2.0, pattern: Pattern::Gamma(0.5) },
            Window { start_s: 600.0, rate: 0.0, pattern: Pattern::Poisson },
            Window { start_s: 1200.0, rate: 0.5, pattern: Pattern::Poisson },
        ];
        let mut first = 0;
        let mut third = 0;
        let mut n = 0;
        for seed in 0..50 {
            for t in Arrivals::new(windows.clone(), 1.0, 1e9, Rng::new(seed)) {
                n += 1;
                assert!(!(600.0..1200.0).contains(&t), "no arrival in a window of rate 0: {t}");
                if t < 600.0 { first += 1 } else { third += 1 }
            }
        }
        assert_eq!(n, first + third);
        assert!((f64::from(first) / 50.0 - 1200.0).abs() < 60.0, "{first}");
        assert!((f64::from(third) / 50.0 - 300.0).abs() < 20.0, "{third}");
        // Scaled down a thousandfold: about 1.5 requests per run, not 0 (Poisson: a bursty renewal process started
        // at an arrival front-loads its first ones).
        let poisson: Vec<Window> = windows.iter().map(|w| Window { pattern: Pattern::Poisson, ..*w }).collect();
        let sparse: usize = (0..400).map(|s| Arrivals::new(poisson.clone(), 0.001, 1e9, Rng::new(s)).count()).sum();
        assert!((sparse as f64 / 400.0 - 1.5).abs() < 0.3, "{sparse}");
        // Same seed, same arrivals; the end time is respected.
        let a: Vec<f64> = Arrivals::new(windows.clone(), 1.0, 300.0, Rng::new(9)).collect();
        assert_eq!(a, Arrivals::new(windows, 1.0, 300.0, Rng::new(9)).collect::<Vec<_>>());
        assert!(a.iter().all(|&t| t < 300.0) && !a.is_empty());
    }
}
