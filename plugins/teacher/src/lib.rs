//! What the distillation plugins (`kd`, `distill-metrics`) share: the teacher a previous
//! `trellis run` trained, built from the same keys with the same checks, so one teacher table
//! can be copied between them.

use std::path::Path;

use trellis_sdk::{Error, Host, Model, Result};

/// Builds the teacher from its `[model]`-style table and the weights a previous run saved, in
/// eval mode. A mismatch between the two is reported at `teacher_checkpoint`, with the host's
/// list of missing and unexpected names.
pub fn load_teacher(
    host: &Host,
    component: &str,
    spec: &toml::Table,
    checkpoint: &Path,
) -> Result<Model> {
    if spec.is_empty() {
        return Err(Error::config(
            "teacher",
            format!(
                "{component} needs the teacher's architecture, e.g. \
                 `teacher = {{ arch = \"resnet34\", width = 0.25 }}` (the [model] table the teacher \
                 was trained with)"
            ),
        ));
    }
    if checkpoint.as_os_str().is_empty() {
        return Err(Error::config(
            "teacher_checkpoint",
            format!(
                "{component} needs the teacher's weights, e.g. \
                 `teacher_checkpoint = \"runs/teacher/model.safetensors\"` (written by the \
                 `trellis run` that trained it)"
            ),
        ));
    }
    let text = toml::to_string(spec)
        .map_err(|e| Error::config("teacher", format!("cannot write the teacher spec: {e}")))?;
    let path = host.resolve(checkpoint);
    if !path.is_file() {
        return Err(Error::config(
            "teacher_checkpoint",
            format!(
                "no teacher weights at {}: train the teacher first (`trellis run <teacher config> \
                 --out <dir>` writes <dir>/model.safetensors); a relative path is relative to the \
                 run config",
                path.display()
            ),
        ));
    }
    let teacher = host.build_model(&text, Some(&path)).map_err(|e| {
        // The host refuses a spec before it reads any weights; point at what is wrong.
        let key = if e.message.starts_with("invalid model spec") {
            "teacher"
        } else {
            "teacher_checkpoint"
        };
        Error::config(
            key,
            format!(
                "cannot load the teacher ({}) from {}: {}",
                text.trim().replace('\n', ", "),
                path.display(),
                e.message
            ),
        )
    })?;
    teacher.set_training(false)?;
    Ok(teacher)
}
