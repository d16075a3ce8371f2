//! Statistics over the seeds of a group: mean and sample std, Welch's t-test (unequal variances,
//! as `scipy.stats.ttest_ind(a, b, equal_var=False)`), and a percentile bootstrap interval of the
//! difference of means. Written out here: each is a few lines, and the Student t tail needs only
//! the regularized incomplete beta function.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n − 1); 0 for a single run.
    pub std: f64,
}

pub fn summarize(values: &[f64]) -> Summary {
    let n = values.len();
    if n == 0 {
        return Summary {
            n,
            mean: f64::NAN,
            std: f64::NAN,
        };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Summary {
        n,
        mean,
        std: var.sqrt(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Welch {
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided.
    pub p: f64,
}

/// Welch's two-sided t-test of mean(a) = mean(b); `None` with fewer than two values on a side or
/// no variance on either.
pub fn welch_t_test(a: &[f64], b: &[f64]) -> Option<Welch> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (sa, sb) = (summarize(a), summarize(b));
    let va = sa.std.powi(2) / sa.n as f64;
    let vb = sb.std.powi(2) / sb.n as f64;
    if va + vb <= 0.0 {
        return None;
    }
    let t = (sa.mean - sb.mean) / (va + vb).sqrt();
    let df = (va + vb).powi(2) / (va.powi(2) / (sa.n - 1) as f64 + vb.powi(2) / (sb.n - 1) as f64);
    // P(|T| > |t|) = I_{df / (df + t²)}(df / 2, 1 / 2).
    let p = regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t));
    Some(Welch { t, df, p })
}

/// The `level` percentile bootstrap interval of mean(a) − mean(b): each side resampled with
/// replacement `resamples` times from a fixed seed, so a report reads the same every time.
pub fn bootstrap_diff_interval(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<(f64, f64)> {
    if a.is_empty() || b.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = SplitMix64(seed);
    let mut resampled_mean = |v: &[f64]| {
        (0..v.len())
            .map(|_| v[(rng.next() % v.len() as u64) as usize])
            .sum::<f64>()
            / v.len() as f64
    };
    let mut diffs: Vec<f64> = (0..resamples)
        .map(|_| resampled_mean(a) - resampled_mean(b))
        .collect();
    diffs.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Some((quantile(&diffs, tail), quantile(&diffs, 1.0 - tail)))
}

/// Linear interpolation between order statistics (numpy's default percentile).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine coefficients: ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
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
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        sum += g / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// I_x(a, b) by its continued fraction (modified Lentz), using the symmetry
/// I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges slowly.
fn regularized_incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x);
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp() / a;
    const TINY: f64 = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = 1.0 / if d.abs() < TINY { TINY } else { d };
    let mut f = d;
    for m in 1..300 {
        let m = m as f64;
        for numerator in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            d = 1.0 / if d.abs() < TINY { TINY } else { d };
            c = 1.0 + numerator / c;
            if c.abs() < TINY {
                c = TINY;
            }
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-15 {
            break;
        }
    }
    front * f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn mean_and_sample_std_by_hand() {
        // mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / 3 → std √(5/3).
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((s.n, s.mean), (4, 2.5));
        assert!(close(s.std, (5.0f64 / 3.0).sqrt(), 1e-15));
        assert_eq!(summarize(&[0.7]).std, 0.0);
        assert!(summarize(&[]).mean.is_nan());
    }

    #[test]
    fn welch_equals_scipy_on_fixed_numbers() {
        // a = 1..4: mean 2.5, var 5/3; b = 2, 4, .., 10: mean 6, var 10.
        // t = −3.5 / √(5/12 + 2) = −2.2514363231593695; Welch–Satterthwaite df = 5.520787746170677
        // p = 0.06913359319239237 (scipy.stats.ttest_ind(a, b, equal_var=False), scipy 1.16).
        let w = welch_t_test(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 6.0, 8.0, 10.0]).unwrap();
        assert!(close(w.t, -2.251_436_323_159_369_5, 1e-12), "{w:?}");
        assert!(close(w.df, 5.520_787_746_170_677, 1e-12), "{w:?}");
        assert!(close(w.p, 0.069_133_593_192_392_37, 1e-9), "{w:?}");
        // Accuracies of 3 against 4 seeds: t = 3.4331, p = 0.045263711193762865.
        let w = welch_t_test(&[0.912, 0.905, 0.918], &[0.897, 0.901, 0.893, 0.899]).unwrap();
        assert!(close(w.t, 3.433_117_664_818_605, 1e-9), "{w:?}");
        assert!(close(w.p, 0.045_263_711_193_762_865, 1e-9), "{w:?}");
        assert!(welch_t_test(&[1.0], &[1.0, 2.0]).is_none());
        assert!(welch_t_test(&[1.0, 1.0], &[2.0, 2.0]).is_none());
    }

    #[test]
    fn student_t_tail_matches_a_known_value() {
        // 2 · P(T₃.₅ > 2) = 0.12613852257591343 (scipy.stats.t.sf(2, 3.5) · 2).
        let p = regularized_incomplete_beta(1.75, 0.5, 3.5 / (3.5 + 4.0));
        assert!(close(p, 0.126_138_522_575_913_43, 1e-10), "{p}");
    }

    #[test]
    fn bootstrap_interval_by_hand_and_deterministic() {
        // One value on each side: every resample's difference is 3 − 1.
        assert_eq!(
            bootstrap_diff_interval(&[3.0], &[1.0], 100, 0.95, 1),
            Some((2.0, 2.0))
        );
        // Two values against a constant: a resample's mean is 0, 0.5 or 1 with probabilities
        // 1/4, 1/2, 1/4, so the 95 % interval is [0, 1] and the middle half is 0.5.
        let (lo, hi) = bootstrap_diff_interval(&[0.0, 1.0], &[0.0], 4000, 0.95, 7).unwrap();
        assert_eq!((lo, hi), (0.0, 1.0));
        let (lo, hi) = bootstrap_diff_interval(&[0.0, 1.0], &[0.0], 4000, 0.4, 7).unwrap();
        assert_eq!((lo, hi), (0.5, 0.5));
        let a = [0.912, 0.905, 0.918];
        let b = [0.897, 0.901, 0.893, 0.899];
        let first = bootstrap_diff_interval(&a, &b, 10_000, 0.95, 42).unwrap();
        assert_eq!(
            first,
            bootstrap_diff_interval(&a, &b, 10_000, 0.95, 42).unwrap()
        );
        // The interval lies within the extremes of the possible resampled differences.
        assert!(
            first.0 >= 0.905 - 0.901 && first.1 <= 0.918 - 0.893,
            "{first:?}"
        );
        assert!(
            first.0 < 0.0141 && first.1 > 0.0142,
            "holds the observed difference"
        );
    }
}
