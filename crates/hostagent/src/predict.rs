//! Host load monitoring and prediction, after RPS (Dinda): the load is sampled every second and
//! an autoregressive model AR(p) (p = 16, RPS's recommendation for host load) is fitted by
//! Yule-Walker (Levinson-Durbin recursion) over a sliding window, refitted every few samples;
//! the next 30 s are predicted by iterating the model.
//!
//! The load sampled is the number of CPU cores busy during the last second, from the `cpu` line
//! of `/proc/stat` (user + nice + system + irq + softirq + steal over all time), which reacts at
//! once where the load average lags by a minute.

use std::collections::VecDeque;

/// Model order (RPS recommends AR(16) for host load).
pub const ORDER: usize = 16;
/// Samples kept for fitting (10 minutes at one per second).
pub const WINDOW: usize = 600;
/// Refit after this many new samples.
pub const REFIT_EVERY: usize = 5;
/// Seconds predicted ahead.
pub const HORIZON: usize = 30;

/// An AR model: `x[t] - mean = sum_i coef[i] * (x[t-1-i] - mean) + e[t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArModel {
    pub mean: f64,
    pub coef: Vec<f64>,
    /// Variance of the one-step prediction error (from the recursion).
    pub noise_var: f64,
}

impl ArModel {
    /// Fits AR(`order`) to `xs` by Yule-Walker: sample autocovariances, then Levinson-Durbin.
    /// The order is reduced when there are too few samples (at least 2 per coefficient); a
    /// constant series gives the model "the mean".
    pub fn fit(xs: &[f64], order: usize) -> ArModel {
        let n = xs.len();
        if n == 0 {
            return ArModel { mean: 0.0, coef: vec![], noise_var: 0.0 };
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let p = order.min(n / 2);
        let r: Vec<f64> =
            (0..=p).map(|k| xs[..n - k].iter().zip(&xs[k..]).map(|(a, b)| (a - mean) * (b - mean)).sum::<f64>() / n as f64).collect();
        if p == 0 || r[0] <= 1e-12 {
            return ArModel { mean, coef: vec![], noise_var: r.first().copied().unwrap_or(0.0) };
        }
        // Levinson-Durbin.
        let mut a = vec![0.0; p];
        let mut err = r[0];
        for k in 0..p {
            let mut acc = r[k + 1];
            for j in 0..k {
                acc -= a[j] * r[k - j];
            }
            let refl = acc / err;
            let prev = a.clone();
            a[k] = refl;
            for j in 0..k {
                a[j] = prev[j] - refl * prev[k - 1 - j];
            }
            err *= 1.0 - refl * refl;
            if err <= 1e-12 {
                a.truncate(k + 1);
                break;
            }
        }
        ArModel { mean, coef: a, noise_var: err.max(0.0) }
    }

    /// Predicts the `steps` values after `history` (oldest first) by iterating the model.
    pub fn predict(&self, history: &[f64], steps: usize) -> Vec<f64> {
        let p = self.coef.len();
        let mut buf: Vec<f64> = history[history.len().saturating_sub(p)..].iter().map(|x| x - self.mean).collect();
        while buf.len() < p {
            buf.insert(0, 0.0);
        }
        let mut out = Vec::with_capacity(steps);
        for _ in 0..steps {
            let next: f64 = self.coef.iter().enumerate().map(|(i, c)| c * buf[buf.len() - 1 - i]).sum();
            buf.push(next);
            out.push(next + self.mean);
        }
        out
    }
}

/// A sliding window of load samples with a model refitted every [`REFIT_EVERY`] samples.
#[derive(Debug, Clone)]
pub struct Predictor {
    samples: VecDeque<f64>,
    model: Option<ArModel>,
    since_fit: usize,
    order: usize,
    window: usize,
}

impl Default for Predictor {
    fn default() -> Self {
        Predictor::new(ORDER, WINDOW)
    }
}

impl Predictor {
    pub fn new(order: usize, window: usize) -> Predictor {
        Predictor { samples: VecDeque::with_capacity(window), model: None, since_fit: 0, order, window: window.max(2) }
    }

    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if self.samples.len() == self.window {
            self.samples.pop_front();
        }
        self.samples.push_back(x);
        self.since_fit += 1;
        if self.model.is_none() || self.since_fit >= REFIT_EVERY {
            let xs: Vec<f64> = self.samples.iter().copied().collect();
            self.model = Some(ArModel::fit(&xs, self.order));
            self.since_fit = 0;
        }
    }

    pub fn last(&self) -> Option<f64> {
        self.samples.back().copied()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn model(&self) -> Option<&ArModel> {
        self.model.as_ref()
    }

    /// The next `steps` values (the last value repeated while fewer than 2 samples exist).
    pub fn predict(&self, steps: usize) -> Vec<f64> {
        let xs: Vec<f64> = self.samples.iter().copied().collect();
        match &self.model {
            Some(m) if xs.len() >= 2 => m.predict(&xs, steps).into_iter().map(|v| v.max(0.0)).collect(),
            _ => vec![self.last().unwrap_or(0.0); steps],
        }
    }

    /// The mean predicted load over the next [`HORIZON`] seconds.
    pub fn predicted_mean(&self) -> f64 {
        let p = self.predict(HORIZON);
        p.iter().sum::<f64>() / p.len().max(1) as f64
    }
}

/// Cumulative CPU times from `/proc/stat`'s `cpu` line: (busy, total) in clock ticks.
pub fn cpu_times() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(s.lines().next()?)
}

fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// Turns successive `/proc/stat` readings into "cores busy" samples.
#[derive(Debug, Default)]
pub struct LoadSampler {
    last: Option<(u64, u64)>,
    cpus: f64,
}

impl LoadSampler {
    pub fn new() -> LoadSampler {
        LoadSampler { last: cpu_times(), cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64 }
    }

    /// Cores busy since the previous call (None on the first call or if /proc/stat is unreadable).
    pub fn sample(&mut self) -> Option<f64> {
        let now = cpu_times()?;
        let prev = self.last.replace(now)?;
        let total = now.1.saturating_sub(prev.1);
        if total == 0 {
            return None;
        }
        Some(now.0.saturating_sub(prev.0) as f64 / total as f64 * self.cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random normal (xorshift + Box-Muller).
    struct Noise(u64);
    impl Noise {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    /// x[t] = 1.0 + 1.2 (x[t-1]-1) - 0.5 (x[t-2]-1) + e, a stationary AR(2) with a pseudo-cycle.
    fn ar2_trace(n: usize, seed: u64) -> Vec<f64> {
        let mut noise = Noise(seed);
        let (phi1, phi2, mean) = (1.2, -0.5, 1.0);
        let mut xs = vec![mean, mean];
        for _ in 0..n + 100 {
            let k = xs.len();
            let next = mean + phi1 * (xs[k - 1] - mean) + phi2 * (xs[k - 2] - mean) + 0.1 * noise.normal();
            xs.push(next);
        }
        xs.split_off(102)
    }

    #[test]
    fn fit_recovers_ar2_coefficients() {
        let xs = ar2_trace(5000, 42);
        let m = ArModel::fit(&xs, 2);
        assert!((m.coef[0] - 1.2).abs() < 0.05, "phi1 = {}", m.coef[0]);
        assert!((m.coef[1] + 0.5).abs() < 0.05, "phi2 = {}", m.coef[1]);
        assert!((m.mean - 1.0).abs() < 0.05, "mean = {}", m.mean);
        // AR(16) on the same trace: the extra coefficients are near zero.
        let m16 = ArModel::fit(&xs, ORDER);
        assert_eq!(m16.coef.len(), ORDER);
        assert!(m16.coef[4..].iter().all(|c| c.abs() < 0.1), "{:?}", m16.coef);
    }

    #[test]
    fn ar16_beats_last_value_on_ar2_trace() {
        // One-step-ahead and 5-steps-ahead predictions over a held-out stretch, with the
        // predictor learning online as the agent's does.
        let xs = ar2_trace(3000, 7);
        for horizon in [1usize, 5] {
            let mut p = Predictor::default();
            let (mut se_ar, mut se_last, mut n) = (0.0, 0.0, 0usize);
            for t in 0..xs.len() - horizon {
                p.push(xs[t]);
                if t < 200 {
                    continue; // warm-up
                }
                let truth = xs[t + horizon];
                let ar = p.predict(horizon)[horizon - 1];
                se_ar += (ar - truth).powi(2);
                se_last += (xs[t] - truth).powi(2);
                n += 1;
            }
            let (mse_ar, mse_last) = (se_ar / n as f64, se_last / n as f64);
            eprintln!("horizon {horizon}: AR(16) MSE {mse_ar:.5}, last-value MSE {mse_last:.5}");
            assert!(mse_ar < mse_last, "horizon {horizon}: AR(16) MSE {mse_ar} not below last-value MSE {mse_last}");
        }
    }

    #[test]
    fn constant_and_short_series() {
        let m = ArModel::fit(&[2.0; 50], ORDER);
        assert!(m.coef.is_empty());
        assert_eq!(m.predict(&[2.0; 50], 3), vec![2.0, 2.0, 2.0]);
        let mut p = Predictor::default();
        assert_eq!(p.predicted_mean(), 0.0);
        p.push(1.5);
        assert_eq!(p.predict(2), vec![1.5, 1.5]);
        p.push(f64::NAN);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn parses_proc_stat() {
        let (busy, total) = parse_cpu_line("cpu  100 5 50 800 10 3 2 0 0 0").unwrap();
        assert_eq!(busy, 160);
        assert_eq!(total, 970);
        assert!(parse_cpu_line("cpu0 1 2 3 4").is_none());
    }
}
