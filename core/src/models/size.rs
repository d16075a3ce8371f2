//! How big a built-in model is, counted from its architecture before anything is allocated, and
//! whether the machine can hold it: a width that does not fit is refused with the numbers,
//! instead of being left to libtorch (a panic) or the kernel's OOM killer (a SIGKILL).

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use anyhow::Result;
use tch::Device;

use super::ModelConfig;

/// Bytes per element: the built-in models are float32.
const BYTES: u128 = 4;

/// More elements than any machine holds (4 TiB of float32); refused whatever memory is known.
const MAX_ELEMENTS: u128 = 1 << 40;

/// The trainable parameters and the buffers (BatchNorm statistics) of a built-in model.
/// Counted in `u128` with saturating arithmetic, so an absurd width gives an absurd number
/// rather than an overflow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelSize {
    pub parameters: u128,
    pub buffers: u128,
}

/// The product of dimensions, saturating.
pub(crate) fn product(dims: &[u128]) -> u128 {
    dims.iter().fold(1u128, |acc, &d| acc.saturating_mul(d))
}

/// A channel count from [`super::scaled`], as the counters take it.
pub(crate) fn dim(c: i64) -> u128 {
    c.max(0) as u128
}

impl ModelSize {
    fn add(&mut self, parameters: u128, buffers: u128) {
        self.parameters = self.parameters.saturating_add(parameters);
        self.buffers = self.buffers.saturating_add(buffers);
    }

    /// A `kernel`×`kernel` convolution, with or without a bias.
    pub(crate) fn conv(&mut self, c_in: u128, c_out: u128, kernel: u128, bias: bool) {
        let weight = product(&[c_out, c_in, kernel, kernel]);
        self.add(weight.saturating_add(if bias { c_out } else { 0 }), 0);
    }

    /// A BatchNorm: scale and shift, running mean and variance.
    pub(crate) fn batch_norm(&mut self, channels: u128) {
        self.add(channels.saturating_mul(2), channels.saturating_mul(2));
    }

    /// A linear layer with its bias.
    pub(crate) fn linear(&mut self, in_dim: u128, out_dim: u128) {
        self.add(product(&[in_dim, out_dim]).saturating_add(out_dim), 0);
    }

    /// Every element the model holds.
    pub fn elements(&self) -> u128 {
        self.parameters.saturating_add(self.buffers)
    }

    /// Bytes of the weights and buffers alone, as float32.
    pub fn bytes(&self) -> u128 {
        self.elements().saturating_mul(BYTES)
    }
}

/// The refusal of a model too large for the machine: what it needs against what there is, and
/// the fix (separate, so a config error can put it after the line it points at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoesNotFit {
    pub message: String,
    pub help: String,
}

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n  help: {}", self.message, self.help)
    }
}

impl std::error::Error for DoesNotFit {}

/// What the model is built for, which decides how much memory it needs beyond its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Training: the weights, their gradients and an optimizer's state (two more copies for
    /// Adam's moments) — about 4× the weights, before any activation.
    Train,
    /// Loading saved weights into it (`trellis esd`): the model and the file's copy, 2×.
    Analyse,
}

impl Purpose {
    fn factor(self) -> u128 {
        match self {
            Purpose::Train => 4,
            Purpose::Analyse => 2,
        }
    }

    /// What the factor is made of, after "needs at least N× that, X bytes, ".
    fn why(self) -> &'static str {
        match self {
            Purpose::Train => {
                "for the weights, their gradients and the optimizer's state (activations come \
                 on top)"
            }
            Purpose::Analyse => "for the model and the file's copy of it",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Purpose::Train => "training",
            Purpose::Analyse => "loading saved weights into it",
        }
    }

    /// How the user wrote the width.
    pub(crate) fn width_key(self) -> &'static str {
        match self {
            Purpose::Train => "model.width",
            Purpose::Analyse => "--width",
        }
    }

    /// The width as the user wrote it: `model.width = 64`, `--width 64`.
    pub(crate) fn width_setting(self, width: f64) -> String {
        match self {
            Purpose::Train => format!("model.width = {width}"),
            Purpose::Analyse => format!("--width {width}"),
        }
    }
}

/// Memory the model's weights may use on `device`: what `/proc/meminfo` calls MemAvailable
/// (capped by a cgroup v2 limit) for the CPU; unknown elsewhere (a GPU's allocation failure is
/// caught when it happens, and libtorch's message says what the GPU has).
pub fn available_memory(device: Device) -> Option<u128> {
    if device != Device::Cpu {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo_available(&meminfo)?;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u128>().ok());
    Some(limit.map_or(available, |l| l.min(available)))
}

/// MemAvailable from the text of `/proc/meminfo`, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u128> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kb: u128 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// "11.2 million", "45.8 billion": counts as people say them.
pub fn count_words(n: u128) -> String {
    let x = n as f64;
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1} thousand", x / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} million", x / 1e6),
        1_000_000_000..=999_999_999_999 => format!("{:.1} billion", x / 1e9),
        _ => format!("{x:.2e}"),
    }
}

/// "170.5 GiB".
pub fn byte_words(n: u128) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else if x >= 1024.0 {
        format!("{:.2e} bytes", n as f64)
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

/// `x` rounded down to two significant digits (a width to suggest that surely fits).
fn two_digits_down(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(1 - x.log10().floor() as i32);
    (x * scale).floor() / scale
}

/// Refuses a model that cannot fit: more elements than any machine has, or (where the memory
/// is known) more than `purpose` needs of what `device` has available. The message gives the
/// parameter count, the bytes, what the machine has and the widest width that would fit.
pub fn check_fits(
    cfg: &ModelConfig,
    num_classes: i64,
    in_channels: i64,
    image_size: i64,
    device: Device,
    purpose: Purpose,
) -> Result<()> {
    check_fits_in(
        cfg,
        num_classes,
        in_channels,
        image_size,
        available_memory(device),
        purpose,
    )
}

pub(crate) fn check_fits_in(
    cfg: &ModelConfig,
    num_classes: i64,
    in_channels: i64,
    image_size: i64,
    available: Option<u128>,
    purpose: Purpose,
) -> Result<()> {
    let size = cfg.size(num_classes, in_channels, image_size);
    let needed = |s: &ModelSize| s.bytes().saturating_mul(purpose.factor());
    let fits =
        |s: &ModelSize| s.elements() <= MAX_ELEMENTS && available.is_none_or(|a| needed(s) <= a);
    if fits(&size) {
        return Ok(());
    }
    let key = purpose.width_key();
    // Saturated counts are not counts any more.
    let astronomical = size.parameters >= u128::MAX / 64;
    let mut message = if astronomical {
        format!(
            "{} makes {} a model of more than 10^36 parameters",
            purpose.width_setting(cfg.width),
            cfg.arch,
        )
    } else {
        format!(
            "{} makes {} a model of {} parameters ({} as float32); {} needs at least {}× that, \
             {}, {}",
            purpose.width_setting(cfg.width),
            cfg.arch,
            count_words(size.parameters),
            byte_words(size.bytes()),
            purpose.verb(),
            purpose.factor(),
            byte_words(needed(&size)),
            purpose.why(),
        )
    };
    match available {
        Some(a) => {
            let _ = write!(
                message,
                ", but this machine has {} of memory available",
                byte_words(a)
            );
        }
        None => message.push_str(", more than any machine has"),
    }
    // The widest width that fits, by bisection (sizes grow with the width).
    let at = |width: f64| {
        ModelConfig {
            width,
            ..cfg.clone()
        }
        .size(num_classes, in_channels, image_size)
    };
    let (mut lo, mut hi) = (0.0f64, cfg.width);
    if fits(&at(1e-9)) {
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if fits(&at(mid)) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let suggestion = two_digits_down(lo);
        if suggestion > 0.0 && fits(&at(suggestion)) {
            let help = format!(
                "lower {key}: {suggestion} is about the widest that fits ({} parameters; \
                 activations not counted)",
                count_words(at(suggestion).parameters)
            );
            return Err(DoesNotFit { message, help }.into());
        }
    }
    let help = format!("lower {key}, or use a smaller architecture");
    Err(DoesNotFit { message, help }.into())
}

thread_local! {
    /// Set while [`catch_panic`] runs on this thread: the hook records instead of printing.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with no message".to_string()
    }
}

/// Runs `f`, turning a panic (tch's panicking methods on a libtorch error, such as a failed
/// allocation) into its message, without printing it; the message is trimmed of libtorch's C++
/// backtrace. Panics on other threads are reported as before.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) {
                let message = payload_message(info.payload());
                CAUGHT.with(|c| *c.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
    let outer = CATCHING.with(|c| c.replace(true));
    CAUGHT.with(|c| c.borrow_mut().take());
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| {
        let message = CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| payload_message(payload.as_ref()));
        trellis_sdk::adapt::without_backtrace(&message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_counts_and_bytes() {
        assert_eq!(count_words(62_006), "62.0 thousand");
        assert_eq!(count_words(11_173_962), "11.2 million");
        assert_eq!(count_words(45_765_843_466), "45.8 billion");
        assert_eq!(count_words(999), "999");
        assert_eq!(byte_words(512), "512 bytes");
        assert_eq!(byte_words(3 << 30), "3.0 GiB");
        assert_eq!(two_digits_down(1.379), 1.3);
        assert_eq!(two_digits_down(0.0567), 0.056);
        assert_eq!(
            meminfo_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(meminfo_available("MemTotal: 100 kB\n"), None);
    }

    #[test]
    fn caught_panics_are_trimmed_and_not_printed() {
        let err = catch_panic(|| {
            panic!(
                "called `Result::unwrap()` on an `Err` value: Torch(\"DefaultCPUAllocator: \
                 not enough memory\\nException raised from alloc at c10/core.cpp:1 (most \
                 recent call first):\\nframe #0: c10::Error::Error() + 0x1\")"
            )
        })
        .unwrap_err();
        assert_eq!(err, "libtorch: DefaultCPUAllocator: not enough memory");
        assert_eq!(catch_panic(|| 3).unwrap(), 3);
    }
}
