//! A small deterministic generator: SplitMix64 (Steele, Lea & Flood 2014) keyed by
//! (run seed, stream, draw counter), with the uniform, normal, Gamma and Beta draws mixing needs.
//!
//! Drawing here instead of from libtorch's global generator keeps the host's random stream (data
//! order, dropout) the same with or without this callback, and makes every draw a pure function
//! of its key, so a resumed run draws what the uninterrupted run drew.

pub struct Rng(u64);

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator for one draw. Each part of the key is hashed in turn, so that neighbouring
    /// seeds or counters do not give overlapping sequences.
    pub fn keyed(seed: u64, stream: u64, counter: u64) -> Rng {
        let key = mix(mix(mix(seed.wrapping_add(GOLDEN)) ^ stream) ^ counter);
        Rng(key)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform on [0, 1), 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform on {0, …, n − 1}, without modulo bias (rejection of the short last block).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Standard normal, Box–Muller (one of the pair; simplicity over speed, a draw per batch).
    pub fn normal(&mut self) -> f64 {
        // 1 − U lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// ln X for X ~ Gamma(shape, 1). In logarithms because for small shapes X underflows to 0
    /// (Gamma(0.01) is below 1e-300 with a few percent probability), which would turn
    /// X / (X + Y) into 0/0.
    pub fn ln_gamma_variate(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            // Marsaglia & Tsang's boost: X = Y · U^(1/a) with Y ~ Gamma(a + 1).
            let u = 1.0 - self.uniform();
            return self.ln_gamma_variate(shape + 1.0) + u.ln() / shape;
        }
        // Marsaglia & Tsang (2000), "A simple method for generating gamma variables".
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = 1.0 - self.uniform();
            if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
                return (d * v).ln();
            }
        }
    }

    /// Beta(a, b) as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b), computed as
    /// 1 / (1 + exp(ln Y − ln X)) so that it stays finite when both underflow.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let ln_x = self.ln_gamma_variate(a);
        let ln_y = self.ln_gamma_variate(b);
        1.0 / (1.0 + (ln_y - ln_x).exp())
    }

    /// A uniformly random permutation of 0..n (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut perm: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        perm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn gamma_draws_have_the_gamma_moments() {
        // Gamma(a, 1) has mean a and variance a; 40000 draws put the sample moments within a
        // few percent.
        for shape in [0.2, 1.0, 2.5, 7.0] {
            let xs: Vec<f64> = (0..40_000)
                .map(|i| Rng::keyed(3, 1, i).ln_gamma_variate(shape).exp())
                .collect();
            let (mean, var) = mean_var(&xs);
            assert!(
                (mean - shape).abs() < 0.03 * shape + 0.01,
                "shape {shape}: mean {mean}"
            );
            assert!(
                (var - shape).abs() < 0.08 * shape + 0.01,
                "shape {shape}: var {var}"
            );
        }
    }

    #[test]
    fn beta_draws_have_the_beta_moments() {
        // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
        for a in [0.2, 1.0, 4.0] {
            let xs: Vec<f64> = (0..40_000)
                .map(|i| Rng::keyed(5, 2, i).beta(a, a))
                .collect();
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
            let (mean, var) = mean_var(&xs);
            let expected = 1.0 / (4.0 * (2.0 * a + 1.0));
            assert!((mean - 0.5).abs() < 0.01, "a {a}: mean {mean}");
            assert!(
                (var - expected).abs() < 0.05 * expected,
                "a {a}: var {var} vs {expected}"
            );
        }
        // Tiny shapes underflow both Gamma draws; the ratio must still be a number.
        let tiny: Vec<f64> = (0..1000)
            .map(|i| Rng::keyed(0, 0, i).beta(0.01, 0.01))
            .collect();
        assert!(tiny
            .iter()
            .all(|x| x.is_finite() && (0.0..=1.0).contains(x)));
    }

    #[test]
    fn draws_are_a_function_of_the_key() {
        let a: Vec<u64> = (0..4).map(|_| Rng::keyed(1, 2, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::keyed(1, 2, 3).next_u64(),
            Rng::keyed(1, 2, 4).next_u64()
        );
        assert_ne!(
            Rng::keyed(1, 2, 3).next_u64(),
            Rng::keyed(2, 2, 3).next_u64()
        );
        let mut perm = Rng::keyed(9, 9, 9).permutation(10);
        perm.sort();
        assert_eq!(perm, (0..10).collect::<Vec<i64>>());
        let mut rng = Rng::keyed(4, 4, 4);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[rng.below(3) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
    }
}
