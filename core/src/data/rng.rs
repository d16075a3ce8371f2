//! A small, seedable PRNG for the data pipeline.
//!
//! The data pipeline must be a pure function of its seeds, and it runs on background threads
//! while the training loop draws from libtorch's global generator; sharing that generator would
//! make both depend on thread timing. xoshiro256++ seeded through SplitMix64 is fast, has no
//! dependencies and gives the same stream on every platform.

/// One SplitMix64 step: also a good 64-bit mixing function for deriving seeds.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        // SplitMix64 never yields four zeros in a row, so the all-zero state (a fixed point of
        // xoshiro) cannot occur.
        Rng { s }
    }

    /// An independent stream for `seed` and a path of stream ids (e.g. `[tag, epoch]`).
    /// Hashing the whole path, rather than adding ids to the seed, keeps `(seed, 1)` and
    /// `(seed + 1, 0)` unrelated.
    pub fn derive(seed: u64, stream: &[u64]) -> Rng {
        let mut state = seed;
        let mut h = splitmix64(&mut state);
        for &id in stream {
            let mut s = h ^ id.wrapping_mul(0xD1B5_4A32_D192_ED03);
            h = splitmix64(&mut s);
        }
        Rng::new(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0): the range is empty");
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// Uniform in [0, 1) with 24 bits of precision (exactly representable in f32).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// Standard normal (Box–Muller); for the few per-image parameters, not per-pixel noise.
    pub fn normal(&mut self) -> f32 {
        // 1 - u keeps the argument of ln in (0, 1].
        let u1 = 1.0 - (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Approximately standard normal from a single draw: the sum of four 16-bit uniforms
    /// (Irwin–Hall), rescaled to unit variance. Pixel noise needs millions of these, and the
    /// bounded tails (±3.46σ) are harmless once pixels are clipped to [0, 255] anyway.
    pub fn fast_normal(&mut self) -> f32 {
        let x = self.next_u64();
        let sum = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        // Each term is uniform on 0..=65535: mean 32767.5, variance (65536² - 1) / 12.
        const MEAN: f32 = 4.0 * 32767.5;
        const INV_STD: f32 = 1.0 / 37837.23; // 1 / sqrt(4 * (65536² - 1) / 12)
        (sum as f32 - MEAN) * INV_STD
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rng_is_reproducible_and_streams_differ() {
        let a: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::derive(7, &[1, 2]);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::derive(7, &[1, 2]);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::derive(7, &[2, 1]);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn data_rng_distributions_are_sane() {
        let mut r = Rng::new(3);
        let n = 200_000;
        let mut counts = [0usize; 7];
        let (mut sum, mut sum_sq, mut fsum, mut fsum_sq) = (0f64, 0f64, 0f64, 0f64);
        for _ in 0..n {
            counts[r.below(7) as usize] += 1;
            let x = r.fast_normal() as f64;
            sum += x;
            sum_sq += x * x;
            let y = r.normal() as f64;
            fsum += y;
            fsum_sq += y * y;
            let u = r.f32();
            assert!((0.0..1.0).contains(&u));
        }
        for c in counts {
            assert!(
                (c as f64 - n as f64 / 7.0).abs() < 0.02 * n as f64 / 7.0,
                "{counts:?}"
            );
        }
        for (s, sq) in [(sum, sum_sq), (fsum, fsum_sq)] {
            let mean = s / n as f64;
            let var = sq / n as f64 - mean * mean;
            assert!(mean.abs() < 0.01, "mean {mean}");
            assert!((var - 1.0).abs() < 0.02, "variance {var}");
        }
    }

    #[test]
    fn data_rng_shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..100).collect();
        Rng::new(1).shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
