//! *Localisation* (Ojha et al. NeurIPS 2023, METHODS.md section 6): does the distilled student
//! look where the teacher looks? Grad-CAM of the true class, compared between the teacher and two
//! students: the run's model (the distilled one) and an independently trained one.
//!
//! **Grad-CAM** (Selvaraju et al.) at the last convolutional stage, activations A `[C, H, W]`,
//! for image i and its true class yᵢ with score z_{yᵢ}:
//!
//!   α_c = (1 / HW) Σ_{h,w} ∂z_{yᵢ} / ∂A_{c,h,w},   CAM = ReLU(Σ_c α_c A_c)   `[H, W]`.
//!
//! A whole batch is differentiated at once: in evaluation mode the images do not interact, so the
//! gradient of Σᵢ z_{i,yᵢ} with respect to A gives each image its own ∂z_{yᵢ}/∂Aᵢ. The gradient
//! is taken with respect to A only; no parameter's `.grad` changes.
//!
//! **Single-logit models** (logits `[B, 1]`, a binary task): the logit z is the score of class 1
//! and −z that of class 0, so an image of class 0 gets the Grad-CAM of −z (the sign of α flips,
//! and the ReLU keeps the other regions).
//!
//! **Comparison.** The three networks may have maps of different sizes (a teacher and a student
//! of different architectures need not downsample alike), so each CAM is first upsampled
//! bilinearly to the input image's H×W (`align_corners = false`, PyTorch's `F.interpolate`
//! default), then
//!
//!   cos(a, b) = ⟨a, b⟩ / (‖a‖ ‖b‖)   over the flattened map.
//!
//! An image is *closer* when cos(CAM_teacher, CAM_run) > cos(CAM_teacher, CAM_independent); a tie
//! is not closer. A CAM that is zero everywhere (no pixel has positive evidence for the true
//! class) leaves a cosine undefined: such an image is *degenerate* and counts as not closer.
//!
//! Reported: `localization`, the % of images that are closer (chance 50 %);
//! `localization_cos_teacher_run` and
//! `localization_cos_teacher_independent`, the mean cosines over the images that are not
//! degenerate; `localization_images` and `localization_degenerate`, the counts. Every name
//! carries the metric's prefix because the host merges the scalars of all metrics into one table.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_sdk::{
    Batch, Component, EpochInfo, Error, Host, Metric, MetricValues, Model, Outputs, Result,
};
use trellis_teacher::{load_teacher, load_trained, TrainedModel};

use super::{accumulate, percent, read};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalizationConfig {
    /// Compare only the first N evaluation images (0: all of them); each image costs a forward
    /// and a backward pass of all three networks.
    pub max_images: i64,
    pub teacher_checkpoint: PathBuf,
    pub teacher: toml::Table,
    /// The independently trained student, as `teacher`: its `[model]` table and the
    /// `model.safetensors` of the run that trained it without distillation.
    pub independent_checkpoint: PathBuf,
    pub independent: toml::Table,
}

/// Each network's score for the image's true class, `[B]`: the logit of class yᵢ, or ±z for a
/// single-logit model (see the module documentation).
fn true_class_scores(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let size = logits.size();
    if size.len() != 2 || targets.size() != [size[0]] {
        return Err(Error::msg(format!(
            "Grad-CAM needs logits [B, classes] and one class index per image, got logits {size:?} \
             and targets {:?}",
            targets.size()
        )));
    }
    if targets.is_floating_point() {
        return Err(Error::msg(format!(
            "Grad-CAM needs class-index targets, got {:?} targets",
            targets.kind()
        )));
    }
    let targets = targets.to_kind(Kind::Int64);
    // Out-of-range indices would be a device-side assert on a GPU: refuse them here instead.
    let lowest = targets.min().int64_value(&[]);
    let highest = targets.max().int64_value(&[]);
    let classes = size[1].max(2);
    if lowest < 0 || highest >= classes {
        return Err(Error::msg(format!(
            "targets {lowest}..={highest} are not classes of a model with {} logit(s)",
            size[1]
        )));
    }
    if size[1] == 1 {
        let sign = (targets * 2 - 1).to_kind(logits.kind());
        return Ok(logits.squeeze_dim(1) * sign);
    }
    Ok(logits
        .f_gather(1, &targets.unsqueeze(1), false)?
        .squeeze_dim(1))
}

/// Grad-CAM of each image's true class, `[B, H, W]` at the resolution of `model`'s last
/// convolutional stage, detached. `inputs` are what the model takes, `targets` class indices
/// `[B]`. Works under `no_grad` (it enables gradients itself) and leaves every parameter's
/// `.grad` as it was.
pub fn grad_cam(model: &Model, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    tch::with_grad(|| {
        // Through the input, the map is in a graph even when no parameter requires grad.
        let x = inputs.detach().set_requires_grad(true);
        let (outputs, map) = model.forward_with_feature_map(&x).map_err(|e| {
            Error::msg(format!(
                "no convolutional feature map, and Grad-CAM needs a convolutional model: {}",
                e.message
            ))
        })?;
        let size = map.size();
        if size.len() != 4 || size[0] != inputs.size()[0] {
            return Err(Error::msg(format!(
                "the feature map must be [B, C, H, W] for {} images, got {size:?}",
                inputs.size()[0]
            )));
        }
        let scores = true_class_scores(&outputs.logits, targets)?;
        let total = scores.sum(scores.kind());
        let gradient = Tensor::f_run_backward(&[&total], &[&map], false, false)?
            .pop()
            .ok_or_else(|| Error::msg("no gradient with respect to the feature map"))?;
        let kind = map.kind();
        let alpha = gradient.mean_dim([2i64, 3].as_slice(), true, kind);
        let weighted = (alpha * map.detach()).sum_dim_intlist([1i64].as_slice(), false, kind);
        Ok(weighted.relu())
    })
}

/// CAMs `[B, h, w]` resized bilinearly (`align_corners = false`) to `[B, height, width]`.
pub fn upsample_cam(cam: &Tensor, height: i64, width: i64) -> Result<Tensor> {
    Ok(cam
        .unsqueeze(1)
        .f_upsample_bilinear2d([height, width], false, None, None)?
        .squeeze_dim(1))
}

/// Per image, cos(a, b) over the flattened maps (in double precision), and whether both maps are
/// non-zero; the cosine of a degenerate pair is reported as 0.
fn cosines(a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    let (a, b) = (
        a.flatten(1, -1).to_kind(Kind::Double),
        b.flatten(1, -1).to_kind(Kind::Double),
    );
    let dim = [1i64];
    let dot = (&a * &b).sum_dim_intlist(dim.as_slice(), false, Kind::Double);
    let (norm_a, norm_b) = (
        a.norm_scalaropt_dim(2, dim.as_slice(), false),
        b.norm_scalaropt_dim(2, dim.as_slice(), false),
    );
    let defined = norm_a.gt(0.0).logical_and(&norm_b.gt(0.0));
    let cosine = dot / (norm_a * norm_b).clamp_min(f64::MIN_POSITIVE);
    (cosine * defined.to_kind(Kind::Double), defined)
}

/// The independently trained student, loaded like the teacher under this metric's own keys.
const INDEPENDENT: TrainedModel<'static> = TrainedModel {
    what: "the independently trained student",
    spec_key: "independent",
    checkpoint_key: "independent_checkpoint",
};

/// Fails at configuration time, at `key`, for a network whose feature map Grad-CAM cannot use.
fn check_feature_map(host: &Host, model: &Model, key: &str, which: &str) -> Result<()> {
    let [c, h, w] = host.input_shape();
    let kind = match model.parameters()?.first() {
        Some(p) => p.tensor.kind(),
        None => Kind::Float,
    };
    let probe = Tensor::zeros([1, c, h, w], (kind, host.device()));
    let map = tch::no_grad(|| model.forward_with_feature_map(&probe)).map_err(|e| {
        Error::config(
            key,
            format!(
                "the {which} has no convolutional feature map, and Grad-CAM needs a \
                 convolutional model: {}",
                e.message
            ),
        )
    })?;
    if map.1.dim() != 4 {
        return Err(Error::config(
            key,
            format!(
                "the {which}'s feature map must be [B, C, H, W], got {:?}",
                map.1.size()
            ),
        ));
    }
    Ok(())
}

/// Grad-CAM localisation: % of images whose distilled student's (the run's model's) CAM is closer
/// to the teacher's than the independently trained student's is (see the module documentation).
pub struct Localization {
    teacher: Model,
    independent: Model,
    student: Model,
    max_images: i64,
    seen: i64,
    /// [closer, not degenerate, Σ cos(teacher, run), Σ cos(teacher, independent), images]
    totals: Option<Tensor>,
}

impl Component for Localization {
    const NAME: &'static str = "localization";
    const DESCRIPTION: &'static str =
        "% of images whose Grad-CAM (true class) is closer to the teacher's than an independently \
         trained student's is";
    type Config = LocalizationConfig;

    fn new(config: LocalizationConfig, host: Host) -> Result<Self> {
        if config.max_images < 0 {
            return Err(Error::config(
                "max_images",
                "max_images must be >= 0 (0: all)",
            ));
        }
        let teacher = load_teacher(
            &host,
            Self::NAME,
            &config.teacher,
            &config.teacher_checkpoint,
        )?;
        check_feature_map(&host, &teacher, "teacher", "teacher")?;
        let independent = load_trained(
            &host,
            Self::NAME,
            &INDEPENDENT,
            &config.independent,
            &config.independent_checkpoint,
        )?;
        check_feature_map(
            &host,
            &independent,
            "independent",
            "independently trained student",
        )?;
        Ok(Localization {
            teacher,
            independent,
            // Not probed here: a forward in training mode would move its BatchNorm statistics.
            student: host.model()?,
            max_images: config.max_images,
            seen: 0,
            totals: None,
        })
    }
}

impl Metric for Localization {
    fn reset(&mut self) -> Result<()> {
        self.totals = None;
        self.seen = 0;
        Ok(())
    }

    fn update(&mut self, batch: &Batch, _outputs: &Outputs) -> Result<()> {
        let mut n = batch.inputs.size()[0];
        if self.max_images > 0 {
            n = n.min(self.max_images - self.seen);
        }
        if n <= 0 {
            return Ok(());
        }
        self.seen += n;
        let inputs = batch.inputs.narrow(0, 0, n);
        let targets = batch.targets.narrow(0, 0, n);
        let size = inputs.size();
        let (height, width) = (size[size.len() - 2], size[size.len() - 1]);
        let cam = |model: &Model, which: &str| -> Result<Tensor> {
            let cam = grad_cam(model, &inputs, &targets)
                .map_err(|e| Error::msg(format!("the {which}: {}", e.message)))?;
            upsample_cam(&cam, height, width)
        };
        let teacher = cam(&self.teacher, "teacher")?;
        let run = cam(&self.student, "run's model")?;
        let independent = cam(&self.independent, "independently trained student")?;
        let (cos_run, run_defined) = cosines(&teacher, &run);
        let (cos_independent, independent_defined) = cosines(&teacher, &independent);
        let defined = run_defined.logical_and(&independent_defined);
        let closer = cos_run.gt_tensor(&cos_independent).logical_and(&defined);
        let weight = defined.to_kind(Kind::Double);
        let sum = |t: Tensor| t.sum(Kind::Double);
        let images = Tensor::full([] as [i64; 0], n as f64, (Kind::Double, inputs.device()));
        accumulate(
            &mut self.totals,
            Tensor::stack(
                &[
                    sum(closer.to_kind(Kind::Double)),
                    sum(weight.shallow_clone()),
                    sum(cos_run * &weight),
                    sum(cos_independent * &weight),
                    images,
                ],
                0,
            ),
        );
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let mut scalars = Vec::new();
        if let [closer, defined, cos_run, cos_independent, images] = read(&self.totals)[..] {
            scalars.push(("localization".to_string(), percent(closer, images)));
            // Means over no image are undefined: left out rather than reported as 0.
            if defined > 0.0 {
                scalars.push((
                    "localization_cos_teacher_run".to_string(),
                    cos_run / defined,
                ));
                scalars.push((
                    "localization_cos_teacher_independent".to_string(),
                    cos_independent / defined,
                ));
            }
            scalars.push(("localization_images".to_string(), images));
            scalars.push(("localization_degenerate".to_string(), images - defined));
        }
        Ok(MetricValues {
            scalars,
            tables: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;
    use trellis_sdk::testing::FakeHost;
    use trellis_sdk::{Architecture, LayerKind, Param};

    use super::*;

    /// Conv(k×k, stride) → ReLU = the feature map A, global average pooling → linear head. Pooling
    /// makes ∂z_y/∂A_c = W_{y,c} / HW, so Grad-CAM is ReLU(Σ_c W_{y,c} A_c) / HW by hand.
    struct ConvNet {
        conv: Tensor,
        stride: i64,
        head: Tensor,
        /// Refuses `forward_with_feature_map`, as a model without convolutions does.
        no_map: bool,
    }

    impl ConvNet {
        /// Random weights, trainable so a test can check that none of them gets a gradient.
        fn random(seed: i64, inputs: i64, channels: i64, kernel: i64, classes: i64) -> ConvNet {
            tch::manual_seed(seed);
            let randn = |shape: &[i64]| {
                Tensor::randn(shape, (Kind::Double, Device::Cpu)).set_requires_grad(true)
            };
            ConvNet {
                conv: randn(&[channels, inputs, kernel, kernel]),
                stride: 1,
                head: randn(&[classes, channels]),
                no_map: false,
            }
        }

        /// The same tensors, the head with its sign flipped.
        fn negated(&self) -> ConvNet {
            ConvNet {
                conv: self.conv.shallow_clone(),
                stride: self.stride,
                head: -self.head.detach(),
                no_map: self.no_map,
            }
        }

        fn strided(mut self, stride: i64) -> ConvNet {
            self.stride = stride;
            self
        }

        fn model(&self) -> Model {
            Model::new(ConvNet {
                conv: self.conv.shallow_clone(),
                stride: self.stride,
                head: self.head.shallow_clone(),
                no_map: self.no_map,
            })
        }

        fn map(&self, inputs: &Tensor) -> Tensor {
            inputs
                .conv2d::<Tensor>(&self.conv, None, [self.stride], [0], [1], 1)
                .relu()
        }

        /// Grad-CAM by the pooling formula, `[B, H, W]`.
        fn hand_cam(&self, inputs: &Tensor, targets: &Tensor) -> Tensor {
            tch::no_grad(|| {
                let a = self.map(inputs);
                let size = a.size();
                let rows = self.head.detach().index_select(0, targets); // [B, C]
                let cam = (a * rows.view([size[0], size[1], 1, 1])).sum_dim_intlist(
                    [1i64].as_slice(),
                    false,
                    Kind::Double,
                ) / (size[2] * size[3]) as f64;
                cam.relu()
            })
        }
    }

    impl Architecture for ConvNet {
        fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
            Ok(self.forward_with_feature_map_unchecked(inputs).0)
        }
        fn forward_with_feature_map(&self, inputs: &Tensor) -> Result<(Outputs, Tensor)> {
            if self.no_map {
                return Err(Error::msg("a linear model has no feature map"));
            }
            Ok(self.forward_with_feature_map_unchecked(inputs))
        }
        fn head(&self, features: &Tensor) -> Result<Tensor> {
            Ok(features.linear::<Tensor>(&self.head, None))
        }
        fn parameters(&self) -> Result<Vec<Param>> {
            Ok(vec![Param {
                name: "conv.weight".into(),
                module: "conv".into(),
                kind: LayerKind::Conv2d,
                tensor: self.conv.shallow_clone(),
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
        fn feature_dim(&self) -> Result<i64> {
            Ok(self.head.size()[1])
        }
        fn spec(&self) -> Result<String> {
            Ok("use = \"conv\"\n".into())
        }
    }

    impl ConvNet {
        fn forward_with_feature_map_unchecked(&self, inputs: &Tensor) -> (Outputs, Tensor) {
            let map = self.map(inputs);
            let features = map.mean_dim([2i64, 3].as_slice(), false, Kind::Double);
            let logits = features.linear::<Tensor>(&self.head, None);
            (Outputs { logits, features }, map)
        }
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        a.size() == b.size() && a.allclose(b, 1e-9, 1e-12, false)
    }

    fn images(n: i64, channels: i64, side: i64) -> Tensor {
        tch::manual_seed(21);
        Tensor::randn([n, channels, side, side], (Kind::Double, Device::Cpu))
    }

    fn labels(values: &[i64]) -> Tensor {
        Tensor::from_slice(values)
    }

    /// Whether the CAMs have both zero and positive pixels, so the ReLU is exercised.
    fn mixed(cam: &Tensor) -> bool {
        let zeros = cam.eq(0.0).any().int64_value(&[]) != 0;
        let positive = cam.gt(0.0).any().int64_value(&[]) != 0;
        zeros && positive
    }

    #[test]
    fn grad_cam_with_pooling_is_the_head_weighted_map() {
        let net = ConvNet::random(1, 2, 4, 3, 3);
        let x = images(6, 2, 6);
        let y = labels(&[0, 1, 2, 2, 1, 0]);
        let cam = tch::no_grad(|| grad_cam(&net.model(), &x, &y)).unwrap();
        let expected = net.hand_cam(&x, &y);
        assert_eq!(cam.size(), [6, 4, 4]);
        assert!(mixed(&expected));
        assert!(close(&cam, &expected), "{cam}\nvs\n{expected}");
        // Each image gets its own class: another class's CAM differs.
        let other = net.hand_cam(&x, &labels(&[1, 2, 0, 0, 2, 1]));
        assert!(!close(&cam, &other));
        assert!(
            !net.conv.grad().defined() && !net.head.grad().defined(),
            "Grad-CAM must leave the parameters' gradients alone"
        );
    }

    #[test]
    fn a_single_logit_scores_class_1_with_z_and_class_0_with_minus_z() {
        let net = ConvNet::random(2, 2, 4, 3, 1);
        let x = images(4, 2, 6);
        let y = labels(&[1, 0, 1, 0]);
        let cam = grad_cam(&net.model(), &x, &y).unwrap();
        // Class 1 is the head's one row; class 0 is that row negated.
        let zeros = labels(&[0, 0, 0, 0]);
        let positive = net.hand_cam(&x, &zeros);
        let negative = net.negated().hand_cam(&x, &zeros);
        let expected = Tensor::stack(
            &[
                positive.get(0),
                negative.get(1),
                positive.get(2),
                negative.get(3),
            ],
            0,
        );
        assert!(mixed(&expected));
        assert!(close(&cam, &expected), "{cam}\nvs\n{expected}");
        assert!(grad_cam(&net.model(), &x, &labels(&[1, 0, 2, 0])).is_err());
    }

    #[test]
    fn bilinear_upsampling_by_hand() {
        // 2 → 4 with align_corners = false samples at 0, 0.25, 0.75 and 1 (clamped at the edges).
        let cam = Tensor::from_slice(&[0.0f64, 4.0, 8.0, 12.0]).view([1, 2, 2]);
        let up = upsample_cam(&cam, 4, 4).unwrap();
        let line = |a: f64, b: f64| [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b];
        let (top, bottom) = (line(0.0, 4.0), line(8.0, 12.0));
        let rows: Vec<f64> = (0..4).flat_map(|j| line(top[j], bottom[j])).collect();
        // `rows` runs column by column: transpose into [1, 4, 4].
        let expected = Tensor::from_slice(&rows).view([1, 4, 4]).transpose(1, 2);
        assert!(close(&up, &expected), "{up}\nvs\n{expected}");
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

    fn metric(teacher: &ConvNet, run: &ConvNet, independent: &ConvNet) -> Localization {
        Localization {
            teacher: teacher.model(),
            independent: independent.model(),
            student: run.model(),
            max_images: 0,
            seen: 0,
            totals: None,
        }
    }

    fn evaluate(metric: &mut Localization, batches: &[Batch]) -> MetricValues {
        metric.reset().unwrap();
        for b in batches {
            let outputs = tch::no_grad(|| metric.student.forward(&b.inputs)).unwrap();
            tch::no_grad(|| metric.update(b, &outputs)).unwrap();
        }
        metric.compute(info()).unwrap()
    }

    /// 1×1 convolution = identity on two channels and heads ±(A₀ − A₁): every image with both
    /// signs of x₀ − x₁ has a CAM for either class and either head sign.
    fn difference_net() -> ConvNet {
        ConvNet {
            conv: Tensor::eye(2, (Kind::Double, Device::Cpu)).view([2, 2, 1, 1]),
            stride: 1,
            head: Tensor::from_slice(&[1.0f64, -1.0, -1.0, 1.0]).view([2, 2]),
            no_map: false,
        }
    }

    #[test]
    fn the_teacher_itself_beats_a_negated_head_and_blank_images_are_degenerate() {
        let teacher = difference_net();
        let x = images(10, 2, 4);
        // A blank image: A = 0, so every CAM is zero.
        let _ = x.get(9).zero_();
        let b = Batch {
            inputs: x,
            targets: labels(&[0, 1, 0, 1, 0, 1, 0, 1, 0, 1]),
        };
        // The negated head's CAM lives where the teacher's is zero: cosine 0.
        let values = evaluate(&mut metric(&teacher, &teacher, &teacher.negated()), &[b]);
        assert_eq!(scalar(&values, "localization_images"), 10.0);
        assert_eq!(scalar(&values, "localization_degenerate"), 1.0);
        assert_eq!(scalar(&values, "localization"), 90.0);
        let (run, independent) = (
            scalar(&values, "localization_cos_teacher_run"),
            scalar(&values, "localization_cos_teacher_independent"),
        );
        assert!((run - 1.0).abs() < 1e-12, "{run}");
        assert!(independent.abs() < 1e-12, "{independent}");
    }

    #[test]
    fn swapped_roles_and_ties_are_never_closer_and_max_images_limits_the_count() {
        let teacher = difference_net();
        let batch = |seed: i64| {
            tch::manual_seed(seed);
            Batch {
                inputs: Tensor::randn([8, 2, 4, 4], (Kind::Double, Device::Cpu)),
                targets: labels(&[0, 1, 0, 1, 0, 1, 0, 1]),
            }
        };
        let batches = [batch(1), batch(2)];
        let mut swapped = metric(&teacher, &teacher.negated(), &teacher);
        let values = evaluate(&mut swapped, &batches);
        assert_eq!(scalar(&values, "localization"), 0.0);
        assert_eq!(scalar(&values, "localization_images"), 16.0);
        assert_eq!(scalar(&values, "localization_degenerate"), 0.0);
        // Two identical students tie on every image, and a tie is not closer.
        let values = evaluate(&mut metric(&teacher, &teacher, &teacher), &batches);
        assert_eq!(scalar(&values, "localization"), 0.0);
        let mut limited = metric(&teacher, &teacher, &teacher.negated());
        limited.max_images = 11;
        let values = evaluate(&mut limited, &batches);
        assert_eq!(scalar(&values, "localization_images"), 11.0);
        assert_eq!(scalar(&values, "localization"), 100.0);
        // Every evaluation starts over.
        let values = evaluate(&mut limited, &batches);
        assert_eq!(scalar(&values, "localization_images"), 11.0);
    }

    #[test]
    fn maps_of_different_sizes_are_compared_at_the_input_resolution() {
        // 8×8 images; 2×2 kernels: 7×7 maps at stride 1, 4×4 at stride 2.
        let fine = ConvNet::random(3, 2, 3, 2, 3);
        let coarse = ConvNet::random(4, 2, 3, 2, 3).strided(2);
        let x = images(5, 2, 8);
        let y = labels(&[0, 1, 2, 1, 0]);
        let b = Batch {
            inputs: x.shallow_clone(),
            targets: y.shallow_clone(),
        };
        let values = evaluate(&mut metric(&coarse, &fine, &coarse.negated()), &[b]);
        let up = |cam: Tensor| upsample_cam(&cam, 8, 8).unwrap();
        let (t, r) = (up(coarse.hand_cam(&x, &y)), up(fine.hand_cam(&x, &y)));
        assert_eq!(t.size(), [5, 8, 8]);
        let (cos, defined) = cosines(&t, &r);
        let (_, defined_independent) = cosines(&t, &up(coarse.negated().hand_cam(&x, &y)));
        let defined = defined.logical_and(&defined_independent);
        let count = defined.sum(Kind::Double).double_value(&[]);
        assert!(count > 0.0);
        let expected = (cos * defined.to_kind(Kind::Double))
            .sum(Kind::Double)
            .double_value(&[])
            / count;
        let got = scalar(&values, "localization_cos_teacher_run");
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        assert!(got > 0.0 && got < 1.0);
    }

    #[test]
    fn cosines_by_hand_and_zero_maps_are_undefined() {
        let a = Tensor::from_slice(&[1.0f64, 0.0, 0.0, 0.0, 3.0, 4.0]).view([3, 1, 2]);
        let b = Tensor::from_slice(&[1.0f64, 1.0, 5.0, 0.0, 4.0, 3.0]).view([3, 1, 2]);
        let (cos, defined) = cosines(&a, &b);
        let expected = Tensor::from_slice(&[0.5f64.sqrt(), 0.0, 24.0 / 25.0]);
        assert!(close(&cos, &expected), "{cos}");
        assert_eq!(
            Vec::<bool>::try_from(&defined).unwrap(),
            [true, false, true]
        );
    }

    /// A host whose run's model is `run`, building `teacher` for any spec.
    fn host(run: ConvNet, teacher: fn() -> ConvNet) -> Host {
        FakeHost::new(run)
            .classes(2)
            .input_shape([2, 4, 4])
            .build_model(move |_, _| Ok(teacher().model()))
            .host()
    }

    fn config(text: &str) -> LocalizationConfig {
        // Any existing file passes as a checkpoint: the fake host ignores it.
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let text = text.replace("FILE", file);
        trellis_sdk::parse_config::<LocalizationConfig>(&text).unwrap()
    }

    const FULL: &str = "teacher = { arch = \"resnet18\" }\nteacher_checkpoint = \"FILE\"\n\
                        independent = { arch = \"resnet18\" }\nindependent_checkpoint = \"FILE\"\n";

    fn refused_at(config: LocalizationConfig, teacher: fn() -> ConvNet) -> (String, String) {
        let err = Localization::new(config, host(difference_net(), teacher))
            .err()
            .expect("the config must be refused");
        (err.key.unwrap_or_default(), err.message)
    }

    #[test]
    fn bad_configs_are_refused_at_their_keys() {
        assert!(Localization::new(config(FULL), host(difference_net(), difference_net)).is_ok());
        let cases = [
            (
                "independent",
                FULL.replace("independent = { arch = \"resnet18\" }\n", ""),
            ),
            (
                "independent_checkpoint",
                FULL.replace("independent_checkpoint = \"FILE\"\n", ""),
            ),
            (
                "independent_checkpoint",
                FULL.replace(
                    "independent_checkpoint = \"FILE\"",
                    "independent_checkpoint = \"/no/such/file\"",
                ),
            ),
            (
                "teacher",
                FULL.replace("teacher = { arch = \"resnet18\" }\n", ""),
            ),
            ("max_images", format!("{FULL}max_images = -1\n")),
        ];
        for (key, text) in cases {
            let (at, message) = refused_at(config(&text), difference_net);
            assert_eq!(at, key, "{message}");
        }
        let flat = || ConvNet {
            no_map: true,
            ..difference_net()
        };
        let (at, message) = refused_at(config(FULL), flat);
        assert_eq!(at, "teacher");
        assert!(
            message.contains("Grad-CAM needs a convolutional model"),
            "{message}"
        );
    }

    #[test]
    fn a_run_model_without_a_feature_map_is_named_in_the_error() {
        let flat = ConvNet {
            no_map: true,
            ..difference_net()
        };
        let mut metric = Localization::new(config(FULL), host(flat, difference_net)).unwrap();
        let b = Batch {
            inputs: images(2, 2, 4),
            targets: labels(&[0, 1]),
        };
        metric.reset().unwrap();
        let outputs = tch::no_grad(|| metric.student.forward(&b.inputs)).unwrap();
        let err = tch::no_grad(|| metric.update(&b, &outputs)).err().unwrap();
        assert!(err.message.contains("the run's model"), "{}", err.message);
        assert!(
            err.message.contains("Grad-CAM needs a convolutional model"),
            "{}",
            err.message
        );
    }
}
