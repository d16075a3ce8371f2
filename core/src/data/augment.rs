//! Crop, flip and normalisation of u8 images into f32 batches.
//!
//! This runs on the loader thread in plain Rust rather than as tensor ops: every sample needs
//! its own crop offset and flip, which would take a gather per batch in libtorch, while one pass
//! over the bytes with a per-channel lookup table does all three steps at memory speed, and the
//! lookup makes the result bit-identical to the formula `(x / 255 - mean) / std`.

use tch::{Device, Kind, Tensor};

/// Zero padding on each side before the random crop.
pub const PAD: usize = 4;

/// Per-channel standardisation `(x / 255 - mean) / std`. Empty vectors mean no standardisation
/// (inputs are only scaled to [0, 1]), as do zero means and unit standard deviations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    /// Scaling to [0, 1] only.
    pub fn identity() -> Normalize {
        Normalize::default()
    }

    /// One 256-entry table per channel mapping a byte to its normalised value.
    pub fn lookup_tables(&self, channels: usize) -> Vec<[f32; 256]> {
        assert!(
            self.mean.len() == self.std.len()
                && (self.mean.is_empty() || self.mean.len() == channels),
            "Normalize has {} means and {} stds for {channels}-channel images; give one of each \
             per channel, or none for plain scaling to [0, 1]",
            self.mean.len(),
            self.std.len()
        );
        (0..channels)
            .map(|c| {
                let (m, s) = if self.mean.is_empty() {
                    (0.0, 1.0)
                } else {
                    (self.mean[c], self.std[c])
                };
                assert!(
                    s > 0.0 && s.is_finite() && m.is_finite(),
                    "Normalize channel {c}: std must be positive and finite, got mean {m}, std {s}"
                );
                let mut table = [0f32; 256];
                for (v, slot) in table.iter_mut().enumerate() {
                    *slot = (v as f32 / 255.0 - m) / s;
                }
                table
            })
            .collect()
    }
}

/// Writes one image, `src` u8 `[C, H, W]`, into `dst` f32 `[C, H, W]`: the `H×W` window at
/// offset `(dy, dx)` of the image zero-padded by [`PAD`] on every side (so `(PAD, PAD)` is the
/// unshifted image), mirrored left-right if `flip`, then mapped through `tables`.
pub fn augment_into(
    src: &[u8],
    dst: &mut [f32],
    shape: [usize; 3],
    dy: usize,
    dx: usize,
    flip: bool,
    tables: &[[f32; 256]],
) {
    let [c, h, w] = shape;
    assert!(src.len() == c * h * w && dst.len() == c * h * w && tables.len() == c);
    assert!(
        dy <= 2 * PAD && dx <= 2 * PAD,
        "crop offset ({dy}, {dx}) beyond the padding"
    );
    for ch in 0..c {
        let table = &tables[ch];
        let zero = table[0];
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        let out_plane = &mut dst[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let out_row = &mut out_plane[y * w..(y + 1) * w];
            // Source row y + dy - PAD; outside the image it is padding.
            let sy = (y + dy).wrapping_sub(PAD);
            if sy >= h {
                out_row.fill(zero);
                continue;
            }
            let row = &plane[sy * w..(sy + 1) * w];
            for (x, out) in out_row.iter_mut().enumerate() {
                let xc = if flip { w - 1 - x } else { x };
                let sx = (xc + dx).wrapping_sub(PAD);
                *out = if sx < w {
                    table[row[sx] as usize]
                } else {
                    zero
                };
            }
        }
    }
}

/// The tables of [`Normalize::lookup_tables`] as an f32 `[C, 256]` tensor on `device`.
pub fn lookup_table_tensor(tables: &[[f32; 256]], device: Device) -> Tensor {
    let flat: Vec<f32> = tables.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .view([tables.len() as i64, 256])
        .to_device(device)
}

/// [`augment_into`] for a whole batch in tensor operations, so that it runs where the images are
/// (on a GPU, for one): `images` u8 `[B, C, H, W]`, crop offsets `dy`, `dx` and flips `flip`
/// (0 or 1) i64 `[B]`, `tables` from [`lookup_table_tensor`], all on one device.
///
/// Bit-identical to `augment_into` with the same draws: it reads the same window of the
/// zero-padded image and maps bytes through the same tables, rather than dividing (which CUDA
/// kernels do as a multiplication by the reciprocal, a different rounding).
pub fn augment_batch(
    images: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    flip: &Tensor,
    tables: &Tensor,
) -> Tensor {
    let &[b, c, h, w] = images.size().as_slice() else {
        panic!(
            "augment_batch expects images [B, C, H, W], got {:?}",
            images.size()
        );
    };
    let device = images.device();
    let pad = PAD as i64;
    let padded = images.constant_pad_nd([pad, pad, pad, pad]);
    let ys = Tensor::arange(h, (Kind::Int64, device));
    let xs = Tensor::arange(w, (Kind::Int64, device)).view([1, w]);
    // Output pixel (y, x) reads padded pixel (y + dy, x' + dx), x' = x or, flipped, w - 1 - x.
    let rows = dy.view([b, 1]) + ys.view([1, h]);
    let cols = &xs + flip.view([b, 1]) * (&xs * -2 + (w - 1)) + dx.view([b, 1]);
    let sample = Tensor::arange(b, (Kind::Int64, device)).view([b, 1, 1, 1]);
    let channel = Tensor::arange(c, (Kind::Int64, device)).view([1, c, 1, 1]);
    let bytes = padded.index(&[
        Some(sample),
        Some(channel.shallow_clone()),
        Some(rows.view([b, 1, h, 1])),
        Some(cols.view([b, 1, 1, w])),
    ]);
    tables.index(&[Some(channel), Some(bytes.to_kind(Kind::Int64))])
}

/// Normalises u8 images `[B, C, H, W]` (any device) into f32 on `device`, without augmentation.
pub fn normalize_batch(images: &Tensor, norm: &Normalize, device: Device) -> Tensor {
    let size = images.size();
    assert_eq!(
        size.len(),
        4,
        "normalize_batch expects [B, C, H, W], got {size:?}"
    );
    let shape = [size[1] as usize, size[2] as usize, size[3] as usize];
    let per_image = shape.iter().product::<usize>();
    let n = size[0] as usize;
    let mut bytes = vec![0u8; n * per_image];
    images.copy_data(&mut bytes, n * per_image);
    let tables = norm.lookup_tables(shape[0]);
    let mut out = vec![0f32; n * per_image];
    for (src, dst) in bytes
        .chunks_exact(per_image)
        .zip(out.chunks_exact_mut(per_image))
    {
        augment_into(src, dst, shape, PAD, PAD, false, &tables);
    }
    Tensor::from_slice(&out)
        .view([size[0], size[1], size[2], size[3]])
        .to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1-channel 3×3 image is too small for pad 4 to matter much, so use 2 channels of 5×6.
    fn tiny() -> (Vec<u8>, [usize; 3]) {
        let shape = [2, 5, 6];
        let src = (0..60u8).map(|v| v * 4 + 1).collect();
        (src, shape)
    }

    fn run(
        src: &[u8],
        shape: [usize; 3],
        dy: usize,
        dx: usize,
        flip: bool,
        norm: &Normalize,
    ) -> Vec<f32> {
        let mut dst = vec![f32::NAN; src.len()];
        augment_into(
            src,
            &mut dst,
            shape,
            dy,
            dx,
            flip,
            &norm.lookup_tables(shape[0]),
        );
        dst
    }

    #[test]
    fn data_augment_centre_crop_is_identity_and_normalises() {
        let (src, shape) = tiny();
        let norm = Normalize {
            mean: vec![0.5, 0.25],
            std: vec![0.2, 0.5],
        };
        let out = run(&src, shape, PAD, PAD, false, &norm);
        for (i, (&v, &o)) in src.iter().zip(&out).enumerate() {
            let c = i / 30;
            let expected = (v as f32 / 255.0 - norm.mean[c]) / norm.std[c];
            assert_eq!(o, expected, "element {i}");
        }
        let plain = run(&src, shape, PAD, PAD, false, &Normalize::identity());
        assert_eq!(plain[5], src[5] as f32 / 255.0);
    }

    #[test]
    fn data_augment_flip_twice_is_identity() {
        let (src, shape) = tiny();
        let norm = Normalize::identity();
        let once = run(&src, shape, PAD, PAD, true, &norm);
        assert_ne!(once, run(&src, shape, PAD, PAD, false, &norm));
        // Flip the flipped image back: through bytes again, since the output is f32.
        let once_bytes: Vec<u8> = once.iter().map(|v| (v * 255.0).round() as u8).collect();
        assert_eq!(
            run(&once_bytes, shape, PAD, PAD, true, &norm),
            run(&src, shape, PAD, PAD, false, &norm)
        );
    }

    #[test]
    fn data_augment_hand_made_crop_and_flip() {
        // One channel, 2×3: [[10, 20, 30], [40, 50, 60]].
        let src = [10u8, 20, 30, 40, 50, 60];
        let shape = [1, 2, 3];
        let norm = Normalize::identity();
        let px = |v: u8| v as f32 / 255.0;
        // Shift the window one down and one right: (dy, dx) = (PAD + 1, PAD + 1).
        let out = run(&src, shape, PAD + 1, PAD + 1, false, &norm);
        assert_eq!(out, vec![px(50), px(60), 0.0, 0.0, 0.0, 0.0]);
        // One up and two left, mirrored.
        let out = run(&src, shape, PAD - 1, PAD - 2, true, &norm);
        // Unflipped window: row -1 (padding), row 0 → [0, 0, 10]; mirrored: [10, 0, 0].
        assert_eq!(out, vec![0.0, 0.0, 0.0, px(10), 0.0, 0.0]);
        // The far corner of the padding: all zeros, which normalise to -mean/std.
        let norm = Normalize {
            mean: vec![0.5],
            std: vec![0.25],
        };
        assert_eq!(
            run(&src, shape, 2 * PAD, 2 * PAD, false, &norm),
            vec![-2.0; 6]
        );
        // A plain flip.
        let out = run(&src, shape, PAD, PAD, true, &Normalize::identity());
        assert_eq!(out, [30, 20, 10, 60, 50, 40].map(px).to_vec());
    }

    #[test]
    fn data_augment_batch_in_tensor_ops_equals_the_byte_loop() {
        let shape = [3usize, 6, 7];
        let per_image = shape.iter().product::<usize>();
        let n = 2 * (2 * PAD + 1) + 3;
        let bytes: Vec<u8> = (0..n * per_image).map(|i| (i * 37 % 251) as u8).collect();
        let norm = Normalize {
            mean: vec![0.5, 0.4, 0.3],
            std: vec![0.2, 0.25, 0.3],
        };
        let tables = norm.lookup_tables(3);
        // Every offset on each axis, both flips, and the centre crop.
        let draws: Vec<(usize, usize, bool)> = (0..n)
            .map(|i| (i % (2 * PAD + 1), (i * 5 + 2) % (2 * PAD + 1), i % 3 == 1))
            .collect();
        let mut expected = vec![0f32; n * per_image];
        for ((src, dst), &(dy, dx, flip)) in bytes
            .chunks_exact(per_image)
            .zip(expected.chunks_exact_mut(per_image))
            .zip(&draws)
        {
            augment_into(src, dst, shape, dy, dx, flip, &tables);
        }
        let [c, h, w] = shape.map(|d| d as i64);
        let images = Tensor::from_slice(&bytes).view([n as i64, c, h, w]);
        let column = |f: fn(&(usize, usize, bool)) -> i64| {
            Tensor::from_slice(&draws.iter().map(f).collect::<Vec<i64>>())
        };
        let out = augment_batch(
            &images,
            &column(|d| d.0 as i64),
            &column(|d| d.1 as i64),
            &column(|d| d.2 as i64),
            &lookup_table_tensor(&tables, Device::Cpu),
        );
        assert_eq!(out.size(), [n as i64, c, h, w]);
        assert_eq!(out.kind(), Kind::Float);
        let expected = Tensor::from_slice(&expected).view([n as i64, c, h, w]);
        assert!(out.equal(&expected));
    }

    #[test]
    fn data_augment_normalize_batch_matches_formula() {
        let images = Tensor::from_slice(&(0..=255u8).collect::<Vec<_>>())
            .repeat([3])
            .view([2, 3, 8, 16]);
        let norm = Normalize {
            mean: vec![0.1, 0.2, 0.3],
            std: vec![0.4, 0.5, 0.6],
        };
        let out = normalize_batch(&images, &norm, Device::Cpu);
        assert_eq!(out.size(), [2, 3, 8, 16]);
        let mean = Tensor::from_slice(&norm.mean).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&norm.std).view([1, 3, 1, 1]);
        let expected = (images.to_kind(tch::Kind::Float) / 255.0 - mean) / std;
        assert!(out.allclose(&expected, 1e-6, 1e-6, false));
    }
}
