//! libtorch's forward-mode AD, through the C++ shim in `csrc/forward_ad.cpp`: a dual level held
//! by a guard, tangents attached to tensors in place, and the tangent of a result read back.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, MutexGuard};

use tch::Tensor;
use trellis_sdk::{Error, Result};

extern "C" {
    fn trellis_enter_dual_level(level: *mut u64, error: *mut c_char, error_len: usize) -> c_int;
    fn trellis_exit_dual_level(level: u64, error: *mut c_char, error_len: usize) -> c_int;
    fn trellis_set_tangent(
        // `const at::Tensor*`, what tch's `Tensor::as_ptr` points at.
        primal: *const c_void,
        tangent: *const c_void,
        level: u64,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

const ERROR_LEN: usize = 1024;

/// Runs one shim call with an error buffer; a non-zero return carries libtorch's message.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buffer = [0 as c_char; ERROR_LEN];
    if f(buffer.as_mut_ptr(), ERROR_LEN) == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated string of at most ERROR_LEN bytes into the
    // buffer, and the buffer was zeroed, so it holds a NUL even if the shim wrote nothing.
    let message = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    Err(Error::msg(format!(
        "forward-mode AD: {what}: {}",
        message.to_string_lossy()
    )))
}

/// libtorch supports one forward-AD level at a time in the whole process, so threads take
/// turns (tests run in parallel), and a level inside a level on one thread is refused rather
/// than left to deadlock.
static ONE_LEVEL: Mutex<()> = Mutex::new(());

thread_local! {
    static IN_LEVEL: Cell<bool> = const { Cell::new(false) };
}

/// A forward-AD level, open while this guard lives: tangents attached under it belong to it, and
/// libtorch clears them all when the level is left (when the guard is dropped).
pub struct DualLevel {
    level: u64,
    _turn: MutexGuard<'static, ()>,
}

impl DualLevel {
    pub fn enter() -> Result<DualLevel> {
        if IN_LEVEL.get() {
            return Err(Error::msg(
                "forward-mode AD cannot be nested (a linearized model inside another one):                  use `jvp = \"double_vjp\"` for the outer one",
            ));
        }
        // A panic elsewhere while holding the lock leaves nothing half-done here.
        let turn = ONE_LEVEL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut level = 0u64;
        call("entering a dual level", |error, len| {
            // SAFETY: `level` is a valid place for the shim to write the new level's index and
            // `error` is a buffer of `len` bytes.
            unsafe { trellis_enter_dual_level(&mut level, error, len) }
        })?;
        IN_LEVEL.set(true);
        Ok(DualLevel { level, _turn: turn })
    }

    /// Makes `primal` a dual tensor at this level, in place: every operation on it (inside the
    /// model that owns it, too) now also computes the directional derivative along `tangent`.
    pub fn set_tangent(&self, primal: &Tensor, tangent: &Tensor) -> Result<()> {
        call("attaching a tangent", |error, len| {
            // SAFETY: tch's `Tensor` is a pointer to a live `at::Tensor` (its `C_tensor`), which
            // the shim only reads; both tensors outlive the call, and `error` holds `len` bytes.
            unsafe {
                trellis_set_tangent(
                    primal.as_ptr() as *const c_void,
                    tangent.as_ptr() as *const c_void,
                    self.level,
                    error,
                    len,
                )
            }
        })
    }

    /// `dual`'s primal value and its tangent at this level: the directional derivative of the
    /// computation that made it, itself differentiable by ordinary backward.
    pub fn unpack(&self, dual: &Tensor) -> Result<(Tensor, Tensor)> {
        let (primal, tangent) = Tensor::f_internal_unpack_dual(dual, self.level as i64)
            .map_err(|e| Error::msg(format!("forward-mode AD: reading a tangent: {e}")))?;
        // No tangent: nothing with a tangent reached this output, so its derivative is zero.
        let tangent = if tangent.defined() {
            tangent
        } else {
            primal.zeros_like()
        };
        Ok((primal, tangent))
    }
}

impl Drop for DualLevel {
    fn drop(&mut self) {
        IN_LEVEL.set(false);
        let level = self.level;
        let left = call("leaving a dual level", |error, len| {
            // SAFETY: `level` came from `trellis_enter_dual_level` and is released once, here;
            // `error` holds `len` bytes.
            unsafe { trellis_exit_dual_level(level, error, len) }
        });
        if let Err(e) = left {
            // Dropping cannot fail; a level that could not be left only keeps tangents alive.
            tracing::warn!("{}", e.message);
        }
    }
}
