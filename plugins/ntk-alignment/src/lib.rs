//! NTK–label alignment (Ortiz-Jiménez et al. NeurIPS 2021; METHODS.md section 8) of a two-class
//! model with a single logit f (`[model] outputs = 1`, `[train] loss = "bce"`):
//!
//! A = yᵀΘy / yᵀy = ‖Σᵢ yᵢ ∇θ f(xᵢ)‖² / ‖y‖²,
//!
//! with Θᵢⱼ = ∇θ f(xᵢ)·∇θ f(xⱼ) the empirical neural tangent kernel over every trainable parameter
//! (conv and dense kernels, biases, BatchNorm scale and shift) and y = ±1 the labels (+1 for class
//! 1, −1 for class 0) of the first `samples` evaluation images (default 500), so ‖y‖² = n. A is
//! the kernel's energy along the label vector: how well the directions in which a gradient step
//! can move the outputs line up with the task.
//!
//! One backward per batch suffices: yᵀΘy = (Σᵢ yᵢ ∇θ f(xᵢ))·(Σⱼ yⱼ ∇θ f(xⱼ)), and because the
//! gradient is linear, Σᵢ yᵢ ∇θ f(xᵢ) = ∇θ Σᵢ yᵢ f(xᵢ): backpropagating the one scalar
//! Σᵢ yᵢ f(xᵢ) of a batch gives that batch's share, and the shares add up across batches. Neither
//! the n × P Jacobian nor the n × n kernel is ever formed. This needs every output to depend on
//! its own image only, which evaluation mode guarantees: BatchNorm normalises with its running
//! statistics, not the batch's, exactly as f_lin freezes them.
//!
//! What it shows: while f trains, A rises (the kernel adapts to the labels); for the linearised
//! network f_lin, ∇θ f_lin = J(θ0) whatever θ is, so Θ and A stay at their values at θ0. The gap
//! between the two curves is the kernel adaptation the linearised network cannot do.
//!
//! Computed at every evaluation, at the cost of one forward and one backward pass over the first
//! `samples` images. The gradients come from `run_backward`, which returns them instead of
//! accumulating into `.grad`, so the training loop's gradients are never touched. A float64 model
//! is fed float64 images and its gradient sums stay in float64; they live on the model's device
//! and are read back once per evaluation. Reports `ntk_alignment` and `ntk_alignment_samples`
//! (n, fewer than `samples` when the evaluation set is smaller).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_sdk::{
    bail, Batch, Component, EpochInfo, Error, Host, Metric, MetricValues, Outputs, Plugin, Result,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NtkAlignmentConfig {
    /// How many evaluation images (the first ones, in the evaluation order) y and Θ cover.
    pub samples: i64,
}

impl Default for NtkAlignmentConfig {
    fn default() -> Self {
        NtkAlignmentConfig { samples: 500 }
    }
}

/// yᵀΘy / yᵀy over the first `samples` evaluation images.
pub struct NtkAlignment {
    host: Host,
    samples: i64,
    /// Images taken so far in this evaluation.
    seen: i64,
    /// Σᵢ yᵢ ∇θ f(xᵢ) per trainable parameter, in `parameters()` order; `None` while no output
    /// has depended on that parameter.
    sums: Vec<Option<Tensor>>,
}

impl Component for NtkAlignment {
    const NAME: &'static str = "ntk_alignment";
    const DESCRIPTION: &'static str =
        "NTK–label alignment yᵀΘy / yᵀy of a single-logit two-class model";
    type Config = NtkAlignmentConfig;

    fn new(config: NtkAlignmentConfig, host: Host) -> Result<Self> {
        if config.samples < 1 {
            return Err(Error::config("samples", "samples must be >= 1"));
        }
        // One blank image in evaluation mode tells the logits' width (and leaves BatchNorm's
        // statistics alone): a wrong model is refused before training, not after an epoch.
        let model = host.model()?;
        let kind = match model.parameters()?.first() {
            Some(p) => p.tensor.kind(),
            None => bail!("ntk_alignment: the model has no trainable parameters"),
        };
        let [c, h, w] = host.input_shape();
        let blank = Tensor::zeros([1, c, h, w], (kind, host.device()));
        let training = model.is_training()?;
        model.set_training(false)?;
        let probe = tch::no_grad(|| model.forward(&blank));
        model.set_training(training)?;
        check_single_logit(&probe?.logits)?;
        Ok(NtkAlignment {
            host,
            samples: config.samples,
            seen: 0,
            sums: Vec::new(),
        })
    }
}

fn check_single_logit(logits: &Tensor) -> Result<()> {
    let gives = match logits.size()[..] {
        [_, 1] => return Ok(()),
        [_, width] => format!("{width} logits per image"),
        ref size => format!("logits of shape {size:?}"),
    };
    bail!(
        "ntk_alignment needs a model with a single logit, but this one gives {gives}: for a \
         two-class task set `[model] outputs = 1` and `[train] loss = \"bce\"` (and \
         `[data] cifar2 = true` for CIFAR-10)"
    )
}

/// y = ±1 in `kind` from class labels `[B]` or per-class probabilities `[B, 2]` (the likelier
/// class).
fn signs(targets: &Tensor, kind: Kind) -> Result<Tensor> {
    let labels = match targets.size()[..] {
        [_] => targets.shallow_clone(),
        [_, 2] => targets.f_argmax(-1, false)?,
        ref size => bail!(
            "ntk_alignment takes class labels [B] or two-class probabilities [B, 2], got \
             targets of shape {size:?}"
        ),
    };
    // One read per batch; the backward that follows dominates the cost anyway.
    let outside = labels
        .f_ne(0)?
        .f_logical_and(&labels.f_ne(1)?)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    if outside > 0 {
        bail!(
            "ntk_alignment needs two-class labels 0 and 1, but {outside} targets of a batch are \
             neither (set `[data] cifar2 = true` for CIFAR-10)"
        );
    }
    Ok(labels.f_to_kind(kind)? * 2.0 - 1.0)
}

impl Metric for NtkAlignment {
    fn reset(&mut self) -> Result<()> {
        self.seen = 0;
        self.sums.clear();
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        check_single_logit(&outputs.logits)?;
        let take = (self.samples - self.seen).min(batch.inputs.size()[0]);
        if take <= 0 {
            return Ok(());
        }
        let model = self.host.model()?;
        // run_backward refuses a tensor that does not require grad (a frozen one).
        let params: Vec<Tensor> = model
            .parameters()?
            .into_iter()
            .map(|p| p.tensor)
            .filter(Tensor::requires_grad)
            .collect();
        let Some(first) = params.first() else {
            bail!("ntk_alignment: the model has no trainable parameters");
        };
        if self.sums.is_empty() {
            self.sums = params.iter().map(|_| None).collect();
        } else if self.sums.len() != params.len() {
            bail!(
                "ntk_alignment: the model's trainable parameters changed during an evaluation \
                 ({} before, {} now)",
                self.sums.len(),
                params.len()
            );
        }
        let mut inputs = batch.inputs.narrow(0, 0, take);
        // The host's batches are float32 even when the model was switched to float64.
        if first.kind() == Kind::Double && inputs.kind() != Kind::Double {
            inputs = inputs.f_to_kind(Kind::Double)?;
        }
        let targets = batch.targets.narrow(0, 0, take);
        // The host evaluates under no_grad; this metric needs the graph of its own forward.
        let grads = tch::with_grad(|| -> Result<Vec<Tensor>> {
            let logits = model.forward(&inputs)?.logits;
            check_single_logit(&logits)?;
            let y = signs(&targets, logits.kind())?;
            let projected = logits.f_squeeze_dim(1)?.f_mul(&y)?.f_sum(logits.kind())?;
            let refs: Vec<&Tensor> = params.iter().collect();
            Ok(Tensor::f_run_backward(&[&projected], &refs, false, false)?)
        })?;
        for (sum, grad) in self.sums.iter_mut().zip(grads) {
            // Undefined: this batch's outputs do not depend on the parameter.
            if grad.defined() {
                *sum = Some(match sum.take() {
                    Some(s) => s.f_add(&grad)?,
                    None => grad,
                });
            }
        }
        self.seen += take;
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let n = self.seen;
        // Taken rather than kept: the sums are as large as the model.
        let sums = std::mem::take(&mut self.sums);
        self.seen = 0;
        if n == 0 {
            return Ok(MetricValues::default());
        }
        let squares = sums
            .iter()
            .flatten()
            .map(|g| Ok(g.f_square()?.f_sum(Kind::Double)?))
            .collect::<Result<Vec<Tensor>>>()?;
        let energy = if squares.is_empty() {
            0.0
        } else {
            Tensor::f_stack(&squares, 0)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?
        };
        Ok(MetricValues {
            scalars: vec![
                ("ntk_alignment".to_string(), energy / n as f64),
                ("ntk_alignment_samples".to_string(), n as f64),
            ],
            tables: Vec::new(),
        })
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "NTK–label alignment of a single-logit two-class model"
)
.metric::<NtkAlignment>());

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use tch::Device;
    use trellis_sdk::testing::{set_kind, FakeHost, TinyNet};
    use trellis_sdk::{parse_config, Architecture, ErrorKind, LayerKind, Model, Param};

    use super::*;

    const SHAPE: [i64; 3] = [3, 2, 2];
    const OPTS: (Kind, Device) = (Kind::Double, Device::Cpu);

    /// A float64 network on `[B, 3, 2, 2]` images: tanh(W₁x + b₁) → W₂·+b₂ (an MLP), or, with
    /// fixed random features φ(x) = tanh(Px) that are not parameters, w·φ(x) + b, which is linear
    /// in its parameters.
    struct Net {
        params: Vec<Param>,
        fixed: Option<Tensor>,
        hidden: i64,
        training: Cell<bool>,
    }

    fn param(name: &str, kind: LayerKind, tensor: Tensor) -> Param {
        Param {
            name: name.to_string(),
            module: name.rsplit_once('.').map_or("", |(m, _)| m).to_string(),
            kind,
            tensor: tensor.set_requires_grad(true),
        }
    }

    fn head_params(hidden: i64, outputs: i64) -> Vec<Param> {
        vec![
            param(
                "head.weight",
                LayerKind::Linear,
                Tensor::randn([outputs, hidden], OPTS) / (hidden as f64).sqrt(),
            ),
            param(
                "head.bias",
                LayerKind::Linear,
                Tensor::randn([outputs], OPTS) * 0.1,
            ),
        ]
    }

    impl Net {
        fn mlp(hidden: i64, outputs: i64) -> Net {
            let inputs = SHAPE.iter().product::<i64>();
            let mut params = vec![
                param(
                    "hidden.weight",
                    LayerKind::Linear,
                    Tensor::randn([hidden, inputs], OPTS) / (inputs as f64).sqrt(),
                ),
                param(
                    "hidden.bias",
                    LayerKind::Linear,
                    Tensor::randn([hidden], OPTS) * 0.1,
                ),
            ];
            params.extend(head_params(hidden, outputs));
            Net {
                params,
                fixed: None,
                hidden,
                training: Cell::new(false),
            }
        }

        fn linear_in_theta(hidden: i64) -> Net {
            let inputs = SHAPE.iter().product::<i64>();
            Net {
                params: head_params(hidden, 1),
                fixed: Some(Tensor::randn([hidden, inputs], OPTS) / (inputs as f64).sqrt()),
                hidden,
                training: Cell::new(false),
            }
        }

        fn tensor(&self, name: &str) -> &Tensor {
            &self.params.iter().find(|p| p.name == name).unwrap().tensor
        }
    }

    impl Architecture for Net {
        fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
            let x = inputs.f_flatten(1, -1)?;
            let features = match &self.fixed {
                Some(p) => x.f_linear::<&Tensor>(p, None)?.f_tanh()?,
                None => x
                    .f_linear(
                        self.tensor("hidden.weight"),
                        Some(self.tensor("hidden.bias")),
                    )?
                    .f_tanh()?,
            };
            Ok(Outputs {
                logits: self.head(&features)?,
                features,
            })
        }
        fn head(&self, features: &Tensor) -> Result<Tensor> {
            Ok(features.f_linear(self.tensor("head.weight"), Some(self.tensor("head.bias")))?)
        }
        fn parameters(&self) -> Result<Vec<Param>> {
            Ok(self.params.iter().map(Param::shallow_clone).collect())
        }
        fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
            Ok(Vec::new())
        }
        fn set_training(&self, train: bool) -> Result<()> {
            self.training.set(train);
            Ok(())
        }
        fn is_training(&self) -> Result<bool> {
            Ok(self.training.get())
        }
        fn set_double(&self, double: bool) -> Result<()> {
            let kind = if double { Kind::Double } else { Kind::Float };
            set_kind(
                self.params.iter().map(|p| &p.tensor).chain(&self.fixed),
                kind,
            );
            Ok(())
        }
        fn feature_dim(&self) -> Result<i64> {
            Ok(self.hidden)
        }
        fn spec(&self) -> Result<String> {
            Ok("use = \"test\"\n".to_string())
        }
    }

    fn info() -> EpochInfo {
        EpochInfo {
            epoch: 1,
            epochs: 1,
            step: 1,
        }
    }

    /// A metric over `model` and a handle to the same model.
    fn setup(model: impl Architecture, samples: i64) -> (NtkAlignment, Model) {
        let host = FakeHost::new(model).input_shape(SHAPE).classes(2).host();
        let handle = host.model().unwrap();
        let metric = NtkAlignment::new(NtkAlignmentConfig { samples }, host).unwrap();
        (metric, handle)
    }

    /// Float32 images, as the host's loader gives them, with these labels.
    fn batch(labels: &[i64]) -> Batch {
        let n = labels.len() as i64;
        Batch {
            inputs: Tensor::randn(
                [n, SHAPE[0], SHAPE[1], SHAPE[2]],
                (Kind::Float, Device::Cpu),
            ),
            targets: Tensor::from_slice(labels),
        }
    }

    fn batches() -> Vec<Batch> {
        vec![
            batch(&[1, 0, 0]),
            batch(&[0, 1, 1, 0, 1]),
            batch(&[1, 1, 0, 0]),
        ]
    }

    /// One evaluation as the host runs it: reset, then per batch the model's outputs under
    /// no_grad and `update` under no_grad, then `compute`.
    fn evaluate(metric: &mut NtkAlignment, model: &Model, batches: &[Batch]) -> Result<f64> {
        metric.reset()?;
        for b in batches {
            let kind = model.parameters()?[0].tensor.kind();
            let outputs = tch::no_grad(|| model.forward(&b.inputs.to_kind(kind)))?;
            tch::no_grad(|| metric.update(b, &outputs))?;
        }
        let values = metric.compute(info())?;
        let get = |name: &str| values.scalars.iter().find(|(n, _)| n == name).unwrap().1;
        let samples = get("ntk_alignment_samples");
        let wanted = batches
            .iter()
            .map(|b| b.inputs.size()[0])
            .sum::<i64>()
            .min(metric.samples);
        assert_eq!(samples, wanted as f64);
        Ok(get("ntk_alignment"))
    }

    /// A from its definition: the Jacobian J (n × P) row by row, one backward per image, then
    /// Θ = J Jᵀ and yᵀΘy / yᵀy.
    fn explicit_alignment(model: &Model, batches: &[Batch], samples: i64) -> f64 {
        let inputs = Tensor::cat(&batches.iter().map(|b| &b.inputs).collect::<Vec<_>>(), 0);
        let labels = Tensor::cat(&batches.iter().map(|b| &b.targets).collect::<Vec<_>>(), 0);
        let params: Vec<Tensor> = model
            .parameters()
            .unwrap()
            .into_iter()
            .map(|p| p.tensor)
            .collect();
        let rows: Vec<Tensor> = (0..samples)
            .map(|i| {
                let x = inputs.narrow(0, i, 1).to_kind(Kind::Double);
                let f = model.forward(&x).unwrap().logits.sum(Kind::Double);
                let grads = Tensor::run_backward(&[&f], &params, false, false);
                Tensor::cat(
                    &grads.iter().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(),
                    0,
                )
            })
            .collect();
        let jacobian = Tensor::stack(&rows, 0);
        let kernel = jacobian.matmul(&jacobian.tr());
        let y = labels.narrow(0, 0, samples).to_kind(Kind::Double) * 2.0 - 1.0;
        (y.dot(&kernel.mv(&y)) / y.dot(&y)).double_value(&[])
    }

    fn assert_close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs(),
            "{got} vs {want} (relative {:.3e})",
            (got - want).abs() / want.abs()
        );
    }

    #[test]
    fn alignment_equals_the_explicit_kernel_over_the_first_samples() {
        tch::manual_seed(0);
        let (mut metric, model) = setup(Net::mlp(6, 1), 9);
        let batches = batches();
        // 12 images in batches of 3, 5 and 4: 9 ends inside the second batch.
        let want = explicit_alignment(&model, &batches, 9);
        assert_close(
            evaluate(&mut metric, &model, &batches).unwrap(),
            want,
            1e-10,
        );
        // The first nine images only: all twelve give another value.
        let all = explicit_alignment(&model, &batches, 12);
        assert!((all - want).abs() > 1e-6 * want.abs(), "{all} vs {want}");
    }

    #[test]
    fn alignment_of_a_batchnorm_net_in_eval_mode_equals_the_explicit_kernel() {
        tch::manual_seed(1);
        let net = TinyNet::new(3, 1);
        net.set_double(true).unwrap();
        tch::no_grad(|| {
            for p in net
                .parameters()
                .unwrap()
                .iter()
                .filter(|p| p.name.starts_with("bn1"))
            {
                p.tensor
                    .shallow_clone()
                    .copy_(&(p.tensor.randn_like() * 0.3 + 1.0));
            }
            for (_, b) in net.buffers().unwrap() {
                b.shallow_clone().copy_(&(b.rand_like() + 0.5));
            }
        });
        let (mut metric, model) = setup(net, 10);
        let batches = batches();
        let want = explicit_alignment(&model, &batches, 10);
        assert_close(
            evaluate(&mut metric, &model, &batches).unwrap(),
            want,
            1e-10,
        );
    }

    #[test]
    fn a_float32_model_is_measured_too() {
        tch::manual_seed(2);
        let (mut metric, model) = setup(TinyNet::new(3, 1), 500);
        let batches = batches();
        let got = evaluate(&mut metric, &model, &batches).unwrap();
        model.set_double(true).unwrap();
        let want = explicit_alignment(&model, &batches, 12);
        assert_close(got, want, 1e-4);
    }

    #[test]
    fn every_evaluation_starts_afresh() {
        tch::manual_seed(3);
        let (mut metric, model) = setup(Net::mlp(6, 1), 500);
        let batches = batches();
        let first = evaluate(&mut metric, &model, &batches).unwrap();
        let second = evaluate(&mut metric, &model, &batches).unwrap();
        assert_close(second, first, 1e-12);
        let want = explicit_alignment(&model, &batches, 12);
        assert_close(first, want, 1e-10);
    }

    #[test]
    fn soft_targets_count_as_their_likelier_class() {
        tch::manual_seed(4);
        let (mut metric, model) = setup(Net::mlp(6, 1), 500);
        let hard = batches();
        // The first batch stays hard: A is blind to flipping every sign, not to flipping some.
        let soft: Vec<Batch> = hard
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let p = b.targets.to_kind(Kind::Float) * 0.6 + 0.2;
                Batch {
                    inputs: b.inputs.shallow_clone(),
                    targets: if i == 0 {
                        b.targets.shallow_clone()
                    } else {
                        Tensor::stack(&[1.0 - &p, p], 1)
                    },
                }
            })
            .collect();
        let want = explicit_alignment(&model, &hard, 12);
        assert_close(evaluate(&mut metric, &model, &soft).unwrap(), want, 1e-10);
    }

    fn grads(model: &Model) -> Vec<Tensor> {
        model
            .parameters()
            .unwrap()
            .into_iter()
            .map(|p| p.tensor.grad())
            .collect()
    }

    #[test]
    fn the_parameters_gradients_are_left_alone() {
        tch::manual_seed(5);
        let (mut metric, model) = setup(Net::mlp(6, 1), 500);
        let batches = batches();
        evaluate(&mut metric, &model, &batches).unwrap();
        assert!(
            grads(&model).iter().all(|g| !g.defined()),
            "no .grad appears"
        );

        let x = batches[0].inputs.to_kind(Kind::Double);
        model
            .forward(&x)
            .unwrap()
            .logits
            .sum(Kind::Double)
            .backward();
        let before: Vec<Tensor> = grads(&model).iter().map(Tensor::copy).collect();
        evaluate(&mut metric, &model, &batches).unwrap();
        let after = grads(&model);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            assert!(
                b.defined() && a.equal(b),
                "the training loop's .grad is unchanged"
            );
        }
    }

    /// Adds noise to every parameter in place.
    fn move_parameters(model: &Model) {
        tch::no_grad(|| {
            for p in model.parameters().unwrap() {
                let _ = p
                    .tensor
                    .shallow_clone()
                    .f_add_(&(p.tensor.randn_like() * 0.5));
            }
        });
    }

    #[test]
    fn alignment_is_constant_for_a_model_linear_in_its_parameters() {
        tch::manual_seed(6);
        let batches = batches();

        let (mut metric, model) = setup(Net::linear_in_theta(6), 500);
        let before = evaluate(&mut metric, &model, &batches).unwrap();
        move_parameters(&model);
        let after = evaluate(&mut metric, &model, &batches).unwrap();
        assert_close(after, before, 1e-12);

        let (mut metric, model) = setup(Net::mlp(6, 1), 500);
        let before = evaluate(&mut metric, &model, &batches).unwrap();
        move_parameters(&model);
        let after = evaluate(&mut metric, &model, &batches).unwrap();
        assert!(
            (after - before).abs() > 1e-3 * before.abs(),
            "an MLP's kernel moves with its parameters: {before} vs {after}"
        );
    }

    #[test]
    fn a_model_with_one_logit_per_class_is_refused() {
        tch::manual_seed(7);
        let says_how = |err: &Error| {
            assert!(
                err.message.contains("`[model] outputs = 1`")
                    && err.message.contains("`[train] loss = \"bce\"`"),
                "{err}"
            );
        };
        let host = FakeHost::new(Net::mlp(6, 2)).input_shape(SHAPE).host();
        let err = NtkAlignment::new(NtkAlignmentConfig::default(), host).err();
        says_how(&err.expect("refused when created"));

        // Outputs of another width than the head's (a model that changed) are refused too.
        let (mut metric, _) = setup(Net::mlp(6, 1), 500);
        let b = batch(&[0, 1]);
        let outputs = Outputs {
            logits: Tensor::zeros([2, 2], OPTS),
            features: Tensor::zeros([2, 6], OPTS),
        };
        says_how(&tch::no_grad(|| metric.update(&b, &outputs)).unwrap_err());
    }

    #[test]
    fn labels_other_than_0_and_1_are_refused() {
        tch::manual_seed(8);
        let (mut metric, model) = setup(Net::mlp(6, 1), 500);
        let err = evaluate(&mut metric, &model, &[batch(&[0, 1, 2])]).unwrap_err();
        assert!(err.message.contains("neither"), "{err}");
    }

    #[test]
    fn samples_must_be_positive() {
        let host = FakeHost::new(Net::mlp(6, 1)).host();
        let config: NtkAlignmentConfig = parse_config("samples = 0").unwrap();
        let err = NtkAlignment::new(config, host).err().unwrap();
        assert_eq!(
            (err.kind, err.key.as_deref()),
            (ErrorKind::Config, Some("samples"))
        );
        let err = parse_config::<NtkAlignmentConfig>("sample = 5").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert_eq!(parse_config::<NtkAlignmentConfig>("").unwrap().samples, 500);
    }
}
