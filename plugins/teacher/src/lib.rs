//! What the distillation plugins (`kd`, `distill-metrics`) share: the teacher a previous
//! `trellis run` trained, built from the same keys with the same checks, so one teacher table
//! can be copied between them.

use std::path::Path;

use trellis_sdk::{Error, Host, Model, Result};

/// A trained network a component loads: what it is called in messages and the keys of its
/// `[model]` table and its weights.
pub struct TrainedModel<'a> {
    /// "the teacher", "the independently trained student".
    pub what: &'a str,
    /// The key of its `[model]`-style table (`teacher`).
    pub spec_key: &'a str,
    /// The key of its `model.safetensors` (`teacher_checkpoint`).
    pub checkpoint_key: &'a str,
}

/// The teacher of `kd` and the distillation metrics.
pub const TEACHER: TrainedModel<'static> = TrainedModel {
    what: "the teacher",
    spec_key: "teacher",
    checkpoint_key: "teacher_checkpoint",
};

/// Builds the teacher from its `[model]`-style table and the weights a previous run saved, in
/// eval mode. A mismatch between the two is reported at `teacher_checkpoint`, with the host's
/// list of missing and unexpected names.
pub fn load_teacher(
    host: &Host,
    component: &str,
    spec: &toml::Table,
    checkpoint: &Path,
) -> Result<Model> {
    load_trained(host, component, &TEACHER, spec, checkpoint)
}

/// [`load_teacher`] for any network a previous run trained, errors at its own keys.
pub fn load_trained(
    host: &Host,
    component: &str,
    model: &TrainedModel<'_>,
    spec: &toml::Table,
    checkpoint: &Path,
) -> Result<Model> {
    let TrainedModel {
        what,
        spec_key,
        checkpoint_key,
    } = *model;
    if spec.is_empty() {
        return Err(Error::config(
            spec_key,
            format!(
                "{component} needs {what}'s architecture, e.g. \
                 `{spec_key} = {{ arch = \"resnet34\", width = 0.25 }}` (the [model] table it was \
                 trained with)"
            ),
        ));
    }
    if checkpoint.as_os_str().is_empty() {
        return Err(Error::config(
            checkpoint_key,
            format!(
                "{component} needs {what}'s weights, e.g. \
                 `{checkpoint_key} = \"runs/{spec_key}/model.safetensors\"` (written by the \
                 `trellis run` that trained it)"
            ),
        ));
    }
    let text = toml::to_string(spec)
        .map_err(|e| Error::config(spec_key, format!("cannot write {what}'s spec: {e}")))?;
    let path = host.resolve(checkpoint);
    if !path.is_file() {
        return Err(Error::config(
            checkpoint_key,
            format!(
                "no weights of {what} at {}: train it first (`trellis run <its config> --out \
                 <dir>` writes <dir>/model.safetensors); a relative path is relative to the run \
                 config",
                path.display()
            ),
        ));
    }
    let trained = host.build_model(&text, Some(&path)).map_err(|e| {
        // The host refuses a spec before it reads any weights; point at what is wrong.
        let key = if e.message.starts_with("invalid model spec") {
            spec_key
        } else {
            checkpoint_key
        };
        Error::config(
            key,
            format!(
                "cannot load {what} ({}) from {}: {}",
                text.trim().replace('\n', ", "),
                path.display(),
                e.message
            ),
        )
    })?;
    trained.set_training(false)?;
    Ok(trained)
}
