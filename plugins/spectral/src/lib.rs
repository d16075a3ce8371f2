//! Heavy-tailed self-regularisation (HTSR) diagnostics of layer weights, as METHODS.md section 5
//! defines them (TempBalance's `net_esd_estimator`, WeightWatcher's power-law fit):
//!
//! - [`eigenvalues`]: the empirical spectral density (ESD) of one Conv2d or Linear weight.
//! - [`fit_power_law`]: the exponent α of the ESD's tail, with xmin at the median eigenvalue
//!   (default) or where the fit is best (Kolmogorov–Smirnov distance).
//! - [`analyze`]: both, plus the spectral norm, alphahat and the eigenvalue count.
//! - [`analysed_layers`]: the Conv2d and Linear weights of a model, in registration order.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, TchError, Tensor};
use trellis_sdk::{LayerKind, Model};

/// The knobs of TempBalance's `net_esd_estimator`, at its defaults in [`Default`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EsdOptions {
    pub fit: Fit,
    /// Every kernel position's matrix is scaled by √conv_norm (0.5: conv eigenvalues halved).
    pub conv_norm: f64,
    /// The median fit takes xmin = λ_⌊N / xmin_pos⌋ (2: the median).
    pub xmin_pos: f64,
    /// Fit only the eigenvalues above 1e-5 (all of them when none is).
    pub filter_zeros: bool,
}

impl Default for EsdOptions {
    fn default() -> Self {
        EsdOptions {
            fit: Fit::Median,
            conv_norm: 0.5,
            xmin_pos: 2.0,
            filter_zeros: false,
        }
    }
}

/// The reference's `EVALS_THRESH`: eigenvalues at or below it count as zeros for `filter_zeros`.
pub const ZERO_EIGENVALUE: f64 = 1e-5;

/// How the start of the power-law tail, xmin, is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fit {
    /// xmin = λ_⌊N/2⌋: one closed form per layer (TempBalance's default).
    #[default]
    Median,
    /// Every eigenvalue is tried as xmin; the fit closest to its data in Kolmogorov–Smirnov
    /// distance wins (WeightWatcher's default). O(N²) per layer.
    GoodnessOfFit,
}

impl FromStr for Fit {
    type Err = String;
    fn from_str(s: &str) -> Result<Fit, String> {
        match s {
            "median" => Ok(Fit::Median),
            "goodness-of-fit" => Ok(Fit::GoodnessOfFit),
            other => Err(format!(
                "unknown fit `{other}`: use \"median\" or \"goodness-of-fit\""
            )),
        }
    }
}

impl fmt::Display for Fit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fit::Median => "median",
            Fit::GoodnessOfFit => "goodness-of-fit",
        })
    }
}

/// How many eigenvalues a weight of this shape has: min(out, in) per matrix, one matrix per
/// kernel position of a conv. `None` for shapes that are neither Linear nor Conv2d weights.
pub fn eigenvalue_count(shape: &[i64]) -> Option<usize> {
    let count = match *shape {
        [out, inp] => out.min(inp),
        [out, inp, kh, kw] => out.min(inp) * kh * kw,
        _ => return None,
    };
    usize::try_from(count).ok()
}

/// The ESD of a Linear (out × in) or Conv2d (out, in, kh, kw) weight: the squared singular
/// values of the weight matrix, or of each kernel position's (out × in) matrix scaled by √0.5,
/// pooled and sorted ascending.
///
/// The SVD runs on the weight's device in float32 like the reference (float64 for float64
/// weights): on CPU, float64 takes several times longer for a change in α around 1e-6. The
/// squares and everything after are float64.
pub fn eigenvalues(weight: &Tensor) -> Result<Vec<f64>, TchError> {
    eigenvalues_scaled(weight, EsdOptions::default().conv_norm)
}

/// [`eigenvalues`] with each kernel position's matrix scaled by √`conv_norm` instead of √0.5.
pub fn eigenvalues_scaled(weight: &Tensor, conv_norm: f64) -> Result<Vec<f64>, TchError> {
    let _no_grad = tch::no_grad_guard();
    let w = weight.f_detach()?;
    let w = match w.kind() {
        Kind::Double => w,
        _ => w.f_to_kind(Kind::Float)?,
    };
    let matrices = match *w.size().as_slice() {
        [_, _] => w,
        // (out, in, kh·kw) → (kh·kw, out, in): one batched SVD over the kernel positions.
        [out, inp, kh, kw] => w
            .f_reshape([out, inp, kh * kw])?
            .f_permute([2, 0, 1])?
            .f_mul_scalar(conv_norm.sqrt())?,
        ref shape => {
            return Err(TchError::Shape(format!(
            "the ESD is defined for Linear (2-d) and Conv2d (4-d) weights, not for shape {shape:?}"
        )))
        }
    };
    // torch.svd without U and V: `linalg_svdvals` cannot be called through tch without naming
    // a driver, which CPU tensors refuse.
    let (_, singular, _) = matrices.f_svd(true, false)?;
    let squared = singular
        .f_to_kind(Kind::Double)?
        .f_square()?
        .f_flatten(0, -1)?
        .f_to_device(tch::Device::Cpu)?;
    let mut eigs = Vec::<f64>::try_from(&squared)?;
    eigs.sort_by(f64::total_cmp);
    Ok(eigs)
}

/// A power law p(λ) ∝ λ^(−α) fitted to the eigenvalues λ ≥ xmin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerLaw {
    pub alpha: f64,
    pub xmin: f64,
    /// Kolmogorov–Smirnov distance between the fit and the tail it was fitted to.
    pub ks_distance: f64,
}

/// The power-law exponent of the tail of `eigs` (sorted ascending). With N eigenvalues and
/// xmin = λ_i, n = N − i:
///   α = 1 + n / (Σ_{j=i}^{N−1} ln λ_j − n·ln λ_i)
/// (the maximum-likelihood estimate for a continuous power law above xmin).
///
/// `None` when the tail admits no fit: fewer than two eigenvalues, xmin ≤ 0, or a tail of
/// equal values (α would be infinite). Only fits with α > 1 count for `GoodnessOfFit`.
pub fn fit_power_law(eigs: &[f64], fit: Fit) -> Option<PowerLaw> {
    fit_power_law_at(eigs, fit, EsdOptions::default().xmin_pos)
}

/// [`fit_power_law`] with the median fit's xmin at λ_⌊N / xmin_pos⌋ (`xmin_pos` > 1).
pub fn fit_power_law_at(eigs: &[f64], fit: Fit, xmin_pos: f64) -> Option<PowerLaw> {
    let n_total = eigs.len();
    if n_total < 2 {
        return None;
    }
    let logs: Vec<f64> = eigs.iter().map(|l| l.ln()).collect();
    // tail_log_sum[i] = Σ_{j ≥ i} ln λ_j, so each candidate xmin costs O(1) for its α.
    let mut tail_log_sum = vec![0.0; n_total + 1];
    for i in (0..n_total).rev() {
        tail_log_sum[i] = tail_log_sum[i + 1] + logs[i];
    }
    let alpha_at = |i: usize| -> Option<f64> {
        if !(eigs[i] > 0.0 && eigs[i].is_finite()) {
            return None;
        }
        let n = (n_total - i) as f64;
        let alpha = 1.0 + n / (tail_log_sum[i] - n * logs[i]);
        alpha.is_finite().then_some(alpha)
    };
    // D = max_k |1 − (λ_{i+k}/xmin)^{1−α} − k/n|, stopping early once it reaches `give_up`.
    let ks_distance = |i: usize, alpha: f64, give_up: f64| -> f64 {
        let n = (n_total - i) as f64;
        let mut worst = 0.0f64;
        for (k, log) in logs[i..].iter().enumerate() {
            let cdf = 1.0 - ((1.0 - alpha) * (log - logs[i])).exp();
            worst = worst.max((cdf - k as f64 / n).abs());
            if worst >= give_up {
                break;
            }
        }
        worst
    };
    match fit {
        Fit::Median => {
            // The reference's int(N / xmin_pos); N / 2 exactly for the default.
            let i = ((n_total as f64 / xmin_pos) as usize).min(n_total - 1);
            let alpha = alpha_at(i)?;
            Some(PowerLaw {
                alpha,
                xmin: eigs[i],
                ks_distance: ks_distance(i, alpha, f64::INFINITY),
            })
        }
        Fit::GoodnessOfFit => {
            let mut best: Option<PowerLaw> = None;
            for (i, &xmin) in eigs[..n_total - 1].iter().enumerate() {
                let Some(alpha) = alpha_at(i).filter(|&a| a > 1.0) else {
                    continue;
                };
                let bound = best.map_or(f64::INFINITY, |b| b.ks_distance);
                let d = ks_distance(i, alpha, bound);
                // Strictly smaller: ties keep the smaller xmin, like an argmin.
                if d < bound {
                    best = Some(PowerLaw {
                        alpha,
                        xmin,
                        ks_distance: d,
                    });
                }
            }
            best
        }
    }
}

/// The HTSR summary of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSpectrum {
    pub eigenvalue_count: usize,
    /// λ_max, the largest eigenvalue (WeightWatcher's `spectral_norm`: σ_max squared).
    pub spectral_norm: f64,
    pub fit: Option<PowerLaw>,
}

impl LayerSpectrum {
    pub fn alpha(&self) -> Option<f64> {
        self.fit.map(|f| f.alpha)
    }

    /// α·log10(λ_max): WeightWatcher's size-weighted α.
    pub fn alphahat(&self) -> Option<f64> {
        self.alpha()
            .map(|a| a * self.spectral_norm.log10())
            .filter(|v| v.is_finite())
    }
}

/// The ESD of a weight and its power-law fit.
pub fn analyze(weight: &Tensor, fit: Fit) -> Result<LayerSpectrum, TchError> {
    analyze_with(
        weight,
        &EsdOptions {
            fit,
            ..EsdOptions::default()
        },
    )
}

/// [`analyze`] with every knob of the reference's estimator. λ_max and the count are those of
/// the whole ESD, as there; only the fit sees the filtered eigenvalues.
pub fn analyze_with(weight: &Tensor, options: &EsdOptions) -> Result<LayerSpectrum, TchError> {
    let eigs = eigenvalues_scaled(weight, options.conv_norm)?;
    let nonzero = if options.filter_zeros {
        let first = eigs.partition_point(|&l| l <= ZERO_EIGENVALUE);
        if first < eigs.len() {
            &eigs[first..]
        } else {
            &eigs[..]
        }
    } else {
        &eigs[..]
    };
    Ok(LayerSpectrum {
        eigenvalue_count: eigs.len(),
        spectral_norm: eigs.last().copied().unwrap_or(0.0),
        fit: fit_power_law_at(nonzero, options.fit, options.xmin_pos),
    })
}

/// (module path, weight) of every Conv2d and Linear layer of a model, in registration order:
/// the layers METHODS.md section 5 analyses.
pub fn analysed_layers(model: &Model) -> trellis_sdk::Result<Vec<(String, Tensor)>> {
    Ok(model
        .parameters()?
        .into_iter()
        .filter(|p| {
            matches!(p.kind, LayerKind::Conv2d | LayerKind::Linear)
                && p.name.strip_prefix(p.module.as_str()) == Some(".weight")
        })
        .map(|p| (p.module, p.tensor))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a seeded generator, so the sampled spectra are the same on every machine.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in (0, 1].
        fn unit(&mut self) -> f64 {
            ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
        }

        /// Pareto density ∝ x^(−alpha) on [xmin, ∞), by inverting its CDF.
        fn pareto(&mut self, alpha: f64, xmin: f64) -> f64 {
            xmin * self.unit().powf(-1.0 / (alpha - 1.0))
        }
    }

    fn sorted(mut v: Vec<f64>) -> Vec<f64> {
        v.sort_by(f64::total_cmp);
        v
    }

    fn alpha(eigs: &[f64], fit: Fit) -> f64 {
        fit_power_law(eigs, fit).unwrap().alpha
    }

    #[test]
    fn median_estimator_equals_closed_form_on_hand_made_spectra() {
        // N = 6: i = 3, xmin = 4, n = 3; Σ ln(4, 8, 16) − 3 ln 4 = ln 8 → α = 1 + 3 / ln 8.
        let even = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0];
        let fit = fit_power_law(&even, Fit::Median).unwrap();
        assert!(
            (fit.alpha - (1.0 + 3.0 / 8f64.ln())).abs() < 1e-12,
            "{fit:?}"
        );
        assert_eq!(fit.xmin, 4.0);
        // N = 5: i = ⌊5/2⌋ = 2, xmin = 3, n = 3; ln(3·5·9) − 3 ln 3 = ln 5 → α = 1 + 3 / ln 5.
        let odd = [1.0, 2.0, 3.0, 5.0, 9.0];
        let fit = fit_power_law(&odd, Fit::Median).unwrap();
        assert!(
            (fit.alpha - (1.0 + 3.0 / 5f64.ln())).abs() < 1e-12,
            "{fit:?}"
        );
        assert_eq!(fit.xmin, 3.0);
        // The KS distance of that fit, by the formula: k/n against 1 − (λ/3)^(1−α).
        let a = fit.alpha;
        let d = [3.0f64, 5.0, 9.0]
            .iter()
            .enumerate()
            .map(|(k, l)| (1.0 - (l / 3.0).powf(1.0 - a) - k as f64 / 3.0).abs())
            .fold(0.0, f64::max);
        assert!((fit.ks_distance - d).abs() < 1e-12);
    }

    #[test]
    fn pareto_samples_give_back_their_exponent() {
        // 20 000 draws: the median fit uses the top 10 000, whose MLE has standard deviation
        // (α − 1)/√n ≤ 0.025 here; 0.08 is more than three of those.
        const TOLERANCE: f64 = 0.08;
        let mut rng = Rng(42);
        for true_alpha in [2.0, 3.5] {
            let eigs = sorted((0..20_000).map(|_| rng.pareto(true_alpha, 0.3)).collect());
            for fit in [Fit::Median, Fit::GoodnessOfFit] {
                let got = alpha(&eigs, fit);
                assert!(
                    (got - true_alpha).abs() < TOLERANCE,
                    "{fit}: α = {got}, drawn with {true_alpha}"
                );
            }
        }
    }

    #[test]
    fn goodness_of_fit_finds_the_tail_above_a_bulk() {
        // A bulk of 6 000 small values under a Pareto(2.5) tail of 4 000 above 1: the median
        // lands in the bulk and misfits; the KS choice finds xmin ≈ 1 and the tail's exponent.
        let mut rng = Rng(7);
        let mut values: Vec<f64> = (0..6_000).map(|_| 0.01 + 0.49 * rng.unit()).collect();
        values.extend((0..4_000).map(|_| rng.pareto(2.5, 1.0)));
        let eigs = sorted(values);
        let gof = fit_power_law(&eigs, Fit::GoodnessOfFit).unwrap();
        assert!((gof.alpha - 2.5).abs() < 0.1, "{gof:?}");
        assert!((0.9..1.5).contains(&gof.xmin), "{gof:?}");
        let median = alpha(&eigs, Fit::Median);
        assert!(
            (median - 2.5).abs() > 0.5,
            "median fit {median} should miss"
        );
    }

    #[test]
    fn degenerate_spectra_have_no_fit() {
        // A flat tail would need α = ∞; zero eigenvalues have no logarithm; one value no tail.
        assert_eq!(fit_power_law(&[1.0, 2.0, 2.0, 2.0], Fit::Median), None);
        assert_eq!(fit_power_law(&[2.0; 8], Fit::GoodnessOfFit), None);
        assert_eq!(fit_power_law(&[0.0, 0.0, 0.0, 1.0], Fit::Median), None);
        assert_eq!(fit_power_law(&[3.0], Fit::Median), None);
        assert_eq!(fit_power_law(&[], Fit::GoodnessOfFit), None);
        let spectrum = LayerSpectrum {
            eigenvalue_count: 4,
            spectral_norm: 0.0,
            fit: Some(PowerLaw {
                alpha: 2.0,
                xmin: 0.0,
                ks_distance: 0.0,
            }),
        };
        assert_eq!(spectrum.alphahat(), None, "log10(0) must not leak out");
    }

    #[test]
    fn the_reference_estimators_knobs_change_what_they_say() {
        // diag(1, 2, 3, 0, 0): eigenvalues 0, 0, 1, 4, 9.
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 0.0, 0.0]).diag(0);
        let with = |options: EsdOptions| analyze_with(&w, &options).unwrap().fit.unwrap();
        // Median of all five: xmin = λ_2 = 1, n = 3: α = 1 + 3 / ln 36.
        let all = with(EsdOptions::default());
        assert!(
            (all.alpha - (1.0 + 3.0 / 36f64.ln())).abs() < 1e-6,
            "{all:?}"
        );
        // Zeros filtered: 1, 4, 9; xmin = λ_1 = 4, n = 2: α = 1 + 2 / ln(9/4).
        let filtered = with(EsdOptions {
            filter_zeros: true,
            ..EsdOptions::default()
        });
        assert!((filtered.xmin - 4.0).abs() < 1e-5, "{filtered:?}");
        assert!((filtered.alpha - (1.0 + 2.0 / 2.25f64.ln())).abs() < 1e-6);
        // xmin_pos = 4 of eight: xmin = λ_2, the tail the six values from it.
        let eigs = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
        let quarter = fit_power_law_at(&eigs, Fit::Median, 4.0).unwrap();
        assert_eq!(quarter.xmin, 4.0);
        let logs: f64 = eigs[2..].iter().map(|l: &f64| (l / 4.0).ln()).sum();
        assert!((quarter.alpha - (1.0 + 6.0 / logs)).abs() < 1e-12);
        // conv_norm scales every conv eigenvalue by conv_norm itself (√ on the matrix).
        tch::manual_seed(3);
        let conv = Tensor::randn([4, 3, 3, 3], (Kind::Float, tch::Device::Cpu));
        let (half, one) = (
            eigenvalues(&conv).unwrap(),
            eigenvalues_scaled(&conv, 1.0).unwrap(),
        );
        for (h, o) in half.iter().zip(&one) {
            assert!((o - 2.0 * h).abs() < 1e-5 * o.max(1.0), "{h} {o}");
        }
    }

    #[test]
    fn linear_eigenvalues_are_squared_singular_values() {
        let w = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 0.0, -2.0, 0.0]).view([2, 3]);
        let eigs = eigenvalues(&w).unwrap();
        assert_eq!(eigs.len(), 2);
        assert!(
            (eigs[0] - 4.0).abs() < 1e-5 && (eigs[1] - 9.0).abs() < 1e-5,
            "{eigs:?}"
        );
        assert_eq!(eigenvalue_count(&[2, 3]), Some(2));
    }

    #[test]
    fn conv_eigenvalues_pool_each_kernel_position_scaled_by_sqrt_half() {
        tch::manual_seed(5);
        let w = Tensor::randn([6, 4, 3, 2], (Kind::Float, tch::Device::Cpu));
        let pooled = eigenvalues(&w).unwrap();
        let mut separate = Vec::new();
        for a in 0..3 {
            for b in 0..2 {
                let (_, s, _) = w.select(3, b).select(2, a).svd(true, false);
                let s = s.to_kind(Kind::Double);
                separate.extend(Vec::<f64>::try_from(&(s.square() * 0.5)).unwrap());
            }
        }
        let separate = sorted(separate);
        assert_eq!(pooled.len(), 4 * 6);
        assert_eq!(eigenvalue_count(&[6, 4, 3, 2]), Some(24));
        for (p, s) in pooled.iter().zip(&separate) {
            assert!(
                (p - s).abs() < 1e-5 * s.max(1.0),
                "{pooled:?} vs {separate:?}"
            );
        }
        assert!(pooled.windows(2).all(|w| w[0] <= w[1]), "not ascending");
        let spectrum = analyze(&w, Fit::Median).unwrap();
        assert_eq!(spectrum.spectral_norm, *pooled.last().unwrap());
        assert_eq!(spectrum.eigenvalue_count, 24);
        let expected = alpha(&pooled, Fit::Median) * pooled.last().unwrap().log10();
        assert_eq!(spectrum.alphahat(), Some(expected));
    }

    #[test]
    fn other_shapes_are_refused() {
        let bias = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        assert!(eigenvalues(&bias).is_err());
        assert_eq!(eigenvalue_count(&[4]), None);
        assert_eq!("goodness-of-fit".parse::<Fit>(), Ok(Fit::GoodnessOfFit));
        assert!("mean".parse::<Fit>().is_err());
    }
}
