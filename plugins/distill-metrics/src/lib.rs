//! What gets distilled (Ojha et al. NeurIPS 2023), METHODS.md section 6: evaluation metrics that
//! compare the run's model (a distilled or an independently trained student) with a teacher.
//!
//! - `agreement`: % of evaluation images where the model's top-1 equals the teacher's.
//! - `adversarial_transfer`: iterative FGSM on the teacher; of the images whose teacher
//!   prediction it changes, the % whose model prediction changes too.
//! - `jitter_invariance`: % of images whose prediction survives a random colour jitter, by
//!   default torchvision's `ColorJitter(0.4, 0.4, 0.4, 0.2)` with its four transforms in a
//!   random order per image, as torchvision applies them.
//! - `localization` ([`Localization`]): % of images whose Grad-CAM of the true class is closer
//!   (cosine) to the teacher's than an independently trained student's is.
//!
//! The teacher is configured as for `kd`: `teacher = { arch = ..., width = ... }` (its `[model]`
//! table) and `teacher_checkpoint` (the `model.safetensors` of the run that trained it);
//! `localization` takes the independently trained student the same way (`independent`,
//! `independent_checkpoint`).
//!
//! **Pixel space.** The attack budget and the jitter are defined on pixels in [0, 1], but the
//! model sees normalised inputs (x − mean)/std per channel; the metrics undo and redo the
//! normalisation the host tells them (`Host::normalization`), whatever the dataset.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};
use trellis_sdk::{
    Batch, Component, EpochInfo, Error, Host, Metric, MetricValues, Model, Outputs, Plugin, Result,
};
use trellis_teacher::load_teacher;

mod localization;
pub use localization::{grad_cam, upsample_cam, Localization, LocalizationConfig};

fn top1(logits: &Tensor) -> Tensor {
    logits.argmax(-1, false)
}

fn count(mask: &Tensor) -> Tensor {
    mask.sum(Kind::Float)
}

/// Adds `values` into a running total kept on the device, so evaluation never waits on a copy.
fn accumulate(total: &mut Option<Tensor>, values: Tensor) {
    *total = Some(match total.take() {
        Some(t) => t + values,
        None => values,
    });
}

fn read(total: &Option<Tensor>) -> Vec<f64> {
    total
        .as_ref()
        .map(|t| Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap_or_default())
        .unwrap_or_default()
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        f64::NAN
    }
}

/// The per-channel normalisation between pixels in [0, 1] and model inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalisation {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Normalisation {
    /// The normalisation the host applies to the run's images.
    pub fn of_host(host: &Host) -> Result<Normalisation> {
        let n = host.normalization();
        if n.mean.is_empty() || n.mean.len() != n.std.len() {
            return Err(Error::msg(format!(
                "the host's normalisation has {} means and {} stds",
                n.mean.len(),
                n.std.len()
            )));
        }
        if n.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::msg(format!(
                "the host's normalisation has a std that is not > 0: {:?}",
                n.std
            )));
        }
        Ok(Normalisation {
            mean: n.mean,
            std: n.std,
        })
    }

    /// `values` as a `[1, C, 1, 1]` tensor matching `like`, after checking the channel count.
    fn channels(&self, values: &[f64], like: &Tensor) -> Result<Tensor> {
        let channels = like.size().get(1).copied().unwrap_or(0);
        if like.dim() != 4 || channels != values.len() as i64 {
            return Err(Error::msg(format!(
                "the normalisation has {} channels but the images are {:?}",
                values.len(),
                like.size()
            )));
        }
        Ok(Tensor::from_slice(values)
            .to_kind(like.kind())
            .to_device(like.device())
            .view([1, channels, 1, 1]))
    }

    pub fn to_pixels(&self, inputs: &Tensor) -> Result<Tensor> {
        Ok(inputs * self.channels(&self.std, inputs)? + self.channels(&self.mean, inputs)?)
    }

    pub fn to_inputs(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok((pixels - self.channels(&self.mean, pixels)?) / self.channels(&self.std, pixels)?)
    }

    /// A pixel-space length per channel in input units: `value / std`, `[1, C, 1, 1]`.
    fn pixel_length(&self, value: f64, like: &Tensor) -> Result<Tensor> {
        let scaled: Vec<f64> = self.std.iter().map(|s| value / s).collect();
        self.channels(&scaled, like)
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgreementConfig {
    pub teacher_checkpoint: PathBuf,
    pub teacher: toml::Table,
}

/// Top-1 agreement with the teacher, correct or not, in percent (`teacher_agreement`).
pub struct Agreement {
    teacher: Model,
    /// [agreeing images, images]
    totals: Option<Tensor>,
}

impl Component for Agreement {
    const NAME: &'static str = "agreement";
    const DESCRIPTION: &'static str =
        "% of evaluation images where the model's top-1 equals the teacher's";
    type Config = AgreementConfig;

    fn new(config: AgreementConfig, host: Host) -> Result<Self> {
        let teacher = load_teacher(
            &host,
            Self::NAME,
            &config.teacher,
            &config.teacher_checkpoint,
        )?;
        Ok(Agreement {
            teacher,
            totals: None,
        })
    }
}

impl Metric for Agreement {
    fn reset(&mut self) -> Result<()> {
        self.totals = None;
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        let teacher = tch::no_grad(|| self.teacher.forward(&batch.inputs))?;
        let agree = top1(&outputs.logits).eq_tensor(&top1(&teacher.logits));
        let n = Tensor::full(
            [] as [i64; 0],
            agree.size()[0] as f64,
            (Kind::Float, agree.device()),
        );
        accumulate(&mut self.totals, Tensor::stack(&[count(&agree), n], 0));
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let scalars = match read(&self.totals)[..] {
            [agree, n] => vec![("teacher_agreement".to_string(), percent(agree, n))],
            _ => Vec::new(),
        };
        Ok(MetricValues {
            scalars,
            tables: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdversarialConfig {
    /// L∞ budget in pixel units (pixels in [0, 1]); Ojha et al. give none, 8/255 is the CIFAR
    /// convention.
    pub epsilon: f64,
    /// FGSM iterations on the teacher.
    pub steps: i64,
    /// Per-iteration step in pixel units.
    pub step_size: f64,
    /// Attack only the first N evaluation images (0: all of them); the attack costs `steps`
    /// teacher forward and backward passes per image.
    pub max_images: i64,
    pub teacher_checkpoint: PathBuf,
    pub teacher: toml::Table,
}

impl Default for AdversarialConfig {
    fn default() -> Self {
        AdversarialConfig {
            epsilon: 8.0 / 255.0,
            steps: 5,
            step_size: 2.0 / 255.0,
            max_images: 0,
            teacher_checkpoint: PathBuf::new(),
            teacher: toml::Table::new(),
        }
    }
}

/// One iterative-FGSM step on `model`: ascend the cross-entropy against `labels` by
/// `step`·sign(∇ₓ), then clip into [`lower`, `upper`] (the ε-ball intersected with the valid
/// pixel range, in input units). The gradient is taken with respect to the input only: the
/// model's parameters receive none.
pub fn fgsm_step(
    model: &Model,
    inputs: &Tensor,
    labels: &Tensor,
    step: &Tensor,
    lower: &Tensor,
    upper: &Tensor,
) -> Result<Tensor> {
    tch::with_grad(|| {
        let x = inputs.detach().set_requires_grad(true);
        let loss = model.forward(&x)?.logits.f_cross_entropy_loss::<Tensor>(
            labels,
            None,
            Reduction::Mean,
            -100,
            0.0,
        )?;
        let grad = Tensor::f_run_backward(&[&loss], &[&x], false, false)?
            .pop()
            .ok_or_else(|| Error::msg("no gradient with respect to the input"))?;
        let moved = x.detach() + step * grad.sign();
        Ok(moved.f_clamp_tensor(Some(lower), Some(upper))?)
    })
}

/// Iterative FGSM (Kurakin et al.) on the teacher, as in Ojha et al.: `steps` steps of
/// `step_size` within an L∞ ball of `epsilon` around each image, both in pixel units and
/// converted to input units per channel (÷ std); the images also stay in the valid pixel range
/// [0, 1] ((0 − mean)/std to (1 − mean)/std in input units). The attack pushes the teacher away
/// from its own clean prediction, since "fooled" means that prediction changes.
///
/// Reports `adversarial_transfer`: of the images whose teacher prediction changed, the % whose
/// model prediction changed from its clean one too (Ojha et al., ResNet50 → ResNet18 on ImageNet:
/// independent 44.16 %, distilled 51.98 %), and `teacher_fooled`: the % of attacked images that
/// fooled the teacher, the denominator's share. `adversarial_transfer` is left out of an
/// evaluation in which no image fooled the teacher.
pub struct AdversarialTransfer {
    teacher: Model,
    student: Model,
    normalisation: Normalisation,
    epsilon: f64,
    steps: i64,
    step_size: f64,
    max_images: i64,
    seen: i64,
    /// [fooled the teacher, fooled both, attacked images]
    totals: Option<Tensor>,
}

impl Component for AdversarialTransfer {
    const NAME: &'static str = "adversarial_transfer";
    const DESCRIPTION: &'static str =
        "% of iterative-FGSM images that fool the teacher and also change the model's prediction";
    type Config = AdversarialConfig;

    fn new(config: AdversarialConfig, host: Host) -> Result<Self> {
        for (key, value) in [("epsilon", config.epsilon), ("step_size", config.step_size)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(Error::config(
                    key,
                    format!("{key} must be > 0, got {value}"),
                ));
            }
        }
        if config.steps < 1 {
            return Err(Error::config("steps", "steps must be >= 1"));
        }
        if config.max_images < 0 {
            return Err(Error::config(
                "max_images",
                "max_images must be >= 0 (0: all)",
            ));
        }
        let normalisation = Normalisation::of_host(&host)?;
        let teacher = load_teacher(
            &host,
            Self::NAME,
            &config.teacher,
            &config.teacher_checkpoint,
        )?;
        Ok(AdversarialTransfer {
            teacher,
            student: host.model()?,
            normalisation,
            epsilon: config.epsilon,
            steps: config.steps,
            step_size: config.step_size,
            max_images: config.max_images,
            seen: 0,
            totals: None,
        })
    }
}

impl AdversarialTransfer {
    /// The attacked images, in input units.
    fn attack(&self, inputs: &Tensor, teacher_clean: &Tensor) -> Result<Tensor> {
        let norm = &self.normalisation;
        let pixel_lo = norm.to_inputs(&inputs.zeros_like())?;
        let pixel_hi = norm.to_inputs(&inputs.ones_like())?;
        let epsilon = norm.pixel_length(self.epsilon, inputs)?;
        let lower = (inputs - &epsilon).maximum(&pixel_lo);
        let upper = (inputs + &epsilon).minimum(&pixel_hi);
        let step = norm.pixel_length(self.step_size, inputs)?;
        let mut x = inputs.shallow_clone();
        for _ in 0..self.steps {
            x = fgsm_step(&self.teacher, &x, teacher_clean, &step, &lower, &upper)?;
        }
        Ok(x)
    }
}

impl Metric for AdversarialTransfer {
    fn reset(&mut self) -> Result<()> {
        self.totals = None;
        self.seen = 0;
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        let mut n = batch.inputs.size()[0];
        if self.max_images > 0 {
            n = n.min(self.max_images - self.seen);
        }
        if n <= 0 {
            return Ok(());
        }
        self.seen += n;
        let inputs = batch.inputs.narrow(0, 0, n);
        let student_clean = top1(&outputs.logits.narrow(0, 0, n));
        let teacher_clean =
            tch::no_grad(|| self.teacher.forward(&inputs)).map(|o| top1(&o.logits))?;
        let adversarial = self.attack(&inputs, &teacher_clean)?;
        let (teacher_adv, student_adv) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            Ok((
                top1(&self.teacher.forward(&adversarial)?.logits),
                top1(&self.student.forward(&adversarial)?.logits),
            ))
        })?;
        let fooled_teacher = teacher_adv.ne_tensor(&teacher_clean);
        let fooled_both = fooled_teacher.logical_and(&student_adv.ne_tensor(&student_clean));
        let attacked = Tensor::full([] as [i64; 0], n as f64, (Kind::Float, inputs.device()));
        accumulate(
            &mut self.totals,
            Tensor::stack(&[count(&fooled_teacher), count(&fooled_both), attacked], 0),
        );
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let mut scalars = Vec::new();
        if let [fooled_teacher, fooled_both, attacked] = read(&self.totals)[..] {
            scalars.push((
                "teacher_fooled".to_string(),
                percent(fooled_teacher, attacked),
            ));
            // Undefined when no image fooled the teacher: left out rather than reported as 0.
            if fooled_teacher > 0.0 {
                let rate = percent(fooled_both, fooled_teacher);
                scalars.push(("adversarial_transfer".to_string(), rate));
            }
        }
        Ok(MetricValues {
            scalars,
            tables: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JitterConfig {
    /// torchvision `ColorJitter` strengths, by default its `ColorJitter(0.4, 0.4, 0.4, 0.2)`:
    /// brightness, contrast and saturation factors are drawn from U[max(0, 1 − s), 1 + s], the
    /// hue shift from U[−h, h] (in turns of the colour wheel). As torchvision does, each image
    /// also gets the four transforms in an order of its own, a uniformly drawn permutation.
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    /// Seed of the jitter draws (order and strengths); every evaluation (and every run with the
    /// same seed) jitters image i the same way, so numbers are comparable across epochs and runs.
    pub seed: u64,
    /// Optional: with a teacher, its invariance is reported too, for comparison.
    pub teacher_checkpoint: PathBuf,
    pub teacher: toml::Table,
}

impl Default for JitterConfig {
    fn default() -> Self {
        JitterConfig {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.2,
            seed: 0,
            teacher_checkpoint: PathBuf::new(),
            teacher: toml::Table::new(),
        }
    }
}

/// SplitMix64: a small, fixed generator, so the jitter never draws from (and never shifts)
/// libtorch's global random stream that training uses.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit
    }

    /// Uniform in 0..n (Lemire's multiply-shift: no modulo bias worth the name for small n).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A uniformly drawn permutation of the four transforms (Fisher–Yates), as torchvision's
    /// `torch.randperm(4)`.
    fn order(&mut self) -> [ColourTransform; 4] {
        let mut order = ColourTransform::ALL;
        for i in (1..order.len()).rev() {
            order.swap(i, self.below(i + 1));
        }
        order
    }
}

/// One of the four transforms of torchvision's `ColorJitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColourTransform {
    /// Scale towards black by the brightness factor.
    Brightness,
    /// Blend with the image's mean grey by the contrast factor.
    Contrast,
    /// Blend with the per-pixel grey by the saturation factor.
    Saturation,
    /// Rotate the hue ([`hue_matrix`]).
    Hue,
}

impl ColourTransform {
    /// torchvision's numbering (`fn_idx` 0–3), the order [`Jitter::IDENTITY`] lists.
    pub const ALL: [ColourTransform; 4] = [
        ColourTransform::Brightness,
        ColourTransform::Contrast,
        ColourTransform::Saturation,
        ColourTransform::Hue,
    ];
}

/// The strengths jitters are drawn with (see [`JitterConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Strengths {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
}

/// One image's jitter: multiplicative factors, a hue shift in turns, and the order in which
/// [`colour_jitter`] applies the four.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    /// A permutation of [`ColourTransform::ALL`].
    pub order: [ColourTransform; 4],
}

impl Jitter {
    pub const IDENTITY: Jitter = Jitter {
        brightness: 1.0,
        contrast: 1.0,
        saturation: 1.0,
        hue: 0.0,
        order: ColourTransform::ALL,
    };

    fn parameter(&self, transform: ColourTransform) -> f64 {
        match transform {
            ColourTransform::Brightness => self.brightness,
            ColourTransform::Contrast => self.contrast,
            ColourTransform::Saturation => self.saturation,
            ColourTransform::Hue => self.hue,
        }
    }
}

/// ITU-R BT.601 luma weights, as torchvision's `rgb_to_grayscale`.
const LUMA: [f64; 3] = [0.299, 0.587, 0.114];
/// RGB → YIQ (NTSC); the rows after Y span the chroma plane that a hue shift rotates.
const RGB_TO_YIQ: [[f64; 3]; 3] = [
    LUMA,
    [0.595_716, -0.274_453, -0.321_263],
    [0.211_456, -0.522_591, 0.311_135],
];

fn mat_mul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut out = [[0.0; 3]; 3];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            *cell = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    out
}

fn mat_inverse(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let cof =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let adj = [
        [cof(1, 2, 1, 2), -cof(0, 2, 1, 2), cof(0, 1, 1, 2)],
        [-cof(1, 2, 0, 2), cof(0, 2, 0, 2), -cof(0, 1, 0, 2)],
        [cof(1, 2, 0, 1), -cof(0, 2, 0, 1), cof(0, 1, 0, 1)],
    ];
    let det: f64 = (0..3).map(|j| m[0][j] * adj[j][0]).sum();
    adj.map(|row| row.map(|v| v / det))
}

/// The RGB → RGB matrix of a hue shift by `turns` of the colour wheel: rotate the (I, Q) chroma
/// plane of YIQ by 2π·turns, keeping luma. A linear stand-in for torchvision's HSV round trip:
/// the same idea (rotate hue, keep brightness), without HSV's piecewise conversion.
pub fn hue_matrix(turns: f64) -> [[f64; 3]; 3] {
    let (sin, cos) = (std::f64::consts::TAU * turns).sin_cos();
    let rotation = [[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]];
    mat_mul(&mat_inverse(&RGB_TO_YIQ), &mat_mul(&rotation, &RGB_TO_YIQ))
}

fn grayscale(pixels: &Tensor) -> Tensor {
    if pixels.size()[1] == 1 {
        return pixels.shallow_clone();
    }
    let luma = Tensor::from_slice(&LUMA)
        .to_kind(pixels.kind())
        .to_device(pixels.device())
        .view([1, 3, 1, 1]);
    (pixels * luma).sum_dim_intlist([1i64].as_slice(), true, pixels.kind())
}

/// Colour jitter of RGB pixels in [0, 1], `[B, 3, H, W]`, one [`Jitter`] per image, each
/// image's four transforms in its own [`Jitter::order`], as torchvision's `ColorJitter` applies
/// them in a random order per call: brightness (scale towards black), contrast (blend with the
/// image's mean grey), saturation (blend with the per-pixel grey), hue (see [`hue_matrix`]); each
/// result is clipped to [0, 1] as torchvision does. Grey images (`[B, 1, H, W]`) get brightness
/// and contrast only: torchvision leaves their saturation and hue unchanged.
pub fn colour_jitter(pixels: &Tensor, jitters: &[Jitter]) -> Result<Tensor> {
    let size = pixels.size();
    if size.len() != 4 || ![1, 3].contains(&size[1]) || size[0] != jitters.len() as i64 {
        return Err(Error::msg(format!(
            "colour jitter needs RGB or grey images [B, 3 or 1, H, W] and one jitter per image, \
             got {size:?} and {} jitters",
            jitters.len()
        )));
    }
    if let Some(j) = jitters
        .iter()
        .find(|j| !ColourTransform::ALL.iter().all(|t| j.order.contains(t)))
    {
        return Err(Error::msg(format!(
            "a jitter's order must name each transform once, got {:?}",
            j.order
        )));
    }
    let (kind, device) = (pixels.kind(), pixels.device());
    let per_image = |values: Vec<f64>| {
        Tensor::from_slice(&values)
            .to_kind(kind)
            .to_device(device)
            .view([-1, 1, 1, 1])
    };
    let blend = |image: &Tensor, other: &Tensor, factor: &Tensor| -> Tensor {
        let rest: Tensor = -factor + 1.0;
        (image * factor + other * rest).clamp(0.0, 1.0)
    };
    let grey = size[1] == 1;
    let mut x = pixels.shallow_clone();
    // The batch stays one tensor: at step k every transform that some image has k-th is applied
    // to the whole batch, and only the images that have it there take the result, so the others
    // are left exactly as they were.
    for step in 0..ColourTransform::ALL.len() {
        for transform in ColourTransform::ALL {
            let takes: Vec<bool> = jitters.iter().map(|j| j.order[step] == transform).collect();
            let skipped = grey
                && matches!(
                    transform,
                    ColourTransform::Saturation | ColourTransform::Hue
                );
            if skipped || !takes.contains(&true) {
                continue;
            }
            let parameters = jitters.iter().map(|j| j.parameter(transform)).collect();
            let transformed = match transform {
                ColourTransform::Brightness => (&x * per_image(parameters)).clamp(0.0, 1.0),
                ColourTransform::Contrast => {
                    let mean_grey = grayscale(&x).mean_dim([1i64, 2, 3].as_slice(), true, kind);
                    blend(&x, &mean_grey, &per_image(parameters))
                }
                ColourTransform::Saturation => blend(&x, &grayscale(&x), &per_image(parameters)),
                ColourTransform::Hue => {
                    let matrices: Vec<f64> = jitters
                        .iter()
                        .flat_map(|j| hue_matrix(j.hue).into_iter().flatten())
                        .collect();
                    let matrices = Tensor::from_slice(&matrices)
                        .to_kind(kind)
                        .to_device(device)
                        .view([-1, 3, 3]);
                    let shifted = matrices.matmul(&x.flatten(2, 3)).view(size.as_slice());
                    shifted.clamp(0.0, 1.0)
                }
            };
            let takes = Tensor::from_slice(&takes)
                .to_device(device)
                .view([-1, 1, 1, 1]);
            x = transformed.where_self(&takes, &x);
        }
    }
    Ok(x)
}

/// % of evaluation images whose top-1 prediction is unchanged by a colour jitter
/// (`jitter_invariance`; with a teacher, also `teacher_jitter_invariance`).
///
/// Each image gets its own draw of torchvision's `ColorJitter`: a random order of brightness,
/// contrast, saturation and hue, then the four strengths ([`JitterConfig`]), from a generator
/// seeded with `seed` at every evaluation, so image i is jittered the same way every time. The
/// jitter is applied in pixel space: inputs are un-normalised, jittered and re-normalised.
pub struct JitterInvariance {
    student: Model,
    teacher: Option<Model>,
    normalisation: Normalisation,
    strengths: Strengths,
    seed: u64,
    rng: SplitMix64,
    /// [model invariant, teacher invariant, images]
    totals: Option<Tensor>,
}

impl Component for JitterInvariance {
    const NAME: &'static str = "jitter_invariance";
    const DESCRIPTION: &'static str =
        "% of evaluation images whose prediction survives torchvision's ColorJitter, its transforms \
         in a random order per image (and the teacher's, if given)";
    type Config = JitterConfig;

    fn new(config: JitterConfig, host: Host) -> Result<Self> {
        for (key, value, max) in [
            ("brightness", config.brightness, 1.0),
            ("contrast", config.contrast, 1.0),
            ("saturation", config.saturation, 1.0),
            ("hue", config.hue, 0.5),
        ] {
            if !(0.0..=max).contains(&value) {
                return Err(Error::config(
                    key,
                    format!("{key} must be in [0, {max}], got {value}"),
                ));
            }
        }
        let normalisation = Normalisation::of_host(&host)?;
        let teacher =
            if config.teacher.is_empty() && config.teacher_checkpoint.as_os_str().is_empty() {
                None
            } else {
                Some(load_teacher(
                    &host,
                    Self::NAME,
                    &config.teacher,
                    &config.teacher_checkpoint,
                )?)
            };
        Ok(JitterInvariance {
            student: host.model()?,
            teacher,
            normalisation,
            strengths: Strengths {
                brightness: config.brightness,
                contrast: config.contrast,
                saturation: config.saturation,
                hue: config.hue,
            },
            seed: config.seed,
            rng: SplitMix64(config.seed),
            totals: None,
        })
    }
}

impl JitterInvariance {
    /// The next image's jitter: the order first, then the factors, as torchvision's
    /// `ColorJitter.get_params` draws them.
    fn draw(&mut self) -> Jitter {
        let s = self.strengths;
        let order = self.rng.order();
        let mut factor =
            |strength: f64| self.rng.uniform((1.0 - strength).max(0.0), 1.0 + strength);
        Jitter {
            brightness: factor(s.brightness),
            contrast: factor(s.contrast),
            saturation: factor(s.saturation),
            hue: self.rng.uniform(-s.hue, s.hue),
            order,
        }
    }
}

impl Metric for JitterInvariance {
    fn reset(&mut self) -> Result<()> {
        self.totals = None;
        self.rng = SplitMix64(self.seed);
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        let n = batch.inputs.size()[0];
        let jitters: Vec<Jitter> = (0..n).map(|_| self.draw()).collect();
        let norm = &self.normalisation;
        let jittered =
            norm.to_inputs(&colour_jitter(&norm.to_pixels(&batch.inputs)?, &jitters)?)?;
        let invariant = |model: &Model, clean: &Tensor| -> Result<Tensor> {
            let moved = tch::no_grad(|| model.forward(&jittered))?;
            Ok(count(&top1(&moved.logits).eq_tensor(&top1(clean))))
        };
        let student = invariant(&self.student, &outputs.logits)?;
        let teacher = match &self.teacher {
            Some(t) => {
                let clean = tch::no_grad(|| t.forward(&batch.inputs))?;
                invariant(t, &clean.logits)?
            }
            None => student.zeros_like(),
        };
        let images = Tensor::full([] as [i64; 0], n as f64, (Kind::Float, student.device()));
        accumulate(
            &mut self.totals,
            Tensor::stack(&[student, teacher, images], 0),
        );
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let mut scalars = Vec::new();
        if let [student, teacher, images] = read(&self.totals)[..] {
            scalars.push(("jitter_invariance".to_string(), percent(student, images)));
            if self.teacher.is_some() {
                scalars.push((
                    "teacher_jitter_invariance".to_string(),
                    percent(teacher, images),
                ));
            }
        }
        Ok(MetricValues {
            scalars,
            tables: Vec::new(),
        })
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "what gets distilled: teacher agreement, adversarial transfer, colour-jitter invariance, \
     Grad-CAM localisation"
)
.metric::<Agreement>()
.metric::<AdversarialTransfer>()
.metric::<JitterInvariance>()
.metric::<Localization>());

#[cfg(test)]
mod tests {
    use tch::Device;
    use trellis_sdk::testing::FakeHost;
    use trellis_sdk::{Architecture, LayerKind, Normalization, Param};

    use super::*;

    /// logits = flatten(x)·Wᵀ + b on images [B, 3, 2, 2], 3 classes.
    struct Linear {
        weight: Tensor,
        bias: Tensor,
    }

    impl Linear {
        /// Random weights times `scale`; trainable, so a test can check none reaches them.
        fn random(seed: i64, scale: f64) -> Linear {
            tch::manual_seed(seed);
            let randn = |shape: &[i64]| {
                (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * scale).set_requires_grad(true)
            };
            Linear {
                weight: randn(&[3, 12]),
                bias: randn(&[3]),
            }
        }

        fn negated(&self) -> Linear {
            Linear {
                weight: -self.weight.detach(),
                bias: -self.bias.detach(),
            }
        }

        /// A model sharing these tensors.
        fn model(&self) -> Model {
            Model::new(Linear {
                weight: self.weight.shallow_clone(),
                bias: self.bias.shallow_clone(),
            })
        }
    }

    impl Architecture for Linear {
        fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
            let features = inputs.flatten(1, -1);
            Ok(Outputs {
                logits: self.head(&features)?,
                features,
            })
        }
        fn head(&self, features: &Tensor) -> Result<Tensor> {
            Ok(features.linear(&self.weight, Some(&self.bias)))
        }
        fn parameters(&self) -> Result<Vec<Param>> {
            Ok(vec![Param {
                name: "fc.weight".into(),
                module: "fc".into(),
                kind: LayerKind::Linear,
                tensor: self.weight.shallow_clone(),
            }])
        }
        fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
            Ok(Vec::new())
        }
        fn set_training(&self, _train: bool) -> Result<()> {
            Ok(())
        }
        fn is_training(&self) -> Result<bool> {
            Ok(false)
        }
        fn set_double(&self, _double: bool) -> Result<()> {
            Ok(())
        }
        /// The flattened `[3, 2, 2]` image.
        fn feature_dim(&self) -> Result<i64> {
            Ok(12)
        }
        fn spec(&self) -> Result<String> {
            Ok("use = \"linear\"\n".into())
        }
    }

    fn info() -> EpochInfo {
        EpochInfo {
            epoch: 1,
            epochs: 1,
            step: 1,
        }
    }

    fn scalar(values: &MetricValues, name: &str) -> f64 {
        values
            .scalars
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} in {values:?}"))
            .1
    }

    /// CIFAR-10's per-channel statistics, as a host normalising CIFAR images tells them.
    fn cifar_stats() -> Normalization {
        Normalization {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2470, 0.2435, 0.2616],
        }
    }

    /// The normalisation the metrics take from a host with [`cifar_stats`].
    fn cifar() -> Normalisation {
        let host = FakeHost::without_model()
            .normalization(cifar_stats())
            .host();
        Normalisation::of_host(&host).unwrap()
    }

    /// Normalised inputs of random pixels in [0, 1].
    fn batch(n: i64) -> Batch {
        tch::manual_seed(11);
        let pixels = Tensor::rand([n, 3, 2, 2], (Kind::Float, Device::Cpu));
        Batch {
            inputs: cifar().to_inputs(&pixels).unwrap(),
            targets: Tensor::zeros([n], (Kind::Int64, Device::Cpu)),
        }
    }

    fn agreement(student: &Linear, teacher: &Linear, batch: &Batch) -> f64 {
        let mut metric = Agreement {
            teacher: teacher.model(),
            totals: None,
        };
        metric.reset().unwrap();
        let outputs = student.forward(&batch.inputs).unwrap();
        metric.update(batch, &outputs).unwrap();
        scalar(&metric.compute(info()).unwrap(), "teacher_agreement")
    }

    #[test]
    fn agreement_of_a_model_with_itself_is_100_percent() {
        let net = Linear::random(1, 1.0);
        let b = batch(64);
        assert_eq!(agreement(&net, &net, &b), 100.0);
        // Negated logits rank the classes in reverse: the top-1s never agree.
        assert_eq!(agreement(&net, &net.negated(), &b), 0.0);
    }

    #[test]
    fn fgsm_step_increases_the_teachers_loss_and_stays_in_bounds() {
        let teacher = Linear::random(2, 1.0);
        let model = teacher.model();
        let b = batch(16);
        let labels = top1(&model.forward(&b.inputs).unwrap().logits);
        let loss = |x: &Tensor| {
            let logits = model.forward(x).unwrap().logits;
            logits.cross_entropy_for_logits(&labels).double_value(&[])
        };
        let step = Tensor::from(0.05f32);
        let (lower, upper) = (&b.inputs - 0.03, &b.inputs + 1.0);
        let moved =
            tch::no_grad(|| fgsm_step(&model, &b.inputs, &labels, &step, &lower, &upper)).unwrap();
        assert!(loss(&moved) > loss(&b.inputs) + 1e-4);
        let delta = &moved - &b.inputs;
        assert!(delta.max().double_value(&[]) <= 0.05 + 1e-6);
        assert!(delta.min().double_value(&[]) >= -0.03 - 1e-6);
        assert!(
            !teacher.weight.grad().defined(),
            "the teacher must get no gradient"
        );
    }

    fn transfer(student: &Linear, teacher: &Linear, b: &Batch) -> (AdversarialTransfer, f64, f64) {
        let mut metric = AdversarialTransfer {
            teacher: teacher.model(),
            student: student.model(),
            normalisation: cifar(),
            epsilon: 8.0 / 255.0,
            steps: 5,
            step_size: 2.0 / 255.0,
            max_images: 0,
            seen: 0,
            totals: None,
        };
        metric.reset().unwrap();
        let outputs = student.forward(&b.inputs).unwrap();
        tch::no_grad(|| metric.update(b, &outputs)).unwrap();
        let values = metric.compute(info()).unwrap();
        let (rate, fooled) = (
            scalar(&values, "adversarial_transfer"),
            scalar(&values, "teacher_fooled"),
        );
        (metric, rate, fooled)
    }

    #[test]
    fn adversarial_transfer_to_the_teacher_itself_is_total_and_to_a_constant_model_nil() {
        // Large weights make the 8/255 budget enough to flip some teacher predictions.
        let teacher = Linear::random(3, 30.0);
        let b = batch(200);
        let (_, rate, fooled) = transfer(&teacher, &teacher, &b);
        assert!(
            fooled > 0.0,
            "the attack must fool the teacher on some images"
        );
        assert_eq!(rate, 100.0);
        let constant = Linear {
            weight: Tensor::zeros([3, 12], (Kind::Float, Device::Cpu)),
            bias: Tensor::from_slice(&[0.0f32, 1.0, 0.0]),
        };
        let (_, rate, _) = transfer(&constant, &teacher, &b);
        assert_eq!(rate, 0.0);
    }

    #[test]
    fn the_attack_stays_within_epsilon_and_the_pixel_range() {
        let teacher = Linear::random(4, 30.0);
        let b = batch(50);
        let (metric, _, _) = transfer(&teacher, &teacher, &b);
        let clean = tch::no_grad(|| top1(&teacher.forward(&b.inputs).unwrap().logits));
        let attacked = metric.attack(&b.inputs, &clean).unwrap();
        let norm = cifar();
        let (before, after) = (
            norm.to_pixels(&b.inputs).unwrap(),
            norm.to_pixels(&attacked).unwrap(),
        );
        let moved = (&after - &before).abs().max().double_value(&[]);
        assert!(moved <= 8.0 / 255.0 + 1e-5, "moved {moved}");
        assert!(
            moved > 7.0 / 255.0,
            "5 steps of 2/255 reach the budget, moved {moved}"
        );
        assert!(after.min().double_value(&[]) >= -1e-5);
        assert!(after.max().double_value(&[]) <= 1.0 + 1e-5);
    }

    fn pixels(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).view([-1, 3, 1, 1])
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        a.allclose(b, 1e-5, 1e-5, false)
    }

    #[test]
    fn colour_jitter_components_by_hand() {
        let x = pixels(&[0.2, 0.5, 0.8, 0.6, 0.1, 0.3]);
        let jitter = |j: Jitter| colour_jitter(&x, &[j, j]).unwrap();
        assert!(close(&jitter(Jitter::IDENTITY), &x));
        let brighter = Jitter {
            brightness: 1.5,
            ..Jitter::IDENTITY
        };
        assert!(close(
            &jitter(brighter),
            &pixels(&[0.3, 0.75, 1.0, 0.9, 0.15, 0.45])
        ));
        // Saturation 0 leaves each pixel's grey, contrast 0 the image's mean grey.
        let grey = Jitter {
            saturation: 0.0,
            ..Jitter::IDENTITY
        };
        let luma = |p: [f32; 3]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
        let (g0, g1) = (luma([0.2, 0.5, 0.8]), luma([0.6, 0.1, 0.3]));
        assert!(close(&jitter(grey), &pixels(&[g0, g0, g0, g1, g1, g1])));
        // Per-image contrast: each image is its own here (one pixel), so it is its mean grey.
        let flat = Jitter {
            contrast: 0.0,
            ..Jitter::IDENTITY
        };
        assert!(close(&jitter(flat), &pixels(&[g0, g0, g0, g1, g1, g1])));
    }

    #[test]
    fn colour_jitter_of_grey_images_is_brightness_and_contrast_only() {
        // One image of two grey pixels, 0.2 and 0.6 (mean 0.4).
        let x = Tensor::from_slice(&[0.2f32, 0.6]).view([1, 1, 1, 2]);
        let j = Jitter {
            brightness: 1.5,
            contrast: 0.5,
            saturation: 0.0,
            hue: 0.3,
            order: ColourTransform::ALL,
        };
        // Brightness: 0.3, 0.9 (mean 0.6); contrast 0.5 halves the distance to the mean.
        let expected = Tensor::from_slice(&[0.45f32, 0.75]).view([1, 1, 1, 2]);
        assert!(close(&colour_jitter(&x, &[j]).unwrap(), &expected));
        let two = Tensor::zeros([1, 2, 1, 1], (Kind::Float, Device::Cpu));
        assert!(colour_jitter(&two, &[j]).is_err());
    }

    #[test]
    fn hue_shift_rotates_colour_and_keeps_luma_and_greys() {
        let x = pixels(&[0.4, 0.5, 0.45, 0.3, 0.3, 0.3]);
        let shift = Jitter {
            hue: 0.2,
            ..Jitter::IDENTITY
        };
        let shifted = colour_jitter(&x, &[shift, shift]).unwrap();
        assert!(close(&grayscale(&shifted), &grayscale(&x)));
        let grey = pixels(&[0.3, 0.3, 0.3]);
        assert!(close(&shifted.narrow(0, 1, 1), &grey));
        assert!(!close(&shifted.narrow(0, 0, 1), &x.narrow(0, 0, 1)));
        let full_turn = Jitter {
            hue: 1.0,
            ..Jitter::IDENTITY
        };
        assert!(close(
            &colour_jitter(&x, &[full_turn, full_turn]).unwrap(),
            &x
        ));
    }

    #[test]
    fn normalisation_round_trips_and_checks_channels() {
        let b = batch(4);
        let norm = cifar();
        let back = norm.to_inputs(&norm.to_pixels(&b.inputs).unwrap()).unwrap();
        assert!(close(&back, &b.inputs));
        let grey = Tensor::zeros([2, 1, 4, 4], (Kind::Float, Device::Cpu));
        assert!(norm.to_pixels(&grey).is_err());
    }

    fn invariance(metric: &mut JitterInvariance, student: &Linear, b: &Batch) -> MetricValues {
        metric.reset().unwrap();
        let outputs = student.forward(&b.inputs).unwrap();
        metric.update(b, &outputs).unwrap();
        metric.compute(info()).unwrap()
    }

    #[test]
    fn jitter_invariance_is_total_without_jitter_and_repeatable_with_it() {
        let net = Linear::random(5, 1.0);
        let b = batch(100);
        let mut metric = JitterInvariance {
            student: net.model(),
            teacher: Some(net.model()),
            normalisation: cifar(),
            strengths: Strengths {
                brightness: 0.0,
                contrast: 0.0,
                saturation: 0.0,
                hue: 0.0,
            },
            seed: 0,
            rng: SplitMix64(0),
            totals: None,
        };
        let values = invariance(&mut metric, &net, &b);
        assert_eq!(scalar(&values, "jitter_invariance"), 100.0);
        assert_eq!(scalar(&values, "teacher_jitter_invariance"), 100.0);

        metric.strengths = Strengths {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.2,
        };
        let first = scalar(&invariance(&mut metric, &net, &b), "jitter_invariance");
        let second = scalar(&invariance(&mut metric, &net, &b), "jitter_invariance");
        assert!(
            first < 100.0,
            "a linear model on random pixels is not jitter invariant"
        );
        assert_eq!(first, second, "every evaluation must draw the same jitters");
    }

    #[test]
    fn metrics_take_the_hosts_normalisation_and_no_mean_or_std_keys() {
        let host = |normalization: Normalization| {
            FakeHost::new(Linear::random(7, 1.0))
                .classes(3)
                .input_shape([3, 2, 2])
                .normalization(normalization)
                .host()
        };
        let metric = JitterInvariance::new(JitterConfig::default(), host(cifar_stats())).unwrap();
        assert_eq!(metric.normalisation, cifar());
        assert_eq!(metric.normalisation.mean, cifar_stats().mean);
        // What the removed `mean`/`std` keys checked, now of the host's normalisation.
        for (mean, std) in [
            (vec![0.5; 3], vec![0.5; 2]),
            (vec![0.5; 3], vec![0.5, 0.0, 0.5]),
        ] {
            let err =
                JitterInvariance::new(JitterConfig::default(), host(Normalization { mean, std }))
                    .err()
                    .unwrap();
            assert!(err.message.contains("normalisation"), "{}", err.message);
        }
        let keys = "mean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]";
        assert!(trellis_sdk::parse_config::<JitterConfig>(keys).is_err());
        assert!(trellis_sdk::parse_config::<AdversarialConfig>(keys).is_err());
    }

    fn torchvision_metric() -> JitterInvariance {
        JitterInvariance {
            student: Linear::random(6, 1.0).model(),
            teacher: None,
            normalisation: cifar(),
            strengths: Strengths {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.4,
                hue: 0.2,
            },
            seed: 0,
            rng: SplitMix64(0),
            totals: None,
        }
    }

    #[test]
    fn jitter_factors_follow_torchvision_ranges() {
        let mut metric = torchvision_metric();
        let draws: Vec<Jitter> = (0..2000).map(|_| metric.draw()).collect();
        for (get, lo, hi) in [
            ((|j: &Jitter| j.brightness) as fn(&Jitter) -> f64, 0.6, 1.4),
            (|j: &Jitter| j.contrast, 0.6, 1.4),
            (|j: &Jitter| j.saturation, 0.6, 1.4),
            (|j: &Jitter| j.hue, -0.2, 0.2),
        ] {
            let values: Vec<f64> = draws.iter().map(get).collect();
            let min = values.iter().cloned().fold(f64::MAX, f64::min);
            let max = values.iter().cloned().fold(f64::MIN, f64::max);
            assert!(min >= lo && max < hi, "{min}..{max} outside {lo}..{hi}");
            assert!(
                min < lo + 0.01 && max > hi - 0.01,
                "{min}..{max} does not fill {lo}..{hi}"
            );
        }
    }

    #[test]
    fn jitter_order_is_a_uniform_permutation_drawn_per_image() {
        let mut metric = torchvision_metric();
        let draws: Vec<Jitter> = (0..2400).map(|_| metric.draw()).collect();
        let mut counts = std::collections::HashMap::new();
        for j in &draws {
            for t in ColourTransform::ALL {
                assert!(j.order.contains(&t), "{:?} is not a permutation", j.order);
            }
            *counts.entry(j.order).or_insert(0) += 1;
        }
        // 24 orders, 100 draws each expected (standard deviation ≈ 9.8).
        assert_eq!(counts.len(), 24, "{counts:?}");
        assert!(
            counts.values().all(|&n| (65..=135).contains(&n)),
            "{counts:?}"
        );
        let changes = draws
            .windows(2)
            .filter(|w| w[0].order != w[1].order)
            .count();
        assert!(
            changes > 2000,
            "the order changes from image to image: {changes}"
        );

        // Every evaluation starts the generator afresh: image i gets the same order again.
        metric.reset().unwrap();
        let again: Vec<Jitter> = (0..2400).map(|_| metric.draw()).collect();
        assert_eq!(draws, again);
    }

    /// One image `[3, H, W]` jittered by the formulas, one transform after the other in the
    /// jitter's order.
    fn jitter_by_hand(image: &Tensor, j: &Jitter) -> Tensor {
        let size = image.size();
        let grey =
            |x: &Tensor| (x.get(0) * 0.299 + x.get(1) * 0.587 + x.get(2) * 0.114).unsqueeze(0);
        let mut x = image.shallow_clone();
        for t in j.order {
            x = match t {
                ColourTransform::Brightness => &x * j.brightness,
                ColourTransform::Contrast => {
                    let mean = grey(&x).mean(Kind::Float);
                    &x * j.contrast + mean * (1.0 - j.contrast)
                }
                ColourTransform::Saturation => &x * j.saturation + grey(&x) * (1.0 - j.saturation),
                ColourTransform::Hue => {
                    let m: Vec<f32> = hue_matrix(j.hue)
                        .into_iter()
                        .flatten()
                        .map(|v| v as f32)
                        .collect();
                    Tensor::from_slice(&m)
                        .view([3, 3])
                        .matmul(&x.view([3, -1]))
                        .view(size.as_slice())
                }
            }
            .clamp(0.0, 1.0);
        }
        x
    }

    #[test]
    fn each_image_is_jittered_in_its_own_order_as_by_hand() {
        use ColourTransform::*;
        tch::manual_seed(5);
        let images = Tensor::rand([3, 3, 4, 4], (Kind::Float, Device::Cpu));
        // Strong enough that clipping bites, so no two transforms commute.
        let strong = Jitter {
            brightness: 1.4,
            contrast: 0.6,
            saturation: 1.4,
            hue: 0.15,
            order: ColourTransform::ALL,
        };
        let jitters = [
            Jitter {
                order: [Hue, Saturation, Contrast, Brightness],
                ..strong
            },
            Jitter {
                order: [Contrast, Brightness, Hue, Saturation],
                ..strong
            },
            strong,
        ];
        let jittered = colour_jitter(&images, &jitters).unwrap();
        for (i, j) in jitters.iter().enumerate() {
            let expected = jitter_by_hand(&images.get(i as i64), j);
            assert!(close(&jittered.get(i as i64), &expected), "image {i}");
        }
        // The order matters: the same strengths in torchvision's listed order give another image.
        let listed = colour_jitter(&images, &[strong, strong, strong]).unwrap();
        for i in 0..2 {
            assert!(!close(&jittered.get(i), &listed.get(i)), "image {i}");
        }
        assert!(close(&jittered.get(2), &listed.get(2)));

        let twice = Jitter {
            order: [Hue, Hue, Contrast, Brightness],
            ..strong
        };
        assert!(colour_jitter(&images.narrow(0, 0, 1), &[twice]).is_err());
    }
}
